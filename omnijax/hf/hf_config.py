"""ThinkerConfig <-> transformers ``Qwen3OmniMoeConfig`` (config.json) for the released layout,
TalkerConfig <-> its ``talker_config`` entry (+ the top-level token ids the Talker reads), and
Code2WavConfig <-> its ``code2wav_config`` entry (``Qwen3OmniMoeCode2WavConfig``).

Every field transformers reads is written explicitly: its per-class defaults (head_dim,
norm_topk_prob, rope theta, M-RoPE sections) differ between the Thinker and Talker configs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from omnijax.errors import ConfigError
from omnijax.models.config import (
  AudioEncoderConfig,
  Code2WavConfig,
  ImplConfig,
  TALKER_THINKER_TOKEN_FIELDS,
  TalkerConfig,
  TextConfig,
  ThinkerConfig,
  VisionEncoderConfig,
)

_TOKEN_FIELDS = (
  "audio_token_id",
  "image_token_id",
  "video_token_id",
  "audio_start_token_id",
  "audio_end_token_id",
  "vision_start_token_id",
  "vision_end_token_id",
)


def text_config_to_hf(t: TextConfig) -> dict[str, Any]:
  d = dataclasses.asdict(t)
  for k in (
    "rope_theta",
    "mrope_section",
    "shared_expert_intermediate_size",
    "modality_routers",
    "qk_norm",
    "sliding_window",
    "layer_scale_initial_scale",
  ):
    d.pop(k)
  d.update(
    mlp_only_layers=list(t.mlp_only_layers),
    hidden_act="silu",
    attention_bias=False,
    tie_word_embeddings=False,
    rope_parameters=dict(
      rope_type="default",
      rope_theta=t.rope_theta,
      mrope_section=list(t.mrope_section),
      interleaved=True,
      mrope_interleaved=True,
    ),
  )
  return d


def talker_text_config_to_hf(t: TextConfig) -> dict[str, Any]:
  """A transformers ``Qwen3OmniMoeTalkerTextConfig`` dict for a decoder with a shared expert.

  The Talker's decoder layers are all sparse-MoE with a shared expert (it ignores
  mlp_only_layers and decoder_sparse_step), so only such decoders have this layout.
  """
  if not t.shared_expert_intermediate_size or not all(
    t.is_moe_layer(i) for i in range(t.num_hidden_layers)
  ):
    raise ConfigError(
      "the Qwen3-Omni Talker layout has a shared expert and sparse-MoE blocks in every layer; "
      "set model.text.shared_expert_intermediate_size > 0, mlp_only_layers=() and "
      "decoder_sparse_step=1."
    )
  return text_config_to_hf(t) | dict(
    model_type="qwen3_omni_moe_talker_text",
    shared_expert_intermediate_size=t.shared_expert_intermediate_size,
  )


def to_hf_config(
  cfg: ThinkerConfig, dtype: str = "float32", talker: TalkerConfig | None = None
) -> dict[str, Any]:
  """config.json of a Qwen3OmniMoeForConditionalGeneration holding this Thinker (and with
  `talker` the Talker, ``enable_audio_output`` on), with weights stored in `dtype`."""
  if cfg.text.shared_expert_intermediate_size:
    raise ConfigError(
      "the Qwen3-Omni Thinker has no shared expert, so a Thinker with "
      "model.text.shared_expert_intermediate_size > 0 cannot be exported in the released "
      "layout; set it to 0 (shared experts belong to the Talker)."
    )
  if cfg.text.modality_routers:
    raise ConfigError(
      "model.text.modality_routers=True (one router per modality) has no counterpart in "
      "transformers' Qwen3-Omni, which routes every token with one gate; this model cannot "
      "be exported. Train with modality_routers=False to export."
    )
  audio = dataclasses.asdict(cfg.audio) | dict(activation_function="gelu")
  vision = dataclasses.asdict(cfg.vision) | dict(
    hidden_act="gelu_pytorch_tanh",
    deepstack_visual_indexes=list(cfg.vision.deepstack_visual_indexes),
  )
  thinker = dict(
    model_type="qwen3_omni_moe_thinker",
    text_config=text_config_to_hf(cfg.text) | dict(model_type="qwen3_omni_moe_text"),
    audio_config=audio | dict(model_type="qwen3_omni_moe_audio_encoder"),
    vision_config=vision | dict(model_type="qwen3_omni_moe_vision_encoder"),
    position_id_per_seconds=cfg.position_id_per_seconds,
    seconds_per_chunk=cfg.seconds_per_chunk,
    tie_word_embeddings=False,
    **{k: getattr(cfg, k) for k in _TOKEN_FIELDS},
  )
  out = dict(
    architectures=["Qwen3OmniMoeForConditionalGeneration"],
    model_type="qwen3_omni_moe",
    dtype=dtype,
    enable_audio_output=talker is not None,
    thinker_config=thinker,
  )
  if talker is not None:
    talker.validate(cfg)
    out["talker_config"] = talker_config_to_hf(talker, cfg)
    out.update({k: getattr(talker, k) for k in TALKER_THINKER_TOKEN_FIELDS})
  return out


_TALKER_FIELDS = (
  "num_code_groups",
  "thinker_hidden_size",
  "accept_hidden_layer",
  "codec_pad_id",
  "codec_bos_id",
  "codec_eos_token_id",
  "codec_nothink_id",
  "codec_think_bos_id",
  "codec_think_eos_id",
  "spatial_merge_size",
)


def code_predictor_config_to_hf(p: TextConfig, num_code_groups: int) -> dict[str, Any]:
  """A ``Qwen3OmniMoeTalkerCodePredictorConfig`` dict (a dense decoder with plain RoPE)."""
  if p.num_experts or tuple(p.mrope_section[1:]) != (0, 0) or not p.qk_norm or p.sliding_window:
    raise ConfigError(
      "the code predictor is a dense decoder with q/k norm and plain (1-D) RoPE: set "
      "num_experts=0, mrope_section=(head_dim // 2, 0, 0), qk_norm=True, sliding_window=0."
    )
  keys = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "max_position_embeddings",
  )
  return {k: getattr(p, k) for k in keys} | dict(
    model_type="qwen3_omni_moe_talker_code_predictor",
    num_code_groups=num_code_groups,
    hidden_act="silu",
    attention_bias=False,
    tie_word_embeddings=False,
    rope_parameters=dict(rope_type="default", rope_theta=p.rope_theta),
  )


def talker_config_to_hf(cfg: TalkerConfig, thinker: ThinkerConfig) -> dict[str, Any]:
  """The ``talker_config`` entry: the Talker's own fields and the Thinker's placeholder ids."""
  return {k: getattr(cfg, k) for k in _TALKER_FIELDS} | dict(
    model_type="qwen3_omni_moe_talker",
    text_config=talker_text_config_to_hf(cfg.text),
    code_predictor_config=code_predictor_config_to_hf(cfg.code_predictor, cfg.num_code_groups),
    speaker_id=dict(cfg.speaker_id),
    audio_token_id=thinker.audio_token_id,
    image_token_id=thinker.image_token_id,
    video_token_id=thinker.video_token_id,
    vision_start_token_id=thinker.vision_start_token_id,
    audio_start_token_id=thinker.audio_start_token_id,
    position_id_per_seconds=thinker.position_id_per_seconds,
    tie_word_embeddings=False,
  )


def talker_config_from_hf(d: dict[str, Any], thinker: ThinkerConfig | None = None) -> TalkerConfig:
  """The TalkerConfig of a full Qwen3-Omni config.json (`d`), checked against `thinker`."""
  talker = d["talker_config"]
  text = _text_config_from_hf(talker["text_config"], "talker_config.text_config")
  p = dict(talker["code_predictor_config"])
  p.setdefault("head_dim", p["hidden_size"] // p["num_attention_heads"])
  p.setdefault("num_key_value_heads", p["num_attention_heads"])
  rope = p.get("rope_parameters") or p.get("rope_scaling") or {}
  theta = rope.get("rope_theta", p.get("rope_theta", 10000.0))  # transformers' default
  code_predictor = TextConfig(
    **{k: v for k, v in _pick(TextConfig, p).items() if k not in _NOT_IN_HF_TEXT},
    rope_theta=float(theta),
    mrope_section=(p["head_dim"] // 2, 0, 0),
    num_experts=0,
    num_experts_per_tok=0,
    moe_intermediate_size=0,
  )
  top = {k: d[k] for k in TALKER_THINKER_TOKEN_FIELDS if k in d}
  fields = {k: talker[k] for k in _TALKER_FIELDS if k in talker}
  speakers = talker.get("speaker_id") or {}
  cfg = TalkerConfig(
    text=text,
    code_predictor=code_predictor,
    speaker_id=tuple(sorted(((str(n), int(i)) for n, i in speakers.items()), key=lambda x: x[1])),
    **fields,
    **top,
  )
  cfg.validate(thinker, where="config.json talker_config")
  return cfg


def _pick(cls, d: dict[str, Any]) -> dict[str, Any]:
  names = {f.name for f in dataclasses.fields(cls)}
  return {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names}


# TextConfig fields that are omnijax's (Code2Wav options), never read from a Thinker/Talker config.
_NOT_IN_HF_TEXT = ("qk_norm", "sliding_window", "layer_scale_initial_scale")


def _text_config_from_hf(text: dict[str, Any], where: str) -> TextConfig:
  """A Thinker or Talker decoder's TextConfig from its transformers text_config dict."""
  text = dict(text)
  if "num_local_experts" in text:  # the Talker's name for num_experts in a saved config.json
    text.setdefault("num_experts", text.pop("num_local_experts"))
  rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
  theta = rope.get("rope_theta", text.get("rope_theta"))
  if theta is None:
    raise ConfigError(f"config.json {where} has no rope_theta (in rope_parameters or at top).")
  if "mrope_section" in rope and not rope.get("mrope_interleaved", rope.get("interleaved", False)):
    raise ConfigError(
      "config.json uses contiguous (Qwen2.5-Omni) M-RoPE sections; omnijax "
      "implements the interleaved Qwen3-Omni layout only."
    )
  text["rope_theta"] = float(theta)
  if "mrope_section" in rope:
    text["mrope_section"] = rope["mrope_section"]
  if text.get("head_dim") is None:
    text["head_dim"] = text["hidden_size"] // text["num_attention_heads"]
  if text.get("mlp_only_layers") is None:
    text["mlp_only_layers"] = ()
  for k in _NOT_IN_HF_TEXT:
    text.pop(k, None)
  return TextConfig(**_pick(TextConfig, text))


