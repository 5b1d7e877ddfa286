"""The AuT audio encoder (transformers ``Qwen3OmniMoeAudioEncoder``) on static, bucketed shapes.

Input: a batch of right-padded log-mel features ``(N, num_mel_bins, T)`` and per-audio frame
counts ``lengths (N,)``; T is a bucket (a multiple of the 2 * n_window = 100-frame chunk, see
``bucket_frames``), so a stream of varied lengths compiles once per bucket.

The math follows the reference exactly:

- each audio is cut into chunks of 100 frames (the last one shorter, zero-padded);
- per chunk: three Conv2d 3x3 / stride 2 / pad 1 + GELU over (mel, time), then a bias-free
  linear of the (channel-major) channels x freq features to d_model: 100 frames -> 13 tokens;
- sinusoidal positions restarting at 0 in every chunk;
- pre-LN bidirectional transformer layers (attention with biases) restricted to windows of
  ``13 * window`` tokens (``window`` chunks, i.e. ``window`` seconds; the reference uses
  ``n_window_infer // 100``) counted from the audio's first token (``get_audio_cu_seqlens``);
- ``ln_post`` -> proj1 -> GELU -> proj2.

The tokens of audio i are rows ``[0, feat_extract_output_lengths(lengths[i]))`` of its output
row, in the reference's order (all chunks but the last are full, so valid tokens are a prefix).
Padded frames and padded tokens never influence valid ones: frames past ``lengths`` are
zeroed, padded tokens are masked out as attention keys and their outputs are zeroed.

Reference quirk (``chunk_padding="batch"``, the default): transformers pads every chunk of a call
to the longest chunk of that call, i.e. to ``min(100, max(lengths))`` frames, and the conv stack
then sees conv zero-padding right after that length. When every audio of the call is shorter than
100 frames the last token of the longest one therefore differs slightly from what it would be in
a call that also holds a >= 100-frame audio. "batch" reproduces this (by zeroing the conv
activations past that length; the max is over the whole batch); ``chunk_padding="full"`` always
pads to 100 frames, which makes every audio independent of the others in its batch.
"""

from __future__ import annotations


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from omnijax.models.config import AudioEncoderConfig, ImplConfig
from omnijax.models.decoder import _POLICIES
from omnijax.models.layers import LayerNorm, constrain, constrain_flat, dtype_of, logical_param
from omnijax.processing.audio import (
  _conv_len,
  chunk_frames,
  feat_extract_output_lengths,
  tokens_per_chunk,
)

