"""AdamW with warmup + cosine decay, global-norm clipping, a weight-decay mask, a trainable /
frozen parameter partition, and a guard that skips non-finite steps."""

from __future__ import annotations

import re

import jax
import optax

from omnijax.errors import ConfigError

TRAIN, FROZEN = "train", "frozen"


def learning_rate_schedule(cfg, total_steps: int) -> optax.Schedule:
  if cfg.warmup_steps >= total_steps:
    raise ConfigError(
      f"optim.warmup_steps ({cfg.warmup_steps}) must be smaller than total_steps ({total_steps})."
    )
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=cfg.learning_rate,
    warmup_steps=cfg.warmup_steps,
    decay_steps=total_steps,
    end_value=cfg.learning_rate * cfg.min_lr_ratio,
  )


def path_name(path) -> str:
  """A pytree path as 'a/b/c' (the names optim patterns match)."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _matcher(patterns):
  compiled = [re.compile(p) for p in patterns]
  return lambda name: any(p.search(name) for p in compiled)


def weight_decay_mask(exclude_patterns):
  """True for params that decay: those whose path matches none of the patterns."""
  excluded = _matcher(exclude_patterns)
  return lambda params: jax.tree_util.tree_map_with_path(
    lambda path, _: not excluded(path_name(path)), params
  )


def partition(cfg, params):
  """TRAIN or FROZEN per param (optim.trainable / optim.frozen; see the config)."""
  trainable, frozen = _matcher(cfg.trainable), _matcher(cfg.frozen)

  def label(path, _):
    name = path_name(path)
    return TRAIN if (not cfg.trainable or trainable(name)) and not frozen(name) else FROZEN

  return jax.tree_util.tree_map_with_path(label, params)


def check_partition(cfg, params) -> dict[str, int]:
  """Every pattern matches a param and something trains; returns param counts by label."""
  names = [path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  for field in ("trainable", "frozen"):
    for pattern in cfg[field]:
      try:
        regex = re.compile(pattern)
      except re.error as e:
        raise ConfigError(f"optim.{field} pattern {pattern!r} is not a regex: {e}.") from e
      if not any(regex.search(n) for n in names):
        raise ConfigError(
          f"optim.{field} pattern {pattern!r} matches no parameter; params are "
          f"'/'-joined paths such as {names[:4]}."
        )
  labels = jax.tree.leaves(partition(cfg, params))
  sizes = [x.size for x in jax.tree.leaves(params)]
  counts = {TRAIN: 0, FROZEN: 0}
  for lab, n in zip(labels, sizes):
    counts[lab] += n
  if not counts[TRAIN]:
    raise ConfigError("optim.trainable / optim.frozen leave no parameter to train.")
  return counts


def make_optimizer(cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The update; frozen params get a zero update and no optimizer state (clipping sees only the
  trained gradients), and a step with a non-finite gradient leaves params and state as they
  were (optax.apply_if_finite counts it)."""
  schedule = learning_rate_schedule(cfg, total_steps)
  adamw = optax.chain(
    optax.clip_by_global_norm(cfg.grad_clip_norm),
    optax.adamw(
      schedule,
      b1=cfg.b1,
      b2=cfg.b2,
      eps=cfg.eps,
      weight_decay=cfg.weight_decay,
      mask=weight_decay_mask(cfg.weight_decay_exclude),
    ),
  )
  if cfg.trainable or cfg.frozen:
    adamw = optax.multi_transform(
      {TRAIN: adamw, FROZEN: optax.set_to_zero()}, lambda params: partition(cfg, params)
    )
  # The run stops itself after train.max_consecutive_nonfinite such steps, long before this.
  return optax.apply_if_finite(adamw, max_consecutive_errors=2**30), schedule
