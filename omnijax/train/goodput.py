"""Goodput: where a run's wall time goes, per logging interval and for the run.

    productive   the device runs train steps (the rest of the wall time)
    compile      tracing, lowering and compiling (the first step, recompiles, evaluators)
    data_wait    fetching a batch and placing it on the devices
    checkpoint   the blocking part of saving a checkpoint
    eval         the evaluators
    restore      setup until the first step: the data pipeline (its first batch), the model,
                 restoring or initialising the state
    other        logging and the profiler

goodput = productive / wall. The train step is dispatched asynchronously: while the host fetches
the next batch or saves a checkpoint, the device may still run the steps already dispatched.
Only the part of a region during which the device had no dispatched step left counts against
it (a thread notes when each step's outputs are ready); the rest of the region was productive.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time

import jax

PARTS = ("compile", "data_wait", "checkpoint", "eval", "restore", "other")
# JAX's compile stages; one that runs inside another (a compile within a trace) counts once.
_COMPILE_EVENTS = (
  "/jax/core/compile/jaxpr_trace_duration",
  "/jax/core/compile/jaxpr_to_mlir_module_duration",
  "/jax/core/compile/backend_compile_duration",
)


class Goodput:
  """Create it when the run starts; `setup_done()` when the loop starts; `dispatched(out)` after
  each train step; regions in `measure(part)`; `summary()` at each log boundary, after waiting
  for the interval's steps (the time since the previous summary is that interval's wall)."""

  def __init__(self):
    self.run_start = self._interval_start = self._mark = time.perf_counter()
    self._run = dict.fromkeys(PARTS, 0.0)
    self._interval = dict.fromkeys(PARTS, 0.0)
    self._compiled = 0.0  # compile seconds heard so far (regions subtract theirs)
    self._spans: list[tuple[float, float]] = []  # the compiles since the loop's last mark
    self._loop_thread = threading.get_ident()
    self._lock = threading.Lock()
    self._pending, self._idle_since = 0, self.run_start
    self._steps: queue.SimpleQueue = queue.SimpleQueue()
    self._watcher = threading.Thread(target=self._watch, name="goodput", daemon=True)
    global _active
    _active = self

  def dispatched(self, outputs) -> None:
    """The device has a train step to run until `outputs` are ready."""
    if not self._watcher.is_alive():
      self._watcher.start()
    self._marked()
    with self._lock:
      self._pending += 1
    self._steps.put(outputs)

  def _watch(self) -> None:
    while (outputs := self._steps.get()) is not None:
      with contextlib.suppress(Exception):  # the loop meets a failed step when it reads it
        jax.block_until_ready(outputs)
      with self._lock:
        self._pending -= 1
        if not self._pending:
          self._idle_since = time.perf_counter()

  def _marked(self) -> float:
    """Now, a point of the loop outside any compile."""
    self._mark, self._spans = time.perf_counter(), []
    return self._mark

  def _idle(self, start: float, end: float) -> float:
    """Seconds of [start, end] in which the device had no dispatched step left to run."""
    with self._lock:
      return 0.0 if self._pending else max(0.0, end - max(start, self._idle_since))

  def _compiled_for(self, duration: float) -> None:
    """A compile of `duration` seconds (on some thread) has just ended."""
    if threading.get_ident() != self._loop_thread:
      return
    end = time.perf_counter()
    # JAX times it on the wall clock, which may jump (a VM paused, NTP): it started after the
    # loop's last mark (a point outside any compile). A compile within another counts once.
    start, seconds = max(end - duration, self._mark), 0.0
    at = start
    for a, b in sorted(self._spans):
      seconds += self._idle(at, a)
      at = max(at, b)
    seconds += self._idle(at, end)
    within = [a for a, b in self._spans if b >= start]
    self._spans = [(a, b) for a, b in self._spans if b < start] + [(min([start, *within]), end)]
    self._compiled += seconds
    self._add("compile", seconds)

  def _add(self, part: str, seconds: float) -> None:
    self._interval[part] += seconds
    self._run[part] += seconds

  @contextlib.contextmanager
  def measure(self, part: str):
    """Counts the region's time in which the device idled, its compiles apart, to `part`."""
    start, compiled = self._marked(), self._compiled
    try:
      yield
    finally:
      idle = self._idle(start, self._marked())
      self._add(part, max(0.0, idle - (self._compiled - compiled)))

  def setup_done(self) -> None:
    """The time since the run started, its compiles apart, is restore time."""
    self._add("restore", max(0.0, self._marked() - self.run_start - self._compiled))

  def summary(self) -> dict[str, float]:
    """The interval's parts, goodput and the run's goodput so far; starts the next interval."""
    now = self._marked()
    out = _parts(self._interval, now - self._interval_start, "")
    run = _parts(self._run, now - self.run_start, "run_")
    out.update({k: run[k] for k in ("goodput/run_wall_s", "goodput/run_fraction")})
    self._interval, self._interval_start = dict.fromkeys(PARTS, 0.0), now
    return out

  def run_summary(self) -> dict[str, float]:
    """The run's parts and goodput (goodput/run_*) so far."""
    return _parts(self._run, time.perf_counter() - self.run_start, "run_")

  def close(self) -> None:
    global _active
    if _active is self:
      _active = None
    if self._watcher.is_alive():
      self._steps.put(None)
      self._watcher.join()


_active: Goodput | None = None  # the run's recorder: the compile listener's recipient


def _on_event(event: str, duration: float, **kwargs) -> None:
  del kwargs
  if event in _COMPILE_EVENTS and _active is not None:
    _active._compiled_for(duration)  # pylint: disable=protected-access


jax.monitoring.register_event_duration_secs_listener(_on_event)


def _parts(parts: dict[str, float], wall: float, prefix: str) -> dict[str, float]:
  productive = wall - sum(parts.values())
  out = {f"goodput/{prefix}productive_s": productive}
  out.update({f"goodput/{prefix}{k}_s": v for k, v in parts.items()})
  out[f"goodput/{prefix}wall_s"] = wall
  out[f"goodput/{prefix}fraction"] = productive / wall
  return out


def line(run: dict[str, float]) -> str:
  """A run summary as one console line."""
  wall = run["goodput/run_wall_s"]
  parts = ", ".join(
    f"{k} {run[f'goodput/run_{k}_s']:.1f}s ({run[f'goodput/run_{k}_s'] / wall:.0%})"
    for k in ("productive", *PARTS)
  )
  return f"goodput {run['goodput/run_fraction']:.1%} of {wall:.1f}s: {parts}"