LN_EPS = 1e-5  # torch.nn.LayerNorm default, used by every reference LayerNorm
MAX_WINDOW_CHUNKS = 8  # the seed's dynamic windows: 1 s .. 8 s


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
  """(length, channels) float32 [sin | cos] table, computed in float32 as the reference does."""
  if channels % 2:
    raise ValueError(f"sinusoidal positions need an even d_model, got {channels}.")
  inc = np.float32(np.log(max_timescale) / (channels // 2 - 1))
  inv = np.exp(-inc * np.arange(channels // 2, dtype=np.float32))
  t = np.arange(length, dtype=np.float32)[:, None] * inv[None, :]
  return np.concatenate([np.sin(t), np.cos(t)], axis=1).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Layers.


class Linear(nn.Module):
  """y = x . kernel + bias, contracting the last `n_in` dims of x; kernel (*in, *features)."""

  features: tuple[int, ...]
  kernel_axes: tuple[str | None, ...]
  bias_axes: tuple[str | None, ...] | None  # None: no bias
  n_in: int = 1
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    shape = tuple(x.shape[-self.n_in :]) + tuple(self.features)
    kernel = logical_param(self, "kernel", shape, self.kernel_axes, self.param_dtype)
    y = jnp.tensordot(x, kernel.astype(self.dtype), axes=self.n_in)
    if self.bias_axes is not None:
      bias = logical_param(
        self, "bias", self.features, self.bias_axes, self.param_dtype, nn.initializers.zeros
      )
      y = y + bias.astype(self.dtype)
    return y


class Conv(nn.Module):
  """Conv2d 3x3, stride 2, padding 1 on NHWC = (chunks, freq, time, channels); kernel HWIO."""

  features: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = logical_param(
      self, "kernel", (3, 3, x.shape[-1], self.features), (None, None, None, None), self.param_dtype
    )
    bias = logical_param(
      self, "bias", (self.features,), (None,), self.param_dtype, nn.initializers.zeros
    )
    y = jax.lax.conv_general_dilated(
      x,
      kernel.astype(self.dtype),
      window_strides=(2, 2),
      padding=((1, 1), (1, 1)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    return y + bias.astype(self.dtype)


def _attend(q, k, v, mask, scale):
  """q (..., Q, H, D), k/v (..., K, H, D), mask (..., Q, K) -> (..., Q, H, D); f32 softmax."""
  logits = jnp.einsum("...qhd,...khd->...hqk", q, k, preferred_element_type=jnp.float32) * scale
  logits = jnp.where(mask[..., None, :, :], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("...hqk,...khd->...qhd", probs, v)


def _blocks_with_neighbours(x, block: int):
  """(N, nb * block, ...) -> (N, nb, 3 * block, ...): blocks b-1, b, b+1 (zero-padded)."""
  n, s = x.shape[:2]
  nb = s // block
  xb = x.reshape((n, nb, block) + x.shape[2:])
  xp = jnp.pad(xb, [(0, 0), (1, 1)] + [(0, 0)] * (xb.ndim - 2))
  return jnp.concatenate([xp[:, :nb], xp[:, 1 : nb + 1], xp[:, 2 : nb + 2]], axis=2)


class AudioAttention(nn.Module):
  """Bidirectional multi-head attention with biases, masked to windows (see window_mask)."""

  cfg: AudioEncoderConfig
  impl: ImplConfig
  block: int  # 0: full (S x S) scores; else local scores in blocks of `block` query tokens

  @nn.compact
  def __call__(self, x, mask):
    cfg, dtype, pdt = self.cfg, dtype_of(self.impl.dtype), dtype_of(self.impl.param_dtype)
    d, h = cfg.d_model, cfg.encoder_attention_heads
    hd = d // h

    def proj(name):
      return Linear((h, hd), ("embed", "heads", "kv"), ("heads", "kv"), 1, dtype, pdt, name=name)(x)

    q = checkpoint_name(proj("q_proj"), "query_proj")
    k = checkpoint_name(proj("k_proj"), "key_proj")
    v = checkpoint_name(proj("v_proj"), "value_proj")
    q = constrain(q, ("batch", "seq", "act_heads", "act_kv"))
    k = constrain(k, ("batch", "seq", "act_heads", "act_kv"))
    v = constrain(v, ("batch", "seq", "act_heads", "act_kv"))
    scale = hd**-0.5
    if self.block:
      n, s = q.shape[:2]
      nb = s // self.block
      out = _attend(
        q.reshape(n, nb, self.block, h, hd),
        _blocks_with_neighbours(k, self.block),
        _blocks_with_neighbours(v, self.block),
        mask,
        scale,
      ).reshape(n, s, h, hd)
    else:
      out = _attend(q, k, v, mask, scale)
    out = constrain(out, ("batch", "seq", "act_heads", "act_kv"))
    return Linear((d,), ("heads", "kv", "embed"), ("norm",), 2, dtype, pdt, name="out_proj")(out)


class AudioEncoderLayer(nn.Module):
  """Pre-LN: h + attn(LN(h)); h + fc2(gelu(fc1(LN(h)))). Scanned: returns (h, None)."""

  cfg: AudioEncoderConfig
  impl: ImplConfig
  block: int

  @nn.compact
  def __call__(self, h, mask):
    cfg, dtype, pdt = self.cfg, dtype_of(self.impl.dtype), dtype_of(self.impl.param_dtype)
    x = LayerNorm(LN_EPS, pdt, "scale", name="self_attn_layer_norm")(h)
    h = h + AudioAttention(cfg, self.impl, self.block, name="self_attn")(x, mask)
    x = LayerNorm(LN_EPS, pdt, "scale", name="final_layer_norm")(h)
    x = Linear((cfg.encoder_ffn_dim,), ("embed", "mlp"), ("mlp",), 1, dtype, pdt, name="fc1")(x)
    x = constrain(jax.nn.gelu(x, approximate=False), ("batch", "seq", "act_mlp"))
    x = Linear((cfg.d_model,), ("mlp", "embed"), ("norm",), 1, dtype, pdt, name="fc2")(x)
    return constrain(h + x, ("batch", "seq", "act_embed")), None


def window_mask(out_lens, seq: int, window, tokens_chunk: int, block: int):
  """Attention mask of windowed attention on static shapes.

  Token p of an audio belongs to window p // (tokens_chunk * window) (windows count from the
  audio's first token; a full chunk is tokens_chunk tokens, so windows are `window` chunks);
  query p may attend key p' iff both are in one window and p' < out_len. `window` may be traced.
  block == 0: (N, seq, seq); else (N, seq // block, block, 3 * block) for the query blocks and
  their neighbour-block keys (_blocks_with_neighbours).
  """
  span = tokens_chunk * window
  pos = jnp.arange(seq, dtype=jnp.int32)
  lens = out_lens.astype(jnp.int32)
  if not block:
    win = pos // span
    return (win[:, None] == win[None, :])[None] & (pos[None, None, :] < lens[:, None, None])
  nb = seq // block
  kpos = _blocks_with_neighbours(jnp.broadcast_to(pos + 1, (1, seq)), block)[0] - 1  # -1: none
  qwin = (pos // span).reshape(nb, block)
  kwin = jnp.where(kpos >= 0, kpos // span, -1)
  same = qwin[:, :, None] == kwin[:, None, :]
  kvalid = (kpos[None] >= 0) & (kpos[None] < lens[:, None, None])
  return same[None] & kvalid[:, :, None, :]


# ---------------------------------------------------------------------------------------------
# The encoder.


class AudioEncoder(nn.Module):
  """AuT: ``apply(params, features, lengths, window=None) -> (embeddings, token_mask)``.

  features: (N, num_mel_bins, T) float, T a multiple of 2 * n_window (a bucket_frames value);
    frames at or past lengths[i] are ignored.
  lengths: (N,) int mel frames per audio (0: an empty row).
  window: attention window in chunks (= seconds), 1 .. max(8, n_window_infer // 100); a Python
    int or a traced int scalar (one value for the whole call); default n_window_infer // 100.
  Returns embeddings (N, T_tok, output_dim) in impl.dtype, T_tok = T / 100 * 13, zero on padded
  rows, and token_mask (N, T_tok) bool: row i's first feat_extract_output_lengths(lengths[i]).

  chunk_padding: "batch" (reference behaviour, see module doc) or "full".
  blocked_attention: None chooses block-local attention (scores of each 13 * max_window query
    block against its three neighbouring key blocks) once T_tok exceeds three blocks, full
    (T_tok x T_tok) masked scores below; True / False force one. Same results either way.
  """

  cfg: AudioEncoderConfig
  impl: ImplConfig = ImplConfig()
  chunk_padding: str = "batch"
  blocked_attention: bool | None = None

  def max_window(self) -> int:
    return max(MAX_WINDOW_CHUNKS, self.cfg.n_window_infer // chunk_frames(self.cfg))

  @nn.compact
  def __call__(self, features, lengths, window=None):
    cfg, impl = self.cfg, self.impl
    dtype, pdt = dtype_of(impl.dtype), dtype_of(impl.param_dtype)
    if self.chunk_padding not in ("batch", "full"):
      raise ValueError(f"chunk_padding must be 'batch' or 'full', got {self.chunk_padding!r}.")
    n, bins, frames = features.shape
    chunk, tpc = chunk_frames(cfg), tokens_per_chunk(cfg)
    if bins != cfg.num_mel_bins or frames % chunk:
      raise ValueError(
        f"features must be (N, {cfg.num_mel_bins}, T) with T a multiple of "
        f"{chunk} (see bucket_frames), got {features.shape}."
      )
    chunks = frames // chunk
    seq = chunks * tpc
    lengths = jnp.asarray(lengths, jnp.int32)
    out_lens = feat_extract_output_lengths(lengths, cfg.n_window)

    # Chunks: (N, M, T) -> (N * C, M, chunk, 1), frames past the audio's length zeroed.
    frame_ok = jnp.arange(frames, dtype=jnp.int32)[None, :] < lengths[:, None]
    x = jnp.where(frame_ok[:, None, :], features, 0).astype(dtype)
    x = x.reshape(n, bins, chunks, chunk).transpose(0, 2, 1, 3).reshape(n * chunks, bins, chunk, 1)
    by_chunk = lambda x: constrain_flat(x, ("batch", "seq"))  # audios x their chunks
    x = by_chunk(x)

    if self.chunk_padding == "batch":  # conv zero-padding right after the longest chunk
      pad_len = jnp.minimum(jnp.max(lengths, initial=0), chunk)
    else:
      pad_len = jnp.int32(chunk)
    for i in range(3):
      x = jax.nn.gelu(
        Conv(cfg.downsample_hidden_size, dtype, pdt, name=f"conv2d{i + 1}")(x), approximate=False
      )
      pad_len = _conv_len(pad_len)
      if i < 2 and self.chunk_padding == "batch":
        x = jnp.where((jnp.arange(x.shape[2]) < pad_len)[None, None, :, None], x, 0)
      x = by_chunk(x)
    # (N*C, F, tpc, ch) -> (N*C, tpc, ch, F): channel-major features, as the reference flattens.
    x = x.transpose(0, 2, 3, 1)
    x = Linear((cfg.d_model,), (None, None, "embed"), None, 2, dtype, pdt, name="conv_out")(x)
    x = x + jnp.asarray(sinusoids(tpc, cfg.d_model), dtype)[None]
    h = constrain(x.reshape(n, seq, cfg.d_model), ("batch", "seq", "act_embed"))

    max_w = self.max_window()
    block = tpc * max_w
    blocked = self.blocked_attention
    if blocked is None:
      blocked = seq > 3 * block
    if blocked:
      padded = -(-seq // block) * block
      h = jnp.pad(h, ((0, 0), (0, padded - seq), (0, 0)))
    else:
      block, padded = 0, seq
    if window is None:
      window = cfg.n_window_infer // chunk
    window = jnp.clip(jnp.asarray(window, jnp.int32), 1, max_w)
    mask = window_mask(out_lens, padded, window, tpc, block)

    layer = AudioEncoderLayer
    if impl.remat_policy != "none":
      layer = nn.remat(layer, policy=_POLICIES[impl.remat_policy], prevent_cse=False)
    stack = nn.scan(
      layer,
      variable_axes={"params": 0},
      split_rngs={"params": True},
      in_axes=(nn.broadcast,),
      length=cfg.encoder_layers,
      metadata_params={nn.PARTITION_NAME: "layers"},
    )
    h, _ = stack(cfg, impl, block, name="layers")(h, mask)
    h = h[:, :seq]

    h = LayerNorm(LN_EPS, pdt, "scale", name="ln_post")(h)
    h = Linear((cfg.d_model,), ("embed", "mlp"), ("mlp",), 1, dtype, pdt, name="proj1")(h)
    h = constrain(jax.nn.gelu(h, approximate=False), ("batch", "seq", "act_mlp"))
    h = Linear((cfg.output_dim,), ("mlp", "embed"), ("norm",), 1, dtype, pdt, name="proj2")(h)
    token_mask = jnp.arange(seq, dtype=jnp.int32)[None, :] < out_lens[:, None]
    h = jnp.where(token_mask[..., None], h, 0)
    return constrain(h, ("batch", "seq", "act_embed")), token_mask


def audio_encoder_init(
  cfg: AudioEncoderConfig, impl: ImplConfig = ImplConfig(), seed: int = 0, **kwargs
):
  """Boxed params of AudioEncoder(cfg, impl, **kwargs) on a one-chunk dummy input."""
  model = AudioEncoder(cfg, impl, **kwargs)
  feats = jnp.zeros((1, cfg.num_mel_bins, chunk_frames(cfg)), jnp.float32)
  return model.init(jax.random.key(seed), feats, jnp.ones((1,), jnp.int32))["params"]
