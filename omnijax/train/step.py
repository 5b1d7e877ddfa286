"""Train state, loss and the jitted, sharded train step (with gradient accumulation)."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from omnijax import sharding as shd
from omnijax.errors import ConfigError
from omnijax.processing import batch as batch_lib
from omnijax.processing import media as media_lib
from omnijax.models.config import ThinkerConfig
from omnijax.models.decoder import load_balancing_loss
from omnijax.models.omni import TALKER_KEYS, Omni
from omnijax.models.thinker import MODALITIES, Thinker


@dataclasses.dataclass(frozen=True)
class TalkerLoss:
  """Weights of a Thinker + Talker step's loss: thinker x the Thinker's text cross-entropy +
  the Talker's codebook-0 cross-entropy + mtp x the mean cross-entropy of the MTP heads (+ each
  decoder's router_aux_loss_coef x its load-balancing loss)."""

  thinker: float = 1.0
  mtp: float = 0.3


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def forward(model: Thinker | Omni, params, batch):
  """The Thinker's (logits, stats); an Omni model's adds the Talker's outputs (`Omni`)."""
  talker = {"talker_batch": {k: batch[k] for k in TALKER_KEYS}} if isinstance(model, Omni) else {}
  return model.apply(
    {"params": params},
    batch["inputs"],
    positions=jnp.swapaxes(batch["positions"], 0, 1),
    segment_ids=batch["segment_ids"],
    media=batch_lib.media_of(batch),
    **talker,
  )


def _token_ce(logits, targets):
  """(cross-entropy, log-partition) of each position; targets -1 (masked out) read code 0."""
  logz = jax.nn.logsumexp(logits, axis=-1)
  target = jnp.take_along_axis(logits, jnp.maximum(targets, 0)[..., None], axis=-1)[..., 0]
  return logz - target, logz


def _ce(logits, targets, mask):
  """Summed cross-entropy of the masked positions."""
  return jnp.sum(_token_ce(logits, targets)[0] * mask)


def talker_counts(batch) -> tuple[jax.Array, jax.Array]:
  """(codebook-0 targets, MTP targets) of a batch: the denominators of the Talker losses."""
  frames = jnp.sum(batch["talker_mtp_codes"][..., 0] >= 0)
  return jnp.sum(batch["talker_labels"] >= 0), frames * (batch["talker_mtp_codes"].shape[-1] - 1)


def loss_terms(
  model: Thinker | Omni,
  params,
  batch,
  num_loss_tokens,
  num_micro: int,
  z_loss: float,
  num_tasks: int = 0,
  talker_loss: TalkerLoss | None = None,
  talker_totals=None,
):
  """Loss of one microbatch, scaled so that summing over microbatches gives the batch loss.

  Cross-entropy is a mean over the whole batch's labelled tokens (`num_loss_tokens`); the
  load-balancing loss is pooled per microbatch and averaged over microbatches. With
  `num_tasks` (and `task_ids` in the batch) the metrics split the cross-entropy and token
  counts by task (mixture source); token counts by modality come from the placeholders.
  An Omni model adds the Talker's terms weighted by `talker_loss`, each a mean over the whole
  batch's targets (`talker_totals`: `talker_counts` of the batch).
  """
  cfg: ThinkerConfig = model.cfg
  outputs = forward(model, params, batch)
  logits, stats = outputs[:2]
  mask = batch["loss_mask"]
  nll, logz = _token_ce(logits, batch["targets"])
  nll = nll * mask
  ce_sum = jnp.sum(nll)
  z_sum = jnp.sum(jnp.square(logz) * mask)
  aux = load_balancing_loss(stats, cfg.text.num_experts)
  loss = (
    ce_sum + z_loss * z_sum
  ) / num_loss_tokens + cfg.text.router_aux_loss_coef * aux / num_micro
  talker_metrics = {}
  if isinstance(model, Omni):
    t_cfg = model.talker_cfg.text
    talker_logits, mtp_logits, talker_stats = outputs[2:]
    labels, mtp_codes = batch["talker_labels"], batch["talker_mtp_codes"]
    talker_ce = _ce(talker_logits, labels, labels >= 0)
    mtp_mask = jnp.broadcast_to(mtp_codes[..., :1] >= 0, mtp_codes[..., 1:].shape)
    mtp_ce = _ce(mtp_logits, mtp_codes[..., 1:], mtp_mask)
    talker_aux = load_balancing_loss(talker_stats, t_cfg.num_experts)
    n_talker, n_mtp = (jnp.maximum(n, 1.0) for n in talker_totals)
    loss = (
      talker_loss.thinker * loss
      + talker_ce / n_talker
      + talker_loss.mtp * mtp_ce / n_mtp
      + t_cfg.router_aux_loss_coef * talker_aux / num_micro
    )
    talker_metrics = dict(
      talker_ce_sum=talker_ce, mtp_ce_sum=mtp_ce, talker_aux_loss=talker_aux / num_micro
    )
  valid = (batch["segment_ids"] != 0).astype(jnp.float32)
  modality = jax.nn.one_hot(model.modality(batch["inputs"]), len(MODALITIES))
  metrics = dict(
    ce_sum=ce_sum,
    aux_loss=aux / num_micro,
    expert_counts=stats.get("counts", jnp.zeros((0, 0))),
    moe_dropped=jnp.sum(stats.get("dropped", jnp.zeros((0,)))),
    modality_tokens=jnp.einsum("bs,bsm->m", valid, modality),
    **talker_metrics,
  )
  if num_tasks:
    task = jax.nn.one_hot(batch["task_ids"], num_tasks)  # -1 (padding) -> zeros
    metrics.update(
      task_ce_sum=jnp.einsum("bs,bst->t", nll, task),
      task_loss_tokens=jnp.einsum("bs,bst->t", mask, task),
      task_tokens=jnp.einsum("bs,bst->t", valid, task),
    )
  return loss, metrics


