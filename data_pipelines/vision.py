"""Image ops: ``decode_image``, ``resize_image``, ``patchify_image``.

Together they reproduce the Qwen3-Omni image processor (``Qwen2VLImageProcessor``
with Qwen3-Omni's config: patch 16, temporal patch 2, spatial merge 2, mean =
std = 0.5, ``min_pixels`` 3136, ``max_pixels`` 12845056):

  decode_image     bytes/path/array -> uint8 RGB (H, W, 3); transparency is
                   composited onto white, as transformers' ``convert_to_rgb``.
  resize_image     ``smart_resize``: both sides multiples of patch * merge = 32,
                   H*W within [min_pixels, max_pixels], aspect ratio kept;
                   Pillow bicubic on the uint8 image.
  patchify_image   x / 255, (x - mean) / std, then patches in the processor's
                   order: ``pixel_values (grid_h * grid_w, 3 * 2 * 16 * 16)``
                   float32, rows ordered by 2x2 merge window, each row (C, T,
                   p, p) with the frame repeated over T; ``image_grid_thw``
                   int64 ``[1, grid_h, grid_w]``.

Parity with ``Qwen2VLImageProcessorPil`` is checked to 1e-5 in
``tests/test_data_media.py``. Bad images: bytes Pillow cannot decode (corrupt,
truncated) -> ``undecodable``; a missing path -> ``missing_media``; more
pixels than Pillow's decompression-bomb error limit (about 179 megapixels)
-> ``too_long``; a side over 200x the other -> ``bad_aspect_ratio``.
"""

import io
import math

import numpy as np
from PIL import Image

from data_pipelines.ops import (
  BadRecord,
  Example,
  Op,
  OpContext,
  read_media_bytes,
  register_op,
  require,
)

PATCH_SIZE = 16
TEMPORAL_PATCH_SIZE = 2
MERGE_SIZE = 2
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)
MIN_PIXELS = 56 * 56
MAX_PIXELS = 28 * 28 * 16384
MAX_ASPECT_RATIO = 200


def smart_resize(
  height: int,
  width: int,
  factor: int = PATCH_SIZE * MERGE_SIZE,
  min_pixels: int = MIN_PIXELS,
  max_pixels: int = MAX_PIXELS,
) -> tuple[int, int]:
  """Qwen2-VL's target size: sides multiples of ``factor``, area in range.

  Raises:
    BadRecord: ``bad_aspect_ratio`` if one side is over 200x the other.
  """
  if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
    raise BadRecord("bad_aspect_ratio", f"{height}x{width}")
  h_bar = round(height / factor) * factor
  w_bar = round(width / factor) * factor
  if h_bar * w_bar > max_pixels:
    beta = math.sqrt((height * width) / max_pixels)
    h_bar = max(factor, math.floor(height / beta / factor) * factor)
    w_bar = max(factor, math.floor(width / beta / factor) * factor)
  elif h_bar * w_bar < min_pixels:
    beta = math.sqrt(min_pixels / (height * width))
    h_bar = math.ceil(height * beta / factor) * factor
    w_bar = math.ceil(width * beta / factor) * factor
  return h_bar, w_bar


def to_rgb(image: Image.Image) -> np.ndarray:
  """Any Pillow mode -> uint8 (H, W, 3), alpha composited onto white."""
  if "A" in image.getbands() or image.info.get("transparency") is not None:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    image = Image.alpha_composite(background, rgba)
  return np.asarray(image.convert("RGB"))


def decode_image_bytes(data: bytes) -> np.ndarray:
  """Encoded image (first frame if animated) -> uint8 RGB (H, W, 3)."""
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()
      return to_rgb(image)
  except Image.DecompressionBombError as e:
    raise BadRecord("too_long", f"image: {e}") from e
  except (OSError, SyntaxError, ValueError) as e:  # Pillow's decode errors.
    raise BadRecord("undecodable", f"image: {e}") from e


def resize_frames(
  frames: np.ndarray, min_pixels: int, max_pixels: int, factor: int = PATCH_SIZE * MERGE_SIZE
) -> np.ndarray:
  """uint8 (..., H, W, 3) -> smart-resized with Pillow bicubic, same layout."""
  height, width = frames.shape[-3:-1]
  new_h, new_w = smart_resize(height, width, factor, min_pixels, max_pixels)
  if (new_h, new_w) == (height, width):
    return frames
  flat = frames.reshape(-1, height, width, 3)
  resized = [np.asarray(Image.fromarray(f).resize((new_w, new_h), Image.BICUBIC)) for f in flat]
  return np.stack(resized).reshape(*frames.shape[:-3], new_h, new_w, 3)


