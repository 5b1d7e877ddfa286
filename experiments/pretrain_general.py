r"""Stage-2 general pretraining of the Thinker (Qwen3-Omni recipe, seed 004): text, image,
audio, video and audio-video mixed from the first step at the stage's token ratios.

The full run trains the released 30B-A3B Thinker at sequence length 8192 on a mesh that
fills every device with FSDP and puts experts on an `expert` axis; its sources are shard
directories written by `python -m data_pipelines.prepare` (one per task):

  python -m omnijax.launch --exp=pretrain_general --workdir=gs://BUCKET/pretrain_general \
      --config.data.tokenizer=/data/qwen3_omni/tokenizer.json

`:local` is the small local default: the tiny Thinker on CPU, on corpora the project builds
itself (the Python standard library's documentation as text; rendered shapes, synthesised
speech and narrated videos of the same scenes), a few minutes end to end:

  python -m omnijax.launch --exp=pretrain_general:local

`:small` is the ~100M-parameter preset on the same local corpora (local benchmarks).
"""

import os

from data_pipelines.omni import STAGE2_TOKEN_RATIOS
from omnijax.train.config import base_config

CACHE = os.environ.get("OMNIJAX_CACHE", os.path.expanduser("~/.cache/omnijax"))
LOCAL_TEXT = os.path.join(CACHE, "local_text")
LOCAL_MEDIA = os.path.join(CACHE, "local_media")


def get_config(arg=None):
  arg = arg or "full"
  if arg not in ("full", "local", "small"):
    raise ValueError(f"pretrain_general has variants full, local, small; got {arg!r}")

  if arg == "full":
    c = base_config("qwen3-omni-30b-a3b")
    c.model.impl.dtype = "bfloat16"
    c.model.impl.remat_policy = "dots_no_batch"
    c.model.impl.moe_capacity_factor = 2.0
    c.mesh.update(dict(data=1, fsdp=-1, expert=8, tensor=1))
    c.data.kind = "omni"
    c.data.mixture = {
        name: dict(path=f"data/pretrain_general/{name}", task=task, weight=weight)
        for name, (task, weight) in dict(
            text=("text", STAGE2_TOKEN_RATIOS["text"]),
            image=("caption", STAGE2_TOKEN_RATIOS["image"]),
            audio=("asr", STAGE2_TOKEN_RATIOS["audio"]),
            video=("video", STAGE2_TOKEN_RATIOS["video"]),
            video_audio=("video", STAGE2_TOKEN_RATIOS["video_audio"])).items()}
    c.data.seq_len = 8192
    c.data.worker_count = 8
    c.train.total_steps = 250_000
    c.train.global_batch_size = 256
    c.train.log_every = 10
    c.train.checkpoint_every = 1000
    c.optim.learning_rate = 3e-4
    c.optim.warmup_steps = 2000
    return c

  c = base_config("tiny" if arg == "local" else "small")
  c.data.kind = "omni"
  c.data.local_text = LOCAL_TEXT
  c.data.local_media = LOCAL_MEDIA
  c.data.tokenizer_corpus = LOCAL_TEXT
  c.data.tokenizer_vocab_size = c.model.text.vocab_size
  # The local corpus's videos all carry narration: they stand for both video shares.
  c.data.mixture = dict(
      text=dict(path=LOCAL_TEXT, task="text", weight=STAGE2_TOKEN_RATIOS["text"]),
      image=dict(path=f"{LOCAL_MEDIA}/caption", task="caption",
                 weight=STAGE2_TOKEN_RATIOS["image"]),
      audio=dict(path=f"{LOCAL_MEDIA}/asr", task="asr", weight=STAGE2_TOKEN_RATIOS["audio"]),
      video_audio=dict(path=f"{LOCAL_MEDIA}/video", task="video",
                       weight=STAGE2_TOKEN_RATIOS["video"] + STAGE2_TOKEN_RATIOS["video_audio"],
                       # keep the corpus's 128x96 frames (the default minimum upscales them)
                       ops=("decode_text", "decode_video(fps=2.0, min_pixels=12288)")))
  c.data.seq_len = 512
  c.data.buckets.update(dict(audio_frames=(800,), audios_per_row=8, image_patches=(512,),
                             video_patches=(768,)))
  c.train.total_steps = 300
  c.train.global_batch_size = 4
  c.train.log_every = 25
  c.train.checkpoint_every = 100
  c.optim.learning_rate = 3e-3 if arg == "local" else 1e-3
  c.optim.warmup_steps = 30
  return c
