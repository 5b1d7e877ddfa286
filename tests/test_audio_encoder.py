"""The AuT audio encoder equals transformers' Qwen3OmniMoeAudioEncoder on the same weights.

Tiny float32 config (d_model 32, 2 layers, 2 heads, conv channels 16, output 24, 128 mel bins).
Weights go both ways through omnijax.hf.keymap (`audio_keymap`): transformers (random, rescaled so that
activations are O(1)) -> omnijax, and omnijax (random) -> transformers (strict load). Batches
mix audios shorter and longer than the attention window with lengths that are not multiples of
100 frames. `pytest -s` prints the measured differences.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as hf_modeling  # noqa: E402
from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import (  # noqa: E402
  Qwen3OmniMoeAudioEncoderConfig,
)

from omnijax import sharding as shd  # noqa: E402
from omnijax.hf import keymap  # noqa: E402
from omnijax.hf.keymap import CheckpointError  # noqa: E402
from omnijax.models import audio  # noqa: E402
from omnijax.processing import audio as audio_host  # noqa: E402
from omnijax.models.config import AudioEncoderConfig, ImplConfig  # noqa: E402

TOL = 1e-4
CFG = AudioEncoderConfig(
  num_mel_bins=128,
  encoder_layers=2,
  encoder_attention_heads=2,
  encoder_ffn_dim=64,
  d_model=32,
  output_dim=24,
  downsample_hidden_size=16,
  n_window_infer=800,
)
# 8 s window = 800 frames: 60, 250, 400 (a whole number of chunks) and 777 are inside one window,
# 1234 and 1650 span two; at 2 s only 60 fits in one window.
LENGTHS = (250, 1234, 60, 777, 400, 1650)
PREFIX = "thinker.audio_tower"
KEYMAP = keymap.audio_keymap(CFG)


def _hf_encoder(n_window_infer: int, state_dict=None):
  hc = Qwen3OmniMoeAudioEncoderConfig(
    **{**dataclasses.asdict(CFG), "n_window_infer": n_window_infer}
  )
  torch.manual_seed(0)
  enc = hf_modeling.Qwen3OmniMoeAudioEncoder(hc).eval()
  if state_dict is not None:
    enc.load_state_dict(state_dict, strict=True)
  return enc


def _rescale_hf(enc) -> None:
  """O(1) activations: the default 0.02-std init would make every difference trivially small."""
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, p in enc.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if p.ndim > 1:
        p.copy_(noise * p[0].numel() ** -0.5)
      elif name.endswith("norm.weight") or name == "ln_post.weight":
        p.copy_(1.0 + 0.3 * noise)
      else:
        p.copy_(0.3 * noise)


def _hf_state(enc) -> dict[str, np.ndarray]:
  return {f"{PREFIX}.{k}": v.numpy() for k, v in enc.state_dict().items()}


def _hf_forward(enc, mels) -> np.ndarray:
  lens = torch.tensor([m.shape[1] for m in mels])
  with torch.no_grad():
    out = enc(torch.from_numpy(np.concatenate(mels, axis=1)), feature_lens=lens)
  return out.last_hidden_state.numpy()


def _abstract(cfg=CFG):
  return jax.eval_shape(lambda: nn.meta.unbox(audio.audio_encoder_init(cfg)))


def _mels(lengths, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.standard_normal((CFG.num_mel_bins, n)).astype(np.float32) for n in lengths]


@pytest.fixture(scope="module")
def hf_weights():
  enc = _hf_encoder(800)
  _rescale_hf(enc)
  return _hf_state(enc)


@pytest.fixture(scope="module")
def params(hf_weights):
  return keymap.from_hf(hf_weights.__getitem__, _abstract(), KEYMAP)


@functools.lru_cache(maxsize=None)
def _jitted(**kw):
  model = audio.AudioEncoder(CFG, **kw)
  return jax.jit(lambda p, f, n, w: model.apply({"params": p}, f, n, w))


def _apply(p, mels, window=8, frames=None, rows=None, **kw):
  """Valid rows + mask; the window is traced, so windows share one compile per shape."""
  feats, lens = audio_host.pad_audio_batch(mels, frames=frames, rows=rows)
  out, mask = _jitted(**kw)(p, feats, lens, jnp.int32(window))
  return np.asarray(out), np.asarray(mask)


def _valid_rows(out, mask):
  return out[mask]  # row-major: audio by audio, tokens in order: the Thinker's scatter order


# --------------------------------------------------------------------------------------------


def test_bucket_frames_and_lengths():
  assert [audio_host.bucket_frames(n) for n in (1, 100, 101, 250, 400, 401, 1650)] == [
    100,
    100,
    200,
    400,
    400,
    800,
    3200,
  ]
  lens = np.array([1, 50, 99, 100, 101, 250, 400, 1234])
  want = [hf_modeling._get_feat_extract_output_lengths(torch.tensor(int(n))).item() for n in lens]
  assert audio_host.feat_extract_output_lengths(lens).tolist() == want
  assert audio_host.feat_extract_output_lengths(jnp.asarray(lens)).tolist() == want
  assert audio_host.tokens_per_chunk(CFG) == 13 and audio_host.num_tokens(800, CFG) == 104


@pytest.mark.parametrize("seconds", [8, 2, 3])
def test_parity_hf_to_omnijax(hf_weights, params, seconds):
  """Window 8 s (the released n_window_infer 800), 2 s and 3 s (not a divisor of the 8 s block).

  transformers is configured with n_window_infer = 100 * seconds; omnijax keeps n_window_infer
  800 in its config and gets the window as a traced argument, on the full-score path and on
  the block-local path.
  """
  enc = _hf_encoder(
    100 * seconds, {k[len(PREFIX) + 1 :]: torch.from_numpy(v) for k, v in hf_weights.items()}
  )
  mels = _mels(LENGTHS)
  ref = _hf_forward(enc, mels)
  for blocked in (False, True):
    out, mask = _apply(params, mels, window=seconds, blocked_attention=blocked)
    got = _valid_rows(out, mask)
    assert got.shape == ref.shape
    diff = float(np.abs(got - ref).max())
    print(
      f"\n[audio parity hf->omnijax] window {seconds} s, blocked={blocked}: max|diff| "
      f"{diff:.3g} (max|ref| {np.abs(ref).max():.3g})"
    )
    assert diff <= TOL
  if seconds != 8:  # the window matters on these lengths
    out8, mask8 = _apply(params, mels, window=8, blocked_attention=True)
    assert np.abs(_valid_rows(out8, mask8) - ref).max() > 1e-2


def _random_omnijax_params(seed=3):
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(_abstract(), sep="/")
  out = {}
  for path, leaf in flat.items():
    shape = leaf.shape[1:] if path.startswith("layers/") else leaf.shape
    if path.endswith("kernel"):
      proj = path.split("/")[-2] in ("q_proj", "k_proj", "v_proj")
      fan_in = shape[0] if proj else int(np.prod(shape[:-1]))
      w = rng.standard_normal(leaf.shape) * fan_in**-0.5
    elif path.endswith("scale"):
      w = 1.0 + 0.3 * rng.standard_normal(leaf.shape)
    else:
      w = 0.3 * rng.standard_normal(leaf.shape)
    out[path] = w.astype(np.float32)
  return traverse_util.unflatten_dict(out, sep="/")


@pytest.mark.parametrize("lengths", [LENGTHS, (50, 77)], ids=["mixed", "all_short"])
def test_parity_omnijax_to_hf(lengths):
  """omnijax params -> transformers (strict load). "all_short": every chunk < 100 frames, where
  the reference pads chunks to the longest one of the call (chunk_padding="batch")."""
  p = _random_omnijax_params()
  tensors = keymap.to_hf(p, KEYMAP)
  enc = _hf_encoder(800, {k[len(PREFIX) + 1 :]: torch.from_numpy(v) for k, v in tensors.items()})
  mels = _mels(lengths, seed=5)
  ref = _hf_forward(enc, mels)
  got = _valid_rows(*_apply(p, mels))
  diff = float(np.abs(got - ref).max())
  print(
    f"\n[audio parity omnijax->hf] {lengths}: max|diff| {diff:.3g} "
    f"(max|ref| {np.abs(ref).max():.3g})"
  )
  assert got.shape == ref.shape and diff <= TOL
  if lengths == (50, 77):  # "full" pads every chunk to 100 frames: per-audio, not the reference
    full = _valid_rows(*_apply(p, mels, chunk_padding="full"))
    assert np.abs(full - ref).max() > 1e-4


def test_padding_does_not_leak(params):
  mels = _mels((250, 1234, 130))
  out, mask = _apply(params, mels)  # bucket 1600 frames
  n_tok = audio_host.feat_extract_output_lengths(np.array([250, 1234, 130]))
  assert mask.shape == (3, 208) and (mask.sum(1) == n_tok).all()
  assert (out[~mask] == 0).all()
  # Garbage in padded frames, a larger bucket, an extra empty row full of garbage (and the
  # default window argument, n_window_infer // 100 = 8): the valid rows do not move.
  feats, lens = audio_host.pad_audio_batch(mels, frames=3200, rows=4)
  rng = np.random.default_rng(9)
  frame_pad = np.arange(3200)[None, None, :] >= lens[:, None, None]
  feats = np.where(frame_pad, 100 * rng.standard_normal(feats.shape), feats).astype(np.float32)
  model = audio.AudioEncoder(CFG)
  out2, mask2 = jax.jit(model.apply)({"params": params}, feats, lens)
  out2, mask2 = np.asarray(out2), np.asarray(mask2)
  assert not mask2[3].any() and (out2[3] == 0).all()
  diff = np.abs(out2[:3, :208][mask] - out[mask]).max()
  print(f"\n[audio padding] max|diff| of valid rows across paddings: {diff:.3g}")
  assert diff <= 1e-5
  # chunk_padding="full": every audio is independent of the rest of its batch.
  alone = _valid_rows(*_apply(params, [mels[2][:, :70]], chunk_padding="full"))
  both = _apply(params, [mels[2][:, :70], mels[1]], chunk_padding="full")
  assert np.abs(_valid_rows(both[0][:1], both[1][:1]) - alone).max() <= 1e-5


def test_compiles_once_per_bucket(params):
  model = audio.AudioEncoder(CFG)
  traces = []

  def fwd(p, feats, lens, window):
    traces.append(feats.shape)
    return model.apply({"params": p}, feats, lens, window)

  fn = jax.jit(fwd)
  rng = np.random.default_rng(0)
  stream = (37, 180, 250, 410, 777, 905, 1500, 60, 333, 1234)
  buckets = set()
  for i, n in enumerate(stream):
    other = int(rng.integers(1, n + 1))
    feats, lens = audio_host.pad_audio_batch(_mels((n, other), seed=i))
    buckets.add(feats.shape[-1])
    out, mask = fn(params, feats, lens, jnp.int32(1 + i % 8))  # a new window every batch
    assert int(mask[0].sum()) == audio_host.feat_extract_output_lengths(n)
  print(
    f"\n[audio compile] {len(stream)} batches, {len(buckets)} buckets {sorted(buckets)}, "
    f"{len(traces)} traces, cache size {fn._cache_size()}"
  )
  assert len(traces) == len(buckets) == fn._cache_size() == 5


def test_gradients_reach_every_param(params):
  feats, lens = audio_host.pad_audio_batch(_mels((250, 360, 60)))
  w = np.random.default_rng(2).standard_normal((3, 52, CFG.output_dim)).astype(np.float32)

  def loss(p, remat):
    model = audio.AudioEncoder(CFG, ImplConfig(remat_policy=remat))
    out, _ = model.apply({"params": p}, feats, lens, jnp.int32(2))
    return jnp.sum(out * w)

  grads = jax.jit(jax.grad(loss), static_argnums=1)(params, "none")
  for path, g in traverse_util.flatten_dict(grads, sep="/").items():
    g = np.asarray(g)
    per_layer = g.reshape(CFG.encoder_layers, -1) if path.startswith("layers/") else g[None]
    assert np.isfinite(g).all() and (np.abs(per_layer).max(axis=1) > 0).all(), path
  remat = jax.jit(jax.grad(loss), static_argnums=1)(params, "full")
  diffs = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), grads, remat)
  assert max(jax.tree.leaves(diffs)) <= 1e-5


def test_keymap_round_trip_exact(hf_weights, params):
  back = keymap.to_hf(params, KEYMAP)
  assert list(back) == keymap.hf_keys(KEYMAP)
  assert set(back) == set(hf_weights)
  for k, v in back.items():
    assert v.dtype == hf_weights[k].dtype and np.array_equal(v, hf_weights[k]), k
  again = keymap.from_hf(back.__getitem__, _abstract(), KEYMAP)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), again, params)
  bad = dict(back)
  bad[f"{PREFIX}.conv2d2.weight"] = bad[f"{PREFIX}.conv2d2.weight"][:, :8]
  with pytest.raises(CheckpointError, match="conv2d2.weight"):
    keymap.from_hf(bad.__getitem__, _abstract(), KEYMAP)


def test_logical_axes_and_sharded_forward(params):
  """Every param has logical axis names from DEFAULT_RULES; sharded output equals unsharded."""
  model = audio.AudioEncoder(CFG)
  feats, lens = audio_host.pad_audio_batch(_mels((250, 1234, 60, 400)))
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), feats, lens)["params"])
  known = {name for name, _ in shd.DEFAULT_RULES}
  for path, leaf in traverse_util.flatten_dict(boxed, sep="/").items():
    assert isinstance(leaf, nn.Partitioned), path
    assert set(leaf.names) - {None} <= known, (path, leaf.names)
  want = _apply(params, [m for m in _mels((250, 1234, 60, 400))])[0]
  mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  rules = shd.axis_rules()
  p_shard = shd.logical_to_sharding(nn.get_partition_spec(boxed), mesh, rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    fn = jax.jit(
      lambda p, f, n: model.apply({"params": p}, f, n),
      in_shardings=(
        p_shard,
        shd.batch_sharding(mesh, rules, 3),
        shd.batch_sharding(mesh, rules, 1),
      ),
    )
    got, _ = fn(params, feats, lens)
  assert np.abs(np.asarray(got) - want).max() <= 1e-5
