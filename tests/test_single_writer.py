"""A cache wanted by two runs at once is written by one of them and read by both
(kd.data.single_writer); a writer killed while it holds the lock blocks nobody."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A run that wants the sentence cache at argv[1]: its "teacher" is slow and logs each call.
_RUN = textwrap.dedent('''
    import os, sys, time
    import numpy as np
    from kd.data import sentence_cache
    path, log = sys.argv[1], sys.argv[2]
    ids = [[1 + i % 7] * (1 + i % 5) for i in range(12)]
    def make_teacher_fn(fields):
      def fn(ids_BxT, mask_BxT):
        with open(log, 'a') as f:
          f.write(f'{os.getpid()}\\n')
        time.sleep(0.3)
        return {'embedding': np.stack([ids_BxT.sum(1), mask_BxT.sum(1)], -1).astype(np.float32)}
      return fn
    sentence_cache.get_or_write(path, ids, make_teacher_fn, fields=['embedding'], key={'k': 1},
                                batch_size=4)
    emb = sentence_cache.Cache(path, ['embedding']).arrays['embedding']
    print('EMB', list(map(float, emb.reshape(-1))))
''')

# Holds the lock of argv[1] until killed.
_HOLD = textwrap.dedent('''
    import sys, time
    from kd.data import single_writer
    with single_writer.lock(sys.argv[1]):
      print('held', flush=True)
      time.sleep(600)
''')


def _python(code, *args, stderr=subprocess.PIPE):
  return subprocess.Popen([sys.executable, '-c', code, *args], cwd=ROOT, text=True,
                          stdout=subprocess.PIPE, stderr=stderr,
                          env={**os.environ, 'JAX_PLATFORMS': 'cpu'})


def test_two_runs_wanting_one_cache_run_the_teacher_once_and_read_the_same(tmp_path):
  path, log = str(tmp_path / 'cache'), str(tmp_path / 'calls')
  runs = [_python(_RUN, path, log) for _ in range(2)]
  outs = [r.communicate(timeout=120) for r in runs]
  for r, (out, err) in zip(runs, outs):
    assert r.returncode == 0, err[-3000:]
  writers = set(open(log).read().split())
  assert len(writers) == 1, f'the teacher ran in {len(writers)} processes'
  assert len(open(log).read().split()) == 3  # 12 sentences in batches of 4, once
  embs = [json.loads(out.split('EMB ', 1)[1].replace("'", '"')) for out, _ in outs]
  ids = [[1 + i % 7] * (1 + i % 5) for i in range(12)]
  want = np.asarray([[sum(x), len(x)] for x in ids], np.float32).reshape(-1)
  for emb in embs:
    np.testing.assert_array_equal(np.asarray(emb, np.float32), want)
  assert sorted(os.listdir(tmp_path)) == ['.cache.lock', 'cache', 'calls']  # no temp left


def test_a_writer_waits_for_the_holder_and_goes_on_when_it_is_killed(tmp_path):
  path, log = str(tmp_path / 'cache'), str(tmp_path / 'calls')
  holder = _python(_HOLD, path)
  assert holder.stdout.readline().strip() == 'held'
  err_file = tmp_path / 'run.err'
  with open(err_file, 'w') as err:
    run = _python(_RUN, path, log, stderr=err)
  deadline = time.time() + 120
  while 'waiting for' not in err_file.read_text():  # it says what it waits for
    assert run.poll() is None and time.time() < deadline, err_file.read_text()[-3000:]
    time.sleep(0.05)
  time.sleep(0.5)
  assert run.poll() is None and not os.path.exists(log), 'the run did not wait for the lock'
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  out, _ = run.communicate(timeout=120)
  assert run.returncode == 0, err_file.read_text()[-3000:]
  assert 'EMB' in out and len(open(log).read().split()) == 3


def test_once_skips_a_done_cache_and_leaves_a_stale_lock_file_harmless(tmp_path):
  from kd.data import single_writer  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / 'c')
  (tmp_path / '.c.lock').write_text('pid 999999')  # left by a dead writer
  calls = []
  single_writer.once(path, lambda: os.path.exists(path),
                     lambda: (calls.append(1), open(path, 'w').close()))
  single_writer.once(path, lambda: os.path.exists(path), lambda: calls.append(2))
  assert calls == [1]
