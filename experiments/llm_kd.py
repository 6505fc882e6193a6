r"""SmolLM2-135M-Instruct distilled into a 20-layer cut of itself, objective by objective, over seeds.

  KD_DATA_DIR=../shared/data .venv/bin/python experiments/llm_kd.py \
      --seeds=0,1,2 --workdir=/tmp/kd/llm_kd [--rows=kd,ce7_kl3,reverse_kl,kl_hidden,gkd]

Every (row, seed) is one run of configs/llm/smollm2_kd.py in <workdir>/<row>/seed_<s>, resumable.
The `kd` run is the demo itself: it also gives the teacher, the untrained cut and the CE-only
student trained on the same tokens; the other text rows change only the KD student's losses.
The `gkd` row is the chat task (`:chat,gkd=0.5`, STS-B paraphrase requests in the teacher's
chat template) with its own teacher, cut and CE rows on the same prompt/response rows. The
teacher-generated text of a seed is made once and copied to that seed's other runs. Writes
<out>/llm_kd.md (mean ± std over seeds of held-out perplexity and top-1 agreement with the
teacher, per held-out set, and how many seeds order the rows as claimed) with <out>/llm_kd.png,
and the per-seed results in <out>/llm_kd.runs.json. About 10 minutes for a seed's `kd` run and
5 for each other row on a 2-core CPU.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
from absl import app
from absl import flags

from kd.eval import report

_SEEDS = flags.DEFINE_list('seeds', ['0', '1', '2'], 'Seeds to run.')
_ROWS = flags.DEFINE_list('rows', ['kd', 'ce7_kl3', 'reverse_kl', 'kl_hidden', 'gkd'],
                          'KD students to train.')
_WORKDIR = flags.DEFINE_string('workdir', '/tmp/kd/llm_kd', 'Root of the runs.')
_OUT = flags.DEFINE_string('out', 'experiments/results', 'Where the table and plot go.')
_COLLECT = flags.DEFINE_bool('collect_only', False, "Only read finished runs' results.")
_PRIOR = flags.DEFINE_string('prior', None, 'An earlier llm_kd.runs.json: its (seed, row) results '
                             'join the table where this run has none.')

# Row -> (label, --config overrides of its KD student[, config arg]).
ROWS = {
    'kd': ('0.5·CE + 0.5·KL (T=1): the demo', []),
    'ce7_kl3': ('0.7·CE + 0.3·KL (T=1)', ["--config.losses={'ce': 0.7, 'kl': 0.3}"]),
    # Not in the default rows (run on seed 1 only; experiments/results/llm_kd.md says how they did).
    'kl': ('KL only (T=1)', ["--config.losses={'kl': 1.0}"]),
    'kl_t2': ('0.5·CE + 0.5·T²·KL (T=2)', ['--config.temperature=2.0']),
    'reverse_kl': ('0.5·CE + 0.5·reverse KL', ["--config.losses={'ce': 0.5, 'reverse_kl': 0.5}"]),
    'kl_hidden': ('0.5·CE + 0.5·KL + 0.1·hidden-state MSE (kept layers)',
                  ["--config.losses={'ce': 0.5, 'kl': 0.5, 'hidden_mse': 0.1}"]),
    # Chat: STS-B paraphrase requests in the teacher's template, as prompt/response rows; half
    # the batches' answers are the student's own samples (GKD), the rest the references.
    'gkd': ('chat: GKD, JSD (β = 0.5), half the answers sampled by the student', [],
            'chat,gkd=0.5'),
}
# Rows a run with its own baseline gives besides its KD student: name in results.json -> label;
# the chat run's get the prefix 'chat_'.
SHARED = {'teacher': 'teacher (30 layers)', 'student_init': 'the cut, untrained',
          'student_ce': 'CE only, same tokens'}
BASELINES = {'kd': '', 'gkd': 'chat_'}  # rows whose run also trains the CE baseline


def run(row: str, seed: str) -> dict | None:
  workdir = os.path.join(_WORKDIR.value, row, f'seed_{seed}')
  result = os.path.join(workdir, 'results.json')
  if not _COLLECT.value and not os.path.exists(result):
    shared = os.path.join(_WORKDIR.value, 'kd', f'seed_{seed}', 'synthetic.jsonl')
    if len(ROWS[row]) == 2 and row != 'kd' and os.path.exists(shared):  # read, not sampled
      os.makedirs(workdir, exist_ok=True)
      shutil.copy(shared, os.path.join(workdir, 'synthetic.jsonl'))
    # The kd run exports its three students for experiments/llm_ranking.py.
    extra = (['--config.export_all=True'] if row == 'kd'
             else [] if row in BASELINES else ['--config.baseline=False', '--config.export=False'])
    arg = ROWS[row][2] if len(ROWS[row]) > 2 else ''
    config = 'configs/llm/smollm2_kd.py' + (f':{arg}' if arg else '')
    cmd = [sys.executable, '-m', 'kd.main', f'--config={config}',
           f'--workdir={workdir}', f'--config.seed={seed}', '--config.train.progress=False',
           *extra, *ROWS[row][1]]
    subprocess.run(cmd, check=True)
  if not os.path.exists(result):
    return None
  with open(result) as f:
    return json.load(f)


def collect() -> dict:
  """{seed: {row: result}}: the shared rows from each seed's `kd` run, then each KD row."""
  runs = {}
  for seed in _SEEDS.value:
    got = {}
    for row in _ROWS.value:
      r = run(row, seed)
      if r is None:
        continue
      if row in BASELINES:
        got.update({BASELINES[row] + name: r[name] for name in SHARED if name in r})
      got[row] = r['student_kd']
    runs[seed] = got
  return runs


