"""A run's tokenizer: kept in the workdir, exported with the tokenizer and processor files that
transformers' AutoTokenizer / AutoProcessor (Qwen3-Omni) load, and back with from-hf."""

import importlib
import json
import types

import numpy as np
import pytest
from flax import traverse_util
from PIL import Image

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from transformers.utils import is_torchvision_available  # noqa: E402

import omnijax  # noqa: E402
from data_pipelines import audio as audio_ops  # noqa: E402
from data_pipelines import tokenizer as tok_lib  # noqa: E402
from data_pipelines import video as video_ops  # noqa: E402
from data_pipelines import vision as vision_ops  # noqa: E402
from omnijax import export  # noqa: E402
from omnijax.errors import ConfigError  # noqa: E402
from omnijax.hf import convert, tokenizer_files  # noqa: E402
from omnijax.models import presets  # noqa: E402
from omnijax.models.config import ThinkerConfig  # noqa: E402
from omnijax.processing import positions  # noqa: E402
from omnijax.train import checkpoint as ckpt_lib  # noqa: E402

SENTENCES = [
  "The quick brown fox jumps over the lazy dog near the old river.",
  "Seven red cubes spin around two green spheres under bright light.",
  "In 2024, 17 cats and 305 dogs lived here; prices rose 3.5% (again)!",
  "Café naïve résumé: «quoted» text, tabs\tand\nnew lines.",
]
TEXTS = SENTENCES + [
  "  leading spaces, trailing spaces  ",
  "digits 0123456789 and 12,345.67",
  "unseen words: zyxwvut qqq",
  "émoji 🙂 and 中文",
  "<|im_start|>user\nhi<|im_end|>\n",
  "<|audio_start|><|audio_pad|><|audio_end|><|vision_start|><|image_pad|><|vision_end|>",
]
PROMPT = "Describe what you hear and see."
VOCAB = 320


@pytest.fixture(scope="module")
def tokenizer():
  return tok_lib.train_bpe_tokenizer(SENTENCES * 4, vocab_size=VOCAB)


@pytest.fixture(scope="module")
def cfg():
  cd = presets.get("tiny")
  assert cd.text.vocab_size >= VOCAB  # the tiny preset's ids are the local tokenizer's
  cd.text.num_hidden_layers = 1
  return ThinkerConfig.from_dict(cd)


def _params(cfg: ThinkerConfig):
  rng = np.random.default_rng(0)
  flat = traverse_util.flatten_dict(convert.abstract_params(cfg), sep="/")
  return traverse_util.unflatten_dict(
    {k: rng.standard_normal(v.shape).astype(np.float32) * 0.05 for k, v in flat.items()}, sep="/"
  )


def _workdir(path, cfg, tokenizer=None):
  ckpt_lib.write_model_config(path, cfg)
  ckpt_lib.save_params(path / ckpt_lib.INIT_PARAMS, _params(cfg))
  if tokenizer is not None:
    ckpt_lib.save_tokenizer(path, tokenizer)
  return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, cfg, tokenizer):
  return _workdir(tmp_path_factory.mktemp("workdir"), cfg, tokenizer)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, workdir):
  out = tmp_path_factory.mktemp("hf")
  export.main(["to-hf", f"--workdir={workdir}", f"--out={out}"])
  return out


class _VideoProcessor(dict):
  """Stand-in for transformers' Qwen2VLVideoProcessor, which needs torchvision (whose wheels do
  not run beside the CPU torch here): the exported video config (the dict itself, which the
  processor serializes) applied to already sampled frames with data_pipelines' frame ops."""

  model_input_names = ["pixel_values_videos", "video_grid_thw"]

  def __init__(self, config):
    super().__init__(config)
    self.merge_size = config["merge_size"]
    self.temporal_patch_size = config["temporal_patch_size"]

  def __call__(self, videos, size=None, **kwargs):
    del kwargs
    size = size or self["size"]
    pixels, grids = [], []
    for frames in videos:
      frames = vision_ops.resize_frames(
        np.asarray(frames),
        size["shortest_edge"],
        size["longest_edge"],
        self["patch_size"] * self.merge_size,
      )
      p, grid = vision_ops.patchify(
        vision_ops.normalize(frames, self["image_mean"], self["image_std"]),
        self["patch_size"],
        self.temporal_patch_size,
        self.merge_size,
      )
      pixels.append(p)
      grids.append(grid)
    return dict(pixel_values_videos=np.concatenate(pixels), video_grid_thw=np.stack(grids))


