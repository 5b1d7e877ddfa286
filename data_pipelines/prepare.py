"""Prepares a folder of raw multimodal data into ArrayRecord shards.

Usage::

  python -m data_pipelines.prepare --manifest=DIR/manifest.jsonl --out=OUT \\
      [--workers=N] [--source=NAME] [--shard_mb=256] [--max_audio_seconds=S] \\
      [--speech_codes=CODEC_DIR]

Manifest (JSONL, UTF-8, one JSON object per line; paths are relative to the
manifest's folder)::

  {"id": "t1", "task": "text", "text": "A document."}
  {"id": "c1", "task": "caption", "image": "img/3.png", "text": "a red square"}
  {"id": "s1", "task": "asr", "audio": "a/1.flac", "text": "the transcript"}
  {"id": "a1", "task": "audio", "audio": "a/2.wav", "text": "a dog barks"}
  {"id": "v1", "task": "video", "video": "v/2.mp4", "text": "narration"}

Fields:

  task     "text" | "caption" | "asr" | "audio" | "video". Optional: inferred
           from the media present (video > image > audio with text: asr,
           audio alone: audio > text).
  text     the document (text), caption (caption), transcript (asr),
           description (audio, video; optional there: a blank one is
           dropped). ``caption`` and ``transcript`` are accepted as
           aliases; ``text_file`` names a UTF-8 file holding it instead.
  image / audio / video   media file paths (any format Pillow, libsndfile or
           FFmpeg decodes). Required: image for caption, audio for asr and
           audio, video for video. A caption may also carry ``audio``: the
           caption spoken (a spoken answer about the image, the Talker's
           target; validated and coded as speech).
  id       optional, default ``"<manifest file stem>-<line number>"``.
  split    optional, default "train" (letters, digits, "_" and "-").
  source   optional, default ``--source`` (itself defaulting to the
           manifest's folder name).
  other    keys with a scalar JSON value (str, int, float, bool) are copied
           into the record as they are (e.g. ``"speaker": "f3"``).

Each line is validated in a worker process by decoding it the way the
training ops do (``decode_text``, ``decode_image`` + ``smart_resize``,
``decode_audio``, ``video.read_video`` + its audio track) and becomes one
msgpack record (``data_pipelines.records``) in
``OUT/{task}/{split}.array_record-*``, one dataset directory per task (so
``records.open_shards(OUT / "asr", "train")`` is one source to mix, and
``OUT/text`` is a ``make_text_dataset`` path):

  id, task, source, text (if any)          str
  modality     "text" | "image" | "audio" | "video" | "audio_video" (a video
               whose audio track has sound)
  image / audio / video                    the media file's bytes, unchanged
  image_width, image_height                int
  audio_seconds, audio_sample_rate         float, int (as stored in the file)
  video_seconds, video_fps, video_frames,  float, float, int,
  video_width, video_height                int, int
  speech_codes, speech_codes_frames        bytes, int (with --speech_codes, see below)
  + the manifest line's extra scalar fields.

With ``--speech_codes=CODEC_DIR`` (a transformers Mimi directory or an omnijax
speech-tokenizer workdir, see ``omnijax.codec.providers``), every example of a
speech task (``SPEECH_TASKS``: asr, whose audio is speech with its transcript;
"audio" is any sound and videos need not speak), and every spoken caption, also stores its Qwen3-Omni
codec codes, the Talker's targets, so that training does not re-encode:
``speech_codes`` = int16 little-endian bytes of the ``(16, T)`` codes (C
order), ``speech_codes_frames`` = T (12.5 frames per second of the 24 kHz
audio; ``data_pipelines.speech_codes`` documents the format, and its op passes
stored codes through). Speech the codec cannot code is skipped as that op
skips it (``too_short``: under one frame, 0.08 s; ``silent_audio``,
``non_finite``, ...). Each worker process loads the codec once.

A line that fails validation is skipped and counted by reason (the
``ops.SKIP_REASONS`` of the failing op; a line that is not UTF-8 is
``invalid_utf8``, one that is not a JSON object ``undecodable``, an unknown
task, a bad split name or a missing required field ``missing_field``). An
asr example longer than ``--max_audio_seconds`` is skipped as ``too_long``
(its transcript covers the whole clip); other audio is kept
(``decode_audio(max_seconds=...)`` truncates it at training time). The job
never stops on bad data.

The summary (counts per modality and task, skips per reason and per task,
media and record bytes, the shards of each "task/split") goes to stdout and to
``OUT/manifest.json`` (written last: it marks OUT complete); each skipped
line is listed in ``OUT/skipped.jsonl`` (line, id, task, reason, detail).

The manifest is streamed (read twice: shard sizes, then the conversion), so memory does not grow
with its length. OUT must be local (ArrayRecord writes local files only): copy the shards to a
bucket afterwards or mount it with Cloud Storage FUSE. ``data_pipelines.prepare_beam`` runs the
same conversion (``convert``) as an Apache Beam pipeline, on many machines and into a bucket.
"""

