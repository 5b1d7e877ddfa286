r"""Speech generation speed of omnijax vs transformers' generate(return_audio=True), same weights.

    python benchmarks/speech_generation.py [--size=small] [--hf=DIR] [--batch=1,4] \
        [--prompt=48] [--text=16] [--frames=50] [--repeats=2] [--torch_threads=1] [--smoke]

The weights: a random transformers Qwen3OmniMoeForConditionalGeneration with a Talker and a
Code2Wav (`--size`, see SIZES; drawn so activations stay O(1), as tests/test_speech_generation.py
does), saved to a temporary directory and loaded by both sides (`omnijax.load`,
`from_pretrained`), or an existing checkpoint directory (`--hf`). Both sides run greedily on the
same random left-padded chat prompts (`<|im_start|>user ... <|im_end|> <|im_start|>assistant`),
float32, with the Thinker's <|im_end|> row of lm_head and the codec-EOS row of the Talker's
codec_head zeroed in memory on both sides (as the tests scale them), so that every row speaks
exactly `--text` text tokens and `--frames` codec frames (1920 samples each, 24 kHz).

Printed:
  first packet   the time to the first audio. omnijax: `Model.generate_stream` (chunk_frames=1)
                 after a warm-up run, split at the stream's timing hooks
                 (`SpeechStream(timings=...)`). Its Talker step runs the MTP of frame 0 fused
                 with the Talker's step to frame 1's codebook 0; the MTP alone is also timed
                 (jitted on its own). transformers does not stream: its first packet is the whole
                 waveform, split by hooks on its modules (Thinker forward calls and generate,
                 Talker forward calls and generate, code_predictor.generate, chunked_decode);
                 its Code2Wav of one frame is also timed on its own.
  compile        omnijax's first call minus a steady one (generate, and stream at chunk 1).
  real time      compute seconds of `generate(return_audio=True)` per second of audio (RTF;
                 below 1 is faster than real time) and frames per second over all rows, at each
                 `--batch` size; the max |waveform difference| between the two sides.
Timings are medians over `--repeats` runs after a warm-up run. transformers runs on
`--torch_threads` threads (1, as the tests: on a few shared CPU cores that is several times
faster than torch's default).
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import omnijax
from omnijax import api, speech
from omnijax.hf import hf_config
from omnijax.hf.random_weights import randomize_, randomize_code2wav_
from omnijax.models import presets
from omnijax.models.config import Code2WavConfig, TalkerConfig, ThinkerConfig

NEWLINE = 198  # the assistant header's "\n" (Qwen's id; any token works for random weights)


def _small_thinker() -> dict:
  d = presets.get("small").to_dict()
  d["text"].update(num_hidden_layers=4)
  return d


def _small_talker() -> dict:
  d = presets.get_talker("tiny").to_dict()
  d["text"].update(
    hidden_size=256,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=256,
    intermediate_size=512,
    shared_expert_intermediate_size=256,
    mrope_section=(12, 10, 10),
  )
  d["code_predictor"].update(
    hidden_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    intermediate_size=512,
    mrope_section=(32, 0, 0),
  )
  return d | dict(thinker_hidden_size=512, accept_hidden_layer=2)


# (Thinker preset dict, Talker preset dict, Code2Wav config) per --size.
SIZES = {
  # The tests' model: a real-size Code2Wav would dominate, so it is tiny (24 samples a frame).
  "tiny": lambda: (
    presets.get("tiny").to_dict(),
    presets.get_talker("tiny").to_dict(),
    Code2WavConfig(
      hidden_size=32,
      num_hidden_layers=1,
      num_attention_heads=2,
      num_key_value_heads=2,
      intermediate_size=64,
      sliding_window=8,
      decoder_dim=32,
      upsample_rates=(4, 3),
      upsampling_ratios=(2,),
    ),
  ),
  # The tests' Thinker and Talker with tests/test_code2wav.py's Code2Wav: 1920 samples a frame
  # (notebooks/speech.ipynb's default).
  "tiny-1920": lambda: (
    presets.get("tiny").to_dict(),
    presets.get_talker("tiny").to_dict(),
    Code2WavConfig(
      hidden_size=64,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=4,
      intermediate_size=96,
      sliding_window=8,
      decoder_dim=64,
    ),
  ),
  # Thinker: the small preset cut to 4 layers (hidden 512, 16 experts top-4); Talker hidden 256,
  # 3 MoE layers; MTP 2 layers; Code2Wav 2 layers of width 256, decoder width 256 (released 1536)
  # and the released upsampling (1920 samples a frame).
  "small": lambda: (
    _small_thinker(),
    _small_talker(),
    Code2WavConfig(
      hidden_size=256,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=4,
      intermediate_size=512,
      decoder_dim=256,
    ),
  ),
}


def random_checkpoint(out: str | Path, size: str = "tiny", seed: int = 0) -> Path:
  """Saves a random transformers Qwen3-Omni with a Talker and a Code2Wav of `size` (SIZES) to
  `out`, which `omnijax.load` and `from_pretrained` both read. The token ids are the local
  tokenizer's (`presets.LOCAL_TALKER_TOKEN_IDS`)."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel

  thinker, talker, code2wav = SIZES[size]()
  thinker, talker = ThinkerConfig.from_dict(thinker), TalkerConfig.from_dict(talker)
  cfg = hf_config.to_hf_config(thinker, talker=talker)
  cfg["code2wav_config"] = hf_config.code2wav_config_to_hf(code2wav)
  torch.manual_seed(seed)
  verbosity, bars = (
    transformers.logging.get_verbosity(),
    transformers.logging.is_progress_bar_enabled(),
  )
  transformers.logging.set_verbosity_error()
  transformers.logging.disable_progress_bar()
  try:
    model = transformers.Qwen3OmniMoeForConditionalGeneration(
      transformers.Qwen3OmniMoeConfig(**cfg)
    )
    randomize_(model.thinker.model, seed + 1)
    randomize_(model.thinker.lm_head, seed + 2)
    randomize_(model.talker, seed + 3)
    randomize_code2wav_(model.code2wav.state_dict(), f"decoder.{len(code2wav.upsample_rates) + 2}")
    model.save_pretrained(out)
  finally:
    transformers.logging.set_verbosity(verbosity)
    if bars:
      transformers.logging.enable_progress_bar()
  return Path(out)


