"""The multimodal Thinker (audio tower + vision tower + DeepStack + TM-RoPE) equals transformers'
Qwen3-Omni Thinker end to end on the same weights.

Tiny float32 config (the `tiny` preset). Weights go both ways:
- transformers random init (towers rescaled so that their outputs are O(1); the default 0.02-std
  init makes them tiny and any tower bug invisible) -> `save_pretrained` -> `omnijax.load(dir)`;
- omnijax params (those, perturbed on the omnijax side) -> `convert.save_hf` ->
  `Qwen3OmniMoeForConditionalGeneration.from_pretrained` (every Thinker tensor loaded).
Every case goes through `Model.logits` / `Model.aux_loss` with transformers' argument names and
through transformers' Thinker forward with the same arguments; positions are computed on both
sides (`rope_index` here, `get_rope_index` there). Input ids hold the placeholders as the
processor lays them out. A sensitivity check makes sure every tower's input moves the logits at
and after its placeholders by far more than the tolerance, and nothing before them.
Also: a stream of calls with varied media sizes compiles once per bucket combination, and
padding into bigger buckets never changes valid outputs. `pytest -s` prints the measurements.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import omnijax  # noqa: E402
from omnijax import api  # noqa: E402
from omnijax.hf import convert, hf_config  # noqa: E402
from omnijax.processing import audio as audio_lib  # noqa: E402
from omnijax.processing import media as media_lib  # noqa: E402
from omnijax.processing import positions as P  # noqa: E402
from omnijax.models import presets  # noqa: E402
from omnijax.processing import vision as vision_lib  # noqa: E402
from omnijax.models.config import ThinkerConfig  # noqa: E402
from omnijax.models.decoder import load_balancing_loss  # noqa: E402

TOL = 1e-4  # parity: max abs difference of float32 logits and of the aux loss
SENSITIVITY = 1e-2  # a tower's input must move the logits at/after its placeholders by more
CFG = ThinkerConfig.from_dict(presets.get("tiny"))
TOK = P.TokenIds.from_config(CFG)
MERGE = CFG.vision.spatial_merge_size
PIXELS = CFG.vision.in_channels * CFG.vision.temporal_patch_size * CFG.vision.patch_size**2
PLACEHOLDER = {"audio": TOK.audio, "image": TOK.image, "video": TOK.video}
# The tower input each modality's sensitivity check perturbs.
MEDIA_INPUT = {"audio": "input_features", "image": "pixel_values", "video": "pixel_values_videos"}


# ---- inputs laid out as the processor lays them out ---------------------------------------------


@dataclasses.dataclass
class Batch:
  ids: np.ndarray  # (B, S), right-padded with 0
  kwargs: dict  # transformers' Thinker arguments besides input_ids (numpy)
  modalities: tuple[str, ...]


def _seconds_per_grid(fps: float) -> float:
  return CFG.vision.temporal_patch_size / fps  # as the processor computes video_second_per_grid


def make_batch(rows, seed: int = 0, seq_len: int | None = None) -> Batch:
  """rows: per row a list of pieces ("text", n) | ("audio", frames) | ("image", grid) |
  ("video", grid, fps) | ("aiv", grid, fps, frames) (audio in video). Items of a kind are
  listed in order of appearance over the batch, as the processor does."""
  rng = np.random.default_rng(seed)
  mels, images, videos, seconds, ids_rows, aiv = [], [], [], [], [], False

  def pixels(grid):
    return rng.standard_normal((int(np.prod(grid)), PIXELS)).astype(np.float32)

  def mel(frames):
    mels.append(rng.standard_normal((CFG.audio.num_mel_bins, frames)).astype(np.float32))
    return P.audio_token_count(frames, CFG.audio.n_window)

  for pieces in rows:
    ids = []
    for kind, *args in pieces:
      if kind == "text":
        ids += rng.integers(10, CFG.text.vocab_size, args[0]).tolist()
      elif kind == "audio":
        ids += [TOK.audio_start] + [TOK.audio] * mel(args[0]) + [TOK.audio_end]
      elif kind == "image":
        images.append((pixels(args[0]), args[0]))
        ids += (
          [TOK.vision_start] + [TOK.image] * P.image_token_count(args[0], MERGE) + [TOK.vision_end]
        )
      elif kind == "video":
        grid, fps = args
        videos.append((pixels(grid), grid))
        seconds.append(_seconds_per_grid(fps))
        ids += (
          [TOK.vision_start] + [TOK.video] * P.video_token_count(grid, MERGE) + [TOK.vision_end]
        )
      elif kind == "aiv":
        grid, fps, frames = args
        videos.append((pixels(grid), grid))
        seconds.append(_seconds_per_grid(fps))
        ids += P.audio_in_video_layout(
          grid,
          seconds[-1],
          mel(frames),
          tokens=TOK,
          spatial_merge_size=MERGE,
          position_id_per_seconds=CFG.position_id_per_seconds,
        ).tolist()
        aiv = True
      else:
        raise ValueError(kind)
    ids_rows.append(ids)

  s = seq_len or max(map(len, ids_rows))
  ids = np.zeros((len(rows), s), np.int64)
  mask = np.zeros((len(rows), s), np.int64)
  for b, r in enumerate(ids_rows):
    ids[b, : len(r)] = r
    mask[b, : len(r)] = 1
  kwargs = dict(attention_mask=mask)
  modalities = []
  if mels:
    frames = max(m.shape[1] for m in mels)
    feats = np.zeros((len(mels), CFG.audio.num_mel_bins, frames), np.float32)
    fmask = np.zeros((len(mels), frames), np.int64)
    for i, m in enumerate(mels):
      feats[i, :, : m.shape[1]] = m
      fmask[i, : m.shape[1]] = 1
    kwargs |= dict(input_features=feats, feature_attention_mask=fmask)
    modalities.append("audio")
  if images:
    kwargs |= dict(
      pixel_values=np.concatenate([p for p, _ in images]),
      image_grid_thw=np.array([g for _, g in images], np.int64),
    )
    modalities.append("image")
  if videos:
    kwargs |= dict(
      pixel_values_videos=np.concatenate([p for p, _ in videos]),
      video_grid_thw=np.array([g for _, g in videos], np.int64),
      video_second_per_grid=np.array(seconds, np.float32),
    )
    modalities.append("video")
  if aiv:
    kwargs["use_audio_in_video"] = True
  return Batch(ids, kwargs, tuple(modalities))


CASES = {
  # 150 frames: < 1 chunk window; 900 frames: longer than the 8 s (800-frame) attention window
  "audio_two_in_one_row": [[("text", 5), ("audio", 150), ("text", 3), ("audio", 900), ("text", 4)]],
  "audio_batch_of_two_rows": [
    [("text", 4), ("audio", 300), ("text", 6)],
    [("text", 2), ("audio", 700), ("text", 3)],
  ],
  "one_image": [[("text", 5), ("image", (1, 4, 6)), ("text", 6)]],
  "two_images_different_grids": [
    [("text", 3), ("image", (1, 4, 6)), ("text", 4), ("image", (1, 8, 4)), ("text", 5)]
  ],
  # 3 temporal patches at 2 fps: 1 s per temporal patch, T steps of 13
  "video": [[("text", 4), ("video", (3, 4, 4), 2.0), ("text", 5)]],
  # 3 s of video at 2 fps with its 300-frame (3 s) audio track, interleaved by time
  "audio_in_video": [[("text", 4), ("aiv", (3, 4, 4), 2.0, 300), ("text", 5)]],
  # everything, batch 2 (right-padded); a 3 fps video has fractional T positions
  "mixed_batch": [
    [
      ("text", 3),
      ("image", (1, 4, 6)),
      ("text", 2),
      ("audio", 250),
      ("text", 2),
      ("video", (2, 4, 6), 3.0),
      ("text", 4),
    ],
    [
      ("text", 2),
      ("video", (3, 4, 4), 2.0),
      ("audio", 120),
      ("text", 3),
      ("image", (1, 6, 4)),
      ("text", 3),
    ],
  ],
}


# ---- the two models -----------------------------------------------------------------------------


def _randomize_hf(thinker) -> None:
  """Text decoder as in test_hf_parity (0.05 std, norms ~1); towers at O(1) activations:
  fan-in scaled matrices, O(0.3) biases, LayerNorm weights ~1, position table 0.5 std."""
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, p in thinker.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if name.startswith(("model.audio_tower.", "model.visual.")):
        if "pos_embed" in name:
          p.copy_(0.5 * noise)
        elif p.ndim > 1:  # Linear (out, in), Conv2d (out, in, k, k), Conv3d (out, C, T, p, p)
          p.copy_(noise * p[0].numel() ** -0.5)
        elif name.endswith("weight"):  # LayerNorm
          p.copy_(1.0 + 0.3 * noise)
        else:
          p.copy_(0.3 * noise)
      else:
        p.copy_(1 + 0.1 * noise if name.endswith("norm.weight") else 0.05 * noise)


def _hf_tensors(module, prefix: str) -> dict[str, np.ndarray]:
  return {f"{prefix}.{k}": v.numpy() for k, v in module.state_dict().items()}


def _assert_towers_equal(model: api.Model, hf_model) -> None:
  """The tower tensors omnijax would export are those transformers holds, exactly."""
  ours = {
    k: v
    for k, v in convert.hf_tensors(model.config, model.params)
    if k.startswith(("thinker.audio_tower.", "thinker.visual."))
  }
  theirs = _hf_tensors(hf_model.thinker.model.audio_tower, "thinker.audio_tower") | _hf_tensors(
    hf_model.thinker.model.visual, "thinker.visual"
  )
  assert sorted(ours) == sorted(theirs)
  for k, v in ours.items():
    np.testing.assert_array_equal(v, theirs[k], err_msg=k)


@pytest.fixture(scope="module")
def from_hf(tmp_path_factory):
  """transformers (rescaled random init) -> save_pretrained -> omnijax.load."""
  torch.manual_seed(0)
  hf_model = transformers.Qwen3OmniMoeForConditionalGeneration(
    transformers.Qwen3OmniMoeConfig(**hf_config.to_hf_config(CFG))
  ).eval()
  _randomize_hf(hf_model.thinker)
  hf_dir = tmp_path_factory.mktemp("hf")
  hf_model.save_pretrained(hf_dir)
  model = omnijax.load(hf_dir)
  assert model.config == CFG
  _assert_towers_equal(model, hf_model)
  return model, hf_model


@pytest.fixture(scope="module")
def to_hf(from_hf, tmp_path_factory):
  """omnijax params (from_hf's, perturbed elementwise here) -> convert.save_hf ->
  from_pretrained, with every Thinker tensor loaded."""
  model, _ = from_hf
  rng = np.random.default_rng(7)
  flat = traverse_util.flatten_dict(jax.device_get(model.params), sep="/")
  params = traverse_util.unflatten_dict(
    {
      k: (np.asarray(v) * (1 + 0.2 * rng.standard_normal(v.shape))).astype(np.float32)
      for k, v in flat.items()
    },
    sep="/",
  )
  out = tmp_path_factory.mktemp("export")
  convert.save_hf(CFG, params, out)
  hf_model, info = transformers.Qwen3OmniMoeForConditionalGeneration.from_pretrained(
    out, dtype=torch.float32, output_loading_info=True
  )
  assert not info["missing_keys"] and not info["unexpected_keys"]
  assert not info["mismatched_keys"]
  ours = api.Model(CFG, params)
  _assert_towers_equal(ours, hf_model)
  return ours, hf_model.eval()


# ---- comparison ---------------------------------------------------------------------------------


def _hf_outputs(hf_model, batch: Batch, **override):
  kw = batch.kwargs | override
  t = {k: (v if isinstance(v, bool) else torch.from_numpy(np.asarray(v))) for k, v in kw.items()}
  with torch.no_grad():
    out = hf_model.thinker(input_ids=torch.from_numpy(batch.ids), output_router_logits=True, **t)
  return out.logits.float().numpy(), float(out.aux_loss)


def _check_parity(label: str, model: api.Model, hf_model, batch: Batch) -> np.ndarray:
  real = batch.kwargs["attention_mask"].astype(bool)
  ours = model.logits(batch.ids, **batch.kwargs)
  aux = model.aux_loss(batch.ids, **batch.kwargs)
  theirs, their_aux = _hf_outputs(hf_model, batch)
  assert ours.shape == theirs.shape == batch.ids.shape + (CFG.text.vocab_size,)
  d_logits = float(np.abs(ours - theirs)[real].max())
  d_aux = abs(aux - their_aux)
  print(
    f"\n[mm parity] {label}: max|logits diff|={d_logits:.3g} (max|logits| "
    f"{np.abs(theirs[real]).max():.3g}, {int(real.sum())} tokens), |aux diff|={d_aux:.3g} "
    f"(aux {their_aux:.6f})"
  )
  assert d_logits <= TOL and d_aux <= TOL
  return ours


def _check_sensitivity(label: str, model: api.Model, batch: Batch, base: np.ndarray) -> None:
  """Perturbing one tower's input moves the logits at/after that modality's first placeholder
  of each row by > SENSITIVITY and leaves earlier positions and rows without it unchanged."""
  real = batch.kwargs["attention_mask"].astype(bool)
  rng = np.random.default_rng(11)
  for kind in batch.modalities:
    name = MEDIA_INPUT[kind]
    x = batch.kwargs[name]
    moved = model.logits(
      batch.ids, **batch.kwargs | {name: x + rng.standard_normal(x.shape).astype(np.float32)}
    )
    diff = np.where(real[..., None], np.abs(moved - base), 0).max(-1)  # (B, S)
    after = []
    for b in range(len(batch.ids)):
      hits = np.flatnonzero(batch.ids[b] == PLACEHOLDER[kind])
      first = hits[0] if len(hits) else batch.ids.shape[1]
      assert diff[b, :first].max(initial=0) <= 1e-5, (kind, b)  # causal, rows independent
      if len(hits):
        after.append(float(diff[b, first:].max()))
        assert diff[b, hits].max() > SENSITIVITY, (kind, b)
    print(
      f"[mm sensitivity] {label}: {name} perturbed -> max|logits change| at/after the "
      f"{kind} placeholders {min(after):.3g} (min over rows)"
    )
    assert min(after) > SENSITIVITY


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_to_omnijax(from_hf, case):
  model, hf_model = from_hf
  batch = make_batch(CASES[case], seed=list(CASES).index(case))
  base = _check_parity(f"{case} (transformers -> omnijax)", model, hf_model, batch)
  _check_sensitivity(case, model, batch, base)


@pytest.mark.parametrize("case", list(CASES))
def test_omnijax_to_transformers(to_hf, case):  # same shapes as above: no new compiles
  model, hf_model = to_hf
  batch = make_batch(CASES[case], seed=100 + list(CASES).index(case))
  _check_parity(f"{case} (omnijax -> transformers)", model, hf_model, batch)


def test_argument_variants(from_hf):
  """1-D input_ids and attention_mask (batch 1), torch tensors, audio_feature_lengths instead of
  feature_attention_mask, and explicit positions from rope_index give the same logits."""
  model, _ = from_hf
  batch = make_batch(CASES["audio_two_in_one_row"], seed=0)
  kw = batch.kwargs
  want = model.logits(batch.ids, **kw)
  got = model.logits(
    torch.from_numpy(batch.ids[0]),
    attention_mask=torch.from_numpy(kw["attention_mask"][0]),
    input_features=torch.from_numpy(kw["input_features"]),
    audio_feature_lengths=torch.from_numpy(kw["feature_attention_mask"].sum(-1)),
  )
  np.testing.assert_array_equal(got, want)
  pos, _ = P.rope_index(
    batch.ids, **P.rope_kwargs_from_config(CFG), audio_seqlens=kw["feature_attention_mask"].sum(-1)
  )
  np.testing.assert_array_equal(model.logits(batch.ids, pos, **kw), want)
  with pytest.raises(ValueError, match="attention_mask must have the shape of input_ids"):
    model.logits(batch.ids, **kw | dict(attention_mask=kw["attention_mask"][:, 1:]))


# ---- compilation and padding ---------------------------------------------------------------------

# (row 0 audio frames, row 0 image grid), (row 1 ...): audio buckets 200/400 frames, vision
# buckets 64/96 patches per row.
STREAM = [
  ((150, (1, 4, 6)), (60, (1, 4, 4))),
  ((180, (1, 8, 8)), (199, (1, 2, 4))),
  ((350, (1, 4, 4)), (90, (1, 6, 6))),
  ((120, (1, 8, 4)), (390, (1, 4, 8))),
  ((120, (1, 8, 10)), (40, (1, 4, 4))),
  ((199, (1, 4, 6)), (101, (1, 6, 6))),
]
STREAM_SEQ = 160  # every batch is right-padded to this length (as a data pipeline would)


def _stream_batch(i: int) -> Batch:
  rows = [
    [("text", 3), ("audio", frames), ("text", 2), ("image", grid), ("text", 4)]
    for frames, grid in STREAM[i]
  ]
  return make_batch(rows, seed=100 + i, seq_len=STREAM_SEQ)


def test_compiles_once_per_bucket_combination(from_hf):
  model, _ = from_hf
  api._forward.cache_clear()  # a fresh jitted forward for this config: its cache starts empty
  combos, outputs = [], []
  for i, rows in enumerate(STREAM):
    combos.append(
      (
        audio_lib.bucket_frames(max(f for f, _ in rows)),
        vision_lib.bucket_patches(max(int(np.prod(g)) for _, g in rows)),
      )
    )
    batch = _stream_batch(i)
    outputs.append(model.logits(batch.ids, **batch.kwargs))
  compiles = api._forward(model.config)._cache_size()
  print(
    f"\n[mm compile] {len(STREAM)} calls, bucket combinations (audio frames, patches) "
    f"{sorted(set(combos))}, {compiles} compiles"
  )
  assert len(set(combos)) == 3 and compiles == 3

  # The same inputs padded into bigger buckets (audio frames and audios per row, patches per
  # row, sequence length), with garbage in the padded frames and patches: valid outputs agree.
  batch = _stream_batch(0)
  kw = batch.kwargs
  lengths = kw["feature_attention_mask"].sum(-1)
  mels = [kw["input_features"][i, :, :n] for i, n in enumerate(lengths)]
  media = media_lib.audio_buffers(CFG, [[m] for m in mels], frames=800, audios=2)
  rng = np.random.default_rng(3)
  frame_pad = np.arange(800) >= media["audio_lengths"][..., None, None]
  media["audio_features"] = np.where(
    frame_pad, 10 * rng.standard_normal(media["audio_features"].shape), media["audio_features"]
  ).astype(np.float32)
  grids = kw["image_grid_thw"]
  starts = np.concatenate([[0], np.cumsum(grids.prod(-1))])
  image_rows = [(kw["pixel_values"][starts[i] : starts[i + 1]], grids[i : i + 1]) for i in range(2)]
  media |= media_lib.vision_buffers(CFG, "image", image_rows, bucket=192)
  patch_pad = media["image_segment_ids"] == 0
  media["image_patches"] = np.where(
    patch_pad[..., None],
    10 * rng.standard_normal(media["image_patches"].shape),
    media["image_patches"],
  ).astype(np.float32)
  extra = 32
  ids = np.pad(batch.ids, ((0, 0), (0, extra)))
  mask = np.pad(kw["attention_mask"], ((0, 0), (0, extra)))
  pos, _ = P.rope_index(
    ids,
    **P.rope_kwargs_from_config(CFG),
    dtype=np.float32,
    attention_mask=mask,
    image_grid_thw=grids,
    audio_seqlens=lengths,
  )
  logits, stats = api._forward(CFG)(
    model.params, jnp.asarray(ids, jnp.int32), jnp.asarray(pos), jnp.asarray(mask, jnp.int32), media
  )
  real = kw["attention_mask"].astype(bool)
  diff = float(np.abs(np.asarray(logits)[:, :STREAM_SEQ] - outputs[0])[real].max())
  d_aux = abs(
    float(load_balancing_loss(stats, CFG.text.num_experts)) - model.aux_loss(batch.ids, **kw)
  )
  print(
    f"[mm padding] bigger buckets (800 frames x 2 audios, 192 patches, +{extra} tokens): "
    f"max|logits diff| {diff:.3g}, |aux diff| {d_aux:.3g}"
  )
  assert diff <= 1e-5 and d_aux <= 1e-6
