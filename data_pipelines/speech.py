"""Speech waveforms for codec training and evaluation: Grain pipelines over audio records.

    ds = make_speech_dataset(cfg, split="train")   # batches {"wave": (B, segment_samples)}

Each record's audio (bytes, a path or an array with its rate) is decoded, checked and
resampled to ``cfg.sample_rate`` (24 kHz for the codec); training takes a random
``segment_samples`` window of each clip (shorter clips are zero-padded at the end). Bad audio
is skipped and counted by reason (``ops.SKIP_REASONS``; the checks are the speech_codes op's,
``speech_codes.speech_waveform``): undecodable, bad sample rate, non-finite, empty, silent,
or shorter than ``cfg.min_seconds``. Evaluation (``eval_clips``) reads whole clips in order.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import ml_collections
import numpy as np

from data_pipelines import records
from data_pipelines.audio import load_waveform
from data_pipelines.ops import SKIP_REASONS, BadRecord
from data_pipelines.pipeline import CountSkippedIterDataset
from data_pipelines.speech_codes import speech_waveform


def default_config(path: str = "") -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
    dict(
      path=path,  # a directory of audio records ({split}.array_record-*), e.g. local_media/asr
      local_media="",  # build the local media corpus here first (its asr/ is `path`)
      audio_key="audio",
      sample_rate_key="audio_sample_rate",
      sample_rate=24000,
      segment_samples=23040,  # 12 frames of 1920 samples (0.96 s)
      min_seconds=0.08,  # one codec frame
      batch_size=8,
      seed=0,
      eval_split="validation",
      eval_clips=16,
      eval_max_seconds=6.0,
    )
  )


def load_clip(example: dict[str, Any], cfg) -> np.ndarray:
  """One record's audio as float32 mono at cfg.sample_rate; BadRecord if it is unusable."""
  if cfg.audio_key not in example:
    raise BadRecord("missing_field", cfg.audio_key)
  samples, rate = load_waveform(example[cfg.audio_key], example.get(cfg.sample_rate_key))
  return speech_waveform(samples, rate, min_seconds=cfg.min_seconds, sample_rate=cfg.sample_rate)


@dataclasses.dataclass
class _Decode:
  cfg: Any

  def __call__(self, record: bytes) -> dict[str, Any]:
    try:
      return {"wave": load_clip(records.decode_example(record), self.cfg)}
    except BadRecord as e:
      return {"skip": e.reason}


@dataclasses.dataclass
class _Crop:
  segment: int

  def __call__(self, ex: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    if "skip" in ex:
      return ex
    wave = ex["wave"]
    if len(wave) > self.segment:
      start = int(rng.integers(0, len(wave) - self.segment + 1))
      wave = wave[start : start + self.segment]
    return {"wave": np.pad(wave, (0, self.segment - len(wave)))}


class _DropSkipped(grain.IterDataset):
  """Drops skip markers, adding their reasons to the next kept example's ``skipped`` counts."""

  def __iter__(self):
    return _DropSkippedIterator(self._parent.__iter__())


class _DropSkippedIterator(grain.DatasetIterator):
  def __next__(self):
    counts = np.zeros(len(SKIP_REASONS), np.int64)
    while "skip" in (ex := next(self._parent)):
      counts[SKIP_REASONS.index(ex["skip"])] += 1
    return {"wave": ex["wave"], "skipped": counts}

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)


def make_speech_dataset(
  cfg, *, process_index: int = 0, process_count: int = 1, num_epochs: int | None = None
) -> grain.IterDataset:
  """This host's training batches {"wave": (batch_size / process_count, segment_samples)}."""
  if cfg.batch_size % process_count:
    raise ValueError(f"batch_size {cfg.batch_size} is not a multiple of {process_count} hosts.")
  ds = grain.MapDataset.source(records.open_shards(cfg.path, "train"))
  ds = ds[process_index::process_count].seed(cfg.seed).shuffle().repeat(num_epochs)
  ds = ds.map(_Decode(cfg)).random_map(_Crop(cfg.segment_samples))
  it = _DropSkipped(ds.to_iter_dataset())
  return CountSkippedIterDataset(it.batch(cfg.batch_size // process_count, drop_remainder=True))


def eval_clips(cfg) -> tuple[list[np.ndarray], dict[str, int]]:
  """The first cfg.eval_clips usable clips of the eval split (at most eval_max_seconds each),
  and the skipped counts by reason."""
  source = records.open_shards(cfg.path, cfg.eval_split)
  clips, skipped = [], {}
  for i in range(len(source)):
    if len(clips) == cfg.eval_clips:
      break
    try:
      clip = load_clip(records.decode_example(source[i]), cfg)
    except BadRecord as e:
      skipped[e.reason] = skipped.get(e.reason, 0) + 1
      continue
    clips.append(clip[: int(cfg.eval_max_seconds * cfg.sample_rate)])
  if not clips:
    raise ValueError(f"no usable audio in {cfg.path} split {cfg.eval_split} (skipped: {skipped}).")
  return clips, skipped
