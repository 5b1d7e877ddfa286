"""TensorFlow Datasets as a source of examples for the media ops.

``TfdsSource(name, split, data_dir=..., fields=...)`` is a Grain random-access
source (``len``, ``[i]``) over an array_record-backed TFDS dataset; item ``i``
is an example dict in the form the ops of ``data_pipelines`` consume::

  {"id": str, "task": "asr", "modality": "audio", "source": "tfds:librispeech",
   "text": bytes | str, "audio": float32 waveform | encoded bytes,
   "sample_rate": int, "image": uint8 (H, W, 3) | encoded bytes, ...}

so ``grain.MapDataset.source(TfdsSource(...)).map(ops)`` runs e.g.
``decode_text(key="text"), decode_audio, log_mel`` on it. ``fields`` maps our
keys ("text", "audio", "image", "video", "id") to TFDS feature paths (nested
features joined by "/", e.g. "captions/text"); a sequence of values (several
captions of one image) yields its first. ``PRESETS`` holds the mapping, task
and modality of a few builders (``librispeech``, ``coco_captions``,
``ref_coco``); other builders need ``fields`` (and ``task``, ``modality``).
Integer audio (TFDS' ``Audio`` stores 16-bit PCM as integers) is scaled to
float32 in [-1, 1); ``sample_rate`` comes from the feature's metadata, the
preset, or the ``sample_rate`` argument.

Two readers, both without TensorFlow:

  "tfds"  ``tfds.data_source(name, split=..., data_dir=...)``: TFDS builds
          the builder and decodes the example with NumPy. This works without
          TensorFlow only for builders whose features and ``_info()`` need no
          TensorFlow (images, text, tensors, class labels: ``mnist``,
          ``ref_coco``, ``imagenet2012``, ``lm1b``, ...). In TFDS 4.9.10 the
          ``Audio`` feature calls ``tf.dtypes`` in its constructor and
          ``coco``/``coco_captions`` use ``tf.int64`` in ``_info()``, so
          every audio builder and COCO fail there with
          ``ModuleNotFoundError: tensorflow``.
  "raw"   reads the prepared dataset folder itself (``DATA_DIR/name/[config/]
          version``: ``dataset_info.json`` for the splits' shards,
          ``features.json`` for sequence and audio metadata) and parses each
          record as a ``tf.train.Example`` with the protobuf module TFDS
          ships (``tensorflow_datasets.proto.tf_example_pb2``): bytes
          features stay encoded bytes (JPEG/PNG images, FLAC audio of
          ``lazy_decode`` configs, text), int64 and float lists become arrays.
          This reads any array_record TFDS dataset, audio included.

``reader="auto"`` (the default) tries "tfds" and falls back to "raw" when
TFDS needs TensorFlow. ``tfds.testing.mock_data`` mocks the "tfds" reader, so
it works without TensorFlow exactly for the builders "tfds" supports.
"""

import json
import os
import pathlib
import re
from typing import Any

import grain
import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import naming
from tensorflow_datasets.proto import tf_example_pb2

PRESETS = {
  "librispeech": {
    "fields": {"audio": "speech", "text": "text", "id": "id"},
    "task": "asr",
    "modality": "audio",
    "sample_rate": 16000,
  },
  "coco_captions": {
    "fields": {"image": "image", "text": "captions/text", "id": "image/id"},
    "task": "caption",
    "modality": "image",
  },
  "ref_coco": {
    "fields": {"image": "image", "text": "objects/refexp/raw", "id": "image/id"},
    "task": "caption",
    "modality": "image",
  },
}
_VERSION_DIR = re.compile(r"^\d+\.\d+\.\d+$")


def _needs_tensorflow(error: BaseException) -> bool:
  while error is not None:
    if isinstance(error, ModuleNotFoundError) and "tensorflow" in str(error):
      return True
    error = error.__cause__ or error.__context__
  return False


