"""Autoregressive decoding of the Thinker with a KV cache (`omnijax.load(path).generate`).

A jitted prefill runs the towers and the decoder over the prompt, writing every layer's keys and
values into a preallocated cache (``omnijax.models.decoder.init_cache``), and returns the last
position's logits; a jitted step feeds one token per row at the cache index and picks the next.
A host loop calls the step until every row has produced an EOS id or max_new_tokens is reached.

- Compilation: cache lengths are rounded up to multiples of CACHE_BUCKET, so the step compiles
  once per (batch, cache length, greedy or sampling) across tokens and prompt lengths; the
  prefill once per prompt shape and media buckets (as `Model.logits`).
- Positions (TM-RoPE): the prompt's come from `rope_index`; the i-th generated token of a row gets
  the row's last prompt position + 1 + i on each of the T, H, W rows, as transformers' generate
  (it extends its position ids by last + 1), i.e. its cache slot + a per-row delta.
- Batches are left-padded (`attention_mask` 0s before each row's tokens), as transformers needs;
  padding slots are masked out of attention.
- Sampling (when temperature, top_k or top_p is set; temperature 0 means greedy): temperature,
  then top-k, then top-p (nucleus), as transformers' logits warpers, then a categorical draw
  keyed by (seed, token index).
- Output, as transformers' generate: the prompt followed by the new tokens, (B, S + new); a row
  that produced an EOS id is filled with pad_token_id after it; new < max_new_tokens when every
  row finished earlier.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from omnijax.models import presets
from omnijax.models.config import ThinkerConfig
from omnijax.models.decoder import init_cache
from omnijax.models.thinker import Thinker
from omnijax.processing import positions as positions_lib

CACHE_BUCKET = 128  # cache lengths are multiples of this
EOS_TOKENS = ("<|endoftext|>", "<|im_end|>")
# Their ids in the two token layouts of the presets: the released Qwen3-Omni vocabulary and the
# locally trained tokenizer (data_pipelines.tokenizer.SPECIAL_TOKENS order).
_RELEASED_EOS = (151643, 151645)
_LOCAL_EOS = (0, 2)


def cache_length(prompt_len: int, max_new_tokens: int) -> int:
  """Cache slots for a prompt and its new tokens, rounded up to a multiple of CACHE_BUCKET."""
  return -(-(prompt_len + max_new_tokens) // CACHE_BUCKET) * CACHE_BUCKET


def default_eos_ids(config: ThinkerConfig, tokenizer: Any = None) -> list[int]:
  """The ids of EOS_TOKENS: from the tokenizer (a data_pipelines TextTokenizer) when given, else
  from the config's token layout when it is one of the presets'; [] when unknown."""
  if tokenizer is not None:
    ids = []
    for name in EOS_TOKENS:
      try:
        ids.append(int(tokenizer.token_id(name)))
      except KeyError:
        pass
    return ids
  if positions_lib.TokenIds.from_config(config) == positions_lib.QWEN3_OMNI_TOKENS:
    return list(_RELEASED_EOS)
  if all(getattr(config, k) == v for k, v in presets.LOCAL_TOKEN_IDS.items()):
    return list(_LOCAL_EOS)
  return []


def sampling_settings(temperature, top_k, top_p) -> tuple[bool, tuple[float, int, float]]:
  """Checked sampling settings -> (greedy, (temperature, top_k (0: off), top_p))."""
  if temperature is not None and not (
    isinstance(temperature, (int, float, np.number)) and temperature >= 0
  ):
    raise ValueError(f"temperature must be a number >= 0 (0: greedy), got {temperature!r}.")
  if top_k is not None and not (isinstance(top_k, (int, np.integer)) and top_k >= 1):
    raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}.")
  if top_p is not None and not (isinstance(top_p, (int, float, np.number)) and 0 < top_p <= 1):
    raise ValueError(f"top_p must lie in (0, 1], got {top_p!r}.")
  greedy = temperature == 0 or (temperature is None and top_k is None and top_p is None)
  return greedy, (
    float(1.0 if temperature is None else temperature),
    int(top_k or 0),
    float(1.0 if top_p is None else top_p),
  )


def token_ids(value, name: str, vocab: int) -> list[int]:
  """One token id or a list of them (argument `name`), checked against the vocabulary."""
  ids = [value] if isinstance(value, (int, np.integer)) else list(value)
  if not all(isinstance(i, (int, np.integer)) and 0 <= i < vocab for i in ids):
    raise ValueError(
      f"{name} must be a token id or a list of token ids in [0, {vocab}), got {value!r}."
    )
  return [int(i) for i in ids]


def check_left_padded(seg: np.ndarray) -> None:
  """Raises ValueError unless every row of the attention mask `seg` is 0s then 1s."""
  if not (np.isin(seg, (0, 1)).all() and (np.diff(seg, axis=1) >= 0).all() and seg[:, -1].all()):
    raise ValueError(
      "generate needs a left-padded batch: each row of attention_mask must be 0s "
      "(padding) followed by at least one 1."
    )


def warp(logits: jax.Array, temperature, top_k, top_p) -> jax.Array:
  """transformers' temperature, top-k (0: off) and top-p (1: off) logits warpers, in that order:
  logits (B, V) / temperature, -inf where filtered out."""
  v = logits.shape[-1]
  logits = logits / temperature
  desc = -jnp.sort(-logits, axis=-1)
  k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
  kth = jax.lax.dynamic_index_in_dim(desc, k - 1, axis=1)  # (B, 1); ties with it are kept
  desc = jnp.where(desc >= kth, desc, -jnp.inf)
  probs = jax.nn.softmax(desc, axis=-1)
  # The smallest prefix whose probability reaches top_p (the token crossing it included).
  keep = jnp.cumsum(probs, axis=-1) - probs < top_p
  cut = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
  cut = jnp.where(top_p < 1, cut, -jnp.inf)
  return jnp.where((logits >= kth) & (logits >= cut), logits, -jnp.inf)


def select(
  logits: jax.Array, key: jax.Array, temperature, top_k, top_p, *, greedy: bool
) -> jax.Array:
  """Next token ids (B,) int32 from logits (B, V): the argmax, or a draw from `warp`'s."""
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = warp(logits, temperature, top_k, top_p)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _next(logits, t, done, key, sampling, is_eos, pad, greedy: bool):
  """Token t of every row (pad where done) and the updated done flags; is_eos (V,) bool."""
  token = select(logits, jax.random.fold_in(key, t), *sampling, greedy=greedy)
  token = jnp.where(done, pad, token)
  return token, done | is_eos[token]


