"""Tests of speech codec codes as data: the Mimi code provider (against transformers'
MimiModel), the ``speech_codes`` op (resampling, skips), ``check_codes``, and codes stored
by ``data_pipelines.prepare``. A tiny randomly initialised Mimi stands in for kyutai/mimi."""

import io
import json
import math
import sys
import types

import librosa
import numpy as np
import pytest
import soundfile as sf
import torch
from transformers import MimiConfig, MimiModel

from data_pipelines import espeak, example_dataset, ops, prepare, records
from data_pipelines import speech_codes
from omnijax.codec import providers

SENTENCES = ("three red squares and a blue circle", "a green triangle moves left")


def _tiny_mimi(path, **overrides):
  """A small random Mimi at 24 kHz / 12.5 Hz with 2048-entry codebooks, saved to ``path``."""
  fields = dict(
    hidden_size=32,
    num_filters=4,
    num_hidden_layers=1,
    intermediate_size=64,
    num_attention_heads=2,
    num_key_value_heads=2,
    codebook_dim=8,
    vector_quantization_hidden_dimension=8,
    upsample_groups=32,
    num_quantizers=18,
  )
  torch.manual_seed(0)
  model = MimiModel(MimiConfig(**{**fields, **overrides})).eval()
  generator = torch.Generator().manual_seed(0)
  with torch.no_grad():  # Mimi initialises its codebooks to zeros: every code would be 0.
    for module in model.modules():
      if hasattr(module, "embed_sum"):
        module.embed_sum.normal_(generator=generator)
  model.save_pretrained(path)
  return path


@pytest.fixture(scope="module")
def mimi_dir(tmp_path_factory):
  path = _tiny_mimi(tmp_path_factory.mktemp("mimi"))
  assert json.loads((path / "config.json").read_text())["model_type"] == "mimi"
  return path


@pytest.fixture(scope="module")
def reference(mimi_dir):
  """Codes straight from transformers: float32 (N,) at 24 kHz -> int (16, T)."""
  model = MimiModel.from_pretrained(mimi_dir, dtype=torch.float32).eval()

  def encode(wave):
    with torch.no_grad():
      codes = model.encode(torch.from_numpy(wave)[None, None], num_quantizers=16).audio_codes
    return codes[0].numpy()

  return encode


@pytest.fixture(scope="module")
def speech():
  """eSpeak NG clips, float32 mono at 22050 Hz."""
  clips = []
  for sentence in SENTENCES:
    samples, rate = espeak.synthesize(sentence)
    clips.append(samples.astype(np.float32) / 32768.0)
  assert rate == 22050
  return clips, rate


def _wav(samples, rate, subtype=None, fmt="WAV"):
  buffer = io.BytesIO()
  sf.write(buffer, samples, rate, format=fmt, subtype=subtype)
  return buffer.getvalue()


def _apply(op, example):
  return op(dict(example))


# --- Provider ------------------------------------------------------------------


def test_mimi_codes_match_mimi_model(mimi_dir, reference):
  provider = providers.load_code_provider(mimi_dir)
  assert isinstance(provider, providers.MimiCodes)
  assert isinstance(provider, providers.CodeProvider)
  assert (provider.sample_rate, provider.frame_rate) == (24000, 12.5)
  assert (provider.num_quantizers, provider.codebook_size) == (16, 2048)
  rng = np.random.default_rng(0)
  for n in (1, 1919, 1920, 1921, 24000, 24001):
    waves = (0.1 * rng.standard_normal((2, n))).astype(np.float32)
    codes = provider.encode(waves)
    assert codes.dtype == np.int32
    assert codes.shape == (2, 16, math.ceil(n / 1920)) == (2, 16, providers.num_frames(n))
    assert 0 <= codes.min() and codes.max() < 2048
    for wave, row in zip(waves, codes):
      np.testing.assert_array_equal(row, reference(wave))
  assert len(np.unique(codes)) > 50  # Random codebooks: the codes are not all one value.


def test_mimi_checkpoint_checks(tmp_path, mimi_dir):
  few = _tiny_mimi(tmp_path / "few", num_quantizers=8)
  with pytest.raises(ValueError, match=r"8 quantizers \(need >= 16\)"):
    providers.MimiCodes(few)
  small = _tiny_mimi(tmp_path / "small", codebook_size=1024)
  with pytest.raises(ValueError, match=r"codebook_size 1024 \(need 2048\)"):
    providers.load_code_provider(small)
  with pytest.raises(ValueError, match=r"19 quantizers \(need >= 19\)|18 quantizers"):
    providers.MimiCodes(mimi_dir, num_quantizers=19)
  assert providers.MimiCodes(mimi_dir, num_quantizers=4).encode(np.zeros((1, 5000))).shape == (
    1,
    4,
    3,
  )