def _versions(path: pathlib.Path) -> list[pathlib.Path]:
  """Prepared version folders in ``path``, oldest first."""
  return sorted(
    (
      p
      for p in path.glob("*")
      if _VERSION_DIR.match(p.name) and (p / "dataset_info.json").is_file()
    ),
    key=lambda p: tuple(int(x) for x in p.name.split(".")),
  )


def dataset_dir(name: str, data_dir: str | os.PathLike[str]) -> pathlib.Path:
  """``DATA_DIR/name/[config/]version`` of a prepared TFDS dataset.

  ``name`` may carry a config and version (``"librispeech/clean100:2.1.1"``).
  Without a version the newest prepared one is used; without a config, the
  only prepared config (a builder with configs keeps each in its folder).
  """
  base, kwargs = naming.parse_builder_name_kwargs(name)
  path = pathlib.Path(data_dir) / str(base)
  if "config" in kwargs:
    path /= kwargs["config"]
  elif not _versions(path):
    configs = [p for p in path.glob("*") if p.is_dir() and _versions(p)]
    if len(configs) > 1:
      raise ValueError(
        f"{path} holds configs {sorted(p.name for p in configs)}; name one ({base}/CONFIG)"
      )
    path = configs[0] if configs else path
  if "version" in kwargs:
    path /= str(kwargs["version"])
  else:
    versions = _versions(path)
    if not versions:
      raise FileNotFoundError(f"No prepared version of {name!r} under {path}")
    path = versions[-1]
  if not (path / "dataset_info.json").is_file():
    raise FileNotFoundError(f"No dataset_info.json in {path}")
  return path


def _feature_specs(
  features_json: dict, prefix: str = "", in_sequence: bool = False
) -> dict[str, dict[str, Any]]:
  """features.json -> {flat path: {"class", "sequence", "sample_rate"}}."""
  specs = {}
  if "featuresDict" in features_json:
    for key, sub in features_json["featuresDict"]["features"].items():
      specs.update(_feature_specs(sub, f"{prefix}{key}/", in_sequence))
    return specs
  if "sequence" in features_json:
    return _feature_specs(features_json["sequence"]["feature"], prefix, True)
  cls = features_json.get("pythonClassName", "").rsplit(".", 1)[-1]
  spec = {"class": cls, "sequence": in_sequence}
  if "audio" in features_json:
    spec["sample_rate"] = int(features_json["audio"].get("sampleRate", 0)) or None
  specs[prefix.rstrip("/")] = spec
  return specs


class RawTfdsSource(grain.sources.RandomAccessDataSource):
  """A prepared TFDS split read without TFDS' builders (see the module doc).

  Items are flat dicts: feature path -> bytes, list of bytes (sequences),
  int / float (scalars) or int64 / float32 arrays.
  """

  def __init__(self, directory: str | os.PathLike[str], split: str):
    self._dir = pathlib.Path(directory)
    info = json.loads((self._dir / "dataset_info.json").read_text())
    if info.get("fileFormat", "tfrecord") != "array_record":
      raise ValueError(f"{self._dir} is {info.get('fileFormat', 'tfrecord')}, not array_record")
    entries = {s["name"]: s for s in info.get("splits", [])}
    if split not in entries:
      raise ValueError(f"No split {split!r} in {self._dir} ({sorted(entries)})")
    entry = entries[split]
    template = naming.ShardedFileTemplate(
      data_dir=self._dir,
      dataset_name=info["name"],
      split=split,
      filetype_suffix="array_record",
      **({"template": entry["filepathTemplate"]} if entry.get("filepathTemplate") else {}),
    )
    files = template.sharded_filepaths(len(entry.get("shardLengths", [])))
    self._source = grain.sources.ArrayRecordDataSource([str(f) for f in files])
    features_path = self._dir / "features.json"
    self.specs = (
      _feature_specs(json.loads(features_path.read_text())) if features_path.is_file() else {}
    )

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    example = tf_example_pb2.Example.FromString(self._source[index])
    out = {}
    for key, feature in example.features.feature.items():
      kind = feature.WhichOneof("kind")
      values = getattr(feature, kind).value if kind else []
      sequence = self.specs.get(key, {}).get("sequence", False)
      if kind == "bytes_list":
        out[key] = list(values) if sequence or len(values) != 1 else values[0]
      else:
        array = np.asarray(values, np.int64 if kind == "int64_list" else np.float32)
        out[key] = array.item() if array.size == 1 and not sequence else array
    return out

  def __repr__(self) -> str:
    return f"RawTfdsSource({self._dir})"


