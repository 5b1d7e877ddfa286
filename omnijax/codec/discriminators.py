"""Discriminators of codec training: multi-period (HiFi-GAN) and multi-resolution STFT
(EnCodec). Each sub-discriminator returns its hidden feature maps followed by its logits."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from omnijax.codec.losses import stft


class PeriodDiscriminator(nn.Module):
  """The waveform folded to (N / p, p) columns; 2-D convs along time, strided by 3."""

  period: int
  channels: Sequence[int]

  @nn.compact
  def __call__(self, x):
    b, n = x.shape
    pad = (-n) % self.period
    x = jnp.pad(x, ((0, 0), (0, pad)), mode="reflect")
    x = x.reshape(b, -1, self.period, 1)
    feats = []
    for i, c in enumerate(self.channels):
      x = nn.Conv(c, (5, 1), strides=(3, 1), padding=((2, 2), (0, 0)), name=f"conv_{i}")(x)
      x = jax.nn.leaky_relu(x, 0.1)
      feats.append(x)
    feats.append(nn.Conv(1, (3, 1), padding=((1, 1), (0, 0)), name="conv_post")(x))
    return feats


class STFTDiscriminator(nn.Module):
  """2-D convs over the complex spectrogram (real and imaginary parts as 2 channels), dilated
  along time and strided along frequency (every layer halves the frequency axis: EnCodec's
  layout with the first conv strided too, which quarters its cost on CPU)."""

  n_fft: int
  channels: int

  @nn.compact
  def __call__(self, x):
    spec = stft(x, self.n_fft, self.n_fft // 4)
    x = jnp.stack([spec.real, spec.imag], axis=-1)  # (B, frames, freq, 2)
    feats = []
    x = nn.Conv(self.channels, (3, 9), strides=(1, 2), padding="SAME", name="conv_in")(x)
    feats.append(x := jax.nn.leaky_relu(x, 0.2))
    for i, d in enumerate((1, 2, 4)):
      x = nn.Conv(
        self.channels,
        (3, 9),
        strides=(1, 2),
        kernel_dilation=(d, 1),
        padding="SAME",
        name=f"conv_{i}",
      )(x)
      feats.append(x := jax.nn.leaky_relu(x, 0.2))
    x = nn.Conv(self.channels, (3, 3), padding="SAME", name="conv_out")(x)
    feats.append(x := jax.nn.leaky_relu(x, 0.2))
    feats.append(nn.Conv(1, (3, 3), padding="SAME", name="conv_post")(x))
    return feats


class Discriminators(nn.Module):
  periods: Sequence[int] = (2, 3, 5, 7, 11)
  period_channels: Sequence[int] = (32, 128, 512, 1024, 1024)
  stft_sizes: Sequence[int] = (2048, 1024, 512)
  stft_channels: int = 32

  @nn.compact
  def __call__(self, wave):
    """wave (B, N) -> list over sub-discriminators of [features..., logits]."""
    wave = wave.astype(jnp.float32)
    outs = [
      PeriodDiscriminator(p, tuple(self.period_channels), name=f"mpd_{p}")(wave)
      for p in self.periods
    ]
    outs += [
      STFTDiscriminator(n, self.stft_channels, name=f"stft_{n}")(wave) for n in self.stft_sizes
    ]
    return outs
