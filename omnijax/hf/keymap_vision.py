"""Key map between omnijax ``VisionEncoder`` params and transformers' ``thinker.visual.*`` keys.

Entries are (omnijax leaf path, transformers key suffix, kind). Kinds:
- ``vector`` / ``embedding``: copied as is (LayerNorm weights/biases, 1-D biases, ``pos_embed``);
- ``bias``: an omnijax bias of any shape <-> a flat torch bias (the fused qkv bias (3, H, hd));
- ``linear``: an omnijax kernel (in, *out) <-> a torch Linear weight (out, in);
- ``linear2``: an omnijax kernel (in1, in2, out) <-> (out, in1 * in2) (attn.proj: (H, hd, D));
- ``conv3d``: the patch embedding kernel (C*T*p*p, D) <-> the Conv3d weight (D, C, T, p, p).
Scanned block runs (``blocks_{first}_{end}``, see ``vision.layer_segments``) hold a leading
``layers`` dimension that is unstacked into ``blocks.N`` keys. Shapes are checked exactly in
both directions, so the round trip is exact.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, Mapping

import numpy as np
from flax import traverse_util

from omnijax.hf.keymap import CheckpointError, Entry
from omnijax.models.config import VisionEncoderConfig
from omnijax.models.vision import layer_segments, segment_name

Array = np.ndarray
PREFIX = "thinker.visual"

BLOCK_ENTRIES = (
  Entry("norm1/weight", "norm1.weight", "vector"),
  Entry("norm1/bias", "norm1.bias", "vector"),
  Entry("norm2/weight", "norm2.weight", "vector"),
  Entry("norm2/bias", "norm2.bias", "vector"),
  Entry("attn_qkv/kernel", "attn.qkv.weight", "linear"),
  Entry("attn_qkv/bias", "attn.qkv.bias", "bias"),
  Entry("attn_proj/kernel", "attn.proj.weight", "linear2"),
  Entry("attn_proj/bias", "attn.proj.bias", "vector"),
  Entry("mlp_linear_fc1/kernel", "mlp.linear_fc1.weight", "linear"),
  Entry("mlp_linear_fc1/bias", "mlp.linear_fc1.bias", "vector"),
  Entry("mlp_linear_fc2/kernel", "mlp.linear_fc2.weight", "linear"),
  Entry("mlp_linear_fc2/bias", "mlp.linear_fc2.bias", "vector"),
)

MERGER_ENTRIES = (
  Entry("ln_q/weight", "ln_q.weight", "vector"),
  Entry("ln_q/bias", "ln_q.bias", "vector"),
  Entry("mlp_0/kernel", "mlp.0.weight", "linear"),
  Entry("mlp_0/bias", "mlp.0.bias", "vector"),
  Entry("mlp_2/kernel", "mlp.2.weight", "linear"),
  Entry("mlp_2/bias", "mlp.2.bias", "vector"),
)


def unstacked_entries(cfg: VisionEncoderConfig) -> list[Entry]:
  """Entries of the params that have no stacked layer dimension (full omnijax paths)."""
  e = [
    Entry("patch_embed/kernel", "patch_embed.proj.weight", "conv3d"),
    Entry("patch_embed/bias", "patch_embed.proj.bias", "vector"),
    Entry("pos_embed", "pos_embed.weight", "embedding"),
  ]
  mergers = [("merger", "merger")] + [
    (f"merger_list_{k}", f"merger_list.{k}") for k in range(len(cfg.deepstack_visual_indexes))
  ]
  for ours, hf in mergers:
    e += [Entry(f"{ours}/{m.ours}", f"{hf}.{m.hf}", m.kind) for m in MERGER_ENTRIES]
  return e


def _hf_shape(kind: str, shape: tuple[int, ...], cfg: VisionEncoderConfig) -> tuple[int, ...]:
  """The transformers shape of one (unstacked) omnijax leaf of `shape`."""
  if kind in ("vector", "embedding"):
    return shape
  if kind == "bias":
    return (math.prod(shape),)
  if kind == "conv3d":
    return (shape[-1], cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
  n_in = {"linear": 1, "linear2": 2}[kind]
  return (math.prod(shape[n_in:]), math.prod(shape[:n_in]))


def _to_hf(w: Array, kind: str, cfg: VisionEncoderConfig) -> Array:
  if kind in ("vector", "embedding"):
    return np.ascontiguousarray(w)
  if kind == "bias":
    return np.ascontiguousarray(w.reshape(-1))
  hf = _hf_shape(kind, w.shape, cfg)
  if kind == "conv3d":
    return np.ascontiguousarray(w.T.reshape(hf))
  return np.ascontiguousarray(w.reshape(hf[::-1]).T)


def _from_hf(
  key: str, w: Array, kind: str, path: str, shape: tuple[int, ...], cfg: VisionEncoderConfig
) -> Array:
  want = _hf_shape(kind, shape, cfg)
  if tuple(w.shape) != want:
    raise CheckpointError(
      f"checkpoint tensor {key!r} has shape {tuple(w.shape)}, but the vision "
      f"config needs {want} (for omnijax param {path} of shape {shape})."
    )
  if kind in ("vector", "embedding"):
    return w
  if kind == "bias":
    return w.reshape(shape)
  if kind == "conv3d":
    return w.reshape(w.shape[0], -1).T
  return w.T.reshape(shape)


def _flat(params: Mapping) -> dict:
  if set(params) == {"params"}:
    params = params["params"]
  flat = traverse_util.flatten_dict(params, sep="/")
  return {k: getattr(v, "value", v) for k, v in flat.items()}  # unbox nn.Partitioned leaves


def iter_vision_to_hf(
  params: Mapping, cfg: VisionEncoderConfig, prefix: str = PREFIX
) -> Iterator[tuple[str, Array]]:
  """omnijax VisionEncoder params -> (transformers key, tensor), lazily."""
  flat = _flat(params)
  for e in unstacked_entries(cfg):
    yield f"{prefix}.{e.hf}", _to_hf(np.asarray(flat[e.ours]), e.kind, cfg)
  for first, count in layer_segments(cfg):
    seg = segment_name(first, count)
    stacked = {e.ours: np.asarray(flat[f"{seg}/{e.ours}"]) for e in BLOCK_ENTRIES}
    for i in range(count):
      for e in BLOCK_ENTRIES:
        yield f"{prefix}.blocks.{first + i}.{e.hf}", _to_hf(stacked[e.ours][i], e.kind, cfg)


def vision_to_hf(
  params: Mapping, cfg: VisionEncoderConfig, prefix: str = PREFIX
) -> dict[str, Array]:
  """omnijax VisionEncoder params -> {transformers key: tensor} in the released layout."""
  return dict(iter_vision_to_hf(params, cfg, prefix))


def vision_from_hf(
  get: Callable[[str], Array],
  abstract_params: Mapping,
  cfg: VisionEncoderConfig,
  prefix: str = PREFIX,
) -> dict:
  """The inverse of vision_to_hf; `abstract_params` gives every leaf's shape and dtype.

  `get(key)` returns the checkpoint tensor of a transformers key (and raises CheckpointError
  naming the key when it is absent).
  """
  leaves = _flat(abstract_params)

  def load(key: str, kind: str, path: str, shape: tuple[int, ...]) -> Array:
    return _from_hf(key, np.asarray(get(key)), kind, path, shape, cfg)

  def cast(path: str, w: Array) -> Array:
    return np.asarray(w, dtype=leaves[path].dtype)

  flat: dict[str, Array] = {}
  for e in unstacked_entries(cfg):
    if e.ours not in leaves:
      raise CheckpointError(
        f"omnijax vision params have no leaf {e.ours!r}; is `abstract_params` "
        "the VisionEncoder's params tree for this config?"
      )
    flat[e.ours] = cast(
      e.ours, load(f"{prefix}.{e.hf}", e.kind, e.ours, tuple(leaves[e.ours].shape))
    )
  for first, count in layer_segments(cfg):
    seg = segment_name(first, count)
    for e in BLOCK_ENTRIES:
      path = f"{seg}/{e.ours}"
      if path not in leaves:
        raise CheckpointError(f"omnijax vision params have no leaf {path!r}.")
      shape = tuple(leaves[path].shape[1:])
      flat[path] = cast(
        path,
        np.stack(
          [load(f"{prefix}.blocks.{first + i}.{e.hf}", e.kind, path, shape) for i in range(count)]
        ),
      )
  missing = sorted(set(leaves) - set(flat))
  if missing:
    raise CheckpointError(f"no checkpoint mapping for omnijax vision params {missing}")
  return traverse_util.unflatten_dict(flat, sep="/")


def vision_hf_keys(cfg: VisionEncoderConfig, prefix: str = PREFIX) -> list[str]:
  """Every transformers key the vision tower of `cfg` has (in vision_to_hf's order)."""
  keys = [f"{prefix}.{e.hf}" for e in unstacked_entries(cfg)]
  for first, count in layer_segments(cfg):
    keys += [f"{prefix}.blocks.{first + i}.{e.hf}" for i in range(count) for e in BLOCK_ENTRIES]
  return keys
