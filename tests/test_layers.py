"""Attention (blocked XLA path, splash kernel, zigzag token order of context parallelism), the
decoder stack over sequence shards, TM-RoPE slot layout and packed-text positions."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omnijax import sharding as shd
from omnijax.models import presets, tm_rope
from omnijax.models.config import ThinkerConfig
from omnijax.models.decoder import Decoder
from omnijax.models import attention as attn
from omnijax.models.attention import cudnn_attention, dot_product_attention, splash_attention


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


def _qkv_segments(b=4, s=256, h=4, kh=2, d=32):
  rng = np.random.default_rng(1)
  q, k, v = (jnp.asarray(rng.normal(size=(b, s, n, d)), jnp.float32) for n in (h, kh, kh))
  seg = np.ones((b, s), np.int32)
  seg[0, 100:] = 2
  seg[1, 200:] = 0  # padding
  seg[2, 7:] = 2
  seg[2, 90:] = 3
  return q, k, v, jnp.asarray(seg)


@pytest.mark.parametrize("window", [0, 37])
def test_splash_attention_equals_the_xla_path(window):
  """The Pallas TPU kernel (interpreted on CPU): outputs and gradients on every non-padding
  query, grouped-query heads, packed segments, causal with and without a sliding window."""
  q, k, v, seg = _qkv_segments()
  valid = np.asarray(seg != 0)[..., None, None]
  loss = lambda f: lambda q, k, v: jnp.sum(jnp.where(valid, f(q, k, v), 0) ** 2)
  xla = lambda q, k, v: dot_product_attention(q, k, v, seg, 4, window)
  splash = lambda q, k, v: splash_attention(q, k, v, seg, window, interpret=True)
  np.testing.assert_allclose(
    np.where(valid, splash(q, k, v), 0), np.where(valid, xla(q, k, v), 0), atol=2e-6
  )
  for a, b in zip(
    jax.grad(loss(splash), argnums=(0, 1, 2))(q, k, v),
    jax.grad(loss(xla), argnums=(0, 1, 2))(q, k, v),
  ):
    np.testing.assert_allclose(a, b, atol=1e-4 * float(jnp.abs(b).max()))


def test_splash_attention_runs_per_shard():
  """In a mesh (batch over data x fsdp, heads over tensor) each shard runs the kernel on its
  rows and heads: the result equals one device's."""
  q, k, v, seg = _qkv_segments()
  mesh = shd.make_mesh(dict(data=2, fsdp=2, tensor=2), jax.devices()[:8])
  with jax.set_mesh(mesh), nn.logical_axis_rules(shd.DEFAULT_RULES):
    sharded = jax.jit(lambda *a: splash_attention(*a, interpret=True))(q, k, v, seg)
  one = splash_attention(q, k, v, seg, interpret=True)
  valid = np.asarray(seg != 0)
  np.testing.assert_allclose(np.asarray(sharded)[valid], np.asarray(one)[valid], atol=1e-6)


def test_splash_attention_context_parallel(window=0):
  """Context parallelism: the sequence split over 2 `context` shards (and batch over fsdp,
  heads over tensor), each shard's queries against the gathered keys and values. Outputs and
  gradients (the keys' and values' summed over the shards that read them) equal one
  device's."""
  q, k, v, seg = _qkv_segments()
  valid = np.asarray(seg != 0)[..., None, None]
  loss = lambda q, k, v: jnp.sum(
    jnp.where(valid, splash_attention(q, k, v, seg, window, interpret=True), 0) ** 2
  )
  mesh = shd.make_mesh(dict(fsdp=2, context=2, tensor=2), jax.devices()[:8])
  with jax.set_mesh(mesh), nn.logical_axis_rules(shd.DEFAULT_RULES):
    sharded = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)
  one = jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)
  np.testing.assert_allclose(sharded[0], one[0], rtol=1e-6)
  for a, b in zip(sharded[1], one[1]):
    np.testing.assert_allclose(a, b, atol=1e-5 * float(jnp.abs(b).max()))


