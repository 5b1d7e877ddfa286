"""Launch an experiment.

    python -m omnijax.launch --exp=NAME[:ARG] [--workdir=DIR] [--config.some.field=value ...]

NAME is a file ``experiments/NAME.py`` (or a path to one) whose ``get_config(arg)`` returns a
ConfigDict; ``:ARG`` selects a variant such as ``local`` (big_vision's ``config.py:arg``).
Started as one of several processes (SLURM, Open MPI, a multi-host TPU slice, or
``JAX_COORDINATOR_ADDRESS`` set) it calls ``jax.distributed.initialize()`` first.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

EXPERIMENTS_DIR = Path(__file__).resolve().parent.parent / "experiments"


def available_experiments() -> list[str]:
  return sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.py") if not p.stem.startswith("_"))


def resolve_experiment(exp: str) -> tuple[Path, str | None]:
  """'NAME[:ARG]' -> (path of experiments/NAME.py, ARG)."""
  from omnijax.errors import ConfigError
  name, _, arg = exp.partition(":")
  path = Path(name) if name.endswith(".py") else EXPERIMENTS_DIR / f"{name}.py"
  if not path.exists():
    raise ConfigError(f"unknown experiment {name!r}; available experiments in {EXPERIMENTS_DIR}: "
                      f"{', '.join(available_experiments())}.")
  return path, arg or None


def _multi_process() -> bool:
  env = os.environ
  if env.get("JAX_COORDINATOR_ADDRESS") or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return True
  for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    if int(env.get(var, "1") or 1) > 1:
      return True
  return len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1


def _rewrite_argv(argv: list[str]) -> tuple[list[str], str]:
  """Turns --exp=NAME[:ARG] into ml_collections' --config=PATH[:ARG]; returns (argv, exp)."""
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
    raise ConfigError("--exp=NAME is required; available experiments: "
                      f"{', '.join(available_experiments())}.")
  path, arg = resolve_experiment(exp)
  check_overrides(load_experiment(path, arg), out)
  out.insert(1, f"--config={path}" + (f":{arg}" if arg else ""))
  return out, exp


def load_experiment(path: Path, arg: str | None):
  """Calls the experiment's get_config(arg); mistakes become ConfigErrors."""
  import importlib.util
  from omnijax.errors import ConfigError
  spec = importlib.util.spec_from_file_location(f"omnijax_experiment_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  try:
    return module.get_config(arg) if arg is not None else module.get_config()
  except (ValueError, KeyError, TypeError) as e:
    raise ConfigError(f"experiment {path.stem}: {e}") from e


def check_overrides(config, argv: list[str]) -> None:
  """Every --config.a.b=v must name an existing field (ml_collections says only 'KeyError')."""
  import difflib
  from omnijax.errors import ConfigError
  for a in argv:
    if not a.startswith("--config."):
      continue
    path = a[len("--config."):].split("=", 1)[0].split(".")
    node = config
    for depth, key in enumerate(path):
      fields = list(node.keys()) if hasattr(node, "keys") else []
      if key not in fields:
        where = ".".join(["config"] + path[:depth])
        close = difflib.get_close_matches(key, fields, n=1)
        hint = f" Did you mean {where}.{close[0]}?" if close else ""
        raise ConfigError(f"--config.{'.'.join(path)}: {where} has no field {key!r}.{hint} "
                          f"Its fields: {sorted(fields)}.")
      node = node[key]


def _define_flags():
  """A fresh set of flags per call, so main() can run more than once in a process."""
  from absl import flags
  from ml_collections import config_flags
  fv = flags.FlagValues()
  flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and TensorBoard events go "
                      "(default: workdirs/<experiment>).", flag_values=fv)
  flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                    "Call jax.distributed.initialize(): auto = when started as one of several "
                    "processes.", flag_values=fv)
  config_flags.DEFINE_config_file("config", None, "Experiment config (set through --exp).",
                                  flag_values=fv, lock_config=True)
  return fv


def main(argv: list[str] | None = None) -> int:
  """Runs the launch command line; returns the exit code (2 for a configuration mistake)."""
  from omnijax.errors import ConfigError
  argv = list(sys.argv if argv is None else argv)
  try:
    argv, exp = _rewrite_argv(argv)
    FLAGS = _define_flags()
    sys.argv = argv  # ml_collections finds --config.* overrides in sys.argv
    try:
      FLAGS(argv)
    except Exception as e:  # absl/ml_collections report bad flags and overrides this way
      raise ConfigError(str(e)) from e
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("omnijax").setLevel(logging.INFO)

    import jax
    if FLAGS.distributed == "on" or (FLAGS.distributed == "auto" and _multi_process()):
      jax.distributed.initialize()

    from omnijax.train import trainer
    workdir = FLAGS.workdir or str(Path("workdirs") / exp.replace(":", "_").replace("/", "_"))
    trainer.train(FLAGS.config, workdir)
  except ConfigError as e:
    print(f"omnijax.launch: config error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
