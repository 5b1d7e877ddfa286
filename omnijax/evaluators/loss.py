"""Held-out loss per mixture source and per modality; perplexity of the text sources."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from data_pipelines import inputs as inputs_lib
from data_pipelines.omni import TASK_MODALITY
from omnijax import sharding as shd
from omnijax.errors import ConfigError
from omnijax.evaluators.common import Evaluator, limited, register
from omnijax.train import step as step_lib


@register("heldout_loss")
class HeldoutLoss(Evaluator):
  """Token-weighted cross-entropy on the first `batches` batches of each source's held-out
  split (the same examples every time): `loss/SOURCE`, `loss/modality/M` (the sources of a
  modality pooled by tokens), `perplexity/SOURCE` for text sources, `tokens/SOURCE`."""

  OPTIONS = dict(sources=(), batches=0, split="")

  def setup(self, model, mesh, rules, param_sharding, tokenizer) -> None:
    super().setup(model, mesh, rules, param_sharding, tokenizer)
    shards = shd.num_batch_shards(mesh, rules)
    if self.batch_size % shards:
      raise ConfigError(
        f"eval.batch_size ({self.batch_size}) must be a multiple of the {shards} "
        "devices the batch is split over."
      )

    def sums(params, batch):
      _, metrics = step_lib.loss_terms(model, params, batch, 1.0, 1, 0.0)
      return metrics["ce_sum"], jnp.sum(batch["loss_mask"])

    self._sums = jax.jit(sums, in_shardings=(param_sharding, None))

  def run(self, params) -> dict[str, float]:
    out, by_modality = {}, {}
    for source in self.sources():
      it = inputs_lib.make_eval_iterator(
        self.config,
        self.model_cfg,
        self.tokenizer,
        source=source,
        split=self.options["split"] or self.config.eval.split,
        batch_size=self.batch_size // jax.process_count(),
      )
      nll, tokens = 0.0, 0.0
      for host_batch in limited(it, self.options["batches"] or self.config.eval.batches):
        host_batch.pop("task_ids", None)
        s, n = jax.device_get(self._sums(params, self.device_batch(host_batch)))
        nll, tokens = nll + float(s), tokens + float(n)
      name = source or "text"
      task = "text" if source is None else inputs_lib.eval_sources(self.config)[source].task
      if not tokens:
        raise ValueError(
          f"evaluator {self.name}: the held-out split of {name} gave no labelled "
          "tokens; check config.eval.split and the source's shards."
        )
      out[f"loss/{name}"] = nll / tokens
      out[f"tokens/{name}"] = tokens
      if task == "text":
        out[f"perplexity/{name}"] = math.exp(min(nll / tokens, 50.0))
      m = by_modality.setdefault(TASK_MODALITY[task], [0.0, 0.0])
      m[0], m[1] = m[0] + nll, m[1] + tokens
    out.update({f"loss/modality/{m}": s / n for m, (s, n) in by_modality.items()})
    return out
