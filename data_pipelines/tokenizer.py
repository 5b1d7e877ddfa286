"""Text tokenizer: a HF ``tokenizers`` tokenizer.json, or a byte-level BPE trained locally.

* ``load_tokenizer(path)`` loads any ``tokenizer.json`` (e.g. Qwen3-Omni's) that
  defines ``<|endoftext|>``.
* ``train_bpe_tokenizer(texts, vocab_size=...)`` trains a byte-level BPE
  (ByteLevel pre-tokenizer and decoder, all 256 bytes in the base alphabet, so
  no ``<unk>``) whose first ids are ``SPECIAL_TOKENS`` in order:
  ``<|endoftext|>`` = 0, ``<|im_start|>`` = 1, ..., ``<|tts_eos|>`` = 12, then the
  whole-word ``ROLE_TOKENS`` ``system`` = 13, ``user`` = 14, ``assistant`` = 15.
* ``local_tokenizer(corpus_dir, vocab_size=...)`` trains one on a corpus'
  train split once and caches it as ``corpus_dir/bpe-{vocab_size}/tokenizer.json``.

``TextTokenizer`` wraps either with the small interface the pipeline and the
model need. It pickles (grain worker processes receive a copy).
"""

import os
import pathlib
from collections.abc import Iterable, Iterator

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from data_pipelines import records
from data_pipelines.ops import BadRecord
from omnijax import paths

# Qwen3-Omni special tokens, in the id order a locally trained tokenizer uses.
SPECIAL_TOKENS = (
  "<|endoftext|>",
  "<|im_start|>",
  "<|im_end|>",
  "<|audio_start|>",
  "<|audio_end|>",
  "<|audio_pad|>",
  "<|vision_start|>",
  "<|vision_end|>",
  "<|image_pad|>",
  "<|video_pad|>",
  "<|tts_pad|>",
  "<|tts_bos|>",
  "<|tts_eos|>",
)
# Chat roles as whole-word tokens (ids right after SPECIAL_TOKENS): the Talker reads a turn's
# role as the one token after <|im_start|>, as with Qwen's vocabulary. They are special
# tokens to `tokenizers` (decode(skip_special_tokens=True) drops them).
ROLE_TOKENS = ("system", "user", "assistant")
EOS_TOKEN = "<|endoftext|>"


class TextTokenizer:
  """Minimal tokenizer interface over a ``tokenizers.Tokenizer``."""

  def __init__(self, tokenizer: tokenizers.Tokenizer):
    self._tokenizer = tokenizer
    self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    self.eos_id = self.token_id(EOS_TOKEN)

  def token_id(self, name: str) -> int:
    """Id of a (special) token; KeyError if the vocabulary lacks it."""
    token_id = self._tokenizer.token_to_id(name)
    if token_id is None:
      raise KeyError(f"Token {name!r} is not in the vocabulary")
    return token_id

  def encode(self, text: str) -> np.ndarray:
    """int32 token ids of ``text`` (no EOS/BOS added)."""
    return np.asarray(self._tokenizer.encode(text, add_special_tokens=False).ids, np.int32)

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
    """Text of ``ids``, special tokens included unless ``skip_special_tokens``
    (so by default decode∘encode is identity)."""
    return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def save(self, path: str | os.PathLike[str]) -> None:
    """Atomically writes the tokenizer.json to ``path`` (local, or an object in a bucket)."""
    path = paths.path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path if paths.is_url(path) else path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(self._tokenizer.to_str())
    if tmp != path:
      tmp.replace(path)


def load_tokenizer(path: str | os.PathLike[str]) -> TextTokenizer:
  """Loads a HF ``tokenizer.json``, or the one in a directory (an omnijax workdir, an exported
  or a transformers checkpoint); local or in a bucket."""
  path = paths.path(path)
  if path.is_dir():
    path = path / "tokenizer.json"
  if not path.exists():
    raise FileNotFoundError(f"{path}: no tokenizer.json there.")
  return TextTokenizer(tokenizers.Tokenizer.from_str(path.read_text()))


def train_bpe_tokenizer(texts: Iterable[str], *, vocab_size: int = 4096) -> TextTokenizer:
  """Trains a byte-level BPE tokenizer with ``SPECIAL_TOKENS`` and ``ROLE_TOKENS`` first."""
  min_size = len(SPECIAL_TOKENS) + len(ROLE_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet())
  if vocab_size < min_size:
    raise ValueError(f"vocab_size must be >= {min_size}, got {vocab_size}")
  tokenizer = tokenizers.Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    special_tokens=[
      *SPECIAL_TOKENS,
      *(tokenizers.AddedToken(r, single_word=True, normalized=False) for r in ROLE_TOKENS),
    ],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  tokenizer.train_from_iterator(texts, trainer)
  return TextTokenizer(tokenizer)


def _corpus_texts(corpus_dir: str | os.PathLike[str]) -> Iterator[str]:
  source = records.open_shards(corpus_dir, "train")
  for i in range(len(source)):
    try:
      text = records.decode_example(source[i]).get("text")
    except BadRecord:
      continue
    if isinstance(text, str) and text.strip():
      yield text


def local_tokenizer(corpus_dir: str | os.PathLike[str], *, vocab_size: int = 4096) -> TextTokenizer:
  """The BPE tokenizer of a local corpus, trained on its train split once.

  Cached at ``corpus_dir/bpe-{vocab_size}/tokenizer.json``; later calls load it.
  """
  path = pathlib.Path(corpus_dir) / f"bpe-{vocab_size}" / "tokenizer.json"
  if path.is_file():
    cached = load_tokenizer(path)
    try:  # a tokenizer cached before these tokens existed is retrained
      if all(cached.token_id(t) == i for i, t in enumerate(SPECIAL_TOKENS + ROLE_TOKENS)):
        return cached
    except KeyError:
      pass
  tokenizer = train_bpe_tokenizer(_corpus_texts(corpus_dir), vocab_size=vocab_size)
  tokenizer.save(path)
  return tokenizer
