"""Training metrics: averaged over the logging interval, written to TensorBoard event files, a
JSONL log and console lines with progress."""

from __future__ import annotations

import json
import sys
import time

import jax
import jax.numpy as jnp
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from tensorboardX import SummaryWriter

from omnijax import paths
from omnijax.models.thinker import MODALITIES

CONSOLE_KEYS = (
  "loss",
  "aux_loss",
  "grad_norm",
  "learning_rate",
  "tokens_per_sec",
  "mfu",
  "step_time_s",
  "expert_load_max_over_mean",
  "goodput/fraction",
)
# Per-step values that are not averaged: the latest is what they mean.
_LATEST = ("learning_rate", "consecutive_nonfinite")


class Interval:
  """Sums the train step's metrics over a logging interval on the device (no host sync per
  step) and turns them into what they say: losses weighted by tokens, per-step means,
  and per-source / per-modality entries only for those present in the interval."""

  def __init__(
    self, task_names: list[str], aux_loss_coef: float, talker_loss=None, talker_aux_coef=0.0
  ):
    """`talker_loss` (train.step.TalkerLoss) and `talker_aux_coef` for a Thinker + Talker run:
    `loss` is then the weighted sum the step minimises."""
    self.task_names, self.aux_loss_coef = task_names, aux_loss_coef
    self.talker_loss, self.talker_aux_coef = talker_loss, talker_aux_coef
    self.sums, self.latest, self.steps, self.nonfinite_total = None, None, 0, 0

  def add(self, metrics: dict) -> None:
    summed = {k: v for k, v in metrics.items() if k not in _LATEST}
    self.sums = summed if self.sums is None else jax.tree.map(jnp.add, self.sums, summed)
    self.latest = {k: metrics[k] for k in _LATEST}
    self.steps += 1

  def summary(self) -> dict[str, float]:
    """The interval's scalars; starts the next interval."""
    m, latest = jax.device_get((self.sums, self.latest))
    n = self.steps
    self.nonfinite_total += int(m["nonfinite"])
    ce = float(m["ce_sum"]) / max(float(m["loss_tokens"]), 1.0)
    aux = float(m["aux_loss"]) / n
    out = dict(
      loss=ce + self.aux_loss_coef * aux,
      ce_loss=ce,
      aux_loss=aux,
      loss_tokens=float(m["loss_tokens"]) / n,
      nonfinite_steps=float(self.nonfinite_total),
      consecutive_nonfinite=float(latest["consecutive_nonfinite"]),
      learning_rate=float(latest["learning_rate"]),
    )
    if self.talker_loss is not None:
      w = self.talker_loss
      talker = float(m["talker_ce_sum"]) / max(float(m["talker_tokens"]), 1.0)
      mtp = float(m["mtp_ce_sum"]) / max(float(m["mtp_tokens"]), 1.0)
      talker_aux = float(m["talker_aux_loss"]) / n
      out.update(
        loss=w.thinker * out["loss"] + talker + w.mtp * mtp + self.talker_aux_coef * talker_aux,
        talker_loss=talker,
        mtp_loss=mtp,
        talker_aux_loss=talker_aux,
        talker_tokens=float(m["talker_tokens"]) / n,
      )
    for k in ("grad_norm", "param_norm", "moe_dropped", "expert_load_max_over_mean"):
      out[k] = float(m[k]) / n
    out.update(
      {f"tokens/{mod}": float(t) / n for mod, t in zip(MODALITIES, m["modality_tokens"]) if t > 0}
    )
    if self.task_names:
      for name, ce_sum, labelled, tokens in zip(
        self.task_names, m["task_ce_sum"], m["task_loss_tokens"], m["task_tokens"]
      ):
        if labelled > 0:
          out[f"loss/{name}"] = float(ce_sum / labelled)
        if tokens > 0:
          out[f"tokens/task/{name}"] = float(tokens) / n
    self.sums, self.latest, self.steps = None, None, 0
    return out


def device_memory() -> dict[str, float]:
  """Bytes in use and their peak on this process's most loaded device, where the backend reports
  them (`Device.memory_stats()`; not on CPU)."""
  stats = [s for d in jax.local_devices() if (s := d.memory_stats())]
  keys = ("bytes_in_use", "peak_bytes_in_use")
  return {f"memory/{k}": float(max(s[k] for s in stats)) for k in keys if stats and k in stats[0]}


class MetricWriter:
  """Writes scalars from process 0 only; every process may call it."""

  def __init__(
    self,
    workdir: paths.PathLike,
    total_steps: int,
    first_step: int = 0,
    console_keys: tuple[str, ...] = CONSOLE_KEYS,
  ):
    self.enabled = jax.process_index() == 0
    self.console_keys = console_keys
    self.console = Console(stderr=True)
    if not self.enabled:
      return
    workdir = paths.path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    self.jsonl = _GrowingFile(workdir / "metrics.jsonl")
    # tensorboardX's own bucket writer is broken: in a bucket, the event files are written
    # locally and copied up at each flush.
    self.tb_dir = workdir / "tensorboard"
    self.tb_stage = paths.staged(self.tb_dir)
    self.tb = SummaryWriter(str(self.tb_stage))
    self.progress = Progress(
      TextColumn("[bold]train"),
      BarColumn(),
      MofNCompleteColumn(),
      TimeRemainingColumn(),
      TextColumn("{task.fields[info]}"),
      console=self.console,
      disable=not sys.stderr.isatty(),
    )
    self.task = self.progress.add_task("train", total=total_steps, completed=first_step, info="")
    self.progress.start()

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    for k, v in scalars.items():
      self.tb.add_scalar(k, v, step)
    self._flush_tb()
    self.jsonl.write(json.dumps({"step": step, "time": time.time(), **scalars}) + "\n")
    keys = [k for k in self.console_keys if k in scalars]
    if not keys:  # an evaluation: its figures, not their token and example counts
      keys = [k for k in scalars if not {"tokens", "examples"} & set(k.split("/"))]
    shown = " ".join(f"{k}={_fmt(scalars[k])}" for k in keys)
    self.progress.update(self.task, completed=step, info=f"loss={_fmt(scalars.get('loss', 0))}")
    self.progress.console.print(f"step {step}: {shown}", soft_wrap=True)

  def text(self, tag: str, value: str) -> None:
    if self.enabled:
      self.tb.add_text(tag, value)
      self._flush_tb()
      self.progress.console.print(value, soft_wrap=True)

  def _flush_tb(self) -> None:
    self.tb.flush()
    paths.sync(self.tb_stage, self.tb_dir)

  def close(self) -> None:
    if self.enabled:
      self.progress.stop()
      self.tb.close()
      self.jsonl.close()
      paths.upload(self.tb_stage, self.tb_dir)


class _GrowingFile:
  """A text file written line by line: appended on a local disk; in a bucket, whose objects
  cannot be appended to, the whole text is rewritten at each line (a metrics log is small)."""

  def __init__(self, path):
    self.path = path
    if paths.is_url(path):
      self.text, self.file = path.read_text() if path.exists() else "", None
    else:
      self.file = open(path, "a", encoding="utf-8")

  def write(self, line: str) -> None:
    if self.file is None:
      self.text += line
      self.path.write_text(self.text)
    else:
      self.file.write(line)
      self.file.flush()

  def close(self) -> None:
    if self.file is not None:
      self.file.close()


def _fmt(v: float) -> str:
  return f"{v:.4g}"
