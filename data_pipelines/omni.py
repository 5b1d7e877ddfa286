"""Mixed-modality pretraining batches for the Thinker (text, image, audio, video, audio-video).

``make_omni_dataset`` builds, per host::

  per source (config.data.mixture.NAME: path or tfds, task, weight):
    MapDataset.source(shards or TFDS)[process_index::process_count].seed().shuffle().repeat()
      .map(decode + task ops)          e.g. decode_audio, log_mel; bad inputs -> skip markers
      .map(ToSequence)                 prompt template, placeholders, TM-RoPE positions
  IterDataset.mix({name: source}, weights)     weights = token ratio / mean tokens per example
                                               (of examples drawn from the whole source by a
                                               seed of its name: the same on every host)
  pack                                 greedy first-fit into rows of seq_len (checkpointable)
  batch(batch_fn=assemble)             per-row bucketed media buffers (omnijax.processing.media)
  [mp_prefetch]                        worker processes (config.data.worker_count)
  count skips                          iterator.skipped_records (reason -> count)

A sequence never crosses a row: attention, positions and labels stay within their document
(segment ids). Multimodal sequences longer than a row are skipped (``too_long``); text longer
than a row is split into row-sized documents. Labels: the response of multimodal tasks (the
caption, transcript or description after a varied natural-language prompt), every token of
text. ``task_ids`` (B, S) says which mixture source each token came from (-1: padding), so the
trainer logs per-source losses and token counts.
"""

from __future__ import annotations

import logging
import zlib
from typing import Any, Mapping, Sequence

import grain
import numpy as np
from absl import flags

from data_pipelines import records
from data_pipelines.example_dataset import SKIPPED_KEY, ApplyOps
from data_pipelines.ops import SKIP_REASONS, OpContext, build_ops
from data_pipelines.pipeline import CountSkippedIterDataset

# Prompts per task (the seed: varied natural-language prompts); one is drawn per example.
PROMPTS = {
  "caption": (
    "Describe the image.",
    "What is shown in this picture?",
    "Write a caption for this image.",
    "What do you see?",
    "Give a short description of the image.",
  ),
  "asr": (
    "Transcribe the audio.",
    "What is being said?",
    "Write down what you hear.",
    "Transcribe this speech into text.",
    "Repeat what the speaker says.",
  ),
  "audio": ("Describe the sound.", "What can you hear?", "Caption this audio clip."),
  "video": (
    "Describe the video.",
    "What happens in this video?",
    "Summarize what you see and hear.",
    "Narrate this clip.",
  ),
}
PROMPTS["tts"] = ("Read this aloud:", "Say the following:", "Speak this text:")
PROMPTS["spoken_asr"] = PROMPTS["asr"]
PROMPTS["spoken_caption"] = PROMPTS["caption"]
TASK_OPS = {
  "text": ("decode_text",),
  "tts": ("decode_text",),
  "spoken_asr": ("decode_text", "decode_audio(truncate=False, max_seconds=30)", "log_mel"),
  "caption": ("decode_text", "decode_image", "resize_image", "patchify_image"),
  "spoken_caption": ("decode_text", "decode_image", "resize_image", "patchify_image"),
  "asr": ("decode_text", "decode_audio(truncate=False, max_seconds=30)", "log_mel"),
  "audio": ("decode_text", "decode_audio(max_seconds=30)", "log_mel"),
  "video": ("decode_text", "decode_video(fps=2.0, max_seconds=20)"),
}
# Tasks whose answer is also spoken: the Talker's targets are the codes of the example's
# speech (a `speech_codes` op with the source's `codec`, before any audio op).
# tts: text in; spoken_asr: speech in, its transcript spoken; spoken_caption: an image in (a
# caption record whose `audio` is the caption spoken), the answer about it spoken.
TALKER_TASKS = ("tts", "spoken_asr", "spoken_caption")
TASK_MODALITY = {
  "text": "text",
  "tts": "text",
  "spoken_asr": "audio",
  "caption": "image",
  "spoken_caption": "image",
  "asr": "audio",
  "audio": "audio",
  "video": "video",
}
_REASON_INDEX = {r: i for i, r in enumerate(SKIP_REASONS)}
_SKIPS = "skipped"  # per-row/per-batch skip counts (len(SKIP_REASONS),)


