"""Speech tokenizer: residual VQ, EMA codebooks, the exact fold into Code2Wav, the losses, the
speech pipeline's bad-input handling, and codec training (runs, resumes, shards)."""

import io
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import librosa
import numpy as np
import pytest
import soundfile as sf

from data_pipelines import speech as speech_lib
from omnijax.codec import losses, model as codec_model
from omnijax.codec import tokenizer as tokenizer_lib
from omnijax.errors import ConfigError
from omnijax.models.code2wav import Code2Wav
from tests import helpers


def test_quantize_is_residual_nearest_neighbour_with_dropout():
  rng = np.random.default_rng(0)
  q, k, d = 4, 16, 3
  embed = rng.standard_normal((q, k, d)).astype(np.float32)
  z = rng.standard_normal((2, 5, d)).astype(np.float32)
  n_active = np.array([4, 2])
  zq, codes, residuals, active, commit = codec_model.quantize(
    jnp.asarray(z), jnp.asarray(embed), jnp.asarray(n_active)
  )
  for b in range(2):
    r = z[b].copy()
    total = np.zeros_like(r)
    errs = []
    for i in range(q):
      want = np.argmin(((r[:, None] - embed[i][None]) ** 2).sum(-1), axis=-1)
      np.testing.assert_array_equal(codes[b, i], want)
      np.testing.assert_allclose(residuals[i, b], r, atol=1e-5)
      if i < n_active[b]:
        errs.append(np.mean((r - embed[i][want]) ** 2, -1).mean())
        total += embed[i][want]
        r = r - embed[i][want]
    np.testing.assert_allclose(zq[b], total, atol=1e-5)
  assert active.tolist() == [[True, True]] * 2 + [[True, False]] * 2
  assert commit > 0


def test_ema_update_moves_used_entries_and_restarts_dead_ones():
  q, k, d = 2, 8, 2
  books = dict(
    embed=jnp.zeros((q, k, d)),
    cluster_size=jnp.ones((q, k)) * 10,
    embed_sum=jnp.zeros((q, k, d)),
    latent_mean=jnp.zeros((d,)),
    latent_var=jnp.ones((d,)),
  )
  books["cluster_size"] = books["cluster_size"].at[:, 7].set(0.0)  # entry 7 is dead
  res = jnp.ones((q, 1, 4, d)) * jnp.arange(1, 5, dtype=jnp.float32)[None, None, :, None]
  codes = jnp.zeros((1, q, 4), jnp.int32)  # every vector goes to entry 0
  aux = dict(
    residuals=res,
    codes=codes,
    active=jnp.ones((q, 1), bool),
    latent_mean=jnp.full((d,), 2.0),
    latent_var=jnp.full((d,), 3.0),
  )
  new, stats = codec_model.ema_update(books, aux, jax.random.key(0), decay=0.5, threshold=0.1)
  # entry 0: size 0.5 * 10 + 0.5 * 4 = 7, sum 0.5 * 0 + 0.5 * (1 + 2 + 3 + 4) = 5 per dim
  smoothed_total = float(new["cluster_size"][0].sum())
  assert new["cluster_size"][0, 0] == pytest.approx(7.0)
  assert float(new["embed"][0, 0, 0]) == pytest.approx(5 / 7, rel=1e-3)
  # the dead entry restarts at one of the batch's residuals, with an average entry's count
  assert float(new["embed"][0, 7, 0]) in (1.0, 2.0, 3.0, 4.0)
  assert new["cluster_size"][0, 7] == pytest.approx(4 / k)
  assert float(stats["dead_codes"]) == 1.0 and smoothed_total > 0
  np.testing.assert_allclose(new["latent_mean"], 1.0)  # EMA of the latent's batch statistics
  np.testing.assert_allclose(new["latent_var"], 2.0)


def _tiny_codec(**over) -> codec_model.CodecConfig:
  return codec_model.CodecConfig.from_dict(helpers.tiny_codec_model(**over))


