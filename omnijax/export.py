"""Convert between omnijax workdirs and transformers Qwen3-Omni checkpoints.

python -m omnijax.export to-hf --workdir=W --out=DIR [--step=N] [--dtype=bfloat16]
                                [--code2wav=CODEC_RUN]
    W's model.json and newest (or step N) checkpoint -> DIR/config.json + safetensors in
    the released layout (sharded above --max_shard_size), loadable with
    `Qwen3OmniMoeForConditionalGeneration.from_pretrained(DIR)`; when W has a Talker
    (talker.json, {"thinker", "talker"} params) also its `talker.*` tensors and talker_config
    (enable_audio_output on); with W's tokenizer.json, also the tokenizer and processor files
    (`AutoTokenizer`, `AutoProcessor`; see omnijax/hf/tokenizer_files.py). With --code2wav (a
    codec run of experiments/codec.py, or a directory holding code2wav.json), or when W has a
    code2wav/, also the Code2Wav vocoder: `code2wav.*` tensors + code2wav_config (transformers'
    Qwen3OmniMoeCode2Wav; `omnijax.load(DIR).code2wav(codes)` decodes with it).
python -m omnijax.export from-hf --hf=DIR --workdir=W
    a transformers checkpoint -> W/model.json + W/init_params (+ W/tokenizer.json when DIR
    has one, + W/code2wav/ when DIR holds code2wav.* tensors), from which training starts.
    When DIR holds talker.* tensors (a released Qwen3-Omni checkpoint) also W/talker.json,
    and init_params is {"thinker": ..., "talker": ...}, from which Talker training starts.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from etils import epath

from omnijax.errors import ConfigError
from omnijax import paths
from omnijax.hf import convert, safetensors_io, streaming, tokenizer_files
from omnijax.hf.keymap import CheckpointError
from omnijax.train import checkpoint as ckpt_lib


def load_code2wav_source(path: str | Path):
  """(Code2WavConfig, params) of a codec run (experiments/codec.py), or of a directory laid out
  as a workdir's code2wav/ (code2wav.json + params) or a workdir holding one."""
  from omnijax.codec import tokenizer as codec_tokenizer  # pylint: disable=import-outside-toplevel

  path = Path(path)
  if codec_tokenizer.is_codec_run(path):
    return codec_tokenizer.load_code2wav(path)
  found = ckpt_lib.load_code2wav(path)
  if found is None:
    raise FileNotFoundError(
      f"--code2wav {path} is neither a codec run (its {ckpt_lib.MODEL_JSON} has a 'codec' "
      f"entry; experiments/codec.py) nor a directory with {ckpt_lib.CODE2WAV_JSON} (or "
      f"{ckpt_lib.CODE2WAV}/{ckpt_lib.CODE2WAV_JSON})."
    )
  return found


def to_hf(
  workdir: paths.PathLike,
  out: paths.PathLike,
  *,
  step: int | None = None,
  dtype: str = "float32",
  max_shard_size: str | int = safetensors_io.DEFAULT_MAX_SHARD_SIZE,
  code2wav: paths.PathLike | None = None,
) -> int | None:
  """Exports a workdir's checkpoint (its Talker and tokenizer too, when it has them) to a
  transformers directory, with the Code2Wav of `code2wav` (see `load_code2wav_source`), else of
  the workdir's code2wav/ when it has one; returns the step exported (None: init_params).
  The params are read one layer's slice at a time, so the host holds at most a shard being
  written (`max_shard_size`) and a slice, not the model."""
  workdir = paths.path(workdir)
  if not workdir.is_dir():
    raise FileNotFoundError(f"workdir {workdir} does not exist.")
  cfg = ckpt_lib.read_model_config(workdir)
  vocoder = (
    load_code2wav_source(code2wav) if code2wav is not None else ckpt_lib.load_code2wav(workdir)
  )
  talker_cfg = ckpt_lib.read_talker_config(workdir)
  params, step = streaming.open_params(workdir, step)
  params, talker_params = ckpt_lib.split_params(workdir, params)
  convert.save_hf(
    cfg,
    params,
    out,
    dtype=dtype,
    max_shard_size=max_shard_size,
    tokenizer=ckpt_lib.load_tokenizer(workdir),
    talker=None if talker_cfg is None else (talker_cfg, talker_params),
    code2wav=vocoder,
  )
  return step


def _hf_tokenizer(hf_dir: epath.Path):
  """The tokenizer.json of a transformers directory (local or in a bucket), None without one."""
  src = hf_dir / ckpt_lib.TOKENIZER_JSON
  if not src.exists():
    return None
  with tempfile.TemporaryDirectory() as tmp:  # tokenizers reads a local file only
    src.copy(epath.Path(tmp) / ckpt_lib.TOKENIZER_JSON)
    return ckpt_lib.load_tokenizer(tmp)


