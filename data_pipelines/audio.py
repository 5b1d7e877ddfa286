"""Audio ops: ``decode_audio`` (bytes/path/array -> 16 kHz mono) and ``log_mel``.

``log_mel`` reproduces the audio features of the Qwen3-Omni processor:
``WhisperFeatureExtractor(feature_size=128)`` called as ``Qwen3OmniMoeProcessor``
calls it (``sampling_rate=16000, padding=True, truncation=False``; the released
config has ``chunk_length=300, dither=0.0``), for one clip, so without padding:

  periodic Hann window of 400 samples, hop 160, centred frames (reflect
  padding), power spectrum, the last frame dropped (``frames = samples // 160``,
  100 per second), 128 Slaney mel filters over 0-8 kHz, ``log10(max(mel,
  1e-10))``, floored at (its maximum - 8), then ``(x + 4) / 4``.

Output ``(128, frames)`` float32, within 1e-4 of transformers (see
``tests/test_data_media.py``). Waveforms are resampled with soxr's HQ mode (what
``librosa.load(sr=16000)`` uses, as the Qwen reference code does).

Decisions on bad audio (each a ``BadRecord`` reason, see ``ops.SKIP_REASONS``):

- bytes that neither libsndfile (wav, flac, ogg, mp3, ...) nor FFmpeg (PyAV:
  m4a, aac, opus, ...) can decode, no audio stream, or a WAV shorter than its
  header declares (truncated): ``undecodable``;
- a path (str) that does not exist: ``missing_media``;
- a sample rate outside [``MIN_SAMPLE_RATE``, ``MAX_SAMPLE_RATE``] or missing
  for a raw array: ``bad_sample_rate`` / ``missing_field``; any rate inside
  (8 kHz, 22.05 kHz, 44.1 kHz, 12345 Hz, ...) is resampled to 16 kHz;
- NaN or infinite samples: ``non_finite``;
- fewer than ``n_fft // 2 + 1`` samples at 16 kHz (no STFT frame): ``empty``;
- digital silence (peak below ``silence_peak``, default 1e-4, about -80 dBFS,
  3 LSB of 16-bit PCM): ``silent_audio`` (skipped by default: its log-mel is a
  constant, so as a speech or audio-caption example it is a broken label or
  wasted tokens; pass ``allow_silence=True`` where silence is a legitimate
  input). A video's silent audio track is dropped instead (see ``video``);
- longer than ``max_seconds``: truncated to its first ``max_seconds`` with
  ``truncate=True`` (the default: right for audio whose text does not describe
  all of it); with ``truncate=False`` skipped as ``too_long`` (right for
  speech with a transcript of the whole clip, which truncation would falsify).
"""

import io

import av
import librosa
import numpy as np
import soundfile as sf
import soxr

from data_pipelines.ops import (
  BadRecord,
  Example,
  Op,
  OpContext,
  read_media_bytes,
  register_op,
  require,
)

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
N_MELS = 128
MIN_SAMPLE_RATE = 1000
MAX_SAMPLE_RATE = 384000
SILENCE_PEAK = 1e-4


def _decode_with_soundfile(data: bytes) -> tuple[np.ndarray, int]:
  samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
  return samples.mean(axis=1), int(rate)


def frame_to_mono(frame) -> np.ndarray:
  """A PyAV AudioFrame (any sample format and layout) -> float32 mono."""
  raw = frame.to_ndarray()
  if not frame.format.is_planar:  # Interleaved: (1, samples * channels).
    raw = raw.reshape(-1, len(frame.layout.channels)).T
  samples = raw.astype(np.float32)
  if raw.dtype == np.uint8:
    samples = (samples - 128.0) / 128.0
  elif np.issubdtype(raw.dtype, np.integer):
    samples /= float(2 ** (8 * raw.itemsize - 1))
  return samples.mean(axis=0)


def _decode_with_av(data: bytes) -> tuple[np.ndarray, int]:
  with av.open(io.BytesIO(data), mode="r", metadata_errors="ignore") as container:
    if not container.streams.audio:
      raise BadRecord("undecodable", "no audio stream")
    stream = container.streams.audio[0]
    chunks = [frame_to_mono(frame) for frame in container.decode(stream)]
    rate = int(stream.codec_context.sample_rate or 0)
  return (np.concatenate(chunks) if chunks else np.zeros((0,), np.float32)), rate


def _check_wav_length(data: bytes) -> None:
  """A WAV whose RIFF header declares more bytes than the file has is cut.

  libsndfile would decode the part that is there; a transcript of the whole
  clip would then be wrong, so the file is rejected. (Truncated FLAC fails to
  decode; truncated MP3 has no length to check and decodes partially.)
  """
  if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
    return
  declared = int.from_bytes(data[4:8], "little")
  if 0 < declared < 0xFFFFFFF0 and declared + 8 > len(data):
    raise BadRecord("undecodable", f"truncated WAV: {len(data)} of {declared + 8} bytes")


def decode_audio_bytes(data: bytes) -> tuple[np.ndarray, int]:
  """Encoded audio (any format libsndfile or FFmpeg reads) -> (mono, rate)."""
  _check_wav_length(data)
  try:
    return _decode_with_soundfile(data)
  except (sf.LibsndfileError, RuntimeError, TypeError, ValueError):
    pass
  try:
    return _decode_with_av(data)
  except (av.FFmpegError, ValueError, EOFError) as e:
    raise BadRecord("undecodable", f"audio: {e}") from e


