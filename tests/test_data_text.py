"""Tests of the Grain text pipeline (data_pipelines): format, tokenizer, ops, packing, state."""

import json

from array_record.python import array_record_module
import grain
import msgpack
import numpy as np
import pytest

from data_pipelines import local_corpus, ops, pipeline, records, tokenizer
from omnijax.processing import batch as batch_lib

SEQ_LEN = 32
WORDS = (
  "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega "
  "river stone cloud ember frost maple cedar quartz amber"
).split()


def _documents(n=40, seed=0):
  """Distinct synthetic documents, from a few tokens to more than a row."""
  rng = np.random.default_rng(seed)
  return [
    f"doc {i}: " + " ".join(rng.choice(WORDS, size=int(rng.integers(1, 40)))) for i in range(n)
  ]


@pytest.fixture(scope="module")
def tok():
  return tokenizer.train_bpe_tokenizer(_documents(200, seed=1), vocab_size=400)


@pytest.fixture(scope="module")
def docs():
  return _documents()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, docs):
  path = tmp_path_factory.mktemp("corpus")
  records.write_shards(
    ({"text": t, "source": "test", "id": str(i)} for i, t in enumerate(docs)),
    path,
    "train",
    num_shards=3,
  )
  return path


def _cfg(path, **overrides):
  cfg = pipeline.default_text_config(str(path))
  cfg.update(overrides)
  return cfg


def _dataset(cfg, tok, *, batch_size=1, process_index=0, process_count=1, seed=0):
  return pipeline.make_text_dataset(
    cfg,
    tokenizer=tok,
    seq_len=SEQ_LEN,
    batch_size=batch_size,
    process_index=process_index,
    process_count=process_count,
    seed=seed,
  )


def _check_layout(batch, batch_size):
  assert set(batch) == set(batch_lib.TOKEN_FIELDS)
  assert batch["inputs"].shape == (batch_size, SEQ_LEN)
  batch_lib.validate(batch)
  seg, pos = batch["segment_ids"], batch["positions"]
  np.testing.assert_array_equal(batch["loss_mask"], (seg > 0).astype(np.float32))
  assert (pos == pos[:, :1]).all(), "text positions: 3 equal rows"
  for row in range(batch_size):
    s, p = seg[row], pos[row, 0]
    pad = s == 0
    assert (batch["inputs"][row][pad] == 0).all()
    assert (batch["targets"][row][pad] == 0).all()
    n_real = int((~pad).sum())
    assert not pad[:n_real].any(), "padding only at the end of a row"
    starts = np.flatnonzero(np.diff(np.concatenate([[0], s[:n_real]])))
    np.testing.assert_array_equal(s[starts], np.arange(1, len(starts) + 1))
    for start, end in zip(starts, list(starts[1:]) + [n_real]):
      np.testing.assert_array_equal(p[start:end], np.arange(end - start))


def _segments(batches):
  """(inputs, targets) of every non-empty row segment, in stream order."""
  for batch in batches:
    for row in range(batch["inputs"].shape[0]):
      seg = batch["segment_ids"][row]
      for s in range(1, seg.max() + 1):
        m = seg == s
        yield batch["inputs"][row][m], batch["targets"][row][m]


def _reassemble(batches, eos):
  """Concatenates pieces until a target is EOS: returns whole documents."""
  out, xs, ys = [], [], []
  for x, y in _segments(batches):
    assert (y[:-1] != eos).all(), "a target crosses a document end"
    xs.append(x)
    ys.append(y)
    if y[-1] == eos:
      out.append((np.concatenate(xs), np.concatenate(ys)))
      xs, ys = [], []
  assert not xs, "trailing piece of an unfinished document"
  return out


def _doc_ids(batches, tok, texts):
  """Indices into ``texts`` of the documents found in ``batches``."""
  index = {}
  for i, text in enumerate(texts):
    full = np.concatenate([tok.encode(text), [tok.eos_id]])
    index[tuple(full[:-1])] = (i, full)
  found = []
  for x, y in _reassemble(batches, tok.eos_id):
    i, full = index[tuple(x)]  # KeyError: inputs are not one document.
    np.testing.assert_array_equal(y, full[1:])
    found.append(i)
  return found


