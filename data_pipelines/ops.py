"""Registry of named per-example preprocessing ops (big_vision style).

Configs list ops by spec string, applied in order to the decoded example dict::

  cfg.ops = ("decode_text", "tokenize", "truncate(max_len=8192)", "lm_shift")

A spec is an op name, optionally called with keyword arguments whose values
are Python literals: ``name`` or ``name(key=literal, ...)``.

An op is registered with ``@register_op("name")`` on a factory
``factory(ctx: OpContext, **kwargs) -> op``, where ``op(example) -> example``
maps a dict to a dict. The factory runs once when the pipeline is built (put
validation and setup there); ``op`` runs per example, possibly in a grain
worker process (it must be picklable by cloudpickle: closures are fine).

An op rejects a bad example by raising ``BadRecord(reason)`` with one of
``SKIP_REASONS``; the pipeline then skips the example and counts it by reason.
Any other exception is a bug and propagates.

Modality modules register their ops the same way; ``build_ops`` imports them
when a spec names an op not registered yet: ``data_pipelines.audio``
(``decode_audio``, ``log_mel``), ``data_pipelines.vision`` (``decode_image``,
``resize_image``, ``patchify_image``), ``data_pipelines.video``
(``decode_video``) and ``data_pipelines.speech_codes`` (``speech_codes``).
"""

import ast
import dataclasses
import importlib
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

# Why a record was skipped. Generic on purpose, so that media decoders reuse
# them: "undecodable" (bytes that do not parse: record or media), "invalid_utf8",
# "empty" (nothing left after cleaning; also audio shorter than one STFT frame
# and images of no pixels), "missing_field". Media add:
# "missing_media" (a referenced media file does not exist), "bad_sample_rate"
# (outside 1 kHz..384 kHz), "non_finite" (NaN/inf samples), "silent_audio"
# (digital silence), "too_long" (longer than allowed where truncating would be
# wrong), "bad_aspect_ratio" (an image or video side over 200x the other),
# "too_short" (shorter than an op's minimum, e.g. speech under one codec frame).
# Append new reasons at the end (checkpointed counts are keyed by name).
SKIP_REASONS = (
  "undecodable",
  "invalid_utf8",
  "empty",
  "missing_field",
  "missing_media",
  "bad_sample_rate",
  "non_finite",
  "silent_audio",
  "too_long",
  "bad_aspect_ratio",
  "too_short",
)
# Modules whose import registers the modality ops (imported on first use, so
# that text-only users do not load the media libraries).
_MODALITY_MODULES = (
  "data_pipelines.audio",
  "data_pipelines.vision",
  "data_pipelines.video",
  "data_pipelines.speech_codes",
)

Example = dict[str, Any]
Op = Callable[[Example], Example]


class BadRecord(Exception):
  """Raised by an op to skip the current example; counted under ``reason``."""

  def __init__(self, reason: str, detail: str = ""):
    if reason not in SKIP_REASONS:
      raise ValueError(f"Unknown skip reason {reason!r}; use one of {SKIP_REASONS}")
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason = reason


@dataclasses.dataclass(frozen=True)
class OpContext:
  """What op factories may need besides their spec arguments."""

  tokenizer: Any = None  # data_pipelines.tokenizer.TextTokenizer


_REGISTRY: dict[str, Callable[..., Op]] = {}


def register_op(name: str):
  """Decorator registering an op factory under ``name``."""

  def decorator(factory: Callable[..., Op]) -> Callable[..., Op]:
    if name in _REGISTRY:
      raise ValueError(f"Op {name!r} is already registered")
    _REGISTRY[name] = factory
    return factory

  return decorator


def _import_modality_ops() -> None:
  for module in _MODALITY_MODULES:
    importlib.import_module(module)


def registered_ops() -> list[str]:
  _import_modality_ops()
  return sorted(_REGISTRY)


def parse_op_spec(spec: str) -> tuple[str, dict[str, Any]]:
  """``"truncate(max_len=8)"`` -> ``("truncate", {"max_len": 8})``."""
  try:
    node = ast.parse(spec.strip(), mode="eval").body
  except SyntaxError as e:
    raise ValueError(f"Op spec {spec!r} is not `name` or `name(k=v, ...)`") from e
  if isinstance(node, ast.Name):
    return node.id, {}
  if (
    isinstance(node, ast.Call)
    and isinstance(node.func, ast.Name)
    and not node.args
    and all(kw.arg is not None for kw in node.keywords)
  ):
    try:
      kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
    except ValueError as e:
      raise ValueError(f"Op spec {spec!r}: arguments must be literals") from e
    return node.func.id, kwargs
  raise ValueError(
    f"Op spec {spec!r} is not `name` or `name(key=literal, ...)` (keyword arguments only)"
  )


