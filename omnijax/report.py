"""A sweep's report: a markdown table (metric x arm, mean +- spread over seeds) and plots.

    python -m omnijax.report --sweep=workdirs/ablation_local --out=docs/ablation_local

Reads ROOT/sweep.json (written by `omnijax.sweep`) and each run's metrics.jsonl. Runs are
grouped by their grid arguments other than `seed`; a metric's value is its last logged one
(the evaluators' final pass). The spread is the standard deviation over seeds (ddof=1). For the
modality ablation (arms text / vision / omni) the report also states, claim by claim, whether
the differences agree with seed 004's findings, with the spread.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

import numpy as np

from omnijax import paths

SWEEP_JSON = "sweep.json"


def load_sweep(root: paths.PathLike) -> dict:
  """{"runs": [{name, args, workdir, metrics: {step: {...}}}], ...} of a sweep directory."""
  root = paths.path(root)
  path = root / SWEEP_JSON
  if not path.exists():
    raise FileNotFoundError(f"{path} not found: run `python -m omnijax.sweep --root={root}` first.")
  sweep = json.loads(path.read_text())
  for run in sweep["runs"]:
    run["metrics"] = read_metrics(run["workdir"])
  return sweep


def read_metrics(workdir: paths.PathLike) -> dict[int, dict]:
  """step -> every scalar logged at that step (train and eval lines merged)."""
  out: dict[int, dict] = defaultdict(dict)
  path = paths.path(workdir) / "metrics.jsonl"
  if path.exists():
    for line in path.read_text().splitlines():
      m = json.loads(line)
      out[m.pop("step")].update(m)
  return dict(out)


def final(run: dict) -> dict[str, float]:
  """The last logged value of every metric of a run."""
  out = {}
  for step in sorted(run["metrics"]):
    out.update(run["metrics"][step])
  out.pop("time", None)
  return out


def arm_of(run: dict) -> str:
  return ",".join(f"{k}={v}" for k, v in run["args"].items() if k != "seed") or "all"


def summarize(sweep: dict, prefix: str = "eval/") -> tuple[list[str], dict]:
  """(arms, {metric: {arm: values over seeds}}) of the metrics starting with `prefix`."""
  arms, table = [], defaultdict(dict)
  for run in sweep["runs"]:
    arm = arm_of(run)
    if arm not in arms:
      arms.append(arm)
    for k, v in final(run).items():
      if k.startswith(prefix):
        table[k].setdefault(arm, []).append(v)
  return arms, dict(sorted(table.items()))


def mean_spread(values) -> tuple[float, float]:
  v = np.asarray(values, float)
  return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


# Seed 004's findings as comparisons of arms (metric, better arm, baseline arm, lower is better).
CLAIMS = (
  (
    "No text degradation from early multimodal mixing: omni's held-out text loss is not above "
    "text-only's",
    "eval/heldout/loss/text",
    "omni",
    "text",
    "not_worse",
  ),
  (
    "... nor on the scene sentences stated as text",
    "eval/heldout/loss/scene_text",
    "omni",
    "text",
    "not_worse",
  ),
  ("... nor for the vision arm", "eval/heldout/loss/text", "vision", "text", "not_worse"),
  (
    "Audio helps vision: omni's held-out image caption loss is below vision-only's",
    "eval/heldout/loss/image",
    "omni",
    "vision",
    "better",
  ),
  (
    "Audio helps vision: omni's held-out (silent) video description loss is below vision-only's",
    "eval/heldout/loss/video",
    "omni",
    "vision",
    "better",
  ),
  (
    "Audio helps vision: omni describes held-out images more accurately (objects right)",
    "eval/image_scenes/objects",
    "omni",
    "vision",
    "better_higher",
  ),
)


CAVEATS = (
  "Read with care: equal passes over every modality's data make an arm with more data train "
  "more steps (the train steps row), so part of a lower loss is more optimisation of the "
  "shared parameters. The seed's claim that text helps vision and audio needs an arm without "
  "text, which Table 16's design (and this sweep) does not have: it is not tested here."
)


def judge(table: dict, metric: str, a: str, b: str, kind: str) -> str | None:
  arm = lambda name: next((k for k in table.get(metric, {}) if k == f"arm={name}"), None)
  ka, kb = arm(a), arm(b)
  if ka is None or kb is None:
    return None
  (ma, sa), (mb, sb) = mean_spread(table[metric][ka]), mean_spread(table[metric][kb])
  spread = float(np.hypot(sa, sb))
  diff = ma - mb
  higher_better = kind == "better_higher"
  gain = -diff if not higher_better else diff
  detail = (
    f"{a} {ma:.4f} +- {sa:.4f} vs {b} {mb:.4f} +- {sb:.4f} (difference {diff:+.4f}, "
    f"combined spread {spread:.4f})"
  )
  if kind == "not_worse":
    verdict = "agrees" if gain >= -spread else "disagrees: worse by more than the spread"
  elif abs(gain) <= spread:
    verdict = "inconclusive: the difference is within the seed spread"
  else:
    verdict = "agrees" if gain > 0 else "disagrees: the opposite direction"
  return f"{verdict}; {detail}"


def plot(sweep: dict, arms: list[str], table: dict, out: paths.epath.Path) -> list[str]:
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  files = []
  curves = ("loss", "loss/text", "loss/image", "loss/audio")
  fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.4))
  for ax, key in zip(axes, curves):
    for arm in arms:
      runs = [r for r in sweep["runs"] if arm_of(r) == arm]
      for i, run in enumerate(runs):
        steps = [s for s in sorted(run["metrics"]) if key in run["metrics"][s]]
        if steps:
          color = f"C{arms.index(arm)}"
          ax.plot(
            steps,
            [run["metrics"][s][key] for s in steps],
            color=color,
            alpha=0.7,
            label=arm if i == 0 else None,
          )
    ax.set_title(f"train {key}")
    ax.set_xlabel("step")
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  with (out / "learning_curves.png").open("wb") as f:
    fig.savefig(f, format="png", dpi=110)
  plt.close(fig)
  files.append("learning_curves.png")

  metrics = [m for m in table if not m.endswith(("/tokens", "/examples")) and "/tokens/" not in m]
  cols = 4
  rows = -(-len(metrics) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
  for ax, metric in zip(axes.flat, metrics):
    for i, arm in enumerate(arms):
      values = table[metric].get(arm)
      if values:
        m, s = mean_spread(values)
        ax.bar(i, m, yerr=s, color=f"C{i}", capsize=3)
        ax.scatter([i] * len(values), values, color="k", s=8, zorder=3)
    ax.set_xticks(range(len(arms)), [a.replace("arm=", "") for a in arms], fontsize=8)
    ax.set_title(metric.replace("eval/", ""), fontsize=9)
  for ax in list(axes.flat)[len(metrics) :]:
    ax.axis("off")
  fig.tight_layout()
  with (out / "eval_metrics.png").open("wb") as f:
    fig.savefig(f, format="png", dpi=110)
  plt.close(fig)
  files.append("eval_metrics.png")
  return files


def write_report(root: paths.PathLike, out: paths.PathLike, command: str = "") -> paths.epath.Path:
  sweep = load_sweep(root)
  out = paths.path(out)
  out.mkdir(parents=True, exist_ok=True)
  arms, table = summarize(sweep)
  if not table:
    raise ValueError(
      f"no run of {root} logged evaluator metrics (eval/...): let the runs "
      "finish (their evaluators run at the end)."
    )
  seeds = {arm: sum(arm_of(r) == arm for r in sweep["runs"]) for arm in arms}
  lines = [f"# Sweep report: `{sweep['exp']}`", ""]
  if command:
    lines += ["Produced by:", "", "```bash", command, "```", ""]
  lines += [
    f"Runs: {len(sweep['runs'])} ({', '.join(f'{a}: {n} seeds' for a, n in seeds.items())}"
    "). Values: mean +- standard deviation over seeds of each metric's final value.",
    "",
  ]
  steps = {
    arm: [max(r["metrics"]) for r in sweep["runs"] if arm_of(r) == arm and r["metrics"]]
    for arm in arms
  }
  lines += ["| metric | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]
  lines.append(
    "| train steps | "
    + " | ".join(f"{int(np.mean(steps[a]))}" if steps[a] else "-" for a in arms)
    + " |"
  )
  for metric, by_arm in table.items():
    cells = []
    for arm in arms:
      if arm in by_arm:
        m, s = mean_spread(by_arm[arm])
        cells.append(f"{m:.4f} +- {s:.4f}")
      else:
        cells.append("-")
    lines.append(f"| {metric.replace('eval/', '')} | " + " | ".join(cells) + " |")
  verdicts = [(claim, judge(table, metric, a, b, kind)) for claim, metric, a, b, kind in CLAIMS]
  verdicts = [(c, v) for c, v in verdicts if v]
  if verdicts:
    lines += ["", "## Seed 004's findings, claim by claim", ""]
    lines += [f"- {claim}: **{verdict}**" for claim, verdict in verdicts]
    lines += ["", CAVEATS]
  files = plot(sweep, arms, table, out)
  lines += [""] + [f"![{f}]({f})" for f in files]
  path = out / "report.md"
  path.write_text("\n".join(lines) + "\n")
  return path


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m omnijax.report",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument("--sweep", required=True, help="the sweep's root directory")
  parser.add_argument(
    "--out", default=None, help="where report.md and the plots go (default: SWEEP/report)"
  )
  parser.add_argument(
    "--command", default="", help="the command that produced the sweep, quoted in the report"
  )
  args = parser.parse_args(argv)
  try:
    path = write_report(args.sweep, args.out or paths.path(args.sweep) / "report", args.command)
  except (FileNotFoundError, ValueError) as e:
    print(f"omnijax.report: {e}", file=sys.stderr)
    return 2
  print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
