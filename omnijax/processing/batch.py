"""The batch schema: the keys, shapes and dtypes of a training batch.

Every producer (the text pipeline, the omni pipeline, synthetic batches, the evaluators) and
the consumer (the train step) use these names. Shapes are per host, B rows of S tokens:

  inputs       int32    (B, S)     token ids (0 on padding)
  targets      int32    (B, S)     the next token of the same document
  segment_ids  int32    (B, S)     1..n: n-th document of the row; 0: padding
  positions    float32  (B, 3, S)  TM-RoPE ids (temporal, height, width); equal rows for text.
                                   A video whose seconds per grid x position ids per second is
                                   not whole has fractional temporal ids, as in the reference.
  loss_mask    float32  (B, S)     1 where the target is trained on
  task_ids     int32    (B, S)     optional: mixture source of the token (-1: padding)

plus the optional per-row media buffers of ``omnijax.processing.media`` (keys starting with
``audio_``, ``image_``, ``video_``), which the Thinker scatters into its placeholder tokens.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

TOKEN_FIELDS = {
  "inputs": np.int32,
  "targets": np.int32,
  "segment_ids": np.int32,
  "positions": np.float32,
  "loss_mask": np.float32,
}
TASK_IDS = "task_ids"
MEDIA_PREFIXES = ("audio_", "image_", "video_")


def media_of(batch: Mapping[str, object]) -> dict[str, object]:
  """The media buffers of a batch."""
  return {k: v for k, v in batch.items() if k.startswith(MEDIA_PREFIXES)}


def validate(batch: Mapping[str, np.ndarray]) -> None:
  """Raises ValueError naming the first key whose presence, dtype or shape is wrong."""
  missing = [k for k in TOKEN_FIELDS if k not in batch]
  if missing:
    raise ValueError(f"batch lacks {missing}; it has {sorted(batch)}.")
  b, s = np.shape(batch["inputs"])
  for k, dtype in TOKEN_FIELDS.items():
    want = (b, 3, s) if k == "positions" else (b, s)
    v = batch[k]
    if v.shape != want or v.dtype != dtype:
      raise ValueError(
        f"batch[{k!r}] is {v.dtype} {v.shape}; the schema wants {np.dtype(dtype)} {want}."
      )
  unknown = [
    k for k in batch if k not in TOKEN_FIELDS and k != TASK_IDS and not k.startswith(MEDIA_PREFIXES)
  ]
  if unknown:
    raise ValueError(f"batch has keys outside the schema: {unknown}.")


def text_batch(tokens: np.ndarray) -> dict[str, np.ndarray]:
  """One document per row from (B, S + 1) token ids: the shift, positions 0..S-1, full mask."""
  tokens = np.asarray(tokens, np.int32)
  b, s = tokens.shape[0], tokens.shape[1] - 1
  return dict(
    inputs=tokens[:, :-1],
    targets=tokens[:, 1:],
    segment_ids=np.ones((b, s), np.int32),
    positions=np.ascontiguousarray(np.broadcast_to(np.arange(s, dtype=np.float32), (b, 3, s))),
    loss_mask=np.ones((b, s), np.float32),
  )
