"""Codec training loop, in sections (big_vision style):

    train(config, workdir)

stage=tokenizer: encoder + residual VQ + Code2Wav-shaped decoder, trained jointly.
stage=vocoder:   the released-architecture Code2Wav trained on (codes, waveform) pairs, the
                 codes made on the fly by a frozen tokenizer run (``config.tokenizer``), starting
                 from that run's decoder folded into ``code_embedding``.

Setup (mesh: the batch split over every device, parameters replicated) -> data
(data_pipelines.speech) -> models and optimizers (generator and discriminators, one AdamW
each) -> state (resume, or fresh) -> loop (one jitted step updates the discriminators, then the
generator, then the EMA codebooks; metrics averaged over the logging interval; held-out
evaluation; checkpoint) -> finish. Generator, discriminators, both optimizer states and the
codebooks are one checkpoint, with the data iterator's state.
"""

from __future__ import annotations

import functools
import json
import logging
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from data_pipelines import speech as speech_lib
from omnijax.codec import losses as losses_lib
from omnijax.codec import metrics as metrics_lib
from omnijax.codec import tokenizer as tokenizer_lib
from omnijax.codec.discriminators import Discriminators
from omnijax.codec.model import CodecConfig, SpeechCodec, ema_update, init_codebooks
from omnijax import paths
from omnijax.errors import ConfigError
from omnijax.models.code2wav import Code2Wav
from omnijax.train import checkpoint as ckpt_lib
from omnijax.train import flops as flops_lib
from omnijax.train.metrics import MetricWriter

log = logging.getLogger("omnijax")
STAGES = ("tokenizer", "vocoder")
CONSOLE_KEYS = ("loss", "mel_loss", "adv_loss", "d_loss", "commit_loss", "audio_s_per_s", "mfu")


def make_optimizer(oc, total_steps: int) -> optax.GradientTransformation:
  """AdamW (DAC: betas 0.8 / 0.99) with exponential decay per step, after global-norm clipping."""
  schedule = optax.exponential_decay(oc.learning_rate, 1, oc.lr_decay)
  return optax.chain(
    optax.clip_by_global_norm(oc.clip_norm),
    optax.adamw(schedule, b1=oc.b1, b2=oc.b2, weight_decay=oc.weight_decay),
  )


def check_config(config, cfg: CodecConfig, devices: int) -> None:
  if config.stage not in STAGES:
    raise ConfigError(f"stage={config.stage!r} is not one of {list(STAGES)}.")
  if config.stage == "vocoder" and not config.tokenizer:
    raise ConfigError("stage=vocoder needs tokenizer=WORKDIR (a finished stage=tokenizer run).")
  d = config.data
  if d.segment_samples % cfg.hop:
    raise ConfigError(
      f"data.segment_samples ({d.segment_samples}) must be a multiple of the codec's "
      f"{cfg.hop} samples per frame."
    )
  if d.batch_size % devices:
    raise ConfigError(f"data.batch_size ({d.batch_size}) must be a multiple of {devices} devices.")
  if d.sample_rate != cfg.sample_rate:
    raise ConfigError(f"data.sample_rate ({d.sample_rate}) != model.sample_rate.")
  tr = config.train
  if min(tr.total_steps, tr.log_every, tr.checkpoint_every, tr.eval_every) < 1:
    raise ConfigError("train.total_steps, log_every, checkpoint_every, eval_every must be >= 1.")


