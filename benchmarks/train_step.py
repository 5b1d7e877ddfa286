r"""Train-step throughput of omnijax vs transformers' PyTorch Thinker on the same model.

    python benchmarks/train_step.py [--preset=small] [--batch=8] [--seq=512] [--steps=5]
        [--scan_unroll=0] [--host_malloc=tbbmalloc] [--cpu_schedule=concurrency]
        [--cpu_matmul=auto] [--profile] [--smoke]

Both sides train the same Thinker text model (same weights: omnijax's init exported to the
transformers layout) on the same random token batches with AdamW, float32, global-norm
clipping and the load-balancing aux loss. Prints tokens/s, step time and MFU (MaxText
convention, see omnijax/train/flops.py) for each, then the last line
`ratio_vs_transformers=<omnijax tokens/s / transformers tokens/s>`. Transformers runs with each
of its expert implementations (grouped_mm, eager), each against omnijax in turn, and the ratio is
the one against the faster. Each side runs in its own process, as in real use (in one
process, omnijax's steps took 21.0-21.8 s before transformers' first step and 23.5-24.8 s
after). The sides take turns step by step (after their warmup steps, which are not timed), so
other load on the host slows them alike; a step time is the median of the timed steps. Both
processes start under the same host allocator (`--host_malloc`, omnijax/hostmem.py): by
default oneTBB's, which keeps freed blocks, so neither side's steps spend kernel time
zero-filling fresh pages.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import multiprocessing
import os
import re
import resource
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from omnijax import hostmem
from omnijax import sharding as shd
from omnijax.hf import convert
from omnijax.models import presets
from omnijax.models.config import CPU_MATMULS, ThinkerConfig
from omnijax.models.thinker import Thinker
from omnijax.processing import batch as batch_lib
from omnijax.train import flops, optimizer
from omnijax.train import step as step_lib
from omnijax.train.config import base_config

# The training config's optimizer (every field it reads), at the benchmark's settings.
OPTIM = base_config().optim
OPTIM.update(learning_rate=1e-4, warmup_steps=1)


def batches(cfg: ThinkerConfig, batch: int, seq: int, n: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  for _ in range(n):
    tokens = rng.integers(0, cfg.text.vocab_size, (batch, seq + 1), dtype=np.int32)
    yield tokens


def omnijax_stepper(cfg: ThinkerConfig, batch: int, seq: int, cpu_schedule: str):
  """(initial params, a function that makes a step: tokens -> loss, training from them) for
  omnijax; the step is compiled here, with XLA:CPU's `cpu_schedule` (`--cpu_schedule`)."""
  model = Thinker(cfg)
  tx, schedule = optimizer.make_optimizer(OPTIM, 1000)
  mesh = shd.make_mesh(dict(fsdp=-1))
  rules = shd.DEFAULT_RULES

  with step_lib.mesh_context(mesh, rules):
    init, _, state_sharding = step_lib.state_shardings(model, tx, mesh, rules, seq)
    state = jax.jit(init, out_shardings=state_sharding)(jax.random.PRNGKey(0))
    example = batch_lib.text_batch(next(batches(cfg, batch, seq, 1)))
    batch_sharding = step_lib.batch_shardings(example, mesh, rules)
    train_step = step_lib.compile_train_step(
      model,
      tx,
      schedule,
      mesh,
      rules,
      state_sharding,
      grad_accum_steps=1,
      z_loss=0.0,
      cpu_schedule=cpu_schedule,
    )
    train_step = train_step.lower(state, jax.device_put(example, batch_sharding)).compile()
  initial = jax.device_get(state)  # the step donates its state

  def make_step():
    state = jax.device_put(initial, state_sharding)

    def step(tokens):
      nonlocal state
      state, metrics = train_step(
        state, jax.device_put(batch_lib.text_batch(tokens), batch_sharding)
      )
      # transformers' loss: the cross-entropy plus coef x the load-balancing loss.
      ce = float(metrics["ce_sum"] / metrics["loss_tokens"])
      return ce + cfg.text.router_aux_loss_coef * float(metrics["aux_loss"])

    return step

  return initial.params, make_step


