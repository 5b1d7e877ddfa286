"""Mixture-of-experts block: fp32 softmax top-k router, SwiGLU experts, optional shared expert.

Expert computation paths (``ImplConfig.moe_impl``):
- ``ragged_dot``: dropless; token slots sorted by expert, grouped matmul ``jax.lax.ragged_dot``.
- ``blocked``: dropless; slots sorted by expert into row tiles of ``moe_block_size`` (each
  expert's rows padded to whole tiles), per expert loops of SwiGLUs over its tiles, up to
  ``RUN_TILES`` tiles per matmul (``tiled_swiglu``).
  XLA:CPU expands ``ragged_dot`` into a dense matmul per expert, so this is the fast path there.
- ``dense``: every expert on every token, combined by the gate weights. The reference the
  tests cross-check against; O(num_experts) compute.
- ``auto``: ``ragged_dot`` on GPU/TPU, ``blocked`` on CPU.
With no more token slots than experts (a decode step) the dropless paths gather each slot's
expert weights instead (``gathered_experts``): they read only the chosen experts.

Under a mesh the block runs in ``shard_map``: each device routes its own tokens; when the
logical ``exp`` axis maps to a mesh axis of size > 1, token slots travel to the devices that
own their experts with ``all_to_all`` and back (expert parallelism). That exchange uses
fixed-size buffers: dropless (``moe_capacity_factor=None``, buffers sized for the worst case)
or bounded at ``capacity_factor`` x the balanced share, in which case overflowing slots are
dropped and counted (reported as ``moe_dropped``). ``ImplConfig.moe_exchange`` says how they
travel: ``all_to_all`` sends whole buffers, ``ragged`` (``jax.lax.ragged_all_to_all``) only
their filled rows; ``auto`` is ragged on GPU/TPU (XLA:CPU has no ragged all-to-all).
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from omnijax.models import matmul
from omnijax.models.config import ImplConfig, TextConfig
from omnijax.models.layers import (
  SwiGLU,
  constrain,
  dtype_of,
  logical_param,
  mesh_axes,
  mesh_shards,
)


# An expert's row tiles are computed this many at a time while that many remain, the rest in
# halving runs: on XLA:CPU each loop step costs about as much as a 128-row tile's matmuls. In a
# thunk trace of benchmarks/train_step.py's step the MoE blocks took 17% less thread time than
# one tile at a time, and the step 4% less again with halving runs for the rest than with single
# tiles. Padding stays at under one tile per expert.
RUN_TILES = 8
NUM_MODALITIES = 4  # text, image, audio, video (omnijax.models.thinker.MODALITIES)


def route(logits: jax.Array, top_k: int, norm_topk_prob: bool, dtype):
  """Router logits (T, E) -> (weights (T, k) in dtype, expert ids (T, k) int32, probs (T, E)).

  Softmax over all experts in float32, top-k, optionally renormalised to sum to 1."""
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  top_p, top_i = jax.lax.top_k(probs, top_k)
  if norm_topk_prob:
    top_p = top_p / jnp.sum(top_p, axis=-1, keepdims=True)
  return top_p.astype(dtype), top_i.astype(jnp.int32), probs


def _sorted_layout(slot_expert: jax.Array, num_experts: int):
  """Stable sort of slots by expert id (id == num_experts marks an empty slot, sorted last)."""
  order = jnp.argsort(slot_expert, stable=True)
  sizes = jnp.bincount(slot_expert, length=num_experts + 1)[:num_experts]
  starts = jnp.cumsum(sizes) - sizes
  return order, sizes, starts


def _swiglu_grad(gu, d_h):
  """(silu(gate) * up, the gradient of (gate | up)) from gu = (gate | up) side by side and the
  gradient d_h of silu(gate) * up."""
  f = d_h.shape[1]
  gate, up = gu[:, :f], gu[:, f:]
  sig = jax.nn.sigmoid(gate)
  act = gate * sig
  return act * up, jnp.concatenate([d_h * up * sig * (1 + gate * (1 - sig)), d_h * act], axis=1)


@jax.custom_vjp
def tiled_swiglu(
  tiles: jax.Array, wg: jax.Array, wu: jax.Array, wd: jax.Array, tile_expert: jax.Array
) -> jax.Array:
  """SwiGLU of expert ``tile_expert[t]`` on row tile t: tiles (T, b, D) -> (T, b, D), the tiles
  sorted by expert (E after the last used tile: not computed, their outputs are zeros).

  A scan over the experts, each reading its weights once (gate and up side by side: one
  matmul), with loops over that expert's tiles inside (``RUN_TILES`` at a time, then the rest
  in halving runs), whose SwiGLU activations are not stored: on XLA:CPU a batched matmul over
  gathered weights runs at about half the speed, and unfused intermediates cost more memory
  traffic than the matmuls (benchmarks/train_step.py). Saves the gate and up pre-activations
  for the backward pass, which accumulates an expert's weight gradients in the loops' carry.
  """
  return _tiled_swiglu_fwd(tiles, wg, wu, wd, tile_expert)[0]


def _expert_tiles(tile_expert: jax.Array, num_experts: int):
  """(first tile, number of tiles) of each expert."""
  counts = jnp.bincount(tile_expert, length=num_experts + 1)[:num_experts]
  return jnp.cumsum(counts) - counts, counts


def _runs(first, count, rows: int, num_tiles: int, carry, body):
  """carry through body(first row, number of rows, carry) over an expert's `count` row tiles
  of `rows` rows from tile `first` (of `num_tiles`): RUN_TILES tiles per call while that many
  remain, then the rest in halving runs (count's binary digits: 7 tiles as 4 + 2 + 1)."""
  run = min(RUN_TILES, num_tiles)
  step = lambda n: lambda i, c: (c[0] + n, body(c[0], n, c[1]))
  start, carry = jax.lax.fori_loop(0, count // run, step(run * rows), (first * rows, carry))
  size = 1 << (run - 1).bit_length() >> 1  # the largest power of two below run
  while size:
    start, carry = jax.lax.fori_loop(0, count % run // size % 2, step(size * rows), (start, carry))
    size >>= 1
  return carry


def _tiled_swiglu_fwd(tiles, wg, wu, wd, tile_expert):
  f = wg.shape[2]
  num_tiles, rows, d = tiles.shape
  x = tiles.reshape(num_tiles * rows, d)

  def expert(bufs, xs):
    wg_e, wu_e, wd_e, first, count = xs
    wgu = jnp.concatenate([wg_e, wu_e], axis=1)

    def run(start, n, bufs):
      gu = jax.lax.dynamic_slice_in_dim(x, start, n) @ wgu
      y = (jax.nn.silu(gu[:, :f]) * gu[:, f:]) @ wd_e
      return tuple(
        jax.lax.dynamic_update_slice_in_dim(b, v, start, 0) for b, v in zip(bufs, (y, gu))
      )

    return _runs(first, count, rows, num_tiles, bufs, run), None

  bufs = (jnp.zeros_like(x), jnp.zeros((x.shape[0], 2 * f), x.dtype))
  spans = _expert_tiles(tile_expert, wg.shape[0])
  (y, gu), _ = jax.lax.scan(expert, bufs, (wg, wu, wd, *spans))
  return y.reshape(tiles.shape), (x, gu, wg, wu, wd, spans)


def _tiled_swiglu_bwd(res, g):
  x, gu, wg, wu, wd, spans = res
  d, f = wg.shape[1:]
  num_tiles, rows = g.shape[:2]
  g = g.reshape(x.shape)

  def expert(d_x, xs):
    wg_e, wu_e, wd_e, first, count = xs
    wgu = jnp.concatenate([wg_e, wu_e], axis=1)

    def run(start, n, carry):
      d_wgu, d_wd, d_x = carry
      gu_t, g_t = (jax.lax.dynamic_slice_in_dim(a, start, n) for a in (gu, g))
      h, d_gu = _swiglu_grad(gu_t, g_t @ wd_e.T)
      return (
        d_wgu + (jax.lax.dynamic_slice_in_dim(x, start, n).T @ d_gu).astype(d_wgu.dtype),
        d_wd + (h.T @ g_t).astype(d_wd.dtype),
        jax.lax.dynamic_update_slice_in_dim(d_x, d_gu @ wgu.T, start, 0),
      )

    zeros = (jnp.zeros((d, 2 * f), jnp.float32), jnp.zeros((f, d), jnp.float32))
    d_wgu, d_wd, d_x = _runs(first, count, rows, num_tiles, (*zeros, d_x), run)
    return d_x, (d_wgu[:, :f], d_wgu[:, f:], d_wd)

  d_x, d_ws = jax.lax.scan(expert, jnp.zeros_like(x), (wg, wu, wd, *spans))
  d_tiles = d_x.reshape(-1, rows, d)
  return (d_tiles, *(dw.astype(w.dtype) for dw, w in zip(d_ws, (wg, wu, wd))), None)


tiled_swiglu.defvjp(_tiled_swiglu_fwd, _tiled_swiglu_bwd)


@jax.custom_vjp
def grouped_swiglu(rows, wg, wu, wd, sizes):
  """SwiGLU of expert e on its rows, the `sizes[e]` rows after those of experts < e (rows past
  them: zeros): rows (M, D) -> (M, D), each expert's products one oneMKL call
  (`matmul.grouped_matmul`), gate and up side by side, the activations over all rows at once."""
  return _grouped_swiglu_fwd(rows, wg, wu, wd, sizes)[0]


def _grouped_swiglu_fwd(rows, wg, wu, wd, sizes):
  f = wg.shape[2]
  wgu = jnp.concatenate([wg, wu], axis=2)
  gu = matmul.grouped_matmul(rows, wgu, sizes)
  y = matmul.grouped_matmul(jax.nn.silu(gu[:, :f]) * gu[:, f:], wd, sizes)
  return y, (rows, gu, wgu, wd, sizes)


def _grouped_swiglu_bwd(res, g):
  rows, gu, wgu, wd, sizes = res
  f = wd.shape[1]
  h, d_gu = _swiglu_grad(gu, matmul.grouped_matmul(g, wd, sizes, trans_w=True))
  d_wgu = matmul.grouped_weight_grad(rows, d_gu, sizes)
  d_wd = matmul.grouped_weight_grad(h, g, sizes)
  d_rows = matmul.grouped_matmul(d_gu, wgu, sizes, trans_w=True)
  return d_rows, d_wgu[..., :f], d_wgu[..., f:], d_wd, None


grouped_swiglu.defvjp(_grouped_swiglu_fwd, _grouped_swiglu_bwd)


@jax.custom_vjp
def take_rows(src: jax.Array, index: jax.Array, readers: jax.Array) -> jax.Array:
  """src[index] (an index past the end reads a zero row), whose gradient is a gather: readers
  (len(src), k) lists the output rows that read each src row (past the end: none). Autodiff's
  scatter-add runs serially on XLA:CPU."""
  return jnp.take(src, index, axis=0, mode="fill", fill_value=0)


def _take_rows_fwd(src, index, readers):
  return take_rows(src, index, readers), readers


def _take_rows_bwd(readers, g):
  return jnp.take(g, readers, axis=0, mode="fill", fill_value=0).sum(1), None, None


take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


def expert_ffn(
  x: jax.Array, slot_expert: jax.Array, wg, wu, wd, impl: str, block: int, mkl: bool = False
) -> jax.Array:
  """SwiGLU of expert ``slot_expert[i]`` on row ``x[i // k]`` for every slot i, with k =
  N / T slots per token.

  x (T, D); slot_expert (N,); wg/wu (E, D, F); wd (E, F, D). Slots whose expert id is E (empty
  buffer rows) give zeros. Returns (N, D).
  """
  num_experts = wg.shape[0]
  n = slot_expert.shape[0]
  k = n // x.shape[0]
  order, sizes, starts = _sorted_layout(slot_expert, num_experts)
  sorted_expert = slot_expert[order]
  valid_sorted = sorted_expert < num_experts

  if impl == "ragged_dot":
    rows = jnp.where(valid_sorted[:, None], x[order // k], 0)
    gmm = lambda a, w: jax.lax.ragged_dot(a, w, sizes)
    y_sorted = gmm(jax.nn.silu(gmm(rows, wg)) * gmm(rows, wu), wd)
    y_sorted = jnp.where(valid_sorted[:, None], y_sorted, 0)
    return jnp.zeros_like(y_sorted).at[order].set(y_sorted)

  if impl != "blocked":
    raise ValueError(f"unknown expert path {impl!r}")
  # Pad each expert's rows up to whole tiles of `block` rows; tile t belongs to one expert.
  # Buffer rows are gathered from x (padding rows read zeros) and slot outputs gathered
  # back; the slot <-> row maps make both backward passes gathers too (`take_rows`). oneMKL's
  # grouped products (`mkl`) take any number of rows: 8-row tiles, to pad little.
  mkl = mkl and x.dtype == wg.dtype == wu.dtype == wd.dtype == jnp.float32
  block = 8 if mkl else min(block, max(8, 1 << (n - 1).bit_length()))
  padded = (sizes + block - 1) // block * block
  padded_end = jnp.cumsum(padded)
  padded_start = padded_end - padded
  num_rows = (n + num_experts * (block - 1) + block - 1) // block * block
  num_tiles = num_rows // block
  safe_expert = jnp.minimum(sorted_expert, num_experts - 1)
  dest_sorted = padded_start[safe_expert] + jnp.arange(n) - starts[safe_expert]
  dest_sorted = jnp.where(valid_sorted, dest_sorted, num_rows)  # empty slots get no row
  dest = jnp.zeros((n,), jnp.int32).at[order].set(dest_sorted.astype(jnp.int32))
  row_slot = jnp.full((num_rows,), n, jnp.int32).at[dest].set(jnp.arange(n), mode="drop")
  row_token = jnp.where(row_slot < n, row_slot // k, x.shape[0])
  buf = take_rows(x, row_token, dest.reshape(-1, k))
  if mkl:
    out = grouped_swiglu(buf, wg, wu, wd, padded)
  else:
    # E for the tiles after the last expert's rows (not computed).
    tile_expert = jnp.searchsorted(padded_end, jnp.arange(num_tiles) * block, side="right")
    tiles = buf.reshape(num_tiles, block, -1)
    out = tiled_swiglu(tiles, wg, wu, wd, tile_expert).reshape(num_rows, -1)
  return take_rows(out, dest, row_slot[:, None])


def combine(y_slots: jax.Array, weights: jax.Array) -> jax.Array:
  """(T*k, D) slot outputs, (T, k) gate weights -> (T, D)."""
  t, k = weights.shape
  return jnp.einsum("tkd,tk->td", y_slots.reshape(t, k, -1), weights)


def dense_reference(x, top_idx, top_w, wg, wu, wd):
  """Every expert on every token, combined with a dense (T, E) gate matrix."""
  num_experts = wg.shape[0]
  gates = jnp.zeros((x.shape[0], num_experts), x.dtype)
  gates = gates.at[jnp.arange(x.shape[0])[:, None], top_idx].add(top_w)
  h = jax.nn.silu(jnp.einsum("td,edf->tef", x, wg)) * jnp.einsum("td,edf->tef", x, wu)
  return jnp.einsum("tef,efd,te->td", h, wd, gates)


def gathered_experts(x, top_idx, top_w, wg, wu, wd):
  """Each slot's SwiGLU with its expert's weights gathered: x (T, D) -> (T, D).

  Reads only the T * k chosen experts' weights: for a few tokens (a decode step) it beats the
  sorted paths, which touch every expert's (inside the layer scan XLA:CPU copies a layer's whole
  expert stack before the tile scan reads it: 3x slower decode steps for the small preset)."""
  k = top_idx.shape[1]
  e = top_idx.reshape(-1)
  xs = jnp.repeat(x, k, axis=0)
  h = jax.nn.silu(jnp.einsum("nd,ndf->nf", xs, wg[e])) * jnp.einsum("nd,ndf->nf", xs, wu[e])
  return combine(jnp.einsum("nf,nfd->nd", h, wd[e]), top_w)


def local_experts(x, top_idx, top_w, wg, wu, wd, impl: str, block: int, mkl: bool = False):
  """Dropless MoE over the tokens of one device: x (T, D) -> (T, D); `mkl`: the blocked
  path's products as oneMKL's grouped products (`grouped_swiglu`)."""
  if impl == "dense":
    return dense_reference(x, top_idx, top_w, wg, wu, wd)
  if top_idx.size <= wg.shape[0]:
    return gathered_experts(x, top_idx, top_w, wg, wu, wd)
  y = expert_ffn(x, top_idx.reshape(-1), wg, wu, wd, impl, block, mkl)
  return combine(y, top_w)


def exchange_capacity(num_slots: int, ep: int, capacity_factor: float | None) -> int:
  """Rows each device reserves per destination device in the all-to-all buffers."""
  if capacity_factor is None:
    return num_slots
  return min(num_slots, max(1, math.ceil(num_slots / ep * capacity_factor)))


def _ragged_exchange(send, out, send_sizes, recv_sizes, *, axis, capacity: int):
  """Device i's block j (rows j*capacity .. + send_sizes[j]) lands in device j's block i:
  the fixed-buffer all_to_all's layout, moving only the filled rows."""
  ep = send_sizes.shape[0]
  starts = jnp.arange(ep, dtype=jnp.int32) * capacity
  mine = jnp.full((ep,), jax.lax.axis_index(axis) * capacity, jnp.int32)
  return jax.lax.ragged_all_to_all(
    send,
    out,
    starts,
    send_sizes.astype(jnp.int32),
    mine,
    recv_sizes.astype(jnp.int32),
    axis_name=axis,
  )


def expert_parallel(
  x,
  top_idx,
  top_w,
  wg,
  wu,
  wd,
  *,
  axis: str,
  ep: int,
  capacity: int,
  impl: str,
  block: int,
  ragged: bool = False,
):
  """Per-device body: send slots to their experts' devices, compute, send results back.

  x (T, D) local tokens; wg/wu/wd hold this device's E/ep experts. Returns ((T, D), dropped).
  `ragged` moves only each buffer's filled rows (`jax.lax.ragged_all_to_all`, GPU/TPU).
  """
  t, k = top_idx.shape
  n, d = t * k, x.shape[1]
  local_e = wg.shape[0]
  flat_e = top_idx.reshape(-1)
  dest_dev = flat_e // local_e
  order = jnp.argsort(flat_e, stable=True)  # sorted by expert, hence by destination device
  sorted_dev = dest_dev[order]
  dev_count = jnp.bincount(dest_dev, length=ep)
  rank = jnp.arange(n) - (jnp.cumsum(dev_count) - dev_count)[sorted_dev]
  keep = rank < capacity
  pos = jnp.where(keep, sorted_dev * capacity + rank, ep * capacity)
  send_x = jnp.zeros((ep * capacity, d), x.dtype).at[pos].set(x[order // k], mode="drop")
  send_e = (
    jnp.full((ep * capacity,), local_e, jnp.int32).at[pos].set(flat_e[order] % local_e, mode="drop")
  )

  if ragged:
    sent = jnp.minimum(dev_count, capacity)
    received = jax.lax.all_to_all(sent, axis, 0, 0, tiled=True)
    a2a = functools.partial(_ragged_exchange, axis=axis, capacity=capacity)
    recv_x = a2a(send_x, jnp.zeros_like(send_x), sent, received)
    recv_e = a2a(send_e, jnp.full_like(send_e, local_e), sent, received)
  else:
    a2a = functools.partial(
      jax.lax.all_to_all, axis_name=axis, split_axis=0, concat_axis=0, tiled=True
    )
    recv_x = a2a(send_x)
    recv_e = a2a(send_e)
  if impl == "dense":
    onehot = jax.nn.one_hot(recv_e, local_e, dtype=x.dtype)
    y = dense_reference(
      recv_x, jnp.minimum(recv_e, local_e - 1)[:, None], onehot.sum(-1, keepdims=True), wg, wu, wd
    )
  else:
    y = expert_ffn(recv_x, recv_e, wg, wu, wd, impl, block)
  back = a2a(y, jnp.zeros_like(y), received, sent) if ragged else a2a(y)
  y_sorted = jnp.take(back, pos, axis=0, mode="fill", fill_value=0)
  y_slots = jnp.zeros((n, d), y_sorted.dtype).at[order].set(y_sorted)
  return combine(y_slots, top_w), n - jnp.sum(keep)


def moe_experts(x, top_idx, top_w, wg, wu, wd, impl: ImplConfig):
  """Expert outputs for x (B, S, D) with routing (B, S, k); returns ((B, S, D), dropped)."""
  resolved = impl.resolved(jax.default_backend())
  path = resolved.moe_impl
  mesh = jax.sharding.get_abstract_mesh()
  b, s, d = x.shape
  k = top_idx.shape[-1]
  if mesh.empty or mesh.size == 1:  # one device: shard_map would add all-reduces to the gradients
    out = local_experts(
      x.reshape(b * s, d),
      top_idx.reshape(-1, k),
      top_w.reshape(-1, k),
      wg,
      wu,
      wd,
      path,
      impl.moe_block_size,
      matmul.use_mkl(impl),
    )
    return out.reshape(b, s, d), jnp.zeros((), jnp.int32)

  batch_spec, seq_spec = nn.logical_to_mesh_axes(("batch", "seq"))
  exp_axes, mlp_axes, token_axes = mesh_axes("exp"), mesh_axes("mlp"), mesh_axes("batch", "seq")
  ep = mesh_shards("exp")
  if ep > 1 and not set(exp_axes) <= set(token_axes):
    raise ValueError(
      f"expert parallelism over {exp_axes} needs those mesh axes to also shard the "
      f"tokens (logical 'batch'/'seq' map to {token_axes})."
    )
  exp_spec = exp_axes or None
  mlp_spec = mlp_axes or None
  tok = P(batch_spec, seq_spec, None)
  w_in, w_out = P(exp_spec, None, mlp_spec), P(exp_spec, mlp_spec, None)
  tokens_per_shard = b * s // mesh_shards("batch", "seq")
  capacity = exchange_capacity(tokens_per_shard * k, ep, impl.moe_capacity_factor)

  def body(x, top_idx, top_w, wg, wu, wd):
    bl, sl, _ = x.shape
    args = (x.reshape(bl * sl, d), top_idx.reshape(-1, k), top_w.reshape(-1, k), wg, wu, wd)
    if ep > 1:
      out, dropped = expert_parallel(
        *args,
        axis=exp_axes,
        ep=ep,
        capacity=capacity,
        impl=path,
        block=impl.moe_block_size,
        ragged=resolved.moe_exchange == "ragged",
      )
    else:
      out, dropped = local_experts(*args, path, impl.moe_block_size), jnp.zeros((), jnp.int32)
    if mlp_axes:
      out = jax.lax.psum(out, mlp_axes)
    if token_axes:
      dropped = jax.lax.psum(dropped, token_axes)
    return out.reshape(bl, sl, d), dropped

  fn = jax.shard_map(
    body,
    mesh=mesh,
    in_specs=(tok, tok, tok, w_in, w_in, w_out),
    out_specs=(tok, P()),
    check_vma=False,
  )
  return fn(x, top_idx, top_w, wg, wu, wd)


class SparseMoeBlock(nn.Module):
  """Router + experts (+ sigmoid-gated shared expert). Returns (out, routing statistics)."""

  cfg: TextConfig
  impl: ImplConfig

  @nn.compact
  def __call__(self, x: jax.Array, token_mask: jax.Array, modality: jax.Array | None = None):
    cfg = self.cfg
    dtype, pdt = dtype_of(self.impl.dtype), dtype_of(self.impl.param_dtype)
    d, e, f = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
    b, s, _ = x.shape
    x32 = x.reshape(b * s, d).astype(jnp.float32)
    if cfg.modality_routers:
      # Ming-Omni's modality-specific routers: one gate per modality (text, image, audio,
      # video) over the shared experts; each token is routed by its modality's gate.
      gates = logical_param(
        self, "modality_gates", (NUM_MODALITIES, d, e), (None, "embed", "router"), pdt
      )
      if modality is None:
        modality = jnp.zeros((b, s), jnp.int32)
      per_gate = jnp.einsum("td,mde->tme", x32, gates.astype(jnp.float32))
      logits = jnp.take_along_axis(per_gate, modality.reshape(-1, 1, 1), axis=1)[:, 0]
    else:
      router = logical_param(self, "gate", (d, e), ("embed", "router"), pdt)
      logits = x32 @ router.astype(jnp.float32)
    wg = logical_param(self, "experts_gate_proj", (e, d, f), ("exp", "embed", "mlp"), pdt)
    wu = logical_param(self, "experts_up_proj", (e, d, f), ("exp", "embed", "mlp"), pdt)
    wd = logical_param(self, "experts_down_proj", (e, f, d), ("exp", "mlp", "embed"), pdt)

    top_w, top_i, probs = route(logits, cfg.num_experts_per_tok, cfg.norm_topk_prob, dtype)
    k = cfg.num_experts_per_tok
    top_w = constrain(top_w.reshape(b, s, k), ("batch", "seq", None))
    top_i = constrain(top_i.reshape(b, s, k), ("batch", "seq", None))
    self.sow("intermediates", "experts", top_i)  # kept only when asked (Model.expert_load)
    out, dropped = moe_experts(
      x, top_i, top_w, wg.astype(dtype), wu.astype(dtype), wd.astype(dtype), self.impl
    )

    if cfg.shared_expert_intermediate_size:
      shared = SwiGLU(cfg.shared_expert_intermediate_size, dtype, pdt, name="shared_expert")(x)
      gate_w = logical_param(self, "shared_expert_gate", (d, 1), ("embed", "router"), pdt)
      out = out + jax.nn.sigmoid(x @ gate_w.astype(dtype)) * shared

    valid = token_mask.reshape(-1).astype(jnp.float32)
    chosen = jax.nn.one_hot(top_i.reshape(-1, k), e, dtype=jnp.float32).sum(1)
    stats = dict(
      counts=jnp.einsum("te,t->e", chosen, valid),
      prob_sum=jnp.einsum("te,t->e", probs, valid),
      tokens=jnp.sum(valid),
      dropped=dropped.astype(jnp.float32),
    )
    return out, stats
