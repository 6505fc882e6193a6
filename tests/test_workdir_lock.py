"""One run per workdir: a live holder refuses a second run, naming itself; a dead one's lock is
taken over with a warning; kd.main refuses a held workdir before writing anything."""

import json
import logging
import os
import pathlib
import socket
import subprocess
import sys

import pytest

from kd.train import workdir_lock

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = 'configs/shakespeare/distill.py:tiny'


def test_a_live_holder_refuses_a_second_run_and_a_released_lock_is_free(tmp_path, caplog):
  first = workdir_lock.acquire(str(tmp_path))
  (tmp_path / 'results.json').write_text('{}')  # a run's output: the lock file stays beside it
  with pytest.raises(workdir_lock.Held, match=f'pid {os.getpid()} on host {socket.gethostname()}'):
    workdir_lock.acquire(str(tmp_path))  # a second open file description: flock refuses it
  workdir_lock.release(first)
  with caplog.at_level(logging.WARNING):
    again = workdir_lock.acquire(str(tmp_path))
  assert 'taking it over' not in caplog.text  # released in order: nothing to warn about
  workdir_lock.release(again)


def test_a_run_that_wrote_nothing_leaves_nothing(tmp_path):
  workdir_lock.release(workdir_lock.acquire(str(tmp_path / 'new')))
  assert not (tmp_path / 'new').exists()
  workdir_lock.release(workdir_lock.acquire(str(tmp_path)))  # a workdir it did not make stays
  assert tmp_path.is_dir() and not list(tmp_path.iterdir())


def test_the_lock_of_a_dead_run_is_taken_over_with_a_warning(tmp_path, caplog):
  # What a killed run leaves: the file with its holder, and no flock (the OS dropped it).
  (tmp_path / workdir_lock.NAME).write_text(json.dumps(
      {'pid': 4242, 'host': 'gone-host', 'started': '2026-01-01 00:00:00'}))
  with caplog.at_level(logging.WARNING):
    lock = workdir_lock.acquire(str(tmp_path))
  assert 'pid 4242 on host gone-host' in caplog.text and 'taking it over' in caplog.text
  holder = json.loads((tmp_path / workdir_lock.NAME).read_text())
  assert holder['pid'] == os.getpid()
  lock.file.close()


def test_kd_main_refuses_a_held_workdir_before_writing_anything(tmp_path):
  lock = workdir_lock.acquire(str(tmp_path))
  out = subprocess.run([sys.executable, '-m', 'kd.main', f'--config={TINY}',
                        f'--workdir={tmp_path}'], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode != 0
  assert f'is in use by the run of pid {os.getpid()}' in out.stderr, out.stderr[-2000:]
  assert sorted(p.name for p in tmp_path.iterdir()) == [workdir_lock.NAME]  # only the holder's
  workdir_lock.release(lock)


def test_object_store_workdirs_are_not_locked():
  assert workdir_lock.acquire('gs://bucket/run') is None
