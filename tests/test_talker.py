"""The Talker and its MTP code predictor equal transformers' on the same weights (float32).

A tiny Qwen3-Omni with a Talker (MoE decoder with shared expert, two projections, a 16-codebook
code predictor) is drawn in transformers, saved, and read by ``convert.load_talker_hf``; the
export writes the same tensors back, and ``from_pretrained`` loads them with nothing missing.
Compared: codebook-0 logits and the load-balancing loss of the decoder (3-row M-RoPE ids that
differ per row), both projections, the codec stream (sum of 16 code embeddings), and the 15
MTP heads on teacher-forced frames; then our MTP's cached decoding against its teacher-forced
logits.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as hf_modeling  # noqa: E402

from omnijax.hf import convert, hf_config, safetensors_io  # noqa: E402
from omnijax.models import presets  # noqa: E402
from omnijax.models.config import ImplConfig, TalkerConfig, ThinkerConfig  # noqa: E402
from omnijax.models.decoder import init_cache, load_balancing_loss  # noqa: E402
from omnijax.models.talker import Talker  # noqa: E402
from omnijax.hf.random_weights import randomize_  # noqa: E402

TOL = 1e-4
B, S, N = 2, 20, 6


def _configs():
  thinker = ThinkerConfig.from_dict(presets.get("tiny"))
  d = presets.get_talker("tiny")
  d.text.num_experts_per_tok = 3  # top-k renormalised over an odd k
  d.code_predictor.num_key_value_heads = 1
  return thinker, TalkerConfig.from_dict(d)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
  thinker, talker = _configs()
  cfg = hf_config.to_hf_config(thinker, talker=talker)
  torch.manual_seed(0)
  hf = transformers.Qwen3OmniMoeForConditionalGeneration(transformers.Qwen3OmniMoeConfig(**cfg))
  randomize_(hf.talker, 3)
  hf.eval()
  hf_dir = tmp_path_factory.mktemp("hf")
  hf.save_pretrained(hf_dir)
  loaded = convert.load_talker_hf(hf_dir, thinker)
  assert loaded is not None and loaded[0] == talker
  return thinker, talker, hf, hf_dir, loaded[1]


def _t(x):
  return torch.from_numpy(np.asarray(x))


def _apply(talker, params, method, *args):
  return Talker(talker, ImplConfig()).apply({"params": params}, *args, method=method)


def _positions():
  s = np.arange(S)
  return np.stack(
    [np.stack([s, s + 5]), np.stack([s // 2, (3 * s) % 7]), np.stack([s % 3, s // 3 + 2])]
  ).astype(np.float32)


def test_decoder_logits_and_aux_loss(pair):
  _, talker, hf, _, params = pair
  x = np.random.default_rng(0).standard_normal((B, S, talker.text.hidden_size)).astype(np.float32)
  pos = _positions()
  with torch.no_grad():
    out = hf.talker.model(
      inputs_embeds=_t(x), position_ids=_t(pos).long(), output_router_logits=True
    )
    theirs = hf.talker.codec_head(out.last_hidden_state).numpy()
    aux = float(
      hf_modeling.load_balancing_loss_func(
        out.router_logits, talker.text.num_experts, talker.text.num_experts_per_tok
      )
    )
  h, logits, stats = _apply(talker, params, Talker.decode, x, pos, np.ones((B, S), np.int32))
  diff = float(np.abs(np.asarray(logits) - theirs).max())
  print(f"\n[talker] logits max diff {diff:.3g} (|logits| max {np.abs(theirs).max():.3g})")
  assert np.abs(theirs).std() > 0.3  # O(1) outputs, not ~0
  assert diff <= TOL
  assert abs(float(load_balancing_loss(stats, talker.text.num_experts)) - aux) <= TOL
  np.testing.assert_allclose(np.asarray(h), out.last_hidden_state.numpy(), atol=TOL)


def test_projections_and_codec_stream(pair):
  _, talker, hf, _, params = pair
  rng = np.random.default_rng(1)
  text = rng.standard_normal((B, S, talker.thinker_hidden_size)).astype(np.float32)
  hidden = rng.standard_normal((B, S, talker.thinker_hidden_size)).astype(np.float32)
  mm = rng.random((B, S)) < 0.3
  codes = rng.integers(0, talker.codebook_size, (B, S, talker.num_code_groups))
  codes[:, :4] = -1  # text-only positions
  codes[:, 4:7, 1:] = -1  # a special codec id alone
  codes[:, 4:7, 0] = talker.codec_bos_id
  ours = np.asarray(_apply(talker, params, Talker.inputs, text, hidden, mm, codes))
  with torch.no_grad():
    proj = torch.where(
      _t(mm)[..., None],
      hf.talker.hidden_projection(_t(hidden)),
      hf.talker.text_projection(_t(text)),
    )
    tables = [hf.talker.model.codec_embedding] + list(
      hf.talker.code_predictor.model.codec_embedding
    )
    codec = sum(
      torch.where(_t(codes[..., k] >= 0)[..., None], tables[k](_t(np.maximum(codes[..., k], 0))), 0)
      for k in range(talker.num_code_groups)
    )
    theirs = (proj + codec).numpy()
  assert np.abs(theirs).std() > 0.3
  np.testing.assert_allclose(ours, theirs, atol=TOL)


def _hf_mtp_logits(hf, h, codes):
  """Every MTP head on teacher-forced frames with transformers' modules: the sequence
  [h, E_0(c_0), E_1(c_1), ..., E_14(c_14)]; head g reads position g + 1."""
  cp = hf.talker.code_predictor
  with torch.no_grad():
    embeds = [_t(h)[:, None], hf.talker.model.codec_embedding(_t(codes[:, :1]))]
    embeds += [cp.model.codec_embedding[g](_t(codes[:, g + 1 : g + 2])) for g in range(14)]
    y = cp.model(inputs_embeds=torch.cat(embeds, 1)).last_hidden_state
    return np.stack([cp.lm_head[g](y[:, g + 1]).numpy() for g in range(15)], 1)


def test_mtp_heads_and_cached_decoding(pair):
  _, talker, hf, _, params = pair
  rng = np.random.default_rng(2)
  h = rng.standard_normal((N, talker.text.hidden_size)).astype(np.float32)
  codes = rng.integers(0, talker.codebook_size, (N, talker.num_code_groups))
  theirs = _hf_mtp_logits(hf, h, codes)

  def teacher_forced(m, h, codes):
    c0 = jnp.take(m.codec_embedding, codes[:, 0], axis=0)
    return m.code_predictor(h, c0, codes[:, 1:])

  ours = np.asarray(_apply(talker, params, teacher_forced, h, codes))
  diff = float(np.abs(ours - theirs).max())
  print(f"\n[mtp] 15 heads max diff {diff:.3g} (|logits| max {np.abs(theirs).max():.3g})")
  assert ours.shape == (N, 15, talker.codebook_size) and np.abs(theirs).std() > 0.3
  assert diff <= TOL

  # transformers' own decoding entry point: the 2-token prefill picks head 0.
  cp = hf.talker.code_predictor
  with torch.no_grad():
    prefill = torch.cat([_t(h)[:, None], hf.talker.model.codec_embedding(_t(codes[:, :1]))], 1)
    head0 = cp(inputs_embeds=prefill, use_cache=False).logits[:, -1].numpy()
  np.testing.assert_allclose(head0, theirs[:, 0], atol=TOL)

  def cached(m, h, codes):
    cache = init_cache(talker.code_predictor, ImplConfig(), N, talker.num_code_groups)
    x = jnp.stack([h, jnp.take(m.codec_embedding, codes[:, 0], axis=0)], 1)
    logits, cache = m.code_predictor.step(x, cache)
    out = [logits]
    for g in range(1, talker.num_code_groups - 1):
      x = m.code_predictor.embed(codes[:, g : g + 1], first=g)
      logits, cache = m.code_predictor.step(x, cache)
      out.append(logits)
    return jnp.stack(out, 1)

  np.testing.assert_allclose(np.asarray(_apply(talker, params, cached, h, codes)), ours, atol=TOL)


def test_export_writes_the_talker_back_and_transformers_loads_it(pair, tmp_path):
  thinker, talker, hf, hf_dir, params = pair
  thinker_params = convert.load_hf(hf_dir)[1]
  out = tmp_path / "export"
  convert.save_hf(thinker, thinker_params, out, talker=(talker, params))
  theirs = safetensors_io.Reader(hf_dir)
  ours = safetensors_io.Reader(out)
  talker_keys = sorted(k for k in theirs.keys() if k.startswith("talker."))
  assert sorted(k for k in ours.keys() if k.startswith("talker.")) == talker_keys
  for k in talker_keys:
    np.testing.assert_array_equal(ours(k), theirs(k), err_msg=k)
  loaded, info = transformers.Qwen3OmniMoeForConditionalGeneration.from_pretrained(
    out, dtype=torch.float32, output_loading_info=True
  )
  assert loaded.has_talker and not info["unexpected_keys"] and not info["mismatched_keys"]
  assert not [k for k in info["missing_keys"] if k.startswith(("talker.", "thinker."))]
  assert convert.load_talker_hf(out, thinker)[0] == talker
  assert jax.tree.structure(convert.load_talker_hf(out)[1]) == jax.tree.structure(params)


def test_thinker_captures_the_hidden_states_the_talker_reads(pair):
  """Thinker(capture=k) returns transformers' ``hidden_states[k]`` (0: the input embeddings,
  0 < k < layers: the raw residual stream, k = layers: the final norm's output)."""
  from omnijax.models.thinker import Thinker

  thinker, _, hf, hf_dir, _ = pair
  params = convert.load_hf(hf_dir)[1]
  ids = np.random.default_rng(4).integers(0, thinker.text.vocab_size, (B, S))
  with torch.no_grad():
    theirs = hf.thinker(input_ids=_t(ids), output_hidden_states=True).hidden_states
  assert len(theirs) == thinker.text.num_hidden_layers + 1
  for k, want in enumerate(theirs):
    *_, tap = Thinker(thinker).apply({"params": params}, ids, capture=k)
    np.testing.assert_allclose(np.asarray(tap), want.numpy(), atol=1e-5, err_msg=f"capture={k}")