@pytest.mark.parametrize("shuffle", [False, True])
def test_packing_keeps_documents_apart(corpus, docs, tok, shuffle):
  cfg = _cfg(corpus, shuffle=shuffle, num_epochs=1)
  batches = list(_dataset(cfg, tok))
  for b in batches:
    _check_layout(b, 1)
  found = _doc_ids(batches, tok, docs)
  assert sorted(found) == list(range(len(docs)))
  # write_shards deals documents round-robin over the 3 shards.
  shard_order = [i for s in range(3) for i in range(s, len(docs), 3)]
  assert (found == shard_order) != shuffle
  # Docs longer than a row were split and restart at position 0 (checked by
  # _check_layout); only the last row has padding.
  assert sum(len(tok.encode(d)) + 1 for d in docs) > 3 * SEQ_LEN
  assert all(b["segment_ids"].all() for b in batches[:-1])


def test_two_epochs_reshuffle(corpus, docs, tok):
  cfg = _cfg(corpus, shuffle=True, num_epochs=2)
  found = _doc_ids(list(_dataset(cfg, tok)), tok, docs)
  first, second = found[: len(docs)], found[len(docs) :]
  assert sorted(first) == sorted(second) == list(range(len(docs)))
  assert first != second


@pytest.mark.parametrize("shuffle", [False, True])
def test_hosts_read_disjoint_documents(corpus, docs, tok, shuffle):
  per_host = []
  for process_index in range(2):
    cfg = _cfg(corpus, shuffle=shuffle, num_epochs=1)
    batches = list(_dataset(cfg, tok, process_index=process_index, process_count=2))
    per_host.append(set(_doc_ids(batches, tok, docs)))
  assert per_host[0].isdisjoint(per_host[1])
  assert per_host[0] | per_host[1] == set(range(len(docs)))
  assert abs(len(per_host[0]) - len(per_host[1])) <= 1


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


@pytest.mark.parametrize("worker_count", [0, 2])
def test_resume_from_state(corpus, tok, worker_count):
  # Forever-repeating and shuffled: N + M batches cross epoch boundaries.
  cfg = _cfg(corpus, shuffle=True, num_epochs=None, worker_count=worker_count)
  ds = _dataset(cfg, tok, batch_size=2)
  it = iter(ds)
  _take(it, 7)
  state = json.loads(json.dumps(it.get_state()))  # As a checkpoint stores it.
  expected = _take(it, 11)
  it.close()
  for b in expected:
    _check_layout(b, 2)
  restored = iter(ds)
  restored.set_state(state)
  _assert_same_batches(_take(restored, 11), expected)
  restored.close()


def test_resume_at_every_step(corpus, tok):
  """Restoring from any step matches, including steps mid-document."""
  cfg = _cfg(corpus, shuffle=False, num_epochs=1)
  ds = _dataset(cfg, tok, batch_size=1)
  it = iter(ds)
  states, batches = [], []
  while True:
    states.append(json.loads(json.dumps(it.get_state())))
    try:
      batches.append(next(it))
    except StopIteration:
      break
  for k in range(0, len(batches), 3):
    restored = iter(ds)
    restored.set_state(states[k])
    _assert_same_batches(list(restored), batches[k:])


@pytest.mark.parametrize("worker_count", [0, 2])
def test_orbax_checkpoint_manager(corpus, tok, tmp_path, worker_count):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  cfg = _cfg(corpus, shuffle=True, num_epochs=None, worker_count=worker_count)
  ds = _dataset(cfg, tok, batch_size=2)
  it = iter(ds)
  _take(it, 5)
  train_state = {"step": jnp.asarray(5), "w": jnp.arange(4.0)}
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(
      5,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(train_state),
        data=grain.checkpoint.CheckpointSave(it),
      ),
    )
    mngr.wait_until_finished()
  expected = _take(it, 6)
  it.close()

  restored_it = iter(ds)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    assert mngr.latest_step() == 5
    restored = mngr.restore(
      5,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(train_state),
        data=grain.checkpoint.CheckpointRestore(restored_it),
      ),
    )
  np.testing.assert_array_equal(restored["state"]["w"], train_state["w"])
  _assert_same_batches(_take(restored_it, 6), expected)
  restored_it.close()


