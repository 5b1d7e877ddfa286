"""The omnijax vision encoder equals transformers' Qwen3OmniMoeVisionEncoder on the same weights.

Tiny float32 config (depth 3, hidden 32, 2 heads, 8x8 position table, deepstack taps (0, 2)).
Weights go both ways through `omnijax.hf.keymap.vision_keymap`; merged and deepstack outputs are
compared for one image, two images of different grids, a video, and all of them in one packed
buffer. Also: padding never changes valid outputs, one compile per bucket, gradients reach
every param, the key map round-trips exactly, and the packing metadata matches the processor's
patch order. `pytest -s` prints the measured differences.
"""

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest
from flax import traverse_util

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from transformers import vision_utils  # noqa: E402
from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as hf_modeling  # noqa: E402
from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import (  # noqa: E402
  Qwen3OmniMoeVisionEncoderConfig,
)

from omnijax.hf import keymap  # noqa: E402
from omnijax.hf.keymap import CheckpointError  # noqa: E402
from omnijax.models import vision  # noqa: E402
from omnijax.processing import vision as vision_host  # noqa: E402
from omnijax.models.config import ImplConfig, VisionEncoderConfig  # noqa: E402

TOL = 1e-4
CFG = VisionEncoderConfig(
  depth=3,
  hidden_size=32,
  intermediate_size=64,
  num_heads=2,
  in_channels=3,
  patch_size=16,
  spatial_merge_size=2,
  temporal_patch_size=2,
  out_hidden_size=24,
  num_position_embeddings=64,
  deepstack_visual_indexes=(0, 2),
)
IN_DIM = 3 * 2 * 16 * 16
KEYMAP = keymap.vision_keymap(CFG)
CASES = {
  "one_image": [(1, 4, 6)],
  "two_images": [(1, 4, 6), (1, 8, 4)],
  "video": [(3, 4, 4)],
  # + a 12x10 grid, larger than the 8x8 table (interpolation upsamples): 224 patches
  "packed": [(1, 4, 6), (1, 8, 4), (3, 4, 4), (1, 12, 10)],
}


def _torch_model(seed: int):
  hf_cfg = Qwen3OmniMoeVisionEncoderConfig(
    depth=CFG.depth,
    hidden_size=CFG.hidden_size,
    intermediate_size=CFG.intermediate_size,
    num_heads=CFG.num_heads,
    in_channels=CFG.in_channels,
    patch_size=CFG.patch_size,
    spatial_merge_size=CFG.spatial_merge_size,
    temporal_patch_size=CFG.temporal_patch_size,
    out_hidden_size=CFG.out_hidden_size,
    num_position_embeddings=CFG.num_position_embeddings,
    deepstack_visual_indexes=list(CFG.deepstack_visual_indexes),
  )
  torch.manual_seed(seed)
  return hf_modeling.Qwen3OmniMoeVisionEncoder(hf_cfg).eval()


