"""Speech generation (`Model.generate(return_audio=True)`, `Model.generate_stream`) against
transformers' `Qwen3OmniMoeForConditionalGeneration.generate(return_audio=True)` on the same
weights.

One tiny float32 model for the module: the `tiny` Thinker and Talker presets and a small
Code2Wav (codebook 2048, 24 samples a frame), drawn in transformers with weights that keep
activations O(1), saved, and loaded with `omnijax.load`. Transformers' frame codes are read from
its Talker's forward outputs (`hidden_states[1]` holds the frame each decode call fed).
Greedy generation gives transformers' text ids, 16 x T codes and waveform (within WAVE_TOL)
for: a text prompt; a prompt with audio (real input_features; the Talker reads the Thinker's
layer-1 states there) under the default repetition penalty; a text that ends early with
<|im_end|>; a left-padded batch of two in which one row's text and both rows' speech end early
(EOS logits scaled up on both sides). Also: sampled generation is reproducible per seed and
differs across seeds; streamed chunks concatenate to the non-streamed waveform (batch too) and
the first one comes while the Thinker is still generating; the export round trip (transformers
dir -> workdir -> transformers dir) keeps the Talker; argument errors. `pytest -s` prints the
measurements.
"""

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import omnijax  # noqa: E402
from omnijax import api, export  # noqa: E402
from omnijax.hf import convert, hf_config, safetensors_io  # noqa: E402
from omnijax.models import presets  # noqa: E402
from omnijax.models.config import Code2WavConfig, TalkerConfig, ThinkerConfig  # noqa: E402
from omnijax.processing import positions as P  # noqa: E402
from omnijax.train import checkpoint as ckpt_lib  # noqa: E402
from omnijax.hf.random_weights import randomize_, randomize_code2wav_  # noqa: E402

THINKER = ThinkerConfig.from_dict(presets.get("tiny"))
TALKER = TalkerConfig.from_dict(presets.get_talker("tiny"))
CODE2WAV = Code2WavConfig(
  codebook_size=2048,
  num_quantizers=16,
  hidden_size=32,
  num_hidden_layers=1,
  num_attention_heads=2,
  num_key_value_heads=2,
  intermediate_size=64,
  sliding_window=8,
  decoder_dim=32,
  upsample_rates=(4, 3),
  upsampling_ratios=(2,),
)
# Thinker-vocabulary ids of the tiny presets (the local tokenizer's layout).
AUDIO_START, AUDIO_END, AUDIO = 3, 4, 5
IM_START, IM_END, SYSTEM, USER, ASSISTANT, NL = 1, 2, 13, 14, 15, 200
N_TEXT, N_FRAMES = 6, 8
WAVE_TOL = 1e-4
GREEDY = dict(
  thinker_max_new_tokens=N_TEXT,
  thinker_do_sample=False,
  talker_max_new_tokens=N_FRAMES + 1,
  talker_do_sample=False,
  talker_repetition_penalty=1.0,
)


def _turn(role, *body):
  return [IM_START, role, NL, *body, IM_END, NL]


TEXT_PROMPT = _turn(SYSTEM, 40, 41) + _turn(USER, 42, 43, 44, 45) + [IM_START, ASSISTANT, NL]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  cfg = hf_config.to_hf_config(THINKER, talker=TALKER)
  cfg["code2wav_config"] = hf_config.code2wav_config_to_hf(CODE2WAV)
  torch.manual_seed(0)
  model = transformers.Qwen3OmniMoeForConditionalGeneration(transformers.Qwen3OmniMoeConfig(**cfg))
  randomize_(model.thinker.model, 1)
  randomize_(model.thinker.lm_head, 2)
  randomize_(model.talker, 3)
  with torch.no_grad():
    randomize_code2wav_(model.code2wav.state_dict(), output_conv="decoder.4")  # 2 decoder blocks
  out = tmp_path_factory.mktemp("speech_hf")
  model.save_pretrained(out)
  return out


