"""Runs whose workdir is a bucket, against a real GCS API (tests/gcs_emulator.py): checkpoints,
metrics, TensorBoard events and the tokenizer go to the bucket and nowhere else; a preempted
run resumes from the bucket; bad cloud paths fail before anything compiles."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from etils import epath

import omnijax
from omnijax import chain, paths, report, sweep
from omnijax.errors import ConfigError
from omnijax.train import checkpoint as ckpt_lib
from omnijax.train import trainer
from tests.helpers import tiny_config, write_text_corpus

REPO = Path(__file__).resolve().parent.parent
N = 3  # the bucket run is preempted after N of 2N steps


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return write_text_corpus(tmp_path_factory.mktemp("corpus"))


def _losses(workdir, steps):
  m = report.read_metrics(workdir)
  return np.array([m[s]["loss"] for s in steps])


def test_run_in_a_bucket_is_preempted_and_resumes_from_it(bucket, corpus, tmp_path, monkeypatch):
  """SIGTERM during step N of a run whose workdir is gs://...: step N is checkpointed in the
  bucket, the next launch starts at step N (its first logged step is N+1) and its losses equal
  a local run's; no local `gs:` folder is ever made."""
  monkeypatch.chdir(tmp_path)
  local = tmp_path / "local"
  trainer.train(tiny_config(corpus, steps=2 * N), local)

  run = f"{bucket}/preempted"
  write = trainer.MetricWriter.write

  def write_then_sigterm(self, step, scalars):
    write(self, step, scalars)
    if step == N:
      signal.raise_signal(signal.SIGTERM)

  with monkeypatch.context() as m:
    m.setattr(trainer.MetricWriter, "write", write_then_sigterm)
    trainer.train(tiny_config(corpus, steps=2 * N), run)
  assert ckpt_lib.checkpoint_steps(run)[-1] == N  # (and step 1: orbax saves a run's first)
  assert max(report.read_metrics(run)) == N

  texts = []
  text = trainer.MetricWriter.text
  monkeypatch.setattr(
    trainer.MetricWriter, "text", lambda s, t, v: texts.append(v) or text(s, t, v)
  )
  trainer.train(tiny_config(corpus, steps=2 * N), run)
  assert f"start_step={N}" in texts[0]
  metrics = report.read_metrics(run)
  assert sorted(metrics) == list(range(1, 2 * N + 1))  # the relaunch logged N+1 .. 2N
  steps = range(1, 2 * N + 1)
  np.testing.assert_array_equal(_losses(run, steps), _losses(local, steps))

  root = epath.Path(run)
  assert ckpt_lib.checkpoint_steps(run)[-2:] == [N, 2 * N]
  for name in ("model.json", "config.json", "tokenizer.json", "metrics.jsonl"):
    assert (root / name).exists(), name
  events = list((root / "tensorboard").iterdir())
  assert len(events) == 2  # one file per launch
  assert not any(p.name.startswith("gs:") for p in tmp_path.iterdir())
  assert not Path("gs:").exists() and not (Path(__file__).parent.parent / "gs:").exists()


def test_cloud_mistakes_fail_before_compiling(bucket, corpus):
  config = tiny_config(corpus, steps=2)
  with pytest.raises(ConfigError, match="cannot reach|does not exist"):
    trainer.train(config, "gs://no-such-bucket/run")
  config.train.init_from = f"{bucket}/missing"
  with pytest.raises(ConfigError, match="is not an omnijax workdir"):
    trainer.train(config, f"{bucket}/fresh")
  config = tiny_config(corpus, steps=2)
  config.data.path = f"{bucket}/shards"
  with pytest.raises(ConfigError, match="Cloud Storage FUSE"):
    trainer.train(config, f"{bucket}/fresh2")
  with pytest.raises(ConfigError, match="must be a local path"):
    paths.local(f"{bucket}/x", "--out", "write it locally.")


