"""`omnijax.processing.positions.rope_index` equals transformers' Qwen3-Omni `get_rope_index` exactly.

The reference is `Qwen3OmniMoePreTrainedModelForConditionalGeneration.get_rope_index` (the method
`Qwen3OmniMoeThinkerForConditionalGeneration` inherits), called with a real
`Qwen3OmniMoeThinkerConfig` carrying the released token ids, without building the model.
Placeholder counts follow the processor: image/video t*h*w/merge^2, audio
`_get_feat_extract_output_lengths(mel_frames)`, audio-in-video laid out by the processor's own
`replace_video_with_audio_token`. Every comparison is `np.array_equal` on the full (3, B, S)
positions (padded slots included) and the (B, 1) rope deltas.
"""

import dataclasses
import types

import numpy as np
import pytest

from omnijax.processing import positions as P
from omnijax.models.config import ThinkerConfig
from omnijax.models import presets

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as hf_modeling  # noqa: E402
from transformers.models.qwen3_omni_moe import processing_qwen3_omni_moe as hf_processing  # noqa: E402
from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import (  # noqa: E402
  Qwen3OmniMoeThinkerConfig,
)

T = P.QWEN3_OMNI_TOKENS
PPS = 13
MERGE = 2
RNG = np.random.default_rng(0)
_REF_CLS = hf_modeling.Qwen3OmniMoePreTrainedModelForConditionalGeneration


@pytest.fixture(scope="module")
def ref():
  config = Qwen3OmniMoeThinkerConfig(
    audio_token_id=T.audio,
    image_token_id=T.image,
    video_token_id=T.video,
    audio_start_token_id=T.audio_start,
    vision_start_token_id=T.vision_start,
    position_id_per_seconds=PPS,
  )
  model = types.SimpleNamespace(
    config=config, spatial_merge_size=config.vision_config.spatial_merge_size
  )
  model.get_llm_pos_ids_for_vision = types.MethodType(_REF_CLS.get_llm_pos_ids_for_vision, model)
  return model


def test_reference_is_the_thinkers_method():
  thinker = hf_modeling.Qwen3OmniMoeThinkerForConditionalGeneration
  assert thinker.get_rope_index is _REF_CLS.get_rope_index
  assert thinker.get_llm_pos_ids_for_vision is _REF_CLS.get_llm_pos_ids_for_vision


# ---- sequence builders (placeholder counts as the processor makes them) -------------------------


def text(n):
  return [int(x) for x in RNG.integers(0, 150000, n)]


def image(grid):
  n = int(np.prod(grid)) // MERGE**2
  return [T.vision_start] + [T.image] * n + [T.vision_end]


def video(grid):
  n = int(np.prod(grid)) // MERGE**2
  return [T.vision_start] + [T.video] * n + [T.vision_end]


def audio(mel):
  n = int(hf_modeling._get_feat_extract_output_lengths(torch.tensor(mel)))
  return [T.audio_start] + [T.audio] * n + [T.audio_end]


def audio_in_video(grid, seconds_per_grid, mel):
  """The processor's layout: its replace_video_with_audio_token inside the chat template's
  <vision_start> ... <vision_end>."""
  proc = types.SimpleNamespace(
    video_processor=types.SimpleNamespace(merge_size=MERGE),
    audio_bos_token="<",
    audio_eos_token=">",
    video_token="V",
    audio_token="A",
  )
  n_audio = hf_processing._get_feat_extract_output_lengths(np.array([mel]))
  s = hf_processing.Qwen3OmniMoeProcessor.replace_video_with_audio_token(
    proc,
    {"video_grid_thw": [np.array(grid)], "video_second_per_grid": [seconds_per_grid]},
    0,
    {"num_audio_tokens": n_audio},
    0,
    position_id_per_seconds=PPS,
  )
  table = {"<": T.audio_start, ">": T.audio_end, "V": T.video, "A": T.audio}
  return [T.vision_start] + [table[c] for c in s] + [T.vision_end]


def fps_to_seconds(fps):
  return 2 / fps  # temporal_patch_size / fps, as the processor computes video_second_per_grid


# ---- comparison -----------------------------------------------------------------------------------