def make_train_step(
  model: Thinker,
  tx: optax.GradientTransformation,
  schedule: Callable,
  grad_accum_steps: int,
  z_loss: float,
  num_tasks: int = 0,
  trained=None,
  talker_loss: TalkerLoss | None = None,
):
  """state, batch -> state, metrics. The batch is split into `grad_accum_steps` microbatches.

  `trained` (a pytree of bools like the params, None: all) names the params that train; the
  gradient norm is theirs alone, so XLA drops the frozen params' weight gradients. Metrics are
  sums over the step's tokens or per-step values; `omnijax.train.metrics.Interval` averages
  them over a logging interval."""

  def train_step(state: TrainState, batch):
    num_loss_tokens = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)
    talker_totals = talker_counts(batch) if isinstance(model, Omni) else None
    grad_fn = jax.grad(loss_terms, argnums=1, has_aux=True)
    micro_grads = lambda mb: grad_fn(
      model,
      state.params,
      mb,
      num_loss_tokens,
      grad_accum_steps,
      z_loss,
      num_tasks,
      talker_loss,
      talker_totals,
    )
    if grad_accum_steps == 1:
      grads, totals = micro_grads(batch)
    else:
      micro = jax.tree.map(
        lambda x: x.reshape((grad_accum_steps, x.shape[0] // grad_accum_steps) + x.shape[1:]), batch
      )
      # The first microbatch initialises the sums (no zero-filled copy of the params).
      first = micro_grads(jax.tree.map(lambda x: x[0], micro))
      (grads, totals), _ = jax.lax.scan(
        lambda acc, mb: (jax.tree.map(jnp.add, acc, micro_grads(mb)), None),
        first,
        jax.tree.map(lambda x: x[1:], micro),
      )

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    counts = totals["expert_counts"]
    trained_grads = (
      grads if trained is None else jax.tree.map(lambda g, t: g if t else None, grads, trained)
    )
    metrics = dict(
      ce_sum=totals["ce_sum"],
      loss_tokens=jnp.sum(batch["loss_mask"]),
      aux_loss=totals["aux_loss"],
      grad_norm=optax.tree.norm(trained_grads),
      param_norm=optax.tree.norm(params),
      learning_rate=schedule(state.step),
      # apply_if_finite's counters: this step was skipped, and the current run of such steps
      nonfinite=1 - opt_state.last_finite.astype(jnp.int32),
      consecutive_nonfinite=opt_state.notfinite_count,
      moe_dropped=totals["moe_dropped"],
      modality_tokens=totals["modality_tokens"],
      expert_load_max_over_mean=(
        jnp.mean(jnp.max(counts, -1) / jnp.maximum(jnp.mean(counts, -1), 1e-9))
        if counts.size
        else jnp.zeros(())
      ),
    )
    if talker_totals is not None:
      metrics.update(
        talker_ce_sum=totals["talker_ce_sum"],
        talker_tokens=talker_totals[0],
        mtp_ce_sum=totals["mtp_ce_sum"],
        mtp_tokens=talker_totals[1],
        talker_aux_loss=totals["talker_aux_loss"],
      )
    if num_tasks:
      metrics.update(
        task_ce_sum=totals["task_ce_sum"],
        task_loss_tokens=totals["task_loss_tokens"],
        task_tokens=totals["task_tokens"],
      )
    # A skipped step's sums would make the interval's averages NaN: its tokens count as unseen.
    for k in (
      "ce_sum",
      "loss_tokens",
      "aux_loss",
      "task_ce_sum",
      "task_loss_tokens",
      "talker_ce_sum",
      "talker_tokens",
      "mtp_ce_sum",
      "mtp_tokens",
      "talker_aux_loss",
    ):
      if k in metrics:
        metrics[k] = jnp.where(opt_state.last_finite, metrics[k], 0)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def empty_talker_batch(talker_cfg, rows: int, length: int) -> dict:
  """A Talker batch of padding (the shapes `Omni` is initialised and traced with)."""
  groups = talker_cfg.num_code_groups
  return dict(
    talker_text_ids=jnp.zeros((rows, length), jnp.int32),
    talker_thinker_index=-jnp.ones((rows, length), jnp.int32),
    talker_codec_ids=-jnp.ones((rows, length, groups), jnp.int32),
    talker_positions=jnp.zeros((rows, 3, length), jnp.float32),
    talker_segment_ids=jnp.zeros((rows, length), jnp.int32),
    talker_labels=-jnp.ones((rows, length), jnp.int32),
    talker_mtp_index=jnp.zeros((rows, 1), jnp.int32),
    talker_mtp_codes=-jnp.ones((rows, 1, groups), jnp.int32),
  )


def init_params(model: Thinker | Omni, rng, rows: int, seq_len: int):
  ids = jnp.zeros((rows, seq_len), jnp.int32)
  media = media_lib.empty_media(model.cfg, rows)
  if isinstance(model, Omni):
    talker = empty_talker_batch(model.talker_cfg, rows, seq_len)
    return model.init(rng, ids, media=media, talker_batch=talker)["params"]
  return model.init(rng, ids, media=media)["params"]


def abstract_params(model: Thinker, seq_len: int = 8):
  """The unboxed params' shapes and dtypes (nothing is materialised)."""
  return jax.eval_shape(
    lambda rng: nn.meta.unbox(init_params(model, rng, 1, seq_len)),
    jax.ShapeDtypeStruct((2,), jnp.uint32),
  )


def state_shardings(model: Thinker, tx, mesh: Mesh, rules, seq_len: int):
  """(init function, abstract unboxed state, state shardings): nothing is materialised."""

  def init(rng):
    params = init_params(model, rng, shd.num_batch_shards(mesh, rules), seq_len)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  unboxed_init = lambda rng: nn.meta.unbox(init(rng))
  key = jax.ShapeDtypeStruct((2,), jnp.uint32)  # abstract: a device-less mesh (omnijax.aot) too
  specs = nn.get_partition_spec(jax.eval_shape(init, key))
  shardings = shd.logical_to_sharding(specs, mesh, rules)
  abstract = jax.eval_shape(unboxed_init, key)
  return unboxed_init, abstract, shardings


def batch_shardings(batch, mesh: Mesh, rules):
  """Every batch array is split over the logical `batch` axis along its leading dimension."""
  return {
    k: shd.batch_sharding(mesh, rules, ndim=v.ndim) if v.ndim else shd.replicated(mesh)
    for k, v in batch.items()
  }


def compile_train_step(
  model,
  tx,
  schedule,
  mesh: Mesh,
  rules,
  state_sharding,
  *,
  grad_accum_steps: int,
  z_loss: float,
  num_tasks: int = 0,
  trained=None,
  talker_loss: TalkerLoss | None = None,
  cpu_schedule: str = "concurrency",
):
  """The jitted step; the batch keeps the shardings it was placed with (`batch_shardings`);
  `cpu_schedule`: see `CPU_SCHEDULES`."""
  step = make_train_step(
    model, tx, schedule, grad_accum_steps, z_loss, num_tasks, trained, talker_loss
  )
  return jax.jit(
    step,
    in_shardings=(state_sharding, None),
    out_shardings=(state_sharding, NamedSharding(mesh, P())),
    donate_argnums=(0,),
    compiler_options=compiler_options(mesh, cpu_schedule),
  )


# XLA:CPU's schedules (`train.cpu_schedule`). `concurrency` (XLA's default) runs independent ops
# side by side and keeps more temporaries live for it; `memory` keeps fewer: the `small`
# benchmark step's 4.89 -> 4.03 GB (peak resident set 9.0 -> 8.2 GB, page faults a step 1.21M ->
# 1.01M). Its speed depends on the host's state: 9.8 against 10.9 s a step with both compiles
# taking turns in one process, but a lower ratio in benchmarks/train_step.py (0.71-0.76 against
# 0.74-0.78); on the tiny preset 0.12 against 0.10 s. Hence a choice, for runs short of RAM.
CPU_SCHEDULES = {
  "concurrency": "CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED",
  "memory": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED",
}


def compiler_options(mesh: Mesh, cpu_schedule: str) -> dict | None:
  """XLA options for a step compiled for `mesh`'s devices: on the host CPU, its `cpu_schedule`
  (a key of `CPU_SCHEDULES`); none elsewhere (an AOT compile for a TPU topology runs on the CPU
  host but is not for it)."""
  if cpu_schedule not in CPU_SCHEDULES:
    raise ConfigError(
      f"train.cpu_schedule={cpu_schedule!r}: choose one of {', '.join(CPU_SCHEDULES)}."
    )
  if mesh.devices.flat[0].platform != "cpu":
    return None
  return {"xla_cpu_scheduler_type": CPU_SCHEDULES[cpu_schedule]}


class mesh_context:
  """Mesh + logical axis rules, entered around tracing and calling sharded functions."""

  def __init__(self, mesh: Mesh, rules):
    self._mesh_ctx = jax.set_mesh(mesh)
    self._rules_ctx = nn.logical_axis_rules(rules)

  def __enter__(self):
    self._mesh_ctx.__enter__()
    self._rules_ctx.__enter__()
    return self

  def __exit__(self, *exc):
    self._rules_ctx.__exit__(*exc)
    return self._mesh_ctx.__exit__(*exc)