@pytest.fixture(scope="module")
def hf_model(hf_dir):
  # One torch thread: on a few shared cores its tiny batched matmuls are otherwise ~30x slower.
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield transformers.Qwen3OmniMoeForConditionalGeneration.from_pretrained(
    hf_dir, dtype=torch.float32
  ).eval()
  torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model(hf_dir):
  m = omnijax.load(hf_dir)
  assert m.talker_config == TALKER and m.code2wav_config == CODE2WAV
  return m


def _hf_generate(hf_model, ids, **kwargs):
  """transformers' (sequences, waveform or list of waveforms, codes (B, 16, T))."""
  codes = []

  def keep_codes(_, args, kwargs, out):
    if out.hidden_states[1] is not None:  # the prefill call feeds no frame
      codes.append(out.hidden_states[1].numpy())

  hook = hf_model.talker.register_forward_hook(keep_codes, with_kwargs=True)
  try:
    kwargs = {k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v for k, v in kwargs.items()}
    seq, wave = hf_model.generate(
      torch.as_tensor(np.asarray(ids)), return_audio=True, thinker_eos_token_id=IM_END, **kwargs
    )
  finally:
    hook.remove()
  return seq.numpy(), wave, np.stack(codes, -1)


def _check_greedy(hf_model, model, ids, what, **kwargs):
  kwargs = dict(GREEDY, **kwargs)
  seq, wave, codes = _hf_generate(hf_model, [ids], **kwargs)
  wave = wave.numpy()[0]
  ours, our_wave, our_codes = model.generate([ids], return_audio=True, return_codes=True, **kwargs)
  diff = float(np.abs(our_wave - wave).max())
  print(
    f"\n[{what}] text {seq.shape[1] - len(ids)} tokens, codes {codes.shape[1:]}, "
    f"waveform {wave.shape[1]} samples, max diff {diff:.3g} (|wave| max {np.abs(wave).max():.3g})"
  )
  np.testing.assert_array_equal(ours, seq)
  assert codes.shape[-1] >= 3 and len(set(codes[0, 0])) > 1
  np.testing.assert_array_equal(our_codes, codes)
  assert our_wave.dtype == np.float32 and our_wave.shape == wave.shape
  assert wave.std() > 0.05 and (np.abs(wave) < 1).mean() > 0.9  # neither silent nor clamped
  assert diff <= WAVE_TOL
  return ours, our_wave, our_codes


def test_greedy_text_prompt_matches_transformers(hf_model, model):
  _check_greedy(hf_model, model, TEXT_PROMPT, "text")


def test_greedy_audio_prompt_matches_transformers(hf_model, model):
  frames = 230  # mel frames: two full 100-frame chunks and a remainder
  ids = (
    _turn(SYSTEM, 40)
    + _turn(USER, 41, AUDIO_START, *[AUDIO] * P.audio_token_count(frames), AUDIO_END, 42)
    + [IM_START, ASSISTANT, NL]
  )
  feats = np.random.default_rng(0).standard_normal((1, 128, frames)).astype(np.float32)
  _check_greedy(
    hf_model,
    model,
    ids,
    "audio, repetition penalty 1.05",
    input_features=feats,
    feature_attention_mask=np.ones((1, frames), np.int64),
    talker_repetition_penalty=1.05,
  )


def _eos_scaled(hf_model, model, text_eos: float, codec_eos: float):
  """Copies of both models with the Thinker's <|im_end|> and the Talker's codec-EOS logits
  scaled: the text and the speech end before their max_new_tokens."""
  hf_model = copy.deepcopy(hf_model)
  eos = TALKER.codec_eos_token_id
  with torch.no_grad():
    hf_model.thinker.lm_head.weight[IM_END] *= text_eos
    hf_model.talker.codec_head.weight[eos] *= codec_eos
  params = dict(model.params, lm_head=model.params["lm_head"].at[:, IM_END].multiply(text_eos))
  talker = model.talker_params
  talker = dict(talker, codec_head=talker["codec_head"].at[:, eos].multiply(codec_eos))
  return hf_model, api.Model(
    model.config, params, code2wav=(CODE2WAV, model.code2wav_params), talker=(TALKER, talker)
  )


SHORT_PROMPT = _turn(USER, 60) + [IM_START, ASSISTANT, NL]


