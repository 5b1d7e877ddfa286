"""The decoder stack shared by the Thinker, the Talker and Code2Wav's pre-transformer: pre-norm
attention + MoE/MLP layers (Code2Wav: dense, with layer scale).

Consecutive layers of one kind (MoE or dense MLP) form a block that is one ``nn.scan`` over
stacked parameters (leading logical axis ``layers``), rematerialised by ``remat_policy``.

With the sequence split over context-parallel shards (``ImplConfig.context_load_balance``), the
stack runs with each row's tokens in zigzag order (``omnijax.models.attention.zigzag``) and
returns them in natural order.

For decoding the stack takes a KV cache (``init_cache``): per block, keys and values stacked on
the same leading layer axis, scanned in and out with the parameters.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from omnijax.models import tm_rope
from omnijax.models.attention import Attention, cache_mask, unzigzag, zigzag
from omnijax.models.config import ImplConfig, TextConfig
from omnijax.models.layers import LayerScale, RMSNorm, SwiGLU, constrain, dtype_of, mesh_shards
from omnijax.models.moe import SparseMoeBlock

_POLICIES = {
  "full": None,
  "dots": jax.checkpoint_policies.checkpoint_dots,
  "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  "qkv_proj": jax.checkpoint_policies.save_only_these_names("query_proj", "key_proj", "value_proj"),
}


class DecoderLayer(nn.Module):
  cfg: TextConfig
  impl: ImplConfig
  moe: bool
  capture: int = -1  # the carry's `captured` takes the output of this many layers
  zigzag: int = 1  # > 1: the tokens are in zigzag order for that many sequence shards

  @nn.compact
  def __call__(self, carry, layer_index, cos, sin, segment_ids, modality, deepstack, kv, kv_mask):
    """`carry` (h, captured): the hidden states and the captured ones (None: no capture);
    `modality` (B,S) selects the router when the config has modality routers; `deepstack`
    (taps, B, S, D) or None is added to the output of layer i < taps (DeepStack); `kv`,
    `kv_mask`: this layer's KV cache or None (see Attention). Returns ((h, captured), (stats, kv))."""
    h, captured = carry
    cfg, pdt = self.cfg, dtype_of(self.impl.param_dtype)
    x = RMSNorm(cfg.rms_norm_eps, pdt, name="input_layernorm")(h)
    y, kv = Attention(cfg, self.impl, self.zigzag, name="self_attn")(
      x, cos, sin, segment_ids, kv, kv_mask
    )
    if cfg.layer_scale_initial_scale:
      y = LayerScale(cfg.layer_scale_initial_scale, pdt, name="self_attn_layer_scale")(y)
    h = h + y
    x = RMSNorm(cfg.rms_norm_eps, pdt, name="post_attention_layernorm")(h)
    if self.moe:
      y, stats = SparseMoeBlock(cfg, self.impl, name="mlp")(x, segment_ids != 0, modality)
    else:
      y, stats = SwiGLU(cfg.intermediate_size, dtype_of(self.impl.dtype), pdt, name="mlp")(x), {}
    if cfg.layer_scale_initial_scale:
      y = LayerScale(cfg.layer_scale_initial_scale, pdt, name="mlp_layer_scale")(y)
    h = h + y
    if deepstack is not None:
      taps = deepstack.shape[0]
      tap = jax.lax.dynamic_index_in_dim(
        deepstack, jnp.minimum(layer_index, taps - 1), 0, keepdims=False
      )
      h = h + jnp.where(layer_index < taps, tap, 0).astype(h.dtype)
    h = constrain(h, ("batch", "seq", "act_embed"))
    if captured is not None:
      captured = jnp.where(layer_index == self.capture - 1, h, captured)
    return (h, captured), (stats, kv)


def _block_name(first: int, count: int) -> str:
  return f"layers_{first}_{first + count}"


def init_cache(cfg: TextConfig, impl: ImplConfig, batch: int, length: int) -> dict:
  """An empty KV cache of `length` slots: the next slot `index`, the `segment_ids` (B, C) of the
  slots (0: unwritten or padding) and per layer block `kv` {"k", "v"} (layers, B, C, KH, D)."""
  shape = (batch, length, cfg.num_key_value_heads, cfg.head_dim)
  kv = {
    _block_name(first, count): {
      n: jnp.zeros((count,) + shape, dtype_of(impl.dtype)) for n in ("k", "v")
    }
    for _, first, count in cfg.layer_blocks()
  }
  return dict(
    index=jnp.zeros((), jnp.int32), segment_ids=jnp.zeros((batch, length), jnp.int32), kv=kv
  )


