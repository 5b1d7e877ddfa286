"""MoE expert paths agree with the dense reference, on one device and expert-parallel on 8."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omnijax import sharding as shd
from omnijax.models import matmul, moe
from omnijax.models.config import ImplConfig
from omnijax.train.step import mesh_context

E, D, F, K = 8, 16, 24, 2
# (expert path, its products through oneMKL): the blocked path's in-place row products too
# where this host has them.
PATHS = [("ragged_dot", False), ("blocked", False)] + [("blocked", True)] * (
  matmul.unavailable() is None
)


def _inputs(tokens, seed=0, skew=False):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(tokens, D)).astype(np.float32)
  logits = rng.normal(size=(tokens, E)).astype(np.float32)
  if skew:  # most tokens prefer expert 0 and 1: overflows small capacities
    logits[:, :2] += 4.0
  probs = jax.nn.softmax(logits)
  top_w, top_i = jax.lax.top_k(probs, K)
  w = [rng.normal(size=s).astype(np.float32) * 0.2 for s in ((E, D, F), (E, D, F), (E, F, D))]
  return jnp.asarray(x), top_i.astype(jnp.int32), top_w, w


@pytest.mark.parametrize("impl", ["ragged_dot", "blocked"])
@pytest.mark.parametrize("block", [4, 128])
def test_local_paths_match_dense(impl, block):
  x, top_i, top_w, (wg, wu, wd) = _inputs(37)
  ref = moe.dense_reference(x, top_i, top_w, wg, wu, wd)
  out = moe.local_experts(x, top_i, top_w, wg, wu, wd, impl, block)
  np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tokens, block", [(29, 8), (256, 4)])
def test_local_path_gradients_match_dense(tokens, block):
  """(256, 4): every expert has over RUN_TILES tiles, computed as a run and then in smaller ones."""
  x, top_i, top_w, ws = _inputs(tokens)
  if block == 4:
    rows = np.bincount(np.asarray(top_i).reshape(-1), minlength=E)
    assert np.all(rows // block > moe.RUN_TILES) and np.any(rows // block % moe.RUN_TILES)

  def loss(path, x, ws, mkl=False):
    if path == "dense":
      return jnp.sum(moe.dense_reference(x, top_i, top_w, *ws) ** 2)
    return jnp.sum(moe.local_experts(x, top_i, top_w, *ws, path, block, mkl) ** 2)

  ref = jax.grad(loss, argnums=(1, 2))("dense", x, ws)
  for path, mkl in PATHS:
    grad = jax.jit(jax.grad(loss, argnums=(1, 2)), static_argnums=(0, 3))
    assert ("omnijax_grouped_sgemm" in grad.lower(path, x, ws, mkl).as_text()) == mkl
    got = grad(path, x, ws, mkl)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
      np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("num_tiles", [1, 3, 5, 8, 20])
def test_runs_cover_each_tile_once_in_few_calls(num_tiles):
  """An expert's tiles: RUN_TILES per call, the rest in halving runs (7 as 4 + 2 + 1),
  whatever the tile count; calls of num_tiles tiles when there are fewer than RUN_TILES."""
  rows, run = 2, min(moe.RUN_TILES, num_tiles)

  def cover(first, count):
    def body(start, n, carry):
      seen, calls = carry
      ones = jnp.ones((n,), jnp.int32)
      span = jax.lax.dynamic_slice_in_dim(seen, start, n)
      return jax.lax.dynamic_update_slice_in_dim(seen, span + ones, start, 0), calls + 1

    zeros = jnp.zeros((num_tiles * rows,), jnp.int32)
    return moe._runs(first, count, rows, num_tiles, (zeros, 0), body)

  cover = jax.jit(cover)
  for first in range(num_tiles):
    for count in range(num_tiles - first + 1):
      seen, calls = cover(first, count)
      want = np.zeros(num_tiles * rows, np.int32)
      want[first * rows : (first + count) * rows] = 1
      np.testing.assert_array_equal(seen, want, err_msg=f"first={first} count={count}")
      assert calls == count // run + bin(count % run).count("1")


def test_take_rows_gradient_equals_the_scatter_add():
  """take_rows' gathered gradient equals autodiff's scatter-add of jnp.take, with rows read
  twice, never, and an index past the end."""
  src = jnp.asarray(np.random.default_rng(0).standard_normal((5, 3)), jnp.float32)
  index = jnp.asarray([4, 0, 5, 2, 0, 3], jnp.int32)  # 1 unread, 0 read twice, 5 past the end
  readers = jnp.asarray([[1, 4], [6, 6], [3, 6], [5, 6], [0, 6]], jnp.int32)
  weights = jnp.arange(18, dtype=jnp.float32).reshape(6, 3)
  ref = jax.grad(lambda s: jnp.sum(jnp.take(s, index, 0, mode="fill", fill_value=0) * weights))
  got = jax.grad(lambda s: jnp.sum(moe.take_rows(s, index, readers) * weights))
  np.testing.assert_array_equal(moe.take_rows(src, index, readers)[2], 0.0)
  np.testing.assert_allclose(got(src), ref(src))


def _run_moe_experts(mesh_shape, impl_cfg, x, top_i, top_w, ws):
  mesh = shd.make_mesh(mesh_shape)
  rules = shd.DEFAULT_RULES
  b = 8
  xs, ti, tw = (a.reshape((b, -1) + a.shape[1:]) for a in (x, top_i, top_w))
  with mesh_context(mesh, rules):
    f = jax.jit(lambda *a: moe.moe_experts(*a, impl_cfg))
    out, dropped = f(xs, ti, tw, *ws)
  return np.asarray(out).reshape(x.shape), int(dropped)


@pytest.mark.parametrize("path", ["blocked", "ragged_dot", "dense"])
@pytest.mark.parametrize(
  "mesh_shape",
  [
    dict(data=2, fsdp=2, expert=2),
    dict(data=1, fsdp=1, expert=8),
    dict(data=1, fsdp=2, expert=2, tensor=2),
  ],
)
def test_expert_parallel_matches_dense_reference(path, mesh_shape):
  x, top_i, top_w, ws = _inputs(8 * 12, seed=1)
  ref = moe.dense_reference(x, top_i, top_w, *ws)
  out, dropped = _run_moe_experts(mesh_shape, ImplConfig(moe_impl=path), x, top_i, top_w, ws)
  assert dropped == 0
  np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)


def test_one_device_mesh_adds_no_collectives_to_the_gradients():
  """On a one-device mesh (a local CPU run) the block runs as without a mesh: in shard_map,
  the gradients of its inputs went through all-reduces, which XLA:CPU still copies."""
  x, top_i, top_w, ws = _inputs(8 * 12, seed=1)
  xs, ti, tw = (a.reshape((8, -1) + a.shape[1:]) for a in (x, top_i, top_w))
  mesh = shd.make_mesh(dict(fsdp=1), jax.devices()[:1])

  def loss(xs, tw, ws):
    return jnp.sum(moe.moe_experts(xs, ti, tw, *ws, ImplConfig(moe_impl="blocked"))[0] ** 2)

  with mesh_context(mesh, shd.DEFAULT_RULES):
    hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(xs, tw, ws).compile().as_text()
  assert "all-reduce" not in hlo


def test_capacity_bounded_exchange_counts_drops():
  x, top_i, top_w, ws = _inputs(8 * 16, seed=2, skew=True)
  mesh_shape = dict(data=1, fsdp=1, expert=8)
  cf = 1.0
  out, dropped = _run_moe_experts(
    mesh_shape, ImplConfig(moe_impl="blocked", moe_capacity_factor=cf), x, top_i, top_w, ws
  )
  # Independent count: per source device, slots beyond capacity per destination device.
  tokens_per_dev, ep = 16, 8
  capacity = moe.exchange_capacity(tokens_per_dev * K, ep, cf)
  dest = np.asarray(top_i).reshape(ep, tokens_per_dev * K) // (E // ep)
  expected = sum(max(0, int(np.sum(dest[s] == d)) - capacity) for s in range(ep) for d in range(ep))
  assert expected > 0 and dropped == expected
  # Kept slots are exact: tokens none of whose slots were dropped match the reference.
  ref = np.asarray(moe.dense_reference(x, top_i, top_w, *ws))
  assert np.isfinite(out).all()
  close = np.isclose(out, ref, atol=1e-5).all(-1)
  assert close.sum() >= len(close) - expected


def _emulated_ragged_all_to_all(
  operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name
):
  """jax.lax.ragged_all_to_all's semantics from all_gather (XLA:CPU has no ragged all-to-all):
  rows r < send_sizes[j] of sender i from input_offsets[j] land on device j at
  output_offsets[j] + r; each receiver's recv_sizes must agree with its senders."""
  me = jax.lax.axis_index(axis_name)
  ops, starts, sizes, dests = (
    jax.lax.all_gather(a, axis_name) for a in (operand, input_offsets, send_sizes, output_offsets)
  )
  rows = jnp.arange(operand.shape[0])
  for i in range(ops.shape[0]):
    src = ops[i][jnp.clip(starts[i, me] + rows, 0, operand.shape[0] - 1)]
    dst = jnp.where(rows < sizes[i, me], dests[i, me] + rows, output.shape[0])
    output = output.at[dst].set(src, mode="drop")
  consistent = jnp.all(recv_sizes == sizes[:, me])
  poison = jnp.nan if jnp.issubdtype(output.dtype, jnp.floating) else jnp.iinfo(output.dtype).min
  return jnp.where(consistent, output, jnp.asarray(poison, output.dtype))


