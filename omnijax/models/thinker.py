"""The Thinker: token embedding, MoE decoder with TM-RoPE, untied LM head.

``Thinker.apply(params, input_ids, positions, segment_ids)`` returns float32 logits and the
MoE routing statistics from which the load-balancing loss is computed.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from omnijax.models import tm_rope
from omnijax.models.config import ThinkerConfig
from omnijax.models.decoder import Decoder
from omnijax.models.layers import constrain, dtype_of, logical_param


MODALITIES = ("text", "image", "audio", "video")


class Thinker(nn.Module):
  cfg: ThinkerConfig

  def modality(self, input_ids: jax.Array) -> jax.Array:
    """(B, S) index into MODALITIES from the placeholder tokens (everything else is text)."""
    c = self.cfg
    return jnp.select([input_ids == c.image_token_id, input_ids == c.audio_token_id,
                       input_ids == c.video_token_id], [1, 2, 3], 0).astype(jnp.int32)

  @nn.compact
  def __call__(self, input_ids: jax.Array, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None):
    """input_ids (B, S); positions (3, B, S) TM-RoPE ids (default: text positions per segment);
    segment_ids (B, S), 0 = padding (default: one segment per row)."""
    text, impl = self.cfg.text, self.cfg.impl
    dtype, pdt = dtype_of(impl.dtype), dtype_of(impl.param_dtype)
    if segment_ids is None:
      segment_ids = jnp.ones(input_ids.shape, jnp.int32)
    if positions is None:
      positions = tm_rope.text_positions(segment_ids)

    embed = logical_param(self, "embed_tokens", (text.vocab_size, text.hidden_size),
                          ("vocab", "embed"), pdt)
    h = jnp.take(embed, input_ids, axis=0).astype(dtype)
    h = constrain(h, ("batch", "seq", "act_embed"))
    modality = self.modality(input_ids) if text.modality_routers else None
    h, stats = Decoder(text, impl, name="model")(h, positions, segment_ids, modality)
    lm_head = logical_param(self, "lm_head", (text.hidden_size, text.vocab_size),
                            ("embed", "vocab"), pdt)
    logits = jnp.einsum("bsd,dv->bsv", h, lm_head.astype(dtype),
                        preferred_element_type=jnp.float32)
    return constrain(logits, ("batch", "seq", "act_vocab")), stats
