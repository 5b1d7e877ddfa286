"""Grain text pipeline for LM pretraining: ArrayRecord shards -> packed batches.

``make_text_dataset`` builds, per host::

  MapDataset.source(ArrayRecordDataSource)    raw msgpack records
    [process_index::process_count]            disjoint records per host
    .seed(seed).shuffle()                     if cfg.shuffle; new order each epoch
    .repeat(cfg.num_epochs)                   None = forever
    .map(decode record + cfg.ops)             e.g. decode_text, tokenize, lm_shift
    .to_iter_dataset()
    ConcatThenSplitIterDataset                packs inputs/targets, no padding
    .map(row layout)  .batch(B, drop_remainder=True)
    .mp_prefetch(...)                         if cfg.worker_count > 0
    count skipped records                     in the main process

Batches are dicts of numpy arrays, leading dim ``batch_size`` (per host):

  inputs       int32   [B, S]     token ids, 0 on padding
  targets      int32   [B, S]     next token of the same document, 0 on padding
  segment_ids  int32   [B, S]     1..n = n-th document piece in the row, 0 = pad
  positions    float32 [B, 3, S]  TM-RoPE ids; for text the 3 rows are equal
  loss_mask    float32 [B, S]     1.0 where segment_ids > 0

Each document is tokenised with ``<|endoftext|>`` appended and shifted by one
(``inputs = t[:-1]``, ``targets = t[1:]``) *before* packing, so no target
crosses a document and a document's last real token predicts EOS. Documents
are concatenated and split into rows of ``seq_len``; a document split across
rows continues in the next row as a new segment whose positions RESTART at 0.
Padding only appears in the last row of a finite dataset (with worker
processes: in the last row of each worker). With a finite ``num_epochs`` the
final incomplete batch is dropped (``drop_remainder``), and with it the skip
counts it carried.

Bad records (undecodable bytes, invalid UTF-8, blank text, missing field; see
``ops.SKIP_REASONS``) are skipped, logged and counted by reason. Each becomes
a token-less element carrying a one-hot count, which packing places in a row
like an empty document; the counts thus travel with the rows (exact with
worker processes too) and are summed in the main process:
``iterator.skipped_records`` is a dict reason -> number of records skipped in
what this iterator has yielded so far. They are part of the iterator state, so
they survive checkpoint/restore. (A row holds at most ``seq_len`` documents
and bad records together; only a run of more bad records than that within one
row's worth of text makes a row end early, with padding.)

``iter(ds)`` supports ``get_state()`` / ``set_state()`` (JSON-serialisable;
works with ``grain.checkpoint.CheckpointSave``/``CheckpointRestore`` in Orbax),
with or without worker processes: a restored iterator yields exactly the
batches the original would have. With ``worker_count > 0`` the batch order
depends on ``worker_count`` (grain slices the records across workers), so
restore with the same ``worker_count``.
"""

import logging
from typing import Any

from absl import flags
import grain
from grain.experimental import ConcatThenSplitIterDataset
import ml_collections
import numpy as np

from data_pipelines import records
from data_pipelines.example_dataset import SKIPPED_KEY, ApplyOps
from data_pipelines.ops import OpContext, SKIP_REASONS, build_ops

DEFAULT_TEXT_OPS = ("decode_text", "tokenize", "lm_shift")
# Tuning fields a config may leave out.
_OPTIONAL_DEFAULTS = {
  "worker_buffer_size": 2,  # Batches buffered per worker process.
  "read_threads": 2,  # Threads running the per-record ops.
  "read_buffer_size": 128,  # Records those threads prefetch.
}
_EMPTY = np.zeros((0,), np.int32)


def default_text_config(path: str = "") -> ml_collections.ConfigDict:
  """Config fields ``make_text_dataset`` reads, with their defaults."""
  return ml_collections.ConfigDict(
    {
      "path": path,  # Directory of shards (or a glob of shard files).
      "shuffle": True,
      "num_epochs": ml_collections.config_dict.placeholder(int),  # None: forever.
      "worker_count": 0,  # 0: in-process; >0: grain worker processes.
      "ops": DEFAULT_TEXT_OPS,
      **_OPTIONAL_DEFAULTS,
    }
  )


