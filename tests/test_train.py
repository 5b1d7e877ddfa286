"""Training: sharded step == single-device step; exact resume; restore onto another mesh."""

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from omnijax import sharding as shd
from omnijax.errors import ConfigError
from omnijax.models import presets
from omnijax.models.config import ThinkerConfig
from omnijax.models.thinker import Thinker
from omnijax.train import checkpoint as ckpt_lib
from omnijax.train import optimizer, trainer
from omnijax.train import step as st
from omnijax.train.config import base_config
from tests.helpers import logged_steps, read_metrics, tiny_config, write_text_corpus

REPO = Path(__file__).resolve().parent.parent

# float32 tolerances; the sharded step reorders reductions. AdamW's first update is
# lr * g / (|g| + eps): with eps = 1e-3 its slope in g is at most lr / eps = 10, so params
# after one step may differ by at most 10x the gradients' difference. (With eps = 1e-8 a
# gradient element within rounding of zero could flip its parameter's update by 2 lr.)
LOSS_RTOL = 1e-6
GRAD_ATOL = 1e-6
ADAM_EPS = 1e-3
PARAM_ATOL = 1e-2 / ADAM_EPS * GRAD_ATOL


def _batch(b, s, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, 4096, (b, s + 1)).astype(np.int32)
  seg = np.ones((b, s), np.int32)
  seg[:, s // 2 :] = 2
  seg[0, -5:] = 0  # padding
  pos = np.concatenate([np.arange(s // 2), np.arange(s - s // 2)])
  return dict(
    inputs=tokens[:, :-1],
    targets=tokens[:, 1:],
    segment_ids=seg,
    positions=np.broadcast_to(pos, (b, 3, s)).astype(np.int32).copy(),
    loss_mask=(seg != 0).astype(np.float32),
  )


def _one_step(mesh_shape, devices, cfg, batch, grad_accum=2):
  model = Thinker(cfg)
  ocfg = base_config().optim
  ocfg.update(dict(learning_rate=1e-2, warmup_steps=0, eps=ADAM_EPS))
  tx, sched = optimizer.make_optimizer(ocfg, 10)
  mesh = shd.make_mesh(mesh_shape, devices)
  rules = shd.DEFAULT_RULES
  with st.mesh_context(mesh, rules):
    init, _, shardings = st.state_shardings(model, tx, mesh, rules, batch["inputs"].shape[1])
    state = jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(0))
    step = st.compile_train_step(
      model, tx, sched, mesh, rules, shardings, grad_accum_steps=grad_accum, z_loss=1e-4
    )
    sharded_batch = jax.device_put(batch, st.batch_shardings(batch, mesh, rules))
    grads = jax.jit(jax.grad(lambda p, b: st.loss_terms(model, p, b, 507.0, 1, 1e-4)[0]))(
      state.params, sharded_batch
    )
    state, metrics = step(state, sharded_batch)
    # Every parameter is laid out by the rules, e.g. experts split over the expert axis.
    return (
      jax.device_get(state.params),
      jax.device_get(metrics),
      jax.device_get(grads),
      state.params,
    )


@pytest.fixture(scope="module")
def single_device_step():
  """(config, batch, and one device's params, metrics and gradients after one step)."""
  cd = presets.get("tiny")
  cd.text.shared_expert_intermediate_size = 32
  cd.text.mlp_only_layers = (1,)
  cd.text.num_hidden_layers = 3
  cfg = ThinkerConfig.from_dict(cd)
  batch = _batch(16, 32)
  return cfg, batch, *_one_step(dict(data=1), jax.devices()[:1], cfg, batch)[:3]


@pytest.mark.parametrize(
  "mesh_shape",
  # the second splits each row's sequence over `context` (context parallelism)
  [dict(data=2, fsdp=2, expert=2), dict(data=1, fsdp=1, expert=2, context=2, tensor=2)],
)
def test_sharded_step_matches_single_device(mesh_shape, single_device_step):
  cfg, batch, p1, m1, g1 = single_device_step
  p8, m8, g8, sharded = _one_step(mesh_shape, jax.devices(), cfg, batch)
  for k in ("ce_sum", "aux_loss", "grad_norm"):
    assert abs(float(m1[k]) - float(m8[k])) <= LOSS_RTOL * abs(float(m1[k])), k
  max_diff = lambda x, y: max(
    jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), x, y))
  )
  grad_diff, param_diff = max_diff(g1, g8), max_diff(p1, p8)
  print(
    f"\nmesh {mesh_shape}: ce sum {float(m1['ce_sum']):.7f} vs {float(m8['ce_sum']):.7f}, "
    f"max |grad diff| {grad_diff:.1e}, max |param diff| after one AdamW step {param_diff:.1e}"
  )
  assert grad_diff <= GRAD_ATOL
  assert param_diff <= PARAM_ATOL
  experts = sharded["model"]["layers_0_1"]["mlp"]["experts_gate_proj"]
  assert experts.sharding.spec[1] == "expert"  # (layers, exp, embed, mlp)
  assert len({s.device for s in experts.addressable_shards}) == 8