def from_hf_config(d: dict[str, Any], impl: ImplConfig = ImplConfig()) -> ThinkerConfig:
  """The Thinker part of a transformers Qwen3-Omni config.json (full model or Thinker alone)."""
  thinker = d.get("thinker_config", d)
  text_cfg = _text_config_from_hf(thinker["text_config"], "text_config")
  tokens = {k: thinker[k] for k in _TOKEN_FIELDS if k in thinker}
  extra = {k: thinker[k] for k in ("position_id_per_seconds", "seconds_per_chunk") if k in thinker}
  cfg = ThinkerConfig(
    text=text_cfg,
    audio=AudioEncoderConfig(**_pick(AudioEncoderConfig, thinker.get("audio_config", {}))),
    vision=VisionEncoderConfig(**_pick(VisionEncoderConfig, thinker.get("vision_config", {}))),
    impl=impl,
    **tokens,
    **extra,
  )
  cfg.validate()
  return cfg


def code2wav_config_to_hf(cfg: Code2WavConfig) -> dict[str, Any]:
  """The ``code2wav_config`` entry of a Qwen3-Omni config.json (every field transformers reads;
  no head_dim: transformers derives hidden_size // num_attention_heads, as omnijax)."""
  d = dataclasses.asdict(cfg)
  d.pop("rope_theta")
  return d | dict(
    upsample_rates=list(cfg.upsample_rates),
    upsampling_ratios=list(cfg.upsampling_ratios),
    rope_parameters=dict(rope_type="default", rope_theta=cfg.rope_theta),
    hidden_act="silu",
    attention_bias=False,
    attention_dropout=0.0,
  )


