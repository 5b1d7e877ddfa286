r"""The modality ablation of seed 004 (Table 16): three arms with the same LLM, trained on the
same text and vision data, with the same LR schedule (shape and peak), batch size and number of
passes over every modality's data; the omni arm adds only audio and audio-visual data.

  arm=text    text
  arm=vision  text + images + (silent) videos
  arm=omni    text + images + (silent) videos + speech + narrated videos

Sampling is by epochs (data.mixture_by=epochs): each source is read `EPOCHS` times over the run,
so every example of every modality is seen equally often in every arm that has it. Each arm's
length follows from that budget: total_steps = EPOCHS x (the tokens of its sources) / tokens
per step, so the omni arm trains longer by exactly the tokens of its audio data, and the text
and vision data are seen the same number of times in every arm (the LR schedule has the same
warmup, peak and cosine shape over each arm's steps). Every arm is evaluated on the same
held-out sources, including modalities it never trained on.

  python -m omnijax.sweep --exp=ablation:local --grid=seed=0,1,2 --grid=arm=text,vision,omni \
      --root=workdirs/ablation_local --report=docs/ablation_local

(`python -m omnijax.report --sweep=workdirs/ablation_local` rewrites the report alone.)

Released scale (the 30B-A3B Thinker; sources under data/ablation/<source>):

  python -m omnijax.launch --exp=ablation:arm=omni,seed=0 --workdir=gs://BUCKET/ablation/omni_0
"""

from experiments import recipe

ARMS = dict(
  text=("text", "scene_text"),
  vision=("text", "scene_text", "image", "video"),
  omni=("text", "scene_text", "image", "video", "audio", "video_audio"),
)
EVAL_SOURCES = ARMS["omni"]
EPOCHS = 2.0
LOCAL_TEXT_DOCS = (
  250  # stdlib documents in the local text source (~83k tokens; the corpus has 2270)
)


def get_config(arg=None):
  arg = recipe.parse_arg(arg, local=False, arm="omni", seed=0)
  if arg.arm not in ARMS:
    raise ValueError(f"arm={arg.arm!r} is not one of {sorted(ARMS)}.")
  if arg.local:
    c = recipe.local_config({name: 1.0 for name in ARMS[arg.arm]})
    # Every text document counts (their lengths are heavy-tailed): the arms' lengths are exact.
    c.data.mixture.text.update(dict(max_examples=LOCAL_TEXT_DOCS, estimate_samples=LOCAL_TEXT_DOCS))
    c.data.estimate_samples = 32
    c.eval.mixture = recipe.local_mixture({name: 1.0 for name in EVAL_SOURCES})
    c.train.log_every = 20
    c.optim.warmup_steps = 20
    c.eval.batches = 4
  else:
    c = recipe.full_config("ablation", {name: 1.0 for name in ARMS[arg.arm]})
    c.eval.mixture = {
      name: dict(path=f"data/ablation/{name}", task=recipe.FULL_TASKS[name], weight=1.0)
      for name in EVAL_SOURCES
    }
  c.seed = arg.seed
  c.data.mixture_by = "epochs"
  c.train.epochs = EPOCHS
  c.eval.every = 0  # at the end only
  c.eval.evaluators = recipe.evaluators(c)
  return c