def train(config, workdir) -> dict:
  # ------------------------------------------------------------------ setup
  workdir = paths.check_reachable(workdir, "--workdir")
  workdir.mkdir(parents=True, exist_ok=True)
  cfg = CodecConfig.from_dict(config.model)
  devices = jax.devices()[: config.train.num_devices or None]
  check_config(config, cfg, len(devices))
  mesh = Mesh(np.asarray(devices), ("data",))
  repl, batch_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  tokenizer_lib.write_run_config(workdir, cfg, config.stage, config.tokenizer or None)
  (workdir / "config.json").write_text(config.to_json(indent=2))
  tr, w = config.train, config.loss

  # ------------------------------------------------------------------ data
  if config.data.local_media:
    from data_pipelines import local_media_corpus  # pylint: disable=import-outside-toplevel

    local_media_corpus.build_local_media_corpus(config.data.local_media)
  data_iter = iter(
    speech_lib.make_speech_dataset(
      config.data, process_index=jax.process_index(), process_count=jax.process_count()
    )
  )
  clips, eval_skipped = speech_lib.eval_clips(config.data)

  # ------------------------------------------------------------------ models and optimizers
  disc = Discriminators(**config.disc.to_dict())
  seg = config.data.segment_samples
  rng = jax.random.key(tr.seed)
  if config.stage == "tokenizer":
    gen = SpeechCodec(cfg)
    frozen = None
    books = init_codebooks(cfg, rng)["embed"]
    gen_params = jax.jit(
      lambda r: nn.meta.unbox(gen.init(r, jnp.zeros((1, seg)), books, jnp.ones((1,), int)))
    )(rng)["params"]
  else:
    gen = Code2Wav(cfg.code2wav, cfg.impl)
    frozen = tokenizer_lib.load_speech_tokenizer(config.tokenizer)
    gen_params = frozen.code2wav_params()
  disc_params = jax.jit(lambda r: nn.meta.unbox(disc.init(r, jnp.zeros((1, seg)))))(
    jax.random.fold_in(rng, 1)
  )["params"]
  opt_g = make_optimizer(config.optim, tr.total_steps)
  opt_d = make_optimizer(config.optim, tr.total_steps)

  # ------------------------------------------------------------------ state
  state = dict(
    step=jnp.zeros((), jnp.int32),
    gen=gen_params,
    disc=disc_params,
    opt_g=opt_g.init(gen_params),
    opt_d=opt_d.init(disc_params),
  )
  if config.stage == "tokenizer":
    state["books"] = init_codebooks(cfg, jax.random.fold_in(rng, 2))
  state = jax.device_put(state, repl)
  ckpt = ckpt_lib.Checkpointer(
    workdir, save_interval_steps=tr.checkpoint_every, max_to_keep=tr.keep_checkpoints
  )
  first = ckpt.latest_step()
  if first is not None:
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
    state = ckpt.restore(first, abstract, jax.tree.map(lambda _: repl, state), data_iter)
    log.info("resumed from step %d", first)
  first = first or 0
  n_params = sum(x.size for x in jax.tree.leaves(state["gen"]))
  log.info(
    "codec %s: generator %.2fM params, discriminators %.2fM",
    config.stage,
    n_params / 1e6,
    sum(x.size for x in jax.tree.leaves(state["disc"])) / 1e6,
  )

  # ------------------------------------------------------------------ step
  def generate(gen_params, books, wave, rng):
    """((reconstruction, commitment loss), aux) of the trained generator."""
    if config.stage == "tokenizer":
      q = cfg.num_quantizers
      drop = jax.random.bernoulli(rng, cfg.quantizer_dropout, (wave.shape[0],))
      n = jnp.where(drop, jax.random.randint(jax.random.fold_in(rng, 1), drop.shape, 1, q + 1), q)
      bypass = ~jax.random.bernoulli(jax.random.fold_in(rng, 2), cfg.quantize_rate, drop.shape)
      recon, commit, aux = gen.apply({"params": gen_params}, wave, books["embed"], n, bypass)
      return (recon, commit), aux
    codes = jax.lax.stop_gradient(frozen.encode_jax(wave))
    return (gen.apply({"params": gen_params}, codes), jnp.zeros(())), {"codes": codes}

  @functools.partial(jax.jit, static_argnums=3, donate_argnums=0)
  def train_step(state, wave, rng, adversarial: bool):
    rng = jax.random.fold_in(rng, state["step"])
    books = state.get("books")
    (recon, commit), vjp, aux = jax.vjp(
      lambda p: generate(p, books, wave, rng), state["gen"], has_aux=True
    )
    target = wave[:, : recon.shape[1]]
    metrics, new = {}, dict(state)
    disc_params = state["disc"]
    if adversarial:

      def d_loss_fn(dp):
        real = disc.apply({"params": dp}, target)
        fake = disc.apply({"params": dp}, jax.lax.stop_gradient(recon))
        return losses_lib.discriminator_loss(real, fake)

      d_loss, d_grads = jax.value_and_grad(d_loss_fn)(disc_params)
      updates, new["opt_d"] = opt_d.update(d_grads, state["opt_d"], disc_params)
      disc_params = new["disc"] = optax.apply_updates(disc_params, updates)
      metrics.update(d_loss=d_loss, d_grad_norm=optax.global_norm(d_grads))

    def g_loss_fn(recon):
      parts = dict(mel_loss=losses_lib.mel_loss(recon, target, cfg.sample_rate))
      total = w.mel * parts["mel_loss"]
      if adversarial:
        real = disc.apply({"params": disc_params}, target)
        fake = disc.apply({"params": disc_params}, recon)
        parts.update(
          adv_loss=losses_lib.generator_loss(fake),
          fm_loss=losses_lib.feature_matching_loss(real, fake),
        )
        total = total + w.adversarial * parts["adv_loss"] + w.feature_matching * parts["fm_loss"]
      return total, parts

    (g_total, parts), recon_grad = jax.value_and_grad(g_loss_fn, has_aux=True)(recon)
    (g_grads,) = vjp((recon_grad, jnp.asarray(w.commitment, jnp.float32)))
    updates, new["opt_g"] = opt_g.update(g_grads, state["opt_g"], state["gen"])
    new["gen"] = optax.apply_updates(state["gen"], updates)
    metrics.update(
      parts, loss=g_total + w.commitment * commit, g_grad_norm=optax.global_norm(g_grads)
    )
    if books is not None:
      new["books"], qstats = ema_update(
        books, aux, jax.random.fold_in(rng, 7), cfg.ema_decay, cfg.dead_code_threshold
      )
      metrics.update(qstats, commit_loss=commit)
    new["step"] = state["step"] + 1
    return new, metrics

  # ------------------------------------------------------------------ evaluation
  def evaluate(state) -> dict[str, float]:
    codec = tokenizer_lib.SpeechTokenizer.from_state(cfg, state, config.stage, frozen)
    results, codes = [], []
    for clip in clips:
      c = codec.encode(clip[None])
      codes.append(c[0])
      wave = codec.decode(c)[0]
      results.append(
        dict(
          mel_distance=metrics_lib.mel_distance(clip, wave, cfg.sample_rate),
          si_sdr=metrics_lib.si_sdr(clip[: len(wave)], wave),
        )
      )
    out = {f"eval/{k}": v for k, v in metrics_lib.summarize(results).items() if "count" not in k}
    perplexity = metrics_lib.codebook_perplexity(np.concatenate(codes, -1), cfg.codebook_size)
    out["eval/codebook_perplexity_min"] = float(perplexity.min())
    out["eval/codebook_perplexity_mean"] = float(perplexity.mean())
    return out

  # ------------------------------------------------------------------ loop
  writer = MetricWriter(workdir, tr.total_steps, first, console_keys=CONSOLE_KEYS)
  writer.text("config", f"codec {config.stage}: eval clips {len(clips)}, skipped {eval_skipped}")
  peak, _ = flops_lib.peak_flops_per_device(tr.peak_flops_per_device)
  step_flops, compiled_steps = {}, {}
  sums, count, t0 = {}, 0, time.time()
  last = {}
  batch_rows = config.data.batch_size
  for step in range(first, tr.total_steps):
    batch = next(data_iter)
    wave = jax.make_array_from_process_local_data(batch_sharding, batch["wave"])
    adversarial = step >= tr.adversarial_start
    if adversarial not in compiled_steps:
      compiled = compiled_steps[adversarial] = train_step.lower(
        state, wave, rng, adversarial
      ).compile()
      cost = compiled.cost_analysis()
      cost = cost[0] if isinstance(cost, list) else cost
      step_flops[adversarial] = float((cost or {}).get("flops", 0.0))
    state, metrics = compiled_steps[adversarial](state, wave, rng)
    for k, v in metrics.items():
      sums[k] = sums.get(k, 0.0) + v
    count += 1
    done = step + 1
    if done % tr.log_every == 0 or done == tr.total_steps:
      scalars = {k: float(v) / count for k, v in jax.device_get(sums).items()}
      dt = (time.time() - t0) / count
      scalars.update(
        step_time_s=dt,
        audio_s_per_s=batch_rows * config.data.segment_samples / cfg.sample_rate / dt,
        mfu=step_flops[adversarial] / (dt * len(devices) * peak),
        learning_rate=float(config.optim.learning_rate * config.optim.lr_decay**done),
        skipped_records=float(sum(data_iter.skipped_records.values())),
      )
      writer.write(done, scalars)
      last.update(scalars)
      sums, count, t0 = {}, 0, time.time()
    if done % tr.eval_every == 0 or done == tr.total_steps:
      ev = evaluate(state)
      writer.write(done, ev)
      last.update(ev)
      t0 = time.time()
    ckpt.save(done, state, data_iter, force=done == tr.total_steps)

  # ------------------------------------------------------------------ finish
  ckpt.wait()
  ckpt.close()
  writer.close()
  (workdir / "final_metrics.json").write_text(json.dumps(last, indent=2))
  return last
