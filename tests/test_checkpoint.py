"""A damaged newest checkpoint: the run restores the newest intact one, sets the damaged one
aside unchanged, and can write its step again; with none intact it stops, changing nothing."""

import hashlib
import os
import pathlib

import grain
import jax.numpy as jnp
import numpy as np
import pytest

from kd.train import checkpoint

# Each kind of file of a step (state and data iterator), and a kind of damage to it.
DAMAGE = {
    'truncated array data': ('state/**/d/*', 'truncate'),
    'missing array data': ('state/**/d/*', 'delete'),
    'half-written array metadata': ('state/_METADATA', 'truncate'),
    'truncated sharding file': ('state/_sharding', 'truncate'),
    'missing manifest': ('state/manifest.ocdbt', 'delete'),
    'half-written data iterator': ('data/*', 'truncate'),
}


def _iterator():
  return iter(grain.MapDataset.range(1000).to_iter_dataset())


def _state(step):
  return {'w': jnp.full((4, 8), float(step)), 'step': jnp.int32(step)}


def _write(directory, steps=(1, 2, 3)):
  """Checkpoints of `steps`; the iterator has yielded `step` items at step `step`."""
  mngr = checkpoint.manager(str(directory), max_to_keep=len(steps))
  it = _iterator()
  for s in steps:
    while next(it) < s - 1:
      pass
    checkpoint.save(mngr, s, _state(s), it)
  mngr.wait_until_finished()
  mngr.close()


def _damage(step_dir: pathlib.Path, pattern: str, how: str):
  files = sorted(p for p in step_dir.glob(pattern) if p.is_file())
  assert files, f'no {pattern} in {step_dir}: {sorted(step_dir.rglob("*"))}'
  for f in files:
    if how == 'delete':
      f.unlink()
    else:
      data = f.read_bytes()
      f.write_bytes(data[:len(data) // 2])


def _digest(directory: pathlib.Path) -> str:
  h = hashlib.sha256()
  for p in sorted(directory.rglob('*')):
    h.update(str(p.relative_to(directory)).encode())
    if p.is_file():
      h.update(p.read_bytes())
  return h.hexdigest()


@pytest.mark.parametrize('kind', list(DAMAGE))
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path, kind):
  directory = tmp_path / 'checkpoints'
  _write(directory)
  _damage(directory / '3', *DAMAGE[kind])
  before = _digest(directory / '3')
  mngr = checkpoint.manager(str(directory), max_to_keep=3)
  it = _iterator()
  restored = checkpoint.restore_latest(mngr, _state(0), it)
  assert int(restored['step']) == 2
  np.testing.assert_array_equal(restored['w'], np.full((4, 8), 2.0))
  assert next(it) == 2  # the iterator resumes where step 2 left it
  aside = tmp_path / 'checkpoints.damaged' / '3'
  assert _digest(aside) == before  # moved, not changed
  assert not (directory / '3').exists()
  checkpoint.save(mngr, 3, _state(3), it)  # the step can be written again
  mngr.wait_until_finished()
  assert int(checkpoint.restore_latest(mngr, _state(0), _iterator())['step']) == 3
  mngr.close()


def test_half_written_step_metadata_alone_loses_nothing(tmp_path):
  """_CHECKPOINT_METADATA (timestamps, handler names) is not needed to read the items: orbax
  logs the parse error and step 3 restores whole."""
  directory = tmp_path / 'checkpoints'
  _write(directory)
  _damage(directory / '3', '_CHECKPOINT_METADATA', 'truncate')
  mngr = checkpoint.manager(str(directory), max_to_keep=3)
  restored = checkpoint.restore_latest(mngr, _state(0), _iterator())
  mngr.close()
  assert int(restored['step']) == 3
  np.testing.assert_array_equal(restored['w'], np.full((4, 8), 3.0))


def test_with_no_intact_checkpoint_it_stops_naming_the_directory_and_changes_nothing(tmp_path):
  directory = tmp_path / 'checkpoints'
  _write(directory, steps=(1, 2))
  for step in ('1', '2'):
    _damage(directory / step, 'state/_sharding', 'truncate')
  before = _digest(tmp_path)
  mngr = checkpoint.manager(str(directory), max_to_keep=2)
  with pytest.raises(checkpoint.Unreadable, match=f'no checkpoint in {directory}.*step 2.*step 1'):
    checkpoint.restore_latest(mngr, _state(0), _iterator())
  mngr.close()
  assert _digest(tmp_path) == before
  assert not os.path.exists(f'{directory}.damaged')


def test_an_empty_directory_restores_nothing(tmp_path):
  mngr = checkpoint.manager(str(tmp_path / 'checkpoints'))
  state = _state(0)
  assert checkpoint.restore_latest(mngr, state) is state
  mngr.close()
