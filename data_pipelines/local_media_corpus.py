"""Builds a small local multimodal corpus of simple-scene facts, no downloads.

Each "fact" is a scene of coloured shapes, stated by one sentence:

  static  "three red squares and a blue circle"
  motion  "a green triangle moves from left to right next to two yellow
          diamonds"

and the same fact is rendered in every modality it fits, so that cross-modal
transfer can be measured (a model that learnt a fact from text can be asked
about its image, speech or video):

  text     task "text": the sentence in a short template ("There are ...").
  image    task "caption": a 128x128 PNG drawn with Pillow (static facts),
           caption = the sentence, with the fact's speech as the caption
           spoken (``audio``: a spoken answer about the image).
  speech   task "asr": the sentence spoken by eSpeak NG (``data_pipelines.
           espeak``; several voices and speeds, at 22050 Hz, alternately FLAC
           and MP3), transcript = the sentence.
  video    task "video": 128x96 H.264 MP4 at 4 fps of the motion (motion
           facts), a few seconds long, with the spoken sentence muxed in as an
           AAC track (audio in video); text = the sentence.

With the default 600 facts (400 static, 200 motion) that is 600 text, 400
image (each with its sentence spoken), 600 speech and 200 video examples, about 52 MB
(mostly the speech), built in about 40 seconds on 2 cores. Facts are split into train/validation by a hash of their
sentence (``VALIDATION_PER_MILLE``), so a fact's renderings share a split.

The corpus is built the way real data is: raw files and a JSONL manifest are
written to a temporary folder, then ``data_pipelines.prepare`` validates and
shards them into ``DIR/{text,caption,asr,video}/{train,validation}.
array_record-*`` (its summary, plus this corpus's parameters, is
``DIR/manifest.json``; ``DIR/text`` is a ``make_text_dataset`` path).
Examples carry ``fact_id`` and ``fact_kind``.

Usage::

  python -m data_pipelines.local_media_corpus --out DIR [--num_facts N]

or ``build_local_media_corpus(DIR, num_facts=N)``. Both do nothing if ``DIR``
already holds this corpus at this version and size.
"""

import argparse
import hashlib
import io
import json
import logging
import math
import os
import pathlib
import re
import tempfile
import time

import numpy as np
from PIL import Image, ImageDraw
import soundfile as sf

from data_pipelines import espeak
from data_pipelines import prepare as prepare_lib
from data_pipelines import records
from data_pipelines import video as video_lib

KIND = "local_media_corpus"
VERSION = 2  # 2: captions carry their speech
NUM_FACTS = 600
MOTION_FRACTION = 1 / 3
VALIDATION_PER_MILLE = 50
SEED = 0

COLORS = {
  "red": (220, 40, 40),
  "green": (40, 170, 60),
  "blue": (40, 80, 220),
  "yellow": (235, 200, 30),
  "purple": (140, 60, 170),
  "orange": (245, 130, 20),
}
SHAPES = ("square", "circle", "triangle", "diamond")
NUMBERS = ("one", "two", "three", "four")
DIRECTIONS = {
  "from left to right": ((0.1, 0.5), (0.9, 0.5)),
  "from right to left": ((0.9, 0.5), (0.1, 0.5)),
  "from top to bottom": ((0.5, 0.15), (0.5, 0.85)),
  "from bottom to top": ((0.5, 0.85), (0.5, 0.15)),
}
VOICES = (
  "en-us",
  "en-us+f2",
  "en-us+m3",
  "en-us+f3",
  "en-029",
  "en-gb-scotland",
  "en-gb-x-rp+f4",
  "en-us+m7",
)
TEXT_TEMPLATES = ("There are {}.", "The scene shows {}.", "In this picture: {}.", "We can see {}.")
IMAGE_SIZE = (128, 128)
VIDEO_SIZE = (128, 96)  # (width, height)
VIDEO_FPS = 4
MIN_VIDEO_SECONDS = 3.0


def _group_phrase(count: int, color: str, shape: str) -> str:
  if count == 1:
    return f"{'an' if color[0] in 'aeiou' else 'a'} {color} {shape}"
  return f"{NUMBERS[count - 1]} {color} {shape}s"


_GROUP = re.compile(
  r"\b(an?|one|two|three|four) (" + "|".join(COLORS) + r") (" + "|".join(SHAPES) + r")s?\b"
)


def parse_scene(text: str) -> dict:
  """The facts a scene description states, in the corpus's words: {"groups": {(count, colour,
  shape)}, "direction": str | None}; what is not in its vocabulary is ignored (inverse of the
  sentences `make_facts` writes, applied to a model's output too)."""
  text = text.lower()
  groups = {
    (1 if n in ("a", "an") else NUMBERS.index(n) + 1, c, sh) for n, c, sh in _GROUP.findall(text)
  }
  direction = next((d for d in DIRECTIONS if d in text), None)
  return {"groups": groups, "direction": direction}


