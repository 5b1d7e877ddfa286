"""What the trainer and the evaluators read: host batch iterators built from ``config.data``.

  make_train_iterator(config, model_cfg) -> Inputs      the training stream of this host
  make_eval_iterator(config, model_cfg, source, ...)    one mixture source's held-out split

``config.data.kind`` selects the pipeline: ``text`` (``pipeline.make_text_dataset`` over
``data.path``), ``omni`` (``omni.make_omni_dataset`` over ``data.mixture``) or ``synthetic``
(random tokens, for benchmarks). Batches follow ``omnijax.processing.batch``.
"""

from __future__ import annotations

import copy
import os
import dataclasses
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np

from omnijax import paths
from omnijax.errors import ConfigError
from omnijax.processing import batch as batch_lib

KINDS = ("text", "omni", "synthetic")
# Model config field -> the special token it must equal in the tokenizer.
SPECIAL_TOKEN_FIELDS = {
  "audio_token_id": "<|audio_pad|>",
  "image_token_id": "<|image_pad|>",
  "video_token_id": "<|video_pad|>",
  "audio_start_token_id": "<|audio_start|>",
  "audio_end_token_id": "<|audio_end|>",
  "vision_start_token_id": "<|vision_start|>",
  "vision_end_token_id": "<|vision_end|>",
}


@dataclasses.dataclass
class Inputs:
  iterator: Iterator[dict[str, np.ndarray]]
  checkpointable: bool  # whether the iterator state goes into checkpoints (grain)
  task_names: list[str]  # mixture sources in task-id order (`task_ids` index it)
  tokenizer: Any  # data_pipelines.tokenizer.TextTokenizer, or None (synthetic)
  # kind=omni: per source, its examples (all hosts), tokens per example, sampling weight: the
  # same on every host
  sources: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)

  def tokens_per_epoch(self, mixture) -> float:
    """Tokens of one pass over the mixture, all hosts (sources `weight` times each:
    data.mixture_by=epochs); the same on every host, as the run's length derived from it."""
    return sum(
      mixture[n].weight * s["examples"] * s["tokens_per_example"] for n, s in self.sources.items()
    )


class SyntheticBatches:
  """Uniform random tokens, one document per row; batch i depends only on (seed, i)."""

  def __init__(self, seed: int, batch: int, seq_len: int, vocab: int, process_index: int):
    self.seed, self.batch, self.seq_len, self.vocab, self.index = seed, batch, seq_len, vocab, 0
    self.process_index = process_index

  def __iter__(self):
    return self

  def __next__(self):
    rng = np.random.default_rng((self.seed, self.process_index, self.index))
    self.index += 1
    return batch_lib.text_batch(
      rng.integers(0, self.vocab, (self.batch, self.seq_len + 1), dtype=np.int32)
    )

  def get_state(self) -> dict[str, int]:
    return {"index": self.index}

  def set_state(self, state: dict[str, int]) -> None:
    self.index = int(state["index"])


def check_tokenizer(tokenizer, model_cfg) -> None:
  """The tokenizer fits the model's vocabulary and agrees on every special token id."""
  vocab = model_cfg.text.vocab_size
  if tokenizer.vocab_size > vocab:
    raise ConfigError(
      f"the tokenizer has {tokenizer.vocab_size} tokens but the model vocabulary "
      f"is {vocab}; set --config.model.text.vocab_size={tokenizer.vocab_size} "
      "(or larger)."
    )
  for field, token in SPECIAL_TOKEN_FIELDS.items():
    tid = tokenizer.token_id(token)
    if tid != getattr(model_cfg, field):
      raise ConfigError(
        f"model.{field} is {getattr(model_cfg, field)} but the tokenizer maps "
        f"{token} to {tid}; set --config.model.{field}={tid}."
      )


def _build_local_corpora(d) -> None:
  from data_pipelines import local_corpus, local_media_corpus  # pylint: disable=import-outside-toplevel

  if d.local_text:
    local_corpus.build_local_text_corpus(d.local_text)
  if d.local_media:
    local_media_corpus.build_local_media_corpus(d.local_media)


def _check_sources(d) -> None:
  if d.kind == "text":
    sources = {"data.path": d.path}
  else:
    if not d.mixture:
      raise ConfigError(
        "data.mixture is empty: name at least one source "
        "(--config.data.mixture.NAME.path/task/weight)."
      )
    sources = {}
    for name, s in d.mixture.items():
      if s.get("tfds") and s.get("path"):
        raise ConfigError(f"data.mixture.{name} names both a path and a TFDS builder; keep one.")
      if not s.get("tfds"):
        sources[f"data.mixture.{name}.path"] = s.get("path")
  for name, path in sources.items():
    if path and paths.is_url(path):
      raise ConfigError(
        f"{name}={path!r} is in a bucket, but ArrayRecord shards are read with random access "
        "from a file system: mount the bucket with Cloud Storage FUSE (gcsfuse, as MaxText "
        "documents; docs/pods.md) and pass the mounted path, or copy the shards to local disk."
      )
    if not path or not os.path.exists(path):
      raise ConfigError(
        f"{name}={path!r} does not exist; prepare shards there (python -m "
        "data_pipelines.prepare), name a TFDS builder (data.mixture.NAME.tfds) "
        "or set data.local_text / data.local_media to build the local corpora."
      )


