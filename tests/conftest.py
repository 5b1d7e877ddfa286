"""Every test process sees 8 CPU devices, so sharded code is checked against one device."""

import os
import tempfile

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA:CPU runs a device's independent collectives side by side, each blocking a thread of one
# pool that has max(NPROC or cores, devices) threads. With 8 threads, 8 blocked collectives can
# leave a device no thread to reach its own (seen: 7 devices in a collective-permute, 1 in an
# all-gather whose partner was waiting for a thread), and XLA aborts after 40 s. Twice the
# devices makes that unlikely: 0 aborts in 3 runs of the slow Talker tests beside a busy loop,
# against 2 in 5 runs (1 of 2 beside a busy loop) with 8 threads.
os.environ.setdefault("NPROC", "16")
# Tests that train several runs of one model reuse its compiled programs across runs.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="omnijax-jax-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "2")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def media_corpus(tmp_path_factory):
  """A 24-fact local media corpus (its caption, asr and video sources), built once a session."""
  from data_pipelines import local_media_corpus

  root = tmp_path_factory.mktemp("media")
  return local_media_corpus.build_local_media_corpus(root, num_facts=24)


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory):
  """200 documents of `helpers.write_text_corpus` and a held-out validation split of 8."""
  from data_pipelines import records
  from tests import helpers

  text = helpers.write_text_corpus(tmp_path_factory.mktemp("text"), num_docs=200)
  held_out = [{"text": "the lazy dog jumps over seven red cubes", "id": f"v{i}"} for i in range(8)]
  records.write_shards(held_out, text, "validation", num_shards=1)
  return text


@pytest.fixture(scope="session")
def local_speech_dir(media_corpus):
  """The asr records of the media corpus."""
  return media_corpus / "asr"


@pytest.fixture(scope="session")
def codec_run(local_speech_dir, tmp_path_factory):
  """(workdir, metrics rows) of a tiny speech-tokenizer run: 4 steps on one device, adversarial
  from step 2."""
  from tests import helpers

  workdir = tmp_path_factory.mktemp("codec") / "tokenizer"
  return workdir, helpers.run_codec(workdir, local_speech_dir, steps=4, num_devices=1)


@pytest.fixture(scope="session")
def bucket(tmp_path_factory):
  """gs://omnijax-test on a GCS emulator (fake-gcs-server) for the session: tests/gcs_emulator.py."""
  from tests import gcs_emulator

  yield from gcs_emulator.bucket(tmp_path_factory)
