"""The tokenizer and processor files of an exported transformers directory.

``write(out_dir, tokenizer, cfg)`` puts beside config.json + safetensors what
``AutoTokenizer`` and ``AutoProcessor`` (a ``Qwen3OmniMoeProcessor``) load:

  tokenizer.json                  the run's tokenizer, as trained
  tokenizer_config.json           ``TokenizersBackend`` (runs tokenizer.json as is:
                                  ``Qwen2Tokenizer`` would re-split it with Qwen's own regex),
                                  eos/pad ``<|endoftext|>`` (the document end omnijax trains on),
                                  the multimodal tokens under the attribute names the processor
                                  reads (``audio_token``, ``vision_bos_token``, ...), the other
                                  special tokens, ``added_tokens_decoder``, ``model_max_length``
  chat_template.jinja             ChatML with ``<|audio_start|><|audio_pad|><|audio_end|>``,
                                  ``<|vision_start|><|image_pad|><|vision_end|>`` and
                                  ``<|vision_start|><|video_pad|><|vision_end|>`` per media item,
                                  which the processor expands to the items' token counts
  processor_config.json           the processor with each sub-processor's config (5.x layout)
  preprocessor_config.json        WhisperFeatureExtractor + Qwen2VLImageProcessor (legacy layout)
  video_preprocessor_config.json  Qwen2VLVideoProcessor (legacy layout)

Processor values are those of the model config (mel bins, patch sizes) and of data_pipelines'
ops (16 kHz, n_fft 400, hop 160, mean = std = 0.5, pixel ranges, 2 fps sampling). Its PIL image
backend reproduces ``data_pipelines.vision`` (to 1e-6). Not expressible in these files: the
processor's ``position_id_per_seconds`` (13), ``seconds_per_chunk`` (2) and ``n_window`` (50),
class defaults to pass at call time for a config that differs; and ``fps``, which the processor
reads only from its call to compute ``video_second_per_grid`` (default 1.0).
"""

from __future__ import annotations

import json
import pathlib
import tempfile
from typing import Any

from data_pipelines import audio as audio_ops
from data_pipelines import tokenizer as tok_lib
from data_pipelines import video as video_ops
from data_pipelines import vision as vision_ops
from omnijax import paths
from omnijax.errors import ConfigError
from omnijax.models.config import ThinkerConfig

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
PROCESSOR_CONFIG = "processor_config.json"
PREPROCESSOR_CONFIG = "preprocessor_config.json"
VIDEO_PREPROCESSOR_CONFIG = "video_preprocessor_config.json"
PROCESSOR_CLASS = "Qwen3OmniMoeProcessor"

# Qwen3-Omni processor attribute -> (token, ThinkerConfig field holding its id).
MULTIMODAL_TOKENS = {
  "audio_token": ("<|audio_pad|>", "audio_token_id"),
  "image_token": ("<|image_pad|>", "image_token_id"),
  "video_token": ("<|video_pad|>", "video_token_id"),
  "audio_bos_token": ("<|audio_start|>", "audio_start_token_id"),
  "audio_eos_token": ("<|audio_end|>", "audio_end_token_id"),
  "vision_bos_token": ("<|vision_start|>", "vision_start_token_id"),
  "vision_eos_token": ("<|vision_end|>", "vision_end_token_id"),
}

CHAT_TEMPLATE = (
  "{%- for message in messages %}"
  "{{- '<|im_start|>' + message['role'] + '\\n' }}"
  "{%- if message['content'] is string %}"
  "{{- message['content'] }}"
  "{%- else %}"
  "{%- for item in message['content'] %}"
  "{%- if item['type'] == 'audio' or 'audio' in item or 'audio_url' in item %}"
  "{{- '<|audio_start|><|audio_pad|><|audio_end|>' }}"
  "{%- elif item['type'] == 'image' or 'image' in item or 'image_url' in item %}"
  "{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
  "{%- elif item['type'] == 'video' or 'video' in item %}"
  "{{- '<|vision_start|><|video_pad|><|vision_end|>' }}"
  "{%- elif 'text' in item %}"
  "{{- item['text'] }}"
  "{%- endif %}"
  "{%- endfor %}"
  "{%- endif %}"
  "{{- '<|im_end|>\\n' }}"
  "{%- endfor %}"
  "{%- if add_generation_prompt %}"
  "{{- '<|im_start|>assistant\\n' }}"
  "{%- endif %}"
)


def check(tokenizer: tok_lib.TextTokenizer, cfg: ThinkerConfig) -> None:
  """Raises ConfigError unless the tokenizer fits the model's vocabulary and special token ids."""
  if tokenizer.vocab_size > cfg.text.vocab_size:
    raise ConfigError(
      f"the tokenizer has {tokenizer.vocab_size} tokens but the model vocabulary "
      f"is {cfg.text.vocab_size}; they do not belong together."
    )
  for token, field in MULTIMODAL_TOKENS.values():
    try:
      tid = tokenizer.token_id(token)
    except KeyError:
      tid = None
    if tid != getattr(cfg, field):
      raise ConfigError(
        f"the model's {field} is {getattr(cfg, field)} but the tokenizer maps "
        f"{token} to {tid}; they do not belong together."
      )


