"""``speech_codes`` op: speech -> Qwen3-Omni codec codes, the Talker's targets.

  cfg.ops = ("decode_text", "speech_codes(codec='/ckpt/mimi')", ...)

writes ``example["speech_codes"]``: int32 ``(16, T)``, 12.5 frames per second of
24 kHz audio, ``T = ceil(samples_24k / 1920)`` (see ``omnijax.codec.providers``).
``codec`` is a transformers Mimi directory or an omnijax speech-tokenizer
workdir (``providers.load_code_provider``). The provider is loaded on the op's
first call, once per process (grain workers each load their own), and cached
here by path, so the op stays picklable.

The audio (``example[key]``: bytes, a path under ``media_dir`` or a float array
with its rate in ``example[sample_rate_key]``, as ``decode_audio`` reads it) is
resampled to 24 kHz the way ``librosa.load(sr=24000)`` does (soxr HQ, length
``ceil(n * 24000 / rate)``). Run this op before ``decode_audio``, which
replaces the audio by its 16 kHz version.

Records from ``data_pipelines.prepare --speech_codes=PATH`` already carry the
codes (``speech_codes``: int16 little-endian bytes of ``(16, T)`` in C order,
``speech_codes_frames``: T); then the op only validates them (``check_codes``,
a ``ValueError`` on a mismatch: data prepared for another codec) and passes
them through as int32 ``(16, T)``, without loading the codec.

Skips (``ops.SKIP_REASONS``): the audio reasons of ``decode_audio``
(``missing_field``, ``missing_media``, ``undecodable``, ``bad_sample_rate``,
``non_finite``, ``silent_audio``), ``empty`` (no samples), ``too_short``
(under ``min_seconds``, default one frame: 0.08 s) and ``too_long`` (over
``max_seconds``; with ``truncate=True`` it is cut instead, wrong where a
transcript covers the whole clip).
"""

from __future__ import annotations

import os
import threading
from typing import Any

import librosa
import numpy as np

from data_pipelines.audio import MAX_SAMPLE_RATE, MIN_SAMPLE_RATE, SILENCE_PEAK, is_silent
from data_pipelines.audio import load_waveform
from data_pipelines.ops import BadRecord, Example, Op, OpContext, register_op, require
from omnijax.codec import providers

MIN_SECONDS = 1 / providers.FRAME_RATE  # One code frame.
CODES_DTYPE = np.dtype("<i2")  # How records store codes (codebook size 2048 fits).

_PROVIDERS: dict[tuple[str, int], providers.CodeProvider] = {}
_LOCK = threading.Lock()


def get_code_provider(
  codec: str | os.PathLike[str], num_quantizers: int = providers.NUM_QUANTIZERS
) -> providers.CodeProvider:
  """``providers.load_code_provider(codec)``, loaded once per process."""
  key = (os.path.abspath(os.fspath(codec)), num_quantizers)
  with _LOCK:  # Grain read threads call ops concurrently.
    if key not in _PROVIDERS:
      _PROVIDERS[key] = providers.load_code_provider(key[0], num_quantizers)
    return _PROVIDERS[key]


def speech_waveform(
  samples: np.ndarray,
  rate: int,
  *,
  max_seconds: float | None = None,
  truncate: bool = False,
  min_seconds: float = MIN_SECONDS,
  silence_peak: float = SILENCE_PEAK,
  sample_rate: int = providers.SAMPLE_RATE,
) -> np.ndarray:
  """A mono waveform checked for coding and resampled to `sample_rate` (float32).

  Raises:
    BadRecord: ``bad_sample_rate``, ``non_finite``, ``empty``, ``too_short``,
      ``too_long`` or ``silent_audio``; see the module doc.
  """
  if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
    raise BadRecord("bad_sample_rate", f"{rate} Hz")
  samples = np.asarray(samples, np.float32)
  if not np.isfinite(samples).all():
    raise BadRecord("non_finite", f"{int((~np.isfinite(samples)).sum())} samples")
  if not len(samples):
    raise BadRecord("empty", "no audio samples")
  if len(samples) < min_seconds * rate:
    raise BadRecord("too_short", f"{len(samples) / rate:.3f}s < {min_seconds}s")
  if max_seconds is not None and len(samples) > max_seconds * rate:
    if not truncate:
      raise BadRecord("too_long", f"{len(samples) / rate:.1f}s > {max_seconds}s")
    samples = samples[: int(max_seconds * rate)]
  if is_silent(samples, silence_peak):
    raise BadRecord("silent_audio", f"peak < {silence_peak}")
  if rate != sample_rate:
    samples = librosa.resample(samples, orig_sr=rate, target_sr=sample_rate, res_type="soxr_hq")
  return samples.astype(np.float32)


