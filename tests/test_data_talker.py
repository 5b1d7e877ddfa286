"""Spoken sources in the mixed-modality pipeline: the Talker's rows are packed with the
Thinker's, per document, and point back into their own Thinker row.

Records (`helpers.write_spoken_records`) carry an image (spoken captions), their speech and its
stored codes, so the `speech_codes` op only checks them and no codec runs here.
"""

import ml_collections
import numpy as np
import pytest

from data_pipelines import omni, tokenizer as tok_lib
from omnijax.models import presets
from omnijax.models.config import TalkerConfig, ThinkerConfig
from tests import helpers
from tests.helpers import write_text_corpus

SEQ, TALKER_SEQ, MTP_ROWS = 160, 160, 96
BUCKETS = dict(audio_frames=(800,), audios_per_row=4, image_patches=(512,), video_patches=(768,))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp("talker_data")
  tok = tok_lib.local_tokenizer(write_text_corpus(root / "text", num_docs=200), vocab_size=1024)
  codes = helpers.write_spoken_records(root / "speech")
  return root, tok, codes


def _configs():
  thinker = presets.get("tiny")
  thinker.text.vocab_size = 1024
  return ThinkerConfig.from_dict(thinker), TalkerConfig.from_dict(presets.get_talker("tiny"))


def _dataset(root, tok, **over):
  codec = str(root)  # any directory: stored codes are only checked
  d = ml_collections.ConfigDict(
    dict(
      mixture=dict(
        tts=dict(path=str(root / "speech"), task="tts", weight=1.0, codec=codec),
        spoken=dict(path=str(root / "speech"), task="spoken_asr", weight=1.0, codec=codec),
        caption=dict(path=str(root / "speech"), task="spoken_caption", weight=1.0, codec=codec),
      ),
      shuffle=True,
      num_epochs=None,
      worker_count=0,
      estimate_samples=4,
      buckets=BUCKETS,
      talker_seq_len=TALKER_SEQ,
      talker_mtp_rows=MTP_ROWS,
    )
  )
  if "mixture" in over:
    d.mixture = ml_collections.ConfigDict(over.pop("mixture"))
  d.update(over)
  thinker, talker = _configs()
  return omni.make_omni_dataset(
    d,
    tokenizer=tok,
    model_cfg=thinker,
    seq_len=SEQ,
    batch_size=4,
    process_index=0,
    process_count=1,
    seed=0,
    talker_cfg=talker,
  )


def test_talker_rows_follow_their_thinker_rows(corpus):
  root, tok, _ = corpus
  thinker, talker = _configs()
  batch = next(iter(_dataset(root, tok)))
  assert batch["talker_codec_ids"].shape == (4, TALKER_SEQ, 16)
  assert batch["talker_positions"].shape == (4, 3, TALKER_SEQ)
  assert batch["talker_mtp_codes"].shape == (4, MTP_ROWS, 16)
  spoken_docs, media_kinds = 0, set()
  for b in range(4):
    seg, tseg = batch["segment_ids"][b], batch["talker_segment_ids"][b]
    for s in np.unique(tseg[tseg > 0]):
      spoken_docs += 1
      where = tseg == s
      # the Talker document's hidden-state positions are its own Thinker document's audio or
      # image placeholders; at an image the Talker's M-RoPE ids are 3-D (t, h, w differ)
      index = batch["talker_thinker_index"][b][where]
      mm = index[index >= 0]
      assert (seg[mm] == s).all()
      placeholder = set(batch["inputs"][b][mm])
      assert placeholder <= {thinker.audio_token_id, thinker.image_token_id}
      media_kinds |= placeholder
      pos = batch["talker_positions"][b][:, where]
      three_d = (pos[1] != pos[2]).any()
      assert three_d == (thinker.image_token_id in placeholder)
      text_ids = batch["talker_text_ids"][b][where]
      assert (text_ids == talker.tts_bos_token_id).sum() == 1
      assert (text_ids == talker.tts_eos_token_id).sum() <= 1
      # T frames: T + 1 codebook-0 targets (the last is EOS) and T MTP rows whose codebook 0
      # is the target at their conditioning position
      labels = batch["talker_labels"][b][where]
      frames = int((labels >= 0).sum()) - 1
      assert labels[labels >= 0][-1] == talker.codec_eos_token_id
      rows = np.isin(batch["talker_mtp_index"][b], np.flatnonzero(where)) & (
        batch["talker_mtp_codes"][b][:, 0] >= 0
      )
      assert rows.sum() == frames
      at = batch["talker_mtp_index"][b][rows]
      np.testing.assert_array_equal(
        batch["talker_labels"][b][at], batch["talker_mtp_codes"][b][rows][:, 0]
      )
  assert spoken_docs >= 4 and media_kinds == {thinker.audio_token_id, thinker.image_token_id}
  assert {int(t) for t in np.unique(batch["task_ids"]) if t >= 0} == {0, 1, 2}


def test_stored_codes_reach_the_talker_and_restore_is_exact(corpus):
  root, tok, codes = corpus
  it = iter(_dataset(root, tok))
  next(it)
  state = it.get_state()
  want = next(it)
  again = iter(_dataset(root, tok))
  again.set_state(state)
  got = next(again)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  # every frame fed to the Talker is a frame of one of the records' stored codes
  known = {tuple(f) for c in codes.values() for f in c.T}
  fed = want["talker_codec_ids"].reshape(-1, 16)
  frames = fed[(fed >= 0).all(-1)]
  assert len(frames) and all(tuple(f) in known for f in frames)


def test_talker_config_errors(corpus):
  root, tok, _ = corpus
  with pytest.raises(ValueError, match="needs `codec`"):
    _dataset(root, tok, mixture=dict(tts=dict(path=str(root / "speech"), task="tts", weight=1.0)))
  with pytest.raises(ValueError, match="speaker 'nobody'"):
    _dataset(
      root,
      tok,
      mixture=dict(
        tts=dict(
          path=str(root / "speech"), task="tts", weight=1.0, codec=str(root), speaker="nobody"
        )
      ),
    )


def test_a_talker_document_longer_than_its_row_is_skipped(corpus):
  root, tok, _ = corpus
  it = iter(
    _dataset(
      root,
      tok,
      talker_seq_len=45,
      mixture=dict(
        tts=dict(path=str(root / "speech"), task="tts", weight=1.0, codec=str(root)),
        text=dict(path=str(root / "text"), task="text", weight=1.0),
      ),
    )
  )
  batches = [next(it) for _ in range(4)]
  assert 0 < sum((b["talker_segment_ids"] > 0).sum() for b in batches)
  assert it.skipped_records.get("too_long", 0) > 0


def test_batch_spec_is_the_pipelines_batch(corpus):
  """What omnijax.aot traces: the keys, shapes and dtypes of the pipeline's batch (one bucket
  per media kind here, so the largest is the one used)."""
  root, tok, _ = corpus
  thinker, talker = _configs()
  batch = next(iter(_dataset(root, tok)))
  d = ml_collections.ConfigDict(
    dict(
      mixture=dict(a=dict(task="spoken_asr"), c=dict(task="spoken_caption"), t=dict(task="tts")),
      buckets=BUCKETS,
      talker_seq_len=TALKER_SEQ,
      talker_mtp_rows=MTP_ROWS,
    )
  )
  spec = omni.batch_spec(d, thinker, 4, SEQ, talker)
  got = {k: (v.shape, v.dtype) for k, v in batch.items() if k != "skipped"}
  assert spec == got
