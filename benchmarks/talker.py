"""A Talker run's losses side by side with the baselines a model must beat, in one run.

    python benchmarks/talker.py --run=workdirs/talker_local_pretrain [--step=N] [--out=DIR] \
        [--speak=N]

For codebook 0 (with the codec EOS ending each utterance) and for the 15 MTP codebooks,
cross-entropy in nats per target:
  start        the run's first logged interval (training batches)
  train        its last logged interval
  held-out     teacher-forced on the validation split of each spoken source (the run's codec)
  unigram      each codebook's code frequencies on the training split (add-one smoothed),
               scored on the validation split's targets
  uniform      log(vocabulary): log 3072 (codebook 0's logits span the Talker vocabulary),
               log 2048 (MTP)
With --out it writes results.json there, and with --speak=N the speech the run generates
(`omnijax.load(run).generate(..., return_audio=True)`, its workdir's Code2Wav) for the first N
held-out sentences of the validation split: each prompt asks to read the sentence aloud and
carries it as the assistant's answer (the Talker speaks a given text; the Thinker adds one token,
which is never spoken), sampled with transformers' Talker defaults; WAVs of the generated and
of the codec's own reconstruction of the recorded sentence, and their mel spectrograms
(speech.png).
With --ask=N, for the first N held-out images of the run's spoken_caption source the model
answers the training question about the image itself: the Thinker describes it (greedy, up to
40 tokens) and the Talker speaks that answer as it is decoded; each answer is scored against
the scene (objects: every (count, colour, shape) group right; the scene_description
evaluator's reading) and written with its WAV and mel spectrogram (ask.png).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from data_pipelines import inputs as inputs_lib
from data_pipelines import records
from data_pipelines import speech_codes as codes_lib
from omnijax.models.omni import Omni
from omnijax.train import checkpoint as ckpt_lib
from omnijax.train import step as step_lib


def _speech_codes(path: str, split: str, codec: str) -> list[np.ndarray]:
  source = records.open_shards(path, split)
  provider = codes_lib.get_code_provider(codec)
  out = []
  for i in range(len(source)):
    ex = records.decode_example(source[i])
    samples, rate = codes_lib.load_waveform(ex["audio"], ex.get("sample_rate"))
    out.append(codes_lib.encode_speech(provider, samples, rate))
  return out


def unigram_ce(train: list[np.ndarray], heldout: list[np.ndarray], eos: int) -> tuple[float, float]:
  """(codebook-0 CE incl. one EOS per utterance, mean CE of codebooks 1..15)."""

  def ce(train_targets, heldout_targets, vocab):
    counts = np.bincount(np.concatenate(train_targets), minlength=vocab) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-np.mean(logp[np.concatenate(heldout_targets)]))

  with_eos = lambda cs: [np.append(c[0], eos) for c in cs]
  c0 = ce(with_eos(train), with_eos(heldout), eos + 1)
  rest = [ce([c[k] for c in train], [c[k] for c in heldout], 2048) for k in range(1, 16)]
  return c0, float(np.mean(rest))


def heldout_ce(run: Path, config, step) -> tuple[float, float, int]:
  """Teacher-forced (codebook-0 CE, MTP CE, utterances) on the validation splits."""
  thinker_cfg = ckpt_lib.read_model_config(run)
  talker_cfg = ckpt_lib.read_talker_config(run)
  params, _ = ckpt_lib.latest_params(run, step)
  model = Omni(thinker_cfg, talker_cfg)
  tokenizer = ckpt_lib.load_tokenizer(run)

  @jax.jit
  def sums(params, batch):
    _, _, logits, mtp_logits, _ = step_lib.forward(model, params, batch)
    labels, codes = batch["talker_labels"], batch["talker_mtp_codes"]
    c0 = step_lib._ce(logits, labels, labels >= 0)
    mask = jnp.broadcast_to(codes[..., :1] >= 0, codes[..., 1:].shape)
    return c0, step_lib._ce(mtp_logits, codes[..., 1:], mask), step_lib.talker_counts(batch)

  totals = np.zeros(4)
  docs = 0
  for source in config.data.mixture:
    it = inputs_lib.make_eval_iterator(
      config,
      thinker_cfg,
      tokenizer,
      source=source,
      split="validation",
      batch_size=config.train.global_batch_size,
      talker_cfg=talker_cfg,
    )
    for batch in it:
      batch = {k: v for k, v in batch.items() if k != "skipped"}
      c0, mtp, (n0, nm) = jax.device_get(sums(params, batch))
      totals += [c0, mtp, n0, nm]
      docs += int(sum(len(np.unique(s[s > 0])) for s in batch["talker_segment_ids"]))
  return totals[0] / totals[2], totals[1] / totals[3], docs


def speak(run: Path, config, out: Path, n: int) -> list[dict]:
  """Generated speech for the first n held-out sentences (see the module doc)."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  import soundfile  # pylint: disable=import-outside-toplevel

  import omnijax  # pylint: disable=import-outside-toplevel

  model = omnijax.load(run)
  tok = model.tokenizer
  spec = next(iter(config.data.mixture.values()))
  source = records.open_shards(spec.path, "validation")
  provider = codes_lib.get_code_provider(spec.codec)
  rows, figure = [], plt.figure(figsize=(10, 2.2 * n))
  for i in range(n):
    ex = records.decode_example(source[i])
    sentence = ex["text"].strip()
    prompt = np.concatenate(
      [
        [tok.token_id("<|im_start|>")],
        tok.encode(f"user\nRead this aloud:\n{sentence}"),
        [tok.token_id("<|im_end|>")],
        tok.encode("\n"),
        [tok.token_id("<|im_start|>")],
        tok.encode(f"assistant\n{sentence}"),
      ]
    )
    _, wave = model.generate(
      prompt[None], return_audio=True, thinker_max_new_tokens=1, talker_max_new_tokens=400, seed=i
    )
    samples, rate = codes_lib.load_waveform(ex["audio"], ex.get("sample_rate"))
    codes = codes_lib.encode_speech(provider, samples, rate)
    reference = model.code2wav(codes[None])[0]
    for name, w in (("generated", wave[0]), ("codec_reference", reference)):
      soundfile.write(out / f"{i}_{name}.wav", w, 24000)
    rows.append(
      dict(
        sentence=sentence,
        generated_seconds=len(wave[0]) / 24000,
        reference_seconds=len(reference) / 24000,
      )
    )
    for j, (name, w) in enumerate((("generated", wave[0]), ("codec reference", reference))):
      _mel_panel(figure, (n, 2, 2 * i + j + 1), w, f"{name}: {sentence[:50]}")
  figure.tight_layout()
  figure.savefig(out / "speech.png", dpi=80)
  return rows


