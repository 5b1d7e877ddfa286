"""omnijax params <-> a transformers Qwen3-Omni checkpoint directory.

The directory holds ``config.json`` (a ``Qwen3OmniMoeConfig``) and safetensors in the released
Hub layout, which ``Qwen3OmniMoeForConditionalGeneration.from_pretrained`` loads:
- the Thinker: ``thinker.model.layers.N...`` (one tensor per expert), ``thinker.audio_tower.*``,
  ``thinker.visual.*``;
- optionally the Talker (``talker.*``, ``talker_config``; ``enable_audio_output`` on);
- optionally a Code2Wav vocoder (``code2wav.*``, ``code2wav_config``). Without a Talker,
  ``enable_audio_output`` is off and transformers' from_pretrained skips the code2wav tensors
  (quietly, transformers 5.23); ``load_code2wav_hf`` and ``omnijax.load(dir).code2wav`` read
  them, as they read a released checkpoint's;
and with a tokenizer, the tokenizer and processor files of ``tokenizer_files``
(``AutoTokenizer``, ``AutoProcessor``).
"""

from __future__ import annotations

import itertools
import json
import math
from typing import Any, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util

from omnijax import paths
from omnijax.hf import safetensors_io, streaming, tokenizer_files
from omnijax.hf.hf_config import (
  code2wav_config_from_hf,
  code2wav_config_to_hf,
  from_hf_config,
  talker_config_from_hf,
  to_hf_config,
)
from omnijax.hf.keymap import (
  CODE2WAV_PREFIX,
  TALKER_PREFIX,
  CheckpointError,
  KeyMap,
  audio_keymap,
  code2wav_keymap,
  from_hf,
  iter_to_hf,
  leaf_shapes,
  slots,
  talker_keymap,
  text_keymap,
  vision_keymap,
)
from omnijax.processing import media
from omnijax.models.code2wav import Code2Wav
from omnijax.models.config import Code2WavConfig, ImplConfig, TalkerConfig, ThinkerConfig
from omnijax.models.talker import Talker
from omnijax.models.thinker import Thinker

PartConfig = ThinkerConfig | TalkerConfig | Code2WavConfig

TOWERS = ("audio_tower", "visual")  # the towers' subtrees of the Thinker params; the rest is text

CONFIG_FILE = "config.json"
EXPORT_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


def abstract_params(cfg: ThinkerConfig):
  """ShapeDtypeStructs of the Thinker's params (dtype: cfg.impl.param_dtype)."""
  model = Thinker(cfg)
  ids = jnp.zeros((1, 1), jnp.int32)
  return jax.eval_shape(
    lambda: nn.meta.unbox(
      model.init(jax.random.key(0), ids, media=media.empty_media(cfg, 1))["params"]
    )
  )


def thinker_keymap(cfg: ThinkerConfig) -> KeyMap:
  """The Thinker's params (text decoder, audio_tower, visual) <-> its `thinker.*` keys."""
  return (
    text_keymap(cfg.text)
    + audio_keymap(cfg.audio).under("audio_tower")
    + vision_keymap(cfg.vision).under("visual")
  )


def abstract_code2wav_params(cfg: Code2WavConfig):
  """ShapeDtypeStructs (float32) of the released-form Code2Wav's params."""
  codes = jnp.zeros((1, cfg.num_quantizers, 1), jnp.int32)
  return jax.eval_shape(
    lambda: nn.meta.unbox(Code2Wav(cfg).init(jax.random.key(0), codes)["params"])
  )


def abstract_talker_params(cfg: TalkerConfig, impl: ImplConfig = ImplConfig()):
  """ShapeDtypeStructs of the Talker's params (dtype: impl.param_dtype)."""
  b, s, groups = 1, 2, cfg.num_code_groups
  thinker_width = jnp.zeros((b, s, cfg.thinker_hidden_size))
  args = (
    thinker_width,
    thinker_width,
    jnp.zeros((b, s), bool),
    jnp.zeros((b, s, groups), jnp.int32),
    jnp.zeros((3, b, s)),
    jnp.ones((b, s), jnp.int32),
    jnp.zeros((b, 1), jnp.int32),
    jnp.zeros((b, 1, groups), jnp.int32),
  )
  return jax.eval_shape(
    lambda: nn.meta.unbox(Talker(cfg, impl).init(jax.random.key(0), *args)["params"])
  )


