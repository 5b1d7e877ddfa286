"""Two processes x 4 CPU devices (the launcher on a localhost jax.distributed job) train the tiny
omni run as one process x 8 devices does: the same losses, each process on its own slice of
every source; SIGTERM to one process stops both at the same step with a checkpoint, and one
process resumes from it."""

import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from etils import epath

from data_pipelines import inputs as inputs_lib
from omnijax.models import presets
from omnijax.models.config import ThinkerConfig
from omnijax.processing import media as media_lib
from omnijax.train import checkpoint as ckpt_lib
from omnijax.train import trainer
from tests.helpers import (
  logged_steps,
  read_metrics,
  tiny_omni_config,
  write_spoken_records,
  write_text_corpus,
)

REPO = Path(__file__).resolve().parent.parent
PROCESSES = 2
STEPS = 4
# Blank text records (skipped as "empty") only where process 1 reads: records [1::2] of the
# one-shard text source. Each process counts its skips in its own data-iterator state.
TEXT_DOCS = 120
BLANK = range(1, TEXT_DOCS, 4)
TIMEOUT_S = 900
# The two runs reduce the same numbers over the same 8 devices; only the cross-process
# collectives (gloo) may add them in another order.
RTOL = 1e-5


class HostStreams:
  """The global batches of a 2-process run, read in one process: the streams processes 0 and 1
  read (`make_train_iterator(process=(i, 2))`), concatenated in process order (the order of
  their devices in the mesh, so of their rows in the global batch)."""

  def __init__(self, config):
    model_cfg = ThinkerConfig.from_dict(config.model)
    self.hosts = [
      inputs_lib.make_train_iterator(config, model_cfg, process=(i, PROCESSES))
      for i in range(PROCESSES)
    ]

  def __iter__(self):
    return self

  def __next__(self):
    batches = [next(h.iterator) for h in self.hosts]
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

  @property
  def skipped_records(self) -> dict[str, int]:
    counts = [h.iterator.skipped_records for h in self.hosts]
    return {k: sum(c[k] for c in counts) for k in counts[0]}

  def inputs(self, *args) -> inputs_lib.Inputs:
    """What make_train_iterator returns in place of one process's stream."""
    return dataclasses.replace(self.hosts[0], iterator=self, checkpointable=False)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(exp: Path, workdir: Path, logs: Path) -> list[subprocess.Popen]:
  env = dict(
    os.environ,
    XLA_FLAGS="--xla_force_host_platform_device_count=4",
    JAX_PLATFORMS="cpu",
    JAX_COORDINATOR_ADDRESS=f"localhost:{_free_port()}",
    JAX_NUM_PROCESSES=str(PROCESSES),
  )
  cmd = [sys.executable, "-m", "omnijax.launch", f"--exp={exp}", f"--workdir={workdir}"]
  return [
    subprocess.Popen(
      cmd,
      cwd=REPO,
      env=env | dict(JAX_PROCESS_ID=str(i)),
      stdout=subprocess.DEVNULL,
      stderr=(logs / f"process_{i}.err").open("w"),
    )
    for i in range(PROCESSES)
  ]


def _sigterm_after_first_step(workdir: Path, procs, target: subprocess.Popen) -> None:
  """SIGTERM to `target` once process 0 has logged step 1."""
  while all(p.poll() is None for p in procs):
    if 1 in read_metrics(workdir):
      target.send_signal(signal.SIGTERM)
      return
    time.sleep(0.05)


def _wait(procs, logs: Path, deadline: float) -> list[str]:
  """The processes' stderr once all have exited 0; otherwise fails with the tails."""
  try:
    for p in procs:
      p.wait(timeout=max(1.0, deadline - time.monotonic()))
  except subprocess.TimeoutExpired:
    pass
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  errs = [(logs / f"process_{i}.err").read_text() for i in range(PROCESSES)]
  if any(p.returncode for p in procs):
    tails = "\n".join(
      f"--- process {i} (exit {p.returncode}) stderr tail:\n{e[-3000:]}"
      for i, (p, e) in enumerate(zip(procs, errs))
    )
    raise AssertionError(f"a launcher process failed or timed out\n{tails}")
  return errs


def _losses(workdir: Path, steps) -> np.ndarray:
  m = read_metrics(workdir)
  return np.array([m[s]["loss"] for s in steps])


