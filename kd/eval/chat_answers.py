"""Chat models judged on what they write: each answers held-out prompts greedily (stopping at
its end-of-turn token) and the teacher scores the answers, token by token, given the prompt.

  out = answer({'teacher': t, 'student_kd': s}, prompts, teacher, max_new_tokens=48)
  out['scores']['student_kd']   # {'answer_teacher_nll': mean NLL per answer token, 'answer_tokens'}
  out['examples']               # the first three prompts with every model's answer, as text

A lower NLL means answers the teacher finds more likely; the teacher's own answers set the floor.
The end-of-turn token is part of an answer (the model decided to stop); a row cut at
max_new_tokens is scored on what it wrote.
"""

from __future__ import annotations

import jax
import numpy as np

from kd import losses
from kd.models import sample

EXAMPLES = 3


def _left_padded(rows, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  width = max(len(r) for r in rows)
  ids = np.full((len(rows), width), pad_id, np.int32)
  mask = np.zeros((len(rows), width), np.int32)
  for i, r in enumerate(rows):
    ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
  return ids, mask


def _answer_lengths(new_BxN: np.ndarray, eos_id: int) -> np.ndarray:
  """Tokens of each row up to and including its first eos (all N when it has none)."""
  hit = new_BxN == eos_id
  first = np.where(hit.any(1), hit.argmax(1) + 1, new_BxN.shape[1])
  return first


def teacher_nll(teacher, prompt_ids, prompt_mask, new_BxN, lengths) -> tuple[float, float]:
  """(summed NLL, tokens) of the answers under the teacher, given the prompts."""
  ids = np.concatenate([prompt_ids, new_BxN], 1)
  mask = np.concatenate([prompt_mask, np.arange(new_BxN.shape[1])[None] < lengths[:, None]], 1)
  positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
  labels = np.concatenate([ids[:, 1:], np.zeros_like(ids[:, :1])], 1)
  p = prompt_ids.shape[1]
  answer = np.zeros_like(mask)
  answer[:, p - 1:-1] = mask[:, p:]  # position t predicts token t + 1, an answer token
  logits = teacher.apply(teacher.params, ids, attention_mask=mask, positions=positions)['logits']
  s, c = jax.device_get(losses.ce_sum(logits, labels, mask=answer))
  return float(s), float(c)


def answer(models: dict, prompts: list[dict], teacher, *, max_new_tokens: int,
           batch_size: int = 8) -> dict:
  """Greedy answers of every model to `prompts` ({'ids', 'prompt', 'reference'}), scored by
  `teacher` (a kd Model with its tokenizer); see the module docstring."""
  tok = teacher.tokenizer
  eos, pad = tok.eos_token_id, tok.pad_token_id if tok.pad_token_id is not None else 0
  scores, texts = {}, {}
  for name, model in models.items():
    nll = count = 0.0
    texts[name] = []
    for i in range(0, len(prompts), batch_size):
      ids, mask = _left_padded([p['ids'] for p in prompts[i:i + batch_size]], pad)
      new = np.asarray(sample.generate(model, ids, mask, max_new_tokens=max_new_tokens,
                                       temperature=0.0, eos_id=eos, pad_id=pad))
      lengths = _answer_lengths(new, eos)
      s, c = teacher_nll(teacher, ids, mask, new, lengths)
      nll, count = nll + s, count + c
      texts[name] += [tok.decode(row[:n], skip_special_tokens=True).strip()
                      for row, n in zip(new, lengths)]
    scores[name] = {'answer_teacher_nll': nll / max(count, 1.0),
                    'answer_tokens': count / max(len(prompts), 1)}
  examples = [{'prompt': p['prompt'], 'reference': p['reference'],
               'answers': {name: texts[name][i] for name in models}}
              for i, p in enumerate(prompts[:EXAMPLES])]
  return {'scores': scores, 'examples': examples}
