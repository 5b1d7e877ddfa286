"""The speech tokenizer: 24 kHz waveform -> 16 codes of 2048 entries per 80 ms frame, and back.

    wave (B, N) -> SEANet-style causal conv encoder (strides 4, 5, 6, 8: 25 frames/s)
      -> sliding-window transformer -> stride-2 causal conv (12.5 frames/s) -> projection
      -> per-dimension standardisation -> residual VQ: 16 codebooks of 2048 entries (EMA updates, dead-code restarts,
         quantizer dropout) -> codes (B, 16, T)
    codes -> sum of codebook vectors -> Code2Wav (codec-training form: ``latent_proj``)

Design: the decoder *is* a released-architecture Code2Wav. During tokenizer training it reads
the quantised latent (a sum of one codebook vector per quantizer) through ``latent_proj``; the
released Code2Wav averages one embedding row per quantizer, so ``export_code2wav`` folds
codebooks and projection into ``code_embedding`` exactly, and the vocoder stage
(``experiments/codec.py:stage=vocoder``) fine-tunes that Code2Wav on (codes, waveform) pairs.
The Talker's targets (codes of this encoder) and the vocoder therefore agree by construction.

The codebooks are not parameters: they live in a ``codebooks`` state {embed (Q, K, d),
cluster_size (Q, K), embed_sum (Q, K, d), latent_mean (d,), latent_var (d,)} updated by
``ema_update`` (the latent is standardised per dimension before quantisation: see
``normalize_latent``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from omnijax.errors import ConfigError
from omnijax.models.code2wav import Code2Wav, fold_latent_proj
from omnijax.models.config import Code2WavConfig, ImplConfig, TextConfig, _build, _to_dict
from omnijax.models.conv import CausalConv1d
from omnijax.models.decoder import Decoder
from omnijax.models.layers import INIT_STD, Dense


@dataclasses.dataclass(frozen=True)
class CodecConfig:
  """Encoder + residual VQ; the decoder is ``code2wav``. Defaults: Mimi-sized encoder."""

  code2wav: Code2WavConfig = Code2WavConfig()
  sample_rate: int = 24000
  codebook_dim: int = 256
  encoder_channels: int = 64
  encoder_ratios: tuple[int, ...] = (4, 5, 6, 8)  # then x2 after the transformer
  encoder_hidden: int = 512
  encoder_layers: int = 8
  encoder_heads: int = 8
  encoder_intermediate: int = 2048
  encoder_window: int = 250  # frames at the transformer's 25 Hz
  ema_decay: float = 0.99
  # An entry restarts when its EMA count falls below this share of a uniform entry's count per
  # step (0.1 with decay 0.99: unused for about 70 steps after one hit at 2048 entries).
  dead_code_threshold: float = 0.1
  quantizer_dropout: float = 0.5  # share of examples decoded from the first n ~ U{1..Q} codes
  quantize_rate: float = 0.5  # share of examples quantised at all in training (Mimi: 0.5)
  impl: ImplConfig = ImplConfig()

  @property
  def num_quantizers(self) -> int:
    return self.code2wav.num_quantizers

  @property
  def codebook_size(self) -> int:
    return self.code2wav.codebook_size

  @property
  def hop(self) -> int:
    return int(np.prod(self.encoder_ratios)) * 2

  @property
  def frame_rate(self) -> float:
    return self.sample_rate / self.hop

  def transformer(self) -> TextConfig:
    heads = self.encoder_heads
    return TextConfig(
      vocab_size=1,
      hidden_size=self.encoder_hidden,
      num_hidden_layers=self.encoder_layers,
      num_attention_heads=heads,
      num_key_value_heads=heads,
      head_dim=self.encoder_hidden // heads,
      num_experts=0,
      num_experts_per_tok=0,
      moe_intermediate_size=0,
      intermediate_size=self.encoder_intermediate,
      rms_norm_eps=1e-5,
      rope_theta=10000.0,
      mrope_section=(self.encoder_hidden // heads // 2, 0, 0),
      qk_norm=False,
      sliding_window=self.encoder_window,
      layer_scale_initial_scale=0.01,
    )

  def validate(self, where: str = "model") -> None:
    self.code2wav.validate(f"{where}.code2wav")
    if self.hop != self.code2wav.total_upsample:
      raise ConfigError(
        f"{where}.encoder_ratios {list(self.encoder_ratios)} x 2 give {self.hop} samples per "
        f"frame but Code2Wav upsamples {self.code2wav.total_upsample}; make them equal."
      )
    if self.encoder_hidden % self.encoder_heads:
      raise ConfigError(f"{where}.encoder_hidden must be a multiple of encoder_heads.")
    if not (0 <= self.quantizer_dropout <= 1 and 0 < self.quantize_rate <= 1):
      raise ConfigError(f"{where}: quantizer_dropout must be in [0, 1], quantize_rate in (0, 1].")
    if not 0 < self.ema_decay < 1:
      raise ConfigError(f"{where}.ema_decay must be in (0, 1).")
    self.transformer().validate(f"{where} (encoder transformer)")

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], where: str = "model") -> "CodecConfig":
    d = dict(_to_dict(d))
    d["code2wav"] = _build(Code2WavConfig, d.get("code2wav", {}), f"{where}.code2wav")
    if "impl" in d:
      d["impl"] = _build(ImplConfig, d["impl"], f"{where}.impl")
    cfg = _build(cls, d, where)
    cfg.validate(where)
    return cfg

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


class EncoderResidual(nn.Module):
  """ELU -> causal conv k3 (C -> C/2) -> ELU -> conv k1 (C/2 -> C), plus the input."""

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    y = CausalConv1d(c // 2, 3, name="conv1")(jax.nn.elu(x))
    y = CausalConv1d(c, 1, init_std=INIT_STD, name="conv2")(jax.nn.elu(y))
    return x + y


class Encoder(nn.Module):
  cfg: CodecConfig

  @nn.compact
  def __call__(self, wave: jax.Array) -> jax.Array:
    """wave (B, N), N a multiple of hop -> latent (B, N / hop, codebook_dim)."""
    cfg = self.cfg
    c = cfg.encoder_channels
    x = CausalConv1d(c, 7, name="conv_in")(wave[..., None])
    for i, r in enumerate(cfg.encoder_ratios):
      x = EncoderResidual(name=f"res_{i}")(x)
      c *= 2
      x = CausalConv1d(c, 2 * r, stride=r, name=f"down_{i}")(jax.nn.elu(x))
    x = CausalConv1d(cfg.encoder_hidden, 3, name="conv_out")(jax.nn.elu(x))
    b, t = x.shape[:2]
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (3, b, t))
    x, _ = Decoder(cfg.transformer(), cfg.impl, name="transformer")(
      x, pos, jnp.ones((b, t), jnp.int32)
    )
    x = CausalConv1d(cfg.encoder_hidden, 4, stride=2, name="downsample")(x)
    return Dense((cfg.encoder_hidden,), (cfg.codebook_dim,), (None, None), name="proj")(x)


class SpeechCodec(nn.Module):
  """Encoder and the codec-training Code2Wav; the codebooks come in as an argument."""

  cfg: CodecConfig

  def setup(self):
    self.encoder = Encoder(self.cfg)
    self.decoder = Code2Wav(self.cfg.code2wav, self.cfg.impl, latent_dim=self.cfg.codebook_dim)

  def __call__(self, wave, embed, n_active, bypass=None):
    """Training forward: wave (B, N) -> (reconstruction (B, N - trim), commitment loss,
    aux {codes (B, Q, T), residuals (Q, B, T, d), active (Q, B), the latent's batch mean and
    variance}). Examples with `bypass` (B,)
    set are decoded from the unquantised latent (Mimi's quantization rate)."""
    raw = self.encode_latent(wave)
    mean, var = jnp.mean(raw, (0, 1)), jnp.var(raw, (0, 1))
    z = normalize_latent(raw, mean, var)
    zq, codes, residuals, active, commit = quantize(z, embed, n_active)
    zq = z + jax.lax.stop_gradient(zq - z)  # straight-through
    if bypass is not None:
      zq = jnp.where(bypass[:, None, None], z, zq)
    aux = dict(codes=codes, residuals=residuals, active=active, latent_mean=mean, latent_var=var)
    return self.decoder.from_latent(zq), commit, aux

  def encode_latent(self, wave):
    return self.encoder(wave)

  def decode_latent(self, zq):
    return self.decoder.from_latent(zq)


def normalize_latent(z, mean, var):
  """Standardises every latent dimension over frames (batch statistics in training, their EMA
  at inference), so the latent cannot collapse onto one codebook entry: a constant latent has
  nothing left after the mean is removed, and the codes always see unit-variance input."""
  return (z - mean) * jax.lax.rsqrt(var + 1e-5)


def quantize(z, embed, n_active):
  """Residual VQ of z (B, T, d) with codebooks embed (Q, K, d); example b uses its first
  n_active[b] quantizers. Returns (quantised latent, codes (B, Q, T), residuals (Q, B, T, d)
  each quantizer saw, active (Q, B) bool, commitment loss: mean over used quantizers of the
  squared distance of residual to its (stopped) codebook vector, per latent dimension)."""
  q = embed.shape[0]
  active = jnp.arange(q)[:, None] < n_active[None, :]  # (Q, B)

  def step(residual, inputs):
    book, on = inputs
    dist = (
      jnp.sum(residual**2, -1, keepdims=True)
      - 2 * jnp.einsum("btd,kd->btk", residual, book)
      + jnp.sum(book**2, -1)
    )
    code = jnp.argmin(dist, axis=-1)
    vec = jnp.take(book, code, axis=0)
    on = on[:, None, None].astype(residual.dtype)
    err = jnp.mean(jnp.square(residual - jax.lax.stop_gradient(vec)), axis=-1)  # (B, T)
    return residual - vec * on, (code, residual, vec * on, jnp.mean(err, -1) * on[:, 0, 0])

  _, (codes, residuals, vecs, errs) = jax.lax.scan(step, z, (embed, active))
  commit = jnp.sum(errs) / jnp.maximum(jnp.sum(active), 1)
  return jnp.sum(vecs, 0), jnp.moveaxis(codes, 0, 1), residuals, active, commit


def encode_codes(z, embed):
  """Inference: latent (B, T, d) -> codes (B, Q, T) int32 with all quantizers."""
  n = jnp.full((z.shape[0],), embed.shape[0])
  return quantize(z, embed, n)[1].astype(jnp.int32)


def init_codebooks(cfg: CodecConfig, rng) -> dict:
  q, k, d = cfg.num_quantizers, cfg.codebook_size, cfg.codebook_dim
  return dict(
    embed=jax.random.normal(rng, (q, k, d)) * 0.1,
    cluster_size=jnp.zeros((q, k)),
    embed_sum=jnp.zeros((q, k, d)),
    latent_mean=jnp.zeros((d,)),
    latent_var=jnp.ones((d,)),
  )


def ema_update(books: dict, aux: dict, rng, decay: float, threshold: float, eps: float = 1e-5):
  """EMA k-means step of every codebook from the residuals its active examples sent it;
  entries whose EMA count fell below `threshold` x a uniform entry's count per step restart at
  random residuals of the batch.
  Returns (codebooks, {"dead_codes": restarted entries per quantizer, mean})."""
  q, k, d = books["embed"].shape
  res = aux["residuals"].reshape(q, -1, d)  # (Q, M, d)
  t = aux["codes"].shape[-1]
  codes = jnp.moveaxis(aux["codes"], 1, 0).reshape(q, -1)  # (Q, M)
  on = jnp.repeat(aux["active"], t, axis=1).astype(res.dtype)  # (Q, M)
  counts = jax.vmap(lambda c, w: jax.ops.segment_sum(w, c, k))(codes, on)
  sums = jax.vmap(lambda c, r, w: jax.ops.segment_sum(r * w[:, None], c, k))(codes, res, on)
  size = decay * books["cluster_size"] + (1 - decay) * counts
  esum = decay * books["embed_sum"] + (1 - decay) * sums
  total = jnp.sum(size, -1, keepdims=True)
  smoothed = (size + eps) / (total + k * eps) * total
  embed = esum / jnp.maximum(smoothed, eps)[..., None]
  embed = jnp.where((size > 0)[..., None], embed, books["embed"])
  share = jnp.sum(on, -1, keepdims=True) / k  # a uniformly used entry's count per step
  dead = size < threshold * share
  pick = jax.random.randint(rng, (q, k), 0, res.shape[1])
  fresh = jnp.take_along_axis(res, pick[..., None], axis=1)
  embed = jnp.where(dead[..., None], fresh, embed)
  size = jnp.where(
    dead, share, size
  )  # restarted as an average entry: it has ~230 steps to get used
  esum = jnp.where(dead[..., None], fresh * share[..., None], esum)
  stats = {
    n: jax.lax.stop_gradient(decay * books[n] + (1 - decay) * aux[n])
    for n in ("latent_mean", "latent_var")
  }
  books = dict(embed=jax.lax.stop_gradient(embed), cluster_size=size, embed_sum=esum, **stats)
  return books, {"dead_codes": jnp.mean(jnp.sum(dead, -1).astype(jnp.float32))}


def export_code2wav(cfg: CodecConfig, params, codebooks) -> dict:
  """The tokenizer's decoder as released-architecture Code2Wav params (``code_embedding``)."""
  return fold_latent_proj(nn.meta.unbox(params)["decoder"], np.asarray(codebooks["embed"]))