def pad_batch(rows, side="right"):
  s = max(map(len, rows))
  ids = np.zeros((len(rows), s), np.int64)
  mask = np.zeros((len(rows), s), np.int64)
  for i, r in enumerate(rows):
    sl = slice(0, len(r)) if side == "right" else slice(s - len(r), s)
    ids[i, sl] = r
    mask[i, sl] = 1
  return ids, mask


def reference(
  ref, ids, mask, *, images=None, videos=None, seconds=None, audios=None, use_audio_in_video=False
):
  t = lambda x, dt=torch.long: None if x is None else torch.tensor(np.asarray(x), dtype=dt)
  pos, delta = _REF_CLS.get_rope_index(
    ref,
    t(ids),
    image_grid_thw=t(images),
    video_grid_thw=t(videos),
    attention_mask=t(mask),
    use_audio_in_video=use_audio_in_video,
    audio_seqlens=t(audios),
    second_per_grids=t(seconds, torch.float64),
  )
  return pos.numpy(), delta.numpy()


def ours(
  ids,
  mask=None,
  *,
  images=None,
  videos=None,
  seconds=None,
  audios=None,
  use_audio_in_video=False,
  **kw,
):
  return P.rope_index(
    ids,
    tokens=T,
    image_grid_thw=images,
    video_grid_thw=videos,
    video_second_per_grid=seconds,
    audio_seqlens=audios,
    use_audio_in_video=use_audio_in_video,
    attention_mask=mask,
    spatial_merge_size=MERGE,
    position_id_per_seconds=PPS,
    **kw,
  )


def check(ref, rows, side="right", dtype=np.int32, **meta):
  ids, mask = pad_batch(rows, side)
  want_pos, want_delta = reference(ref, ids, mask, **meta)
  got_pos, got_delta = ours(ids, mask, dtype=dtype, **meta)
  assert got_pos.dtype == dtype and got_pos.shape == (3,) + ids.shape
  assert got_delta.dtype == dtype and got_delta.shape == (len(rows), 1)
  bad = np.flatnonzero((got_pos != want_pos).any(axis=(0, 1)))
  assert np.array_equal(got_pos, want_pos), f"first mismatching columns {bad[:10]}"
  assert np.array_equal(got_delta, want_delta), (got_delta.ravel(), want_delta.ravel())
  return got_pos, got_delta


# ---- cases ---------------------------------------------------------------------------------------


def test_text_only(ref):
  pos, delta = check(ref, [text(17)])
  assert np.array_equal(pos[:, 0], np.broadcast_to(np.arange(17), (3, 17)))
  assert delta.item() == 0


def test_one_image(ref):
  pos, _ = check(ref, [text(5) + image([1, 8, 12]) + text(4)], images=[[1, 8, 12]])
  block = pos[:, 0, 6 : 6 + 24]  # after 5 text + vision_start
  assert (block[0] == 6).all() and block[1].max() == 6 + 3 and block[2].max() == 6 + 5


def test_two_images_different_grids(ref):
  grids = [[1, 8, 12], [1, 30, 6]]
  check(ref, [text(3) + image(grids[0]) + text(7) + image(grids[1]) + text(2)], images=grids)
  # back to back, and an image at the very start / end
  check(ref, [image(grids[1]) + image(grids[0])], images=grids[::-1])


@pytest.mark.parametrize("fps", [(2.0, 0.5), (1.0, 2.0)])
def test_videos_at_two_fps_integral(ref, fps):
  grids = [[6, 8, 8], [4, 12, 4]]
  seconds = [fps_to_seconds(f) for f in fps]
  check(
    ref,
    [text(4) + video(grids[0]) + text(3) + video(grids[1]) + text(5)],
    videos=grids,
    seconds=seconds,
  )


@pytest.mark.parametrize("fps", [(3.0, 4.0), (1.5, 24.0)])
def test_videos_at_two_fps_fractional(ref, fps):
  """The reference keeps t_index * seconds_per_grid * 13 in float32 without rounding."""
  grids = [[6, 8, 8], [4, 12, 4]]
  seconds = [fps_to_seconds(f) for f in fps]
  rows = [text(4) + video(grids[0]) + text(3) + video(grids[1]) + text(5)]
  pos, _ = check(ref, rows, dtype=np.float32, videos=grids, seconds=seconds)
  assert np.any(pos != np.floor(pos))
  ids, mask = pad_batch(rows)
  with pytest.raises(ValueError, match="fractional"):
    ours(ids, mask, videos=grids, seconds=seconds)


