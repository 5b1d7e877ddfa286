"""Research workflows: the stage chain (freezing, init_from, longer stage 3), evaluators inside
training and on a finished workdir, interval metrics, the non-finite guard, and the config
mistakes of experiments, stages and evaluators."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath
from flax import traverse_util

from data_pipelines import inputs as inputs_lib
from experiments import recipe
from omnijax import chain, launch, sweep
from omnijax import sharding as shd
from omnijax.launch import load_experiment
from omnijax.models import presets
from omnijax.models.config import ThinkerConfig
from omnijax.models.thinker import Thinker
from omnijax.processing import batch as batch_lib
from omnijax.train import checkpoint as ckpt_lib
from omnijax.train import optimizer, trainer
from omnijax.train import step as step_lib
from omnijax.train.config import base_config
from omnijax.train.metrics import Interval, MetricWriter
from tests.helpers import read_metrics


@pytest.fixture(scope="module")
def corpora(media_corpus, text_corpus):
  return media_corpus, text_corpus


def _local(exp: str, corpora, steps: int, evaluate: bool = False, **train):
  """A stage's local config on the small test corpora, sized for the 8 test devices."""
  media, text = corpora
  c = load_experiment(exp)
  paths = dict(
    text=str(text),
    image=str(media / "caption"),
    audio=str(media / "asr"),
    video_audio=str(media / "video"),
  )
  for name, spec in c.data.mixture.items():
    spec.path = paths[name]
  c.data.update(
    dict(local_text="", local_media="", tokenizer_corpus=str(text), tokenizer_vocab_size=512)
  )
  c.train.update(
    dict(
      total_steps=steps,
      global_batch_size=8,
      log_every=1,
      checkpoint_every=1,
      keep_checkpoints=10,
      async_checkpoint=False,
      **train,
    )
  )
  c.optim.warmup_steps = 1  # step 1 has learning rate 0: its checkpoint holds the initial params
  c.eval.update(dict(batches=1, batch_size=8))
  # Held-out loss of every source and one decoding evaluator, small; stage 3 only (the others
  # evaluate the same way).
  c.eval.evaluators = {}
  if evaluate:
    c.eval.evaluators = dict(
      heldout=dict(kind="heldout_loss"),
      asr=dict(kind="asr_wer", source="audio", max_examples=8, max_new_tokens=8),
    )
  return c


def _params(workdir, step):
  params, _ = ckpt_lib.latest_params(workdir, step)
  return traverse_util.flatten_dict(params, sep="/")


def _split(names, patterns):
  matched = {n for n in names if any(re.search(p, n) for p in patterns)}
  return matched, set(names) - matched


def _changed(a, b, names):
  return {n for n in names if not np.array_equal(a[n], b[n])}


