r"""Stage 2, general pretraining of the Thinker (Qwen3-Omni recipe, seed 004): text, image,
audio, video and audio-video mixed from the first step at the stage's token ratios.

The full run trains the released 30B-A3B Thinker at sequence length 8192 from stage 1's
params, on shard directories written by `python -m data_pipelines.prepare` (one per source):

  python -m omnijax.launch --exp=pretrain_general --workdir=gs://BUCKET/s2 \
      --config.train.init_from=gs://BUCKET/s1_encoders \
      --config.data.tokenizer=/data/qwen3_omni/tokenizer.json

`local` is the small local default: the tiny Thinker on CPU on corpora the project builds itself
(the Python standard library's documentation as text; rendered shapes, synthesised speech and
narrated videos of the same scenes), a few minutes end to end; `small` is the ~100M-parameter
preset on the same corpora (local benchmarks):

  python -m omnijax.launch --exp=pretrain_general:local
"""

from experiments import recipe


def get_config(arg=None):
  arg = recipe.parse_arg(arg, local=False, small=False)
  if arg.local or arg.small:
    c = recipe.local_config(recipe.LOCAL_STAGE2_RATIOS, "small" if arg.small else "tiny")
  else:
    c = recipe.full_config("pretrain_general", recipe.STAGE2_TOKEN_RATIOS)
  c.eval.evaluators = recipe.evaluators(c)
  return c
