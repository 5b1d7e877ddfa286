"""`Model.generate` (KV-cache decoding) vs transformers' Thinker `generate` on the same weights.

The tiny float32 Thinker of `test_thinker_multimodal` (transformers random init, rescaled, loaded
into omnijax) with its LM head scaled up. Greedy tokens equal transformers'
`generate(do_sample=False)` for text, a left-padded batch of two text prompts, audio (a
left-padded batch), an image and a video; every greedy step's top-2 logit margin is far above
the logit differences, so equality is meaningful. The logits each token was chosen from equal
transformers' and those of a full forward over the final sequence (the strongest check of the
cache). Also: the one-token step compiles once across tokens and prompt lengths; sampling
(reproducible per seed, top_k=1 and tiny top_p = greedy, warpers equal transformers'); EOS
stopping and padding, default EOS ids; argument errors; the MoE kernels at a (B, 1) step.
`pytest -s` prints the measurements.
"""

import copy
import dataclasses
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from omnijax import api, decode  # noqa: E402
from omnijax.models import moe, presets  # noqa: E402
from omnijax.models.config import ThinkerConfig  # noqa: E402
from tests.test_thinker_multimodal import CASES, CFG, from_hf, make_batch  # noqa: E402,F401

LM_HEAD_SCALE = 4.0  # logits of std ~2: clear top-2 margins
NEW = 12  # new tokens per greedy comparison
MARGIN = 1e-4  # min top-1 - top-2 logit gap of every greedy step: 100x the logit differences
TOL = 1e-5  # logits: omnijax decode vs transformers' generate and vs full forwards


@pytest.fixture(scope="module")
def models(from_hf):
  """from_hf's pair with the LM head scaled by LM_HEAD_SCALE on both sides."""
  model, hf_model = from_hf
  hf_model = copy.deepcopy(hf_model)
  with torch.no_grad():
    hf_model.thinker.lm_head.weight.mul_(LM_HEAD_SCALE)
  params = dict(model.params, lm_head=model.params["lm_head"] * LM_HEAD_SCALE)
  return api.Model(model.config, params), hf_model


def _text(lengths, seed=0):
  """Left-padded random text prompts (ids, attention_mask)."""
  rng = np.random.default_rng(seed)
  s = max(lengths)
  ids = np.zeros((len(lengths), s), np.int64)
  mask = np.zeros((len(lengths), s), np.int64)
  for b, n in enumerate(lengths):
    ids[b, s - n :] = rng.integers(10, CFG.text.vocab_size, n)
    mask[b, s - n :] = 1
  return ids, dict(attention_mask=mask)


def _left_padded(case, seed):
  """A CASES batch (right-padded by make_batch) with each row's padding moved to the left."""
  batch = make_batch(CASES[case], seed=seed)
  ids, kw = batch.ids.copy(), dict(batch.kwargs)
  mask = kw["attention_mask"].copy()
  for b, n in enumerate(mask.sum(1)):
    ids[b] = np.roll(ids[b], len(ids[b]) - n)
    mask[b] = np.roll(mask[b], len(mask[b]) - n)
  kw["attention_mask"] = mask
  return ids, kw


def _torch(kwargs):
  return {
    k: (v if isinstance(v, bool) else torch.from_numpy(np.asarray(v))) for k, v in kwargs.items()
  }


def _hf_generate(hf_model, ids, kwargs, max_new, **gen):
  """transformers' greedy generate: (sequences, logits (B, new, V))."""
  with torch.no_grad():
    out = hf_model.thinker.generate(
      input_ids=torch.from_numpy(ids),
      **_torch(kwargs),
      max_new_tokens=max_new,
      do_sample=False,
      return_dict_in_generate=True,
      output_logits=True,
      **gen,
    )
  return out.sequences.numpy(), torch.stack(out.logits, 1).float().numpy()


def _hf_logits(hf_model, ids, kwargs):
  """transformers' full forward (no cache)."""
  with torch.no_grad():
    return hf_model.thinker(input_ids=torch.from_numpy(ids), **_torch(kwargs)).logits.numpy()


def _min_margin(logits):
  top2 = np.sort(logits, axis=-1)[..., -2:]
  return float((top2[..., 1] - top2[..., 0]).min())


CASES_GREEDY = {
  "text": lambda: _text([11]),
  "text_left_padded_batch": lambda: _text([5, 11], seed=1),
  "audio_left_padded_batch": lambda: _left_padded("audio_batch_of_two_rows", 2),
  "image": lambda: _left_padded("one_image", 3),
  "video": lambda: _left_padded("video", 4),
}


