"""Speech codec quality and speed on held-out speech, side by side with references, one run.

    python benchmarks/codec.py --tokenizer=workdirs/codec_tokenizer \
        --vocoder=workdirs/codec_vocoder [--out=docs/codec_local] [--smoke]

Rows (each on the same held-out clips of the run's eval split, at 24 kHz):
  codec (vocoder)     encode -> codes -> the vocoder run's Code2Wav
  codec (tokenizer)   encode -> codes -> the tokenizer run's decoder folded into a Code2Wav
  untrained decoder   the same codes -> the tokenizer's Code2Wav at initialisation (train.seed)
  mu-law baseline     resample to 1 kHz, 3-bit mu-law (3000 bps)
  mel+GL baseline     20-band log-mel at 25 frames/s, 5 bits (2500 bps), Griffin-Lim
Columns: mel distance (DAC's 7 scales, mean), SI-SDR, STOI, wideband PESQ, bitrate; then the
codebook perplexity and usage per quantizer, and real-time factors (seconds of compute per
second of audio; below 1 is faster than real time) of the JAX encoder and of Code2Wav in JAX vs
transformers' Qwen3OmniMoeCode2Wav on the same weights (loaded through the export key map).
With --out it writes the clips (original, vocoder, tokenizer decode) as WAV files, a
mel-spectrogram plot and results.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import numpy as np

from data_pipelines import speech as speech_lib
from omnijax.codec import metrics
from omnijax.codec import tokenizer as tokenizer_lib
from omnijax.codec.model import SpeechCodec, export_code2wav, init_codebooks


def _rows(name, clips, decode):
  results = [metrics.evaluate_pair(c, decode(c)) for c in clips]
  return name, metrics.summarize(results)


def _timed(fn, *args, repeats=3):
  fn(*args)  # compile
  t = time.perf_counter()
  for _ in range(repeats):
    out = fn(*args)
  return (time.perf_counter() - t) / repeats, out


def _torch_code2wav(cfg, params):
  import torch  # pylint: disable=import-outside-toplevel
  from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as m

  from omnijax.hf import hf_config, keymap  # pylint: disable=import-outside-toplevel

  hf_cfg = m.Qwen3OmniMoeCode2WavConfig(**hf_config.code2wav_config_to_hf(cfg))
  module = m.Qwen3OmniMoeCode2Wav(hf_cfg).eval()
  tensors = keymap.to_hf(params, keymap.code2wav_keymap(cfg, prefix=""))
  module.load_state_dict({k.lstrip("."): torch.from_numpy(np.array(v)) for k, v in tensors.items()})

  def run(codes):
    with torch.no_grad():
      return module(torch.from_numpy(codes.astype(np.int64))).numpy()[:, 0]

  return run


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--tokenizer", required=True, help="a stage=tokenizer codec run")
  p.add_argument("--vocoder", default=None, help="a stage=vocoder codec run on that tokenizer")
  p.add_argument("--clips", type=int, default=8)
  p.add_argument("--max_seconds", type=float, default=6.0)
  p.add_argument("--out", default=None)
  p.add_argument("--smoke", action="store_true", help="two short clips: checks that it runs")
  args = p.parse_args(argv)
  if args.smoke:
    vars(args).update(clips=2, max_seconds=2.0)

  config = json.loads((Path(args.tokenizer) / "config.json").read_text())
  data = speech_lib.default_config(config["data"]["path"])
  data.update(eval_clips=args.clips, eval_max_seconds=args.max_seconds)
  clips, skipped = speech_lib.eval_clips(data)
  seconds = sum(len(c) for c in clips) / data.sample_rate
  print(f"held-out: {len(clips)} clips, {seconds:.1f} s of speech (skipped: {skipped})")

  tok = tokenizer_lib.load_speech_tokenizer(args.tokenizer)
  cfg = tok.cfg
  codecs = {"codec (tokenizer)": tok}
  if args.vocoder:
    codecs = {"codec (vocoder)": tokenizer_lib.load_speech_tokenizer(args.vocoder), **codecs}
  rng = jax.random.key(config["train"]["seed"])
  books = init_codebooks(cfg, rng)["embed"]
  init = jax.jit(
    lambda r: SpeechCodec(cfg).init(
      r, np.zeros((1, cfg.hop), np.float32), books, np.ones((1,), int)
    )
  )(rng)["params"]
  untrained = tokenizer_lib.SpeechTokenizer(
    cfg,
    tok.encoder_params,
    tok.books,
    export_code2wav(cfg, init, tok.books),
  )

  def via(codec):
    return lambda clip: codec.code2wav(tok.encode(clip[None]))[0]

  table = [_rows(name, clips, via(c)) for name, c in codecs.items()]
  table.append(_rows("untrained decoder", clips, via(untrained)))
  bitrates = {
    name: metrics.bitrate(cfg.num_quantizers, cfg.codebook_size, cfg.frame_rate) for name in codecs
  }
  bitrates["untrained decoder"] = bitrates["codec (tokenizer)"]
  for name, fn in (
    ("mu-law baseline", metrics.mulaw_baseline),
    ("mel+GL baseline", metrics.mel_griffinlim_baseline),
  ):
    table.append(_rows(name, clips, lambda c, fn=fn: fn(c)[0]))
    bitrates[name] = fn(clips[0])[1]

  keys = ("mel_distance", "si_sdr", "stoi", "pesq")
  print(f"\n{'':20s}" + "".join(f"{k:>14s}" for k in keys) + f"{'bitrate bps':>14s}")
  for name, row in table:
    print(f"{name:20s}" + "".join(f"{row[k]:14.3f}" for k in keys) + f"{bitrates[name]:14.0f}")

  codes = np.concatenate([tok.encode(c[None])[0] for c in clips], axis=-1)
  perplexity = metrics.codebook_perplexity(codes, cfg.codebook_size)
  usage = metrics.codebook_usage(codes, cfg.codebook_size)
  print(
    f"\ncodebook perplexity per quantizer ({codes.shape[-1]} frames; {cfg.codebook_size} entries):"
  )
  print("  " + " ".join(f"{x:.0f}" for x in perplexity))
  print("codebook usage per quantizer: " + " ".join(f"{x:.2f}" for x in usage))

  batch = np.stack(
    [c[: int(5 * cfg.sample_rate)] for c in clips if len(c) >= 5 * cfg.sample_rate][:4]
    or [np.pad(clips[0], (0, 5 * cfg.sample_rate))[: 5 * cfg.sample_rate]]
  )
  audio_s = batch.size / cfg.sample_rate
  codec = next(iter(codecs.values()))
  t_enc, codes5 = _timed(tok.encode, batch)
  t_jax, wave_jax = _timed(codec.code2wav, codes5)
  torch_run = _torch_code2wav(cfg.code2wav, jax.device_get(codec.code2wav_params()))
  t_torch, wave_torch = _timed(torch_run, codes5)
  print(f"\nreal-time factor on {jax.devices()[0].device_kind} ({batch.shape[0]} x 5 s clips):")
  print(f"  encoder (JAX)                {t_enc / audio_s:.4f}")
  print(f"  Code2Wav (JAX)               {t_jax / audio_s:.4f}")
  print(f"  Code2Wav (transformers)      {t_torch / audio_s:.4f}")
  print(f"  max |JAX - transformers|     {np.abs(wave_jax - wave_torch).max():.2e}")

  if args.out:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import soundfile as sf  # pylint: disable=import-outside-toplevel

    from omnijax.codec import plots  # pylint: disable=import-outside-toplevel

    examples = {}
    for i, clip in enumerate(clips[:3]):
      sf.write(out / f"clip{i}_original.wav", clip, cfg.sample_rate)
      for name, c in codecs.items():
        tag = name.split("(")[1].rstrip(")")
        sf.write(out / f"clip{i}_{tag}.wav", via(c)(clip), cfg.sample_rate)
      examples[i] = {name: via(c)(clip) for name, c in codecs.items()}
    plots.mel_comparison(clips[0], examples[0], cfg.sample_rate, out / "mel.png")
    (out / "results.json").write_text(
      json.dumps(
        dict(
          table={name: row for name, row in table},
          bitrate=bitrates,
          perplexity=perplexity.tolist(),
          usage=usage.tolist(),
          rtf=dict(
            encoder=t_enc / audio_s, code2wav_jax=t_jax / audio_s, code2wav_torch=t_torch / audio_s
          ),
        ),
        indent=2,
      )
    )
    print(f"\nwrote {out}")


if __name__ == "__main__":
  main()