def _skip(reason: str) -> dict[str, Any]:
  return {SKIPPED_KEY: reason}


class ToSequence:
  """An op-processed example -> a model sequence (or a skip marker).

  Output: inputs/targets (L,) int32, loss_mask (L,) float32, positions (3, L) float32, and
  media lists audio [(mel, T)], image [(pixels, grid)], video [(pixels, grid)] with the
  per-video seconds per grid in video_spg. TALKER_TASKS add the Talker layout of the
  conversation (``omnijax.processing.talker.talker_example``) as ``talker_*`` arrays.
  """

  def __init__(
    self,
    task: str,
    task_id: int,
    tokenizer,
    model_cfg,
    seq_len: int,
    seed: int,
    talker_cfg=None,
    talker_seq_len: int = 0,
    speaker: str = "ethan",
  ):
    from omnijax.processing import positions  # pylint: disable=import-outside-toplevel
    from omnijax.processing import talker  # pylint: disable=import-outside-toplevel

    if task not in TASK_MODALITY:
      raise ValueError(f"unknown task {task!r}; tasks: {sorted(TASK_MODALITY)}")
    if task in TALKER_TASKS:
      if talker_cfg is None:
        raise ValueError(f"task {task!r} trains a Talker: set config.talker (a Talker model).")
      speakers = talker_cfg.speakers()
      if speaker.lower() not in speakers:
        raise ValueError(f"speaker {speaker!r} is not one of {sorted(speakers)}.")
      self._talker_ids = talker.TalkerTokenIds.from_configs(model_cfg, talker_cfg)
      self._speaker_id = speakers[speaker.lower()]
      self._talker_example, self._talker_cfg = talker.talker_example, talker_cfg
    self.task, self.task_id, self.tok, self.cfg = task, task_id, tokenizer, model_cfg
    self.seq_len, self.seed, self.talker_seq_len = seq_len, seed, talker_seq_len
    self._positions = positions
    self._rope_kwargs = positions.rope_kwargs_from_config(model_cfg)
    self._ids = {
      name: tokenizer.token_id(name) for name in ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
    }
    self._newline = tokenizer.encode("\n")

  def _rng(self, example) -> np.random.Generator:
    key = str(example.get("id", example.get("text", "")))[:256]
    return np.random.default_rng((self.seed, zlib.crc32(key.encode())))

  def _media_span(self, example) -> tuple[list[int], dict[str, Any]]:
    c, pos = self.cfg, self._positions
    merge = c.vision.spatial_merge_size
    if self.task == "tts":
      return [], {}
    if self.task in ("caption", "spoken_caption"):
      grid = np.asarray(example["image_grid_thw"]).reshape(3)
      n = int(pos.image_token_count(grid, merge))
      span = [c.vision_start_token_id] + [c.image_token_id] * n + [c.vision_end_token_id]
      return span, dict(image=[(example["pixel_values"], grid[None])], image_grid=[grid])
    if self.task in ("asr", "spoken_asr", "audio"):
      mel = example["audio_features"]
      n = int(pos.audio_token_count(mel.shape[1], c.audio.n_window))
      span = [c.audio_start_token_id] + [c.audio_token_id] * n + [c.audio_end_token_id]
      return span, dict(audio=[mel], audio_frames=[mel.shape[1]])
    grid = np.asarray(example["video_grid_thw"]).reshape(3)
    spg = float(example["video_second_per_grid"])
    media = dict(
      video=[(example["pixel_values_videos"], grid[None])], video_grid=[grid], video_spg=[spg]
    )
    if example.get("audio_in_video"):
      from data_pipelines import audio as audio_ops  # pylint: disable=import-outside-toplevel

      mel = audio_ops.log_mel_spectrogram(example["audio"], c.audio.num_mel_bins)
      n_audio = int(pos.audio_token_count(mel.shape[1], c.audio.n_window))
      span = pos.audio_in_video_layout(
        grid,
        spg,
        n_audio,
        tokens=self._rope_kwargs["tokens"],
        spatial_merge_size=merge,
        position_id_per_seconds=c.position_id_per_seconds,
      )
      media |= dict(audio=[mel], audio_frames=[mel.shape[1]])
      return list(np.asarray(span)), media
    n = int(pos.image_token_count(grid, merge))
    return [c.vision_start_token_id] + [c.video_token_id] * n + [c.vision_end_token_id], media

  def prompt(self, example) -> tuple[np.ndarray, dict[str, Any]]:
    """A multimodal example's chat prompt up to the assistant's turn, and its media (what
    decoding continues from; the training sequence appends the answer)."""
    span, media = self._media_span(example)
    prompt = PROMPTS[self.task][self._rng(example).integers(len(PROMPTS[self.task]))]
    if self.task == "tts":
      prompt = f"{prompt}\n{example['text'].strip()}"
    ims, ime = self._ids["<|im_start|>"], self._ids["<|im_end|>"]
    user = np.concatenate(
      [
        [ims],
        self.tok.encode("user\n"),
        span,
        self.tok.encode(prompt),
        [ime],
        self._newline,
        [ims],
        self.tok.encode("assistant\n"),
      ]
    )
    return user.astype(np.int32), media

  def __call__(self, example):
    if SKIPPED_KEY in example:
      return example
    if self.task == "text":
      tokens = np.concatenate(
        [self.tok.encode(example["text"]), [self._ids["<|endoftext|>"]]]
      ).astype(np.int32)
      labelled = np.ones(len(tokens), bool)
      media: dict[str, Any] = {}
    else:
      user, media = self.prompt(example)
      ime, eos = self._ids["<|im_end|>"], self._ids["<|endoftext|>"]
      answer = np.concatenate([self.tok.encode(example["text"].strip()), [ime], [eos]])
      tokens = np.concatenate([user, answer]).astype(np.int32)
      labelled = np.concatenate([np.zeros(len(user), bool), np.ones(len(answer), bool)])
      if len(tokens) - 1 > self.seq_len:
        return _skip("too_long")
    pos, _ = self._positions.rope_index(
      tokens,
      **self._rope_kwargs,
      dtype=np.float32,
      image_grid_thw=np.array(media.get("image_grid", np.zeros((0, 3)))).reshape(-1, 3),
      video_grid_thw=np.array(media.get("video_grid", np.zeros((0, 3)))).reshape(-1, 3),
      video_second_per_grid=np.array(media.get("video_spg", [])),
      audio_seqlens=np.array(media.get("audio_frames", []), np.int64),
    )
    out = dict(
      inputs=tokens[:-1],
      targets=tokens[1:],
      loss_mask=labelled[1:].astype(np.float32),
      positions=pos[:, :-1],
      task_id=self.task_id,
    )
    for k in ("audio", "image", "video"):
      out[k] = media.get(k, [])
    if self.task in TALKER_TASKS:
      grid = lambda k: np.reshape(media[k], (-1, 3)) if media.get(k) else None
      layout = self._talker_example(
        tokens[:-1],
        example["speech_codes"],
        self._speaker_id,
        self._talker_ids,
        image_grid_thw=grid("image_grid"),
        video_grid_thw=grid("video_grid"),
        video_second_per_grid=media.get("video_spg"),
        spatial_merge_size=self._talker_cfg.spatial_merge_size,
        position_id_per_seconds=self.cfg.position_id_per_seconds,
        codebook_size=self._talker_cfg.codebook_size,
      )
      if len(layout["labels"]) > self.talker_seq_len:
        return _skip("too_long")
      out |= {f"talker_{k}": v for k, v in layout.items()}
    return out