import argparse
import collections
import contextlib
import json
import math
import multiprocessing
import os
import pathlib
import re
import time
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.progress import (
  BarColumn,
  MofNCompleteColumn,
  Progress,
  TextColumn,
  TimeElapsedColumn,
  TimeRemainingColumn,
)

from data_pipelines import audio as audio_lib
from data_pipelines import records
from data_pipelines import speech_codes as speech_codes_lib
from data_pipelines import video as video_lib
from data_pipelines import vision
from data_pipelines.ops import BadRecord, read_media_bytes
from omnijax import paths

KIND = "prepared_media"
VERSION = 1
TASKS = ("text", "caption", "asr", "audio", "video")
SPEECH_TASKS = ("asr",)  # Tasks whose audio is speech: coded with --speech_codes.
_MEDIA = {"caption": "image", "asr": "audio", "audio": "audio", "video": "video"}
# Optional speech of a task's text, kept with its primary media: a caption spoken (the
# Talker's spoken answer about the image). Coded with --speech_codes like SPEECH_TASKS.
_SPOKEN = {"caption": "audio"}
_TEXT_REQUIRED = ("text", "caption", "asr")
_TEXT_ALIASES = ("text", "caption", "transcript")
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_RESERVED = {
  "id",
  "task",
  "modality",
  "source",
  "split",
  "text",
  "text_file",
  "caption",
  "transcript",
  "image",
  "audio",
  "video",
  "image_width",
  "image_height",
  "audio_seconds",
  "audio_sample_rate",
  "video_seconds",
  "video_fps",
  "video_frames",
  "video_width",
  "video_height",
  "speech_codes",
  "speech_codes_frames",
}


def infer_task(line: dict[str, Any]) -> str:
  if "video" in line:
    return "video"
  if "image" in line:
    return "caption"
  if "audio" in line:
    return "asr" if any(k in line for k in _TEXT_ALIASES + ("text_file",)) else "audio"
  return "text"


def _check_text(text: Any, what: str) -> str:
  """A manifest string -> validated text (as the ``decode_text`` op checks)."""
  if not isinstance(text, str):
    raise BadRecord("undecodable", f"{what} is {type(text).__name__}")
  try:
    text.encode("utf-8")
  except UnicodeEncodeError as e:  # Lone surrogates from JSON escapes.
    raise BadRecord("invalid_utf8", f"{what}: {e}") from e
  if not text.strip():
    raise BadRecord("empty", what)
  return text


def _read_text(line: dict[str, Any], root: str) -> str | None:
  if "text_file" in line:
    data = read_media_bytes(line["text_file"], root)
    try:
      return _check_text(data.decode("utf-8"), "text_file")
    except UnicodeDecodeError as e:
      raise BadRecord("invalid_utf8", f"text_file: {e}") from e
  for alias in _TEXT_ALIASES:
    if alias in line:
      return _check_text(line[alias], alias)
  return None