def omnijax_worker(
  conn,
  malloc: str,
  profile: bool,
  cfg: ThinkerConfig,
  batch: int,
  seq: int,
  hf_dir: str,
  cpu_schedule: str,
):
  """Process body: writes omnijax's initial weights in the transformers layout to `hf_dir`,
  then serves steps (`_serve`) from those weights."""
  hostmem.set_policy(malloc)
  if profile:  # XLA:CPU traces its thunks (ops and fusions) only with this flag
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme"
    # An installed libtpu (the AOT extra) loads its profiler plugin too, which crashes the
    # trace on a host without TPUs.
    if not os.environ.get("JAX_PLATFORMS"):
      jax.config.update("jax_platforms", "cpu")
  params0, make_step = omnijax_stepper(cfg, batch, seq, cpu_schedule)
  convert.save_hf(cfg, params0, hf_dir)
  _serve(conn, make_step, "omnijax", xla_op_profile)


def xla_op_profile(step, tokens) -> list[tuple[str, float, int]]:
  """(XLA op or fusion kind, seconds, executions) over one step, slowest first: the thunks'
  trace events (a kind is a name without its number; loops count through their bodies)."""
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True):
      step(tokens)
    (path,) = Path(d).rglob("perfetto_trace.json.gz")
    events = json.loads(gzip.decompress(path.read_bytes()))
  seconds, calls = collections.Counter(), collections.Counter()
  for e in events["traceEvents"] if isinstance(events, dict) else events:
    name = e.get("name", "")
    if e.get("ph") != "X" or not re.fullmatch(r"[\w\-]+(\.\d+)?", name):
      continue  # host-side events (Python frames, the executor's own spans)
    kind = re.sub(r"\.\d+$", "", name)
    if kind not in ("while", "conditional", "call"):
      seconds[kind] += e["dur"] / 1e6
      calls[kind] += 1
  return [(kind, t, calls[kind]) for kind, t in seconds.most_common()]


def transformers_worker(conn, malloc: str, profile: bool, hf_dir: str, experts_impl: str):
  """Process body: transformers' Thinker from `hf_dir`; serves steps (`_serve`)."""
  hostmem.set_policy(malloc)
  step, used = transformers_stepper(hf_dir, experts_impl)
  _serve(conn, lambda: step, used, torch_op_profile)


def torch_op_profile(step, tokens) -> list[tuple[str, float, int]]:
  """(aten op, self seconds, calls) over one step, slowest first."""
  import torch

  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    step(tokens)
  ops = sorted(prof.key_averages(), key=lambda a: -a.self_cpu_time_total)
  return [(a.key, a.self_cpu_time_total / 1e6, a.count) for a in ops]


def _serve(conn, make_step, info: str, profile):
  """Sends `info` (ready), then answers each message until None: "reset" (the next step starts
  again from `make_step()`), tokens (train one step: (seconds, loss, kernel figures)) or
  ("profile", tokens) (train one step under `profile`: its op list)."""
  conn.send(info)
  step = None
  while (msg := conn.recv()) is not None:
    if isinstance(msg, str):  # "reset"
      step = None
      continue
    step = step or make_step()
    if isinstance(msg, tuple):
      conn.send(profile(step, msg[1]))
      continue
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    loss = step(msg)
    seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    kernel = dict(
      page_faults=after.ru_minflt - before.ru_minflt,
      sys_s=after.ru_stime - before.ru_stime,
      max_rss_gb=after.ru_maxrss / 2**20,
    )
    conn.send((seconds, loss, kernel))


