"""Notebook API: load a Thinker from an omnijax workdir or a transformers directory and run it.

model = omnijax.load("/path/to/workdir")   # or a directory with config.json + safetensors
logits = model.logits([[1, 2, 3]])           # float32 numpy (B, S, V)
model.save_hf("/tmp/export")                  # same writer as `python -m omnijax.export to-hf`
ids = model.tokenizer.encode("a red cube")    # its tokenizer.json (tokenizer None: none)
out = model.generate([ids], max_new_tokens=32)  # prompt + new token ids (KV-cache decoding)
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from omnijax import decode
from omnijax.hf import convert, safetensors_io
from omnijax.processing import media as media_lib
from omnijax.processing import positions as positions_lib
from omnijax.models.config import ThinkerConfig
from omnijax.models.decoder import load_balancing_loss
from omnijax.models.thinker import MODALITIES, Thinker
from omnijax.train import checkpoint as ckpt_lib

MULTIMODAL_INPUTS = (
  "input_features",
  "feature_attention_mask",
  "audio_feature_lengths",
  "pixel_values",
  "image_grid_thw",
  "pixel_values_videos",
  "video_grid_thw",
  "use_audio_in_video",
  "video_second_per_grid",
  "attention_mask",
)


@functools.lru_cache(maxsize=None)
def _forward(config: ThinkerConfig):
  """The jitted forward of a config, shared by every Model of that config (compiled per shape:
  media buffers are bucketed, so varied media sizes share compilations)."""
  model = Thinker(config)
  return jax.jit(
    lambda p, ids, pos, seg, media: model.apply(
      {"params": p}, ids, positions=pos, segment_ids=seg, media=media
    )
  )


@functools.lru_cache(maxsize=None)
def _routing(config: ThinkerConfig):
  """The jitted forward that keeps every MoE layer's expert choices (layers, B, S, k)."""
  model = Thinker(config)

  def choices(p, ids, pos, seg, media):
    _, state = model.apply(
      {"params": p}, ids, positions=pos, segment_ids=seg, media=media, mutable=["intermediates"]
    )
    blocks = state["intermediates"]["model"]
    first = lambda name: int(name.split("_")[1])
    return jnp.concatenate(
      [blocks[n]["mlp"]["experts"][0] for n in sorted(blocks, key=first) if "mlp" in blocks[n]]
    )

  return jax.jit(choices)


