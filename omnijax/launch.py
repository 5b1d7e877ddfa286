"""Launch an experiment.

    python -m omnijax.launch --exp=NAME[:ARGS] [--workdir=DIR] [--config.some.field=value ...]
    python -m omnijax.launch --exp=NAME[:ARGS] --workdir=DIR --mode=eval [--step=N]
    python -m omnijax.launch --exp=NAME[:ARGS] --host_malloc=tbbmalloc   # CPU: no per-step page faults

NAME is a module ``experiments.NAME`` (or a path to a ``.py`` file) whose ``get_config(arg)``
returns a ConfigDict; ARGS are its comma-separated ``key=value`` arguments, e.g.
``--exp=ablation:arm=omni,seed=1,local`` (big_vision's ``config.py:arg`` + ``parse_arg``).
``--mode=eval`` runs the experiment's evaluators on the run in ``--workdir`` (its newest or
``--step`` checkpoint). Started as one of several processes (SLURM, Open MPI, a multi-host TPU
slice, or ``JAX_COORDINATOR_ADDRESS`` set) it calls ``jax.distributed.initialize()`` first; a
job started by hand (e.g. two processes on one machine) sets ``JAX_COORDINATOR_ADDRESS``
(host:port of process 0), ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` in each process.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
from pathlib import Path

EXPERIMENTS_DIR = Path(__file__).resolve().parent.parent / "experiments"
NOT_EXPERIMENTS = ("recipe",)  # shared modules of the experiments package


def available_experiments() -> list[str]:
  return sorted(
    p.stem
    for p in EXPERIMENTS_DIR.glob("*.py")
    if not p.stem.startswith("_") and p.stem not in NOT_EXPERIMENTS
  )


def load_experiment(exp: str):
  """'NAME[:ARGS]' -> the experiment's config; mistakes become ConfigErrors."""
  from omnijax.errors import ConfigError

  name, _, arg = exp.partition(":")
  if name.endswith(".py"):
    if not Path(name).exists():
      raise ConfigError(f"experiment file {name} does not exist.")
    spec = importlib.util.spec_from_file_location(f"omnijax_experiment_{Path(name).stem}", name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
  elif name in available_experiments():
    module = importlib.import_module(f"experiments.{name}")
  else:
    raise ConfigError(
      f"unknown experiment {name!r}; available experiments (in "
      f"{EXPERIMENTS_DIR}): {', '.join(available_experiments())}."
    )
  try:
    return module.get_config(arg or None)
  except (ValueError, KeyError, TypeError) as e:
    raise ConfigError(f"experiment {name}: {e}") from e


def _multi_process() -> bool:
  env = os.environ
  if env.get("JAX_COORDINATOR_ADDRESS") or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return True
  for var in ("JAX_NUM_PROCESSES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    if int(env.get(var, "1") or 1) > 1:
      return True
  return len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1


def _distributed_args() -> dict[str, int]:
  """What jax.distributed.initialize() takes from JAX_NUM_PROCESSES / JAX_PROCESS_ID: jax reads
  JAX_COORDINATOR_ADDRESS itself but detects the other two only on clusters it knows."""
  names = dict(num_processes="JAX_NUM_PROCESSES", process_id="JAX_PROCESS_ID")
  return {arg: int(os.environ[var]) for arg, var in names.items() if os.environ.get(var)}


def _split_exp(argv: list[str]) -> tuple[list[str], str]:
  """Takes --exp=NAME[:ARGS] out of argv; returns (the other arguments, exp)."""
  out, exp = [], None
  it = iter(argv)
  for a in it:
    if a == "--exp":
      exp = next(it, "")
    elif a.startswith("--exp="):
      exp = a.split("=", 1)[1]
    else:
      out.append(a)
  if not exp:
    from omnijax.errors import ConfigError

    raise ConfigError(
      f"--exp=NAME is required; available experiments: {', '.join(available_experiments())}."
    )
  return out, exp


def check_overrides(config, argv: list[str]) -> None:
  """Every --config.a.b=v must name an existing field (ml_collections says only 'KeyError')."""
  import difflib
  from omnijax.errors import ConfigError

  for a in argv:
    if not a.startswith("--config."):
      continue
    path = a[len("--config.") :].split("=", 1)[0].split(".")
    node = config
    for depth, key in enumerate(path):
      fields = list(node.keys()) if hasattr(node, "keys") else []
      if key not in fields:
        where = ".".join(["config"] + path[:depth])
        close = difflib.get_close_matches(key, fields, n=1)
        hint = f" Did you mean {where}.{close[0]}?" if close else ""
        raise ConfigError(
          f"--config.{'.'.join(path)}: {where} has no field {key!r}.{hint} "
          f"Its fields: {sorted(fields)}."
        )
      node = node[key]


def experiment_flags(config):
  """A fresh set of flags with only --config (the experiment and its --config.* overrides), for
  every command that takes an experiment; fresh per call, so a command can run more than once
  in a process."""
  from absl import flags
  from ml_collections import config_flags

  fv = flags.FlagValues()
  config_flags.DEFINE_config_dict(
    "config", config, "Experiment config (from --exp).", flag_values=fv, lock_config=True
  )
  return fv


def _define_flags(config):
  """The launcher's flags: the experiment's, and those of running it."""
  from absl import flags

  from omnijax import hostmem

  fv = experiment_flags(config)
  flags.DEFINE_string(
    "workdir",
    None,
    "Where checkpoints, metrics and TensorBoard events go (default: workdirs/<experiment>).",
    flag_values=fv,
  )
  flags.DEFINE_enum(
    "mode",
    "train",
    ["train", "eval"],
    "train, or run the evaluators on the run in --workdir.",
    flag_values=fv,
  )
  flags.DEFINE_integer(
    "step", None, "--mode=eval: the checkpoint step (default: newest).", flag_values=fv
  )
  flags.DEFINE_enum(
    "distributed",
    "auto",
    ["auto", "on", "off"],
    "Call jax.distributed.initialize(): auto = when started as one of several processes.",
    flag_values=fv,
  )
  flags.DEFINE_enum(
    "host_malloc",
    "system",
    list(hostmem.POLICIES),
    "CPU runs: retain (glibc, one arena) or tbbmalloc (oneTBB's allocator; the launcher "
    "restarts itself under it) keep freed host memory in the process, so XLA:CPU's per-step "
    "temporaries take no page faults (faster steps, a larger resident set); see "
    "omnijax/hostmem.py.",
    flag_values=fv,
  )
  return fv


def default_workdir(exp: str) -> str:
  return str(
    Path("workdirs") / exp.replace(":", "_").replace("/", "_").replace(",", "_").replace("=", "-")
  )


def main(argv: list[str] | None = None) -> int:
  """Runs the launch command line; returns the exit code (2 for a configuration mistake)."""
  from omnijax.errors import ConfigError

  command = None if argv is not None else list(sys.argv)  # the process's own command line
  argv = list(sys.argv if argv is None else argv)
  try:
    argv, exp = _split_exp(argv)
    config = load_experiment(exp)
    check_overrides(config, argv)
    sys.argv = argv  # ml_collections registers the --config.* overrides it finds in sys.argv
    FLAGS = _define_flags(config)
    try:
      FLAGS(argv)
    except Exception as e:  # absl/ml_collections report bad flags and overrides this way
      raise ConfigError(str(e)) from e
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("omnijax").setLevel(logging.INFO)
    from omnijax import hostmem

    if command is not None:  # oneTBB's allocator replaces malloc from the process's start
      hostmem.restart_under(FLAGS.host_malloc, ["-m", "omnijax.launch", *command[1:]])
    hostmem.set_policy(FLAGS.host_malloc)
    import jax

    if FLAGS.distributed == "on" or (FLAGS.distributed == "auto" and _multi_process()):
      jax.distributed.initialize(**_distributed_args())

    from omnijax.train import trainer

    workdir = FLAGS.workdir or default_workdir(exp)
    if FLAGS.config.get("task") == "codec":
      from omnijax.codec import train as codec_train

      if FLAGS.mode == "eval":
        raise ConfigError("--mode=eval: evaluate a codec run with benchmarks/codec.py.")
      codec_train.train(FLAGS.config, workdir)
    elif FLAGS.mode == "eval":
      trainer.evaluate_workdir(workdir, FLAGS.config, FLAGS.step)
    else:
      trainer.train(FLAGS.config, workdir)
  except ConfigError as e:
    print(f"omnijax.launch: config error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