@pytest.mark.slow
def test_stage_chain(corpora, tmp_path, bucket):
  """Stage 1 freezes the LLM bit-exactly, trains adapters then encoders; stages 2 and 3 start
  from the previous stage's params; stage 3 trains at the longer length. Stages 2 and 3 run in
  a bucket (gs://, a GCS emulator), stage 3 starting from stage 2 there."""
  s1a, s1b = tmp_path / "s1a", tmp_path / "s1b"
  s2, s3 = (epath.Path(f"{bucket}/chain/{n}") for n in ("s2", "s3"))
  trainer.train(
    _local("pretrain_s1_align:local,phase=adapters", corpora, 3, profile_steps=(1, 2)), s1a
  )
  assert list((s1a / "profile").rglob("*.xplane.pb"))
  init, a = _params(s1a, 1), _params(s1a, 3)
  adapters, rest = _split(a, recipe.ADAPTERS)
  encoders, llm = _split(rest, recipe.ENCODERS)
  assert adapters and encoders and llm
  assert _changed(init, a, llm | encoders) == set()  # bit-identical
  assert len(_changed(init, a, adapters)) >= len(adapters) // 2
  # Frozen params have no optimizer state: Adam's moments hold only the adapters.
  with ocp.PyTreeCheckpointer() as ckpt:
    meta = ckpt.metadata(s1a / "checkpoints" / "3" / "state").item_metadata.tree["opt_state"]
  state_sizes = [
    int(np.prod(m.shape)) for m in jax.tree.leaves(meta, is_leaf=lambda x: hasattr(x, "shape"))
  ]
  adapter_size = sum(a[n].size for n in adapters)
  scalars = sum(n for n in state_sizes if n == 1)
  assert sum(state_sizes) - scalars == 2 * adapter_size  # Adam's mu and nu, adapters only

  trainer.train(
    _local("pretrain_s1_align:local,phase=encoders", corpora, 3, init_from=str(s1a)), s1b
  )
  b0, b = _params(s1b, 1), _params(s1b, 3)
  assert _changed(a, b0, a) == set()  # started from stage 1a's params
  assert _changed(b0, b, llm) == set()
  assert len(_changed(b0, b, encoders - adapters)) >= len(encoders - adapters) // 2

  # (the profiler writes locally; the trace is copied up to the bucket)
  trainer.train(
    _local("pretrain_general:local", corpora, 2, init_from=f"{s1b}:3", profile_steps=(0, 1)), s2
  )
  assert list(s2.glob("profile/plugins/profile/*/*.xplane.pb"))
  assert _changed(b, _params(s2, 1), b) == set()
  assert _changed(_params(s2, 1), _params(s2, 2), llm)  # now the LLM trains

  trainer.train(_local("pretrain_long_context:local", corpora, 2, True, init_from=str(s2)), s3)
  assert _changed(_params(s2, 2), _params(s3, 1), b) == set()
  c2, c3 = (json.loads((w / "config.json").read_text()) for w in (s2, s3))
  assert c3["data"]["seq_len"] > c2["data"]["seq_len"]
  metrics = read_metrics(s3)
  s3_config = _local("pretrain_long_context:local", corpora, 2)
  batch = next(
    inputs_lib.make_train_iterator(s3_config, ThinkerConfig.from_dict(s3_config.model)).iterator
  )
  assert batch["inputs"].shape[1] == c3["data"]["seq_len"]
  assert (batch["segment_ids"] > 0).sum(1).max() > c2["data"]["seq_len"]  # rows longer than s2's

  # Evaluators ran inside training (at the end), and run again on the finished workdir.
  final = metrics[2]
  assert {
    "eval/heldout/loss/text",
    "eval/heldout/loss/image",
    "eval/heldout/loss/audio",
    "eval/heldout/perplexity/text",
    "eval/heldout/loss/modality/video",
    "eval/asr/wer",
  } <= set(final)
  again = trainer.evaluate_workdir(s3, _local("pretrain_long_context:local", corpora, 2, True))
  for k, v in again.items():
    np.testing.assert_allclose(v, final[k], rtol=1e-5, err_msg=k)


def test_interval_metrics_are_token_weighted_and_omit_absent_sources():
  interval = Interval(["audio", "text"], aux_loss_coef=0.0)
  step = lambda ce, tokens, audio: dict(
    ce_sum=jnp.float32(sum(ce)),
    loss_tokens=jnp.float32(sum(tokens)),
    aux_loss=jnp.float32(0),
    grad_norm=jnp.float32(1),
    param_norm=jnp.float32(1),
    learning_rate=jnp.float32(0.1),
    nonfinite=jnp.int32(0),
    consecutive_nonfinite=jnp.int32(0),
    moe_dropped=jnp.float32(0),
    expert_load_max_over_mean=jnp.float32(1),
    modality_tokens=jnp.array([tokens[1], 0, audio, 0], jnp.float32),
    task_ce_sum=jnp.array(ce, jnp.float32),
    task_loss_tokens=jnp.array(tokens, jnp.float32),
    task_tokens=jnp.array(tokens, jnp.float32),
  )
  interval.add(step([0.0, 30.0], [0, 10], 0))  # no audio in this step
  interval.add(step([0.0, 10.0], [0, 30], 0))
  m = interval.summary()
  assert m["loss/text"] == pytest.approx(1.0) and m["loss"] == pytest.approx(1.0)  # 40 / 40
  assert "loss/audio" not in m and "tokens/task/audio" not in m and "tokens/audio" not in m
  assert m["tokens/text"] == pytest.approx(20.0)  # per step
  interval.add(step([6.0, 0.0], [3, 0], 12))
  m = interval.summary()  # the next interval starts afresh
  assert m["loss/audio"] == pytest.approx(2.0) and "loss/text" not in m