@pytest.mark.parametrize("mel", [[1, 99, 100, 101, 799], [800, 801, 1234, 2000, 3001]])
def test_audio_shorter_and_longer_than_8s(ref, mel):
  rows = [text(3) + sum((audio(m) + text(2) for m in mel), [])]
  # With no grids the reference takes its 1-D branch.
  check(ref, rows, audios=mel)
  # With a grid it walks the audio segments; an image forces that path.
  check(ref, [rows[0] + image([1, 4, 4])], audios=mel, images=[[1, 4, 4]])
  # audio_seqlens is optional here: standalone audio ids never depend on it.
  ids, mask = pad_batch([rows[0] + image([1, 4, 4])])
  want = reference(ref, ids, mask, audios=mel, images=[[1, 4, 4]])
  got = ours(ids, mask, images=[[1, 4, 4]])
  assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


AIV_CASES = [  # (grid, fps, mel frames)
  ([4, 8, 8], 2.0, 400),  # audio as long as the video
  ([6, 4, 6], 2.0, 1234),  # audio outlasts the video: audio tail is the last piece
  ([8, 6, 6], 2.0, 150),  # video outlasts the audio: video tail is the last piece
  ([2, 40, 40], 1.0, 350),  # short audio under large frames
  ([1, 60, 8], 2.0, 99),  # audio tail is last piece but the video's H ids go higher (quirk)
  ([10, 4, 4], 0.5, 2600),  # 4 s per temporal patch
]


@pytest.mark.parametrize("grid,fps,mel", AIV_CASES)
def test_audio_in_video(ref, grid, fps, mel):
  sec = fps_to_seconds(fps)
  span = audio_in_video(grid, sec, mel)
  assert np.array_equal(
    P.audio_in_video_layout(grid, sec, P.audio_token_count(mel), tokens=T), span
  )
  pos, _ = check(
    ref,
    [text(3) + span + text(4)],
    videos=[grid],
    seconds=[sec],
    audios=[mel],
    use_audio_in_video=True,
  )
  # audio_seqlens optional: audio-in-video lengths are then read from the span.
  ids, mask = pad_batch([text(3) + span + text(4)])
  got, _ = ours(ids, mask, videos=[grid], seconds=[sec])
  assert np.array_equal(got[:, 0], pos[:, 0])


def test_audio_in_video_fractional_fps(ref):
  grid, sec, mel = [6, 8, 8], fps_to_seconds(3.0), 700
  check(
    ref,
    [text(3) + audio_in_video(grid, sec, mel) + text(4)],
    dtype=np.float32,
    videos=[grid],
    seconds=[sec],
    audios=[mel],
    use_audio_in_video=True,
  )


def mixed_plain():
  images = [[1, 8, 12], [1, 30, 6], [2, 8, 8]]
  videos = [[6, 8, 8], [4, 12, 4]]
  seconds = [fps_to_seconds(2.0), fps_to_seconds(0.5)]
  mels = [350, 1234, 99]
  row = (
    text(6)
    + image(images[0])
    + text(3)
    + audio(mels[0])
    + video(videos[0])
    + text(2)
    + image(images[1])
    + audio(mels[1])
    + text(5)
    + video(videos[1])
    + audio(mels[2])
    + image(images[2])
    + text(3)
  )
  return row, dict(images=images, videos=videos, seconds=seconds, audios=mels)


def mixed_aiv():
  images = [[1, 8, 12], [1, 4, 4]]
  videos = [[4, 8, 8], [3, 20, 4]]
  seconds = [fps_to_seconds(2.0), fps_to_seconds(1.0)]
  mels = [350, 400, 2000, 99]  # order of appearance, audio-in-video audios included
  row = (
    text(4)
    + image(images[0])
    + audio(mels[0])
    + text(2)
    + audio_in_video(videos[0], seconds[0], mels[1])
    + text(3)
    + audio(mels[2])
    + audio_in_video(videos[1], seconds[1], mels[3])
    + image(images[1])
    + text(2)
  )
  return row, dict(
    images=images, videos=videos, seconds=seconds, audios=mels, use_audio_in_video=True
  )


def test_everything_mixed_in_one_sequence(ref):
  row, meta = mixed_plain()
  check(ref, [row], **meta)
  row, meta = mixed_aiv()
  check(ref, [row], **meta)


