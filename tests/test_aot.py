"""omnijax.aot: the tiny experiment's train step compiled for a TPU topology on this CPU host
(libtpu, no TPU) with the TPU kernels (splash attention over context-parallel sequence shards,
ragged_dot MoE, ragged all-to-all between expert shards), its memory and FLOPs
read back, and the command's errors."""

import dataclasses

import numpy as np
import pytest
from jax.sharding import Mesh

from omnijax import aot, launch
from omnijax.errors import ConfigError
from omnijax.train import step as step_lib

pytest.importorskip("libtpu")

EXP = "pretrain_general:local"
TINY = ("--config.train.global_batch_size=4", "--config.data.seq_len=256")


def _main(capsys, *args):
  code = aot.main(["omnijax.aot", f"--exp={EXP}", *TINY, *args])
  out = capsys.readouterr()
  return code, out.out, out.err


@pytest.fixture(scope="module")
def report():
  config = launch.load_experiment(EXP)
  config.train.global_batch_size, config.data.seq_len = 4, 256
  # context parallelism (splash attention over sequence shards) and expert parallelism
  config.mesh.update(dict(expert=2, context=2))
  devices, chip = aot.topology_devices("v5p-8")
  return config, aot.compile_step(config, devices, chip, "v5p-8")


def test_tiny_experiment_compiles_for_a_tpu_slice(report):
  config, r = report
  assert r.devices == 4 and (r.mesh["expert"], r.mesh["context"]) == (2, 2)  # 4 v5p chips
  # impl "auto" compiles for the target's kernels, not the host's
  assert r.kernels == tuple(aot.KERNELS)
  # the tiny Thinker with both towers: its params and Adam moments, a few MB per device
  assert 1 << 20 < r.argument_bytes < 1 << 28 and r.temp_bytes > 0 and r.fits
  assert r.xla_flops > 0 and r.xla_bytes > 0
  rows = config.train.global_batch_size
  assert r.analytic_flops > 6 * rows * config.data.seq_len * 1e5 / 4  # > 0.1M active params
  compute, memory, mfu = r.roofline()
  assert compute > 0 and memory > 0 and 0 < mfu <= 1
  text = "\n".join(r.lines())
  assert "of 95.00 GiB HBM (fits)" in text and "roofline" in text


def test_tpu_steps_take_no_cpu_compiler_options():
  """The host CPU's XLA options (step_lib.compiler_options) stay off a step compiled on this
  host for a TPU topology."""
  devices, _ = aot.topology_devices("v5p-8")
  assert step_lib.compiler_options(Mesh(np.array(devices), ("data",)), "memory") is None


def test_topology_names():
  assert aot.topology_name("v5p-256")[0] == "v5p:4x4x8"
  assert aot.topology_name("v6e-256")[0] == "v6e:16x16"
  assert aot.topology_name("v5e-16")[0] == "v5e:4x4"
  assert aot.topology_name("v5p:2x2x1")[0] == "v5p:2x2x1"
  with pytest.raises(ConfigError, match="v5p slices come in sizes"):
    aot.topology_name("v5p-12")
  with pytest.raises(ConfigError, match="expected GEN-N"):
    aot.topology_name("h100-8")


def test_command_errors(capsys):
  code, _, err = _main(capsys, "--topology=v9-8")
  assert code == 2 and "expected GEN-N" in err
  code, _, err = _main(capsys, "--topology=v5p-8", "--config.train.global_batch_size=2")
  assert code == 2 and "split over 4 devices" in err
  # the launcher's run-only flags are not the compile command's (it would ignore them)
  code, _, err = _main(capsys, "--topology=v5p-8", "--workdir=/tmp/x")
  assert code == 2 and "Unknown command line flag 'workdir'" in err


def test_a_step_that_does_not_fit_says_what_to_change(report, capsys, monkeypatch):
  _, r = report
  small = aot.Chip(r.peak_bytes / 2, r.chip.peak_flops, r.chip.hbm_bandwidth, 2)
  monkeypatch.setattr(aot, "compile_step", lambda *a: dataclasses.replace(r, chip=small))
  code, out, err = _main(capsys, "--topology=v5p-8")
  assert code == 3 and "(DOES NOT FIT)" in out
  assert "does not fit: 2.00x the chip's HBM" in err and "remat_policy=full" in err


def test_advice_names_only_changes_the_config_allows():
  config = launch.load_experiment(EXP)
  config.train.global_batch_size = 256
  # the Talker on v6e-256: one row per device, fsdp already over every non-expert device
  full = aot.advice(dict(data=1, fsdp=32, expert=8, context=1, tensor=1), config)
  assert "more fsdp" not in full and "grad_accum_steps" not in full
  assert "remat_policy=full" in full and "mesh.context" in full
  roomy = aot.advice(dict(data=2, fsdp=4, expert=2, context=1, tensor=1), config)
  assert "move data into fsdp" in roomy and "grad_accum_steps=2" in roomy
  config.model.impl.remat_policy = "full"
  assert "remat_policy" not in aot.advice(dict(data=1, fsdp=8), config)
