"""Figures of codec runs: log-mel spectrograms of an original clip and its reconstructions."""

from __future__ import annotations

from pathlib import Path

import librosa
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def mel_comparison(original: np.ndarray, reconstructions: dict, sample_rate: int, path: Path):
  """One row per signal: 80-band log-mel (dB) of the original and each reconstruction."""
  rows = {"original": original, **reconstructions}
  mels = {
    name: librosa.feature.melspectrogram(y=w, sr=sample_rate, n_fft=1024, hop_length=256, n_mels=80)
    for name, w in rows.items()
  }
  ref = float(mels["original"].max())  # one dB scale for every row
  fig, axes = plt.subplots(len(rows), 1, figsize=(9, 2.2 * len(rows)), sharex=True)
  for ax, (name, mel) in zip(np.atleast_1d(axes), mels.items()):
    db = librosa.power_to_db(mel, ref=ref, top_db=None)
    ax.imshow(db, origin="lower", aspect="auto", cmap="magma", vmin=-80, vmax=0)
    ax.set_ylabel("mel band")
    ax.set_title(name, fontsize=9)
  np.atleast_1d(axes)[-1].set_xlabel(f"frame (hop 256 at {sample_rate} Hz)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
