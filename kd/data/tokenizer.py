"""Byte-level BPE tokenizers (HF `tokenizers`) with fixed special-token ids.

`<pad>`=0, `<bos>`=1, `<eos>`=2 in every tokenizer trained here. The tokenizer
itself adds no special tokens: the data pipeline adds `<bos>`/`<eos>` around
each document, so `decode(encode(x)) == x` for any text.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable, Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
SPECIAL_TOKENS = (PAD, BOS, EOS)  # index == id
FILENAME = "tokenizer.json"


def train_bpe(
    texts: Iterable[str], vocab_size: int, path: str
) -> tokenizers.Tokenizer:
  """Trains a byte-level BPE on `texts` and saves it as `<path>/tokenizer.json`.

  Deterministic: the same texts and vocab_size give the same vocab and merges.
  Raises ValueError when the corpus is too small to reach `vocab_size`.
  """
  alphabet = pre_tokenizers.ByteLevel.alphabet()
  smallest = len(SPECIAL_TOKENS) + len(alphabet)
  if vocab_size <= smallest:
    raise ValueError(
        f"vocab_size={vocab_size} leaves no room for merges: byte-level BPE"
        f" needs more than {smallest} (3 special tokens + 256 bytes)."
    )
  tok = tokenizers.Tokenizer(models.BPE())
  # No prefix space and no normaliser, so decoding gives back the exact text.
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size,
      special_tokens=list(SPECIAL_TOKENS),
      initial_alphabet=alphabet,
      show_progress=False,
  )
  tok.train_from_iterator(texts, trainer=trainer)
  check_special_ids(tok)
  if tok.get_vocab_size() != vocab_size:
    raise ValueError(
        f"The corpus only supports {tok.get_vocab_size()} tokens, fewer than"
        f" vocab_size={vocab_size}; lower vocab_size or train on more text."
    )
  save_atomic(tok, path)
  return tok


def save_atomic(tok: tokenizers.Tokenizer, path: str) -> str:
  """Writes `<path>/tokenizer.json` through a temp file and `os.replace`."""
  os.makedirs(path, exist_ok=True)
  target = os.path.join(path, FILENAME)
  fd, tmp = tempfile.mkstemp(dir=path, prefix=f".{FILENAME}.", suffix=".tmp")
  os.close(fd)
  try:
    tok.save(tmp)
    os.replace(tmp, target)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return target


def load_tokenizer(path: str) -> tokenizers.Tokenizer:
  """Loads `<path>/tokenizer.json` (or `path` itself if it is the file)."""
  file = path if path.endswith(".json") else os.path.join(path, FILENAME)
  if not os.path.isfile(file):
    raise FileNotFoundError(
        f"No tokenizer at {file!r}; train one with train_bpe or get_or_train."
    )
  tok = tokenizers.Tokenizer.from_file(file)
  check_special_ids(tok)
  return tok


def get_or_train(
    workdir: str,
    texts_fn: Callable[[], Iterable[str]],
    vocab_size: int,
) -> tokenizers.Tokenizer:
  """Loads `<workdir>/tokenizer.json`, or trains it on `texts_fn()` and saves.

  Racing processes may both train; they write the same file atomically.
  """
  if os.path.isfile(os.path.join(workdir, FILENAME)):
    tok = load_tokenizer(workdir)
    if tok.get_vocab_size() != vocab_size:
      raise ValueError(
          f"{os.path.join(workdir, FILENAME)} has"
          f" {tok.get_vocab_size()} tokens but vocab_size={vocab_size}; use"
          " a fresh workdir or set vocab_size to match."
      )
    return tok
  return train_bpe(texts_fn(), vocab_size, workdir)


def check_special_ids(tok: tokenizers.Tokenizer) -> None:
  for want, token in enumerate(SPECIAL_TOKENS):
    got = tok.token_to_id(token)
    if got != want:
      raise ValueError(
          f"Tokenizer maps {token!r} to {got}, expected {want}; kd needs"
          f" {dict(zip(SPECIAL_TOKENS, range(3)))}. Retrain with train_bpe."
      )


def encode_batch(
    tok: tokenizers.Tokenizer,
    texts: Sequence[str],
    *,
    add_bos: bool = False,
    add_eos: bool = False,
) -> list[list[int]]:
  """Token ids of each text (no offsets computed, in parallel)."""
  head = [BOS_ID] if add_bos else []
  tail = [EOS_ID] if add_eos else []
  encodings = tok.encode_batch_fast(list(texts), add_special_tokens=False)
  return [head + e.ids + tail for e in encodings]


def decode(tok: tokenizers.Tokenizer, ids: Iterable[int]) -> str:
  """Text of `ids`, dropping `<pad>`, `<bos>` and `<eos>`."""
  return tok.decode([int(i) for i in ids], skip_special_tokens=True)