@pytest.fixture
def processor(hf_dir, monkeypatch):
  """AutoProcessor.from_pretrained(hf_dir); without torchvision its video processor is the
  stand-in, built from the directory's processor_config.json."""
  if not is_torchvision_available():
    video_config = json.loads((hf_dir / "processor_config.json").read_text())["video_processor"]
    monkeypatch.setattr(
      importlib.import_module("transformers.models.auto.video_processing_auto"),
      "AutoVideoProcessor",
      types.SimpleNamespace(from_pretrained=lambda *args, **kwargs: _VideoProcessor(video_config)),
    )
    check = transformers.ProcessorMixin.check_argument_for_proper_class
    monkeypatch.setattr(
      transformers.ProcessorMixin,
      "check_argument_for_proper_class",
      lambda self, name, arg: None if isinstance(arg, _VideoProcessor) else check(self, name, arg),
    )
  return transformers.AutoProcessor.from_pretrained(hf_dir)


def test_workdir_keeps_tokenizer(workdir, tokenizer):
  assert (workdir / ckpt_lib.TOKENIZER_JSON).exists()
  kept = ckpt_lib.load_tokenizer(workdir)
  for text in TEXTS:
    np.testing.assert_array_equal(kept.encode(text), tokenizer.encode(text))
  model = omnijax.load(workdir)
  assert model.tokenizer.vocab_size == tokenizer.vocab_size
  assert model.tokenizer.decode(model.tokenizer.encode(TEXTS[3])) == TEXTS[3]


def test_exported_files(hf_dir, cfg):
  assert sorted(p.name for p in hf_dir.iterdir()) == sorted(
    [
      "config.json",
      "model.safetensors",
      "tokenizer.json",
      "tokenizer_config.json",
      "chat_template.jinja",
      "processor_config.json",
      "preprocessor_config.json",
      "video_preprocessor_config.json",
    ]
  )
  tc = json.loads((hf_dir / "tokenizer_config.json").read_text())
  assert tc["tokenizer_class"] == "TokenizersBackend"
  assert tc["processor_class"] == "Qwen3OmniMoeProcessor"
  assert tc["eos_token"] == tc["pad_token"] == "<|endoftext|>"
  assert tc["model_max_length"] == cfg.text.max_position_embeddings
  assert tc["extra_special_tokens"] == [
    "<|im_start|>",
    "<|im_end|>",
    "<|tts_pad|>",
    "<|tts_bos|>",
    "<|tts_eos|>",
    *tok_lib.ROLE_TOKENS,
  ]
  assert [t["content"] for t in tc["added_tokens_decoder"].values()] == list(
    tok_lib.SPECIAL_TOKENS + tok_lib.ROLE_TOKENS
  )
  processor = json.loads((hf_dir / "processor_config.json").read_text())
  fe, ip, vp = (processor[k] for k in ("feature_extractor", "image_processor", "video_processor"))
  assert (fe["feature_size"], fe["sampling_rate"], fe["hop_length"], fe["n_fft"]) == (
    cfg.audio.num_mel_bins,
    16000,
    160,
    400,
  )
  for p in (ip, vp):
    assert (p["patch_size"], p["temporal_patch_size"], p["merge_size"]) == (
      cfg.vision.patch_size,
      cfg.vision.temporal_patch_size,
      cfg.vision.spatial_merge_size,
    )
    assert p["image_mean"] == p["image_std"] == [0.5] * 3
  assert ip["size"] == dict(shortest_edge=vision_ops.MIN_PIXELS, longest_edge=vision_ops.MAX_PIXELS)
  assert vp["size"] == dict(
    shortest_edge=video_ops.VIDEO_MIN_PIXELS, longest_edge=video_ops.VIDEO_MAX_PIXELS
  )
  assert (vp["fps"], vp["min_frames"], vp["max_frames"]) == (2.0, 4, 768)
  # The legacy single-file layout says the same.
  legacy = json.loads((hf_dir / "preprocessor_config.json").read_text())
  assert legacy.items() >= (fe | ip).items()
  legacy = json.loads((hf_dir / "video_preprocessor_config.json").read_text())
  assert legacy.items() >= vp.items()


