"""Per-module state-dict key maps between omnijax params and the released (Hub) Qwen3-Omni layout.

Each map lists (omnijax leaf path, transformers key, kind). Kinds:
- ``vector`` / ``embedding``: copied as is;
- ``linear``: an omnijax kernel (*in, *out) <-> a torch Linear weight (out, in);
- ``experts``: an omnijax (E, in, out) stack <-> one torch Linear weight per expert
  (``{e}`` in the key), i.e. experts are unstacked on export and stacked on import.
Scanned decoder blocks hold a leading ``layers`` dimension that is unstacked into
``layers.N`` keys. Shapes are checked exactly in both directions.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterator, Mapping

import numpy as np
from flax import traverse_util

from omnijax.models.config import TextConfig

Array = np.ndarray


class CheckpointError(ValueError):
  """A checkpoint that does not fit the model: a missing tensor or a tensor of the wrong shape."""


@dataclasses.dataclass(frozen=True)
class Entry:
  ours: str  # '/'-joined path in the params tree
  hf: str  # transformers key; may contain {e} (expert index)
  kind: str  # vector | embedding | linear | experts


def _attention_entries() -> list[Entry]:
  e = [
    Entry("input_layernorm/weight", "input_layernorm.weight", "vector"),
    Entry("post_attention_layernorm/weight", "post_attention_layernorm.weight", "vector"),
  ]
  for p in ("q", "k", "v", "o"):
    e.append(Entry(f"self_attn/{p}_proj", f"self_attn.{p}_proj.weight", "linear"))
  for p in ("q", "k"):
    e.append(Entry(f"self_attn/{p}_norm/weight", f"self_attn.{p}_norm.weight", "vector"))
  return e


def _mlp_entries(prefix_ours: str, prefix_hf: str) -> list[Entry]:
  return [
    Entry(f"{prefix_ours}/{p}_proj", f"{prefix_hf}.{p}_proj.weight", "linear")
    for p in ("gate", "up", "down")
  ]


def decoder_layer_entries(cfg: TextConfig, moe: bool) -> list[Entry]:
  entries = _attention_entries()
  if not moe:
    return entries + _mlp_entries("mlp", "mlp")
  entries.append(Entry("mlp/gate", "mlp.gate.weight", "linear"))
  for p in ("gate", "up", "down"):
    entries.append(Entry(f"mlp/experts_{p}_proj", f"mlp.experts.{{e}}.{p}_proj.weight", "experts"))
  if cfg.shared_expert_intermediate_size:
    entries += _mlp_entries("mlp/shared_expert", "mlp.shared_expert")
    entries.append(Entry("mlp/shared_expert_gate", "mlp.shared_expert_gate.weight", "linear"))
  return entries


@dataclasses.dataclass(frozen=True)
class TextLayout:
  """Where a text decoder lives in the checkpoint (the Thinker and the Talker differ)."""

  layers: str  # prefix of `layers.N.` keys
  embed: str
  norm: str
  head: str


THINKER_TEXT = TextLayout(
  layers="thinker.model.layers",
  embed="thinker.model.embed_tokens.weight",
  norm="thinker.model.norm.weight",
  head="thinker.lm_head.weight",
)
TALKER_TEXT = TextLayout(
  layers="talker.model.layers",
  embed="talker.model.codec_embedding.weight",
  norm="talker.model.norm.weight",
  head="talker.codec_head.weight",
)


def _linear_in_dims(path: str) -> int:
  """How many leading kernel dimensions are inputs (o_proj: (heads, head_dim, embed))."""
  return 2 if path.endswith("o_proj") else 1


def _hf_shape(kind: str, path: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The transformers shape of one (unstacked, per-expert) omnijax leaf of `shape`."""
  if kind in ("vector", "embedding"):
    return shape
  n_in = _linear_in_dims(path)
  return (math.prod(shape[n_in:]), math.prod(shape[:n_in]))


def _to_hf(w: Array, kind: str, path: str) -> Array:
  if kind in ("vector", "embedding"):
    return np.ascontiguousarray(w)
  return np.ascontiguousarray(w.reshape(_hf_shape(kind, path, w.shape)[::-1]).T)


