"""The offline-teacher cache: rows round-trip exactly, writes are atomic, reading is resumable."""

import os

import numpy as np
import pytest

from kd.data import teacher_cache


def _rows(n, t=6, k=3, seed=0):
  rng = np.random.default_rng(seed)
  for _ in range(n):
    yield {'input_ids': rng.integers(0, 50, t).astype(np.int32),
           'loss_mask': (rng.random(t) > 0.3).astype(np.float32),
           'topk_ids': rng.integers(0, 50, (t, k)).astype(np.int32),
           'topk_logits': rng.normal(size=(t, k)).astype(np.float32),
           'lse': rng.normal(size=t).astype(np.float32)}


def test_round_trip_and_resume(tmp_path):
  path = str(tmp_path / 'cache')
  assert teacher_cache.write(_rows(10), path, k=3, temperature=2.0, vocab_size=50,
                             rows_per_shard=4) == 10
  assert teacher_cache.read_meta(path) == {'k': 3, 'temperature': 2.0, 'vocab_size': 50, 'rows': 10}
  batches = list(teacher_cache.make_dataset(path, batch_size=5, seed=0, shuffle=False,
                                            repeat=False))
  want = list(_rows(10))
  assert len(batches) == 2
  for name in want[0]:
    got = np.concatenate([b[name] for b in batches])
    np.testing.assert_array_equal(got, np.stack([r[name] for r in want]))
    assert got.dtype == want[0][name].dtype

  it = teacher_cache.make_iterator(path, batch_size=2, seed=1)
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it)['lse'] for _ in range(4)]
  fresh = teacher_cache.make_iterator(path, batch_size=2, seed=1)
  fresh.set_state(state)
  for e in expected:
    np.testing.assert_array_equal(next(fresh)['lse'], e)


def test_existing_cache_is_not_overwritten_and_missing_is_explained(tmp_path):
  path = str(tmp_path / 'cache')
  teacher_cache.write(_rows(2), path, k=3, temperature=1.0, vocab_size=50)
  with pytest.raises(FileExistsError, match='remove it to rewrite'):
    teacher_cache.write(_rows(2), path, k=3, temperature=1.0, vocab_size=50)
  with pytest.raises(FileNotFoundError, match='python -m kd.cache_teacher'):
    teacher_cache.read_meta(str(tmp_path / 'nothing'))


def test_concurrent_writers_first_rename_wins_and_no_temp_is_left(tmp_path, monkeypatch):
  path = str(tmp_path / 'cache')
  real_getpid = os.getpid

  def rows_while_another_writer_finishes():
    rows = list(_rows(3))
    yield rows[0]
    # Another process (another pid, so its own temp dir) writes the same path meanwhile.
    monkeypatch.setattr(os, 'getpid', lambda: real_getpid() + 1)
    teacher_cache.write_records(_rows(2), path, {'who': 'other'})
    monkeypatch.setattr(os, 'getpid', real_getpid)
    yield from rows[1:]

  with pytest.raises(FileExistsError, match='remove it to rewrite'):
    teacher_cache.write_records(rows_while_another_writer_finishes(), path, {'who': 'me'})
  assert teacher_cache.read_meta(path) == {'who': 'other', 'rows': 2}
  assert len(teacher_cache.read_records(path)) == 2
  assert sorted(os.listdir(tmp_path)) == ['cache']  # neither temp directory is left
