"""Tests of the local multimodal corpus (data_pipelines.local_media_corpus),
built at a reduced size: every modality present, decodable, sharing facts."""

import collections

import numpy as np
import pytest

from data_pipelines import local_media_corpus, ops, pipeline, records, tokenizer

NUM_FACTS = 12

_OPS = {
  "text": ["decode_text"],
  "caption": ["decode_text", "decode_image", "resize_image", "patchify_image"],
  "asr": ["decode_text", "decode_audio(truncate=False, max_seconds=30.0)", "log_mel"],
  "video": ["decode_text", "decode_video(min_pixels=4096, max_pixels=16384)", "log_mel"],
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  path = tmp_path_factory.mktemp("media_corpus")
  local_media_corpus.build_local_media_corpus(path, num_facts=NUM_FACTS, workers=1)
  return path


def _examples(path):
  """(split, example) of every shard the manifest lists ("task/split")."""
  out = []
  for name in records.read_manifest(path)["splits"]:
    task, split = name.split("/")
    source = records.open_shards(path / task, split)
    out += [(split, records.decode_example(source[i])) for i in range(len(source))]
  return out


def test_every_modality_present_and_decodable(corpus):
  manifest = records.read_manifest(corpus)
  num_motion = round(NUM_FACTS * local_media_corpus.MOTION_FRACTION)
  assert manifest["kind"] == local_media_corpus.KIND
  assert manifest["num_skipped"] == 0
  assert manifest["counts"]["task"] == {
    "text": NUM_FACTS,
    "asr": NUM_FACTS,
    "caption": NUM_FACTS - num_motion,
    "video": num_motion,
  }
  assert manifest["counts"]["modality"] == {
    "text": NUM_FACTS,
    "audio": NUM_FACTS,
    "image": NUM_FACTS - num_motion,
    "audio_video": num_motion,
  }
  built = {task: ops.build_ops(specs, ops.OpContext()) for task, specs in _OPS.items()}
  examples = _examples(corpus)
  assert len(examples) == manifest["num_examples"]
  for _, example in examples:
    for op in built[example["task"]]:
      example = op(example)
    if example["task"] == "caption":
      assert example["pixel_values"].shape == (64, 1536)  # 128x128 PNG.
    elif example["task"] == "asr":
      assert example["audio_features"].shape[0] == 128
      assert 0.5 < example["audio_seconds"] < 8.0
    elif example["task"] == "video":
      assert example["audio_in_video"]
      assert example["video_grid_thw"][0] >= 2
      assert example["video_second_per_grid"] == pytest.approx(1.0, rel=0.2)


def test_modalities_share_facts(corpus):
  by_fact = collections.defaultdict(dict)
  for split, example in _examples(corpus):
    by_fact[example["fact_id"]][example["task"]] = (split, example)
  assert len(by_fact) == NUM_FACTS
  for renderings in by_fact.values():
    sentence = renderings["asr"][1]["text"]
    assert sentence in renderings["text"][1]["text"]
    media_task = "video" if "video" in renderings else "caption"
    assert set(renderings) == {"text", "asr", media_task}
    assert renderings[media_task][1]["text"] == sentence
    assert len({split for split, _ in renderings.values()}) == 1
    if media_task == "video":
      assert " moves " in sentence


def test_build_is_idempotent(corpus):
  files = sorted(corpus.iterdir())
  mtimes = [f.stat().st_mtime_ns for f in files]
  local_media_corpus.build_local_media_corpus(corpus, num_facts=NUM_FACTS)
  assert [f.stat().st_mtime_ns for f in sorted(corpus.iterdir())] == mtimes


def test_refuses_other_datasets(tmp_path):
  records.write_shards([{"text": "x"}], tmp_path, "train", 1)
  records.write_manifest(
    tmp_path,
    {"kind": "other", "splits": {"train": {"files": ["train.array_record-00000-of-00001"]}}},
  )
  with pytest.raises(ValueError, match="another dataset"):
    local_media_corpus.build_local_media_corpus(tmp_path, num_facts=3)


def test_facts_are_distinct_and_deterministic():
  facts = local_media_corpus.make_facts(50)
  assert len({f["sentence"] for f in facts}) == 50
  assert [f["sentence"] for f in facts] == [
    f["sentence"] for f in local_media_corpus.make_facts(50)
  ]
  image = local_media_corpus.render_image(facts[-1], np.random.default_rng(0))
  assert image.startswith(b"\x89PNG")


def test_text_part_feeds_the_text_pipeline(corpus):
  texts = [ex["text"] for _, ex in _examples(corpus) if ex["task"] == "text"]
  tok = tokenizer.train_bpe_tokenizer(texts, vocab_size=300)
  cfg = pipeline.default_text_config(str(corpus / "text"))
  cfg.update(shuffle=False, num_epochs=1)
  it = iter(
    pipeline.make_text_dataset(
      cfg, tokenizer=tok, seq_len=32, batch_size=1, process_index=0, process_count=1, seed=0
    )
  )
  batch = next(it)
  assert batch["inputs"].shape == (1, 32) and batch["loss_mask"].sum() > 0