def test_unrolled_layer_stack_matches_the_scan():
  """`impl.scan_unroll` changes how the layer scan is compiled, not the math or the
  parameters' (stacked) layout."""
  cd = presets.get("tiny")
  cd.text.num_hidden_layers = 3
  batch = _batch(2, 32)
  tx, _ = optimizer.make_optimizer(base_config().optim, 1000)
  mesh, rules = shd.make_mesh(dict(data=1), jax.devices()[:1]), shd.DEFAULT_RULES
  runs = []
  for unroll in (1, 3):
    cd.impl.scan_unroll = unroll
    model = Thinker(ThinkerConfig.from_dict(cd))
    with st.mesh_context(mesh, rules):
      init, _, shardings = st.state_shardings(model, tx, mesh, rules, 32)
      params = jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(0)).params
      loss = lambda p, b: st.loss_terms(model, p, b, 60.0, 1, 1e-4)[0]
      runs.append(jax.device_get(jax.jit(jax.value_and_grad(loss))(params, batch)))
  (l1, g1), (l3, g3) = runs
  assert jax.tree.structure(g1) == jax.tree.structure(g3)
  assert abs(float(l1) - float(l3)) <= LOSS_RTOL * abs(float(l1))
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g3)):
    np.testing.assert_allclose(a, b, atol=GRAD_ATOL)


