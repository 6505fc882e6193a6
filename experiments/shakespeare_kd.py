r"""The Shakespeare KD table over several seeds: teacher, student with KD, student without KD.

  KD_DATA_DIR=../shared/data .venv/bin/python experiments/shakespeare_kd.py \
      --seeds=0,1,2 --workdir=/tmp/kd/shakespeare_seeds [--experiment=distill] [--config_arg=...] \
      [--out=experiments/results]

Each seed is one run of configs/shakespeare/<experiment>.py (default distill.py: the teacher, KD
and no-KD students) in <workdir>/seed_<s> (resumable); the table (mean ± std over seeds) goes to
<out>/shakespeare_kd.md. About 7 minutes per seed on a 2-core CPU (distill.py).
"""

import json
import os
import subprocess
import sys

from absl import app
from absl import flags

from kd.eval import report

_SEEDS = flags.DEFINE_list('seeds', ['0', '1', '2'], 'Seeds to run.')
_WORKDIR = flags.DEFINE_string('workdir', '/tmp/kd/shakespeare_seeds', 'Root of the runs.')
_OUT = flags.DEFINE_string('out', 'experiments/results', 'Where the table goes.')
_EXPERIMENT = flags.DEFINE_string('experiment', 'distill', 'A config of configs/shakespeare/.')
_ARG = flags.DEFINE_string('config_arg', '', 'Args passed to the config (e.g. tiny).')
_OVERRIDES = flags.DEFINE_multi_string('override', [], 'Extra --config.k=v overrides.')
_COLLECT = flags.DEFINE_bool('collect_only', False, 'Only read the finished runs\' results.')

ROWS = (('teacher', 'teacher'), ('student_kd', 'student, KD'), ('student_ce', 'student, no KD'))


def run_seed(seed: str) -> dict:
  workdir = os.path.join(_WORKDIR.value, f'seed_{seed}')
  if _COLLECT.value:
    with open(os.path.join(workdir, 'results.json')) as f:
      return json.load(f)
  config = (f'configs/shakespeare/{_EXPERIMENT.value}.py'
            + (f':{_ARG.value}' if _ARG.value else ''))
  cmd = [sys.executable, '-m', 'kd.main', f'--config={config}', f'--workdir={workdir}',
         f'--config.seed={seed}', '--config.train.progress=False',
         *[f'--config.{o}' for o in _OVERRIDES.value]]
  subprocess.run(cmd, check=True)
  with open(os.path.join(workdir, 'results.json')) as f:
    return json.load(f)



def table(results: list[dict]) -> str:
  lines = [f'Tiny Shakespeare validation split, {len(results)} seeds (mean ± std).', '',
           '| model | params | perplexity | top-1 agreement with teacher (%) |',
           '|---|---:|---:|---:|']
  for key, label in ROWS:
    rows = [r[key] for r in results if key in r]
    if not rows:
      continue
    agree = ('-' if 'agreement' not in rows[0]
             else report.mean_std([r['agreement'] for r in rows], 100, 1))
    ppl = report.mean_std([r['perplexity'] for r in rows])
    lines.append(f"| {label} | {rows[0]['params']:,} | {ppl} | "
                 f'{agree} |')
  if all('student_ce' in r for r in results):
    gain = [r['student_ce']['perplexity'] - r['student_kd']['perplexity'] for r in results]
    lines += ['', f'KD lowers the student perplexity by {report.mean_std(gain)} '
              f'(better in {sum(g > 0 for g in gain)} of {len(gain)} seeds).']
  return '\n'.join(lines)


def main(argv):
  del argv
  results = [run_seed(s) for s in _SEEDS.value]
  report.write(_OUT.value, 'shakespeare_kd', table(results))


if __name__ == '__main__':
  app.run(main)
