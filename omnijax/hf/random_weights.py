"""Random transformers weights whose outputs are O(1) rather than ~0 (the checkpoints' own
initialisers give near-zero activations): what the parity tests and the benchmarks compare on."""

from __future__ import annotations

import math


def randomize_(module, seed: int) -> None:
  """In place: weights N(0, 1/fan_in), embeddings N(0, 1), norms 1 + N(0, 0.1^2), biases
  N(0, 0.1^2), from a generator seeded with `seed`."""
  import torch  # pylint: disable=import-outside-toplevel

  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if "norm" in name:
        p.copy_(1 + 0.1 * noise)
      elif "embed" in name:
        p.copy_(noise)
      elif p.ndim == 1:
        p.copy_(0.1 * noise)
      else:
        p.copy_(noise / math.sqrt(p.shape[-1]))


def randomize_code2wav_(state_dict, output_conv: str = "decoder.6") -> None:
  """In place, a Code2Wav state dict whose waveform stays O(0.1) and unclamped: activations
  O(1) through the conv stack (transposed convs by their own fan-in), SnakeBeta alpha/beta
  N(0, 0.3^2), layer scales 0.5 + N(0, 0.2^2), and gain 0.3 on each block's convs and on the
  output conv (`output_conv`: decoder.{number of decoder blocks + 2})."""
  import torch  # pylint: disable=import-outside-toplevel

  with torch.no_grad():
    for k, v in state_dict.items():
      if k.endswith(("alpha", "beta")):
        v.copy_(0.3 * torch.randn_like(v))
      elif "layer_scale" in k or k.endswith("gamma"):
        v.copy_(0.5 + 0.2 * torch.randn_like(v))
      elif "norm" in k and k.endswith("weight"):
        v.copy_(1 + 0.1 * torch.randn_like(v))
      elif k.endswith("bias"):
        v.copy_(0.1 * torch.randn_like(v))
      elif v.ndim >= 2:
        fan_in = v.shape[1] * (v.shape[2] if v.ndim == 3 else 1)
        if ("upsample" in k and ".0.conv" in k) or ("decoder" in k and "block.1" in k):
          fan_in = v.shape[0] * v.shape[2] / 2  # transposed conv weight (in, out, k)
        if "embedding" in k:
          fan_in = 1
        gain = 0.3 if ("conv1" in k or "conv2" in k or k.startswith(output_conv)) else 1.0
        v.copy_(gain * torch.randn_like(v) / math.sqrt(fan_in))
