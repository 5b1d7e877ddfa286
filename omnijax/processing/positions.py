"""TM-RoPE position ids (3, B, S) for any interleaving of text, audio, images and video.

Host-side numpy, for Grain data pipelines and `omnijax.load(...).logits`. The values equal
transformers 5.23 `Qwen3OmniMoePreTrainedModelForConditionalGeneration.get_rope_index`
(position ids *and* rope deltas) on every input the reference handles; `tests/test_positions.py`
checks that with `np.array_equal`.

Rules (rows are T, H, W; a "piece" is one run of ids the reference appends to its list):
- Text: one counter shared by all three rows (plain 1-D RoPE).
- Segments: `<audio_start> audio* <audio_end>`, `<vision_start> image* <vision_end>`,
  `<vision_start> video* <vision_end>`, and audio-in-video
  `<vision_start><audio_start> (video|audio)* <audio_end><vision_end>`. Text before a segment
  continues the counter; each start/end marker takes one id on all rows (two for audio-in-video).
- Content starts at `s` = the id after the start marker(s):
  - audio: one id per token, s, s+1, ... on all rows (so audio is indistinguishable from text);
  - image (t, h, w) -> merged grid (t, h/m, w/m), m = spatial_merge_size, tokens in (t, row, col)
    order: T = s + t_idx * position_id_per_seconds (0 for the usual t = 1), H = s + row,
    W = s + col;
  - video: the same but T = s + f32(f32(t_idx * f32(seconds_per_grid)) * position_id_per_seconds),
    with seconds_per_grid = temporal_patch_size / fps. The reference does this in float32 and
    never rounds, so T (and everything after it) is fractional unless
    seconds_per_grid * position_id_per_seconds is an integer (fps 2 -> 13, fps 1 -> 26: integers;
    fps 3 or 4 -> 8.67 or 6.5: fractional; see `dtype`).
  - audio in video: video ids as above and audio ids s, s+1, ... both from the same s, emitted in
    the order of a merge on the T value with video first on ties (the processor lays out the
    placeholders in this order). The ids are assigned in that order whatever the placeholder
    tokens inside the span are, as in the reference.
- The end marker takes (max of the *last piece* + 1), where the last piece is the whole block for
  an image/video, the audio for audio, and for audio-in-video the tail of whichever stream
  outlasted the merge (so a short audio under a large video can give an end id below the video's
  largest H/W id: a reference quirk, reproduced). The next text continues after the end marker.
- rope delta = max id of the row + 1 - number of real tokens: what decoding adds to the plain
  token index to continue the positions.
- When some id is fractional, all arithmetic follows the reference's float32 order of
  operations, so fractional ids agree to the bit as well (otherwise every id is an integer below
  2**24 and exact Python floats give the same values faster).
- Output dtype: int32 by default, which raises ValueError when the call has a video whose T
  offsets are fractional; `dtype=np.float32` returns the reference's values in every case.

Batches and padding:
- `image_grid_thw`, `video_grid_thw`, `video_second_per_grid` and `audio_seqlens` list the items
  of the whole batch in order of appearance (row-major, then left to right), as in transformers.
  Every item must be used (a count mismatch raises ValueError).
- `attention_mask`: positions are computed over each row's real tokens (1s) compacted, as in the
  reference. Padded slots get exactly what the reference gives them: 1 when neither
  image_grid_thw nor video_grid_thw is passed (its text-only branch, which also gives
  delta = max(ids including the padded 1s) + 1 - n_real, i.e. 1 for a row with a single real
  token and padding, 2 for an empty row), else 0 (an empty row gets delta 0 where the reference
  raises).
- `segment_ids` (packed rows: 0 = padding, each maximal run of one nonzero id = one document):
  each document gets the ids it would get alone (restarting at 0); padding gets 0; the row's rope
  delta is that of its *last* document (the one generation would continue), 0 for an empty row.
  `attention_mask`, if also given, must be nonzero exactly where segment_ids is.

Differences from the reference, all on inputs it mishandles:
- Segment kinds are read from the tokens, so one batch may mix plain videos and audio-in-video;
  `use_audio_in_video` is accepted for signature parity and ignored. (The reference needs the
  flag to match the layout and silently produces wrong ids otherwise.)
- `audio_seqlens` is optional: audio lengths are then read from the placeholder runs (standalone
  audio ids never depend on it). When given, it is used like the reference uses it.
- Malformed input raises ValueError instead of producing shifted ids: missing or surplus
  metadata, a segment cut off by the end of the sequence, placeholder counts that disagree with
  the metadata (checked through the end markers when `TokenIds` has them), image/video
  placeholders without grids, grids not divisible by the merge size.
- Without an attention mask the reference raises (both branches index it); here every token is
  real. An audio-in-video span without audio tokens is handled; the reference misparses it.

Cost: ~0.27 ms for an 8192-token row with 11 mixed segments (2 shared CPU cores), ~0.03 ms for
plain text; one Python step per segment, numpy inside.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

_F32 = np.float32


@dataclasses.dataclass(frozen=True)
class TokenIds:
  """Special token ids. `audio_end`/`vision_end` are optional and only used for validation."""

  image: int
  video: int
  audio: int
  vision_start: int
  audio_start: int
  vision_end: int | None = None
  audio_end: int | None = None

  @classmethod
  def from_config(cls, config: Any) -> "TokenIds":
    """From `omnijax.models.config.ThinkerConfig` (or a transformers thinker config)."""
    return cls(
      image=int(config.image_token_id),
      video=int(config.video_token_id),
      audio=int(config.audio_token_id),
      vision_start=int(config.vision_start_token_id),
      audio_start=int(config.audio_start_token_id),
      vision_end=_opt_int(getattr(config, "vision_end_token_id", None)),
      audio_end=_opt_int(getattr(config, "audio_end_token_id", None)),
    )


def _opt_int(x):
  return None if x is None else int(x)


# The released Qwen3-Omni ids (transformers' config defaults differ).
QWEN3_OMNI_TOKENS = TokenIds(
  image=151655,
  video=151656,
  audio=151675,
  vision_start=151652,
  audio_start=151669,
  vision_end=151653,
  audio_end=151670,
)


def rope_kwargs_from_config(config: Any) -> dict[str, Any]:
  """`tokens`, `spatial_merge_size`, `position_id_per_seconds`, `n_window` for `rope_index`.

  Accepts `omnijax.models.config.ThinkerConfig` (`.vision`, `.audio`) or a transformers thinker
  config (`.vision_config`, `.audio_config`).
  """
  vision = getattr(config, "vision", None) or getattr(config, "vision_config")
  audio = getattr(config, "audio", None) or getattr(config, "audio_config")
  return dict(
    tokens=TokenIds.from_config(config),
    spatial_merge_size=int(vision.spatial_merge_size),
    position_id_per_seconds=config.position_id_per_seconds,
    n_window=int(audio.n_window),
  )


def audio_token_count(mel_frames, n_window: int = 50):
  """Audio placeholder tokens for `mel_frames` mel frames (transformers'
  `_get_feat_extract_output_lengths`): 13 per full 2*n_window-frame chunk plus the three
  stride-2 convolutions applied to the remainder. int for an int, array for an array."""
  x = np.asarray(mel_frames, np.int64)
  chunk = 2 * n_window
  rest = x % chunk
  f = (rest - 1) // 2 + 1
  f = (f - 1) // 2 + 1
  f = (f - 1) // 2 + 1
  out = f + (x // chunk) * 13
  return int(out) if out.ndim == 0 else out


def image_token_count(grid_thw, spatial_merge_size: int = 2):
  """Placeholder tokens for an image/video grid (t, h, w): t*h*w / merge^2 (int, or an array for
  (N, 3) grids)."""
  g = np.asarray(grid_thw, np.int64)
  out = g[..., 0] * g[..., 1] * g[..., 2] // (spatial_merge_size**2)
  return int(out) if out.ndim == 0 else out


video_token_count = image_token_count


def audio_in_video_layout(
  grid_thw,
  seconds_per_grid: float,
  num_audio_tokens: int,
  *,
  tokens: TokenIds,
  spatial_merge_size: int = 2,
  position_id_per_seconds: float = 13,
) -> np.ndarray:
  """Token ids of one audio-in-video span as the transformers processor lays it out:
  `<vision_start><audio_start>` + video/audio placeholders merged on their time (video first on
  ties, float64 as in the processor) + `<audio_end><vision_end>`."""
  if tokens.audio_end is None or tokens.vision_end is None:
    raise ValueError("audio_in_video_layout needs tokens.audio_end and tokens.vision_end.")
  t, h, w = (int(v) for v in grid_thw)
  per_frame = (h // spatial_merge_size) * (w // spatial_merge_size)
  video_t = np.repeat(np.arange(t), per_frame) * float(seconds_per_grid) * position_id_per_seconds
  audio_t = np.arange(num_audio_tokens)
  is_video = np.zeros(len(video_t) + num_audio_tokens, bool)
  is_video[np.arange(len(video_t)) + np.searchsorted(audio_t, video_t, side="left")] = True
  body = np.where(is_video, tokens.video, tokens.audio)
  return np.concatenate(
    [[tokens.vision_start, tokens.audio_start], body, [tokens.audio_end, tokens.vision_end]]
  ).astype(np.int64)


class _Items:
  """The batch's multimodal items, consumed in order of appearance."""

  def __init__(
    self,
    image_grid_thw,
    video_grid_thw,
    video_second_per_grid,
    audio_seqlens,
    merge: int,
    pps,
    n_window: int,
  ):
    self.images = _grids(image_grid_thw, "image_grid_thw", merge)
    self.videos = _grids(video_grid_thw, "video_grid_thw", merge)
    pps = _F32(pps)
    self.image_t = [np.arange(g[0], dtype=_F32) * pps for g in self.images]
    self.video_t = None
    if video_second_per_grid is not None:
      seconds = np.asarray(video_second_per_grid, np.float64).reshape(-1).astype(_F32)
      if len(seconds) != len(self.videos):
        raise ValueError(
          f"video_second_per_grid has {len(seconds)} entries but "
          f"video_grid_thw has {len(self.videos)} videos."
        )
      # The reference: (arange(t) * float32(seconds)) * position_id_per_seconds, in float32.
      self.video_t = [(np.arange(g[0], dtype=_F32) * s) * pps for g, s in zip(self.videos, seconds)]
    # Whether any id can be fractional. If not, every id is an integer below 2**24 and Python
    # floats reproduce the reference's float32 arithmetic exactly (and are much faster).
    self.fractional = any(not v.is_integer() for t in (self.video_t or ()) for v in t.tolist())
    self.fractional |= not float(pps).is_integer()
    if audio_seqlens is None:
      self.audio_lens = None
    else:
      self.audio_lens = audio_token_count(np.asarray(audio_seqlens).reshape(-1), n_window).tolist()
    self.image_i = self.video_i = self.audio_i = 0

  def next_image(self):
    i = self.image_i
    if i >= len(self.images):
      raise ValueError(
        f"image #{i} in input_ids has no entry in image_grid_thw ({len(self.images)} given)."
      )
    self.image_i += 1
    return self.images[i], self.image_t[i]

  def next_video(self):
    i = self.video_i
    if i >= len(self.videos):
      raise ValueError(
        f"video #{i} in input_ids has no entry in video_grid_thw ({len(self.videos)} given)."
      )
    if self.video_t is None:
      raise ValueError(
        "input_ids has video placeholders: pass video_second_per_grid "
        "(temporal_patch_size / fps per video)."
      )
    self.video_i += 1
    return self.videos[i], self.video_t[i]

  def next_audio(self):
    """Token count from audio_seqlens, or None when audio_seqlens was not given."""
    i = self.audio_i
    self.audio_i += 1
    if self.audio_lens is None:
      return None
    if i >= len(self.audio_lens):
      raise ValueError(
        f"audio #{i} in input_ids has no entry in audio_seqlens ({len(self.audio_lens)} given)."
      )
    return self.audio_lens[i]

  def check_all_used(self):
    for name, used, given in (
      ("image_grid_thw", self.image_i, len(self.images)),
      ("video_grid_thw", self.video_i, len(self.videos)),
      ("audio_seqlens", self.audio_i, None if self.audio_lens is None else len(self.audio_lens)),
    ):
      if given is not None and used != given:
        raise ValueError(
          f"{name} lists {given} items but input_ids has {used} such segments "
          "(items are matched to segments in order of appearance)."
        )