def tokenizer_config(added_tokens: list[dict[str, Any]], cfg: ThinkerConfig) -> dict[str, Any]:
  """tokenizer_config.json for a tokenizer.json with these ``added_tokens`` entries."""
  named = {tok_lib.EOS_TOKEN} | {token for token, _ in MULTIMODAL_TOKENS.values()}
  keys = ("content", "lstrip", "normalized", "rstrip", "single_word", "special")
  return dict(
    tokenizer_class="TokenizersBackend",
    processor_class=PROCESSOR_CLASS,
    bos_token=None,
    eos_token=tok_lib.EOS_TOKEN,
    pad_token=tok_lib.EOS_TOKEN,
    unk_token=None,
    **{attr: token for attr, (token, _) in MULTIMODAL_TOKENS.items()},
    extra_special_tokens=[
      t["content"] for t in added_tokens if t["special"] and t["content"] not in named
    ],
    added_tokens_decoder={str(t["id"]): {k: t[k] for k in keys} for t in added_tokens},
    model_max_length=cfg.text.max_position_embeddings,
    clean_up_tokenization_spaces=False,
    split_special_tokens=False,
  )


def _rgb_processing() -> dict[str, Any]:
  return dict(
    do_convert_rgb=True,
    do_resize=True,
    resample=3,  # PIL bicubic
    do_rescale=True,
    rescale_factor=1 / 255,
    do_normalize=True,
    image_mean=list(vision_ops.IMAGE_MEAN),
    image_std=list(vision_ops.IMAGE_STD),
  )


def processor_configs(cfg: ThinkerConfig) -> dict[str, dict[str, Any]]:
  """The sub-processor configs {feature_extractor, image_processor, video_processor}."""
  patches = dict(
    patch_size=cfg.vision.patch_size,
    temporal_patch_size=cfg.vision.temporal_patch_size,
    merge_size=cfg.vision.spatial_merge_size,
  )
  feature_extractor = dict(
    feature_extractor_type="WhisperFeatureExtractor",
    feature_size=cfg.audio.num_mel_bins,
    sampling_rate=audio_ops.SAMPLE_RATE,
    hop_length=audio_ops.HOP_LENGTH,
    n_fft=audio_ops.N_FFT,
    chunk_length=300,  # as released: the processor never truncates
    dither=0.0,
    padding_side="right",
    padding_value=0.0,
    return_attention_mask=True,
  )
  image_processor = dict(
    image_processor_type="Qwen2VLImageProcessor",
    **_rgb_processing(),
    size=dict(shortest_edge=vision_ops.MIN_PIXELS, longest_edge=vision_ops.MAX_PIXELS),
    **patches,
  )
  video_processor = dict(
    video_processor_type="Qwen2VLVideoProcessor",
    **_rgb_processing(),
    size=dict(shortest_edge=video_ops.VIDEO_MIN_PIXELS, longest_edge=video_ops.VIDEO_MAX_PIXELS),
    do_sample_frames=True,
    fps=video_ops.FPS,
    min_frames=video_ops.MIN_FRAMES,
    max_frames=video_ops.MAX_FRAMES,
    cap_pixels_per_frame=False,
    **patches,
  )
  return dict(
    feature_extractor=feature_extractor,
    image_processor=image_processor,
    video_processor=video_processor,
  )


def write(out_dir: paths.PathLike, tokenizer: tok_lib.TextTokenizer, cfg: ThinkerConfig) -> None:
  """Writes the tokenizer and processor files (see the module doc) to out_dir."""
  check(tokenizer, cfg)
  out_dir = paths.path(out_dir)
  with tempfile.TemporaryDirectory() as tmp:  # the tokenizer saves to a local file only
    tokenizer.save(pathlib.Path(tmp) / TOKENIZER_JSON)
    text = (pathlib.Path(tmp) / TOKENIZER_JSON).read_text()
  (out_dir / TOKENIZER_JSON).write_text(text)
  added = json.loads(text)["added_tokens"]
  subs = processor_configs(cfg)
  files = {
    TOKENIZER_CONFIG: tokenizer_config(added, cfg),
    PROCESSOR_CONFIG: dict(processor_class=PROCESSOR_CLASS, **subs),
    PREPROCESSOR_CONFIG: dict(
      subs["feature_extractor"], **subs["image_processor"], processor_class=PROCESSOR_CLASS
    ),
    VIDEO_PREPROCESSOR_CONFIG: dict(subs["video_processor"], processor_class=PROCESSOR_CLASS),
  }
  for name, content in files.items():
    (out_dir / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")
  (out_dir / CHAT_TEMPLATE_FILE).write_text(CHAT_TEMPLATE)
