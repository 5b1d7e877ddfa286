"""The host allocator policy: `retain` removes the page faults of XLA:CPU's per-step temporaries."""

import os
import subprocess
import sys
import textwrap

import jax
import pytest

from omnijax import hostmem
from omnijax.errors import ConfigError

FAULTS = textwrap.dedent(
  """
  import resource, sys
  from omnijax import hostmem
  hostmem.set_policy(sys.argv[1])
  import jax, jax.numpy as jnp

  @jax.jit
  def step(a):  # two 64 MiB temporaries, and Eigen's packing buffers for each product
    return jnp.tanh(jnp.tanh(a @ a) @ a).sum()

  a = jnp.ones((4096, 4096), jnp.float32) / 4096
  for _ in range(2):
    step(a).block_until_ready()
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  step(a).block_until_ready()
  print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
  """
)


def _faults_of_a_warm_step(policy: str) -> int:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run(
    [sys.executable, "-c", FAULTS, policy], env=env, capture_output=True, text=True, check=True
  )
  return int(out.stdout.split()[-1])


def test_retain_takes_no_page_faults_on_a_warm_steps_temporaries():
  system, retain = _faults_of_a_warm_step("system"), _faults_of_a_warm_step("retain")
  assert system > 2 * (64 << 20) // 4096, system  # at least the two temporaries, page by page
  assert retain < system // 100, (retain, system)


def test_policy_mistakes_are_config_errors():
  with pytest.raises(ConfigError, match="choose one of system, retain"):
    hostmem.set_policy("jemalloc")
  jax.devices()
  with pytest.raises(ConfigError, match="before JAX starts its backend"):
    hostmem.set_policy("retain")
  hostmem.set_policy("system")  # nothing to change: fine at any time
