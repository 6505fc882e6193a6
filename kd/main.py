"""Runs one experiment config.

  python -m kd.main --config=configs/shakespeare/distill.py[:arg] --workdir=DIR [--config.k=v ...]

A run resumes from its workdir; results land in DIR/results.md and DIR/results.json.
"""

import importlib
import logging as std_logging

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from kd.train import compile_cache

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and results.')
flags.mark_flags_as_required(['config', 'workdir'])
_CACHE = compile_cache.define_flag()


class _QuietLibraries(std_logging.Filter):
  """Keeps the libraries' INFO chatter (orbax logs every save) out of the console."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or '/orbax/' not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_QuietLibraries())
  compile_cache.enable_flag(_CACHE)  # before anything compiles
  import jax  # pylint: disable=g-import-not-at-top
  from kd import parallel  # pylint: disable=g-import-not-at-top
  parallel.initialize(_CONFIG.value)  # before anything touches a device
  logging.info('devices: %s', jax.devices())
  from kd.train import JOBS  # pylint: disable=g-import-not-at-top
  job = _CONFIG.value.get('job', 'lm')
  if job not in JOBS:
    raise app.UsageError(f'config.job={job!r} is unknown; use one of {sorted(JOBS)}.')
  importlib.import_module(JOBS[job]).main(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