def from_hf(hf_dir: paths.PathLike, workdir: paths.PathLike) -> None:
  """Writes workdir/model.json and workdir/init_params (and workdir/tokenizer.json when hf_dir
  has one, workdir/code2wav/ when it holds code2wav.* tensors, workdir/talker.json and
  {"thinker", "talker"} init_params when it holds talker.* tensors) from a transformers
  checkpoint. The params are written tensor by tensor (`streaming.save`): the host holds one
  checkpoint tensor at a time, not the model."""
  hf_dir, workdir = paths.path(hf_dir), paths.path(workdir)
  if not hf_dir.is_dir():
    raise FileNotFoundError(f"--hf directory {hf_dir} does not exist.")
  if ckpt_lib.checkpoint_steps(workdir):
    raise FileExistsError(
      f"{workdir} already holds train checkpoints, which training would "
      f"resume from instead of {ckpt_lib.INIT_PARAMS}; use a new workdir."
    )
  cfg = convert.thinker_config_hf(hf_dir)
  reader = safetensors_io.Reader(hf_dir)
  talker_cfg = convert.talker_config_hf(reader, cfg)
  vocoder_cfg = convert.code2wav_config_hf(reader)
  tokenizer = _hf_tokenizer(hf_dir)
  if tokenizer is not None:
    tokenizer_files.check(tokenizer, cfg)
  params = convert.stream_params(reader, cfg)
  if talker_cfg is not None:
    params = {"thinker": params, "talker": convert.stream_params(reader, talker_cfg)}
  if vocoder_cfg is not None:
    vocoder = convert.stream_params(reader, vocoder_cfg)
  streaming.save(workdir / ckpt_lib.INIT_PARAMS, params)
  ckpt_lib.write_model_config(workdir, cfg)
  if talker_cfg is not None:
    ckpt_lib.write_talker_config(workdir, talker_cfg)
  if tokenizer is not None:
    ckpt_lib.save_tokenizer(workdir, tokenizer)
  if vocoder_cfg is not None:
    ckpt_lib.save_code2wav(workdir, vocoder_cfg, vocoder, save=streaming.save)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
    prog="python -m omnijax.export",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("to-hf", help="omnijax workdir -> transformers checkpoint directory")
  p.add_argument("--workdir", required=True, help="omnijax workdir (has model.json)")
  p.add_argument("--out", required=True, help="directory to write config.json + safetensors to")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
  p.add_argument("--dtype", choices=sorted(convert.EXPORT_DTYPES), default="float32")
  p.add_argument(
    "--max_shard_size",
    type=safetensors_io.parse_size,
    default=safetensors_io.DEFAULT_MAX_SHARD_SIZE,
    help="shard the safetensors above this size (e.g. 500MB; default %(default)s)",
  )
  p.add_argument(
    "--code2wav",
    default=None,
    help="also export this Code2Wav: a codec run (experiments/codec.py) or a directory with "
    "code2wav.json (default: the workdir's code2wav/, when it has one)",
  )
  p = sub.add_parser("from-hf", help="transformers checkpoint directory -> omnijax workdir")
  p.add_argument("--hf", required=True, help="transformers directory (config.json + safetensors)")
  p.add_argument("--workdir", required=True, help="omnijax workdir to create")
  args = parser.parse_args(argv)

  try:
    if args.command == "to-hf":
      step = to_hf(
        args.workdir,
        args.out,
        step=args.step,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        code2wav=args.code2wav,
      )
      source = "init_params" if step is None else f"step {step}"
      print(f"exported {args.workdir} ({source}) to {args.out}")
      if convert.has_talker(args.out):
        print("with the Talker")
      if convert.has_code2wav(args.out):
        print(f"with Code2Wav ({args.code2wav or paths.path(args.workdir) / ckpt_lib.CODE2WAV})")
      if not (paths.path(args.workdir) / ckpt_lib.TOKENIZER_JSON).exists():
        print(
          f"note: {args.workdir} has no {ckpt_lib.TOKENIZER_JSON}, so {args.out} has no "
          "tokenizer or processor files."
        )
    else:
      from_hf(args.hf, args.workdir)
      print(
        f"wrote {paths.path(args.workdir) / ckpt_lib.MODEL_JSON} and "
        f"{paths.path(args.workdir) / ckpt_lib.INIT_PARAMS} from {args.hf}"
      )
      if (paths.path(args.workdir) / ckpt_lib.TALKER_JSON).exists():
        print(f"wrote {paths.path(args.workdir) / ckpt_lib.TALKER_JSON} (Talker) from {args.hf}")
      if (paths.path(args.workdir) / ckpt_lib.CODE2WAV).exists():
        print(f"wrote {paths.path(args.workdir) / ckpt_lib.CODE2WAV} (Code2Wav) from {args.hf}")
  except (ConfigError, CheckpointError, FileNotFoundError, FileExistsError) as e:
    parser.exit(1, f"{parser.prog} {args.command}: error: {e}\n")


if __name__ == "__main__":
  main(sys.argv[1:])
