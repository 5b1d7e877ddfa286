"""The decoder stack shared by the Thinker and the Talker: pre-norm attention + MoE/MLP layers.

Consecutive layers of one kind (MoE or dense MLP) form a block that is one ``nn.scan`` over
stacked parameters (leading logical axis ``layers``), rematerialised by ``remat_policy``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from omnijax.models import tm_rope
from omnijax.models.attention import Attention
from omnijax.models.config import ImplConfig, TextConfig
from omnijax.models.layers import RMSNorm, SwiGLU, constrain, dtype_of
from omnijax.models.moe import SparseMoeBlock

_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "qkv_proj": jax.checkpoint_policies.save_only_these_names("query_proj", "key_proj",
                                                              "value_proj"),
}


class DecoderLayer(nn.Module):
  cfg: TextConfig
  impl: ImplConfig
  moe: bool

  @nn.compact
  def __call__(self, h, layer_index, cos, sin, segment_ids, modality, deepstack):
    """`modality` (B,S) selects the router when the config has modality routers; `deepstack`
    (taps, B, S, D) or None is added to the output of layer i < taps (DeepStack)."""
    cfg, pdt = self.cfg, dtype_of(self.impl.param_dtype)
    x = RMSNorm(cfg.rms_norm_eps, pdt, name="input_layernorm")(h)
    h = h + Attention(cfg, self.impl, name="self_attn")(x, cos, sin, segment_ids)
    x = RMSNorm(cfg.rms_norm_eps, pdt, name="post_attention_layernorm")(h)
    if self.moe:
      y, stats = SparseMoeBlock(cfg, self.impl, name="mlp")(x, segment_ids != 0, modality)
    else:
      y, stats = SwiGLU(cfg.intermediate_size, dtype_of(self.impl.dtype), pdt, name="mlp")(x), {}
    h = h + y
    if deepstack is not None:
      taps = deepstack.shape[0]
      tap = jax.lax.dynamic_index_in_dim(deepstack, jnp.minimum(layer_index, taps - 1), 0,
                                         keepdims=False)
      h = h + jnp.where(layer_index < taps, tap, 0).astype(h.dtype)
    return constrain(h, ("batch", "seq", "act_embed")), stats


class Decoder(nn.Module):
  """Layers + final norm. Returns (hidden (B,S,D), moe stats stacked over MoE layers)."""

  cfg: TextConfig
  impl: ImplConfig

  @nn.compact
  def __call__(self, h, positions, segment_ids, modality=None, deepstack=None):
    cfg = self.cfg
    cos, sin = tm_rope.cos_sin(positions, cfg.head_dim, cfg.rope_theta, cfg.mrope_section)
    stats = []
    for moe, first, count in cfg.layer_blocks():
      layer = DecoderLayer
      if self.impl.remat_policy != "none":
        layer = nn.remat(layer, policy=_POLICIES[self.impl.remat_policy], prevent_cse=False)
      stack = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True},
                      in_axes=(0,) + (nn.broadcast,) * 5, length=count,
                      metadata_params={nn.PARTITION_NAME: "layers"})
      h, block_stats = stack(cfg, self.impl, moe, name=f"layers_{first}_{first + count}")(
          h, jnp.arange(first, first + count), cos, sin, segment_ids, modality, deepstack)
      if moe:
        stats.append(block_stats)
    h = RMSNorm(cfg.rms_norm_eps, dtype_of(self.impl.param_dtype), name="norm")(h)
    stats = jax.tree.map(lambda *xs: jnp.concatenate(xs), *stats) if stats else {}
    return h, stats


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
