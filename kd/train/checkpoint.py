"""Orbax checkpoints of the student's train state and the data iterator's position.

Orbax writes each step into a temporary directory and renames it when complete, so a run killed
at any moment leaves either the old or the new checkpoint, never half of one. The teacher is
never saved here: it is an input of the run, not its state.

Multi-host: the state's arrays are global (one logical array split over processes), so every
process writes and reads only its own shards, and a restore gives arrays with the shardings of
the `state` it restores into. The data iterator's position is one file per process
(`data/process_<i>-of-<n>.json`), since every process reads its own documents.
"""

import contextlib
import dataclasses
import errno
import os
import shutil

from absl import logging
import grain
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp


def manager(directory: str, *, max_to_keep: int = 2) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      directory,
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           cleanup_tmp_directories=True),
      item_handlers={'state': ocp.StandardCheckpointHandler(),
                     'data': grain.checkpoint.CheckpointHandler()})


class NoSpace(RuntimeError):
  """A checkpoint could not be written for want of disk space; the earlier ones are intact."""


_MARGIN = 1 << 20  # bytes free beyond the state's (and a tenth of it) before a save starts
# The save in flight per manager, (step, bytes), for the error of a write that fails later.
_IN_FLIGHT: dict[int, tuple[int, int]] = {}


def _no_space(e: BaseException) -> bool:
  """Whether an error, or one it was raised from, is a full disk or quota (tensorstore reports
  it as a ValueError that quotes the OS error)."""
  seen, stack = set(), [e]
  while stack:
    x = stack.pop()
    if x is None or id(x) in seen:
      continue
    seen.add(id(x))
    if isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    if any(m in str(x) for m in ('No space left on device', 'Disk quota exceeded')):
      return True
    stack += [x.__cause__, x.__context__, *getattr(x, 'exceptions', ())]
  return False


@contextlib.contextmanager
def _space_checked(mngr: ocp.CheckpointManager):
  """Turns a full disk under `mngr`'s writes into NoSpace: the directory, the bytes the step
  needs, the bytes free, and the step a rerun resumes from."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except
    if not _no_space(e):
      raise
    directory = str(mngr.directory)
    step, need = _IN_FLIGHT.pop(id(mngr), (None, 0))
    try:
      free = f'{shutil.disk_usage(directory).free / 2**20:.2f} MiB are free'
    except OSError:
      free = 'the free space is unknown'
    kept = [s for s in mngr.all_steps() if s != step]
    raise NoSpace(f'no space left on the disk of {directory} to write checkpoint step {step}: '
                  f'it needs about {need / 2**20:.2f} MiB and {free}. The checkpoints before '
                  f'it are intact; free some space and rerun the same command, which resumes '
                  f'from step {max(kept) if kept else 0}.') from None


def save(mngr: ocp.CheckpointManager, step: int, state, data_iter=None) -> None:
  """Starts writing `state` (and the data position) as `step`; `wait` for it to end.

  The write before it is waited for first (orbax would), so that its error is its own. A disk
  without room for the state's bytes raises NoSpace before anything is written; one that fills
  up during the write raises it here or from `wait`."""
  wait(mngr)
  items = {'state': ocp.args.StandardSave(state)}
  if data_iter is not None:
    items['data'] = grain.checkpoint.CheckpointSave(data_iter)
  need = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state) if hasattr(x, 'dtype'))
  _IN_FLIGHT[id(mngr)] = (step, need)
  with _space_checked(mngr):
    try:
      free = shutil.disk_usage(str(mngr.directory)).free
    except OSError:
      free = need
    if free < need + _MARGIN + need // 10:  # metadata and temporary files come on top
      raise OSError(errno.ENOSPC, f'{free} bytes free, {need} needed')
    mngr.save(step, args=ocp.args.Composite(**items))


def wait(mngr: ocp.CheckpointManager) -> None:
  """Waits for the writes in flight; a full disk raises NoSpace."""
  with _space_checked(mngr):
    mngr.wait_until_finished()
  _IN_FLIGHT.pop(id(mngr), None)


class Mismatch(ValueError):
  """A checkpoint this run's settings cannot resume from (not a damaged one)."""


class Unreadable(RuntimeError):
  """Checkpoints exist, and none of them can be read."""


