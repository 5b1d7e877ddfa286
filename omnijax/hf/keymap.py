"""omnijax params <-> the released (Hub) Qwen3-Omni safetensors layout: one key-map mechanism.

A part of the model is described by a `KeyMap`, built from the part's config by a short table
function (`text_keymap`, `audio_keymap`, `vision_keymap`, `talker_keymap`, `code2wav_keymap`;
parts compose with `+` and `under`):
- an `Entry` maps one omnijax leaf ('/'-joined path) to one transformers key through a
  `Transform` of the registry below, which knows the transformers shape of an omnijax shape and
  converts both ways;
- a `LayerGroup` is a scanned block: its leaves hold a leading ``layers`` dim that is unstacked
  into one key per layer (``{i}`` in its key prefix, from ``first`` on).
`iter_to_hf`, `to_hf`, `from_hf` and `hf_keys` work on any KeyMap. Every leaf must be mapped,
shapes are checked exactly in both directions, and round trips are exact.

A new part adds a table function returning ``KeyMap([Entry(...), ..., LayerGroup(...)])``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterable, Iterator, Mapping

import flax.linen as nn
import numpy as np
from flax import traverse_util

from omnijax.models.config import (
  AudioEncoderConfig,
  Code2WavConfig,
  TalkerConfig,
  TextConfig,
  VisionEncoderConfig,
)
from omnijax.models.code2wav import DILATIONS
from omnijax.models.vision import layer_segments, segment_name

Array = np.ndarray
Shape = tuple[int, ...]


class CheckpointError(ValueError):
  """A checkpoint that does not fit the model: a missing tensor or a tensor of the wrong shape."""


# ----------------------------------------------------------------------------------------------
# Transforms: the registry of tensor conversions. `hf_shape` raises ValueError for an omnijax
# shape the kind cannot have; `from_hf` gets a tensor already checked to have `hf_shape(shape)`.
# ----------------------------------------------------------------------------------------------


class Transform:
  """One omnijax leaf (one layer's slice of it) <-> one torch tensor."""

  def hf_shape(self, shape: Shape) -> Shape:
    raise NotImplementedError

  def to_hf(self, w: Array) -> Array:
    raise NotImplementedError

  def from_hf(self, w: Array, shape: Shape) -> Array:
    raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Copy(Transform):
  """Copied as is: norm weights, 1-D biases, embedding and position tables."""

  def hf_shape(self, shape: Shape) -> Shape:
    return shape

  def to_hf(self, w: Array) -> Array:
    return w

  def from_hf(self, w: Array, shape: Shape) -> Array:
    return w


@dataclasses.dataclass(frozen=True)
class Flat(Transform):
  """An omnijax leaf of any shape <-> a 1-D torch tensor (biases of shape (heads, head_dim),
  the fused qkv bias (3, heads, head_dim))."""

  def hf_shape(self, shape: Shape) -> Shape:
    return (math.prod(shape),)

  def to_hf(self, w: Array) -> Array:
    return w.reshape(-1)

  def from_hf(self, w: Array, shape: Shape) -> Array:
    return w.reshape(shape)


@dataclasses.dataclass(frozen=True)
class Linear(Transform):
  """An omnijax kernel (*in, *out) whose first `n_in` dims are inputs <-> a torch Linear weight
  (prod(out), prod(in)); e.g. o_proj (heads, head_dim, embed) has n_in = 2."""

  n_in: int = 1

  def hf_shape(self, shape: Shape) -> Shape:
    if len(shape) <= self.n_in:
      raise ValueError(f"a linear kernel with {self.n_in} input dim(s) needs rank > {self.n_in}")
    return (math.prod(shape[self.n_in :]), math.prod(shape[: self.n_in]))

  def to_hf(self, w: Array) -> Array:
    rows, cols = self.hf_shape(w.shape)
    return w.reshape(cols, rows).T

  def from_hf(self, w: Array, shape: Shape) -> Array:
    return w.T.reshape(shape)


@dataclasses.dataclass(frozen=True)
class Experts(Transform):
  """An omnijax stack (num, ...) <-> one torch tensor per expert (``{e}`` in the key; also the
  code predictor's per-codebook tables and heads), each
  converted by `inner`: experts are unstacked on export and stacked on import. The key map
  applies `inner` per expert; `hf_shape` is that of one expert."""

  num: int
  inner: Transform = Linear()

  def hf_shape(self, shape: Shape) -> Shape:
    if not shape or shape[0] != self.num:
      raise ValueError(f"an expert stack needs a leading dim of {self.num} experts")
    return self.inner.hf_shape(shape[1:])

  def to_hf(self, w: Array) -> Array:
    raise TypeError("Experts is converted per expert by the key map (with `inner`).")

  def from_hf(self, w: Array, shape: Shape) -> Array:
    raise TypeError("Experts is converted per expert by the key map (with `inner`).")


@dataclasses.dataclass(frozen=True)
class Permute(Transform):
  """A pure axis permutation: torch tensor = omnijax leaf.transpose(axes)."""

  name: str
  axes: tuple[int, ...]

  def hf_shape(self, shape: Shape) -> Shape:
    if len(shape) != len(self.axes):
      raise ValueError(f"a {self.name} kernel has rank {len(self.axes)}")
    return tuple(shape[a] for a in self.axes)

  def to_hf(self, w: Array) -> Array:
    return w.transpose(self.axes)

  def from_hf(self, w: Array, shape: Shape) -> Array:
    return w.transpose(np.argsort(self.axes))


@dataclasses.dataclass(frozen=True)
class PatchEmbed(Transform):
  """A patch embedding kernel (prod(patch), out) over flattened patches <-> the torch ConvNd
  weight (out, *patch) whose stride equals its kernel (the vision Conv3d: patch = (C, T, p, p))."""

  patch: tuple[int, ...]

  def hf_shape(self, shape: Shape) -> Shape:
    if len(shape) != 2 or shape[0] != math.prod(self.patch):
      raise ValueError(f"a patch embedding kernel is ({math.prod(self.patch)}, out)")
    return (shape[1], *self.patch)

  def to_hf(self, w: Array) -> Array:
    return w.T.reshape(self.hf_shape(w.shape))

  def from_hf(self, w: Array, shape: Shape) -> Array:
    return w.reshape(w.shape[0], -1).T


COPY = Copy()
FLAT = Flat()  # "bias": flattened on export, reshaped on import
LINEAR = Linear(1)
# flax Conv kernel (k, in / groups, out) <-> torch Conv1d weight (out, in / groups, k)
CONV1D = Permute("conv1d", (2, 1, 0))
# (k, in, out) <-> torch ConvTranspose1d weight (in, out, k), unflipped: input t adds
# x[t] @ kernel[j] to output t * stride + j, as torch (`models.conv.CausalConvTranspose1d`); in lax
# terms conv_transpose(x, kernel, (s,), "VALID", ("NWC", "WOI", "NWC"), transpose_kernel=True),
# or kernel[::-1] without transpose_kernel (flax's nn.ConvTranspose default would need the flip)
CONV1D_TRANSPOSE = Permute("conv1d_transpose", (1, 2, 0))
# flax HWIO kernel (kh, kw, in, out) <-> torch Conv2d weight (out, in, kh, kw)
CONV2D = Permute("conv2d", (3, 2, 0, 1))


# ----------------------------------------------------------------------------------------------
# Key maps
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Entry:
  ours: str  # '/'-joined leaf path (inside a LayerGroup: relative to the group's `ours`)
  hf: str  # transformers key (inside a LayerGroup: after the layer prefix); {e} for Experts
  transform: Transform


@dataclasses.dataclass(frozen=True)
class LayerGroup:
  """A scanned block: leaves ``{ours}/{entry.ours}`` of shape (count, ...) <-> for each layer
  i in [first, first + count) the keys ``{hf with i}.{entry.hf}``."""

  ours: str  # e.g. "model/layers_0_4"
  hf: str  # layer key prefix with {i}, e.g. "thinker.model.layers.{i}"
  first: int
  count: int
  entries: tuple[Entry, ...]


Part = Entry | LayerGroup


@dataclasses.dataclass(frozen=True)
class KeyMap:
  """The tensors of one part of the model (or of several: `+`), in export order."""

  parts: tuple[Part, ...]

  def __post_init__(self):
    object.__setattr__(self, "parts", tuple(self.parts))
    for part in self.parts:
      if isinstance(part, LayerGroup) and "{i}" not in part.hf:
        raise ValueError(f"layer group {part.ours}: key prefix {part.hf!r} has no {{i}}.")
    _leaf_specs(self)  # each path mapped once
    keys = set()
    for _, _, template, t in _walk(self):
      if ("{e}" in template) != isinstance(t, Experts) or "{i}" in template:
        raise ValueError(f"key {template!r}: {{e}} is for Experts only, {{i}} for group prefixes.")
      if template in keys:
        raise ValueError(f"transformers key {template!r} is mapped twice.")
      keys.add(template)

  def __add__(self, other: KeyMap) -> KeyMap:
    return KeyMap(self.parts + other.parts)

  def under(self, path: str) -> KeyMap:
    """The same map for a params tree that holds this part's tree at `path`."""
    return KeyMap(dataclasses.replace(p, ours=f"{path}/{p.ours}") for p in self.parts)


def _leaf_specs(keymap: KeyMap) -> dict[str, tuple[Shape, Transform, str]]:
  """omnijax path -> (its leading layer dims, transform, key template), for every leaf mapped."""
  specs = {}
  for part in keymap.parts:
    group = isinstance(part, LayerGroup)
    for e in part.entries if group else (part,):
      path = f"{part.ours}/{e.ours}" if group else e.ours
      if path in specs:
        raise ValueError(f"omnijax param {path} is mapped twice.")
      key = f"{part.hf}.{e.hf}" if group else e.hf
      specs[path] = ((part.count,) if group else (), e.transform, key)
  return specs


def _walk(keymap: KeyMap) -> Iterator[tuple[str, tuple[int, ...], str, Transform]]:
  """(omnijax path, layer index within its stack (or ()), key template, transform) in export
  order: layer-major within a group."""
  for part in keymap.parts:
    if isinstance(part, Entry):
      yield part.ours, (), part.hf, part.transform
      continue
    for n in range(part.count):
      prefix = part.hf.format(i=part.first + n)
      for e in part.entries:
        yield f"{part.ours}/{e.ours}", (n,), f"{prefix}.{e.hf}", e.transform


def _pieces(template: str, t: Transform) -> list[tuple[str, tuple[int, ...], Transform]]:
  """(key, expert index (or ()), transform) of each torch tensor of one leaf or layer slice."""
  if isinstance(t, Experts):
    return [(template.format(e=e), (e,), t.inner) for e in range(t.num)]
  return [(template, (), t)]


def _flatten(params: Mapping) -> dict:
  """'/'-joined leaves of a (possibly boxed) params tree."""
  return traverse_util.flatten_dict(nn.meta.unbox(params), sep="/")


def _check_leaves(keymap: KeyMap, shapes: Mapping[str, Shape]) -> None:
  """Raises CheckpointError unless `shapes` has exactly the leaves of `keymap`, each stacking
  its group's layer count and of a shape its transform accepts."""
  specs = _leaf_specs(keymap)
  missing = [path for path in specs if path not in shapes]
  if missing:
    raise CheckpointError(
      f"omnijax params have no leaf {missing[:5]} ({len(missing)} missing); are they the "
      "params tree of this config?"
    )
  unmapped = sorted(set(shapes) - set(specs))
  if unmapped:
    raise CheckpointError(f"no checkpoint mapping for omnijax params {unmapped}")
  for path, (layers, t, key) in specs.items():
    shape = tuple(shapes[path])
    try:
      if shape[: len(layers)] != layers:
        raise ValueError(f"the key map stacks {layers[0]} layers")
      t.hf_shape(shape[len(layers) :])
    except ValueError as err:
      raise CheckpointError(
        f"omnijax param {path} has shape {shape}, but {err} (for {key!r})."
      ) from None


def hf_keys(keymap: KeyMap) -> list[str]:
  """Every transformers key of `keymap`, in export order."""
  return [k for _, _, template, t in _walk(keymap) for k, _, _ in _pieces(template, t)]


def iter_to_hf(
  params: Mapping, keymap: KeyMap, dtype: np.dtype | None = None
) -> Iterator[tuple[str, Array]]:
  """omnijax params (possibly boxed; numpy, or arrays that read the part indexed, such as
  TensorStores) -> (transformers key, numpy tensor, cast to `dtype` when given), lazily: one
  tensor read at a time. The leaves and their shapes are checked before the first tensor."""
  flat = _flatten(params)
  _check_leaves(keymap, {k: tuple(np.shape(v)) for k, v in flat.items()})

  def tensors():
    for path, index, template, t in _walk(keymap):
      leaf = flat[path]
      w = leaf[index] if index else leaf
      for key, e, piece in _pieces(template, t):
        yield key, np.asarray(piece.to_hf(np.asarray(w[e])), dtype, order="C")

  return tensors()


def to_hf(params: Mapping, keymap: KeyMap) -> dict[str, Array]:
  """omnijax params -> {transformers key: numpy tensor}, in export order."""
  return dict(iter_to_hf(params, keymap))


@dataclasses.dataclass(frozen=True)
class Slot:
  """Where one transformers tensor goes: `index` (layer, expert) into omnijax leaf `path`, a
  part of omnijax shape `shape`, converted by `transform`."""

  key: str
  path: str
  index: tuple[int, ...]
  shape: Shape
  transform: Transform

  def from_hf(self, w: Array) -> Array:
    """The checkpoint tensor `w` of `key` as this slot's omnijax array (CheckpointError naming
    the key when its shape is not the one the model config needs)."""
    want = self.transform.hf_shape(self.shape)
    if tuple(w.shape) != want:
      where = list(self.index) if self.index else ""
      raise CheckpointError(
        f"checkpoint tensor {self.key!r} has shape {tuple(w.shape)}, but the model config needs "
        f"{want} (for omnijax param {self.path}{where} of shape {self.shape})."
      )
    return self.transform.from_hf(w, self.shape)


def slots(keymap: KeyMap, shapes: Mapping[str, Shape]) -> list[Slot]:
  """The slot of every transformers key of `keymap` in omnijax leaves of `shapes` ('/'-joined
  path -> shape; checked to be exactly the mapped leaves), in export order."""
  _check_leaves(keymap, shapes)
  out = []
  for path, index, template, t in _walk(keymap):
    for key, e, piece in _pieces(template, t):
      where = index + e
      out.append(Slot(key, path, where, tuple(shapes[path][len(where) :]), piece))
  return out


def leaf_shapes(abstract_params: Mapping) -> dict[str, tuple[Shape, np.dtype]]:
  """'/'-joined path -> (shape, dtype) of each leaf of a (possibly boxed) params tree."""
  return {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in _flatten(abstract_params).items()}


def from_hf(get: Callable[[str], Array], abstract_params: Mapping, keymap: KeyMap) -> dict:
  """The inverse of `to_hf`: numpy params shaped and typed like `abstract_params` (possibly
  boxed ShapeDtypeStructs or arrays; every leaf must be mapped by `keymap`).

  `get(key)` returns the checkpoint tensor of a transformers key (and raises CheckpointError
  naming the key when it is absent).
  """
  leaves = leaf_shapes(abstract_params)
  out = {path: np.empty(shape, dtype) for path, (shape, dtype) in leaves.items()}
  for slot in slots(keymap, {path: shape for path, (shape, _) in leaves.items()}):
    out[slot.path][slot.index] = slot.from_hf(np.asarray(get(slot.key)))  # cast to the leaf's dtype
  return traverse_util.unflatten_dict(out, sep="/")


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------


def _linears(ours: str, hf: str, names: Iterable[str], n_in: int = 1) -> list[Entry]:
  """Bias-free projections `{ours}/{name}` (kernels) <-> `{hf}.{name}.weight`."""
  return [Entry(f"{ours}/{p}", f"{hf}.{p}.weight", Linear(n_in)) for p in names]


def _dense(ours: str, hf: str, n_in: int = 1, bias: Transform | None = FLAT) -> list[Entry]:
  """A module with `kernel` (and `bias`) <-> a torch Linear's weight (and bias)."""
  e = [Entry(f"{ours}/kernel", f"{hf}.weight", Linear(n_in))]
  return e + [Entry(f"{ours}/bias", f"{hf}.bias", bias)] if bias else e


def _norm(ours: str, hf: str, scale: str = "scale", t: Transform = FLAT) -> list[Entry]:
  """A LayerNorm (`scale` or `weight`, `bias`) <-> torch's (weight, bias)."""
  return [Entry(f"{ours}/{scale}", f"{hf}.weight", t), Entry(f"{ours}/bias", f"{hf}.bias", t)]


def decoder_layer_entries(cfg: TextConfig, moe: bool) -> list[Entry]:
  """One layer of a decoder block (`omnijax.models.decoder.DecoderLayer`)."""
  norms = ("input_layernorm", "post_attention_layernorm")
  e = [Entry(f"{p}/weight", f"{p}.weight", COPY) for p in norms]
  e += _linears("self_attn", "self_attn", ("q_proj", "k_proj", "v_proj"))
  e += _linears("self_attn", "self_attn", ("o_proj",), n_in=2)  # (heads, head_dim, embed)
  if cfg.qk_norm:
    e += [
      Entry(f"self_attn/{p}/weight", f"self_attn.{p}.weight", COPY) for p in ("q_norm", "k_norm")
    ]
  if cfg.layer_scale_initial_scale:
    scales = ("self_attn_layer_scale", "mlp_layer_scale")
    e += [Entry(f"{p}/scale", f"{p}.scale", COPY) for p in scales]
  mlp = ("gate_proj", "up_proj", "down_proj")
  if not moe:
    return e + _linears("mlp", "mlp", mlp)
  e.append(Entry("mlp/gate", "mlp.gate.weight", LINEAR))
  e += [
    Entry(f"mlp/experts_{p}", f"mlp.experts.{{e}}.{p}.weight", Experts(cfg.num_experts))
    for p in mlp
  ]
  if cfg.shared_expert_intermediate_size:
    e += _linears("mlp/shared_expert", "mlp.shared_expert", mlp)
    e.append(Entry("mlp/shared_expert_gate", "mlp.shared_expert_gate.weight", LINEAR))
  return e


def decoder_keymap(cfg: TextConfig, prefix: str) -> KeyMap:
  """A decoder stack's params (`layers_{first}_{end}` blocks, `norm`) <-> `{prefix}.layers.{i}.*`
  and `{prefix}.norm.weight`."""
  groups = [
    LayerGroup(
      f"layers_{first}_{first + count}",
      f"{prefix}.layers.{{i}}",
      first,
      count,
      tuple(decoder_layer_entries(cfg, moe)),
    )
    for moe, first, count in cfg.layer_blocks()
  ]
  return KeyMap([*groups, Entry("norm/weight", f"{prefix}.norm.weight", COPY)])


def text_keymap(cfg: TextConfig, prefix: str = "thinker") -> KeyMap:
  """The Thinker's text decoder params: embed_tokens, model/{layers_*, norm}, lm_head."""
  return (
    KeyMap([Entry("embed_tokens", f"{prefix}.model.embed_tokens.weight", COPY)])
    + decoder_keymap(cfg, f"{prefix}.model").under("model")
    + KeyMap([Entry("lm_head", f"{prefix}.lm_head.weight", LINEAR)])
  )


TALKER_PREFIX = "talker"


def talker_keymap(cfg: TalkerConfig, prefix: str = TALKER_PREFIX) -> KeyMap:
  """The Talker's params (`omnijax.models.talker.Talker`): codec embedding, MoE decoder, codec
  head, the two projections, and the code predictor, whose per-codebook embedding tables and
  heads are stacked on a leading axis in omnijax (``{e}``: one transformers tensor each)."""
  groups = cfg.num_code_groups - 1
  top = [Entry("codec_embedding", f"{prefix}.model.codec_embedding.weight", COPY)]
  top.append(Entry("codec_head", f"{prefix}.codec_head.weight", LINEAR))
  for proj in ("text_projection", "hidden_projection"):
    for fc in ("linear_fc1", "linear_fc2"):
      top += _dense(f"{proj}/{fc}", f"{prefix}.{proj}.{fc}", bias=COPY)
  mtp = f"{prefix}.code_predictor"
  top += [
    Entry(
      "code_predictor/codec_embedding",
      f"{mtp}.model.codec_embedding.{{e}}.weight",
      Experts(groups, COPY),
    ),
    Entry("code_predictor/lm_head", f"{mtp}.lm_head.{{e}}.weight", Experts(groups, LINEAR)),
  ]
  return (
    KeyMap(top)
    + decoder_keymap(cfg.text, f"{prefix}.model").under("model")
    + decoder_keymap(cfg.code_predictor, f"{mtp}.model").under("code_predictor/model")
  )


AUDIO_PREFIX = "thinker.audio_tower"


def audio_keymap(cfg: AudioEncoderConfig, prefix: str = AUDIO_PREFIX) -> KeyMap:
  """The AuT audio encoder's params. Vectors are flattened (q/k/v biases are (heads, head_dim));
  conv_out's kernel (channels, freq, d_model) flattens channel-major like the reference's
  ``view(b, t, c * f)``; the reference's sinusoidal table is a non-persistent buffer (not in the
  state dict), recomputed by the module."""
  top = []
  for i in (1, 2, 3):
    top += [
      Entry(f"conv2d{i}/kernel", f"{prefix}.conv2d{i}.weight", CONV2D),  # over (mel, time)
      Entry(f"conv2d{i}/bias", f"{prefix}.conv2d{i}.bias", FLAT),
    ]
  top += _dense("conv_out", f"{prefix}.conv_out", n_in=2, bias=None)
  top += _norm("ln_post", f"{prefix}.ln_post")
  top += _dense("proj1", f"{prefix}.proj1") + _dense("proj2", f"{prefix}.proj2")
  layer = [e for p in ("q", "k", "v") for e in _dense(f"self_attn/{p}_proj", f"self_attn.{p}_proj")]
  layer += _dense("self_attn/out_proj", "self_attn.out_proj", n_in=2)
  layer += _norm("self_attn_layer_norm", "self_attn_layer_norm")
  layer += _dense("fc1", "fc1") + _dense("fc2", "fc2")
  layer += _norm("final_layer_norm", "final_layer_norm")
  group = LayerGroup("layers", f"{prefix}.layers.{{i}}", 0, cfg.encoder_layers, tuple(layer))
  return KeyMap([*top, group])


VISION_PREFIX = "thinker.visual"


def vision_keymap(cfg: VisionEncoderConfig, prefix: str = VISION_PREFIX) -> KeyMap:
  """The vision encoder's params. Its scanned block runs (`blocks_{first}_{end}`, see
  `vision.layer_segments`: every deepstack tap ends a run) share the `blocks.{i}` keys."""
  patch = (cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
  top = [
    Entry("patch_embed/kernel", f"{prefix}.patch_embed.proj.weight", PatchEmbed(patch)),
    Entry("patch_embed/bias", f"{prefix}.patch_embed.proj.bias", COPY),
    Entry("pos_embed", f"{prefix}.pos_embed.weight", COPY),
  ]
  deepstack = [
    (f"merger_list_{k}", f"merger_list.{k}") for k in range(len(cfg.deepstack_visual_indexes))
  ]
  for ours, hf in [("merger", "merger"), *deepstack]:
    top += _norm(f"{ours}/ln_q", f"{prefix}.{hf}.ln_q", "weight", COPY)
    for m in ("mlp_0", "mlp_2"):
      top += _dense(f"{ours}/{m}", f"{prefix}.{hf}.{m.replace('_', '.')}", bias=COPY)
  block = _norm("norm1", "norm1", "weight", COPY) + _norm("norm2", "norm2", "weight", COPY)
  block += [
    Entry("attn_qkv/kernel", "attn.qkv.weight", LINEAR),  # (D, 3, heads, head_dim)
    Entry("attn_qkv/bias", "attn.qkv.bias", FLAT),
  ]
  block += _dense("attn_proj", "attn.proj", n_in=2, bias=COPY)  # (heads, head_dim, D)
  for m in ("linear_fc1", "linear_fc2"):
    block += _dense(f"mlp_{m}", f"mlp.{m}", bias=COPY)
  groups = [
    LayerGroup(segment_name(first, count), f"{prefix}.blocks.{{i}}", first, count, tuple(block))
    for first, count in layer_segments(cfg)
  ]
  return KeyMap([*top, *groups])


CODE2WAV_PREFIX = "code2wav"


def _conv(ours: str, hf: str, kernel: Transform = CONV1D) -> list[Entry]:
  """A conv module (`kernel`, `bias`) <-> a torch conv's (weight, bias)."""
  return [
    Entry(f"{ours}/kernel", f"{hf}.weight", kernel),
    Entry(f"{ours}/bias", f"{hf}.bias", COPY),
  ]


def _snake(ours: str, hf: str) -> list[Entry]:
  return [Entry(f"{ours}/{p}", f"{hf}.{p}", COPY) for p in ("alpha", "beta")]


def code2wav_keymap(cfg: Code2WavConfig, prefix: str = CODE2WAV_PREFIX) -> KeyMap:
  """Code2Wav's params (`omnijax.models.code2wav.Code2Wav`, released form) <-> transformers'
  ``Qwen3OmniMoeCode2Wav`` keys under `prefix`. Its causal convs wrap a torch conv in ``.conv``;
  a ConvNeXt upsampler is ``upsample.{i}.{0: transposed conv, 1: ConvNeXt}``; a decoder block is
  ``decoder.{b}.block.{0: SnakeBeta, 1: transposed conv, 2-4: residual units}``."""
  top = []
  for i in range(len(cfg.upsampling_ratios)):
    ours, hf = f"upsample_{i}", f"{prefix}.upsample.{i}"
    top += _conv(f"{ours}/conv", f"{hf}.0.conv", CONV1D_TRANSPOSE)
    top += _conv(f"{ours}/convnext/dwconv", f"{hf}.1.dwconv.conv")
    top += _norm(f"{ours}/convnext/norm", f"{hf}.1.norm", "weight", COPY)
    top += _dense(f"{ours}/convnext/pwconv1", f"{hf}.1.pwconv1", bias=COPY)
    top += _dense(f"{ours}/convnext/pwconv2", f"{hf}.1.pwconv2", bias=COPY)
    top.append(Entry(f"{ours}/convnext/gamma", f"{hf}.1.gamma", COPY))
  dec = f"{prefix}.decoder"
  top += _conv("decoder_0", f"{dec}.0.conv")
  blocks = len(cfg.upsample_rates)
  for b in range(1, blocks + 1):
    block = f"{dec}.{b}.block"
    top += _snake(f"decoder_{b}/snake", f"{block}.0")
    top += _conv(f"decoder_{b}/upconv", f"{block}.1.conv", CONV1D_TRANSPOSE)
    for j in range(len(DILATIONS)):
      ours, hf = f"decoder_{b}/res_{j}", f"{block}.{j + 2}"
      top += _snake(f"{ours}/act1", f"{hf}.act1") + _conv(f"{ours}/conv1", f"{hf}.conv1.conv")
      top += _snake(f"{ours}/act2", f"{hf}.act2") + _conv(f"{ours}/conv2", f"{hf}.conv2.conv")
  top += _snake(f"decoder_{blocks + 1}", f"{dec}.{blocks + 1}")
  top += _conv(f"decoder_{blocks + 2}", f"{dec}.{blocks + 2}.conv")
  pre = decoder_keymap(cfg.transformer(), f"{prefix}.pre_transformer").under("pre_transformer")
  return (
    KeyMap([Entry("code_embedding", f"{prefix}.code_embedding.weight", COPY)]) + pre + KeyMap(top)
  )
