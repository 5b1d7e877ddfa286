"""``data_pipelines.prepare`` as an Apache Beam pipeline: the same conversion on many machines.

Usage::

  python -m data_pipelines.prepare_beam --manifest=DIR/manifest.jsonl --out=OUT \\
      [--source=NAME] [--shard_mb=256] [--max_audio_seconds=S] [--speech_codes=CODEC_DIR] \\
      [Beam options]

Beam options choose the runner: by default the DirectRunner on this machine's cores
(``--direct_num_workers=N --direct_running_mode=multi_processing``); for a real corpus
``--runner=DataflowRunner --project=P --region=R --temp_location=gs://...`` (or Flink, Spark).
Workers run this package (on Dataflow: ``--sdk_container_image`` with ``pip install .[beam]``,
or ``--setup_file=./setup.py``); Dataflow and Google's credentials for buckets need Beam's gcp
extra (``pip install "apache-beam[gcp]==2.78.0"``). The manifest and ``OUT`` may be bucket URLs (Beam's file
systems read and write them; each shard is written to a local temporary file, as ArrayRecord
writes local files only, then copied); media files are opened as local paths, so every worker
mounts them (Cloud Storage FUSE, NFS) and a manifest in a bucket names them by absolute path.

Each line goes through ``prepare.convert``, the function the single-machine command runs, so the
records, the summary (``OUT/manifest.json``: counts, skips by reason and task, bytes, shards per
task/split, sized as there) and ``OUT/skipped.jsonl`` (in line order) are the same. What differs
is which shard of its task/split a record lands in and its order there: record ``line`` goes to
shard ``line % num_shards``, in manifest order (the single-machine command deals records round
robin in the order they were converted); compare two outputs as multisets of records.

The pipeline::

  manifest blocks (whole lines, numbered) -> lines -> reshuffle -> convert -> +-> records keyed
  by (task, split, shard) -> group -> write each shard  +-> sizes, stats, skips -> manifest.json
"""

import argparse
import io
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions
from array_record.python import array_record_module

from data_pipelines import prepare as prepare_lib
from data_pipelines import records
from omnijax import paths

BLOCK_BYTES = 8 * 2**20  # Manifest bytes per read task.


def manifest_blocks(manifest: str, block_bytes: int = BLOCK_BYTES) -> list[tuple[int, int, int]]:
  """(start, end, number of the first line) of consecutive blocks of whole manifest lines: one
  pass that counts newlines, so that workers number their lines as the single-machine command."""
  blocks, start, line_no = [], 0, 1
  with FileSystems.open(manifest, compression_type=CompressionTypes.UNCOMPRESSED) as f:
    while block := f.read(block_bytes):
      block += f.readline()
      blocks.append((start, start + len(block), line_no))
      start += len(block)
      line_no += block.count(b"\n")
  return blocks


def read_block(block: tuple[int, int, int], manifest: str) -> Iterator[tuple[int, bytes]]:
  start, end, first = block
  with FileSystems.open(manifest, compression_type=CompressionTypes.UNCOMPRESSED) as f:
    f.seek(start)
    data = f.read(end - start)
  for line_no, raw in enumerate(io.BytesIO(data), start=first):
    if raw.strip():
      yield line_no, raw


class _Convert(beam.DoFn):
  """A line -> its (task, split) bytes (tag "size"), the stats of its result ("stats"), and
  its record ((task, split), (line, msgpack bytes)) or its skip log entry ("skip")."""

  def __init__(self, config: dict[str, Any]):
    self._config = config

  def setup(self):
    prepare_lib.init_worker(self._config["speech_codes"] is not None)

  def process(self, line: tuple[int, bytes]) -> Iterator[Any]:
    line_no, raw = line
    _, task, split, size = prepare_lib.describe(raw, self._config["root"])
    yield beam.pvalue.TaggedOutput("size", ((task, split), size))
    status, payload = prepare_lib.convert(line_no, raw, self._config)
    yield beam.pvalue.TaggedOutput("stats", prepare_lib.Stats().add(status, payload))
    if status == "ok":
      split, record = payload
      yield (record["task"], split), (line_no, records.encode_example(record))
    else:
      yield beam.pvalue.TaggedOutput("skip", payload)


