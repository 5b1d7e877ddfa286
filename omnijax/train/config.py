"""The trainer's config schema with defaults; experiments start from ``base_config()``."""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from omnijax import sharding as shd
from omnijax.models import presets


def base_config(model_preset: str = "tiny") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = presets.get(model_preset)

  # Mesh axes (data, fsdp, expert, tensor); one may be -1 = all remaining devices.
  # `mesh.dcn` (same axes) spans slices over the data-center network.
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, expert=1, context=1, tensor=1))
  # Logical axis -> comma-separated mesh axes ('' = replicated), e.g.
  # --config.sharding.rules.embed=fsdp,tensor
  c.sharding = ml_collections.ConfigDict(dict(rules=shd.rules_as_strings()))

  c.data = ml_collections.ConfigDict()
  c.data.kind = "text"  # text | omni (mixed modalities) | synthetic (random tokens, benchmarks)
  c.data.path = ""  # kind=text: shard directory
  # kind=omni: {name: {path, task (text|caption|asr|audio|video), weight (token ratio)}}
  c.data.mixture = ml_collections.ConfigDict()
  # tokens: a source's weight is its token ratio; epochs: how often each of its examples is
  # read per pass over the mixture (optionally over its first max_examples examples).
  c.data.mixture_by = "tokens"
  c.data.estimate_samples = 8  # examples per source that turn token ratios into sampling weights
  # Media buffer sizes per row (kind=omni). A batch takes the smallest that fit, so the train
  # step compiles at most once per combination; the largest are what a row can hold.
  c.data.buckets = ml_collections.ConfigDict(
    dict(
      audio_frames=(800, 3000),  # mel frames per audio (100 per second)
      audios_per_row=4,
      image_patches=(1024, 4096),  # 16x16 patches per row
      video_patches=(4096,),
    )
  )
  c.data.local_text = ""  # build the local text corpus here if it is missing
  c.data.local_media = ""  # build the local multimodal corpus here if it is missing
  c.data.tokenizer = ""  # tokenizer.json; empty: train a BPE on data.tokenizer_corpus
  c.data.tokenizer_corpus = ""  # text shards for that BPE (default: data.path)
  c.data.tokenizer_vocab_size = 4096
  c.data.seq_len = 512
  c.data.shuffle = True
  c.data.num_epochs = config_dict.placeholder(int)  # None: repeat forever
  c.data.worker_count = 0
  c.data.ops = ("decode_text", "tokenize", "lm_shift")
  # With a Talker (talker.model): Talker positions and MTP frames per row. Spoken sources
  # (task tts | spoken_asr) name their `codec` (a speech tokenizer run) and `speaker`.
  c.data.talker_seq_len = 0
  c.data.talker_mtp_rows = 0

  # The Talker (omnijax.models.talker), trained with the Thinker when `model` is set (e.g.
  # presets.get_talker("tiny")): loss = thinker_loss_weight x the Thinker's text loss +
  # codebook-0 CE + mtp_loss_weight x the MTP heads' mean CE (+ both aux losses). With
  # freeze_thinker the Thinker gets no gradient (also freeze it: optim.frozen=("thinker/.*",)).
  c.talker = ml_collections.ConfigDict()
  c.talker.model = ml_collections.ConfigDict()
  c.talker.freeze_thinker = False
  c.talker.thinker_loss_weight = 1.0
  c.talker.mtp_loss_weight = 0.3
  # The vocoder of the run's codes, kept in workdir/code2wav/ so that omnijax.load(workdir)
  # speaks: a codec run (experiments/codec.py) or a directory with code2wav.json.
  c.talker.code2wav = ""

  # Evaluators (omnijax.evaluators): {name: {kind, ...kind's options}}, run every `every`
  # steps (0: only at the end) and at the end, on held-out splits.
  c.eval = ml_collections.ConfigDict()
  c.eval.evaluators = ml_collections.ConfigDict()
  c.eval.every = 0
  c.eval.split = "validation"
  # Sources the evaluators read (as data.mixture; a source may set eval_split); empty: the
  # training mixture. Arms of an ablation evaluate on the same sources whatever they train on.
  c.eval.mixture = ml_collections.ConfigDict()
  c.eval.batches = 8  # batches per source and evaluation (loss evaluators)
  c.eval.batch_size = config_dict.placeholder(int)  # None: train.global_batch_size

  c.train = ml_collections.ConfigDict()
  c.train.total_steps = 1000  # the schedule's length
  # > 0: the length in passes over the mixture instead (data.mixture_by=epochs); total_steps
  # = ceil(epochs x the mixture's tokens / tokens per step).
  c.train.epochs = 0.0
  c.train.stop_at_step = config_dict.placeholder(int)  # stop (and checkpoint) early, e.g. per job
  c.train.global_batch_size = 8
  c.train.grad_accum_steps = 1
  c.train.z_loss = 0.0
  # XLA:CPU's schedule on the host (step.CPU_SCHEDULES): `memory` holds fewer temporaries
  c.train.cpu_schedule = "concurrency"
  c.train.log_every = 10
  c.train.checkpoint_every = 500
  c.train.keep_checkpoints = 3
  c.train.async_checkpoint = True
  c.train.peak_flops_per_device = config_dict.placeholder(float)  # None: device table / measured
  # Start a fresh run from another run's params (not its optimizer or data state):
  # "WORKDIR" (its newest checkpoint) or "WORKDIR:STEP".
  c.train.init_from = ""
  # A step whose loss or gradients are not finite is skipped (counted in `nonfinite_steps`);
  # more than this many in a row stop the run.
  c.train.max_consecutive_nonfinite = 20
  c.train.profile_steps = ()  # (first, last): a profiler trace of these steps in workdir/profile

  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 3e-4
  c.optim.warmup_steps = 100
  c.optim.min_lr_ratio = 0.1
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.1
  c.optim.weight_decay_exclude = ("norm",)  # regexes on '/'-joined param paths
  c.optim.grad_clip_norm = 1.0
  # Regexes on '/'-joined param paths. Empty `trainable`: every param trains. A param trains if
  # it matches a `trainable` pattern (when any) and no `frozen` one; frozen params keep their
  # values bit-exactly and get no optimizer state. Each pattern must match some param.
  c.optim.trainable = ()
  c.optim.frozen = ()
  return c
