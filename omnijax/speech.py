"""Speech output: Thinker text -> Talker codec frames -> Code2Wav waveform, as transformers'
``Qwen3OmniMoeForConditionalGeneration.generate(return_audio=True)`` (`Model.generate`), and
streamed (`Model.generate_stream`).

- Thinker: KV-cache decoding (``omnijax.decode``); its prefill also captures the prompt's hidden
  states after ``accept_hidden_layer`` layers, which the Talker reads at the user turns'
  audio/image/video placeholders.
- Talker prefix: every user position of the prompt and the 9 assistant slots
  (``omnijax.processing.talker.talker_example``, the layout it is trained on); slot 8 carries
  the first spoken text token, the token after ``<|im_start|>assistant\\n``.
- Talker steps, one 16-code frame each, in one jitted function: the MTP expands codebook 0 of
  frame f into codebooks 1..15 (a ``fori_loop`` over codebooks on a 16-slot cache), the Talker
  reads the sum of the frame's 16 code embeddings plus the trailing text (spoken token f + 1,
  then ``tts_eos``, then ``tts_pad``) and picks codebook 0 of frame f + 1: repetition penalty
  over the codebook-0 ids generated so far, ids [codebook_size, vocab) except codec EOS
  suppressed (transformers suppresses the top 1024 ids; the same set for the released 3072
  vocabulary), then greedy or temperature / top-k / top-p sampling. The MTP samples with top-k
  50 / top-p 0.8 when the Talker samples and is greedy when it is greedy. Codec EOS, or
  talker_max_new_tokens codebook-0 ids (the last one never becomes a frame), ends a row.
- Interleaving: the Talker needs spoken token f + 1 (and whether it is the Thinker's last) for
  frame f, so the host loop alternates one Talker step with one Thinker step and the Thinker
  stays ahead; once it has finished the Talker runs alone. Streaming hands each frame to
  ``Code2WavStreamer`` (exact: its chunks concatenate to one full decode); the non-streamed
  waveform goes through the same streamer in chunks of VOCODER_CHUNK_FRAMES, so neither path
  compiles per output length.
- Sampling draws are keyed by (seed, token or frame, codebook index), so a seed reproduces a
  generation, streamed or not.

Batches are left-padded as for text generation. As transformers: rows stop at their own codec
EOS and the batch runs until every row has; a row whose text ended before the longest one gets
``tts_eos`` right after its EOS token. Unlike transformers (where the first row decides), each
row's assistant header is found in that row. Waveforms are (B, samples), zero after a row's
1920 * frames - 555 samples. Code2Wav decodes exactly (as one full decode); transformers'
``chunked_decode`` equals that up to 300 frames and beyond drops 555 samples per 300-frame
chunk and uses 25 frames of left context.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from omnijax import decode
from omnijax.models import code2wav as code2wav_lib
from omnijax.models.config import ImplConfig, TalkerConfig
from omnijax.models.decoder import init_cache
from omnijax.models.layers import dtype_of, lookup
from omnijax.models.talker import Talker
from omnijax.processing import talker as layout_lib

VOCODER_CHUNK_FRAMES = 32  # frames per Code2Wav call of the non-streamed waveform
MTP_SAMPLING = (1.0, 50, 0.8)  # temperature, top-k, top-p of the code predictor when sampling
# Text-generation arguments that take transformers' thinker_ prefix with return_audio.
_THINKER_ALIASES = ("temperature", "top_k", "top_p", "eos_token_id")


@dataclasses.dataclass(frozen=True)
class _Request:
  """Checked arguments of one speech generation."""

  ids: np.ndarray  # (B, S) left-padded prompt
  positions: np.ndarray  # (3, B, S)
  seg: np.ndarray  # (B, S) 1 on tokens, 0 on padding
  media: Any
  thinker_max_new_tokens: int
  thinker_eos: tuple[int, ...]
  thinker_greedy: bool
  thinker_sampling: tuple[float, int, float]
  talker_max_new_tokens: int
  talker_greedy: bool
  talker_sampling: tuple[float, int, float]
  repetition_penalty: float
  seed: int
  prefix: "_Prefix"


def _sampling(prefix: str, temperature, top_k, top_p) -> tuple[bool, tuple[float, int, float]]:
  """`decode.sampling_settings` with the arguments' prefix in its errors."""
  try:
    return decode.sampling_settings(temperature, top_k, top_p)
  except ValueError as e:
    raise ValueError(f"{prefix}{e}") from None