def test_console_shows_train_keys_and_evaluation_figures(tmp_path, capsys):
  """A train write shows the console keys; an evaluation (none of them) its figures without
  their counts, never an empty line."""
  writer = MetricWriter(tmp_path, total_steps=10)
  writer.write(5, {"loss": 2.5, "param_norm": 3.0})
  writer.write(
    10,
    {
      "eval/heldout/loss/text": 4.25,
      "eval/heldout/tokens/text": 900.0,
      "eval/asr/wer": 0.5,
      "eval/asr/examples": 32.0,
    },
  )
  writer.close()
  lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("step")]
  assert lines[0].startswith("step 5: loss=2.5") and "param_norm" not in lines[0]
  assert "eval/heldout/loss/text=4.25" in lines[1] and "eval/asr/wer=0.5" in lines[1]
  assert "tokens" not in lines[1] and "examples" not in lines[1]


def test_nonfinite_step_is_skipped_and_counted():
  cfg = ThinkerConfig.from_dict(presets.get("tiny"))
  model = Thinker(cfg)
  ocfg = base_config().optim
  ocfg.warmup_steps = 0
  tx, schedule = optimizer.make_optimizer(ocfg, 10)
  mesh = shd.make_mesh(dict(data=1), jax.devices()[:1])
  rules = shd.DEFAULT_RULES
  with step_lib.mesh_context(mesh, rules):
    init, _, shardings = step_lib.state_shardings(model, tx, mesh, rules, 16)
    state = jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(0))
    train_step = jax.jit(step_lib.make_train_step(model, tx, schedule, 1, 0.0))
    rng = np.random.default_rng(0)
    good = batch_lib.text_batch(rng.integers(0, 4096, (2, 17)))
    bad = dict(
      good,
      loss_mask=np.where(np.arange(16) == 3, np.nan, 1.0).astype(np.float32)
      * np.ones((2, 1), np.float32),
    )
    before = jax.device_get(state.params)
    state, m = train_step(state, bad)
    assert int(m["nonfinite"]) == 1 and int(m["consecutive_nonfinite"]) == 1
    assert float(m["ce_sum"]) == 0.0  # the skipped step adds nothing to the interval's losses
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), before)
    state, m = train_step(state, good)
    assert int(m["nonfinite"]) == 0 and int(m["consecutive_nonfinite"]) == 0
    assert any(
      not np.array_equal(a, b)
      for a, b in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(before))
    )


def test_parse_arg():
  a = recipe.parse_arg("local,arm=vision,seed=3", local=False, arm="omni", seed=0, lr=1e-3)
  assert (a.local, a.arm, a.seed, a.lr) == (True, "vision", 3, 1e-3)
  with pytest.raises(ValueError, match="unknown argument 'sed'"):
    recipe.parse_arg("sed=1", seed=0)
  with pytest.raises(ValueError, match="is not a int"):
    recipe.parse_arg("seed=x", seed=0)


def test_sweep_grid_and_dry_run(tmp_path, capsys):
  points = sweep.grid_points(["arm=text,omni", "seed=0,1"])
  assert points[1] == {"arm": "text", "seed": "1"} and len(points) == 4
  assert (
    sweep.main(
      [
        "--exp=ablation:local",
        "--grid=arm=text,vision",
        "--grid=seed=0",
        f"--root={tmp_path}",
        "--dry_run",
      ]
    )
    == 0
  )
  runs = json.loads((tmp_path / sweep.SWEEP_JSON).read_text())["runs"]
  assert [r["exp"] for r in runs] == [
    "ablation:local,arm=text,seed=0",
    "ablation:local,arm=vision,seed=0",
  ]
  assert runs[1]["workdir"] == str(tmp_path / "arm-vision_seed-0")


