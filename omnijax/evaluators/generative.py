"""Evaluators that decode: ASR word error rate and scene-description accuracy.

Both take the first `max_examples` examples of a source's held-out split, build the same chat
prompt as training (``data_pipelines.omni.ToSequence.prompt``), decode greedily with the KV
cache (``omnijax.decode``) in left-padded batches, and score the text up to the first EOS.
"""

from __future__ import annotations

import re
from typing import Any

import grain
import jiwer
import numpy as np

from data_pipelines import local_media_corpus
from data_pipelines.example_dataset import SKIPPED_KEY, ApplyOps
from data_pipelines.omni import TASK_OPS, ToSequence, open_source
from data_pipelines.ops import OpContext, build_ops
from data_pipelines import inputs as inputs_lib
from omnijax import decode
from omnijax import sharding as shd
from omnijax.errors import ConfigError
from omnijax.evaluators.common import Evaluator, register
from omnijax.processing import media as media_lib
from omnijax.processing import positions as positions_lib


PROMPT_BUCKET = 64


def prompt_batch(cfg, prompts: list[tuple[np.ndarray, dict[str, Any]]]):
  """Prompts [(tokens, media)] -> left-padded ids (B, S), attention mask, TM-RoPE positions
  (3, B, S) and per-row media buffers."""
  # Lengths in buckets of PROMPT_BUCKET, so a stream of prompts compiles few prefills (the
  # extra left padding is masked, and positions follow the attention mask).
  s = -(-max(len(t) for t, _ in prompts) // PROMPT_BUCKET) * PROMPT_BUCKET
  ids = np.zeros((len(prompts), s), np.int32)
  mask = np.zeros((len(prompts), s), np.int32)
  for b, (tokens, _) in enumerate(prompts):
    ids[b, s - len(tokens) :], mask[b, s - len(tokens) :] = tokens, 1
  grids = lambda key: np.array([g for _, m in prompts for g in m.get(key, [])]).reshape(-1, 3)
  pos, _ = positions_lib.rope_index(
    ids,
    **positions_lib.rope_kwargs_from_config(cfg),
    dtype=np.float32,
    attention_mask=mask,
    image_grid_thw=grids("image_grid"),
    video_grid_thw=grids("video_grid"),
    video_second_per_grid=np.array([x for _, m in prompts for x in m.get("video_spg", [])]),
    audio_seqlens=np.array([x for _, m in prompts for x in m.get("audio_frames", [])], np.int64),
  )
  media = {}
  if any(m.get("audio") for _, m in prompts):
    media |= media_lib.audio_buffers(cfg, [m.get("audio", []) for _, m in prompts])
  for kind in ("image", "video"):
    if any(m.get(kind) for _, m in prompts):
      rows = []
      for _, m in prompts:
        items = m.get(kind, [])
        rows.append(
          (
            np.concatenate([p for p, _ in items])
            if items
            else np.zeros((0, media_lib.patch_dim(cfg)), np.float32),
            np.concatenate([g for _, g in items]) if items else np.zeros((0, 3)),
          )
        )
      media |= media_lib.vision_buffers(cfg, kind, rows)
  return ids, mask, pos, media


class _Decoding(Evaluator):
  """Greedy transcripts / descriptions of a source's held-out examples."""

  OPTIONS = dict(source="", max_examples=32, max_new_tokens=48, decode_batch=8, split="")
  TASKS: tuple[str, ...] = ()

  def sources(self) -> list[str]:
    mixture = inputs_lib.eval_sources(self.config)
    source = self.options["source"]
    if source not in mixture:
      raise ConfigError(
        f"config.eval.evaluators.{self.name}.source={source!r} is not an "
        f"evaluation source; sources: {sorted(mixture)}."
      )
    if mixture[source].task not in self.TASKS:
      raise ConfigError(
        f"config.eval.evaluators.{self.name}: source {source!r} has task "
        f"{mixture[source].task!r}; {self.kind} needs one of {self.TASKS}."
      )
    return [source]

  def _examples(self) -> list[tuple[np.ndarray, dict, dict]]:
    """(prompt tokens, media, example) of the first max_examples decodable examples."""
    spec = inputs_lib.eval_data_config(
      self.config, self.options["source"], self.options["split"] or self.config.eval.split
    ).mixture[self.options["source"]]
    ops = build_ops(
      list(spec.get("ops", None) or TASK_OPS[spec.task]), OpContext(tokenizer=self.tokenizer)
    )
    to_seq = ToSequence(
      spec.task, 0, self.tokenizer, self.model_cfg, self.config.data.seq_len, self.config.seed
    )
    ds = grain.MapDataset.source(open_source(spec)).map(ApplyOps(ops))
    out = []
    for i in range(len(ds)):
      example = ds[i]
      if SKIPPED_KEY in example:
        continue
      tokens, media = to_seq.prompt(example)
      out.append((tokens, media, example))
      if len(out) == self.options["max_examples"]:
        break
    if not out:
      raise ValueError(
        f"evaluator {self.name}: no decodable held-out example in {self.options['source']}."
      )
    return out

  def setup(self, model, mesh, rules, param_sharding, tokenizer) -> None:
    super().setup(model, mesh, rules, param_sharding, tokenizer)
    if tokenizer is None:
      raise ConfigError(
        f"evaluator {self.name} ({self.kind}) decodes text: the run needs a "
        "tokenizer (data.kind text or omni)."
      )
    self._prompts = None
    self._shards = shd.num_batch_shards(mesh, rules)
    self._eos = decode.default_eos_ids(self.model_cfg, tokenizer)

  def outputs(self, params) -> list[tuple[str, dict]]:
    """(decoded text, example) per held-out example."""
    if self._prompts is None:
      self._prompts = self._examples()
    out, n = [], self.options["decode_batch"]
    for start in range(0, len(self._prompts), n):
      chunk = self._prompts[start : start + n]
      # The batch splits over the mesh's batch devices: fill it with copies of a prompt.
      rows = -(-len(chunk) // self._shards) * self._shards
      prompts = [(t, m) for t, m, _ in chunk] + [chunk[0][:2]] * (rows - len(chunk))
      ids, mask, pos, media = prompt_batch(self.model_cfg, prompts)
      new = decode.decode(
        self.model_cfg,
        params,
        ids,
        pos,
        mask,
        media,
        self.options["max_new_tokens"],
        eos_ids=self._eos,
      )[:, ids.shape[1] :]
      for row, (_, _, example) in zip(new, chunk):
        ends = [i for i, t in enumerate(row) if t in self._eos]
        out.append((self.tokenizer.decode(row[: ends[0]] if ends else row), example))
    return out


def _words(text: str) -> str:
  return " ".join(re.sub(r"[^\w\s']", " ", text.lower()).split())


@register("asr_wer")
class AsrWer(_Decoding):
  """Word error rate (jiwer) of greedy transcripts against the references, lowercased and
  without punctuation: `wer`, and `exact` (fraction of transcripts without an error)."""

  TASKS = ("asr",)

  def run(self, params) -> dict[str, float]:
    pairs = [(_words(text), _words(example["text"])) for text, example in self.outputs(params)]
    hyps, refs = [h for h, _ in pairs], [r for _, r in pairs]
    return dict(
      wer=float(jiwer.wer(refs, hyps)),
      exact=float(np.mean([h == r for h, r in pairs])),
      examples=float(len(pairs)),
    )


@register("scene_description")
class SceneDescription(_Decoding):
  """Exact answers about held-out scenes of the local corpus, read from the model's greedy
  description of their image or video (the training prompt): per scene, are the objects'
  colours, shapes and counts, and a moving object's direction, those of the scene?
  `colours`, `shapes`, `counts` (the sets / multiset equal the scene's), `objects` (every
  (count, colour, shape) group right), `direction` (motion scenes), `exact` (whole text)."""

  TASKS = ("caption", "video")

  def run(self, params) -> dict[str, float]:
    scores = {k: [] for k in ("colours", "shapes", "counts", "objects", "direction", "exact")}
    for text, example in self.outputs(params):
      got = local_media_corpus.parse_scene(text)
      want = local_media_corpus.parse_scene(example["text"])
      g, w = got["groups"], want["groups"]
      scores["colours"].append({c for _, c, _ in g} == {c for _, c, _ in w})
      scores["shapes"].append({s for _, _, s in g} == {s for _, _, s in w})
      scores["counts"].append(sorted(n for n, _, _ in g) == sorted(n for n, _, _ in w))
      scores["objects"].append(g == w)
      if want["direction"]:
        scores["direction"].append(got["direction"] == want["direction"])
      scores["exact"].append(_words(text) == _words(example["text"]))
    out = {k: float(np.mean(v)) for k, v in scores.items() if v}
    out["examples"] = float(len(scores["exact"]))
    return out