def _lookup(example: dict[str, Any], path: str) -> Any:
  """A (possibly nested) decoded TFDS example's value at ``a/b/c``."""
  if path in example:  # Flat (raw reader) or a top-level key.
    return example[path]
  value = example
  for part in path.split("/"):
    if not isinstance(value, dict) or part not in value:
      return None
    value = value[part]
  return value


def _first(value: Any) -> Any:
  """First of a (nested) sequence of strings/bytes (one caption of several)."""
  while isinstance(value, (list, tuple)) or (
    isinstance(value, np.ndarray) and value.ndim and value.dtype.kind in "OSU"
  ):
    if not len(value):
      return None
    value = value[0]
  if isinstance(value, (np.str_, np.bytes_)):
    return value.item()
  return value


class TfdsSource(grain.sources.RandomAccessDataSource):
  """A TFDS split as examples for the media ops; see the module doc.

  Args:
    name: TFDS builder name, optionally with config and version.
    split: split name (TFDS slicing such as "train[:10%]" with "tfds" only).
    data_dir: TFDS data folder (required by the "raw" reader).
    fields: our key -> TFDS feature path (default: the preset of ``name``).
    task, modality: written into each example (default: the preset's).
    sample_rate: for integer/float audio whose features carry none.
    reader: "auto", "tfds" or "raw".
  """

  def __init__(
    self,
    name: str,
    split: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    fields: dict[str, str] | None = None,
    task: str | None = None,
    modality: str | None = None,
    sample_rate: int | None = None,
    reader: str = "auto",
  ):
    base = str(naming.parse_builder_name_kwargs(name)[0])
    preset = PRESETS.get(base, {})
    self._fields = fields or preset.get("fields")
    if not self._fields:
      raise ValueError(f"No preset for {base!r}: pass fields= (ours -> TFDS)")
    self._task = task or preset.get("task", "unknown")
    self._modality = modality or preset.get("modality", "unknown")
    self._source_name = f"tfds:{base}"
    self._sample_rate = sample_rate or preset.get("sample_rate")
    if reader not in ("auto", "tfds", "raw"):
      raise ValueError(f"reader must be auto, tfds or raw, got {reader!r}")
    self._source = None
    if reader in ("auto", "tfds"):
      try:
        self._source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        self.reader = "tfds"
      except Exception as e:  # pylint: disable=broad-except
        if reader == "tfds" or not _needs_tensorflow(e):
          raise
    if self._source is None:
      if data_dir is None:
        raise ValueError(f"Reading {name!r} without TensorFlow needs data_dir")
      raw = RawTfdsSource(dataset_dir(name, data_dir), split)
      audio_spec = raw.specs.get(self._fields.get("audio", ""), {})
      self._sample_rate = audio_spec.get("sample_rate") or self._sample_rate
      self._source = raw
      self.reader = "raw"

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    raw = self._source[index]
    example = {"task": self._task, "modality": self._modality, "source": self._source_name}
    for ours, path in self._fields.items():
      value = _first(_lookup(raw, path))
      if value is None:
        continue  # The ops report the missing field.
      if ours == "id":
        value = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
      elif ours == "audio" and isinstance(value, np.ndarray):
        if np.issubdtype(value.dtype, np.integer):
          value = value.astype(np.float32) / 32768.0
        if self._sample_rate:
          example["sample_rate"] = self._sample_rate
      example[ours] = value
    return example

  def __repr__(self) -> str:
    return f"TfdsSource({self._source_name}, reader={self.reader}, {len(self)} examples)"
