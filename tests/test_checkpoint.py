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


# ------------------------------------------------------------------------------- a full disk


@pytest.fixture
def small_disk(tmp_path):
  """A 2 MiB tmpfs (needs the right to mount, as root in CI); yields (dir, grow()) where grow()
  makes it 64 MiB, as an operator freeing space would."""
  import subprocess  # pylint: disable=g-import-not-at-top
  mount = tmp_path / 'disk'
  mount.mkdir()
  if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=2m', 'tmpfs', str(mount)],
                    capture_output=True).returncode:
    pytest.skip('cannot mount a tmpfs here (not root)')
  grow = lambda: subprocess.run(['mount', '-o', 'remount,size=64m', str(mount)], check=True)
  try:
    yield mount, grow
  finally:
    subprocess.run(['umount', '-l', str(mount)], check=False)


def _big_state(step):
  """4 MiB of float32 noise (incompressible: zstd would shrink a constant array to bytes)."""
  noise = np.random.default_rng(step).normal(size=(1024, 1024)).astype(np.float32)
  return {'w': jnp.asarray(noise), 'step': jnp.int32(step)}


def test_a_full_disk_stops_the_save_naming_the_directory_and_the_bytes_then_resumes(small_disk):
  disk, grow = small_disk
  directory = disk / 'checkpoints'
  mngr = checkpoint.manager(str(directory))
  checkpoint.save(mngr, 1, _state(1))
  checkpoint.wait(mngr)
  before = _digest(directory / '1')
  with pytest.raises(checkpoint.NoSpace) as e:
    checkpoint.save(mngr, 2, _big_state(2))
    checkpoint.wait(mngr)
  message = str(e.value)
  assert str(directory) in message and 'checkpoint step 2' in message
  assert 'needs about 4.00 MiB' in message and 'MiB are free' in message
  assert 'resumes from step 1' in message
  mngr.close()
  assert _digest(directory / '1') == before  # the step before is untouched and restores
  mngr = checkpoint.manager(str(directory))
  assert int(checkpoint.restore_latest(mngr, _state(0))['step']) == 1
  grow()  # space again: the same step is written, and it is the newest
  checkpoint.save(mngr, 2, _big_state(2))
  checkpoint.wait(mngr)
  restored = checkpoint.restore_latest(mngr, _big_state(0))
  mngr.close()
  assert int(restored['step']) == 2
  np.testing.assert_array_equal(restored['w'], _big_state(2)['w'])


@pytest.mark.parametrize('error', [
    OSError(28, 'No space left on device'),
    ValueError('RESOURCE_EXHAUSTED: Error writing "w/0": Failed to write 2713986 bytes to file '
               "4: No space left on device [os_error_code='28']"),  # tensorstore's, as measured
])
def test_a_full_disk_in_the_background_write_is_a_no_space_error(tmp_path, monkeypatch, error):
  """The same error when the write that fails is the asynchronous one (a patched writer)."""
  mngr = checkpoint.manager(str(tmp_path / 'checkpoints'))

  def fail():
    raise RuntimeError('the write thread failed') from error
  checkpoint.save(mngr, 7, _state(7))
  monkeypatch.setattr(mngr, 'wait_until_finished', fail)
  with pytest.raises(checkpoint.NoSpace, match=r'checkpoint step 7: it needs about 0\.00 MiB'):
    checkpoint.wait(mngr)
  monkeypatch.undo()
  mngr.wait_until_finished()
  mngr.close()


def test_other_write_errors_pass_through_unchanged(tmp_path, monkeypatch):
  mngr = checkpoint.manager(str(tmp_path / 'checkpoints'))
  monkeypatch.setattr(mngr, 'wait_until_finished', lambda: (_ for _ in ()).throw(
      PermissionError(13, 'Permission denied')))
  with pytest.raises(PermissionError):
    checkpoint.wait(mngr)
  monkeypatch.undo()
  mngr.close()


def test_kd_main_on_a_full_disk_stops_with_one_clear_error_and_resumes_once_there_is_room(
    small_disk):
  """The probe of a workdir on a 1.2 MB disk: one line naming the directory, no traceback from
  orbax's threads, the checkpoints before intact; with room again the same command finishes."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  disk, grow = small_disk
  subprocess.run(['mount', '-o', 'remount,size=1200k', str(disk)], check=True)
  root = pathlib.Path(__file__).resolve().parents[1]
  cmd = [sys.executable, '-m', 'kd.main', '--config=configs/shakespeare/distill.py:tiny',
         f'--workdir={disk / "w"}', '--config.train.steps=4', '--config.train.checkpoint_every=2']
  proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 1, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('kd.main: no space left on the disk of ' + str(disk / 'w')), last
  assert 'MiB are free' in last and 'rerun the same command' in last
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  grow()
  proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (disk / 'w' / 'results.json').exists()


def test_a_full_disk_leaves_the_results_written_before_intact(small_disk):
  """results.json and results.md go through a temporary file and a rename: a write that finds
  the disk full raises ENOSPC and leaves the earlier files byte for byte, and no temporary."""
  import errno  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  from kd.eval import report  # pylint: disable=g-import-not-at-top
  disk, _ = small_disk
  report.write_results(str(disk), {'student': {'ce': 1.0}}, '| student | 1.0 |')
  before = {n: (disk / n).read_bytes() for n in ('results.json', 'results.md')}
  with pytest.raises(OSError) as full, open(disk / 'filler', 'wb') as f:
    while True:  # the disk fills, as another job's files would
      f.write(np.random.default_rng(0).bytes(1 << 16))
      f.flush()
  assert full.value.errno == errno.ENOSPC
  with pytest.raises(OSError) as e:
    report.write_results(str(disk), {'student': {'ce': 2.0, 'notes': 'x' * 100_000}}, '| s |')
  assert e.value.errno == errno.ENOSPC
  assert {n: (disk / n).read_bytes() for n in before} == before
  assert sorted(os.listdir(disk)) == ['filler', 'results.json', 'results.md']