def _positive_int(value, name: str) -> int:
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
    raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
  return int(value)


def _request(
  model,
  input_ids,
  *,
  speaker: str = "Ethan",
  thinker_max_new_tokens: int = 1024,
  thinker_do_sample: bool = False,
  thinker_temperature: float | None = None,
  thinker_top_k: int | None = None,
  thinker_top_p: float | None = None,
  thinker_eos_token_id=None,
  talker_max_new_tokens: int = 4096,
  talker_do_sample: bool = True,
  talker_top_k: int | None = 50,
  talker_top_p: float | None = 1.0,
  talker_temperature: float = 0.9,
  talker_repetition_penalty: float = 1.05,
  seed: int = 0,
  **multimodal,
) -> _Request:
  """The checked arguments of `Model.generate(return_audio=True)` (see `omnijax.api`)."""
  if model.talker_config is None:
    raise ValueError(
      "return_audio needs a Talker, and this model has none: load a transformers directory "
      "with talker.* tensors (a released Qwen3-Omni checkpoint, or `python -m omnijax.export "
      "to-hf` of a workdir with a Talker) or an omnijax workdir with talker.json."
    )
  if model.code2wav_config is None:
    raise ValueError(
      "return_audio needs a Code2Wav vocoder, and this model has none: load a transformers "
      "directory with code2wav.* tensors (a released Qwen3-Omni checkpoint, or `python -m "
      "omnijax.export to-hf --code2wav=CODEC_RUN`) or a workdir with a code2wav/."
    )
  aliases = sorted(set(multimodal) & set(_THINKER_ALIASES))
  if aliases:
    raise ValueError(
      f"with return_audio the Thinker's settings take transformers' thinker_ prefix: "
      f"{', '.join(f'thinker_{a}' for a in aliases)} instead of {', '.join(aliases)}."
    )
  cfg, tcfg = model.config, model.talker_config
  speakers = tcfg.speakers()
  if not isinstance(speaker, str) or speaker.lower() not in speakers:
    raise ValueError(f"unknown speaker {speaker!r}; this Talker has {sorted(speakers)}.")
  if not isinstance(seed, (int, np.integer)):
    raise ValueError(f"seed must be an integer, got {seed!r}.")

  if thinker_do_sample:
    thinker_greedy, thinker_sampling = _sampling(
      "thinker_",
      1.0 if thinker_temperature is None else thinker_temperature,
      thinker_top_k,
      thinker_top_p,
    )
  else:
    given = [
      n
      for n, v in (
        ("thinker_temperature", thinker_temperature),
        ("thinker_top_k", thinker_top_k),
        ("thinker_top_p", thinker_top_p),
      )
      if v is not None
    ]
    if given:
      raise ValueError(f"{', '.join(given)} only apply with thinker_do_sample=True.")
    thinker_greedy, thinker_sampling = True, (1.0, 0, 1.0)
  vocab = cfg.text.vocab_size
  eos = tcfg.im_end_token_id if thinker_eos_token_id is None else thinker_eos_token_id
  eos = tuple(decode.token_ids(eos, "thinker_eos_token_id", vocab))

  if talker_do_sample:
    if not (isinstance(talker_temperature, (int, float, np.number)) and talker_temperature > 0):
      raise ValueError(f"talker_temperature must be > 0, got {talker_temperature!r}.")
    talker_greedy, talker_sampling = _sampling(
      "talker_", talker_temperature, talker_top_k, talker_top_p
    )
  else:
    talker_greedy, talker_sampling = True, (1.0, 0, 1.0)
  penalty = talker_repetition_penalty
  if not (isinstance(penalty, (int, float, np.number)) and penalty > 0):
    raise ValueError(f"talker_repetition_penalty must be > 0, got {penalty!r}.")

  ids, positions, seg, media = model._prepare(input_ids, None, multimodal)
  if seg is None:
    seg = np.ones(ids.shape, np.int32)
  decode.check_left_padded(seg)
  grids = {
    k: None if multimodal.get(k) is None else np.asarray(multimodal[k])
    for k in ("image_grid_thw", "video_grid_thw", "video_second_per_grid")
  }
  speaker_id = speakers[speaker.lower()]
  return _Request(
    ids=ids,
    positions=positions,
    seg=seg,
    media=media,
    thinker_max_new_tokens=_positive_int(thinker_max_new_tokens, "thinker_max_new_tokens"),
    thinker_eos=eos,
    thinker_greedy=thinker_greedy,
    thinker_sampling=thinker_sampling,
    talker_max_new_tokens=_positive_int(talker_max_new_tokens, "talker_max_new_tokens"),
    talker_greedy=talker_greedy,
    talker_sampling=talker_sampling,
    repetition_penalty=float(penalty),
    seed=int(seed),
    prefix=_prefix(model, ids, seg, grids, speaker_id),
  )