def _image_fields(data: bytes) -> dict[str, Any]:
  image = vision.decode_image_bytes(data)
  vision.smart_resize(*image.shape[:2])  # Raises bad_aspect_ratio.
  return {"image_height": image.shape[0], "image_width": image.shape[1]}


def _audio_fields(
  data: bytes, speech: bool, max_audio_seconds: float | None, speech_codes: str | None = None
) -> dict[str, Any]:
  samples, rate = audio_lib.decode_audio_bytes(data)
  audio_lib.clean_waveform(samples, rate, max_seconds=max_audio_seconds, truncate=not speech)
  if audio_lib.is_silent(samples):
    raise BadRecord("silent_audio", "peak < %g" % audio_lib.SILENCE_PEAK)
  fields = {"audio_seconds": len(samples) / rate, "audio_sample_rate": rate}
  if speech_codes and speech:
    provider = speech_codes_lib.get_code_provider(speech_codes)
    codes = speech_codes_lib.encode_speech(provider, samples, rate, max_seconds=max_audio_seconds)
    fields.update(speech_codes_lib.codes_to_record(codes))
  return fields


def _video_fields(data: bytes) -> tuple[dict[str, Any], bool]:
  decoded = video_lib.read_video(data)
  has_audio = video_lib.audio_track(decoded["audio"]) is not None
  return {
    "video_seconds": decoded["total_frames"] / decoded["video_fps"],
    "video_fps": decoded["video_fps"],
    "video_frames": decoded["total_frames"],
    "video_height": decoded["frames"].shape[1],
    "video_width": decoded["frames"].shape[2],
  }, has_audio


def prepare_line(
  raw: bytes,
  line_no: int,
  root: str,
  default_id: str,
  default_source: str,
  max_audio_seconds: float | None = None,
  speech_codes: str | None = None,
) -> dict[str, Any]:
  """One manifest line -> a record, validated; see the module doc.

  Raises:
    BadRecord: the line is skipped, with this reason.
  """
  try:
    line = json.loads(raw.decode("utf-8"))
  except UnicodeDecodeError as e:
    raise BadRecord("invalid_utf8", f"manifest line: {e}") from e
  except ValueError as e:
    raise BadRecord("undecodable", f"manifest line: {e}") from e
  if not isinstance(line, dict):
    raise BadRecord("undecodable", f"manifest line is {type(line).__name__}")
  task = line.get("task") or infer_task(line)
  if task not in TASKS:
    raise BadRecord("missing_field", f"unknown task {task!r}")
  record = {
    "id": str(line.get("id", f"{default_id}-{line_no}")),
    "task": task,
    "source": str(line.get("source", default_source)),
  }
  record.update(
    {k: v for k, v in line.items() if k not in _RESERVED and isinstance(v, (str, int, float, bool))}
  )
  try:
    text = _read_text(line, root)
  except BadRecord as e:
    if e.reason != "empty" or task in _TEXT_REQUIRED:
      raise
    text = None  # A blank optional description: the media alone.
  if text is not None:
    record["text"] = text
  elif task in _TEXT_REQUIRED:
    raise BadRecord("missing_field", f"text of a {task} example")
  modality = "text"
  if task in _MEDIA:
    media = _MEDIA[task]
    if media not in line:
      raise BadRecord("missing_field", f"{media} of a {task} example")
    data = read_media_bytes(line[media], root)
    if media == "image":
      record.update(_image_fields(data))
      modality = "image"
    elif media == "audio":
      record.update(_audio_fields(data, task in SPEECH_TASKS, max_audio_seconds, speech_codes))
      modality = "audio"
    else:
      fields, has_audio = _video_fields(data)
      record.update(fields)
      modality = "audio_video" if has_audio else "video"
    record[media] = data
  if task in _SPOKEN and _SPOKEN[task] in line:
    data = read_media_bytes(line[_SPOKEN[task]], root)
    record.update(_audio_fields(data, True, max_audio_seconds, speech_codes))
    record[_SPOKEN[task]] = data
  record["modality"] = modality
  return record


