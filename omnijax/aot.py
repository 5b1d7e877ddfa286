"""Ahead-of-time compilation of an experiment's train step for a TPU topology, on this host.

    pip install -e ".[tpu]"   # libtpu: XLA compiles for TPUs without one
    python -m omnijax.aot --exp=pretrain_general --topology=v5p-256 [--slices=2] \\
        [--config.some.field=value ...]

builds the experiment's model, optimizer, mesh and largest batch exactly as training does
(`trainer.train_program`, `data_pipelines.omni.batch_spec`) from abstract values (nothing is
materialised, no data is read), compiles the jitted train step for the topology's devices
(`jax.experimental.topologies`; MaxText's train_compile.py does the same), and prints per
device the argument / output / temporary bytes against the chip's HBM, the step's FLOPs (the
analytic count of MFU, and XLA's, which counts a scanned layer stack once) and a roofline
estimate: compute time = analytic FLOPs / peak, memory time = XLA's bytes accessed scaled by
the same undercount / HBM bandwidth; MFU at most compute / max(compute, memory).

Topologies: `v5p-N`, `v4-N` (N TensorCores, N/2 chips), `v5e-N`, `v6e-N` (N chips), or an XLA
topology name such as `v5p:4x4x8`; `--slices=K` compiles for K such slices over DCN (the
experiment's mesh.dcn then spans them). Exit status 3 when the step does not fit, with what to
change.
"""

from __future__ import annotations

import dataclasses
import os
import sys

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Chip:
  hbm_bytes: float
  peak_flops: float  # bf16 dense, per chip
  hbm_bandwidth: float  # bytes / s
  cores_per_chip: int  # TensorCores a slice name counts (v4-8, v5p-8: 4 chips)


# Google Cloud's published per-chip figures.
CHIPS = {
  "v4": Chip(32 * GIB, 275e12, 1.2e12, 2),
  "v5e": Chip(16 * GIB, 197e12, 0.82e12, 1),
  "v5p": Chip(95 * GIB, 459e12, 2.76e12, 2),
  "v6e": Chip(32 * GIB, 918e12, 1.64e12, 1),
}
# chips -> the slice's physical shape (2-D tori for v5e / v6e, 3-D for v4 / v5p)
SHAPES_3D = {
  4: "2x2x1",
  8: "2x2x2",
  16: "2x2x4",
  32: "2x4x4",
  64: "4x4x4",
  128: "4x4x8",
  256: "4x8x8",
  512: "8x8x8",
  1024: "8x8x16",
  2048: "8x16x16",
  4096: "16x16x16",
}
SHAPES_2D = {
  1: "1x1",
  4: "2x2",
  8: "2x4",
  16: "4x4",
  32: "4x8",
  64: "8x8",
  128: "8x16",
  256: "16x16",
}


# What the lowered step holds when a kernel path is taken (model.impl.attention / moe_impl /
# moe_exchange).
KERNELS = {
  "splash attention (Pallas Mosaic)": "tpu_custom_call",
  "ragged_dot MoE": "ragged_dot",
  "ragged all-to-all expert exchange": "@ragged_all_to_all",
}


def topology_name(topology: str) -> tuple[str, Chip]:
  """'v5p-256' (or 'v5p:4x4x8') -> ('v5p:4x4x8', the chip)."""
  from omnijax.errors import ConfigError

  gen, sep, size = topology.partition(":" if ":" in topology else "-")
  if gen not in CHIPS or not sep:
    raise ConfigError(
      f"--topology={topology!r}: expected GEN-N or GEN:AxBxC with GEN one of {sorted(CHIPS)} "
      "(e.g. v5p-256, v6e-256, v5e-16, v5p:4x4x8)."
    )
  chip = CHIPS[gen]
  if sep == ":":
    return topology, chip
  shapes = SHAPES_3D if gen in ("v4", "v5p") else SHAPES_2D
  if (
    not size.isdigit()
    or int(size) % chip.cores_per_chip
    or (int(size) // chip.cores_per_chip not in shapes)
  ):
    sizes = sorted(n * chip.cores_per_chip for n in shapes)
    raise ConfigError(f"--topology={topology!r}: {gen} slices come in sizes {sizes}.")
  return f"{gen}:{shapes[int(size) // chip.cores_per_chip]}", chip


def topology_devices(topology: str, slices: int = 1):
  """The devices of `slices` slices of a TPU topology, for compiling only (needs libtpu)."""
  from jax.experimental import topologies

  from omnijax.errors import ConfigError

  name, chip = topology_name(topology)
  # Loads libtpu in this process even while another on this host (a run) holds its lockfile.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    desc = topologies.get_topology_desc(platform="tpu", topology_name=name, num_slices=slices)
  except Exception as e:  # noqa: BLE001  (no libtpu: a RuntimeError, or an unknown platform)
    raise ConfigError(
      f"cannot describe TPU topology {name} ({type(e).__name__}: {e}); install libtpu "
      '(pip install -e ".[tpu]") to compile for TPUs on this host.'
    ) from e
  return desc.devices, chip


def abstract_batch(config, model_cfg, talker_cfg, mesh, rules):
  """The experiment's largest global batch as sharded ShapeDtypeStructs."""
  import jax
  import numpy as np

  from data_pipelines import omni
  from omnijax.processing import batch as batch_lib
  from omnijax.train import step as step_lib

  d, rows = config.data, config.train.global_batch_size
  if d.kind == "omni":
    spec = omni.batch_spec(d, model_cfg, rows, d.seq_len, talker_cfg)
  else:
    spec = {
      k: ((rows, 3, d.seq_len) if k == "positions" else (rows, d.seq_len), np.dtype(t))
      for k, t in batch_lib.TOKEN_FIELDS.items()
    }
  shapes = {k: jax.ShapeDtypeStruct(s, t) for k, (s, t) in spec.items()}
  shardings = step_lib.batch_shardings(shapes, mesh, rules)
  return {
    k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k]) for k, v in shapes.items()
  }