def test_load_code_provider_explains_what_a_codec_dir_holds(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a directory"):
    providers.load_code_provider(tmp_path / "nowhere")
  (tmp_path / "model.json").write_text(json.dumps({"text": {"hidden_size": 8}}))  # A Thinker.
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_omni_moe"}))
  with pytest.raises(ValueError, match='"model_type": "mimi".*model.json of a codec run'):
    providers.load_code_provider(tmp_path)


def test_codec_run_dispatches_to_load_speech_tokenizer(tmp_path, monkeypatch):
  """A model.json with a "codec" config goes to omnijax.codec.tokenizer (here a stand-in)."""

  class Fake:
    sample_rate, frame_rate, num_quantizers, codebook_size = 24000, 12.5, 16, 2048

    def __init__(self, path):
      self.path = path

    def encode(self, waves):
      return np.zeros((len(waves), 16, providers.num_frames(waves.shape[1])), np.int32)

  module = types.ModuleType("omnijax.codec.tokenizer")
  module.load_speech_tokenizer = Fake
  monkeypatch.setitem(sys.modules, "omnijax.codec.tokenizer", module)
  (tmp_path / "model.json").write_text(json.dumps({"codec": {}, "stage": "tokenizer"}))
  provider = providers.load_code_provider(tmp_path)
  assert isinstance(provider, Fake) and provider.path == str(tmp_path)
  Fake.codebook_size = 4096
  with pytest.raises(ValueError, match=r"\(24000, 12.5, 16, 4096\); expected \(24000, 12.5, 16"):
    providers.load_code_provider(tmp_path)


@pytest.mark.slow  # trains the tiny codec run
def test_omnijax_speech_tokenizer_provider(codec_run):
  workdir = codec_run[0]
  provider = providers.load_code_provider(workdir)
  assert isinstance(provider, providers.CodeProvider)
  waves = np.random.default_rng(0).standard_normal((2, 5000)).astype(np.float32) * 0.1
  codes = provider.encode(waves)
  assert codes.dtype == np.int32 and codes.shape == (2, 16, 3)
  providers.check_codes(codes)
  np.testing.assert_array_equal(provider.encode(waves[:1]), codes[:1])


def test_check_codes_errors():
  good = np.arange(32, dtype=np.int64).reshape(16, 2)
  out = providers.check_codes(good)
  assert out.dtype == np.int32 and np.array_equal(out, good)
  assert providers.check_codes(np.zeros((3, 16, 5), np.uint16)).shape == (3, 16, 5)
  with pytest.raises(ValueError, match=r"num_quantizers=16.*shape \(8, 5\).*axis \(-2\) has 8"):
    providers.check_codes(np.zeros((8, 5), np.int32))
  with pytest.raises(ValueError, match=r"shape \(5,\)"):
    providers.check_codes(np.zeros(5, np.int32))
  with pytest.raises(ValueError, match=r"0\.\.2047 \(codebook size 2048\): found min 0, max 2079"):
    providers.check_codes(np.arange(64).reshape(16, 4) * 33)
  with pytest.raises(ValueError, match=r"min -1, max 7"):
    providers.check_codes(np.array([[-1, 7]] * 16))
  with pytest.raises(ValueError, match="integers"):
    providers.check_codes(np.zeros((16, 4), np.float32))
  with pytest.raises(ValueError, match=r"0\.\.1023"):
    providers.check_codes(np.full((4, 2), 1500), num_quantizers=4, codebook_size=1024)


# --- The op ----------------------------------------------------------------------


def test_op_codes_resampled_espeak_speech(tmp_path, mimi_dir, reference, speech):
  """Bytes, paths and arrays at 22050 Hz are coded as their librosa 24 kHz resampling."""
  clips, rate = speech
  manifest = []
  for i, clip in enumerate(clips):
    (tmp_path / f"{i}.flac").write_bytes(_wav(clip, rate, fmt="FLAC"))
    manifest.append({"id": f"s{i}", "task": "asr", "audio": f"{i}.flac", "text": SENTENCES[i]})
  (tmp_path / "manifest.jsonl").write_text("\n".join(json.dumps(m) for m in manifest))
  examples = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
  examples.append({"id": "bytes", "audio": _wav(clips[0], rate)})
  examples.append({"id": "array", "audio": clips[1], "sample_rate": rate})
  expected = [0, 1, 0, 1]
  (op,) = ops.build_ops(
    [f"speech_codes(codec={str(mimi_dir)!r}, media_dir={str(tmp_path)!r})"], ops.OpContext()
  )
  for example, clip_index in zip(examples, expected):
    out = _apply(op, example)
    codes = out["speech_codes"]
    wave24 = librosa.resample(clips[clip_index], orig_sr=rate, target_sr=24000)
    assert codes.dtype == np.int32
    assert codes.shape == (16, math.ceil(len(wave24) / 1920))
    np.testing.assert_array_equal(codes, reference(wave24), err_msg=example["id"])
    assert out["audio"] is example["audio"]  # The audio is left for decode_audio.
  # 24 kHz input is not resampled; the provider was loaded once.
  out = _apply(op, {"audio": wave24, "sample_rate": 24000})
  np.testing.assert_array_equal(out["speech_codes"], reference(wave24))
  assert list(speech_codes._PROVIDERS) == [(str(mimi_dir), 16)]


def test_bad_audio_is_skipped_and_counted(tmp_path, mimi_dir, speech):
  clips, rate = speech
  nan = clips[0].copy()
  nan[50] = np.nan
  long = np.tile(clips[0], 4)
  wave24 = librosa.resample(clips[0], orig_sr=rate, target_sr=24000)
  stream = [
    ({"audio": _wav(clips[0], rate)}, None),
    ({"audio": _wav(np.zeros(24000, np.float32), 24000)}, "silent_audio"),
    ({"audio": _wav(1e-5 * clips[1], rate, "FLOAT")}, "silent_audio"),
    ({"audio": _wav(nan, rate, "FLOAT")}, "non_finite"),
    ({"audio": _wav(clips[0][:1500], rate)}, "too_short"),  # 0.068 s < 0.08 s.
    ({"audio": _wav(wave24[:1920], 24000)}, None),  # 0.08 s: one frame.
    ({"audio": _wav(clips[0][:0], rate)}, "empty"),
    ({"audio": _wav(long, rate)}, "too_long"),
    ({"audio": _wav(clips[1][:2000], 500)}, "bad_sample_rate"),
    ({"audio": b"\x00not audio" * 40}, "undecodable"),
    ({"audio": str(tmp_path / "gone.wav")}, "missing_media"),
    ({"text": "no audio"}, "missing_field"),
    ({"audio": _wav(clips[1], rate)}, None),
  ]
  records.write_shards(
    [{**ex, "id": str(i)} for i, (ex, _) in enumerate(stream)], tmp_path, "train", 1
  )
  max_seconds = 1.5 * len(clips[0]) / rate
  specs = [f"speech_codes(codec={str(mimi_dir)!r}, max_seconds={max_seconds})"]
  ds = example_dataset.make_example_dataset(
    records.open_shards(tmp_path, "train"), ops.build_ops(specs, ops.OpContext()), shuffle=False
  )
  it = iter(ds)
  arrived = list(it)
  expected = dict.fromkeys(ops.SKIP_REASONS, 0)
  for _, reason in stream:
    if reason:
      expected[reason] += 1
  assert it.skipped_records == expected
  assert [ex["id"] for ex in arrived] == ["0", "5", "12"]
  assert arrived[1]["speech_codes"].shape == (16, 1)
  # With truncate=True a long clip is cut to max_seconds instead.
  (op,) = ops.build_ops(
    [f"speech_codes(codec={str(mimi_dir)!r}, max_seconds=1.0, truncate=True)"], ops.OpContext()
  )
  assert op({"audio": _wav(long, rate)})["speech_codes"].shape == (16, math.ceil(24000 / 1920))


def test_op_spec_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a directory"):
    ops.build_ops([f"speech_codes(codec={str(tmp_path / 'nope')!r})"], ops.OpContext())
  with pytest.raises(ValueError, match="max_seconds"):
    ops.build_ops([f"speech_codes(codec={str(tmp_path)!r}, max_seconds=0)"], ops.OpContext())
  assert "speech_codes" in ops.registered_ops()


def test_stored_codes_are_checked_and_passed_through(tmp_path, monkeypatch):
  codes = np.arange(48, dtype=np.int32).reshape(16, 3) * 40
  (op,) = ops.build_ops([f"speech_codes(codec={str(tmp_path)!r})"], ops.OpContext())
  monkeypatch.setattr(speech_codes, "get_code_provider", lambda *a: pytest.fail("re-encoded"))
  for stored in (speech_codes.codes_to_record(codes), {"speech_codes": codes.astype(np.int64)}):
    out = op({"audio": b"unused", **stored})
    assert out["speech_codes"].dtype == np.int32
    np.testing.assert_array_equal(out["speech_codes"], codes)
  raw = codes.astype("<i2").tobytes()
  np.testing.assert_array_equal(op({"speech_codes": raw})["speech_codes"], codes)  # Q rows.
  with pytest.raises(ValueError, match=r"axis \(-2\) has 8"):
    op({"speech_codes": raw, "speech_codes_frames": 6})
  with pytest.raises(ValueError, match="not rows of 5 frames"):
    op({"speech_codes": raw, "speech_codes_frames": 5})
  with pytest.raises(ValueError, match="min 1000, max 2880"):
    op({"speech_codes": (codes + 1000).astype("<i2").tobytes(), "speech_codes_frames": 3})


# --- prepare ---------------------------------------------------------------------


def test_prepare_stores_codes_that_the_op_passes_through(
  tmp_path, mimi_dir, reference, speech, monkeypatch
):
  clips, rate = speech
  root = tmp_path / "raw"
  root.mkdir()
  files = {
    "a/0.flac": _wav(clips[0], rate, fmt="FLAC"),
    "a/1.wav": _wav(clips[1], rate),
    "a/short.wav": _wav(clips[0][:1000], rate),  # 45 ms: decodes, but under one frame.
    "a/silent.wav": _wav(np.zeros(8000, np.float32), 16000),
  }
  for name, data in files.items():
    (root / name).parent.mkdir(exist_ok=True)
    (root / name).write_bytes(data)
  lines = [
    {"id": "s0", "audio": "a/0.flac", "text": SENTENCES[0]},
    {"id": "s1", "audio": "a/1.wav", "text": SENTENCES[1], "split": "validation"},
    {"id": "short", "audio": "a/short.wav", "text": "a"},
    {"id": "silent", "audio": "a/silent.wav", "text": "nothing"},
    {"id": "a0", "audio": "a/1.wav"},  # Task audio: not speech, no codes.
    {"id": "t0", "text": "a document"},
  ]
  (root / "manifest.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
  out = tmp_path / "out"
  prepare.main(
    [
      f"--manifest={root / 'manifest.jsonl'}",
      f"--out={out}",
      "--workers=1",
      f"--speech_codes={mimi_dir}",
      "--no_progress",
    ]
  )
  summary = records.read_manifest(out)
  assert summary["skipped_by_task"] == {"asr": {"silent_audio": 1, "too_short": 1}}
  assert summary["counts"]["task"] == {"asr": 2, "audio": 1, "text": 1}
  frames = [
    math.ceil(len(librosa.resample(c, orig_sr=rate, target_sr=24000)) / 1920) for c in clips
  ]
  assert summary["speech_codes"] == {
    "codec": str(mimi_dir),
    "tasks": ["asr"],
    "num_quantizers": 16,
    "codebook_size": 2048,
    "frame_rate": 12.5,
    "num_examples": 2,
    "num_frames": sum(frames),
  }
  (op,) = ops.build_ops([f"speech_codes(codec={str(mimi_dir)!r})"], ops.OpContext())
  monkeypatch.setattr(speech_codes, "get_code_provider", lambda *a: pytest.fail("re-encoded"))
  for i, split in enumerate(("train", "validation")):
    (example,) = [records.decode_example(r) for r in records.open_shards(out / "asr", split)]
    assert example["id"] == f"s{i}" and example["speech_codes_frames"] == frames[i]
    stored = np.frombuffer(example["speech_codes"], "<i2").reshape(16, frames[i])
    wave24 = librosa.resample(clips[i], orig_sr=rate, target_sr=24000)
    np.testing.assert_array_equal(stored, reference(wave24))
    passed = op(example)["speech_codes"]
    assert passed.dtype == np.int32
    np.testing.assert_array_equal(passed, stored)
  (audio_example,) = [records.decode_example(r) for r in records.open_shards(out / "audio")]
  assert "speech_codes" not in audio_example