def test_greedy_text_ending_early_matches_transformers(hf_model, model):
  """The text ends with <|im_end|> (never fed to the Talker) at its 4th token; the speech goes
  on with tts_eos, then tts_pad."""
  hf_model, model = _eos_scaled(hf_model, model, 3, 1)
  ids, _, codes = _check_greedy(hf_model, model, SHORT_PROMPT, "text ends early")
  assert ids[0, len(SHORT_PROMPT) :].tolist()[-1] == IM_END
  assert ids.shape[1] - len(SHORT_PROMPT) == 4 and codes.shape[-1] == N_FRAMES


def test_greedy_left_padded_batch_with_early_stops_matches_transformers(hf_model, model):
  """Row 1's text ends (<|im_end|> at its 4th token) while row 0's goes on, and both rows'
  speech ends early, at different frames; streamed as well."""
  hf_model, model = _eos_scaled(hf_model, model, 3, 2)
  s, n = len(TEXT_PROMPT), len(SHORT_PROMPT)
  ids = np.zeros((2, s), np.int64)
  mask = np.zeros((2, s), np.int64)
  ids[0], mask[0] = TEXT_PROMPT, 1
  ids[1, s - n :], mask[1, s - n :] = SHORT_PROMPT, 1
  seq, waves, codes = _hf_generate(hf_model, ids, attention_mask=mask, **GREEDY)
  ours, our_wave, our_codes = model.generate(
    ids, attention_mask=mask, return_audio=True, return_codes=True, **GREEDY
  )
  np.testing.assert_array_equal(ours, seq)
  assert (seq[1, s:] == IM_END).argmax() == 3 and (seq[0, s:] != IM_END).all()
  frames = [(len(w) + CODE2WAV.trim) // CODE2WAV.total_upsample for w in waves]
  print(f"\n[batch of 2] frames per row {frames}, codes {codes.shape[1:]}")
  assert frames[0] != frames[1] and max(frames) < N_FRAMES
  diffs = []
  for b, wave in enumerate(waves):
    wave = wave.numpy()
    np.testing.assert_array_equal(our_codes[b, :, : frames[b]], codes[b, :, : frames[b]])
    np.testing.assert_array_equal(our_codes[b, :, frames[b] :], -1)
    np.testing.assert_array_equal(our_wave[b, len(wave) :], 0)
    diffs.append(float(np.abs(our_wave[b, : len(wave)] - wave).max()))
  print(f"[batch of 2] waveform max diffs {diffs}")
  assert our_codes.shape == codes.shape and max(diffs) <= WAVE_TOL
  # Streamed frame by frame: each row is zero after its end in the chunks too.
  chunks = list(model.generate_stream(ids, attention_mask=mask, **GREEDY))
  np.testing.assert_allclose(np.concatenate(chunks, 1), our_wave, atol=1e-5, rtol=0)


SAMPLED = dict(thinker_max_new_tokens=N_TEXT, thinker_do_sample=True, talker_max_new_tokens=8)


def test_sampling_is_reproducible_per_seed(model):
  runs = [
    model.generate([TEXT_PROMPT], return_audio=True, return_codes=True, seed=s, **SAMPLED)
    for s in (1, 1, 2)
  ]
  for a, b in zip(runs[0], runs[1]):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(runs[0][2], runs[2][2])
  assert not np.array_equal(runs[0][0], runs[2][0])


def test_stream_equals_generate_and_starts_before_the_text_ends(model):
  kwargs = dict(SAMPLED, thinker_max_new_tokens=12, seed=3)
  ids, wave, codes = model.generate([TEXT_PROMPT], return_audio=True, return_codes=True, **kwargs)
  assert ids.shape[1] - len(TEXT_PROMPT) == 12 and codes.shape[-1] == 7
  stream = model.generate_stream([TEXT_PROMPT], chunk_frames=2, **kwargs)
  chunks, text_at_chunk = [], []
  for chunk in stream:
    chunks.append(chunk)
    text_at_chunk.append(stream.thinker_tokens)
  print(f"\n[stream] chunks {[c.shape[1] for c in chunks]}, text tokens then {text_at_chunk}")
  assert text_at_chunk[0] < 12  # the first audio came while the Thinker was still generating
  assert all(c.dtype == np.float32 and c.shape[0] == 1 for c in chunks)
  np.testing.assert_allclose(np.concatenate(chunks, 1), wave, atol=1e-5, rtol=0)
  np.testing.assert_array_equal(stream.sequences, ids)
  np.testing.assert_array_equal(stream.codes, codes)


def test_export_round_trip_keeps_the_talker(hf_dir, hf_model, model, tmp_path):
  wd = tmp_path / "workdir"
  export.from_hf(hf_dir, wd)
  assert ckpt_lib.read_talker_config(wd) == TALKER
  loaded = omnijax.load(wd)
  assert loaded.talker_config == TALKER and loaded.code2wav_config == CODE2WAV
  ours = model.generate([TEXT_PROMPT], return_audio=True, return_codes=True, **GREEDY)
  again = loaded.generate([TEXT_PROMPT], return_audio=True, return_codes=True, **GREEDY)
  for a, b in zip(ours, again):
    np.testing.assert_array_equal(a, b)

  out = tmp_path / "hf"
  export.to_hf(wd, out)
  assert convert.has_talker(out) and convert.has_code2wav(out)
  reloaded, info = transformers.Qwen3OmniMoeForConditionalGeneration.from_pretrained(
    out, dtype=torch.float32, output_loading_info=True
  )
  assert reloaded.has_talker and not info["unexpected_keys"] and not info["mismatched_keys"]
  assert not info["missing_keys"]
  seq, wave, codes = _hf_generate(reloaded.eval(), [TEXT_PROMPT], **GREEDY)
  np.testing.assert_array_equal(seq, ours[0])
  np.testing.assert_array_equal(codes, ours[2])
  np.testing.assert_allclose(wave.numpy()[0], ours[1], atol=WAVE_TOL, rtol=0)

  saved = tmp_path / "saved"
  loaded.save_hf(saved)
  keys = set(safetensors_io.Reader(saved).keys())
  assert keys == set(safetensors_io.Reader(out).keys())
  assert any(k.startswith("talker.") for k in keys)


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (dict(speaker="Nobody"), "unknown speaker 'Nobody'"),
    (dict(temperature=0.7), "thinker_temperature instead of temperature"),
    (dict(thinker_top_p=0.5), "only apply with thinker_do_sample=True"),
    (dict(talker_max_new_tokens=0), "talker_max_new_tokens must be an integer >= 1"),
    (dict(talker_repetition_penalty=0.0), "talker_repetition_penalty must be > 0"),
    (dict(talker_top_p=1.5), r"talker_top_p must lie in \(0, 1\]"),
  ],
)
def test_argument_errors(model, kwargs, match):
  with pytest.raises(ValueError, match=match):
    model.generate([TEXT_PROMPT], return_audio=True, **kwargs)


