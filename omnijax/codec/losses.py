"""Codec training losses (DAC's recipe): multi-scale log-mel L1, least-squares GAN, feature
matching. Weights are in the experiment config (DAC: mel 15, adversarial 1, feature matching 2,
commitment 0.25; its codebook loss is replaced here by EMA codebook updates)."""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import librosa
import numpy as np

MEL_WINDOWS = (32, 64, 128, 256, 512, 1024, 2048)
MEL_BINS = (5, 10, 20, 40, 80, 160, 320)


def stft(x: jax.Array, n_fft: int, hop: int) -> jax.Array:
  """x (B, N) -> complex (B, frames, n_fft // 2 + 1): hann window, centred (reflect padding)."""
  x = jnp.pad(x, ((0, 0), (n_fft // 2, n_fft // 2)), mode="reflect")
  frames = 1 + (x.shape[1] - n_fft) // hop
  idx = np.arange(frames)[:, None] * hop + np.arange(n_fft)[None, :]
  window = np.hanning(n_fft + 1)[:-1].astype(np.float32)  # periodic hann
  return jnp.fft.rfft(x[:, idx] * window, axis=-1)


@functools.lru_cache(maxsize=None)
def mel_filters(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
  with warnings.catch_warnings():  # the smallest scales have empty filters, as in DAC
    warnings.simplefilter("ignore")
    return librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels).T.astype(np.float32)


def log_mel(x: jax.Array, sample_rate: int, window: int, n_mels: int) -> jax.Array:
  mag = jnp.abs(stft(x, window, window // 4))
  return jnp.log10(jnp.maximum(mag @ mel_filters(sample_rate, window, n_mels), 1e-5))


def mel_loss(x: jax.Array, y: jax.Array, sample_rate: int) -> jax.Array:
  """Sum over DAC's 7 scales of the mean |log10 mel(x) - log10 mel(y)|."""
  return sum(
    jnp.mean(jnp.abs(log_mel(x, sample_rate, w, m) - log_mel(y, sample_rate, w, m)))
    for w, m in zip(MEL_WINDOWS, MEL_BINS)
  )


def discriminator_loss(real_outputs, fake_outputs) -> jax.Array:
  """Least squares: real logits to 1, fake to 0, summed over sub-discriminators."""
  return sum(
    jnp.mean(jnp.square(r[-1] - 1)) + jnp.mean(jnp.square(f[-1]))
    for r, f in zip(real_outputs, fake_outputs)
  )


def generator_loss(fake_outputs) -> jax.Array:
  return sum(jnp.mean(jnp.square(f[-1] - 1)) for f in fake_outputs)


def feature_matching_loss(real_outputs, fake_outputs) -> jax.Array:
  """Mean L1 between the discriminators' hidden features of real and generated audio."""
  total = 0.0
  for r, f in zip(real_outputs, fake_outputs):
    for a, b in zip(r[:-1], f[:-1]):
      total += jnp.mean(jnp.abs(jax.lax.stop_gradient(a) - b))
  return total