class DoesNotFit(Exception):
  """XLA refused to compile the step: its buffers exceed the chip's HBM."""

  def __init__(self, message: str, mesh: dict):
    super().__init__(message)
    self.mesh = mesh


@dataclasses.dataclass
class Report:
  topology: str
  devices: int
  mesh: dict
  chip: Chip
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  xla_flops: float  # per device
  xla_bytes: float  # per device
  analytic_flops: float  # per device
  tokens: int
  compile_seconds: float
  kernels: tuple[str, ...] = ()

  @property
  def peak_bytes(self) -> int:
    """Live at once: arguments (the donated state is updated in place) + outputs not aliased
    to them + temporaries."""
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

  @property
  def fits(self) -> bool:
    return self.peak_bytes <= self.chip.hbm_bytes

  def roofline(self) -> tuple[float, float, float]:
    """(compute seconds, memory seconds, MFU bound) of one step."""
    compute = self.analytic_flops / self.chip.peak_flops
    undercount = self.analytic_flops / self.xla_flops if self.xla_flops else 1.0
    memory = self.xla_bytes * max(undercount, 1.0) / self.chip.hbm_bandwidth
    return compute, memory, compute / max(compute, memory)

  def lines(self) -> list[str]:
    g = lambda b: f"{b / GIB:.2f} GiB"
    compute, memory, mfu = self.roofline()
    step = max(compute, memory)
    return [
      f"topology {self.topology}: {self.devices} devices, mesh {self.mesh}, compiled in "
      f"{self.compile_seconds:.0f} s; kernels: {', '.join(self.kernels) or 'XLA only'}",
      f"per device: arguments {g(self.argument_bytes)} + outputs {g(self.output_bytes)} "
      f"- aliased {g(self.alias_bytes)} + temporaries {g(self.temp_bytes)} = "
      f"{g(self.peak_bytes)} of {g(self.chip.hbm_bytes)} HBM "
      f"({'fits' if self.fits else 'DOES NOT FIT'})",
      f"FLOPs per device and step: analytic {self.analytic_flops:.3e} (MFU's count), "
      f"XLA {self.xla_flops:.3e} (a scanned layer stack counted once); bytes accessed (XLA) "
      f"{self.xla_bytes:.3e}",
      f"roofline: compute {compute:.3f} s, memory {memory:.3f} s -> step >= {step:.3f} s, "
      f">= {self.tokens / step:,.0f} tokens/s per slice set, MFU <= {mfu:.2f}",
    ]