# ---- the Talker prefix ------------------------------------------------------------------------


@dataclasses.dataclass
class _Prefix:
  """The Talker's prefill inputs, rows left-padded to a common length L."""

  text_ids: np.ndarray  # (B, L) Thinker-vocabulary ids of the text stream
  thinker_index: np.ndarray  # (B, L) prompt position whose captured hidden state is read, or -1
  codec_ids: np.ndarray  # (B, L, G)
  positions: np.ndarray  # (3, B, L)
  seg: np.ndarray  # (B, L)
  delta: np.ndarray  # (B,) a frame's M-RoPE id = its cache slot + delta
  prompts: list[np.ndarray]  # the unpadded prompt rows
  first_spoken: np.ndarray  # (B,) index in (prompt + generated) of the token in slot 8


def _row_grids(prompts, grids, cfg) -> list[dict[str, Any]]:
  """Each row's image/video grids: the processor lists a batch's vision items row by row."""
  images, videos, seconds = (
    grids["image_grid_thw"],
    grids["video_grid_thw"],
    grids["video_second_per_grid"],
  )
  images = None if images is None else images.reshape(-1, 3)
  videos = None if videos is None else videos.reshape(-1, 3)
  seconds = None if seconds is None else seconds.ravel()
  out, i, v = [], 0, 0
  for p in prompts:
    kinds = p[1:][p[:-1] == cfg.vision_start_token_id]
    n_img = int((kinds == cfg.image_token_id).sum())
    n_vid = int(np.isin(kinds, [cfg.video_token_id, cfg.audio_start_token_id]).sum())
    out.append(
      dict(
        image_grid_thw=None if images is None else images[i : i + n_img],
        video_grid_thw=None if videos is None else videos[v : v + n_vid],
        video_second_per_grid=None if seconds is None else seconds[v : v + n_vid],
      )
    )
    i, v = i + n_img, v + n_vid
  return out