def _from_hf(key: str, w: Array, kind: str, path: str, shape: tuple[int, ...]) -> Array:
  want = _hf_shape(kind, path, shape)
  if tuple(w.shape) != want:
    raise CheckpointError(
      f"checkpoint tensor {key!r} has shape {tuple(w.shape)}, but the model "
      f"config needs {want} (for omnijax param {path} of shape {shape})."
    )
  return w if kind in ("vector", "embedding") else w.T.reshape(shape)


def iter_text_to_hf(
  params: Mapping, cfg: TextConfig, layout: TextLayout
) -> Iterator[tuple[str, Array]]:
  """omnijax text-decoder params (embed_tokens, model/..., lm_head) -> (key, tensor), lazily."""
  flat = traverse_util.flatten_dict(params, sep="/")
  yield layout.embed, _to_hf(np.asarray(flat["embed_tokens"]), "embedding", "embed_tokens")
  for moe, first, count in cfg.layer_blocks():
    block = f"model/layers_{first}_{first + count}"
    for i in range(count):
      prefix = f"{layout.layers}.{first + i}."
      for entry in decoder_layer_entries(cfg, moe):
        w = np.asarray(flat[f"{block}/{entry.ours}"][i])
        if entry.kind == "experts":
          for e in range(w.shape[0]):
            yield prefix + entry.hf.format(e=e), _to_hf(w[e], "linear", entry.ours)
        else:
          yield prefix + entry.hf, _to_hf(w, entry.kind, entry.ours)
  yield layout.norm, _to_hf(np.asarray(flat["model/norm/weight"]), "vector", "model/norm/weight")
  yield layout.head, _to_hf(np.asarray(flat["lm_head"]), "linear", "lm_head")


def text_to_hf(params: Mapping, cfg: TextConfig, layout: TextLayout) -> dict[str, Array]:
  """omnijax text-decoder params -> {transformers key: tensor} in the released layout."""
  return dict(iter_text_to_hf(params, cfg, layout))


def text_from_hf(
  get: Callable[[str], Array], abstract_params: Mapping, cfg: TextConfig, layout: TextLayout
) -> dict:
  """The inverse of text_to_hf; `abstract_params` gives every leaf's shape and dtype.

  `get(key)` returns the checkpoint tensor of a transformers key (and raises CheckpointError
  naming the key when it is absent).
  """
  leaves = traverse_util.flatten_dict(abstract_params, sep="/")

  def load(key: str, kind: str, path: str, shape: tuple[int, ...]) -> Array:
    return _from_hf(key, np.asarray(get(key)), kind, path, shape)

  def cast(path: str, w: Array) -> Array:
    return np.asarray(w, dtype=leaves[path].dtype)

  flat: dict[str, Array] = {}
  for path, key, kind in (
    ("embed_tokens", layout.embed, "embedding"),
    ("model/norm/weight", layout.norm, "vector"),
    ("lm_head", layout.head, "linear"),
  ):
    flat[path] = cast(path, load(key, kind, path, tuple(leaves[path].shape)))
  for moe, first, count in cfg.layer_blocks():
    block = f"model/layers_{first}_{first + count}"
    for entry in decoder_layer_entries(cfg, moe):
      path = f"{block}/{entry.ours}"
      shape = tuple(leaves[path].shape[1:])
      layers = []
      for i in range(count):
        prefix = f"{layout.layers}.{first + i}."
        if entry.kind == "experts":
          layers.append(
            np.stack(
              [
                load(prefix + entry.hf.format(e=e), "linear", entry.ours, shape[1:])
                for e in range(shape[0])
              ]
            )
          )
        else:
          layers.append(load(prefix + entry.hf, entry.kind, entry.ours, shape))
      flat[path] = cast(path, np.stack(layers))
  missing = sorted(set(leaves) - set(flat))
  if missing:
    raise CheckpointError(f"no checkpoint mapping for omnijax params {missing}")
  return traverse_util.unflatten_dict(flat, sep="/")
