"""SIGTERM with several processes (localhost jax.distributed jobs on CPU): JAX's preemption sync
point stops all of them after the same step, and checking it costs no host sync per step."""

import json
import os
import re
import subprocess
import sys
import time
from collections import Counter

import pytest

from omnijax.train import checkpoint as ckpt_lib
from tests.helpers import read_metrics, write_text_corpus
from tests.test_multiprocess import PROCESSES, REPO, _free_port, _launch, _wait

STEPS, LOG_EVERY, SIGTERM_AT = 40, 4, 4
TIMEOUT_S = 600

# The cross-process calls a process can make from Python: multihost_utils' collectives and the
# coordination-service client's methods. `install(log)` wraps them to call log(name) first.
SPIES = """
import jax
from jax._src import distributed
from jax.experimental import multihost_utils

COLLECTIVES = ("process_allgather", "sync_global_devices", "broadcast_one_to_all", "assert_equal")


class Client:
  def __init__(self, client, log):
    self.client, self.log = client, log

  def __getattr__(self, name):
    attr = getattr(self.client, name)
    if not callable(attr):
      return attr

    def call(*args, **kwargs):
      self.log("client." + name)
      return attr(*args, **kwargs)

    return call


def install(log):
  for name in COLLECTIVES:
    real = getattr(multihost_utils, name)

    def call(*args, real=real, name=name, **kwargs):
      log(name)
      return real(*args, **kwargs)

    setattr(multihost_utils, name, call)
  jax.devices()  # the backend holds the real client
  distributed.global_state.client = Client(distributed.global_state.client, log)
"""

# Each process: `trainer.Preemption` checked after every step, as the loop does; process 1
# sends itself SIGTERM after step 10. Prints the step it stopped after and the calls counted.
PREEMPTION = """
import collections, json, os, signal, time

import jax

jax.distributed.initialize(
  num_processes=int(os.environ["JAX_NUM_PROCESSES"]), process_id=int(os.environ["JAX_PROCESS_ID"])
)
from omnijax.train import trainer

exec({spies!r})
calls = collections.Counter()
install(lambda name: calls.update([name]))
process = jax.process_index()
preemption = trainer.Preemption(start=3)
for step in range(4, 1000):
  time.sleep(0.02)
  if process == 1 and step == 10:
    signal.raise_signal(signal.SIGTERM)
  if preemption.requested(step):
    break
preemption.close()
print(json.dumps(dict(step=step, calls=calls)))
"""


def test_sigterm_to_one_process_stops_all_after_one_step_without_a_host_sync_per_step():
  """Cheap: no training, the processes only run the loop's preemption check."""
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    JAX_COORDINATOR_ADDRESS=f"localhost:{_free_port()}",
    JAX_NUM_PROCESSES=str(PROCESSES),
  )
  code = PREEMPTION.format(spies=SPIES)
  procs = [
    subprocess.Popen(
      [sys.executable, "-c", code],
      cwd=REPO,
      env=env | dict(JAX_PROCESS_ID=str(i)),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(PROCESSES)
  ]
  outs = [p.communicate(timeout=120) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  results = [json.loads(out.splitlines()[-1]) for out, _ in outs]
  print(f"\n{results}")
  assert all(not r["calls"] for r in results)
  steps = {r["step"] for r in results}
  assert len(steps) == 1 and 10 <= steps.pop() < 999  # both stopped after the same step


# Each launcher process: the spies, and the loop's steps, log lines and saves, in order, in
# events_<process>.jsonl; process 1 sends itself SIGTERM after logging step SIGTERM_AT.
EXP = """
import json, os, signal
from pathlib import Path

from omnijax.train import checkpoint as ckpt_lib
from omnijax.train import trainer
from tests.helpers import tiny_config

exec({spies!r})
PROCESS = int(os.environ["JAX_PROCESS_ID"])
EVENTS = Path({events!r}) / f"events_{{PROCESS}}.jsonl"


def log(*event):
  with EVENTS.open("a") as f:
    f.write(json.dumps(event) + "\\n")


def after(owner, name, kind):
  real = getattr(owner, name)

  def call(self, *args, **kwargs):
    out = real(self, *args, **kwargs)
    log(kind, out if kind == "save" else args[0] if kind == "log" else None)
    return out

  setattr(owner, name, call)


after(trainer.Interval, "add", "step")
after(ckpt_lib.Checkpointer, "save", "save")
after(trainer.MetricWriter, "write", "log")
write = trainer.MetricWriter.write


def write_and_signal(self, step, scalars):
  write(self, step, scalars)
  if PROCESS == 1 and step == {sigterm_at}:
    signal.raise_signal(signal.SIGTERM)


trainer.MetricWriter.write = write_and_signal
train = trainer.train


def spied_train(config, workdir):
  install(lambda name: log("collective", name))
  return train(config, workdir)


trainer.train = spied_train


def get_config(arg=None):
  c = tiny_config(Path({corpus!r}), steps={steps})
  c.model.text.num_hidden_layers = 1
  c.train.log_every = {log_every}
  return c
"""


def _segments(events: list[list]) -> list[list]:
  """The events after each train step up to the next one's (the first: before the first)."""
  out = [[]]
  for e in events:
    if e[0] == "step":
      out.append([])
    else:
      out[-1].append(e)
  return out


@pytest.mark.slow  # ~4.5 min on 2 busy cores: two launcher processes compile the step
def test_no_host_sync_on_ordinary_steps_and_sigterm_stops_both_at_one_step(tmp_path):
  """The train loop: cross-process calls only at the first step, log boundaries and checkpoint
  saves; SIGTERM to one process stops both after the same step, with its checkpoint."""
  corpus = write_text_corpus(tmp_path / "corpus")
  exp = tmp_path / "exp.py"
  exp.write_text(
    EXP.format(
      spies=SPIES,
      events=str(tmp_path),
      corpus=str(corpus),
      steps=STEPS,
      log_every=LOG_EVERY,
      sigterm_at=SIGTERM_AT,
    )
  )
  workdir = tmp_path / "run"
  procs = _launch(exp, workdir, tmp_path)
  errs = _wait(procs, tmp_path, time.monotonic() + TIMEOUT_S)

  stopped = [re.findall(r"preempted \(SIGTERM\) after step (\d+)", e) for e in errs]
  assert stopped[0] and stopped[0] == stopped[1], stopped
  k = int(stopped[0][0])
  assert SIGTERM_AT < k < STEPS
  assert ckpt_lib.checkpoint_steps(workdir)[-1] == k and max(read_metrics(workdir)) == k

  for i in range(PROCESSES):
    events = [json.loads(x) for x in (tmp_path / f"events_{i}.jsonl").read_text().splitlines()]
    segments = _segments(events)
    assert len(segments) == k + 1
    ordinary = [
      s
      for s in segments[1:]
      if not any(e[0] == "log" or e == ["save", True] for e in s)  # no log, no real save
    ]
    calls = Counter(e[1] for s in ordinary for e in s if e[0] == "collective")
    elsewhere = Counter(e[1] for s in segments for e in s if e[0] == "collective")
    print(
      f"\nprocess {i}: stopped after step {k}; {len(ordinary)} ordinary steps, cross-process "
      f"calls on them {dict(calls)}, in all {dict(elsewhere)}"
    )
    assert len(ordinary) >= k - k // LOG_EVERY - 2 and not calls
