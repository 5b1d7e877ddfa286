"""AdamW with warmup + cosine decay, global-norm clipping and a weight-decay mask."""

from __future__ import annotations

import re

import jax
import optax

from omnijax.errors import ConfigError


def learning_rate_schedule(cfg, total_steps: int) -> optax.Schedule:
  if cfg.warmup_steps >= total_steps:
    raise ConfigError(f"optim.warmup_steps ({cfg.warmup_steps}) must be smaller than "
                      f"total_steps ({total_steps}).")
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
      decay_steps=total_steps, end_value=cfg.learning_rate * cfg.min_lr_ratio)


def weight_decay_mask(exclude_patterns):
  """True for params that decay: those whose '/'-joined path matches none of the patterns."""
  patterns = [re.compile(p) for p in exclude_patterns]

  def mask(params):
    def keep(path, _):
      name = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
      return not any(p.search(name) for p in patterns)
    return jax.tree_util.tree_map_with_path(keep, params)

  return mask


def make_optimizer(cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  schedule = learning_rate_schedule(cfg, total_steps)
  tx = optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip_norm),
      optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                  mask=weight_decay_mask(cfg.weight_decay_exclude)),
  )
  return tx, schedule