def test_zigzag_order():
  # 2 shards, 4 chunks of 2: shard 0 holds chunks 0 and 3, shard 1 chunks 1 and 2
  np.testing.assert_array_equal(attn.zigzag_order(8, 2), [0, 1, 6, 7, 2, 3, 4, 5])
  x = jnp.arange(2 * 24 * 3).reshape(2, 24, 3)
  z = attn.zigzag(x, 3, 1)
  np.testing.assert_array_equal(z, x[:, attn.zigzag_order(24, 3)])
  np.testing.assert_array_equal(attn.unzigzag(z, 3, 1), x)


@pytest.mark.parametrize("window", [0, 37])
@pytest.mark.parametrize("blocks", [1, 4])
def test_xla_attention_in_zigzag_order(window, blocks):
  """Queries, keys and values in zigzag order give the natural order's outputs, in that order."""
  q, k, v, seg = _qkv_segments()
  valid = np.asarray(seg != 0)[..., None, None]
  natural = np.where(valid, dot_product_attention(q, k, v, seg, blocks, window), 0)
  z = lambda x: attn.zigzag(x, 4, 1)
  out = dot_product_attention(z(q), z(k), z(v), z(seg), blocks, window, zigzag=4)
  np.testing.assert_allclose(np.where(z(valid), out, 0), z(natural), atol=2e-6)


@pytest.mark.parametrize("window", [0, 37])
def test_splash_attention_context_parallel_in_zigzag_order(window):
  """Context parallelism with the tokens in zigzag order: each of the 2 shards holds an early
  and a late chunk; outputs and gradients equal one device's in natural order."""
  q, k, v, seg = _qkv_segments()
  valid = np.asarray(seg != 0)[..., None, None]
  z = lambda x: attn.zigzag(x, 2, 1)
  natural = lambda q, k, v: jnp.sum(
    jnp.where(valid, splash_attention(q, k, v, seg, window, interpret=True), 0) ** 2
  )
  zigzagged = lambda q, k, v: jnp.sum(
    jnp.where(z(valid), splash_attention(q, k, v, z(seg), window, True, zigzag=2), 0) ** 2
  )
  mesh = shd.make_mesh(dict(fsdp=2, context=2, tensor=2), jax.devices()[:8])
  with jax.set_mesh(mesh), nn.logical_axis_rules(shd.DEFAULT_RULES):
    sharded = jax.jit(jax.value_and_grad(zigzagged, argnums=(0, 1, 2)))(z(q), z(k), z(v))
  one = jax.value_and_grad(natural, argnums=(0, 1, 2))(q, k, v)
  np.testing.assert_allclose(sharded[0], one[0], rtol=1e-6)
  for a, b in zip(sharded[1], one[1]):
    np.testing.assert_allclose(a, z(b), atol=1e-5 * float(jnp.abs(b).max()))


def test_zigzag_balances_splash_blocks_over_shards():
  """The kernel's block map: causal attention over 4 sequence shards of a 32k row computes
  6.6x more blocks on the last shard than on the first in natural order (904 against 136), the
  same on every shard in zigzag order (520)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask_info as info

  s, shards, block = 32768, 4, 512

  def per_shard(zigzag):
    mask_info, _ = info.process_mask(attn.splash_mask(s, 1, 0, zigzag), (block, block))
    computed = np.asarray(mask_info.block_mask[0] > 0)  # (query blocks, key blocks)
    return computed.reshape(shards, -1).sum(1)

  natural, balanced = per_shard(1), per_shard(shards)
  assert natural.sum() == balanced.sum()
  assert natural[-1] > 6 * natural[0]
  assert balanced.max() - balanced.min() <= 0.01 * balanced.max()


@pytest.mark.slow  # ~75 s; test_train's context-parallel step runs the zigzag order too
def test_decoder_over_sequence_shards_in_zigzag_order():
  """The decoder stack with the sequence over 2 context shards holds the tokens in zigzag order
  (positions, segments, modality routers and DeepStack taps with them) and returns them in
  natural order: outputs, the captured layer and the MoE statistics equal one device's."""
  cd = presets.get("tiny")
  cd.text.modality_routers = True
  cfg = ThinkerConfig.from_dict(cd)
  b, s, d = 4, 32, cfg.text.hidden_size
  rng = np.random.default_rng(0)
  h = jnp.asarray(rng.normal(size=(b, s, d)), jnp.float32)
  seg = np.ones((b, s), np.int32)
  seg[0, 11:] = 2
  seg[1, 25:] = 0
  seg = jnp.asarray(seg)
  positions = tm_rope.text_positions(seg) + jnp.asarray([0, 3, 5])[:, None, None]
  modality = jnp.asarray(rng.integers(0, 4, (b, s)), jnp.int32)
  deepstack = jnp.asarray(rng.normal(size=(2, b, s, d)), jnp.float32)
  args = (h, positions, seg, modality, deepstack, None, 1)
  dec = Decoder(cfg.text, cfg.impl)
  params = dec.init(jax.random.PRNGKey(0), *args)
  one = dec.apply(params, *args)
  mesh = shd.make_mesh(dict(fsdp=2, context=2, tensor=2), jax.devices()[:8])
  with jax.set_mesh(mesh), nn.logical_axis_rules(shd.DEFAULT_RULES):
    sharded = jax.jit(lambda p, *a: dec.apply(p, *a, None, 1))(params, *args[:5])
  valid = np.asarray(seg != 0)
  for a, b_ in ((sharded[0], one[0]), (sharded[2], one[2])):
    np.testing.assert_allclose(np.asarray(a)[valid], np.asarray(b_)[valid], atol=2e-5)
  for a, b_ in zip(jax.tree.leaves(sharded[1]), jax.tree.leaves(one[1])):
    np.testing.assert_allclose(a, b_, atol=1e-4)


