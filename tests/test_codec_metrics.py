"""Speech-codec metrics and baseline codecs (omnijax.codec.metrics) on eSpeak speech at 24 kHz."""

import math

import librosa
import numpy as np
import pytest

from data_pipelines.espeak import synthesize
from omnijax.codec import metrics

SR = 24000


@pytest.fixture(scope="module")
def speech():
  """Two seconds of eSpeak speech, resampled to 24 kHz, peak 0.5."""
  samples, rate = synthesize("the quick brown fox jumps over the lazy dog")
  wave = librosa.resample(
    samples.astype(np.float64) / 32768, orig_sr=rate, target_sr=SR, res_type="soxr_hq"
  )[: 2 * SR]
  assert len(wave) == 2 * SR
  return 0.5 * wave / np.abs(wave).max()


@pytest.fixture(scope="module")
def noise(speech):
  """White noise at the speech's RMS: what a codec must beat."""
  return np.random.default_rng(0).standard_normal(len(speech)) * speech.std()


def _at_snr(signal, snr_db, seed=1):
  noise = np.random.default_rng(seed).standard_normal(len(signal))
  signal_power = np.mean((signal - signal.mean()) ** 2)
  noise *= np.sqrt(signal_power / np.mean(noise**2) / 10 ** (snr_db / 10))
  return signal + noise


def test_identical_signals_score_perfectly(speech):
  result = metrics.evaluate_pair(speech, speech)
  assert set(result) == {"mel_distance", "si_sdr", "stoi", "pesq"}
  assert result["mel_distance"] == 0.0
  assert result["si_sdr"] > 100
  assert result["stoi"] == pytest.approx(1.0, abs=1e-6)
  assert result["pesq"] == pytest.approx(4.64, abs=0.01)


def test_noise_scores_badly(speech, noise):
  result = metrics.evaluate_pair(speech, noise)
  assert result["mel_distance"] > 0.8
  assert result["si_sdr"] < -20
  assert result["stoi"] < 0.6
  assert result["pesq"] < 1.2


@pytest.mark.parametrize("snr_db", [0.0, 10.0, 20.0])
def test_si_sdr_matches_snr_and_ignores_scale(speech, snr_db):
  noisy = _at_snr(speech, snr_db)
  assert metrics.si_sdr(speech, noisy) == pytest.approx(snr_db, abs=0.5)
  assert metrics.si_sdr(speech, 3 * noisy) == pytest.approx(metrics.si_sdr(speech, noisy), abs=1e-9)
  assert metrics.si_sdr(speech, noisy + 0.1) == pytest.approx(
    metrics.si_sdr(speech, noisy), abs=1e-9
  )


def test_metrics_order_by_noise_level(speech):
  mild, strong = _at_snr(speech, 20), _at_snr(speech, 0)
  assert metrics.mel_distance(speech, mild) < metrics.mel_distance(speech, strong)
  assert metrics.stoi(speech, mild) > metrics.stoi(speech, strong)
  assert metrics.pesq_wb(speech, mild) > metrics.pesq_wb(speech, strong)


def test_pair_is_trimmed_to_shorter(speech):
  assert metrics.mel_distance(speech, speech[:-100]) == 0.0
  assert metrics.si_sdr(speech[: SR + 7], speech) > 100


def test_mel_distance_is_mean_over_scales():
  # A gain of 10 shifts every log10 mel value by exactly 1 where nothing is clamped (loud noise):
  # the mean over the seven scales is 1 (DAC's sum would be 7).
  loud = np.random.default_rng(2).standard_normal(SR) * 0.3
  assert metrics.mel_distance(loud, 10 * loud) == pytest.approx(1.0, abs=1e-6)
  # Where both are below the 1e-5 clamp they agree, so a quiet pair differs by less.
  assert 0.5 < metrics.mel_distance(1e-3 * loud, 1e-2 * loud) < 1.0


