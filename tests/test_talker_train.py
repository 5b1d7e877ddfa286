"""The Thinker + Talker train step (`omnijax.models.omni.Omni`, `train.step` with TalkerLoss).

Batches are real Talker layouts (`omnijax.processing.talker.talker_example`) of random
conversations with the local token ids, one per row: text-only turns and turns with an audio
placeholder (whose Talker input is the Thinker's hidden state). Checked:
- the loss is exactly thinker x CE_text + CE_codebook0 + mtp x CE_mtp + the aux terms, from
  the model's outputs;
- with the Thinker frozen (optimizer partition + stop_gradient) its params do not move and get
  no gradient; jointly trained, the Talker's loss reaches the Thinker's embeddings and layers;
- a few steps on one batch lower both Talker losses (by > 0.4 nats).
All but the first compile train steps (minutes each on 2 CPU cores): slow tests.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from omnijax import sharding as shd
from omnijax.models import presets
from omnijax.models.config import TalkerConfig, ThinkerConfig
from omnijax.models.omni import Omni
from omnijax.processing import talker as talker_layout
from omnijax.train import optimizer as optim_lib
from omnijax.train import step as step_lib
from omnijax.launch import load_experiment
from omnijax.train import trainer
from omnijax.train.config import base_config
from tests import helpers
from tests.helpers import read_metrics, write_text_corpus

ROWS, SEQ, TALKER_LEN, MTP_ROWS = 16, 32, 40, 12
WEIGHTS = step_lib.TalkerLoss(thinker=0.5, mtp=0.3)


def _configs():
  thinker = ThinkerConfig.from_dict(presets.get("tiny"))
  talker = TalkerConfig.from_dict(presets.get_talker("tiny"))
  talker.validate(thinker)
  return thinker, talker


def _example(rng, thinker, talker, audio: bool):
  ids = talker_layout.TalkerTokenIds.from_configs(thinker, talker)
  words = lambda n: list(rng.integers(20, thinker.text.vocab_size, n))
  user = [ids.im_start, ids.user, 30] + words(int(rng.integers(3, 7)))
  if audio:
    user += [ids.audio] * 3
  user += [2, 30]
  answer = [ids.im_start, ids.assistant, 30] + words(int(rng.integers(2, 6))) + [2]
  thinker_ids = np.asarray(user + answer)
  frames = int(rng.integers(4, 9))
  codes = rng.integers(0, talker.codebook_size, (talker.num_code_groups, frames))
  return thinker_ids, talker_layout.talker_example(thinker_ids, codes, 2302, ids)


def _pad(x, length, fill):
  out = np.full((length,) + x.shape[1:], fill, x.dtype)
  out[: len(x)] = x
  return out


def make_batch(thinker, talker, seed=0):
  rng = np.random.default_rng(seed)
  rows = {k: [] for k in ("inputs", "targets", "loss_mask", "segment_ids", *step_lib.TALKER_KEYS)}
  for r in range(ROWS):
    ids, ex = _example(rng, thinker, talker, audio=r % 2 == 1)
    n, length = len(ids), len(ex["labels"])
    rows["inputs"].append(_pad(ids, SEQ, 0))
    rows["targets"].append(_pad(np.append(ids[1:], 0), SEQ, 0))
    rows["loss_mask"].append(_pad(np.ones(n, np.float32), SEQ, 0.0))
    rows["segment_ids"].append(_pad(np.ones(n, np.int32), SEQ, 0))
    rows["talker_text_ids"].append(_pad(ex["text_ids"], TALKER_LEN, 0))
    rows["talker_thinker_index"].append(_pad(ex["thinker_index"], TALKER_LEN, -1))
    rows["talker_codec_ids"].append(_pad(ex["codec_ids"], TALKER_LEN, -1))
    rows["talker_positions"].append(_pad(ex["positions"].T, TALKER_LEN, 0.0).T)
    rows["talker_segment_ids"].append(_pad(np.ones(length, np.int32), TALKER_LEN, 0))
    rows["talker_labels"].append(_pad(ex["labels"], TALKER_LEN, -1))
    where = np.flatnonzero(ex["mtp_codes"][:, 0] >= 0)
    rows["talker_mtp_index"].append(_pad(where.astype(np.int32), MTP_ROWS, 0))
    rows["talker_mtp_codes"].append(_pad(ex["mtp_codes"][where], MTP_ROWS, -1))
  batch = {k: np.stack(v) for k, v in rows.items()}
  batch["positions"] = np.broadcast_to(np.arange(SEQ, dtype=np.float32), (ROWS, 3, SEQ)).copy()
  return batch


ADAM_EPS = 1e-3  # as tests/test_train.py: a bounded first AdamW step


def _optim(*frozen: str):
  c = base_config("tiny").optim
  c.learning_rate, c.warmup_steps, c.eps, c.frozen = 1e-2, 0, ADAM_EPS, frozen
  return c


def _run(model, batch, optim_cfg, mesh_shape, steps=1, weights=WEIGHTS):
  """(params before, params after the first step, its gradients, per-step metrics) of `steps`
  train steps (2 microbatches each, loss `weights`) on a mesh of `mesh_shape`."""
  size = int(np.prod(list(mesh_shape.values())))
  mesh = shd.make_mesh(ml_collections.ConfigDict(mesh_shape), jax.devices()[:size])
  rules = shd.axis_rules(None)
  tx, schedule = optim_lib.make_optimizer(optim_cfg, 100)
  with step_lib.mesh_context(mesh, rules):
    init_fn, abstract, state_sharding = step_lib.state_shardings(model, tx, mesh, rules, SEQ)
    trained = None
    if optim_cfg.frozen:
      labels = optim_lib.partition(optim_cfg, abstract.params)
      trained = jax.tree.map(lambda label: label == optim_lib.TRAIN, labels)
    step = step_lib.compile_train_step(
      model,
      tx,
      schedule,
      mesh,
      rules,
      state_sharding,
      grad_accum_steps=2,
      z_loss=0.0,
      trained=trained,
      talker_loss=weights,
    )
    state = jax.jit(init_fn, out_shardings=state_sharding)(jax.random.PRNGKey(0))
    before = jax.device_get(state.params)
    shardings = step_lib.batch_shardings(batch, mesh, rules)
    placed = {k: jax.device_put(v, shardings[k]) for k, v in batch.items()}
    totals = step_lib.talker_counts(placed)
    n_text = jnp.sum(placed["loss_mask"])
    grads = jax.jit(
      jax.grad(lambda p, b: step_lib.loss_terms(model, p, b, n_text, 1, 0.0, 0, weights, totals)[0])
    )(state.params, placed)
    metrics, first = [], None
    for _ in range(steps):
      state, m = step(state, placed)
      metrics.append(jax.device_get(m))
      first = first or jax.device_get(state.params)
  return before, first, jax.device_get(grads), metrics


@pytest.fixture(scope="module")
def setup():
  thinker, talker = _configs()
  return thinker, talker, make_batch(thinker, talker)


def test_loss_is_the_weighted_sum_of_its_terms(setup):
  thinker, talker, batch = setup
  model = Omni(thinker, talker)
  params = jax.jit(lambda rng: nn.meta.unbox(step_lib.init_params(model, rng, 1, SEQ)))(
    jax.random.PRNGKey(1)
  )
  jb = jax.tree.map(jnp.asarray, batch)
  totals = step_lib.talker_counts(jb)
  n_text = jnp.sum(jb["loss_mask"])

  @jax.jit
  def run(params, jb):
    loss, m = step_lib.loss_terms(model, params, jb, n_text, 1, 0.0, 0, WEIGHTS, totals)
    return loss, m, step_lib.forward(model, params, jb)

  loss, m, (logits, _, t_logits, mtp_logits, _) = run(params, jb)

  def ce(lg, y, mask):
    lp = jax.nn.log_softmax(np.asarray(lg, np.float64), -1)
    picked = np.take_along_axis(np.asarray(lp), np.maximum(y, 0)[..., None], -1)[..., 0]
    return -(picked * mask).sum() / mask.sum()

  text = ce(logits, batch["targets"], batch["loss_mask"])
  cb0 = ce(t_logits, batch["talker_labels"], batch["talker_labels"] >= 0)
  codes = batch["talker_mtp_codes"]
  mtp = ce(mtp_logits, codes[..., 1:], np.broadcast_to(codes[..., :1] >= 0, codes[..., 1:].shape))
  aux = float(m["aux_loss"]) * thinker.text.router_aux_loss_coef
  talker_aux = float(m["talker_aux_loss"]) * talker.text.router_aux_loss_coef
  want = WEIGHTS.thinker * (text + aux) + cb0 + WEIGHTS.mtp * mtp + talker_aux
  assert int(totals[0]) == int((batch["talker_labels"] >= 0).sum()) > ROWS
  assert int(totals[1]) == 15 * int((codes[..., 0] >= 0).sum())
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  # untrained: codebook 0 near log(3072), the MTP heads near log(2048)
  assert abs(cb0 - np.log(talker.text.vocab_size)) < 1.0 and abs(mtp - np.log(2048)) < 1.0


def _flat(tree):
  return traverse_util.flatten_dict(tree, sep="/")


# Each train step compiles for minutes on a 2-core CPU: the step tests are slow tests.
@pytest.fixture(scope="module")
def joint(setup):
  """Twelve joint steps on one device (the first is the sharded test's reference)."""
  thinker, talker, batch = setup
  return _run(Omni(thinker, talker), batch, _optim(), dict(fsdp=1), steps=12)


@pytest.mark.slow
def test_frozen_thinker_stays_and_joint_training_reaches_it(setup, joint):
  thinker, talker, batch = setup
  before, after, grads, _ = _run(
    Omni(thinker, talker, freeze_thinker=True),
    batch,
    _optim("thinker/.*"),
    dict(fsdp=1),
    weights=step_lib.TalkerLoss(thinker=0.0, mtp=0.3),
  )
  fb, fa, fg = _flat(before), _flat(after), _flat(grads)
  for k in fb:
    moved = float(np.abs(fa[k] - fb[k]).max())
    assert (moved == 0) == k.startswith("thinker/"), k
    if k.startswith("thinker/"):
      assert not np.abs(fg[k]).max(), k  # no gradient reaches the frozen Thinker
  before, after, grads, _ = joint
  fb, fa, fg = _flat(before), _flat(after), _flat(grads)
  # the Talker and the Thinker's decoder train (the towers see no media in this batch)
  decoder = [k for k in fb if k.startswith(("talker/", "thinker/model/", "thinker/embed"))]
  assert all(float(np.abs(fa[k] - fb[k]).max()) > 0 for k in decoder)
  # with a Thinker weight of 0 the Talker's loss alone reaches the Thinker's embeddings
  # (text stream) and its layers (hidden states at the audio placeholders)
  zero = Omni(thinker, talker)
  jb = jax.tree.map(jnp.asarray, batch)
  totals, n_text = step_lib.talker_counts(jb), jnp.sum(jb["loss_mask"])
  only_talker = step_lib.TalkerLoss(thinker=0.0, mtp=0.3)
  g = jax.jit(
    jax.grad(lambda p: step_lib.loss_terms(zero, p, jb, n_text, 1, 0.0, 0, only_talker, totals)[0])
  )(before)
  fg = _flat(g)
  for k in ("thinker/embed_tokens", "thinker/model/layers_0_2/self_attn/q_proj"):
    assert float(np.abs(fg[k]).max()) > 0, k
  assert float(np.abs(fg["thinker/lm_head"]).max()) == 0


@pytest.mark.slow
def test_talker_losses_fall_on_one_batch(joint):
  metrics = joint[3]
  rate = lambda m, k, n: float(m[k]) / float(m[n])
  first, last = metrics[0], metrics[-1]
  print(
    f"\n[talker train] codebook0 {rate(first, 'talker_ce_sum', 'talker_tokens'):.3f} -> "
    f"{rate(last, 'talker_ce_sum', 'talker_tokens'):.3f}; mtp "
    f"{rate(first, 'mtp_ce_sum', 'mtp_tokens'):.3f} -> {rate(last, 'mtp_ce_sum', 'mtp_tokens'):.3f}"
  )
  # measured: codebook 0 8.06 -> 3.93, MTP 7.64 -> 7.02 (15 heads of 2048 codes learn slower)
  for num, den in (("talker_ce_sum", "talker_tokens"), ("mtp_ce_sum", "mtp_tokens")):
    assert rate(last, num, den) < rate(first, num, den) - 0.4, num


# float32; the sharded step reorders reductions: gradients agree to 1e-5 of each leaf's
# largest gradient (measured 2.4e-6 absolute on O(1) Talker gradients); AdamW's first update
# with eps 1e-3 moves a parameter by at most lr / eps = 10x its gradient's difference
GRAD_RTOL, PARAM_ATOL, METRIC_RTOL = 1e-5, 1e-5, 1e-5


@pytest.mark.slow
def test_sharded_joint_step_matches_one_device(setup, joint):
  """data 2 x fsdp 2 x expert 2 (8 forced host devices) == one device, 2 microbatches."""
  thinker, talker, batch = setup
  _, p1, g1, m1 = joint
  _, p8, g8, m8 = _run(Omni(thinker, talker), batch, _optim(), dict(data=2, fsdp=2, expert=2))
  g1, g8, p1, p8 = (_flat(t) for t in (g1, g8, p1, p8))
  grad_err = {
    k: float(np.abs(g1[k] - g8[k]).max() / np.abs(g1[k]).max()) for k in g1 if g1[k].any()
  }
  worst = max(grad_err, key=grad_err.get)
  param_diff = max(float(np.abs(p1[k] - p8[k]).max()) for k in p1)
  print(
    f"\n[8 devices] worst gradient {worst}: max |diff| / max |grad| {grad_err[worst]:.1e}; "
    f"max |param diff| after one AdamW step {param_diff:.1e}"
  )
  assert grad_err[worst] <= GRAD_RTOL and param_diff <= PARAM_ATOL
  # compared: every gradient of the Talker and the Thinker's decoder (the towers see no media)
  assert all(k in grad_err for k in g1 if k.startswith(("talker/", "thinker/model/")))
  for k in ("talker_ce_sum", "mtp_ce_sum", "ce_sum", "talker_tokens", "mtp_tokens", "grad_norm"):
    np.testing.assert_allclose(float(m8[0][k]), float(m1[0][k]), rtol=METRIC_RTOL, err_msg=k)


def _talker_run(root, steps: int, stop_at: int | None = None):
  """talker:local,stage=joint on the spoken test records (3 sources), sized for 8 devices."""
  c = load_experiment("talker:local,stage=joint")
  for spec in c.data.mixture.values():
    spec.update(dict(path=str(root / "speech"), codec=str(root / "speech")))
  c.talker.code2wav = ""
  c.data.update(
    dict(local_text="", local_media="", tokenizer_corpus=str(root / "text"), seq_len=160)
  )
  c.data.update(dict(tokenizer_vocab_size=512, talker_seq_len=160, talker_mtp_rows=96))
  c.train.update(dict(total_steps=steps, global_batch_size=8, log_every=1, async_checkpoint=False))
  c.train.stop_at_step = stop_at
  c.optim.warmup_steps = 1
  return c


@pytest.mark.slow
def test_talker_run_resumes_exactly(tmp_path):
  """A joint run stopped at step 2 and resumed equals the run straight to step 4 (every loss,
  the Thinker's, codebook 0's and the MTP's, bit for bit)."""
  write_text_corpus(tmp_path / "text", num_docs=200)
  helpers.write_spoken_records(tmp_path / "speech")
  trainer.train(_talker_run(tmp_path, 4), tmp_path / "straight")
  trainer.train(_talker_run(tmp_path, 4, stop_at=2), tmp_path / "resumed")
  assert (tmp_path / "resumed" / "checkpoints" / "2").exists()
  trainer.train(_talker_run(tmp_path, 4), tmp_path / "resumed")
  assert helpers.logged_steps(tmp_path / "resumed") == [1, 2, 3, 4]  # went on from step 2
  a, b = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
  keys = ("loss", "ce_loss", "talker_loss", "mtp_loss", "talker_aux_loss", "grad_norm")
  for step in range(1, 5):
    assert {k: a[step][k] for k in keys} == {k: b[step][k] for k in keys}, step
  assert a[4]["talker_loss"] < a[1]["talker_loss"]