def _text_chunks(seq: dict[str, Any], seq_len: int) -> list[dict[str, Any]]:
  """Splits a text sequence into documents of at most seq_len tokens (positions restart)."""
  n = len(seq["inputs"])
  if n <= seq_len:
    return [seq]
  out = []
  for start in range(0, n, seq_len):
    end = min(start + seq_len, n)
    chunk = {
      k: (v[start:end] if k in ("inputs", "targets", "loss_mask") else v) for k, v in seq.items()
    }
    chunk["positions"] = np.broadcast_to(
      np.arange(end - start, dtype=np.float32), (3, end - start)
    ).copy()
    out.append(chunk)
  return out


def _pack_talker(row: dict[str, Any], docs: list[dict[str, Any]], capacity: "RowCapacity") -> None:
  """The Talker parts of a row's documents, packed in the same order into the row's Talker
  arrays (segment i: the row's i-th document; Thinker indices shifted to the row)."""
  length, groups = capacity.talker_len, capacity.groups
  row |= dict(
    talker_text_ids=np.zeros(length, np.int32),
    talker_thinker_index=np.full(length, -1, np.int32),
    talker_codec_ids=np.full((length, groups), -1, np.int32),
    talker_positions=np.zeros((3, length), np.float32),
    talker_segment_ids=np.zeros(length, np.int32),
    talker_labels=np.full(length, -1, np.int32),
    talker_mtp_index=np.zeros(capacity.mtp_rows, np.int32),
    talker_mtp_codes=np.full((capacity.mtp_rows, groups), -1, np.int32),
  )
  at = talker_at = mtp_at = 0
  for i, d in enumerate(docs, start=1):
    if "talker_labels" in d:
      n = len(d["talker_labels"])
      sl = slice(talker_at, talker_at + n)
      row["talker_text_ids"][sl] = d["talker_text_ids"]
      index = d["talker_thinker_index"]
      row["talker_thinker_index"][sl] = np.where(index >= 0, index + at, -1)
      row["talker_codec_ids"][sl] = d["talker_codec_ids"]
      row["talker_positions"][:, sl] = d["talker_positions"]
      row["talker_segment_ids"][sl] = i
      row["talker_labels"][sl] = d["talker_labels"]
      frames = np.flatnonzero(d["talker_mtp_codes"][:, 0] >= 0)
      row["talker_mtp_index"][mtp_at : mtp_at + len(frames)] = frames + talker_at
      row["talker_mtp_codes"][mtp_at : mtp_at + len(frames)] = d["talker_mtp_codes"][frames]
      talker_at, mtp_at = talker_at + n, mtp_at + len(frames)
    at += len(d["inputs"])


