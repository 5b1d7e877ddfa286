"""Typed, validated model configs built from an experiment's ``config.model`` ConfigDict.

Field names follow the transformers ``Qwen3OmniMoe*Config`` classes so that export is a
rename-free copy; implementation choices (dtypes, remat, MoE kernel) live in ``ImplConfig``.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Mapping

from omnijax.errors import ConfigError
from omnijax.models import matmul

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "qkv_proj")
MOE_IMPLS = ("auto", "ragged_dot", "blocked", "dense")
ATTENTION_IMPLS = ("auto", "xla", "splash", "cudnn")
MOE_EXCHANGES = ("auto", "all_to_all", "ragged")
CPU_MATMULS = ("auto", "xla", "mkl")
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """Decoder (Thinker or Talker text model) architecture."""

  vocab_size: int
  hidden_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int
  num_experts: int
  num_experts_per_tok: int
  moe_intermediate_size: int
  intermediate_size: int = 0  # width of the dense MLP in `mlp_only_layers`
  shared_expert_intermediate_size: int = 0  # 0: no shared expert
  norm_topk_prob: bool = True
  decoder_sparse_step: int = 1
  mlp_only_layers: tuple[int, ...] = ()
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1_000_000.0
  mrope_section: tuple[int, int, int] = (24, 20, 20)
  router_aux_loss_coef: float = 0.001
  max_position_embeddings: int = 65536
  modality_routers: bool = (
    False  # one router per modality over shared experts (not in transformers)
  )
  # Code2Wav's pre-transformer: no q/k norm, causal sliding window, per-channel layer scale.
  qk_norm: bool = True
  sliding_window: int = 0  # 0: full causal attention; w: a query sees its last w keys
  layer_scale_initial_scale: float = 0.0  # 0: no layer scale

  def is_moe_layer(self, i: int) -> bool:
    return (
      i not in self.mlp_only_layers
      and self.num_experts > 0
      and (i + 1) % self.decoder_sparse_step == 0
    )

  def layer_blocks(self) -> list[tuple[bool, int, int]]:
    """Runs of consecutive layers of one kind: (is_moe, first_layer, count)."""
    blocks: list[tuple[bool, int, int]] = []
    for i in range(self.num_hidden_layers):
      moe = self.is_moe_layer(i)
      if blocks and blocks[-1][0] == moe:
        blocks[-1] = (moe, blocks[-1][1], blocks[-1][2] + 1)
      else:
        blocks.append((moe, i, 1))
    return blocks

  def validate(self, where: str = "model.text") -> None:
    def need(cond: bool, msg: str) -> None:
      if not cond:
        raise ConfigError(f"{where}: {msg}")

    for name in (
      "vocab_size",
      "hidden_size",
      "num_hidden_layers",
      "num_attention_heads",
      "num_key_value_heads",
      "head_dim",
    ):
      need(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}.")
    need(
      self.num_attention_heads % self.num_key_value_heads == 0,
      f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
      f"num_key_value_heads ({self.num_key_value_heads}); change one of them.",
    )
    need(
      self.head_dim % 2 == 0, f"head_dim must be even for rotary embeddings, got {self.head_dim}."
    )
    half = self.head_dim // 2
    t, h, w = self.mrope_section
    need(
      t + h + w == half,
      f"mrope_section {list(self.mrope_section)} sums to {t + h + w} but head_dim {self.head_dim} "
      f"has {half} rotary frequency slots; set mrope_section to sum to head_dim/2 "
      f"(e.g. {list(default_mrope_section(self.head_dim))}) or change head_dim.",
    )
    need(
      t >= max(h, w) and min(t, h, w) >= 0,
      f"mrope_section {list(self.mrope_section)}: the interleaved T/H/W layout needs the temporal "
      "section to be at least as large as the height and width sections.",
    )
    if self.num_experts > 0:
      need(
        0 < self.num_experts_per_tok <= self.num_experts,
        f"num_experts_per_tok ({self.num_experts_per_tok}) must be in [1, num_experts="
        f"{self.num_experts}].",
      )
      need(self.moe_intermediate_size > 0, "moe_intermediate_size must be positive for MoE layers.")
    bad = [i for i in self.mlp_only_layers if not 0 <= i < self.num_hidden_layers]
    need(
      not bad, f"mlp_only_layers {bad} are outside [0, num_hidden_layers={self.num_hidden_layers})."
    )
    if any(not self.is_moe_layer(i) for i in range(self.num_hidden_layers)):
      need(
        self.intermediate_size > 0,
        "intermediate_size must be positive when some layers are dense (mlp_only_layers / "
        "decoder_sparse_step / num_experts=0).",
      )
    need(self.decoder_sparse_step >= 1, "decoder_sparse_step must be >= 1.")
    need(self.sliding_window >= 0, f"sliding_window must be >= 0, got {self.sliding_window}.")


def default_mrope_section(head_dim: int) -> tuple[int, int, int]:
  """The released 24/20/20 split scaled to another head_dim (H and W equal, T the rest)."""
  half = head_dim // 2
  hw = (half * 20) // 64
  return (half - 2 * hw, hw, hw)


@dataclasses.dataclass(frozen=True)
class AudioEncoderConfig:
  """AuT audio encoder (transformers `Qwen3OmniMoeAudioEncoderConfig` field names)."""

  num_mel_bins: int = 128
  encoder_layers: int = 32
  encoder_attention_heads: int = 20
  encoder_ffn_dim: int = 5120
  d_model: int = 1280
  output_dim: int = 2048
  n_window: int = 50
  n_window_infer: int = 800
  downsample_hidden_size: int = 480
  max_source_positions: int = 1500
  conv_chunksize: int = 500


@dataclasses.dataclass(frozen=True)
class VisionEncoderConfig:
  """Vision/video encoder (transformers `Qwen3OmniMoeVisionEncoderConfig` field names)."""

  depth: int = 27
  hidden_size: int = 1152
  intermediate_size: int = 4304
  num_heads: int = 16
  in_channels: int = 3
  patch_size: int = 16
  spatial_merge_size: int = 2
  temporal_patch_size: int = 2
  out_hidden_size: int = 2048
  num_position_embeddings: int = 2304
  deepstack_visual_indexes: tuple[int, ...] = (8, 16, 24)


def _auto_cpu_matmul(platform: str) -> str:
  return "mkl" if platform == "cpu" and matmul.intel_cpu() and not matmul.unavailable() else "xla"


@dataclasses.dataclass(frozen=True)
class ImplConfig:
  """How the model is computed; never changes the math beyond float rounding."""

  dtype: str = "float32"  # compute dtype of activations and matmuls
  param_dtype: str = "float32"
  remat_policy: str = "none"
  moe_impl: str = "auto"  # auto: ragged_dot on GPU/TPU, blocked on CPU
  moe_block_size: int = 128  # row tile of the blocked grouped matmul
  # Expert-parallel exchange: None is dropless (worst-case buffers); a float bounds each
  # device-to-device buffer at capacity_factor x the balanced share and counts drops.
  moe_capacity_factor: float | None = None
  attention_query_blocks: int = 8  # causal query blocks per sequence (1: one block)
  # auto: splash (Pallas TPU flash attention, in shard_map) on TPU, cudnn (fused flash
  # attention) on GPU in half precision, else xla (query-blocked)
  attention: str = "auto"
  # Expert-parallel exchange: all_to_all of whole buffers, or ragged (only filled rows);
  # auto: ragged on GPU/TPU, all_to_all on CPU (XLA:CPU has no ragged all-to-all)
  moe_exchange: str = "auto"
  # Layers per iteration of a layer block's scan; >= the block's layer count unrolls it (no
  # per-layer slicing of the stacked weights or stacking of saved activations, as MaxText's
  # scan_layers=False; compiles take longer). The parameters stay stacked either way.
  scan_unroll: int = 1
  # With the sequence split over context-parallel shards, hold each row's tokens in zigzag
  # order (omnijax.models.attention.zigzag_order) inside the decoder, so that causal attention
  # costs every shard alike (natural order: the last shard's queries see the most keys).
  context_load_balance: bool = True
  # Float32 matrix products on one CPU device: XLA's own, or oneMKL's sgemm as a custom call
  # (omnijax/models/matmul.py); auto: mkl on Intel CPUs where it is installed.
  cpu_matmul: str = "auto"

  def resolved(self, platform: str) -> "ImplConfig":
    """`auto` choices made for the devices a model runs (or is compiled) on."""
    return dataclasses.replace(
      self,
      moe_impl=self.moe_impl
      if self.moe_impl != "auto"
      else ("blocked" if platform == "cpu" else "ragged_dot"),
      attention=self.attention if self.attention != "auto" else self._auto_attention(platform),
      moe_exchange=self.moe_exchange
      if self.moe_exchange != "auto"
      else ("all_to_all" if platform == "cpu" else "ragged"),
      cpu_matmul=self.cpu_matmul if self.cpu_matmul != "auto" else _auto_cpu_matmul(platform),
    )

  def _auto_attention(self, platform: str) -> str:
    if platform == "tpu":
      return "splash"
    if platform == "gpu" and self.dtype in ("bfloat16", "float16"):
      return "cudnn"  # cuDNN's fused attention takes half precision only
    return "xla"

  def validate(self, where: str = "model.impl") -> None:
    for name, allowed in (
      ("dtype", DTYPES),
      ("param_dtype", DTYPES),
      ("remat_policy", REMAT_POLICIES),
      ("moe_impl", MOE_IMPLS),
      ("attention", ATTENTION_IMPLS),
      ("moe_exchange", MOE_EXCHANGES),
      ("cpu_matmul", CPU_MATMULS),
    ):
      value = getattr(self, name)
      if value not in allowed:
        raise ConfigError(f"{where}.{name}={value!r} is not one of {list(allowed)}.")
    if self.attention_query_blocks < 1:
      raise ConfigError(
        f"{where}.attention_query_blocks must be >= 1, got {self.attention_query_blocks}."
      )
    if self.cpu_matmul == "mkl" and (why := matmul.unavailable()):
      raise ConfigError(f"{where}.cpu_matmul='mkl': {why}. Set it to 'auto' or 'xla'.")
    if self.scan_unroll < 1:
      raise ConfigError(f"{where}.scan_unroll must be >= 1, got {self.scan_unroll}.")
    if self.moe_block_size <= 0:
      raise ConfigError(f"{where}.moe_block_size must be positive, got {self.moe_block_size}.")
    if self.moe_capacity_factor is not None and self.moe_capacity_factor <= 0:
      raise ConfigError(f"{where}.moe_capacity_factor must be positive or None (dropless).")


@dataclasses.dataclass(frozen=True)
class ThinkerConfig:
  """The Thinker: text decoder plus (from the multimodal issue on) audio and vision towers."""

  text: TextConfig
  audio: AudioEncoderConfig = AudioEncoderConfig()
  vision: VisionEncoderConfig = VisionEncoderConfig()
  impl: ImplConfig = ImplConfig()
  audio_token_id: int = 151675
  image_token_id: int = 151655
  video_token_id: int = 151656
  audio_start_token_id: int = 151669
  audio_end_token_id: int = 151670
  vision_start_token_id: int = 151652
  vision_end_token_id: int = 151653
  position_id_per_seconds: int = 13
  seconds_per_chunk: int = 2

  def validate(self) -> None:
    self.text.validate()
    self.impl.validate()
    for name in (
      "audio_token_id",
      "image_token_id",
      "video_token_id",
      "audio_start_token_id",
      "audio_end_token_id",
      "vision_start_token_id",
      "vision_end_token_id",
    ):
      value = getattr(self, name)
      if not 0 <= value < self.text.vocab_size:
        raise ConfigError(
          f"model.{name}={value} is outside the vocabulary [0, {self.text.vocab_size}); set it "
          "to the tokenizer's id for that special token or enlarge model.text.vocab_size."
        )

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ThinkerConfig":
    d = _to_dict(d)
    d.pop("preset", None)
    sub = {
      "text": TextConfig,
      "audio": AudioEncoderConfig,
      "vision": VisionEncoderConfig,
      "impl": ImplConfig,
    }
    kwargs = {}
    for key, value in d.items():
      if key in sub:
        kwargs[key] = _build(sub[key], value, f"model.{key}")
      else:
        kwargs[key] = value
    if "text" not in kwargs:
      raise ConfigError(
        "model.text is missing: start from a preset, e.g. "
        "`config.model = omnijax.models.presets.get('tiny')`."
      )
    cfg = _build(cls, kwargs, "model")
    cfg.validate()
    return cfg

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def _to_dict(d: Any) -> Any:
  if hasattr(d, "to_dict"):
    d = d.to_dict()
  if isinstance(d, Mapping):
    return {k: _to_dict(v) for k, v in d.items()}
  return d


def _build(cls, values: Mapping[str, Any], where: str):
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = [k for k in values if k not in fields]
  if unknown:
    hints = []
    for k in unknown:
      close = difflib.get_close_matches(k, list(fields), n=1)
      hints.append(f"{where}.{k}" + (f" (did you mean {where}.{close[0]}?)" if close else ""))
    raise ConfigError(
      f"unknown config field(s): {', '.join(hints)}. Valid fields of {where}: {sorted(fields)}."
    )
  out = {}
  for k, v in values.items():
    if isinstance(v, list):
      v = tuple(v)
    out[k] = v
  missing = [
    n
    for n, f in fields.items()
    if n not in out
    and f.default is dataclasses.MISSING
    and f.default_factory is dataclasses.MISSING
  ]
  if missing:
    raise ConfigError(f"{where} is missing required field(s) {missing}.")
  return cls(**out)


@dataclasses.dataclass(frozen=True)
class Code2WavConfig:
  """Code2Wav vocoder (transformers `Qwen3OmniMoeCode2WavConfig` field names; released values)."""

  codebook_size: int = 2048
  num_quantizers: int = 16
  hidden_size: int = 1024
  num_hidden_layers: int = 8
  num_attention_heads: int = 16
  num_key_value_heads: int = 16
  intermediate_size: int = 3072
  sliding_window: int = 72
  layer_scale_initial_scale: float = 0.01
  rms_norm_eps: float = 1e-5
  max_position_embeddings: int = 8000
  rope_theta: float = 10000.0
  upsample_rates: tuple[int, ...] = (8, 5, 4, 3)
  upsampling_ratios: tuple[int, ...] = (2, 2)
  decoder_dim: int = 1536

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def total_upsample(self) -> int:
    """Waveform samples per code frame (1920: 24 kHz at 12.5 frames/s)."""
    out = 1
    for r in self.upsampling_ratios + self.upsample_rates:
      out *= r
    return out

  @property
  def trim(self) -> int:
    """Samples a decode of T frames falls short of total_upsample * T (555 released): each
    decoder block's causal transposed conv crops kernel - stride = rate samples on both ends,
    i.e. loses one input step."""
    trim, scale = 0, 1
    for r in reversed(self.upsample_rates):
      trim += r * scale
      scale *= r
    return trim

  def num_samples(self, frames: int) -> int:
    return self.total_upsample * frames - self.trim

  def transformer(self) -> TextConfig:
    """The pre-transformer as a dense decoder stack (plain 1-D RoPE: all slots temporal)."""
    return TextConfig(
      vocab_size=self.num_quantizers * self.codebook_size,
      hidden_size=self.hidden_size,
      num_hidden_layers=self.num_hidden_layers,
      num_attention_heads=self.num_attention_heads,
      num_key_value_heads=self.num_key_value_heads,
      head_dim=self.head_dim,
      num_experts=0,
      num_experts_per_tok=0,
      moe_intermediate_size=0,
      intermediate_size=self.intermediate_size,
      rms_norm_eps=self.rms_norm_eps,
      rope_theta=self.rope_theta,
      mrope_section=(self.head_dim // 2, 0, 0),
      max_position_embeddings=self.max_position_embeddings,
      qk_norm=False,
      sliding_window=self.sliding_window,
      layer_scale_initial_scale=self.layer_scale_initial_scale,
    )

  def validate(self, where: str = "model.code2wav") -> None:
    if self.hidden_size % self.num_attention_heads:
      raise ConfigError(
        f"{where}.hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
        f"({self.num_attention_heads})."
      )
    if self.decoder_dim % 2 ** len(self.upsample_rates):
      raise ConfigError(
        f"{where}.decoder_dim ({self.decoder_dim}) is halved by each of the "
        f"{len(self.upsample_rates)} decoder blocks; make it a multiple of "
        f"{2 ** len(self.upsample_rates)}."
      )
    self.transformer().validate(f"{where} (pre-transformer)")

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], where: str = "model.code2wav") -> "Code2WavConfig":
    cfg = _build(cls, _to_dict(d), where)
    cfg.validate(where)
    return cfg

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


# TalkerConfig's Thinker-vocabulary ids (transformers keeps them at the top of its config).
TALKER_THINKER_TOKEN_FIELDS = (
  "tts_pad_token_id",
  "tts_bos_token_id",
  "tts_eos_token_id",
  "im_start_token_id",
  "im_end_token_id",
  "system_token_id",
  "user_token_id",
  "assistant_token_id",
)


@dataclasses.dataclass(frozen=True)
class TalkerConfig:
  """The Talker (transformers `Qwen3OmniMoeTalkerConfig` field names; released values as
  defaults where they are not sizes): a MoE decoder over codec frames whose codebook 0 it
  predicts (`text`: vocab = the codec vocabulary, every layer MoE with a shared expert; its
  intermediate_size is the hidden width of text_projection / hidden_projection, as in
  transformers), and the dense MTP code predictor (`code_predictor`) for codebooks 1..15."""

  text: TextConfig
  code_predictor: TextConfig
  num_code_groups: int = 16
  thinker_hidden_size: int = 2048
  accept_hidden_layer: int = 24
  codec_pad_id: int = 2148
  codec_bos_id: int = 2149
  codec_eos_token_id: int = 2150
  codec_nothink_id: int = 2155
  codec_think_bos_id: int = 2156
  codec_think_eos_id: int = 2157
  speaker_id: tuple[tuple[str, int], ...] = (("chelsie", 2301), ("ethan", 2302), ("aiden", 2303))
  # Thinker-vocabulary ids the Talker reads (transformers keeps them in the top-level config).
  tts_pad_token_id: int = 151671
  tts_bos_token_id: int = 151672
  tts_eos_token_id: int = 151673
  im_start_token_id: int = 151644
  im_end_token_id: int = 151645
  system_token_id: int = 8948
  user_token_id: int = 872
  assistant_token_id: int = 77091
  spatial_merge_size: int = 2

  @property
  def codebook_size(self) -> int:
    return self.code_predictor.vocab_size

  def speakers(self) -> dict[str, int]:
    return dict(self.speaker_id)

  def validate(self, thinker: "ThinkerConfig | None" = None, where: str = "model.talker") -> None:
    def need(cond: bool, msg: str) -> None:
      if not cond:
        raise ConfigError(f"{where}: {msg}")

    self.text.validate(f"{where}.text")
    self.code_predictor.validate(f"{where}.code_predictor")
    t, p = self.text, self.code_predictor
    need(
      all(t.is_moe_layer(i) for i in range(t.num_hidden_layers))
      and t.shared_expert_intermediate_size > 0,
      "every Talker layer is a sparse-MoE block with a shared expert; set text.mlp_only_layers=(), "
      "text.decoder_sparse_step=1 and text.shared_expert_intermediate_size > 0.",
    )
    need(
      t.intermediate_size > 0, "text.intermediate_size (the projections' hidden width) must be > 0."
    )
    need(
      p.num_experts == 0 and p.intermediate_size > 0,
      "the code predictor is dense: set code_predictor.num_experts=0 and intermediate_size > 0.",
    )
    need(
      p.hidden_size == t.hidden_size,
      f"code_predictor.hidden_size ({p.hidden_size}) must equal text.hidden_size ({t.hidden_size}): "
      "the predictor reads the Talker's hidden state without a projection.",
    )
    need(self.num_code_groups >= 2, f"num_code_groups must be >= 2, got {self.num_code_groups}.")
    need(
      p.vocab_size <= t.vocab_size,
      f"code_predictor.vocab_size ({p.vocab_size}) is the codebook size; codebook 0 shares the "
      f"Talker vocabulary (text.vocab_size={t.vocab_size}), which must hold it.",
    )
    codec = {
      k: getattr(self, k)
      for k in (
        "codec_pad_id",
        "codec_bos_id",
        "codec_eos_token_id",
        "codec_nothink_id",
        "codec_think_bos_id",
        "codec_think_eos_id",
      )
    } | {f"speaker_id[{n!r}]": i for n, i in self.speaker_id}
    for k, v in codec.items():
      need(
        p.vocab_size <= v < t.vocab_size,
        f"{k}={v} must be a special codec id in [codebook_size={p.vocab_size}, "
        f"text.vocab_size={t.vocab_size}).",
      )
    if thinker is not None:
      need(
        self.thinker_hidden_size == thinker.text.hidden_size,
        f"thinker_hidden_size ({self.thinker_hidden_size}) must equal model.text.hidden_size "
        f"({thinker.text.hidden_size}).",
      )
      need(
        0 <= self.accept_hidden_layer <= thinker.text.num_hidden_layers,
        f"accept_hidden_layer ({self.accept_hidden_layer}) indexes the Thinker's hidden states "
        f"0..{thinker.text.num_hidden_layers} (0: embeddings, k: after k layers).",
      )
      for k in TALKER_THINKER_TOKEN_FIELDS:
        v = getattr(self, k)
        need(
          0 <= v < thinker.text.vocab_size,
          f"{k}={v} is outside the Thinker vocabulary [0, {thinker.text.vocab_size}); set it to "
          "the tokenizer's id of that token.",
        )

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], where: str = "model.talker") -> "TalkerConfig":
    d = _to_dict(d)
    kwargs = {}
    for key, value in d.items():
      if key in ("text", "code_predictor"):
        value = _build(TextConfig, value, f"{where}.{key}")
      elif key == "speaker_id":  # {name: id} or (name, id) pairs, kept in id order
        pairs = value.items() if isinstance(value, Mapping) else value
        value = tuple(sorted(((str(n), int(i)) for n, i in pairs), key=lambda x: x[1]))
      kwargs[key] = value
    for key in ("text", "code_predictor"):
      if key not in kwargs:
        raise ConfigError(f"{where}.{key} is missing: start from a preset's talker.")
    cfg = _build(cls, kwargs, where)
    cfg.validate(where=where)
    return cfg

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)
