"""A trained speech tokenizer run as an object: waveform -> codes -> waveform.

    tok = load_speech_tokenizer("workdirs/codec_tokenizer")   # or a stage=vocoder run
    codes = tok.encode(waves)        # (B, N) float32 at 24 kHz -> (B, 16, ceil(N / 1920)) int32
    waves = tok.code2wav(codes)      # (B, 16, T) -> (B, 1920 T - 555) float32

A run's ``model.json`` is {"codec": CodecConfig, "stage": ..., "tokenizer": the tokenizer run
a vocoder run reads codes from}. The encoder and codebooks come from the tokenizer run; the
decoder is the released-architecture Code2Wav: a vocoder run's generator, or a tokenizer run's
decoder with its codebooks folded into ``code_embedding``.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from omnijax.codec.model import (
  CodecConfig,
  Encoder,
  encode_codes,
  export_code2wav,
  normalize_latent,
)
from omnijax import paths
from omnijax.models import code2wav as code2wav_lib
from omnijax.train import checkpoint as ckpt_lib

RUN_JSON = ckpt_lib.MODEL_JSON
BUCKET_FRAMES = code2wav_lib.BUCKET_FRAMES  # encode pads lengths to multiples of this


def write_run_config(workdir, cfg: CodecConfig, stage: str, tokenizer: str | None) -> None:
  tokenizer = os.fspath(paths.path(tokenizer)) if tokenizer else None
  (paths.path(workdir) / RUN_JSON).write_text(
    json.dumps(dict(codec=cfg.to_dict(), stage=stage, tokenizer=tokenizer), indent=2)
  )


def is_codec_run(path) -> bool:
  p = paths.path(path) / RUN_JSON
  return p.exists() and "codec" in json.loads(p.read_text())


def read_run_config(workdir) -> tuple[CodecConfig, str, str | None]:
  path = paths.path(workdir) / RUN_JSON
  if not is_codec_run(workdir):
    raise FileNotFoundError(f"{path} is not an omnijax codec run (experiments/codec.py).")
  d = json.loads(path.read_text())
  return CodecConfig.from_dict(d["codec"]), d["stage"], d.get("tokenizer")


def _codes(encoder, params, books, wave):
  latent = encoder.apply({"params": params}, wave)
  latent = normalize_latent(latent, books["latent_mean"], books["latent_var"])
  return encode_codes(latent, books["embed"])


@functools.lru_cache(maxsize=None)
def _jitted(cfg: CodecConfig):
  encoder = Encoder(cfg)
  return jax.jit(lambda p, b, w: _codes(encoder, p, b, w))


class SpeechTokenizer:
  """Encoder params, codebook state (embed (Q, K, d) and the latent statistics) and
  released-architecture Code2Wav params."""

  def __init__(self, cfg: CodecConfig, encoder, books, code2wav, step: int | None = None):
    self.cfg, self.step = cfg, step
    self.encoder_params = jax.device_put(encoder)
    names = ("embed", "latent_mean", "latent_var")
    self.books = {k: jnp.asarray(books[k]) for k in names}
    self.codebooks = self.books["embed"]
    self.code2wav_params_ = jax.device_put(code2wav)
    self.sample_rate = cfg.sample_rate
    self.frame_rate = cfg.frame_rate
    self.num_quantizers = cfg.num_quantizers
    self.codebook_size = cfg.codebook_size

  @classmethod
  def from_state(cls, cfg: CodecConfig, state, stage: str, frozen=None, step=None):
    """The tokenizer of a training state (see omnijax.codec.train); `frozen`: the tokenizer a
    vocoder run reads codes from."""
    if stage == "tokenizer":
      books = state["books"]
      c2w = export_code2wav(cfg, state["gen"], books)
      return cls(cfg, state["gen"]["encoder"], books, c2w, step)
    return cls(cfg, frozen.encoder_params, frozen.books, state["gen"], step)

  def code2wav_params(self):
    return self.code2wav_params_

  def encode_jax(self, wave: jax.Array) -> jax.Array:
    """Traceable: wave (B, N), N a multiple of the hop -> codes (B, Q, N / hop)."""
    return _codes(Encoder(self.cfg), self.encoder_params, self.books, wave)

  def encode(self, waves) -> np.ndarray:
    """(B, N) float32 at sample_rate -> codes (B, Q, ceil(N / hop)) int32 (the last frame is
    zero-padded)."""
    waves = np.asarray(waves, np.float32)
    if waves.ndim != 2:
      raise ValueError(f"encode takes waveforms (B, N), got shape {waves.shape}.")
    hop = self.cfg.hop
    frames = -(-waves.shape[1] // hop)
    padded = -(-frames // BUCKET_FRAMES) * BUCKET_FRAMES
    waves = np.pad(waves, ((0, 0), (0, padded * hop - waves.shape[1])))
    codes = _jitted(self.cfg)(self.encoder_params, self.books, waves)
    return np.asarray(codes)[..., :frames]

  def code2wav(self, codes) -> np.ndarray:
    """codes (B, Q, T) -> float32 waveform (B, 1920 T - 555), as transformers' Code2Wav."""
    return code2wav_lib.decode(self.cfg.code2wav, self.code2wav_params_, codes, self.cfg.impl)

  decode = code2wav


def load_speech_tokenizer(path, step: int | None = None) -> SpeechTokenizer:
  """The tokenizer of a codec run (its newest or `step` checkpoint)."""
  cfg, stage, tokenizer_run = read_run_config(path)
  if stage == "tokenizer":
    state, step = ckpt_lib.restore_host(path, ("gen", "books"), step)
    return SpeechTokenizer.from_state(cfg, state, stage, None, step)
  frozen = load_speech_tokenizer(tokenizer_run)
  state, step = ckpt_lib.restore_host(path, ("gen",), step)
  return SpeechTokenizer.from_state(cfg, state, stage, frozen, step)


def load_code2wav(path, step: int | None = None):
  """(Code2WavConfig, released-layout Code2Wav params) of a codec run."""
  tok = load_speech_tokenizer(path, step)
  return tok.cfg.code2wav, jax.device_get(tok.code2wav_params())
