"""Notebook API: load a Thinker from an omnijax workdir or a transformers directory and run it.

model = omnijax.load("/path/to/workdir")   # or a directory with config.json + safetensors
logits = model.logits([[1, 2, 3]])           # float32 numpy (B, S, V)
model.save_hf("/tmp/export")                  # same writer as `python -m omnijax.export to-hf`
ids = model.tokenizer.encode("a red cube")    # its tokenizer.json (tokenizer None: none)
out = model.generate([ids], max_new_tokens=32)  # prompt + new token ids (KV-cache decoding)
wave = model.code2wav(codes)   # (B, 16, T) codec codes -> float32 (B, 1920 T - 555) at 24 kHz
ids, wave = model.generate([ids], return_audio=True, speaker="Ethan")  # text, then its speech
for chunk in model.generate_stream([ids]): ...  # the same speech in chunks as it is made

`code2wav` needs a Code2Wav vocoder: the transformers directory's ``code2wav.*`` tensors (a
released Qwen3-Omni checkpoint, or `export to-hf --code2wav=CODEC_RUN`) or the workdir's
code2wav/ (`export from-hf` of such a directory). Speech generation (`omnijax.speech`) also
needs the Talker: the directory's ``talker.*`` tensors, or the workdir's talker.json with
{"thinker", "talker"} params. A speech codec run (experiments/codec.py) loads as its speech
tokenizer:

tok = omnijax.load("workdirs/codec_tokenizer")  # omnijax.codec.tokenizer.SpeechTokenizer
codes = tok.encode(waves)                       # (B, N) 24 kHz -> (B, 16, ceil(N / 1920))
wave = tok.code2wav(codes)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from omnijax import decode, paths, speech
from omnijax.hf import convert, safetensors_io
from omnijax.processing import media as media_lib
from omnijax.processing import positions as positions_lib
from omnijax.models import code2wav as code2wav_lib
from omnijax.models.config import Code2WavConfig, TalkerConfig, ThinkerConfig
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
  """A Thinker's config and params with a forward pass jitted once per input shape, and
  optionally a Talker (speech generation) and a Code2Wav vocoder (`code2wav`)."""

  def __init__(
    self,
    config: ThinkerConfig,
    params: Any,
    step: int | None = None,
    tokenizer=None,
    code2wav: tuple[Code2WavConfig, Any] | None = None,
    talker: tuple[TalkerConfig, Any] | None = None,
  ):
    self.config = config
    self.params = jax.device_put(params)
    self.step = step  # the workdir checkpoint step loaded (None: init_params or transformers)
    self.tokenizer = tokenizer  # a data_pipelines TextTokenizer, or None
    self.code2wav_config: Code2WavConfig | None = None  # None: no vocoder
    self.code2wav_params = None
    if code2wav is not None:
      self.code2wav_config, params = code2wav
      self.code2wav_params = jax.device_put(params)
    self.talker_config: TalkerConfig | None = None  # None: no Talker
    self.talker_params = None
    if talker is not None:
      self.talker_config, params = talker
      self.talker_params = jax.device_put(params)

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

  def generate(
    self, input_ids, max_new_tokens: int | None = None, *, return_audio: bool = False, **kwargs
  ):
    """Token ids (B, S + new) as int64 numpy: the prompt and up to max_new_tokens (default 32)
    new tokens, decoded with a KV cache (`omnijax.decode.generate`: greedy unless temperature /
    top_k / top_p; seed; eos_token_id, pad_token_id; left-padded batches via attention_mask).
    Takes the multimodal arguments of `logits`.

    With return_audio=True the model also speaks its answer (`omnijax.speech`; needs a Talker
    and a Code2Wav) and returns (token ids, float32 waveform (B, samples) at 24 kHz), with
    return_codes=True also the codec frames (B, 16, T). The prompt ends with the assistant
    header (<|im_start|>assistant\\n). Arguments take transformers' names and defaults:
    speaker="Ethan"; thinker_max_new_tokens=1024 (or max_new_tokens), thinker_do_sample=False,
    thinker_temperature / thinker_top_k / thinker_top_p, thinker_eos_token_id (default
    <|im_end|>); talker_max_new_tokens=4096, talker_do_sample=True, talker_top_k=50,
    talker_top_p=1.0, talker_temperature=0.9, talker_repetition_penalty=1.05; seed."""
    if not return_audio:
      return decode.generate(
        self, input_ids, 32 if max_new_tokens is None else max_new_tokens, **kwargs
      )
    if max_new_tokens is not None:
      if "thinker_max_new_tokens" in kwargs:
        raise ValueError("pass max_new_tokens or thinker_max_new_tokens, not both.")
      kwargs["thinker_max_new_tokens"] = max_new_tokens
    return speech.generate(self, input_ids, **kwargs)

  def generate_stream(self, input_ids, *, chunk_frames: int = 1, **kwargs) -> speech.SpeechStream:
    """`generate(input_ids, return_audio=True, **kwargs)` as a stream: iterating yields float32
    waveform chunks (B, m) as soon as chunk_frames more codec frames (80 ms each) exist, with
    the Thinker and the Talker interleaved, so audio starts before the text is finished; the
    chunks concatenate to generate's waveform. Afterwards the stream's `sequences` and `codes`
    hold the token ids and codec frames (`omnijax.speech.SpeechStream`)."""
    return speech.SpeechStream(self, input_ids, chunk_frames=chunk_frames, **kwargs)

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

  def code2wav(self, codes) -> np.ndarray:
    """Codec codes (B, num_quantizers, T) of ints (numpy, torch or lists) -> float32 numpy
    waveform (B, 1920 T - 555) at 24 kHz (``omnijax.models.code2wav.decode``)."""
    cfg = self.code2wav_config
    if cfg is None:
      raise RuntimeError(
        "this model has no Code2Wav vocoder. Load a transformers directory that holds "
        "code2wav.* tensors (a released Qwen3-Omni checkpoint, or one written by `python -m "
        "omnijax.export to-hf --workdir=W --out=DIR --code2wav=CODEC_RUN`), or a workdir with "
        "a code2wav/ (`python -m omnijax.export from-hf` of such a directory); a speech codec "
        "run (experiments/codec.py) loads with omnijax.load(run_dir) as a tokenizer with "
        ".code2wav."
      )
    return code2wav_lib.decode(cfg, self.code2wav_params, _as_numpy(codes))

  def save_hf(
    self,
    out_dir: paths.PathLike,
    *,
    dtype: str = "float32",
    max_shard_size: str | int = safetensors_io.DEFAULT_MAX_SHARD_SIZE,
  ) -> list[str]:
    """Writes a transformers checkpoint directory (as `omnijax.export to-hf`), with the
    tokenizer and processor files when the model has a tokenizer, and the Talker and the
    Code2Wav when it has them."""
    code2wav = talker = None
    if self.code2wav_config is not None:
      code2wav = (self.code2wav_config, jax.device_get(self.code2wav_params))
    if self.talker_config is not None:
      talker = (self.talker_config, jax.device_get(self.talker_params))
    return convert.save_hf(
      self.config,
      jax.device_get(self.params),
      out_dir,
      dtype=dtype,
      max_shard_size=max_shard_size,
      tokenizer=self.tokenizer,
      talker=talker,
      code2wav=code2wav,
    )


def load(path: paths.PathLike, *, step: int | None = None, dtype: str | None = None):
  """A Model from an omnijax workdir (model.json + checkpoints/ or init_params/; newest step
  unless `step`) or a transformers directory (config.json + safetensors), with the directory's
  tokenizer.json as `tokenizer` (None without one), its Talker (workdir talker.json and the
  params' "talker" tree, or the directory's talker.* tensors) and its Code2Wav
  (workdir/code2wav/, or the directory's code2wav.* tensors) for `Model.code2wav` and speech
  generation. `dtype` overrides the compute dtype (e.g. "float32" to evaluate a run trained in
  bfloat16). A speech codec run (experiments/codec.py) gives its
  `omnijax.codec.tokenizer.SpeechTokenizer` instead."""
  from omnijax.codec import tokenizer as codec_tokenizer  # pylint: disable=import-outside-toplevel

  path = paths.path(path)
  if codec_tokenizer.is_codec_run(path):
    if dtype is not None:
      raise ValueError(f"{path} is a speech codec run, which takes no dtype=; drop it.")
    return codec_tokenizer.load_speech_tokenizer(path, step)
  if (path / ckpt_lib.MODEL_JSON).exists():
    cfg = ckpt_lib.read_model_config(path)
    params, step = ckpt_lib.latest_params(path, step)
    params, talker_params = ckpt_lib.split_params(path, params)
    talker_cfg = ckpt_lib.read_talker_config(path)
    talker = None if talker_cfg is None else (talker_cfg, talker_params)
    code2wav = ckpt_lib.load_code2wav(path)
  elif convert.is_hf_dir(path):
    if step is not None:
      raise ValueError(f"{path} is a transformers directory, which has no steps; drop step=.")
    cfg, params = convert.load_hf(path)
    talker = convert.load_talker_hf(path, cfg)
    code2wav = convert.load_code2wav_hf(path)
  else:
    raise FileNotFoundError(
      f"{path} is neither an omnijax workdir ({ckpt_lib.MODEL_JSON}) nor a transformers "
      f"directory ({convert.CONFIG_FILE} + {safetensors_io.SINGLE_FILE} or "
      f"{safetensors_io.INDEX_FILE})."
    )
  if dtype is not None:
    cfg = dataclasses.replace(cfg, impl=dataclasses.replace(cfg.impl, dtype=dtype))
    cfg.validate()
  return Model(cfg, params, step, ckpt_lib.load_tokenizer(path), code2wav, talker)


def _as_numpy(x) -> np.ndarray:
  if hasattr(x, "detach"):  # torch.Tensor
    x = x.detach().cpu().numpy()
  return np.asarray(x)