class Worker:
  """A stepper in a process of its own: `Worker(body, *args)(tokens) -> loss`; `info` is what
  the body reported when ready, `seconds` the step times as measured inside the process and
  `kernel` its page faults, kernel time and peak resident set per step."""

  def __init__(self, body, *args):
    ctx = multiprocessing.get_context("spawn")
    self.conn, child = ctx.Pipe()
    self.process = ctx.Process(target=body, args=(child, *args), name=body.__name__, daemon=True)
    self.process.start()
    self.seconds, self.kernel = [], []
    self.info = self._recv()

  def _recv(self):
    try:
      if self.conn.poll(3600):
        return self.conn.recv()
    except EOFError:
      self.process.join()
      raise RuntimeError(
        f"benchmark worker {self.process.name} died with exit code "
        f"{self.process.exitcode} (-9: killed, e.g. out of memory)"
      ) from None
    raise RuntimeError(f"benchmark worker {self.process.name} did not answer in an hour")

  def reset(self):
    self.conn.send("reset")

  def profile(self, tokens):
    self.conn.send(("profile", tokens))
    return self._recv()

  def __call__(self, tokens):
    self.conn.send(tokens)
    seconds, loss, kernel = self._recv()
    self.seconds.append(seconds)
    self.kernel.append(kernel)
    return loss

  def close(self):
    self.conn.send(None)
    self.process.join()


