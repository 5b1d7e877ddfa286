r"""Decoding speed of omnijax's `Model.generate` vs transformers' Thinker `generate`, same model.

    python benchmarks/decode.py [--preset=small] [--batch=1] [--prompt=128] [--new=256] [--smoke]

Both sides decode greedily from the same weights (omnijax's init exported to the transformers
layout) and the same random text prompt, float32, until exactly `--new` tokens (no EOS). Prints
for each: the prefill time (a generate of one token: towers, prompt forward and cache fill) and
the decode rate (new tokens after the first per second, per row), then the last line
`ratio_vs_transformers=<omnijax decode tokens/s / transformers decode tokens/s>`. Timings are
medians over `--repeats` runs after a warmup run (which compiles omnijax's functions).
Transformers runs with each expert implementation in `--experts` (eager: ~10x slower on CPU)
and the fastest is the baseline.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from omnijax import api
from omnijax.hf import convert
from omnijax.models import presets
from omnijax.models.config import ThinkerConfig
from omnijax.models.thinker import Thinker
from omnijax.processing import media as media_lib


def median_time(fn, repeats: int):
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times)), out


def rates(generate, prompt, new: int, repeats: int):
  """(prefill seconds, decode tokens/s per row, tokens) of generate(prompt, n) -> (B, S + n)."""
  generate(prompt, 1), generate(prompt, new)  # warmup (compiles)
  prefill, _ = median_time(lambda: generate(prompt, 1), repeats)
  total, tokens = median_time(lambda: generate(prompt, new), repeats)
  assert tokens.shape[1] == prompt.shape[1] + new, tokens.shape
  return prefill, (new - 1) / (total - prefill), tokens[:, prompt.shape[1] :]


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--preset", default="small")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--prompt", type=int, default=128)
  p.add_argument("--new", type=int, default=256)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--experts", default="grouped_mm", help="transformers' expert implementations")
  p.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat: checks that it runs")
  args = p.parse_args()
  if args.smoke:
    vars(args).update(preset="tiny", prompt=8, new=16, repeats=1)

  cfg = ThinkerConfig.from_dict(presets.get(args.preset))
  ids = jnp.ones((1, 8), jnp.int32)
  params = jax.jit(lambda k: Thinker(cfg).init(k, ids, media=media_lib.empty_media(cfg, 1)))(
    jax.random.key(0)
  )["params"]
  prompt = np.random.default_rng(0).integers(10, cfg.text.vocab_size, (args.batch, args.prompt))
  print(
    f"preset={args.preset} batch={args.batch} prompt={args.prompt} new={args.new} "
    f"float32 ({jax.devices()[0].device_kind})"
  )

  def report(name, prefill, rate):
    print(
      f"{name}: prefill={prefill * 1e3:.1f}ms decode_tokens_per_sec={rate:.1f} "
      f"({1e3 / rate:.1f}ms/token, x{args.batch} rows)"
    )
    return rate

  model = api.Model(cfg, params)
  ours_prefill, ours, our_tokens = rates(
    lambda x, n: model.generate(x, n, eos_token_id=[]), prompt, args.new, args.repeats
  )
  report("omnijax", ours_prefill, ours)

  import torch
  from transformers import Qwen3OmniMoeForConditionalGeneration

  print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
  best = 0.0
  with tempfile.TemporaryDirectory() as d:
    convert.save_hf(cfg, jax.device_get(params), d)
    for impl in args.experts.split(","):
      hf = Qwen3OmniMoeForConditionalGeneration.from_pretrained(
        d, dtype=torch.float32, experts_implementation=impl
      ).thinker.eval()

      def hf_generate(x, n):
        with torch.no_grad():
          return hf.generate(
            input_ids=torch.from_numpy(x),
            attention_mask=torch.ones(x.shape),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
          ).numpy()

      prefill, rate, tokens = rates(hf_generate, prompt, args.new, args.repeats)
      best = max(best, report(f"transformers[experts={impl}]", prefill, rate))
      same = np.cumprod(tokens == our_tokens, axis=1).sum(1)
      print(f"  greedy tokens equal to omnijax's for the first {same.tolist()} of {args.new}")
  print(f"ratio_vs_transformers={ours / best:.3f}")


if __name__ == "__main__":
  main()
