"""TM-RoPE: rotary embeddings driven by (temporal, height, width) position ids.

The head_dim/2 frequency slots are assigned to the three position rows interleaved
T,H,W,T,H,W,... over the first 3*min(sections) slots and the remaining slots to T, so with
``mrope_section=(24, 20, 20)`` T gets 24 slots, H 20 and W 20 (Qwen3-Omni's layout; Qwen2.5-Omni
used contiguous chunks). The rotated halves are laid out as in rotate-half RoPE.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def slot_rows(head_dim: int, mrope_section: tuple[int, int, int]) -> np.ndarray:
  """For each of the head_dim/2 frequency slots, which position row (0=T, 1=H, 2=W) drives it."""
  half = head_dim // 2
  rows = np.zeros(half, np.int32)
  _, h, w = mrope_section
  rows[1 : 3 * h : 3] = 1
  rows[2 : 3 * w : 3] = 2
  return rows


def inv_frequencies(head_dim: int, theta: float) -> np.ndarray:
  return 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))


def cos_sin(
  positions: jax.Array, head_dim: int, theta: float, mrope_section: tuple[int, int, int]
) -> tuple[jax.Array, jax.Array]:
  """positions (3, B, S) int -> cos, sin (B, S, head_dim) float32."""
  rows = slot_rows(head_dim, mrope_section)
  pos = positions.astype(jnp.float32)[rows]  # (half, B, S): each slot's own position row
  freqs = jnp.moveaxis(pos, 0, -1) * inv_frequencies(head_dim, theta)  # (B, S, half)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x (B, S, heads, head_dim); cos/sin (B, S, head_dim)."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  cos = cos[:, :, None, :].astype(x.dtype)
  sin = sin[:, :, None, :].astype(x.dtype)
  return x * cos + rotated * sin


def text_positions(segment_ids: jax.Array) -> jax.Array:
  """(3, B, S) positions for packed text: each row counts 0, 1, ... from each segment's start."""
  s = segment_ids.shape[-1]
  idx = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), segment_ids.shape)
  starts = jnp.concatenate(
    [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
  )
  seg_start = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
  pos = idx - seg_start
  return jnp.broadcast_to(pos[None], (3,) + pos.shape)