def _fails(capsys, *args) -> str:
  code = launch.main(["omnijax.launch", *args])
  err = capsys.readouterr().err
  assert code == 2, err
  assert "Traceback" not in err
  return err


def test_workflow_config_errors(capsys, tmp_path):
  exp = (
    "--exp=pretrain_general:local",
    "--config.train.global_batch_size=8",
    f"--workdir={tmp_path / 'run'}",  # not the default workdir, which may hold a run to resume
  )
  err = _fails(capsys, *exp, "--config.eval.evaluators.heldout.kind=heldout_los")
  assert "is not an evaluator (did you mean 'heldout_loss'?)" in err
  err = _fails(capsys, *exp, "--config.eval.evaluators.heldout.sources=('nope',)")
  assert "unknown source(s) ['nope']" in err
  assert "arm='sound' is not one of ['omni', 'text', 'vision']" in _fails(
    capsys, "--exp=ablation:local,arm=sound"
  )
  assert "phase='both' is not one of" in _fails(capsys, "--exp=pretrain_s1_align:phase=both")
  err = _fails(capsys, *exp, f"--config.train.init_from={tmp_path / 'nowhere'}")
  assert "is not an omnijax workdir" in err and "run the previous stage there first" in err
  err = _fails(capsys, *exp, "--config.optim.trainable=('^visual/nothing_here',)")
  assert "optim.trainable pattern '^visual/nothing_here' matches no parameter" in err
  # A workdir of another architecture: the differing fields are named.
  other = base_config("tiny")
  other.model.text.num_hidden_layers = 3
  ckpt_lib.write_model_config(tmp_path / "other", ThinkerConfig.from_dict(other.model))
  (tmp_path / "other" / ckpt_lib.INIT_PARAMS).mkdir()
  err = _fails(capsys, *exp, f"--config.train.init_from={tmp_path / 'other'}")
  assert "model.text.num_hidden_layers (2 here, 3 there)" in err
  assert chain.main(["--root", str(tmp_path), "--stages=s2_general,s4_finetune", "--dry_run"]) == 2
  assert "unknown stage(s) ['s4_finetune']" in capsys.readouterr().err


def test_decoding_evaluators_score_exact_answers(monkeypatch):
  """scene_description reads colours, shapes, counts and directions from the text; asr_wer is
  jiwer's word error rate after lowercasing and dropping punctuation."""
  from data_pipelines.local_media_corpus import make_facts, parse_scene
  from omnijax.evaluators import generative

  for fact in make_facts(60):
    got = parse_scene(fact["sentence"])
    assert got["groups"] == {tuple(g) for g in fact["groups"]}
    assert got["direction"] == fact["direction"]
  config = load_experiment("ablation:local")
  cfg = ThinkerConfig.from_dict(config.model)
  scenes = generative.SceneDescription("s", config, cfg, dict(source="video"))
  outputs = [  # (model text, reference)
    ("Two red squares and a blue circle.", "two red squares and a blue circle"),
    ("three red squares and a blue circle", "two red squares and a blue circle"),
    ("a green triangle moves from left to right", "a green triangle moves from top to bottom"),
    ("nothing useful", "an orange diamond moves from right to left next to two red circles"),
  ]
  monkeypatch.setattr(scenes, "outputs", lambda params: [(t, {"text": r}) for t, r in outputs])
  m = scenes.run(None)
  assert m["colours"] == m["shapes"] == 0.75 and m["counts"] == m["objects"] == 0.5
  assert m["direction"] == 0.0 and m["exact"] == 0.25 and m["examples"] == 4
  asr = generative.AsrWer("a", config, cfg, dict(source="audio"))
  pairs = [("Three red squares.", "three red squares"), ("a blue", "a blue circle")]
  monkeypatch.setattr(asr, "outputs", lambda params: [(t, {"text": r}) for t, r in pairs])
  m = asr.run(None)
  assert m["wer"] == pytest.approx(1 / 6) and m["exact"] == 0.5