def _part(cfg: PartConfig) -> tuple[str, Any, Any]:
  """(name, abstract params, key map) of one part of the model."""
  if isinstance(cfg, Code2WavConfig):
    return "Code2Wav ", abstract_code2wav_params(cfg), code2wav_keymap(cfg)
  if isinstance(cfg, TalkerConfig):
    return "Talker ", abstract_talker_params(cfg), talker_keymap(cfg)
  return "", abstract_params(cfg), thinker_keymap(cfg)


def check_params(cfg: PartConfig, params) -> None:
  """Raises CheckpointError unless `params` has exactly the leaves and shapes `cfg` implies."""
  name, abstract, _ = _part(cfg)
  want = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(abstract, sep="/").items()}
  have = {
    k: tuple(np.shape(v))
    for k, v in traverse_util.flatten_dict(nn.meta.unbox(params), sep="/").items()
  }
  problems = [f"missing {k}" for k in sorted(set(want) - set(have))]
  problems += [f"unexpected {k}" for k in sorted(set(have) - set(want))]
  problems += [
    f"{k}: shape {have[k]}, config needs {want[k]}"
    for k in sorted(set(want) & set(have))
    if have[k] != want[k]
  ]
  if problems:
    raise CheckpointError(
      f"{name}params do not match the model "
      "config: "
      + "; ".join(problems[:10])
      + (f" (and {len(problems) - 10} more)" if len(problems) > 10 else "")
    )


def hf_sizes(cfg: PartConfig, dtype: str = "float32") -> list[tuple[str, int]]:
  """(transformers key, bytes in `dtype`) of every tensor of a Thinker, Talker or Code2Wav, in
  the order `hf_tensors` yields them."""
  _, abstract, keymap = _part(cfg)
  shapes = {path: shape for path, (shape, _) in leaf_shapes(abstract).items()}
  itemsize = np.dtype(EXPORT_DTYPES[dtype]).itemsize
  return [
    (s.key, math.prod(s.transform.hf_shape(s.shape)) * itemsize) for s in slots(keymap, shapes)
  ]


def hf_tensors(cfg: PartConfig, params, dtype: str = "float32") -> Iterator[tuple[str, Any]]:
  """(transformers key, numpy tensor in `dtype`) of every tensor of a Thinker, Talker or
  Code2Wav, lazily."""
  return iter_to_hf(params, _part(cfg)[2], EXPORT_DTYPES[dtype])