def test_fold_latent_proj_gives_a_released_code2wav_exactly():
  cfg = _tiny_codec()
  rng = jax.random.key(0)
  books = codec_model.init_codebooks(cfg, rng)
  wave = jax.random.normal(rng, (2, 3 * cfg.hop)) * 0.1
  codec = codec_model.SpeechCodec(cfg)
  n = jnp.full((2,), cfg.num_quantizers)
  abstract = jax.eval_shape(codec.init, rng, wave, books["embed"], n)["params"]
  params = helpers.random_params(nn.meta.unbox(abstract), gain=0.5)

  @jax.jit
  def both(params, books):
    z = codec.apply({"params": params}, wave, method="encode_latent")
    zq = codec_model.quantize(z, books["embed"], n)[0]
    return codec_model.encode_codes(z, books["embed"]), codec.apply(
      {"params": params}, zq, method="decode_latent"
    )

  codes, via_latent = both(params, books)
  folded = codec_model.export_code2wav(cfg, params, books)
  via_codes = jax.jit(Code2Wav(cfg.code2wav).apply)({"params": folded}, codes)
  assert via_codes.shape == (2, cfg.code2wav.num_samples(3))
  assert 0.01 < float(jnp.std(via_codes)) and float(jnp.mean(jnp.abs(via_codes) == 1)) < 0.01
  np.testing.assert_allclose(via_codes, via_latent, atol=1e-5, rtol=1e-4)


def test_codec_config_errors():
  with pytest.raises(ConfigError, match="samples per frame but Code2Wav upsamples 1920"):
    _tiny_codec(encoder_ratios=(4, 5, 6, 4))
  with pytest.raises(ConfigError, match="unknown config field"):
    _tiny_codec(codebooks=3)


def test_stft_and_mel_loss():
  x = np.random.default_rng(0).standard_normal((1, 4000)).astype(np.float32)
  ours = np.abs(np.asarray(losses.stft(jnp.asarray(x), 512, 128)))[0]
  ref = np.abs(librosa.stft(x[0], n_fft=512, hop_length=128, center=True, pad_mode="reflect")).T
  np.testing.assert_allclose(ours, ref, atol=2e-3, rtol=1e-3)
  assert float(losses.mel_loss(jnp.asarray(x), jnp.asarray(x), 24000)) == 0.0
  assert float(losses.mel_loss(jnp.asarray(x), jnp.asarray(0.5 * x), 24000)) == pytest.approx(
    7 * math.log10(2), rel=1e-2
  )


def _wav(samples, rate) -> bytes:
  buf = io.BytesIO()
  sf.write(buf, samples, rate, format="WAV", subtype="FLOAT")
  return buf.getvalue()


def test_speech_pipeline_resamples_and_skips_bad_audio(tmp_path):
  rate = 16000
  t = np.arange(rate) / rate
  good = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
  examples = [
    dict(audio=_wav(good, rate)),
    dict(audio=_wav(np.zeros(rate, np.float32), rate)),
    dict(audio=_wav(np.where(t < 0.5, good, np.nan).astype(np.float32), rate)),
    dict(audio=_wav(good[:100], rate)),
    dict(text="no audio"),
    dict(audio=_wav(good, rate)),
  ]
  helpers.write_records(tmp_path, "train", examples)
  cfg = speech_lib.default_config(str(tmp_path))
  cfg.update(batch_size=2, segment_samples=1920 * 15)
  it = iter(speech_lib.make_speech_dataset(cfg, num_epochs=1))
  batch = next(it)
  assert batch["wave"].shape == (2, 1920 * 15) and batch["wave"].dtype == np.float32
  # 1 s at 16 kHz is 24000 samples at 24 kHz, zero-padded to the 28800-sample segment
  for row in batch["wave"]:
    assert np.abs(row[:24000]).max() > 0.2 and np.abs(row[24010:]).max() == 0
  skipped = it.skipped_records
  assert skipped["silent_audio"] == 1 and skipped["non_finite"] == 1
  assert skipped["too_short"] == 1 and skipped["missing_field"] == 1