def describe(raw: bytes, root: str) -> tuple[str | None, str, str, int]:
  """(id, task, split, bytes) of a (possibly bad) manifest line, for skip statistics and shard
  sizes: the bytes are the line's and its media files'."""
  example_id, task, split, size = None, "unknown", "train", len(raw)
  try:
    line = json.loads(raw)
    task = line.get("task") or infer_task(line)
    task = task if task in TASKS else "unknown"
    example_id = None if line.get("id") is None else str(line["id"])
    split = str(line.get("split", "train"))
    for media in ("image", "audio", "video"):
      if isinstance(line.get(media), str):
        size += os.path.getsize(os.path.join(root, line[media]))
  except (ValueError, AttributeError, OSError):
    pass  # Counted for real (and skipped) by the conversion.
  return example_id, task, split, size


def num_shards(group_bytes: int, shard_mb: float) -> int:
  return max(1, math.ceil(group_bytes / (shard_mb * 2**20)))


def convert(line_no: int, raw: bytes, config: dict[str, Any]) -> tuple[str, Any]:
  """One manifest line -> ("ok", (split, record)) or ("skip", its skip log entry): the
  conversion of this command and of ``data_pipelines.prepare_beam``."""
  example_id, task, split, _ = describe(raw, config["root"])
  try:
    if not _SPLIT_NAME.match(split):
      raise BadRecord("missing_field", f"invalid split name {split!r}")
    return "ok", (split, prepare_line(raw, line_no, **config))
  except BadRecord as e:
    entry = {"line": line_no, "id": example_id, "task": task, "reason": e.reason, "detail": str(e)}
    return "skip", entry


class Stats:
  """What a summary counts: records by modality and task, media bytes, speech codes, skips by
  reason and by task. Mergeable (the Beam pipeline combines the workers' stats)."""

  def __init__(self):
    self.modality, self.task, self.media_bytes = (collections.Counter() for _ in range(3))
    self.codes, self.skipped = collections.Counter(), collections.Counter()
    self.skipped_by_task = collections.defaultdict(collections.Counter)

  def add(self, status: str, payload: Any) -> "Stats":
    if status == "ok":
      _, record = payload
      self.modality[record["modality"]] += 1
      self.task[record["task"]] += 1
      for media in ("image", "audio", "video"):
        if media in record:
          self.media_bytes[media] += len(record[media])
      if "speech_codes" in record:
        self.codes["examples"] += 1
        self.codes["frames"] += record["speech_codes_frames"]
    else:
      self.skipped[payload["reason"]] += 1
      self.skipped_by_task[payload["task"]][payload["reason"]] += 1
    return self

  def merge(self, other: "Stats") -> "Stats":
    for name in ("modality", "task", "media_bytes", "codes", "skipped"):
      getattr(self, name).update(getattr(other, name))
    for task, counts in other.skipped_by_task.items():
      self.skipped_by_task[task].update(counts)
    return self


def summary(
  manifest: str,
  num_lines: int,
  stats: Stats,
  splits: dict[str, Any],
  speech_codes: str | None,
  seconds: float,
  extra: dict[str, Any] | None,
) -> dict[str, Any]:
  """``OUT/manifest.json``: see the module doc."""
  return {
    "kind": KIND,
    "version": VERSION,
    "encoding": "msgpack",
    "manifest": manifest,
    "num_lines": num_lines,
    "num_examples": sum(s["num_records"] for s in splits.values()),
    "num_skipped": sum(stats.skipped.values()),
    "counts": {k: dict(sorted(getattr(stats, k).items())) for k in ("modality", "task")},
    "skipped": dict(sorted(stats.skipped.items())),
    "skipped_by_task": {
      t: dict(sorted(c.items())) for t, c in sorted(stats.skipped_by_task.items())
    },
    "media_bytes": dict(sorted(stats.media_bytes.items())),
    "record_bytes": sum(s["num_bytes"] for s in splits.values()),
    "splits": dict(sorted(splits.items())),
    **({"speech_codes": _codes_summary(speech_codes, stats.codes)} if speech_codes else {}),
    "seconds": round(seconds, 2),
    **(extra or {}),
  }


