"""An offline sentence-encoder teacher: its features per sentence, computed once, read every epoch.

  cache = sentence_cache.get_or_write(path, ids, make_teacher_fn, fields=..., key=...)  # once
  it = sentence_cache.make_iterator(cache, batch_size=64, seed=0, steps=...)   # per run

Layout of `path` (written into `<path>.tmp`, then renamed, so a killed writer leaves nothing):
  meta.json       fields, widths, number of sentences, the `key` the cache was written for
  ids.npy         every sentence's token ids, concatenated; offsets.npy [N + 1]
  <field>.npy     token-level features concatenated like ids ([N_tokens, D], float16);
                  'embedding' [N, D] float32; attentions as one flat float16 array with
                  attention_offsets.npy, each sentence [H, T, T]
Features are named 'hidden_<j>' (hidden state j, 0 = embeddings), 'q_<i>'/'k_<i>'/'v_<i>'
(layer i's projections, 1-based) and 'attention_<i>' (layer i's attention probabilities), so a
batch carries exactly what the layer pairs of the loss terms read (kd.train.step.
cached_teacher_outputs). Files are memory-mapped; nothing is loaded that a batch does not use.

Batches (`make_iterator`) are a pure function of (seed, step): each epoch shuffles the sentences,
sorts them by length within windows of `sort_window` batches (so padding is small but batches
still mix), and shuffles the batches; sequences are padded to a multiple of `pad_multiple` so few
shapes compile. The iterator is a grain dataset iterator, so its position is checkpointed with
the train state and a resumed run sees exactly the batches it would have seen.
`make_pair_iterator` batches labelled sentence pairs the same way, for the supervised baseline.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from typing import Callable, Sequence

import grain
import numpy as np

from kd.data import single_writer

META = 'meta.json'
FEATURE_DTYPE = np.float16


def feature_names(hidden: Sequence[int] = (), qkv: Sequence[int] = (),
                  attention: Sequence[int] = (), embedding: bool = False) -> list[str]:
  return ([f'hidden_{j}' for j in hidden] + [f'{p}_{i}' for i in qkv for p in 'qkv']
          + [f'attention_{i}' for i in attention] + (['embedding'] if embedding else []))


def _round_up(n: int, multiple: int) -> int:
  return int(-(-n // multiple) * multiple)


def read_meta(path: str) -> dict | None:
  file = os.path.join(path, META)
  if not os.path.exists(file):
    return None
  with open(file) as f:
    return json.load(f)


def _batches_by_length(lengths: np.ndarray, batch_size: int):
  order = np.argsort(lengths, kind='stable')
  return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def write(path: str, ids: Sequence[Sequence[int]], teacher_fn: Callable, *, fields: Sequence[str],
          key: dict, batch_size: int = 64, pad_multiple: int = 8, pad_id: int = 0) -> dict:
  """Runs `teacher_fn(ids_BxT, mask_BxT) -> {field: array}` over every sentence once.

  `teacher_fn` returns token-level fields as [B, T, D], attentions as [B, H, T, T] and
  'embedding' as [B, D]. Sentences go through in length order, padded to `pad_multiple`.
  """
  lengths = np.asarray([len(x) for x in ids], np.int64)
  if len(lengths) == 0 or lengths.min() < 1:
    raise ValueError('every sentence needs at least one token; drop empty sentences first.')
  offsets = np.concatenate([[0], np.cumsum(lengths)])
  att_sizes = None
  tmp = f"{path.rstrip('/')}.tmp{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  out = {}
  for idx in _batches_by_length(lengths, batch_size):
    t = _round_up(lengths[idx].max(), pad_multiple)
    ids_BxT, mask_BxT = _pad([ids[i] for i in idx], t, batch_size, pad_id)
    feats = {k: np.asarray(v) for k, v in teacher_fn(ids_BxT, mask_BxT).items()}
    missing = sorted(set(fields) - set(feats))
    if missing:
      raise ValueError(f'the teacher function returned no {missing}; it returned '
                       f'{sorted(feats)}.')
    for name in fields:
      value = feats[name]
      if name == 'embedding':
        store = out.setdefault(name, np.zeros((len(ids), value.shape[-1]), np.float32))
        store[idx] = value[:len(idx)]
        continue
      if name.startswith('attention_'):
        heads = value.shape[1]
        if att_sizes is None:
          att_sizes = heads * lengths ** 2
          att_offsets = np.concatenate([[0], np.cumsum(att_sizes)])
        store = out.setdefault(name, np.zeros((att_offsets[-1],), FEATURE_DTYPE))
        for row, i in enumerate(idx):
          n = lengths[i]
          store[att_offsets[i]:att_offsets[i + 1]] = value[row, :, :n, :n].reshape(-1)
        continue
      store = out.setdefault(name, np.zeros((offsets[-1], value.shape[-1]), FEATURE_DTYPE))
      for row, i in enumerate(idx):
        store[offsets[i]:offsets[i + 1]] = value[row, :lengths[i]]
  np.save(os.path.join(tmp, 'ids.npy'), np.concatenate([np.asarray(x, np.int32) for x in ids]))
  np.save(os.path.join(tmp, 'offsets.npy'), offsets)
  if att_sizes is not None:
    np.save(os.path.join(tmp, 'attention_offsets.npy'), att_offsets)
  for name, value in out.items():
    np.save(os.path.join(tmp, f'{name}.npy'), value)
  meta = {'fields': list(fields), 'sentences': len(ids), 'tokens': int(offsets[-1]),
          'heads': None if att_sizes is None else int(att_sizes[0] // lengths[0] ** 2),
          'key': key}
  with open(os.path.join(tmp, META), 'w') as f:
    json.dump(meta, f, indent=1)
  shutil.rmtree(path, ignore_errors=True)  # only reached for a cache with another key
  os.replace(tmp, path)
  return meta


def get_or_write(path: str, ids, make_teacher_fn: Callable, *, fields, key: dict, **kw) -> str:
  """`path` holding a cache written for `key` and at least `fields`; written when it is not.

  A cache written for another key (another teacher, data or tokenizer setting) is rewritten,
  never reused: the key is compared as JSON. One that lacks some `fields` is rewritten with the
  fields it had plus those, so runs with different losses can share a cache.
  `make_teacher_fn(fields)` returns the `teacher_fn` of `write` for those fields. One process
  writes (kd.data.single_writer): runs sharing the cache wait for it instead of writing too.
  """
  key = json.loads(json.dumps(key))

  def to_write() -> list:  # the fields a cache must be written with, [] when it serves
    meta = read_meta(path)
    if meta is None or meta['key'] != key:
      return list(fields)
    if set(fields) - set(meta['fields']):
      return list(meta['fields']) + [f for f in fields if f not in meta['fields']]
    return []

  def write_it():
    union = to_write()
    write(path, ids, make_teacher_fn(union), fields=union, key=key, **kw)

  single_writer.once(path, lambda: not to_write(), write_it)
  return path


def _pad(rows, t: int, batch_size: int, pad_id: int):
  ids_BxT = np.full((batch_size, t), pad_id, np.int32)
  mask_BxT = np.zeros((batch_size, t), np.int32)
  for r, x in enumerate(rows):
    ids_BxT[r, :len(x)] = x
    mask_BxT[r, :len(x)] = 1
  return ids_BxT, mask_BxT


class Cache:
  """Memory-mapped read access to a cache directory."""

  def __init__(self, path: str, fields: Sequence[str] | None = None):
    self.meta = read_meta(path)
    if self.meta is None:
      raise FileNotFoundError(f'no sentence cache at {path} ({META} missing); it is written by '
                              'the sentence job (kd.train.sentence) on its first run.')
    self.fields = list(self.meta['fields'] if fields is None else fields)
    unknown = sorted(set(self.fields) - set(self.meta['fields']))
    if unknown:
      raise ValueError(f'the cache at {path} holds no {unknown}; it holds '
                       f'{self.meta["fields"]}. Remove it to rewrite it.')
    load = lambda name: np.load(os.path.join(path, f'{name}.npy'), mmap_mode='r')
    self.ids, self.offsets = load('ids'), np.asarray(load('offsets'))
    self.lengths = np.diff(self.offsets)
    self.arrays = {name: load(name) for name in self.fields}
    if any(f.startswith('attention_') for f in self.fields):
      self.att_offsets = np.asarray(load('attention_offsets'))

  def __len__(self):
    return len(self.lengths)

  def batch(self, idx: np.ndarray, t: int, batch_size: int, pad_id: int = 0) -> dict:
    """Rows `idx` padded to [batch_size, t] with their teacher features, as a train batch."""
    ids_BxT, mask_BxT = _pad([self.ids[self.offsets[i]:self.offsets[i + 1]] for i in idx], t,
                             batch_size, pad_id)
    batch = {'input_ids': ids_BxT, 'attention_mask': mask_BxT, 'loss_mask': mask_BxT}
    hidden, qkv, att = {}, {}, {}
    for name in self.fields:
      arr = self.arrays[name]
      if name == 'embedding':
        emb = np.zeros((batch_size, arr.shape[-1]), np.float32)
        emb[:len(idx)] = arr[idx]
        batch['teacher_embedding'] = emb
        continue
      kind, _, layer = name.rpartition('_')
      if kind == 'attention':
        h = self.meta['heads']
        out = np.zeros((batch_size, h, t, t), np.float32)
        for r, i in enumerate(idx):
          n = self.lengths[i]
          probs = arr[self.att_offsets[i]:self.att_offsets[i + 1]].reshape(h, n, n)
          # Rows renormalised after float16 storage, so a KL against them stays >= 0.
          probs = probs.astype(np.float32)
          out[r, :, :n, :n] = probs / probs.sum(-1, keepdims=True)
        att[layer] = out
        continue
      out = np.zeros((batch_size, t, arr.shape[-1]), FEATURE_DTYPE)
      for r, i in enumerate(idx):
        out[r, :self.lengths[i]] = arr[self.offsets[i]:self.offsets[i + 1]]
      if kind == 'hidden':
        hidden[layer] = out
      else:
        qkv.setdefault(layer, {})[kind] = out
    for key, value in (('teacher_hidden_states', hidden), ('teacher_qkv', qkv),
                       ('teacher_attentions', att)):
      if value:
        batch[key] = value
    return batch


class _BatchAt:
  """step -> this process's rows of the global batch of that step; a pure function of step."""

  def __init__(self, cache: Cache, batch_size: int, seed: int, sort_window: int,
               pad_multiple: int, shard_index: int, shard_count: int, pad_id: int):
    self.cache, self.batch_size, self.seed = cache, batch_size, seed
    self.sort_window, self.pad_multiple, self.pad_id = sort_window, pad_multiple, pad_id
    self.shard_index, self.shard_count = shard_index, shard_count
    self.steps_per_epoch = steps_per_epoch(cache, batch_size)

  @functools.lru_cache(maxsize=2)
  def _epoch(self, epoch: int) -> list[np.ndarray]:
    rng = np.random.default_rng([self.seed, epoch])
    order = rng.permutation(len(self.cache))
    window = self.batch_size * self.sort_window
    batches = []
    for start in range(0, len(order), window):
      chunk = order[start:start + window]
      chunk = chunk[np.argsort(self.cache.lengths[chunk], kind='stable')]
      batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]

  def __call__(self, step: int) -> dict:
    idx = self._epoch(int(step) // self.steps_per_epoch)[int(step) % self.steps_per_epoch]
    t = _round_up(self.cache.lengths[idx].max(), self.pad_multiple)
    rows = self.batch_size // self.shard_count
    mine = idx[self.shard_index * rows:(self.shard_index + 1) * rows]
    return self.cache.batch(mine, t, rows, self.pad_id)


def steps_per_epoch(cache: Cache, batch_size: int) -> int:
  return -(-len(cache) // batch_size)


def make_iterator(cache: Cache, *, batch_size: int, seed: int, steps: int, sort_window: int = 32,
                  pad_multiple: int = 8, shard_index: int = 0, shard_count: int = 1,
                  pad_id: int = 0):
  """A checkpointable grain iterator over `steps` batches (epochs follow each other)."""
  if batch_size % shard_count:
    raise ValueError(f'batch_size={batch_size} is not divisible by the {shard_count} '
                     'processes; make it a multiple.')
  fn = _BatchAt(cache, batch_size, seed, sort_window, pad_multiple, shard_index, shard_count,
                pad_id)
  return iter(grain.MapDataset.range(steps).map(fn).to_iter_dataset())


class _PairsAt:
  """step -> a batch of labelled pairs: rows [0, B) the first sentences, [B, 2B) the second."""

  def __init__(self, ids1, ids2, scores, batch_size: int, seed: int, pad_multiple: int,
               pad_id: int):
    self.ids1, self.ids2 = list(ids1), list(ids2)
    self.scores = np.asarray(scores, np.float32)
    self.batch_size, self.seed, self.pad_multiple, self.pad_id = (batch_size, seed, pad_multiple,
                                                                  pad_id)
    self.steps_per_epoch = -(-len(self.scores) // batch_size)

  @functools.lru_cache(maxsize=2)
  def _epoch(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(len(self.scores))

  def __call__(self, step: int) -> dict:
    start = (int(step) % self.steps_per_epoch) * self.batch_size
    idx = self._epoch(int(step) // self.steps_per_epoch)[start:start + self.batch_size]
    rows = [self.ids1[i] for i in idx] + [[]] * (self.batch_size - len(idx))
    rows += [self.ids2[i] for i in idx] + [[]] * (self.batch_size - len(idx))
    t = _round_up(max(len(r) for r in rows), self.pad_multiple)
    ids_BxT, mask_BxT = _pad(rows, t, 2 * self.batch_size, self.pad_id)
    scores, valid = np.zeros((self.batch_size,), np.float32), np.zeros((self.batch_size,), bool)
    scores[:len(idx)], valid[:len(idx)] = self.scores[idx], True
    return {'input_ids': ids_BxT, 'attention_mask': mask_BxT, 'loss_mask': mask_BxT,
            'pair_scores': scores, 'pair_mask': valid}


def make_pair_iterator(ids1, ids2, scores, *, batch_size: int, seed: int, steps: int,
                       pad_multiple: int = 8, pad_id: int = 0):
  """A checkpointable grain iterator over `steps` batches of labelled pairs (one process)."""
  fn = _PairsAt(ids1, ids2, scores, batch_size, seed, pad_multiple, pad_id)
  return iter(grain.MapDataset.range(steps).map(fn).to_iter_dataset())
