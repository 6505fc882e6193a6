"""A prompt/response task from Tiny Shakespeare: answer a speech in the next speaker's voice.

Each example is two consecutive speeches of a split. The prompt is the first speech followed by
the next speaker's name line ("...\n\nROMEO:\n"); the response is the second speech's text and
`<eos>`. The student only ever learns the response: the prompt is masked out of every loss.

Arrays are fixed-shape: prompts left-padded to `prompt_len` (their start cut when longer, so the
speaker's name line always stays), responses right-padded to `response_len` (cut, then `<eos>`).
`to_batch` lays a prompt and a response side by side as one train batch; the same function
turns a prompt and a *generated* response into a batch (kd.train.onpolicy), so supervised and
on-policy batches share one layout:

  input_ids  [B, P+R-1]   prompt (left pad) | response (right pad), without the last token
  labels     [B, P+R-1]   the next token
  loss_mask  [B, P+R-1]   1 where the label is a real response token (its <eos> included)
  attention_mask, positions   real tokens, numbered from 0 at the first real prompt token
  prompt_ids, prompt_mask [B, P]  kept for generation
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import grain
import jax.numpy as jnp
import numpy as np

from kd.data import tokenizer as tok_lib
from kd.models import sample

FIELDS = ('prompt_ids', 'prompt_mask', 'response_ids', 'response_mask')
_SPEAKER = re.compile(r'^([A-Z][A-Za-z \'.-]*):\n(.+)$', re.S)


def speech_pairs(speeches: Sequence[str]) -> list[tuple[str, str]]:
  """(prompt, response) texts from consecutive speeches "NAME:\\ntext" of different speakers."""
  parsed = [_SPEAKER.match(s) for s in speeches]
  pairs = []
  for first, second in zip(parsed, parsed[1:]):
    if first is None or second is None or first.group(1) == second.group(1):
      continue
    prompt = f'{first.group(0)}\n\n{second.group(1)}:\n'
    pairs.append((prompt, second.group(2)))
  return pairs


def encode(pairs: Sequence[tuple[str, str]], tokenizer, *, prompt_len: int,
           response_len: int) -> dict[str, np.ndarray]:
  """Token arrays of `pairs`: prompt_ids/prompt_mask [N, P], response_ids/response_mask [N, R]."""
  if prompt_len < 1 or response_len < 2:
    raise ValueError(f'need prompt_len >= 1 and response_len >= 2 (a token and <eos>), got '
                     f'{prompt_len}, {response_len}.')
  prompts = tok_lib.encode_batch(tokenizer, [p for p, _ in pairs], add_bos=True)
  responses = tok_lib.encode_batch(tokenizer, [r for _, r in pairs])
  n = len(pairs)
  out = {'prompt_ids': np.full((n, prompt_len), tok_lib.PAD_ID, np.int32),
         'prompt_mask': np.zeros((n, prompt_len), np.int32),
         'response_ids': np.full((n, response_len), tok_lib.PAD_ID, np.int32),
         'response_mask': np.zeros((n, response_len), np.int32)}
  for i, (p, r) in enumerate(zip(prompts, responses)):
    p = p[-prompt_len:]  # keep the end: the speaker line the response answers to
    r = r[:response_len - 1] + [tok_lib.EOS_ID]
    out['prompt_ids'][i, prompt_len - len(p):] = p
    out['prompt_mask'][i, prompt_len - len(p):] = 1
    out['response_ids'][i, :len(r)] = r
    out['response_mask'][i, :len(r)] = 1
  return out


def response_mask(response_ids_BxR, eos_id: int = tok_lib.EOS_ID):
  """1 up to and including each row's first `eos_id`, 0 after it (all 1 without one)."""
  is_eos = response_ids_BxR == eos_id
  seen_before = jnp.cumsum(is_eos, axis=1) - is_eos  # eos strictly before this position
  return (seen_before == 0).astype(jnp.int32)


def to_batch(prompt_ids_BxP, prompt_mask_BxP, response_ids_BxR, response_mask_BxR) -> dict:
  """One train batch from prompts and responses (see the module docstring).

  numpy in, numpy out (the data pipeline); jax arrays in, jax arrays out (jit-able, on-policy).
  """
  args = (prompt_ids_BxP, prompt_mask_BxP, response_ids_BxR, response_mask_BxR)
  xp = np if all(isinstance(a, np.ndarray) for a in args) else jnp
  ids = xp.concatenate([prompt_ids_BxP, response_ids_BxR], axis=1).astype(xp.int32)
  real = xp.concatenate([prompt_mask_BxP, response_mask_BxR], axis=1).astype(xp.int32)
  in_response = xp.concatenate([xp.zeros_like(prompt_mask_BxP), response_mask_BxR], axis=1)
  positions = xp.maximum(xp.cumsum(real, axis=1) - 1, 0).astype(xp.int32)
  return {'input_ids': ids[:, :-1], 'labels': ids[:, 1:],
          'loss_mask': in_response[:, 1:].astype(xp.float32),
          'attention_mask': real[:, :-1], 'positions': positions[:, :-1],
          'prompt_ids': xp.asarray(prompt_ids_BxP, xp.int32),
          'prompt_mask': xp.asarray(prompt_mask_BxP, xp.int32)}


def answered(model, batch: dict, generate=sample.generate, eos_id: int = tok_lib.EOS_ID,
             **sample_kw) -> dict:
  """`batch` with its responses replaced by `model`'s answers to its prompts: same length, cut
  after each `eos_id` (a chat model's end-of-turn token). `model` is a (module, variables)
  pair; `sample_kw` (temperature, rng, top_k, top_p) go to `generate`
  (kd.models.sample.generate, or a parallel plan's)."""
  r = batch['labels'].shape[1] + 1 - batch['prompt_ids'].shape[1]
  generated = generate(model, batch['prompt_ids'], batch['prompt_mask'], max_new_tokens=r,
                       eos_id=eos_id, pad_id=tok_lib.PAD_ID, **sample_kw)
  return to_batch(batch['prompt_ids'], batch['prompt_mask'], generated,
                  response_mask(generated, eos_id))


def make_iterator(arrays: dict[str, np.ndarray], *, batch_size: int, seed: int,
                  shard_index: int = 0, shard_count: int = 1):
  """Shuffled train batches (to_batch layout) forever: a checkpointable grain iterator.

  This process reads rows shard_index::shard_count; every epoch is reshuffled from `seed`.
  """
  n = len(arrays['prompt_ids'])
  rows = np.arange(shard_index, n, shard_count)
  if len(rows) < batch_size:
    raise ValueError(f'{len(rows)} examples in this shard, fewer than batch_size={batch_size}; '
                     'lower data.batch_size or use more data.')
  ds = (grain.MapDataset.source(rows).shuffle(seed=seed).repeat(None)
        .batch(batch_size, drop_remainder=True)
        .map(lambda idx: to_batch(*(arrays[k][idx] for k in FIELDS))))
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0)))


def eval_batches(arrays: dict[str, np.ndarray], batch_size: int) -> list[dict]:
  """Every example once, in order; the last batch is padded with rows of loss_mask 0."""
  n = len(arrays['prompt_ids'])
  pad = -n % batch_size
  filled = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]) for k, v in
            arrays.items()}
  filled['prompt_mask'][n:, -1] = 1  # generation needs the last prompt column real
  return [to_batch(*(filled[k][i:i + batch_size] for k in FIELDS))
          for i in range(0, n + pad, batch_size)]
