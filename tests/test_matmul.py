"""oneMKL's float32 products on XLA:CPU (model.impl.cpu_matmul): equal to XLA's, gradients
included, and taken only where they can run."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omnijax import sharding as shd
from omnijax.errors import ConfigError
from omnijax.models import matmul, presets
from omnijax.models.config import ImplConfig, ThinkerConfig
from omnijax.models.thinker import Thinker
from omnijax.train import optimizer
from omnijax.train import step as st
from omnijax.train.config import base_config

needs_mkl = pytest.mark.skipif(
  matmul.unavailable() is not None, reason=f"no oneMKL products: {matmul.unavailable()}"
)


@needs_mkl
@pytest.mark.parametrize("trans_a,trans_b", list(itertools.product((False, True), repeat=2)))
def test_products_and_gradients_equal_xla(trans_a, trans_b):
  rng = np.random.default_rng(0)
  m, k, n = 37, 130, 19
  a = jnp.asarray(rng.standard_normal((k, m) if trans_a else (m, k), np.float32))
  b = jnp.asarray(rng.standard_normal((n, k) if trans_b else (k, n), np.float32))
  cot = jnp.asarray(rng.standard_normal((m, n), np.float32))

  def loss(a, b, mkl):
    return jnp.sum(cot * matmul.matmul(a, b, mkl=mkl, trans_a=trans_a, trans_b=trans_b))

  grad = jax.jit(jax.value_and_grad(loss, (0, 1)), static_argnums=2)
  assert "omnijax_sgemm" in grad.lower(a, b, True).as_text()
  assert "omnijax_sgemm" not in grad.lower(a, b, False).as_text()
  (l1, g1), (l0, g0) = grad(a, b, True), grad(a, b, False)
  np.testing.assert_allclose(l1, l0, rtol=1e-5)
  for x, y in zip(g1, g0):
    assert x.shape == y.shape
    np.testing.assert_allclose(x, y, atol=1e-4, rtol=1e-5)


def _tiny():
  cd = presets.get("tiny")
  cd.text.num_hidden_layers = 2
  return cd


def _loss_and_grads(cd, cpu_matmul, devices):
  cd.impl.cpu_matmul = cpu_matmul
  model = Thinker(ThinkerConfig.from_dict(cd))
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, cd.text.vocab_size, (2, 65)).astype(np.int32)
  batch = dict(
    inputs=tokens[:, :-1],
    targets=tokens[:, 1:],
    segment_ids=np.ones((2, 64), np.int32),
    positions=np.broadcast_to(np.arange(64), (2, 3, 64)).astype(np.int32).copy(),
    loss_mask=np.ones((2, 64), np.float32),
  )
  tx, _ = optimizer.make_optimizer(base_config().optim, 1000)
  mesh, rules = shd.make_mesh(dict(data=len(devices)), devices), shd.DEFAULT_RULES
  with st.mesh_context(mesh, rules):
    init, _, shardings = st.state_shardings(model, tx, mesh, rules, 64)
    params = jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(0)).params
    f = jax.jit(jax.value_and_grad(lambda p, b: st.loss_terms(model, p, b, 128.0, 1, 1e-4)[0]))
    hlo = f.lower(params, batch).as_text()
    return jax.device_get(f(params, batch)), hlo


@needs_mkl
def test_thinker_gradients_equal_xla():
  """The attention projections, the blocked experts and the LM head go to oneMKL on one CPU
  device; loss and gradients match XLA's products."""
  (l1, g1), hlo = _loss_and_grads(_tiny(), "mkl", jax.devices()[:1])
  (l0, g0), hlo0 = _loss_and_grads(_tiny(), "xla", jax.devices()[:1])
  assert hlo.count("omnijax_sgemm") >= 6 and "omnijax_sgemm" not in hlo0
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-4)


@needs_mkl
def test_sharded_products_stay_xla():
  """A custom call has no sharding rule: on a mesh of several devices the products are XLA's."""
  (_, _), hlo = _loss_and_grads(_tiny(), "mkl", jax.devices()[:2])
  assert "omnijax_sgemm" not in hlo


def test_mkl_that_cannot_run_fails_as_a_config_error(monkeypatch):
  monkeypatch.setattr(matmul, "unavailable", lambda: "oneMKL is not installed (pip install x)")
  with pytest.raises(ConfigError, match=r"cpu_matmul='mkl': oneMKL is not installed.*'xla'"):
    ImplConfig(cpu_matmul="mkl").validate()
  assert ImplConfig().resolved("cpu").cpu_matmul == "xla"
  assert ImplConfig().resolved("tpu").cpu_matmul == "xla"