def transformers_stepper(hf_dir: str, experts_impl: str):
  """(step: tokens -> loss, the experts implementation in use) for transformers' Thinker
  loaded from `hf_dir`."""
  import torch
  from transformers import Qwen3OmniMoeForConditionalGeneration

  model = Qwen3OmniMoeForConditionalGeneration.from_pretrained(
    hf_dir, dtype=torch.float32, experts_implementation=experts_impl
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

  def step(tokens):
    t = torch.from_numpy(tokens.astype(np.int64))
    # labels are the inputs: transformers shifts them inside its loss.
    out = model(input_ids=t[:, :-1], labels=t[:, :-1], output_router_logits=True)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM.grad_clip_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return out.loss.item()

  return step, model.config.text_config._experts_implementation


def timed(runners: dict[str, Worker], cfg: ThinkerConfig, args):
  """{name: (median step time, losses, kernel)}, kernel: the timed steps' median page faults and
  kernel seconds and the process's peak resident set; the runners take turns step by step, in a
  rotating order, so that other load on the host slows them alike."""
  names = list(runners)
  losses = {name: [] for name in names}
  for i, tokens in enumerate(batches(cfg, args.batch, args.seq, args.warmup + args.steps)):
    for name in names[i % len(names) :] + names[: i % len(names)]:
      losses[name].append(runners[name](tokens))
  out = {}
  for name in names:
    kernel = runners[name].kernel[-args.steps :]
    out[name] = (
      float(np.median(runners[name].seconds[-args.steps :])),
      losses[name],
      dict(
        page_faults=int(np.median([k["page_faults"] for k in kernel])),
        sys_s=float(np.median([k["sys_s"] for k in kernel])),
        max_rss_gb=kernel[-1]["max_rss_gb"],
      ),
    )
  return out


def print_profiles(runners: dict[str, Worker], cfg: ThinkerConfig, args, rows: int = 15):
  """Each runner's slowest ops over one more (profiled, untimed) step, side by side."""
  tokens = next(batches(cfg, args.batch, args.seq, 1, seed=1))
  columns = {name: runner.profile(tokens) for name, runner in runners.items()}
  width = 60
  print(
    "  ".join(
      f"{name} (total {sum(t for _, t, _ in ops):.2f}s)".ljust(width)
      for name, ops in columns.items()
    )
  )
  for i in range(rows):
    cells = []
    for ops in columns.values():
      kind, t, n = ops[i] if i < len(ops) else ("", 0.0, 0)
      cells.append(f"{t:7.3f}s {n:6d}x {kind[: width - 18]}".ljust(width) if kind else " " * width)
    print("  ".join(cells))


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--preset", default="small")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=512)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--moe_impl", default="auto")
  p.add_argument("--dtype", default="float32")
  p.add_argument(
    "--host_malloc",
    default="tbbmalloc",
    choices=hostmem.POLICIES,
    help="both sides' host allocator policy (omnijax/hostmem.py)",
  )
  p.add_argument(
    "--cpu_schedule",
    default="concurrency",
    choices=tuple(step_lib.CPU_SCHEDULES),
    help="omnijax's XLA:CPU schedule (train.cpu_schedule; omnijax/train/step.py)",
  )
  p.add_argument(
    "--profile",
    action="store_true",
    help="after each timed phase, profile one more step of each side and print their slowest "
    "ops side by side (XLA:CPU ops and fusions; aten ops by self time); omnijax runs on the "
    "CPU unless JAX_PLATFORMS says otherwise",
  )
  p.add_argument(
    "--cpu_matmul",
    default="auto",
    choices=CPU_MATMULS,
    help="model.impl.cpu_matmul: omnijax's float32 products on the CPU, XLA's or oneMKL's "
    "(omnijax/models/matmul.py); auto: mkl on Intel CPUs where it is installed",
  )
  p.add_argument(
    "--scan_unroll",
    type=int,
    default=0,
    help="model.impl.scan_unroll: layers per scan iteration (0: all, the layer stack unrolled)",
  )
  p.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat: checks that it runs")
  args = p.parse_args()
  if args.smoke:
    vars(args).update(preset="tiny", batch=1, seq=32, steps=1, warmup=1)

  cd = presets.get(args.preset)
  cd.impl.moe_impl = args.moe_impl
  cd.impl.dtype = args.dtype
  cd.impl.scan_unroll = args.scan_unroll or cd.text.num_hidden_layers
  cd.impl.cpu_matmul = args.cpu_matmul
  cfg = ThinkerConfig.from_dict(cd)
  tokens = args.batch * args.seq
  step_flops = flops.training_flops(cfg.text, args.batch, args.seq)
  peak, source = flops.peak_flops_per_device()
  n_dev = jax.device_count()
  print(
    f"preset={args.preset} total_params={flops.total_params(cfg.text) / 1e6:.1f}M "
    f"active_params={flops.active_params(cfg.text) / 1e6:.1f}M batch={args.batch} "
    f"seq={args.seq} tokens/step={tokens} scan_unroll={cfg.impl.scan_unroll} "
    f"host_malloc={args.host_malloc} cpu_schedule={args.cpu_schedule} "
    f"cpu_matmul={cfg.impl.resolved(jax.default_backend()).cpu_matmul} "
    f"devices={n_dev} ({jax.devices()[0].device_kind}) "
    f"peak={peak / 1e12:.3f} TFLOP/s/device ({source})"
  )

  def report(name, step_time, losses, kernel):
    print(
      f"{name}: step_time={step_time:.3f}s tokens_per_sec={tokens / step_time:.1f} "
      f"MFU={step_flops / (step_time * n_dev * peak):.3f} "
      f"page_faults/step={kernel['page_faults']} sys_time/step={kernel['sys_s']:.2f}s "
      f"max_rss={kernel['max_rss_gb']:.1f}GB "
      f"losses={' '.join(f'{x:.4f}' for x in losses)}"
    )
    return tokens / step_time

  os.environ.update(hostmem.preload_env(args.host_malloc))  # the workers start under it
  ours_name = f"omnijax[{args.dtype}, moe={args.moe_impl}]"
  with tempfile.TemporaryDirectory() as hf_dir:
    ours = Worker(
      omnijax_worker,
      args.host_malloc,
      args.profile,
      cfg,
      args.batch,
      args.seq,
      hf_dir,
      args.cpu_schedule,
    )
    if args.dtype != "float32":
      report(ours_name, *timed({ours_name: ours}, cfg, args)[ours_name])
      ours.close()
      return
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    ratio = float("inf")
    # one transformers model in memory at a time
    for impl in ("grouped_mm",) if args.smoke else ("grouped_mm", "eager"):
      theirs = Worker(transformers_worker, args.host_malloc, args.profile, hf_dir, impl)
      name = f"transformers[experts={theirs.info}]"
      ours.reset()
      runs = timed({ours_name: ours, name: theirs}, cfg, args)
      ratio = min(ratio, report(ours_name, *runs[ours_name]) / report(name, *runs[name]))
      if args.profile:
        print_profiles({ours_name: ours, name: theirs}, cfg, args)
      theirs.close()
    ours.close()
  print(f"ratio_vs_transformers={ratio:.3f}")


if __name__ == "__main__":
  main()