def _prefix(model, ids, seg, grids, speaker_id: int) -> _Prefix:
  """The Talker prefix of left-padded prompts ids, seg (B, S) with their vision grids."""
  cfg, tcfg = model.config, model.talker_config
  tok = layout_lib.TalkerTokenIds.from_configs(cfg, tcfg)
  pads = (seg == 0).sum(1)
  prompts = [ids[b, pad:] for b, pad in enumerate(pads)]
  rows, first_spoken = [], []
  for b, (p, row_grids) in enumerate(zip(prompts, _row_grids(prompts, grids, cfg))):
    starts = np.flatnonzero((p[:-1] == tok.im_start) & (p[1:] == tok.assistant))
    if not len(starts) or starts[-1] + 3 > len(p):
      raise ValueError(
        f"return_audio: row {b} of input_ids must end with an assistant turn header "
        f"(<|im_start|> assistant \\n, ids {tok.im_start} {tok.assistant} ...) whose answer the "
        "Talker speaks."
      )
    a = int(starts[-1])
    # The layout of the prompt up to the header and one frame; slot 8's text is set later.
    seq = np.concatenate([p[: a + 3], [tok.tts_pad, tok.tts_pad]])
    layout = layout_lib.talker_example(
      seq,
      np.zeros((tcfg.num_code_groups, 1), np.int32),
      speaker_id,
      tok,
      spatial_merge_size=tcfg.spatial_merge_size,
      position_id_per_seconds=cfg.position_id_per_seconds,
      codebook_size=tcfg.codebook_size,
      **row_grids,
    )
    rows.append({k: v[..., :-1] if k == "positions" else v[:-1] for k, v in layout.items()})
    first_spoken.append(a + 3)
  n = max(len(r["text_ids"]) for r in rows)
  b, groups = len(rows), tcfg.num_code_groups
  out = _Prefix(
    text_ids=np.full((b, n), tok.tts_pad, np.int32),
    thinker_index=np.full((b, n), -1, np.int32),
    codec_ids=np.full((b, n, groups), -1, np.int32),
    positions=np.zeros((3, b, n), np.float32),
    seg=np.zeros((b, n), np.int32),
    delta=np.zeros(b, np.float32),
    prompts=prompts,
    first_spoken=np.asarray(first_spoken),
  )
  for i, r in enumerate(rows):
    m = len(r["text_ids"])
    out.text_ids[i, n - m :] = r["text_ids"]
    out.thinker_index[i, n - m :] = np.where(
      r["thinker_index"] >= 0, r["thinker_index"] + pads[i], -1
    )
    out.codec_ids[i, n - m :] = r["codec_ids"]
    out.positions[:, i, n - m :] = r["positions"]
    out.seg[i, n - m :] = 1
    out.delta[i] = r["positions"].max() + 1 - n
  return out


# ---- jitted Talker prefill and step -----------------------------------------------------------


def _pick(logits, seen, done, key, sampling, penalty, suppress, eos, greedy):
  """transformers' Talker logits processors (repetition penalty over `seen`, suppressed ids)
  and choice; finished rows keep emitting EOS. Returns (tokens, seen, done)."""
  penalized = jnp.where(logits < 0, logits * penalty, logits / penalty)
  logits = jnp.where(suppress, -jnp.inf, jnp.where(seen, penalized, logits))
  token = decode.select(logits, key, *sampling, greedy=greedy)
  token = jnp.where(done, eos, token)
  seen = seen.at[jnp.arange(token.shape[0]), token].set(True)
  return token, seen, done | (token == eos)


