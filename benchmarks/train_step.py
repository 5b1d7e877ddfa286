r"""Train-step throughput of omnijax vs transformers' PyTorch Thinker on the same model.

    python benchmarks/train_step.py [--preset=small] [--batch=8] [--seq=512] [--steps=5]

Both sides train the same Thinker text model (same weights: omnijax's init exported to the
transformers layout) on the same random token batches with AdamW, float32, global-norm
clipping and the load-balancing aux loss. Prints tokens/s, step time and MFU (MaxText
convention, see omnijax/train/flops.py) for each, then the last line
`ratio_vs_transformers=<omnijax tokens/s / transformers tokens/s>`. Transformers runs with each
of its expert implementations (grouped_mm, eager) and the faster one is the baseline.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jax
import ml_collections
import numpy as np

from omnijax import sharding as shd
from omnijax.hf import convert
from omnijax.models import presets
from omnijax.models.config import ThinkerConfig
from omnijax.models.thinker import Thinker
from omnijax.train import flops, optimizer
from omnijax.train import step as step_lib

OPTIM = ml_collections.ConfigDict(
  dict(
    learning_rate=1e-4,
    warmup_steps=1,
    min_lr_ratio=0.1,
    b1=0.9,
    b2=0.95,
    eps=1e-8,
    weight_decay=0.1,
    weight_decay_exclude=("norm",),
    grad_clip_norm=1.0,
  )
)


def batches(cfg: ThinkerConfig, batch: int, seq: int, n: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  for _ in range(n):
    tokens = rng.integers(0, cfg.text.vocab_size, (batch, seq + 1), dtype=np.int32)
    yield tokens


def omnijax_run(cfg: ThinkerConfig, batch: int, seq: int, steps: int, warmup: int):
  model = Thinker(cfg)
  tx, schedule = optimizer.make_optimizer(OPTIM, 1000)
  mesh = shd.make_mesh(dict(fsdp=-1))
  rules = shd.DEFAULT_RULES
  with step_lib.mesh_context(mesh, rules):
    init, _, state_sharding = step_lib.state_shardings(model, tx, mesh, rules, seq)
    state = jax.jit(init, out_shardings=state_sharding)(jax.random.PRNGKey(0))
    params0 = jax.device_get(state.params)
    train_step = step_lib.compile_train_step(
      model, tx, schedule, mesh, rules, state_sharding, grad_accum_steps=1, z_loss=0.0
    )
    times, losses = [], []
    for i, tokens in enumerate(batches(cfg, batch, seq, warmup + steps)):
      host = dict(
        inputs=tokens[:, :-1],
        targets=tokens[:, 1:],
        segment_ids=np.ones((batch, seq), np.int32),
        positions=np.ascontiguousarray(
          np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, 3, seq))
        ),
        loss_mask=np.ones((batch, seq), np.float32),
      )
      start = time.perf_counter()
      device_batch = jax.device_put(host, step_lib.batch_shardings(host, mesh, rules))
      state, metrics = train_step(state, device_batch)
      losses.append(float(metrics["loss"]))
      if i >= warmup:
        times.append(time.perf_counter() - start)
  return params0, float(np.median(times)), losses


def transformers_run(
  cfg: ThinkerConfig, params0, batch: int, seq: int, steps: int, warmup: int, experts_impl: str
):
  import torch
  from transformers import Qwen3OmniMoeForConditionalGeneration

  with tempfile.TemporaryDirectory() as d:
    convert.save_hf(cfg, params0, d)
    model = Qwen3OmniMoeForConditionalGeneration.from_pretrained(
      d, dtype=torch.float32, experts_implementation=experts_impl
    ).thinker
  model.train()
  text = model.model.language_model
  decay = [p for n, p in text.named_parameters() if "norm" not in n] + [model.lm_head.weight]
  no_decay = [p for n, p in text.named_parameters() if "norm" in n]
  opt = torch.optim.AdamW(
    [dict(params=decay, weight_decay=OPTIM.weight_decay), dict(params=no_decay, weight_decay=0.0)],
    lr=OPTIM.learning_rate,
    betas=(OPTIM.b1, OPTIM.b2),
    eps=OPTIM.eps,
  )
  times, losses = [], []
  for i, tokens in enumerate(batches(cfg, batch, seq, warmup + steps)):
    t = torch.from_numpy(tokens.astype(np.int64))
    start = time.perf_counter()
    # labels are the inputs: transformers shifts them inside its loss.
    out = model(input_ids=t[:, :-1], labels=t[:, :-1], output_router_logits=True)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM.grad_clip_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    losses.append(float(out.loss))
    if i >= warmup:
      times.append(time.perf_counter() - start)
  return float(np.median(times)), losses, model.config.text_config._experts_implementation


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--preset", default="small")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=512)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--moe_impl", default="auto")
  p.add_argument("--dtype", default="float32")
  args = p.parse_args()

  cd = presets.get(args.preset)
  cd.impl.moe_impl = args.moe_impl
  cd.impl.dtype = args.dtype
  cfg = ThinkerConfig.from_dict(cd)
  tokens = args.batch * args.seq
  step_flops = flops.training_flops(cfg.text, args.batch, args.seq)
  peak, source = flops.peak_flops_per_device()
  n_dev = jax.device_count()
  print(
    f"preset={args.preset} total_params={flops.total_params(cfg.text) / 1e6:.1f}M "
    f"active_params={flops.active_params(cfg.text) / 1e6:.1f}M batch={args.batch} "
    f"seq={args.seq} tokens/step={tokens} devices={n_dev} ({jax.devices()[0].device_kind}) "
    f"peak={peak / 1e12:.3f} TFLOP/s/device ({source})"
  )

  def report(name, step_time, losses):
    print(
      f"{name}: step_time={step_time:.3f}s tokens_per_sec={tokens / step_time:.1f} "
      f"MFU={step_flops / (step_time * n_dev * peak):.3f} "
      f"losses={' '.join(f'{x:.4f}' for x in losses)}"
    )
    return tokens / step_time

  params0, jt, jl = omnijax_run(cfg, args.batch, args.seq, args.steps, args.warmup)
  ours = report(f"omnijax[{args.dtype}, moe={args.moe_impl}]", jt, jl)
  if args.dtype != "float32":
    return
  import torch

  print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
  best = 0.0
  for impl in ("grouped_mm", "eager"):
    tt, tl, used = transformers_run(
      cfg, params0, args.batch, args.seq, args.steps, args.warmup, impl
    )
    best = max(best, report(f"transformers[experts={used}]", tt, tl))
  print(f"ratio_vs_transformers={ours / best:.3f}")


if __name__ == "__main__":
  main()
