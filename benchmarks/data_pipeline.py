r"""Throughput of the mixed-modality Grain pipeline against the training step it feeds.

    python benchmarks/data_pipeline.py [--batches=20] [--seq=512] [--batch=4] [--workers=0]
        [--smoke]

On the local corpora (built if missing: the stdlib text corpus and the multimodal corpus of
facts), prints examples/s and tokens/s of each modality alone and of the stage-2 mixture
(`experiments/pretrain_general.py:local`), then times the `small` preset's train step (with
that experiment's optimizer) on synthetic batches of the same shape and prints last
`ratio_vs_train_step=<mixture tokens/s / train-step tokens/s>` (the pipeline runs on the same
host as training, so it must keep well ahead of the step). `--smoke`: a 24-fact media corpus,
the `tiny` preset, tiny batches.
"""

from __future__ import annotations

import argparse
import copy
import runpy
import time
from pathlib import Path

import numpy as np

from data_pipelines import local_corpus, local_media_corpus, omni
from data_pipelines import tokenizer as tok_lib

EXPERIMENT = Path(__file__).resolve().parent.parent / "experiments" / "pretrain_general.py"


def measure(data_cfg, tok, model_cfg, seq: int, batch: int, batches: int):
  it = iter(
    omni.make_omni_dataset(
      data_cfg,
      tokenizer=tok,
      model_cfg=model_cfg,
      seq_len=seq,
      batch_size=batch,
      process_index=0,
      process_count=1,
      seed=0,
    )
  )
  next(it)  # warm-up: imports, first decodes
  tokens = examples = 0
  start = time.perf_counter()
  for _ in range(batches):
    b = next(it)
    tokens += int((b["segment_ids"] > 0).sum())
    examples += sum(len(np.unique(r[r > 0])) for r in b["segment_ids"])
  dt = time.perf_counter() - start
  return examples / dt, tokens / dt


def train_step_tokens_per_sec(
  optim_cfg, preset: str, seq: int, batch: int, steps: int = 3
) -> float:
  import jax
  from omnijax import sharding as shd
  from omnijax.models import presets
  from omnijax.models.config import ThinkerConfig
  from omnijax.models.thinker import Thinker
  from omnijax.processing import batch as batch_lib
  from omnijax.train import optimizer
  from omnijax.train import step as step_lib

  cfg = ThinkerConfig.from_dict(presets.get(preset))
  model = Thinker(cfg)
  tx, schedule = optimizer.make_optimizer(optim_cfg, 100)
  mesh, rules = shd.make_mesh(dict(fsdp=-1)), shd.DEFAULT_RULES
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, cfg.text.vocab_size, (batch, seq + 1)).astype(np.int32)
  host = batch_lib.text_batch(tokens)
  with step_lib.mesh_context(mesh, rules):
    init, _, shardings = step_lib.state_shardings(model, tx, mesh, rules, seq)
    state = jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(0))
    step = step_lib.compile_train_step(
      model, tx, schedule, mesh, rules, shardings, grad_accum_steps=1, z_loss=0.0
    )
    b = jax.device_put(host, step_lib.batch_shardings(host, mesh, rules))
    state, m = step(state, b)
    jax.block_until_ready(m)
    start = time.perf_counter()
    for _ in range(steps):
      state, m = step(state, b)
    jax.block_until_ready(m)
  return batch * seq * steps / (time.perf_counter() - start)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batches", type=int, default=20)
  p.add_argument("--seq", type=int, default=512)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--workers", type=int, default=0)
  p.add_argument("--smoke", action="store_true", help="tiny sizes: checks that it runs")
  args = p.parse_args()
  preset, facts = "small", local_media_corpus.NUM_FACTS
  if args.smoke:
    vars(args).update(batches=1, batch=1)
    preset, facts = "tiny", 24

  from omnijax.models.config import ThinkerConfig

  config = runpy.run_path(str(EXPERIMENT))["get_config"]("local")
  d = config.data
  local_corpus.build_local_text_corpus(d.local_text)
  local_media_corpus.build_local_media_corpus(d.local_media, num_facts=facts)
  tok = tok_lib.local_tokenizer(d.tokenizer_corpus, vocab_size=d.tokenizer_vocab_size)
  model_cfg = ThinkerConfig.from_dict(config.model)
  d.worker_count = args.workers
  print(f"seq={args.seq} batch={args.batch} batches={args.batches} workers={args.workers}")
  for name in sorted(d.mixture):
    single = copy.deepcopy(d)
    single.mixture = {name: d.mixture[name]}
    ex, tk = measure(single, tok, model_cfg, args.seq, args.batch, args.batches)
    print(f"{name} ({d.mixture[name].task}): {ex:.1f} examples/s {tk:.0f} tokens/s")
  ex, mixture_tps = measure(d, tok, model_cfg, args.seq, args.batch, args.batches)
  print(f"stage-2 mixture: {ex:.1f} examples/s {mixture_tps:.0f} tokens/s")
  step_tps = train_step_tokens_per_sec(config.optim, preset, args.seq, args.batch)
  print(f"train step ({preset} preset, {args.batch}x{args.seq}): {step_tps:.0f} tokens/s")
  print(f"ratio_vs_train_step={mixture_tps / step_tps:.2f}")


if __name__ == "__main__":
  main()