@functools.lru_cache(maxsize=None)
def _talker_fns(cfg: TalkerConfig, impl: ImplConfig):
  """jit prefill(params, embed, prefix arrays, key, sampling, penalty; cache_len, greedy) ->
  (last hidden (B, D), codebook-0 ids (B,), seen, done, cache), jit step(params, embed,
  cache, hidden, ids, text_ids, delta, seen, done, frame, key, mtp_key, sampling, penalty;
  greedy) -> (frame codes (B, G), hidden, next ids, seen, done, cache), the cache donated, and
  jit mtp(params, hidden, ids, key; greedy) -> frame codes (B, G), the MTP part of step alone
  (for benchmarks/speech_generation.py)."""
  model = Talker(cfg, impl)
  dtype = dtype_of(impl.dtype)
  vocab, groups = cfg.text.vocab_size, cfg.num_code_groups
  eos = cfg.codec_eos_token_id
  suppress = (jnp.arange(vocab) >= cfg.codebook_size) & (jnp.arange(vocab) != eos)

  def call(params, method, *args):
    return model.apply({"params": params}, *args, method=method)

  def frame_codes(params, h, c0, key, greedy):
    """The MTP: codebooks 1..G-1 of the frame whose codebook 0 is c0, from hidden h."""
    b = h.shape[0]
    sampling = tuple(jnp.asarray(x) for x in MTP_SAMPLING)

    def pick(logits, g):
      return decode.select(logits, jax.random.fold_in(key, g), *sampling, greedy=greedy)

    def prefill(m, h, c0):
      x = jnp.stack([h, lookup(m.codec_embedding, c0, h.dtype)], axis=1)
      return m.code_predictor.step(x, init_cache(cfg.code_predictor, impl, b, groups))

    logits, cache = call(params, prefill, h, c0)
    codes = jnp.zeros((b, groups), jnp.int32).at[:, 0].set(c0).at[:, 1].set(pick(logits, 1))

    def body(g, carry):
      codes, cache = carry

      def step(m, c, cache):
        table = jax.lax.dynamic_index_in_dim(m.code_predictor.codec_embedding, g - 1, 0, False)
        return m.code_predictor.step(lookup(table, c, dtype)[:, None], cache)

      logits, cache = call(params, step, codes[:, g], cache)
      return codes.at[:, g + 1].set(pick(logits, g + 1)), cache

    return jax.lax.fori_loop(1, groups - 1, body, (codes, cache))[0]

  def prefill(
    params,
    embed,
    text_ids,
    mm_hidden,
    mm_mask,
    codec_ids,
    positions,
    seg,
    key,
    sampling,
    penalty,
    cache_len,
    greedy,
  ):
    b = text_ids.shape[0]
    text = lookup(embed, text_ids, dtype)
    x = call(params, Talker.inputs, text, mm_hidden, mm_mask, codec_ids)
    cache = init_cache(cfg.text, impl, b, cache_len)
    h, logits, _, cache = call(params, Talker.decode, x, positions, seg, cache)
    token, seen, done = _pick(
      logits[:, -1],
      jnp.zeros((b, vocab), bool),
      jnp.zeros((b,), bool),
      jax.random.fold_in(key, 0),
      sampling,
      penalty,
      suppress,
      eos,
      greedy,
    )
    return h[:, -1], token, seen, done, cache

  def step(
    params,
    embed,
    cache,
    h,
    token,
    text_ids,
    delta,
    seen,
    done,
    frame,
    key,
    mtp_key,
    sampling,
    penalty,
    greedy,
  ):
    codes = frame_codes(params, h, token, jax.random.fold_in(mtp_key, frame), greedy)
    text = lookup(embed, text_ids, dtype)[:, None]
    x = call(params, Talker.inputs, text, None, None, codes[:, None])
    positions = jnp.broadcast_to(cache["index"] + delta, (3, h.shape[0]))[..., None]
    seg = jnp.ones((h.shape[0], 1), jnp.int32)
    h, logits, _, cache = call(params, Talker.decode, x, positions, seg, cache)
    token, seen, done = _pick(
      logits[:, -1],
      seen,
      done,
      jax.random.fold_in(key, frame + 1),
      sampling,
      penalty,
      suppress,
      eos,
      greedy,
    )
    return codes, h[:, -1], token, seen, done, cache

  return (
    jax.jit(prefill, static_argnames=("cache_len", "greedy")),
    jax.jit(step, static_argnames="greedy", donate_argnames="cache"),
    jax.jit(frame_codes, static_argnames="greedy"),
  )


# ---- the host loop ----------------------------------------------------------------------------


def _mark(progress: dict, event: str, *arrays) -> None:
  """Timing hook: with progress["timings"] a dict (`SpeechStream(timings=...)`), records the
  time.perf_counter() at which `event` first happened, once `arrays` are computed."""
  timings = progress.get("timings")
  if timings is not None and event not in timings:
    jax.block_until_ready(arrays)
    timings[event] = time.perf_counter()


