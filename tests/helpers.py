"""Shared test fixtures: a small text corpus on disk and a tiny-model trainer config."""

import json
from pathlib import Path

import numpy as np

from data_pipelines import records
from omnijax import paths
from omnijax.report import read_metrics  # noqa: F401  (step -> that step's train and eval lines merged)
from omnijax.train.config import base_config

WORDS = (
  "the quick brown fox jumps over a lazy dog while seven red cubes spin around two "
  "green spheres and one blue cone under bright light near the old river"
).split()


def write_text_corpus(
  path: Path, num_docs: int = 120, seed: int = 0, num_shards: int = 2, blank=()
) -> Path:
  """`num_docs` documents of random WORDS written round-robin into `num_shards` shards; those
  numbered in `blank` are blank (the pipelines skip them as "empty")."""
  rng = np.random.default_rng(seed)
  docs = [
    {
      "text": "" if i in blank else " ".join(rng.choice(WORDS, size=int(rng.integers(8, 60)))),
      "source": "test",
      "id": str(i),
    }
    for i in range(num_docs)
  ]
  records.write_shards(docs, path, "train", num_shards=num_shards)
  records.write_manifest(path, {"train": num_docs})
  return path


def logged_steps(workdir) -> list[int]:
  """The steps of metrics.jsonl's training rows (those with a loss) in the order written: a
  launch that resumed at step N goes on N + 1, N + 2, ...; one that restarted from step 0 logs
  1, 2, ... again."""
  rows = map(json.loads, (paths.path(workdir) / "metrics.jsonl").read_text().splitlines())
  return [r["step"] for r in rows if "loss" in r]


def tiny_config(corpus: Path, *, steps: int, seq_len: int = 64, batch: int = 8):
  c = base_config("tiny")
  c.data.path = str(corpus)
  c.data.tokenizer_vocab_size = 512
  c.data.seq_len = seq_len
  c.train.total_steps = steps
  c.train.global_batch_size = batch
  c.train.log_every = 1
  c.train.checkpoint_every = 1000
  c.train.async_checkpoint = False
  c.optim.learning_rate = 3e-3
  c.optim.warmup_steps = 2
  return c


def tiny_omni_config(text: Path, images: Path, *, steps: int):
  """`tiny_config` on the omni pipeline: a text source and a caption source (e.g. the records
  of `write_spoken_records`), one bucket per media buffer (the step compiles once)."""
  c = tiny_config(text, steps=steps)
  c.data.kind = "omni"
  c.data.tokenizer_corpus = str(text)
  c.data.mixture = dict(
    text=dict(path=str(text), task="text", weight=1.0),
    image=dict(path=str(images), task="caption", weight=1.0),
  )
  c.data.buckets.image_patches = (128,)
  return c


def write_records(path: Path, split: str, examples) -> Path:
  records.write_shards(examples, path, split, num_shards=1)
  return path


SENTENCES = ("two red cubes", "a blue cone near the river", "one green sphere spins", "hello")


def write_spoken_records(path: Path, n: int = 24) -> dict[str, np.ndarray]:
  """n records with text, an image, its speech (noise of the codes' length) and stored codes
  (as `data_pipelines.prepare --speech_codes` writes them), usable as tts, spoken_asr and
  spoken_caption sources; returns id -> its (16, T) codes."""
  import io  # pylint: disable=import-outside-toplevel

  import soundfile  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel

  from data_pipelines import speech_codes  # pylint: disable=import-outside-toplevel

  def encoded(write) -> bytes:
    buf = io.BytesIO()
    write(buf)
    return buf.getvalue()

  rng = np.random.default_rng(0)
  examples, codes = [], {}
  for i in range(n):
    frames = int(rng.integers(3, 12))
    c = codes[str(i)] = rng.integers(0, 2048, (16, frames))
    noise = (0.1 * rng.standard_normal(int(16000 * frames * 0.08))).astype(np.float32)
    pixels = rng.integers(0, 256, (64, 96, 3), np.uint8)
    examples.append(
      dict(
        id=str(i),
        text=SENTENCES[i % len(SENTENCES)],
        audio=encoded(lambda b: soundfile.write(b, noise, 16000, format="WAV", subtype="FLOAT")),
        image=encoded(lambda b: Image.fromarray(pixels).save(b, format="PNG")),
        **speech_codes.codes_to_record(c),
      )
    )
  records.write_shards(examples, path, "train", num_shards=1)
  records.write_manifest(path, {"train": n})
  return codes


