"""README's first command: the local default trains on CPU on the local corpus, loss falls,
checkpoints and TensorBoard events are written."""

import os
import subprocess
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.helpers import read_metrics

REPO = Path(__file__).resolve().parent.parent


def _launch(workdir: Path, cache: Path, *overrides: str) -> None:
  env = dict(os.environ, OMNIJAX_CACHE=str(cache), XLA_FLAGS="", JAX_PLATFORMS="cpu")
  cmd = [
    sys.executable,
    "-m",
    "omnijax.launch",
    "--exp=pretrain_general:local",
    f"--workdir={workdir}",
    *overrides,
  ]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
  assert proc.returncode == 0, proc.stderr[-4000:]


def _check_run(workdir: Path, last_step: int, log_every: int) -> None:
  metrics = read_metrics(workdir)
  first, last = metrics[log_every], metrics[last_step]
  print(
    f"\nloss {first['loss']:.3f} (step {log_every}) -> {last['loss']:.3f} (step {last_step}); "
    f"{last['tokens_per_sec']:.0f} tokens/s, MFU {last['mfu']:.3f}"
  )
  assert last["loss"] < first["loss"] - 0.5
  assert {
    "tokens_per_sec",
    "mfu",
    "step_time_s",
    "grad_norm",
    "aux_loss",
    "learning_rate",
    "expert_load_max_over_mean",
  } <= set(last)
  for modality in ("image", "audio", "video"):  # every modality trained, per-source losses logged
    assert sum(m.get(f"tokens/{modality}", 0) for m in metrics.values()) > 0, modality
  # Per-source losses are logged for the intervals a source appears in (absent: omitted).
  for source in ("text", "image", "audio", "video_audio"):
    assert any(f"loss/{source}" in m for m in metrics.values()), source
  assert "eval/heldout/loss/text" in last and "eval/heldout/perplexity/text" in last
  assert (workdir / "checkpoints" / str(last_step) / "state").is_dir()
  events = EventAccumulator(str(workdir / "tensorboard"))
  events.Reload()
  losses = events.Scalars("loss")
  assert [e.step for e in losses][-1] == last_step
  assert abs(losses[-1].value - last["loss"]) < 1e-4


def test_local_default_short(tmp_path):
  """README's first command on a fresh cache, 50 of its 300 steps (the whole run takes ~12 min
  here; it is the same program and data, only longer)."""
  _launch(
    tmp_path / "run",
    tmp_path / "cache",
    "--config.train.total_steps=50",
    "--config.train.log_every=10",
    "--config.optim.warmup_steps=10",
  )
  _check_run(tmp_path / "run", 50, 10)