def _randomize_torch(module, seed: int):
  """Non-trivial weights: LN scales ~1, biases ~0.1, kernels ~1.5/sqrt(fan_in), table ~0.5."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if ("norm" in name or "ln_q" in name) and name.endswith("weight"):
        p.copy_(1 + 0.1 * noise)
      elif name.endswith("bias"):
        p.copy_(0.1 * noise)
      elif "pos_embed" in name:
        p.copy_(0.5 * noise)
      else:
        p.copy_(1.5 / np.sqrt(p[0].numel()) * noise)


def _random_omnijax_params(seed: int):
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(_abstract(), sep="/")
  out = {}
  for k, v in flat.items():
    noise = rng.standard_normal(v.shape)
    stacked = k.startswith("blocks_")
    if "norm" in k or "ln_q" in k:
      w = 1 + 0.1 * noise if k.endswith("weight") else 0.1 * noise
    elif k.endswith("bias"):
      w = 0.1 * noise
    elif k == "pos_embed":
      w = 0.5 * noise
    else:
      dims = v.shape[1:] if stacked else v.shape
      fan_in = dims[0] * (dims[1] if "attn_proj" in k else 1)
      w = 1.5 / np.sqrt(fan_in) * noise
    out[k] = w.astype(np.float32)
  return traverse_util.unflatten_dict(out, sep="/")


def _abstract():
  return jax.eval_shape(lambda: nn.meta.unbox(vision.init_params(CFG)))


def _to_torch_state(hf: dict) -> dict:
  prefix = keymap.VISION_PREFIX + "."
  return {k[len(prefix) :]: torch.from_numpy(np.array(v)) for k, v in hf.items()}


def _inputs(grids, seed: int = 0):
  grid = np.asarray(grids, np.int64)
  n = int(grid.prod(-1).sum())
  return np.random.default_rng(seed).standard_normal((n, IN_DIM)).astype(np.float32), grid


def _torch_outputs(model, pixel_values, grid):
  with torch.no_grad():
    out = model(torch.from_numpy(pixel_values), grid_thw=torch.from_numpy(grid))
  return out.pooler_output.numpy(), [d.numpy() for d in out.deepstack_features]


_APPLY = {}


def _apply(query_block: int = vision.DEFAULT_QUERY_BLOCK, remat: str = "none"):
  key = (query_block, remat)
  if key not in _APPLY:
    model = vision.VisionEncoder(CFG, ImplConfig(remat_policy=remat), query_block=query_block)
    _APPLY[key] = jax.jit(lambda params, packed: model.apply({"params": params}, **packed))
  return _APPLY[key]


def _valid(out):
  mask = np.asarray(out.merged_mask)
  return np.asarray(out.merged)[mask], [np.asarray(d)[mask] for d in out.deepstack]


def _max_diffs(ours, ref):
  (m, ds), (rm, rds) = ours, ref
  assert m.shape == rm.shape and len(ds) == len(rds) == len(CFG.deepstack_visual_indexes)
  return [float(np.abs(m - rm).max())] + [float(np.abs(a - b).max()) for a, b in zip(ds, rds)]


@pytest.fixture(scope="module")
def from_hf():
  """transformers random init -> omnijax params through the key map."""
  tm = _torch_model(0)
  _randomize_torch(tm, 1)
  hf = {f"{keymap.VISION_PREFIX}.{k}": v.numpy() for k, v in tm.state_dict().items()}
  params = keymap.from_hf(hf.__getitem__, _abstract(), KEYMAP)
  return tm, hf, params


@pytest.mark.parametrize("case", list(CASES))
def test_parity_transformers_to_omnijax(from_hf, case):
  tm, _, params = from_hf
  pv, grid = _inputs(CASES[case])
  ref = _torch_outputs(tm, pv, grid)
  packed = vision_host.pack_patches(pv, grid)
  diffs = _max_diffs(_valid(_apply()(params, packed)), ref)
  print(
    f"\n{case}: {len(pv)} patches in bucket {len(packed['patches'])}, |ref| max "
    f"{np.abs(ref[0]).max():.3f}; max abs diff merged {diffs[0]:.2e}, deepstack "
    + ", ".join(f"{d:.2e}" for d in diffs[1:])
  )
  assert max(diffs) <= TOL


def test_parity_omnijax_to_transformers():
  """omnijax random params -> transformers through the key map (strict load); blocked queries."""
  params = _random_omnijax_params(3)
  tm = _torch_model(5)
  tm.load_state_dict(_to_torch_state(keymap.to_hf(params, KEYMAP)), strict=True)
  pv, grid = _inputs(CASES["packed"], seed=1)
  ref = _torch_outputs(tm, pv, grid)
  packed = vision_host.pack_patches(pv, grid)
  diffs = _max_diffs(_valid(_apply(query_block=64)(params, packed)), ref)
  print(
    f"\nomnijax->transformers packed (4 query blocks): max abs diff merged {diffs[0]:.2e}, "
    "deepstack " + ", ".join(f"{d:.2e}" for d in diffs[1:])
  )
  assert max(diffs) <= TOL


def test_padding_does_not_change_valid_outputs(from_hf):
  _, _, params = from_hf
  pv, grid = _inputs(CASES["packed"], seed=2)
  n = len(pv)
  small = vision_host.pack_patches(pv, grid, bucket=256)
  large = vision_host.pack_patches(pv, grid, bucket=512)
  # garbage in the padding: random pixels and metadata, segment id 0
  rng = np.random.default_rng(7)
  noisy = {k: v.copy() for k, v in small.items()}
  noisy["patches"][n:] = 10 * rng.standard_normal(noisy["patches"][n:].shape)
  for k in ("rows", "cols", "heights", "widths"):
    noisy[k][n:] = rng.integers(1, 20, 256 - n)
  outs = [_apply()(params, small), _apply()(params, large), _apply()(params, noisy)]
  base = _valid(outs[0])
  for out in outs[1:]:
    got = _valid(out)
    diffs = _max_diffs(got, base)
    print(f"\npadding: max abs change of valid outputs {max(diffs):.2e}")
    assert max(diffs) <= 1e-5
    assert np.asarray(out.merged_mask).sum() == n // 4
    invalid = ~np.asarray(out.merged_mask)
    assert not np.any(np.asarray(out.merged)[invalid])
    assert all(not np.any(np.asarray(d)[invalid]) for d in out.deepstack)
  # A batch of packed buffers (B, P, ...) equals the rows encoded one by one.
  pv2, grid2 = _inputs(CASES["video"], seed=4)
  other = vision_host.pack_patches(pv2, grid2, bucket=256)
  batched = _apply()(params, {k: np.stack([small[k], other[k]]) for k in small})
  for b, single in enumerate((outs[0], _apply()(params, other))):
    np.testing.assert_allclose(batched.merged[b], single.merged, atol=1e-5)
    np.testing.assert_array_equal(batched.merged_mask[b], single.merged_mask)


def test_one_compile_per_bucket(from_hf):
  _, _, params = from_hf
  model = vision.VisionEncoder(CFG)
  traces = []

  @jax.jit
  def encode(params, packed):
    traces.append(packed["patches"].shape)
    return model.apply({"params": params}, **packed).merged

  grids = [(1, 2, 2), (1, 2, 4), (1, 4, 4), (1, 4, 6), (1, 6, 6), (1, 8, 6), (1, 8, 8), (1, 10, 8)]
  buckets = set()
  for i, g in enumerate(grids):
    pv, grid = _inputs([g], seed=i)
    packed = vision_host.pack_patches(pv, grid)
    buckets.add(len(packed["patches"]))
    encode(params, packed).block_until_ready()
  print(f"\n{len(grids)} image sizes -> buckets {sorted(buckets)}, {len(traces)} compiles")
  assert sorted(buckets) == [64, 96]
  assert len(traces) == len(buckets)
  if hasattr(encode, "_cache_size"):
    assert encode._cache_size() == len(buckets)


def test_gradients_reach_every_param():
  params = _random_omnijax_params(11)
  pv, grid = _inputs(CASES["two_images"], seed=3)
  packed = vision_host.pack_patches(pv, grid)
  model = vision.VisionEncoder(CFG, ImplConfig(remat_policy="full"))
  rng = np.random.default_rng(0)
  weights = [
    jnp.asarray(rng.standard_normal((16, CFG.out_hidden_size)), jnp.float32) for _ in range(3)
  ]

  def loss(p):
    out = model.apply({"params": p}, **packed)
    return sum(jnp.sum(o * w) for o, w in zip((out.merged,) + out.deepstack, weights))

  grads = jax.jit(jax.grad(loss))(params)
  flat = traverse_util.flatten_dict(grads, sep="/")
  assert set(flat) == set(traverse_util.flatten_dict(params, sep="/"))
  dead = [k for k, g in flat.items() if not np.any(np.asarray(g))]
  assert not dead, f"no gradient reaches {dead}"
  assert all(np.all(np.isfinite(np.asarray(g))) for g in flat.values())
  # every layer of every stack (not just the stack as a whole)
  for k, g in flat.items():
    if k.startswith("blocks_"):
      assert np.all(np.abs(np.asarray(g)).reshape(g.shape[0], -1).max(-1) > 0), k


def test_keymap_round_trip_exact(from_hf):
  tm, hf, _ = from_hf
  assert sorted(hf) == sorted(keymap.hf_keys(KEYMAP))
  assert all(k.startswith("thinker.visual.") for k in hf)
  # transformers -> omnijax -> transformers
  params = keymap.from_hf(hf.__getitem__, _abstract(), KEYMAP)
  back = keymap.to_hf(params, KEYMAP)
  assert list(back) == keymap.hf_keys(KEYMAP)
  for k, v in hf.items():
    assert back[k].shape == v.shape and back[k].dtype == v.dtype and np.array_equal(back[k], v), k
  # omnijax -> transformers -> omnijax (boxed params from init are accepted too)
  ours = _random_omnijax_params(4)
  again = keymap.from_hf(keymap.to_hf(ours, KEYMAP).__getitem__, vision.init_params(CFG), KEYMAP)
  flat_a = traverse_util.flatten_dict(ours, sep="/")
  flat_b = traverse_util.flatten_dict(again, sep="/")
  assert set(flat_a) == set(flat_b)
  assert all(np.array_equal(flat_a[k], flat_b[k]) for k in flat_a)
  # a custom prefix, a wrong shape and a missing tensor
  custom = keymap.to_hf(ours, keymap.vision_keymap(CFG, prefix="visual"))
  assert all(k.startswith("visual.") for k in custom)
  bad = dict(hf)
  bad["thinker.visual.blocks.1.attn.qkv.weight"] = np.zeros((3, 3), np.float32)
  with pytest.raises(CheckpointError, match="blocks.1.attn.qkv.weight"):
    keymap.from_hf(bad.__getitem__, _abstract(), KEYMAP)
  with pytest.raises(KeyError):
    keymap.from_hf({}.__getitem__, _abstract(), KEYMAP)


def test_packing_metadata_matches_transformers():
  grid = np.asarray(CASES["packed"], np.int64)
  meta = vision_host.patch_metadata(grid, CFG.spatial_merge_size)
  pos = vision_utils.get_vision_position_ids(torch.from_numpy(grid), CFG.spatial_merge_size).numpy()
  np.testing.assert_array_equal(meta["rows"], pos[:, 0])
  np.testing.assert_array_equal(meta["cols"], pos[:, 1])
  cu = vision_utils.get_vision_cu_seqlens(torch.from_numpy(grid)).numpy()
  np.testing.assert_array_equal(np.diff(cu), np.bincount(meta["segment_ids"])[1:])
  assert np.all(np.diff(meta["segment_ids"]) >= 0)
  sizes = [vision_host.bucket_patches(n) for n in range(0, 5000, 7)]
  assert all(s % 4 == 0 and s >= n for s, n in zip(sizes, range(0, 5000, 7)))
  # 14 buckets up to 6144; padding is at most a third of a bucket
  assert len(set(sizes)) == 14 and all(
    2 * s <= 3 * max(n, 64) for s, n in zip(sizes, range(0, 5000, 7))
  )
  with pytest.raises(ValueError, match="bucket"):
    vision_host.pack_patches(np.zeros((24, IN_DIM), np.float32), [[1, 4, 6]], bucket=16)
  with pytest.raises(ValueError, match="multiples"):
    vision_host.patch_metadata([[1, 3, 4]])


def test_processor_patch_order():
  """The image processor's patch i sits at (rows[i], cols[i]): 2x2 merge windows contiguous."""
  pil = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
  proc = pil.Qwen2VLImageProcessorPil(
    patch_size=16,
    temporal_patch_size=2,
    merge_size=2,
    do_normalize=False,
    do_rescale=False,
    do_resize=False,
  )
  h, w = 8, 6
  img = np.repeat(np.repeat(np.arange(h)[:, None] * 100 + np.arange(w)[None], 16, 0), 16, 1)
  img = np.broadcast_to(img.astype(np.float32), (3, h * 16, w * 16)).copy()
  out = proc(images=[img], return_tensors="np", input_data_format="channels_first")
  assert out["image_grid_thw"].tolist() == [[1, h, w]]
  meta = vision_host.patch_metadata(out["image_grid_thw"])
  pv = out["pixel_values"]
  assert np.all(pv == pv[:, :1])  # each patch constant
  np.testing.assert_array_equal(pv[:, 0], meta["rows"] * 100 + meta["cols"])
