"""Code2Wav: parity with transformers' Qwen3OmniMoeCode2Wav through the released key map, export
to and import from the released layout, `omnijax.load(dir).code2wav`, and streaming decode.

A tiny config keeps the released upsampling (1920 samples a frame, 555 trimmed). Random weights
are scaled (`omnijax.hf.random_weights.randomize_code2wav_`) so activations stay O(1) through the conv stack and the waveform is
neither near zero nor clamped flat at +-1, which would hide mismatches.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util
from safetensors.numpy import load_file
from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import (
  Qwen3OmniMoeCode2WavConfig,
  Qwen3OmniMoeConfig,
)
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeCode2Wav

import omnijax
from omnijax import export
from omnijax.errors import ConfigError
from omnijax.hf import convert, hf_config, keymap, safetensors_io
from omnijax.hf.random_weights import randomize_code2wav_
from omnijax.models import code2wav as c2w
from omnijax.models import presets
from omnijax.models.config import Code2WavConfig, ThinkerConfig
from omnijax.train import checkpoint as ckpt_lib
from tests import helpers

TINY = dict(
  codebook_size=64,
  num_quantizers=16,
  hidden_size=64,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=4,
  intermediate_size=96,
  sliding_window=8,
  decoder_dim=64,
)
CFG = Code2WavConfig(**TINY)
LONG = 30  # frames: > the window (8) and > decode_context_frames (see test_context_frames)


@pytest.fixture(scope="module")
def hf_model():
  torch.manual_seed(0)
  model = Qwen3OmniMoeCode2Wav(Qwen3OmniMoeCode2WavConfig(**TINY)).eval()
  with torch.no_grad():
    randomize_code2wav_(model.state_dict())
  return model


@pytest.fixture(scope="module")
def params(hf_model):
  """omnijax params converted from the transformers module through the released key map."""
  sd = {f"code2wav.{k}": v.numpy() for k, v in hf_model.state_dict().items()}
  return keymap.from_hf(
    sd.__getitem__, convert.abstract_code2wav_params(CFG), keymap.code2wav_keymap(CFG)
  )


@pytest.fixture(scope="module")
def fwd():
  model = c2w.Code2Wav(CFG)
  return jax.jit(lambda p, codes: model.apply({"params": p}, codes))


def _codes(t: int, seed: int = 0, batch: int = 2) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, CFG.codebook_size, (batch, 16, t))


def _hf_wave(model, codes) -> np.ndarray:
  with torch.no_grad():
    return model(torch.as_tensor(codes)).numpy()[:, 0]


def _decode(fwd, params, codes) -> np.ndarray:
  return np.asarray(fwd(params, jnp.asarray(codes, jnp.int32)))


@pytest.fixture(scope="module")
def long_codes():
  return _codes(LONG, seed=1)


@pytest.fixture(scope="module")
def long_wave(fwd, params, long_codes):
  return _decode(fwd, params, long_codes)


@pytest.fixture(scope="module")
def thinker():
  """A tiny Thinker config and random params, for the directories Code2Wav is exported in."""
  cfg = ThinkerConfig.from_dict(presets.get("tiny"))
  rng = np.random.default_rng(0)
  flat = traverse_util.flatten_dict(convert.abstract_params(cfg), sep="/")
  params = {k: 0.05 * rng.standard_normal(v.shape).astype(np.float32) for k, v in flat.items()}
  return cfg, traverse_util.unflatten_dict(params, sep="/")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, thinker, params):
  out = tmp_path_factory.mktemp("hf_c2w")
  convert.save_hf(*thinker, out, code2wav=(CFG, params))
  return out


# ---------------------------------------------------------------------------------------------
# Key map and config
# ---------------------------------------------------------------------------------------------


def test_keymap_is_the_state_dict(hf_model, params):
  """Every released key is mapped once, and omnijax -> transformers reproduces the state dict."""
  sd = hf_model.state_dict()
  km = keymap.code2wav_keymap(CFG)
  assert sorted(keymap.hf_keys(km)) == sorted(f"code2wav.{k}" for k in sd)
  assert "code2wav.decoder.4.block.4.conv2.conv.weight" in keymap.hf_keys(km)
  back = keymap.to_hf(params, km)
  for k, v in sd.items():
    np.testing.assert_array_equal(back[f"code2wav.{k}"], v.numpy(), err_msg=k)
  # another prefix (a Code2Wav saved on its own)
  assert keymap.hf_keys(keymap.code2wav_keymap(CFG, "x"))[0] == "x.code_embedding.weight"


def test_config_round_trip():
  for cfg in (CFG, Code2WavConfig()):
    d = hf_config.code2wav_config_to_hf(cfg)
    assert hf_config.code2wav_config_from_hf(json.loads(json.dumps(d))) == cfg
    hf = Qwen3OmniMoeCode2WavConfig(**d)  # transformers reads every field as written
    for k, v in d.items():
      assert getattr(hf, k) == (list(v) if isinstance(v, tuple) else v), k
  # The released config.json (transformers v4): a top-level rope_theta and extra fields.
  released = dict(
    attention_bias=False,
    attention_dropout=0.0,
    codebook_dim=512,
    codebook_size=2048,
    decoder_dim=1536,
    hidden_act="silu",
    hidden_size=1024,
    intermediate_size=3072,
    layer_scale_initial_scale=0.01,
    max_position_embeddings=8000,
    model_type="",
    num_attention_heads=16,
    num_hidden_layers=8,
    num_key_value_heads=16,
    num_quantizers=16,
    num_semantic_quantizers=1,
    rms_norm_eps=1e-05,
    rope_theta=10000,
    semantic_codebook_size=4096,
    sliding_window=72,
    upsample_rates=[8, 5, 4, 3],
    upsampling_ratios=[2, 2],
    vector_quantization_hidden_dimension=512,
  )
  assert hf_config.code2wav_config_from_hf(released) == Code2WavConfig()
  with pytest.raises(ConfigError, match="hidden_act"):
    hf_config.code2wav_config_from_hf(released | dict(hidden_act="gelu"))
  with pytest.raises(ConfigError, match="head_dim"):
    hf_config.code2wav_config_from_hf(released | dict(head_dim=128))


def test_context_frames():
  # pre-transformer: 2 layers x (8 - 1); convs: see conv_context_frames
  assert c2w.decode_context_frames(CFG) == 14 + c2w.conv_context_frames(CFG)
  assert c2w.decode_context_frames(CFG) < LONG


# ---------------------------------------------------------------------------------------------
# Parity
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [1, 2, 7, LONG])
def test_parity_with_transformers(hf_model, params, fwd, t):
  codes = _codes(t, seed=t)
  ref = _hf_wave(hf_model, codes)
  out = _decode(fwd, params, codes)
  assert out.dtype == np.float32
  assert ref.shape == out.shape == (2, CFG.num_samples(t)) == (2, 1920 * t - 555)
  assert ref.std() > 0.02, ref.std()  # not near zero ...
  assert np.mean(np.abs(ref) >= 1) < 0.01  # ... nor clamped flat
  # measured max abs diff: 6.9e-7 (T = 1), 8.3e-7 (2), 1.0e-6 (7), 1.6e-6 (30); std 0.16-0.19
  np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


def test_parity_and_streaming_on_another_layout():
  """A layout the other tests never use: grouped-query attention, window 5, 3 decoder blocks
  with rates (4, 3, 2), upsampling ratios (2, 3), 8 quantizers of 32 entries."""
  kw = dict(
    codebook_size=32,
    num_quantizers=8,
    hidden_size=96,
    num_hidden_layers=3,
    num_attention_heads=6,
    num_key_value_heads=2,
    intermediate_size=80,
    sliding_window=5,
    decoder_dim=48,
    upsample_rates=(4, 3, 2),
    upsampling_ratios=(2, 3),
  )
  cfg = Code2WavConfig(**kw)
  torch.manual_seed(1)
  model = Qwen3OmniMoeCode2Wav(Qwen3OmniMoeCode2WavConfig(**kw)).eval()
  with torch.no_grad():
    randomize_code2wav_(model.state_dict(), output_conv="decoder.5")
  sd = {f"code2wav.{k}": v.numpy() for k, v in model.state_dict().items()}
  params = keymap.from_hf(
    sd.__getitem__, convert.abstract_code2wav_params(cfg), keymap.code2wav_keymap(cfg)
  )
  codes = np.random.default_rng(0).integers(0, 32, (2, 8, 40))
  for t in (1, 40):
    ref = _hf_wave(model, codes[..., :t])
    out = c2w.decode(cfg, params, codes[..., :t])
    assert ref.shape == out.shape == (2, cfg.num_samples(t)) == (2, 144 * t - 32)
    assert ref.std() > 0.02 and np.mean(np.abs(ref) >= 1) < 0.01
    # measured max abs diff: 8.9e-7 (T = 1), 1.9e-6 (40); std 0.18 / 0.28
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)
  streamer = c2w.Code2WavStreamer(params, cfg, 2, chunk_frames=3)
  streamed = np.concatenate([streamer.push(codes[..., i : i + 3]) for i in range(0, 40, 3)], 1)
  np.testing.assert_allclose(streamed, out, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# Export and import
# ---------------------------------------------------------------------------------------------


def test_export_loads_into_transformers(hf_dir, hf_model, params, fwd, thinker):
  d = json.loads((hf_dir / convert.CONFIG_FILE).read_text())
  assert d["enable_audio_output"] is False
  stored = load_file(hf_dir / safetensors_io.SINGLE_FILE)
  c2w_keys = {k for k in stored if k.startswith("code2wav.")}
  assert c2w_keys == set(keymap.hf_keys(keymap.code2wav_keymap(CFG)))
  assert set(stored) - c2w_keys == set(keymap.hf_keys(convert.thinker_keymap(thinker[0])))
  # transformers reads the exported code2wav_config (as a sub-config of the whole model too)
  full = Qwen3OmniMoeConfig.from_pretrained(hf_dir)
  assert full.code2wav_config.sliding_window == CFG.sliding_window
  model = Qwen3OmniMoeCode2Wav(Qwen3OmniMoeCode2WavConfig(**d["code2wav_config"])).eval()
  sd = {k.removeprefix("code2wav."): torch.from_numpy(stored[k]) for k in c2w_keys}
  model.load_state_dict(sd, strict=True)
  codes = _codes(7, seed=3)
  ref = _hf_wave(model, codes)
  np.testing.assert_allclose(_decode(fwd, params, codes), ref, atol=1e-4, rtol=0)
  np.testing.assert_array_equal(ref, _hf_wave(hf_model, codes))  # the very same weights

  cfg, loaded = convert.load_code2wav_hf(hf_dir)
  assert cfg == CFG
  helpers.assert_trees_equal(loaded, params)


def test_no_code2wav(tmp_path, thinker):
  convert.save_hf(*thinker, tmp_path)
  assert convert.load_code2wav_hf(tmp_path) is None
  model = omnijax.load(tmp_path)
  with pytest.raises(RuntimeError, match="no Code2Wav.*--code2wav=CODEC_RUN"):
    model.code2wav(_codes(2))


def test_bad_params_refused(tmp_path, thinker, params):
  bad = dict(params, code_embedding=params["code_embedding"][:-1])
  with pytest.raises(keymap.CheckpointError, match="Code2Wav params.*code_embedding"):
    convert.save_hf(*thinker, tmp_path, code2wav=(CFG, bad))


def test_workdir_round_trip(hf_dir, tmp_path, params):
  """from-hf keeps the Code2Wav in W/code2wav/; to-hf exports it back (also from --code2wav)."""
  workdir = tmp_path / "w"
  export.from_hf(hf_dir, workdir)
  cfg, loaded = ckpt_lib.load_code2wav(workdir)
  assert cfg == CFG
  helpers.assert_trees_equal(loaded, params)
  for source in (None, workdir / ckpt_lib.CODE2WAV):
    out = tmp_path / f"out_{source is None}"
    export.to_hf(workdir, out, code2wav=source)
    assert convert.load_code2wav_hf(out)[0] == CFG
  with pytest.raises(FileNotFoundError, match="neither a codec run"):
    export.to_hf(workdir, tmp_path / "x", code2wav=tmp_path / "nothing")


# ---------------------------------------------------------------------------------------------
# omnijax.load(...).code2wav
# ---------------------------------------------------------------------------------------------


def test_model_code2wav(hf_dir, hf_model, tmp_path):
  model = omnijax.load(hf_dir)
  assert model.code2wav_config == CFG
  for t in (2, 7):  # both padded to 12 frames (one compilation)
    codes = _codes(t, seed=10 + t)
    wave = model.code2wav(codes.tolist() if t == 7 else codes)
    assert wave.dtype == np.float32 and wave.shape == (2, 1920 * t - 555)
    np.testing.assert_allclose(wave, _hf_wave(hf_model, codes), atol=1e-4, rtol=0)

  # a workdir from `export from-hf` has the same vocoder
  export.from_hf(hf_dir, tmp_path / "w")
  codes = _codes(7, seed=17)
  np.testing.assert_array_equal(omnijax.load(tmp_path / "w").code2wav(codes), model.code2wav(codes))

  good = _codes(3)
  with pytest.raises(ValueError, match="num_quantizers=16.*15"):
    model.code2wav(good[:, :15])
  for value in (CFG.codebook_size, -1):
    bad = good.copy()
    bad[1, 4, 2] = value
    with pytest.raises(ValueError, match=f"0..{CFG.codebook_size - 1}.*{value}"):
      model.code2wav(bad)
  with pytest.raises(ValueError, match="integers"):
    model.code2wav(good.astype(np.float32))
  with pytest.raises(ValueError, match="batch"):
    model.code2wav(good[0])
  with pytest.raises(ValueError, match="frames >= 1"):
    model.code2wav(good[..., :0])


def test_load_codec_run_gives_its_tokenizer(tmp_path, monkeypatch):
  """omnijax.load of a speech codec run (experiments/codec.py) is its SpeechTokenizer."""
  from omnijax.codec import tokenizer as codec_tokenizer

  (tmp_path / ckpt_lib.MODEL_JSON).write_text(json.dumps(dict(codec={}, stage="tokenizer")))
  calls = []
  monkeypatch.setattr(
    codec_tokenizer, "load_speech_tokenizer", lambda path, step=None: calls.append((path, step))
  )
  omnijax.load(tmp_path, step=3)
  assert calls == [(tmp_path, 3)]


def test_causal_padding(params, fwd, long_codes, long_wave):
  """Frames appended at the end do not change earlier samples (Model.code2wav pads T)."""
  for t in (1, 2, 7):  # the parity test's shapes (compiled once)
    prefix = _decode(fwd, params, long_codes[..., :t])
    np.testing.assert_allclose(prefix, long_wave[:, : CFG.num_samples(t)], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# Streaming and chunked decoding
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 4])
def test_streamer_equals_full_decode(params, long_codes, long_wave, chunk):
  streamer = c2w.Code2WavStreamer(params, CFG, 2, chunk_frames=chunk)
  pieces = [streamer.push(long_codes[..., i : i + chunk]) for i in range(0, LONG, chunk)]
  # every push returns exactly the samples no later frame changes
  assert [p.shape[1] for p in pieces][:2] == [CFG.num_samples(chunk), 1920 * chunk]
  out = np.concatenate(pieces, axis=1)
  assert out.shape == long_wave.shape
  np.testing.assert_allclose(out, long_wave, atol=1e-5, rtol=0)


def test_streamer_needs_the_window(params, long_codes, long_wave):
  """With a KV cache shorter than the attention window (sliding_window - 1 = 7 frames) each
  layer sees a truncated window. Measured max abs error against the full decode (output std
  ~0.19): 0.59 with left_context 6 (one frame short), 0.82 with 2, 0.86 with 0; 1.3e-6 with 7."""
  streamer = c2w.Code2WavStreamer(params, CFG, 2, chunk_frames=1, left_context=6)
  out = np.concatenate([streamer.push(long_codes[..., i : i + 1]) for i in range(LONG)], axis=1)
  assert np.abs(out - long_wave).max() > 1e-4


def test_decode_chunked(params, fwd, long_codes, long_wave):
  def apply(codes):  # right-padded to LONG frames: one compilation (causal, as Model.code2wav)
    t = codes.shape[-1]
    padded = np.pad(codes, ((0, 0), (0, 0), (0, LONG - t)))
    return _decode(fwd, params, padded)[:, : CFG.num_samples(t)]

  ctx = c2w.decode_context_frames(CFG)  # 25: the chunks from frame 26 on drop early frames
  exact = c2w.decode_chunked(apply, long_codes, CFG, 2, ctx)
  assert exact.shape == long_wave.shape  # no gaps
  np.testing.assert_allclose(exact, long_wave, atol=1e-5, rtol=0)
  # measured max abs error with 2 frames of context: 0.85 (8: 0.56, 16: 1.1e-2, 20: 4e-5; from
  # 24 on ~1e-6: the bound's conv part is rounded up)
  short = c2w.decode_chunked(apply, long_codes, CFG, 2, 2)
  assert short.shape == long_wave.shape
  assert np.abs(short - long_wave).max() > 1e-4


def test_transformers_chunked_decode_drops_555_samples(hf_model, long_codes, long_wave):
  """transformers' chunked_decode keeps each chunk's samples from its first frame on, but a
  decode of F frames ends 555 samples short of 1920 F, so every chunk boundary drops 555 samples:
  its output is the full decode with full[1920 e - 555 : 1920 e] cut out at each chunk end e.
  omnijax's decode_chunked (above) instead keeps each chunk from where the previous stopped."""
  chunk, ctx = 10, c2w.decode_context_frames(CFG)
  with torch.no_grad():
    out = hf_model.chunked_decode(torch.as_tensor(long_codes), chunk, ctx).numpy()[:, 0]
  chunks = LONG // chunk
  assert out.shape[1] == CFG.num_samples(LONG) - CFG.trim * (chunks - 1) == 1920 * LONG - 555 * 3
  keep = np.concatenate(
    [np.arange(1920 * s, 1920 * (s + chunk) - CFG.trim) for s in range(0, LONG, chunk)]
  )
  np.testing.assert_allclose(out, long_wave[:, keep], atol=1e-4, rtol=0)