def _pack_row(
  docs: list[dict[str, Any]], capacity: "RowCapacity", skips: np.ndarray
) -> dict[str, Any]:
  seq_len = capacity.seq_len
  row = dict(
    inputs=np.zeros(seq_len, np.int32),
    targets=np.zeros(seq_len, np.int32),
    loss_mask=np.zeros(seq_len, np.float32),
    segment_ids=np.zeros(seq_len, np.int32),
    positions=np.zeros((3, seq_len), np.float32),
    task_ids=np.full(seq_len, -1, np.int32),
    audio=[],
    image=[],
    video=[],
  )
  at = 0
  for i, d in enumerate(docs, start=1):
    n = len(d["inputs"])
    sl = slice(at, at + n)
    for k in ("inputs", "targets", "loss_mask"):
      row[k][sl] = d[k]
    row["segment_ids"][sl] = i
    row["positions"][:, sl] = d["positions"]
    row["task_ids"][sl] = d["task_id"]
    for k in ("audio", "image", "video"):
      row[k].extend(d[k])
    at += n
  if capacity.talker_len:
    _pack_talker(row, docs, capacity)
  row[_SKIPS] = skips
  return row


class RowCapacity:
  """What one packed row holds: tokens, audios, frames per audio, image and video patches,
  and with a Talker its positions and MTP frames."""

  def __init__(self, seq_len: int, buckets, talker_len: int = 0, mtp_rows: int = 0, groups=16):
    self.seq_len = seq_len
    self.audios = int(buckets.audios_per_row)
    self.frames = max(buckets.audio_frames)
    self.image_patches = max(buckets.image_patches)
    self.video_patches = max(buckets.video_patches)
    self.talker_len, self.mtp_rows, self.groups = talker_len, mtp_rows, groups

  def usage(self, doc: dict[str, Any]) -> np.ndarray:
    talker = doc.get("talker_labels")
    return np.array(
      [
        len(doc["inputs"]),
        len(doc["audio"]),
        sum(len(p) for p, _ in doc["image"]),
        sum(len(p) for p, _ in doc["video"]),
        0 if talker is None else len(talker),
        0 if talker is None else int(np.sum(doc["talker_mtp_codes"][:, 0] >= 0)),
      ]
    )

  def limits(self) -> np.ndarray:
    return np.array(
      [
        self.seq_len,
        self.audios,
        self.image_patches,
        self.video_patches,
        self.talker_len,
        self.mtp_rows,
      ]
    )

  def fits_alone(self, doc: dict[str, Any]) -> bool:
    return (
      all(m.shape[1] <= self.frames for m in doc["audio"])
      and (self.usage(doc) <= self.limits()).all()
    )


