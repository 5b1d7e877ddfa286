r"""The Talker stages (Qwen3-Omni, seed 004): the MoE Talker and its MTP code predictor learn to
speak the Thinker's answers as 16-codebook codec frames (codes of a speech tokenizer).

`stage=pretrain`: Talker pretraining on speech with multimodal context, the Thinker frozen (its
hidden states computed in the same step; `optim.frozen` keeps it bit-exact and stateless).
`stage=joint`: the Thinker and the Talker together, loss = thinker_loss_weight x the Thinker's
text loss + the Talker's (codebook-0 CE + mtp_loss_weight x the MTP heads' mean CE + aux).
The MTP weight is 0.3, as in Qwen3-TTS's fine-tuning recipe (the sibling Talker's only
published loss weighting; Qwen3-Omni's is unpublished).

Sources: `tts` ("read this aloud", text in), `spoken_asr` (speech in, its transcript spoken
back: the Talker reads the Thinker's hidden states at the audio placeholders) and
`spoken_caption` (an image and a question in, the spoken answer about the image out: captions
whose records carry the caption spoken, as the local corpus's do). All take the speech's codes
from `codec` (an experiments/codec.py run, or a Mimi directory); the Code2Wav of
`code2wav` (a codec or vocoder run; locally the vocoder run) is kept in the workdir so that
omnijax.load(workdir).generate(..., return_audio=True) speaks.

Released scale (the 3B-A0.3B Talker after the 30B-A3B Thinker):

  python -m omnijax.launch --exp=talker:stage=pretrain --workdir=gs://BUCKET/talker \
      --config.train.init_from=gs://BUCKET/s3 --config.data.mixture.tts.codec=gs://BUCKET/codec

It compiles for v5p-256 as shipped (`python -m omnijax.aot --exp=talker --topology=v5p-256`: 63.2
GiB of 95 per chip); v6e-256's 32 GB chips need `--config.model.impl.remat_policy=full` (27.0
GiB).

`local`: the tiny Thinker and Talker on CPU on the local corpus's speech, codes from the local
speech tokenizer (train it first, see docs/codec_local, or pass `codec=DIR`):

  python -m omnijax.launch --exp=codec:local --workdir=workdirs/codec_tokenizer
  python -m omnijax.launch --exp=talker:local,stage=pretrain
  python -m omnijax.launch --exp=talker:local,stage=joint
"""

import os

from experiments import recipe
from omnijax.models import presets

LOCAL_CODEC = os.path.join("workdirs", "codec_tokenizer")
LOCAL_VOCODER = os.path.join("workdirs", "codec_vocoder")


def get_config(arg=None):
  arg = recipe.parse_arg(arg, local=False, stage="pretrain", codec="", code2wav="", speaker="ethan")
  if arg.stage not in ("pretrain", "joint"):
    raise ValueError(f"stage={arg.stage!r} is not one of ['pretrain', 'joint'].")
  if arg.local:
    c = recipe.local_config({}, "tiny")
    codec = arg.codec or LOCAL_CODEC
    c.talker.code2wav = arg.code2wav or LOCAL_VOCODER
    speech, captions = f"{recipe.LOCAL_MEDIA}/asr", f"{recipe.LOCAL_MEDIA}/caption"
    c.talker.model = presets.get_talker("tiny")
    c.data.seq_len, c.data.talker_seq_len, c.data.talker_mtp_rows = 256, 256, 192
    c.train.total_steps, c.train.global_batch_size = 400, 4
    c.train.log_every, c.train.checkpoint_every = 20, 100
  else:
    c = recipe.full_config("talker", {})
    codec = arg.codec or "data/talker/codec"
    c.talker.code2wav = arg.code2wav
    speech, captions = "data/talker/speech", "data/talker/spoken_captions"
    c.talker.model = presets.get_talker("qwen3-omni-30b-a3b")
    c.data.talker_seq_len, c.data.talker_mtp_rows = 8192, 4096
    c.train.total_steps = 50_000
  c.data.mixture = dict(
    tts=dict(path=speech, task="tts", weight=1.0, codec=codec, speaker=arg.speaker),
    spoken_asr=dict(path=speech, task="spoken_asr", weight=1.0, codec=codec, speaker=arg.speaker),
    spoken_caption=dict(
      path=captions, task="spoken_caption", weight=1.0, codec=codec, speaker=arg.speaker
    ),
  )
  c.eval.evaluators = {}
  if arg.stage == "pretrain":
    c.talker.freeze_thinker = True
    c.talker.thinker_loss_weight = 0.0
    c.optim.frozen = ("^thinker/",)
  return c
