"""Per-example Grain datasets: records in, op-processed example dicts out.

``make_example_dataset(source, ops)`` builds, per host::

  MapDataset.source(source)             raw msgpack records (records.open_shards)
                                        or example dicts (e.g. TfdsSource)
    [process_index::process_count]      disjoint examples per host
    .seed(seed).shuffle()               if shuffle
    .repeat(num_epochs)                 None = forever
    .map(decode record + ops)           e.g. decode_audio, log_mel
    .to_iter_dataset()
    .mp_prefetch(...)                   if worker_count > 0
    drop and count skipped examples     in the main process

and yields one example dict at a time, unbatched and unpacked (mixing sources
and packing media into model batches happen downstream). An example that an
op rejects with ``BadRecord`` travels as a marker ``{SKIPPED_KEY: reason}`` to
the main process, which drops it and counts it: ``iterator.skipped_records``
is reason -> count over what was consumed so far, part of the iterator's
(JSON-serialisable) state, so it survives checkpoint/restore, with or without
worker processes.
"""

import logging
from collections.abc import Sequence
from typing import Any

from absl import flags
import grain

from data_pipelines import records
from data_pipelines.ops import SKIP_REASONS, BadRecord, Example, Op

SKIPPED_KEY = "__skipped__"


class ApplyOps:
  """Decodes a raw record (bytes) if needed and applies the ops."""

  def __init__(self, ops: Sequence[Op]):
    self._ops = list(ops)

  def __call__(self, record: bytes | Example) -> Example:
    try:
      example = records.decode_example(record) if isinstance(record, bytes) else dict(record)
      for op in self._ops:
        example = op(example)
    except BadRecord as e:
      logging.debug("Skipping bad example: %s", e)
      return {SKIPPED_KEY: e.reason}
    return example


def make_example_dataset(
  source: grain.sources.RandomAccessDataSource,
  ops: Sequence[Op],
  *,
  seed: int = 0,
  shuffle: bool = True,
  num_epochs: int | None = 1,
  process_index: int = 0,
  process_count: int = 1,
  worker_count: int = 0,
  worker_buffer_size: int = 4,
  read_threads: int = 2,
  read_buffer_size: int = 16,
) -> grain.IterDataset:
  """Processed examples of ``source`` for this host; see the module doc.

  Args:
    source: random-access source of msgpack records or example dicts.
    ops: built ops (``ops.build_ops``), applied in order.
    seed: shuffle seed (same on all hosts).
    shuffle: reshuffle every epoch.
    num_epochs: passes over the data; None repeats forever.
    process_index: this host's index; hosts read disjoint examples.
    process_count: number of hosts.
    worker_count: grain worker processes running the ops (0: in-process).
    worker_buffer_size: examples buffered per worker process.
    read_threads: threads running the ops (per process).
    read_buffer_size: examples those threads prefetch.
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f"Bad {process_index=} for {process_count=}")
  ds = grain.MapDataset.source(source)[process_index::process_count]
  if shuffle:
    ds = ds.seed(seed).shuffle()
  ds = ds.repeat(num_epochs).map(ApplyOps(ops))
  it = ds.to_iter_dataset(
    grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=read_buffer_size)
  )
  if worker_count > 0:
    if not flags.FLAGS.is_parsed():  # Outside an absl app (e.g. pytest).
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(
      grain.MultiprocessingOptions(
        num_workers=worker_count, per_worker_buffer_size=worker_buffer_size
      )
    )
  return _DropSkippedIterDataset(it)


class _DropSkippedIterDataset(grain.IterDataset):
  def __iter__(self):
    return _DropSkippedIterator(self._parent.__iter__())


class _DropSkippedIterator(grain.DatasetIterator):
  """Drops skip markers, counting them by reason (see the module doc)."""

  def __init__(self, parent: grain.DatasetIterator):
    super().__init__(parent)
    self._counts = dict.fromkeys(SKIP_REASONS, 0)

  @property
  def skipped_records(self) -> dict[str, int]:
    return dict(self._counts)

  def __next__(self) -> Example:
    while True:
      example = next(self._parent)
      if SKIPPED_KEY not in example:
        return example
      self._counts[example[SKIPPED_KEY]] += 1

  def get_state(self) -> dict[str, Any]:
    return {"parent": self._parent.get_state(), "skipped_records": dict(self._counts)}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._counts = {r: int(state["skipped_records"].get(r, 0)) for r in SKIP_REASONS}