class _PackIterDataset(grain.IterDataset):
  def __init__(self, parent: grain.IterDataset, capacity: RowCapacity):
    super().__init__(parent)
    self._capacity = capacity

  def __iter__(self):
    return _PackIterator(self._parent.__iter__(), self._capacity)


class _PackIterator(grain.DatasetIterator):
  """Greedy packing of whole sequences (text: row-sized chunks) into rows; skip markers are
  counted into the rows.

  State: the parent's state before the sequence that will start the next row, and how many of
  its chunks earlier rows already hold, so a restore re-reads it and continues exactly.
  """

  def __init__(self, parent: grain.DatasetIterator, capacity: RowCapacity):
    super().__init__(parent)
    self._capacity = capacity
    self._seq_len = capacity.seq_len
    self._pending: list[dict[str, Any]] = []  # chunks of the sequence read but not yet packed
    self._pending_state = None
    self._consumed = 0  # chunks of the pending sequence already packed
    self._skips = np.zeros(len(SKIP_REASONS), np.int64)

  def _fill_pending(self) -> None:
    while not self._pending:
      state = self._parent.get_state()
      el = next(self._parent)
      if SKIPPED_KEY in el:
        self._skips[_REASON_INDEX[el[SKIPPED_KEY]]] += 1
        continue
      if not self._capacity.fits_alone(el | {"inputs": el["inputs"][: self._seq_len]}):
        self._skips[_REASON_INDEX["too_long"]] += 1  # more media than a row holds
        continue
      self._pending = _text_chunks(el, self._seq_len)[self._consumed :]
      self._pending_state = state

  def __next__(self) -> dict[str, Any]:
    docs, used = [], np.zeros(6, np.int64)
    limits = self._capacity.limits()
    while True:
      try:
        self._fill_pending()
      except StopIteration:
        if docs:
          break
        raise
      need = self._capacity.usage(self._pending[0])
      if (used + need > limits).any():
        break
      docs.append(self._pending.pop(0))
      used += need
      self._consumed += 1
      if not self._pending:
        self._pending_state, self._consumed = None, 0
    skips, self._skips = self._skips, np.zeros_like(self._skips)
    return _pack_row(docs, self._capacity, skips)

  def get_state(self) -> dict[str, Any]:
    parent = self._pending_state if self._pending_state is not None else self._parent.get_state()
    return {"parent": parent, "consumed": self._consumed, "skips": self._skips.tolist()}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._pending, self._pending_state = [], None
    self._consumed = int(state["consumed"])
    self._skips = np.asarray(state["skips"], np.int64)


def _bucket(sizes: Sequence[int], need: int) -> int:
  return min(b for b in sizes if b >= need)


