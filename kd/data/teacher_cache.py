"""An offline teacher: packed training rows with the teacher's top-k logits, in ArrayRecord.

Each record is one packed row (the pipeline's `input_ids`, `labels`, `loss_mask`,
`segment_ids`, `positions`, all [T]) plus `topk_ids` [T, k] int32, `topk_logits` [T, k] and
`lse` [T] (the teacher's logsumexp over the whole vocabulary at the cache temperature), encoded
with msgpack. `meta.json` beside the shards says k, the temperature, the vocabulary size and the
number of rows. Reading goes through grain (`ArrayRecordDataSource`), so shuffling, sharding
across hosts and checkpointing the position work as for the text pipeline.
"""

import json
import os
import shutil

import grain
import numpy as np
from array_record.python import array_record_module
from flax import serialization

META = 'meta.json'
TEACHER_FIELDS = ('topk_ids', 'topk_logits', 'lse')


def write(rows, path: str, *, k: int, temperature: float, vocab_size: int,
          rows_per_shard: int = 4096) -> int:
  """Writes an iterable of row dicts (numpy arrays) to `path`; returns the number of rows.

  Writes into a temp directory and renames it at the end, so a killed writer leaves no half
  cache.
  """
  return write_records(rows, path, {'k': k, 'temperature': temperature,
                                    'vocab_size': vocab_size}, rows_per_shard=rows_per_shard)


def write_records(rows, path: str, meta: dict, *, rows_per_shard: int = 4096) -> int:
  """Row dicts of numpy arrays -> msgpack records in ArrayRecord shards at `path`, with
  `meta` (plus the row count) in meta.json; atomic like `write`. Returns the row count.

  Each writer fills its own `<path>.tmp<pid>`, so concurrent writers of one path never mix
  shards: the first rename wins and the others get FileExistsError (their copy is removed).
  """
  tmp = f"{path.rstrip('/')}.tmp{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a killed writer with this pid
  os.makedirs(tmp)
  n, shard, writer = 0, 0, None
  for row in rows:
    if writer is None or n % rows_per_shard == 0:
      if writer is not None:
        writer.close()
      writer = array_record_module.ArrayRecordWriter(
          os.path.join(tmp, f'rows-{shard:05d}.array_record'), 'group_size:1')
      shard += 1
    writer.write(serialization.msgpack_serialize({k_: np.asarray(v) for k_, v in row.items()}))
    n += 1
  if writer is not None:
    writer.close()
  with open(os.path.join(tmp, META), 'w') as f:
    json.dump({**meta, 'rows': n}, f)
  try:
    os.replace(tmp, path)  # fails if the cache (e.g. another writer's) is already there
  except OSError:
    shutil.rmtree(tmp, ignore_errors=True)
    if os.path.exists(path):
      raise FileExistsError(f'{path} exists; remove it to rewrite the cache') from None
    raise
  return n


def read_meta(path: str) -> dict:
  file = os.path.join(path, META)
  if not os.path.exists(file):
    raise FileNotFoundError(f'no teacher cache at {path} ({META} missing); write one with '
                            '`python -m kd.cache_teacher --config=... --workdir=...`')
  with open(file) as f:
    return json.load(f)


def _decode(record: bytes) -> dict:
  return serialization.msgpack_restore(record)


def _source(path: str):
  read_meta(path)
  files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith('.array_record'))
  return grain.sources.ArrayRecordDataSource(files)


def read_records(path: str) -> list[dict]:
  """Every record at `path` (written by write_records), in order."""
  source = _source(path)
  return [_decode(source[i]) for i in range(len(source))]


def make_dataset(path: str, *, batch_size: int, seed: int, shuffle: bool = True,
                 repeat: bool = True, shard_index: int = 0, shard_count: int = 1):
  """Batches of cached rows (the text pipeline's fields plus TEACHER_FIELDS)."""
  ds = grain.MapDataset.source(_source(path))
  ds = ds[shard_index::shard_count]
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if repeat:
    ds = ds.repeat(None)
  return ds.map(_decode).to_iter_dataset(grain.ReadOptions(num_threads=0)).batch(
      batch_size, drop_remainder=True)


def make_iterator(path: str, **kwargs):
  return iter(make_dataset(path, **kwargs))