def test_auto_tokenizer_matches(hf_dir, cfg, tokenizer):
  hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
  for text in TEXTS:
    ids = hf_tok(text)["input_ids"]
    assert ids == tokenizer.encode(text).tolist(), text
    assert hf_tok.decode(ids) == tokenizer.decode(ids) == text
    assert hf_tok.decode(ids, skip_special_tokens=True) == tokenizer.decode(
      ids, skip_special_tokens=True
    )
  # the role is a special token of the local tokenizer (tokenizer.ROLE_TOKENS)
  assert tokenizer.decode(tokenizer.encode(TEXTS[-2]), skip_special_tokens=True) == "\nhi\n"
  for attr, (token, field) in tokenizer_files.MULTIMODAL_TOKENS.items():
    assert getattr(hf_tok, attr) == token
    assert getattr(hf_tok, attr + "_id") == getattr(cfg, field) == tokenizer.token_id(token)
  assert hf_tok.eos_token_id == hf_tok.pad_token_id == tokenizer.eos_id
  assert hf_tok.convert_tokens_to_ids("<|im_end|>") == tokenizer.token_id("<|im_end|>")


def test_chat_template(hf_dir, tokenizer):
  hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
  chat = [
    dict(role="system", content="You are terse."),
    dict(
      role="user",
      content=[
        dict(type="audio", audio="a.wav"),
        dict(type="image"),
        dict(type="video", video="v.mp4"),
        dict(type="text", text=PROMPT),
      ],
    ),
    dict(role="assistant", content=[dict(type="text", text="A fox.")]),
    dict(role="user", content="And now?"),
  ]
  text = hf_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
  assert text == (
    "<|im_start|>system\nYou are terse.<|im_end|>\n"
    "<|im_start|>user\n<|audio_start|><|audio_pad|><|audio_end|>"
    "<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|video_pad|><|vision_end|>"
    f"{PROMPT}<|im_end|>\n"
    "<|im_start|>assistant\nA fox.<|im_end|>\n"
    "<|im_start|>user\nAnd now?<|im_end|>\n"
    "<|im_start|>assistant\n"
  )
  ids = hf_tok.apply_chat_template(chat, add_generation_prompt=True)["input_ids"]
  assert ids == tokenizer.encode(text).tolist()


def test_processor_matches_data_pipelines(processor, cfg, tokenizer):
  rng = np.random.default_rng(0)
  wave = (0.1 * rng.standard_normal(20_800)).astype(np.float32)  # 1.3 s: 130 mel frames
  image = rng.integers(0, 256, (70, 100, 3), np.uint8)  # resized to 64 x 96
  video = rng.integers(0, 256, (4, 64, 64, 3), np.uint8)
  chat = [
    dict(
      role="user",
      content=[
        dict(type="audio"),
        dict(type="image"),
        dict(type="video"),
        dict(type="text", text=PROMPT),
      ],
    )
  ]
  text = processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
  # Frames already sampled; fps gives video_second_per_grid (the processor reads it only here);
  # a small frame size, which the processor's default of 128-768 tokens per frame would upscale.
  out = processor(
    text=[text],
    audio=[wave],
    images=[Image.fromarray(image)],
    videos=[video],
    fps=2.0,
    do_sample_frames=False,
    return_tensors="np",
    videos_kwargs=dict(size=dict(shortest_edge=64 * 64, longest_edge=64 * 64)),
  )
  ids = out["input_ids"][0]

  mel = audio_ops.log_mel_spectrogram(wave, cfg.audio.num_mel_bins)
  frames = int(out["feature_attention_mask"][0].sum())
  assert frames == mel.shape[1] == 130
  np.testing.assert_allclose(out["input_features"][0][:, :frames], mel, atol=1e-4, rtol=0)
  pixels, grid = vision_ops.patchify(
    vision_ops.normalize(
      vision_ops.resize_frames(image, vision_ops.MIN_PIXELS, vision_ops.MAX_PIXELS)[None]
    )
  )
  np.testing.assert_array_equal(out["image_grid_thw"][0], grid)
  np.testing.assert_allclose(out["pixel_values"], pixels, atol=1e-6, rtol=0)
  video_grid = out["video_grid_thw"][0]
  np.testing.assert_array_equal(video_grid, [2, 4, 4])
  assert out["pixel_values_videos"].shape[0] == video_grid.prod()
  np.testing.assert_allclose(out["video_second_per_grid"], [1.0])

  # The layout omnijax trains on (data_pipelines/omni.py), token for token.
  n_audio = positions.audio_token_count(frames, cfg.audio.n_window)
  n_image = positions.image_token_count(grid, cfg.vision.spatial_merge_size)
  n_video = positions.video_token_count(video_grid, cfg.vision.spatial_merge_size)
  assert (n_audio, n_image, n_video) == (17, 6, 8)
  c, tid = cfg, tokenizer.token_id
  expected = np.concatenate(
    [
      [tid("<|im_start|>")],
      tokenizer.encode("user\n"),
      [c.audio_start_token_id],
      [c.audio_token_id] * n_audio,
      [c.audio_end_token_id],
      [c.vision_start_token_id],
      [c.image_token_id] * n_image,
      [c.vision_end_token_id],
      [c.vision_start_token_id],
      [c.video_token_id] * n_video,
      [c.vision_end_token_id],
      tokenizer.encode(PROMPT),
      [tid("<|im_end|>")],
      tokenizer.encode("\n"),
      [tid("<|im_start|>")],
      tokenizer.encode("assistant\n"),
    ]
  )
  np.testing.assert_array_equal(ids, expected)