def test_plain_video_and_audio_in_video_together(ref):
  """The reference needs use_audio_in_video to match every video of the batch, so it cannot take
  both kinds at once; here they compose like any two segments (ids shifted by the prefix's end)."""
  grid, sec = [4, 8, 8], fps_to_seconds(2.0)
  first = text(3) + video(grid) + text(2)
  second = audio_in_video([3, 4, 8], sec, 500) + text(3)
  p1, d1 = reference(ref, *pad_batch([first]), videos=[grid], seconds=[sec])
  p2, _ = reference(
    ref,
    *pad_batch([second]),
    videos=[[3, 4, 8]],
    seconds=[sec],
    audios=[500],
    use_audio_in_video=True,
  )
  got, _ = ours(
    np.array([first + second]), videos=[grid, [3, 4, 8]], seconds=[sec, sec], audios=[500]
  )
  shift = p1.max() + 1
  assert np.array_equal(got[:, 0], np.concatenate([p1[:, 0], p2[:, 0] + shift], axis=1))


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batches(ref, side):
  row_a, meta_a = mixed_plain()
  # Multimodal branch: padded slots are 0 in the reference.
  rows = [text(9) + image([1, 4, 8]) + text(2), row_a, text(1)]
  meta = dict(
    images=[[1, 4, 8]] + meta_a["images"],
    videos=meta_a["videos"],
    seconds=meta_a["seconds"],
    audios=meta_a["audios"],
  )
  check(ref, rows, side=side, **meta)
  # Audio-in-video rows.
  row_b, meta_b = mixed_aiv()
  check(ref, [text(3), row_b, text(40)], side=side, **meta_b)
  # Text-only branch (no grids): padded slots are 1, and a single-token padded row has delta 1.
  pos, delta = check(ref, [text(12), text(5) + audio(777), text(1)], side=side, audios=[777])
  assert delta.ravel().tolist() == [0, 0, 1]


def test_mask_with_holes(ref):
  row, meta = mixed_plain()
  ids = np.array([row[:40] + text(5) + row[40:]])
  mask = np.ones_like(ids)
  mask[0, 40:45] = 0
  want = reference(ref, ids, mask, **meta)
  got = ours(ids, mask, **meta)
  assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


def test_packed_rows_equal_documents_alone(ref):
  doc_plain, meta_plain = mixed_plain()
  doc_aiv, meta_aiv = mixed_aiv()
  doc_img = text(3) + image([1, 8, 8]) + text(5)
  doc_txt = text(11)
  # Row 0: plain, text, image; row 1: aiv, text, then padding.
  row0 = [doc_plain, doc_txt, doc_img]
  row1 = [doc_aiv, doc_txt]
  s = max(sum(map(len, row0)), sum(map(len, row1))) + 7
  ids = np.zeros((2, s), np.int64)
  seg = np.zeros((2, s), np.int32)
  for b, docs in enumerate([row0, row1]):
    at = 0
    for k, d in enumerate(docs):
      ids[b, at : at + len(d)] = d
      seg[b, at : at + len(d)] = k + 1
      at += len(d)
  metas = {
    id(doc_plain): meta_plain,
    id(doc_aiv): meta_aiv,
    id(doc_img): dict(images=[[1, 8, 8]]),
    id(doc_txt): {},
  }
  images = meta_plain["images"] + [[1, 8, 8]] + meta_aiv["images"]
  videos = meta_plain["videos"] + meta_aiv["videos"]
  seconds = meta_plain["seconds"] + meta_aiv["seconds"]
  audios = meta_plain["audios"] + meta_aiv["audios"]
  got_pos, got_delta = ours(
    ids, segment_ids=seg, images=images, videos=videos, seconds=seconds, audios=audios
  )
  for b, docs in enumerate([row0, row1]):
    at = 0
    for d in docs:
      meta = metas[id(d)]
      if not meta.get("images") and not meta.get("videos"):
        meta = dict(meta, images=np.zeros((0, 3), np.int64))  # reference's multimodal branch
      want_pos, want_delta = reference(ref, *pad_batch([d]), **meta)
      assert np.array_equal(got_pos[:, b, at : at + len(d)], want_pos[:, 0])
      at += len(d)
    assert got_delta[b, 0] == want_delta[0, 0]  # the last document's delta
    assert (got_pos[:, b, at:] == 0).all()
  # attention_mask alongside segment_ids must agree with it.
  same = ours(
    ids,
    (seg > 0).astype(np.int64),
    segment_ids=seg,
    images=images,
    videos=videos,
    seconds=seconds,
    audios=audios,
  )
  assert np.array_equal(same[0], got_pos)
  # Text-only packing.
  pos, delta = ours(np.array([text(10)]), segment_ids=np.array([[1, 1, 1, 2, 2, 0, 3, 3, 3, 0]]))
  assert pos[0, 0].tolist() == [0, 1, 2, 0, 1, 0, 0, 1, 2, 0] and delta.item() == 0


