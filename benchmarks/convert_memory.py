r"""Peak host memory of `omnijax.export from-hf` and `to-hf` on a released-layout checkpoint.

    python benchmarks/convert_memory.py [--smoke] [--dir=/tmp/...]

Writes a synthetic Thinker checkpoint (random bfloat16 safetensors under the released key names,
sharded at `--shard_size`; the `tiny` preset's towers, its text decoder scaled by the flags),
then runs `from-hf` into a workdir and `to-hf --dtype=bfloat16` back out, each in a fresh
interpreter, and prints for each the peak resident set (VmHWM) above that interpreter's resident
set after it imported omnijax.export (`<command>_peak_rss_above_import_mib=`), against the
checkpoint's size. Then checks the round trip is exact: every tensor to-hf wrote equals the
input's (`round_trip=exact`). `--smoke` runs a tiny model in seconds. Temporary files go
under `--dir` (default: a new directory in /tmp), deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ml_dtypes
import numpy as np

from omnijax.hf import convert, hf_config, keymap, safetensors_io
from omnijax.models import presets
from omnijax.models.config import ThinkerConfig

MIB = 2**20
REPO = Path(__file__).resolve().parents[1]

# Runs one export command in a fresh interpreter; prints its resident sets (KiB) as JSON.
CHILD = """
import json, sys
def status(field):
  for line in open("/proc/self/status"):
    if line.startswith(field + ":"):
      return int(line.split()[1])
from omnijax import export
base = status("VmRSS")
export.main(sys.argv[1:])
print(json.dumps(dict(base_kib=base, peak_kib=status("VmHWM"))))
"""


def thinker_config(args) -> ThinkerConfig:
  cd = presets.get("tiny")
  for k in ("hidden_size", "num_hidden_layers", "num_experts", "moe_intermediate_size"):
    setattr(cd.text, k, getattr(args, k))
  cd.text.vocab_size = args.vocab_size
  cd.audio.output_dim = cd.vision.out_hidden_size = args.hidden_size  # the towers feed the text
  if args.hidden_size >= 1024:  # the released Thinker's attention shape
    cd.text.head_dim, cd.text.mrope_section = 128, (24, 20, 20)
    cd.text.num_attention_heads, cd.text.num_key_value_heads = args.hidden_size // 64, 4
  return ThinkerConfig.from_dict(cd)


def write_checkpoint(cfg: ThinkerConfig, out: Path, shard_bytes: int) -> int:
  """Random bfloat16 tensors under every key of the Thinker of `cfg`, one at a time; returns
  the bytes written."""
  shapes = {k: v for k, (v, _) in keymap.leaf_shapes(convert.abstract_params(cfg)).items()}
  slots = keymap.slots(convert.thinker_keymap(cfg), shapes)  # in hf_sizes' order
  rng = np.random.default_rng(0)

  def tensors():
    for s in slots:
      shape = s.transform.hf_shape(s.shape)
      yield s.key, (rng.standard_normal(shape, np.float32) * 0.02).astype(ml_dtypes.bfloat16)

  out.mkdir(parents=True)
  safetensors_io.write(tensors(), out, convert.hf_sizes(cfg, "bfloat16"), shard_bytes)
  d = hf_config.to_hf_config(cfg, "bfloat16")
  (out / convert.CONFIG_FILE).write_text(json.dumps(d, indent=2) + "\n")
  return sum(f.stat().st_size for f in out.glob("*.safetensors"))


def run(argv: list[str]) -> tuple[float, float]:
  """(peak resident set above the imports in MiB, seconds) of `python -m omnijax.export argv`."""
  start = time.perf_counter()
  proc = subprocess.run(
    [sys.executable, "-c", CHILD, *argv], cwd=REPO, capture_output=True, text=True, check=False
  )
  seconds = time.perf_counter() - start
  if proc.returncode:
    raise SystemExit(f"{argv[0]} failed:\n{proc.stdout}\n{proc.stderr}")
  rss = json.loads(proc.stdout.strip().splitlines()[-1])
  return (rss["peak_kib"] - rss["base_kib"]) / 1024, seconds


def same_tensors(a: Path, b: Path) -> int:
  """The number of tensors, after checking `a` and `b` hold the same keys with equal tensors
  (read one at a time)."""
  ra, rb = safetensors_io.Reader(a), safetensors_io.Reader(b)
  assert sorted(ra.keys()) == sorted(rb.keys()), "the round trip changed the keys"
  for key in ra.keys():
    x, y = ra(key), rb(key)
    assert x.dtype == y.dtype and np.array_equal(x, y), f"{key} differs after the round trip"
  return len(ra.keys())


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--smoke", action="store_true", help="a tiny model (seconds)")
  p.add_argument("--hidden_size", type=int, default=2048)
  p.add_argument("--num_hidden_layers", type=int, default=6)
  p.add_argument("--num_experts", type=int, default=32)
  p.add_argument("--moe_intermediate_size", type=int, default=768)
  p.add_argument("--vocab_size", type=int, default=32768)
  p.add_argument("--shard_size", default="1GB", help="safetensors shard size, in and out")
  p.add_argument("--dir", default=None, help="where the temporary files go")
  args = p.parse_args()
  if args.smoke:
    args.hidden_size, args.num_hidden_layers, args.vocab_size = 64, 2, 4096
    args.num_experts, args.moe_intermediate_size, args.shard_size = 8, 32, "100KB"
  cfg = thinker_config(args)
  root = Path(tempfile.mkdtemp(prefix="convert_memory-", dir=args.dir))
  try:
    t = cfg.text
    print(
      f"config: tiny preset towers, text hidden_size={t.hidden_size} layers="
      f"{t.num_hidden_layers} experts={t.num_experts} moe_intermediate_size="
      f"{t.moe_intermediate_size} heads={t.num_attention_heads}/{t.num_key_value_heads}"
      f"x{t.head_dim} vocab={t.vocab_size}; param_dtype={cfg.impl.param_dtype}"
    )
    hf_in, workdir, hf_out = root / "hf", root / "workdir", root / "hf_out"
    size = write_checkpoint(cfg, hf_in, safetensors_io.parse_size(args.shard_size))
    n_files = len(list(hf_in.glob("*.safetensors")))
    print(
      f"checkpoint: {size / MIB:.1f} MiB bfloat16 safetensors in {n_files} file(s) "
      f"({size // 2 / 1e6:.1f}M params; {size * 2 / MIB:.1f} MiB as float32)"
    )
    for name, argv in [
      ("from_hf", ["from-hf", f"--hf={hf_in}", f"--workdir={workdir}"]),
      (
        "to_hf",
        [
          "to-hf",
          f"--workdir={workdir}",
          f"--out={hf_out}",
          "--dtype=bfloat16",
          f"--max_shard_size={args.shard_size}",
        ],
      ),
    ]:
      peak, seconds = run(argv)
      print(
        f"{name}_peak_rss_above_import_mib={peak:.1f} "
        f"({peak * MIB / size:.3f}x the bfloat16 checkpoint; {seconds:.1f} s)"
      )
    print(f"round_trip=exact ({same_tensors(hf_in, hf_out)} tensors equal)")
  finally:
    shutil.rmtree(root)


if __name__ == "__main__":
  main()
