"""The Thinker: token embedding, audio (AuT) and vision towers, MoE decoder with TM-RoPE,
untied LM head.

``Thinker.apply(params, input_ids, positions, segment_ids, media)`` returns float32 logits and
the MoE routing statistics from which the load-balancing loss is computed.

Media arrive per row (the leading dimension is the batch, so they shard with it): row b's
audio/image/video buffers fill, in order, the placeholder tokens of row b. ``media`` holds
(see ``omnijax.processing.media``):
  audio_features (B, A, mel, T), audio_lengths (B, A)            -> ``<|audio_pad|>`` tokens
  image_{patches,segment_ids,rows,cols,heights,widths} (B, P...)   -> ``<|image_pad|>`` tokens
  video_{...} the same                                             -> ``<|video_pad|>`` tokens
and optionally audio_window, the AuT attention window in seconds (may vary per batch).
Encoder outputs replace the placeholder embeddings; DeepStack features of images and videos
are added to the hidden states at their positions after the first decoder layers.

Decoding (``omnijax.decode``) passes a KV cache (``omnijax.models.decoder.init_cache``): the
tokens are written into it at its index, the logits are those of the last position only and the
updated cache is returned as a third value.
"""

from __future__ import annotations

from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from omnijax.models import matmul, tm_rope
from omnijax.models.audio import AudioEncoder
from omnijax.models.config import ThinkerConfig
from omnijax.models.decoder import Decoder
from omnijax.models.layers import dtype_of, head_logits, logical_param, lookup
from omnijax.processing.vision import PACKED_KEYS
from omnijax.models.vision import VisionEncoder

MODALITIES = ("text", "image", "audio", "video")


def scatter_rows(h: jax.Array, placeholder: jax.Array, tokens: jax.Array) -> jax.Array:
  """Row-wise: the k-th placeholder of row b takes tokens[b, k]. h (B,S,D), tokens (B,N,D)."""
  rank = jnp.clip(jnp.cumsum(placeholder, axis=1) - 1, 0, tokens.shape[1] - 1)
  picked = jnp.take_along_axis(tokens, rank[..., None], axis=1)
  return jnp.where(placeholder[..., None], picked.astype(h.dtype), h)


def compact_rows(tokens: jax.Array, mask: jax.Array) -> jax.Array:
  """Row-wise stable move of the valid tokens (mask) to the front. tokens (B,N,D), mask (B,N)."""
  order = jnp.argsort(~mask, axis=1, stable=True)
  return jnp.take_along_axis(tokens, order[..., None], axis=1)


class Thinker(nn.Module):
  cfg: ThinkerConfig

  def modality(self, input_ids: jax.Array) -> jax.Array:
    """(B, S) index into MODALITIES from the placeholder tokens (everything else is text)."""
    c = self.cfg
    return jnp.select(
      [input_ids == c.image_token_id, input_ids == c.audio_token_id, input_ids == c.video_token_id],
      [1, 2, 3],
      0,
    ).astype(jnp.int32)

  @nn.compact
  def __call__(
    self,
    input_ids: jax.Array,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    media: Mapping[str, jax.Array] | None = None,
    cache: dict | None = None,
    capture: int | None = None,
  ):
    """input_ids (B, S); positions (3, B, S) TM-RoPE ids (default: text positions per segment);
    segment_ids (B, S), 0 = padding (default: one segment per row); media as above; cache: a KV
    cache to decode with (see the module docstring); capture: also return the hidden states
    (B, S, D) after this many decoder layers, as the last value (the Talker reads them)."""
    cfg, text, impl = self.cfg, self.cfg.text, self.cfg.impl
    dtype, pdt = dtype_of(impl.dtype), dtype_of(impl.param_dtype)
    media = dict(media or {})
    if segment_ids is None:
      segment_ids = jnp.ones(input_ids.shape, jnp.int32)
    if positions is None:
      positions = tm_rope.text_positions(segment_ids)

    embed = logical_param(
      self, "embed_tokens", (text.vocab_size, text.hidden_size), ("vocab", "embed"), pdt
    )
    h = lookup(embed, input_ids, dtype)

    if "audio_features" in media:
      feats = media["audio_features"]
      b, a = feats.shape[:2]
      emb, mask = AudioEncoder(cfg.audio, impl, name="audio_tower")(
        feats.reshape((b * a,) + feats.shape[2:]),
        media["audio_lengths"].reshape(b * a),
        media.get("audio_window"),
      )
      tokens = compact_rows(emb.reshape(b, -1, emb.shape[-1]), mask.reshape(b, -1))
      h = scatter_rows(h, input_ids == cfg.audio_token_id, tokens)

    deepstack = None
    visual = VisionEncoder(cfg.vision, impl, name="visual")
    for kind, token_id in (("image", cfg.image_token_id), ("video", cfg.video_token_id)):
      if f"{kind}_patches" not in media:
        continue
      out = visual(*(media[f"{kind}_{f}"] for f in PACKED_KEYS))
      placeholder = input_ids == token_id
      h = scatter_rows(h, placeholder, out.merged)
      if out.deepstack:
        taps = jnp.stack([scatter_rows(jnp.zeros_like(h), placeholder, d) for d in out.deepstack])
        deepstack = taps if deepstack is None else deepstack + taps

    modality = self.modality(input_ids) if text.modality_routers else None
    dec = Decoder(text, impl, name="model")(
      h, positions, segment_ids, modality, deepstack, cache, capture
    )
    h, stats = dec[:2]
    if cache is not None:
      cache = dec[2]
      h = h[:, -1:]
    lm_head = logical_param(
      self, "lm_head", (text.hidden_size, text.vocab_size), ("embed", "vocab"), pdt
    )
    logits = head_logits(h, lm_head, matmul.use_mkl(impl))
    out = (logits, stats) if cache is None else (logits, stats, cache)
    return out if capture is None else out + (dec[-1],)