def test_nothing_to_speak(model):
  """The Thinker's only token is its last, which is never spoken (transformers fails here)."""
  ids, wave, codes = model.generate(
    [TEXT_PROMPT], return_audio=True, return_codes=True, **dict(GREEDY, thinker_max_new_tokens=1)
  )
  assert ids.shape == (1, len(TEXT_PROMPT) + 1)
  assert wave.shape == (1, 0) and wave.dtype == np.float32 and codes.shape == (1, 16, 0)


def test_prompt_and_model_errors(model):
  with pytest.raises(ValueError, match="must end with an assistant turn header"):
    model.generate([_turn(USER, 42, 43)], return_audio=True)
  with pytest.raises(ValueError, match="pass max_new_tokens or thinker_max_new_tokens"):
    model.generate([TEXT_PROMPT], 4, return_audio=True, thinker_max_new_tokens=4)
  no_talker = api.Model(model.config, model.params, code2wav=(CODE2WAV, model.code2wav_params))
  with pytest.raises(ValueError, match="needs a Talker"):
    no_talker.generate([TEXT_PROMPT], return_audio=True)
  no_vocoder = api.Model(model.config, model.params, talker=(TALKER, model.talker_params))
  with pytest.raises(ValueError, match="needs a Code2Wav"):
    no_vocoder.generate_stream([TEXT_PROMPT])
