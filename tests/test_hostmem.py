"""The host allocator policies: `retain` and `tbbmalloc` remove the page faults of XLA:CPU's
per-step temporaries."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

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
  env = hostmem.preload_env(policy, dict(os.environ, JAX_PLATFORMS="cpu"))
  out = subprocess.run(
    [sys.executable, "-c", FAULTS, policy], env=env, capture_output=True, text=True, check=True
  )
  return int(out.stdout.split()[-1])


@pytest.mark.parametrize("policy", ["retain", "tbbmalloc"])
def test_policy_takes_no_page_faults_on_a_warm_steps_temporaries(policy):
  system, kept = _faults_of_a_warm_step("system"), _faults_of_a_warm_step(policy)
  assert system > 2 * (64 << 20) // 4096, system  # at least the two temporaries, page by page
  assert kept < system // 100, (kept, system)


def test_preload_env_puts_the_allocator_first_and_keeps_other_preloads():
  env = hostmem.preload_env("tbbmalloc", {"LD_PRELOAD": "/x/libother.so"})
  libs = env["LD_PRELOAD"].split(":")
  assert [Path(x).name for x in libs] == [
    "libtbbmalloc.so.2",
    "libtbbmalloc_proxy.so.2",
    "libother.so",
  ]
  assert all(Path(x).exists() for x in libs[:2])
  assert hostmem.preload_env("tbbmalloc", env) == env  # once only
  assert hostmem.preload_env("retain", {}) == {}


def test_policy_mistakes_are_config_errors():
  with pytest.raises(ConfigError, match="choose one of system, retain, tbbmalloc"):
    hostmem.set_policy("jemalloc")
  with pytest.raises(ConfigError, match="replaces malloc when the process starts"):
    hostmem.set_policy("tbbmalloc")  # this process was not started under it
  jax.devices()
  with pytest.raises(ConfigError, match="before JAX starts its backend"):
    hostmem.set_policy("retain")
  hostmem.set_policy("system")  # nothing to change: fine at any time


def test_launch_restarts_itself_under_tbbmalloc(tmp_path):
  """The launcher runs again under the preloaded allocator: the run gets past `set_policy` (which
  rejects a process without it) to the next mistake, the empty workdir."""
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "omnijax.launch",
      "--exp=pretrain_general:local",
      "--host_malloc=tbbmalloc",
      "--mode=eval",
      f"--workdir={tmp_path}",
    ],
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
    capture_output=True,
    text=True,
  )
  assert out.returncode == 2, out.stderr
  assert "holds no omnijax run" in out.stderr, out.stderr