def test_pesq_unscorable_input_is_nan(speech):
  silence = np.zeros(2 * SR)
  assert math.isnan(metrics.pesq_wb(silence, silence))
  assert math.isnan(metrics.pesq_wb(speech[:1000], speech[:1000]))  # 42 ms: too short.


def test_summarize_ignores_nans_and_counts():
  summary = metrics.summarize(
    [
      {"mel_distance": 1.0, "si_sdr": 10.0, "stoi": 0.5, "pesq": 2.0},
      {"mel_distance": 3.0, "si_sdr": 20.0, "stoi": 0.7, "pesq": math.nan},
    ]
  )
  assert summary["num_clips"] == 2
  assert summary["mel_distance"] == 2.0 and summary["mel_distance_count"] == 2
  assert summary["si_sdr"] == 15.0 and summary["stoi"] == pytest.approx(0.6)
  assert summary["pesq"] == 2.0 and summary["pesq_count"] == 1
  empty = metrics.summarize([{"pesq": math.nan}])
  assert math.isnan(empty["pesq"]) and empty["pesq_count"] == 0


def test_perplexity_and_usage():
  q, k = 4, 64
  uniform = np.broadcast_to(np.arange(k), (2, q, k))  # (B, Q, T), every code equally often.
  np.testing.assert_allclose(metrics.codebook_perplexity(uniform, k), np.full(q, k))
  np.testing.assert_allclose(metrics.codebook_usage(uniform, k), np.ones(q))
  constant = np.full((3, q, 50), 7)
  np.testing.assert_allclose(metrics.codebook_perplexity(constant, k), np.ones(q))
  np.testing.assert_allclose(metrics.codebook_usage(constant, k), np.full(q, 1 / k))
  random = np.random.default_rng(0).integers(0, k, size=(8, q, 2000))
  assert metrics.codebook_perplexity(random, k) == pytest.approx(np.full(q, k), rel=0.02)
  # Quantizers are kept apart: only the first uses half the codebook.
  mixed = np.stack([np.arange(200) % (k // 2), np.zeros(200, int)])  # (Q=2, T)
  np.testing.assert_allclose(metrics.codebook_perplexity(mixed, k), [k // 2, 1], rtol=0.01)
  np.testing.assert_allclose(metrics.codebook_usage(mixed, k), [0.5, 1 / k])
  with pytest.raises(ValueError):
    metrics.codebook_perplexity(np.array([[0, k]]), k)


def test_bitrate():
  assert metrics.bitrate(16, 2048, 12.5) == 2200.0
  assert metrics.bitrate(8, 1024, 75) == 6000.0


@pytest.mark.parametrize(
  "codec, expected_bps",
  [(metrics.mulaw_baseline, 3000.0), (metrics.mel_griffinlim_baseline, 2500.0)],
)
def test_baseline_codecs_beat_noise_but_are_imperfect(speech, noise, codec, expected_bps):
  recon, bps = codec(speech, SR)
  assert recon.shape == speech.shape
  assert np.all(np.isfinite(recon))
  assert bps == expected_bps and bps >= 2200
  result, against_noise = metrics.evaluate_pair(speech, recon), metrics.evaluate_pair(speech, noise)
  # Intelligibility and quality are better than noise, and far from transparent.
  assert against_noise["stoi"] + 0.1 < result["stoi"] < 0.9
  assert against_noise["pesq"] < result["pesq"] < 2.0
  assert result["mel_distance"] > 0.3
  if codec is metrics.mulaw_baseline:  # Keeps the waveform: phase is right below 500 Hz.
    assert result["si_sdr"] > against_noise["si_sdr"] + 20
  else:  # Keeps the spectral envelope, not the phase.
    assert result["mel_distance"] < 0.7 * against_noise["mel_distance"]


def test_mel_griffinlim_baseline_is_deterministic(speech):
  first, _ = metrics.mel_griffinlim_baseline(speech[:SR], SR)
  second, _ = metrics.mel_griffinlim_baseline(speech[:SR], SR)
  np.testing.assert_array_equal(first, second)