def test_ragged_exchange_equals_the_all_to_all(monkeypatch):
  """moe_exchange=ragged (only filled rows travel), with the collective emulated on CPU: the
  same outputs, drops and gradients as the whole-buffer all_to_all."""
  monkeypatch.setattr(jax.lax, "ragged_all_to_all", _emulated_ragged_all_to_all)
  x, top_i, top_w, ws = _inputs(8 * 16, seed=2, skew=True)
  mesh_shape, cf = dict(data=2, expert=4), 1.0  # skewed routing overflows some buffers
  runs = {}
  for exchange in ("all_to_all", "ragged"):
    impl = ImplConfig(moe_impl="blocked", moe_capacity_factor=cf, moe_exchange=exchange)
    out, dropped = _run_moe_experts(mesh_shape, impl, x, top_i, top_w, ws)
    mesh = shd.make_mesh(mesh_shape)
    xs, ti, tw = (a.reshape((8, -1) + a.shape[1:]) for a in (x, top_i, top_w))
    with mesh_context(mesh, shd.DEFAULT_RULES):
      loss = lambda x, ws: jnp.sum(moe.moe_experts(x, ti, tw, *ws, impl)[0] ** 2)
      grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(xs, ws)
    runs[exchange] = out, dropped, grads
  (a_out, a_drop, a_grads), (r_out, r_drop, r_grads) = runs["all_to_all"], runs["ragged"]
  assert r_drop == a_drop > 0
  np.testing.assert_allclose(r_out, a_out, atol=1e-6)
  for a, b in zip(jax.tree.leaves(r_grads), jax.tree.leaves(a_grads)):
    np.testing.assert_allclose(a, b, atol=1e-5)
