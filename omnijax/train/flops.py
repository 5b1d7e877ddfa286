"""Analytic training FLOPs and MFU (MaxText convention).

FLOPs per step = 6 x active matmul params x tokens + causal attention FLOPs, where causal
attention counts 3 (fwd + bwd) x 2 matmuls (QK^T, PV) x 2 FLOPs x B x S^2 / 2 x heads x head_dim
per layer. Active params are the weights a token multiplies: attention projections, router,
top-k experts (+ shared expert), dense MLPs, LM head; the embedding table is a lookup and
norms are negligible, so neither counts.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

from omnijax.models import matmul
from omnijax.models.config import TextConfig

# Dense bf16 peak FLOP/s per device, by a substring of `jax.Device.device_kind`.
PEAK_FLOPS = (
  ("TPU v6", 918e12),
  ("TPU v5 lite", 197e12),
  ("TPU v5e", 197e12),
  ("TPU v5", 459e12),
  ("TPU v4", 275e12),
  ("H200", 989e12),
  ("H100", 989e12),
  ("A100", 312e12),
  ("B200", 2250e12),
)


def attention_params(t: TextConfig) -> int:
  return t.hidden_size * t.head_dim * (2 * t.num_attention_heads + 2 * t.num_key_value_heads)


def mlp_params(t: TextConfig, moe: bool, active: bool) -> int:
  d = t.hidden_size
  if not moe:
    return 3 * d * t.intermediate_size
  experts = t.num_experts_per_tok if active else t.num_experts
  shared = 3 * d * t.shared_expert_intermediate_size + d if t.shared_expert_intermediate_size else 0
  return d * t.num_experts + experts * 3 * d * t.moe_intermediate_size + shared


def active_params(t: TextConfig) -> int:
  layers = sum(
    attention_params(t) + mlp_params(t, t.is_moe_layer(i), active=True)
    for i in range(t.num_hidden_layers)
  )
  return layers + t.hidden_size * t.vocab_size


def total_params(t: TextConfig) -> int:
  """All decoder parameters (embedding, norms and LM head included)."""
  d = t.hidden_size
  norms = 2 * d + 2 * t.head_dim
  layers = sum(
    attention_params(t) + norms + mlp_params(t, t.is_moe_layer(i), active=False)
    for i in range(t.num_hidden_layers)
  )
  return layers + 2 * d * t.vocab_size + d


def training_flops(t: TextConfig, batch: int, seq: int) -> float:
  tokens = batch * seq
  attention = 6.0 * batch * seq * seq * t.num_attention_heads * t.head_dim * t.num_hidden_layers
  return 6.0 * active_params(t) * tokens + attention


@functools.lru_cache(maxsize=None)
def measured_peak_flops(sizes: tuple[int, ...] = (2048, 3072), repeats: int = 3) -> float:
  """FLOP/s of large float32 matmuls on the default device, the CPU's practical peak: the best
  single run over square sizes, one of them not a power of two (a 2048-float row stride maps
  to few cache sets on some CPUs: 100 GFLOP/s at 2048 against 170 at 3072 on a 2-core AMD EPYC
  host), so that a slow size or a busy moment cannot make a step's MFU exceed 1. On a CPU
  with oneMKL (model.impl.cpu_matmul), its products count too."""
  best = 0.0
  products = [jax.jit(lambda a: a @ a)]
  if jax.default_backend() == "cpu" and matmul.unavailable() is None:
    products.append(jax.jit(lambda a: matmul.matmul(a, a, mkl=True)))
  for f in products:
    for n in sizes:
      x = jnp.ones((n, n), jnp.float32)
      f(x).block_until_ready()
      for _ in range(repeats):
        start = time.perf_counter()
        f(x).block_until_ready()
        best = max(best, 2.0 * n**3 / (time.perf_counter() - start))
  return best


def peak_flops_per_device(configured: float | None = None) -> tuple[float, str]:
  """(peak FLOP/s, where it came from): the config, the device table, or a measurement."""
  if configured:
    return float(configured), "configured"
  kind = jax.devices()[0].device_kind
  for key, peak in PEAK_FLOPS:
    if key in kind:
      return peak, f"{kind} bf16 peak"
  return measured_peak_flops(), f"measured f32 matmul on {kind}"
