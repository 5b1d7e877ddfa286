"""The mixed-modality pipeline: token ratios, document isolation in packed rows, exact restore,
disjoint hosts, counted skips of bad inputs, bounded media shapes."""

import copy
import io
import shutil

import ml_collections
import numpy as np
import pytest
import soundfile

from data_pipelines import inputs as inputs_lib
from data_pipelines import omni, records, tokenizer as tok_lib
from omnijax.models import presets
from omnijax.processing import batch as batch_lib
from omnijax.processing import positions
from omnijax.models.config import ThinkerConfig

SEQ = 384
BUCKETS = dict(audio_frames=(800,), audios_per_row=8, image_patches=(512,), video_patches=(768,))


@pytest.fixture(scope="module")
def corpora(media_corpus, text_corpus):
  return media_corpus, text_corpus, tok_lib.local_tokenizer(text_corpus, vocab_size=1024)


def _cfg(media, text, **overrides):
  mixture = dict(
    text=dict(path=str(text), task="text", weight=0.57),
    image=dict(path=str(media / "caption"), task="caption", weight=0.82),
    audio=dict(path=str(media / "asr"), task="asr", weight=0.77),
    video=dict(
      path=str(media / "video"),
      task="video",
      weight=0.3,
      ops=("decode_text", "decode_video(fps=2.0, min_pixels=12288)"),
    ),
  )
  d = dict(
    mixture=mixture,
    shuffle=True,
    num_epochs=None,
    worker_count=0,
    estimate_samples=8,
    buckets=BUCKETS,
  )
  d.update(overrides)
  return ml_collections.ConfigDict(d)


def _wav(samples: np.ndarray) -> bytes:
  buf = io.BytesIO()
  soundfile.write(buf, samples, 16000, format="WAV", subtype="FLOAT")
  return buf.getvalue()


def _model_cfg():
  cd = presets.get("tiny")
  return ThinkerConfig.from_dict(cd)


def _dataset(cfg, tok, batch=4, process_index=0, process_count=1):
  return omni.make_omni_dataset(
    cfg,
    tokenizer=tok,
    model_cfg=_model_cfg(),
    seq_len=SEQ,
    batch_size=batch,
    process_index=process_index,
    process_count=process_count,
    seed=0,
  )


def test_token_proportions_follow_the_configured_ratios(corpora):
  media, text, tok = corpora
  cfg = _cfg(media, text)
  it = iter(_dataset(cfg, tok))
  names = omni.task_names(cfg)
  counts = np.zeros(len(names))
  for _ in range(40):
    batch = next(it)
    counts += [(batch["task_ids"] == k).sum() for k in range(len(names))]
  want = np.array([cfg.mixture[n].weight for n in names])
  observed, want = counts / counts.sum(), want / want.sum()
  print(f"\n{names}: observed {np.round(observed, 3)}, configured {np.round(want, 3)}")
  np.testing.assert_allclose(observed, want, atol=0.06)


def test_rows_keep_documents_apart_and_media_match_placeholders(corpora):
  media, text, tok = corpora
  mc = _model_cfg()
  it = iter(_dataset(_cfg(media, text), tok))
  for _ in range(6):
    b = next(it)
    batch_lib.validate(b)
    for r in range(b["inputs"].shape[0]):
      seg, ids = b["segment_ids"][r], b["inputs"][r]
      assert (b["loss_mask"][r][seg == 0] == 0).all() and (b["task_ids"][r][seg == 0] == -1).all()
      for s in np.unique(seg[seg > 0]):
        where = np.flatnonzero(seg == s)
        assert (np.diff(where) == 1).all()  # contiguous
        doc_pos = b["positions"][r][:, where]
        assert (doc_pos[:, 0] == 0).all()  # positions restart at every document
        if not np.isin(ids[where], [mc.image_token_id, mc.audio_token_id, mc.video_token_id]).any():
          np.testing.assert_array_equal(
            doc_pos, np.broadcast_to(np.arange(len(where)), doc_pos.shape)
          )
        # labels never point into the next document: the last target is this document's EOS
        assert (
          b["targets"][r][where[-1]]
          in (tok.eos_id, ids[where[-1] + 1] if where[-1] + 1 < SEQ else tok.eos_id)
          or b["loss_mask"][r][where[-1]] == 1
        )
      # the row's media fill exactly its placeholders
      n_img = int((ids == mc.image_token_id).sum())
      merged = (b["image_segment_ids"][r][::4] > 0).sum()
      assert n_img == merged
      n_vid = int((ids == mc.video_token_id).sum())
      assert n_vid == (b["video_segment_ids"][r][::4] > 0).sum()
      n_aud = int((ids == mc.audio_token_id).sum())
      assert n_aud == sum(positions.audio_token_count(int(n)) for n in b["audio_lengths"][r])
    # every batch has the same media shapes (one compilation)
    assert b["audio_features"].shape == (4, 8, 128, 800)
    assert b["image_patches"].shape[1] == 512 and b["video_patches"].shape[1] == 768


