"""Tests of the media ops (audio, image, video), their parity with transformers'
Qwen3-Omni preprocessing, bad-input skipping, and the TFDS source."""

import importlib
import io
import json
import sys
import types

import av
import grain
import numpy as np
from PIL import Image
import pytest
import soundfile as sf
import tensorflow_datasets as tfds
import torch
import transformers
from transformers import WhisperFeatureExtractor
from transformers import image_transforms
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
import transformers.video_utils

from data_pipelines import audio, espeak, example_dataset, ops, records, tfds_source, video, vision

SENTENCE = "three red squares and a blue circle"


@pytest.fixture(scope="module")
def speech():
  """(float32 mono, rate): eSpeak NG saying SENTENCE, at 22050 Hz."""
  samples, rate = espeak.synthesize(SENTENCE)
  return samples.astype(np.float32) / 32768.0, rate


def _encode_audio(samples, rate, fmt, subtype=None):
  buffer = io.BytesIO()
  sf.write(buffer, samples, rate, format=fmt, subtype=subtype)
  return buffer.getvalue()


def _encode_m4a(samples, rate):
  """AAC in MP4 (not readable by libsndfile: exercises the FFmpeg path)."""
  buffer = io.BytesIO()
  with av.open(buffer, mode="w", format="mp4") as container:
    stream = container.add_stream("aac", rate=rate)
    stream.layout = "mono"
    frame = av.AudioFrame.from_ndarray(samples[None], format="fltp", layout="mono")
    frame.sample_rate = rate
    container.mux(stream.encode(frame))
    container.mux(stream.encode(None))
  return buffer.getvalue()


def _encode_png(array):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="PNG")
  return buffer.getvalue()


def _moving_square_video(num_frames=25, size=(96, 128)):
  frames = np.full((num_frames, *size, 3), 235, np.uint8)
  for i in range(num_frames):
    x = 4 * i
    frames[i, 30:60, x : x + 24] = (40, 170, 60)
  return frames


def _run(ops_, example):
  for op in ops_:
    example = op(example)
  return example


# --- Audio -----------------------------------------------------------------