def make_text_dataset(
  cfg: ml_collections.ConfigDict,
  *,
  tokenizer,
  seq_len: int,
  batch_size: int,
  process_index: int,
  process_count: int,
  seed: int,
  split: str = "train",
) -> grain.IterDataset:
  """Packed next-token-prediction batches for this host; see the module doc.

  Args:
    cfg: ``path``, ``shuffle``, ``num_epochs``, ``worker_count``, ``ops`` and
      optionally ``worker_buffer_size``, ``read_threads``, ``read_buffer_size``
      (see ``default_text_config``). ``ops`` must produce int32 ``inputs`` and
      ``targets`` of equal length per document.
    tokenizer: a ``TextTokenizer`` (given to ops through ``OpContext``).
    seq_len: tokens per row.
    batch_size: rows per batch on this host.
    process_index: this host's index; hosts read disjoint records.
    process_count: number of hosts.
    seed: shuffle seed (same on all hosts).
    split: shard split to read when ``cfg.path`` is a directory.
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f"Bad {process_index=} for {process_count=}")
  ops = build_ops(cfg.ops, OpContext(tokenizer=tokenizer))

  ds = grain.MapDataset.source(records.open_shards(cfg.path, split))
  ds = ds[process_index::process_count]
  if cfg.shuffle:
    ds = ds.seed(seed).shuffle()
  ds = ds.repeat(cfg.num_epochs)
  ds = ds.map(ApplyOps(ops)).map(_text_element)
  it = ds.to_iter_dataset(
    grain.ReadOptions(
      num_threads=_optional(cfg, "read_threads"),
      prefetch_buffer_size=_optional(cfg, "read_buffer_size"),
    )
  )
  it = _JsonSafeStateIterDataset(
    ConcatThenSplitIterDataset(
      it,
      length_struct={"inputs": seq_len, "targets": seq_len, "skipped": seq_len},
    )
  )
  it = it.map(_row_layout)
  it = it.batch(batch_size, drop_remainder=True)
  if cfg.worker_count > 0:
    # grain's worker startup reads its absl flags; outside an absl app (e.g.
    # under pytest) nobody parsed them, so use their defaults.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(
      grain.MultiprocessingOptions(
        num_workers=cfg.worker_count,
        per_worker_buffer_size=_optional(cfg, "worker_buffer_size"),
      )
    )
  return CountSkippedIterDataset(it)


def _optional(cfg: ml_collections.ConfigDict, name: str) -> Any:
  return cfg.get(name, _OPTIONAL_DEFAULTS[name])


def _text_element(example: dict[str, Any]) -> dict[str, np.ndarray]:
  """An op-processed example -> ``{"inputs", "targets", "skipped"}``.

  A good example has int32 inputs/targets and all-zero ``skipped`` (int32 [1,
  len(SKIP_REASONS)]); a skip marker becomes empty inputs/targets and a one-hot
  ``skipped`` for its reason. Packing puts such an empty element into a row
  like a document with no tokens (never split: it has nothing to split), so
  each bad record is counted in exactly one row.

  Counts are not attached to the next document instead: grain 0.2.18's
  ConcatThenSplit mis-slices an unsplit feature of an already split element
  (its empty slice ``(1, 1)`` becomes ``(0, 1)`` again), which would count
  them once per piece of a long document. The zeros that documents carry are
  harmless to duplicate.
  """
  skipped = np.zeros((1, len(SKIP_REASONS)), np.int32)
  if SKIPPED_KEY in example:
    skipped[0, SKIP_REASONS.index(example[SKIPPED_KEY])] = 1
    return {"inputs": _EMPTY, "targets": _EMPTY, "skipped": skipped}
  if "inputs" not in example or "targets" not in example:
    raise ValueError(
      "The ops must produce 'inputs' and 'targets' (e.g. end with "
      f"'lm_shift'); got keys {sorted(example)}"
    )
  return {
    "inputs": np.asarray(example["inputs"], np.int32),
    "targets": np.asarray(example["targets"], np.int32),
    "skipped": skipped,
  }


class _JsonSafeStateIterDataset(grain.IterDataset):
  """Makes a ``ConcatThenSplitIterDataset`` restorable from a JSON'd state.

  Its state holds ``remainder_slices`` as tuples compared against the tuple
  ``(-1, -1)``; after a JSON round trip (what ``grain.checkpoint`` does) they
  are lists, and restoring an empty-remainder state would silently drop a
  document. This turns them back into tuples before restoring.
  """

  def __iter__(self):
    return _JsonSafeStateIterator(self._parent.__iter__())


class _JsonSafeStateIterator(grain.DatasetIterator):
  def __next__(self):
    return next(self._parent)

  def get_state(self) -> dict[str, Any]:
    return self._parent.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    state = dict(state)
    state["remainder_slices"] = {k: tuple(v) for k, v in state["remainder_slices"].items()}
    self._parent.set_state(state)


def _row_layout(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A packed row -> the model's fields (+ ``skipped`` counts, [R])."""
  packed_ids = row["inputs_segment_ids"]
  # Renumber 1..n over the pieces with tokens: bad-record elements, and the
  # empty head of a document split right at a row's end, take ids too.
  real = packed_ids > 0
  starts = real & (packed_ids != np.concatenate([[0], packed_ids[:-1]]))
  segment_ids = (np.cumsum(starts, dtype=np.int32) * real).astype(np.int32)
  positions = row["inputs_positions"].astype(np.float32)
  return {
    "inputs": row["inputs"],
    "targets": row["targets"],
    "segment_ids": segment_ids,
    "positions": np.broadcast_to(positions, (3, positions.shape[0])),
    "loss_mask": real.astype(np.float32),
    "skipped": row["skipped"].sum(axis=0, dtype=np.int64),
  }


class CountSkippedIterDataset(grain.IterDataset):
  """Outermost stage (main process): pops each batch's ``skipped`` (rows, len(SKIP_REASONS))
  counts and accumulates them by reason, in the iterator state; used by every pipeline."""

  def __iter__(self):
    return _CountSkippedIterator(self._parent.__iter__())


class _CountSkippedIterator(grain.DatasetIterator):
  def __init__(self, parent: grain.DatasetIterator):
    super().__init__(parent)
    self._counts = dict.fromkeys(SKIP_REASONS, 0)
    self._next_log_at = 1

  @property
  def skipped_records(self) -> dict[str, int]:
    """Bad records skipped so far, by reason (see ``ops.SKIP_REASONS``)."""
    return dict(self._counts)

  def __next__(self) -> dict[str, np.ndarray]:
    batch = dict(next(self._parent))
    skipped = batch.pop("skipped").sum(axis=0)
    if skipped.any():
      for reason, n in zip(SKIP_REASONS, skipped.tolist()):
        self._counts[reason] += n
      total = sum(self._counts.values())
      if total >= self._next_log_at:  # Logs at 1, 2, 4, 8, ... skipped.
        logging.warning("Skipped %d bad records so far: %s", total, self._counts)
        self._next_log_at = 2 * total
    return batch

  def get_state(self) -> dict[str, Any]:
    return {"parent": self._parent.get_state(), "skipped_records": dict(self._counts)}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._counts = {r: int(state["skipped_records"].get(r, 0)) for r in SKIP_REASONS}
    self._next_log_at = 2 * sum(self._counts.values()) or 1
