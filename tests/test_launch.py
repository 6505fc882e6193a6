"""launch_tpu.sh (dry runs only) and the kd.sweep runner: expansion, key checks, summary."""

import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys

import pytest

from kd import sweep

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = str(ROOT / 'launch_tpu.sh')
TPU = ['--name=kd-test', '--zone=us-west4-a', '--accelerator=v5litepod-16',
       '--version=v2-alpha-tpuv5-lite', '--project=proj', '--bucket=gs://bkt/kd']
MAIN = ['--config=configs/shakespeare/distill.py:tiny', '--config.data.name=with space']


def _launch(*args, path=None):
  env = dict(os.environ)
  if path:  # a PATH whose gcloud records any real call
    env['PATH'] = f'{path}:{env["PATH"]}'
  return subprocess.run(['bash', LAUNCH, *args], cwd=ROOT, capture_output=True, text=True,
                        env=env, timeout=30)


def _fake_gcloud(tmp_path):
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  gcloud = bin_dir / 'gcloud'
  gcloud.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/gcloud_calls\nexit 1\n')
  gcloud.chmod(0o755)
  return bin_dir


def _commands(stdout):
  lines = stdout.splitlines()
  assert lines and all(l.startswith('+ ') for l in lines), stdout
  return [shlex.split(l[2:]) for l in lines]


def test_dry_run_prints_every_step_and_creates_nothing(tmp_path):
  out = _launch(*TPU, '--spot', '--dry-run', '--', *MAIN, path=_fake_gcloud(tmp_path))
  assert out.returncode == 0, out.stderr
  assert not (tmp_path / 'gcloud_calls').exists(), 'a dry run called gcloud'
  assert not pathlib.Path('/tmp/kd-kd-test.tar.gz').exists()
  cmds = _commands(out.stdout)
  gcloud = [c for c in cmds if c[0] == 'gcloud']
  assert [c[:5] for c in gcloud[:2]] == [['gcloud', 'compute', 'tpus', 'tpu-vm', 'describe'],
                                         ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create']]
  create = gcloud[1]
  for flag in ('--accelerator-type=v5litepod-16', '--version=v2-alpha-tpuv5-lite',
               '--zone=us-west4-a', '--project=proj', '--spot'):
    assert flag in create
  assert any(c[:2] == ['git', '-C'] and 'archive' in c for c in cmds)
  scp = next(c for c in gcloud if c[4] == 'scp')
  assert '--worker=all' in scp and 'kd-test:kd.tar.gz' in scp
  install, start = [c for c in gcloud if c[4] == 'ssh']
  assert '--worker=all' in install and '--worker=all' in start
  install_cmd = next(a for a in install if a.startswith('--command='))
  assert 'python3 -m venv' in install_cmd and "pip install -q -e . 'jax[tpu]'" in install_cmd
  start_cmd = next(a for a in start if a.startswith('--command='))[len('--command='):]
  assert 'setsid nohup' in start_cmd and '$(hostname).log' in start_cmd
  words = shlex.split(start_cmd)  # what the worker's shell reads: ... bash -c JOB >> log
  job = words[words.index('-c') + 1]
  assert job.startswith('until ') and job.endswith('do [ $? -eq 75 ] || break; done')  # resumes
  remote = shlex.split(job.split('-m kd.main', 1)[1].split(';', 1)[0])
  assert remote == [*MAIN, '--workdir=gs://bkt/kd/kd-test', '--config.distributed=True']


def test_queued_dry_run_uses_queued_resources(tmp_path):
  out = _launch(*TPU, '--queued', '--dry-run', '--', '--workdir=gs://other/run',
                path=_fake_gcloud(tmp_path))
  assert out.returncode == 0, out.stderr
  assert not (tmp_path / 'gcloud_calls').exists()
  cmds = _commands(out.stdout)
  assert cmds[0][:5] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'create']
  assert '--node-id=kd-test' in cmds[0] and '--runtime-version=v2-alpha-tpuv5-lite' in cmds[0]
  assert not any(c[3:5] == ['tpu-vm', 'create'] for c in cmds)
  assert 'gs://other/run' in cmds[-1][-1] and 'gs://bkt' not in cmds[-1][-1]