class _Thinker:
  """The Thinker's decoding, one token per `advance`."""

  def __init__(self, model, req: _Request, progress: dict):
    cfg = model.config
    self.model, self.req = model, req
    b, s = req.ids.shape
    logits, self.cache, self.captured = decode.prefill_fn(
      cfg, model.talker_config.accept_hidden_layer
    )(
      model.params,
      jnp.asarray(req.ids, jnp.int32),
      jnp.asarray(req.positions, jnp.float32),
      jnp.asarray(req.seg),
      req.media,
      decode.cache_length(s, req.thinker_max_new_tokens),
    )
    _mark(progress, "thinker_prefill", logits)
    self.delta = jnp.asarray(req.positions[:, :, -1] + 1 - s, jnp.float32)
    self.key = jax.random.key(req.seed)
    self.sampling = tuple(jnp.asarray(x) for x in req.thinker_sampling)
    vocab = cfg.text.vocab_size
    self.is_eos = jnp.zeros((vocab,), bool).at[jnp.asarray(req.thinker_eos)].set(True)
    self.pad = jnp.asarray(req.thinker_eos[0], jnp.int32)
    self.token, self.done = decode.first_fn(
      logits,
      0,
      jnp.zeros((b,), bool),
      self.key,
      self.sampling,
      self.is_eos,
      self.pad,
      greedy=req.thinker_greedy,
    )
    self.tokens: list[np.ndarray] = []
    self.first_eos = np.full(b, -1)  # generated index of each row's EOS token
    self.finished = False
    self._record()
    _mark(progress, "first_text_token")

  def _record(self):
    t = len(self.tokens)
    self.tokens.append(np.asarray(self.token))
    done = np.asarray(self.done)
    self.first_eos = np.where((self.first_eos < 0) & done, t, self.first_eos)
    self.finished = bool(done.all()) or t + 1 == self.req.thinker_max_new_tokens
    if self.finished:
      self.cache = None

  def advance(self):
    self.token, self.done, _, self.cache = decode.step_fn(self.model.config)(
      self.model.params,
      self.cache,
      self.token,
      self.delta,
      self.done,
      len(self.tokens),
      self.key,
      self.sampling,
      self.is_eos,
      self.pad,
      greedy=self.req.thinker_greedy,
    )
    self._record()


