"""One run per workdir: kd.main holds `<workdir>/.kd.lock` (an flock) while it runs.

A second run on a workdir that a live run holds is refused at once, naming the holder's pid,
host and start time. The operating system drops the lock when its process dies, however it dies,
so a lock file left by a dead run is taken over, with a warning naming the run that left it.
Workdirs on object stores (`gs://...`) are not locked: flock needs a local or NFS file system.
"""

import dataclasses
import fcntl
import json
import os
import socket
import time
from typing import Any

from absl import logging

NAME = '.kd.lock'


class Held(RuntimeError):
  """The workdir belongs to a live run."""


@dataclasses.dataclass
class Lock:
  file: Any  # open: the lock lasts as long as the file stays open
  workdir: str
  made_workdir: bool  # the workdir did not exist before


def acquire(workdir: str) -> Lock | None:
  """Locks `workdir` for this process (None for a workdir that cannot be locked)."""
  if '://' in workdir:
    return None
  made = not os.path.isdir(workdir)
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, NAME)
  f = open(path, 'a+', encoding='utf-8')  # pylint: disable=consider-using-with
  try:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    holder = _read(f)
    f.close()
    raise Held(f'{workdir} is in use by the run of pid {holder.get("pid", "?")} on host '
               f'{holder.get("host", "?")} (started {holder.get("started", "?")}): wait for it to '
               'end, stop it, or give this run another --workdir') from None
  previous = _read(f)
  if previous:
    logging.warning('%s was left locked by pid %s on host %s (started %s), which is no longer '
                    'running; taking it over', workdir, previous.get('pid'), previous.get('host'),
                    previous.get('started'))
  f.seek(0)
  f.truncate()
  f.write(json.dumps({'pid': os.getpid(), 'host': socket.gethostname(),
                      'started': time.strftime('%Y-%m-%d %H:%M:%S')}))
  f.flush()
  return Lock(f, workdir, made)


def _read(f) -> dict:
  f.seek(0)
  try:
    return json.loads(f.read() or '{}')
  except json.JSONDecodeError:
    return {'pid': '?', 'host': '?', 'started': 'unknown: the lock file is not JSON'}


def release(lock: Lock | None) -> None:
  """Empties and closes the lock file: the next run finds a workdir that was left in order. A
  run that wrote nothing else (e.g. stopped by a config error) leaves nothing: the lock file
  goes, and the workdir too if the run made it."""
  if lock is None:
    return
  lock.file.seek(0)
  lock.file.truncate()
  lock.file.close()
  if os.listdir(lock.workdir) == [NAME]:
    os.remove(os.path.join(lock.workdir, NAME))
    if lock.made_workdir:
      os.rmdir(lock.workdir)