@pytest.mark.parametrize('missing', ['--name', '--zone', '--accelerator', '--version',
                                     '--bucket'])
def test_missing_flag_is_named(missing):
  args = [a for a in TPU if not a.startswith(missing + '=')]
  out = _launch(*args, '--dry-run', '--', '--config=c.py')
  assert out.returncode == 2 and f'missing required flag {missing}' in out.stderr
  assert not out.stdout


def test_help_and_local_workdir_refused():
  assert _launch('--help').stdout.startswith('Usage: launch_tpu.sh')
  out = _launch(*TPU, '--dry-run', '--', '--workdir=/tmp/x')
  assert out.returncode == 2 and 'gs://' in out.stderr


def _sweep(*args):
  return subprocess.run([sys.executable, '-m', 'kd.sweep', *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=60)


def test_hyper_helpers():
  h = sweep.hyper
  assert h.product([h.sweep('a', [1, 2]), h.sweep('b', 'xy')]) == [
      {'a': 1, 'b': 'x'}, {'a': 1, 'b': 'y'}, {'a': 2, 'b': 'x'}, {'a': 2, 'b': 'y'}]
  assert h.zip(h.sweep('a', [1, 2]), h.sweep('b', [3, 4])) == [{'a': 1, 'b': 3},
                                                              {'a': 2, 'b': 4}]
  assert h.product([h.fixed('c', 0), h.sweep('a', [1, 2])]) == [{'c': 0, 'a': 1},
                                                               {'c': 0, 'a': 2}]
  with pytest.raises(ValueError, match='equal length'):
    h.zip([h.sweep('a', [1, 2]), h.sweep('b', [3])])
  # Leaves that clash fall back to the full path, so names stay distinct.
  assert sweep.names([{'train.steps': 1, 'teacher.steps': 2, 'seed': 0},
                      {'train.steps': 3, 'teacher.steps': 4, 'seed': 0}]) == [
      'train.steps_1-teacher.steps_2', 'train.steps_3-teacher.steps_4']
  assert sweep.names([{'seed': 0}, {'seed': 0}]) == ['run-0', 'run-1']


def test_sweep_dry_run_lists_six_distinct_runs(tmp_path):
  out = _sweep('configs/shakespeare/distill.py', f'--workdir={tmp_path}', '--dry-run',
               '--override=train.steps=2')
  assert out.returncode == 0, out.stderr
  runs = [shlex.split(l) for l in out.stdout.splitlines()]
  assert len(runs) == 6
  workdirs = {a for r in runs for a in r if a.startswith('--workdir=')}
  assert len(workdirs) == 6 and all(w.startswith(f'--workdir={tmp_path}/') for w in workdirs)
  seen = set()
  for r in runs:
    assert r[1:3] == ['-m', 'kd.main'] and '--config=configs/shakespeare/distill.py' in r
    assert '--config.train.steps=2' in r
    seed = next(a for a in r if a.startswith('--config.seed='))
    temp = next(a for a in r if a.startswith('--config.temperature='))
    seen.add((seed, temp))
  assert seen == {(f'--config.seed={s}', f'--config.temperature={t}')
                  for s in (0, 1, 2) for t in (1.0, 2.0)}
  assert not list(tmp_path.iterdir()), 'a dry run wrote something'


def test_sweep_tpu_dry_run_goes_through_launch_tpu():
  out = _sweep('configs/shakespeare/distill.py', '--workdir=gs://bkt/sw', '--dry-run',
               '--launch=tpu',
               '--tpu_args=--name=kd --zone=z --accelerator=v5litepod-16 --version=v')
  assert out.returncode == 0, out.stderr
  runs = [shlex.split(l) for l in out.stdout.splitlines()]
  assert len(runs) == 6 and all(r[0] == LAUNCH for r in runs)
  assert [r[1] for r in runs] == [f'--name=kd-{i}' for i in range(6)]
  assert all('--' in r and '--workdir=gs://bkt/sw/' in ' '.join(r) for r in runs)


def test_grid_replaces_the_configs_sweep(tmp_path):
  out = _sweep('configs/shakespeare/lora.py:qlora', f'--workdir={tmp_path}', '--dry-run',
               '--grid=optimizer.lr=1e-3,3e-2', '--grid=config.peft.rank=8,64',
               '--grid=student_init.layers_list=(0,),(0, 2)')
  assert out.returncode == 0, out.stderr
  runs = [shlex.split(l) for l in out.stdout.splitlines()]
  assert len(runs) == 8  # 2 x 2 x 2, not the config's 6 seeds x temperatures
  got = [tuple(a for a in r if a.startswith('--config.')) for r in runs]
  assert got[0] == ('--config.optimizer.lr=0.001', '--config.peft.rank=8',
                    '--config.student_init.layers_list=(0,)')
  assert got[-1] == ('--config.optimizer.lr=0.03', '--config.peft.rank=64',
                     '--config.student_init.layers_list=(0, 2)')
  assert len(set(got)) == 8 and not any('--config.seed=' in a for r in runs for a in r)
  assert f'--workdir={tmp_path}/lr_0.03-rank_64-layers_list__0__2_' in runs[-1]
  assert '--config=configs/shakespeare/lora.py:qlora' in runs[0]
  for bad, says in (('--grid=optimizer.lr', 'K=V1,V2'), ('--grid=optimizer.lrr=1,2',
                                                         'optimizer.lrr')):
    out = _sweep('configs/shakespeare/distill.py', f'--workdir={tmp_path}/x', bad)
    assert out.returncode == 2 and says in out.stderr, out.stderr
  assert not (tmp_path / 'x').exists()


def _distill_copy(tmp_path, extra='', *, keep_sweep=True):
  """configs/shakespeare copied under tmp_path (its files find base.py beside them), with
  `extra` added to distill.py, after or instead of its get_hyper: that distill.py's path."""
  shutil.copytree(ROOT / 'configs' / 'shakespeare', tmp_path / 'cfg')
  cfg = tmp_path / 'cfg' / 'distill.py'
  text = cfg.read_text()
  cfg.write_text((text if keep_sweep else text.split('\n\ndef get_hyper')[0]) + extra)
  return cfg


@pytest.mark.parametrize('extra', [[], ['--override=train.stepz=2']])
def test_unknown_key_fails_before_running(tmp_path, extra):
  typo = "\n\ndef get_hyper(hyper):\n  return hyper.sweep('config.temprature', [1.0])\n"
  cfg = _distill_copy(tmp_path, '' if extra else typo)
  out = _sweep(str(cfg), f'--workdir={tmp_path}/runs', *extra)
  assert out.returncode == 2
  assert ('temprature' in out.stderr or 'stepz' in out.stderr) and 'unknown config' in out.stderr
  assert not (tmp_path / 'runs').exists()


def _fake_results(workdir, ppl):
  workdir.mkdir(parents=True)
  (workdir / 'results.json').write_text(json.dumps({
      'teacher': {'params': 100, 'perplexity': ppl, 'wall_s': 1.0},
      'student_kd': {'params': 10, 'perplexity': ppl + 1, 'agreement': 0.5, 'wall_s': 2.0}}))


def test_summary_collects_results(tmp_path):
  cfg = _distill_copy(tmp_path,
                      "\n\ndef get_hyper(hyper):\n  return hyper.sweep('config.seed', [0, 1, 2])\n")
  _fake_results(tmp_path / 'runs' / 'seed_0', 5.0)
  _fake_results(tmp_path / 'runs' / 'seed_1', 7.0)
  out = _sweep(str(cfg), f'--workdir={tmp_path}/runs', '--summary')
  assert out.returncode == 0, out.stderr
  text = (tmp_path / 'runs' / 'summary.md').read_text()
  assert text.strip() in out.stdout
  lines = text.splitlines()
  assert lines[0] == '| seed | row | params | perplexity | wall_s | agreement |'
  assert '| 0 | teacher | 100 | 5 | 1 | - |' in lines
  assert '| 1 | student_kd | 10 | 8 | 2 | 0.5 |' in lines
  assert 'No results.json yet for: seed_2.' in text


def test_local_sweep_continues_past_failures(tmp_path, monkeypatch):
  cfg = _distill_copy(tmp_path, "\n\ndef sweep():\n  yield {'seed': 0}\n  yield {'seed': 1}\n",
                      keep_sweep=False)
  calls = []

  def fake_run(cmd, **kwargs):
    calls.append(cmd)
    workdir = pathlib.Path(next(a for a in cmd if a.startswith('--workdir='))[10:])
    if '--config.seed=0' in cmd:  # the first point fails, the second still runs
      return subprocess.CompletedProcess(cmd, 1)
    _fake_results(workdir, 3.0)
    return subprocess.CompletedProcess(cmd, 0)

  monkeypatch.setattr(sweep.subprocess, 'run', fake_run)
  rc = sweep.main([str(cfg), f'--workdir={tmp_path}/runs', '--override=train.steps=2'])
  assert rc == 1 and len(calls) == 2
  assert all(c[1:3] == ['-m', 'kd.main'] and '--config.train.steps=2' in c for c in calls)
  text = (tmp_path / 'runs' / 'summary.md').read_text()
  assert '| 1 | teacher |' in text and 'No results.json yet for: seed_0.' in text


@pytest.mark.skipif(not os.environ.get('KD_SLOW_TESTS'),
                    reason='two real tiny runs take ~60 s on 2 cores; set KD_SLOW_TESTS=1')
def test_real_local_sweep_of_two_points(tmp_path):
  cfg = _distill_copy(tmp_path,
                      "\n\ndef get_hyper(hyper):\n  return hyper.sweep('config.seed', [0, 1])\n")
  out = subprocess.run(
      [sys.executable, '-m', 'kd.sweep', f'{cfg}:tiny', f'--workdir={tmp_path}/runs',
       '--override=train.steps=2', '--override=teacher.steps=2', '--override=baseline=False'],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  text = (tmp_path / 'runs' / 'summary.md').read_text()
  assert '| 0 | student_kd |' in text and '| 1 | student_kd |' in text


def test_local_sweep_resumes_a_preempted_point(tmp_path, monkeypatch):
  """A point that exits with kd's preemption code runs again (the same command resumes it);
  one that keeps being preempted gives up after --retries."""
  from kd.train import preemption  # pylint: disable=g-import-not-at-top
  assert sweep.PREEMPTED == preemption.EXIT_CODE
  cfg = _distill_copy(tmp_path, "\n\ndef sweep():\n  yield {'seed': 0}\n  yield {'seed': 1}\n",
                      keep_sweep=False)
  calls = []

  def fake_run(cmd, **kwargs):
    calls.append(cmd)
    workdir = pathlib.Path(next(a for a in cmd if a.startswith('--workdir='))[10:])
    # seed 0 is preempted twice, then finishes; seed 1 is preempted every time.
    if '--config.seed=1' in cmd or sum('--config.seed=0' in c for c in calls) < 3:
      return subprocess.CompletedProcess(cmd, sweep.PREEMPTED)
    _fake_results(workdir, 3.0)
    return subprocess.CompletedProcess(cmd, 0)

  monkeypatch.setattr(sweep.subprocess, 'run', fake_run)
  rc = sweep.main([str(cfg), f'--workdir={tmp_path}/runs', '--retries=2'])
  seeds = ['--config.seed=0' in c for c in calls]
  assert seeds == [True, True, True, False, False, False]  # seed 1: 1 + 2 retries, then failed
  assert rc == 1
  assert 'No results.json yet for: seed_1.' in (tmp_path / 'runs' / 'summary.md').read_text()
