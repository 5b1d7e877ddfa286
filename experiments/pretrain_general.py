r"""Stage-2 general pretraining of the Thinker (Qwen3-Omni recipe, seed 004).

The full run trains the released 30B-A3B Thinker at sequence length 8192 on a mesh that
fills every device with FSDP and puts experts on an `expert` axis:

  python -m omnijax.launch --exp=pretrain_general --workdir=gs://BUCKET/pretrain_general \
      --config.data.path=/data/shards --config.data.tokenizer=/data/qwen3_omni/tokenizer.json

`:local` is the small local default: the tiny Thinker on CPU, on a text corpus the project
builds from the Python standard library's documentation, a few minutes end to end:

  python -m omnijax.launch --exp=pretrain_general:local

`:small` is the ~100M-parameter preset on the same local corpus (local benchmarks).
"""

import os

from omnijax.train.config import base_config

LOCAL_CORPUS = os.path.join(os.environ.get("OMNIJAX_CACHE", os.path.expanduser("~/.cache/omnijax")),
                            "local_text")


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
    c.data.path = "data/pretrain_general"
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
  c.data.path = LOCAL_CORPUS
  c.data.local_corpus = True
  c.data.tokenizer_vocab_size = c.model.text.vocab_size
  c.data.seq_len = 256
  c.train.total_steps = 300
  c.train.global_batch_size = 8
  c.train.log_every = 25
  c.train.checkpoint_every = 100
  c.optim.learning_rate = 3e-3 if arg == "local" else 1e-3
  c.optim.warmup_steps = 30
  return c
