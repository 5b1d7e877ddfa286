"""Building blocks shared by the decoders: parameters with logical axes, embedding lookup,
RMSNorm, SwiGLU MLP."""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from omnijax.models import matmul

INIT_STD = 0.02  # transformers' initializer_range


def dtype_of(name: str):
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def logical_param(
  module: nn.Module,
  name: str,
  shape: Sequence[int],
  axes: Sequence[str | None],
  param_dtype,
  init=None,
):
  """A parameter whose dimensions carry logical axis names (see omnijax.sharding)."""
  init = init or nn.initializers.normal(INIT_STD)
  return module.param(
    name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), param_dtype
  )


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  return nn.with_logical_constraint(x, tuple(axes))


def mesh_axes(*logical: str) -> tuple[str, ...]:
  """The mesh axes the logical dims map to under the current rules, major first."""
  axes = []
  for a in nn.logical_to_mesh_axes(logical):
    axes += [a] if isinstance(a, str) else list(a or ())
  return tuple(axes)


def mesh_shards(*logical: str) -> int:
  """Into how many shards the current (abstract) mesh splits the logical dims; 1 outside one."""
  mesh = jax.sharding.get_abstract_mesh()
  return 1 if mesh.empty else math.prod(mesh.shape[a] for a in mesh_axes(*logical))


def constrain_flat(x: jax.Array, logical: Sequence[str]) -> jax.Array:
  """x whose first dim flattens the logical dims `logical` (e.g. audios x chunks as
  ("batch", "seq")): split over all their mesh axes, major first; other dims whole."""
  if jax.sharding.get_abstract_mesh().empty:
    return x
  return jax.lax.with_sharding_constraint(x, P(mesh_axes(*logical) or None))


def rows(x: jax.Array) -> jax.Array:
  """Activations (batch, embed) or (batch, seq, ..., embed), laid out batch- (and sequence-)
  sharded."""
  return constrain(
    x, ("batch",) + ("seq",) * (x.ndim > 2) + (None,) * (x.ndim - 3) + ("act_embed",)
  )


def head_logits(h: jax.Array, head: jax.Array, mkl: bool = False) -> jax.Array:
  """Float32 logits (B, S, V) of hidden states h (B, S, D) under an output head (D, V).

  One (B*S, D) x (D, V) matmul unless the sequence is sharded (context parallelism: merging
  it into the rows would gather it). XLA:CPU computes the weight gradient of a product over
  two activation axes through a transposed copy of the (B, S, V) gradient: 1 s of the small
  preset's 23 s train step. `mkl`: through oneMKL (`matmul.use_mkl`)."""
  b, s, d = h.shape
  head = head.astype(h.dtype)
  if mesh_shards("seq") > 1:
    logits = jnp.einsum("bsd,dv->bsv", h, head, preferred_element_type=jnp.float32)
  else:
    logits = matmul.matmul(h.reshape(b * s, d), head, mkl=mkl, preferred_element_type=jnp.float32)
  return constrain(logits.reshape(b, s, -1), ("batch", "seq", "act_vocab"))


def lookup(table: jax.Array, ids: jax.Array, dtype, codebook: jax.Array | None = None):
  """Embedding rows `table[ids]` (or `table[codebook, ids]` of a stacked (G, V, D) table) in
  `dtype`, batch-sharded. The table is gathered whole first, as FSDP gathers any weight: a
  lookup in the (vocab, embed)-sharded table would keep its layout, and the gradient's
  scatter-add would then all-gather the activations."""
  table = constrain(table.astype(dtype), (None,) * table.ndim)
  return rows(table[ids] if codebook is None else table[codebook, ids])


class RMSNorm(nn.Module):
  """RMSNorm computed in float32, cast back, then scaled (transformers' order of operations)."""

  eps: float
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    weight = logical_param(
      self, "weight", (x.shape[-1],), ("norm",), self.param_dtype, nn.initializers.ones
    )
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return weight.astype(x.dtype) * x32.astype(x.dtype)


class LayerNorm(nn.Module):
  """torch.nn.LayerNorm (biased variance, eps inside the sqrt) computed in float32, cast back.

  `scale_name` is the scale parameter's name ("weight" as in torch, or "scale").
  """

  eps: float
  param_dtype: jnp.dtype = jnp.float32
  scale_name: str = "weight"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    scale = logical_param(
      self, self.scale_name, (d,), ("norm",), self.param_dtype, nn.initializers.ones
    )
    bias = logical_param(self, "bias", (d,), ("norm",), self.param_dtype, nn.initializers.zeros)
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


class Dense(nn.Module):
  """x @ kernel + bias; kernel (*in_shape, *out_shape) with logical axes, bias (*out_shape)."""

  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  kernel_axes: tuple[str | None, ...]
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    n_in, n_out = len(self.in_shape), len(self.out_shape)
    kernel = logical_param(
      self, "kernel", self.in_shape + self.out_shape, self.kernel_axes, self.param_dtype
    ).astype(self.dtype)
    bias = logical_param(
      self, "bias", self.out_shape, self.kernel_axes[n_in:], self.param_dtype, nn.initializers.zeros
    ).astype(self.dtype)
    y = jax.lax.dot_general(
      x.astype(self.dtype),
      kernel,
      ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ())),
    )
    return y + bias.reshape((1,) * (y.ndim - n_out) + self.out_shape)


class LayerScale(nn.Module):
  """Per-channel scale of a residual branch (Touvron et al. 2021), initialised to `init`."""

  init: float
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = logical_param(
      self,
      "scale",
      (x.shape[-1],),
      ("norm",),
      self.param_dtype,
      nn.initializers.constant(self.init),
    )
    return scale.astype(x.dtype) * x


class SwiGLU(nn.Module):
  """down(silu(gate x) * up x): the dense MLP and the shared expert."""

  intermediate_size: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    gate = logical_param(
      self, "gate_proj", (d, self.intermediate_size), ("embed", "mlp"), self.param_dtype
    ).astype(self.dtype)
    up = logical_param(
      self, "up_proj", (d, self.intermediate_size), ("embed", "mlp"), self.param_dtype
    ).astype(self.dtype)
    down = logical_param(
      self, "down_proj", (self.intermediate_size, d), ("mlp", "embed"), self.param_dtype
    ).astype(self.dtype)
    h = jax.nn.silu(x @ gate) * (x @ up)
    h = constrain(h, ("batch", "seq", "act_mlp"))
    return h @ down