@pytest.mark.parametrize("case", list(CASES_GREEDY))
def test_greedy_equals_transformers(models, case):
  model, hf_model = models
  ids, kw = CASES_GREEDY[case]()
  ours, logits = model.generate(ids, NEW, eos_token_id=[], return_logits=True, **kw)
  theirs, their_logits = _hf_generate(hf_model, ids, kw, NEW)
  assert ours.dtype == np.int64 and ours.shape == theirs.shape == (len(ids), ids.shape[1] + NEW)
  margin = _min_margin(logits)
  d_hf = float(np.abs(logits - their_logits).max())
  # The whole sequence in one forward without a cache: the logits at the positions that chose
  # each token. transformers' forward in every case (cheap); omnijax's (one more compile) for
  # the left-padded text batch.
  s = ids.shape[1]
  full_kw = kw | dict(
    attention_mask=np.pad(kw["attention_mask"], ((0, 0), (0, NEW)), constant_values=1)
  )
  d_full = float(np.abs(logits - _hf_logits(hf_model, ours, full_kw)[:, s - 1 : -1]).max())
  msg = (
    f"\n[generate] {case}: {ids.shape} + {NEW}: tokens equal transformers': "
    f"{np.array_equal(ours, theirs)}; min top-2 margin {margin:.3g}; max|logits diff| vs "
    f"transformers' generate {d_hf:.3g}, vs transformers' full forward {d_full:.3g}"
  )
  if case == "text_left_padded_batch":
    d_ours = float(np.abs(logits - model.logits(ours, **full_kw)[:, s - 1 : -1]).max())
    msg += f", vs omnijax's full forward {d_ours:.3g}"
    assert d_ours <= TOL
  print(msg + f" (max|logits| {np.abs(logits).max():.3g})")
  np.testing.assert_array_equal(ours, theirs)
  assert margin > MARGIN and d_hf <= TOL and d_full <= TOL


def test_step_compiles_once(models):
  """Two prompts of different lengths, 125 new tokens each, in a cache bucket no other test
  uses (256 slots): the one-token step compiles exactly once."""
  model, _ = models
  new = 125
  sizes = [decode.step_fn(CFG)._cache_size()]
  for n in (11, 7):
    ids, kw = _text([n], seed=n)
    assert decode.cache_length(n, new) == 2 * decode.CACHE_BUCKET
    out = model.generate(ids, new, eos_token_id=[], **kw)
    assert out.shape == (1, n + new)
    sizes.append(decode.step_fn(CFG)._cache_size())
  print(
    f"\n[generate compile] step compilations before / after each of 2 prompts x {new} "
    f"tokens: {sizes}"
  )
  assert sizes[1] == sizes[0] + 1 and sizes[2] == sizes[1]


def test_sampling(models):
  model, _ = models
  ids, kw = _text([5, 11], seed=1)
  greedy = model.generate(ids, NEW, eos_token_id=[], **kw)
  hot = dict(temperature=5.0, seed=3, eos_token_id=[])
  a = model.generate(ids, NEW, **hot, **kw)
  np.testing.assert_array_equal(a, model.generate(ids, NEW, **hot, **kw))
  other = model.generate(ids, NEW, **hot | dict(seed=4), **kw)
  print(
    f"\n[generate sampling] T=5: {np.mean(a[:, -NEW:] != greedy[:, -NEW:]):.2f} of the tokens "
    f"differ from greedy, {np.mean(a[:, -NEW:] != other[:, -NEW:]):.2f} from another seed"
  )
  assert not np.array_equal(a, greedy) and not np.array_equal(a, other)
  np.testing.assert_array_equal(a[:, : ids.shape[1]], ids)
  for narrow in (dict(top_k=1), dict(top_p=1e-6), dict(top_k=1, top_p=0.9, temperature=3.0)):
    np.testing.assert_array_equal(
      model.generate(ids, NEW, eos_token_id=[], seed=5, **narrow, **kw), greedy
    )


@pytest.mark.parametrize(
  "temperature,top_k,top_p",
  [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (0.5, 20, 0.9), (2.0, 3, 0.05)],
)
def test_warpers_equal_transformers(temperature, top_k, top_p):
  from transformers.generation import logits_process as lp

  logits = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32) * 2
  ours = np.asarray(decode.warp(jnp.asarray(logits), temperature, top_k, top_p))
  warpers = [lp.TemperatureLogitsWarper(temperature)]
  warpers += [lp.TopKLogitsWarper(top_k)] if top_k else []
  warpers += [lp.TopPLogitsWarper(top_p)] if top_p < 1 else []
  theirs = torch.from_numpy(logits)
  for w in warpers:
    theirs = w(None, theirs)
  theirs = theirs.numpy()
  np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(theirs))
  np.testing.assert_allclose(ours[np.isfinite(ours)], theirs[np.isfinite(theirs)], rtol=1e-6)


