"""Training the multimodal Thinker: gradients reach the towers; modality-specific routers train
(and cannot be exported)."""

import jax
import numpy as np
import pytest
from flax import traverse_util

from omnijax import sharding as shd
from omnijax.errors import ConfigError
from omnijax.hf import hf_config
from omnijax.models import presets
from omnijax.processing import media, positions
from omnijax.models.config import ThinkerConfig
from omnijax.models.thinker import Thinker
from omnijax.train import optimizer
from omnijax.train import step as st
from omnijax.train.config import base_config

SEQ = 96


def _batch(cfg: ThinkerConfig, seed: int = 0):
  """Row 0: an image; row 1: an audio; row 2: a video; row 3: text only."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(20, 1000, (4, SEQ)).astype(np.int32)
  in_dim = 3 * 2 * 16 * 16
  image_grid, video_grid = np.array([[1, 4, 6]]), np.array([[3, 4, 4]])
  n_img = positions.image_token_count(image_grid[0])
  n_vid = positions.image_token_count(video_grid[0])
  n_aud = positions.audio_token_count(230)
  ids[0, 3 : 5 + n_img] = (
    [cfg.vision_start_token_id] + [cfg.image_token_id] * n_img + [cfg.vision_end_token_id]
  )
  ids[1, 10 : 12 + n_aud] = (
    [cfg.audio_start_token_id] + [cfg.audio_token_id] * n_aud + [cfg.audio_end_token_id]
  )
  ids[2, 7 : 9 + n_vid] = (
    [cfg.vision_start_token_id] + [cfg.video_token_id] * n_vid + [cfg.vision_end_token_id]
  )
  hf = dict(
    input_features=rng.normal(size=(1, 128, 230)).astype(np.float32),
    pixel_values=rng.normal(size=(int(image_grid.prod()), in_dim)).astype(np.float32),
    image_grid_thw=image_grid,
    pixel_values_videos=rng.normal(size=(int(video_grid.prod()), in_dim)).astype(np.float32),
    video_grid_thw=video_grid,
  )
  pos, _ = positions.rope_index(
    ids,
    **positions.rope_kwargs_from_config(cfg),
    image_grid_thw=image_grid,
    video_grid_thw=video_grid,
    video_second_per_grid=np.array([1.0]),
    audio_seqlens=[230],
  )
  batch = dict(
    inputs=ids,
    targets=np.roll(ids, -1, axis=1),
    segment_ids=np.ones((4, SEQ), np.int32),
    positions=np.ascontiguousarray(np.swapaxes(pos, 0, 1)),
    loss_mask=np.ones((4, SEQ), np.float32),
  )
  return batch | media.from_hf_inputs(cfg, ids, **hf)


def _step(cfg: ThinkerConfig, batch):
  model = Thinker(cfg)
  ocfg = base_config().optim
  ocfg.update(dict(learning_rate=1e-3, warmup_steps=0, weight_decay=0.0))
  tx, sched = optimizer.make_optimizer(ocfg, 10)
  mesh = shd.make_mesh(dict(data=1), jax.devices()[:1])
  rules = shd.DEFAULT_RULES
  with st.mesh_context(mesh, rules):
    init, _, shardings = st.state_shardings(model, tx, mesh, rules, SEQ)
    state = jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(0))
    before = jax.device_get(state.params)
    step = st.compile_train_step(
      model, tx, sched, mesh, rules, shardings, grad_accum_steps=1, z_loss=0.0
    )
    state, metrics = step(state, jax.device_put(batch, st.batch_shardings(batch, mesh, rules)))
  return before, jax.device_get(state.params), jax.device_get(metrics)


def _unchanged(before, after, subtree):
  flat_b = traverse_util.flatten_dict(before[subtree], sep="/")
  flat_a = traverse_util.flatten_dict(after[subtree], sep="/")
  return [k for k in flat_b if np.array_equal(flat_b[k], flat_a[k])]


def test_train_step_updates_every_tower_parameter():
  cfg = ThinkerConfig.from_dict(presets.get("tiny"))
  before, after, metrics = _step(cfg, _batch(cfg))
  assert np.isfinite(metrics["ce_sum"])
  assert _unchanged(before, after, "audio_tower") == []
  assert _unchanged(before, after, "visual") == []


def test_modality_routers_train_and_refuse_export():
  cd = presets.get("tiny")
  cd.text.modality_routers = True
  cfg = ThinkerConfig.from_dict(cd)
  before, after, metrics = _step(cfg, _batch(cfg))
  assert np.isfinite(metrics["ce_sum"])
  gates = "model/layers_0_2/mlp/modality_gates"
  g0 = traverse_util.flatten_dict(before, sep="/")[gates]
  g1 = traverse_util.flatten_dict(after, sep="/")[gates]
  assert g0.shape == (2, 4, cfg.text.hidden_size, cfg.text.num_experts)
  # Every modality's gate learned from its own tokens (text, image, audio, video).
  for m in range(4):
    assert not np.array_equal(g0[:, m], g1[:, m]), m
  with pytest.raises(ConfigError, match="modality_routers"):
    hf_config.to_hf_config(cfg)