def make_facts(num_facts: int, seed: int = SEED) -> list[dict]:
  """Distinct random facts; the first ``num_facts * MOTION_FRACTION`` move."""
  rng = np.random.default_rng(seed)
  num_motion = round(num_facts * MOTION_FRACTION)
  facts, seen = [], set()
  while len(facts) < num_facts:
    motion = len(facts) < num_motion
    groups = []
    for _ in range(int(rng.integers(1, 3))):
      count = 1 if motion and not groups else int(rng.integers(1, 5))
      color = str(rng.choice(list(COLORS)))
      shape = str(rng.choice(SHAPES))
      if all((color, shape) != (c, s) for _, c, s in groups):
        groups.append((count, color, shape))
    phrases = [_group_phrase(*g) for g in groups]
    if motion:
      direction = str(rng.choice(list(DIRECTIONS)))
      sentence = f"{phrases[0]} moves {direction}"
      if len(phrases) > 1:
        sentence += f" next to {phrases[1]}"
    else:
      direction = None
      sentence = " and ".join(phrases)
    if sentence in seen:
      continue
    seen.add(sentence)
    facts.append(
      {
        "id": f"fact{len(facts):05d}",
        "sentence": sentence,
        "groups": groups,
        "direction": direction,
        "kind": "motion" if motion else "static",
      }
    )
  return facts


def _split_of(sentence: str) -> str:
  bucket = int.from_bytes(hashlib.sha256(sentence.encode()).digest()[:8], "big")
  return "validation" if bucket % 1000 < VALIDATION_PER_MILLE else "train"


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, center, radius: float, color) -> None:
  x, y = center
  r = radius
  if shape == "square":
    draw.rectangle([x - r, y - r, x + r, y + r], fill=color)
  elif shape == "circle":
    draw.ellipse([x - r, y - r, x + r, y + r], fill=color)
  elif shape == "triangle":
    draw.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=color)
  else:  # diamond
    draw.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=color)


def _background(rng: np.random.Generator, size) -> Image.Image:
  tint = tuple(int(v) for v in rng.integers(225, 256, size=3))
  return Image.new("RGB", size, tint)


def render_image(fact: dict, rng: np.random.Generator) -> bytes:
  """The static scene: every object in its own cell of a jittered 4x4 grid."""
  image = _background(rng, IMAGE_SIZE)
  draw = ImageDraw.Draw(image)
  cells = rng.permutation(16)
  cell = IMAGE_SIZE[0] / 4
  i = 0
  for count, color, shape in fact["groups"]:
    for _ in range(count):
      row, col = divmod(int(cells[i]), 4)
      i += 1
      center = ((col + 0.5) * cell + rng.uniform(-4, 4), (row + 0.5) * cell + rng.uniform(-4, 4))
      _draw_shape(draw, shape, center, rng.uniform(9, 13), COLORS[color])
  buffer = io.BytesIO()
  image.save(buffer, format="PNG")
  return buffer.getvalue()


def render_video_frames(fact: dict, num_frames: int, rng: np.random.Generator) -> np.ndarray:
  """The motion: the first group's object moves; a second group stays still."""
  width, height = VIDEO_SIZE
  background = _background(rng, VIDEO_SIZE)
  draw = ImageDraw.Draw(background)
  still_cells = rng.permutation([0, 3, 12, 15, 1, 2, 13, 14])  # Border cells.
  for k in range(fact["groups"][1][0] if len(fact["groups"]) > 1 else 0):
    row, col = divmod(int(still_cells[k]), 4)
    _, color, shape = fact["groups"][1]
    _draw_shape(draw, shape, ((col + 0.5) * width / 4, (row + 0.5) * height / 4), 7, COLORS[color])
  (x0, y0), (x1, y1) = DIRECTIONS[fact["direction"]]
  _, color, shape = fact["groups"][0]
  frames = []
  for t in np.linspace(0.0, 1.0, num_frames):
    frame = background.copy()
    center = ((x0 + (x1 - x0) * t) * width, (y0 + (y1 - y0) * t) * height)
    _draw_shape(ImageDraw.Draw(frame), shape, center, 10, COLORS[color])
    frames.append(np.asarray(frame))
  return np.stack(frames)


def _speak(sentence: str, rng: np.random.Generator) -> tuple[np.ndarray, int]:
  samples, rate = espeak.synthesize(
    sentence,
    voice=str(rng.choice(VOICES)),
    rate=int(rng.integers(140, 181)),
    pitch=int(rng.integers(35, 66)),
  )
  return samples.astype(np.float32) / 32768.0, rate


