"""Shared test fixtures: a small text corpus on disk and a tiny-model trainer config."""

from pathlib import Path

import numpy as np

from data_pipelines import records
from omnijax.report import read_metrics  # noqa: F401  (step -> that step's train and eval lines merged)
from omnijax.train.config import base_config

WORDS = (
  "the quick brown fox jumps over a lazy dog while seven red cubes spin around two "
  "green spheres and one blue cone under bright light near the old river"
).split()


def write_text_corpus(path: Path, num_docs: int = 120, seed: int = 0) -> Path:
  rng = np.random.default_rng(seed)
  docs = [
    {
      "text": " ".join(rng.choice(WORDS, size=int(rng.integers(8, 60)))),
      "source": "test",
      "id": str(i),
    }
    for i in range(num_docs)
  ]
  records.write_shards(docs, path, "train", num_shards=2)
  records.write_manifest(path, {"train": num_docs})
  return path


def tiny_config(corpus: Path, *, steps: int, seq_len: int = 64, batch: int = 8):
  c = base_config("tiny")
  c.data.path = str(corpus)
  c.data.tokenizer_vocab_size = 512
  c.data.seq_len = seq_len
  c.train.total_steps = steps
  c.train.global_batch_size = batch
  c.train.log_every = 1
  c.train.checkpoint_every = 1000
  c.train.async_checkpoint = False
  c.optim.learning_rate = 3e-3
  c.optim.warmup_steps = 2
  return c
