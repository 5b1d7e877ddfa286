"""On-disk example format: msgpack-encoded dicts in ArrayRecord shards.

Layout of a dataset directory::

  DIR/train.array_record-00000-of-00008     ArrayRecord shards of one split
  DIR/validation.array_record-00000-of-00001
  DIR/manifest.json                         written last; marks DIR complete

Each ArrayRecord record is one example: a msgpack map (``use_bin_type=True``)
with string keys. Text examples are ``{"text": str, "source": str, "id": str}``.
The encoding is forward compatible: readers look up the keys they need and
ignore the others. Media are msgpack ``bin`` values holding the encoded file
(``{"image": b"...png...", "text": ...}``); see ``data_pipelines.prepare`` for
the fields of prepared multimodal examples.

Shards are written with ``group_size:1`` so that
``grain.sources.ArrayRecordDataSource`` reads single records at random.
"""

import glob
import json
import os
import pathlib
from collections.abc import Iterable, Mapping
from typing import Any

import msgpack
from array_record.python import array_record_module
import grain

from data_pipelines.ops import BadRecord
from omnijax import paths

MANIFEST_NAME = "manifest.json"
SHARD_INFIX = ".array_record-"
WRITER_OPTIONS = "group_size:1"  # Every record its own chunk: read one at random.


def shard_name(split: str, index: int, num_shards: int) -> str:
  return f"{split}{SHARD_INFIX}{index:05d}-of-{num_shards:05d}"


def encode_example(example: Mapping[str, Any]) -> bytes:
  """Serialises an example (a flat dict of str/bytes/numbers) to bytes."""
  return msgpack.packb(dict(example), use_bin_type=True)


def decode_example(record: bytes) -> dict[str, Any]:
  """Inverse of ``encode_example``.

  Raises:
    BadRecord: ``"invalid_utf8"`` if a msgpack string is not valid UTF-8,
      ``"undecodable"`` if the bytes are not a msgpack map with string keys.
  """
  try:
    example = msgpack.unpackb(record, raw=False)
  except UnicodeDecodeError as e:
    raise BadRecord("invalid_utf8", str(e)) from e
  except Exception as e:  # msgpack raises several ValueError subclasses.
    raise BadRecord("undecodable", repr(e)) from e
  if not isinstance(example, dict):
    raise BadRecord("undecodable", f"not a map: {type(example).__name__}")
  return example


def shard_paths(directory: str | os.PathLike[str], split: str) -> list[str]:
  """Sorted shard files of ``split`` in ``directory``."""
  return sorted(
    glob.glob(os.path.join(glob.escape(os.fspath(directory)), f"{split}{SHARD_INFIX}*-of-*"))
  )


class ShardWriter:
  """Writes examples of one split round-robin into ``num_shards`` ArrayRecord files.

  Example ``i`` goes to shard ``i % num_shards``; existing shards of ``split``
  in ``out_dir`` are deleted when the writer is created. ``close()`` returns
  the split's entry for the manifest:
  ``{"files": [basename, ...], "num_records": int, "num_bytes": int}``.
  """

  def __init__(self, out_dir: str | os.PathLike[str], split: str, num_shards: int):
    if num_shards < 1:
      raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in shard_paths(out_dir, split):
      os.remove(stale)
    self._names = [shard_name(split, i, num_shards) for i in range(num_shards)]
    self._writers = [
      array_record_module.ArrayRecordWriter(str(out_dir / n), WRITER_OPTIONS) for n in self._names
    ]
    self.num_records = self.num_bytes = 0

  def write(self, example: Mapping[str, Any]) -> None:
    record = encode_example(example)
    self._writers[self.num_records % len(self._writers)].write(record)
    self.num_records += 1
    self.num_bytes += len(record)

  def close(self) -> dict[str, Any]:
    for writer in self._writers:
      writer.close()
    return {
      "files": list(self._names),
      "num_records": self.num_records,
      "num_bytes": self.num_bytes,
    }


def write_shards(
  examples: Iterable[Mapping[str, Any]],
  out_dir: str | os.PathLike[str],
  split: str,
  num_shards: int,
) -> dict[str, Any]:
  """Writes examples round-robin into ``num_shards`` ArrayRecord files.

  Example ``i`` goes to shard ``i % num_shards``; existing shards of ``split``
  in ``out_dir`` are deleted first. Examples stream through (nothing is held
  in memory).

  Returns:
    ``{"files": [basename, ...], "num_records": int, "num_bytes": int}``,
    the split's entry for the manifest.
  """
  writer = ShardWriter(out_dir, split, num_shards)
  try:
    for example in examples:
      writer.write(example)
  finally:
    entry = writer.close()
  return entry


def open_shards(
  path: str | os.PathLike[str], split: str = "train"
) -> grain.sources.ArrayRecordDataSource:
  """Random-access source over a split's shards.

  Args:
    path: a dataset directory (its ``{split}.array_record-*`` shards are read),
      or a glob pattern matching shard files (``split`` is then ignored).
    split: split name, when ``path`` is a directory.

  Returns:
    A ``grain.sources.ArrayRecordDataSource`` yielding the raw record bytes.

  Raises:
    ConfigError: ``path`` is a bucket URL (ArrayRecord reads local files only).
  """
  path = os.fspath(
    paths.local(
      path,
      "the shards' path",
      "ArrayRecord reads local files only; mount the bucket with Cloud Storage FUSE (gcsfuse "
      "--implicit-dirs BUCKET /mnt/BUCKET, as MaxText does for its ArrayRecord data) and name the "
      "shards under the mount point.",
    )
  )
  if os.path.isdir(path):
    files = shard_paths(path, split)
  else:
    files = sorted(glob.glob(path))
  if not files:
    raise FileNotFoundError(f"No ArrayRecord shards for split {split!r} at {path}")
  return grain.sources.ArrayRecordDataSource(files)


def write_manifest(out_dir: str | os.PathLike[str], manifest: Mapping[str, Any]) -> None:
  """Atomically writes ``manifest.json``; call after all shards are written."""
  out_dir = pathlib.Path(out_dir)
  tmp = out_dir / f".{MANIFEST_NAME}.tmp-{os.getpid()}"
  tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
  os.replace(tmp, out_dir / MANIFEST_NAME)


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any] | None:
  """The manifest of a complete dataset directory, else None.

  Complete means: ``manifest.json`` exists, parses, and every shard file it
  lists under ``splits`` exists.
  """
  directory = pathlib.Path(directory)
  try:
    manifest = json.loads((directory / MANIFEST_NAME).read_text())
  except (OSError, ValueError):
    return None
  splits = manifest.get("splits") if isinstance(manifest, dict) else None
  if not isinstance(splits, dict):
    return None
  for entry in splits.values():
    if not all((directory / name).is_file() for name in entry.get("files", [])):
      return None
  return manifest


def recorded_size(path: str | os.PathLike[str], split: str) -> int | None:
  """The records of ``split`` at ``path`` that a complete manifest lists: ``path``'s own (a
  dataset directory) or its parent's (``path`` a task folder of ``data_pipelines.prepare``'s
  output, whose manifest lists "task/split"); None when neither lists it."""
  path = pathlib.Path(path)
  for directory, key in ((path, split), (path.parent, f"{path.name}/{split}")):
    entry = ((read_manifest(directory) or {}).get("splits") or {}).get(key)
    if entry is not None:
      return entry.get("num_records")
  return None
