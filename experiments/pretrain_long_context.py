r"""Stage 3, long context (Qwen3-Omni recipe, seed 004): the maximum length goes from 8,192 to
32,768 tokens and long audio and long video are upweighted (their token ratios doubled, clips
kept up to 5 minutes of audio and 2 minutes of video), starting from stage 2's params.

  python -m omnijax.launch --exp=pretrain_long_context --workdir=gs://BUCKET/s3 \
      --config.train.init_from=gs://BUCKET/s2

The released-scale step compiles for TPU pods on any host (`python -m omnijax.aot
--exp=pretrain_long_context --topology=v5p-256`, or `v6e-256`).

`local` trains the tiny Thinker at 1,024 tokens (stage 2's local length is 512) with larger
media buffers, on the local corpora.
"""

from experiments import recipe

UPWEIGHT = 2.0  # on the audio and video sources' token ratios
LONG_OPS = dict(
  audio=("decode_text", "decode_audio(truncate=False, max_seconds=300)", "log_mel"),
  video=("decode_text", "decode_video(fps=2.0, max_seconds=120)"),
  video_audio=("decode_text", "decode_video(fps=2.0, max_seconds=120)"),
)


def get_config(arg=None):
  arg = recipe.parse_arg(arg, local=False)
  if arg.local:
    ratios = {
      k: v * (UPWEIGHT if k != "text" and k != "image" else 1.0)
      for k, v in recipe.LOCAL_STAGE2_RATIOS.items()
    }
    c = recipe.local_config(ratios)
    c.data.seq_len = 1024
    c.data.buckets.update(
      dict(
        audio_frames=(800, 1600),
        audios_per_row=16,
        image_patches=(512, 1024),
        video_patches=(768, 1536),
      )
    )
    c.train.total_steps = 100
    c.train.global_batch_size = 2
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 10
  else:
    ratios = {
      k: v * (UPWEIGHT if k in LONG_OPS else 1.0) for k, v in recipe.STAGE2_TOKEN_RATIOS.items()
    }
    c = recipe.full_config("pretrain_long_context", ratios)
    for name, ops in LONG_OPS.items():
      c.data.mixture[name].ops = ops
    c.data.seq_len = 32_768
    c.data.buckets.update(
      dict(
        audio_frames=(3000, 12_000, 30_000),
        # 8 five-minute audios are 31,200 Thinker tokens: a full row
        audios_per_row=8,
        image_patches=(4096, 16_384),
        video_patches=(16_384, 65_536),
      )
    )
    c.train.total_steps = 20_000
    c.train.global_batch_size = 64
    # Context parallelism: each 32k row's sequence over 4 devices, so the 64 rows still spread
    # over v5p-256's 128 and v6e-256's 256 chips.
    c.mesh.context = 4
    # Save only the q/k/v projections for the backward pass: stage 2's dots_no_batch also
    # keeps every expert's activations, 98 GiB of temporaries per v5p chip at this length.
    c.model.impl.remat_policy = "qkv_proj"
    c.optim.learning_rate = 1e-4
  c.eval.evaluators = recipe.evaluators(c)
  return c