def clean_waveform(
  samples: np.ndarray,
  rate: int,
  *,
  max_seconds: float | None = None,
  truncate: bool = True,
) -> np.ndarray:
  """Checks a mono waveform, truncates it and resamples it to 16 kHz.

  Silence is not checked here (see ``is_silent``): what to do with it depends
  on the caller.

  Raises:
    BadRecord: ``bad_sample_rate``, ``non_finite``, ``too_long`` (when
      ``truncate`` is False) or ``empty``; see the module doc.
  """
  if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
    raise BadRecord("bad_sample_rate", f"{rate} Hz")
  samples = np.asarray(samples, np.float32)
  if not np.isfinite(samples).all():
    raise BadRecord("non_finite", f"{int((~np.isfinite(samples)).sum())} samples")
  if max_seconds is not None and len(samples) > max_seconds * rate:
    if not truncate:
      raise BadRecord("too_long", f"{len(samples) / rate:.1f}s > {max_seconds}s")
    samples = samples[: int(max_seconds * rate)]
  if rate != SAMPLE_RATE and len(samples):
    samples = soxr.resample(samples, rate, SAMPLE_RATE, quality="HQ")
  if len(samples) <= N_FFT // 2:
    raise BadRecord("empty", f"{len(samples)} samples at {SAMPLE_RATE} Hz")
  return samples


def is_silent(samples: np.ndarray, silence_peak: float = SILENCE_PEAK) -> bool:
  return float(np.abs(samples).max(initial=0.0)) < silence_peak


def load_waveform(
  value, sample_rate: int | None = None, *, media_dir: str | None = None
) -> tuple[np.ndarray, int]:
  """Bytes, a path or a float array (with its ``sample_rate``) -> (mono, rate)."""
  if isinstance(value, np.ndarray):
    if sample_rate is None:
      raise BadRecord("missing_field", "sample_rate of a raw waveform")
    if not np.issubdtype(value.dtype, np.floating):
      raise BadRecord("undecodable", f"raw waveform of dtype {value.dtype}")
    samples = value if value.ndim == 1 else value.reshape(len(value), -1).mean(1)
    return samples.astype(np.float32), int(sample_rate)
  return decode_audio_bytes(read_media_bytes(value, media_dir))


def log_mel_spectrogram(samples: np.ndarray, n_mels: int = N_MELS) -> np.ndarray:
  """Whisper/Qwen3-Omni log-mel features of 16 kHz audio: ``(n_mels, n // 160)``."""
  stft = librosa.stft(
    np.asarray(samples, np.float64),
    n_fft=N_FFT,
    hop_length=HOP_LENGTH,
    window="hann",
    center=True,
    pad_mode="reflect",
  )
  power = np.abs(stft[:, :-1]) ** 2
  mel = _mel_filters(n_mels) @ power
  log_spec = np.log10(np.maximum(mel, 1e-10))
  log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
  return ((log_spec + 4.0) / 4.0).astype(np.float32)


_MEL_FILTERS: dict[int, np.ndarray] = {}


def _mel_filters(n_mels: int) -> np.ndarray:
  if n_mels not in _MEL_FILTERS:
    _MEL_FILTERS[n_mels] = librosa.filters.mel(
      sr=SAMPLE_RATE,
      n_fft=N_FFT,
      n_mels=n_mels,
      fmin=0.0,
      fmax=8000.0,
      htk=False,
      norm="slaney",
      dtype=np.float64,
    )
  return _MEL_FILTERS[n_mels]


@register_op("decode_audio")
def _decode_audio(
  ctx: OpContext,
  key: str = "audio",
  out_key: str | None = None,
  sample_rate_key: str = "sample_rate",
  media_dir: str | None = None,
  max_seconds: float | None = None,
  truncate: bool = True,
  allow_silence: bool = False,
  silence_peak: float = SILENCE_PEAK,
) -> Op:
  """``example[key]`` (bytes, path or float array) -> float32 mono 16 kHz.

  Writes the waveform to ``example[out_key or key]``, ``example[sample_rate_key]
  = 16000`` and ``example["audio_seconds"]``. A raw array needs its rate in
  ``example[sample_rate_key]``; paths are relative to ``media_dir``.
  """
  del ctx
  if max_seconds is not None and max_seconds <= 0:
    raise ValueError(f"decode_audio: max_seconds must be > 0, got {max_seconds}")
  out_key = out_key or key

  def op(example: Example) -> Example:
    samples, rate = load_waveform(
      require(example, key), example.get(sample_rate_key), media_dir=media_dir
    )
    samples = clean_waveform(samples, rate, max_seconds=max_seconds, truncate=truncate)
    if not allow_silence and is_silent(samples, silence_peak):
      raise BadRecord("silent_audio", f"peak < {silence_peak}")
    return {
      **example,
      out_key: samples,
      sample_rate_key: SAMPLE_RATE,
      "audio_seconds": len(samples) / SAMPLE_RATE,
    }

  return op


@register_op("log_mel")
def _log_mel(
  ctx: OpContext,
  key: str = "audio",
  out_key: str = "audio_features",
  n_mels: int = N_MELS,
) -> Op:
  """16 kHz ``example[key]`` -> ``example[out_key]``: float32 ``(n_mels, frames)``.

  Run ``decode_audio`` first (it guarantees 16 kHz and at least one frame).
  """
  del ctx

  def op(example: Example) -> Example:
    return {**example, out_key: log_mel_spectrogram(require(example, key), n_mels)}

  return op