def _mel_panel(figure, where: tuple[int, int, int], wave, title):
  """A mel spectrogram of 24 kHz `wave` in subplot `where` (rows, columns, index)."""
  import librosa  # pylint: disable=import-outside-toplevel

  ax = figure.add_subplot(*where)
  mel = librosa.power_to_db(librosa.feature.melspectrogram(y=wave, sr=24000, n_mels=80))
  ax.imshow(mel, origin="lower", aspect="auto", cmap="magma")
  ax.set_title(title, fontsize=8)
  ax.set_xticks([]), ax.set_yticks([])


def ask(run: Path, config, out: Path, n: int) -> list[dict]:
  """The model's spoken answers about the first n held-out images (see the module doc)."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import grain  # pylint: disable=import-outside-toplevel
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  import soundfile  # pylint: disable=import-outside-toplevel

  import omnijax  # pylint: disable=import-outside-toplevel
  from data_pipelines import local_media_corpus  # pylint: disable=import-outside-toplevel
  from data_pipelines.example_dataset import SKIPPED_KEY, ApplyOps  # pylint: disable=C0415
  from data_pipelines.omni import TASK_OPS, ToSequence, open_source  # pylint: disable=C0415
  from data_pipelines.ops import OpContext, build_ops  # pylint: disable=import-outside-toplevel

  model = omnijax.load(run)
  name = next(k for k, v in config.data.mixture.items() if v.task == "spoken_caption")
  spec = inputs_lib.eval_data_config(config, name, "validation").mixture[name]
  ops = build_ops(list(TASK_OPS["caption"]), OpContext(tokenizer=model.tokenizer))
  to_seq = ToSequence("caption", 0, model.tokenizer, model.config, config.data.seq_len, 0)
  ds = grain.MapDataset.source(open_source(spec)).map(ApplyOps(ops))
  examples = [ds[i] for i in range(len(ds))]
  examples = [e for e in examples if SKIPPED_KEY not in e][:n]
  rows, figure = [], plt.figure(figsize=(8, 1.8 * len(examples)))
  end = model.tokenizer.token_id("<|im_end|>")
  for i, example in enumerate(examples):
    tokens, media = to_seq.prompt(example)
    ((pixels, grid),) = media["image"]
    ids, wave = model.generate(
      tokens[None],
      return_audio=True,
      pixel_values=pixels,
      image_grid_thw=grid,
      thinker_max_new_tokens=40,
      talker_max_new_tokens=400,
      seed=i,
    )
    answer = ids[0, len(tokens) :].tolist()
    answer = model.tokenizer.decode(answer[: answer.index(end)] if end in answer else answer)
    got = local_media_corpus.parse_scene(answer)["groups"]
    want = local_media_corpus.parse_scene(example["text"])["groups"]
    soundfile.write(out / f"ask_{i}.wav", wave[0], 24000)
    rows.append(
      dict(
        scene=example["text"].strip(),
        answer=answer.strip(),
        objects_right=got == want,
        spoken_seconds=len(wave[0]) / 24000,
      )
    )
    _mel_panel(figure, (len(examples), 1, i + 1), wave[0], f"answer: {answer.strip()[:70]}")
  figure.tight_layout()
  figure.savefig(out / "ask.png", dpi=80)
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--run", required=True)
  parser.add_argument("--step", type=int, default=None)
  parser.add_argument("--out", default="")
  parser.add_argument("--speak", type=int, default=0)
  parser.add_argument("--ask", type=int, default=0)
  args = parser.parse_args(argv)
  run = Path(args.run)
  config = ml_collections.ConfigDict(json.loads((run / "config.json").read_text()))
  rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
  rows = [r for r in rows if "talker_loss" in r]
  spec = next(iter(config.data.mixture.values()))
  talker_cfg = ckpt_lib.read_talker_config(run)
  train_codes = _speech_codes(spec.path, "train", spec.codec)
  heldout_codes = _speech_codes(spec.path, "validation", spec.codec)
  uni0, uni_mtp = unigram_ce(train_codes, heldout_codes, talker_cfg.codec_eos_token_id)
  held0, held_mtp, docs = heldout_ce(run, config, args.step)
  results = {
    "start (train)": (rows[0]["talker_loss"], rows[0]["mtp_loss"]),
    f"train (step {rows[-1]['step']})": (rows[-1]["talker_loss"], rows[-1]["mtp_loss"]),
    f"held-out ({docs} utterances)": (held0, held_mtp),
    "unigram (held-out)": (uni0, uni_mtp),
    "uniform": (float(np.log(talker_cfg.text.vocab_size)), float(np.log(2048))),
  }
  print(f"{'':28s} {'codebook 0':>12s} {'MTP (1..15)':>12s}   nats per target")
  for name, (a, b) in results.items():
    print(f"{name:28s} {a:12.3f} {b:12.3f}")
  if args.out:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.speak:
      results["speech"] = speak(run, config, out, args.speak)
      for r in results["speech"]:
        print(
          f"spoke {r['generated_seconds']:.2f} s (recorded {r['reference_seconds']:.2f} s): "
          f"{r['sentence']}"
        )
    if args.ask:
      results["answers"] = ask(run, config, out, args.ask)
      for r in results["answers"]:
        print(
          f"asked about '{r['scene']}': answered '{r['answer']}' (objects right: "
          f"{r['objects_right']}), spoke {r['spoken_seconds']:.2f} s"
        )
    (out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
  main()
