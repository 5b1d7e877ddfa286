"""The Qwen3-Omni vision/video encoder (SigLIP2-style ViT + 2x2 patch merger + deepstack taps).

Math follows transformers' ``Qwen3OmniMoeVisionEncoder`` at float32 parity; the layout is built
for static shapes under jit:

* Input is a *packed buffer* of ``P`` patches (a bucket size, see ``bucket_patches``) holding the
  patches of several images/videos back to back, in the processor's order (per item: temporal
  patch, then 2x2 merge windows in raster order, then the 4 patches of a window), followed by
  padding. Each patch carries its own metadata (``pack_patches`` builds it on the host):

  - ``segment_ids`` (P,) int32: one id per (item, temporal patch) frame, 1, 2, ...; 0 = padding.
    Attention is restricted to a frame (transformers' ``cu_seqlens``).
  - ``rows``, ``cols`` (P,) int32: the patch's row/column in its item's patch grid (2-D rotary
    and position-table interpolation).
  - ``heights``, ``widths`` (P,) int32: its item's grid height/width in patches (interpolation).

  Everything grid-dependent (interpolation taps and weights, rotary angles, attention masks) is
  computed in-jit from these per-patch values, so one compile serves every mix of image sizes
  that fits a bucket. An optional leading batch dimension (B, P, ...) is supported too.
* The ``depth`` blocks are ``nn.scan``-ned in segments that end at each deepstack tap
  (``blocks_{first}_{end}``, leading logical axis ``layers``), so only the tapped hidden states
  are kept, not every layer's.
* Output ``VisionOutput(merged (P/4, out_hidden), deepstack tuple of (P/4, out_hidden) in layer
  order, merged_mask (P/4,))``; valid merged tokens come first, in exactly transformers' order;
  padded rows are zero.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from omnijax.models.config import ImplConfig, VisionEncoderConfig
from omnijax.models.decoder import _POLICIES as REMAT_POLICIES
from omnijax.models.layers import Dense, LayerNorm, constrain, dtype_of, logical_param, lookup
from omnijax.processing.vision import MIN_BUCKET

LAYER_NORM_EPS = 1e-6  # hard-coded in transformers' vision blocks and mergers
DEFAULT_ROPE_THETA = 10_000.0  # transformers' default rope_parameters for the vision config
DEFAULT_HIDDEN_ACT = "gelu_pytorch_tanh"
DEFAULT_QUERY_BLOCK = 1024

_ACTS = {
  "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
  "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
  "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


class VisionOutput(NamedTuple):
  merged: jax.Array  # (..., P / merge^2, out_hidden_size)
  deepstack: tuple[jax.Array, ...]  # one (..., P / merge^2, out_hidden_size) per tapped layer
  merged_mask: jax.Array  # (..., P / merge^2) bool: True for real (non-padding) merged tokens


def layer_segments(cfg: VisionEncoderConfig) -> list[tuple[int, int]]:
  """(first layer, count) of each scanned block run; every deepstack tap ends a run."""
  taps = sorted(set(cfg.deepstack_visual_indexes))
  if len(taps) != len(cfg.deepstack_visual_indexes):
    raise ValueError(f"deepstack_visual_indexes {cfg.deepstack_visual_indexes} has duplicates.")
  if taps and not 0 <= taps[0] <= taps[-1] < cfg.depth:
    raise ValueError(
      f"deepstack_visual_indexes {cfg.deepstack_visual_indexes} must lie in [0, depth={cfg.depth})."
    )
  bounds = [t + 1 for t in taps]
  if not bounds or bounds[-1] != cfg.depth:
    bounds.append(cfg.depth)
  segments, start = [], 0
  for end in bounds:
    segments.append((start, end - start))
    start = end
  return segments


def segment_name(first: int, count: int) -> str:
  return f"blocks_{first}_{first + count}"


# ----------------------------------------------------------------------------------------------
# In-jit pieces
# ----------------------------------------------------------------------------------------------


def rope_inv_freq(head_dim: int, theta: float) -> np.ndarray:
  """(head_dim // 4,) float32: transformers' axial inverse frequencies (same for rows and cols)."""
  spatial = head_dim // 2
  return (
    1.0 / (np.float32(theta) ** (np.arange(0, spatial, 2, dtype=np.float32) / np.float32(spatial)))
  ).astype(np.float32)


def rope_cos_sin(rows, cols, head_dim: int, theta: float):
  """(..., head_dim) float32 cos/sin; angle layout [rows, cols, rows, cols] (head_dim/4 each)."""
  inv = jnp.asarray(rope_inv_freq(head_dim, theta))
  fr = rows.astype(jnp.float32)[..., None] * inv
  fc = cols.astype(jnp.float32)[..., None] * inv
  ang = jnp.concatenate([fr, fc, fr, fc], axis=-1)
  return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x, cos, sin):
  """x (..., H, D) rotated in float32 (rotate-half), cast back; cos/sin (..., D)."""
  x32 = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rot = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
  return (x32 * cos[..., None, :] + rot * sin[..., None, :]).astype(x.dtype)


