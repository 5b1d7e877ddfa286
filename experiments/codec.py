r"""Speech codec: the 16 x 2048-entry, 12.5 Hz speech tokenizer and the Code2Wav vocoder.

  stage=tokenizer  encoder + residual VQ (EMA codebooks, dead-code restarts, quantizer dropout)
                   trained jointly with a Code2Wav-shaped decoder on the quantised latent;
  stage=vocoder    the released Code2Wav (codes in) trained on (codes, waveform) pairs, codes
                   made on the fly by the frozen tokenizer run `tokenizer=WORKDIR`, starting from
                   its decoder folded into ``code_embedding`` (exact: see omnijax/codec/model.py).

Losses (DAC's recipe, weights as DAC's conf/base.yml): multi-scale log-mel L1 x15, least-squares
GAN x1 (multi-period + multi-resolution STFT discriminators), feature matching x2, commitment
x0.25; DAC's codebook loss (x1) is replaced by EMA codebook updates. AdamW(0.8, 0.99) with
exponential decay, generator and discriminator optimizers in one checkpoint.

Local (this CPU, the local media corpus's eSpeak speech, 37 minutes of it; ~25 + 8 minutes):

  python -m omnijax.launch --exp=codec:local --workdir=workdirs/codec_tokenizer
  python -m omnijax.launch --exp=codec:local,stage=vocoder,tokenizer=workdirs/codec_tokenizer \
      --workdir=workdirs/codec_vocoder
  python benchmarks/codec.py --tokenizer=workdirs/codec_tokenizer --vocoder=workdirs/codec_vocoder

Released scale (Mimi-sized encoder, the released 200M Code2Wav; speech records under
data/speech, a pod slice's devices all on the batch):

  python -m omnijax.launch --exp=codec --workdir=gs://BUCKET/codec_tokenizer
  python -m omnijax.launch --exp=codec:stage=vocoder,tokenizer=gs://BUCKET/codec_tokenizer \
      --workdir=gs://BUCKET/codec_vocoder
"""

import ml_collections

from data_pipelines import speech
from experiments import recipe
from omnijax.codec.model import CodecConfig


def get_config(arg=None):
  arg = recipe.parse_arg(arg, local=False, stage="tokenizer", tokenizer="", steps=0)
  c = ml_collections.ConfigDict()
  c.task = "codec"
  c.stage = arg.stage
  c.tokenizer = arg.tokenizer
  c.model = CodecConfig().to_dict()
  c.data = speech.default_config("data/speech")
  c.disc = dict(
    periods=(2, 3, 5, 7, 11),
    period_channels=(32, 128, 512, 1024, 1024),
    stft_sizes=(2048, 1024, 512),
    stft_channels=32,
  )
  c.loss = dict(mel=15.0, adversarial=1.0, feature_matching=2.0, commitment=0.25)
  c.optim = dict(
    learning_rate=1e-4, b1=0.8, b2=0.99, weight_decay=0.01, lr_decay=0.999996, clip_norm=1e3
  )
  c.train = dict(
    seed=0,
    total_steps=400_000,
    adversarial_start=0,
    log_every=100,
    eval_every=5000,
    checkpoint_every=5000,
    keep_checkpoints=3,
    peak_flops_per_device=None,
    num_devices=0,  # the batch is split over the first num_devices devices (0: all)
  )
  c.data.batch_size = 64
  if arg.local:
    m = c.model
    m.code2wav.update(
      hidden_size=64,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=4,
      intermediate_size=128,
      decoder_dim=128,
    )
    m.update(
      codebook_dim=32,
      encoder_channels=8,
      encoder_hidden=64,
      encoder_layers=2,
      encoder_heads=4,
      encoder_intermediate=128,
    )
    c.data.path = f"{recipe.LOCAL_MEDIA}/asr"
    c.data.local_media = recipe.LOCAL_MEDIA
    c.data.batch_size = 8
    c.data.segment_samples = 11520  # 6 frames, 0.48 s (DAC trains on 0.38 s excerpts)
    c.data.eval_clips = 8
    c.disc.update(period_channels=(8, 16, 32, 32), stft_channels=8)
    c.optim.learning_rate = 1e-3 if arg.stage == "tokenizer" else 5e-4
    c.train.update(
      # Most of the CPU budget on the mel loss: a GAN step costs ~4 mel-only steps here.
      total_steps=1200 if arg.stage == "tokenizer" else 240,
      adversarial_start=1000 if arg.stage == "tokenizer" else 180,
      log_every=50 if arg.stage == "tokenizer" else 20,
      eval_every=400 if arg.stage == "tokenizer" else 120,
      checkpoint_every=200,
    )
  if arg.steps:
    c.train.total_steps = arg.steps
  return c
