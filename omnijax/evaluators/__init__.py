"""Evaluators (big_vision style): a registry of kinds, configured per experiment.

  config.eval.evaluators = {NAME: {kind: KIND, ...options}}

Each runs every `config.eval.every` steps and at the end of training (and on a finished
workdir with `python -m omnijax.launch --mode=eval`); its scalars are logged as
`eval/NAME/...` beside the train metrics. Kinds:

  heldout_loss   token-weighted loss per mixture source and per modality on a held-out split,
                 and perplexity of the text sources
  asr_wer        word error rate (jiwer) of greedy transcripts of held-out speech
  scene_description  exact answers (colours, shapes, counts, directions) read from greedy
                 descriptions of held-out scenes' images or videos

A new kind is a class with `setup(...)` and `run(params) -> {name: float}`, registered with
`@register("kind")` in a module imported below.
"""

from omnijax.evaluators.common import KINDS, Evaluator, from_config, register
from omnijax.evaluators import generative, loss  # noqa: F401  (register their kinds)

__all__ = ["KINDS", "Evaluator", "from_config", "register"]