def load_tokenizer(config, model_cfg):
  """The run's tokenizer: data.tokenizer, else a BPE trained on data.tokenizer_corpus."""
  from data_pipelines import tokenizer as tok_lib  # pylint: disable=import-outside-toplevel

  d = config.data
  corpus = d.tokenizer_corpus or d.path
  if not d.tokenizer and not corpus:
    raise ConfigError(
      "set data.tokenizer (a tokenizer.json) or data.tokenizer_corpus (text "
      "shards to train a BPE on)."
    )
  if d.tokenizer:
    try:
      tokenizer = tok_lib.load_tokenizer(paths.check_reachable(d.tokenizer, "data.tokenizer"))
    except FileNotFoundError as e:
      raise ConfigError(
        f"data.tokenizer={d.tokenizer!r}: {e} Pass a tokenizer.json, or a directory that holds "
        "one (an omnijax workdir, an exported or a Hugging Face checkpoint)."
      ) from e
  else:
    tokenizer = tok_lib.local_tokenizer(corpus, vocab_size=d.tokenizer_vocab_size)
  check_tokenizer(tokenizer, model_cfg)
  return tokenizer


def _dataset(
  d,
  model_cfg,
  tokenizer,
  *,
  batch_size: int,
  seed: int,
  split: str = "train",
  talker_cfg=None,
  process: tuple[int, int] | None = None,
):
  from data_pipelines import omni, pipeline  # pylint: disable=import-outside-toplevel

  index, count = process or (jax.process_index(), jax.process_count())
  hosts = dict(process_index=index, process_count=count, seed=seed)
  if d.kind == "text":
    return pipeline.make_text_dataset(
      d, tokenizer=tokenizer, seq_len=d.seq_len, batch_size=batch_size, split=split, **hosts
    )
  try:
    return omni.make_omni_dataset(
      d,
      tokenizer=tokenizer,
      model_cfg=model_cfg,
      seq_len=d.seq_len,
      batch_size=batch_size,
      talker_cfg=talker_cfg,
      **hosts,
    )
  except ValueError as e:
    raise ConfigError(str(e)) from e


def make_train_iterator(
  config, model_cfg, talker_cfg=None, process: tuple[int, int] | None = None
) -> Inputs:
  """This host's training batches (config.train.global_batch_size / processes rows each), with
  the Talker's rows when `talker_cfg` is given; `process` = (index, count) builds the stream
  process `index` of `count` reads instead."""
  d = config.data
  process = process or (jax.process_index(), jax.process_count())
  host_batch = config.train.global_batch_size // process[1]
  if d.kind not in KINDS:
    raise ConfigError(f"data.kind={d.kind!r} is not one of {list(KINDS)}.")
  if d.kind == "synthetic":
    return Inputs(
      SyntheticBatches(config.seed, host_batch, d.seq_len, model_cfg.text.vocab_size, process[0]),
      True,
      [],
      None,
    )
  _build_local_corpora(d)
  _check_sources(d)
  tokenizer = load_tokenizer(config, model_cfg)
  ds = _dataset(
    d,
    model_cfg,
    tokenizer,
    batch_size=host_batch,
    seed=config.seed,
    talker_cfg=talker_cfg,
    process=process,
  )
  if d.kind == "text":
    return Inputs(iter(ds), True, [], tokenizer)
  return Inputs(iter(ds), True, sorted(d.mixture), tokenizer, ds.sources)


def eval_sources(config) -> dict:
  """The sources evaluators read: config.eval.mixture, else the training mixture."""
  return config.eval.mixture or config.data.mixture


def eval_data_config(config, source: str | None, split: str):
  """config.data for one pass over a held-out split: one source of `eval_sources` (all of
  `data.path` for kind=text), in order, no worker processes."""
  d = copy.deepcopy(config.data)
  with d.unlocked():
    # one source: no sampling weights to estimate
    d.shuffle, d.num_epochs, d.worker_count, d.estimate_samples = False, 1, 0, 1
    if d.kind != "text":
      sources = eval_sources(config)
      if source not in sources:
        raise ConfigError(f"unknown eval source {source!r}; sources: {sorted(sources)}.")
      spec = ml_collections.ConfigDict(sources[source].to_dict())
      spec.split = spec.get("eval_split") or split
      spec.max_examples, spec.estimate_samples = 0, 1
      d.mixture = {source: spec}
  return d


def check_eval_source(config, source: str | None, split: str) -> None:
  """The held-out split of an evaluation source can be opened (a ConfigError otherwise)."""
  from data_pipelines import omni, records  # pylint: disable=import-outside-toplevel

  d = eval_data_config(config, source, split)
  try:
    if d.kind == "text":
      records.open_shards(d.path, split)
    else:
      omni.open_source(d.mixture[source])
  except (FileNotFoundError, ValueError) as e:
    raise ConfigError(
      f"evaluation source {source or d.path!r}: {e}; set config.eval.split "
      "(or the source's eval_split) to a split it has."
    ) from e


def make_eval_iterator(
  config,
  model_cfg,
  tokenizer,
  *,
  source: str | None,
  split: str,
  batch_size: int,
  talker_cfg=None,
):
  """Batches of one source's held-out split, once through (the last batch may be partial),
  with the Talker's rows when `talker_cfg` is given."""
  d = eval_data_config(config, source, split)
  return iter(
    _dataset(
      d,
      model_cfg,
      tokenizer,
      batch_size=batch_size,
      seed=config.seed,
      split=split,
      talker_cfg=talker_cfg,
    )
  )
