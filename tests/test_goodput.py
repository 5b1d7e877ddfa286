"""Goodput: a run's wall time split into productive steps, compile, data wait, checkpoint saves,
evaluation, restore and the rest, per logging interval and for the run."""

import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import pytest

from data_pipelines import inputs as inputs_lib
from omnijax.models.config import ThinkerConfig
from omnijax.train import checkpoint as ckpt_lib
from omnijax.train import goodput as goodput_lib
from omnijax.train import trainer
from tests.helpers import tiny_config, write_text_corpus

PARTS = ("productive", *goodput_lib.PARTS)


def _busy_step():
  """A jitted computation that keeps the device busy for a while; (fn, its input, seconds)."""
  fn = jax.jit(lambda x: jax.lax.fori_loop(0, 20, lambda i, y: jnp.tanh(y @ x), x))
  x = jnp.full((1024, 1024), 1 / 1024)
  fn(x).block_until_ready()
  start = time.perf_counter()
  fn(x).block_until_ready()
  return fn, x, time.perf_counter() - start


def test_regions_count_only_the_time_the_device_idled():
  """A region that ends while a dispatched step still runs counts nothing; one that waits for
  the step counts its time after the step ended; one after it counts whole; a compile inside
  a region counts as compile."""
  fn, x, busy = _busy_step()
  g = goodput_lib.Goodput()
  g.setup_done()
  start = time.perf_counter()
  out = fn(x)
  g.dispatched(out)
  with g.measure("other"):
    time.sleep(0.1 * busy)
  with g.measure("checkpoint"):
    jax.block_until_ready(out)  # as a save waits for the state it saves
    ran = time.perf_counter() - start
    time.sleep(0.3)
  with g.measure("data_wait"):
    time.sleep(0.2)
  with g.measure("eval"):
    jax.jit(lambda y: jnp.sin(y) * 3)(x).block_until_ready()
  parts = g.summary()
  g.close()
  print(f"\nthe step ran {ran:.3f}s ({busy:.3f}s alone): {parts}")
  assert parts["goodput/other_s"] == 0
  assert parts["goodput/checkpoint_s"] == pytest.approx(0.3, abs=0.1)
  assert parts["goodput/productive_s"] == pytest.approx(ran, abs=0.1)
  assert parts["goodput/data_wait_s"] == pytest.approx(0.2, abs=0.1)
  assert parts["goodput/compile_s"] > 0 and parts["goodput/eval_s"] >= 0
  assert sum(parts[f"goodput/{p}_s"] for p in PARTS) == pytest.approx(parts["goodput/wall_s"])


def test_a_compile_counts_once_and_within_its_region():
  """JAX reports compile stages (wall-clock durations) as they end: a stage within another counts
  once, and a duration longer than the time since the region began (the wall clock jumped)
  counts only that time, so the parts never exceed the wall time."""
  trace, backend = goodput_lib._COMPILE_EVENTS[0], goodput_lib._COMPILE_EVENTS[2]
  g = goodput_lib.Goodput()
  g.setup_done()
  with g.measure("eval"):
    time.sleep(0.2)
    goodput_lib._on_event(backend, 0.05)
    goodput_lib._on_event(trace, 0.08)  # it contains the one above
  with g.measure("eval"):
    time.sleep(0.1)
    goodput_lib._on_event(backend, 100.0)
  parts = g.summary()
  g.close()
  print(f"\n{parts}")
  assert parts["goodput/compile_s"] == pytest.approx(0.08 + 0.1, abs=0.01)
  assert parts["goodput/eval_s"] == pytest.approx(0.12, abs=0.01)
  assert 0 <= parts["goodput/productive_s"] < 0.01


DATA_S = CKPT_S = 0.2  # injected: each batch's fetch, each checkpoint save call
# test_train's 8-step tiny run: the same train step, compiled once for both (conftest's cache)
STEPS, LOG_EVERY = 8, 4


