"""Code2Wav: 16 codec codes per 80 ms frame -> 24 kHz waveform (transformers'
``Qwen3OmniMoeCode2Wav``), and its exact streaming decoder.

    codes (B, Q, T) -> mean over quantizers of code_embedding[code + K q]   (B, T, D)
      -> pre-transformer: dense decoder stack, causal sliding window, layer scale, 1-D RoPE
      -> 2 x (causal transposed conv x2 -> ConvNeXt)                        50 frames/s
      -> causal conv -> 4 SnakeBeta blocks (x8, x5, x4, x3) -> SnakeBeta -> causal conv
      -> clamp to [-1, 1]                                                   (B, 1920 T - 555)

The codec-training form (``latent_dim`` > 0) takes the speech tokenizer's continuous
quantised latent instead of codes: ``latent_proj`` maps it to the hidden width. Because the
tokenizer's latent is a sum of one codebook vector per quantizer, ``fold_latent_proj`` turns
that projection into the released ``code_embedding`` table exactly (the mean of Q rows of
Q * (vector @ W) + b is (sum of vectors) @ W + b), so the trained decoder is a released-
architecture Code2Wav.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from omnijax.models.config import Code2WavConfig, ImplConfig
from omnijax.models.conv import (
  CausalConv1d,
  CausalConvTranspose1d,
  ConvNeXtBlock,
  ResidualUnit,
  SnakeBeta,
)
from omnijax.models.decoder import Decoder, init_cache
from omnijax.models.layers import INIT_STD, Dense, dtype_of, logical_param

DILATIONS = (1, 3, 9)
BUCKET_FRAMES = 12  # `decode` pads T to a multiple of this (fewer compilations)


class Upsample(nn.Module):
  """x`ratio` causal transposed conv (kernel = stride) then a ConvNeXt block."""

  ratio: int
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    x = CausalConvTranspose1d(d, self.ratio, self.ratio, self.param_dtype, name="conv")(x)
    return ConvNeXtBlock(self.param_dtype, name="convnext")(x)


class DecoderBlock(nn.Module):
  """SnakeBeta -> causal transposed conv (kernel 2 r, stride r) -> residual units (1, 3, 9)."""

  features: int
  rate: int
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    pdt = self.param_dtype
    x = SnakeBeta(pdt, name="snake")(x)
    x = CausalConvTranspose1d(self.features, 2 * self.rate, self.rate, pdt, name="upconv")(x)
    for i, d in enumerate(DILATIONS):
      x = ResidualUnit(d, pdt, name=f"res_{i}")(x)
    return x


class Code2Wav(nn.Module):
  cfg: Code2WavConfig
  impl: ImplConfig = ImplConfig()
  latent_dim: int = 0  # > 0: the codec-training form (continuous latent input)

  def setup(self):
    cfg, pdt = self.cfg, dtype_of(self.impl.param_dtype)
    if self.latent_dim:
      self.latent_proj = Dense(
        (self.latent_dim,), (cfg.hidden_size,), (None, "embed"), param_dtype=pdt
      )
    else:
      self.code_embedding = logical_param(
        self,
        "code_embedding",
        (cfg.num_quantizers * cfg.codebook_size, cfg.hidden_size),
        ("vocab", "embed"),
        pdt,
      )
    self.pre_transformer = Decoder(cfg.transformer(), self.impl)
    self.upsample = [Upsample(r, pdt) for r in cfg.upsampling_ratios]
    dim = cfg.decoder_dim
    decoder = [CausalConv1d(dim, 7, param_dtype=pdt)]
    for r in cfg.upsample_rates:
      dim //= 2
      decoder.append(DecoderBlock(dim, r, pdt))
    self.decoder = decoder + [
      SnakeBeta(pdt),
      CausalConv1d(1, 7, param_dtype=pdt, init_std=INIT_STD),
    ]

  def __call__(self, codes: jax.Array) -> jax.Array:
    """codes (B, Q, T) int -> waveform (B, num_samples(T)) float32 in [-1, 1]."""
    return self.synthesize(self.transform(self.embed(codes)))

  def embed(self, codes: jax.Array) -> jax.Array:
    cfg = self.cfg
    offsets = jnp.arange(cfg.num_quantizers, dtype=codes.dtype)[:, None] * cfg.codebook_size
    rows = jnp.take(self.code_embedding, codes + offsets, axis=0)  # (B, Q, T, D)
    return jnp.mean(rows.astype(jnp.float32), axis=1).astype(dtype_of(self.impl.dtype))

  def from_latent(self, z: jax.Array) -> jax.Array:
    """The codec-training form: quantised latent (B, T, latent_dim) -> waveform."""
    return self.synthesize(self.transform(self.latent_proj(z.astype(dtype_of(self.impl.dtype)))))

  def transform(self, h: jax.Array, cache=None, first_position=0):
    """The pre-transformer over frames first_position, ... (with a KV cache: also returns it)."""
    b, t = h.shape[:2]
    pos = jnp.broadcast_to(first_position + jnp.arange(t, dtype=jnp.int32), (3, b, t))
    out = self.pre_transformer(h, pos, jnp.ones((b, t), jnp.int32), cache=cache)
    return out[0] if cache is None else (out[0], out[2])

  def synthesize(self, hidden: jax.Array) -> jax.Array:
    """Pre-transformer output (B, T, D) -> waveform (B, num_samples(T)); all convs causal."""
    x = hidden
    for stage in self.upsample:
      x = stage(x)
    for layer in self.decoder:
      x = layer(x)
    return jnp.clip(x[..., 0].astype(jnp.float32), -1.0, 1.0)


@functools.lru_cache(maxsize=None)
def _forward(cfg: Code2WavConfig, impl: ImplConfig):
  model = Code2Wav(cfg, impl)
  return jax.jit(lambda p, codes: model.apply({"params": p}, codes))


def decode(cfg: Code2WavConfig, params, codes, impl: ImplConfig = ImplConfig()) -> np.ndarray:
  """Codec codes (B, num_quantizers, T) of ints -> float32 numpy waveform (B, 1920 T - 555),
  as transformers' ``Qwen3OmniMoeCode2Wav``. T is padded to a multiple of BUCKET_FRAMES and the
  samples trimmed (Code2Wav is causal: later frames do not change earlier samples). Raises
  ValueError for codes of the wrong shape or out of the codebook's range."""
  from omnijax.codec.providers import check_codes  # pylint: disable=import-outside-toplevel

  codes = check_codes(np.asarray(codes), cfg.num_quantizers, cfg.codebook_size)
  if codes.ndim != 3 or not codes.shape[-1]:
    raise ValueError(
      f"code2wav takes codes of shape (batch, num_quantizers={cfg.num_quantizers}, frames "
      f">= 1), got shape {codes.shape}."
    )
  t = codes.shape[-1]
  padded = -(-t // BUCKET_FRAMES) * BUCKET_FRAMES
  codes = np.pad(codes, ((0, 0), (0, 0), (0, padded - t)))
  wave = _forward(cfg, impl)(params, jnp.asarray(codes))
  return np.asarray(wave, np.float32)[:, : cfg.num_samples(t)]


def conv_context_frames(cfg: Code2WavConfig) -> int:
  """Frames of pre-transformer output before a chunk that the conv stack needs so that the
  chunk's samples from 1920 * (its first frame) - trim on are exact: the causal receptive
  field of the convs, in frames, rounded up, plus one frame for the trimmed tail."""
  frames, per_frame = 0.0, 1
  for r in cfg.upsampling_ratios:
    per_frame *= r
    frames += 6 / per_frame  # ConvNeXt depthwise conv k7
  frames += 6 / per_frame  # decoder.0 k7
  for r in cfg.upsample_rates:
    frames += 1 / per_frame  # a transposed-conv output block reads its input step and the next
    per_frame *= r
    frames += sum(6 * d for d in DILATIONS) / per_frame
  frames += 6 / per_frame  # final conv k7
  return math.ceil(frames) + 1


def decode_context_frames(cfg: Code2WavConfig) -> int:
  """Left context (frames) a stateless re-decode needs for exact samples: the pre-transformer's
  receptive field (layers x (window - 1)) plus the convs'."""
  return cfg.num_hidden_layers * (cfg.sliding_window - 1) + conv_context_frames(cfg)


def fold_latent_proj(params, codebooks: np.ndarray):
  """Codec-training Code2Wav params + the tokenizer's codebooks (Q, K, latent_dim) -> released
  Code2Wav params: code_embedding[q K + k] = Q * codebooks[q, k] @ W + b."""
  params = dict(nn.meta.unbox(params))
  proj = params.pop("latent_proj")
  w, b = np.asarray(proj["kernel"], np.float64), np.asarray(proj["bias"], np.float64)
  q, k, _ = codebooks.shape
  table = q * np.asarray(codebooks, np.float64).reshape(q * k, -1) @ w + b
  params["code_embedding"] = table.astype(np.asarray(proj["kernel"]).dtype)
  return params


class Code2WavStreamer:
  """Frame-by-frame (or chunked) decoding with state, equal to one full decode.

  The pre-transformer keeps a KV cache of the last `left_context` frames per layer (exact
  when left_context >= sliding_window - 1, the attention window; with less, each layer sees a
  truncated window). The convs re-run over the last ``conv_context_frames`` frames of
  pre-transformer output, which makes their samples exact. Each ``push`` of n frames returns the
  samples that no later frame can change: after F frames, samples [0, 1920 F - 555) in all, so
  the concatenated pushes equal ``Code2Wav(codes)`` for the same frames.

  The conv window is right-padded to a fixed conv_context_frames + chunk_frames frames (the
  convs are causal, so padding after the last frame changes no sample kept): one compilation of
  the conv stack per config and chunk size, shared by all streamers of that config.
  """

  def __init__(
    self,
    params,
    cfg: Code2WavConfig,
    batch: int,
    *,
    chunk_frames: int = 1,
    left_context: int | None = None,
    impl: ImplConfig = ImplConfig(),
  ):
    self.cfg, self.params, self.chunk = cfg, params, chunk_frames
    self.left_context = cfg.sliding_window - 1 if left_context is None else left_context
    self.model = Code2Wav(cfg, impl)
    self.conv_context = conv_context_frames(cfg)
    slots = self.left_context + chunk_frames
    self.cache = init_cache(cfg.transformer(), impl, batch, slots)
    self.hidden = jnp.zeros((batch, 0, cfg.hidden_size), dtype_of(impl.dtype))
    self.frames = 0  # frames pushed so far
    self.emitted = 0  # samples returned so far
    self._step, self._synth = _streamer_fns(cfg, impl)

  def push(self, codes) -> np.ndarray:
    """codes (B, Q, n), 1 <= n <= chunk_frames -> the newly final samples (B, m) float32."""
    codes = jnp.asarray(codes, jnp.int32)
    n = codes.shape[-1]
    if not 1 <= n <= self.chunk:
      raise ValueError(f"push takes 1..{self.chunk} frames (chunk_frames), got {n}.")
    hidden, self.cache = self._step(self.params, codes, self.cache, self.frames)
    start = self.frames
    self.frames += n
    context = self.hidden[:, -self.conv_context :] if self.conv_context else self.hidden[:, :0]
    first = start - context.shape[1]  # frame of the synthesized chunk's first sample
    window = jnp.concatenate([context, hidden], axis=1)
    width = self.conv_context + self.chunk
    padded = jnp.pad(window, ((0, 0), (0, width - window.shape[1]), (0, 0)))
    wave = self._synth(self.params, padded)
    self.hidden = window[:, max(0, window.shape[1] - self.conv_context) :]
    end = self.cfg.num_samples(self.frames)
    offset = first * self.cfg.total_upsample
    out = np.asarray(wave[:, self.emitted - offset : end - offset])
    assert out.shape[1] == end - self.emitted, (out.shape, end, self.emitted)
    self.emitted = end
    return out


@functools.lru_cache(maxsize=None)
def _streamer_fns(cfg: Code2WavConfig, impl: ImplConfig):
  """The streamer's jitted (transform step, synthesize) of a config, shared by its streamers."""
  model = Code2Wav(cfg, impl)

  def step(params, codes, cache, first):
    cache = _shift_cache(cache, codes.shape[-1])

    def run(m):
      return m.transform(m.embed(codes), cache, first)

    return model.apply({"params": params}, method=run)

  synth = jax.jit(lambda p, h: model.apply({"params": p}, h, method="synthesize"))
  return jax.jit(step), synth


def _shift_cache(cache, n: int):
  """Drops the n oldest slots of a right-aligned sliding cache and frees n slots at its end."""

  def shift(a, axis):
    keep = jax.lax.slice_in_dim(a, n, a.shape[axis], axis=axis)
    pad = [(0, 0)] * a.ndim
    pad[axis] = (0, n)
    return jnp.pad(keep, pad)

  slots = cache["segment_ids"].shape[1]
  return dict(
    index=jnp.asarray(slots - n, jnp.int32),
    segment_ids=shift(cache["segment_ids"], 1),
    kv=jax.tree.map(lambda a: shift(a, 2), cache["kv"]),
  )


def decode_chunked(
  apply_fn, codes: np.ndarray, cfg: Code2WavConfig, chunk_frames: int, left_context: int
) -> np.ndarray:
  """Stateless chunked decode (transformers' ``chunked_decode`` without its 555-sample gaps):
  each chunk is re-decoded with up to `left_context` frames before it and keeps the samples
  from where the previous chunk stopped. Equal to a full decode when left_context >=
  ``decode_context_frames(cfg)``; with less, the error measured in tests/benchmarks applies.
  `apply_fn(codes)` decodes (B, Q, t) codes to (B, num_samples(t)) samples."""
  t = codes.shape[-1]
  pieces, emitted = [], 0
  for start in range(0, t, chunk_frames):
    end = min(start + chunk_frames, t)
    ctx = min(left_context, start)
    wave = np.asarray(apply_fn(codes[..., start - ctx : end]))
    pieces.append(wave[:, emitted - (start - ctx) * cfg.total_upsample :])
    emitted = cfg.num_samples(end)
  return np.concatenate(pieces, axis=1)
