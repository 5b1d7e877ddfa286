"""Host-side vision helpers: packed patch buffers, their per-patch metadata and bucket sizes
(no flax)."""

from __future__ import annotations

import numpy as np

MIN_BUCKET = 64
# The arrays of a packed patch buffer, in `VisionEncoder.__call__`'s argument order.
PACKED_KEYS = ("patches", "segment_ids", "rows", "cols", "heights", "widths")


def bucket_patches(n: int, min_size: int = MIN_BUCKET) -> int:
  """The smallest bucket >= n from {64, 96, 128, 192, 256, 384, ...} (2^k and 1.5 x 2^k).

  Every bucket is a multiple of 4 (one 2x2 merge window); padding wastes at most a third.
  """
  if n < 0:
    raise ValueError(f"number of patches must be >= 0, got {n}")
  size = min_size
  while size < n:
    power_of_two = (size & (size - 1)) == 0  # next: 1.5x after a power of two, else 4/3x
    size = size * 3 // 2 if power_of_two else size * 4 // 3
  return size


def patch_metadata(grid_thw, spatial_merge_size: int = 2) -> dict[str, np.ndarray]:
  """Per-patch metadata (unpadded) for transformers-ordered patches of items `grid_thw` (n, 3)."""
  grid_thw = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
  m = spatial_merge_size
  seg, rows, cols, hs, ws = [], [], [], [], []
  frame = 0
  for t, h, w in grid_thw.tolist():
    if t < 1 or h < 1 or w < 1 or h % m or w % m:
      raise ValueError(
        f"grid_thw entry {(t, h, w)}: t, h, w must be positive and h, w multiples "
        f"of spatial_merge_size={m}."
      )
    i = np.arange(h * w)
    # processor order within a frame: (block_row, block_col, in_row, in_col)
    r = (i // (m * m * (w // m))) * m + (i // m) % m
    c = ((i // (m * m)) % (w // m)) * m + i % m
    seg.append(np.repeat(np.arange(frame + 1, frame + t + 1), h * w))
    frame += t
    rows.append(np.tile(r, t))
    cols.append(np.tile(c, t))
    hs.append(np.full(t * h * w, h))
    ws.append(np.full(t * h * w, w))
  cat = lambda xs: np.concatenate(xs).astype(np.int32) if xs else np.zeros((0,), np.int32)
  return dict(segment_ids=cat(seg), rows=cat(rows), cols=cat(cols), heights=cat(hs), widths=cat(ws))


def pack_patches(
  pixel_values, grid_thw, bucket: int | None = None, spatial_merge_size: int = 2
) -> dict[str, np.ndarray]:
  """transformers-style `pixel_values (sum t*h*w, C*T*p*p)` + `grid_thw (n, 3)` -> packed buffer.

  Returns {patches (bucket, C*T*p*p), segment_ids, rows, cols, heights, widths (bucket,) int32}:
  the keyword arguments of `VisionEncoder.__call__`. `bucket` defaults to
  `bucket_patches(len(pixel_values))`. Padding patches are zero, segment 0, on a 1x1 grid.
  """
  pixel_values = np.asarray(pixel_values)
  if pixel_values.ndim != 2:
    raise ValueError(f"pixel_values must be (num_patches, C*T*p*p), got shape {pixel_values.shape}")
  meta = patch_metadata(grid_thw, spatial_merge_size)
  n = pixel_values.shape[0]
  if meta["segment_ids"].shape[0] != n:
    raise ValueError(
      f"grid_thw describes {meta['segment_ids'].shape[0]} patches but pixel_values has {n} rows."
    )
  bucket = bucket_patches(n) if bucket is None else int(bucket)
  unit = spatial_merge_size**2
  if bucket < n or bucket % unit:
    raise ValueError(f"bucket {bucket} must be >= the {n} patches and a multiple of {unit}.")
  pad = bucket - n
  out = {
    "patches": np.concatenate(
      [pixel_values, np.zeros((pad, pixel_values.shape[1]), pixel_values.dtype)]
    )
  }
  fill = {"segment_ids": 0, "rows": 0, "cols": 0, "heights": 1, "widths": 1}
  for k, v in meta.items():
    out[k] = np.concatenate([v, np.full((pad,), fill[k], np.int32)])
  return out


def merged_token_counts(grid_thw, spatial_merge_size: int = 2) -> np.ndarray:
  """Merged (LLM) tokens per item: t * h * w / merge^2 (transformers' split sizes)."""
  g = np.asarray(grid_thw, np.int64).reshape(-1, 3)
  return g.prod(-1) // spatial_merge_size**2
