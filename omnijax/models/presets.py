"""Named model presets, returned as ConfigDicts that experiments place at ``config.model``.

- ``tiny``: a few hundred thousand parameters, for tests and the local default run.
- ``small``: ~100M total / ~35M active parameters, for local benchmarks.
- ``qwen3-omni-30b-a3b``: the released Qwen3-Omni-30B-A3B Thinker (every field written out).

The token ids of ``tiny`` and ``small`` are those of the tokenizer that
``data_pipelines.tokenizer`` trains on the local corpus (special tokens first, in
``SPECIAL_TOKENS`` order); the launcher checks they agree.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from omnijax.errors import ConfigError

# Special-token ids of the locally trained tokenizer (its special tokens come first).
LOCAL_TOKEN_IDS = dict(
  audio_start_token_id=3,
  audio_end_token_id=4,
  audio_token_id=5,
  vision_start_token_id=6,
  vision_end_token_id=7,
  image_token_id=8,
  video_token_id=9,
)

# Thinker-vocabulary ids the Talker reads, in the locally trained tokenizer's layout
# (data_pipelines.tokenizer.SPECIAL_TOKENS).
LOCAL_TALKER_TOKEN_IDS = dict(
  im_start_token_id=1,
  im_end_token_id=2,
  tts_pad_token_id=10,
  tts_bos_token_id=11,
  tts_eos_token_id=12,
  system_token_id=13,
  user_token_id=14,
  assistant_token_id=15,
)


def _tiny() -> dict:
  return dict(
    text=dict(
      vocab_size=4096,
      hidden_size=64,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=2,
      head_dim=16,
      num_experts=8,
      num_experts_per_tok=2,
      moe_intermediate_size=32,
      intermediate_size=128,
      shared_expert_intermediate_size=0,
      norm_topk_prob=True,
      rms_norm_eps=1e-6,
      rope_theta=1_000_000.0,
      mrope_section=(4, 2, 2),
      router_aux_loss_coef=0.001,
      max_position_embeddings=4096,
      mlp_only_layers=(),
      decoder_sparse_step=1,
      modality_routers=False,
    ),
    audio=dict(
      num_mel_bins=128,
      encoder_layers=2,
      encoder_attention_heads=2,
      encoder_ffn_dim=64,
      d_model=32,
      output_dim=64,
      n_window=50,
      n_window_infer=800,
      downsample_hidden_size=16,
      max_source_positions=1500,
    ),
    vision=dict(
      depth=2,
      hidden_size=32,
      intermediate_size=64,
      num_heads=2,
      patch_size=16,
      spatial_merge_size=2,
      temporal_patch_size=2,
      out_hidden_size=64,
      num_position_embeddings=2304,
      deepstack_visual_indexes=(0, 1),
    ),
    **LOCAL_TOKEN_IDS,
  )


def _small() -> dict:
  return dict(
    text=dict(
      vocab_size=16384,
      hidden_size=512,
      num_hidden_layers=12,
      num_attention_heads=8,
      num_key_value_heads=2,
      head_dim=64,
      num_experts=16,
      num_experts_per_tok=4,
      moe_intermediate_size=256,
      intermediate_size=1024,
      shared_expert_intermediate_size=0,
      norm_topk_prob=True,
      rms_norm_eps=1e-6,
      rope_theta=1_000_000.0,
      mrope_section=(12, 10, 10),
      router_aux_loss_coef=0.001,
      max_position_embeddings=32768,
      mlp_only_layers=(),
      decoder_sparse_step=1,
      modality_routers=False,
    ),
    audio=dict(
      num_mel_bins=128,
      encoder_layers=4,
      encoder_attention_heads=4,
      encoder_ffn_dim=1024,
      d_model=256,
      output_dim=512,
      n_window=50,
      n_window_infer=800,
      downsample_hidden_size=128,
      max_source_positions=1500,
    ),
    vision=dict(
      depth=4,
      hidden_size=256,
      intermediate_size=1024,
      num_heads=4,
      patch_size=16,
      spatial_merge_size=2,
      temporal_patch_size=2,
      out_hidden_size=512,
      num_position_embeddings=2304,
      deepstack_visual_indexes=(1, 2, 3),
    ),
    **LOCAL_TOKEN_IDS,
  )


def _qwen3_omni_30b_a3b() -> dict:
  return dict(
    text=dict(
      vocab_size=152064,
      hidden_size=2048,
      num_hidden_layers=48,
      num_attention_heads=32,
      num_key_value_heads=4,
      head_dim=128,
      num_experts=128,
      num_experts_per_tok=8,
      moe_intermediate_size=768,
      intermediate_size=768,
      shared_expert_intermediate_size=0,
      norm_topk_prob=True,
      rms_norm_eps=1e-6,
      rope_theta=1_000_000.0,
      mrope_section=(24, 20, 20),
      router_aux_loss_coef=0.001,
      max_position_embeddings=65536,
      mlp_only_layers=(),
      decoder_sparse_step=1,
      modality_routers=False,
    ),
    audio=dict(
      num_mel_bins=128,
      encoder_layers=32,
      encoder_attention_heads=20,
      encoder_ffn_dim=5120,
      d_model=1280,
      output_dim=2048,
      n_window=50,
      n_window_infer=800,
      downsample_hidden_size=480,
      max_source_positions=1500,
    ),
    vision=dict(
      depth=27,
      hidden_size=1152,
      intermediate_size=4304,
      num_heads=16,
      patch_size=16,
      spatial_merge_size=2,
      temporal_patch_size=2,
      out_hidden_size=2048,
      num_position_embeddings=2304,
      deepstack_visual_indexes=(8, 16, 24),
    ),
    audio_token_id=151675,
    audio_start_token_id=151669,
    audio_end_token_id=151670,
    image_token_id=151655,
    video_token_id=151656,
    vision_start_token_id=151652,
    vision_end_token_id=151653,
    position_id_per_seconds=13,
    seconds_per_chunk=2,
  )


def _talker_tiny() -> dict:
  """A Talker for the tiny Thinker, with the released codec vocabulary (16 x 2048 codes)."""
  return dict(
    text=dict(
      vocab_size=3072,
      hidden_size=64,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=2,
      head_dim=16,
      num_experts=8,
      num_experts_per_tok=2,
      moe_intermediate_size=32,
      intermediate_size=128,
      shared_expert_intermediate_size=64,
      mrope_section=(4, 2, 2),
    ),
    code_predictor=dict(
      vocab_size=2048,
      hidden_size=64,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=2,
      head_dim=16,
      num_experts=0,
      num_experts_per_tok=0,
      moe_intermediate_size=0,
      intermediate_size=128,
      mrope_section=(8, 0, 0),
    ),
    thinker_hidden_size=64,
    accept_hidden_layer=1,
    **LOCAL_TALKER_TOKEN_IDS,
  )


def _talker_qwen3_omni_30b_a3b() -> dict:
  """The released Talker (3B-A0.3B) and its 5-layer MTP."""
  return dict(
    text=dict(
      vocab_size=3072,
      hidden_size=1024,
      num_hidden_layers=20,
      num_attention_heads=16,
      num_key_value_heads=2,
      head_dim=128,
      num_experts=128,
      num_experts_per_tok=6,
      moe_intermediate_size=384,
      intermediate_size=2048,
      shared_expert_intermediate_size=768,
      norm_topk_prob=True,
      rms_norm_eps=1e-6,
      rope_theta=1_000_000.0,
      mrope_section=(24, 20, 20),
      router_aux_loss_coef=0.001,
      max_position_embeddings=65536,
    ),
    code_predictor=dict(
      vocab_size=2048,
      hidden_size=1024,
      num_hidden_layers=5,
      num_attention_heads=16,
      num_key_value_heads=8,
      head_dim=128,
      num_experts=0,
      num_experts_per_tok=0,
      moe_intermediate_size=0,
      intermediate_size=3072,
      rms_norm_eps=1e-6,
      rope_theta=1_000_000.0,
      mrope_section=(64, 0, 0),
      max_position_embeddings=32768,
    ),
    num_code_groups=16,
    thinker_hidden_size=2048,
    accept_hidden_layer=24,
  )


TALKER_PRESETS = {
  "tiny": _talker_tiny,
  "qwen3-omni-30b-a3b": _talker_qwen3_omni_30b_a3b,
}


PRESETS = {
  "tiny": _tiny,
  "small": _small,
  "qwen3-omni-30b-a3b": _qwen3_omni_30b_a3b,
}


def get(name: str) -> ml_collections.ConfigDict:
  """The preset as a ConfigDict (``preset`` records its name); unknown names list the options."""
  if name not in PRESETS:
    raise ConfigError(f"unknown model preset {name!r}; available: {sorted(PRESETS)}.")
  d = PRESETS[name]()
  d["preset"] = name
  d["impl"] = dict(
    dtype="float32",
    param_dtype="float32",
    remat_policy="none",
    moe_impl="auto",
    moe_block_size=128,
    moe_capacity_factor=config_dict.placeholder(float),
    attention_query_blocks=8,
    attention="auto",
    moe_exchange="auto",
    scan_unroll=1,
    context_load_balance=True,
    cpu_matmul="auto",
  )
  return ml_collections.ConfigDict(d)


def get_talker(name: str) -> ml_collections.ConfigDict:
  """The Talker preset of a Thinker preset (``TalkerConfig.from_dict`` reads it)."""
  if name not in TALKER_PRESETS:
    raise ConfigError(f"no Talker preset {name!r}; available: {sorted(TALKER_PRESETS)}.")
  return ml_collections.ConfigDict(TALKER_PRESETS[name]())
