"""The pretraining loop: one function, in sections, big_vision style.

    train(config, workdir)

Setup (devices, mesh, config checks) -> data (data_pipelines.inputs) -> model & optimizer ->
evaluators -> state (resume, `train.init_from`, `init_params/`, or fresh) -> loop (step,
non-finite guard, metrics, evaluators, profiler, checkpoint) -> finish (final evaluation).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

from data_pipelines import inputs as inputs_lib
from data_pipelines.omni import TALKER_TASKS
from omnijax import evaluators as eval_lib
from omnijax import paths
from omnijax import sharding as shd
from omnijax.errors import ConfigError
from omnijax.models.config import TalkerConfig, ThinkerConfig
from omnijax.models.omni import Omni
from omnijax.models.thinker import Thinker
from omnijax.processing import batch as batch_lib
from omnijax.processing import media as media_lib
from omnijax.train import checkpoint as ckpt_lib
from omnijax.train import flops as flops_lib
from omnijax.train import goodput as goodput_lib
from omnijax.train import optimizer as optim_lib
from omnijax.train import step as step_lib
from omnijax.train.metrics import Interval, MetricWriter, device_memory

log = logging.getLogger("omnijax")


class Preemption:
  """SIGTERM (a pod scheduler's notice) asks the loop to checkpoint a step and return.

  One process: a handler notes the signal; the loop stops after the step it has finished.
  Several processes: JAX's preemption service (`jax.distributed.initialize`, on unless
  `jax_enable_preemption_service` is off) owns SIGTERM. When any process gets it, the processes
  agree over the coordination service, in the background, on the step after the furthest one's;
  `reached_preemption_sync_point(step)` is True at that step on every process, so all stop at
  the same step. Checking it is local (no host sync per step), on CPU (gloo) and TPU pods alike:
  the agreement runs over the coordination service, not the devices' collectives. Orbax's
  CheckpointManager consults the same sync point in `save`."""

  def __init__(self, start: int):
    self.distributed, self._requested, self._previous = jax.process_count() > 1, False, None
    if self.distributed:
      # The agreed step is the furthest step a process has reported + 1: report the first
      # one, so that a notice before the first step ends picks a step this launch reaches.
      multihost_utils.reached_preemption_sync_point(start)
    elif threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self._requested = True

  def requested(self, step: int) -> bool:
    """Whether the loop stops after `step`; call it after every step."""
    if self.distributed:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._requested

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def same_media_shapes(host_batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Each process buckets its own rows' media (the smallest buckets that fit them); the step
  takes one global shape per buffer: the processes' largest."""
  media = batch_lib.media_of(host_batch)
  if jax.process_count() == 1 or not media:
    return host_batch
  keys = sorted(media)
  shapes = np.concatenate([media[k].shape for k in keys])
  largest = iter(multihost_utils.process_allgather(shapes).max(0).tolist())
  return media_lib.grow_buffers(
    host_batch, {k: tuple(next(largest) for _ in media[k].shape) for k in keys}
  )


def skipped_records(iterator) -> dict[str, float]:
  """Bad records the data iterators of all processes have skipped so far, by reason."""
  counts = iterator.skipped_records
  total = np.array(list(counts.values()))
  if jax.process_count() > 1:
    total = multihost_utils.process_allgather(total).sum(0)
  return {f"data/skipped/{k}": float(v) for k, v in zip(counts, total)}


