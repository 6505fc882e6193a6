r"""all-MiniLM-L6-v2 distilled into 3- and 2-layer students: the recipe and its ablations, over seeds.

  KD_DATA_DIR=../shared/data .venv/bin/python experiments/minilm_sts.py \
      --seeds=0,1,2 --workdir=/tmp/kd/minilm_ablation [--recipes=...] [--students=3l,2l]

Every (student, recipe, seed) is one run of configs/minilm_sts.py (`:2l,recipe=NAME`) in
<workdir>/<student>/<recipe>/seed_<s>, resumable; runs of one student share the teacher cache.
Rows (configs/minilm_sts.py RECIPES): `labels` (the truncated teacher fine-tuned on STS-B train's
gold scores, no teacher), `emb` (embedding MSE only: the plain recipe), then hidden states,
attention maps and MiniLM relations added. Writes <out>/minilm_sts.md (mean ± std over seeds of
STS-B dev Spearman, % of the teacher, encode speed-up, train time) and <out>/minilm_sts.png.
About 6 minutes per 3-layer run and 5 per 2-layer run on a 2-core CPU.
"""

import json
import os
import subprocess
import sys

import numpy as np
from absl import app
from absl import flags

from kd.eval import report

_SEEDS = flags.DEFINE_list('seeds', ['0', '1', '2'], 'Seeds to run.')
_STUDENTS = flags.DEFINE_list('students', ['3l', '2l'], 'Students: 3l, 2l.')
_RECIPES = flags.DEFINE_list('recipes', ['labels', 'emb', 'emb_hid', 'emb_hid_att',
                                         'emb_hid_att_rel', 'emb_hid_rel'], 'Rows of the table.')
_WORKDIR = flags.DEFINE_string('workdir', '/tmp/kd/minilm_ablation', 'Root of the runs.')
_OUT = flags.DEFINE_string('out', 'experiments/results', 'Where the table and plot go.')
_OVERRIDES = flags.DEFINE_multi_string('override', [], 'Extra --config.k=v overrides.')
_COLLECT = flags.DEFINE_bool('collect_only', False, "Only read finished runs' results.")
_NOTE = flags.DEFINE_string('note', '', 'A paragraph under the table (e.g. how it was measured).')

LABELS = {'labels': 'no KD: fine-tuned on STS-B train labels', 'emb': 'embedding MSE only',
          'emb_hid': '+ hidden states', 'emb_hid_att': '+ hidden + attention maps',
          'emb_hid_att_rel': '+ hidden + attention + MiniLM relations',
          'emb_hid_rel': '+ hidden + MiniLM relations',
          'emb_aux': 'embedding MSE + 0.1 hidden + 0.1 MiniLM relations (the default)',
          'emb_sim': 'embedding MSE + in-batch similarity',
          'emb_last': 'embedding MSE + last-layer token MSE',
          'emb_sim_last': 'embedding MSE + in-batch similarity + last-layer token MSE'}
STUDENTS = {'3l': 'student 3 layers (teacher layers 0,3,5)',
            '2l': 'student 2 layers (teacher layers 0,5)'}


def run(student: str, recipe: str, seed: str) -> dict | None:
  workdir = os.path.join(_WORKDIR.value, student, recipe, f'seed_{seed}')
  result = os.path.join(workdir, 'results.json')
  if not _COLLECT.value and not os.path.exists(result):
    arg = ','.join(([student] if student != '3l' else []) + [f'recipe={recipe}'])
    cmd = [sys.executable, '-m', 'kd.main', f'--config=configs/minilm_sts.py:{arg}',
           f'--workdir={workdir}', f'--config.seed={seed}', '--config.train.progress=False',
           f'--config.teacher.cache_dir={os.path.join(_WORKDIR.value, student, "teacher_cache")}',
           *[f'--config.{o}' for o in _OVERRIDES.value]]
    subprocess.run(cmd, check=True)
  if not os.path.exists(result):
    return None
  with open(result) as f:
    return json.load(f)



def table(results: dict) -> str:
  teacher = next(r['teacher'] for rows in results.values() for runs in rows.values()
                 for r in runs)
  lines = ['STS-B dev Spearman ×100 (cosine of mean-pooled embeddings), mean ± std over seeds; '
           'students start from the teacher\'s layers and train 4 epochs on the unlabeled STS-B '
           'train sentences (the `labels` row: on its 5,749 labelled pairs).', '',
           f"Teacher all-MiniLM-L6-v2: {teacher['spearman']:.2f}, {teacher['params']:,} "
           f"parameters, {teacher['sentences_per_s']:.0f} sentences/s.", '',
           '| student | recipe | seeds | Spearman | % of teacher | speed-up | train s |',
           '|---|---|---:|---:|---:|---:|---:|']
  for student, rows in results.items():
    for recipe, runs in rows.items():
      if not runs:
        continue
      sp = [r['student']['spearman'] for r in runs]
      pct = [100 * r['student']['spearman'] / r['teacher']['spearman'] for r in runs]
      speed = [r['student']['sentences_per_s'] / r['teacher']['sentences_per_s'] for r in runs]
      wall = [r['student']['train_wall_s'] + r['student'].get('teacher_cache_s', 0) for r in runs]
      lines.append(f'| {STUDENTS[student]} | {LABELS.get(recipe, recipe)} | {len(runs)} | '
                   f'{report.mean_std(sp)} | {report.mean_std(pct, digits=1)} | '
                   f'{report.mean_std(speed)}x | {np.mean(wall):.0f} |')
  return '\n'.join(lines)


def plot(results: dict, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(8, 4))
  width = 0.8 / max(len(results), 1)
  recipes = [r for r in _RECIPES.value]
  for k, (student, rows) in enumerate(results.items()):
    means = [np.mean([r['student']['spearman'] for r in rows.get(x, [])] or [np.nan])
             for x in recipes]
    stds = [np.std([r['student']['spearman'] for r in rows.get(x, [])] or [np.nan])
            for x in recipes]
    ax.bar(np.arange(len(recipes)) + k * width, means, width, yerr=stds, label=STUDENTS[student])
  teacher = next(r['teacher']['spearman'] for rows in results.values() for runs in rows.values()
                 for r in runs)
  ax.axhline(teacher, color='k', ls='--', lw=1, label='teacher')
  ax.set_xticks(np.arange(len(recipes)) + width * (len(results) - 1) / 2)
  ax.set_xticklabels(recipes, rotation=20)
  ax.set_ylabel('STS-B dev Spearman')
  lo = min(np.nanmin([r['student']['spearman'] for rows in results.values()
                      for runs in rows.values() for r in runs]) - 1, teacher - 1)
  ax.set_ylim(lo, teacher + 0.5)
  ax.legend(loc='lower right', fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv):
  del argv
  results = {}
  for student in _STUDENTS.value:
    results[student] = {}
    for recipe in _RECIPES.value:
      runs = [run(student, recipe, s) for s in _SEEDS.value]
      results[student][recipe] = [r for r in runs if r is not None]
  text = table(results) + (f'\n\n{_NOTE.value}' if _NOTE.value else '')
  report.write(_OUT.value, 'minilm_sts', text, lambda path: plot(results, path))


if __name__ == '__main__':
  app.run(main)