def prompts(model, batch: int, length: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Left-padded (ids, attention_mask) (batch, length): random user text (rows 3 tokens shorter
  each), then the assistant header."""
  t = model.talker_config
  rng = np.random.default_rng(seed)
  ids = np.zeros((batch, length), np.int64)
  mask = np.zeros((batch, length), np.int64)
  high = min(model.config.text.vocab_size, 151000)  # below Qwen's special tokens
  for b in range(batch):
    body = rng.integers(256, high, length - 8 - 3 * b).tolist()
    row = [t.im_start_token_id, t.user_token_id, NEWLINE, *body, t.im_end_token_id, NEWLINE]
    row += [t.im_start_token_id, t.assistant_token_id, NEWLINE]
    ids[b, length - len(row) :], mask[b, length - len(row) :] = row, 1
  return ids, mask


def _median(xs):
  return float(np.median(xs))


def _medians(runs: list[dict]) -> dict:
  return {k: _median([r[k] for r in runs]) for k in runs[0]}


# ---- omnijax ----------------------------------------------------------------------------------


def _without_eos(model) -> api.Model:
  """The model with the Thinker's <|im_end|> and the Talker's codec-EOS output rows zeroed."""
  t = model.talker_config
  params = dict(model.params, lm_head=model.params["lm_head"].at[:, t.im_end_token_id].set(0))
  talker = model.talker_params
  talker = dict(talker, codec_head=talker["codec_head"].at[:, t.codec_eos_token_id].set(0))
  return api.Model(
    model.config,
    params,
    tokenizer=model.tokenizer,
    code2wav=(model.code2wav_config, model.code2wav_params),
    talker=(t, talker),
  )


def omnijax_side(model, ids, mask, kwargs, repeats):
  """(results dict, waveform (B, samples)) for one batch."""
  out = {}

  def generate():
    return model.generate(ids, attention_mask=mask, return_audio=True, **kwargs)

  def stream():
    timings = {}
    start = time.perf_counter()
    chunks = model.generate_stream(
      ids, attention_mask=mask, chunk_frames=1, timings=timings, **kwargs
    )
    first = None
    for _ in chunks:
      first = time.perf_counter() if first is None else first
    end = time.perf_counter()
    t = timings
    return dict(
      setup=t["start"] - start,
      prefill=t["thinker_prefill"] - t["start"],
      first_token=t["first_text_token"] - t["thinker_prefill"],
      talker_prefill=t["talker_prefill"] - t["first_text_token"],
      second_token=t["thinker_step"] - t["talker_prefill"],
      talker_step=t["talker_step"] - t["thinker_step"],
      code2wav=t["first_chunk"] - t["talker_step"],
      first_packet=first - start,
      stream_total=end - start,
    )

  start = time.perf_counter()
  _, wave = generate()
  first_generate = time.perf_counter() - start
  start = time.perf_counter()
  stream()
  first_stream = time.perf_counter() - start
  totals = []
  for _ in range(repeats):
    start = time.perf_counter()
    _, wave = generate()
    totals.append(time.perf_counter() - start)
  out.update(_medians([stream() for _ in range(repeats)]))
  out["total"] = _median(totals)
  out["compile_generate"] = first_generate - out["total"]
  out["compile_stream"] = first_stream - out["stream_total"]

  # The MTP alone, jitted on its own: 15 codebooks of one frame.
  t = model.talker_config
  mtp = speech._talker_fns(t, model.config.impl)[2]  # pylint: disable=protected-access
  h = jnp.ones((ids.shape[0], t.text.hidden_size), jnp.float32)
  c0 = jnp.zeros((ids.shape[0],), jnp.int32)
  run = lambda: jax.block_until_ready(
    mtp(model.talker_params, h, c0, jax.random.key(0), greedy=True)
  )
  run()
  times = []
  for _ in range(max(repeats, 5)):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  out["mtp"] = _median(times)
  return out, wave


# ---- transformers -----------------------------------------------------------------------------


class _Stamps:
  """Start and end times of calls to methods and modules of a transformers model."""

  def __init__(self, hf):
    self.events: dict[str, list[tuple[float, float]]] = {}
    self._open: dict[str, float] = {}
    for name, module in (("thinker", hf.thinker), ("talker", hf.talker)):
      module.register_forward_pre_hook(lambda *_, n=name: self._begin(n))
      module.register_forward_hook(lambda *_, n=name: self._end(n))
    for name, obj, method in (
      ("thinker.generate", hf.thinker, "generate"),
      ("talker.generate", hf.talker, "generate"),
      ("mtp", hf.talker.code_predictor, "generate"),
      ("code2wav", hf.code2wav, "chunked_decode"),
    ):
      setattr(obj, method, self._timed(name, getattr(obj, method)))

  def _begin(self, name):
    self._open[name] = time.perf_counter()

  def _end(self, name):
    self.events.setdefault(name, []).append((self._open.pop(name), time.perf_counter()))

  def _timed(self, name, fn):
    def call(*args, **kwargs):
      self._begin(name)
      try:
        return fn(*args, **kwargs)
      finally:
        self._end(name)

    return call


def transformers_side(hf, stamps: _Stamps, ids, mask, kwargs, repeats):
  """(results dict, waveforms list of (samples,)) for one batch."""
  import torch  # pylint: disable=import-outside-toplevel

  def run():
    stamps.events = {}
    start = time.perf_counter()
    with torch.no_grad():
      _, wave = hf.generate(
        torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), return_audio=True, **kwargs
      )
    end = time.perf_counter()
    e = stamps.events
    thinker, talker = e["thinker"], e["talker"]
    thinker_end = e["thinker.generate"][0][1]
    result = dict(
      setup=thinker[0][0] - start,
      prefill=thinker[0][1] - thinker[0][0],
      first_token=thinker[1][0] - thinker[0][1] if len(thinker) > 1 else float("nan"),
      rest_of_text=thinker_end - (thinker[1][0] if len(thinker) > 1 else thinker[0][1]),
      talker_prefill=talker[0][1] - thinker_end,
      mtp=e["mtp"][0][1] - e["mtp"][0][0],
      rest_of_talker=e["talker.generate"][0][1] - talker[0][1] - (e["mtp"][0][1] - e["mtp"][0][0]),
      code2wav_all=e["code2wav"][0][1] - e["code2wav"][0][0],
      total=end - start,
    )
    waves = wave if isinstance(wave, list) else list(wave.reshape(len(ids), -1))
    return result, [w.numpy() for w in waves]

  run()  # warm-up
  runs = [run() for _ in range(repeats)]
  out = _medians([r for r, _ in runs])
  out["first_packet"] = out["total"]
  frame = torch.zeros((len(ids), hf.config.talker_config.num_code_groups, 1), dtype=torch.long)
  times = []
  with torch.no_grad():
    hf.code2wav(frame)
    for _ in range(max(repeats, 5)):
      start = time.perf_counter()
      hf.code2wav(frame)
      times.append(time.perf_counter() - start)
  out["code2wav"] = _median(times)
  return out, runs[-1][1]


# ---- the report -------------------------------------------------------------------------------


def _ms(x):
  return "-" if x is None or not np.isfinite(x) else f"{x * 1e3:9.1f}"


def print_first_packet(batch, ours, theirs, text, frames):
  print(f"\nfirst packet, batch {batch} (ms; omnijax streams, transformers returns all at once)")
  rows = [
    ("request setup (omnijax: Talker prefix layout)", ours["setup"], theirs["setup"]),
    ("Thinker prefill", ours["prefill"], theirs["prefill"]),
    ("first text token", ours["first_token"], theirs["first_token"]),
    ("2nd text token (frame 0 reads it)", ours["second_token"], None),
    (f"rest of the text ({text - 1} tokens; omnijax: later)", None, theirs["rest_of_text"]),
    ("Talker prefill -> frame 0 codebook 0", ours["talker_prefill"], theirs["talker_prefill"]),
    ("Talker step: MTP of frame 0 + frame 1 codebook 0", ours["talker_step"], None),
    ("  MTP alone: frame 0 codebooks 1..15", ours["mtp"], theirs["mtp"]),
    (f"rest of the Talker ({frames - 1} frames)", None, theirs["rest_of_talker"]),
    ("Code2Wav of frame 0 (transformers: alone)", ours["code2wav"], theirs["code2wav"]),
    (f"Code2Wav of all {frames} frames", None, theirs["code2wav_all"]),
    ("first audio", ours["first_packet"], theirs["first_packet"]),
    ("whole waveform (stream / generate)", ours["stream_total"], theirs["total"]),
  ]
  print(f"  {'':50s} {'omnijax':>9s} {'transformers':>12s}")
  for name, a, b in rows:
    print(f"  {name:50s} {_ms(a):>9s} {_ms(b):>12s}")
  print(
    f"  omnijax compile (first call - steady): generate {ours['compile_generate']:.1f} s, "
    f"stream at chunk_frames=1 {ours['compile_stream']:.1f} s"
  )


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--size", default="small", choices=sorted(SIZES))
  p.add_argument("--hf", default=None, help="an existing transformers checkpoint directory")
  p.add_argument("--batch", default="1,4", help="batch sizes, comma-separated")
  p.add_argument("--prompt", type=int, default=48, help="prompt tokens (longest row)")
  p.add_argument("--text", type=int, default=16, help="text tokens per row")
  p.add_argument("--frames", type=int, default=50, help="codec frames per row")
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument(
    "--torch_threads",
    type=int,
    default=1,
    help="0: torch's default; 1 (as the tests): on a few shared cores its small matmuls are "
    "several times faster on one thread",
  )
  p.add_argument("--experts", default="grouped_mm", help="transformers' expert implementation")
  p.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat: checks that it runs")
  args = p.parse_args(argv)
  if args.smoke:
    vars(args).update(size="tiny", batch="1", prompt=8, text=2, frames=2, repeats=1)
  batches = [int(b) for b in args.batch.split(",")]

  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel

  transformers.logging.set_verbosity_error()
  transformers.logging.disable_progress_bar()
  warnings.filterwarnings("ignore", message="Passing `repetition_penalty`")
  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)
  with tempfile.TemporaryDirectory() as tmp:
    start = time.perf_counter()
    path = Path(args.hf) if args.hf else random_checkpoint(tmp, args.size)
    built = time.perf_counter() - start
    model = _without_eos(omnijax.load(path, dtype="float32"))
    hf = transformers.Qwen3OmniMoeForConditionalGeneration.from_pretrained(
      path, dtype=torch.float32, experts_implementation=args.experts
    ).eval()
  t = model.talker_config
  with torch.no_grad():
    hf.thinker.lm_head.weight[t.im_end_token_id] = 0
    hf.talker.codec_head.weight[t.codec_eos_token_id] = 0

  c, c2w = model.config, model.code2wav_config
  samples = c2w.num_samples(args.frames)
  seconds = samples / 24000
  print(
    f"{args.hf or f'random --size={args.size} (built in {built:.0f} s)'}: Thinker "
    f"{c.text.num_hidden_layers}x{c.text.hidden_size} ({c.text.num_experts} experts), Talker "
    f"{t.text.num_hidden_layers}x{t.text.hidden_size}, MTP {t.code_predictor.num_hidden_layers}"
    f"x{t.code_predictor.hidden_size}, Code2Wav {c2w.num_hidden_layers}x{c2w.hidden_size} "
    f"decoder {c2w.decoder_dim}, {c2w.total_upsample} samples/frame"
  )
  print(
    f"greedy, float32, prompt {args.prompt}, {args.text} text tokens, {args.frames} frames = "
    f"{seconds:.2f} s of audio per row; {jax.devices()[0].device_kind} JAX {jax.__version__}, "
    f"torch {torch.__version__} ({torch.get_num_threads()} threads, experts={args.experts}), "
    f"transformers {transformers.__version__}; medians of {args.repeats}"
  )
  kwargs = dict(
    speaker=sorted(t.speakers())[0],
    thinker_max_new_tokens=args.text,
    thinker_do_sample=False,
    thinker_eos_token_id=t.im_end_token_id,
    talker_max_new_tokens=args.frames + 1,
    talker_do_sample=False,
  )

  stamps = _Stamps(hf)
  rtf = []
  for batch in batches:
    ids, mask = prompts(model, batch, args.prompt)
    ours, our_wave = omnijax_side(model, ids, mask, kwargs, args.repeats)
    theirs, their_waves = transformers_side(hf, stamps, ids, mask, kwargs, args.repeats)
    assert our_wave.shape == (batch, samples), our_wave.shape
    assert all(len(w) == samples for w in their_waves), [len(w) for w in their_waves]
    diff = max(float(np.abs(our_wave[b] - w).max()) for b, w in enumerate(their_waves))
    print_first_packet(batch, ours, theirs, args.text, args.frames)
    rtf.append((batch, "omnijax", ours["total"], diff))
    rtf.append((batch, "transformers", theirs["total"], diff))

  print(f"\nreal time: generate(return_audio=True), {args.frames} frames = {seconds:.2f} s a row")
  print(f"  {'batch':>5s} {'':12s} {'compute s':>9s} {'RTF':>7s} {'frames/s':>9s}  max |wave diff|")
  for batch, side, total, diff in rtf:
    print(
      f"  {batch:5d} {side:12s} {total:9.2f} {total / seconds:7.3f} "
      f"{batch * args.frames / total:9.1f}  {diff:.2g}"
    )
  print("  RTF: compute seconds per second of audio of one row; frames/s: over all rows")


if __name__ == "__main__":
  main()
