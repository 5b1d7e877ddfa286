"""Causal 1-D convolutions and activations of the speech codec and Code2Wav, channels last.

Layouts: activations (B, T, C); a conv kernel (k, C_in / groups, C_out) (torch Conv1d's
(C_out, C_in / groups, k) permuted); a transposed-conv kernel (k, C_in, C_out) (torch
ConvTranspose1d's (C_in, C_out, k) permuted). Codec models are small next to the Thinker,
so their conv parameters are replicated (no logical sharding axes).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from omnijax.models.layers import INIT_STD, Dense, LayerNorm, logical_param


def _param(module, name, shape, init, param_dtype):
  return logical_param(module, name, shape, (None,) * len(shape), param_dtype, init)


class CausalConv1d(nn.Module):
  """Conv1d over (B, T, C) with (k - 1) * dilation zeros on the left: output t sees inputs
  <= t (stride 1) or the frames ending at t * stride (stride > 1, T a multiple of it)."""

  features: int
  kernel_size: int
  dilation: int = 1
  stride: int = 1
  groups: int = 1
  param_dtype: jnp.dtype = jnp.float32
  init_std: float | None = None  # None: LeCun; a std for layers that should start near zero

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k, cin = self.kernel_size, x.shape[-1]
    init = nn.initializers.lecun_normal(in_axis=(0, 1), out_axis=2)
    if self.init_std is not None:
      init = nn.initializers.normal(self.init_std)
    kernel = _param(
      self,
      "kernel",
      (k, cin // self.groups, self.features),
      init,
      self.param_dtype,
    )
    bias = _param(self, "bias", (self.features,), nn.initializers.zeros, self.param_dtype)
    left = (k - 1) * self.dilation + 1 - self.stride
    if x.shape[1] % self.stride:
      raise ValueError(f"CausalConv1d: length {x.shape[1]} is not a multiple of {self.stride}.")
    y = jax.lax.conv_general_dilated(
      x,
      kernel.astype(x.dtype),
      window_strides=(self.stride,),
      padding=[(left, 0)],
      rhs_dilation=(self.dilation,),
      dimension_numbers=("NWC", "WIO", "NWC"),
      feature_group_count=self.groups,
    )
    return y + bias.astype(x.dtype)


class CausalConvTranspose1d(nn.Module):
  """torch ConvTranspose1d(kernel k, stride s) cropped by k - s samples on both ends (Code2Wav's
  ``Qwen3OmniMoeCausalTransConvNet``): L inputs -> (L - 1) * s + (2 s - k) outputs, i.e. L * s for
  k = s and (L - 1) * s for k = 2 s. Computed as one matmul and an overlap-add of the k / s
  shifted output blocks (k must be a multiple of s), not as a conv over zero-dilated input."""

  features: int
  kernel_size: int
  stride: int
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k, s = self.kernel_size, self.stride
    if k % s or k // s not in (1, 2):
      raise ValueError(f"CausalConvTranspose1d: kernel {k} must be stride {s} or twice it.")
    # each output sample sums k / s taps over C_in channels
    init = nn.initializers.variance_scaling(
      s, "fan_in", "truncated_normal", in_axis=(0, 1), out_axis=2
    )
    kernel = _param(self, "kernel", (k, x.shape[-1], self.features), init, self.param_dtype)
    bias = _param(self, "bias", (self.features,), nn.initializers.zeros, self.param_dtype)
    b, length = x.shape[:2]
    taps = jnp.einsum("bli,kio->blko", x, kernel.astype(x.dtype))  # (B, L, k, out)
    if k == s:
      y = taps.reshape(b, length * s, self.features)
    else:  # output block m = x[m + 1] W[:s] + x[m] W[s:]
      y = (taps[:, 1:, :s] + taps[:, :-1, s:]).reshape(b, (length - 1) * s, self.features)
    return y + bias.astype(x.dtype)


class SnakeBeta(nn.Module):
  """x + sin^2(e^alpha x) / (e^beta + 1e-9), per channel; alpha = beta = 0 at init."""

  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    alpha = _param(self, "alpha", (c,), nn.initializers.zeros, self.param_dtype)
    beta = _param(self, "beta", (c,), nn.initializers.zeros, self.param_dtype)
    alpha, beta = jnp.exp(alpha.astype(x.dtype)), jnp.exp(beta.astype(x.dtype))
    return x + jnp.square(jnp.sin(x * alpha)) / (beta + 1e-9)


class ConvNeXtBlock(nn.Module):
  """Causal depthwise conv k7 -> LayerNorm -> Linear 4x -> exact GELU -> Linear -> gamma, residual."""

  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d, pdt = x.shape[-1], self.param_dtype
    y = CausalConv1d(d, 7, groups=d, param_dtype=pdt, name="dwconv")(x)
    y = LayerNorm(1e-6, pdt, name="norm")(y)
    y = Dense((d,), (4 * d,), (None, None), param_dtype=pdt, name="pwconv1")(y)
    y = jax.nn.gelu(y, approximate=False)
    y = Dense((4 * d,), (d,), (None, None), param_dtype=pdt, name="pwconv2")(y)
    gamma = _param(self, "gamma", (d,), nn.initializers.constant(1e-6), pdt)
    return x + gamma.astype(x.dtype) * y


class ResidualUnit(nn.Module):
  """SnakeBeta -> causal conv k7 (dilation d) -> SnakeBeta -> conv k1, plus the input."""

  dilation: int
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d, pdt = x.shape[-1], self.param_dtype
    y = SnakeBeta(pdt, name="act1")(x)
    y = CausalConv1d(d, 7, dilation=self.dilation, param_dtype=pdt, name="conv1")(y)
    y = SnakeBeta(pdt, name="act2")(y)
    y = CausalConv1d(d, 1, param_dtype=pdt, init_std=INIT_STD, name="conv2")(y)
    return x + y