def check_config(config, model_cfg: ThinkerConfig, mesh) -> None:
  """Mistakes that would otherwise surface deep inside compilation."""
  t, tr = model_cfg.text, config.train
  batch_shards = shd.num_batch_shards(mesh, shd.axis_rules(config.sharding.rules))
  if tr.grad_accum_steps < 1 or tr.global_batch_size % tr.grad_accum_steps:
    raise ConfigError(
      f"train.global_batch_size ({tr.global_batch_size}) must be a multiple of "
      f"train.grad_accum_steps ({tr.grad_accum_steps})."
    )
  micro = tr.global_batch_size // tr.grad_accum_steps
  if micro % batch_shards:
    raise ConfigError(
      f"each microbatch has {micro} rows (train.global_batch_size / train.grad_accum_steps) but "
      f"the batch is split over {batch_shards} devices (mesh data x fsdp x expert); make it a "
      "multiple, e.g. --config.train.global_batch_size="
      f"{batch_shards * tr.grad_accum_steps * max(1, math.ceil(micro / batch_shards))}."
    )
  if jax.process_count() > 1 and not jax.config.jax_enable_preemption_service:
    raise ConfigError(
      "several processes stop together on SIGTERM through JAX's preemption service: leave "
      "jax_enable_preemption_service on (unset JAX_ENABLE_PREEMPTION_SERVICE)."
    )
  if tr.global_batch_size % jax.process_count():
    raise ConfigError(
      f"train.global_batch_size ({tr.global_batch_size}) must be a multiple of "
      f"the {jax.process_count()} processes."
    )
  divisible = [
    ("expert", t.num_experts, "model.text.num_experts"),
    ("tensor", t.num_attention_heads, "model.text.num_attention_heads"),
    ("tensor", t.num_key_value_heads, "model.text.num_key_value_heads"),
    ("tensor", t.moe_intermediate_size, "model.text.moe_intermediate_size"),
    ("tensor", t.vocab_size, "model.text.vocab_size"),
    ("fsdp x context", t.hidden_size, "model.text.hidden_size"),
    ("context", config.data.seq_len, "data.seq_len"),
  ]
  if config.talker.model.keys():
    divisible.append(("context", config.data.talker_seq_len, "data.talker_seq_len"))
  for axes, value, name in divisible:
    size = math.prod(mesh.shape[a] for a in axes.split(" x "))
    if value % size:
      raise ConfigError(
        f"{name} ({value}) is not divisible by the mesh's {axes} ({size}); change one of them."
      )
  if (
    mesh.shape["context"] > 1
    and model_cfg.impl.resolved(mesh.devices.flat[0].platform).attention == "cudnn"
  ):
    raise ConfigError(
      "model.impl.attention=cudnn does not split the sequence over mesh.context; set "
      "--config.model.impl.attention=xla (or mesh.context=1)."
    )
  if config.data.seq_len > t.max_position_embeddings:
    raise ConfigError(
      f"data.seq_len ({config.data.seq_len}) exceeds "
      f"model.text.max_position_embeddings ({t.max_position_embeddings})."
    )
  if tr.total_steps < 1 or tr.log_every < 1 or tr.checkpoint_every < 1:
    raise ConfigError("train.total_steps, train.log_every and train.checkpoint_every must be >= 1.")
  if tr.profile_steps and (
    len(tr.profile_steps) != 2 or not 0 <= tr.profile_steps[0] < tr.profile_steps[1]
  ):
    raise ConfigError(
      f"train.profile_steps={tuple(tr.profile_steps)} must be (first, last) "
      "steps with 0 <= first < last, e.g. --config.train.profile_steps=10,15."
    )


def talker_config(config, model_cfg: ThinkerConfig) -> TalkerConfig | None:
  """The run's TalkerConfig (config.talker.model), None without a Talker; checked against the
  Thinker and the data config before anything compiles."""
  if not config.talker.model.keys():
    return None
  cfg = TalkerConfig.from_dict(config.talker.model, "talker.model")
  cfg.validate(model_cfg, "talker.model")
  d = config.data
  if d.kind != "omni":
    raise ConfigError(
      f"a Talker trains on data.kind=omni with spoken sources (task {' | '.join(TALKER_TASKS)})."
    )
  if d.talker_seq_len < 1 or d.talker_mtp_rows < 1:
    raise ConfigError(
      "a Talker needs data.talker_seq_len and data.talker_mtp_rows > 0 (its positions and MTP "
      "frames per row)."
    )
  if config.eval.evaluators.keys():
    raise ConfigError(
      "the evaluators read the Thinker alone; drop config.eval.evaluators for a Talker run."
    )
  for name, spec in d.mixture.items():
    speaker = spec.get("speaker", "ethan").lower()
    if spec.get("task") in TALKER_TASKS and speaker not in cfg.speakers():
      raise ConfigError(
        f"data.mixture.{name}.speaker: speaker {speaker!r} is not one of "
        f"{sorted(cfg.speakers())} (talker.model.speaker_id)."
      )
  return cfg


