"""Speech codec code providers: 24 kHz waveforms -> Qwen3-Omni codec codes.

Qwen3-Omni's Talker predicts, and Code2Wav decodes, 16-codebook codec frames
(codebook size 2048) at 12.5 Hz of 24 kHz audio, one frame per ``HOP_LENGTH``
= 1920 samples. A ``CodeProvider`` computes those codes for training targets:

  provider = load_code_provider(path)       # once per process
  codes = provider.encode(waves)            # (B, N) float32 -> (B, 16, T) int32

Length rule: ``T = ceil(N / 1920)``. A trailing partial frame counts as a frame
(the codec pads the waveform on the right up to a whole frame), and every
input of at least one sample has at least one frame. transformers' ``MimiModel``
follows this rule itself (checked for N = 1, 1919, 1920, 1921, 3841, 24000,
24001: its convolutions pad internally); ``MimiCodes`` verifies it per call.
Batched waves share one length: pad shorter ones yourself and cut their codes
at ``num_frames(n)``.

Providers:

- ``MimiCodes``: a transformers ``MimiModel`` directory (``config.json`` with
  ``"model_type": "mimi"`` + safetensors), its first ``num_quantizers``
  quantizers (the first is Mimi's semantic codebook). PyTorch on CPU.
- an omnijax speech-tokenizer workdir (``model.json`` of a codec run, with its
  ``"codec"`` config, written by ``experiments/codec.py``):
  ``omnijax.codec.tokenizer.load_speech_tokenizer``.

``check_codes`` validates codes (shape and range) wherever they enter: the
``speech_codes`` data op (``data_pipelines.speech_codes``) and Code2Wav.
"""

from __future__ import annotations

import json
import math
import os
from typing import Protocol, runtime_checkable

import numpy as np

from omnijax import paths

SAMPLE_RATE = 24000
FRAME_RATE = 12.5
HOP_LENGTH = 1920  # SAMPLE_RATE / FRAME_RATE
NUM_QUANTIZERS = 16
CODEBOOK_SIZE = 2048


@runtime_checkable
class CodeProvider(Protocol):
  """Waveforms at ``sample_rate`` -> codes; see the module doc for the length rule."""

  sample_rate: int  # 24000
  frame_rate: float  # 12.5
  num_quantizers: int  # 16
  codebook_size: int  # 2048

  def encode(self, waves: np.ndarray) -> np.ndarray:
    """float32 ``(B, N)`` at ``sample_rate`` -> int32 ``(B, num_quantizers, ceil(N / 1920))``."""
    ...


def num_frames(num_samples: int, hop_length: int = HOP_LENGTH) -> int:
  """Code frames of ``num_samples`` 24 kHz samples: ``ceil(num_samples / hop_length)``."""
  return math.ceil(num_samples / hop_length)


def check_codes(
  codes: np.ndarray, num_quantizers: int = NUM_QUANTIZERS, codebook_size: int = CODEBOOK_SIZE
) -> np.ndarray:
  """Checks codes ``(..., num_quantizers, T)`` of integers in ``0..codebook_size-1``.

  Returns:
    ``codes`` as an int32 array.

  Raises:
    ValueError: not an integer array of at least 2 dimensions, a wrong number
      of quantizers on axis -2, or values out of range (the min/max found).
  """
  codes = np.asarray(codes)
  if codes.dtype.kind not in "iu":
    raise ValueError(f"Codec codes must be integers, got dtype {codes.dtype}")
  if codes.ndim < 2 or codes.shape[-2] != num_quantizers:
    raise ValueError(
      f"Codec codes must have shape (..., num_quantizers={num_quantizers}, frames): "
      f"got shape {codes.shape}, whose quantizer axis (-2) has "
      f"{codes.shape[-2] if codes.ndim >= 2 else 'no'} entries"
    )
  if codes.size:
    low, high = int(codes.min()), int(codes.max())
    if low < 0 or high >= codebook_size:
      raise ValueError(
        f"Codec codes must lie in 0..{codebook_size - 1} (codebook size {codebook_size}): "
        f"found min {low}, max {high}"
      )
  return codes.astype(np.int32)


def _check_waves(waves: np.ndarray) -> np.ndarray:
  waves = np.asarray(waves)
  if waves.ndim != 2 or not np.issubdtype(waves.dtype, np.floating):
    raise ValueError(
      f"encode expects float waves of shape (batch, samples); got {waves.dtype} {waves.shape}"
    )
  if waves.shape[1] < 1:
    raise ValueError("encode needs at least one sample per wave")
  return waves.astype(np.float32)


