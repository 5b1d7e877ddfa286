"""Every benchmark runs: each script's `--smoke` mode (tiny sizes, a step or two) exits 0 and
prints its result lines."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NUMBER = r"-?\d+(\.\d+)?(e[-+]\d+)?"

# script -> the lines it must print (regular expressions, each matched at a line's start)
RESULTS = {
  "codec": [
    r"held-out: 2 clips",
    rf"codec \(tokenizer\) +{NUMBER} +{NUMBER} +{NUMBER} +{NUMBER} +{NUMBER}$",
    rf"  Code2Wav \(transformers\) +{NUMBER}$",
    rf"  max \|JAX - transformers\| +{NUMBER}$",
  ],
  "attention": [
    rf"heads +{h} / +{kh}: .*ratio_vs_torch={NUMBER} " for h, kh in ((8, 2), (16, 16), (8, 1))
  ],
  "data_pipeline": [
    rf"stage-2 mixture: {NUMBER} examples/s",
    rf"train step \(tiny preset, 1x512\): {NUMBER} tokens/s",
    rf"ratio_vs_train_step={NUMBER}$",
  ],
  "decode": [rf"omnijax: prefill={NUMBER}ms", rf"ratio_vs_transformers={NUMBER}$"],
  "matmul": [r"LM head +weight grad ", rf"ratio_vs_transformers={NUMBER}$"],
  "speech_generation": [
    r"first packet, batch 1 ",
    rf" +1 omnijax +{NUMBER} +{NUMBER}",
    rf" +1 transformers +{NUMBER} +{NUMBER}",
  ],
  "train_step": [
    rf"omnijax\[float32, moe=auto\]: step_time={NUMBER}s",
    rf"transformers\[experts=.*\]: step_time={NUMBER}s",
    rf"ratio_vs_transformers={NUMBER}$",
  ],
}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  """The session's OMNIJAX_CACHE (CI's, whose local corpora other tests build too), else one
  for the module's benchmarks."""
  return os.environ.get("OMNIJAX_CACHE") or tmp_path_factory.mktemp("benchmark_cache")


# codec.py reads a codec run: the session's tiny one, which the slow tests train.
@pytest.mark.parametrize(
  "script", [pytest.param(s, marks=[pytest.mark.slow] if s == "codec" else []) for s in RESULTS]
)
def test_benchmark_smoke(script, cache, request):
  args = [f"--tokenizer={request.getfixturevalue('codec_run')[0]}"] if script == "codec" else []
  env = dict(
    os.environ,
    OMNIJAX_CACHE=str(cache),
    PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    XLA_FLAGS="",  # the host's devices, as the benchmarks run
  )
  proc = subprocess.run(
    [sys.executable, f"benchmarks/{script}.py", "--smoke", *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  print(proc.stdout)
  for line in RESULTS[script]:
    assert re.search(f"^{line}", proc.stdout, re.MULTILINE), (line, proc.stdout[-3000:])
