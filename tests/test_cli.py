"""The CLI end to end on the tiny config; SIGKILL- and SIGTERM-then-resume determinism; one run
per workdir."""

import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 10


def _cmd(workdir, *overrides):
  return [sys.executable, '-m', 'kd.main', '--config=configs/shakespeare/distill.py:tiny',
          f'--workdir={workdir}', f'--config.train.steps={STEPS}',
          '--config.train.checkpoint_every=1', '--config.train.keep=3', *overrides]


def _run(workdir, *overrides, env=None):
  out = subprocess.run(_cmd(workdir, *overrides), cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  return out


def _cache_entries(cache):
  return {p.name for p in cache.iterdir() if p.name.endswith('-cache')}


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
  """One uninterrupted run of the tiny config, compiled into a cache of its own: (workdir,
  stdout, cache env, the cache entries it wrote)."""
  root = tmp_path_factory.mktemp('straight')
  env = dict(os.environ, KD_COMPILATION_CACHE=str(root / 'jax_cache'))
  out = _run(root / 'w', env=env)
  return root / 'w', out.stdout, env, _cache_entries(root / 'jax_cache')


def _final_params(workdir, stage='student_kd'):
  ckpts = pathlib.Path(workdir) / stage / 'checkpoints'
  last = max(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
  path = ckpts / str(last) / 'state'
  return ocp.StandardCheckpointer().restore(path.resolve())['params']


def test_cli_end_to_end_then_killed_run_resumes_bitwise(tmp_path, straight):
  straight, stdout, env, _ = straight
  results = json.loads((straight / 'results.json').read_text())
  assert set(results) == {'teacher', 'student_kd', 'student_ce'}
  head = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=ROOT, capture_output=True,
                        text=True).stdout.strip()
  for r in results.values():
    assert np.isfinite(r['perplexity']) and r['perplexity'] > 1.0
    assert r['_commit'].split('-')[0] == head  # the code each row trained with ('-dirty': edits)
  assert 0.0 <= results['student_kd']['agreement'] <= 1.0
  assert '| student_kd |' in stdout
  rows = [json.loads(l) for l in (straight / 'student_kd' / 'metrics.jsonl').read_text().splitlines()]
  assert {'loss', 'terms/ce', 'terms/kl', 'grad_norm', 'lr', 'tokens_per_s'} <= set(rows[0])
  assert list((straight / 'student_kd' / 'tb').iterdir()), 'TensorBoard events missing'

  # Kill the student's run with SIGKILL right after a random checkpoint, then resume. The
  # interrupted runs share the straight run's teacher (config.teacher.workdir).
  shared = f'--config.teacher.workdir={straight / "teacher"}'
  killed = tmp_path / 'killed'
  kill_at = random.Random(os.getpid()).randint(2, STEPS - 2)
  proc = subprocess.Popen(_cmd(killed, shared), cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, env=env)
  marker = killed / 'student_kd' / 'checkpoints' / str(kill_at)
  deadline = time.time() + 300
  while not marker.exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (killed / 'student_kd' / 'checkpoints' / str(STEPS)).exists(), 'killed too late'
  _run(killed, shared, env=env)
  _assert_same_params(straight, killed)

  # SIGTERM (a preemption notice) while the student trains, after a random step: the run
  # finishes the step in flight, saves it (checkpoints are otherwise every 4 steps) and exits
  # with code 75; the same command then ends bitwise where the uninterrupted run did.
  termed = tmp_path / 'termed'
  sparse = ('--config.train.checkpoint_every=4', '--config.train.log_every=1', shared)
  proc = subprocess.Popen(_cmd(termed, *sparse), cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, env=env)
  log, rows = termed / 'student_kd' / 'metrics.jsonl', random.Random(os.getpid()).randint(1, 3)
  deadline = time.time() + 300
  while proc.poll() is None and time.time() < deadline and not (
      log.exists() and len(log.read_text().splitlines()) >= rows):
    time.sleep(0.01)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 75, err[-3000:]
  assert 'preempted: the checkpoint of step' in err
  last = {stage: max(int(p.name) for p in (termed / stage / 'checkpoints').iterdir()
                     if p.name.isdigit())
          for stage in ('student_kd', 'student_ce') if (termed / stage / 'checkpoints').exists()}
  assert any(s < STEPS for s in last.values()), last  # a stage stopped midway
  _run(termed, *sparse, env=env)
  _assert_same_params(straight, termed)


def _assert_same_params(a_dir, b_dir):
  for stage in ('student_kd', 'student_ce'):
    a, b = _final_params(a_dir, stage), _final_params(b_dir, stage)
    leaves_a, leaves_b = [np.asarray(x) for x in _leaves(a)], [np.asarray(x) for x in _leaves(b)]
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b):
      np.testing.assert_array_equal(x, y)  # bitwise, not approximately


