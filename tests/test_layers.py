"""Attention blocking, TM-RoPE slot layout and packed-text positions."""

import jax.numpy as jnp
import numpy as np
import pytest

from omnijax.models import tm_rope
from omnijax.models.attention import dot_product_attention


@pytest.mark.parametrize("blocks", [2, 3, 8])
def test_blocked_attention_equals_full(blocks):
  rng = np.random.default_rng(0)
  b, s, h, kh, d = 2, 40, 4, 2, 8
  q, k, v = (jnp.asarray(rng.normal(size=(b, s, n, d)), jnp.float32) for n in (h, kh, kh))
  seg = np.ones((b, s), np.int32)
  seg[0, 13:] = 2
  seg[1, 30:] = 0
  seg = jnp.asarray(seg)
  full = dot_product_attention(q, k, v, seg, 1)
  blocked = dot_product_attention(q, k, v, seg, blocks)
  valid = np.asarray(seg != 0)
  np.testing.assert_allclose(np.asarray(blocked)[valid], np.asarray(full)[valid], atol=1e-5)
  # A token never sees another document: perturbing document 1 leaves document 2 unchanged.
  q2 = q.at[0, :13].add(1.0)
  k2 = k.at[0, :13].add(1.0)
  again = dot_product_attention(q2, k2, v, seg, blocks)
  np.testing.assert_allclose(again[0, 13:], blocked[0, 13:], atol=1e-6)


def test_interleaved_slot_rows():
  rows = tm_rope.slot_rows(128, (24, 20, 20))
  assert rows.shape == (64,)
  assert [int((rows == r).sum()) for r in range(3)] == [24, 20, 20]
  assert list(rows[:6]) == [0, 1, 2, 0, 1, 2] and set(rows[60:]) == {0}


def test_text_positions_restart_per_segment():
  seg = jnp.asarray([[1, 1, 1, 2, 2, 0, 0], [1, 2, 2, 2, 3, 3, 3]])
  pos = np.asarray(tm_rope.text_positions(seg))
  assert pos.shape == (3, 2, 7)
  np.testing.assert_array_equal(pos[0], [[0, 1, 2, 0, 1, 0, 1], [0, 0, 1, 2, 0, 1, 2]])
  assert (pos[0] == pos[1]).all() and (pos[0] == pos[2]).all()