def _bad_corpus(path, good):
  """Good docs (some long, to be split) interleaved with every kind of bad record."""
  bad = [
    (b"\xc1\x00garbage", "undecodable"),  # Not msgpack.
    (msgpack.packb({"text": "cut"})[:-2], "undecodable"),  # Truncated.
    (msgpack.packb([1, 2]), "undecodable"),  # Not a map.
    (records.encode_example({"text": 42}), "undecodable"),
    (
      msgpack.packb({"text": b"bad \xff\xfe"}, use_bin_type=False),
      "invalid_utf8",
    ),  # msgpack str with invalid UTF-8.
    (records.encode_example({"text": b"\xe2\x28\xa1"}), "invalid_utf8"),
    (records.encode_example({"text": ""}), "empty"),
    (records.encode_example({"text": " \n\t "}), "empty"),
    (records.encode_example({"source": "no text"}), "missing_field"),
  ]
  stream, expected = [], dict.fromkeys(ops.SKIP_REASONS, 0)
  for i, text in enumerate(good):
    stream.append(records.encode_example({"text": text}))
    for record, reason in bad[i % 3 :: 3] if i % 4 == 0 else []:
      stream.append(record)
      expected[reason] += 1
  stream.append(bad[6][0])  # Bad records after the last good one count too.
  expected["empty"] += 1
  # write_shards encodes examples; these raw records go through a writer.
  writer = array_record_module.ArrayRecordWriter(
    str(path / "train.array_record-00000-of-00001"), "group_size:1"
  )
  for record in stream:
    writer.write(record)
  writer.close()
  return expected


@pytest.mark.parametrize("worker_count", [0, 2])
def test_bad_records_skipped_and_counted(tmp_path, tok, worker_count):
  good = _documents(24, seed=3)
  # Documents spanning several rows, right after bad records.
  good[5] = " ".join(["long"] + WORDS * 6)
  good[9] = good[5] + " again"
  expected = _bad_corpus(tmp_path, good)
  cfg = _cfg(tmp_path, shuffle=False, num_epochs=1, worker_count=worker_count)
  it = iter(_dataset(cfg, tok))
  batches = list(it)
  assert it.skipped_records == expected
  text_reasons = ("undecodable", "invalid_utf8", "empty", "missing_field")
  assert all(expected[r] > 0 for r in text_reasons)
  if worker_count == 0:
    assert _doc_ids(batches, tok, good) == list(range(len(good)))
  else:  # Workers interleave rows; every good token still arrives once.
    n_tokens = sum(len(tok.encode(t)) for t in good)  # +EOS, -1 for the shift.
    assert sum(int(b["loss_mask"].sum()) for b in batches) == n_tokens
  it.close()


def test_skip_counts_survive_restore(tmp_path, tok):
  good = _documents(24, seed=3)
  expected = _bad_corpus(tmp_path, good)
  cfg = _cfg(tmp_path, shuffle=False, num_epochs=1)
  ds = _dataset(cfg, tok)
  it = iter(ds)
  _take(it, 4)
  partial = it.skipped_records
  assert 0 < sum(partial.values()) < sum(expected.values())
  restored = iter(ds)
  restored.set_state(json.loads(json.dumps(it.get_state())))
  assert restored.skipped_records == partial
  list(restored)
  assert restored.skipped_records == expected


def test_tokenizer_special_tokens_and_round_trip(tok, tmp_path):
  for i, name in enumerate(tokenizer.SPECIAL_TOKENS + tokenizer.ROLE_TOKENS):
    assert tok.token_id(name) == i
  # roles are whole words: one token after <|im_start|>, untouched inside other words
  assert tok.encode("<|im_start|>user\n")[:2].tolist() == [1, tok.token_id("user")]
  assert tok.token_id("user") not in tok.encode("username").tolist()
  assert tok.eos_id == tok.token_id("<|endoftext|>") == 0
  assert tok.vocab_size == 400
  text = "Grüße, 世界! tabs\tand\nnewlines  <|im_start|> x"
  ids = tok.encode(text)
  assert ids.dtype == np.int32 and (ids < tok.vocab_size).all()
  assert tok.decode(ids) == text
  assert tok.token_id("<|im_start|>") in ids.tolist()
  with pytest.raises(KeyError):
    tok.token_id("<|not_a_token|>")
  tok.save(tmp_path / "tokenizer.json")
  loaded = tokenizer.load_tokenizer(tmp_path / "tokenizer.json")
  np.testing.assert_array_equal(loaded.encode(text), ids)
  assert loaded.vocab_size == tok.vocab_size