def interpolation_taps(rows, cols, heights, widths, side: int):
  """Bilinear (align_corners=True) taps into the side x side table: indices, weights (..., 4).

  Per axis: src = index * (side - 1) / max(size - 1, 1); taps floor and floor + 1 clamped to
  the table, weights the linear hat. Taps ordered (r0c0, r0c1, r1c0, r1c1).
  """

  def axis(index, size):
    src = index.astype(jnp.float32) * (side - 1) / jnp.maximum(size - 1, 1).astype(jnp.float32)
    floor = jnp.floor(src)
    offsets = jnp.arange(2, dtype=jnp.float32)
    taps = jnp.clip(
      floor.astype(jnp.int32)[..., None] + jnp.arange(2, dtype=jnp.int32), 0, side - 1
    )
    weights = jnp.maximum(1.0 - jnp.abs(src[..., None] - floor[..., None] - offsets), 0.0)
    return taps, weights

  rt, rw = axis(rows, heights)
  ct, cw = axis(cols, widths)
  idx = (rt[..., :, None] * side + ct[..., None, :]).reshape(*rows.shape, 4)
  wts = (rw[..., :, None] * cw[..., None, :]).reshape(*rows.shape, 4)
  return idx, wts


def frame_attention(q, k, v, segment_ids, query_block: int = DEFAULT_QUERY_BLOCK):
  """Bidirectional attention within a frame. q/k/v (B, P, H, D), segment_ids (B, P) -> (B,P,H,D).

  Queries are processed in blocks of at most `query_block` rows (a rematerialised lax.map), so
  score memory is H x block x P rather than H x P x P, also in the backward pass. Padding
  (segment 0) attends only to padding, so no row is empty and nothing is NaN.
  """
  b, p, h, d = q.shape
  scale = d**-0.5

  def block(args):
    qb, sb = args  # (B, c, H, D), (B, c)
    logits = jnp.einsum("bqhd,bkhd->bhqk", qb, k, preferred_element_type=jnp.float32) * scale
    mask = sb[:, :, None] == segment_ids[:, None, :]
    logits = jnp.where(mask[:, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)

  chunk = p if p <= query_block else math.gcd(p, query_block)
  if chunk == p:
    return block((q, segment_ids))
  nb = p // chunk
  qs = q.reshape(b, nb, chunk, h, d).swapaxes(0, 1)
  ss = segment_ids.reshape(b, nb, chunk).swapaxes(0, 1)
  out = jax.lax.map(jax.checkpoint(block, prevent_cse=False), (qs, ss))
  return out.swapaxes(0, 1).reshape(b, p, h, d)


# ----------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------


class VisionBlock(nn.Module):
  """Pre-LN block: h + proj(attn(norm1 h)); h + fc2(act(fc1(norm2 h))). Returns (h, None)."""

  cfg: VisionEncoderConfig
  impl: ImplConfig
  query_block: int = DEFAULT_QUERY_BLOCK

  @nn.compact
  def __call__(self, h, cos, sin, segment_ids):
    cfg = self.cfg
    dt, pdt = dtype_of(self.impl.dtype), dtype_of(self.impl.param_dtype)
    d, nh = cfg.hidden_size, cfg.num_heads
    hd = d // nh
    act = _ACTS[getattr(cfg, "hidden_act", DEFAULT_HIDDEN_ACT)]

    x = LayerNorm(LAYER_NORM_EPS, pdt, name="norm1")(h)
    qkv = Dense((d,), (3, nh, hd), ("embed", None, "heads", "kv"), dt, pdt, name="attn_qkv")(x)
    q = checkpoint_name(qkv[..., 0, :, :], "query_proj")
    k = checkpoint_name(qkv[..., 1, :, :], "key_proj")
    v = checkpoint_name(qkv[..., 2, :, :], "value_proj")
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    q = constrain(q, ("batch", "seq", "act_heads", "act_kv"))
    k = constrain(k, ("batch", "seq", "act_heads", "act_kv"))
    v = constrain(v, ("batch", "seq", "act_heads", "act_kv"))
    o = frame_attention(q, k, v, segment_ids, self.query_block)
    o = constrain(o, ("batch", "seq", "act_heads", "act_kv"))
    h = h + Dense((nh, hd), (d,), ("heads", "kv", "embed"), dt, pdt, name="attn_proj")(o)
    h = constrain(h, ("batch", "seq", "act_embed"))

    x = LayerNorm(LAYER_NORM_EPS, pdt, name="norm2")(h)
    y = act(
      Dense((d,), (cfg.intermediate_size,), ("embed", "mlp"), dt, pdt, name="mlp_linear_fc1")(x)
    )
    y = constrain(y, ("batch", "seq", "act_mlp"))
    h = h + Dense((cfg.intermediate_size,), (d,), ("mlp", "embed"), dt, pdt, name="mlp_linear_fc2")(
      y
    )
    return constrain(h, ("batch", "seq", "act_embed")), None


class PatchMerger(nn.Module):
  """LayerNorm, group each 2x2 window (4 consecutive patches) into one 4*hidden vector, then
  Linear(4D, 4D) -> exact GELU -> Linear(4D, out). `postshuffle` (deepstack mergers) applies the
  LayerNorm over the grouped 4*hidden vector instead of per patch."""

  cfg: VisionEncoderConfig
  impl: ImplConfig
  postshuffle: bool

  @nn.compact
  def __call__(self, h):
    cfg = self.cfg
    dt, pdt = dtype_of(self.impl.dtype), dtype_of(self.impl.param_dtype)
    unit = cfg.spatial_merge_size**2
    d4 = cfg.hidden_size * unit
    group = lambda x: x.reshape(*x.shape[:-2], x.shape[-2] // unit, d4)
    if self.postshuffle:
      x = LayerNorm(LAYER_NORM_EPS, pdt, name="ln_q")(group(h))
    else:
      x = group(LayerNorm(LAYER_NORM_EPS, pdt, name="ln_q")(h))
    x = Dense((d4,), (d4,), ("embed", "mlp"), dt, pdt, name="mlp_0")(x)
    x = constrain(jax.nn.gelu(x, approximate=False), ("batch", "seq", "act_mlp"))
    x = Dense((d4,), (cfg.out_hidden_size,), ("mlp", "embed"), dt, pdt, name="mlp_2")(x)
    return constrain(x, ("batch", "seq", "act_embed"))


class VisionEncoder(nn.Module):
  """Packed patches -> VisionOutput(merged, deepstack, merged_mask). See the module docstring.

  Call with the arrays of `pack_patches` (unbatched (P, ...) or batched (B, P, ...)):
  `VisionEncoder(cfg, impl).apply(variables, **packed)`.
  """

  cfg: VisionEncoderConfig
  impl: ImplConfig = ImplConfig()
  query_block: int = DEFAULT_QUERY_BLOCK
  rope_theta: float = DEFAULT_ROPE_THETA

  @nn.compact
  def __call__(self, patches, segment_ids, rows, cols, heights, widths) -> VisionOutput:
    if patches.ndim == 2:
      out = self._encode(
        patches[None], segment_ids[None], rows[None], cols[None], heights[None], widths[None]
      )
      return jax.tree.map(lambda x: x[0], out)
    return self._encode(patches, segment_ids, rows, cols, heights, widths)

  def _encode(self, patches, segment_ids, rows, cols, heights, widths) -> VisionOutput:
    cfg, impl = self.cfg, self.impl
    dt, pdt = dtype_of(impl.dtype), dtype_of(impl.param_dtype)
    d = cfg.hidden_size
    unit = cfg.spatial_merge_size**2
    p = patches.shape[1]
    if p % unit:
      raise ValueError(
        f"the packed buffer has {p} patches, not a multiple of the {unit}-patch "
        "merge window; use bucket_patches() sizes."
      )
    side = math.isqrt(cfg.num_position_embeddings)
    in_dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size**2
    if patches.shape[-1] != in_dim:
      raise ValueError(
        f"patches have {patches.shape[-1]} features; in_channels x temporal_patch "
        f"x patch^2 = {in_dim}."
      )

    # Everything per patch is laid out like the patches (rows over batch, patches over seq).
    patches = constrain(patches, ("batch", "seq", None))
    segment_ids, rows, cols, heights, widths = (
      constrain(x, ("batch", "seq")) for x in (segment_ids, rows, cols, heights, widths)
    )
    # Patch embedding (the stride = kernel Conv3d as a Linear over (C, T, p, p)-flattened patches).
    h = Dense((in_dim,), (d,), (None, "embed"), dt, pdt, name="patch_embed")(patches)
    table = logical_param(self, "pos_embed", (cfg.num_position_embeddings, d), (None, "embed"), pdt)
    idx, wts = interpolation_taps(rows, cols, heights, widths, side)
    pos = jnp.sum(lookup(table, idx, dt) * wts[..., None].astype(dt), axis=-2)
    h = constrain(h + pos, ("batch", "seq", "act_embed"))
    cos, sin = rope_cos_sin(rows, cols, d // cfg.num_heads, self.rope_theta)

    block = VisionBlock
    if impl.remat_policy != "none":
      block = nn.remat(block, policy=REMAT_POLICIES[impl.remat_policy], prevent_cse=False)
    taps = {}
    for first, count in layer_segments(cfg):
      stack = nn.scan(
        block,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast,) * 3,
        length=count,
        metadata_params={nn.PARTITION_NAME: "layers"},
      )
      h, _ = stack(cfg, impl, self.query_block, name=segment_name(first, count))(
        h, cos, sin, segment_ids
      )
      taps[first + count - 1] = h

    mask = segment_ids[..., ::unit] != 0
    zero_pad = lambda x: jnp.where(mask[..., None], x, jnp.zeros((), x.dtype))
    merged = zero_pad(PatchMerger(cfg, impl, postshuffle=False, name="merger")(h))
    deepstack = tuple(
      zero_pad(
        PatchMerger(
          cfg,
          impl,
          postshuffle=True,
          name=f"merger_list_{cfg.deepstack_visual_indexes.index(layer)}",
        )(taps[layer])
      )
      for layer in sorted(cfg.deepstack_visual_indexes)
    )
    return VisionOutput(merged, deepstack, mask)


def init_params(
  cfg: VisionEncoderConfig, impl: ImplConfig = ImplConfig(), rng=None, num_patches: int = MIN_BUCKET
):
  """Boxed (logically partitioned) params of a VisionEncoder, from a dummy packed buffer."""
  rng = jax.random.key(0) if rng is None else rng
  dummy = dummy_inputs(cfg, num_patches)
  return VisionEncoder(cfg, impl).init(rng, **dummy)["params"]


def dummy_inputs(cfg: VisionEncoderConfig, num_patches: int = MIN_BUCKET) -> dict:
  in_dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size**2
  ints = jnp.zeros((num_patches,), jnp.int32)
  return dict(
    patches=jnp.zeros((num_patches, in_dim), jnp.float32),
    segment_ids=ints,
    rows=ints,
    cols=ints,
    heights=ints + 1,
    widths=ints + 1,
  )