def code2wav_config_from_hf(d: dict[str, Any]) -> Code2WavConfig:
  """A Code2WavConfig from a ``code2wav_config`` dict (transformers v4 or v5: rope_theta at the
  top or in rope_parameters; transformers' defaults, the released values, for absent fields).
  Refuses settings omnijax's Code2Wav does not implement."""
  rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
  where = "config.json code2wav_config"
  if rope.get("rope_type", rope.get("type", "default")) != "default":
    raise ConfigError(f"{where}: rope_type {rope.get('rope_type')!r}; only 'default' is supported.")
  unsupported = {
    "hidden_act": (d.get("hidden_act", "silu"), "silu"),
    "attention_bias": (bool(d.get("attention_bias", False)), False),
  }
  for name, (have, want) in unsupported.items():
    if have != want:
      raise ConfigError(f"{where}: {name}={have!r}; omnijax's Code2Wav implements {want!r} only.")
  kwargs = _pick(Code2WavConfig, d)
  theta = rope.get("rope_theta", d.get("rope_theta"))
  if theta is not None:
    kwargs["rope_theta"] = float(theta)
  cfg = Code2WavConfig(**kwargs)
  head_dim = d.get("head_dim")
  if head_dim is not None and head_dim != cfg.head_dim:
    raise ConfigError(
      f"{where}: head_dim={head_dim}, but Code2Wav's is hidden_size // num_attention_heads "
      f"= {cfg.head_dim}."
    )
  cfg.validate(where)
  return cfg
