"""One writer for a cache that several runs, or several processes of one run, want at once.

`once(path, done, write)` calls `write()` unless `done()`, holding an flock on `<path>.lock`
while it looks and writes. A second run that wants the same cache (a sweep's points sharing
`teacher.cache_dir`, say) waits on the lock and then finds the cache done, so the teacher runs
once. In a run of several processes only process 0 looks and writes; the others wait for it at a
barrier, and then every process reads the finished cache. The operating system drops an flock
when its holder dies, so a killed writer never blocks the next run; writers write beside the
cache and rename, so a killed one leaves no half cache.
"""

import contextlib
import fcntl
import os
import time
from typing import Callable

import jax
from absl import logging
from jax.experimental import multihost_utils


@contextlib.contextmanager
def lock(path: str):
  """Holds an exclusive flock on the hidden file `.<name>.lock` beside `path`, waiting (and
  saying so) while another process holds it."""
  folder, name = os.path.split(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, f'.{name}.lock'), 'a+', encoding='utf-8') as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      logging.warning('waiting for %s, which %s is writing', path, f.read().strip() or 'a process')
      t0 = time.perf_counter()
      fcntl.flock(f, fcntl.LOCK_EX)
      logging.info('waited %.1f s for %s', time.perf_counter() - t0, path)
    f.seek(0)
    f.truncate()
    f.write(f'pid {os.getpid()}')
    f.flush()
    try:
      yield
    finally:
      f.seek(0)
      f.truncate()
      fcntl.flock(f, fcntl.LOCK_UN)


def once(path: str, done: Callable[[], bool], write: Callable[[], object]) -> None:
  """Makes sure `path` is written: `write()` runs (on process 0, under `lock(path)`) unless
  `done()`; every process returns once it is."""
  if jax.process_index() == 0:
    with lock(path):
      if not done():
        write()
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f'kd.single_writer {path}')