def build_ops(specs: Sequence[str], ctx: OpContext) -> list[Op]:
  """Instantiates the ops named by ``specs``; fails fast on unknown names."""
  if isinstance(specs, str):
    raise TypeError(f"ops must be a sequence of specs, got the string {specs!r}")
  ops = []
  for spec in specs:
    name, kwargs = parse_op_spec(spec)
    if name not in _REGISTRY:
      _import_modality_ops()
    if name not in _REGISTRY:
      raise ValueError(
        f"Unknown op {name!r} (spec {spec!r}). Registered ops: " + ", ".join(registered_ops())
      )
    try:
      ops.append(_REGISTRY[name](ctx, **kwargs))
    except TypeError as e:
      raise TypeError(f"Bad arguments in op spec {spec!r}: {e}") from e
  return ops


def require(example: Example, key: str) -> Any:
  """``example[key]``, or ``BadRecord("missing_field")``."""
  if key not in example:
    raise BadRecord("missing_field", key)
  return example[key]


def read_media_bytes(value: Any, media_dir: str | None = None) -> bytes:
  """Media given as bytes, or as a path (absolute or under ``media_dir``).

  Raises:
    BadRecord: ``missing_media`` if the path is not a readable file,
      ``undecodable`` for a value of another type.
  """
  if isinstance(value, (bytes, bytearray, memoryview)):
    return bytes(value)
  if isinstance(value, str):
    path = os.path.join(media_dir, value) if media_dir else value
    try:
      with open(path, "rb") as f:
        return f.read()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as e:
      raise BadRecord("missing_media", f"{path}: {e.strerror}") from e
  raise BadRecord("undecodable", f"media is {type(value).__name__}")


@register_op("decode_text")
def _decode_text(ctx: OpContext, key: str = "text") -> Op:
  """Validates ``example[key]`` as non-blank text (UTF-8 bytes are decoded)."""
  del ctx

  def op(example: Example) -> Example:
    text = require(example, key)
    if isinstance(text, bytes):
      try:
        text = text.decode("utf-8")
      except UnicodeDecodeError as e:
        raise BadRecord("invalid_utf8", str(e)) from e
    if not isinstance(text, str):
      raise BadRecord("undecodable", f"{key} is {type(text).__name__}")
    if not text.strip():
      raise BadRecord("empty", key)
    return {**example, key: text}

  return op


@register_op("tokenize")
def _tokenize(
  ctx: OpContext,
  key: str = "text",
  out_key: str = "tokens",
  append_eos: bool = True,
) -> Op:
  """``example[out_key]`` = int32 token ids of ``example[key]`` (+ EOS)."""
  tokenizer = ctx.tokenizer
  if tokenizer is None:
    raise ValueError("Op 'tokenize' needs a tokenizer in the OpContext")
  eos = np.array([tokenizer.eos_id], np.int32)

  def op(example: Example) -> Example:
    tokens = tokenizer.encode(require(example, key))
    if append_eos:
      tokens = np.concatenate([tokens, eos])
    return {**example, out_key: tokens}

  return op


@register_op("truncate")
def _truncate(ctx: OpContext, max_len: int, key: str = "tokens") -> Op:
  """Keeps the first ``max_len`` entries of ``example[key]``."""
  del ctx
  if max_len < 1:
    raise ValueError(f"truncate: max_len must be >= 1, got {max_len}")

  def op(example: Example) -> Example:
    return {**example, key: require(example, key)[:max_len]}

  return op


@register_op("lm_shift")
def _lm_shift(ctx: OpContext, key: str = "tokens") -> Op:
  """Next-token pairs within one document: ``inputs = t[:-1]``, ``targets = t[1:]``.

  Shifting each document before packing means no target ever crosses a
  document boundary. Drops ``key``; a document of fewer than 2 tokens has no
  pair and is skipped as ``"empty"``.
  """
  del ctx

  def op(example: Example) -> Example:
    tokens = np.asarray(require(example, key), np.int32)
    if len(tokens) < 2:
      raise BadRecord("empty", f"{key} has {len(tokens)} token(s)")
    out = {k: v for k, v in example.items() if k != key}
    out["inputs"] = tokens[:-1]
    out["targets"] = tokens[1:]
    return out

  return op
