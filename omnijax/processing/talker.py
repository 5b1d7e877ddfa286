"""Teacher-forced Talker training layout of Qwen3-Omni (host-side numpy).

transformers 5.23 only has a generation path for the Talker
(`Qwen3OmniMoeForConditionalGeneration.generate`); this module lays out one conversation so that a
single causal forward over it sees, position by position, exactly the inputs that generation
feeds the Talker, and marks what each position predicts.

The Talker input at a position is the sum of a *text stream* and a *codec stream*:
- text: `text_projection(thinker.embed_tokens(text_ids))`, except at multimodal placeholders of
  the user turns (`thinker_index >= 0`), where it is
  `hidden_projection(thinker hidden_states[accept_hidden_layer][thinker_index])`;
- codec: `sum_k E_k(codec_ids[:, k])` over the columns with id >= 0 (E_0 =
  `talker.model.codec_embedding`, E_k = `talker.code_predictor.model.codec_embedding[k-1]`);
  zero where the whole row is -1.

Layout for a conversation whose last turn `<|im_start|> assistant \\n c_0 ... c_{K-1} <final>`
is spoken (the final token, normally `<|im_end|>`, is never fed: generation has no thinker
hidden state for it), with T codec frames, L = U + 9 + T positions:

  position   text_ids              thinker_index  codec_ids[:, 0] (1..15: -1)  labels        mtp_codes
  user u     thinker id            index if mm    -1                           -1            -1
  A0..A2     <|im_start|> assistant \\n  -1        -1                           -1            -1
  A3         tts_pad               -1             codec_nothink                -1            -1
  A4         tts_pad               -1             codec_think_bos              -1            -1
  A5         tts_pad               -1             codec_think_eos              -1            -1
  A6         tts_pad               -1             speaker_id                   -1            -1
  A7         tts_bos               -1             codec_pad                    -1            -1
  A8         c_0                   -1             codec_bos                    codes[0, 0]   codes[:, 0]
  F_f        c_{f+1} if f+1 <= K-1 -1             codes[:, f] (all 16 cols)    codes[0, f+1] codes[:, f+1]
             tts_eos if f == K-1                                               (f < T-1)     (f < T-1)
             tts_pad if f >= K                                                 codec_eos     -1
                                                                               (f == T-1)    (f == T-1)

- User positions U: every thinker position whose role (the token right after the most recent
  `<|im_start|>`) is `user`, in order, including the `<|im_start|> user` markers and the
  `<|im_end|> \\n` closing each user turn. System turns and earlier assistant turns are dropped.
  Positions before the first `<|im_start|>` take the role `thinker_ids[1]`, as in transformers.
- `labels[p]` is the codebook-0 code that the output at p predicts (unshifted: position p's
  logits against labels[p]); -1 = ignored.
- `mtp_codes[p]` are the 16 codes of the frame whose codebook 0 position p predicts: the code
  predictor for that frame is conditioned on p's final-norm hidden state. The last frame position
  predicts `codec_eos`, so it has no MTP row.
- `positions` (3, L) float32 M-RoPE ids of the Talker's own sequence: 0..L-1 on all rows for
  text/audio; with image/video grids the prefix (user ids + tts_pad for A0..A8, the ids
  transformers passes as `talker_input_ids`) goes through `positions.rope_index`
  (spatial_merge_size 2, position_id_per_seconds 13 in the release) and frame f gets
  max(prefix) + 1 + f on all rows, as generation's rope delta gives.

Differences from transformers, only on inputs it mishandles: grids of images/videos outside the
user turns (system prompt, earlier assistant turns) are dropped before the position computation
(transformers hands every grid to the Talker and mismatches them), and audio-in-video spans get
their interleaved positions (the Talker's generate never receives `use_audio_in_video`). Audio
together with image/video grids is laid out normally; transformers' Talker raises AttributeError
there (its get_rope_index reads `config.audio_config`, which the Talker config lacks).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from omnijax.processing import positions as positions_lib

NUM_CODE_GROUPS = 16
NUM_ASSISTANT_SLOTS = 9


@dataclasses.dataclass(frozen=True)
class TalkerTokenIds:
  """Special ids of the Talker layout. `vision_start`/`audio_start` are only needed for
  conversations with image/video grids (M-RoPE)."""

  # thinker-vocabulary ids
  im_start: int
  user: int
  assistant: int
  tts_pad: int
  tts_bos: int
  tts_eos: int
  audio: int
  image: int
  video: int
  # talker (codec) vocabulary ids
  codec_pad: int
  codec_bos: int
  codec_eos: int
  codec_nothink: int
  codec_think_bos: int
  codec_think_eos: int
  # thinker-vocabulary, M-RoPE only
  vision_start: int | None = None
  audio_start: int | None = None

  @classmethod
  def from_configs(cls, thinker: Any, talker: Any) -> "TalkerTokenIds":
    """From omnijax's ThinkerConfig and TalkerConfig."""
    return cls(
      im_start=talker.im_start_token_id,
      user=talker.user_token_id,
      assistant=talker.assistant_token_id,
      tts_pad=talker.tts_pad_token_id,
      tts_bos=talker.tts_bos_token_id,
      tts_eos=talker.tts_eos_token_id,
      audio=thinker.audio_token_id,
      image=thinker.image_token_id,
      video=thinker.video_token_id,
      codec_pad=talker.codec_pad_id,
      codec_bos=talker.codec_bos_id,
      codec_eos=talker.codec_eos_token_id,
      codec_nothink=talker.codec_nothink_id,
      codec_think_bos=talker.codec_think_bos_id,
      codec_think_eos=talker.codec_think_eos_id,
      vision_start=thinker.vision_start_token_id,
      audio_start=thinker.audio_start_token_id,
    )

  @classmethod
  def from_hf_config(cls, config: Any) -> "TalkerTokenIds":
    """From a transformers `Qwen3OmniMoeConfig` (the placeholder ids are the thinker's, which
    `generate` uses to pick the multimodal positions)."""
    thinker, talker = config.thinker_config, config.talker_config
    return cls(
      im_start=int(config.im_start_token_id),
      user=int(config.user_token_id),
      assistant=int(config.assistant_token_id),
      tts_pad=int(config.tts_pad_token_id),
      tts_bos=int(config.tts_bos_token_id),
      tts_eos=int(config.tts_eos_token_id),
      audio=int(thinker.audio_token_id),
      image=int(thinker.image_token_id),
      video=int(thinker.video_token_id),
      codec_pad=int(talker.codec_pad_id),
      codec_bos=int(talker.codec_bos_id),
      codec_eos=int(talker.codec_eos_token_id),
      codec_nothink=int(talker.codec_nothink_id),
      codec_think_bos=int(talker.codec_think_bos_id),
      codec_think_eos=int(talker.codec_think_eos_id),
      vision_start=int(talker.vision_start_token_id),
      audio_start=int(talker.audio_start_token_id),
    )


