"""The notebooks execute (nbclient) on tiny inputs: a tiny Thinker workdir with a tokenizer, a
small sweep of two arms over two seeds, and (speech) tiny random weights with a Talker and a
Code2Wav that the notebook draws itself."""

import json
import os
from pathlib import Path

import flax.linen as nn
import jax
import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

from data_pipelines import tokenizer as tok_lib
from omnijax.models import presets
from omnijax.models.config import ThinkerConfig
from omnijax.models.thinker import Thinker
from omnijax.train import checkpoint as ckpt_lib
from omnijax.train import step as step_lib
from tests.helpers import WORDS

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def _execute(name: str, **env):
  nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
  old = {k: os.environ.get(k) for k in env}
  os.environ.update({k: str(v) for k, v in env.items()})
  os.environ["XLA_FLAGS"] = ""  # one device in the kernel
  try:
    NotebookClient(
      nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    ).execute()
  finally:
    for k, v in old.items():
      os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
  return nb


def _outputs(nb) -> str:
  return "\n".join(
    o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
  )


@pytest.fixture(scope="module")
def tiny_workdir(tmp_path_factory):
  """model.json + init_params (random tiny Thinker) + a tokenizer.json."""
  workdir = tmp_path_factory.mktemp("explore")
  cfg = ThinkerConfig.from_dict(presets.get("tiny"))
  params = jax.jit(lambda r: nn.meta.unbox(step_lib.init_params(Thinker(cfg), r, 1, 16)))(
    jax.random.key(0)
  )
  ckpt_lib.write_model_config(workdir, cfg)
  ckpt_lib.save_params(workdir / ckpt_lib.INIT_PARAMS, jax.device_get(params))
  texts = [" ".join(np.random.default_rng(i).choice(WORDS, 12)) for i in range(200)]
  ckpt_lib.save_tokenizer(workdir, tok_lib.train_bpe_tokenizer(texts, vocab_size=400))
  return workdir


def test_explore_model_notebook(tiny_workdir):
  nb = _execute("explore_model", OMNIJAX_WORKDIR=tiny_workdir)
  out = _outputs(nb)
  assert "2 layers" in out and "top next tokens" in out and "greedy:" in out
  images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
  assert len(images) == 2  # positions and expert load


def test_ablation_notebook(tmp_path):
  rng = np.random.default_rng(0)
  runs = []
  for arm in ("text", "omni"):
    for seed in ("0", "1"):
      workdir = tmp_path / f"seed-{seed}_arm-{arm}"
      workdir.mkdir()
      lines = [
        {"step": s, "loss": 8 - s / 10 + rng.normal(0, 0.05), "loss/text": 8 - s / 10}
        for s in (10, 20, 30)
      ]
      lines.append(
        {
          "step": 30,
          "eval/heldout/loss/text": 6 + rng.normal(0, 0.1),
          "eval/heldout/loss/image": 7 + (arm == "text") + rng.normal(0, 0.1),
        }
      )
      (workdir / "metrics.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n")
      runs.append(
        dict(
          name=workdir.name,
          exp=f"ablation:local,seed={seed},arm={arm}",
          args=dict(seed=seed, arm=arm),
          workdir=str(workdir),
        )
      )
  (tmp_path / "sweep.json").write_text(json.dumps(dict(exp="ablation:local", runs=runs)))
  out = _outputs(_execute("ablation", OMNIJAX_SWEEP=tmp_path))
  assert "4 runs" in out and "heldout/loss/image" in out
  assert "No text degradation" in out


def test_speech_notebook():
  """Its default: tiny random weights with a Talker and a 1920-samples-a-frame Code2Wav."""
  nb = _execute("speech", OMNIJAX_SPEECH_CHECKPOINT="")
  out = _outputs(nb)
  assert "speakers" in out and "speech:" in out and "same waveform as generate: True" in out
  data = [o.get("data", {}) for c in nb.cells for o in c.get("outputs", [])]
  assert sum("<audio" in d.get("text/html", "") for d in data) == 1
  assert sum("image/png" in d for d in data) == 2  # spectrogram and chunk arrival