def make_model(config, model_cfg: ThinkerConfig, talker_cfg: TalkerConfig | None, mesh):
  """The Thinker, or the Thinker + Talker (`Omni`) of a run with a Talker, computed the way
  the mesh's devices do best (`ImplConfig.resolved`: MoE and attention kernels)."""
  platform = mesh.devices.flat[0].platform
  model_cfg = dataclasses.replace(model_cfg, impl=model_cfg.impl.resolved(platform))
  if talker_cfg is None:
    return Thinker(model_cfg)
  return Omni(model_cfg, talker_cfg, config.talker.freeze_thinker)


def training_flops(config, model_cfg: ThinkerConfig, talker_cfg: TalkerConfig | None) -> float:
  """Analytic FLOPs of one train step (MaxText's convention, `omnijax.train.flops`): the
  Thinker's rows, and with a Talker its rows and the MTP's (G-token) frame sequences."""
  rows, d = config.train.global_batch_size, config.data
  out = flops_lib.training_flops(model_cfg.text, rows, d.seq_len)
  if talker_cfg is not None:
    out += flops_lib.training_flops(talker_cfg.text, rows, d.talker_seq_len)
    out += flops_lib.training_flops(
      talker_cfg.code_predictor, rows * d.talker_mtp_rows, talker_cfg.num_code_groups
    )
  return out


def talker_loss(config, model) -> step_lib.TalkerLoss | None:
  if not isinstance(model, Omni):
    return None
  return step_lib.TalkerLoss(config.talker.thinker_loss_weight, config.talker.mtp_loss_weight)


def train_program(config, model, mesh, rules, total_steps: int, num_tasks: int):
  """(tx, schedule, init_fn, abstract state, state shardings, jitted train step): what a run
  compiles, nothing materialised (omnijax.aot compiles the same step for a TPU topology)."""
  tr = config.train
  tx, schedule = optim_lib.make_optimizer(config.optim, total_steps)
  with step_lib.mesh_context(mesh, rules):
    init_fn, abstract_state, state_sharding = step_lib.state_shardings(
      model, tx, mesh, rules, config.data.seq_len
    )
  trained = None
  if config.optim.trainable or config.optim.frozen:
    trained = jax.tree.map(
      lambda label: label == optim_lib.TRAIN,
      optim_lib.partition(config.optim, abstract_state.params),
    )
  with step_lib.mesh_context(mesh, rules):
    train_step = step_lib.compile_train_step(
      model,
      tx,
      schedule,
      mesh,
      rules,
      state_sharding,
      grad_accum_steps=tr.grad_accum_steps,
      z_loss=tr.z_loss,
      num_tasks=num_tasks,
      trained=trained,
      talker_loss=talker_loss(config, model),
      cpu_schedule=tr.cpu_schedule,
    )
  return tx, schedule, init_fn, abstract_state, state_sharding, train_step


def parse_init_from(spec: str, model_cfg: ThinkerConfig) -> tuple[paths.epath.Path, int | None]:
  """'WORKDIR[:STEP]' -> (workdir, step); the run there must have this model's architecture."""
  path, _, step = spec.rpartition(":") if spec.rpartition(":")[2].isdigit() else (spec, "", "")
  workdir = paths.check_reachable(path, "train.init_from")
  if not (workdir / ckpt_lib.MODEL_JSON).exists():
    raise ConfigError(
      f"train.init_from={spec!r}: {workdir} is not an omnijax workdir (no "
      f"{ckpt_lib.MODEL_JSON}); run the previous stage there first."
    )
  steps = ckpt_lib.checkpoint_steps(workdir)
  if step and int(step) not in steps or not steps and not (workdir / ckpt_lib.INIT_PARAMS).exists():
    raise ConfigError(
      f"train.init_from={spec!r}: {workdir} has no checkpoint "
      f"{'of step ' + step if step else ''} (steps: {steps})."
    )
  theirs = ckpt_lib.read_model_config(workdir).to_dict()
  ours = model_cfg.to_dict()
  ours.pop("impl"), theirs.pop("impl")  # dtypes and kernels may change between stages
  diff = sorted(_flat_diff(ours, theirs))
  if diff:
    raise ConfigError(
      f"train.init_from={spec!r}: the model differs from that run's in "
      + ", ".join(f"model.{k} ({a!r} here, {b!r} there)" for k, a, b in diff)
      + "; use the same architecture."
    )
  return workdir, int(step) if step else None


