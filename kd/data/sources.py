"""Records from where a user's data lives: local files, TFDS, Hugging Face `datasets`, and the
offline corpora of kd.data.local (`$KD_DATA_DIR`, else `~/.cache/kd/data`; fetched when missing).

A source is one string, so that configs and sweeps can name it:

  PATH.txt                  the file as one document (a book, a corpus dump)
  PATH.jsonl                one JSON record per line: {"text": ...}, {"messages": [...]}, or
                            {"prompt": ..., "completion": ...}
  tfds:NAME:SPLIT           a TFDS dataset, read through its ArrayRecord data source (no
                            TensorFlow); records keep their `text` / `messages` / ... fields
  hf:NAME_OR_FILE[:CONFIG]:SPLIT   `datasets.load_dataset(NAME, CONFIG, split=SPLIT)`; a
                            local .jsonl / .json / .parquet / .csv file works offline
  shakespeare               Tiny Shakespeare (tinyshakespeare/input.txt of the data folder), one
                            document
  stsb:train | stsb:dev     the distinct STS Benchmark sentences of a split, one document each
                            (kd.data.sentences: stsbenchmark/ of the data folder)
  stsb_paraphrase:SPLIT     chat records built from STS-B pairs scored >= 4 (paraphrases): the
                            user asks for a rewording of one sentence, the assistant gives the other

A slice after any source keeps part of it: `[:90%]`, `[90%:]`, `[:1000]`. Of a source that is
one document (a .txt file, `shakespeare`) the slice cuts its characters, so the tail of a book
can be held out; of any other, its records. Several sources join with '+'.

Every record is a dict; `kind(record)` says whether it is plain text or a chat. Files are read
as UTF-8 and a byte that is not is reported with its file and offset; an empty source is an
error naming it.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from kd.data import local
from kd.data import sentences
from kd.data.local import DataError

_SLICE = re.compile(r'^(?P<spec>.*?)\[(?P<start>-?\d*%?):(?P<stop>-?\d*%?)\]$')
CHAT_KEYS = ('messages',)
PAIR_KEYS = ('prompt', 'completion')


def _jsonl(path: str) -> list[dict]:
  records = []
  for n, line in enumerate(local.read_text(path).splitlines(), 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f'{path}:{n}: not a JSON record ({e.msg}); each line of a .jsonl file is '
                      'one JSON object') from None
    if not isinstance(record, dict):
      raise DataError(f'{path}:{n}: a {type(record).__name__}, not a JSON object')
    records.append(record)
  return records


def _stsb_pairs(split: str) -> list[tuple[float, str, str]]:
  s1, s2, scores = sentences.read_sts(sentences.stsb_path(split))
  return [(float(c), a.strip(), b.strip()) for a, b, c in zip(s1, s2, scores)]


def _stsb_paraphrases(split: str) -> list[dict]:
  return [{'messages': [
      {'role': 'user', 'content': f'Rewrite this sentence in other words: {a}'},
      {'role': 'assistant', 'content': b}]}
          for score, a, b in _stsb_pairs(split) if score >= 4.0 and a and b and a != b]


def _tfds(name: str, split: str) -> list[dict]:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  source = tfds.data_source(name, split=split)
  return [_decoded(source[i]) for i in range(len(source))]


def _decoded(record):
  if isinstance(record, bytes):
    return record.decode('utf-8')
  if isinstance(record, dict):
    return {k: _decoded(v) for k, v in record.items()}
  if isinstance(record, (list, tuple)):
    return [_decoded(v) for v in record]
  return record


def _hf(spec: str) -> list[dict]:
  import datasets  # pylint: disable=g-import-not-at-top
  parts = spec.split(':')[1:]
  if not 1 <= len(parts) <= 3:
    raise DataError(f'{spec!r}: use hf:NAME_OR_FILE[:CONFIG]:SPLIT')
  name, config, split = (parts + ['train'] if len(parts) == 1 else
                         [parts[0], None, parts[1]] if len(parts) == 2 else parts)
  builders = {'.jsonl': 'json', '.json': 'json', '.parquet': 'parquet', '.csv': 'csv'}
  ext = os.path.splitext(name)[1]
  if os.path.isfile(name) and ext in builders:
    ds = datasets.load_dataset(builders[ext], data_files={split: name}, split=split)
  else:
    ds = datasets.load_dataset(name, config, split=split)
  return [dict(r) for r in ds]


def _parts(spec: str, n: int) -> tuple[str, ...]:
  parts = spec.split(':')
  if len(parts) != n:
    raise DataError(f'data source {spec!r} needs {n} parts separated by ":"; see '
                    'kd/data/sources.py for the forms')
  return tuple(parts)


def _unsliced(spec: str) -> tuple[list[dict] | str, str]:
  """(records, or the text of a one-document source; a name for messages)."""
  if spec == 'shakespeare':
    path = local.path('tinyshakespeare/input.txt')
    return local.read_text(path), path
  if spec.startswith('stsb:'):
    return [{'text': t} for t in sentences.load([spec])], spec
  if spec.startswith('stsb_paraphrase:'):
    return _stsb_paraphrases(_parts(spec, 2)[1]), spec
  if spec.startswith('tfds:'):
    return _tfds(*_parts(spec, 3)[1:]), spec
  if spec.startswith('hf:'):
    return _hf(spec), spec
  if spec.endswith('.txt'):
    return local.read_text(spec), spec
  if spec.endswith('.jsonl'):
    return _jsonl(spec), spec
  raise DataError(f'data source {spec!r} is unknown: give a .txt or .jsonl path, tfds:NAME:SPLIT, '
                  'hf:NAME_OR_FILE[:CONFIG]:SPLIT, shakespeare, stsb:SPLIT or '
                  'stsb_paraphrase:SPLIT')


def _bound(text: str, n: int, spec: str) -> int | None:
  if not text:
    return None
  value = float(text[:-1]) * n / 100 if text.endswith('%') else float(text)
  if value != int(value) and not text.endswith('%'):
    raise DataError(f'slice bound {text!r} of {spec!r} is not an integer or a percentage')
  return int(value)


def _one(spec: str) -> list[dict]:
  m = _SLICE.match(spec)
  base = m['spec'] if m else spec
  got, name = _unsliced(base)
  n = len(got)
  cut = slice(_bound(m['start'], n, spec), _bound(m['stop'], n, spec)) if m else slice(None)
  if isinstance(got, str):  # one document: its characters are sliced
    text = got[cut]
    records = [{'text': text}] if text.strip() else []
  else:
    records = got[cut]
  if not records:
    raise DataError(f'data source {spec!r} ({name}) holds no text; check the file or the slice')
  return records


def read(spec: str) -> list[dict]:
  """The records of one source string (sources joined by '+' are concatenated)."""
  if not spec or not spec.strip():
    raise DataError('an empty data source; name a file, tfds:NAME:SPLIT, hf:NAME:SPLIT, ...')
  records = []
  for part in spec.split('+'):
    records += _one(part.strip())
  return records


def kind(record: dict[str, Any], where: str = 'a record') -> str:
  """'chat' for a record with `messages` or `prompt`/`completion`, 'text' for one with a
  string `text`; `where` names the record in the error."""
  if 'messages' in record or all(k in record for k in PAIR_KEYS):
    return 'chat'
  if 'text' in record:
    if not isinstance(record['text'], str):
      raise DataError(f'{where}: "text" is a {type(record["text"]).__name__}, not a string')
    return 'text'
  raise DataError(f'{where}: fields {sorted(record)} are neither text ("text") nor chat '
                  '("messages", or "prompt" and "completion")')