class SlowIterator:
  def __init__(self, iterator):
    self.iterator = iterator

  def __iter__(self):
    return self

  def __next__(self):
    time.sleep(DATA_S)
    return next(self.iterator)


def test_a_runs_parts_sum_to_its_wall_time_and_land_where_the_time_went(tmp_path, monkeypatch):
  """A short run whose data fetch and checkpoint save calls sleep: per interval and for the run,
  every part is there, non-negative, and the parts sum to the wall time; the sleeps appear as
  data wait and checkpoint time; step_time_s, tokens_per_sec and mfu are the interval's time
  per step (its device time and data wait) and what follows from it."""
  make = inputs_lib.make_train_iterator
  monkeypatch.setattr(
    inputs_lib,
    "make_train_iterator",
    lambda *a, **k: dataclasses.replace(
      (d := make(*a, **k)), iterator=SlowIterator(d.iterator), checkpointable=False
    ),
  )
  save = ckpt_lib.Checkpointer.save

  def slow_save(self, *a, **k):
    time.sleep(CKPT_S)
    return save(self, *a, **k)

  monkeypatch.setattr(ckpt_lib.Checkpointer, "save", slow_save)
  c = tiny_config(write_text_corpus(tmp_path / "corpus"), steps=STEPS)
  c.train.log_every = LOG_EVERY
  c.train.peak_flops_per_device = 1e12
  workdir = tmp_path / "run"
  last = trainer.train(c, workdir)
  rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  intervals = [r for r in rows if "goodput/wall_s" in r]
  run = rows[-1]
  for r in intervals:
    print({k: round(v, 3) for k, v in r.items() if k.startswith(("goodput", "step_", "tok"))})
  print({k: round(v, 3) for k, v in run.items()})
  assert [r["step"] for r in intervals] == [4, 8] and run["step"] == STEPS

  for r, prefix in [*((r, "") for r in intervals), (run, "run_")]:
    parts = [r[f"goodput/{prefix}{p}_s"] for p in PARTS]
    assert min(parts) >= 0, r
    assert sum(parts) == pytest.approx(r[f"goodput/{prefix}wall_s"], rel=0.05)
    assert r[f"goodput/{prefix}fraction"] == pytest.approx(parts[0] / sum(parts), rel=0.05)
  first, second = intervals
  assert first["goodput/restore_s"] >= DATA_S  # the first batch is setup's
  assert first["goodput/compile_s"] > 0 and second["goodput/compile_s"] == 0
  # steps 2-4 and 5-8 fetch their batches in the first and second interval
  for r, fetches in ((first, 3), (second, 4)):
    # (the upper bounds leave a loaded 2-core CI machine a second of slack)
    assert fetches * DATA_S <= r["goodput/data_wait_s"] < fetches * DATA_S + 1.0
  # the saves after steps 4-7 fall in the second interval; the device's work on a step
  # overlaps its save's sleep
  assert 4 * CKPT_S - second["goodput/productive_s"] <= second["goodput/checkpoint_s"]
  assert second["goodput/checkpoint_s"] < 4 * CKPT_S + 1.0
  assert run["goodput/run_data_wait_s"] >= (STEPS - 1) * DATA_S
  assert run["goodput/run_restore_s"] >= first["goodput/restore_s"]
  assert last["goodput/run_fraction"] == run["goodput/run_fraction"]

  flops = trainer.training_flops(c, ThinkerConfig.from_dict(c.model), None)
  for r, timed in ((first, 3), (second, 4)):  # the first step is compile time
    step_time = (r["goodput/productive_s"] + r["goodput/data_wait_s"]) / timed
    assert r["step_time_s"] == pytest.approx(step_time) and step_time >= DATA_S
    assert r["tokens_per_sec"] == pytest.approx(8 * 64 / step_time)
    assert r["mfu"] == pytest.approx(flops / (step_time * jax.device_count() * 1e12))
