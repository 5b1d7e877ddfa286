"""Grouped-query self-attention with per-head q/k RMSNorm and TM-RoPE (the Thinker/Talker layer;
Code2Wav's pre-transformer drops the q/k norm and attends within a causal sliding window).

Attention is causal within a document: with packed rows, a token attends only to earlier
tokens of the same segment (segment id 0 is padding).

With the sequence split over context-parallel shards, the decoder may hold each row's tokens in
zigzag order (``zigzag_order``): every shard then has as many early queries, which see few keys,
as late ones, which see many, so causal attention costs the shards alike. The attention paths
take that order (``zigzag``) and restore the keys' natural order themselves.

Decoding passes a KV cache: one layer's preallocated keys and values (B, C, KH, D); the new
tokens' keys and values are written at the cache index and the queries attend over the whole
cache under ``cache_mask``.
"""

from __future__ import annotations


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from omnijax.models import matmul, tm_rope
from omnijax.models.config import ImplConfig, TextConfig
from omnijax.models.layers import (
  RMSNorm,
  constrain,
  dtype_of,
  logical_param,
  mesh_axes,
  mesh_shards,
)


def _causal(query_pos, key_pos, window: int = 0):
  """key <= query, and with a sliding `window` > 0 also key > query - window."""
  ok = key_pos[None, :] <= query_pos[:, None]
  if window:
    ok &= key_pos[None, :] > query_pos[:, None] - window
  return ok


def zigzag_order(s: int, shards: int) -> np.ndarray:
  """The natural position of each slot of a length-`s` sequence laid out for `shards` context
  shards: cut into 2 x shards chunks, shard i holds chunk i then chunk 2 x shards - 1 - i."""
  chunk = s // (2 * shards)
  ids = np.arange(2 * shards).reshape(2, shards)
  chunks = np.stack([ids[0], ids[1, ::-1]], axis=1).reshape(-1)
  return (chunks[:, None] * chunk + np.arange(chunk)).reshape(-1)


def zigzag(x: jax.Array, shards: int, axis: int) -> jax.Array:
  """x with its sequence `axis` put in `zigzag_order`."""
  x = jnp.moveaxis(x, axis, 0)
  halves = x.reshape(2, shards, -1, *x.shape[1:])
  out = jnp.stack([halves[0], halves[1, ::-1]], axis=1).reshape(x.shape)
  return jnp.moveaxis(out, 0, axis)


def unzigzag(x: jax.Array, shards: int, axis: int) -> jax.Array:
  """The inverse of `zigzag`: the sequence `axis` back in natural order."""
  x = jnp.moveaxis(x, axis, 0)
  pairs = x.reshape(shards, 2, -1, *x.shape[1:])
  out = jnp.concatenate([pairs[:, 0], pairs[::-1, 1]]).reshape(x.shape)
  return jnp.moveaxis(out, 0, axis)


def cache_mask(
  segment_ids: jax.Array, cache_segment_ids: jax.Array, index: jax.Array, window: int = 0
) -> jax.Array:
  """(B, S, C) bool: S queries at cache slots index, index+1, ... over C slots (cache_segment_ids,
  0 where unwritten or padding): key slot <= query slot (within `window` if > 0), same segment,
  query not padding."""
  s, c = segment_ids.shape[1], cache_segment_ids.shape[1]
  causal = _causal(index + jnp.arange(s), jnp.arange(c), window)
  same = segment_ids[:, :, None] == cache_segment_ids[:, None, :]
  return causal[None] & same & (segment_ids != 0)[:, :, None]