class Model:
  """A Thinker's config and params with a forward pass jitted once per input shape."""

  def __init__(self, config: ThinkerConfig, params: Any, step: int | None = None, tokenizer=None):
    self.config = config
    self.params = jax.device_put(params)
    self.step = step  # the workdir checkpoint step loaded (None: init_params or transformers)
    self.tokenizer = tokenizer  # a data_pipelines TextTokenizer, or None

  def _run(self, input_ids, positions, multimodal: dict[str, Any]):
    ids, pos, seg, media = self._prepare(input_ids, positions, multimodal)
    return _forward(self.config)(
      self.params,
      jnp.asarray(ids, jnp.int32),
      jnp.asarray(pos, jnp.float32),
      None if seg is None else jnp.asarray(seg),
      media,
    )

  def _prepare(self, input_ids, positions, multimodal: dict[str, Any]):
    """Checked forward inputs: ids (B, S), positions (3, B, S), segment ids (B, S) int32 (None
    without attention_mask), media buffers; all numpy."""
    unknown = sorted(set(multimodal) - set(MULTIMODAL_INPUTS))
    if unknown:
      raise TypeError(
        f"unexpected argument(s) {unknown}; besides input_ids and positions the "
        f"model takes the transformers Thinker's {list(MULTIMODAL_INPUTS)}."
      )
    ids = _as_numpy(input_ids)
    if ids.ndim == 1:
      ids = ids[None]
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(
        f"input_ids must be integer token ids of shape (S,) or (B, S), got {ids.dtype} {ids.shape}."
      )
    vocab = self.config.text.vocab_size
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
      raise ValueError(
        f"input_ids must lie in [0, vocab_size={vocab}); got [{ids.min()}, {ids.max()}]."
      )
    mm = {
      k: _as_numpy(v)
      for k, v in multimodal.items()
      if v is not None and k not in ("use_audio_in_video", "attention_mask")
    }
    if "feature_attention_mask" in mm and "input_features" in mm:
      mm["audio_seqlens"] = mm["feature_attention_mask"].sum(-1)
    elif "audio_feature_lengths" in mm:
      mm["audio_seqlens"] = mm.pop("audio_feature_lengths")
      if "input_features" in mm:  # right-padded (N, mel, T) features of these lengths
        frames = mm["input_features"].shape[-1]
        mm["feature_attention_mask"] = np.arange(frames)[None] < np.asarray(
          mm["audio_seqlens"]
        ).reshape(-1, 1)
    attention_mask = multimodal.get("attention_mask")
    if attention_mask is not None:
      attention_mask = _as_numpy(attention_mask)
      if attention_mask.ndim == 1:  # with 1-D input_ids: batch 1
        attention_mask = attention_mask[None]
      if attention_mask.shape != ids.shape:
        raise ValueError(
          f"attention_mask must have the shape of input_ids {ids.shape}, got "
          f"{_as_numpy(multimodal['attention_mask']).shape}."
        )
    seg = None if attention_mask is None else np.asarray(attention_mask, np.int32)
    media = media_lib.from_hf_inputs(
      self.config,
      ids,
      **{
        k: mm[k]
        for k in (
          "input_features",
          "feature_attention_mask",
          "pixel_values",
          "image_grid_thw",
          "pixel_values_videos",
          "video_grid_thw",
        )
        if k in mm
      },
    )
    if positions is not None:
      pos = _as_numpy(positions)
      if pos.ndim == 2:
        pos = pos[:, None]
      if pos.shape != (3,) + ids.shape:
        raise ValueError(
          f"positions must have shape (3, B, S) = {(3,) + ids.shape} (T, H, W "
          f"rows; (3, S) for 1-D input_ids), got {_as_numpy(positions).shape}."
        )
    else:
      pos, _ = positions_lib.rope_index(
        ids,
        **positions_lib.rope_kwargs_from_config(self.config),
        dtype=np.float32,
        attention_mask=attention_mask,
        **{
          k: mm[k]
          for k in ("image_grid_thw", "video_grid_thw", "video_second_per_grid", "audio_seqlens")
          if k in mm
        },
      )
    return ids, pos, seg, media

  def logits(self, input_ids, positions=None, **multimodal) -> np.ndarray:
    """float32 logits (B, S, V) for input_ids (B, S) or (S,) (batch 1) as numpy, torch or lists.

    Multimodal inputs take transformers' names and layouts (`input_features`,
    `feature_attention_mask`, `pixel_values`, `image_grid_thw`, `pixel_values_videos`,
    `video_grid_thw`, `video_second_per_grid`, `use_audio_in_video`, `attention_mask`), with
    the placeholder tokens already in input_ids (as the transformers processor lays them out).
    positions: TM-RoPE ids (3, B, S); computed from the inputs (as transformers'
    get_rope_index) when omitted."""
    logits, _ = self._run(input_ids, positions, multimodal)
    return np.asarray(logits, np.float32)

  def aux_loss(self, input_ids, positions=None, **multimodal) -> float:
    """The load-balancing loss pooled over MoE layers (transformers' `aux_loss`)."""
    _, stats = self._run(input_ids, positions, multimodal)
    return float(load_balancing_loss(stats, self.config.text.num_experts))

  def generate(self, input_ids, max_new_tokens: int = 32, **kwargs) -> np.ndarray:
    """Token ids (B, S + new) as int64 numpy: the prompt and up to max_new_tokens new tokens,
    decoded with a KV cache (`omnijax.decode.generate`: greedy unless temperature / top_k /
    top_p; seed; eos_token_id, pad_token_id; left-padded batches via attention_mask). Takes the
    multimodal arguments of `logits`."""
    return decode.generate(self, input_ids, max_new_tokens, **kwargs)

  def expert_load(self, input_ids, positions=None, **multimodal) -> np.ndarray:
    """Tokens routed to each expert, (MoE layers, modalities (text, image, audio, video),
    experts), counting each of a token's top-k choices; padding excluded. Same arguments as
    `logits`."""
    ids, pos, seg, media = self._prepare(input_ids, positions, multimodal)
    choices = np.asarray(
      _routing(self.config)(
        self.params,
        jnp.asarray(ids, jnp.int32),
        jnp.asarray(pos, jnp.float32),
        None if seg is None else jnp.asarray(seg),
        media,
      )
    )
    c = self.config
    modality = np.asarray(Thinker(c).modality(jnp.asarray(ids)))
    valid = np.ones(ids.shape, bool) if seg is None else seg != 0
    counts = np.zeros((choices.shape[0], len(MODALITIES), c.text.num_experts), np.int64)
    for m in range(len(MODALITIES)):
      picked = choices[:, (modality == m) & valid]  # (layers, tokens, k)
      for layer in range(choices.shape[0]):
        counts[layer, m] = np.bincount(picked[layer].ravel(), minlength=c.text.num_experts)
    return counts

  def save_hf(
    self,
    out_dir: str | Path,
    *,
    dtype: str = "float32",
    max_shard_size: str | int = safetensors_io.DEFAULT_MAX_SHARD_SIZE,
  ) -> list[str]:
    """Writes a transformers checkpoint directory (as `omnijax.export to-hf`), with the
    tokenizer and processor files when the model has a tokenizer."""
    return convert.save_hf(
      self.config,
      jax.device_get(self.params),
      out_dir,
      dtype=dtype,
      max_shard_size=max_shard_size,
      tokenizer=self.tokenizer,
    )


def load(path: str | Path, *, step: int | None = None, dtype: str | None = None) -> Model:
  """A Model from an omnijax workdir (model.json + checkpoints/ or init_params/; newest step
  unless `step`) or a transformers directory (config.json + safetensors), with the directory's
  tokenizer.json as `tokenizer` (None without one). `dtype` overrides the compute dtype (e.g.
  "float32" to evaluate a run trained in bfloat16)."""
  path = Path(path)
  if (path / ckpt_lib.MODEL_JSON).exists():
    cfg = ckpt_lib.read_model_config(path)
    params, step = ckpt_lib.latest_params(path, step)
  elif convert.is_hf_dir(path):
    if step is not None:
      raise ValueError(f"{path} is a transformers directory, which has no steps; drop step=.")
    cfg, params = convert.load_hf(path)
  else:
    raise FileNotFoundError(
      f"{path} is neither an omnijax workdir ({ckpt_lib.MODEL_JSON}) nor a transformers "
      f"directory ({convert.CONFIG_FILE} + {safetensors_io.SINGLE_FILE} or "
      f"{safetensors_io.INDEX_FILE})."
    )
  if dtype is not None:
    cfg = dataclasses.replace(cfg, impl=dataclasses.replace(cfg.impl, dtype=dtype))
    cfg.validate()
  return Model(cfg, params, step, ckpt_lib.load_tokenizer(path))


def _as_numpy(x) -> np.ndarray:
  if hasattr(x, "detach"):  # torch.Tensor
    x = x.detach().cpu().numpy()
  return np.asarray(x)
