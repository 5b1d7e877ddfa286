"""The generic key-map mechanism of `omnijax.hf.keymap`: each transform against torch semantics,
exact round trips through LayerGroups and Experts, and CheckpointErrors that name the key."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import traverse_util

from omnijax.hf import keymap
from omnijax.hf.keymap import (
  CONV1D,
  CONV1D_TRANSPOSE,
  CONV2D,
  COPY,
  FLAT,
  LINEAR,
  CheckpointError,
  Entry,
  Experts,
  KeyMap,
  LayerGroup,
  Linear,
  PatchEmbed,
)

torch = pytest.importorskip("torch")
F = torch.nn.functional
TOL = 1e-5


def _rand(*shape, seed=0):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _convert(t, w):
  """omnijax leaf -> torch tensor through `t`, checking the shape and the exact way back."""
  hf = t.to_hf(w)
  assert hf.shape == t.hf_shape(w.shape)
  back = t.from_hf(np.ascontiguousarray(hf), w.shape)
  assert back.shape == w.shape and np.array_equal(back, w)
  return torch.from_numpy(np.ascontiguousarray(hf))


def _close(a, b):
  a, b = np.asarray(a), np.asarray(b)
  assert a.shape == b.shape and np.abs(a - b).max() <= TOL, np.abs(a - b).max()


# ---------------------------------------------------------------------------------------------
# Transforms against torch
# ---------------------------------------------------------------------------------------------


def test_copy_and_flat():
  w = _rand(2, 3)
  assert tuple(_convert(COPY, w).shape) == (2, 3)
  assert np.array_equal(_convert(FLAT, w).numpy(), w.reshape(-1))


@pytest.mark.parametrize("shape,n_in", [((6, 4), 1), ((6, 2, 3), 1), ((2, 3, 5), 2)])
def test_linear(shape, n_in):
  w = _rand(*shape)
  x = _rand(7, *shape[:n_in], seed=1)
  ours = np.tensordot(x, w, axes=n_in).reshape(7, -1)
  _close(F.linear(torch.from_numpy(x.reshape(7, -1)), _convert(Linear(n_in), w)), ours)


@pytest.mark.parametrize("groups,dilation", [(1, 1), (1, 3), (6, 1)])
def test_conv1d(groups, dilation):
  k, cin, cout = 5, 6, 12
  w = _rand(k, cin // groups, cout)  # flax Conv kernel
  x = _rand(2, 20, cin, seed=1)  # (B, T, C)
  ours = jax.lax.conv_general_dilated(
    x,
    w,
    (1,),
    "VALID",
    rhs_dilation=(dilation,),
    dimension_numbers=("NWC", "WIO", "NWC"),
    feature_group_count=groups,
  )
  ref = F.conv1d(
    torch.from_numpy(x.transpose(0, 2, 1)),
    _convert(CONV1D, w),
    dilation=dilation,
    groups=groups,
  )
  _close(ref.numpy().transpose(0, 2, 1), ours)


@pytest.mark.parametrize("k,s", [(2, 2), (6, 3), (16, 8), (7, 3)])
def test_conv1d_transpose(k, s):
  cin, cout, length = 3, 4, 5
  w = _rand(k, cin, cout)
  x = _rand(2, length, cin, seed=1)
  ref = F.conv_transpose1d(
    torch.from_numpy(x.transpose(0, 2, 1)), _convert(CONV1D_TRANSPOSE, w), stride=s
  )
  ref = ref.numpy().transpose(0, 2, 1)
  explicit = np.zeros((2, (length - 1) * s + k, cout), np.float32)  # input t, tap j -> t * s + j
  for t in range(length):
    explicit[:, t * s : t * s + k] += np.einsum("bi,kio->bko", x[:, t], w)
  _close(ref, explicit)
  lax = jax.lax.conv_transpose(
    x, w, (s,), "VALID", dimension_numbers=("NWC", "WOI", "NWC"), transpose_kernel=True
  )
  _close(ref, lax)


def test_conv1d_transpose_matches_causal_module():
  """The Code2Wav module's kernel is this transform's omnijax layout: torch's output cropped by
  k - s on both ends."""
  conv = pytest.importorskip("omnijax.models.conv")
  k, s, cin, cout = 6, 3, 3, 4
  module = conv.CausalConvTranspose1d(cout, k, s)
  x = _rand(2, 5, cin, seed=1)
  params = module.init(jax.random.key(0), x)["params"]
  params = jax.tree.map(lambda p: _rand(*p.shape, seed=2), nn.meta.unbox(params))
  ours = module.apply({"params": params}, x)
  ref = F.conv_transpose1d(
    torch.from_numpy(x.transpose(0, 2, 1)),
    _convert(CONV1D_TRANSPOSE, params["kernel"]),
    torch.from_numpy(params["bias"]),
    stride=s,
  )
  _close(ref.numpy().transpose(0, 2, 1)[:, k - s : -(k - s)], ours)


def test_conv2d():
  w = _rand(3, 5, 2, 4)  # flax HWIO
  x = _rand(2, 9, 11, 2, seed=1)  # NHWC
  ours = jax.lax.conv_general_dilated(
    x, w, (2, 2), [(1, 1), (1, 1)], dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  ref = F.conv2d(
    torch.from_numpy(x.transpose(0, 3, 1, 2)), _convert(CONV2D, w), stride=2, padding=1
  )
  _close(ref.numpy().transpose(0, 2, 3, 1), ours)


def test_patch_embed():
  patch = (3, 2, 4, 4)  # (C, T, p, p)
  w = _rand(int(np.prod(patch)), 8)
  x = _rand(5, *patch, seed=1)  # five patches, each flattened channel-major by the processor
  ours = x.reshape(5, -1) @ w
  ref = F.conv3d(torch.from_numpy(x), _convert(PatchEmbed(patch), w), stride=patch[1:])
  _close(ref.numpy().reshape(5, 8), ours)


@pytest.mark.parametrize(
  "t,shape",
  [
    (Linear(2), (4, 5)),
    (CONV1D, (3, 4)),
    (CONV2D, (3, 3, 4)),
    (PatchEmbed((3, 2, 2)), (11, 4)),
    (Experts(4), (3, 5, 6)),
  ],
)
def test_hf_shape_refuses_wrong_rank(t, shape):
  with pytest.raises(ValueError):
    t.hf_shape(shape)


# ---------------------------------------------------------------------------------------------
# Key maps
# ---------------------------------------------------------------------------------------------

LAYER = (
  Entry("norm/scale", "norm.weight", COPY),
  Entry("attn/bias", "attn.bias", FLAT),
  Entry("attn/out", "attn.out.weight", Linear(2)),
  Entry("moe_up", "mlp.experts.{e}.up_proj.weight", Experts(3)),
)
# Two scanned runs of one layer stack (like the vision blocks cut by deepstack taps).
TOY = KeyMap(
  [
    Entry("embed", "m.embed.weight", COPY),
    LayerGroup("blocks_0_2", "m.layers.{i}", 0, 2, LAYER),
    LayerGroup("blocks_2_3", "m.layers.{i}", 2, 1, LAYER),
    Entry("conv/kernel", "m.conv.weight", CONV1D),
    Entry("up/kernel", "m.up.weight", CONV1D_TRANSPOSE),
  ]
)


def _toy_params(seed=0, dtype=np.float32):
  def layer(n):
    return {
      "norm": {"scale": (n, 4)},
      "attn": {"bias": (n, 2, 3), "out": (n, 2, 3, 4)},
      "moe_up": (n, 3, 4, 5),
    }

  shapes = {
    "embed": (10, 4),
    "blocks_0_2": layer(2),
    "blocks_2_3": layer(1),
    "conv": {"kernel": (7, 4, 6)},
    "up": {"kernel": (4, 6, 2)},
  }
  flat = traverse_util.flatten_dict(shapes, sep="/")
  rng = np.random.default_rng(seed)
  return traverse_util.unflatten_dict(
    {k: rng.standard_normal(v).astype(dtype) for k, v in flat.items()}, sep="/"
  )


def _abstract(params):
  return jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), params)


def test_keys_and_order():
  keys = keymap.hf_keys(TOY)
  layer = ["norm.weight", "attn.bias", "attn.out.weight"] + [
    f"mlp.experts.{e}.up_proj.weight" for e in range(3)
  ]
  want = ["m.embed.weight"]
  want += [f"m.layers.{i}.{k}" for i in range(3) for k in layer]  # layer-major
  want += ["m.conv.weight", "m.up.weight"]
  assert keys == want
  tensors = keymap.iter_to_hf(_toy_params(), TOY)
  assert iter(tensors) is tensors  # lazy
  assert [k for k, _ in tensors] == want


def test_round_trip_exact_and_cast():
  params = _toy_params()
  hf = keymap.to_hf(params, TOY)
  p = traverse_util.flatten_dict(params, sep="/")
  np.testing.assert_array_equal(
    hf["m.layers.2.attn.bias"], p["blocks_2_3/attn/bias"][0].reshape(-1)
  )
  np.testing.assert_array_equal(
    hf["m.layers.1.mlp.experts.2.up_proj.weight"], p["blocks_0_2/moe_up"][1, 2].T
  )
  np.testing.assert_array_equal(hf["m.up.weight"], p["up/kernel"].transpose(1, 2, 0))
  assert all(v.flags.c_contiguous for v in hf.values())
  back = keymap.from_hf(hf.__getitem__, _abstract(params), TOY)
  jax.tree.map(np.testing.assert_array_equal, back, params)
  # bfloat16 leaves: cast on import; boxed abstract params are accepted
  bf16 = jax.tree.map(lambda v: v.astype(ml_dtypes.bfloat16), params)
  boxed = jax.tree.map(lambda v: nn.Partitioned(v, (None,) * v.ndim), _abstract(bf16))
  again = keymap.from_hf(hf.__getitem__, boxed, TOY)
  assert all(v.dtype == ml_dtypes.bfloat16 for v in jax.tree.leaves(again))
  jax.tree.map(np.testing.assert_array_equal, again, bf16)
  # jax arrays (sliced per layer on export) and a part `under` a subtree
  nested = KeyMap([Entry("x", "n.x", COPY)]) + TOY.under("part")
  jparams = {"x": jnp.ones(3), "part": jax.tree.map(jnp.asarray, params)}
  hf2 = keymap.to_hf(jparams, nested)
  assert list(hf2) == ["n.x", *hf] and all(np.array_equal(hf2[k], hf[k]) for k in hf)


def test_wrong_checkpoint_shape_names_key_and_param():
  params = _toy_params()
  hf = keymap.to_hf(params, TOY)
  for key, param in [
    ("m.layers.2.mlp.experts.1.up_proj.weight", r"blocks_2_3/moe_up\[0, 1\] of shape \(4, 5\)"),
    ("m.layers.1.attn.out.weight", r"blocks_0_2/attn/out\[1\] of shape \(2, 3, 4\)"),
    ("m.up.weight", r"up/kernel of shape \(4, 6, 2\)"),
  ]:
    bad = dict(hf)
    bad[key] = bad[key][..., :-1]
    with pytest.raises(CheckpointError, match=rf"{key.replace('.', '[.]')}'.*{param}"):
      keymap.from_hf(bad.__getitem__, _abstract(params), TOY)
  with pytest.raises(KeyError):  # `get`'s own error for an absent key passes through
    keymap.from_hf({}.__getitem__, _abstract(params), TOY)


def test_params_that_do_not_fit_the_map():
  params = _toy_params()
  extra = {**params, "stray": np.zeros(2, np.float32)}
  for direction in ("to", "from"):

    def run(p):
      if direction == "to":
        return keymap.to_hf(p, TOY)
      return keymap.from_hf(keymap.to_hf(params, TOY).__getitem__, _abstract(p), TOY)

    with pytest.raises(CheckpointError, match="no checkpoint mapping for omnijax params.*stray"):
      run(extra)
    missing = {k: v for k, v in params.items() if k != "conv"}
    with pytest.raises(CheckpointError, match="no leaf.*conv/kernel"):
      run(missing)
    layers = jax.tree.map(lambda v: v[:1], params)  # 1 layer where the group stacks 2
    with pytest.raises(
      CheckpointError, match="blocks_0_2/norm/scale has shape \\(1, 4\\).*2 layers"
    ):
      run(layers)
    experts = {**params, "blocks_2_3": {**params["blocks_2_3"], "moe_up": np.zeros((1, 2, 4, 5))}}
    with pytest.raises(CheckpointError, match="blocks_2_3/moe_up.*3 experts"):
      run(experts)
    rank = {**params, "conv": {"kernel": np.zeros((7, 4))}}
    with pytest.raises(
      CheckpointError, match="conv/kernel has shape \\(7, 4\\).*conv1d.*m.conv.weight"
    ):
      run(rank)


def test_invalid_keymaps():
  with pytest.raises(ValueError, match="mapped twice"):
    KeyMap([Entry("a", "x.a", COPY), Entry("a", "x.b", COPY)])
  with pytest.raises(ValueError, match="mapped twice"):
    KeyMap([Entry("a", "x.a", COPY), Entry("b", "x.a", COPY)])
  with pytest.raises(ValueError, match="mapped twice"):  # overlapping layer ranges
    KeyMap([LayerGroup("g", "l.{i}", 0, 2, LAYER), LayerGroup("h", "l.{i}", 1, 2, LAYER)])
  with pytest.raises(ValueError, match="has no"):
    KeyMap([LayerGroup("g", "layers", 0, 2, LAYER)])
  with pytest.raises(ValueError, match="Experts only"):
    KeyMap([Entry("a", "x.{e}.a", LINEAR)])
  with pytest.raises(ValueError, match="Experts only"):
    KeyMap([Entry("a", "x.a", Experts(2))])


def test_decoder_keymap_fits_code2wav_style_decoder():
  """A dense decoder without q/k norm and with layer scale (Code2Wav's pre-transformer) is mapped
  leaf for leaf by the decoder table."""
  from omnijax.models.config import ImplConfig, TextConfig
  from omnijax.models.decoder import Decoder

  cfg = TextConfig(
    vocab_size=16,
    hidden_size=8,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=4,
    num_experts=0,
    num_experts_per_tok=0,
    moe_intermediate_size=0,
    intermediate_size=12,
    mrope_section=(2, 0, 0),
    qk_norm=False,
    sliding_window=3,
    layer_scale_initial_scale=0.01,
  )
  h = jnp.zeros((1, 4, 8))
  pos = jnp.zeros((3, 1, 4), jnp.int32)
  abstract = jax.eval_shape(
    lambda: Decoder(cfg, ImplConfig()).init(jax.random.key(0), h, pos, jnp.ones((1, 4), jnp.int32))
  )["params"]
  km = keymap.decoder_keymap(cfg, "code2wav.pre_transformer")
  keys = keymap.hf_keys(km)
  assert "code2wav.pre_transformer.layers.1.mlp_layer_scale.scale" in keys
  assert "code2wav.pre_transformer.norm.weight" in keys
  assert not any("q_norm" in k for k in keys)
  params = jax.tree.map(lambda v: _rand(*v.shape), nn.meta.unbox(abstract))
  back = keymap.from_hf(keymap.to_hf(params, km).__getitem__, abstract, km)
  jax.tree.map(np.testing.assert_array_equal, back, params)


def test_released_talker_keys():
  """The released Talker's key map has the released checkpoint's 8037 ``talker.*`` tensors
  (per-expert layout) and fits the Talker module's abstract params leaf for leaf."""
  from omnijax.hf import convert
  from omnijax.models import presets
  from omnijax.models.config import TalkerConfig

  cfg = TalkerConfig.from_dict(presets.get_talker("qwen3-omni-30b-a3b"))
  km = keymap.talker_keymap(cfg)
  keys = keymap.hf_keys(km)
  assert len(keys) == len(set(keys)) == 8037
  assert "talker.code_predictor.model.codec_embedding.14.weight" in keys
  assert "talker.code_predictor.lm_head.14.weight" in keys
  assert "talker.model.layers.19.mlp.experts.127.down_proj.weight" in keys
  assert "talker.model.layers.19.mlp.shared_expert_gate.weight" in keys
  flat = traverse_util.flatten_dict(convert.abstract_talker_params(cfg), sep="/")
  keymap._check_leaves(km, {k: tuple(v.shape) for k, v in flat.items()})