@pytest.mark.parametrize("kh", [2, 4, 1])
@pytest.mark.parametrize("window", [0, 37])
def test_cudnn_attention_call_equals_the_xla_path(window, kh):
  """The GPU path's call of jax.nn.dot_product_attention (mask, causal flag, window, GQA
  layout, scale) with XLA's implementation; on a GPU, cuDNN's own kernel in half precision.
  4 query heads over `kh` KV heads: grouped, multi-head (Code2Wav) and multi-query."""
  q, k, v, seg = _qkv_segments(kh=kh)
  valid = np.asarray(seg != 0)[..., None, None]
  ref = dot_product_attention(q, k, v, seg, 4, window)
  out = cudnn_attention(q, k, v, seg, window, implementation="xla")
  np.testing.assert_allclose(np.where(valid, out, 0), np.where(valid, ref, 0), atol=2e-6)
  if jax.default_backend() == "gpu":
    half = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    fused = cudnn_attention(*half, seg, window).astype(jnp.float32)
    np.testing.assert_allclose(np.where(valid, fused, 0), np.where(valid, ref, 0), atol=5e-2)


def _score_sized_copies(fn, *args, scores: int) -> list[str]:
  """The copies of score-matrix-sized arrays in fn's optimized CPU HLO (a transpose is made
  physical by a copy into the new layout)."""
  text = jax.jit(fn).lower(*args).compile().as_text()
  found = []
  for m in re.finditer(r"= f32\[([\d,]+)\]\{[\d,]*\} copy\(", text):
    if np.prod([int(n) for n in m.group(1).split(",")]) == scores:
      found.append(m.group(0))
  return found


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's layout choices")
@pytest.mark.parametrize("kh", [2, 8, 1])
def test_xla_attention_keeps_the_score_layout(kh):
  """The XLA path's products take the scores in the layout they are made in: no transposed
  copy of the score matrix in the forward pass, one (for the key gradient) with gradients.
  On XLA:CPU such a copy costs about as much as a score matmul; the two forward and two more
  backward ones took the small preset's step from 9.99 to 10.45 s. 8 query heads over `kh` KV
  heads: grouped, multi-head (Code2Wav) and multi-query."""
  rng = np.random.default_rng(0)
  b, s, h, d = 2, 256, 8, 32
  q, k, v = (jnp.asarray(rng.normal(size=(b, s, n, d)), jnp.float32) for n in (h, kh, kh))
  seg = jnp.ones((b, s), jnp.int32)
  forward = lambda q, k, v: dot_product_attention(q, k, v, seg, 1)
  assert _score_sized_copies(forward, q, k, v, scores=b * h * s * s) == []
  grads = jax.grad(lambda q, k, v: forward(q, k, v).sum(), argnums=(0, 1, 2))
  assert len(_score_sized_copies(grads, q, k, v, scores=b * h * s * s)) <= 1
