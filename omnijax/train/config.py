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
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, expert=1, tensor=1))
  # Logical axis -> comma-separated mesh axes ('' = replicated), e.g.
  # --config.sharding.rules.embed=fsdp,tensor
  c.sharding = ml_collections.ConfigDict(dict(rules=shd.rules_as_strings()))

  c.data = ml_collections.ConfigDict()
  c.data.kind = "text"  # text | synthetic (random tokens, for benchmarks)
  c.data.path = ""  # shard directory
  c.data.local_corpus = False  # build the local text corpus at data.path if it is missing
  c.data.tokenizer = ""  # tokenizer.json; empty: train a BPE of tokenizer_vocab_size on data.path
  c.data.tokenizer_vocab_size = 4096
  c.data.seq_len = 512
  c.data.shuffle = True
  c.data.num_epochs = config_dict.placeholder(int)  # None: repeat forever
  c.data.worker_count = 0
  c.data.ops = ("decode_text", "tokenize", "lm_shift")

  c.train = ml_collections.ConfigDict()
  c.train.total_steps = 1000  # the schedule's length
  c.train.stop_at_step = config_dict.placeholder(int)  # stop (and checkpoint) early, e.g. per job
  c.train.global_batch_size = 8
  c.train.grad_accum_steps = 1
  c.train.z_loss = 0.0
  c.train.log_every = 10
  c.train.checkpoint_every = 500
  c.train.keep_checkpoints = 3
  c.train.async_checkpoint = True
  c.train.peak_flops_per_device = config_dict.placeholder(float)  # None: device table / measured

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
  return c