def restore_latest(mngr: ocp.CheckpointManager, state, data_iter=None):
  """Restores the newest intact checkpoint into the structure of `state` (and `data_iter` in
  place).

  Returns the restored state, or `state` unchanged when the directory holds no checkpoint. A
  dataclass state (TrainState) restores field by field, so a checkpoint written before a field
  was added (e.g. `ema`) still restores when this run leaves that field None.

  A checkpoint that cannot be read (a truncated or missing file, half-written metadata) is
  skipped with a warning naming its step, and the one before it is tried. Once one restores, the
  damaged newer ones are moved, unchanged, to `<directory>.damaged/`, so that their steps can be
  written again. When none can be read nothing is moved, and `Unreadable` names the directory.
  """
  mngr.reload()
  steps = sorted(mngr.all_steps(), reverse=True)
  failed = []
  for step in steps:
    try:
      restored = _restore(mngr, step, state, data_iter)
    except Mismatch:
      raise
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('the checkpoint of step %d in %s cannot be read (%s: %s); trying the one '
                      'before it', step, mngr.directory, type(e).__name__, str(e)[:300])
      failed.append((step, f'{type(e).__name__}: {str(e)[:300]}'))
      continue
    if failed:
      _set_aside(mngr, [s for s, _ in failed])
    return restored
  if failed:
    reasons = '; '.join(f'step {s}: {r}' for s, r in failed)
    raise Unreadable(
        f'no checkpoint in {mngr.directory} can be read ({reasons}). Nothing was changed there. '
        'Restore the files, move the directory away to start over, or resume with the settings '
        'that wrote them.')
  return state


def _restore(mngr, step: int, state, data_iter):
  target = state
  _check_layer_layout(mngr.item_metadata(step)['state'], state, step, mngr.directory)
  if dataclasses.is_dataclass(state):
    saved = set(mngr.item_metadata(step)['state'].keys())
    fields = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
    missing = sorted(k for k, v in fields.items() if k not in saved and v is not None)
    if missing:
      raise Mismatch(
          f'the checkpoint at step {step} in {mngr.directory} has no {missing}, which this run '
          'trains (a run that changed its method midway?). Resume with the settings it was '
          'started with, or start in a fresh --workdir.')
    target = {k: v for k, v in fields.items() if k in saved}
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  items = {'state': ocp.args.StandardRestore(abstract)}
  if data_iter is not None:
    items['data'] = grain.checkpoint.CheckpointRestore(data_iter)
  restored = mngr.restore(step, args=ocp.args.Composite(**items))['state']
  return dataclasses.replace(state, **restored) if target is not state else restored


def _set_aside(mngr, steps) -> None:
  """Moves the directories of `steps` to <directory>.damaged/<step>[-n] (process 0 only)."""
  if jax.process_index() == 0:
    directory = os.fspath(mngr.directory)
    aside = f'{directory}.damaged'
    os.makedirs(aside, exist_ok=True)
    for step in steps:
      dest, n = os.path.join(aside, str(step)), 0
      while os.path.exists(dest):
        n += 1
        dest = os.path.join(aside, f'{step}-{n}')
      os.replace(os.path.join(directory, str(step)), dest)
      logging.warning('moved the unreadable checkpoint of step %d to %s', step, dest)
  multihost_sync('kd_set_aside_damaged')
  mngr.reload()


def multihost_sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _layer_layout(tree) -> set:
  """'stacked' and/or 'per layer': how the decoders in `tree` hold their layers."""
  names = {str(getattr(k, 'key', getattr(k, 'name', k)))
           for path, _ in jax.tree_util.tree_leaves_with_path(tree) for k in path}
  return ({'stacked'} if 'layers' in names else set()) | (
      {'per layer'} if 'layers_0' in names else set())


def _check_layer_layout(saved, state, step: int, directory) -> None:
  """A clear error for a checkpoint whose decoder layers are laid out otherwise than the run's
  (DecoderConfig.scan_layers changed between the run that wrote it and this one)."""
  have, want = _layer_layout(saved), _layer_layout(state)
  if have and want and have != want:
    raise Mismatch(
        f'the checkpoint at step {step} in {directory} holds its layers {" and ".join(have)}, '
        f'but this run\'s model holds them {" and ".join(want)}: scan_layers differs from the run '
        'that wrote it. Resume with the scan_layers it was started with, or start in a fresh '
        "--workdir (config.student_init.source='run' converts a finished student).")


def save_host_state(path: str, tree: dict) -> None:
  """A nested dict of numpy arrays and Python scalars (e.g. a replay buffer) as one .npz,
  written atomically (a reader sees the old file or the new one)."""
  flat = {}

  def walk(prefix, node):
    if isinstance(node, dict):
      if not node:
        flat[prefix + '/{}'] = np.zeros(0)
      for k, v in node.items():
        walk(f'{prefix}/{k}', v)
    else:
      flat[prefix] = np.asarray(node)
  walk('', tree)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f'{path}.tmp{os.getpid()}.npz'
  np.savez(tmp, **flat)
  os.replace(tmp, path)


def load_host_state(path: str) -> dict:
  """The inverse of `save_host_state` (0-d arrays come back as Python scalars)."""
  out = {}
  with np.load(path) as f:
    for key in f.files:
      *parents, leaf = key.strip('/').split('/')
      node = out
      for p in parents:
        node = node.setdefault(p, {})
      if leaf != '{}':
        value = f[key]
        node[leaf] = value.item() if value.ndim == 0 else value
  return out