def _frames(model, req: _Request, progress: dict) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Generates the Talker's frames: yields (codes (B, G), valid (B,)) per frame, valid False
  for rows that had already ended. Sets progress["thinker_tokens"] as the Thinker advances and
  at the end progress["sequences"] (B, S + new) int64. With progress["timings"] a dict, the
  first Thinker prefill, text token, Talker prefill, Thinker step and Talker step record when
  they ended (`_mark`)."""
  tcfg, impl = model.talker_config, model.config.impl
  _mark(progress, "start")
  thinker = _Thinker(model, req, progress)
  progress["thinker_tokens"] = 1
  prefix = req.prefix
  b = req.ids.shape[0]
  tok = layout_lib.TalkerTokenIds.from_configs(model.config, tcfg)
  offset = np.array([len(p) for p in prefix.prompts]) - prefix.first_spoken  # spoken prompt tokens
  prefill, step, _ = _talker_fns(tcfg, impl)
  embed = jnp.asarray(nn.meta.unbox(model.params["embed_tokens"]))
  _, talker_key, mtp_key = jax.random.split(jax.random.key(req.seed), 3)
  sampling = tuple(jnp.asarray(x) for x in req.talker_sampling)
  penalty = jnp.asarray(req.repetition_penalty, jnp.float32)
  delta = jnp.asarray(prefix.delta)

  def spoken(row, i):
    """Token i of the row's prompt + generated sequence."""
    p = prefix.prompts[row]
    return int(p[i]) if i < len(p) else int(thinker.tokens[i - len(p)][row])

  def text_id(row, j):
    """The row's trailing text at frame j (transformers' trailing_text_hidden)."""
    last = offset[row] + len(thinker.tokens) - 2  # the index of tts_eos, once finished
    e = thinker.first_eos[row]
    if thinker.finished and j > last or 0 <= e < j:
      return tok.tts_pad
    if e == j or thinker.finished and j == last:
      return tok.tts_eos
    return spoken(row, prefix.first_spoken[row] + 1 + j)

  talker = None  # device (hidden, codebook-0 ids, seen, done, cache) once the Talker started
  frame, talker_done = 0, False
  while True:
    if not talker_done and talker is None:
      if thinker.finished and len(thinker.tokens) == 1 and (offset == 0).any():
        talker_done = True  # nothing to speak: the Thinker's only token is its last
      else:
        text_ids = prefix.text_ids.copy()
        text_ids[:, -1] = [spoken(i, prefix.first_spoken[i]) for i in range(b)]
        mm = prefix.thinker_index >= 0
        mm_hidden = None
        if mm.any():
          index = jnp.asarray(np.maximum(prefix.thinker_index, 0))
          mm_hidden = jnp.take_along_axis(thinker.captured, index[..., None], axis=1)
        cache_len = decode.cache_length(text_ids.shape[1], req.talker_max_new_tokens)
        talker = prefill(
          model.talker_params,
          embed,
          jnp.asarray(text_ids),
          mm_hidden,
          jnp.asarray(mm),
          jnp.asarray(prefix.codec_ids),
          jnp.asarray(prefix.positions),
          jnp.asarray(prefix.seg),
          talker_key,
          sampling,
          penalty,
          cache_len=cache_len,
          greedy=req.talker_greedy,
        )
        thinker.captured = None
        done = np.asarray(talker[3])
        _mark(progress, "talker_prefill")
        talker_done = bool(done.all()) or req.talker_max_new_tokens == 1
    elif not talker_done and (
      thinker.finished or (frame + 2 - offset <= len(thinker.tokens)).all()
    ):
      text_ids = jnp.asarray([text_id(i, frame) for i in range(b)], jnp.int32)
      hidden, ids, seen, done_now, cache = talker
      codes, *talker = step(
        model.talker_params,
        embed,
        cache,
        hidden,
        ids,
        text_ids,
        delta,
        seen,
        done_now,
        frame,
        talker_key,
        mtp_key,
        sampling,
        penalty,
        greedy=req.talker_greedy,
      )
      frame += 1
      codes = np.asarray(codes)
      _mark(progress, "talker_step")
      yield codes, ~done
      done = np.asarray(talker[3])
      talker_done = bool(done.all()) or frame == req.talker_max_new_tokens - 1
    if not thinker.finished:
      thinker.advance()
      progress["thinker_tokens"] = len(thinker.tokens)
      _mark(progress, "thinker_step", thinker.token)
    elif talker_done:
      break
  progress["sequences"] = np.concatenate(
    [req.ids.astype(np.int64), np.stack(thinker.tokens, 1).astype(np.int64)], axis=1
  )


class _Vocoder:
  """Frames -> waveform chunks through Code2WavStreamer; rows are zero after their end."""

  def __init__(self, model, batch: int, chunk_frames: int):
    self.cfg = model.code2wav_config
    self.streamer = code2wav_lib.Code2WavStreamer(
      model.code2wav_params, self.cfg, batch, chunk_frames=chunk_frames
    )
    self.chunk = chunk_frames
    self.pending: list[np.ndarray] = []
    self.codes: list[np.ndarray] = []  # (B, G) per frame, -1 where a row had ended
    self.lengths = np.zeros(batch, np.int64)  # valid frames per row
    self.ended = np.zeros(batch, bool)
    self.emitted = 0

  def add(self, codes: np.ndarray, valid: np.ndarray) -> np.ndarray | None:
    self.ended |= ~valid
    self.lengths += ~self.ended
    self.codes.append(np.where(self.ended[:, None], -1, codes))
    self.pending.append(np.where(self.ended[:, None], 0, codes))
    return self._push() if len(self.pending) == self.chunk else None

  def flush(self) -> np.ndarray | None:
    if not self.pending:
      return None
    end = self.cfg.num_samples(len(self.codes))
    self.pending += [np.zeros_like(self.pending[0])] * (self.chunk - len(self.pending))
    return self._push(end)

  def _push(self, end: int | None = None) -> np.ndarray:
    wave = self.streamer.push(np.stack(self.pending, axis=-1))
    self.pending = []
    if end is not None:
      wave = wave[:, : end - self.emitted]
    # Each row ends at its last frame's samples; the zero codes after it decode to noise.
    row_end = np.where(
      self.ended, np.maximum(self.cfg.num_samples(self.lengths), 0), np.iinfo(np.int64).max
    )
    sample = self.emitted + np.arange(wave.shape[1])
    self.emitted += wave.shape[1]
    return np.where(sample[None] < row_end[:, None], wave, 0).astype(np.float32)

  def all_codes(self) -> np.ndarray:
    """(B, G, frames) int64, -1 after each row's end."""
    b, g = len(self.lengths), self.cfg.num_quantizers
    if not self.codes:
      return np.zeros((b, g, 0), np.int64)
    return np.stack(self.codes, axis=-1).astype(np.int64)


