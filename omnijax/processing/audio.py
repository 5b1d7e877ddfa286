"""Host-side audio helpers: token counts, frame buckets, padding (no flax; the length functions
also work on jax arrays, so the AuT tower uses them too)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from omnijax.models.config import AudioEncoderConfig


def _conv_len(n):
  """Output length of one 3-wide, stride-2, pad-1 conv over n positions (0 for n = 0)."""
  return (n - 1) // 2 + 1


def chunk_frames(cfg: AudioEncoderConfig) -> int:
  return 2 * cfg.n_window


def tokens_per_chunk(cfg: AudioEncoderConfig) -> int:
  """Tokens a full chunk yields (13 for 100 frames)."""
  return _conv_len(_conv_len(_conv_len(chunk_frames(cfg))))


def feat_extract_output_lengths(lengths, n_window: int = 50):
  """Tokens per audio of `lengths` mel frames (transformers' _get_feat_extract_output_lengths).

  Works on ints, numpy and jax arrays. A length that is a multiple of the chunk contributes
  no partial chunk: (0 - 1) // 2 + 1 = 0 with floor division.
  """
  chunk = 2 * n_window
  full = _conv_len(_conv_len(_conv_len(chunk)))
  return _conv_len(_conv_len(_conv_len(lengths % chunk))) + (lengths // chunk) * full


def bucket_frames(max_len: int, chunk: int = 100, min_chunks: int = 1) -> int:
  """The bucket (padded frame count T) for audios of at most `max_len` frames.

  Rounds up to chunk x a power of two (100, 200, 400, 800, ... frames), so a stream of varied
  lengths compiles once per bucket: log2(longest / shortest) + 1 buckets at most.
  """
  chunks = max(min_chunks, -(-int(max_len) // chunk), 1)
  return chunk * (1 << (chunks - 1).bit_length())


def num_tokens(frames: int, cfg: AudioEncoderConfig) -> int:
  """Token rows the encoder outputs for a bucket of `frames` frames (a multiple of the chunk)."""
  return frames // chunk_frames(cfg) * tokens_per_chunk(cfg)


def pad_audio_batch(
  mels: Sequence[np.ndarray], frames: int | None = None, rows: int | None = None, chunk: int = 100
) -> tuple[np.ndarray, np.ndarray]:
  """Right-pads mel features [(num_mel_bins, L_i)] into (rows, num_mel_bins, frames), lengths.

  `frames` defaults to bucket_frames(max L_i); `rows` (default len(mels)) adds empty audios.
  """
  lengths = np.array([m.shape[-1] for m in mels], np.int32)
  frames = frames or bucket_frames(int(lengths.max(initial=1)), chunk)
  rows = rows or len(mels)
  if frames % chunk or lengths.max(initial=0) > frames or rows < len(mels):
    raise ValueError(
      f"cannot pad audios of {lengths.tolist()} frames into {rows} rows x {frames} "
      f"frames (a multiple of {chunk})."
    )
  bins = mels[0].shape[0] if mels else 0
  out = np.zeros((rows, bins, frames), np.float32)
  for i, m in enumerate(mels):
    out[i, :, : m.shape[-1]] = m
  return out, np.pad(lengths, (0, rows - len(mels)))
