"""The pretraining loop: one function, in sections, big_vision style.

    train(config, workdir)

Setup (devices, mesh, config checks) -> model & optimizer -> data -> state (resume, init
from `init_params`, or fresh) -> loop (step, log, checkpoint) -> finish.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from omnijax import sharding as shd
from omnijax.errors import ConfigError
from omnijax.models.config import ThinkerConfig
from omnijax.models.thinker import MODALITIES, Thinker
from omnijax.train import checkpoint as ckpt_lib
from omnijax.train import flops as flops_lib
from omnijax.train import optimizer as optim_lib
from omnijax.train import step as step_lib
from omnijax.train.metrics import MetricWriter

log = logging.getLogger("omnijax")


def check_config(config, model_cfg: ThinkerConfig, mesh) -> None:
  """Mistakes that would otherwise surface deep inside compilation."""
  t, tr = model_cfg.text, config.train
  batch_shards = shd.num_batch_shards(mesh, shd.axis_rules(config.sharding.rules))
  if tr.grad_accum_steps < 1 or tr.global_batch_size % tr.grad_accum_steps:
    raise ConfigError(f"train.global_batch_size ({tr.global_batch_size}) must be a multiple of "
                      f"train.grad_accum_steps ({tr.grad_accum_steps}).")
  micro = tr.global_batch_size // tr.grad_accum_steps
  if micro % batch_shards:
    raise ConfigError(
        f"each microbatch has {micro} rows (train.global_batch_size / train.grad_accum_steps) but "
        f"the batch is split over {batch_shards} devices (mesh data x fsdp x expert); make it a "
        "multiple, e.g. --config.train.global_batch_size="
        f"{batch_shards * tr.grad_accum_steps * max(1, math.ceil(micro / batch_shards))}.")
  if tr.global_batch_size % jax.process_count():
    raise ConfigError(f"train.global_batch_size ({tr.global_batch_size}) must be a multiple of "
                      f"the {jax.process_count()} processes.")
  divisible = [
      ("expert", t.num_experts, "model.text.num_experts"),
      ("tensor", t.num_attention_heads, "model.text.num_attention_heads"),
      ("tensor", t.num_key_value_heads, "model.text.num_key_value_heads"),
      ("tensor", t.moe_intermediate_size, "model.text.moe_intermediate_size"),
      ("tensor", t.vocab_size, "model.text.vocab_size"),
      ("fsdp", t.hidden_size, "model.text.hidden_size"),
  ]
  for axis, value, name in divisible:
    if value % mesh.shape[axis]:
      raise ConfigError(f"{name} ({value}) is not divisible by the mesh's {axis} axis "
                        f"({mesh.shape[axis]}); change one of them.")
  if config.data.seq_len > t.max_position_embeddings:
    raise ConfigError(f"data.seq_len ({config.data.seq_len}) exceeds "
                      f"model.text.max_position_embeddings ({t.max_position_embeddings}).")
  if tr.total_steps < 1 or tr.log_every < 1 or tr.checkpoint_every < 1:
    raise ConfigError("train.total_steps, train.log_every and train.checkpoint_every must be >= 1.")


def check_tokenizer(tokenizer, model_cfg: ThinkerConfig) -> None:
  vocab = model_cfg.text.vocab_size
  if tokenizer.vocab_size > vocab:
    raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model vocabulary "
                      f"is {vocab}; set --config.model.text.vocab_size={tokenizer.vocab_size} "
                      "(or larger).")
  names = {"audio_token_id": "<|audio_pad|>", "image_token_id": "<|image_pad|>",
           "video_token_id": "<|video_pad|>", "audio_start_token_id": "<|audio_start|>",
           "audio_end_token_id": "<|audio_end|>", "vision_start_token_id": "<|vision_start|>",
           "vision_end_token_id": "<|vision_end|>"}
  for field, token in names.items():
    tid = tokenizer.token_id(token)
    if tid != getattr(model_cfg, field):
      raise ConfigError(f"model.{field} is {getattr(model_cfg, field)} but the tokenizer maps "
                        f"{token} to {tid}; set --config.model.{field}={tid}.")


class SyntheticBatches:
  """Uniform random tokens, one document per row; batch i depends only on (seed, i)."""

  def __init__(self, seed: int, batch: int, seq_len: int, vocab: int):
    self.seed, self.batch, self.seq_len, self.vocab, self.index = seed, batch, seq_len, vocab, 0

  def __iter__(self):
    return self

  def __next__(self):
    rng = np.random.default_rng((self.seed, jax.process_index(), self.index))
    self.index += 1
    tokens = rng.integers(0, self.vocab, (self.batch, self.seq_len + 1), dtype=np.int32)
    pos = np.broadcast_to(np.arange(self.seq_len, dtype=np.int32), (self.batch, 3, self.seq_len))
    return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:],
                segment_ids=np.ones((self.batch, self.seq_len), np.int32),
                positions=np.ascontiguousarray(pos),
                loss_mask=np.ones((self.batch, self.seq_len), np.float32))


def make_data(config, model_cfg: ThinkerConfig):
  """(host batch iterator, whether its state goes into checkpoints, mixture task names)."""
  d = config.data
  host_batch = config.train.global_batch_size // jax.process_count()
  if d.kind == "synthetic":
    return (SyntheticBatches(config.seed, host_batch, d.seq_len, model_cfg.text.vocab_size),
            False, [])
  if d.kind not in ("text", "omni"):
    raise ConfigError(f"data.kind={d.kind!r} is not one of ['text', 'omni', 'synthetic'].")
  from data_pipelines import local_corpus, local_media_corpus, omni, pipeline
  from data_pipelines import tokenizer as tok_lib
  if d.local_text:
    local_corpus.build_local_text_corpus(d.local_text)
  if d.local_media:
    local_media_corpus.build_local_media_corpus(d.local_media)
  paths = ({"data.path": d.path} if d.kind == "text" else
           {f"data.mixture.{n}.path": s.path for n, s in d.mixture.items()})
  if not paths:
    raise ConfigError("data.mixture is empty: name at least one source "
                      "(--config.data.mixture.NAME.path/task/weight).")
  for name, path in paths.items():
    if not path or not Path(path).exists():
      raise ConfigError(f"{name}={path!r} does not exist; prepare shards there (python -m "
                        "data_pipelines.prepare) or set data.local_text / data.local_media to "
                        "build the local corpora.")
  corpus = d.tokenizer_corpus or d.path
  if not d.tokenizer and not corpus:
    raise ConfigError("set data.tokenizer (a tokenizer.json) or data.tokenizer_corpus (text "
                      "shards to train a BPE on).")
  tokenizer = (tok_lib.load_tokenizer(d.tokenizer) if d.tokenizer
               else tok_lib.local_tokenizer(corpus, vocab_size=d.tokenizer_vocab_size))
  check_tokenizer(tokenizer, model_cfg)
  hosts = dict(process_index=jax.process_index(), process_count=jax.process_count(),
               seed=config.seed)
  if d.kind == "text":
    ds = pipeline.make_text_dataset(d, tokenizer=tokenizer, seq_len=d.seq_len,
                                    batch_size=host_batch, **hosts)
    return iter(ds), True, []
  try:
    ds = omni.make_omni_dataset(d, tokenizer=tokenizer, model_cfg=model_cfg, seq_len=d.seq_len,
                                batch_size=host_batch, **hosts)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  return iter(ds), True, omni.task_names(d)


def vector_scalars(metrics: dict, task_names: list[str]) -> dict[str, float]:
  """Per-modality and per-task metric vectors as named scalars."""
  out = {}
  for k, v in metrics.items():
    if k == "modality_tokens":
      out.update({f"tokens/{m}": float(x) for m, x in zip(MODALITIES, v)})
    elif k == "task_loss":
      out.update({f"loss/{t}": float(x) for t, x in zip(task_names, v)})
    elif k == "task_tokens":
      out.update({f"tokens/task/{t}": float(x) for t, x in zip(task_names, v)})
    else:
      out[k] = float(v)
  return out


def train(config, workdir: str | Path) -> dict[str, float]:
  """Trains (or resumes) in `workdir`; returns the last logged metrics."""
  # ------------------------------------------------------------------ setup
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  model_cfg = ThinkerConfig.from_dict(config.model)
  rules = shd.axis_rules(config.sharding.rules)
  mesh = shd.make_mesh(config.mesh)
  check_config(config, model_cfg, mesh)
  if jax.process_index() == 0:
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    ckpt_lib.write_model_config(workdir, model_cfg)
  tr = config.train
  seq_len = config.data.seq_len

  # ------------------------------------------------------------------ data
  data_iter, checkpointable, task_names = make_data(config, model_cfg)

  # ------------------------------------------------------------------ model & optimizer
  model = Thinker(model_cfg)
  tx, schedule = optim_lib.make_optimizer(config.optim, tr.total_steps)
  with step_lib.mesh_context(mesh, rules):
    init_fn, abstract_state, state_sharding = step_lib.state_shardings(
        model, tx, mesh, rules, seq_len)
    train_step = step_lib.compile_train_step(
        model, tx, schedule, mesh, rules, state_sharding,
        grad_accum_steps=tr.grad_accum_steps, z_loss=tr.z_loss, num_tasks=len(task_names))

  # ------------------------------------------------------------------ state
  ckpt = ckpt_lib.Checkpointer(workdir, save_interval_steps=tr.checkpoint_every,
                               max_to_keep=tr.keep_checkpoints, async_save=tr.async_checkpoint)
  latest = ckpt.latest_step()
  with step_lib.mesh_context(mesh, rules):
    if latest is not None:
      state = ckpt.restore(latest, abstract_state, state_sharding,
                           data_iter if checkpointable else None)
      if not checkpointable:
        data_iter.index = latest
      log.info("resumed from step %d in %s", latest, workdir)
    else:
      state = jax.jit(init_fn, out_shardings=state_sharding)(jax.random.PRNGKey(config.seed))
      init_dir = workdir / ckpt_lib.INIT_PARAMS
      if init_dir.exists():
        params = ckpt_lib.restore_params(init_dir, abstract_state.params, state_sharding.params)
        state = state.replace(params=params)
        log.info("initialised params from %s", init_dir)
  start = int(jax.device_get(state.step))

  # ------------------------------------------------------------------ loop
  writer = MetricWriter(workdir, tr.total_steps, start)
  n_devices = jax.device_count()
  peak, peak_source = flops_lib.peak_flops_per_device(tr.peak_flops_per_device)
  step_flops = flops_lib.training_flops(model_cfg.text, tr.global_batch_size, seq_len)
  writer.text("setup", (
      f"devices={n_devices} ({jax.devices()[0].device_kind}) mesh={dict(mesh.shape)} "
      f"params total={flops_lib.total_params(model_cfg.text) / 1e6:.2f}M "
      f"active={flops_lib.active_params(model_cfg.text) / 1e6:.2f}M "
      f"tokens/step={tr.global_batch_size * seq_len} peak={peak / 1e12:.3g} TFLOP/s/device "
      f"({peak_source}) start_step={start}"))
  last: dict[str, float] = {}
  interval_start, interval_steps = None, 0
  end = min(tr.total_steps, tr.stop_at_step or tr.total_steps)
  for step in range(start, end):
    host_batch = {k: np.asarray(v) for k, v in next(data_iter).items()}
    shardings = step_lib.batch_shardings(host_batch, mesh, rules)
    batch = {k: jax.make_array_from_process_local_data(shardings[k], v)
             for k, v in host_batch.items()}
    with step_lib.mesh_context(mesh, rules):
      state, metrics = train_step(state, batch)
    done = step + 1
    if interval_start is None:  # the first step compiles: time from its end
      jax.block_until_ready(metrics)
      interval_start, interval_steps = time.perf_counter(), 0
    else:
      interval_steps += 1
    if done % tr.log_every == 0 or done == end:
      metrics = jax.device_get(metrics)
      now = time.perf_counter()
      scalars = vector_scalars(metrics, task_names)
      if interval_steps:
        step_time = (now - interval_start) / interval_steps
        scalars.update(step_time_s=step_time,
                       tokens_per_sec=tr.global_batch_size * seq_len / step_time,
                       mfu=step_flops / (step_time * n_devices * peak))
      if checkpointable and hasattr(data_iter, "skipped_records"):
        scalars.update({f"data/skipped/{k}": float(v)
                        for k, v in data_iter.skipped_records.items()})
      writer.write(done, scalars)
      last = scalars
      interval_start, interval_steps = time.perf_counter(), 0
    ckpt.save(done, state, data_iter if checkpointable else None, force=done == end)

  # ------------------------------------------------------------------ finish
  ckpt.wait()
  ckpt.close()
  writer.close()
  return last