def _flat_diff(a: dict, b: dict, prefix: str = ""):
  for k in sorted(set(a) | set(b)):
    x, y = a.get(k), b.get(k)
    if isinstance(x, dict) and isinstance(y, dict):
      yield from _flat_diff(x, y, f"{prefix}{k}.")
    elif x != y:
      yield f"{prefix}{k}", x, y


def train(config, workdir: paths.PathLike) -> dict[str, float]:
  """Trains (or resumes) in `workdir` (local, or in a bucket); returns the last logged
  metrics."""
  # ------------------------------------------------------------------ setup
  goodput = goodput_lib.Goodput()
  workdir = paths.check_reachable(workdir, "--workdir")
  model_cfg = ThinkerConfig.from_dict(config.model)
  rules = shd.axis_rules(config.sharding.rules)
  mesh = shd.make_mesh(config.mesh)
  check_config(config, model_cfg, mesh)
  tr = config.train
  talker_cfg = talker_config(config, model_cfg)
  model = make_model(config, model_cfg, talker_cfg, mesh)
  param_counts = optim_lib.check_partition(config.optim, step_lib.abstract_params(model))
  resuming = ckpt_lib.checkpoint_steps(workdir)
  init_from = parse_init_from(tr.init_from, model_cfg) if tr.init_from and not resuming else None
  evaluators = eval_lib.from_config(config, model_cfg)
  workdir.mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    ckpt_lib.write_model_config(workdir, model_cfg)
    if talker_cfg is not None:
      ckpt_lib.write_talker_config(workdir, talker_cfg)
      if config.talker.code2wav and ckpt_lib.load_code2wav(workdir) is None:
        from omnijax import export  # pylint: disable=import-outside-toplevel

        ckpt_lib.save_code2wav(workdir, *export.load_code2wav_source(config.talker.code2wav))

  # ------------------------------------------------------------------ data
  data = inputs_lib.make_train_iterator(config, model_cfg, talker_cfg)
  if data.tokenizer is not None and jax.process_index() == 0:
    ckpt_lib.save_tokenizer(workdir, data.tokenizer)
  total_steps = tr.total_steps
  if tr.epochs:
    if config.data.kind != "omni" or config.data.mixture_by != "epochs":
      raise ConfigError("train.epochs needs data.kind=omni and data.mixture_by=epochs.")
    tokens_per_step = tr.global_batch_size * config.data.seq_len
    total_steps = math.ceil(
      tr.epochs * data.tokens_per_epoch(config.data.mixture) / tokens_per_step
    )
    log.info("train.epochs=%g: %d steps of %d tokens", tr.epochs, total_steps, tokens_per_step)

  # ------------------------------------------------------------------ model & optimizer
  tx, schedule, init_fn, abstract_state, state_sharding, train_step = train_program(
    config, model, mesh, rules, total_steps, len(data.task_names)
  )

  # ------------------------------------------------------------------ evaluators
  for ev in evaluators:
    ev.setup(model, mesh, rules, state_sharding.params, data.tokenizer)
  evaluate = lambda params: {
    f"eval/{ev.name}/{k}": v for ev in evaluators for k, v in ev.run(params).items()
  }

  # ------------------------------------------------------------------ state
  ckpt = ckpt_lib.Checkpointer(
    workdir,
    save_interval_steps=tr.checkpoint_every,
    max_to_keep=tr.keep_checkpoints,
    async_save=tr.async_checkpoint,
  )
  with step_lib.mesh_context(mesh, rules):
    if resuming:
      state = ckpt.restore(resuming[-1], abstract_state, state_sharding, data.iterator)
      log.info("resumed from step %d in %s", resuming[-1], workdir)
    else:
      state = jax.jit(init_fn, out_shardings=state_sharding)(jax.random.PRNGKey(config.seed))
      source = (
        init_from
        if init_from
        else (workdir, None)
        if (workdir / ckpt_lib.INIT_PARAMS).exists()
        else None
      )
      if source and talker_cfg is not None and ckpt_lib.read_talker_config(source[0]) is None:
        # a Thinker-only run initialises the Thinker; the Talker starts fresh
        thinker, step = ckpt_lib.latest_params(
          source[0], source[1], abstract_state.params["thinker"], state_sharding.params["thinker"]
        )
        state = state.replace(params=state.params | {"thinker": thinker})
        log.info("initialised the Thinker from %s (step %s)", source[0], step)
      elif source:
        params, step = ckpt_lib.latest_params(
          source[0], source[1], abstract_state.params, state_sharding.params
        )
        state = state.replace(params=params)
        log.info("initialised params from %s (step %s)", source[0], step)
  start = int(jax.device_get(state.step))

  # ------------------------------------------------------------------ loop
  writer = MetricWriter(workdir, total_steps, start)
  n_devices = jax.device_count()
  seq_len = config.data.seq_len
  peak, peak_source = flops_lib.peak_flops_per_device(tr.peak_flops_per_device)
  step_flops = training_flops(config, model_cfg, talker_cfg)
  writer.text(
    "setup",
    (
      f"devices={n_devices} ({jax.devices()[0].device_kind}) mesh={dict(mesh.shape)} "
      f"params total={flops_lib.total_params(model_cfg.text) / 1e6:.2f}M "
      f"active={flops_lib.active_params(model_cfg.text) / 1e6:.2f}M "
      f"trained={param_counts[optim_lib.TRAIN] / 1e6:.2f}M "
      f"frozen={param_counts[optim_lib.FROZEN] / 1e6:.2f}M "
      f"tokens/step={tr.global_batch_size * seq_len} peak={peak / 1e12:.3g} TFLOP/s/device "
      f"({peak_source}) start_step={start}"
    ),
  )
  interval = Interval(
    data.task_names,
    model_cfg.text.router_aux_loss_coef,
    talker_loss(config, model),
    0.0 if talker_cfg is None else talker_cfg.text.router_aux_loss_coef,
  )
  profile = tuple(tr.profile_steps)
  last: dict[str, float] = {}
  done = start
  end = min(total_steps, tr.stop_at_step or total_steps)
  preemption = Preemption(start)
  goodput.setup_done()
  for step in range(start, end):
    if profile and step == profile[0]:
      with goodput.measure("other"):
        trace_dir = paths.staged(workdir / "profile")
        jax.profiler.start_trace(os.fspath(trace_dir))
    with goodput.measure("data_wait" if step > start else "restore"):  # the first: setup's
      host_batch = same_media_shapes({k: np.asarray(v) for k, v in next(data.iterator).items()})
      shardings = step_lib.batch_shardings(host_batch, mesh, rules)
      batch = {
        k: jax.make_array_from_process_local_data(shardings[k], v) for k, v in host_batch.items()
      }
    with step_lib.mesh_context(mesh, rules):
      if step == start:  # compile time: compiling, loading the program, its first run
        with goodput.measure("compile"):
          if jax.process_count() > 1:
            # CPU processes (gloo) give up on a collective whose peers do not all arrive
            # within 30 s of its first use: they compile the step apart (minutes) and start
            # it together.
            train_step.lower(state, batch).compile()
            multihost_utils.sync_global_devices("train step compiled")
          state, metrics = jax.block_until_ready(train_step(state, batch))
      else:
        state, metrics = train_step(state, batch)
        goodput.dispatched(metrics)
    interval.add(metrics)
    done = step + 1
    if profile and done == profile[1]:
      jax.block_until_ready(metrics)
      with goodput.measure("other"):
        jax.profiler.stop_trace()
        paths.upload(trace_dir, workdir / "profile")

    # ---------------------------------------------------------------- metrics
    if done % tr.log_every == 0 or done == end:
      timed = interval.steps - (done - interval.steps == start)  # the first step: compile
      scalars = interval.summary()  # waits for the interval's steps
      with goodput.measure("other"):
        if hasattr(data.iterator, "skipped_records"):
          scalars.update(skipped_records(data.iterator))
      times = goodput.summary()
      scalars.update(times, **device_memory())
      if timed:
        # a step's time: the device's and its wait for data (compiles, checkpoints,
        # evaluation and logging are goodput's other parts)
        step_time = (times["goodput/productive_s"] + times["goodput/data_wait_s"]) / timed
        scalars.update(
          step_time_s=step_time,
          tokens_per_sec=tr.global_batch_size * seq_len / step_time,
          mfu=step_flops / (step_time * n_devices * peak),
        )
      with goodput.measure("other"):
        writer.write(done, scalars)
      last = scalars
      if scalars["consecutive_nonfinite"] > tr.max_consecutive_nonfinite:
        raise FloatingPointError(
          f"the last {int(scalars['consecutive_nonfinite'])} steps had a non-finite loss or "
          f"gradient and were skipped (train.max_consecutive_nonfinite="
          f"{tr.max_consecutive_nonfinite}); the run diverged: lower optim.learning_rate or "
          "resume from an earlier checkpoint."
        )

    # ---------------------------------------------------------------- evaluators
    every = config.eval.every
    if evaluators and (done == end if not every else done % every == 0 or done == end):
      with goodput.measure("eval"), step_lib.mesh_context(mesh, rules):
        results = evaluate(state.params)
        writer.write(done, results)
      last = last | results

    # ---------------------------------------------------------------- checkpoint
    stop = preemption.requested(done)
    with goodput.measure("checkpoint"):
      ckpt.save(
        done, state, data.iterator if data.checkpointable else None, force=done == end or stop
      )
    if stop:
      writer.text("preempted", f"SIGTERM: saved step {done}; launch again to resume")
      log.warning("preempted (SIGTERM) after step %d: checkpoint saved, exiting", done)
      break

  # ------------------------------------------------------------------ finish
  with goodput.measure("checkpoint"):
    ckpt.wait()
  ckpt.close()
  goodput.close()
  run = goodput.run_summary()
  writer.write(done, run)
  writer.text("goodput", goodput_lib.line(run))
  preemption.close()  # until here a (second) notice does not cut the last checkpoint short
  writer.close()
  return last | run


