"""omnijax logits and load-balancing loss equal transformers' Qwen3-Omni on the same weights.

Tiny float32 configs, compared in both directions:
- omnijax params -> transformers: `python -m omnijax.export to-hf` (main) and
  `Qwen3OmniMoeForConditionalGeneration.from_pretrained`;
- transformers params -> omnijax: `save_pretrained`, then `export from-hf` + `omnijax.load`.
Each runs on plain rows with default positions and with explicit (3, B, S) TM-RoPE ids whose
T/H/W rows differ from each other and between batch rows. `pytest -s` prints the differences.
Params are whole Thinker trees (text decoder + audio_tower + visual); the Thinker checkpoints
carry the towers too and they are checked to load exactly (their multimodal forward is
tests/test_thinker_multimodal.py). The Talker (shared-expert MoE) is tests/test_talker.py.
"""

import jax
import numpy as np
import pytest
from flax import traverse_util

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


import omnijax  # noqa: E402
from omnijax import api, export  # noqa: E402
from omnijax.hf import convert, hf_config, safetensors_io  # noqa: E402
from omnijax.models import presets  # noqa: E402
from omnijax.models.config import ThinkerConfig  # noqa: E402
from omnijax.train import checkpoint as ckpt_lib  # noqa: E402

TOL = 1e-4
BATCH, SEQ = 2, 24
CONFIGS = ("thinker", "thinker_dense_layers")


def _config(name: str) -> ThinkerConfig:
  cd = presets.get("tiny")
  if name == "thinker_dense_layers":  # MoE, dense, MoE: three scanned blocks
    cd.text.num_hidden_layers = 3
    cd.text.mlp_only_layers = (1,)
  return ThinkerConfig.from_dict(cd)