def test_cpu_schedule_reaches_the_compiled_step():
  """`train.cpu_schedule` picks XLA:CPU's schedule: the step compiled with `memory` has the
  temporaries of XLA's memory-optimised schedule, the default those of its concurrency-optimised
  one (they differ for this step); an unknown name fails before compiling."""
  cd = presets.get("tiny")
  cd.text.num_hidden_layers = 2
  cd.impl.scan_unroll = 2
  model = Thinker(ThinkerConfig.from_dict(cd))
  batch = _batch(8, 64)
  tx, sched = optimizer.make_optimizer(base_config().optim, 1000)
  mesh, rules = shd.make_mesh(dict(data=1), jax.devices()[:1]), shd.DEFAULT_RULES
  temps = {}
  with st.mesh_context(mesh, rules):
    init, _, shardings = st.state_shardings(model, tx, mesh, rules, 64)
    state = jax.eval_shape(init, jax.random.PRNGKey(0))
    placed = jax.device_put(batch, st.batch_shardings(batch, mesh, rules))
    for schedule in (None, *st.CPU_SCHEDULES):
      kw = dict(cpu_schedule=schedule) if schedule else {}
      step = st.compile_train_step(
        model, tx, sched, mesh, rules, shardings, grad_accum_steps=1, z_loss=0.0, **kw
      )
      compiled = step.lower(state, placed).compile()
      temps[schedule] = compiled.memory_analysis().temp_size_in_bytes
    lowered = step.lower(state, placed)
    xla = {
      name: lowered.compile(dict(xla_cpu_scheduler_type=value)).memory_analysis().temp_size_in_bytes
      for name, value in st.CPU_SCHEDULES.items()
    }
  print(f"\ntemporaries (bytes): {temps}")
  assert temps["memory"] == xla["memory"] != xla["concurrency"] == temps["concurrency"]
  assert temps[None] == temps["concurrency"]
  with pytest.raises(ConfigError, match="train.cpu_schedule='fast': choose one of"):
    st.compile_train_step(
      model, tx, sched, mesh, rules, shardings, grad_accum_steps=1, z_loss=0.0, cpu_schedule="fast"
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return write_text_corpus(tmp_path_factory.mktemp("corpus"))


def _losses(workdir, steps):
  m = read_metrics(workdir)
  return np.array([m[s]["loss"] for s in steps])


N = 4  # the runs below stop after N of 2N steps


@pytest.fixture(scope="module")
def straight(corpus, tmp_path_factory):
  """A run straight through 2N steps."""
  workdir = tmp_path_factory.mktemp("straight")
  trainer.train(tiny_config(corpus, steps=2 * N), workdir)
  return workdir


def test_resume_is_exact_and_restores_onto_another_mesh(corpus, straight, tmp_path):
  n = N

  resumed, other_mesh = tmp_path / "resumed", tmp_path / "other_mesh"
  first = tiny_config(corpus, steps=2 * n)
  first.train.stop_at_step = n
  trainer.train(first, resumed)
  assert (resumed / "checkpoints" / str(n)).exists()
  shutil.copytree(resumed, other_mesh)  # saved on fsdp=8
  trainer.train(tiny_config(corpus, steps=2 * n), resumed)
  assert logged_steps(resumed) == list(range(1, 2 * n + 1))  # the relaunch went on from step n

  a, b = _losses(straight, range(1, 2 * n + 1)), _losses(resumed, range(1, 2 * n + 1))
  print(f"\nstraight {a}\nresumed  {b}")
  np.testing.assert_array_equal(a, b)

  second = tiny_config(corpus, steps=2 * n)
  second.mesh.update(dict(data=2, fsdp=2, expert=2))
  trainer.train(second, other_mesh)
  assert logged_steps(other_mesh) == list(range(1, 2 * n + 1))
  c = _losses(other_mesh, range(n + 1, 2 * n + 1))
  np.testing.assert_allclose(c, a[n:], rtol=1e-5, atol=1e-5)
  assert a[-1] < a[0]


def test_sigterm_saves_the_step_and_the_next_launch_resumes_exactly(
  corpus, straight, tmp_path, monkeypatch
):
  """SIGTERM (what a pod scheduler sends) during step N: the loop checkpoints step N and
  returns; the next launch resumes there and its losses equal the uninterrupted run's."""

  def outside_training(signum, frame):
    raise AssertionError("SIGTERM arrived outside the training loop")

  write = trainer.MetricWriter.write

  def write_then_sigterm(self, step, scalars):
    write(self, step, scalars)
    if step == N:
      signal.raise_signal(signal.SIGTERM)

  previous = signal.signal(signal.SIGTERM, outside_training)
  try:
    run = tmp_path / "preempted"
    monkeypatch.setattr(trainer.MetricWriter, "write", write_then_sigterm)
    trainer.train(tiny_config(corpus, steps=2 * N), run)
    monkeypatch.undo()
    assert ckpt_lib.checkpoint_steps(run)[-1] == N and max(read_metrics(run)) == N
    assert signal.getsignal(signal.SIGTERM) is outside_training  # the loop's handler is gone
    trainer.train(tiny_config(corpus, steps=2 * N), run)
  finally:
    signal.signal(signal.SIGTERM, previous)
  steps = range(1, 2 * N + 1)
  assert logged_steps(run) == list(steps)  # the next launch went on from step N
  np.testing.assert_array_equal(_losses(run, steps), _losses(straight, steps))


@pytest.mark.slow
def test_sigkill_while_checkpointing_leaves_the_previous_checkpoint(corpus, straight, tmp_path):
  """A launch (checkpoint every step, async) killed with SIGKILL while a checkpoint is being
  written: the finished checkpoints stay usable, and the next launch resumes from the newest
  and reproduces the uninterrupted run's losses."""
  exp = tmp_path / "exp.py"
  exp.write_text(
    "from pathlib import Path\n"
    "from tests.helpers import tiny_config\n\n\n"
    "def get_config(arg=None):\n"
    f"  c = tiny_config(Path({str(corpus)!r}), steps={2 * N})\n"
    "  c.train.checkpoint_every, c.train.async_checkpoint = 1, True\n"
    "  return c\n"
  )
  run = tmp_path / "killed"
  cmd = [sys.executable, "-m", "omnijax.launch", f"--exp={exp}", f"--workdir={run}"]
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  writing = []
  while proc.poll() is None and not writing:  # after the first checkpoint, during another
    if ckpt_lib.checkpoint_steps(run):
      writing = [p.name for p in (run / "checkpoints").iterdir() if "tmp" in p.name]
    time.sleep(0.001)
  proc.kill()
  proc.wait()
  assert writing, "the run ended before a checkpoint write was caught"
  kept = ckpt_lib.checkpoint_steps(run)
  assert kept and max(kept) < 2 * N  # the step being written is not among the usable ones
  logged = len(logged_steps(run))
  trainer.train(tiny_config(corpus, steps=2 * N), run)
  steps = range(1, 2 * N + 1)
  assert logged_steps(run)[logged:] == list(range(max(kept) + 1, 2 * N + 1))
  np.testing.assert_array_equal(_losses(run, steps), _losses(straight, steps))