def generate(model, input_ids, *, return_codes: bool = False, **kwargs):
  """`Model.generate(..., return_audio=True)`: (text ids (B, S + new) int64, waveform (B,
  samples) float32 at 24 kHz), and with return_codes the codec frames (B, 16, T) int64 (-1
  after a row's end)."""
  req = _request(model, input_ids, **kwargs)
  progress: dict = {}
  vocoder = _Vocoder(model, req.ids.shape[0], VOCODER_CHUNK_FRAMES)
  pieces = [vocoder.add(codes, valid) for codes, valid in _frames(model, req, progress)]
  pieces.append(vocoder.flush())
  pieces = [p for p in pieces if p is not None]
  wave = np.concatenate(pieces, axis=1) if pieces else np.zeros((req.ids.shape[0], 0), np.float32)
  out = (progress["sequences"], wave)
  return out + (vocoder.all_codes(),) if return_codes else out


class SpeechStream:
  """`Model.generate_stream`: iterating yields waveform chunks (B, m) float32 at 24 kHz as
  frames are made (their concatenation is `generate`'s waveform). `thinker_tokens` counts the
  text tokens generated so far; after the last chunk `sequences` (B, S + new) int64 and
  `codes` (B, 16, T) int64 (-1 after a row's end) hold the rest of `generate`'s outputs.

  `timings`, a dict, receives the time.perf_counter() at which the stream started ("start")
  and the first of each of these ended: "thinker_prefill", "first_text_token",
  "talker_prefill" (codebook 0 of frame 0), "thinker_step", "talker_step" (the MTP's
  codebooks 1..15 of frame 0 and codebook 0 of frame 1), "first_chunk" (its waveform). It
  waits for the device at each, so use it to measure, not in production."""

  def __init__(
    self, model, input_ids, *, chunk_frames: int = 1, timings: dict | None = None, **kwargs
  ):
    self._model = model
    self._req = _request(model, input_ids, **kwargs)
    self._chunk = _positive_int(chunk_frames, "chunk_frames")
    self._progress: dict = {"thinker_tokens": 0}
    if timings is not None:
      self._progress["timings"] = timings
    self.sequences: np.ndarray | None = None
    self.codes: np.ndarray | None = None
    self._iter = self._chunks()

  @property
  def thinker_tokens(self) -> int:
    return self._progress["thinker_tokens"]

  def __iter__(self):
    return self._iter

  def _chunks(self) -> Iterator[np.ndarray]:
    vocoder = _Vocoder(self._model, self._req.ids.shape[0], self._chunk)
    for codes, valid in _frames(self._model, self._req, self._progress):
      wave = vocoder.add(codes, valid)
      if wave is not None and wave.shape[1]:
        _mark(self._progress, "first_chunk")
        yield wave
    wave = vocoder.flush()
    self.sequences = self._progress["sequences"]
    self.codes = vocoder.all_codes()
    if wave is not None and wave.shape[1]:
      _mark(self._progress, "first_chunk")
      yield wave