first_fn = jax.jit(_next, static_argnames="greedy")


@functools.lru_cache(maxsize=None)
def prefill_fn(config: ThinkerConfig, capture: int | None = None):
  """jit (params, ids, positions, segment_ids, media, cache_len) -> (last logits (B, V), cache),
  and with `capture` = k also the prompt's hidden states (B, S, D) after k layers (the Talker
  reads them; `omnijax.speech`)."""
  model = Thinker(config)

  def prefill(params, ids, positions, segment_ids, media, cache_len):
    cache = init_cache(config.text, config.impl, ids.shape[0], cache_len)
    out = model.apply(
      {"params": params}, ids, positions, segment_ids, media, cache=cache, capture=capture
    )
    return (out[0][:, 0], out[2]) + tuple(out[3:])

  return jax.jit(prefill, static_argnums=5)


@functools.lru_cache(maxsize=None)
def step_fn(config: ThinkerConfig):
  """jit (params, cache, tokens (B,), delta (3, B), done, t, key, sampling, is_eos, pad; greedy)
  -> (next tokens, done, logits (B, V), cache); the cache is donated and updated in place."""
  model = Thinker(config)

  def step(params, cache, tokens, delta, done, t, key, sampling, is_eos, pad, greedy):
    positions = (cache["index"] + delta)[..., None]
    logits, _, cache = model.apply(
      {"params": params}, tokens[:, None], positions, jnp.ones_like(tokens)[:, None], cache=cache
    )
    logits = logits[:, 0]
    tokens, done = _next(logits, t, done, key, sampling, is_eos, pad, greedy)
    return tokens, done, logits, cache

  return jax.jit(step, static_argnames="greedy", donate_argnums=1)