def test_restore_mid_stream_yields_the_same_batches(corpora):
  media, text, tok = corpora
  cfg = _cfg(media, text)
  it = iter(_dataset(cfg, tok))
  for _ in range(3):
    next(it)
  state = copy.deepcopy(it.get_state())
  expected = [next(it) for _ in range(4)]
  fresh = iter(_dataset(cfg, tok))
  fresh.set_state(state)
  for want in expected:
    got = next(fresh)
    assert set(got) == set(want)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  assert fresh.skipped_records == it.skipped_records


def test_hosts_read_disjoint_examples_covering_the_source(corpora):
  media, _, tok = corpora
  spec = ml_collections.ConfigDict(dict(path=str(media / "caption"), task="caption", weight=1.0))
  seen = []
  for host in range(2):
    _, ds = omni._source_dataset(
      "image",
      spec,
      0,
      tokenizer=tok,
      model_cfg=_model_cfg(),
      seq_len=SEQ,
      seed=0,
      shuffle=True,
      process_index=host,
      process_count=2,
      num_epochs=1,
    )
    seen.append([tok.decode(el["targets"][el["loss_mask"] > 0]) for el in ds])
  everything = records.open_shards(str(media / "caption"), "train")
  assert set(seen[0]).isdisjoint(seen[1])
  assert len(seen[0]) + len(seen[1]) == len(everything)


@pytest.mark.parametrize("by", ["tokens", "epochs"])
def test_hosts_compute_bit_identical_sampling_weights(corpora, by):
  """Every process draws the same examples to measure tokens per example and counts the examples
  of the whole source, so the sampling weights are equal to the last bit on every host, here on
  sources whose examples do not split evenly over 3 hosts and that are sampled in part."""
  media, text, tok = corpora
  cfg = _cfg(media, text, mixture_by=by, estimate_samples=4)
  sizes = {n: len(records.open_shards(cfg.mixture[n].path, "train")) for n in cfg.mixture}
  assert any(size % 3 for size in sizes.values()) and min(sizes.values()) > 4
  names = omni.task_names(cfg)
  per_host = [_dataset(cfg, tok, process_index=p, process_count=3).sources for p in range(3)]
  weights = [np.array([s[n]["sampling_weight"] for n in names]) for s in per_host]
  tokens = [np.array([s[n]["tokens_per_example"] for n in names]) for s in per_host]
  for p in (1, 2):
    assert weights[p].tobytes() == weights[0].tobytes()
    assert tokens[p].tobytes() == tokens[0].tobytes()
  assert [s[n]["examples"] for s in per_host for n in names] == [sizes[n] for n in names] * 3
  # The run's length under train.epochs: one pass over every source, on every host.
  want = sum(cfg.mixture[n].weight * sizes[n] * tokens[0][i] for i, n in enumerate(names))
  for s in per_host:
    assert inputs_lib.Inputs(None, True, names, tok, s).tokens_per_epoch(cfg.mixture) == want
  np.testing.assert_allclose(weights[0].sum(), 1.0)


def test_shards_that_disagree_with_their_manifest_are_refused(corpora, tmp_path):
  """A stale shard beside a prepared split (or a partial copy) would give hosts different
  sources: the split's manifest count must match what the shards hold."""
  media, _, _ = corpora
  prepared = shutil.copytree(media, tmp_path / "media")
  spec = ml_collections.ConfigDict(dict(path=str(prepared / "caption"), task="caption"))
  n = len(omni.open_source(spec))
  assert n == records.read_manifest(media)["splits"]["caption/train"]["num_records"]
  records.write_shards([{"text": "stale"}], tmp_path / "stale", "train", 1)
  shutil.copy(
    tmp_path / "stale" / records.shard_name("train", 0, 1),
    prepared / "caption" / records.shard_name("train", 0, 7),
  )
  with pytest.raises(ValueError, match=f"holds {n + 1} records but its manifest.json lists {n}"):
    omni.open_source(spec)


