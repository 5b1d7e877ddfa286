"""Builds the local text corpus: real English text from the CPython stdlib, no downloads.

The text (docstrings, the ``help()`` language-reference topics and the public
pure-Python stdlib sources; see ``data_pipelines.stdlib_text``) is extracted by
an isolated child interpreter, so that modules imported for their docstrings
cannot affect this process. Documents are deduplicated by content, split into
train/validation by a hash of their text (``VALIDATION_PER_MILLE`` / 1000 of
them go to validation), and written as ArrayRecord shards of msgpack examples
``{"text", "source", "id"}`` with a ``manifest.json`` (see
``data_pipelines.records``). On CPython 3.11 this is about 2,300 documents,
8 MB of text. The output depends only on the Python installation.

Usage::

  python -m data_pipelines.local_corpus --out DIR

or ``build_local_text_corpus(DIR)`` from Python. Both do nothing if ``DIR``
already holds a complete corpus (a manifest of this kind whose shards exist).
"""

import argparse
import hashlib
import json
import logging
import os
import pathlib
import subprocess
import sys
import tempfile
import time

from data_pipelines import records
from data_pipelines import stdlib_text

KIND = "local_stdlib_text"
VERSION = 2
VALIDATION_PER_MILLE = 20
NUM_SHARDS = {"train": 8, "validation": 1}


def _split_of(text: str) -> str:
  bucket = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")
  return "validation" if bucket % 1000 < VALIDATION_PER_MILLE else "train"


def _extract_documents(workdir: str) -> list[dict[str, str]]:
  """Runs ``stdlib_text`` in an isolated child; returns its documents."""
  out_path = os.path.join(workdir, "documents.jsonl")
  env = {
    "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
    "LC_ALL": "C.UTF-8",
    "PYTHONHASHSEED": "0",
    "PYTHONDONTWRITEBYTECODE": "1",
  }
  result = subprocess.run(
    [sys.executable, "-I", "-S", stdlib_text.__file__, out_path],
    cwd=workdir,
    env=env,
    stdin=subprocess.DEVNULL,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    timeout=600,
    check=False,
  )
  if result.returncode != 0:
    raise RuntimeError(
      "stdlib text extraction failed with exit code "
      f"{result.returncode}:\n{result.stderr.decode(errors='replace')[-4000:]}"
    )
  with open(out_path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def build_local_text_corpus(out_dir: str | os.PathLike[str]) -> pathlib.Path:
  """Builds the corpus into ``out_dir`` unless it is already there.

  An incomplete build (no manifest) or one of an older ``VERSION`` is
  rebuilt in place; a directory whose manifest is of another kind is refused.

  Returns:
    ``out_dir`` as a Path: the ``path`` for ``make_text_dataset`` (its
    ``manifest.json`` describes splits, sizes and sources).
  """
  out_dir = pathlib.Path(out_dir)
  manifest = records.read_manifest(out_dir)
  if manifest is not None and manifest.get("kind") != KIND:
    raise ValueError(
      f"{out_dir} holds another dataset (manifest kind "
      f"{manifest.get('kind')!r}); not overwriting it with the local corpus"
    )
  if manifest is not None and manifest.get("version") == VERSION:
    logging.info("Local text corpus already built at %s", out_dir)
    return out_dir

  start = time.time()
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / records.MANIFEST_NAME).unlink(missing_ok=True)  # Incomplete now.
  with tempfile.TemporaryDirectory(prefix="stdlib_text_") as workdir:
    documents = _extract_documents(workdir)

  seen = set()
  by_split = {split: [] for split in NUM_SHARDS}
  sources = {}
  for doc in documents:
    digest = hashlib.sha256(doc["text"].encode()).digest()
    if digest in seen:
      continue
    seen.add(digest)
    by_split[_split_of(doc["text"])].append(doc)
    stats = sources.setdefault(doc["source"], {"documents": 0, "text_bytes": 0})
    stats["documents"] += 1
    stats["text_bytes"] += len(doc["text"].encode())

  splits = {
    split: records.write_shards(docs, out_dir, split, NUM_SHARDS[split])
    for split, docs in by_split.items()
  }
  records.write_manifest(
    out_dir,
    {
      "kind": KIND,
      "version": VERSION,
      "encoding": "msgpack",
      "fields": ["text", "source", "id"],
      "python": sys.version.split()[0],
      "splits": splits,
      "sources": sources,
    },
  )
  logging.info(
    "Built local text corpus at %s in %.1fs: %s",
    out_dir,
    time.time() - start,
    {s: e["num_records"] for s, e in splits.items()},
  )
  return out_dir


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, help="corpus directory")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  path = build_local_text_corpus(args.out)
  print(json.dumps(records.read_manifest(path), indent=2, sort_keys=True))


if __name__ == "__main__":
  main()