def tiny_codec_model(**over) -> dict:
  """A codec config with the released frame layout (hop 1920, 16 x 2048 codes) and tiny widths."""
  m = dict(
    code2wav=dict(
      hidden_size=32,
      num_hidden_layers=1,
      num_attention_heads=2,
      num_key_value_heads=2,
      intermediate_size=64,
      decoder_dim=32,
    ),
    codebook_dim=8,
    encoder_channels=4,
    encoder_hidden=32,
    encoder_layers=1,
    encoder_heads=2,
    encoder_intermediate=64,
  )
  m.update(over)
  return m


def codec_config(workdir: Path, speech: Path, *, steps: int, num_devices: int, **arg):
  from experiments import codec  # pylint: disable=import-outside-toplevel

  spec = ",".join(f"{k}={v}" for k, v in arg.items())
  c = codec.get_config(spec or None)
  c.model.update(tiny_codec_model())
  c.data.update(path=str(speech), batch_size=8, segment_samples=3840, eval_clips=2)
  c.disc.update(periods=(2, 3), period_channels=(4, 8), stft_sizes=(256, 128), stft_channels=4)
  c.train.update(
    total_steps=steps,
    adversarial_start=1,
    log_every=1,
    eval_every=1000,
    checkpoint_every=1,
    num_devices=num_devices,
  )
  return c


def run_codec(workdir: Path, speech: Path, *, steps: int, num_devices: int, **arg) -> list[dict]:
  """Trains (or resumes) a tiny codec run; returns its metrics.jsonl rows with a loss."""
  import json  # pylint: disable=import-outside-toplevel

  from omnijax.codec import train as codec_train  # pylint: disable=import-outside-toplevel

  c = codec_config(workdir, speech, steps=steps, num_devices=num_devices, **arg)
  codec_train.train(c, workdir)
  rows = [json.loads(x) for x in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
  return [r for r in rows if "loss" in r]


def random_params(abstract, seed: int = 0, gain: float = 1.0):
  """Host-drawn random params shaped like `abstract` (a tree of ShapeDtypeStructs, e.g. from
  jax.eval_shape(module.init, ...)), scaled so random-weight outputs are O(1) rather than ~0:
  kernels N(0, gain^2 / fan_in) (fan_in: all dims but the last), norm weights and layer scales
  1 + N(0, 0.1^2), ConvNeXt gammas 0.5, everything else (biases, SnakeBeta alpha / beta)
  N(0, 0.1^2). Drawing on the host avoids compiling the model's initialisers."""
  from flax import traverse_util  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(abstract, sep="/")
  out = {}
  for path, leaf in flat.items():
    shape, name = tuple(leaf.shape), path.rsplit("/", 1)[-1]
    if len(shape) >= 2:
      value = gain * rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
    elif "norm" in path or name == "scale":
      value = 1 + 0.1 * rng.standard_normal(shape)
    elif name == "gamma":
      value = np.full(shape, 0.5)
    else:
      value = 0.1 * rng.standard_normal(shape)
    out[path] = value.astype(leaf.dtype)
  return traverse_util.unflatten_dict(out, sep="/")


def assert_trees_equal(a, b):
  """Same leaves, dtypes and values (bitwise)."""
  from flax import traverse_util  # pylint: disable=import-outside-toplevel

  fa, fb = (traverse_util.flatten_dict(t, sep="/") for t in (a, b))
  assert sorted(fa) == sorted(fb)
  for k in fa:
    assert np.asarray(fa[k]).dtype == np.asarray(fb[k]).dtype, k
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)
