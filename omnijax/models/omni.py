"""The whole speaking model for training: the Thinker and the Talker that follows it.

``Omni.apply(params, batch)`` runs the Thinker over the conversation rows and the Talker over
their Talker rows (``omnijax.processing.talker`` lays one conversation out as both): the Talker's
text stream reads the Thinker's token embedding table and, at multimodal positions, the
Thinker's hidden states after ``accept_hidden_layer`` layers of the same row. With
``freeze_thinker`` neither reaches the Thinker's gradients (Talker pretraining with a frozen
Thinker, whose hidden states are computed in the same step).

Talker batch entries (per row b, Talker positions L, MTP rows M):
  talker_text_ids (B, L)       Thinker-vocabulary ids of the text stream
  talker_thinker_index (B, L)  index into the Thinker row whose hidden state replaces the text
                               stream there (-1: none)
  talker_codec_ids (B, L, G)   the codec stream (-1: none)
  talker_positions (B, 3, L)   M-RoPE ids;  talker_segment_ids (B, L), 0 = padding
  talker_labels (B, L)         codebook-0 targets (-1: none)
  talker_mtp_index (B, M)      Talker positions whose hidden state conditions an MTP sequence
  talker_mtp_codes (B, M, G)   that frame's G codes (-1: unused row)
"""

from __future__ import annotations

from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from omnijax.models.config import TalkerConfig, ThinkerConfig
from omnijax.models.layers import lookup, rows
from omnijax.models.talker import Talker
from omnijax.models.thinker import Thinker

TALKER_KEYS = (
  "talker_text_ids",
  "talker_thinker_index",
  "talker_codec_ids",
  "talker_positions",
  "talker_segment_ids",
  "talker_labels",
  "talker_mtp_index",
  "talker_mtp_codes",
)


class Omni(nn.Module):
  cfg: ThinkerConfig
  talker_cfg: TalkerConfig
  freeze_thinker: bool = False

  def setup(self):
    self.thinker = Thinker(self.cfg)
    self.talker = Talker(self.talker_cfg, self.cfg.impl)

  def modality(self, input_ids: jax.Array) -> jax.Array:
    """The Thinker's modality of each token (`Thinker.modality`)."""
    return Thinker(self.cfg, parent=None).modality(input_ids)

  def __call__(
    self,
    input_ids,
    positions=None,
    segment_ids=None,
    media: Mapping[str, jax.Array] | None = None,
    talker_batch: Mapping[str, jax.Array] | None = None,
  ):
    """Returns (Thinker logits, Thinker MoE stats, Talker codebook-0 logits (B, L, V), MTP
    logits (B, M, G - 1, codebook), Talker MoE stats)."""
    t = talker_batch
    logits, stats, hidden = self.thinker(
      input_ids, positions, segment_ids, media, capture=self.talker_cfg.accept_hidden_layer
    )
    table = nn.meta.unbox(self.thinker.variables["params"]["embed_tokens"])
    text_embeds = lookup(table, t["talker_text_ids"], hidden.dtype)
    index = t["talker_thinker_index"]
    mm_hidden = rows(jnp.take_along_axis(hidden, jnp.maximum(index, 0)[..., None], axis=1))
    if self.freeze_thinker:
      text_embeds, mm_hidden = jax.lax.stop_gradient((text_embeds, mm_hidden))
    talker_logits, mtp_logits, talker_stats = self.talker(
      text_embeds,
      mm_hidden,
      index >= 0,
      t["talker_codec_ids"],
      jnp.swapaxes(t["talker_positions"], 0, 1),
      t["talker_segment_ids"],
      t["talker_mtp_index"],
      t["talker_mtp_codes"],
    )
    return logits, stats, talker_logits, mtp_logits, talker_stats