def test_bad_inputs_are_counted_and_good_examples_all_arrive(corpora, tmp_path):
  media, _, tok = corpora
  good = [
    records.decode_example(r)
    for r in list(records.open_shards(str(media / "caption"), "train"))[:6]
  ]
  audio_good = records.decode_example(records.open_shards(str(media / "asr"), "train")[0])
  bad = [
    dict(good[0], id="corrupt", image=good[0]["image"][:40]),  # truncated PNG
    dict(good[0], id="noimage", image=None),
    dict(good[0], id="missing", image="no/such/file.png"),
    dict(good[0], id="empty", text="   "),
    dict(good[0], id="utf8", text=b"\xff\xfe caption"),
  ]
  records.write_shards(good + bad, tmp_path / "caption", "train", num_shards=1)
  silent = dict(audio_good, id="silent", audio=_wav(np.zeros(16000, np.float32)))
  nan = dict(audio_good, id="nan", audio=_wav(np.full(16000, np.nan, np.float32)))
  records.write_shards([audio_good, silent, nan], tmp_path / "asr", "train", num_shards=1)
  cfg = _cfg(media, tmp_path, num_epochs=1, shuffle=False)
  cfg.mixture = dict(image=dict(path=str(tmp_path / "caption"), task="caption", weight=1.0))
  it = iter(_dataset(cfg, tok, batch=1))
  batches = list(it)
  documents = sum(len(np.unique(b["segment_ids"][0][b["segment_ids"][0] > 0])) for b in batches)
  captions = "".join(tok.decode(b["targets"][0][b["loss_mask"][0] > 0]) for b in batches)
  assert documents == len(good)
  assert all(g["text"].strip() in captions for g in good)
  skipped = it.skipped_records
  print("\nskipped:", {k: v for k, v in skipped.items() if v})
  assert skipped["undecodable"] == 2 and skipped["missing_media"] == 1
  assert skipped["empty"] == 1 and skipped["invalid_utf8"] == 1
  cfg.mixture = dict(audio=dict(path=str(tmp_path / "asr"), task="asr", weight=1.0))
  it = iter(_dataset(cfg, tok, batch=1))
  assert len(list(it)) == 1
  assert it.skipped_records["silent_audio"] == 1 and it.skipped_records["non_finite"] == 1


def test_restore_after_changing_the_mixture_weights(corpora):
  """Stages change weights: a state saved under one mixture restores under another."""
  media, text, tok = corpora
  it = iter(_dataset(_cfg(media, text), tok))
  for _ in range(2):
    next(it)
  state = copy.deepcopy(it.get_state())
  stage = _cfg(media, text)
  stage.mixture.video.weight = 0.9
  stage.mixture.text.weight = 0.1
  resumed = iter(_dataset(stage, tok))
  resumed.set_state(state)
  batch = next(resumed)
  assert batch["inputs"].shape == (4, SEQ) and (batch["segment_ids"] > 0).any()


def test_worker_processes_give_the_same_batches(corpora):
  media, text, tok = corpora
  inline = iter(_dataset(_cfg(media, text, worker_count=0), tok))
  workers = iter(_dataset(_cfg(media, text, worker_count=1), tok))
  for _ in range(2):
    a, b = next(inline), next(workers)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_a_mixture_source_may_be_a_tfds_builder(corpora):
  """data.mixture.NAME.tfds names a TensorFlow Datasets builder instead of a shard directory."""
  import tensorflow_datasets as tfds

  media, text, tok = corpora
  cfg = _cfg(media, text)
  cfg.mixture = dict(
    text=dict(path=str(text), task="text", weight=0.5),
    coco=dict(
      tfds="ref_coco",
      task="caption",
      weight=0.5,
      ops=("decode_text", "decode_image", "resize_image(max_pixels=65536)", "patchify_image"),
    ),
  )
  with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
    it = iter(_dataset(cfg, tok))
    batches = [next(it) for _ in range(3)]
  coco = omni.task_names(cfg).index("coco")
  assert any((b["task_ids"] == coco).any() for b in batches)
  assert sum(int((b["inputs"] == _model_cfg().image_token_id).sum()) for b in batches) > 0
