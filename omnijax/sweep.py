"""Run an experiment over a grid of arguments, one workdir per run, resumable.

    python -m omnijax.sweep --exp=ablation:local --grid=seed=0,1,2 --grid=arm=text,vision,omni \
        --root=workdirs/ablation_local [--report=docs/ablation_local] [--config.x=y ...]

Each grid point runs ``python -m omnijax.launch --exp=NAME:ARGS,KEY=VALUE,... --workdir=
ROOT/KEY-VALUE_...`` in a fresh process, one after another, so a run that finished is
re-launched as a no-op and an interrupted one resumes from its last checkpoint. The runs'
evaluators run at their end; ``ROOT/sweep.json`` lists the runs for ``omnijax.report``, which
``--report=DIR`` runs once every run has finished.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time

from omnijax import paths
from omnijax.errors import ConfigError
from omnijax.launch import load_experiment

SWEEP_JSON = "sweep.json"


def grid_points(grid: list[str]) -> list[dict[str, str]]:
  """['arm=a,b', 'seed=0,1'] -> [{arm: a, seed: 0}, {arm: a, seed: 1}, ...]."""
  axes = []
  for g in grid:
    key, eq, values = g.partition("=")
    if not eq or not values:
      raise ConfigError(f"--grid={g!r} must be KEY=V1,V2,...")
    axes.append([(key, v) for v in values.split(",")])
  return [dict(p) for p in itertools.product(*axes)]


def run_name(point: dict[str, str]) -> str:
  return "_".join(f"{k}-{v}" for k, v in point.items())


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m omnijax.sweep",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument("--exp", required=True, help="NAME[:ARGS] the grid's arguments extend")
  parser.add_argument("--grid", action="append", default=[], help="KEY=V1,V2,... (repeatable)")
  parser.add_argument("--root", required=True, help="one workdir per run below this")
  parser.add_argument("--dry_run", action="store_true", help="print the commands only")
  parser.add_argument(
    "--report",
    default="",
    help="when every run finished, write the report (omnijax.report) to this directory",
  )
  args, overrides = parser.parse_known_args(argv)
  try:
    points = grid_points(args.grid)
    name, _, base = args.exp.partition(":")
    runs = []
    for point in points:
      exp = f"{name}:" + ",".join(filter(None, [base] + [f"{k}={v}" for k, v in point.items()]))
      load_experiment(exp)  # a bad arm or argument fails here, before anything runs
      runs.append(
        dict(
          name=run_name(point),
          exp=exp,
          args=point,
          workdir=os.fspath(paths.path(args.root) / run_name(point)),
        )
      )
    root = paths.check_reachable(args.root, "--root")
  except ConfigError as e:
    print(f"omnijax.sweep: config error: {e}", file=sys.stderr)
    return 2
  root.mkdir(parents=True, exist_ok=True)
  (root / SWEEP_JSON).write_text(
    json.dumps(dict(exp=args.exp, grid=args.grid, overrides=overrides, runs=runs), indent=2)
  )
  for i, run in enumerate(runs, 1):
    cmd = [
      sys.executable,
      "-m",
      "omnijax.launch",
      f"--exp={run['exp']}",
      f"--workdir={run['workdir']}",
      *overrides,
    ]
    print(f"[{i}/{len(runs)}] {' '.join(cmd[1:])}", flush=True)
    if args.dry_run:
      continue
    start = time.time()
    code = subprocess.call(cmd)
    print(
      f"[{i}/{len(runs)}] {run['name']}: exit {code} after {time.time() - start:.0f} s", flush=True
    )
    if code:
      return code
  if args.report and not args.dry_run:
    from omnijax import report  # pylint: disable=import-outside-toplevel

    command = " ".join(["python -m omnijax.sweep", *(argv if argv is not None else sys.argv[1:])])
    print(report.write_report(root, args.report, command), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
