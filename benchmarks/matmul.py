r"""The train step's matrix products alone: XLA:CPU and oneMKL against torch's `mm`, shape by shape.

    python benchmarks/matmul.py [--preset=small] [--batch=8] [--seq=512] [--repeats=15]
        [--host_malloc=tbbmalloc] [--smoke]

For each weight product of a Thinker train step (the q/k/v and output projections, the
experts' gate-up and down products on a run of `RUN_TILES` row tiles, the LM head) times its
forward product, the input gradient and the weight gradient, float32, on both sides, taking
turns: `jnp.einsum` under `jax.jit` (its kernel read from the compiled HLO: a YNNPACK fusion
or XLA's own `dot`), oneMKL's `sgemm` as omnijax calls it where it is installed
(`model.impl.cpu_matmul=mkl`, omnijax/models/matmul.py) and `torch.einsum`. Prints GFLOP/s side
by side, then each side's time for one step's worth of these products (at the measured rates,
each product counted as often as the step computes it) and last
`ratio_vs_transformers=<torch time / omnijax time>`, omnijax's time being that of the products
`cpu_matmul=auto` picks on this host: the ratio the train step (benchmarks/train_step.py)
would have if nothing but these products ran. The "ratio" column is the same, product by
product. Runs under
the same host allocator as that benchmark (`--host_malloc`, restarting itself under it).

XLA:CPU's YNNPACK dots take operands whose contracted axis is the left operand's minor one
and the right operand's major one; a weight gradient contracts the rows, which are the left
operand's major axis, so XLA runs it with its own `dot` instead.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from omnijax import hostmem
from omnijax.models import matmul, moe, presets
from omnijax.models.config import ImplConfig, ThinkerConfig


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
# weight grad; with the operands' shapes from (rows r, inner i, outer o), and as oneMKL's
# product of the same operands (trans_a, trans_b).
PASSES = (
  ("forward", "ri,io->ro", ("ri", "io"), (False, False)),
  ("input grad", "ro,io->ri", ("ro", "io"), (False, True)),
  ("weight grad", "ri,ro->io", ("ri", "ro"), (True, False)),
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
  p.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat: checks that it runs")
  args = p.parse_args()
  if args.smoke:
    vars(args).update(preset="tiny", batch=1, seq=32, repeats=1)
  hostmem.restart_under(args.host_malloc, sys.argv)
  hostmem.set_policy(args.host_malloc)
  cfg = ThinkerConfig.from_dict(presets.get(args.preset))
  rng = np.random.default_rng(0)
  print(
    f"preset={args.preset} tokens={args.batch * args.seq} torch {torch.__version__}, "
    f"{torch.get_num_threads()} threads; jax {jax.__version__} on {jax.devices()[0]}"
  )
  mkl = matmul.unavailable() is None
  omnijax = "mkl" if ImplConfig().resolved("cpu").cpu_matmul == "mkl" else "xla"
  print(
    f"{'product':18s} {'pass':12s} {'shape (r x i x o)':20s} {'XLA GF/s':>9s} "
    + (f"{'oneMKL GF/s':>12s} " if mkl else "")
    + f"{'torch GF/s':>11s} {'ratio':>6s}  XLA kernel"
  )
  totals = collections.Counter()
  for name, r, i, o, calls in products(cfg, args.batch * args.seq):
    sizes = dict(r=r, i=i, o=o)
    for pass_name, spec, shapes, (ta, tb) in PASSES:
      a, b = (rng.standard_normal([sizes[c] for c in s], np.float32) for s in shapes)
      ja, jb = jnp.asarray(a), jnp.asarray(b)
      pa, pb = torch.from_numpy(a), torch.from_numpy(b)
      f = jax.jit(lambda x, y, spec=spec: jnp.einsum(spec, x, y))
      kernel = xla_kernel(f.lower(ja, jb).compile().as_text())
      g = jax.jit(lambda x, y, ta=ta, tb=tb: matmul.matmul(x, y, mkl=True, trans_a=ta, trans_b=tb))
      sides = {
        "xla": lambda: jax.block_until_ready(f(ja, jb)),
        "mkl": lambda: jax.block_until_ready(g(ja, jb)),
        "torch": lambda: torch.einsum(spec, pa, pb),
      }
      if not mkl:
        del sides["mkl"]
      times = {side: [] for side in sides}
      for rep in range(args.repeats + 1):
        for side in sides if rep % 2 else reversed(list(sides)):
          start = time.perf_counter()
          sides[side]()
          times[side].append(time.perf_counter() - start)
      secs = {side: float(np.median(times[side][1:])) for side in sides}
      flops = 2.0 * r * i * o
      totals.update({side: calls * s for side, s in secs.items()})
      ours = secs[omnijax]
      print(
        f"{name:18s} {pass_name:12s} {f'{r} x {i} x {o}':20s} {flops / secs['xla'] / 1e9:9.0f} "
        + (f"{flops / secs['mkl'] / 1e9:12.0f} " if mkl else "")
        + f"{flops / secs['torch'] / 1e9:11.0f} {secs['torch'] / ours:6.2f}  {kernel}"
      )
  print(
    f"one step's products: XLA {totals['xla']:.3f} s, "
    + (f"oneMKL {totals['mkl']:.3f} s, " if mkl else "")
    + f"torch {totals['torch']:.3f} s"
  )
  print(f"ratio_vs_transformers={totals['torch'] / totals[omnijax]:.3f}")


if __name__ == "__main__":
  main()