def check_out(out: str | os.PathLike[str]) -> pathlib.Path:
  """The output folder, which must be local: ArrayRecord's writer opens local files only."""
  return paths.local(
    out,
    "--out",
    "ArrayRecord writes local files only; prepare into a local folder and copy the shards to the "
    "bucket (gcloud storage cp -r OUT gs://...), or mount the bucket with Cloud Storage FUSE and "
    "name its mount point (python -m data_pipelines.prepare_beam writes to a bucket itself).",
  )


def _lines(manifest: pathlib.Path) -> Iterator[tuple[int, bytes]]:
  """(line number, bytes) of the manifest's non-blank lines, read as they are needed."""
  with open(manifest, "rb") as f:
    for line_no, raw in enumerate(f, start=1):
      if raw.strip():
        yield line_no, raw


def _work(args: tuple[int, bytes, dict[str, Any]]) -> tuple[str, Any]:
  return convert(*args)


@contextlib.contextmanager
def _converted(tasks: Iterator[tuple], workers: int, codes: bool) -> Iterator[Iterator[tuple]]:
  """The conversions of `tasks`, in order, in this process or in `workers` processes."""
  if workers <= 1:
    yield map(_work, tasks)
    return
  context = multiprocessing.get_context("spawn")
  with context.Pool(workers, initializer=init_worker, initargs=(codes,)) as pool:
    yield pool.imap(_work, tasks, chunksize=4)


class _Writers:
  """One ``ShardWriter`` per (task, split), in ``OUT/{task}/``, made on use."""

  def __init__(self, out: pathlib.Path, group_bytes: dict, shard_mb: float):
    self._out, self._bytes, self._shard_mb = out, group_bytes, shard_mb
    self._writers = {}

  def write(self, task: str, split: str, record: dict[str, Any]) -> None:
    if (task, split) not in self._writers:
      self._writers[task, split] = records.ShardWriter(
        self._out / task, split, num_shards(self._bytes.get((task, split), 0), self._shard_mb)
      )
    self._writers[task, split].write(record)

  def close(self) -> dict[str, Any]:
    """The manifest's ``splits``: ``{"task/split": entry}``, paths from OUT."""
    splits = {}
    for (task, split), writer in sorted(self._writers.items()):
      entry = writer.close()
      entry["files"] = [f"{task}/{name}" for name in entry["files"]]
      splits[f"{task}/{split}"] = entry
    return splits


