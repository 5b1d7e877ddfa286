"""Orbax checkpoints of a workdir: train state and data-iterator state in one step directory.

Layout of a workdir:
  model.json                  the ThinkerConfig (written by training and by `export from-hf`)
  tokenizer.json              the run's tokenizer (HF `tokenizers` file), when it has one
  config.json                 the experiment config of the last launch
  checkpoints/<step>/state    TrainState {step, params, opt_state}
  checkpoints/<step>/data     the Grain iterator state (when training from a pipeline)
  init_params/                params that initialise a fresh run (`export from-hf` writes it)
  talker.json                 the TalkerConfig of a run with a Talker: its params trees are then
                              {"thinker": ..., "talker": ...} (`split_params`)
  code2wav/                   code2wav.json + params/: a Code2Wav vocoder (`export from-hf` of a
                              checkpoint with code2wav.* tensors), exported back by `to-hf`
  tensorboard/                TensorBoard event files
Restoring onto abstract arrays with shardings reshards, so a checkpoint saved on one mesh
restores onto another.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from omnijax import paths
from omnijax.models.config import Code2WavConfig, TalkerConfig, ThinkerConfig

CHECKPOINTS = "checkpoints"
INIT_PARAMS = "init_params"
MODEL_JSON = "model.json"
TOKENIZER_JSON = "tokenizer.json"
TALKER_JSON = "talker.json"
CODE2WAV = "code2wav"
CODE2WAV_JSON = "code2wav.json"

log = logging.getLogger("omnijax")


class Checkpointer:
  def __init__(
    self,
    workdir: paths.PathLike,
    *,
    save_interval_steps: int,
    max_to_keep: int,
    async_save: bool = True,
  ):
    options = ocp.CheckpointManagerOptions(
      save_interval_steps=save_interval_steps,
      max_to_keep=max_to_keep,
      enable_async_checkpointing=async_save,
      create=True,
    )
    self.directory = paths.path(workdir) / CHECKPOINTS
    self.manager = ocp.CheckpointManager(
      self.directory, options=options, item_names=("state", "data")
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iter=None, *, force: bool = False) -> bool:
    items = dict(state=ocp.args.StandardSave(state))
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, step: int, abstract_state, shardings, data_iter=None):
    target = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings
    )
    items = dict(state=ocp.args.StandardRestore(target))
    # Each process saves its own iterator's state (grain names the file after the process
    # count), which a run of another size cannot continue: it starts its data afresh.
    n = jax.process_count()
    data_state = self.directory / str(step) / "data" / f"process_{jax.process_index()}-of-{n}.json"
    if data_iter is not None and data_state.exists():
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    elif data_iter is not None:
      log.warning(
        "checkpoint %d holds no data-iterator state for %d processes (it was saved by a run of "
        "another size): the data starts from its beginning",
        step,
        n,
      )
    return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def save_params(path: paths.PathLike, params) -> None:
  """A params-only checkpoint (what `export from-hf` writes for a run to start from)."""
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(paths.path(path), params, force=True)


def restore_params(path: paths.PathLike, abstract_params=None, shardings=None):
  """Params from `save_params`; onto `shardings` when given, else as host numpy arrays."""
  path = paths.path(path)
  with ocp.StandardCheckpointer() as ckpt:
    if abstract_params is None:
      return ckpt.restore(path)
    target = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_params, shardings
    )
    return ckpt.restore(path, target)


def checkpoint_steps(workdir: paths.PathLike) -> list[int]:
  ckpt_dir = paths.path(workdir) / CHECKPOINTS
  return (
    sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()) if ckpt_dir.exists() else []
  )


def latest_params(
  workdir: paths.PathLike, step: int | None = None, abstract_params=None, shardings=None
) -> tuple[Any, int | None]:
  """(params, step) of a workdir's newest (or given) train checkpoint, else its init_params
  (step None). Onto `shardings` when given (nothing unsharded is materialised), else as host
  numpy arrays."""
  workdir = paths.path(workdir)
  ckpt_dir = workdir / CHECKPOINTS
  steps = checkpoint_steps(workdir)
  if step is not None and step not in steps:
    raise FileNotFoundError(f"{ckpt_dir} holds no checkpoint of step {step}; steps: {steps}.")
  if steps:
    step = steps[-1] if step is None else step
    with ocp.PyTreeCheckpointer() as ckpt:
      path = ckpt_dir / str(step) / "state"
      params_meta = ckpt.metadata(path).item_metadata.tree["params"]
      if abstract_params is None:
        item = params_meta
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), params_meta)
      else:
        item = abstract_params
        restore_args = jax.tree.map(
          lambda a, s: ocp.ArrayRestoreArgs(sharding=s, global_shape=a.shape, dtype=a.dtype),
          abstract_params,
          shardings,
        )
      state = ckpt.restore(
        path,
        args=ocp.args.PyTreeRestore(
          item={"params": item}, restore_args={"params": restore_args}, partial_restore=True
        ),
      )
    return state["params"], step
  if (workdir / INIT_PARAMS).exists():
    return restore_params(workdir / INIT_PARAMS, abstract_params, shardings), None
  raise FileNotFoundError(
    f"{workdir} holds no checkpoint ({CHECKPOINTS}/<step>) and no "
    f"{INIT_PARAMS}/; train there first or run `omnijax.export from-hf`."
  )


def restore_host(workdir: paths.PathLike, names: tuple[str, ...], step: int | None = None):
  """({name: numpy tree} of the named entries of a checkpoint's state, step): the newest or
  given step, without building the model (other entries are not read)."""
  workdir = paths.path(workdir)
  steps = checkpoint_steps(workdir)
  if not steps or (step is not None and step not in steps):
    raise FileNotFoundError(
      f"{workdir / CHECKPOINTS} holds no checkpoint{f' of step {step}' if step else ''} "
      f"(steps: {steps}); train there first."
    )
  step = steps[-1] if step is None else step
  with ocp.PyTreeCheckpointer() as ckpt:
    path = workdir / CHECKPOINTS / str(step) / "state"
    tree = ckpt.metadata(path).item_metadata.tree
    item = {n: tree[n] for n in names}
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    state = ckpt.restore(
      path, args=ocp.args.PyTreeRestore(item=item, restore_args=args, partial_restore=True)
    )
  return {n: state[n] for n in names}, step


def write_model_config(workdir: paths.PathLike, cfg: ThinkerConfig) -> None:
  path = paths.path(workdir) / MODEL_JSON
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(cfg.to_dict(), indent=2))


def read_model_config(workdir: paths.PathLike) -> ThinkerConfig:
  path = paths.path(workdir) / MODEL_JSON
  if not path.exists():
    raise FileNotFoundError(f"{path} not found: not an omnijax workdir.")
  return ThinkerConfig.from_dict(json.loads(path.read_text()))


def write_talker_config(workdir: paths.PathLike, cfg: TalkerConfig) -> None:
  path = paths.path(workdir) / TALKER_JSON
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(cfg.to_dict(), indent=2))


def read_talker_config(workdir: paths.PathLike) -> TalkerConfig | None:
  """The workdir's TalkerConfig, None when its model has no Talker."""
  path = paths.path(workdir) / TALKER_JSON
  if not path.exists():
    return None
  return TalkerConfig.from_dict(json.loads(path.read_text()), where=str(path))


def split_params(workdir: paths.PathLike, params) -> tuple[Any, Any]:
  """(Thinker params, Talker params or None) of a params tree of this workdir."""
  if not (paths.path(workdir) / TALKER_JSON).exists():
    return params, None
  return params["thinker"], params["talker"]


def save_tokenizer(workdir: paths.PathLike, tokenizer) -> None:
  """Keeps the run's tokenizer (a data_pipelines.tokenizer.TextTokenizer) in its workdir."""
  tokenizer.save(paths.path(workdir) / TOKENIZER_JSON)


def load_tokenizer(workdir: paths.PathLike):
  """The TextTokenizer kept in a workdir (or a transformers directory), None if it has none."""
  from data_pipelines import tokenizer as tok_lib  # pylint: disable=import-outside-toplevel

  path = paths.path(workdir) / TOKENIZER_JSON
  return tok_lib.load_tokenizer(path) if path.exists() else None


def save_code2wav(workdir: paths.PathLike, cfg: Code2WavConfig, params, save=save_params) -> None:
  """Keeps a Code2Wav vocoder (released-form params, written by `save`) in workdir/code2wav/."""
  path = paths.path(workdir) / CODE2WAV
  path.mkdir(parents=True, exist_ok=True)
  (path / CODE2WAV_JSON).write_text(json.dumps(cfg.to_dict(), indent=2))
  save(path / "params", params)


def load_code2wav(workdir: paths.PathLike) -> tuple[Code2WavConfig, Any] | None:
  """(Code2WavConfig, numpy params) of workdir/code2wav/ (or of a directory laid out as it),
  None when there is none."""
  path = paths.path(workdir)
  if not (path / CODE2WAV_JSON).exists():
    path = path / CODE2WAV
  if not (path / CODE2WAV_JSON).exists():
    return None
  cfg = Code2WavConfig.from_dict(json.loads((path / CODE2WAV_JSON).read_text()))
  return cfg, restore_params(path / "params")