class MimiCodes:
  """Codes of a transformers ``MimiModel`` checkpoint (float32, eval, CPU, no grad).

  Args:
    model_dir: a directory written by ``MimiModel.save_pretrained`` (e.g.
      ``kyutai/mimi``).
    num_quantizers: how many of its quantizers to use (its first ones).

  Raises:
    ValueError: the checkpoint is not a 24 kHz, 12.5 Hz Mimi with codebooks
      of ``CODEBOOK_SIZE`` and at least ``num_quantizers`` quantizers.
  """

  sample_rate = SAMPLE_RATE
  frame_rate = FRAME_RATE
  codebook_size = CODEBOOK_SIZE

  def __init__(self, model_dir: str | os.PathLike[str], num_quantizers: int = NUM_QUANTIZERS):
    import torch  # pylint: disable=import-outside-toplevel
    from transformers import MimiModel  # pylint: disable=import-outside-toplevel

    self._torch = torch
    self.model_dir = os.fspath(model_dir)
    self.num_quantizers = num_quantizers
    model = MimiModel.from_pretrained(self.model_dir, dtype=torch.float32)
    cfg = model.config
    problems = []
    if cfg.sampling_rate != SAMPLE_RATE:
      problems.append(f"sampling_rate {cfg.sampling_rate} (need {SAMPLE_RATE})")
    if not math.isclose(float(cfg.frame_rate), FRAME_RATE):
      problems.append(f"frame_rate {cfg.frame_rate} (need {FRAME_RATE})")
    if cfg.codebook_size != CODEBOOK_SIZE:
      problems.append(f"codebook_size {cfg.codebook_size} (need {CODEBOOK_SIZE})")
    if cfg.num_quantizers < num_quantizers:
      problems.append(f"{cfg.num_quantizers} quantizers (need >= {num_quantizers})")
    if num_quantizers < max(1, cfg.num_semantic_quantizers):
      problems.append(
        f"num_quantizers={num_quantizers} is below its {cfg.num_semantic_quantizers} semantic ones"
      )
    if problems:
      raise ValueError(f"Mimi checkpoint {self.model_dir} is unusable: " + "; ".join(problems))
    self.model = model.to("cpu").eval()

  def encode(self, waves: np.ndarray) -> np.ndarray:
    waves = _check_waves(waves)
    with self._torch.no_grad():
      inputs = self._torch.from_numpy(waves)[:, None, :]
      codes = self.model.encode(inputs, num_quantizers=self.num_quantizers).audio_codes
    codes = codes.numpy().astype(np.int32)
    expected = (len(waves), self.num_quantizers, num_frames(waves.shape[1]))
    if codes.shape != expected:
      raise RuntimeError(f"Mimi returned codes of shape {codes.shape}, expected {expected}")
    return codes


def is_mimi_dir(path: str | os.PathLike[str]) -> bool:
  """A directory whose ``config.json`` says ``"model_type": "mimi"``."""
  return _read_json(paths.path(path) / "config.json").get("model_type") == "mimi"


def is_codec_run(path: str | os.PathLike[str]) -> bool:
  """An omnijax codec workdir: its ``model.json`` is ``{"codec": CodecConfig, "stage": ...}``
  (``omnijax.codec.tokenizer.write_run_config``; checked here without importing JAX)."""
  return "codec" in _read_json(paths.path(path) / "model.json")


def _read_json(path) -> dict:
  try:
    value = json.loads(path.read_text())
  except (OSError, ValueError):
    return {}
  return value if isinstance(value, dict) else {}


def codec_kind(path: str | os.PathLike[str]) -> str:
  """``"mimi"`` or ``"omnijax"``: what kind of codec directory ``path`` is (cheap: reads JSON).

  Raises:
    FileNotFoundError: ``path`` is not a directory.
    ValueError: it is neither kind; the message says what it must contain.
  """
  path = os.fspath(path)
  if not paths.path(path).is_dir():
    raise FileNotFoundError(f"Speech codec {path!r} is not a directory")
  if is_mimi_dir(path):
    return "mimi"
  if is_codec_run(path):
    return "omnijax"
  raise ValueError(
    f"Speech codec {path!r} is neither a transformers Mimi checkpoint (config.json with "
    '"model_type": "mimi" and its safetensors) nor an omnijax speech-tokenizer workdir '
    "(model.json of a codec run, with its \"codec\" config: experiments/codec.py)"
  )


def load_code_provider(
  path: str | os.PathLike[str], num_quantizers: int = NUM_QUANTIZERS
) -> CodeProvider:
  """The code provider stored at ``path`` (see the module doc and ``codec_kind``).

  Raises:
    FileNotFoundError: ``path`` is not a directory.
    ValueError: the directory is neither a Mimi checkpoint nor a codec run, or
      its codec does not produce ``num_quantizers`` codebooks of
      ``CODEBOOK_SIZE`` at 24 kHz / 12.5 Hz.
  """
  path = os.fspath(path)
  if codec_kind(path) == "mimi":
    return MimiCodes(
      paths.local(path, "a Mimi codec", "transformers loads it from a local directory; copy it."),
      num_quantizers,
    )
  from omnijax.codec.tokenizer import load_speech_tokenizer  # pylint: disable=import-outside-toplevel

  provider = load_speech_tokenizer(path)
  expected = (SAMPLE_RATE, FRAME_RATE, num_quantizers, CODEBOOK_SIZE)
  found = tuple(
    getattr(provider, k, None)
    for k in ("sample_rate", "frame_rate", "num_quantizers", "codebook_size")
  )
  if found != expected:
    raise ValueError(
      f"Speech tokenizer {path} gives (sample_rate, frame_rate, num_quantizers, "
      f"codebook_size) = {found}; expected {expected}"
    )
  return provider