def test_unknown_op_fails_fast(corpus, tok):
  cfg = _cfg(corpus, ops=("decode_text", "tokenise", "lm_shift"))
  with pytest.raises(ValueError, match="Unknown op 'tokenise'") as e:
    _dataset(cfg, tok)
  for name in ("decode_text", "tokenize", "truncate", "lm_shift"):
    assert name in str(e.value)


def test_op_specs(corpus, tok):
  assert ops.parse_op_spec("truncate(max_len=8, key='tokens')") == (
    "truncate",
    {"max_len": 8, "key": "tokens"},
  )
  for bad in ("truncate(8)", "truncate(max_len=x)", "a.b", "1 +"):
    with pytest.raises(ValueError):
      ops.parse_op_spec(bad)
  with pytest.raises(TypeError, match="truncate"):
    ops.build_ops(["truncate(length=3)"], ops.OpContext())
  cfg = _cfg(
    corpus,
    shuffle=False,
    num_epochs=1,
    ops=("decode_text", "tokenize", "truncate(max_len=4)", "lm_shift"),
  )
  n_tokens = sum(int(b["loss_mask"].sum()) for b in _dataset(cfg, tok))
  assert n_tokens == 3 * 40  # 4 tokens -> 3 pairs per document.


def test_local_corpus_build(tmp_path):
  out = tmp_path / "local"
  assert local_corpus.build_local_text_corpus(out) == out
  manifest = records.read_manifest(out)
  splits = manifest["splits"]
  assert splits["train"]["num_records"] > 1000
  assert 0 < splits["validation"]["num_records"] < splits["train"]["num_records"] / 10
  text_bytes = sum(s["text_bytes"] for s in manifest["sources"].values())
  assert 3e6 < text_bytes < 30e6
  assert set(manifest["sources"]) == {"stdlib_docstring", "python_reference", "stdlib_source"}

  mtime = (out / records.MANIFEST_NAME).stat().st_mtime_ns
  local_corpus.build_local_text_corpus(out)  # Complete: does nothing.
  assert (out / records.MANIFEST_NAME).stat().st_mtime_ns == mtime

  other = tmp_path / "other"
  other.mkdir()
  records.write_manifest(other, {"kind": "real_data", "splits": {}})
  with pytest.raises(ValueError, match="another dataset"):
    local_corpus.build_local_text_corpus(other)

  texts = {}
  for split in ("train", "validation"):
    source = records.open_shards(out, split)
    texts[split] = {records.decode_example(source[i])["text"] for i in range(len(source))}
    assert len(texts[split]) == len(source)  # Deduplicated.
    assert all(t.strip() for t in texts[split])
  assert texts["train"].isdisjoint(texts["validation"])
  assert any("Return" in t for t in texts["train"])  # English prose.

  tok = tokenizer.local_tokenizer(out, vocab_size=1024)
  cached = out / "bpe-1024" / "tokenizer.json"
  assert cached.is_file() and tok.vocab_size == 1024
  mtime = cached.stat().st_mtime_ns
  assert tokenizer.local_tokenizer(out, vocab_size=1024).vocab_size == 1024
  assert cached.stat().st_mtime_ns == mtime  # Trained once, then loaded.

  it = iter(
    pipeline.make_text_dataset(
      _cfg(out),
      tokenizer=tok,
      seq_len=SEQ_LEN,
      batch_size=4,
      process_index=0,
      process_count=1,
      seed=0,
    )
  )
  for batch in _take(it, 3):
    _check_layout(batch, 4)
    assert batch["loss_mask"].all()
