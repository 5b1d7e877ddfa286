"""Pieces of the Qwen3-Omni pretraining recipe (seed 004) that the experiments share.

An experiment is ``get_config(arg)``: it starts from ``full_config()`` (the released-scale
run) or ``local_config()`` (the tiny model on the corpora the project builds, on CPU), then
changes the mixture, the trainable parameters or the length.
"""

from __future__ import annotations

import os

import ml_collections

from omnijax.train.config import base_config

CACHE = os.environ.get("OMNIJAX_CACHE", os.path.expanduser("~/.cache/omnijax"))
LOCAL_TEXT = os.path.join(CACHE, "local_text")
LOCAL_MEDIA = os.path.join(CACHE, "local_media")

# Stage-2 ("general") token budget by source (seed 004), in trillions of tokens.
STAGE2_TOKEN_RATIOS = dict(text=0.57, audio=0.77, image=0.82, video=0.05, video_audio=0.05)
# Mixture source -> task (data_pipelines.omni.TASK_OPS) of the released-scale sources.
FULL_TASKS = dict(
  text="text", scene_text="text", image="caption", audio="asr", video="video", video_audio="video"
)

# Stage 1 trains, with the LLM frozen, first each encoder's adapter, then the encoder.
# Regexes on '/'-joined parameter paths (optim.trainable).
ADAPTERS = (r"^audio_tower/proj[12]/", r"^visual/merger(_list_\d+)?/")
ENCODERS = (r"^audio_tower/", r"^visual/")


def parse_arg(arg: str | None, **spec) -> ml_collections.ConfigDict:
  """big_vision's `parse_arg`: "local,arm=omni,seed=2" -> ConfigDict over `spec`'s defaults.

  A bare key sets a boolean to True; values take the type of their default. Unknown keys and
  unparsable values raise ValueError naming the valid keys."""
  out = ml_collections.ConfigDict(spec)
  for item in filter(None, (arg or "").split(",")):
    key, eq, value = item.partition("=")
    if key not in spec:
      raise ValueError(
        f"unknown argument {key!r}; this experiment takes {sorted(spec)} "
        "(comma separated, e.g. local,seed=1)."
      )
    default = spec[key]
    if not eq:
      if not isinstance(default, bool):
        raise ValueError(f"argument {key} needs a value ({key}={default!r}).")
      out[key] = True
    elif isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"argument {key}={value!r} is not a boolean.")
      out[key] = value.lower() in ("true", "1")
    else:
      try:
        out[key] = type(default)(value)
      except ValueError as e:
        raise ValueError(f"argument {key}={value!r} is not a {type(default).__name__}.") from e
  return out


def full_config(stage: str, ratios: dict[str, float]) -> ml_collections.ConfigDict:
  """The released 30B-A3B Thinker on a pod: FSDP over every device, experts on an `expert`
  axis, sequence length 8192, sources prepared under data/<stage>/<source>."""
  c = base_config("qwen3-omni-30b-a3b")
  c.model.impl.dtype = "bfloat16"
  c.model.impl.remat_policy = "dots_no_batch"
  c.model.impl.moe_capacity_factor = 2.0
  c.mesh.update(dict(data=1, fsdp=-1, expert=8, context=1, tensor=1))
  c.data.kind = "omni"
  c.data.mixture = {
    name: dict(path=f"data/{stage}/{name}", task=FULL_TASKS[name], weight=w)
    for name, w in ratios.items()
  }
  c.data.seq_len = 8192
  c.data.worker_count = 8
  c.train.total_steps = 250_000
  c.train.global_batch_size = 256
  c.train.log_every = 10
  c.train.checkpoint_every = 1000
  c.optim.learning_rate = 3e-4
  c.optim.warmup_steps = 2000
  c.eval.every = 5000
  c.eval.batches = 50
  return c


# The local corpus's sources: name -> (path under the cache, task, ops override).
_LOCAL_SOURCES = dict(
  text=(LOCAL_TEXT, "text", None),
  image=(f"{LOCAL_MEDIA}/caption", "caption", None),
  audio=(f"{LOCAL_MEDIA}/asr", "asr", None),
  # keep the corpus's 128x96 frames (the default minimum upscales them)
  video_audio=(
    f"{LOCAL_MEDIA}/video",
    "video",
    ("decode_text", "decode_video(fps=2.0, min_pixels=12288)"),
  ),
  # the same scenes' facts stated as text (the text side of the cross-modal questions)
  scene_text=(f"{LOCAL_MEDIA}/text", "text", None),
  # the narrated videos without their sound (vision only)
  video=(
    f"{LOCAL_MEDIA}/video",
    "video",
    ("decode_text", "decode_video(fps=2.0, min_pixels=12288, audio=False)"),
  ),
)


def local_mixture(ratios: dict[str, float]) -> dict:
  out = {}
  for name, weight in ratios.items():
    path, task, ops = _LOCAL_SOURCES[name]
    out[name] = dict(path=path, task=task, weight=weight)
    if ops:
      out[name]["ops"] = ops
  return out


# Stage-2 ratios on the local corpus: its videos all carry narration, so one source stands for
# both video shares.
LOCAL_STAGE2_RATIOS = dict(
  text=STAGE2_TOKEN_RATIOS["text"],
  image=STAGE2_TOKEN_RATIOS["image"],
  audio=STAGE2_TOKEN_RATIOS["audio"],
  video_audio=STAGE2_TOKEN_RATIOS["video"] + STAGE2_TOKEN_RATIOS["video_audio"],
)


def local_config(ratios: dict[str, float], preset: str = "tiny") -> ml_collections.ConfigDict:
  """The tiny (or small) Thinker on CPU on the local corpora, a few minutes per run."""
  c = base_config(preset)
  c.data.kind = "omni"
  c.data.local_text = LOCAL_TEXT
  c.data.local_media = LOCAL_MEDIA
  c.data.tokenizer_corpus = LOCAL_TEXT
  c.data.tokenizer_vocab_size = c.model.text.vocab_size
  c.data.mixture = local_mixture(ratios)
  c.data.seq_len = 512
  c.data.buckets.update(
    dict(audio_frames=(800,), audios_per_row=8, image_patches=(512,), video_patches=(768,))
  )
  c.train.total_steps = 300
  c.train.global_batch_size = 4
  c.train.log_every = 25
  c.train.checkpoint_every = 100
  c.optim.learning_rate = 3e-3 if preset == "tiny" else 1e-3
  c.optim.warmup_steps = 30
  c.eval.every = 100
  c.eval.batches = 8
  c.eval.batch_size = 8
  return c


def evaluators(c) -> dict:
  """Held-out loss of every source (and text perplexity); on the local corpus also greedy
  decoding: ASR word error rate and scene-description accuracy of images and videos."""
  out = dict(heldout=dict(kind="heldout_loss", sources=()))
  sources = c.eval.mixture or c.data.mixture
  if c.data.local_media:
    decoding = dict(
      audio=("asr", "asr_wer"),
      image=("image_scenes", "scene_description"),
      video=("video_scenes", "scene_description"),
    )
    for source, (name, kind) in decoding.items():
      if source in sources:
        out[name] = dict(kind=kind, source=source, max_examples=32)
  return out


# The pretraining chain (python -m omnijax.chain): (stage, experiment); each stage starts
# from the previous stage's params.
CHAIN = (
  ("s1_adapters", "pretrain_s1_align:phase=adapters"),
  ("s1_encoders", "pretrain_s1_align:phase=encoders"),
  ("s2_general", "pretrain_general"),
  ("s3_long_context", "pretrain_long_context"),
)
