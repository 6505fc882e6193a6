"""Teacher-generated text: the synthetic-data half of a distillation corpus.

The teacher continues the opening words of real documents (e.g. the first 4 words of each STS-B
train sentence) by sampling, and the continuations become text documents the student trains
on: text where the teacher's own distribution is the truth, in the domain the prompts come from.

  records = get_or_write(path, teacher, prompts_spec='stsb:train', count=256, words=4, ...)

The samples are made once and kept as jsonl ({"text": ...} per line, written atomically) with
the settings that made them in the first line; a run that finds the file with the same settings
reads it, any other settings are refused rather than silently mixed. Sampling is keyed by
`seed`, so the same settings give the same text.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from kd.data import chat
from kd.data import sources
from kd.models import sample


def _prompts(tokenizer, spec: str, count: int, words: int, text_prefix: str, seed: int):
  records = [r for r in sources.read(spec) if sources.kind(r) == 'text']
  if not records:
    raise sources.DataError(f'synthetic prompts {spec!r} hold no text records')
  order = np.random.default_rng(seed).permutation(len(records))[:count]
  head = chat.prefix_ids(tokenizer, text_prefix)
  openings = [' '.join(records[i]['text'].split()[:words]) for i in order]
  ids = tokenizer(openings, add_special_tokens=True)['input_ids']
  return openings, [head + list(x) for x in ids]


def generate(teacher, settings: dict) -> list[dict]:
  """{'text': opening + continuation} records sampled from `teacher` (a kd Model with its
  tokenizer) as `settings` say (the keys of config.data.synthetic)."""
  tok = teacher.tokenizer
  openings, prompts = _prompts(tok, settings['prompts'], int(settings['count']),
                               int(settings['words']), settings['text_prefix'],
                               int(settings['seed']))
  # A continuation ends at the end-of-sequence token or at the next document separator.
  stop = sorted(({tok.eos_token_id} - {None}) | set(chat.prefix_ids(tok, settings['text_prefix'])))
  records, batch = [], int(settings['batch_size'])
  for i in range(0, len(prompts), batch):
    rows = prompts[i:i + batch]
    width = max(len(r) for r in rows)
    ids = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for j, r in enumerate(rows):
      ids[j, width - len(r):], mask[j, width - len(r):] = r, 1
    new = np.asarray(sample.generate(
        teacher, ids, mask, max_new_tokens=int(settings['max_new_tokens']),
        temperature=float(settings['temperature']), top_p=float(settings['top_p']),
        eos_id=stop or None, pad_id=stop[0] if stop else 0,
        rng=jax.random.fold_in(jax.random.key(int(settings['seed'])), i)))
    for opening, row in zip(openings[i:i + batch], new.tolist()):
      end = min([row.index(s) for s in stop if s in row], default=len(row))
      text = opening + tok.decode(row[:end], skip_special_tokens=True)
      if text.strip():
        records.append({'text': text})
  return records


def get_or_write(path: str, teacher, settings: dict) -> list[dict]:
  """The records at `path` when it was written with these `settings`, else generated and
  written there (atomically); a file from other settings is refused."""
  settings = dict(sorted(settings.items()))
  if os.path.isfile(path):
    with open(path, encoding='utf-8') as f:
      head = json.loads(f.readline())
      if head != {'settings': settings}:
        raise sources.DataError(
            f'{path} holds teacher samples made with {head.get("settings")}, this run asks for '
            f'{settings}; use a fresh workdir or the same config.data.synthetic')
      return [json.loads(line) for line in f if line.strip()]
  records = generate(teacher, settings)
  if jax.process_index() == 0:
    tmp = f'{path}.tmp{os.getpid()}'
    with open(tmp, 'w', encoding='utf-8') as f:
      f.write(json.dumps({'settings': settings}) + '\n')
      for r in records:
        f.write(json.dumps(r) + '\n')
    os.replace(tmp, path)
  return records