def assemble_batch(
  rows: Sequence[dict[str, Any]], model_cfg, modalities: frozenset, buckets
) -> dict:
  """Rows -> the trainer's batch: stacked token arrays + per-row media buffers whose sizes are
  the smallest configured buckets that fit (so the train step compiles once per bucket)."""
  from omnijax.processing import media  # pylint: disable=import-outside-toplevel

  keys = ("inputs", "targets", "loss_mask", "segment_ids", "positions", "task_ids", _SKIPS)
  keys += tuple(k for k in rows[0] if k.startswith("talker_"))
  batch = {k: np.stack([r[k] for r in rows]) for k in keys}
  if "audio" in modalities or "video" in modalities:
    frames = max((m.shape[1] for r in rows for m in r["audio"]), default=1)
    batch |= media.audio_buffers(
      model_cfg,
      [r["audio"] for r in rows],
      frames=_bucket(buckets.audio_frames, frames),
      audios=int(buckets.audios_per_row),
    )
  for kind, wanted in (("image", "image"), ("video", "video")):
    if wanted not in modalities:
      continue
    per_row = []
    for r in rows:
      items = r[kind]
      pixels = (
        np.concatenate([p for p, _ in items])
        if items
        else np.zeros((0, media.patch_dim(model_cfg)), np.float32)
      )
      grids = np.concatenate([g for _, g in items]) if items else np.zeros((0, 3), np.int64)
      per_row.append((pixels, grids))
    need = max(len(p) for p, _ in per_row)
    batch |= media.vision_buffers(
      model_cfg, kind, per_row, bucket=_bucket(buckets[f"{kind}_patches"], need)
    )
  return batch


def open_source(spec) -> grain.sources.RandomAccessDataSource:
  """A mixture source's split: prepared shards (`path`) or a TFDS builder (`tfds`, optionally
  `tfds_data_dir`)."""
  split = spec.get("split", "train")
  if spec.get("tfds"):
    from data_pipelines import tfds_source  # pylint: disable=import-outside-toplevel

    return tfds_source.TfdsSource(spec.tfds, split, data_dir=spec.get("tfds_data_dir") or None)
  source = records.open_shards(spec.path, split)
  recorded = records.recorded_size(spec.path, split)
  if recorded is not None and recorded != len(source):
    # Hosts that see different shards would read and weigh different mixtures.
    raise ValueError(
      f"{spec.path} ({split}) holds {len(source)} records but its manifest.json lists "
      f"{recorded}: the shards are stale or partly copied; re-run data_pipelines.prepare or "
      "finish copying them."
    )
  return source


def _source_dataset(
  name: str,
  spec,
  task_id: int,
  *,
  tokenizer,
  model_cfg,
  seq_len: int,
  seed: int,
  shuffle: bool,
  process_index: int,
  process_count: int,
  num_epochs: int | None = None,
  talker_cfg=None,
  talker_seq_len: int = 0,
) -> tuple[grain.MapDataset, grain.MapDataset]:
  """(the sequences of the whole source, those this host reads: its examples, shuffled and
  repeated). ``max_examples`` keeps the source's first examples, before hosts split them."""
  task = spec.task
  op_specs = list(spec.get("ops", None) or TASK_OPS[task])
  if task in TALKER_TASKS and not spec.get("ops", None):
    if not spec.get("codec"):
      raise ValueError(
        f"data.mixture.{name} (task {task}) needs `codec`: a speech tokenizer run "
        "(experiments/codec.py) or a transformers Mimi directory, whose codes the Talker learns."
      )
    op_specs.insert(1, f"speech_codes(codec={str(spec.codec)!r})")
  ops = build_ops(op_specs, OpContext(tokenizer=tokenizer))
  source = grain.MapDataset.source(open_source(spec))
  if spec.get("max_examples"):
    source = source[: spec.max_examples]
  to_sequence = ToSequence(
    task,
    task_id,
    tokenizer,
    model_cfg,
    seq_len,
    seed,
    talker_cfg,
    talker_seq_len,
    spec.get("speaker", "ethan"),
  )
  host = source[process_index::process_count]
  if shuffle:
    host = host.seed(seed + zlib.crc32(name.encode())).shuffle()
  sequences = lambda ds: ds.map(ApplyOps(ops)).map(to_sequence)
  return sequences(source), sequences(host.repeat(num_epochs))


