"""Host-side assembly of the Thinker's per-row media buffers (see ``omnijax.models.thinker``).

Shapes are bucketed (audio frames and audios per row to powers of two, vision patches to
``vision.bucket_patches``) so that a stream of batches compiles once per bucket combination.
``from_hf_inputs`` converts transformers-style arguments (``input_features``,
``feature_attention_mask``, ``pixel_values``, ``image_grid_thw``, ``pixel_values_videos``,
``video_grid_thw``), whose media are ordered across the whole batch, into per-row buffers.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from omnijax.processing import audio as audio_lib
from omnijax.processing import vision as vision_lib
from omnijax.models.config import ThinkerConfig


def patch_dim(cfg: ThinkerConfig) -> int:
  """Values per vision patch: channels x temporal patch x patch x patch."""
  v = cfg.vision
  return v.in_channels * v.temporal_patch_size * v.patch_size**2


def _pow2(n: int) -> int:
  return 1 << max(0, int(n) - 1).bit_length()


def audio_buffers(
  cfg: ThinkerConfig,
  rows: Sequence[Sequence[np.ndarray]],
  frames: int | None = None,
  audios: int | None = None,
) -> dict[str, np.ndarray]:
  """Per-row lists of log-mel arrays (mel, L) -> audio_features (B, A, mel, T), audio_lengths."""
  chunk = audio_lib.chunk_frames(cfg.audio)
  longest = max((m.shape[-1] for row in rows for m in row), default=1)
  frames = frames or audio_lib.bucket_frames(longest, chunk)
  audios = audios or _pow2(max((len(r) for r in rows), default=1))
  feats = np.zeros((len(rows), audios, cfg.audio.num_mel_bins, frames), np.float32)
  lengths = np.zeros((len(rows), audios), np.int32)
  for b, row in enumerate(rows):
    if len(row) > audios:
      raise ValueError(f"row {b} has {len(row)} audios; the buffer holds {audios}.")
    for i, mel in enumerate(row):
      if mel.shape[0] != cfg.audio.num_mel_bins or mel.shape[1] > frames:
        raise ValueError(
          f"audio {i} of row {b} has shape {mel.shape}; expected "
          f"({cfg.audio.num_mel_bins}, <= {frames})."
        )
      feats[b, i, :, : mel.shape[1]] = mel
      lengths[b, i] = mel.shape[1]
  return dict(audio_features=feats, audio_lengths=lengths)


def vision_buffers(
  cfg: ThinkerConfig,
  kind: str,
  rows: Sequence[tuple[np.ndarray, np.ndarray]],
  bucket: int | None = None,
) -> dict[str, np.ndarray]:
  """Per-row (pixel_values (n, C*T*p*p), grid_thw (k, 3)) -> `{kind}_patches` etc. (B, P, ...)."""
  merge = cfg.vision.spatial_merge_size
  bucket = bucket or vision_lib.bucket_patches(max((len(p) for p, _ in rows), default=0))
  in_dim = patch_dim(cfg)
  # One buffer per field, filled in place (pack_patches' layout: zero patches, segment 0 and
  # a 1x1 grid on padding): a copy per row would double the memory traffic.
  out = {f"{kind}_patches": np.zeros((len(rows), bucket, in_dim), np.float32)}
  for f, fill in (("segment_ids", 0), ("rows", 0), ("cols", 0), ("heights", 1), ("widths", 1)):
    out[f"{kind}_{f}"] = np.full((len(rows), bucket), fill, np.int32)
  for b, (pixels, grids) in enumerate(rows):
    n = len(pixels)
    if n > bucket or bucket % merge**2:
      raise ValueError(
        f"row {b} has {n} {kind} patches; the bucket holds {bucket} (a multiple of {merge**2})."
      )
    meta = vision_lib.patch_metadata(grids, merge)
    if len(meta["segment_ids"]) != n:
      raise ValueError(
        f"row {b}: {kind} grid_thw describes {len(meta['segment_ids'])} patches "
        f"but pixel_values has {n} rows."
      )
    out[f"{kind}_patches"][b, :n] = pixels
    for f, v in meta.items():
      out[f"{kind}_{f}"][b, :n] = v
  return out


def empty_media(cfg: ThinkerConfig, batch: int) -> dict[str, np.ndarray]:
  """Minimal all-padding buffers for every tower (what `Thinker.init` needs)."""
  no_pixels = (np.zeros((0, patch_dim(cfg)), np.float32), np.zeros((0, 3), np.int64))
  out = audio_buffers(cfg, [[np.zeros((cfg.audio.num_mel_bins, 1), np.float32)]] * batch)
  for kind in ("image", "video"):
    out |= vision_buffers(cfg, kind, [no_pixels] * batch)
  return out


def grow_buffers(
  buffers: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]]
) -> dict[str, np.ndarray]:
  """Media buffers grown to `shapes` (each at least its buffer's shape): what `audio_buffers`
  and `vision_buffers` build with those larger buckets (zeros, and vision padding's 1x1 grid)."""
  out = dict(buffers)
  for k, shape in shapes.items():
    v = buffers[k]
    if v.shape != tuple(shape):
      fill = 1 if k.endswith(("_heights", "_widths")) else 0
      out[k] = np.pad(v, [(0, n - m) for m, n in zip(v.shape, shape)], constant_values=fill)
  return out


def _split_by_rows(
  counts_per_row: list[int], tokens_per_item: list[int], what: str
) -> list[list[int]]:
  """Assigns items (in order) to rows so that each row's items fill its placeholder count."""
  out, i = [], 0
  for b, need in enumerate(counts_per_row):
    mine = []
    while need > 0:
      if i >= len(tokens_per_item):
        raise ValueError(
          f"row {b} has more {what} placeholder tokens than the {what} inputs provide."
        )
      mine.append(i)
      need -= tokens_per_item[i]
      i += 1
    if need < 0:
      raise ValueError(
        f"the {what} placeholders of row {b} do not match the token counts of "
        f"its {what} inputs (an item would straddle two rows)."
      )
    out.append(mine)
  if i != len(tokens_per_item):
    raise ValueError(f"{len(tokens_per_item) - i} {what} input(s) have no placeholder tokens.")
  return out


def from_hf_inputs(
  cfg: ThinkerConfig,
  input_ids: np.ndarray,
  *,
  input_features=None,
  feature_attention_mask=None,
  pixel_values=None,
  image_grid_thw=None,
  pixel_values_videos=None,
  video_grid_thw=None,
) -> dict[str, np.ndarray]:
  """transformers-style multimodal arguments -> per-row media buffers for `Thinker`."""
  ids = np.asarray(input_ids)
  media: dict[str, np.ndarray] = {}
  if input_features is None and np.any(ids == cfg.audio_token_id):
    raise ValueError(
      f"input_ids has {int(np.sum(ids == cfg.audio_token_id))} audio placeholder "
      "tokens but no input_features were given."
    )
  if input_features is not None:
    feats = np.asarray(input_features, np.float32)
    if feature_attention_mask is None:
      lengths = np.full((feats.shape[0],), feats.shape[-1], np.int64)
    else:
      lengths = np.asarray(feature_attention_mask).sum(-1)
    tokens = [
      int(audio_lib.feat_extract_output_lengths(int(n), cfg.audio.n_window)) for n in lengths
    ]
    per_row = _split_by_rows((ids == cfg.audio_token_id).sum(1).tolist(), tokens, "audio")
    media |= audio_buffers(cfg, [[feats[i, :, : lengths[i]] for i in row] for row in per_row])
  merge2 = cfg.vision.spatial_merge_size**2
  for kind, pixels, grids, token_id, names in (
    ("image", pixel_values, image_grid_thw, cfg.image_token_id, ("pixel_values", "image_grid_thw")),
    (
      "video",
      pixel_values_videos,
      video_grid_thw,
      cfg.video_token_id,
      ("pixel_values_videos", "video_grid_thw"),
    ),
  ):
    if pixels is None:
      if np.any(ids == token_id):
        raise ValueError(
          f"input_ids has {int(np.sum(ids == token_id))} {kind} placeholder "
          f"tokens but no {names[0]} were given."
        )
      continue
    if grids is None:
      raise ValueError(f"{names[0]} needs {names[1]} (the (t, h, w) patch grid of each {kind}).")
    pixels, grids = np.asarray(pixels, np.float32), np.asarray(grids, np.int64).reshape(-1, 3)
    patches = grids.prod(-1)
    if pixels.ndim != 2 or len(pixels) != patches.sum():
      raise ValueError(
        f"{names[0]} has shape {pixels.shape}; {names[1]} {grids.tolist()} "
        f"describes {int(patches.sum())} patches (rows)."
      )
    starts = np.concatenate([[0], np.cumsum(patches)])
    per_row = _split_by_rows((ids == token_id).sum(1).tolist(), (patches // merge2).tolist(), kind)
    rows = [
      (
        np.concatenate([pixels[starts[i] : starts[i + 1]] for i in row]) if row else pixels[:0],
        grids[row],
      )
      for row in per_row
    ]
    media |= vision_buffers(cfg, kind, rows)
  return media
