"""Sequence-level KD (Kim & Rush 2016): the teacher's own responses become the training set.

`teacher_responses` runs the teacher's sampler over every prompt of a dialogue dataset and keeps
what it wrote (up to each <eos>) as the new responses; `get_or_write` stores them once as
ArrayRecord records (kd.data.teacher_cache.write_records: atomic, meta.json beside) under a name
keyed by everything that decides them, so later runs and seeds reuse the same synthetic set. One
process writes it (kd.data.single_writer); runs that want the same set meanwhile wait and read.
"""

from __future__ import annotations

import hashlib
import json
import os

import jax
import numpy as np

from kd.data import dialogue
from kd.data import single_writer
from kd.data import teacher_cache
from kd.data import tokenizer as tok_lib
from kd.models import sample


def teacher_responses(model, arrays: dict[str, np.ndarray], *, batch_size: int, temperature: float,
                      top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                      eos_id: int = tok_lib.EOS_ID) -> dict[str, np.ndarray]:
  """`arrays` (kd.data.dialogue.encode) with the responses replaced by `model`'s generations.

  Rows are generated batch by batch (the last batch padded and cut); the response length is
  kept. Sampling keys are fold_in(key(seed), batch index), so the set is reproducible.
  """
  n, r = arrays['response_ids'].shape
  out = {k: v.copy() for k, v in arrays.items()}
  for i, start in enumerate(range(0, n, batch_size)):
    rows = slice(start, min(start + batch_size, n))
    ids, mask = arrays['prompt_ids'][rows], arrays['prompt_mask'][rows]
    pad = batch_size - len(ids)
    if pad:  # one compiled shape: pad with copies of the last row
      ids, mask = (np.concatenate([x, np.repeat(x[-1:], pad, 0)]) for x in (ids, mask))
    gen = sample.generate(model, ids, mask, max_new_tokens=r, temperature=temperature,
                          top_k=top_k, top_p=top_p, eos_id=eos_id,
                          pad_id=tok_lib.PAD_ID,
                          rng=jax.random.fold_in(jax.random.key(seed), i))
    gen = np.asarray(jax.device_get(gen))[:batch_size - pad]  # already padded after <eos>
    out['response_ids'][rows] = gen
    out['response_mask'][rows] = np.asarray(dialogue.response_mask(gen, eos_id))
  return out


def get_or_write(path_root: str, model, arrays: dict[str, np.ndarray], *, key: dict,
                 **generate_kw) -> tuple[dict[str, np.ndarray], str]:
  """The teacher's responses from `<path_root>/seqkd-<hash of key + settings>`, written there
  first if absent. Returns (arrays, path)."""
  if generate_kw.get('eos_id', tok_lib.EOS_ID) == tok_lib.EOS_ID:  # (the names caches had)
    generate_kw.pop('eos_id', None)
  settings = json.dumps({**key, **generate_kw}, sort_keys=True)
  digest = hashlib.sha256(settings.encode()).hexdigest()[:12]
  path = os.path.join(path_root, f'seqkd-{digest}')

  def rows():
    generated = teacher_responses(model, arrays, **generate_kw)
    return [{k: generated[k][i] for k in dialogue.FIELDS}
            for i in range(len(arrays['prompt_ids']))]

  def write():
    teacher_cache.write_records(made(), path, {'settings': json.loads(settings)})

  made = rows
  if jax.process_count() > 1 and not os.path.exists(path):
    sampled = rows()  # the sampler may span hosts: every process samples, process 0 writes
    made = lambda: sampled
  single_writer.once(path, lambda: os.path.exists(path), write)
  records = teacher_cache.read_records(path)
  return {k: np.stack([np.asarray(r[k]) for r in records]) for k in dialogue.FIELDS}, path