class _MergeStats(beam.CombineFn):
  def create_accumulator(self) -> prepare_lib.Stats:
    return prepare_lib.Stats()

  def add_input(self, stats: prepare_lib.Stats, other: prepare_lib.Stats) -> prepare_lib.Stats:
    return stats.merge(other)

  def merge_accumulators(self, accumulators: Iterable[prepare_lib.Stats]) -> prepare_lib.Stats:
    out = prepare_lib.Stats()
    for stats in accumulators:
      out.merge(stats)
    return out

  def extract_output(self, stats: prepare_lib.Stats) -> prepare_lib.Stats:
    return stats


def write_shard(out: str, task: str, split: str, index: int, num_shards: int, encoded) -> int:
  """Writes one shard of `encoded` records (in this order) to OUT/task/; returns its bytes."""
  num_bytes = 0
  with tempfile.TemporaryDirectory(prefix="prepare_beam_") as tmp:
    local = os.path.join(tmp, "shard")
    writer = array_record_module.ArrayRecordWriter(local, records.WRITER_OPTIONS)
    for record in encoded:
      writer.write(record)
      num_bytes += len(record)
    writer.close()
    name = records.shard_name(split, index, num_shards)
    with open(local, "rb") as src, _create(FileSystems.join(out, task, name)) as dst:
      shutil.copyfileobj(src, dst, 2**20)
  return num_bytes


def _create(path: str):
  return FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED)


def _key_shard(element, counts: dict) -> tuple[tuple[str, str, int], tuple[int, bytes]]:
  group, (line_no, record) = element
  return (*group, line_no % counts[group]), (line_no, record)


def _write_group_shard(element, out: str, counts: dict) -> tuple[tuple[str, str], tuple]:
  (task, split, index), lines = element
  lines = sorted(lines)
  num_bytes = write_shard(out, task, split, index, counts[task, split], (r for _, r in lines))
  return (task, split), (index, len(lines), num_bytes)


def _finish(
  _, out: str, manifest: str, config: dict, start: float, extra: dict | None, **side
) -> dict[str, Any]:
  """Writes the empty shards, OUT/skipped.jsonl and OUT/manifest.json (last)."""
  written = {}
  for group, shard in side["shards"]:
    written.setdefault(group, {})[shard[0]] = shard[1:]
  splits = {}
  for (task, split), shards in sorted(written.items()):
    num_shards = side["counts"][task, split]
    for index in sorted(set(range(num_shards)) - set(shards)):
      write_shard(out, task, split, index, num_shards, ())
    splits[f"{task}/{split}"] = {
      "files": [f"{task}/{records.shard_name(split, i, num_shards)}" for i in range(num_shards)],
      "num_records": sum(n for n, _ in shards.values()),
      "num_bytes": sum(b for _, b in shards.values()),
    }
  with _create(FileSystems.join(out, "skipped.jsonl")) as f:
    for entry in sorted(side["skips"], key=lambda e: e["line"]):
      f.write((json.dumps(entry, ensure_ascii=False) + "\n").encode())
  summary = prepare_lib.summary(
    manifest,
    side["num_lines"],
    side["stats"],
    splits,
    config["speech_codes"],
    time.time() - start,
    extra,
  )
  with _create(FileSystems.join(out, records.MANIFEST_NAME)) as f:
    f.write((json.dumps(summary, indent=2, sort_keys=True) + "\n").encode())
  return summary


