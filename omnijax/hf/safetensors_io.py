"""Reading and writing safetensors checkpoints as transformers does: one ``model.safetensors``,
or ``model-0000i-of-0000n.safetensors`` shards listed in ``model.safetensors.index.json``.

Writing streams (key, tensor) pairs into shards of at most ``max_shard_bytes`` (a tensor larger
than that gets a shard of its own), so at most one shard is held in memory.
"""

from __future__ import annotations

import difflib
import json
import pathlib
import re
import tempfile
from typing import Iterable, Iterator, Sequence

import numpy as np
from safetensors import safe_open
from etils import epath
from safetensors.numpy import save_file

from omnijax import paths
from omnijax.hf.keymap import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = "2GB"
_METADATA = {"format": "pt"}  # what transformers writes and expects


def parse_size(size: str | int) -> int:
  """Bytes in '2GB', '500MB', '10KiB' (KB, MB, GB: powers of 1000, as transformers) or an int."""
  if isinstance(size, int):
    return size
  m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KIB|MIB|GIB)?", size.strip().upper())
  if not m:
    raise ValueError(f"cannot parse size {size!r}; use e.g. '2GB', '500MB' or a byte count.")
  unit = {
    None: 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
  }[m.group(2)]
  return int(float(m.group(1)) * unit)


def shard_names(sizes: Sequence[tuple[str, int]], max_shard_bytes: int) -> dict[str, str]:
  """key -> safetensors file name of tensors of `sizes` (key, bytes) in write order: shards of
  at most `max_shard_bytes` (a larger tensor gets a shard of its own), named as transformers
  names them."""
  shards: list[list[str]] = []
  shard_bytes = 0
  for key, nbytes in sizes:
    if not shards or shard_bytes and shard_bytes + nbytes > max_shard_bytes:
      shards.append([])
      shard_bytes = 0
    shards[-1].append(key)
    shard_bytes += nbytes
  if len(shards) == 1:
    return dict.fromkeys(shards[0], SINGLE_FILE)
  n = len(shards)
  return {k: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, ks in enumerate(shards) for k in ks}


def write(
  tensors: Iterable[tuple[str, np.ndarray]],
  out_dir: paths.PathLike,
  sizes: Sequence[tuple[str, int]],
  max_shard_bytes: int,
) -> list[str]:
  """Writes the tensors, whose (key, bytes) are `sizes` in the same order, into out_dir
  (local, or a bucket URL: each shard is written locally, uploaded and deleted), one shard held
  at a time; returns the safetensors file names written."""
  out_dir = paths.path(out_dir)
  for stale in [*out_dir.glob("model*.safetensors"), out_dir / INDEX_FILE]:
    if stale.exists():
      stale.unlink()
  weight_map = shard_names(sizes, max_shard_bytes)
  staging = tempfile.TemporaryDirectory(prefix="omnijax-hf-") if paths.is_url(out_dir) else None
  pending: dict[str, np.ndarray] = {}

  def flush(name: str) -> None:
    local = pathlib.Path(staging.name if staging else out_dir) / name
    save_file(pending, local, metadata=_METADATA)
    if staging:
      epath.Path(local).copy(out_dir / name)
      local.unlink()
    pending.clear()

  planned = iter(sizes)
  total_params = 0
  for key, w in tensors:
    if next(planned, None) != (key, w.nbytes):
      raise ValueError(f"tensor {key!r} of {w.nbytes} bytes is not the next one of `sizes`")
    if pending and weight_map[key] != weight_map[next(iter(pending))]:
      flush(weight_map[next(iter(pending))])
    pending[key] = w
    total_params += w.size
  if next(planned, None) is not None or not pending:
    raise ValueError("fewer tensors than `sizes` lists")
  flush(weight_map[next(iter(pending))])
  names = list(dict.fromkeys(weight_map.values()))
  if names != [SINGLE_FILE]:
    index = dict(
      metadata=dict(total_parameters=total_params, total_size=sum(n for _, n in sizes)),
      weight_map=dict(sorted(weight_map.items())),
    )
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
  return names


class Reader:
  """Tensors of a transformers checkpoint directory, local or a bucket URL, by key: a local file
  is memory-mapped for each read; a bucket's file is copied into a local temporary directory,
  one at a time (`tensors` reads them file by file, so each is copied once)."""

  def __init__(self, hf_dir: paths.PathLike):
    self.dir = paths.path(hf_dir)
    self._tmp = (
      tempfile.TemporaryDirectory(prefix="omnijax-hf-") if paths.is_url(self.dir) else None
    )
    self._copied: str | None = None
    if (self.dir / INDEX_FILE).exists():
      self.files = json.loads((self.dir / INDEX_FILE).read_text())["weight_map"]
    elif (self.dir / SINGLE_FILE).exists():
      with safe_open(self._local(SINGLE_FILE), "np") as f:
        self.files = dict.fromkeys(f.keys(), SINGLE_FILE)
    else:
      raise FileNotFoundError(
        f"{self.dir} holds neither {SINGLE_FILE} nor {INDEX_FILE}: not a "
        "transformers safetensors checkpoint."
      )

  def keys(self) -> list[str]:
    return list(self.files)

  def check(self, keys: Iterable[str]) -> None:
    """Raises CheckpointError naming the first of `keys` the checkpoint lacks."""
    for key in keys:
      if key not in self.files:
        close = difflib.get_close_matches(key, self.files, n=3)
        raise CheckpointError(
          f"tensor {key!r} is missing from the checkpoint in {self.dir}"
          + (f" (similar keys: {close})" if close else "")
          + "."
        )

  def _local(self, name: str) -> pathlib.Path:
    """The local path of file `name`: for a bucket, a copy replacing the previous one."""
    src = self.dir / name
    local = pathlib.Path(self._tmp.name) / name if self._tmp else pathlib.Path(src)
    if self._copied != name:
      if not src.exists():
        raise CheckpointError(f"{INDEX_FILE} in {self.dir} lists {name}, which does not exist.")
      if self._tmp:
        if self._copied is not None:
          (pathlib.Path(self._tmp.name) / self._copied).unlink()
        src.copy(epath.Path(local))
      self._copied = name
    return local

  def __call__(self, key: str) -> np.ndarray:
    self.check([key])
    # opened per read: closing unmaps the file, so what was read leaves the process's memory
    with safe_open(self._local(self.files[key]), "np") as f:
      return f.get_tensor(key)

  def tensors(self, keys: Iterable[str]) -> Iterator[tuple[str, np.ndarray]]:
    """(key, tensor) of each of `keys` (all checked present first), file by file."""
    keys = list(keys)
    self.check(keys)
    for key in sorted(keys, key=lambda k: self.files[k]):
      yield key, self(key)
