"""Key map between omnijax AudioEncoder params and transformers' ``thinker.audio_tower.*`` keys.

Each entry is (omnijax leaf path, transformers key, kind, n_in). Kinds:
- ``vector``: flattened on export, reshaped on import (q/k/v biases are (heads, head_dim));
- ``linear``: an omnijax kernel (*in, *out) whose first `n_in` dims are inputs <-> a torch
  Linear weight (prod(out), prod(in)); conv_out's (channels, freq, d_model) flattens channel-major
  like the reference's ``view(b, t, c * f)``;
- ``conv``: a flax HWIO kernel (kh = mel, kw = time, in, out) <-> a torch Conv2d weight
  (out, in, kh, kw) over (mel, time).
The scanned layers hold a leading ``layers`` dimension, unstacked into ``layers.N`` keys.
Shapes are checked exactly on import. The reference's sinusoidal table is a non-persistent
buffer (not in the state dict) and is recomputed by the module.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterator, Mapping

import flax.linen as nn
import numpy as np
from flax import traverse_util

from omnijax.hf.keymap import CheckpointError
from omnijax.models.config import AudioEncoderConfig

Array = np.ndarray
AUDIO_PREFIX = "thinker.audio_tower"


@dataclasses.dataclass(frozen=True)
class AudioEntry:
  ours: str  # '/'-joined path in the AudioEncoder params tree (inside `layers/` for layer entries)
  hf: str  # transformers key after the prefix (after `layers.N.` for layer entries)
  kind: str  # vector | linear | conv
  n_in: int = 1  # linear: how many leading kernel dims are inputs


def _linear(ours: str, hf: str, n_in: int = 1, bias: bool = True) -> list[AudioEntry]:
  e = [AudioEntry(f"{ours}/kernel", f"{hf}.weight", "linear", n_in)]
  if bias:
    e.append(AudioEntry(f"{ours}/bias", f"{hf}.bias", "vector"))
  return e


def _norm(ours: str, hf: str) -> list[AudioEntry]:
  return [
    AudioEntry(f"{ours}/scale", f"{hf}.weight", "vector"),
    AudioEntry(f"{ours}/bias", f"{hf}.bias", "vector"),
  ]


def top_entries() -> list[AudioEntry]:
  e = []
  for i in (1, 2, 3):
    e += [
      AudioEntry(f"conv2d{i}/kernel", f"conv2d{i}.weight", "conv"),
      AudioEntry(f"conv2d{i}/bias", f"conv2d{i}.bias", "vector"),
    ]
  e += _linear("conv_out", "conv_out", n_in=2, bias=False)
  e += _norm("ln_post", "ln_post")
  e += _linear("proj1", "proj1") + _linear("proj2", "proj2")
  return e


def layer_entries() -> list[AudioEntry]:
  e = []
  for p in ("q", "k", "v"):
    e += _linear(f"self_attn/{p}_proj", f"self_attn.{p}_proj")
  e += _linear("self_attn/out_proj", "self_attn.out_proj", n_in=2)
  e += _norm("self_attn_layer_norm", "self_attn_layer_norm")
  e += _linear("fc1", "fc1") + _linear("fc2", "fc2")
  e += _norm("final_layer_norm", "final_layer_norm")
  return e


def _hf_shape(entry: AudioEntry, shape: tuple[int, ...]) -> tuple[int, ...]:
  if entry.kind == "vector":
    return (math.prod(shape),)
  if entry.kind == "conv":
    kh, kw, cin, cout = shape
    return (cout, cin, kh, kw)
  return (math.prod(shape[entry.n_in :]), math.prod(shape[: entry.n_in]))


def _to_hf(w: Array, entry: AudioEntry) -> Array:
  if entry.kind == "vector":
    return np.ascontiguousarray(w.reshape(-1))
  if entry.kind == "conv":
    return np.ascontiguousarray(w.transpose(3, 2, 0, 1))
  return np.ascontiguousarray(w.reshape(_hf_shape(entry, w.shape)[::-1]).T)


def _from_hf(key: str, w: Array, entry: AudioEntry, shape: tuple[int, ...]) -> Array:
  want = _hf_shape(entry, shape)
  if tuple(w.shape) != want:
    raise CheckpointError(
      f"checkpoint tensor {key!r} has shape {tuple(w.shape)}, but the audio "
      f"encoder config needs {want} (for omnijax param {entry.ours} of shape "
      f"{shape})."
    )
  if entry.kind == "vector":
    return w.reshape(shape)
  if entry.kind == "conv":
    return w.transpose(2, 3, 1, 0)
  return w.T.reshape(shape)


def audio_hf_keys(cfg: AudioEncoderConfig, prefix: str = AUDIO_PREFIX) -> list[str]:
  """Every transformers key of the audio tower of `cfg`, in export order."""
  keys = [f"{prefix}.{e.hf}" for e in top_entries()]
  for i in range(cfg.encoder_layers):
    keys += [f"{prefix}.layers.{i}.{e.hf}" for e in layer_entries()]
  return keys


def iter_audio_to_hf(
  params: Mapping, cfg: AudioEncoderConfig, prefix: str = AUDIO_PREFIX
) -> Iterator[tuple[str, Array]]:
  """AudioEncoder params -> (transformers key, numpy tensor), lazily."""
  flat = traverse_util.flatten_dict(nn.meta.unbox(params), sep="/")
  for entry in top_entries():
    yield f"{prefix}.{entry.hf}", _to_hf(np.asarray(flat[entry.ours]), entry)
  for entry in layer_entries():
    stacked = np.asarray(flat[f"layers/{entry.ours}"])
    if stacked.shape[0] != cfg.encoder_layers:
      raise CheckpointError(
        f"layers/{entry.ours} stacks {stacked.shape[0]} layers, config has "
        f"encoder_layers={cfg.encoder_layers}."
      )
  for i in range(cfg.encoder_layers):
    for entry in layer_entries():
      w = np.asarray(flat[f"layers/{entry.ours}"][i])
      yield f"{prefix}.layers.{i}.{entry.hf}", _to_hf(w, entry)


def audio_to_hf(
  params: Mapping, cfg: AudioEncoderConfig, prefix: str = AUDIO_PREFIX
) -> dict[str, Array]:
  """AudioEncoder params -> {transformers key: tensor} (Hub layout, `prefix.` on every key)."""
  return dict(iter_audio_to_hf(params, cfg, prefix))


def audio_from_hf(
  get: Callable[[str], Array],
  abstract_params: Mapping,
  cfg: AudioEncoderConfig,
  prefix: str = AUDIO_PREFIX,
) -> dict:
  """The inverse of audio_to_hf: numpy params shaped and typed like `abstract_params`.

  `get(key)` returns the checkpoint tensor of a transformers key (and raises CheckpointError
  naming the key when it is absent); `abstract_params` may be boxed or not (ShapeDtypeStructs or
  arrays).
  """
  leaves = traverse_util.flatten_dict(nn.meta.unbox(abstract_params), sep="/")

  def load(key: str, entry: AudioEntry, shape: tuple[int, ...]) -> Array:
    return _from_hf(key, np.asarray(get(key)), entry, shape)

  flat: dict[str, Array] = {}
  for entry in top_entries():
    leaf = leaves[entry.ours]
    flat[entry.ours] = np.asarray(
      load(f"{prefix}.{entry.hf}", entry, tuple(leaf.shape)), dtype=leaf.dtype
    )
  for entry in layer_entries():
    path = f"layers/{entry.ours}"
    leaf = leaves[path]
    if leaf.shape[0] != cfg.encoder_layers:
      raise CheckpointError(
        f"{path} stacks {leaf.shape[0]} layers, config has encoder_layers={cfg.encoder_layers}."
      )
    shape = tuple(leaf.shape[1:])
    flat[path] = np.asarray(
      np.stack(
        [load(f"{prefix}.layers.{i}.{entry.hf}", entry, shape) for i in range(cfg.encoder_layers)]
      ),
      dtype=leaf.dtype,
    )
  missing = sorted(set(leaves) - set(flat))
  if missing:
    raise CheckpointError(f"no checkpoint mapping for omnijax audio params {missing}")
  return traverse_util.unflatten_dict(flat, sep="/")