def encode_speech(
  provider: providers.CodeProvider, samples: np.ndarray, rate: int, **checks: Any
) -> np.ndarray:
  """Codes of one clip: int32 ``(Q, T)``; ``checks`` go to ``speech_waveform``."""
  wave = speech_waveform(samples, rate, **checks)
  codes = provider.encode(wave[None])[0]
  return providers.check_codes(codes, provider.num_quantizers, provider.codebook_size)


def codes_to_record(codes: np.ndarray) -> dict[str, Any]:
  """Record fields storing int ``(Q, T)`` codes (see the module doc)."""
  codes = np.asarray(codes)
  return {
    "speech_codes": codes.astype(CODES_DTYPE).tobytes(),
    "speech_codes_frames": codes.shape[1],
  }


def codes_from_value(
  value: Any, frames: int | None = None, num_quantizers: int = providers.NUM_QUANTIZERS
) -> np.ndarray:
  """Stored codes (the bytes of ``codes_to_record``, or an array) -> checked int32 ``(Q, T)``."""
  if isinstance(value, (bytes, bytearray, memoryview)):
    flat = np.frombuffer(bytes(value), CODES_DTYPE)
    if frames is None:  # Then the rows must be num_quantizers.
      frames = 0 if len(flat) % num_quantizers else len(flat) // num_quantizers
    if frames < 1 or len(flat) % frames:
      raise ValueError(
        f"Stored speech codes hold {len(flat)} values: not rows of {frames} frames "
        f"({num_quantizers} rows expected)"
      )
    value = flat.reshape(-1, frames)
  return providers.check_codes(value, num_quantizers)


@register_op("speech_codes")
def _speech_codes(
  ctx: OpContext,
  codec: str,
  key: str = "audio",
  out_key: str = "speech_codes",
  sample_rate_key: str = "sample_rate",
  media_dir: str | None = None,
  max_seconds: float | None = None,
  min_seconds: float = MIN_SECONDS,
  truncate: bool = False,
  num_quantizers: int = providers.NUM_QUANTIZERS,
  silence_peak: float = SILENCE_PEAK,
) -> Op:
  """``example[key]`` (speech) -> ``example[out_key]``: int32 ``(num_quantizers, T)``.

  Stored codes already in ``example[out_key]`` are checked and passed through.
  """
  del ctx
  if max_seconds is not None and max_seconds <= 0:
    raise ValueError(f"speech_codes: max_seconds must be > 0, got {max_seconds}")
  if min_seconds < 0:
    raise ValueError(f"speech_codes: min_seconds must be >= 0, got {min_seconds}")
  codec = os.path.abspath(os.fspath(codec))
  if not os.path.isdir(codec):  # Fail when the pipeline is built, not in a worker.
    raise FileNotFoundError(f"speech_codes: codec {codec!r} is not a directory")
  checks = dict(
    max_seconds=max_seconds, truncate=truncate, min_seconds=min_seconds, silence_peak=silence_peak
  )

  def op(example: Example) -> Example:
    if out_key in example:
      frames = example.get(f"{out_key}_frames")
      return {**example, out_key: codes_from_value(example[out_key], frames, num_quantizers)}
    samples, rate = load_waveform(
      require(example, key), example.get(sample_rate_key), media_dir=media_dir
    )
    codes = encode_speech(get_code_provider(codec, num_quantizers), samples, rate, **checks)
    return {**example, out_key: codes}

  return op