def build(
  pipeline: beam.Pipeline,
  manifest: str,
  out: str,
  config: dict[str, Any],
  shard_mb: float,
  extra: dict[str, Any] | None = None,
) -> beam.PCollection:
  """Adds the preparation to `pipeline`; its output holds the summary."""
  start = time.time()
  lines = (
    pipeline
    | "Blocks" >> beam.Create(manifest_blocks(manifest))
    | "Lines" >> beam.FlatMap(read_block, manifest)
    | "Spread" >> beam.Reshuffle()
  )
  converted = lines | "Convert" >> beam.ParDo(_Convert(config)).with_outputs(
    "size", "stats", "skip", main="records"
  )
  counts = beam.pvalue.AsDict(
    converted.size
    | "Bytes" >> beam.CombinePerKey(sum)
    | "Shards" >> beam.MapTuple(lambda group, size: (group, prepare_lib.num_shards(size, shard_mb)))
  )
  shards = (
    converted.records
    | "Key" >> beam.Map(_key_shard, counts=counts)
    | "Group" >> beam.GroupByKey()
    | "Write" >> beam.Map(_write_group_shard, out=out, counts=counts)
  )
  return (
    pipeline
    | "Once" >> beam.Create([None])
    | "Finish"
    >> beam.Map(
      _finish,
      out=out,
      manifest=manifest,
      config=config,
      start=start,
      extra=extra,
      shards=beam.pvalue.AsList(shards),
      skips=beam.pvalue.AsList(converted.skip),
      stats=beam.pvalue.AsSingleton(
        converted.stats | "Stats" >> beam.CombineGlobally(_MergeStats())
      ),
      counts=counts,
      num_lines=beam.pvalue.AsSingleton(lines | "Count" >> beam.combiners.Count.Globally()),
    )
  )


def prepare(
  manifest: str | os.PathLike[str],
  out: str | os.PathLike[str],
  *,
  source: str | None = None,
  shard_mb: float = 256,
  max_audio_seconds: float | None = None,
  speech_codes: str | os.PathLike[str] | None = None,
  extra: dict[str, Any] | None = None,
  beam_args: list[str] | None = None,
) -> dict[str, Any]:
  """Runs the pipeline (see the module doc); returns the summary written to OUT/manifest.json.

  `beam_args`: Beam's command-line options (the runner and its settings); default the
  DirectRunner on every core of this machine.
  """
  manifest, out = paths.path(manifest), os.fspath(paths.path(out))
  config = prepare_lib.conversion_config(manifest, source, max_audio_seconds, speech_codes)
  stale = [f"{out}/{task}/*{records.SHARD_INFIX}*" for task in prepare_lib.TASKS]
  stale = [m.path for result in FileSystems.match(stale) for m in result.metadata_list]
  marker = FileSystems.join(out, records.MANIFEST_NAME)
  FileSystems.delete(stale + ([marker] if FileSystems.exists(marker) else []))
  defaults = [
    f"--direct_num_workers={os.cpu_count() or 1}",
    "--direct_running_mode=multi_processing",
  ]
  with beam.Pipeline(options=PipelineOptions(defaults + list(beam_args or []))) as pipeline:
    build(pipeline, os.fspath(manifest), out, config, shard_mb, extra)
  with FileSystems.open(marker) as f:
    return json.load(f)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--manifest", required=True, help="JSONL manifest")
  parser.add_argument("--out", required=True, help="output folder or bucket URL")
  parser.add_argument("--source", default=None, help="default source (default: manifest folder)")
  parser.add_argument("--shard_mb", type=float, default=256)
  parser.add_argument("--max_audio_seconds", type=float, default=None)
  parser.add_argument("--speech_codes", default=None, metavar="CODEC_DIR")
  args, beam_args = parser.parse_known_args(argv)
  summary = prepare(
    args.manifest,
    args.out,
    source=args.source,
    shard_mb=args.shard_mb,
    max_audio_seconds=args.max_audio_seconds,
    speech_codes=args.speech_codes,
    beam_args=beam_args,
  )
  print(json.dumps(summary, indent=2, sort_keys=True))


if __name__ == "__main__":
  main()