@pytest.mark.slow  # ~3 min: two launcher processes, then two runs in this one
def test_two_processes_train_like_one(tmp_path, monkeypatch, bucket):
  """The module's run, its two processes' workdir in a bucket (gs://, a GCS emulator): both
  write their checkpoint shards and data-iterator states there; the resume reads them back."""
  text = write_text_corpus(tmp_path / "text", TEXT_DOCS, num_shards=1, blank=BLANK)
  images = tmp_path / "images"
  write_spoken_records(images)
  exp = tmp_path / "exp.py"
  exp.write_text(
    "from pathlib import Path\n"
    "from tests.helpers import tiny_omni_config\n\n\n"
    "def get_config(arg=None):\n"
    f"  return tiny_omni_config(Path({str(text)!r}), Path({str(images)!r}), steps={STEPS})\n"
  )
  config = tiny_omni_config(text, images, steps=STEPS)
  two, straight = epath.Path(f"{bucket}/two_processes"), tmp_path / "straight"
  deadline = time.monotonic() + TIMEOUT_S
  procs = _launch(exp, two, tmp_path)
  stopper = threading.Thread(target=_sigterm_after_first_step, args=(two, procs, procs[1]))
  stopper.start()
  try:
    # The one-process run compiles while the two processes do (one CPU core each).
    monkeypatch.setattr(inputs_lib, "make_train_iterator", HostStreams(config).inputs)
    trainer.train(config, straight)
  finally:
    errs = _wait(procs, tmp_path, deadline)
    stopper.join()

  # SIGTERM reached process 1 only; both stopped after the same step and saved it.
  stopped = [re.findall(r"preempted \(SIGTERM\) after step (\d+)", e) for e in errs]
  assert stopped[0] and stopped[0] == stopped[1], stopped
  k = int(stopped[0][0])
  assert k < STEPS and ckpt_lib.checkpoint_steps(two)[-1] == k and max(read_metrics(two)) == k

  a, b = _losses(straight, range(1, STEPS + 1)), _losses(two, range(1, k + 1))
  print(f"\n1 process x 8 devices: {a}\n2 processes x 4: {b} (stopped after step {k})")
  np.testing.assert_allclose(b, a[:k], rtol=RTOL)

  # Each process read its own slice: only process 1's records hold the blank ones, and only
  # its iterator (its state, saved by that process) met them; together they skipped what the
  # one-process run did.
  data = two / "checkpoints" / str(k) / "data"
  states = [json.loads((data / f"process_{i}-of-{PROCESSES}.json").read_text()) for i in (0, 1)]
  skipped = [s["skipped_records"]["empty"] for s in states]
  print(f"blank records skipped by process 0, 1: {skipped}")
  assert skipped[0] == 0 and skipped[1] > 0
  assert (
    read_metrics(two)[k]["data/skipped/empty"] == read_metrics(straight)[k]["data/skipped/empty"]
  )

  # One process (8 devices) resumes the two processes' checkpoint; the data continues where
  # each process's stream stopped.
  monkeypatch.undo()
  resumed = HostStreams(config)
  for host, state in zip(resumed.hosts, states):
    host.iterator.set_state(state)
  monkeypatch.setattr(inputs_lib, "make_train_iterator", resumed.inputs)
  trainer.train(config, two)
  assert logged_steps(two) == list(range(1, STEPS + 1))  # went on from step k
  c = _losses(two, range(k + 1, STEPS + 1))
  print(f"resumed in 1 process: {c}")
  np.testing.assert_allclose(c, a[k:], rtol=RTOL)


def test_grown_media_buffers_equal_larger_buckets():
  """Processes that bucketed their media differently grow them to the largest (`trainer.
  same_media_shapes`): the same buffers the larger buckets give."""
  cfg = ThinkerConfig.from_dict(presets.get("tiny"))
  rng = np.random.default_rng(0)
  mels = [[rng.standard_normal((cfg.audio.num_mel_bins, n)).astype(np.float32)] for n in (90, 40)]
  grids = [np.array([[1, 4, 6]]), np.array([[1, 2, 2]])]
  images = [(rng.standard_normal((g.prod(), media_lib.patch_dim(cfg))), g) for g in grids]

  def buffers(frames, patches):
    out = media_lib.audio_buffers(cfg, mels, frames=frames, audios=2)
    return out | media_lib.vision_buffers(cfg, "image", images, bucket=patches)

  small, large = buffers(100, 32), buffers(200, 64)
  grown = media_lib.grow_buffers(small, {k: v.shape for k, v in large.items()})
  for k in large:
    np.testing.assert_array_equal(grown[k], large[k], err_msg=k)