def test_eos_and_padding(models):
  model, hf_model = models
  ids, kw = _text([5, 11], seed=1)
  s = ids.shape[1]
  greedy = model.generate(ids, NEW, eos_token_id=[], **kw)
  # An EOS id that row 0 produces first as its new token j >= 2.
  new = greedy[0, s:].tolist()
  j = next(j for j in range(2, NEW - 2) if new[j] not in new[:j])
  eos = new[j]
  ours = model.generate(ids, NEW, eos_token_id=eos, pad_token_id=1, **kw)
  theirs, _ = _hf_generate(hf_model, ids, kw, NEW, eos_token_id=eos, pad_token_id=1)
  np.testing.assert_array_equal(ours, theirs)
  np.testing.assert_array_equal(ours[0, : s + j + 1], greedy[0, : s + j + 1])
  assert (ours[0, s + j + 1 :] == 1).all()
  hit = np.flatnonzero(greedy[1, s:] == eos)
  end = s + (hit[0] + 1 if len(hit) else ours.shape[1] - s)
  np.testing.assert_array_equal(ours[1, :end], greedy[1, :end])
  assert (ours[1, end:] == 1).all()
  # A list of EOS ids: pad_token_id defaults to the first.
  listed = model.generate(ids, NEW, eos_token_id=[7, eos], **kw)
  np.testing.assert_array_equal(listed[0, : s + j + 1], ours[0, : s + j + 1])
  assert (listed[0, s + j + 1 :] == 7).all()
  # Every row finished: the loop stops there.
  one = model.generate(ids[:1], NEW, eos_token_id=eos, attention_mask=kw["attention_mask"][:1])
  np.testing.assert_array_equal(one, greedy[:1, : s + j + 1])
  print(
    f"\n[generate eos] eos={eos}: rows end at {s + j + 1} and {end} of {ours.shape[1]}; "
    f"row 0 alone returns {one.shape}"
  )


def test_default_eos_ids():
  released = ThinkerConfig.from_dict(presets.get("qwen3-omni-30b-a3b"))
  other = dataclasses.replace(CFG, audio_token_id=11)
  tokenizer = types.SimpleNamespace(token_id={"<|endoftext|>": 5, "<|im_end|>": 7}.__getitem__)
  assert decode.default_eos_ids(CFG) == [0, 2]  # the local tokenizer's layout
  assert decode.default_eos_ids(released) == [151643, 151645]
  assert decode.default_eos_ids(other) == []
  assert decode.default_eos_ids(other, tokenizer) == [5, 7]


def test_argument_errors(models):
  model, _ = models
  ids, kw = _text([5, 11], seed=1)
  bad = [
    (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
    (dict(temperature=-1.0), "temperature must be a number >= 0"),
    (dict(top_k=0), "top_k must be an integer >= 1"),
    (dict(top_p=0.0), r"top_p must lie in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must lie in \(0, 1\]"),
    (dict(eos_token_id=CFG.text.vocab_size), "eos_token_id must be a token id"),
    (dict(pad_token_id=[1, 2]), "pad_token_id must be one token id"),
    (dict(attention_mask=kw["attention_mask"][:, ::-1]), "left-padded"),
  ]
  for args, match in bad:
    with pytest.raises(ValueError, match=match):
      model.generate(ids, **(dict(max_new_tokens=4) | kw | args))
  with pytest.raises(TypeError, match="unexpected argument"):
    model.generate(ids, 4, do_sample=True)


def test_moe_kernels_at_decode_shapes():
  """A (B, 1) step routes B * k <= num_experts slots: the gathered path that local_experts then
  takes, and the blocked kernel, equal the dense reference."""
  rng = np.random.default_rng(0)
  e, d, f, k = 16, 32, 24, 4
  wg, wu = (jnp.asarray(rng.standard_normal((e, d, f)), jnp.float32) * 0.2 for _ in range(2))
  wd = jnp.asarray(rng.standard_normal((e, f, d)), jnp.float32) * 0.2
  router = jnp.asarray(rng.standard_normal((d, e)), jnp.float32)

  @jax.jit
  def paths(x):
    w, idx, _ = moe.route(x @ router, k, True, jnp.float32)
    blocked = moe.expert_ffn(x, idx.reshape(-1), wg, wu, wd, "blocked", 128)
    return (
      moe.dense_reference(x, idx, w, wg, wu, wd),
      moe.local_experts(x, idx, w, wg, wu, wd, "blocked", 128),
      moe.combine(blocked, w),
    )

  want, gathered, blocked = paths(jnp.asarray(rng.standard_normal((2, d)), jnp.float32))
  np.testing.assert_allclose(gathered, want, atol=1e-5)  # 2 tokens: 8 slots, 16 experts
  np.testing.assert_allclose(blocked, want, atol=1e-5)
