"""Runs one experiment config.

  python -m kd.main --config=configs/shakespeare/distill.py[:arg] --workdir=DIR [--config.k=v ...]

A run resumes from its workdir; results land in DIR/results.md and DIR/results.json. On SIGTERM
or SIGINT it checkpoints the step in flight and exits with code 75 (kd.train.preemption): run
the same command again to resume.
"""

import errno
import importlib
import logging as std_logging
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from kd import xla_flags
from kd.train import compile_cache

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and results.')
flags.mark_flags_as_required(['config', 'workdir'])
_CACHE = compile_cache.define_flag()


class _QuietLibraries(std_logging.Filter):
  """Keeps the libraries' INFO chatter (orbax logs every save) out of the console."""

  def filter(self, record):
    if '/orbax/' not in record.pathname:
      return True
    # A background write that failed is raised again by the wait that follows, where
    # kd.train.checkpoint makes a full disk one line: orbax's own traceback of it is noise.
    return (record.levelno >= std_logging.WARNING
            and 'raised an exception' not in record.getMessage())


def _unknown_override(argv) -> str | None:
  """For an override flag that names no key of the config: what it names, and the keys that
  are there (the registry's losses, for config.losses.*)."""
  config_arg = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
  if config_arg is None:
    return None
  from kd import sweep  # pylint: disable=g-import-not-at-top
  module, arg = sweep.load(config_arg)
  config = module.get_config(arg)
  for a in argv:
    if not a.startswith('--config.'):
      continue
    path = a[len('--config.'):].split('=', 1)[0]
    node, walked = config, 'config'
    for part in path.split('.'):
      if not hasattr(node, 'keys') or part not in node:
        there = ', '.join(sorted(node.keys())) if hasattr(node, 'keys') else '(none: a value)'
        hint = ''
        if walked == 'config.losses':
          from kd import losses  # pylint: disable=g-import-not-at-top
          hint = (f'. A config file fixes its losses; name another there, or pick the objective '
                  f'with an :arg (e.g. :objective=jsd). Losses: {", ".join(sorted(losses.LOSSES))}')
        return f'{a}: {walked} has no key {part!r}; its keys: {there}{hint}'
      node, walked = node[part], f'{walked}.{part}'
  return None


def _parse_flags(argv):
  """absl's flag parsing, with a clear error for a --config.<key> the config does not have."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    message = _unknown_override(argv) or f'a --config override failed: {e}'
    print(f'kd.main: {message}', file=sys.stderr)
    sys.exit(2)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_QuietLibraries())
  xla_flags.apply()  # before a backend starts
  compile_cache.enable_flag(_CACHE)  # before anything compiles
  import jax  # pylint: disable=g-import-not-at-top
  from kd import parallel  # pylint: disable=g-import-not-at-top
  parallel.initialize(_CONFIG.value)  # before anything touches a device
  logging.info('devices: %s', jax.devices())
  from kd.train import JOBS  # pylint: disable=g-import-not-at-top
  from kd.train import checkpoint  # pylint: disable=g-import-not-at-top
  from kd.train import preemption  # pylint: disable=g-import-not-at-top
  from kd.train import workdir_lock  # pylint: disable=g-import-not-at-top
  from kd.data.local import DataError  # pylint: disable=g-import-not-at-top
  from kd.train.sections import ConfigError  # pylint: disable=g-import-not-at-top
  job = _CONFIG.value.get('job', 'lm')
  if job not in JOBS:
    raise app.UsageError(f'config.job={job!r} is unknown; use one of {sorted(JOBS)}.')
  lock = None
  if jax.process_index() == 0:  # one lock per run, however many processes it has
    try:
      lock = workdir_lock.acquire(_WORKDIR.value)
    except workdir_lock.Held as e:
      raise app.UsageError(str(e)) from None
    except OSError as e:
      sys.exit(f'kd.main: --workdir={_WORKDIR.value} cannot be made ({e.strerror}); give a '
               'folder this user can write in')
  preemption.install()
  try:
    importlib.import_module(JOBS[job]).main(_CONFIG.value, _WORKDIR.value)
  except preemption.Preempted as e:
    logging.warning('%s', e)
    sys.exit(preemption.EXIT_CODE)
  except (checkpoint.NoSpace, ConfigError, DataError) as e:  # the message says it all
    sys.exit(f'kd.main: {e}')
  except OSError as e:
    if e.errno != errno.ENOSPC:
      raise
    sys.exit(f'kd.main: no space left on the disk of {e.filename or _WORKDIR.value} ({e}); what '
             'was written before is intact: free some space and rerun the same command')
  finally:
    workdir_lock.release(lock)


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