def _inputs(cfg: ThinkerConfig):
  ids = np.random.default_rng(0).integers(0, cfg.text.vocab_size, (BATCH, SEQ))
  s = np.arange(SEQ)
  positions = np.stack(
    [
      np.stack([s, s + 7]),  # T
      np.stack([s // 3, (2 * s) % 11]),  # H
      np.stack([s % 4, s // 2 + 1]),  # W
    ]
  )
  return ids, positions


def _is_norm_scale(path: str) -> bool:
  """RMSNorm/LayerNorm multipliers of the text decoder and of both towers."""
  parent, leaf = (["", ""] + path.split("/"))[-2:]
  return leaf in ("weight", "scale") and ("norm" in parent or parent.startswith("ln_"))


def _random_omnijax_params(cfg: ThinkerConfig, seed: int = 1):
  """Random params of the whole Thinker (text decoder, audio_tower, visual)."""
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(convert.abstract_params(cfg), sep="/")
  assert {k.split("/")[0] for k in flat} >= set(convert.TOWERS)
  return traverse_util.unflatten_dict(
    {
      k: (
        1 + 0.1 * rng.standard_normal(v.shape)
        if _is_norm_scale(k)
        else 0.05 * rng.standard_normal(v.shape)
      ).astype(np.float32)
      for k, v in flat.items()
    },
    sep="/",
  )


def _assert_towers_match(cfg: ThinkerConfig, params, hf_model) -> None:
  """transformers holds exactly the tower tensors of `params` (under the checkpoint keys)."""
  ours = {
    k: w
    for k, w in convert.hf_tensors(cfg, params)
    if k.startswith(("thinker.audio_tower.", "thinker.visual."))
  }
  theirs = {
    f"thinker.{name}.{k}": v.numpy()
    for name in ("audio_tower", "visual")
    for k, v in getattr(hf_model.thinker.model, name).state_dict().items()
  }
  assert ours and sorted(ours) == sorted(theirs)
  for k, w in ours.items():
    np.testing.assert_array_equal(w, theirs[k], err_msg=k)


def _randomize_torch(module, seed: int = 2):
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      p.copy_(1 + 0.1 * noise if name.endswith("norm.weight") else 0.05 * noise)


def _hf_outputs(hf_model, ids, positions):
  """(float32 logits, aux loss) of the Thinker."""
  ids_t = torch.from_numpy(ids)
  pos_t = None if positions is None else torch.from_numpy(positions)
  with torch.no_grad():
    out = hf_model.thinker(input_ids=ids_t, position_ids=pos_t, output_router_logits=True)
    return out.logits.float().numpy(), float(out.aux_loss)


def _check_parity(label: str, model: api.Model, hf_model) -> None:
  ids, positions = _inputs(model.config)
  results = {}
  for pos_name, pos in (("default positions", None), ("3-row positions", positions)):
    ours = model.logits(ids, pos), model.aux_loss(ids, pos)
    theirs = _hf_outputs(hf_model, ids, pos)
    d_logits = float(np.abs(ours[0] - theirs[0]).max())
    d_aux = abs(ours[1] - theirs[1])
    print(
      f"\n[parity] {label}, {pos_name}: max|logits diff|={d_logits:.3g} "
      f"(|logits| max {np.abs(theirs[0]).max():.3g}), |aux diff|={d_aux:.3g} "
      f"(aux {theirs[1]:.6f})"
    )
    assert ours[0].shape == (BATCH, SEQ, model.config.text.vocab_size)
    assert d_logits <= TOL and d_aux <= TOL
    results[pos_name] = ours[0]
  # The explicit positions reach the rotary embedding on both sides.
  assert np.abs(results["default positions"] - results["3-row positions"]).max() > 1e-2


def _assert_weights_loaded(info, prefixes):
  assert not info["unexpected_keys"] and not info["mismatched_keys"]
  missing = [k for k in info["missing_keys"] if k.startswith(prefixes)]
  assert not missing, missing


@pytest.mark.parametrize("name", CONFIGS)
def test_omnijax_to_transformers(name, tmp_path):
  cfg = _config(name)
  params = _random_omnijax_params(cfg)
  out = tmp_path / "hf"
  workdir = tmp_path / "workdir"
  ckpt_lib.write_model_config(workdir, cfg)
  ckpt_lib.save_params(workdir / ckpt_lib.INIT_PARAMS, params)
  shard = ["--max_shard_size=100KB"] if name == "thinker_dense_layers" else []
  export.main(["to-hf", f"--workdir={workdir}", f"--out={out}", *shard])
  assert (out / safetensors_io.INDEX_FILE).exists() == bool(shard)
  hf_model, info = transformers.Qwen3OmniMoeForConditionalGeneration.from_pretrained(
    out, enable_audio_output=False, dtype=torch.float32, output_loading_info=True
  )
  _assert_weights_loaded(info, ("thinker.",))  # text decoder and both towers
  _assert_towers_match(cfg, params, hf_model)
  _check_parity(f"{name}: omnijax -> transformers", api.Model(cfg, params), hf_model.eval())


@pytest.mark.parametrize("name", CONFIGS)
def test_transformers_to_omnijax(name, tmp_path):
  cfg = _config(name)
  hf_dir = tmp_path / "hf"
  torch.manual_seed(0)
  hf_model = transformers.Qwen3OmniMoeForConditionalGeneration(
    transformers.Qwen3OmniMoeConfig(**hf_config.to_hf_config(cfg))
  )
  _randomize_torch(hf_model.thinker.model.language_model)
  _randomize_torch(hf_model.thinker.lm_head)
  shard = dict(max_shard_size="100KB") if name == "thinker_dense_layers" else {}
  hf_model.save_pretrained(hf_dir, **shard)
  assert (hf_dir / safetensors_io.INDEX_FILE).exists() == bool(shard)
  workdir = tmp_path / "workdir"
  export.main(["from-hf", f"--hf={hf_dir}", f"--workdir={workdir}"])
  model = omnijax.load(workdir)
  assert model.config == cfg
  convert.check_params(cfg, model.params)
  _assert_towers_match(cfg, jax.device_get(model.params), hf_model)
  _check_parity(f"{name}: transformers -> omnijax", model, hf_model.eval())