def evaluate_workdir(workdir: paths.PathLike, config, step: int | None = None) -> dict[str, float]:
  """Runs `config`'s evaluators on a finished run's params (newest or `step`) and logs them
  beside its train metrics."""
  workdir = paths.check_reachable(workdir, "--workdir")
  if not (workdir / ckpt_lib.MODEL_JSON).exists():
    raise ConfigError(
      f"--mode=eval: {workdir} holds no omnijax run (no {ckpt_lib.MODEL_JSON}); pass the "
      "--workdir of a training run."
    )
  model_cfg = ckpt_lib.read_model_config(workdir)
  model_cfg = dataclasses.replace(model_cfg, impl=ThinkerConfig.from_dict(config.model).impl)
  rules = shd.axis_rules(config.sharding.rules)
  mesh = shd.make_mesh(config.mesh)
  evaluators = eval_lib.from_config(config, model_cfg)
  if not evaluators:
    raise ConfigError("config.eval.evaluators is empty: name the evaluators to run.")
  model = Thinker(model_cfg)
  tx, _ = optim_lib.make_optimizer(config.optim, config.train.total_steps)
  with step_lib.mesh_context(mesh, rules):
    _, abstract_state, state_sharding = step_lib.state_shardings(
      model, tx, mesh, rules, config.data.seq_len
    )
    params, step = ckpt_lib.latest_params(
      workdir, step, abstract_state.params, state_sharding.params
    )
  tokenizer = ckpt_lib.load_tokenizer(workdir)
  results = {}
  with step_lib.mesh_context(mesh, rules):
    for ev in evaluators:
      ev.setup(model, mesh, rules, state_sharding.params, tokenizer)
      results.update({f"eval/{ev.name}/{k}": v for k, v in ev.run(params).items()})
  writer = MetricWriter(workdir, config.train.total_steps, step or 0)
  writer.write(step or 0, results)
  writer.close()
  return results