def test_one_dimensional_input(ref):
  row, meta = mixed_plain()
  pos, delta = ours(np.array(row), **meta)
  want_pos, want_delta = ours(np.array([row]), **meta)
  assert pos.shape == (3, len(row)) and delta.shape == (1,)
  assert np.array_equal(pos, want_pos[:, 0]) and np.array_equal(delta, want_delta[0])


def test_token_count_helpers():
  mel = np.arange(0, 5000)
  want = hf_modeling._get_feat_extract_output_lengths(torch.tensor(mel)).numpy()
  assert np.array_equal(P.audio_token_count(mel), want)
  assert P.audio_token_count(100) == 13 and P.audio_token_count(800) == 104
  assert isinstance(P.audio_token_count(np.int64(1234)), int)
  assert P.image_token_count([1, 28, 40]) == 280
  assert P.image_token_count([4, 8, 8], 2) == 64
  assert P.image_token_count(np.array([[1, 4, 4], [2, 8, 4]])).tolist() == [4, 16]


def test_token_ids_from_config():
  tiny = ThinkerConfig.from_dict(presets.get("tiny"))
  got = P.TokenIds.from_config(tiny)
  assert (
    got.image,
    got.video,
    got.audio,
    got.vision_start,
    got.audio_start,
    got.vision_end,
    got.audio_end,
  ) == (
    tiny.image_token_id,
    tiny.video_token_id,
    tiny.audio_token_id,
    tiny.vision_start_token_id,
    tiny.audio_start_token_id,
    tiny.vision_end_token_id,
    tiny.audio_end_token_id,
  )
  released = ThinkerConfig(text=tiny.text)  # the dataclass defaults are the released ids
  assert P.TokenIds.from_config(released) == T
  kw = P.rope_kwargs_from_config(released)
  assert kw["tokens"] == T and kw["spatial_merge_size"] == 2
  assert kw["position_id_per_seconds"] == 13 and kw["n_window"] == 50
  # A transformers thinker config works too (it has no end-marker ids).
  hf = Qwen3OmniMoeThinkerConfig(
    audio_token_id=T.audio,
    audio_start_token_id=T.audio_start,
    vision_start_token_id=T.vision_start,
    position_id_per_seconds=PPS,
  )
  kw = P.rope_kwargs_from_config(hf)
  assert kw["tokens"] == dataclasses.replace(T, vision_end=None, audio_end=None)
  assert kw["spatial_merge_size"] == 2 and kw["position_id_per_seconds"] == 13


def test_malformed_inputs_raise():
  img = text(2) + image([1, 4, 4]) + text(2)
  with pytest.raises(ValueError, match="no entry in image_grid_thw"):
    ours(np.array([img + img]), images=[[1, 4, 4]])
  with pytest.raises(ValueError, match="lists 2 items"):
    ours(np.array([img]), images=[[1, 4, 4], [1, 4, 4]])
  with pytest.raises(ValueError, match="placeholder count"):
    ours(np.array([img + text(10)]), images=[[1, 4, 8]])
  with pytest.raises(ValueError, match="sequence ends first|truncated"):
    ours(np.array([img[:6]]), images=[[1, 4, 4]])
  with pytest.raises(ValueError, match="neither image_grid_thw"):
    ours(np.array([img]))
  with pytest.raises(ValueError, match="video_second_per_grid"):
    ours(np.array([video([2, 4, 4])]), videos=[[2, 4, 4]])
  seg = np.array([[1, 1, 2, 0]])
  with pytest.raises(ValueError, match="disagree"):
    ours(np.array([text(4)]), np.array([[1, 1, 1, 1]]), segment_ids=seg)