def save_hf(
  cfg: ThinkerConfig,
  params,
  out_dir: paths.PathLike,
  *,
  dtype: str = "float32",
  max_shard_size: str | int = safetensors_io.DEFAULT_MAX_SHARD_SIZE,
  tokenizer=None,
  talker: tuple[TalkerConfig, Any] | None = None,
  code2wav: tuple[Code2WavConfig, Any] | None = None,
) -> list[str]:
  """Writes config.json + safetensors to out_dir, and the tokenizer and processor files when
  given a `tokenizer` (a data_pipelines TextTokenizer), the ``talker.*`` tensors and
  ``talker_config`` when given `talker` (TalkerConfig, params), and the ``code2wav.*`` tensors
  and ``code2wav_config`` when given `code2wav` (Code2WavConfig, released-form params); returns
  the safetensors file names."""
  if dtype not in EXPORT_DTYPES:
    raise ValueError(f"dtype {dtype!r} is not one of {list(EXPORT_DTYPES)}.")
  # refuses unexportable configs before writing anything
  hf_config = to_hf_config(cfg, dtype, None if talker is None else talker[0])
  parts = [(cfg, params)]
  if talker is not None:
    parts.append(talker)
  if code2wav is not None:
    code2wav[0].validate()
    hf_config["code2wav_config"] = code2wav_config_to_hf(code2wav[0])
    parts.append(code2wav)
  for part in parts:
    check_params(*part)
  if tokenizer is not None:
    tokenizer_files.check(tokenizer, cfg)
  out_dir = paths.path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  files = safetensors_io.write(
    itertools.chain.from_iterable(hf_tensors(*part, dtype) for part in parts),
    out_dir,
    [size for part_cfg, _ in parts for size in hf_sizes(part_cfg, dtype)],
    safetensors_io.parse_size(max_shard_size),
  )
  (out_dir / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")
  if tokenizer is not None:
    tokenizer_files.write(out_dir, tokenizer, cfg)
  return files


def is_hf_dir(path: paths.PathLike) -> bool:
  path = paths.path(path)
  return (path / CONFIG_FILE).exists() and (
    (path / safetensors_io.SINGLE_FILE).exists() or (path / safetensors_io.INDEX_FILE).exists()
  )


def _hf_config(hf_dir: paths.PathLike) -> dict:
  path = paths.path(hf_dir) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(
      f"{path} not found: --hf must be a transformers checkpoint directory (config.json + "
      "safetensors)."
    )
  return json.loads(path.read_text())


def _holds(reader: safetensors_io.Reader, prefix: str) -> bool:
  return any(k.startswith(prefix + ".") for k in reader.keys())


def thinker_config_hf(hf_dir: paths.PathLike, impl: ImplConfig = ImplConfig()) -> ThinkerConfig:
  """The ThinkerConfig of a transformers checkpoint directory."""
  return from_hf_config(_hf_config(hf_dir), impl)


def talker_config_hf(
  reader: safetensors_io.Reader, thinker: ThinkerConfig | None = None
) -> TalkerConfig | None:
  """The TalkerConfig of the checkpoint `reader` reads (checked against the `thinker` it
  follows); None when it holds no ``talker.*`` tensors."""
  if not _holds(reader, TALKER_PREFIX):
    return None
  d = _hf_config(reader.dir)
  if "talker_config" not in d:
    raise CheckpointError(
      f"{reader.dir} holds {TALKER_PREFIX}.* tensors but its {CONFIG_FILE} has no talker_config."
    )
  return talker_config_from_hf(d, thinker)


def code2wav_config_hf(reader: safetensors_io.Reader) -> Code2WavConfig | None:
  """The Code2WavConfig of the checkpoint `reader` reads (an omnijax export with code2wav, or a
  released Qwen3-Omni checkpoint); None when it holds no ``code2wav.*`` tensors (transformers
  writes a default code2wav_config into every Qwen3-Omni config.json, so the tensors decide)."""
  if not _holds(reader, CODE2WAV_PREFIX):
    return None
  d = _hf_config(reader.dir)
  if "code2wav_config" not in d:
    raise CheckpointError(
      f"{reader.dir} holds {CODE2WAV_PREFIX}.* tensors but its {CONFIG_FILE} has no "
      "code2wav_config."
    )
  return code2wav_config_from_hf(d["code2wav_config"])


def has_code2wav(hf_dir: paths.PathLike) -> bool:
  """Whether a transformers checkpoint directory holds ``code2wav.*`` tensors."""
  return _holds(safetensors_io.Reader(hf_dir), CODE2WAV_PREFIX)


def has_talker(hf_dir: paths.PathLike) -> bool:
  """Whether a transformers checkpoint directory holds ``talker.*`` tensors."""
  return _holds(safetensors_io.Reader(hf_dir), TALKER_PREFIX)


def _load(reader: safetensors_io.Reader, cfg: PartConfig | None):
  """(cfg, numpy params of its part) read by `reader`; None without a cfg."""
  if cfg is None:
    return None
  _, abstract, keymap = _part(cfg)
  return cfg, from_hf(reader, abstract, keymap)


def load_hf(hf_dir: paths.PathLike, impl: ImplConfig = ImplConfig()) -> tuple[ThinkerConfig, Any]:
  """(ThinkerConfig, numpy params) of the Thinker in a transformers checkpoint directory."""
  cfg = thinker_config_hf(hf_dir, impl)
  return _load(safetensors_io.Reader(hf_dir), cfg)


def load_talker_hf(
  hf_dir: paths.PathLike, thinker: ThinkerConfig | None = None
) -> tuple[TalkerConfig, Any] | None:
  """(TalkerConfig, numpy params) of the Talker in a transformers checkpoint directory (checked
  against the `thinker` it follows); None when it holds no ``talker.*`` tensors."""
  reader = safetensors_io.Reader(hf_dir)
  return _load(reader, talker_config_hf(reader, thinker))


def load_code2wav_hf(hf_dir: paths.PathLike) -> tuple[Code2WavConfig, Any] | None:
  """(Code2WavConfig, numpy float32 params) of the Code2Wav in a transformers checkpoint
  directory; None when it holds no ``code2wav.*`` tensors."""
  reader = safetensors_io.Reader(hf_dir)
  return _load(reader, code2wav_config_hf(reader))


def stream_params(reader: safetensors_io.Reader, cfg: PartConfig):
  """The params of a Thinker, Talker or Code2Wav as `streaming.Leaf`s read by `reader`: what
  `streaming.save` writes in bounded memory."""
  _, abstract, keymap = _part(cfg)
  return streaming.leaves(reader, abstract, keymap)