def estimate_tokens_per_example(sequences: grain.MapDataset, name: str, samples: int) -> float:
  """Mean sequence length of `samples` good examples of a whole source (all of them when it has
  no more). The examples are drawn with a seed of the source's name alone, so every process
  measures the same ones and computes the same sampling weights, whatever its index."""
  n = len(sequences)
  candidates = range(n)
  if samples < n:
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    candidates = rng.choice(n, size=min(samples * 4, n), replace=False)
  lengths = []
  for i in candidates:
    el = sequences[int(i)]
    if SKIPPED_KEY not in el:
      lengths.append(len(el["inputs"]))
    if len(lengths) == samples:
      break
  if not lengths:
    raise ValueError("no decodable example among the sampled ones of the source")
  mean, error = np.mean(lengths), np.std(lengths) / np.sqrt(len(lengths))
  if len(lengths) < n and error > 0.05 * mean:
    logging.warning(
      "data.mixture.%s: %.1f +- %.1f tokens per example (%d examples); raise its "
      "estimate_samples for sampling weights within 5%%.",
      name,
      mean,
      error,
      len(lengths),
    )
  return float(mean)


def mixture_weights(
  weights: Mapping[str, float],
  tokens_per_example: Mapping[str, float],
  examples: Mapping[str, int],
  by: str = "tokens",
) -> dict[str, float]:
  """Per-example sampling weights: by="tokens" gives the configured token ratios; by="epochs"
  reads each source `weight` times per pass over the mixture (every example of a weight-1
  source as often as every other's)."""
  if by == "tokens":
    w = {k: float(weights[k]) / tokens_per_example[k] for k in weights}
  elif by == "epochs":
    w = {k: float(weights[k]) * examples[k] for k in weights}
  else:
    raise ValueError(f"data.mixture_by={by!r} is not one of ['tokens', 'epochs'].")
  total = sum(w.values())
  return {k: v / total for k, v in w.items()}