class Decoder(nn.Module):
  """Layers + final norm. Returns (hidden (B,S,D), moe stats stacked over MoE layers), with a
  `cache` (``init_cache``) the cache with the S tokens written at its index as a further value,
  and with `capture` = k the hidden states after k layers as the last value (transformers'
  ``hidden_states[k]``: 0 the input, k < layers the raw residual stream, k = layers the final
  norm's output)."""

  cfg: TextConfig
  impl: ImplConfig

  def _zigzag_shards(self, seq: int, cache) -> int:
    """Over how many sequence shards the stack holds the tokens in zigzag order (1: natural
    order): steps without a KV cache whose sequence is sharded and divides into two chunks per
    shard, on the attention paths that take the order (not cuDNN's causal flag)."""
    shards = mesh_shards("seq")
    attention = self.impl.resolved(jax.default_backend()).attention
    if (
      not self.impl.context_load_balance
      or cache is not None
      or shards == 1
      or seq % (2 * shards)
      or attention == "cudnn"
    ):
      return 1
    return shards

  @nn.compact
  def __call__(
    self, h, positions, segment_ids, modality=None, deepstack=None, cache=None, capture=None
  ):
    cfg = self.cfg
    if capture is not None and not 0 <= capture <= cfg.num_hidden_layers:
      raise ValueError(f"capture={capture} is not a hidden-state index 0..{cfg.num_hidden_layers}.")
    shards = self._zigzag_shards(h.shape[1], cache)
    if shards > 1:
      h, positions, segment_ids = (
        zigzag(h, shards, 1),
        zigzag(positions, shards, 2),
        zigzag(segment_ids, shards, 1),
      )
      modality = None if modality is None else zigzag(modality, shards, 1)
      deepstack = None if deepstack is None else zigzag(deepstack, shards, 2)
      h = constrain(h, ("batch", "seq", "act_embed"))
    captured = None if capture is None else h
    cos, sin = tm_rope.cos_sin(positions, cfg.head_dim, cfg.rope_theta, cfg.mrope_section)
    kv_mask = new_cache = None
    if cache is not None:
      index = cache["index"]
      cache_segments = jax.lax.dynamic_update_slice(
        cache["segment_ids"], segment_ids.astype(jnp.int32), (0, index)
      )
      kv_mask = (index, cache_mask(segment_ids, cache_segments, index, cfg.sliding_window))
      new_cache = dict(index=index + h.shape[1], segment_ids=cache_segments, kv={})
    stats = []
    for moe, first, count in cfg.layer_blocks():
      name = _block_name(first, count)
      layer = DecoderLayer
      if self.impl.remat_policy != "none":
        layer = nn.remat(layer, policy=_POLICIES[self.impl.remat_policy], prevent_cse=False)
      stack = nn.scan(
        layer,
        variable_axes={"params": 0, "intermediates": 0},
        split_rngs={"params": True},
        in_axes=(0,) + (nn.broadcast,) * 5 + (0, nn.broadcast),
        length=count,
        unroll=min(self.impl.scan_unroll, count),
        metadata_params={nn.PARTITION_NAME: "layers"},
      )
      (h, captured), (block_stats, kv) = stack(
        cfg, self.impl, moe, -1 if capture is None else capture, shards, name=name
      )(
        (h, captured),
        jnp.arange(first, first + count),
        cos,
        sin,
        segment_ids,
        modality,
        deepstack,
        None if cache is None else cache["kv"][name],
        kv_mask,
      )
      if moe:
        stats.append(block_stats)
      if cache is not None:
        new_cache["kv"][name] = kv
    h = RMSNorm(cfg.rms_norm_eps, dtype_of(self.impl.param_dtype), name="norm")(h)
    if shards > 1:
      h = constrain(unzigzag(h, shards, 1), ("batch", "seq", "act_embed"))
      captured = None if captured is None else unzigzag(captured, shards, 1)
    stats = jax.tree.map(lambda *xs: jnp.concatenate(xs), *stats) if stats else {}
    out = (h, stats) if cache is None else (h, stats, new_cache)
    if capture is None:
      return out
    return out + (h if capture == cfg.num_hidden_layers else captured,)


def load_balancing_loss(stats, num_experts: int) -> jax.Array:
  """Pooled over all MoE layers: E * sum_e f_e * P_e (transformers' load_balancing_loss_func).

  f_e: fraction of (token, layer) rows routed to e (counting each of a token's k choices);
  P_e: mean router probability of e; padding tokens excluded.
  """
  if not stats:
    return jnp.zeros((), jnp.float32)
  rows = jnp.maximum(jnp.sum(stats["tokens"]), 1.0)
  f = jnp.sum(stats["counts"], axis=0) / rows
  p = jnp.sum(stats["prob_sum"], axis=0) / rows
  return num_experts * jnp.sum(f * p)
