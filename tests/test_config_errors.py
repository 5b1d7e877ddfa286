"""Configuration mistakes fail before compiling, with a message that says what to change."""

import dataclasses

import pytest

from omnijax import launch
from omnijax.models import presets
from omnijax.models.config import ImplConfig
from tests.helpers import write_text_corpus

EXP = "--exp=pretrain_general:local"
# The local run's batch of 4 cannot split over the 8 test devices: give every case a batch
# that does, so each fails on the mistake it is about.
LOCAL = (EXP, "--config.train.global_batch_size=8")
TALKER = ("--exp=talker:local", "--config.train.global_batch_size=8")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return write_text_corpus(tmp_path_factory.mktemp("corpus"))


def _fails(capsys, *args) -> str:
  code = launch.main(["omnijax.launch", *args])
  err = capsys.readouterr().err
  assert code == 2, err
  assert "Traceback" not in err
  return err


def _local(corpus, *args):
  return (
    *LOCAL,
    "--config.data.kind=text",
    f"--config.data.path={corpus}",
    "--config.data.local_text=",
    "--config.data.local_media=",
    f"--config.data.tokenizer_corpus={corpus}",
    "--config.data.tokenizer_vocab_size=512",
    *args,
  )


@pytest.mark.parametrize(
  "args, expected",
  [
    (("--exp=no_such_experiment",), "available experiments"),
    (("--exp=pretrain_general:bogus",), "unknown argument 'bogus'; this experiment takes"),
    (
      (*LOCAL, "--config.model.text.num_layerz=3"),
      "Did you mean config.model.text.num_hidden_layers?",
    ),
    ((*LOCAL, "--config.mesh.fsdp=3"), "has 3 devices but 8 are available"),
    ((*LOCAL, "--config.mesh.data=3"), "does not divide the 8 devices"),
    (
      (*LOCAL, "--config.model.text.head_dim=24"),
      "head_dim 24 has 12 rotary frequency slots; set mrope_section to sum to head_dim/2",
    ),
    ((*LOCAL, "--config.model.text.mrope_section=(2,3,3)"), "temporal section to be at least"),
    (
      (*LOCAL, "--config.model.text.num_key_value_heads=3"),
      "must be a multiple of num_key_value_heads (3)",
    ),
    ((*LOCAL, "--config.model.text.num_experts_per_tok=9"), "num_experts_per_tok (9) must be in"),
    ((*LOCAL, "--config.model.impl.remat_policy=everything"), "remat_policy='everything'"),
    ((*LOCAL, "--config.model.impl.scan_unroll=0"), "scan_unroll must be >= 1, got 0"),
    ((*LOCAL, "--host_malloc=jemalloc"), "value should be one of <system|retain|tbbmalloc>"),
    ((EXP, "--config.train.global_batch_size=4"), "split over 8 devices"),
    ((*LOCAL, "--config.train.grad_accum_steps=3"), "must be a multiple of train.grad_accum_steps"),
    (
      (
        *LOCAL,
        "--config.mesh.fsdp=1",
        "--config.mesh.expert=8",
        "--config.model.text.num_experts=12",
      ),
      "num_experts (12) is not divisible by the mesh's expert (8)",
    ),
    (
      (*LOCAL, "--config.mesh.fsdp=1", "--config.mesh.tensor=8"),
      "num_attention_heads (4) is not divisible by the mesh's tensor (8)",
    ),
    (
      (*LOCAL, "--config.mesh.fsdp=2", "--config.mesh.context=4", "--config.data.seq_len=510"),
      "data.seq_len (510) is not divisible by the mesh's context (4)",
    ),
    ((*LOCAL, "--config.data.seq_len=8192"), "exceeds model.text.max_position_embeddings"),
    ((*LOCAL, "--config.sharding.rules.embed=model"), "not a mesh axis"),
    ((*LOCAL, "--config.model.image_token_id=5000"), "outside the vocabulary"),
    (
      (*TALKER, "--config.talker.model.thinker_hidden_size=32"),
      "thinker_hidden_size (32) must equal model.text.hidden_size (64)",
    ),
    ((*TALKER, "--config.talker.model.accept_hidden_layer=5"), "accept_hidden_layer (5) indexes"),
    (("--exp=talker:local,speaker=nobody", *TALKER[1:]), "speaker 'nobody' is not one of"),
  ],
)
def test_config_error_messages(capsys, args, expected):
  assert expected in _fails(capsys, *args)


def test_eval_of_a_directory_without_a_run(capsys, tmp_path):
  err = _fails(capsys, *LOCAL, "--mode=eval", f"--workdir={tmp_path}")
  assert f"{tmp_path} holds no omnijax run (no model.json)" in err


def test_data_errors(capsys, corpus, tmp_path):
  err = _fails(capsys, *_local(corpus, f"--config.data.path={tmp_path / 'missing'}"))
  assert "does not exist" in err and "data_pipelines.prepare" in err
  # Every other source exists, so the message can only be about the missing one.
  all_sources = [
    f"--config.data.mixture.{n}.path={corpus}" for n in ("text", "image", "audio", "video_audio")
  ]
  err = _fails(
    capsys,
    *_local(
      corpus,
      "--config.data.kind=omni",
      *all_sources,
      f"--config.data.mixture.text.path={tmp_path / 'missing'}",
    ),
  )
  assert "data.mixture.text.path" in err and "does not exist" in err
  err = _fails(
    capsys,
    *_local(
      corpus, "--config.data.kind=omni", *all_sources, "--config.data.mixture.text.task=poetry"
    ),
  )
  assert "data.mixture.text.task='poetry' is not one of" in err
  err = _fails(capsys, *_local(corpus, "--config.model.text.vocab_size=256"))
  assert "the tokenizer has" in err and "--config.model.text.vocab_size=" in err
  err = _fails(capsys, *_local(corpus, "--config.model.image_token_id=11"))
  assert "maps <|image_pad|> to 8; set --config.model.image_token_id=8" in err


def test_every_impl_field_can_be_overridden():
  """Overrides reach only the fields a preset's config holds: each of ImplConfig's is there."""
  assert set(presets.get("tiny").impl) == {f.name for f in dataclasses.fields(ImplConfig)}