def _sets(runs) -> list[str]:
  """Every held-out set of any row, in order of appearance (text rows, then chat rows)."""
  is_chat = lambda name: name.startswith('chat_') or len(ROWS.get(name, ())) > 2
  return list(dict.fromkeys(s for chat in (False, True) for rows in runs.values()
                            for name, r in rows.items() if is_chat(name) == chat
                            and isinstance(r, dict) for s in r['eval']))


def table(runs: dict) -> str:
  sets = _sets(runs)
  labels = {**SHARED, **{f'chat_{k}': f'chat: {v}' for k, v in SHARED.items()},
            **{k: v[0] for k, v in ROWS.items()}}
  text = [r for r in ROWS if r in _ROWS.value and len(ROWS[r]) == 2]
  chat = [r for r in ROWS if r in _ROWS.value and len(ROWS[r]) > 2]
  order = ['teacher', 'student_init', 'student_ce'] + text + [f'chat_{n}' for n in SHARED] + chat
  lines = ['Held-out perplexity (lower is better) and top-1 agreement with the teacher, mean ± '
           f'std over seeds {", ".join(runs)}. Teacher SmolLM2-135M-Instruct (4-bit GGUF, '
           'dequantized); student: its layers 0-13 and 24-29; 40 steps of 4 × 128 tokens, half '
           'Tiny Shakespeare (first 90%), half text the teacher wrote from the openings of STS-B '
           'train sentences (`configs/llm/smollm2_kd.py`). Chat rows (`:chat,gkd=0.5`): 40 '
           'steps of 8 prompt/response rows (64 + 40 tokens) of STS-B paraphrase requests in the '
           "teacher's chat template, scored on the reference answers of held-out requests.", '',
           '| model | seeds | ' + ' | '.join(f'ppl {s}' for s in sets) + ' | '
           + ' | '.join(f'agree {s}' for s in sets) + ' |',
           '|---|---:|' + '---:|' * (2 * len(sets))]
  for row in order:
    got = [rows[row] for rows in runs.values() if row in rows]
    if not got:
      continue
    has = lambda s: s in got[0]['eval']
    cells = [report.mean_std([g['eval'][s]['perplexity'] for g in got]) if has(s) else '-'
             for s in sets]
    cells += ['-' if row.endswith('teacher') or not has(s) else
              report.mean_std([g['eval'][s]['agreement'] for g in got], scale=100, digits=1)
              + '%' for s in sets]
    lines.append(f'| {labels[row]} | {len(got)} | ' + ' | '.join(cells) + ' |')
  claims = ([(r, 'student_ce') for r in text] + [('student_ce', 'student_init')]
            + [(r, 'chat_student_ce') for r in chat] + [('chat_student_ce', 'chat_student_init')])
  for better, worse in claims:
    for s in sets:
      pairs = [(rows[better]['eval'][s]['perplexity'], rows[worse]['eval'][s]['perplexity'])
               for rows in runs.values() if better in rows and worse in rows
               and s in rows[better]['eval'] and s in rows[worse]['eval']]
      if not pairs:
        continue
      wins = sum(a < b for a, b in pairs)
      lines.append(f'\n{labels[better]} below {labels[worse]} on {s}: {wins} of {len(pairs)} '
                   'seeds.')
  answered = [r for r in order if any('answer_teacher_nll' in v.get(r, {}) for v in runs.values())]
  if answered:
    lines.append('\nChat: per-token NLL under the teacher of each model\'s greedy answers to the '
                 '16 held-out prompts (lower: more teacher-like): ' + ', '.join(
                     f"{labels[r]} " + report.mean_std(
                         [v[r]['answer_teacher_nll'] for v in runs.values() if r in v], digits=3)
                     for r in answered) + '.')
  return '\n'.join(lines)


def plot(runs: dict):
  def draw(path):
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    sets = _sets(runs)
    names = ['teacher', 'student_ce'] + list(ROWS) + ['chat_teacher', 'chat_student_ce']
    fig, axes = plt.subplots(1, len(sets), figsize=(5 * len(sets), 3.5))
    for ax, s in zip(np.atleast_1d(axes), sets):
      rows = [r for r in names if any(s in v[r]['eval'] for v in runs.values() if r in v)]
      vals = [[v[r]['eval'][s]['perplexity'] for v in runs.values() if r in v] for r in rows]
      ax.bar(range(len(rows)), [np.mean(v) for v in vals],
             yerr=[np.std(v, ddof=1) if len(v) > 1 else 0 for v in vals])
      ax.set_xticks(range(len(rows)), rows, rotation=30, ha='right')
      ax.set_title(f'held-out perplexity, {s}')
    fig.tight_layout()
    fig.savefig(path, dpi=120)
  return draw


def main(argv):
  del argv
  runs = collect()
  if _PRIOR.value:
    runs = report.merge_runs(runs, report.load_runs(_PRIOR.value))
  report.write(_OUT.value, 'llm_kd', table(runs), plot(runs), runs=runs)


if __name__ == '__main__':
  app.run(main)
