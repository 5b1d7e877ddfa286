r"""The train step's matrix products alone: XLA:CPU against torch's `mm`, shape by shape.

    python benchmarks/matmul.py [--preset=small] [--batch=8] [--seq=512] [--repeats=15]
        [--host_malloc=tbbmalloc]

For each weight product of a Thinker train step (the q/k/v and output projections, the
experts' gate-up and down products on a run of `RUN_TILES` row tiles, the LM head) times its
forward product, the input gradient and the weight gradient, float32, on both sides, taking
turns: `jnp.einsum` under `jax.jit` (its kernel read from the compiled HLO: a YNNPACK fusion
or XLA's own `dot`) and `torch.einsum`. Prints GFLOP/s side by side, then each side's time for
one step's worth of these products (at the measured rates, each product counted as often as
the step computes it) and last `ratio_vs_transformers=<torch time / XLA time>`: the ratio the
train step (benchmarks/train_step.py) would have if nothing but these products ran. Runs under
the same host allocator as that benchmark (`--host_malloc`, restarting itself under it).

XLA:CPU's YNNPACK dots take operands whose contracted axis is the left operand's minor one
and the right operand's major one; a weight gradient contracts the rows, which are the left
operand's major axis, so XLA runs it with its own `dot` instead.
"""

from __future__ import annotations

import argparse
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from omnijax import hostmem
from omnijax.models import moe, presets
from omnijax.models.config import ThinkerConfig


def products(cfg: ThinkerConfig, tokens: int):
  """(name, rows, inner, outer, calls per step) of each weight product y = x @ w with x
  (rows, inner) and w (inner, outer)."""
  t = cfg.text
  qkv = (t.num_attention_heads + 2 * t.num_key_value_heads) * t.head_dim
  layers = t.num_hidden_layers
  run = moe.RUN_TILES * cfg.impl.moe_block_size
  runs = layers * tokens * t.num_experts_per_tok / run  # the experts' rows, in runs
  return [
    ("q/k/v projection", tokens, t.hidden_size, qkv, layers),
    ("output projection", tokens, t.num_attention_heads * t.head_dim, t.hidden_size, layers),
    ("expert gate-up", run, t.hidden_size, 2 * t.moe_intermediate_size, runs),
    ("expert down", run, t.moe_intermediate_size, t.hidden_size, runs),
    ("LM head", tokens, t.hidden_size, t.vocab_size, 1),
  ]


# Each product's three passes as einsums of (x or dy, w or x or dy): forward, input grad,
# weight grad; with the operands' shapes from (rows r, inner i, outer o).
PASSES = (
  ("forward", "ri,io->ro", ("ri", "io")),
  ("input grad", "ro,io->ri", ("ro", "io")),
  ("weight grad", "ri,ro->io", ("ri", "ro")),
)


def xla_kernel(hlo: str) -> str:
  return "YNNPACK" if re.search(r"ynn_fusion", hlo) else "XLA dot"


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--preset", default="small")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=512)
  p.add_argument("--repeats", type=int, default=15)
  p.add_argument("--host_malloc", default="tbbmalloc", choices=hostmem.POLICIES)
  args = p.parse_args()
  hostmem.restart_under(args.host_malloc, sys.argv)
  hostmem.set_policy(args.host_malloc)
  cfg = ThinkerConfig.from_dict(presets.get(args.preset))
  rng = np.random.default_rng(0)
  print(
    f"preset={args.preset} tokens={args.batch * args.seq} torch {torch.__version__}, "
    f"{torch.get_num_threads()} threads; jax {jax.__version__} on {jax.devices()[0]}"
  )
  print(
    f"{'product':18s} {'pass':12s} {'shape (r x i x o)':20s} {'XLA GF/s':>9s} "
    f"{'torch GF/s':>11s} {'ratio':>6s}  XLA kernel"
  )
  ours = theirs = 0.0
  for name, r, i, o, calls in products(cfg, args.batch * args.seq):
    sizes = dict(r=r, i=i, o=o)
    for pass_name, spec, shapes in PASSES:
      a, b = (rng.standard_normal([sizes[c] for c in s], np.float32) for s in shapes)
      ja, jb = jnp.asarray(a), jnp.asarray(b)
      ta, tb = torch.from_numpy(a), torch.from_numpy(b)
      f = jax.jit(lambda x, y, spec=spec: jnp.einsum(spec, x, y))
      kernel = xla_kernel(f.lower(ja, jb).compile().as_text())
      sides = {
        "xla": lambda: jax.block_until_ready(f(ja, jb)),
        "torch": lambda: torch.einsum(spec, ta, tb),
      }
      times = {side: [] for side in sides}
      for rep in range(args.repeats + 1):
        for side in sides if rep % 2 else reversed(list(sides)):
          start = time.perf_counter()
          sides[side]()
          times[side].append(time.perf_counter() - start)
      x, t = (float(np.median(times[side][1:])) for side in sides)
      flops = 2.0 * r * i * o
      ours += calls * x
      theirs += calls * t
      print(
        f"{name:18s} {pass_name:12s} {f'{r} x {i} x {o}':20s} {flops / x / 1e9:9.0f} "
        f"{flops / t / 1e9:11.0f} {t / x:6.2f}  {kernel}"
      )
  print(f"one step's products: XLA {ours:.3f} s, torch {theirs:.3f} s")
  print(f"ratio_vs_transformers={theirs / ours:.3f}")


if __name__ == "__main__":
  main()
