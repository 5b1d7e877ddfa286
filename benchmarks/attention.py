r"""One attention core, forward and backward: omnijax's XLA path vs torch's SDPA, per head layout.

    python benchmarks/attention.py [--batch=4] [--seq=512] [--head_dim=64] [--query_blocks=8]
        [--smoke]

Causal attention over one document of `--seq` tokens, float32, on the host CPU: omnijax's
`dot_product_attention` (the path CPU training and KV-cache decoding take) and
`torch.nn.functional.scaled_dot_product_attention` with `enable_gqa`, the kernel transformers'
`sdpa` attention calls. For each layout (query heads / KV heads: grouped 8 / 2, multi-head
16 / 16 as in Code2Wav, multi-query 8 / 1) prints the median time of a forward and backward
pass on both sides, their ratio, and the largest difference of the outputs.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import torch

from decode import median_time
from omnijax.models.attention import dot_product_attention

LAYOUTS = ((8, 2), (16, 16), (8, 1))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--seq", type=int, default=512)
  ap.add_argument("--head_dim", type=int, default=64)
  ap.add_argument("--query_blocks", type=int, default=8)
  ap.add_argument("--repeats", type=int, default=9)
  ap.add_argument(
    "--smoke", action="store_true", help="tiny sizes, one repeat: checks that it runs"
  )
  args = ap.parse_args()
  if args.smoke:
    vars(args).update(batch=1, seq=32, head_dim=8, query_blocks=2, repeats=1)
  rng = np.random.default_rng(0)
  b, s, d = args.batch, args.seq, args.head_dim
  seg = jnp.ones((b, s), jnp.int32)
  for h, kh in LAYOUTS:
    q, k, v = (rng.normal(size=(b, s, n, d)).astype(np.float32) for n in (h, kh, kh))

    def loss(q, k, v):
      return dot_product_attention(q, k, v, seg, args.query_blocks).sum()

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    arrays = [jnp.asarray(x) for x in (q, k, v)]
    jax.block_until_ready(step(*arrays))
    ours, _ = median_time(lambda: jax.block_until_ready(step(*arrays)), args.repeats)

    tq, tk, tv = (torch.tensor(x).transpose(1, 2).requires_grad_() for x in (q, k, v))

    def torch_step():
      for t in (tq, tk, tv):
        t.grad = None
      out = torch.nn.functional.scaled_dot_product_attention(
        tq, tk, tv, is_causal=True, enable_gqa=True
      )
      out.sum().backward()
      return out

    torch_step()
    theirs, out = median_time(torch_step, args.repeats)
    ref = dot_product_attention(*arrays, seg, args.query_blocks)
    diff = np.abs(np.asarray(ref) - out.detach().transpose(1, 2).numpy()).max()
    print(
      f"heads {h:2d} / {kh:2d}: omnijax {1e3 * ours:7.1f} ms  torch sdpa {1e3 * theirs:7.1f} ms"
      f"  ratio_vs_torch={theirs / ours:.3f}  max |diff| {diff:.1e}"
    )


if __name__ == "__main__":
  main()
