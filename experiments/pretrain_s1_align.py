r"""Stage 1, encoder alignment (Qwen3-Omni recipe, seed 004): the LLM stays frozen. Phase
`adapters` trains each encoder's adapter (audio proj1/proj2, the vision merger and DeepStack
mergers) with the encoder frozen too; phase `encoders` then trains the encoders themselves
(adapters included). Encoders are not trained jointly with their adapters against a frozen
LLM from the start: the seed reports that they then over-compensate for the frozen LLM and
perceive worse. Data: paired media and text only (captions, speech, narrated video).

Frozen parameters keep their values bit-exactly and get no optimizer state: at 30B-A3B, AdamW's
two float32 moments cover 0.127B adapter parameters (0.9 GiB) in phase `adapters` and 1.187B
encoder parameters (8.8 GiB) in phase `encoders`, instead of all 31.7B (236 GiB); see
`python -m omnijax.chain --root=DIR --dry_run`.

  python -m omnijax.launch --exp=pretrain_s1_align:phase=adapters --workdir=W/s1_adapters
  python -m omnijax.launch --exp=pretrain_s1_align:phase=encoders --workdir=W/s1_encoders \
      --config.train.init_from=W/s1_adapters

`local` runs both phases on the local corpora on CPU (`python -m omnijax.chain` runs all stages).
"""

from experiments import recipe

PHASES = dict(adapters=recipe.ADAPTERS, encoders=recipe.ENCODERS)


def get_config(arg=None):
  arg = recipe.parse_arg(arg, local=False, phase="adapters")
  if arg.phase not in PHASES:
    raise ValueError(f"phase={arg.phase!r} is not one of {sorted(PHASES)}.")
  if arg.local:
    c = recipe.local_config({k: v for k, v in recipe.LOCAL_STAGE2_RATIOS.items() if k != "text"})
    c.train.total_steps = 100
    c.optim.warmup_steps = 10
  else:
    c = recipe.full_config(
      "pretrain_s1_align", {k: v for k, v in recipe.STAGE2_TOKEN_RATIOS.items() if k != "text"}
    )
    c.train.total_steps = 20_000 if arg.phase == "adapters" else 40_000
    c.optim.learning_rate = 1e-3 if arg.phase == "adapters" else 2e-4
  c.optim.trainable = PHASES[arg.phase]
  c.eval.evaluators = recipe.evaluators(c)
  return c
