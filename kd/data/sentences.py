"""Unlabeled sentences for embedding distillation, by source name.

  sentences = load(['stsb:train'])          # the unique sentences of STS-B train
  sentences = load(['stsb:train', 'tiny_shakespeare:train'])

A source is `name:split`. The files are read from the data folder of kd.data.local
(`$KD_DATA_DIR`, else `~/.cache/kd/data`, laid out like `../shared/data`:
`stsbenchmark/sts-<split>.csv`, `tinyshakespeare/input.txt`), where a missing one is downloaded
first. Sentences are deduplicated across sources in first-seen order, so a run sees the same list
every time.
"""

from __future__ import annotations

import csv
from typing import Callable, Sequence

import numpy as np

from kd.data import local
from kd.data import text as text_lib

STSB_SPLITS = {'train': 'train', 'dev': 'dev', 'validation': 'dev'}


def read_sts(path: str) -> tuple[list[str], list[str], np.ndarray]:
  """(sentence1s, sentence2s, gold float64 scores) of an STS-B file.

  Tab-separated `genre, file, year, id, score, sentence1, sentence2[, extra...]`; extra trailing
  columns are ignored and quotes are literal text (csv.QUOTE_NONE).
  """
  s1, s2, scores = [], [], []
  with open(path, encoding='utf-8', newline='') as f:
    for line_no, row in enumerate(csv.reader(f, delimiter='\t', quoting=csv.QUOTE_NONE), 1):
      if not row:
        continue
      if len(row) < 7:
        raise ValueError(f'{path}:{line_no}: {len(row)} tab-separated columns; an STS-B line has '
                         'at least 7 (genre, file, year, id, score, sentence1, sentence2).')
      try:
        scores.append(float(row[4]))
      except ValueError:
        raise ValueError(f'{path}:{line_no}: score column {row[4]!r} is not a number.') from None
      s1.append(row[5])
      s2.append(row[6])
  return s1, s2, np.asarray(scores, np.float64)


def stsb_path(split: str) -> str:
  """The STS-B file of `split` ('train' or 'dev') in the data folder, downloaded first when
  missing (kd.data.local.path; DataError, naming the folder, when that fails)."""
  if split not in STSB_SPLITS:
    raise ValueError(f'unknown STS-B split {split!r}; use one of {sorted(STSB_SPLITS)}.')
  return local.path(f'stsbenchmark/sts-{STSB_SPLITS[split]}.csv')


def _stsb(split: str) -> list[str]:
  s1, s2, _ = read_sts(stsb_path(split))
  return s1 + s2


def _str(x) -> str:
  return x.decode('utf-8') if isinstance(x, bytes) else str(x)


def _tiny_shakespeare(split: str) -> list[str]:
  """Lines of the speeches of a Tiny Shakespeare split (speaker names dropped)."""
  source = text_lib.load_text_split('tiny_shakespeare', split)
  out = []
  for i in range(len(source)):
    for line in _str(source[i]).splitlines():
      line = line.strip()
      if line and not line.endswith(':'):  # 'ROMEO:' names a speaker, it is no sentence
        out.append(line)
  return out


SOURCES: dict[str, Callable[[str], list[str]]] = {
    'stsb': _stsb,
    'tiny_shakespeare': _tiny_shakespeare,
}


def word_dropout(sentences: Sequence[str], *, copies: int, rate: float, seed: int = 0) -> list[str]:
  """`sentences` followed by `copies` noisy copies of each (every word dropped with
  probability `rate`, at least one kept), duplicates removed: more unlabeled inputs for a
  teacher to label, from the same text."""
  if copies < 0 or not 0 <= rate < 1:
    raise ValueError(f'word_dropout needs copies >= 0 and 0 <= rate < 1, got {copies}, {rate}.')
  rng = np.random.default_rng(seed)
  out = dict.fromkeys(sentences)
  for _ in range(copies):
    for s in sentences:
      words = s.split()
      kept = [w for w, drop in zip(words, rng.random(len(words)) < rate) if not drop]
      out.setdefault(' '.join(kept or words[:1]), None)
  return list(out)


def load(names: Sequence[str], *, min_chars: int = 1) -> list[str]:
  """The unique non-empty sentences of `names` ('source:split'), in first-seen order."""
  if isinstance(names, str):
    names = [names]
  if not names:
    raise ValueError("no sentence sources given; e.g. data.train=('stsb:train',).")
  out: dict[str, None] = {}
  for name in names:
    source, _, split = str(name).partition(':')
    if source not in SOURCES or not split:
      raise ValueError(f'unknown sentence source {name!r}; use source:split with source one '
                       f'of {sorted(SOURCES)}, e.g. stsb:train.')
    for s in SOURCES[source](split):
      s = s.strip()
      if len(s) >= min_chars:
        out.setdefault(s, None)
  return list(out)