def _attend(q, k, v, mask, scale):
  """q (B,Q,H,D), k/v (B,K,KH,D), mask (B,Q,K) -> (B,Q,H,D); GQA without repeating k/v.

  Scores are laid out (B, KH, Q, G, K): the G query heads of a KV head are adjacent rows of
  one matmul per (B, KH), so no product needs the score matrix transposed. The value product's
  output stays in that layout behind an optimization barrier: without it XLA:CPU computes the
  product transposed, which copies the probabilities into key-major order (the small preset's
  CPU train step: 10.45 -> 9.99 s).

  The softmax is normalised after the value product, on (Q, D) rather than (Q, K): one pass
  less over the score matrix (the small preset's CPU train step: 3% faster). The row max is a
  constant shift, so its gradient is not taken.

  A head axis of size 1 (multi-head: G = 1; multi-query: KH = 1) is left out of the products:
  XLA:CPU writes scores through one with a copy of the score matrix."""
  b, sq, h, d = q.shape
  sizes = dict(b=b, q=sq, s=k.shape[1], k=k.shape[2], g=h // k.shape[2], d=d)

  def axes(spec):
    return "".join(a for a in spec if a not in "kg" or sizes[a] > 1)

  def shaped(x, spec):
    return x.reshape([sizes[a] for a in axes(spec)])

  q, k, v = shaped(q, "bqkgd"), shaped(k, "bskd"), shaped(v, "bskd")
  qs, ks, ss, os_ = axes("bqkgd"), axes("bskd"), axes("bkqgs"), axes("bkqgd")
  logits = jnp.einsum(f"{qs},{ks}->{ss}", q, k, preferred_element_type=jnp.float32) * scale
  mask = mask.reshape([sizes[a] if a in "bqs" else 1 for a in ss])
  logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  p = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
  out = jnp.einsum(f"{ss},{ks}->{os_}", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  out = jax.lax.optimization_barrier(out / jnp.sum(p, axis=-1, keepdims=True))
  if sizes["k"] > 1:
    out = jnp.moveaxis(out, 1, 2)
  return out.astype(v.dtype).reshape(b, sq, h, d)


def dot_product_attention(
  q, k, v, segment_ids, query_blocks: int = 1, window: int = 0, zigzag: int = 1
):
  """q (B,S,H,D), k/v (B,S,K,D) with H a multiple of K -> (B,S,H,D); causal, and with a
  sliding `window` > 0 each query sees only its last `window` keys; `zigzag` > 1: the tokens are
  in `zigzag_order` for that many shards.

  With `query_blocks` > 1 queries are processed in that many blocks, each attending
  only to the keys from its earliest query's window start to its latest query: most of
  the masked score matrix is never computed and each block's scores stay cache-sized (2x faster
  on CPU).
  """
  scale = q.shape[-1] ** -0.5
  s = q.shape[1]
  order, key_segments = np.arange(s), segment_ids
  if zigzag > 1:
    order = zigzag_order(s, zigzag)
    k, v, key_segments = (unzigzag(x, zigzag, 1) for x in (k, v, segment_ids))
  chunk = -(-s // max(query_blocks, 1))
  pos = jnp.arange(s)
  outs = []
  for start in range(0, s, chunk):
    end = min(start + chunk, s)
    query_pos = order[start:end]
    first = max(0, int(query_pos.min()) - window + 1) if window else 0
    last = int(query_pos.max()) + 1
    qs = segment_ids[:, start:end, None]
    mask = (
      _causal(jnp.asarray(query_pos), pos[first:last], window)[None]
      & (qs == key_segments[:, None, first:last])
      & (qs != 0)
    )
    outs.append(_attend(q[:, start:end], k[:, first:last], v[:, first:last], mask, scale))
  return jnp.concatenate(outs, axis=1)


def cudnn_attention(q, k, v, segment_ids, window: int = 0, implementation: str = "cudnn"):
  """`dot_product_attention` as `jax.nn.dot_product_attention`: cuDNN's fused flash attention
  on NVIDIA GPUs (half precision), causal within `window`, packed documents through a
  same-segment mask; `implementation="xla"` runs the same call anywhere (tests)."""
  same = segment_ids[:, :, None] == segment_ids[:, None, :]
  return jax.nn.dot_product_attention(
    q,
    k,
    v,
    mask=(same & (segment_ids != 0)[:, :, None])[:, None],
    is_causal=True,
    local_window_size=(window - 1, 0) if window else None,
    implementation=implementation,
  )


SPLASH_BLOCK = 512  # splash attention's query / key tile (rows), at most the sequence
SPLASH_MIN_BLOCK = 128  # the kernel's tiles are whole vector-lane multiples


def splash_mask(s: int, heads: int, window: int = 0, zigzag: int = 1):
  """Splash attention's mask: causal (within `window` if > 0) over queries in `zigzag_order`
  for `zigzag` shards and keys in natural order."""
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # pylint: disable=C0415
    splash_attention_mask as masks,
  )

  one = masks.CausalMask((s, s)) if not window else masks.LocalMask((s, s), (window - 1, 0), 0)
  if zigzag > 1:  # the kernel computes the mask from each query's natural position
    one.q_sequence = zigzag_order(s, zigzag).astype(np.int32)
  return masks.MultiHeadMask([one] * heads)


def splash_attention(
  q, k, v, segment_ids, window: int = 0, interpret: bool = False, zigzag: int = 1
):
  """`dot_product_attention` as the Pallas TPU flash kernel (splash attention): the masked
  score matrix is never materialised. Inside a mesh it runs per shard (`shard_map` over the
  batch, sequence and head axes of the logical rules); with the sequence sharded (context
  parallelism) each shard's queries attend to the whole row's keys and values, gathered, and
  the kernel's block mask is split over the shards like the queries. `interpret` runs the
  kernel on any backend (tests). Padding queries (segment 0) attend to padding keys: their
  rows are never used."""
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # pylint: disable=C0415
    splash_attention_kernel as splash,
  )

  b, s, h, d = q.shape
  mesh = jax.sharding.get_abstract_mesh()
  seq_axes = () if mesh.empty else mesh_axes("seq")
  shards = mesh_shards("seq")
  block = min(SPLASH_BLOCK, s // shards)
  if s % (block * shards):
    raise ValueError(
      f"splash attention needs the sequence ({s}) to be a multiple of {block} x the "
      f"{shards} sequence shards."
    )
  kernel = splash.make_splash_mha(
    splash_mask(s, h, window, zigzag),
    head_shards=1,
    q_seq_shards=shards,
    block_sizes=splash.BlockSizes(
      **{
        name: block
        for name in (
          "block_q",
          "block_kv",
          "block_kv_compute",
          "block_q_dkv",
          "block_kv_dkv",
          "block_kv_dkv_compute",
          "block_q_dq",
          "block_kv_dq",
        )
      }
    ),
    interpret=interpret,
  )

  def local(kernel, q, k, v, q_segments, kv_segments):
    if zigzag > 1:  # whole rows of keys: back in natural order
      k, v, kv_segments = (unzigzag(x, zigzag, 1) for x in (k, v, kv_segments))
    heads_first = lambda x: jnp.swapaxes(x, 1, 2)
    out = jax.vmap(lambda q, k, v, qs, ks: kernel(q, k, v, splash.SegmentIds(qs, ks)))(
      heads_first(q * d**-0.5), heads_first(k), heads_first(v), q_segments, kv_segments
    )
    return heads_first(out)

  if mesh.empty:
    return local(kernel, q, k, v, segment_ids, segment_ids)
  q_spec = nn.logical_to_mesh_axes(("batch", "seq", "act_heads", None))
  kv_spec = nn.logical_to_mesh_axes(("batch", None, "act_kv_heads", None))
  kernel_spec = kernel.manual_sharding_spec(
    jax.sharding.NamedSharding(mesh, P(None, seq_axes or None))
  )
  return jax.shard_map(
    local,
    in_specs=(kernel_spec, q_spec, kv_spec, kv_spec, P(*q_spec[:2]), P(*kv_spec[:2])),
    out_specs=q_spec,
    check_vma=False,
  )(kernel, q, k, v, segment_ids, segment_ids)


class Attention(nn.Module):
  cfg: TextConfig
  impl: ImplConfig
  zigzag: int = 1  # > 1: the tokens are in `zigzag_order` for that many sequence shards

  @nn.compact
  def __call__(self, x, cos, sin, segment_ids, kv=None, kv_mask=None):
    """Returns (out, kv): kv, if given, is this layer's cache {"k", "v"} (B, C, KH, D) and
    kv_mask (cache index, cache_mask (B, S, C)); the updated cache is returned (else None)."""
    cfg, dtype, pdt = self.cfg, dtype_of(self.impl.dtype), dtype_of(self.impl.param_dtype)
    d, h, kh, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    wq = logical_param(self, "q_proj", (d, h, hd), ("embed", "heads", "kv"), pdt).astype(dtype)
    wk = logical_param(self, "k_proj", (d, kh, hd), ("embed", "kv_heads", "kv"), pdt).astype(dtype)
    wv = logical_param(self, "v_proj", (d, kh, hd), ("embed", "kv_heads", "kv"), pdt).astype(dtype)
    wo = logical_param(self, "o_proj", (h, hd, d), ("heads", "kv", "embed"), pdt).astype(dtype)

    # One product for q, k and v: each KV head's g query heads, key and value side by side
    # (the heads stay split over the same mesh axis). Its backward pass is one product for x's
    # gradient and one for the weights' instead of three each (the small preset's CPU train
    # step: 2% faster).
    g = h // kh
    mkl = matmul.use_mkl(self.impl)
    w = jnp.concatenate([wq.reshape(d, kh, g * hd), wk, wv], axis=2)
    q, k, v = jnp.split(matmul.contract(x, w, mkl=mkl), [g * hd, (g + 1) * hd], axis=3)
    q = checkpoint_name(q.reshape(*x.shape[:2], h, hd), "query_proj")
    k = checkpoint_name(k, "key_proj")
    v = checkpoint_name(v, "value_proj")
    if cfg.qk_norm:
      q = RMSNorm(cfg.rms_norm_eps, pdt, name="q_norm")(q)
      k = RMSNorm(cfg.rms_norm_eps, pdt, name="k_norm")(k)
    q = tm_rope.apply(q, cos, sin)
    k = tm_rope.apply(k, cos, sin)
    q = constrain(q, ("batch", "seq", "act_heads", "act_kv"))
    k = constrain(k, ("batch", "seq", "act_kv_heads", "act_kv"))
    v = constrain(v, ("batch", "seq", "act_kv_heads", "act_kv"))
    attention = self.impl.resolved(jax.default_backend()).attention
    if kv is None and attention == "splash" and q.shape[1] % SPLASH_MIN_BLOCK:
      attention = "xla"  # rows shorter than a tile (the MTP's 16 codes per frame)
    if self.zigzag > 1 and (kv is not None or attention == "cudnn"):
      raise ValueError(
        f"attention={attention!r} and KV-cache decoding take tokens in natural order only, "
        "not zigzag order (see Decoder._zigzag_shards)."
      )
    if kv is None and attention == "splash":
      out = splash_attention(q, k, v, segment_ids, cfg.sliding_window, zigzag=self.zigzag)
    elif kv is None and attention == "cudnn":
      out = cudnn_attention(q, k, v, segment_ids, cfg.sliding_window)
    elif kv is None:
      out = dot_product_attention(
        q,
        k,
        v,
        segment_ids,
        self.impl.attention_query_blocks,
        cfg.sliding_window,
        self.zigzag,
      )
    else:
      index, mask = kv_mask
      kv = {
        name: jax.lax.dynamic_update_slice(kv[name], new.astype(kv[name].dtype), (0, index, 0, 0))
        for name, new in (("k", k), ("v", v))
      }
      out = _attend(q, kv["k"], kv["v"], mask, hd**-0.5)
    out = constrain(out, ("batch", "seq", "act_heads", "act_kv"))
    return matmul.contract(out, wo, mkl=mkl, n_in=2), kv
