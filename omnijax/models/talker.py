"""The Talker: a MoE decoder over 12.5 Hz codec frames that follows the Thinker, and its MTP
code predictor (transformers' ``Qwen3OmniMoeTalkerForConditionalGeneration``).

One Talker position carries the sum of two streams (``Talker.inputs``):
- text: ``text_projection`` of the Thinker's token embedding, or at multimodal placeholder
  positions ``hidden_projection`` of the Thinker's hidden state after ``accept_hidden_layer``
  layers (both Linear-SiLU-Linear from the Thinker's width);
- codec: the sum over the frame's codebooks k of E_k(code_k) (E_0 = ``codec_embedding``, the
  Talker vocabulary of codebook 0 and the special codec ids; E_k = the predictor's table k-1);
  id -1 adds nothing.
``omnijax.processing.talker`` lays conversations out this way (user turns, the 9-slot
assistant
prefix, one position per frame). The decoder (the Thinker's layers: q/k norm, interleaved
M-RoPE, MoE with a sigmoid-gated shared expert) and ``codec_head`` predict codebook 0 of the
next frame.

The code predictor (MTP) fills codebooks 1..G of a frame from the sequence
[Talker hidden h, E_0(c_0), E_1(c_1), ..., E_{G-1}(c_{G-1})] at positions 0..G (plain RoPE):
the output at position g predicts c_g with head g-1. Training runs every frame as one such
sequence (``CodePredictor.__call__``); decoding fills a G+1 slot cache (``CodePredictor.step``).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from omnijax.models import matmul
from omnijax.models.config import ImplConfig, TalkerConfig
from omnijax.models.decoder import Decoder
from omnijax.models.layers import (
  Dense,
  constrain,
  dtype_of,
  head_logits,
  logical_param,
  lookup,
  rows,
)


def sequence_positions(length: int, batch: int, offset=0) -> jax.Array:
  """(3, B, S) M-RoPE ids offset, offset + 1, ...: plain 1-D RoPE on all three rows."""
  pos = (jnp.arange(length) + offset).astype(jnp.float32)
  return jnp.broadcast_to(pos, (3, batch, length))


class ResizeMLP(nn.Module):
  """text_projection / hidden_projection: Thinker width -> Talker width, Linear-SiLU-Linear."""

  cfg: TalkerConfig
  impl: ImplConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c, dtype, pdt = self.cfg, dtype_of(self.impl.dtype), dtype_of(self.impl.param_dtype)
    mid, out = c.text.intermediate_size, c.text.hidden_size
    x = Dense((c.thinker_hidden_size,), (mid,), ("embed", "mlp"), dtype, pdt, name="linear_fc1")(x)
    return Dense((mid,), (out,), ("mlp", "embed"), dtype, pdt, name="linear_fc2")(jax.nn.silu(x))


class CodePredictor(nn.Module):
  """The MTP: a dense decoder with one embedding table and one head per codebook 1..G."""

  cfg: TalkerConfig
  impl: ImplConfig

  def setup(self):
    p, pdt = self.cfg.code_predictor, dtype_of(self.impl.param_dtype)
    groups = self.cfg.num_code_groups - 1
    self.codec_embedding = logical_param(
      self,
      "codec_embedding",
      (groups, p.vocab_size, p.hidden_size),
      ("codebook", "vocab", "embed"),
      pdt,
    )
    self.model = Decoder(p, self.impl)
    self.lm_head = logical_param(
      self, "lm_head", (groups, p.hidden_size, p.vocab_size), ("codebook", "embed", "vocab"), pdt
    )

  def embed(self, codes: jax.Array, first: int = 1) -> jax.Array:
    """E_k(codes[..., j]) with k = first + j: codes (..., n) -> (..., n, D)."""
    n = codes.shape[-1]
    table = self.codec_embedding[first - 1 : first - 1 + n]
    return lookup(table, codes, dtype_of(self.impl.dtype), codebook=jnp.arange(n))

  def __call__(self, h: jax.Array, c0_embed: jax.Array, codes: jax.Array) -> jax.Array:
    """Teacher-forced logits of codebooks 1..G: h, c0_embed (N, D); codes (N, G) the frame's
    codebooks 1..G (the last one is only a target). Returns float32 (N, G, vocab)."""
    x = jnp.concatenate([h[:, None], c0_embed[:, None], self.embed(codes[:, :-1])], axis=1)
    x = constrain(x.astype(dtype_of(self.impl.dtype)), ("batch", "seq", "act_embed"))
    n, s = x.shape[:2]
    y, _ = self.model(x, sequence_positions(s, n), jnp.ones((n, s), jnp.int32))
    head = self.lm_head.astype(y.dtype)
    return jnp.einsum("ngd,gdv->ngv", y[:, 1:], head, preferred_element_type=jnp.float32)

  def step(self, x: jax.Array, cache: dict):
    """Decoding: x (B, S, D) input embeddings at the cache index (S = 2 for [h, E_0(c_0)], then
    S = 1 for E_g(c_g)); returns the float32 logits (B, vocab) of the next codebook, with head
    (new cache index - 2), and the cache."""
    b, s = x.shape[:2]
    positions = sequence_positions(s, b, cache["index"])
    y, _, cache = self.model(x, positions, jnp.ones((b, s), jnp.int32), cache=cache)
    head = jax.lax.dynamic_index_in_dim(self.lm_head, cache["index"] - 2, 0, keepdims=False)
    logits = jnp.einsum(
      "bd,dv->bv", y[:, -1], head.astype(y.dtype), preferred_element_type=jnp.float32
    )
    return logits, cache


class Talker(nn.Module):
  cfg: TalkerConfig
  impl: ImplConfig

  def setup(self):
    t, pdt = self.cfg.text, dtype_of(self.impl.param_dtype)
    self.codec_embedding = logical_param(
      self, "codec_embedding", (t.vocab_size, t.hidden_size), ("vocab", "embed"), pdt
    )
    self.model = Decoder(t, self.impl)
    self.codec_head = logical_param(
      self, "codec_head", (t.hidden_size, t.vocab_size), ("embed", "vocab"), pdt
    )
    self.text_projection = ResizeMLP(self.cfg, self.impl)
    self.hidden_projection = ResizeMLP(self.cfg, self.impl)
    self.code_predictor = CodePredictor(self.cfg, self.impl)

  def embed_codes(self, codec_ids: jax.Array) -> jax.Array:
    """The codec stream: codec_ids (..., n <= G + 1) with column k codebook k (-1: none) ->
    the sum over k of E_k(codec_ids[..., k]), (..., D)."""
    dtype = dtype_of(self.impl.dtype)
    valid = codec_ids >= 0
    ids = jnp.where(valid, codec_ids, 0)
    out = jnp.where(valid[..., :1], lookup(self.codec_embedding, ids[..., 0], dtype), 0)
    if codec_ids.shape[-1] > 1:
      rest = self.code_predictor.embed(ids[..., 1:])
      out = out + jnp.sum(jnp.where(valid[..., 1:, None], rest, 0), axis=-2)
    return out

  def inputs(self, text_embeds, mm_hidden, mm_mask, codec_ids) -> jax.Array:
    """Talker input embeddings (B, L, D): text_embeds (B, L, Dt) the Thinker's token
    embeddings of the text stream ids; mm_hidden (B, L, Dt) the Thinker's hidden states used
    where mm_mask (B, L) is set; codec_ids (B, L, n) as in embed_codes."""
    text = self.text_projection(text_embeds)
    if mm_hidden is not None:
      text = jnp.where(mm_mask[..., None], self.hidden_projection(mm_hidden), text)
    x = text + self.embed_codes(codec_ids)
    return constrain(x, ("batch", "seq", "act_embed"))

  def decode(self, x, positions, segment_ids, cache=None):
    """The decoder and codec head: x (B, S, D) -> (final-norm hidden (B, S, D), float32
    codebook-0 logits (B, S, V), MoE stats), and with a cache the updated cache."""
    out = self.model(x, positions, segment_ids, cache=cache)
    h = out[0]
    logits = head_logits(h, self.codec_head, matmul.use_mkl(self.impl))
    return (h, logits) + tuple(out[1:])

  def __call__(
    self,
    text_embeds,
    mm_hidden,
    mm_mask,
    codec_ids,
    positions,
    segment_ids,
    mtp_index,
    mtp_codes,
  ):
    """Teacher-forced training forward: the inputs of `inputs`, positions (3, B, L),
    segment_ids (B, L); mtp_index (B, M) the Talker positions whose hidden state conditions
    an MTP sequence (any index where unused) and mtp_codes (B, M, G + 1) that frame's codes.
    Returns (codebook-0 logits (B, L, V), MTP logits (B, M, G, codebook), MoE stats)."""
    x = self.inputs(text_embeds, mm_hidden, mm_mask, codec_ids)
    h, logits, stats = self.decode(x, positions, segment_ids)
    b, m = mtp_index.shape
    h_mtp = jnp.take_along_axis(h, mtp_index[..., None], axis=1).reshape(b * m, -1)
    codes = jnp.maximum(mtp_codes, 0).reshape(b * m, -1)
    c0 = lookup(self.codec_embedding, codes[:, 0], h.dtype)
    h_mtp = rows(h_mtp)
    mtp_logits = self.code_predictor(h_mtp, c0, codes[:, 1:])
    return logits, mtp_logits.reshape(b, m, *mtp_logits.shape[1:]), stats
