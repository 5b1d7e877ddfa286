"""The three-stage pretraining chain, stage after stage, each from the previous one's params.

    python -m omnijax.chain --root=workdirs/chain_local --local [--config.x=y ...]
    python -m omnijax.chain --root=gs://BUCKET/chain --stages=s2_general,s3_long_context
    python -m omnijax.chain --root=DIR --dry_run     # commands, trained/frozen params, memory

Stages (``experiments.recipe.CHAIN``): s1_adapters and s1_encoders (encoder alignment, LLM
frozen), s2_general, s3_long_context. Each runs ``python -m omnijax.launch --exp=EXP
--workdir=ROOT/STAGE --config.train.init_from=ROOT/PREVIOUS_STAGE`` in a fresh process; a
finished stage is re-launched as a no-op and an interrupted one resumes, so the chain is
resumable by running it again.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from experiments.recipe import CHAIN
from omnijax import paths
from omnijax.errors import ConfigError
from omnijax.launch import load_experiment

ADAM_STATE_BYTES = 8  # two float32 moments per trained parameter


def plan(root: str, local: bool, stages: list[str] | None) -> list[tuple[str, str, list[str]]]:
  """[(stage, exp, launch arguments)] of the stages to run."""
  names = [name for name, _ in CHAIN]
  unknown = sorted(set(stages or []) - set(names))
  if unknown:
    raise ConfigError(f"unknown stage(s) {unknown}; the chain's stages: {names}.")
  out = []
  for i, (name, exp) in enumerate(CHAIN):
    if stages and name not in stages:
      continue
    if local:
      exp += ",local" if ":" in exp else ":local"
    load_experiment(exp)
    args = [f"--exp={exp}", f"--workdir={paths.path(root) / name}"]
    if i:
      args.append(f"--config.train.init_from={paths.path(root) / CHAIN[i - 1][0]}")
    out.append((name, exp, args))
  return out


def param_report(exp: str) -> str:
  """Trained / frozen parameters of a stage and its AdamW state (abstract: nothing allocated)."""
  from omnijax.models.config import ThinkerConfig
  from omnijax.models.thinker import Thinker
  from omnijax.train import optimizer, step

  config = load_experiment(exp)
  model = Thinker(ThinkerConfig.from_dict(config.model))
  counts = optimizer.check_partition(config.optim, step.abstract_params(model))
  trained, frozen = counts[optimizer.TRAIN], counts[optimizer.FROZEN]
  saved = frozen * ADAM_STATE_BYTES
  return (
    f"trained {trained / 1e9:.3f}B, frozen {frozen / 1e9:.3f}B params; AdamW state "
    f"{trained * ADAM_STATE_BYTES / 2**30:.1f} GiB ({saved / 2**30:.1f} GiB less than "
    "training everything)"
  )


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m omnijax.chain",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument("--root", required=True, help="one workdir per stage below this")
  parser.add_argument("--local", action="store_true", help="the stages' local variants")
  parser.add_argument("--stages", default="", help="comma-separated subset (default: all)")
  parser.add_argument(
    "--dry_run", action="store_true", help="print commands and parameter counts; run nothing"
  )
  args, overrides = parser.parse_known_args(argv)
  try:
    paths.check_reachable(args.root, "--root")
    stages = plan(args.root, args.local, [s for s in args.stages.split(",") if s])
  except ConfigError as e:
    print(f"omnijax.chain: config error: {e}", file=sys.stderr)
    return 2
  for name, exp, launch_args in stages:
    cmd = [sys.executable, "-m", "omnijax.launch", *launch_args, *overrides]
    print(f"[{name}] {' '.join(cmd[1:])}", flush=True)
    if args.dry_run:
      print(f"[{name}] {param_report(exp)}", flush=True)
      continue
    code = subprocess.call(cmd)
    if code:
      print(f"[{name}] failed with exit code {code}", file=sys.stderr)
      return code
  return 0


if __name__ == "__main__":
  sys.exit(main())