def normalize(frames: np.ndarray, mean=IMAGE_MEAN, std=IMAGE_STD) -> np.ndarray:
  """uint8 (..., H, W, 3) -> float32 (..., 3, H, W): (x / 255 - mean) / std."""
  x = (frames.astype(np.float64) / 255.0).astype(np.float32)
  x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
  return np.moveaxis(x, -1, -3)


def patchify(
  frames: np.ndarray,
  patch_size: int = PATCH_SIZE,
  temporal_patch_size: int = TEMPORAL_PATCH_SIZE,
  merge_size: int = MERGE_SIZE,
) -> tuple[np.ndarray, np.ndarray]:
  """float (T, C, H, W) -> (pixel_values, grid_thw), Qwen2-VL's patch order.

  T is padded to a multiple of ``temporal_patch_size`` by repeating the last
  frame. Rows are ordered (t, h // merge, w // merge, merge_h, merge_w), each
  row flattened as (C, temporal, patch, patch).
  """
  if pad := -len(frames) % temporal_patch_size:
    frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)])
  t, c, h, w = frames.shape
  gt, gh, gw = t // temporal_patch_size, h // patch_size, w // patch_size
  patches = frames.reshape(
    gt,
    temporal_patch_size,
    c,
    gh // merge_size,
    merge_size,
    patch_size,
    gw // merge_size,
    merge_size,
    patch_size,
  ).transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
  pixel_values = patches.reshape(gt * gh * gw, c * temporal_patch_size * patch_size * patch_size)
  return (np.ascontiguousarray(pixel_values, np.float32), np.array([gt, gh, gw], np.int64))


@register_op("decode_image")
def _decode_image(ctx: OpContext, key: str = "image", media_dir: str | None = None) -> Op:
  """``example[key]`` (bytes, path or uint8 array) -> uint8 RGB (H, W, 3)."""
  del ctx

  def op(example: Example) -> Example:
    value = require(example, key)
    if isinstance(value, np.ndarray):
      if value.ndim == 3 and value.shape[-1] == 1:
        value = value[..., 0]
      if value.dtype != np.uint8 or not (
        value.ndim == 2 or (value.ndim == 3 and value.shape[-1] in (3, 4))
      ):
        raise BadRecord("undecodable", f"image array {value.dtype}{value.shape}")
      image = to_rgb(Image.fromarray(value))
    else:
      image = decode_image_bytes(read_media_bytes(value, media_dir))
    if image.shape[0] == 0 or image.shape[1] == 0:
      raise BadRecord("empty", f"image of shape {image.shape}")
    return {**example, key: image}

  return op


@register_op("resize_image")
def _resize_image(
  ctx: OpContext,
  key: str = "image",
  min_pixels: int = MIN_PIXELS,
  max_pixels: int = MAX_PIXELS,
  patch_size: int = PATCH_SIZE,
  merge_size: int = MERGE_SIZE,
) -> Op:
  """Smart-resizes the uint8 ``example[key]`` (see the module doc)."""
  del ctx
  factor = patch_size * merge_size
  if max_pixels < factor * factor or min_pixels > max_pixels:
    raise ValueError(f"resize_image: bad pixel range [{min_pixels}, {max_pixels}]")

  def op(example: Example) -> Example:
    image = require(example, key)
    return {**example, key: resize_frames(image, min_pixels, max_pixels, factor)}

  return op


@register_op("patchify_image")
def _patchify_image(
  ctx: OpContext,
  key: str = "image",
  out_key: str = "pixel_values",
  grid_key: str = "image_grid_thw",
  patch_size: int = PATCH_SIZE,
  temporal_patch_size: int = TEMPORAL_PATCH_SIZE,
  merge_size: int = MERGE_SIZE,
  mean: tuple = IMAGE_MEAN,
  std: tuple = IMAGE_STD,
) -> Op:
  """Resized uint8 ``example[key]`` -> ``pixel_values`` + ``image_grid_thw``.

  Drops ``example[key]`` (the pixels now live in ``pixel_values``).
  """
  del ctx

  def op(example: Example) -> Example:
    image = require(example, key)
    factor = patch_size * merge_size
    if image.shape[0] % factor or image.shape[1] % factor:
      raise ValueError(
        f"patchify_image: image {image.shape[:2]} is not a multiple of "
        f"{factor}; run resize_image first"
      )
    pixel_values, grid = patchify(
      normalize(image[None], mean, std), patch_size, temporal_patch_size, merge_size
    )
    out = {k: v for k, v in example.items() if k != key}
    return {**out, out_key: pixel_values, grid_key: grid}

  return op