# The released Qwen/Qwen3-Omni-30B-A3B-Instruct values (transformers' config defaults differ).
RELEASED = TalkerTokenIds(
  im_start=151644,
  user=872,
  assistant=77091,
  tts_pad=151671,
  tts_bos=151672,
  tts_eos=151673,
  audio=151675,
  image=151655,
  video=151656,
  codec_pad=2148,
  codec_bos=2149,
  codec_eos=2150,
  codec_nothink=2155,
  codec_think_bos=2156,
  codec_think_eos=2157,
  vision_start=151652,
  audio_start=151669,
)


def _user_positions(ids: np.ndarray, tok: TalkerTokenIds) -> np.ndarray:
  """Indices whose role is `user`, as transformers' `generate` selects them."""
  s = len(ids)
  idx = np.where(ids == tok.im_start, np.arange(s), -1)
  previous_im_start = np.maximum(np.maximum.accumulate(idx), 0)
  role = ids[np.minimum(previous_im_start + 1, s - 1)]
  return np.flatnonzero(role == tok.user)


def _grids_in(ids, keep, tok, image_grid_thw, video_grid_thw, video_second_per_grid):
  """The grids (in order of appearance) of the vision items whose `<vision_start>` is kept."""
  images = None if image_grid_thw is None else np.asarray(image_grid_thw).reshape(-1, 3)
  videos = None if video_grid_thw is None else np.asarray(video_grid_thw).reshape(-1, 3)
  seconds = None if video_second_per_grid is None else np.asarray(video_second_per_grid).ravel()
  starts = np.flatnonzero(ids[:-1] == tok.vision_start)
  kinds = ids[starts + 1]
  is_image = kinds == tok.image
  is_video = (kinds == tok.video) | (kinds == tok.audio_start)  # audio in video: a video item
  kept = np.isin(starts, keep)
  n_img, n_vid = int(is_image.sum()), int(is_video.sum())
  if (0 if images is None else len(images)) != n_img:
    raise ValueError(
      f"thinker_ids has {n_img} image(s) but image_grid_thw lists "
      f"{0 if images is None else len(images)}."
    )
  if (0 if videos is None else len(videos)) != n_vid:
    raise ValueError(
      f"thinker_ids has {n_vid} video(s) but video_grid_thw lists "
      f"{0 if videos is None else len(videos)}."
    )
  if n_vid and (seconds is None or len(seconds) != n_vid):
    raise ValueError(f"video_second_per_grid must list one value per video ({n_vid}).")
  img_keep = kept[is_image]
  vid_keep = kept[is_video]
  return (
    images[img_keep] if n_img else None,
    videos[vid_keep] if n_vid else None,
    seconds[vid_keep] if n_vid else None,
  )