def _launch(env, *args):
  cmd = [sys.executable, "-m", "omnijax.launch", *args]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


def test_local_omni_launch_eval_load_and_report_in_a_bucket(bucket, tmp_path):
  """README's local omni experiment launched with --workdir=gs://...: everything lands in the
  bucket; --mode=eval, omnijax.load and a sweep report read it from there."""
  run = f"{bucket}/omni"
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  exp = ["--exp=pretrain_general:local", f"--workdir={run}"]
  exp += [f"--config.eval.evaluators.{e}.max_examples=2" for e in ("asr", "image_scenes")]
  _launch(
    env,
    *exp,
    "--config.train.total_steps=2",
    "--config.train.log_every=1",
    "--config.optim.warmup_steps=1",
  )
  root = epath.Path(run)
  metrics = report.read_metrics(run)
  assert sorted(metrics) == [1, 2] and "eval/heldout/loss/text" in metrics[2]
  assert ckpt_lib.checkpoint_steps(run)[-1] == 2
  assert (root / "tokenizer.json").exists() and list((root / "tensorboard").iterdir())
  assert not (REPO / "gs:").exists()

  _launch(env, *exp, "--mode=eval")
  again = report.read_metrics(run)[2]
  assert again["eval/heldout/loss/text"] == pytest.approx(metrics[2]["eval/heldout/loss/text"])

  model = omnijax.load(run)
  assert model.step == 2 and model.tokenizer is not None
  ids = model.tokenizer.encode("a red cube")[None]
  logits = model.logits(ids)
  assert np.isfinite(logits).all()

  # to-hf from the bucket workdir into the bucket, from-hf from a local copy into the bucket
  hf, back = f"{bucket}/omni_hf", f"{bucket}/omni_from_hf"
  for cmd in (
    ["to-hf", f"--workdir={run}", f"--out={hf}"],
    ["from-hf", f"--hf={hf}", f"--workdir={back}"],
  ):
    proc = subprocess.run(
      [sys.executable, "-m", "omnijax.export", *cmd],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
  assert (epath.Path(hf) / "config.json").exists()
  np.testing.assert_allclose(omnijax.load(back).logits(ids), logits, rtol=1e-5, atol=1e-5)

  sweep = epath.Path(f"{bucket}/sweep")
  sweep.mkdir(parents=True)
  runs = [dict(name="arm=omni,seed=0", args=dict(arm="omni", seed=0), workdir=run)]
  (sweep / report.SWEEP_JSON).write_text(json.dumps(dict(exp="x", grid="", runs=runs)))
  out = report.write_report(str(sweep), f"{sweep}/report")
  assert os.fspath(out).startswith("gs://") and "heldout" in out.read_text()
  assert (sweep / "report" / "eval_metrics.png").exists()


def test_chain_and_sweep_keep_bucket_roots(bucket, tmp_path, capsys):
  """Each stage's workdir and init_from are URLs under the root (pathlib would make gs:/...);
  a sweep writes its plan to the bucket."""
  stages = chain.plan(f"{bucket}/chain", True, ["s1_adapters", "s1_encoders"])
  args = dict((name, a) for name, _, a in stages)
  assert f"--workdir={bucket}/chain/s1_adapters" in args["s1_adapters"]
  assert f"--config.train.init_from={bucket}/chain/s1_adapters" in args["s1_encoders"]
  root = f"{bucket}/sweep_plan"
  assert sweep.main(["--exp=ablation:local", f"--root={root}", "--grid=arm=omni", "--dry_run"]) == 0
  plan = json.loads((epath.Path(root) / report.SWEEP_JSON).read_text())
  assert plan["runs"][0]["workdir"] == f"{root}/arm-omni"
  assert f"--workdir={root}/arm-omni" in capsys.readouterr().out
  assert chain.main(["--root=gs://no-such-bucket/chain", "--dry_run"]) == 2
  assert "gs://no-such-bucket does not exist" in capsys.readouterr().err