def test_hf_dir_round_trip(hf_dir, workdir, tmp_path, tokenizer):
  model = omnijax.load(hf_dir)
  assert model.tokenizer.encode(TEXTS[2]).tolist() == tokenizer.encode(TEXTS[2]).tolist()
  export.main(["from-hf", f"--hf={hf_dir}", f"--workdir={tmp_path / 'w'}"])
  assert (tmp_path / "w" / "tokenizer.json").read_text() == (workdir / "tokenizer.json").read_text()
  model.save_hf(tmp_path / "api")  # Model.save_hf writes what to-hf writes
  for name in ("tokenizer_config.json", "processor_config.json", "chat_template.jinja"):
    assert (tmp_path / "api" / name).read_bytes() == (hf_dir / name).read_bytes()


def test_transformers_model_loads_export(hf_dir, cfg):
  hf_model, info = transformers.Qwen3OmniMoeForConditionalGeneration.from_pretrained(
    hf_dir, enable_audio_output=False, dtype=torch.float32, output_loading_info=True
  )
  assert not info["missing_keys"] and not info["unexpected_keys"]
  assert hf_model.thinker.config.audio_token_id == cfg.audio_token_id


def test_no_tokenizer(cfg, tmp_path, capsys):
  workdir = _workdir(tmp_path / "w", cfg)
  assert ckpt_lib.load_tokenizer(workdir) is None
  assert omnijax.load(workdir).tokenizer is None
  export.main(["to-hf", f"--workdir={workdir}", f"--out={tmp_path / 'hf'}"])
  assert "has no tokenizer.json" in capsys.readouterr().out
  assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors"]
  assert omnijax.load(tmp_path / "hf").tokenizer is None
  export.main(["from-hf", f"--hf={tmp_path / 'hf'}", f"--workdir={tmp_path / 'w2'}"])
  assert not (tmp_path / "w2" / "tokenizer.json").exists()


def test_mismatched_tokenizer_refused(cfg, tokenizer, tmp_path, capsys):
  shifted = ThinkerConfig.from_dict(cfg.to_dict() | dict(audio_token_id=12))
  workdir = _workdir(tmp_path / "w", shifted, tokenizer)
  with pytest.raises(SystemExit):
    export.main(["to-hf", f"--workdir={workdir}", f"--out={tmp_path / 'hf'}"])
  assert "audio_token_id is 12 but the tokenizer maps <|audio_pad|> to 5" in capsys.readouterr().err
  assert not (tmp_path / "hf").exists()
  small_vocab = ThinkerConfig.from_dict(
    cfg.to_dict() | dict(text=cfg.to_dict()["text"] | dict(vocab_size=tokenizer.vocab_size - 1))
  )
  with pytest.raises(ConfigError, match=f"the tokenizer has {tokenizer.vocab_size} tokens"):
    convert.save_hf(small_vocab, _params(small_vocab), tmp_path / "hf", tokenizer=tokenizer)
  # from-hf refuses an HF directory whose tokenizer does not fit its config.
  convert.save_hf(cfg, _params(cfg), tmp_path / "hf2", tokenizer=tokenizer)
  config = json.loads((tmp_path / "hf2" / "config.json").read_text())
  config["thinker_config"]["image_token_id"] = 12
  (tmp_path / "hf2" / "config.json").write_text(json.dumps(config))
  with pytest.raises(SystemExit):
    export.main(["from-hf", f"--hf={tmp_path / 'hf2'}", f"--workdir={tmp_path / 'w3'}"])
  assert "image_token_id is 12" in capsys.readouterr().err
  assert not (tmp_path / "w3").exists()
