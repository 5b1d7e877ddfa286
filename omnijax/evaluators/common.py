"""The evaluator registry and what evaluators share: options, held-out batches on the mesh."""

from __future__ import annotations

import difflib
from typing import Any, Iterator

import jax
import numpy as np

from data_pipelines import inputs as inputs_lib
from omnijax.errors import ConfigError
from omnijax.train import step as step_lib

KINDS: dict[str, type] = {}


def register(kind: str):
  def add(cls):
    KINDS[kind] = cls
    cls.kind = kind
    return cls

  return add


class Evaluator:
  """Base: options with defaults (`OPTIONS`), checked when the config is read.

  `setup` is called once the model, mesh and tokenizer exist; `run(params)` returns scalars.
  """

  kind = ""
  OPTIONS: dict[str, Any] = {}

  def __init__(self, name: str, config, model_cfg, options: dict[str, Any]):
    unknown = sorted(set(options) - set(self.OPTIONS))
    if unknown:
      raise ConfigError(
        f"config.eval.evaluators.{name} ({self.kind}) has no option(s) "
        f"{unknown}; its options: {sorted(self.OPTIONS)}."
      )
    self.name, self.config, self.model_cfg = name, config, model_cfg
    self.options = {**self.OPTIONS, **options}
    self.batch_size = config.eval.batch_size or config.train.global_batch_size

  def setup(self, model, mesh, rules, param_sharding, tokenizer) -> None:
    """Called before training compiles anything: a missing held-out split fails here."""
    self.model, self.mesh, self.rules, self.tokenizer = model, mesh, rules, tokenizer
    for source in self.sources():
      inputs_lib.check_eval_source(
        self.config, source, self.options.get("split") or self.config.eval.split
      )

  def run(self, params) -> dict[str, float]:
    raise NotImplementedError

  def sources(self) -> list[str | None]:
    """The mixture sources this evaluator reads (None: data.path of a text run)."""
    if self.config.data.kind == "text":
      return [None]
    mixture = inputs_lib.eval_sources(self.config)
    wanted = self.options.get("sources") or sorted(mixture)
    unknown = [s for s in wanted if s not in mixture]
    if unknown:
      raise ConfigError(
        f"config.eval.evaluators.{self.name}: unknown source(s) {unknown}; "
        f"the evaluation sources are {sorted(mixture)}."
      )
    return list(wanted)

  def device_batch(self, host_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """A host batch (padded to the eval batch) placed on the mesh like a train batch."""
    host_batch = pad_rows(host_batch, self.batch_size // jax.process_count())
    shardings = step_lib.batch_shardings(host_batch, self.mesh, self.rules)
    return {
      k: jax.make_array_from_process_local_data(shardings[k], v) for k, v in host_batch.items()
    }


def pad_rows(batch: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
  """Fills a partial last batch up to `rows` with copies of its first row that carry no loss
  (their media stay consistent with their tokens; nothing of them is counted)."""
  have = len(batch["inputs"])
  if have == rows:
    return batch
  out = {k: np.concatenate([v, np.repeat(v[:1], rows - have, axis=0)]) for k, v in batch.items()}
  out["loss_mask"][have:] = 0
  if "task_ids" in out:
    out["task_ids"][have:] = -1
  return out


def limited(it: Iterator, n: int) -> Iterator:
  for i, x in enumerate(it):
    if i == n:
      return
    yield x


def from_config(config, model_cfg) -> list[Evaluator]:
  """The configured evaluators; a config mistake raises ConfigError before anything compiles."""
  out = []
  batch = config.eval.batch_size or config.train.global_batch_size
  if batch % jax.process_count():
    raise ConfigError(
      f"eval.batch_size ({batch}) must be a multiple of the {jax.process_count()} processes."
    )
  for name, spec in config.eval.evaluators.items():
    spec = dict(spec)
    kind = spec.pop("kind", None)
    if kind not in KINDS:
      close = difflib.get_close_matches(str(kind), KINDS, n=1)
      raise ConfigError(
        f"config.eval.evaluators.{name}.kind={kind!r} is not an evaluator"
        + (f" (did you mean {close[0]!r}?)" if close else "")
        + f"; kinds: {sorted(KINDS)}."
      )
    ev = KINDS[kind](name, config, model_cfg, spec)
    ev.sources()  # unknown sources fail here
    out.append(ev)
  return out
