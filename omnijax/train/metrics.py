"""Training metrics: TensorBoard event files, a JSONL log, and console lines with progress."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jax
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from tensorboardX import SummaryWriter

CONSOLE_KEYS = ("loss", "aux_loss", "grad_norm", "learning_rate", "tokens_per_sec", "mfu",
                "step_time_s", "expert_load_max_over_mean")


class MetricWriter:
  """Writes scalars from process 0 only; every process may call it."""

  def __init__(self, workdir: str | Path, total_steps: int, first_step: int = 0):
    self.enabled = jax.process_index() == 0
    self.console = Console(stderr=True)
    if not self.enabled:
      return
    workdir = Path(workdir)
    self.tb = SummaryWriter(str(workdir / "tensorboard"))
    self.jsonl = open(workdir / "metrics.jsonl", "a")
    self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                             TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                             console=self.console, disable=not sys.stderr.isatty())
    self.task = self.progress.add_task("train", total=total_steps, completed=first_step, info="")
    self.progress.start()

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    for k, v in scalars.items():
      self.tb.add_scalar(k, v, step)
    self.tb.flush()
    self.jsonl.write(json.dumps({"step": step, "time": time.time(), **scalars}) + "\n")
    self.jsonl.flush()
    shown = " ".join(f"{k}={_fmt(scalars[k])}" for k in CONSOLE_KEYS if k in scalars)
    self.progress.update(self.task, completed=step, info=f"loss={_fmt(scalars.get('loss', 0))}")
    self.progress.console.print(f"step {step}: {shown}", soft_wrap=True)

  def text(self, tag: str, value: str) -> None:
    if self.enabled:
      self.tb.add_text(tag, value)
      self.progress.console.print(value, soft_wrap=True)

  def close(self) -> None:
    if self.enabled:
      self.progress.stop()
      self.tb.close()
      self.jsonl.close()


def _fmt(v: float) -> str:
  return f"{v:.4g}"
