"""Reading and writing safetensors checkpoints as transformers does: one ``model.safetensors``,
or ``model-0000i-of-0000n.safetensors`` shards listed in ``model.safetensors.index.json``.

Writing streams (key, tensor) pairs into shards of at most ``max_shard_bytes`` (a tensor larger
than that gets a shard of its own), so at most one shard is held in memory.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from pathlib import Path
from typing import Iterable

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

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


def write(
  tensors: Iterable[tuple[str, np.ndarray]], out_dir: str | Path, max_shard_bytes: int
) -> list[str]:
  """Writes the tensors into out_dir; returns the safetensors file names written."""
  out_dir = Path(out_dir)
  for stale in [*out_dir.glob("model*.safetensors"), out_dir / INDEX_FILE]:
    stale.unlink(missing_ok=True)
  shards: list[list[str]] = []
  pending: dict[str, np.ndarray] = {}
  pending_bytes = total_bytes = total_params = 0
  seen: set[str] = set()

  def flush() -> None:
    nonlocal pending, pending_bytes
    if pending:
      save_file(pending, out_dir / f".shard-{len(shards)}.tmp", metadata=_METADATA)
      shards.append(list(pending))
      pending, pending_bytes = {}, 0

  for key, w in tensors:
    if key in seen:
      raise ValueError(f"tensor {key!r} written twice")
    seen.add(key)
    if pending and pending_bytes + w.nbytes > max_shard_bytes:
      flush()
    pending[key] = w
    pending_bytes += w.nbytes
    total_bytes += w.nbytes
    total_params += w.size
  flush()

  if len(shards) == 1:
    os.replace(out_dir / ".shard-0.tmp", out_dir / SINGLE_FILE)
    return [SINGLE_FILE]
  names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  weight_map = {}
  for i, (name, keys) in enumerate(zip(names, shards)):
    os.replace(out_dir / f".shard-{i}.tmp", out_dir / name)
    weight_map.update(dict.fromkeys(keys, name))
  index = dict(
    metadata=dict(total_parameters=total_params, total_size=total_bytes),
    weight_map=dict(sorted(weight_map.items())),
  )
  (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
  return names


class Reader:
  """Tensors of a transformers checkpoint directory, by key, read lazily (memory-mapped)."""

  def __init__(self, hf_dir: str | Path):
    self.dir = Path(hf_dir)
    if (self.dir / INDEX_FILE).exists():
      weight_map = json.loads((self.dir / INDEX_FILE).read_text())["weight_map"]
      self.files = {k: self.dir / v for k, v in weight_map.items()}
    elif (self.dir / SINGLE_FILE).exists():
      with safe_open(self.dir / SINGLE_FILE, "np") as f:
        self.files = dict.fromkeys(f.keys(), self.dir / SINGLE_FILE)
    else:
      raise FileNotFoundError(
        f"{self.dir} holds neither {SINGLE_FILE} nor {INDEX_FILE}: not a "
        "transformers safetensors checkpoint."
      )
    self._open: dict[Path, object] = {}

  def keys(self) -> list[str]:
    return list(self.files)

  def __call__(self, key: str) -> np.ndarray:
    if key not in self.files:
      close = difflib.get_close_matches(key, self.files, n=3)
      raise CheckpointError(
        f"tensor {key!r} is missing from the checkpoint in {self.dir}"
        + (f" (similar keys: {close})" if close else "")
        + "."
      )
    path = self.files[key]
    if path not in self._open:
      if not path.exists():
        raise CheckpointError(
          f"{INDEX_FILE} in {self.dir} lists {path.name} (for {key!r}), which does not exist."
        )
      self._open[path] = safe_open(path, "np")
    return self._open[path].get_tensor(key)