def write_raw_corpus(raw_dir: pathlib.Path, facts: list[dict], seed: int = SEED) -> pathlib.Path:
  """Writes the media files and ``manifest.jsonl``; returns the manifest path."""
  for sub in ("img", "speech", "video"):
    (raw_dir / sub).mkdir(parents=True, exist_ok=True)
  lines = []
  for n, fact in enumerate(facts):
    rng = np.random.default_rng([seed, n])
    common = {
      "fact_id": fact["id"],
      "fact_kind": fact["kind"],
      "split": _split_of(fact["sentence"]),
    }
    sentence = fact["sentence"]
    template = TEXT_TEMPLATES[int(rng.integers(len(TEXT_TEMPLATES)))]
    lines.append(
      {"id": f"{fact['id']}-text", "task": "text", "text": template.format(sentence), **common}
    )
    speech, rate = _speak(sentence, rng)
    ext = "flac" if n % 2 == 0 else "mp3"
    sf.write(raw_dir / "speech" / f"{fact['id']}.{ext}", speech, rate, format=ext.upper())
    lines.append(
      {
        "id": f"{fact['id']}-asr",
        "task": "asr",
        "audio": f"speech/{fact['id']}.{ext}",
        "text": sentence,
        **common,
      }
    )
    if fact["kind"] == "static":
      (raw_dir / "img" / f"{fact['id']}.png").write_bytes(render_image(fact, rng))
      lines.append(
        {
          "id": f"{fact['id']}-caption",
          "task": "caption",
          "image": f"img/{fact['id']}.png",
          "audio": f"speech/{fact['id']}.{ext}",
          "text": sentence,
          **common,
        }
      )
    else:
      narration, rate = _speak(sentence, rng)
      seconds = max(MIN_VIDEO_SECONDS, len(narration) / rate + 0.5)
      frames = render_video_frames(fact, math.ceil(seconds * VIDEO_FPS), rng)
      (raw_dir / "video" / f"{fact['id']}.mp4").write_bytes(
        video_lib.encode_video(frames, VIDEO_FPS, narration, rate)
      )
      lines.append(
        {
          "id": f"{fact['id']}-video",
          "task": "video",
          "video": f"video/{fact['id']}.mp4",
          "text": sentence,
          **common,
        }
      )
  manifest = raw_dir / "manifest.jsonl"
  with open(manifest, "w", encoding="utf-8") as f:
    for line in lines:
      f.write(json.dumps(line) + "\n")
  return manifest


def build_local_media_corpus(
  out_dir: str | os.PathLike[str],
  *,
  num_facts: int = NUM_FACTS,
  workers: int = 2,
  progress: bool = False,
) -> pathlib.Path:
  """Builds the corpus into ``out_dir`` unless it is already there.

  An incomplete build (no manifest), or one of another version or size, is
  rebuilt in place; a directory whose manifest is of another kind is refused.

  Args:
    out_dir: the corpus directory.
    num_facts: number of facts (a third of them motion facts); tests use a
      few dozen.
    workers: processes validating the raw files (``prepare --workers``).
    progress: show the preparation's progress bar.

  Returns:
    ``out_dir`` as a Path (its ``manifest.json`` is the preparation summary).
  """
  out_dir = pathlib.Path(out_dir)
  manifest = records.read_manifest(out_dir)
  if manifest is not None and manifest.get("kind") != KIND:
    raise ValueError(
      f"{out_dir} holds another dataset (manifest kind "
      f"{manifest.get('kind')!r}); not overwriting it with the media corpus"
    )
  if (
    manifest is not None
    and manifest.get("version") == VERSION
    and manifest.get("num_facts") == num_facts
  ):
    logging.info("Local media corpus already built at %s", out_dir)
    return out_dir
  start = time.time()
  facts = make_facts(num_facts)
  with tempfile.TemporaryDirectory(prefix="media_corpus_") as raw_dir:
    manifest_path = write_raw_corpus(pathlib.Path(raw_dir), facts)
    summary = prepare_lib.prepare(
      manifest_path,
      out_dir,
      workers=workers,
      source=KIND,
      progress=progress,
      extra={
        "kind": KIND,
        "version": VERSION,
        "num_facts": num_facts,
        "num_motion_facts": sum(f["kind"] == "motion" for f in facts),
      },
    )
  if summary["num_skipped"]:
    raise RuntimeError(f"Local media corpus: skipped {summary['skipped']}")
  logging.info(
    "Built local media corpus at %s in %.1fs: %s",
    out_dir,
    time.time() - start,
    summary["counts"]["task"],
  )
  return out_dir


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, help="corpus directory")
  parser.add_argument("--num_facts", type=int, default=NUM_FACTS)
  parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  path = build_local_media_corpus(
    args.out, num_facts=args.num_facts, workers=args.workers, progress=True
  )
  print(json.dumps(records.read_manifest(path), indent=2, sort_keys=True))


if __name__ == "__main__":
  main()