def talker_example(
  thinker_ids,
  codes,
  speaker_id: int,
  ids: TalkerTokenIds,
  *,
  image_grid_thw=None,
  video_grid_thw=None,
  video_second_per_grid=None,
  spatial_merge_size: int = 2,
  position_id_per_seconds: float = 13,
  codebook_size: int = 2048,
) -> dict[str, np.ndarray]:
  """The Talker training layout of one conversation (see the module docstring).

  Args:
    thinker_ids: (S,) the whole conversation as the Thinker sees it (placeholders expanded),
      ending with the spoken assistant turn `<|im_start|> assistant \\n c_0 ... <|im_end|>`.
      The final token is not spoken.
    codes: (16, T) codec frames of the spoken answer, T >= 1, values in [0, codebook_size).
    speaker_id: the speaker's talker-vocabulary id (e.g. 2302 "ethan" in the release).
    ids: the special token ids.
    image_grid_thw, video_grid_thw, video_second_per_grid: the conversation's vision items as
      the processor lists them (all turns, in order); only needed for the M-RoPE positions.
    spatial_merge_size, position_id_per_seconds: the Talker config's values.
    codebook_size: codec values per codebook (2048).

  Returns:
    dict of `text_ids` (L,), `thinker_index` (L,), `codec_ids` (L, 16), `labels` (L,),
    `mtp_codes` (L, 16), all int32, and `positions` (3, L) float32; L = U + 9 + T.
  """
  tok = ids
  seq = np.asarray(thinker_ids)
  if seq.ndim != 1 or seq.size == 0 or not np.issubdtype(seq.dtype, np.integer):
    raise ValueError(
      f"thinker_ids must be a non-empty 1-D integer array, got shape {seq.shape} ({seq.dtype})."
    )
  codes = np.asarray(codes)
  if codes.ndim != 2 or codes.shape[0] != NUM_CODE_GROUPS or codes.shape[1] < 1:
    raise ValueError(
      f"codes must have shape ({NUM_CODE_GROUPS}, T) with T >= 1, got {codes.shape}."
    )
  if not np.issubdtype(codes.dtype, np.integer):
    raise ValueError(f"codes must be integers, got {codes.dtype}.")
  if codes.min() < 0 or codes.max() >= codebook_size:
    raise ValueError(
      f"codes must lie in [0, {codebook_size}), got values in [{codes.min()}, {codes.max()}]."
    )
  if int(speaker_id) < 0:
    raise ValueError(f"speaker_id must be a talker-vocabulary id, got {speaker_id}.")

  s = len(seq)
  starts = np.flatnonzero((seq[:-1] == tok.im_start) & (seq[1:] == tok.assistant))
  if not len(starts):
    raise ValueError("thinker_ids has no `<|im_start|> assistant` turn to speak.")
  a = int(starts[-1])
  if np.any(seq[a + 1 :] == tok.im_start):
    raise ValueError(
      "thinker_ids must end with the spoken assistant turn: another <|im_start|> follows the last "
      f"`<|im_start|> assistant` (at {a})."
    )
  # Spoken text tokens c_0..c_{K-1} sit at a+3 .. s-2; the final token is not fed.
  k = s - 1 - (a + 3)
  if k < 1:
    raise ValueError(
      "The spoken assistant turn is empty: after `<|im_start|> assistant \\n` it needs at least one "
      f"text token before the final (<|im_end|>) token; got {s - a} token(s) from position {a}."
    )
  placeholders = np.array([tok.audio, tok.image, tok.video])
  if np.isin(seq[a:], placeholders).any():
    raise ValueError("The spoken assistant turn contains an audio/image/video placeholder.")

  user = _user_positions(seq, tok)
  u, t = len(user), codes.shape[1]
  n = u + NUM_ASSISTANT_SLOTS + t
  p8 = u + 8  # A8: predicts codebook 0 of frame 0
  frame = np.arange(t)

  text_ids = np.empty(n, np.int32)
  text_ids[:u] = seq[user]
  text_ids[u : u + 3] = seq[a : a + 3]
  text_ids[u + 3 : u + 7] = tok.tts_pad
  text_ids[u + 7] = tok.tts_bos
  text_ids[p8] = seq[a + 3]
  trailing = np.full(t, tok.tts_pad, np.int32)
  spoken = frame[frame + 1 <= k - 1]
  trailing[spoken] = seq[a + 4 + spoken]
  if k - 1 < t:
    trailing[k - 1] = tok.tts_eos
  text_ids[p8 + 1 :] = trailing

  thinker_index = np.full(n, -1, np.int32)
  is_mm = np.isin(seq[user], placeholders)
  thinker_index[:u][is_mm] = user[is_mm]

  codec_ids = np.full((n, NUM_CODE_GROUPS), -1, np.int32)
  codec_ids[u + 3 : u + 9, 0] = [
    tok.codec_nothink,
    tok.codec_think_bos,
    tok.codec_think_eos,
    speaker_id,
    tok.codec_pad,
    tok.codec_bos,
  ]
  codec_ids[p8 + 1 :] = codes.T

  labels = np.full(n, -1, np.int32)
  labels[p8 : p8 + t] = codes[0]
  labels[p8 + t] = tok.codec_eos

  mtp_codes = np.full((n, NUM_CODE_GROUPS), -1, np.int32)
  mtp_codes[p8 : p8 + t] = codes.T

  prefix_ids = np.concatenate([seq[user], np.full(NUM_ASSISTANT_SLOTS, tok.tts_pad, seq.dtype)])
  has_grids = any(g is not None and np.size(g) > 0 for g in (image_grid_thw, video_grid_thw))
  user_vision = np.isin(seq[user], [tok.image, tok.video])
  if not has_grids:
    if user_vision.any():
      raise ValueError(
        "The user turns contain image/video placeholders: pass image_grid_thw / video_grid_thw "
        "(and video_second_per_grid) for their M-RoPE positions."
      )
    pos = np.broadcast_to(np.arange(n, dtype=np.float32), (3, n)).copy()
  else:
    if tok.vision_start is None or tok.audio_start is None:
      raise ValueError(
        "Positions with image/video grids need ids.vision_start and ids.audio_start."
      )
    grids = _grids_in(seq, user, tok, image_grid_thw, video_grid_thw, video_second_per_grid)
    prefix, _ = positions_lib.rope_index(
      prefix_ids,
      tokens=positions_lib.TokenIds(
        image=tok.image,
        video=tok.video,
        audio=tok.audio,
        vision_start=tok.vision_start,
        audio_start=tok.audio_start,
      ),
      image_grid_thw=grids[0],
      video_grid_thw=grids[1],
      video_second_per_grid=grids[2],
      spatial_merge_size=spatial_merge_size,
      position_id_per_seconds=position_id_per_seconds,
      dtype=np.float32,
    )
    pos = np.empty((3, n), np.float32)
    pos[:, : u + NUM_ASSISTANT_SLOTS] = prefix
    # As generation's rope delta, in float32 (only matters for fractional video positions).
    delta = prefix.max() + np.float32(1) - np.float32(u + NUM_ASSISTANT_SLOTS)
    pos[:, u + NUM_ASSISTANT_SLOTS :] = (u + NUM_ASSISTANT_SLOTS + frame).astype(np.float32) + delta

  return dict(
    text_ids=text_ids,
    thinker_index=thinker_index,
    codec_ids=codec_ids,
    labels=labels,
    mtp_codes=mtp_codes,
    positions=pos,
  )