def _leaves(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree.leaves(tree)


def test_a_second_run_loads_every_program_from_the_compilation_cache(tmp_path, straight):
  """kd.main keeps its compiled programs in the persistent cache: the same config run again in
  a fresh workdir adds no entry (every program is loaded) and ends with the same results."""
  first, _, env, written = straight
  cache = pathlib.Path(env['KD_COMPILATION_CACHE'])
  assert len(written) > 20  # the teacher's, both students' and the evaluations' programs
  before = _cache_entries(cache)
  _run(tmp_path / 'second', env=env)
  assert _cache_entries(cache) == before
  results = [json.loads((d / 'results.json').read_text()) for d in (first, tmp_path / 'second')]
  for stage in ('teacher', 'student_kd', 'student_ce'):
    assert results[1][stage]['perplexity'] == results[0][stage]['perplexity']


def test_compilation_cache_settings(tmp_path, monkeypatch):
  from kd.train import compile_cache  # pylint: disable=g-import-not-at-top
  assert compile_cache.enable('') is None and compile_cache.enable(None) is None
  (tmp_path / 'file').write_text('a file, not a directory')
  with pytest.raises(ValueError, match='cannot be created'):
    compile_cache.enable(str(tmp_path / 'file' / 'jax'))
  # Where the cache goes: kd's variable, then JAX's, then ~/.cache/kd/jax.
  monkeypatch.setenv('KD_COMPILATION_CACHE', '')
  monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', '/somewhere/jax')
  assert compile_cache.default_dir() == ''
  monkeypatch.delenv('KD_COMPILATION_CACHE')
  assert compile_cache.default_dir() == '/somewhere/jax'
  monkeypatch.delenv('JAX_COMPILATION_CACHE_DIR')
  monkeypatch.setenv('HOME', str(tmp_path))
  assert compile_cache.default_dir() == str(tmp_path / '.cache' / 'kd' / 'jax')


def test_a_diverging_run_stops_naming_the_step_and_term(tmp_path):
  import importlib.util  # pylint: disable=g-import-not-at-top
  from kd.train import loop  # pylint: disable=g-import-not-at-top
  from kd.train import run  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location('c', ROOT / 'configs/shakespeare/distill.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config('tiny')
  config.teacher.optimizer.update(lr=1e12, grad_clip_norm=0.0, name='sgd')
  with pytest.raises(loop.NonFiniteError, match=r"step \d+: (loss term 'ce'|the gradient norm = nan \(terms: ce=)"):
    run.main(config, str(tmp_path / 'w'))


def test_skip_nonfinite_skips_that_many_updates_unapplied_then_stops(tmp_path, caplog):
  """A teacher at lr 1e12 turns NaN at some step and stays so: with train.skip_nonfinite=2 the
  two updates after it are skipped (each logged), and the run stops at the third."""
  import re  # pylint: disable=g-import-not-at-top
  from kd.train import loop  # pylint: disable=g-import-not-at-top
  from kd.train import run  # pylint: disable=g-import-not-at-top
  stops = []
  for skip in (0, 2):
    config = _tiny_config()
    config.teacher.optimizer.update(lr=1e12, grad_clip_norm=0.0, name='sgd')
    config.teacher.steps = 8
    config.train.skip_nonfinite = skip
    caplog.clear()
    with pytest.raises(loop.NonFiniteError) as err:
      run.main(config, str(tmp_path / f'skip{skip}'))
    stops.append(int(re.match(r'step (\d+)', str(err.value)).group(1)))
    skipped = [r for r in caplog.records if 'the update was not applied' in r.getMessage()]
    assert len(skipped) == skip
  assert stops[1] == stops[0] + 2, stops


def _tiny_config():
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location('c', ROOT / 'configs/shakespeare/distill.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config('tiny')


def test_offline_teacher_cache_end_to_end(tmp_path):
  from kd import cache_teacher  # pylint: disable=g-import-not-at-top
  from kd.data import teacher_cache  # pylint: disable=g-import-not-at-top
  from kd.train import run  # pylint: disable=g-import-not-at-top
  config = _tiny_config()
  config.baseline = False
  workdir = str(tmp_path / 'w')
  path = cache_teacher.write_cache(config, workdir, k=8)
  meta = teacher_cache.read_meta(path)
  assert meta['k'] == 8 and meta['temperature'] == config.temperature and meta['rows'] > 0
  row = next(teacher_cache.make_iterator(path, batch_size=1, seed=0, shuffle=False))
  assert row['topk_ids'].shape == row['input_ids'].shape + (8,)
  # The cached logits are the teacher's largest ones, in order.
  assert np.all(np.diff(row['topk_logits'], axis=-1) <= 0)

  config.teacher.cache = path
  results = run.main(config, workdir)
  rows = [json.loads(l) for l in (tmp_path / 'w' / 'student_kd' / 'metrics.jsonl').read_text().splitlines()]
  assert np.isfinite(rows[0]['terms/kl']) and np.isfinite(results['student_kd']['perplexity'])

  # The student's logits in chunks read the same cache: the same run to float tolerance (with
  # the same teacher, shared rather than trained again).
  config.chunk_size = 8
  config.teacher.workdir = str(tmp_path / 'w' / 'teacher')
  run.main(config, str(tmp_path / 'chunked'))
  chunked = [json.loads(l) for l in (tmp_path / 'chunked' / 'student_kd' / 'metrics.jsonl')
             .read_text().splitlines()]
  kl = lambda rs: [(r['step'], r['terms/kl']) for r in rs if 'terms/kl' in r]
  assert len(kl(rows)) > 1 and [s for s, _ in kl(chunked)] == [s for s, _ in kl(rows)]
  np.testing.assert_allclose([v for _, v in kl(chunked)], [v for _, v in kl(rows)], rtol=1e-3)
  # The cache written with the teacher's logits in chunks holds the same rows.
  again = cache_teacher.write_cache(config, workdir, k=8, out=str(tmp_path / 'cache8'))
  first = next(teacher_cache.make_iterator(again, batch_size=1, seed=0, shuffle=False))
  np.testing.assert_array_equal(first['topk_ids'], row['topk_ids'])
  np.testing.assert_allclose(first['topk_logits'], row['topk_logits'], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(first['lse'], row['lse'], rtol=1e-5)
  config.chunk_size = 0

  config.losses = {'ce': 0.5, 'jsd': 0.5}
  with pytest.raises(ValueError, match="holds top-k logits only: use 'kl' and 'ce'"):
    run.main(config, str(tmp_path / 'w2'))
  config.losses = {'ce': 0.5, 'kl': 0.5}
  config.temperature = 3.0
  with pytest.raises(ValueError, match='stores the teacher\'s logsumexp at T=2.0'):
    run.main(config, str(tmp_path / 'w3'))


def test_student_initialised_from_teacher_layers(tmp_path):
  from kd.data import lm_data  # pylint: disable=g-import-not-at-top
  from kd.train import build  # pylint: disable=g-import-not-at-top
  from kd.train import run  # pylint: disable=g-import-not-at-top
  config = _tiny_config()
  config.baseline = False
  config.student_init.update(source='teacher', layers='every_k', k=2)  # teacher layer 0 of 2
  workdir = str(tmp_path / 'w')
  data = lm_data.LMData(config, workdir)
  teacher = build.build_model(config.teacher.model, data.vocab_size)
  student = build.build_model(config.student, data.vocab_size)
  tp, _ = run.train_teacher(config, data, teacher, workdir)
  init = build.student_init(config, student, teacher, tp)['params']
  t = tp['params']
  d = config.student.hidden_size
  np.testing.assert_array_equal(init['embed']['embedding'], t['embed']['embedding'][:, :d])
  q_width = config.student.num_heads * 8  # the teacher's head_dim (32 / 4) is kept
  np.testing.assert_array_equal(init['layers_0']['attn']['q_proj']['kernel'],
                                t['layers_0']['attn']['q_proj']['kernel'][:d, :q_width])
  assert 'layers_1' not in init
  results = run.main(config, workdir)
  assert np.isfinite(results['student_kd']['perplexity'])

  config.student_init.update(layers='first_last')  # two layers for a one-layer student
  with pytest.raises(ValueError, match=r'keeps teacher layers \[0, 1\], but config.student has'):
    run.main(config, str(tmp_path / 'w2'))
