"""launch_slurm.sh: the sbatch script it writes, run here with stand-ins for srun, scontrol and
sbatch (a kd exit code 75 requeues the job; any other code does not)."""

import os
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = str(ROOT / 'launch_slurm.sh')
SLURM = ['--nodes=2', '--gpus-per-node=8', '--time=24:00:00', '--partition=gpu']


def _launch(*args, env=None):
  return subprocess.run(['bash', LAUNCH, *args], cwd=ROOT, capture_output=True, text=True,
                        env=env, timeout=30)


def _stubs(tmp_path, srun_rc: int):
  """srun (records its args, exits srun_rc), scontrol and sbatch (record their args)."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  for name, rc in (('srun', srun_rc), ('scontrol', 0), ('sbatch', 0)):
    stub = bin_dir / name
    stub.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/{name}_calls\n'
                    + (f'cp "$1" {tmp_path}/submitted\n' if name == 'sbatch' else '')
                    + f'exit {rc}\n')
    stub.chmod(0o755)
  return dict(os.environ, PATH=f'{bin_dir}:{os.environ["PATH"]}', SLURM_JOB_ID='4242')


def test_dry_run_prints_a_valid_sbatch_script(tmp_path):
  out = _launch(*SLURM, '--dry-run', '--', '--config=configs/llm/smollm2_kd.py:tiny',
                f'--workdir={tmp_path}/w')
  assert out.returncode == 0, out.stderr
  script = out.stdout
  for line in ('#SBATCH --nodes=2', '#SBATCH --ntasks-per-node=1', '#SBATCH --gpus-per-node=8',
               '#SBATCH --time=24:00:00', '#SBATCH --requeue', '#SBATCH --signal=TERM@120',
               '#SBATCH --partition=gpu', f'#SBATCH --output={tmp_path}/w/slurm-%j.out'):
    assert line in script.splitlines(), line
  assert ('srun --kill-on-bad-exit=1 .venv/bin/python -m kd.main '
          '--config=configs/llm/smollm2_kd.py:tiny') in script
  assert '--config.distributed=True' in script
  (tmp_path / 'job.sbatch').write_text(script)
  assert subprocess.run(['bash', '-n', str(tmp_path / 'job.sbatch')]).returncode == 0


@pytest.mark.parametrize('srun_rc,requeued', [(75, True), (0, False), (1, False)])
def test_the_script_requeues_a_preempted_run_only(tmp_path, srun_rc, requeued):
  script = _launch(*SLURM, '--dry-run', '--', f'--workdir={tmp_path}/w').stdout
  (tmp_path / 'job.sbatch').write_text(script)
  env = _stubs(tmp_path, srun_rc)
  out = subprocess.run(['bash', str(tmp_path / 'job.sbatch')], capture_output=True, text=True,
                       env=env, timeout=30)
  assert out.returncode == srun_rc
  assert (tmp_path / 'w').is_dir()
  assert f'--workdir={tmp_path}/w --config.distributed=True' in (
      tmp_path / 'srun_calls').read_text()
  calls = tmp_path / 'scontrol_calls'
  assert (calls.read_text().split() == ['requeue', '4242']) if requeued else not calls.exists()


def test_submit_writes_the_script_and_calls_sbatch(tmp_path):
  env = _stubs(tmp_path, 0)
  out = _launch(*SLURM, '--', f'--workdir={tmp_path}/w', env=env)
  assert out.returncode == 0, out.stderr
  dry = _launch(*SLURM, '--dry-run', '--', f'--workdir={tmp_path}/w').stdout
  assert (tmp_path / 'submitted').read_text() == dry
  assert (tmp_path / 'w').is_dir()  # made before sbatch: Slurm opens its log there


@pytest.mark.parametrize('args,message', [
    (['--gpus-per-node=8', '--time=1:00:00'], 'missing required flag --nodes'),
    (['--nodes=2', '--time=1:00:00'], 'missing required flag --gpus-per-node'),
    (['--nodes=2', '--gpus-per-node=8'], 'missing required flag --time'),
    (['--nodes=0', '--gpus-per-node=8', '--time=1:00:00'], '--nodes must be a positive integer'),
    (['--nodes=2', '--gpus-per-node=8', '--time=1:00:00', '--bogus=1'], 'unknown flag --bogus'),
])
def test_bad_flags_are_named(args, message):
  out = _launch(*args, '--dry-run', '--', '--workdir=/shared/w')
  assert out.returncode == 2 and message in out.stderr, out.stderr


def test_a_workdir_is_required_and_may_not_hold_a_space():
  assert 'pass --workdir=DIR' in _launch(*SLURM, '--dry-run').stderr
  assert 'holds a space' in _launch(*SLURM, '--dry-run', '--', '--workdir=/a b').stderr