def _grids(g, name, merge) -> list[tuple[int, int, int]]:
  """(t, h/merge, w/merge) per item."""
  if g is None:
    return []
  g = np.asarray(g, np.int64).reshape(-1, 3).tolist()
  if any(h % merge or w % merge for _, h, w in g):
    raise ValueError(f"{name} has heights/widths not divisible by spatial_merge_size={merge}: {g}")
  return [(t, h // merge, w // merge) for t, h, w in g]


class _Row:
  """Positions of one compacted sequence (one row's real tokens, or one packed document).

  Scalars go through `self.f`: np.float32 (the reference's arithmetic) when ids can be
  fractional, else Python float (exact, faster).
  """

  def __init__(self, ids: np.ndarray, tok: TokenIds, items: _Items):
    self.ids, self.tok, self.items = ids, tok, items
    self.f = _F32 if items.fractional else float
    self._nonph = None

  def _arange_plus(self, n: int, st) -> np.ndarray:
    return np.arange(n, dtype=_F32) + _F32(st)

  def _span_end(self, start: int) -> int:
    """First index >= start that is not an audio/video/image placeholder."""
    if self._nonph is None:
      ids, t = self.ids, self.tok
      self._nonph = np.flatnonzero((ids != t.audio) & (ids != t.video) & (ids != t.image))
    k = int(np.searchsorted(self._nonph, start))
    return int(self._nonph[k]) if k < len(self._nonph) else len(self.ids)

  def _expect(self, i: int, want: int | None, what: str):
    if want is not None and self.ids[i] != want:
      raise ValueError(
        f"{what} at index {i}: expected token {want}, found {int(self.ids[i])}; "
        "the placeholder count disagrees with the metadata (grid / audio length)."
      )

  def _vision_block(self, out, a, grid, t_off, st):
    """Write the merged (t, h, w) block at out[:, a:]; returns the block's max id (or None)."""
    t, h, w = grid
    n = t * h * w
    st32 = _F32(st)
    blk = out[:, a : a + n].reshape(3, t, h, w)
    blk[0] = (t_off + st32)[:, None, None]
    blk[1] = (np.arange(h, dtype=_F32) + st32)[:, None]
    blk[2] = np.arange(w, dtype=_F32) + st32
    if not n:
      return None
    return self.f(self.f(max(float(t_off[-1]), h - 1, w - 1)) + st)

  def compute(self, out=None):
    """Writes positions into `out` ((3, n) float32, allocated if None); returns (out, delta)."""
    ids, tok, f, arange_plus = self.ids, self.tok, self.f, self._arange_plus
    n = len(ids)
    if out is None:
      out = np.empty((3, n), _F32)
    if n == 0:
      return out, 0
    markers = np.flatnonzero((ids == tok.vision_start) | (ids == tok.audio_start)).tolist()
    cur = 0  # next token index
    nxt = f(0)  # next position id (the reference's st_idx at the top of its loop)
    top = f(-np.inf)  # max id so far
    for m in markers:
      if m < cur:
        continue
      if ids[m] == tok.vision_start:
        if m + 1 >= n:
          raise ValueError(f"vision_start at the last index {m}: segment cut off (truncated?).")
        nxt_tok = ids[m + 1]
        if nxt_tok == tok.audio_start:
          kind = "aiv"
        elif nxt_tok == tok.image:
          kind = "image"
        elif nxt_tok == tok.video:
          kind = "video"
        else:
          raise ValueError(
            f"vision_start at index {m} is followed by token {int(nxt_tok)}, not "
            "an image, video or audio_start token."
          )
      else:
        kind = "audio"
      st = nxt
      if m > cur:  # text before the segment
        out[:, cur:m] = arange_plus(m - cur, st)
        st = f(st + (m - cur))
      bos = 2 if kind == "aiv" else 1
      if m + bos > n:
        raise ValueError(f"segment at index {m} cut off by the end of the sequence (truncated?).")
      out[:, m : m + bos] = arange_plus(bos, st)
      last = f(st + (bos - 1))  # max of the last piece
      top = max(top, last)
      st = f(st + bos)
      a = m + bos  # first content index
      if kind == "audio":
        length = self.items.next_audio()
        if length is None:
          length = self._span_end(a) - a
        b = a + length
        if b > n:
          raise ValueError(f"audio at index {m} needs {length} tokens; the sequence ends first.")
        out[:, a:b] = arange_plus(length, st)
        if length:
          last = f(st + (length - 1))
        end_marks = (tok.audio_end,)
      elif kind in ("image", "video"):
        grid, t_off = self.items.next_image() if kind == "image" else self.items.next_video()
        b = a + grid[0] * grid[1] * grid[2]
        if b > n:
          raise ValueError(f"{kind} at index {m} needs {b - a} tokens; the sequence ends first.")
        blk_top = self._vision_block(out, a, grid, t_off, st)
        if blk_top is not None:
          last = blk_top
        end_marks = (tok.vision_end,)
      else:  # audio in video
        grid, t_off = self.items.next_video()
        alen = self.items.next_audio()
        vlen = grid[0] * grid[1] * grid[2]
        if alen is None:
          alen = self._span_end(a) - a - vlen
        b = a + vlen + alen
        if b > n:
          raise ValueError(
            f"audio-in-video at index {m} needs {vlen + alen} tokens; the sequence ends first."
          )
        vid = np.empty((3, vlen), _F32)
        vtop = self._vision_block(vid, 0, grid, t_off, st)
        aud = arange_plus(alen, st)
        # Merge on T, video first on ties: video token j goes after the audio tokens < its T.
        is_video = np.zeros(vlen + alen, bool)
        is_video[np.arange(vlen) + np.searchsorted(aud, vid[0], side="left")] = True
        span = out[:, a:b]
        span[:, is_video] = vid
        span[:, ~is_video] = aud
        if alen and (vlen == 0 or vid[0, -1] <= aud[-1]):
          last = f(st + (alen - 1))  # the audio outlasted the merge: its tail is the last piece
        elif vlen:
          last = vtop  # the video's remaining frames (all of h, w) are the last piece
        if vlen:
          top = max(top, vtop)  # may exceed `last` (see the module docstring)
        end_marks = (tok.audio_end, tok.vision_end)
      top = max(top, last)
      k = len(end_marks)
      if b + k > n:
        raise ValueError(
          f"segment at index {m}: its end marker(s) are past the end of the sequence (truncated?)."
        )
      for j, want in enumerate(end_marks):
        self._expect(b + j, want, f"end of the segment starting at index {m}")
      eos = f(last + 1)
      out[:, b : b + k] = arange_plus(k, eos)
      last = f(eos + (k - 1))
      top = max(top, last)
      nxt = f(last + 1)
      cur = b + k
    if cur < n:
      out[:, cur:] = arange_plus(n - cur, nxt)
      top = max(top, f(nxt + (n - cur - 1)))
    return out, f(f(top + 1) - n)


def _runs(seg_row: np.ndarray):
  """(start, end) of each maximal run of one nonzero segment id."""
  change = np.flatnonzero(seg_row[1:] != seg_row[:-1]) + 1
  starts = np.concatenate([[0], change])
  ends = np.concatenate([change, [len(seg_row)]])
  keep = seg_row[starts] != 0
  return list(zip(starts[keep].tolist(), ends[keep].tolist()))


def rope_index(
  input_ids: np.ndarray,
  *,
  tokens: TokenIds,
  image_grid_thw=None,
  video_grid_thw=None,
  video_second_per_grid=None,
  audio_seqlens=None,
  use_audio_in_video: bool = False,
  attention_mask=None,
  segment_ids=None,
  spatial_merge_size: int = 2,
  position_id_per_seconds: float = 13,
  n_window: int = 50,
  dtype=np.int32,
) -> tuple[np.ndarray, np.ndarray]:
  """TM-RoPE position ids and rope deltas (see the module docstring for the rules).

  Args:
    input_ids: (B, S) or (S,) token ids with the placeholders already expanded.
    tokens: the special token ids.
    image_grid_thw: (num_images, 3) patch grids (before merging), in order of appearance.
    video_grid_thw: (num_videos, 3).
    video_second_per_grid: (num_videos,) seconds per temporal patch = temporal_patch_size / fps.
    audio_seqlens: (num_audios,) mel-frame lengths (feature_attention_mask.sum(-1)) of all
      audios, standalone and in videos, in order of appearance. Optional (see module docstring).
    use_audio_in_video: ignored (segment kinds are read from the tokens); for signature parity.
    attention_mask: (B, S), 1 = real token, 0 = padding.
    segment_ids: (B, S) packed rows, 0 = padding, runs of 1..n = documents.
    spatial_merge_size, position_id_per_seconds: as in the model config.
    n_window: the audio encoder's n_window (audio tokens per mel frames).
    dtype: output dtype. The default np.int32 raises ValueError if a video's
      seconds_per_grid * position_id_per_seconds makes the reference ids fractional; pass
      np.float32 for the reference's exact (float32) values in that case.

  Returns:
    positions (3, B, S) and rope_deltas (B, 1) of `dtype`; (3, S) and (1,) for 1-D input_ids.
  """
  del use_audio_in_video
  ids = np.asarray(input_ids)
  one_d = ids.ndim == 1
  if one_d:
    ids = ids[None]
  if ids.ndim != 2:
    raise ValueError(f"input_ids must be (B, S) or (S,), got shape {ids.shape}.")
  bsz, seq = ids.shape

  def as_2d(x, name):
    if x is None:
      return None
    x = np.asarray(x)
    x = x[None] if one_d and x.ndim == 1 else x
    if x.shape != ids.shape:
      raise ValueError(f"{name} has shape {x.shape}; input_ids has {ids.shape}.")
    return x

  mask = as_2d(attention_mask, "attention_mask")
  seg = as_2d(segment_ids, "segment_ids")
  if mask is not None and seg is not None and np.any((mask != 0) != (seg != 0)):
    raise ValueError("attention_mask and segment_ids disagree about which tokens are padding.")
  real = (seg != 0) if seg is not None else (mask == 1) if mask is not None else None

  pos = np.zeros((3, bsz, seq), _F32)
  deltas = np.zeros((bsz,), _F32)
  text_branch = image_grid_thw is None and video_grid_thw is None
  if text_branch:
    # The reference's text-only branch: 1-D counting over real tokens. Audio ids are 1-D anyway.
    check = ids if real is None else ids[real]
    if np.any((check == tokens.image) | (check == tokens.video)):
      raise ValueError(
        "input_ids has image/video placeholders but neither image_grid_thw nor "
        "video_grid_thw was given."
      )
    if seg is not None:
      for b in range(bsz):
        for s, e in _runs(seg[b]):
          pos[:, b, s:e] = np.arange(e - s, dtype=_F32)
    elif real is None:
      pos[:] = np.arange(seq, dtype=_F32)
    else:
      count = np.cumsum(real, axis=-1, dtype=np.int64) - 1
      pos[:] = np.where(real, count, 1).astype(_F32)
      deltas = pos[0].max(axis=-1, initial=-np.inf) + 1 - real.sum(-1)
  else:
    items = _Items(
      image_grid_thw,
      video_grid_thw,
      video_second_per_grid,
      audio_seqlens,
      spatial_merge_size,
      position_id_per_seconds,
      n_window,
    )
    if items.fractional and np.issubdtype(np.dtype(dtype), np.integer):
      raise ValueError(
        "a video's seconds_per_grid * position_id_per_seconds is not an integer, "
        "so the reference's TM-RoPE ids are fractional; pass dtype=np.float32."
      )
    for b in range(bsz):
      if seg is not None:
        for s, e in _runs(seg[b]):
          _, deltas[b] = _Row(ids[b, s:e], tokens, items).compute(pos[:, b, s:e])
      elif real is None:
        _, deltas[b] = _Row(ids[b], tokens, items).compute(pos[:, b])
      else:
        idx = np.flatnonzero(real[b])
        if len(idx) and idx[-1] - idx[0] + 1 == len(idx):  # one run (left/right padding)
          s, e = int(idx[0]), int(idx[-1]) + 1
          _, deltas[b] = _Row(ids[b, s:e], tokens, items).compute(pos[:, b, s:e])
        else:
          pos[:, b, idx], deltas[b] = _Row(ids[b, idx], tokens, items).compute()
    items.check_all_used()
  pos = pos.astype(dtype)
  deltas = deltas.astype(dtype)[:, None]
  if one_d:
    return pos[:, 0], deltas[0]
  return pos, deltas