def compile_step(config, devices, chip: Chip, topology: str = "") -> Report:
  """Compiles `config`'s train step for `devices` (a TPU topology's) and measures it."""
  import time

  import jax

  from omnijax import sharding as shd
  from omnijax.models.config import ThinkerConfig
  from omnijax.train import step as step_lib
  from omnijax.train import trainer

  config.model.impl.cpu_matmul = "xla"  # oneMKL's custom calls are XLA:CPU's; this is a TPU's step
  model_cfg = ThinkerConfig.from_dict(config.model)
  rules = shd.axis_rules(config.sharding.rules)
  mesh = shd.make_mesh(config.mesh, devices)
  trainer.check_config(config, model_cfg, mesh)
  talker_cfg = trainer.talker_config(config, model_cfg)
  model = trainer.make_model(config, model_cfg, talker_cfg, mesh)
  num_tasks = len(config.data.mixture) if config.data.kind == "omni" else 0
  _, _, _, abstract_state, state_sharding, train_step = trainer.train_program(
    config, model, mesh, rules, config.train.total_steps, num_tasks
  )
  state = jax.tree.map(  # shardings first: a frozen subtree's optimizer state is an empty node
    lambda s, a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s) if hasattr(a, "shape") else a,
    state_sharding,
    abstract_state,
  )
  batch = abstract_batch(config, model_cfg, talker_cfg, mesh, rules)
  start = time.perf_counter()
  with step_lib.mesh_context(mesh, rules):
    lowered = train_step.lower(state, batch)
    hlo = lowered.as_text()
    kernels = tuple(name for name, mark in KERNELS.items() if mark in hlo)
    try:
      compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001  (XlaRuntimeError: RESOURCE_EXHAUSTED)
      if "HbmOom" not in str(e) and "RESOURCE_EXHAUSTED" not in str(e):
        raise
      raise DoesNotFit(str(e).strip().splitlines()[0], dict(mesh.shape)) from e
  seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  n = len(devices)
  return Report(
    topology=topology,
    devices=n,
    mesh=dict(mesh.shape),
    chip=chip,
    argument_bytes=memory.argument_size_in_bytes,
    output_bytes=memory.output_size_in_bytes,
    alias_bytes=memory.alias_size_in_bytes,
    temp_bytes=memory.temp_size_in_bytes,
    xla_flops=float(cost.get("flops", 0.0)),
    xla_bytes=float(cost.get("bytes accessed", 0.0)),
    analytic_flops=trainer.training_flops(config, model_cfg, talker_cfg) / n,
    tokens=config.train.global_batch_size * config.data.seq_len,
    compile_seconds=seconds,
    kernels=kernels,
  )


def advice(mesh: dict, config) -> str:
  """What to change when the step does not fit: only the changes this config and mesh allow."""
  steps = []
  if mesh.get("data", 1) > 1:
    steps.append(f"more fsdp (mesh {mesh}: move data into fsdp, sharding parameters wider)")
  steps.append("more --config.mesh.context (split each row's sequence over more devices)")
  if config.model.impl.remat_policy != "full":
    steps.append(
      "--config.model.impl.remat_policy=full (keep only each layer's input for the backward pass)"
    )
  accum = 2 * config.train.grad_accum_steps
  batch_devices = mesh.get("data", 1) * mesh.get("fsdp", 1) * mesh.get("expert", 1)
  if config.train.global_batch_size % (accum * batch_devices) == 0:
    steps.append(f"--config.train.grad_accum_steps={accum} (a smaller microbatch per device)")
  steps.append("a bigger topology or more --slices")
  return "Try, in this order: " + ", ".join(steps) + "."


def main(argv: list[str] | None = None) -> int:
  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compiling needs no accelerator
  from absl import flags

  from omnijax import launch
  from omnijax.errors import ConfigError

  argv = list(sys.argv if argv is None else argv)
  try:
    argv, exp = launch._split_exp(argv)  # pylint: disable=protected-access
    config = launch.load_experiment(exp)
    launch.check_overrides(config, argv)
    sys.argv = argv
    fv = launch.experiment_flags(config)
    flags.DEFINE_string("topology", "v5p-8", "TPU slice, e.g. v5p-256, v6e-256.", flag_values=fv)
    flags.DEFINE_integer("slices", 1, "Slices over DCN (multi-slice).", flag_values=fv)
    try:
      fv(argv)
    except Exception as e:  # noqa: BLE001
      raise ConfigError(str(e)) from e
    devices, chip = topology_devices(fv.topology, fv.slices)
    name = fv.topology + (f" x {fv.slices} slices" if fv.slices > 1 else "")
    print(f"experiment {exp}, topology {name}: compiling the train step", flush=True)
    report = compile_step(fv.config, devices, chip, name)
  except ConfigError as e:
    print(f"omnijax.aot: config error: {e}", file=sys.stderr)
    return 2
  except DoesNotFit as e:
    print(f"omnijax.aot: does not fit: {e}\n{advice(e.mesh, fv.config)}", file=sys.stderr)
    return 3
  for line in report.lines():
    print(line)
  if not report.fits:
    over = report.peak_bytes / report.chip.hbm_bytes
    print(
      f"omnijax.aot: does not fit: {over:.2f}x the chip's HBM. {advice(report.mesh, fv.config)}",
      file=sys.stderr,
    )
    return 3
  return 0


if __name__ == "__main__":
  sys.exit(main())