def prepare(
  manifest: str | os.PathLike[str],
  out: str | os.PathLike[str],
  *,
  workers: int = 1,
  source: str | None = None,
  shard_mb: float = 256,
  max_audio_seconds: float | None = None,
  speech_codes: str | os.PathLike[str] | None = None,
  progress: bool = True,
  extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
  """Runs the preparation; returns the summary written to ``OUT/manifest.json``.

  The manifest is read twice, line by line (shard sizes, then the conversion): memory holds
  the (task, split) sizes, the lines being converted and the open shards, not the manifest.

  Args:
    manifest: the JSONL manifest.
    out: output folder (its shards and manifest are replaced); local (see ``check_out``).
    workers: validation processes (1: in this process).
    source: default ``source`` field (default: the manifest's folder name).
    shard_mb: target shard size; a task's split gets ceil(its bytes / this)
      shards.
    max_audio_seconds: asr clips longer than this are skipped as too_long.
    speech_codes: a codec directory: store the codec codes of speech examples
      (see the module doc).
    progress: show a progress bar (on stderr).
    extra: fields merged into the summary (e.g. a corpus's kind and version).
  """
  start = time.time()
  out = check_out(out)
  manifest = pathlib.Path(manifest).resolve()
  config = conversion_config(manifest, source, max_audio_seconds, speech_codes)
  out.mkdir(parents=True, exist_ok=True)
  (out / records.MANIFEST_NAME).unlink(missing_ok=True)  # Incomplete now.
  for task in TASKS:
    for stale in (out / task).glob(f"*{records.SHARD_INFIX}*"):
      stale.unlink()
  group_bytes, num_lines = collections.Counter(), 0
  for _, raw in _lines(manifest):
    _, task, split, size = describe(raw, config["root"])
    group_bytes[task, split] += size
    num_lines += 1
  writers = _Writers(out, group_bytes, shard_mb)
  stats = Stats()
  tasks = ((line_no, raw, config) for line_no, raw in _lines(manifest))
  bar = Progress(
    TextColumn("prepare"),
    BarColumn(),
    MofNCompleteColumn(),
    TimeElapsedColumn(),
    TimeRemainingColumn(),
    console=Console(stderr=True),
    disable=not progress,
  )
  codes = config["speech_codes"] is not None
  try:
    with bar, open(out / "skipped.jsonl", "w", encoding="utf-8") as skip_log:
      with _converted(tasks, workers, codes) as results:
        job = bar.add_task("prepare", total=num_lines)
        for status, payload in results:
          stats.add(status, payload)
          if status == "ok":
            split, record = payload
            writers.write(record["task"], split, record)
          else:
            skip_log.write(json.dumps(payload, ensure_ascii=False) + "\n")
          bar.advance(job)
  finally:
    splits = writers.close()
  result = summary(
    str(manifest), num_lines, stats, splits, config["speech_codes"], time.time() - start, extra
  )
  records.write_manifest(out, result)
  return result


def conversion_config(
  manifest: os.PathLike[str],
  source: str | None,
  max_audio_seconds: float | None,
  speech_codes: str | os.PathLike[str] | None,
) -> dict[str, Any]:
  """``convert``'s `config`: ``prepare_line``'s arguments but the line's (a codec directory is
  checked here)."""
  if speech_codes is not None:
    speech_codes = os.path.abspath(os.fspath(speech_codes))
    speech_codes_lib.providers.codec_kind(speech_codes)  # Fails fast on a wrong directory.
  return {
    "root": str(manifest.parent),
    "default_id": manifest.stem,
    "default_source": source or manifest.parent.name,
    "max_audio_seconds": max_audio_seconds,
    "speech_codes": speech_codes,
  }


def init_worker(codes: bool) -> None:
  """One compute thread per worker process when it runs a PyTorch codec (no oversubscription)."""
  if codes:
    try:
      import torch  # pylint: disable=import-outside-toplevel
    except ImportError:
      return
    torch.set_num_threads(1)


def _codes_summary(codec: str, counts: collections.Counter) -> dict[str, Any]:
  providers = speech_codes_lib.providers
  return {
    "codec": codec,
    "tasks": list(SPEECH_TASKS),
    "num_quantizers": providers.NUM_QUANTIZERS,
    "codebook_size": providers.CODEBOOK_SIZE,
    "frame_rate": providers.FRAME_RATE,
    "num_examples": counts["examples"],
    "num_frames": counts["frames"],
  }


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--manifest", required=True, help="JSONL manifest")
  parser.add_argument("--out", required=True, help="output folder")
  parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
  parser.add_argument(
    "--source", default=None, help="default source name (default: manifest folder)"
  )
  parser.add_argument("--shard_mb", type=float, default=256)
  parser.add_argument(
    "--max_audio_seconds",
    type=float,
    default=None,
    help="skip asr clips longer than this (too_long)",
  )
  parser.add_argument(
    "--speech_codes",
    default=None,
    metavar="CODEC_DIR",
    help="store codec codes of speech examples (a Mimi directory or a speech-tokenizer workdir)",
  )
  parser.add_argument("--no_progress", action="store_true")
  args = parser.parse_args(argv)
  summary = prepare(
    args.manifest,
    args.out,
    workers=args.workers,
    source=args.source,
    shard_mb=args.shard_mb,
    max_audio_seconds=args.max_audio_seconds,
    speech_codes=args.speech_codes,
    progress=not args.no_progress,
  )
  print(json.dumps(summary, indent=2, sort_keys=True))


if __name__ == "__main__":
  main()