@pytest.mark.parametrize("signal", ["speech", "noise", "tone", "short"])
def test_log_mel_matches_whisper_feature_extractor(speech, signal):
  wave16k = audio.clean_waveform(*speech)
  rng = np.random.default_rng(0)
  x = {
    "speech": wave16k,
    "noise": (0.1 * rng.standard_normal(3 * 16000 + 77)).astype(np.float32),
    "tone": np.sin(np.arange(12345) * 0.05).astype(np.float32),
    "short": wave16k[:1000],
  }[signal]
  # As Qwen3OmniMoeProcessor configures and calls it.
  extractor = WhisperFeatureExtractor(
    feature_size=128, chunk_length=300, dither=0.0, return_attention_mask=True
  )
  ref = extractor(
    x,
    sampling_rate=16000,
    padding=True,
    truncation=False,
    return_attention_mask=True,
    return_tensors="np",
  )
  (op,) = ops.build_ops(["log_mel"], ops.OpContext())
  features = op({"audio": x})["audio_features"]
  assert features.dtype == np.float32
  assert features.shape == ref["input_features"][0].shape == (128, len(x) // 160)
  assert features.shape[1] == ref["attention_mask"].sum()
  np.testing.assert_allclose(features, ref["input_features"][0], atol=1e-4, rtol=0)


def test_decode_audio_formats_and_rates(speech):
  samples, rate = speech
  seconds = len(samples) / rate
  stereo_44k = np.stack([samples, samples], 1)
  stereo_44k = audio.soxr.resample(stereo_44k, rate, 44100)
  inputs = {
    "wav_22050": _encode_audio(samples, rate, "WAV"),
    "flac": _encode_audio(samples, rate, "FLAC"),
    "mp3": _encode_audio(samples, rate, "MP3"),
    "wav_44100_stereo": _encode_audio(stereo_44k, 44100, "WAV"),
    "wav_8000": _encode_audio(audio.soxr.resample(samples, rate, 8000), 8000, "WAV"),
    "wav_12345": _encode_audio(audio.soxr.resample(samples, rate, 12345), 12345, "WAV"),
    "m4a_aac": _encode_m4a(samples, rate),
  }
  (op,) = ops.build_ops(["decode_audio"], ops.OpContext())
  reference = audio.clean_waveform(samples, rate)
  for name, data in inputs.items():
    out = op({"audio": data})
    wave = out["audio"]
    assert out["sample_rate"] == 16000 and wave.dtype == np.float32, name
    assert wave.ndim == 1, name
    # Codec priming (mp3, aac) adds a few tens of ms.
    assert abs(out["audio_seconds"] - seconds) < 0.1, (name, out["audio_seconds"])
    if name in ("wav_22050", "flac"):  # Lossless: the same samples.
      np.testing.assert_allclose(wave, reference, atol=1e-4)
  # A raw float array with its rate (as TFDS sources give).
  out = op({"audio": samples, "sample_rate": rate})
  np.testing.assert_array_equal(out["audio"], reference)


def test_decode_audio_truncates_or_skips_long_audio(speech):
  samples, rate = speech
  data = _encode_audio(samples, rate, "WAV")
  (cut,) = ops.build_ops(["decode_audio(max_seconds=1.0)"], ops.OpContext())
  assert len(cut({"audio": data})["audio"]) == 16000
  (strict,) = ops.build_ops(["decode_audio(max_seconds=1.0, truncate=False)"], ops.OpContext())
  with pytest.raises(ops.BadRecord) as e:
    strict({"audio": data})
  assert e.value.reason == "too_long"


def test_silent_audio_skipped_unless_allowed():
  silent = _encode_audio(np.zeros(16000, np.float32), 16000, "WAV")
  (op,) = ops.build_ops(["decode_audio"], ops.OpContext())
  with pytest.raises(ops.BadRecord) as e:
    op({"audio": silent})
  assert e.value.reason == "silent_audio"
  (allow,) = ops.build_ops(["decode_audio(allow_silence=True)"], ops.OpContext())
  assert len(allow({"audio": silent})["audio"]) == 16000


# --- Images ----------------------------------------------------------------


def _image_cases():
  rng = np.random.default_rng(0)
  palette = Image.fromarray(rng.integers(0, 255, (64, 64, 3), np.uint8)).convert("P")
  palette.info["transparency"] = 0
  return {
    "rgb_odd": Image.fromarray(rng.integers(0, 255, (97, 131, 3), np.uint8)),
    "rgba": Image.fromarray(rng.integers(0, 255, (50, 40, 4), np.uint8)),
    "gray": Image.fromarray(rng.integers(0, 255, (300, 200), np.uint8)),
    "palette_transparent": palette,
    "tiny": Image.fromarray(rng.integers(0, 255, (5, 7, 3), np.uint8)),
    "large": Image.fromarray(rng.integers(0, 255, (700, 1000, 3), np.uint8)),
  }


@pytest.mark.parametrize("name", list(_image_cases()))
@pytest.mark.parametrize("pixels", [(3136, 12845056), (4096, 64 * 64 * 16)])
def test_image_ops_match_qwen2vl_image_processor(name, pixels):
  min_pixels, max_pixels = pixels
  buffer = io.BytesIO()
  _image_cases()[name].save(buffer, format="PNG")
  data = buffer.getvalue()
  # Qwen3-Omni's image processor: patch 16, merge 2, temporal 2, mean=std=0.5.
  processor = Qwen2VLImageProcessorPil(
    patch_size=16,
    temporal_patch_size=2,
    merge_size=2,
    image_mean=[0.5] * 3,
    image_std=[0.5] * 3,
    min_pixels=min_pixels,
    max_pixels=max_pixels,
  )
  ref = processor(images=[Image.open(io.BytesIO(data))], return_tensors="np")
  out = _run(
    ops.build_ops(
      [
        "decode_image",
        f"resize_image(min_pixels={min_pixels}, max_pixels={max_pixels})",
        "patchify_image",
      ],
      ops.OpContext(),
    ),
    {"image": data},
  )
  assert "image" not in out
  np.testing.assert_array_equal(out["image_grid_thw"], ref["image_grid_thw"][0])
  assert out["pixel_values"].shape == ref["pixel_values"].shape
  assert out["pixel_values"].shape[1] == 3 * 2 * 16 * 16
  np.testing.assert_allclose(out["pixel_values"], ref["pixel_values"], atol=1e-5, rtol=0)


# --- Video -----------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen2vl_video_processor(request):
  """transformers' Qwen2VLVideoProcessor class, imported without torchvision.

  Only its ``sample_frames`` and ``patchify`` (pure torch) are used; the module
  imports torchvision at the top, which cannot be installed beside this torch,
  so empty stand-in modules are put in ``sys.modules`` for the import.
  """
  del request
  stubs = [
    "torchvision",
    "torchvision.transforms",
    "torchvision.transforms.v2",
    "torchvision.transforms.v2.functional",
  ]
  saved = {name: sys.modules.get(name) for name in stubs}
  sys.modules.update({name: types.ModuleType(name) for name in stubs})
  try:
    module = importlib.import_module("transformers.models.qwen2_vl.video_processing_qwen2_vl")
  finally:
    for name, old in saved.items():
      if old is None:
        sys.modules.pop(name, None)
      else:
        sys.modules[name] = old
  cls = module.Qwen2VLVideoProcessor
  processor = types.SimpleNamespace(num_frames=None, fps=None)
  processor.sample_frames = lambda *a, **k: cls.sample_frames(processor, *a, **k)
  processor.patchify = lambda *a, **k: cls.patchify(processor, *a, **k)
  processor.smart_resize = module.smart_resize
  return processor


def test_frame_sampling_matches_transformers(qwen2vl_video_processor):
  p = qwen2vl_video_processor
  checked = 0
  for total in [*range(2, 80), 299, 1000, 1799, 9999]:
    for video_fps in (1, 4, 7.5, 23.976, 29.97, 30, 60):
      for fps in (0.5, 1, 2, 3.3):
        metadata = transformers.video_utils.VideoMetadata(
          total_num_frames=total, fps=video_fps, duration=total / video_fps
        )
        ref = p.sample_frames(
          metadata, temporal_patch_size=2, min_frames=4, max_frames=768, fps=fps
        ).numpy()
        np.testing.assert_array_equal(video.sample_frame_indices(total, video_fps, fps), ref)
        checked += 1
  assert checked > 2000
  for t in (6, 5):  # 5 frames: the last one is repeated.
    frames = torch.randn(1, t, 3, 64, 96)
    ref, gt, gh, gw = p.patchify(frames, patch_size=16, merge_size=2, temporal_patch_size=2)
    mine, grid = vision.patchify(frames[0].numpy())
    np.testing.assert_array_equal(grid, [gt, gh, gw])
    np.testing.assert_array_equal(mine, ref[0].numpy())
  for size in [(96, 128), (1080, 1920), (50, 30)]:
    assert vision.smart_resize(*size, 32, 128 * 32 * 32, 768 * 32 * 32) == (
      p.smart_resize(*size, 32, 128 * 32 * 32, 768 * 32 * 32)
    )


def test_decode_video_matches_transformers(qwen2vl_video_processor, speech, tmp_path):
  p = qwen2vl_video_processor
  frames = _moving_square_video(25)
  narration, rate = speech
  data = video.encode_video(frames, 10, narration, rate)
  path = tmp_path / "v.mp4"
  path.write_bytes(data)
  min_pixels, max_pixels = 4096, 160 * 160
  (op,) = ops.build_ops(
    [f"decode_video(fps=2.0, min_pixels={min_pixels}, max_pixels={max_pixels})"], ops.OpContext()
  )
  out = op({"video": data, "text": SENTENCE})

  # Frames: transformers' PyAV reader with the processor's fps sampling.
  ref_frames, metadata = transformers.video_utils.read_video_pyav(
    str(path),
    sample_indices_fn=lambda metadata, **_: p.sample_frames(
      metadata, temporal_patch_size=2, min_frames=4, max_frames=768, fps=2.0
    ).numpy(),
  )
  num_frames = len(ref_frames)
  assert (metadata.total_num_frames, metadata.fps) == (25, 10.0)
  assert num_frames == 4  # 2.5 s at 2 fps -> 5 -> floored to 4.
  # Pixels: resized, rescaled, normalized with transformers' PIL-path
  # functions, patchified by the video processor.
  h, w = vision.smart_resize(96, 128, 32, min_pixels, max_pixels)
  processed = []
  for frame in ref_frames:
    x = image_transforms.resize(frame, (h, w), resample=Image.BICUBIC)
    x = image_transforms.rescale(x, 1 / 255)
    x = image_transforms.normalize(x, [0.5] * 3, [0.5] * 3)
    processed.append(np.moveaxis(x, -1, 0))
  ref, gt, gh, gw = p.patchify(
    torch.from_numpy(np.stack(processed))[None], patch_size=16, merge_size=2, temporal_patch_size=2
  )
  np.testing.assert_array_equal(out["video_grid_thw"], [gt, gh, gw])
  np.testing.assert_allclose(out["pixel_values_videos"], ref[0].numpy(), atol=1e-5, rtol=0)
  # Time: 4 of 25 frames at 10 fps -> 1.6 fps effective, 2 frames per grid.
  assert out["video_second_per_grid"] == pytest.approx(2 / 1.6)
  indices = video.sample_frame_indices(25, 10.0, 2.0)
  np.testing.assert_allclose(out["video_timestamps"], indices / 10.0, atol=1e-3)
  # Audio in video: the narration, resampled to 16 kHz (+ AAC priming).
  assert out["audio_in_video"] and out["sample_rate"] == 16000
  assert abs(out["audio_seconds"] - len(narration) / rate) < 0.1
  assert out["text"] == SENTENCE and "video" not in out
  (mel,) = ops.build_ops(["log_mel"], ops.OpContext())
  assert mel(out)["audio_features"].shape == (128, len(out["audio"]) // 160)


def test_decode_video_without_or_with_silent_audio():
  frames = _moving_square_video(8)
  (op,) = ops.build_ops(["decode_video(min_pixels=4096, max_pixels=16384)"], ops.OpContext())
  for track in (None, np.zeros(16000, np.float32)):
    out = op({"video": video.encode_video(frames, 4, track)})
    assert not out["audio_in_video"] and "audio" not in out
    np.testing.assert_array_equal(out["video_grid_thw"], [2, 6, 8])


# --- Bad inputs in a pipeline ------------------------------------------------


def _write_shard(path, split, examples):
  records.write_shards(examples, path, split, num_shards=1)
  return records.open_shards(path, split)


def test_bad_inputs_are_skipped_and_counted(tmp_path, speech):
  """Every kind of bad input is skipped under its reason; good ones arrive."""
  samples, rate = speech
  wav = _encode_audio(samples, rate, "WAV")
  nan = samples.copy()
  nan[100] = np.nan
  good_png = _encode_png(np.full((40, 60, 3), 200, np.uint8))
  good_mp4 = video.encode_video(_moving_square_video(8), 4, samples, rate)
  cases = {
    "audio": (
      ["decode_text", "decode_audio(max_seconds=10.0, truncate=False)", "log_mel"],
      [
        ({"text": SENTENCE, "audio": wav}, None),
        ({"text": SENTENCE, "audio": wav[: len(wav) // 2]}, "undecodable"),
        ({"text": SENTENCE, "audio": b"\x00not audio" * 40}, "undecodable"),
        (
          {
            "text": SENTENCE,
            "audio": _encode_audio(audio.soxr.resample(samples, rate, 11025), 11025, "MP3"),
          },
          None,
        ),
        ({"text": SENTENCE, "audio": _encode_audio(samples[:2000], 500, "WAV")}, "bad_sample_rate"),
        (
          {"text": SENTENCE, "audio": _encode_audio(np.zeros(16000, np.float32), 16000, "WAV")},
          "silent_audio",
        ),
        ({"text": SENTENCE, "audio": _encode_audio(nan, rate, "WAV", "FLOAT")}, "non_finite"),
        ({"text": SENTENCE, "audio": _encode_audio(np.tile(samples, 6), rate, "FLAC")}, "too_long"),
        ({"text": SENTENCE, "audio": str(tmp_path / "gone.wav")}, "missing_media"),
        ({"text": "", "audio": wav}, "empty"),
        ({"text": b"\xff\xfe bad", "audio": wav}, "invalid_utf8"),
        ({"text": SENTENCE}, "missing_field"),
        ({"text": SENTENCE, "audio": _encode_audio(samples[:100], rate, "WAV")}, "empty"),
        ({"text": SENTENCE, "audio": wav}, None),
      ],
    ),
    "image": (
      ["decode_text", "decode_image", "resize_image", "patchify_image"],
      [
        ({"text": "a grey box", "image": good_png}, None),
        ({"text": "cut", "image": good_png[: len(good_png) // 2]}, "undecodable"),
        ({"text": "noise", "image": b"GIF89a" + b"\x01" * 50}, "undecodable"),
        (
          {"text": "a line", "image": _encode_png(np.zeros((1, 300, 3), np.uint8))},
          "bad_aspect_ratio",
        ),
        ({"text": "gone", "image": "no/such/file.png"}, "missing_media"),
        ({"text": " \n", "image": good_png}, "empty"),
        ({"text": "a grey box", "image": good_png}, None),
      ],
    ),
    "video": (
      ["decode_video(min_pixels=4096, max_pixels=16384, max_seconds=1.0)", "log_mel"],
      [
        ({"video": good_mp4}, None),
        ({"video": good_mp4[: len(good_mp4) // 2]}, "undecodable"),
        ({"video": b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64}, "undecodable"),
        ({"video": str(tmp_path / "gone.mp4")}, "missing_media"),
        ({"text": "no video"}, "missing_field"),
        ({"video": good_mp4}, None),
      ],
    ),
  }
  for modality, (specs, stream) in cases.items():
    source = _write_shard(
      tmp_path, modality, [{**ex, "id": str(i)} for i, (ex, _) in enumerate(stream)]
    )
    ds = example_dataset.make_example_dataset(
      source, ops.build_ops(specs, ops.OpContext()), shuffle=False
    )
    it = iter(ds)
    arrived = list(it)
    expected = dict.fromkeys(ops.SKIP_REASONS, 0)
    for _, reason in stream:
      if reason:
        expected[reason] += 1
    assert it.skipped_records == expected, modality
    good_ids = [str(i) for i, (_, reason) in enumerate(stream) if reason is None]
    assert [ex["id"] for ex in arrived] == good_ids, modality
    for ex in arrived:
      if modality == "video":
        assert ex["audio_in_video"] and ex["audio_seconds"] <= 1.0
        assert ex["video_timestamps"].max() < 1.0  # max_seconds truncates.
      if modality in ("audio", "video"):
        assert ex["audio_features"].shape == (128, len(ex["audio"]) // 160)
      if modality == "image":  # 40x60 -> 64x96 (min_pixels): 4x6 patches.
        np.testing.assert_array_equal(ex["image_grid_thw"], [1, 4, 6])
        assert ex["pixel_values"].shape == (24, 1536)


def test_skip_counts_survive_restore(tmp_path, speech):
  samples, rate = speech
  wav = _encode_audio(samples, rate, "WAV")
  stream = [{"id": str(i), "audio": wav if i % 3 else b"bad"} for i in range(9)]
  ds = example_dataset.make_example_dataset(
    _write_shard(tmp_path, "train", stream),
    ops.build_ops(["decode_audio"], ops.OpContext()),
    shuffle=True,
    seed=3,
  )
  it = iter(ds)
  first = [next(it)["id"] for _ in range(2)]
  state = json.loads(json.dumps(it.get_state()))
  rest = [ex["id"] for ex in it]
  restored = iter(ds)
  restored.set_state(state)
  assert [ex["id"] for ex in restored] == rest
  assert restored.skipped_records["undecodable"] == 3
  assert sorted(first + rest) == sorted(str(i) for i in range(9) if i % 3)


def test_modality_ops_are_registered():
  names = ops.registered_ops()
  for name in (
    "decode_audio",
    "log_mel",
    "decode_image",
    "resize_image",
    "patchify_image",
    "decode_video",
  ):
    assert name in names
  with pytest.raises(ValueError, match="decode_video"):
    ops.build_ops(["decode_vidoe"], ops.OpContext())


# --- TensorFlow Datasets -------------------------------------------------------


def test_tfds_source_with_mock_data_without_tensorflow():
  """``tfds.testing.mock_data`` + ``tfds.data_source``: no TensorFlow needed."""
  with tfds.testing.mock_data(num_examples=3, policy=tfds.testing.MockPolicy.USE_CODE):
    source = tfds_source.TfdsSource("ref_coco", "train")
    assert source.reader == "tfds" and len(source) == 3
    ds = example_dataset.make_example_dataset(
      source,
      ops.build_ops(
        ["decode_text", "decode_image", "resize_image(max_pixels=65536)", "patchify_image"],
        ops.OpContext(),
      ),
      shuffle=False,
    )
    examples = list(ds)
  assert len(examples) == 3
  for ex in examples:
    assert ex["task"] == "caption" and ex["source"] == "tfds:ref_coco"
    assert isinstance(ex["text"], str) and ex["pixel_values"].shape[1] == 1536


def _write_librispeech_like(data_dir):
  """A prepared array_record dataset with librispeech's name and features.

  Written by TFDS' own writer; ``speech`` is serialized as librispeech's
  ``Audio`` (16-bit samples as an int64 list). The ``Audio`` feature itself
  cannot be built without TensorFlow, hence a ``Tensor`` here.
  """
  path = data_dir / "librispeech" / "2.1.1"
  path.mkdir(parents=True)
  features = tfds.features.FeaturesDict(
    {
      "speech": tfds.features.Tensor(shape=(None,), dtype=np.int16),
      "text": tfds.features.Text(),
      "speaker_id": np.int64,
      "id": np.str_,
    }
  )
  info = tfds.core.DatasetInfo(
    builder=tfds.core.dataset_info.DatasetIdentity(
      name="librispeech", version=tfds.core.Version("2.1.1"), data_dir=str(path), module_name="test"
    ),
    features=features,
  )
  writer = tfds.core.SequentialWriter(info, max_examples_per_shard=1, file_format="array_record")
  writer.initialize_splits(["train"])
  examples = []
  for i, text in enumerate(["three red squares", "a blue circle"]):
    samples, rate = espeak.synthesize(text)
    samples16k = audio.soxr.resample(samples.astype(np.float32) / 32768, rate, 16000)
    examples.append(
      {
        "speech": (samples16k * 32767).astype(np.int16),
        "text": text,
        "speaker_id": i,
        "id": f"utt-{i}",
      }
    )
  writer.add_examples({"train": examples})
  writer.close_all()
  return examples


def test_tfds_source_reads_audio_datasets_without_tensorflow(tmp_path):
  """The raw reader: a prepared librispeech-shaped array_record dataset."""
  data_dir = tmp_path / "tfds"
  written = _write_librispeech_like(data_dir)
  source = tfds_source.TfdsSource("librispeech", "train", data_dir=data_dir, reader="raw")
  assert source.reader == "raw" and len(source) == 2
  ds = example_dataset.make_example_dataset(
    source,
    ops.build_ops(["decode_text", "decode_audio", "log_mel"], ops.OpContext()),
    shuffle=False,
  )
  examples = list(ds)
  assert [ex["id"] for ex in examples] == ["utt-0", "utt-1"]
  assert [ex["text"] for ex in examples] == ["three red squares", "a blue circle"]
  for ex, original in zip(examples, written):
    assert ex["task"] == "asr" and ex["sample_rate"] == 16000
    np.testing.assert_allclose(ex["audio"], original["speech"] / 32768.0)
    assert ex["audio_features"].shape == (128, len(ex["audio"]) // 160)
  if importlib.util.find_spec("tensorflow") is None:
    # TFDS 4.9.10 cannot even build the librispeech builder without TF, so
    # "auto" falls back to the raw reader.
    auto = tfds_source.TfdsSource("librispeech", "train", data_dir=data_dir)
    assert auto.reader == "raw"
    with pytest.raises(ModuleNotFoundError, match="tensorflow"):
      tfds_source.TfdsSource("librispeech", "train", data_dir=data_dir, reader="tfds")
  assert isinstance(source, grain.sources.RandomAccessDataSource)