def generate(
  model,
  input_ids,
  max_new_tokens: int = 32,
  *,
  temperature: float | None = None,
  top_k: int | None = None,
  top_p: float | None = None,
  seed: int = 0,
  eos_token_id: int | Sequence[int] | None = None,
  pad_token_id: int | None = None,
  return_logits: bool = False,
  **multimodal,
):
  """`omnijax.api.Model.generate` (see the module docstring). Returns int64 numpy (B, S + new),
  and with return_logits also the float32 logits (B, new, V) each new token was chosen from."""
  cfg = model.config
  vocab = cfg.text.vocab_size
  if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}.")
  greedy, sampling = sampling_settings(temperature, top_k, top_p)
  if not isinstance(seed, (int, np.integer)):
    raise ValueError(f"seed must be an integer, got {seed!r}.")
  if eos_token_id is None:
    eos = default_eos_ids(cfg, model.tokenizer)
  else:
    eos = token_ids(eos_token_id, "eos_token_id", vocab)
  pad = None
  if pad_token_id is not None:
    if not isinstance(pad_token_id, (int, np.integer)):
      raise ValueError(f"pad_token_id must be one token id, got {pad_token_id!r}.")
    (pad,) = token_ids(pad_token_id, "pad_token_id", vocab)

  ids, positions, seg, media = model._prepare(input_ids, None, multimodal)
  return decode(
    cfg,
    model.params,
    ids,
    positions,
    seg,
    media,
    max_new_tokens,
    eos_ids=eos,
    pad_id=pad,
    greedy=greedy,
    sampling=sampling,
    seed=seed,
    return_logits=return_logits,
  )


def decode(
  config: ThinkerConfig,
  params,
  ids: np.ndarray,
  positions: np.ndarray,
  seg,
  media,
  max_new_tokens: int,
  *,
  eos_ids: Sequence[int],
  pad_id: int | None = None,
  greedy: bool = True,
  sampling=(1.0, 0, 1.0),
  seed: int = 0,
  return_logits: bool = False,
):
  """The decoding loop on prepared inputs (as `Thinker` takes them): ids (B, S) left-padded,
  positions (3, B, S), seg (B, S) 1 on tokens / 0 on padding (None: no padding), media buffers.
  Returns the prompt followed by the new tokens, (B, S + new) int64 (see `generate`)."""
  cfg, vocab = config, config.text.vocab_size
  eos = list(eos_ids)
  pad = (eos[0] if eos else 0) if pad_id is None else pad_id
  b, s = ids.shape
  if seg is None:
    seg = np.ones((b, s), np.int32)
  check_left_padded(seg)
  # Each row continues from its last prompt position (a real token under left padding).
  delta = jnp.asarray(positions[:, :, -1] + 1 - s, jnp.float32)
  logits, cache = prefill_fn(cfg)(
    params,
    jnp.asarray(ids, jnp.int32),
    jnp.asarray(positions, jnp.float32),
    jnp.asarray(seg),
    media,
    cache_length(s, max_new_tokens),
  )
  key = jax.random.key(seed)
  sampling = tuple(jnp.asarray(x) for x in sampling)
  is_eos = jnp.zeros((vocab,), bool).at[jnp.asarray(eos, jnp.int32)].set(True)
  pad = jnp.asarray(pad, jnp.int32)
  token, done = first_fn(
    logits, 0, jnp.zeros((b,), bool), key, sampling, is_eos, pad, greedy=greedy
  )
  tokens = [token]
  all_logits = [logits] if return_logits else None
  step = step_fn(cfg)
  for t in range(1, max_new_tokens):
    # Dispatch step t before waiting for step t-1's flags, so the host check overlaps it.
    finished = done
    token, done, logits, cache = step(
      params, cache, token, delta, done, t, key, sampling, is_eos, pad, greedy=greedy
    )
    if bool(finished.all()):
      break
    tokens.append(token)
    if return_logits:
      all_logits.append(logits)
  out = np.concatenate([ids.astype(np.int64), np.stack(jax.device_get(tokens), 1)], axis=1)
  if return_logits:
    return out, np.stack(jax.device_get(all_logits), 1).astype(np.float32)
  return out