def make_omni_dataset(
  cfg,
  *,
  tokenizer,
  model_cfg,
  seq_len: int,
  batch_size: int,
  process_index: int,
  process_count: int,
  seed: int,
  talker_cfg=None,
) -> grain.IterDataset:
  """Packed mixed-modality batches for this host (see the module doc).

  With `talker_cfg` (a TalkerConfig) every row also holds the Talker layouts of its spoken
  documents (TALKER_TASKS) in `talker_seq_len` positions and `talker_mtp_rows` MTP frames.

  `cfg` is config.data: `mixture` {name: {path | tfds [+ tfds_data_dir], task, weight[, ops,
  split, max_examples, estimate_samples]}}, `mixture_by` ("tokens": weights are token ratios; "epochs": passes
  over each source),
  `shuffle`, `num_epochs` (None: forever; the mixture ends when a source does),
  `worker_count`, `estimate_samples` (examples per source, drawn from the whole source by a seed
  of its name, whose mean length turns token ratios into sampling weights: every host computes the
  same weights), `buckets` (audio_frames, audios_per_row, image_patches,
  video_patches: the media buffer sizes a batch may take; the largest are a row's capacity).
  """
  names = sorted(cfg.mixture)
  if not names:
    raise ValueError("data.mixture is empty: name at least one source.")
  for name in names:
    if cfg.mixture[name].task not in TASK_OPS:
      raise ValueError(
        f"data.mixture.{name}.task={cfg.mixture[name].task!r} is not one of {sorted(TASK_OPS)}."
      )
  sources, per_example, examples = {}, {}, {}
  for task_id, name in enumerate(names):
    spec = cfg.mixture[name]
    whole, ds = _source_dataset(
      name,
      spec,
      task_id,
      tokenizer=tokenizer,
      model_cfg=model_cfg,
      seq_len=seq_len,
      seed=seed,
      shuffle=cfg.shuffle,
      process_index=process_index,
      process_count=process_count,
      num_epochs=cfg.get("num_epochs"),
      talker_cfg=talker_cfg,
      talker_seq_len=cfg.get("talker_seq_len", 0),
    )
    examples[name] = len(whole)
    try:
      per_example[name] = estimate_tokens_per_example(
        whole, name, spec.get("estimate_samples") or cfg.estimate_samples
      )
    except ValueError as e:
      raise ValueError(
        f"data.mixture.{name} ({spec.get('path') or spec.get('tfds')}, task {spec.task}): {e}"
      ) from e
    sources[name] = ds.to_iter_dataset()
  weights = mixture_weights(
    {n: cfg.mixture[n].weight for n in names},
    per_example,
    examples,
    cfg.get("mixture_by", "tokens"),
  )
  logging.info("mixture: tokens/example %s -> sampling weights %s", per_example, weights)
  modalities = frozenset(TASK_MODALITY[cfg.mixture[n].task] for n in names)
  it = grain.IterDataset.mix(sources, weights)
  capacity = RowCapacity(seq_len, cfg.buckets)
  if talker_cfg is not None:
    capacity = RowCapacity(
      seq_len,
      cfg.buckets,
      talker_len=cfg.talker_seq_len,
      mtp_rows=cfg.talker_mtp_rows,
      groups=talker_cfg.num_code_groups,
    )
  it = _PackIterDataset(it, capacity)
  it = it.batch(
    batch_size,
    drop_remainder=cfg.get("num_epochs") is None,
    batch_fn=lambda rows: assemble_batch(rows, model_cfg, modalities, cfg.buckets),
  )
  if cfg.worker_count > 0:
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count))
  it = CountSkippedIterDataset(it)
  # What a pass over the mixture holds, all hosts (by="epochs": each source `weight` times): the
  # same numbers on every host.
  it.sources = {
    n: dict(examples=examples[n], tokens_per_example=per_example[n], sampling_weight=weights[n])
    for n in names
  }
  return it


def task_names(cfg) -> list[str]:
  """Mixture source names in task-id order (task_ids index this list)."""
  return sorted(cfg.mixture)


def batch_spec(cfg, model_cfg, rows: int, seq_len: int, talker_cfg=None) -> dict[str, tuple]:
  """{key: (shape, dtype)} of the largest batch of `rows` rows `make_omni_dataset` makes: every
  media buffer of the mixture's modalities at its largest bucket. Nothing is read or stored
  (what an ahead-of-time compile traces)."""
  from omnijax.processing import media  # pylint: disable=import-outside-toplevel

  modalities = frozenset(TASK_MODALITY[s.task] for s in cfg.mixture.values())
  b = cfg.buckets
  capacity = RowCapacity(seq_len, b)
  if talker_cfg is not None:
    capacity = RowCapacity(
      seq_len, b, cfg.talker_seq_len, cfg.talker_mtp_rows, talker_cfg.num_code_groups
    )
  row = _pack_row([], capacity, np.zeros(len(SKIP_REASONS), np.int64))
  row = {k: v for k, v in row.items() if isinstance(v, np.ndarray) and k != _SKIPS}
  one = {k: v[None] for k, v in row.items()}
  if "audio" in modalities or "video" in modalities:
    one |= media.audio_buffers(
      model_cfg, [[]], frames=max(b.audio_frames), audios=int(b.audios_per_row)
    )
  empty = (np.zeros((0, media.patch_dim(model_cfg)), np.float32), np.zeros((0, 3), np.int64))
  for kind in ("image", "video"):
    if kind in modalities:
      one |= media.vision_buffers(model_cfg, kind, [empty], bucket=max(b[f"{kind}_patches"]))
  return {k: ((rows,) + v.shape[1:], v.dtype) for k, v in one.items()}