@pytest.mark.slow
def test_codec_training_runs_resumes_and_shards(codec_run, local_speech_dir, tmp_path):
  workdir, straight = codec_run
  steps = len(straight)
  assert steps == 4
  assert all(np.isfinite(v) for row in straight for v in row.values() if isinstance(v, float))
  assert "adv_loss" in straight[-1] and "d_loss" in straight[-1]  # adversarial from step 2
  assert "adv_loss" not in straight[0]
  helpers.run_codec(tmp_path / "b", local_speech_dir, steps=2, num_devices=1)
  resumed = helpers.run_codec(tmp_path / "b", local_speech_dir, steps=steps, num_devices=1)
  assert [r["step"] for r in resumed] == [1, 2, 3, 4]  # the relaunch went on from step 2
  for k in ("loss", "mel_loss", "d_loss"):
    assert resumed[-1][k] == straight[-1][k], k
  sharded = helpers.run_codec(tmp_path / "c", local_speech_dir, steps=steps, num_devices=8)
  for k in ("loss", "mel_loss", "commit_loss"):
    np.testing.assert_allclose(sharded[0][k], straight[0][k], rtol=2e-4, err_msg=k)
  # Nearest-code choices within float rounding of a tie can flip between the two programs and
  # the flips compound over steps (measured after 4 steps: commitment 5e-3, total loss 9.8e-4
  # relative); a wrong gradient reduction or codebook state would differ by far more.
  for k, rtol in (("loss", 5e-3), ("mel_loss", 5e-3), ("d_loss", 5e-3), ("commit_loss", 2e-2)):
    np.testing.assert_allclose(sharded[-1][k], straight[-1][k], rtol=rtol, err_msg=k)
  final = json.loads((workdir / "final_metrics.json").read_text())
  assert "eval/mel_distance" in final and final["eval/codebook_perplexity_mean"] >= 1.0


@pytest.mark.slow
def test_tokenizer_encodes_and_decodes(codec_run):
  tok = tokenizer_lib.load_speech_tokenizer(codec_run[0])
  wave = np.random.default_rng(0).standard_normal((2, 5000)).astype(np.float32) * 0.1
  codes = tok.encode(wave)
  assert codes.shape == (2, 16, 3) and codes.dtype == np.int32
  np.testing.assert_array_equal(tok.encode(wave[:1]), codes[:1])
  out = tok.code2wav(codes)
  assert out.shape == (2, 1920 * 3 - 555) and np.isfinite(out).all()
  with pytest.raises(ValueError, match="num_quantizers=16"):
    tok.code2wav(codes[:, :15])
  with pytest.raises(ValueError, match="0..2047"):
    tok.code2wav(codes + 2048)


@pytest.mark.slow
def test_vocoder_stage_starts_from_the_folded_decoder(codec_run, local_speech_dir, tmp_path):
  tok = tokenizer_lib.load_speech_tokenizer(codec_run[0])
  rows = helpers.run_codec(
    tmp_path / "voc",
    local_speech_dir,
    steps=2,
    num_devices=1,
    stage="vocoder",
    tokenizer=codec_run[0],
  )
  assert "commit_loss" not in rows[-1] and np.isfinite(rows[-1]["loss"])
  voc = tokenizer_lib.load_speech_tokenizer(tmp_path / "voc")
  np.testing.assert_array_equal(voc.codebooks, tok.codebooks)  # the tokenizer stays frozen
  changed = jax.tree.map(
    lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
    voc.code2wav_params(),
    tok.code2wav_params(),
  )
  assert max(jax.tree.leaves(changed)) > 0  # the vocoder trained
  with pytest.raises(ConfigError, match="needs tokenizer=WORKDIR"):
    helpers.run_codec(tmp_path / "bad", local_speech_dir, steps=1, num_devices=1, stage="vocoder")
