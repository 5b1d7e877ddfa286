"""Transformers checkpoints <-> orbax params checkpoints in bounded host memory.

`save` writes an orbax PyTree checkpoint (what `omnijax.train.checkpoint.restore_params` reads)
whose leaves are `Leaf`s: each omnijax leaf is filled slot by slot (`keymap.Slot`: one layer's,
one expert's part) straight from the safetensors, shard by shard, so the host holds one
transformers tensor at a time, never a leaf or the model. Its arrays are laid out as orbax lays
out a jax.Array whose shards are the slots (global shape, write shape = one slot; the chunks tile
a slot), read back as np.ndarray (or onto a sharding) by orbax.

`open_params` is the other way: a checkpoint's params as opened TensorStores, which read only
the part indexed (`np.asarray(t[layer])`), so `keymap.iter_to_hf` streams them one layer's
slice at a time.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath
from flax import traverse_util

from omnijax import paths
from omnijax.hf import keymap as keymap_lib
from omnijax.hf.safetensors_io import Reader
from omnijax.train import checkpoint as ckpt_lib

Shape = tuple[int, ...]

# Chunks of at most this many bytes tile each slot: a large slot (an embedding) is encoded chunk
# by chunk, and a host restoring its shard of a leaf decodes little more than that shard.
CHUNK_BYTES = 64 * 2**20


@dataclasses.dataclass(frozen=True, eq=False)
class Leaf:
  """An omnijax leaf of `shape` and `dtype`, to be written from `slots` read from `reader`."""

  shape: Shape
  dtype: np.dtype
  slots: tuple[keymap_lib.Slot, ...]
  reader: Reader

  @property
  def write_shape(self) -> Shape:
    """One slot's shape in the leaf: 1 on the dims its index picks."""
    index = self.slots[0].index
    return (1,) * len(index) + self.shape[len(index) :]


def leaves(reader: Reader, abstract_params, keymap: keymap_lib.KeyMap) -> dict:
  """A params tree of `Leaf`s shaped and typed like `abstract_params`, every leaf mapped by
  `keymap` from `reader`'s tensors (all present: CheckpointError naming a missing key)."""
  specs = keymap_lib.leaf_shapes(abstract_params)
  slots = keymap_lib.slots(keymap, {path: shape for path, (shape, _) in specs.items()})
  reader.check(s.key for s in slots)
  by_leaf: dict[str, list] = {path: [] for path in specs}
  for s in slots:
    by_leaf[s.path].append(s)
  flat = {path: Leaf(*specs[path], tuple(by_leaf[path]), reader) for path in specs}
  return traverse_util.unflatten_dict(flat, sep="/")


class _SlotWriter(ocp.type_handlers.NumpyHandler):
  """Writes `Leaf`s as np.ndarray leaves, one slot at a time, reading each reader's tensors
  shard by shard."""

  async def serialize(self, values, infos, args=None):
    args = args or [ocp.type_handlers.SaveArgs()] * len(values)
    targets: dict[int, dict[str, tuple[Any, keymap_lib.Slot, np.dtype]]] = {}
    readers = {}
    for leaf, info, arg in zip(values, infos, args):
      await info.await_path_creation()
      use_ocdbt = info.is_ocdbt_checkpoint
      tspec = ocp.type_handlers.get_json_tspec_write(
        info,
        use_ocdbt=use_ocdbt,
        global_shape=leaf.shape,
        local_shape=leaf.write_shape,
        dtype=leaf.dtype,
        process_index=jax.process_index() if use_ocdbt else None,
        arg=dataclasses.replace(arg, chunk_byte_size=CHUNK_BYTES),
      )
      t = await ts.open(ts.Spec(tspec), create=True, open=True, context=info.ts_context)
      readers[id(leaf.reader)] = leaf.reader
      for s in leaf.slots:
        targets.setdefault(id(leaf.reader), {})[s.key] = (t, s, leaf.dtype)
    for rid, by_key in targets.items():
      tensors = readers[rid].tensors(by_key)
      # read in a worker thread: a bucket's client must not block orbax's event loop
      while (item := await asyncio.to_thread(next, tensors, None)) is not None:
        key, w = item
        t, s, dtype = by_key[key]
        await t[s.index].write(
          s.from_hf(w).astype(dtype, copy=False), can_reference_source_data_indefinitely=True
        )
    return []


class _Stored:
  """The restore type that opens a stored array as a TensorStore instead of reading it."""


class _Opener(ocp.type_handlers.NumpyHandler):
  async def deserialize(self, infos, args=None):
    out = []
    for info in infos:
      await info.await_path_creation()
      tspec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=info.is_ocdbt_checkpoint)
      out.append(await ts.open(ts.Spec(tspec), open=True, context=info.ts_context))
    return out


def save(path: paths.PathLike, params) -> None:
  """Writes a params tree of `Leaf`s (see `leaves`) as an orbax PyTree checkpoint at `path`
  (replacing one there)."""
  registry = ocp.type_handlers.create_type_handler_registry((Leaf, _SlotWriter()))
  handler = ocp.PyTreeCheckpointHandler(type_handler_registry=registry)
  with ocp.Checkpointer(handler) as ckpt:
    ckpt.save(paths.path(path), args=ocp.args.PyTreeSave(params), force=True)


def _open(path: epath.Path, subtree: str | None = None):
  """The leaves of the checkpoint at `path` (of its `subtree` entry) as TensorStores."""
  registry = ocp.type_handlers.create_type_handler_registry((_Stored, _Opener()))
  handler = ocp.PyTreeCheckpointHandler(type_handler_registry=registry)
  with ocp.Checkpointer(handler) as ckpt:
    tree = ocp.PyTreeCheckpointHandler().metadata(path).tree
    item = tree if subtree is None else {subtree: tree[subtree]}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=_Stored), item)
    out = ckpt.restore(
      path,
      args=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=subtree is not None
      ),
    )
  return out if subtree is None else out[subtree]


def open_params(workdir: paths.PathLike, step: int | None = None) -> tuple[Any, int | None]:
  """(params as TensorStores, step) of a workdir's newest (or given) train checkpoint, else of
  its init_params (step None): the checkpoint `ckpt_lib.latest_params` reads, unread."""
  workdir = paths.path(workdir)
  ckpt_dir = workdir / ckpt_lib.CHECKPOINTS
  steps = ckpt_lib.checkpoint_steps(workdir)
  if step is not None and step not in steps:
    raise FileNotFoundError(f"{ckpt_dir} holds no checkpoint of step {step}; steps: {steps}.")
  if steps:
    step = steps[-1] if step is None else step
    return _open(ckpt_dir / str(step) / "state", "params"), step
  if (workdir / ckpt_lib.INIT_PARAMS).exists():
    return _open(workdir / ckpt_lib.INIT_PARAMS), None
  raise FileNotFoundError(
    f"{workdir} holds no checkpoint ({ckpt_lib.CHECKPOINTS}/<step>) and no "
    f"{ckpt_lib.INIT_PARAMS}/; train there first or run `omnijax.export from-hf`."
  )
