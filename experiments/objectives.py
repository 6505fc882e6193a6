r"""Distillation objectives for the Shakespeare decoder, over seeds: which divergence, T and α.

  KD_DATA_DIR=../shared/data .venv/bin/python experiments/objectives.py \
      --seeds=0,1,2 --workdir=/tmp/kd/objectives [--rows=...] [--config_arg=tiny] [--out=DIR]

Every (row, seed) is one run of configs/shakespeare/distill.py (`:objective=NAME` plus the row's
overrides, `baseline=False`) in <workdir>/seed_<s>/<row>; the runs of one seed share one teacher
(<workdir>/seed_<s>/teacher, `config.teacher.workdir`), trained by the first and restored by the
rest (kd.seeds). A run with a results.json is not run again. Rows (ROWS): no KD; kl at T = 1, 2,
4; reverse_kl; jsd at β = 0.1, 0.5, 0.9; tvd; skew_kl; skew_reverse_kl (skew 0.1), all with
α = 0.5 and T = 2 unless named; and α ∈ {0, 0.25, 0.75} for kl at T = 2 (α = 0.5 is the kl T=2
row, α = 1 the no-KD row). Writes <out>/objectives.md (mean ± std over seeds of held-out
perplexity, teacher-student top-1 agreement, expected calibration error over 15 bins) and
<out>/objectives.png. On a 2-core CPU: the teacher ~5.5 min, each of the 14 student runs ~3 min
(160 s of training plus start-up and the teacher's restore and eval), so ~50 min per seed and
~2.5 h for 3 seeds. Smoke test (~5 min): --config_arg=tiny --seeds=0,1 --rows=ce,kl_T2,jsd_b0.1
--workdir=/tmp/obj_tiny --out=/tmp/obj_tiny_out.
"""

import numpy as np
from absl import app

from kd import seeds
from kd.eval import report

# name -> (label, objective (the config's `objective=`), {config key: value}).
# A row may add an experiment of configs/shakespeare/ (default: distill) with its args, e.g.
# 'gkd:fraction=0.5', and the key of its student in results.json (kd.seeds' row specs).
ROWS = {
    'ce': ('no KD (CE only)', 'ce', {}),
    'kl_T1': ('kl, T=1', 'kl', {'temperature': 1.0}),
    'kl_T2': ('kl, T=2', 'kl', {}),
    'kl_T4': ('kl, T=4', 'kl', {'temperature': 4.0}),
    'reverse_kl': ('reverse_kl', 'reverse_kl', {}),
    'jsd_b0.1': ('jsd, β=0.1', 'jsd', {'loss_kwargs.jsd.beta': 0.1}),
    'jsd_b0.5': ('jsd, β=0.5', 'jsd', {'loss_kwargs.jsd.beta': 0.5}),
    'jsd_b0.9': ('jsd, β=0.9', 'jsd', {'loss_kwargs.jsd.beta': 0.9}),
    'tvd': ('tvd', 'tvd', {}),
    'skew_kl': ('skew_kl (skew 0.1)', 'skew_kl', {}),
    'skew_reverse_kl': ('skew_reverse_kl (skew 0.1)', 'skew_reverse_kl', {}),
    'kl_T2_a0': ('kl, T=2, α=0 (no CE)', 'kl', {'alpha': 0.0}),
    'kl_T2_a0.25': ('kl, T=2, α=0.25', 'kl', {'alpha': 0.25}),
    'kl_T2_a0.75': ('kl, T=2, α=0.75', 'kl', {'alpha': 0.75}),
}
# The α sweep of kl at T=2, from the rows above: α -> row.
ALPHA_SWEEP = {0.0: 'kl_T2_a0', 0.25: 'kl_T2_a0.25', 0.5: 'kl_T2', 0.75: 'kl_T2_a0.75',
               1.0: 'ce'}
# (results key, column title, scale, digits, lower is better)
METRICS = (('perplexity', 'perplexity', 1.0, 2, True),
           ('agreement', 'top-1 agreement with teacher (%)', 100.0, 1, False),
           ('ece', 'ECE (%)', 100.0, 2, True))


def _line(label, runs, n_seeds, best) -> str:
  cells = []
  for key, _, scale, digits, _ in METRICS:
    if not runs or key not in runs[0]:
      cells.append('-')
      continue
    cell = report.mean_std([r[key] for r in runs], scale, digits)
    cells.append(f'**{cell}**' if best.get(key) == label else cell)
  note = '' if len(runs) == n_seeds else f' ({len(runs)} seeds)'
  return f'| {label}{note} | ' + ' | '.join(cells) + ' |'


def table(results: dict) -> str:
  """Markdown: the teacher, every objective row, then the α sweep; the best mean in bold."""
  sweep = set(ALPHA_SWEEP.values()) - {'kl_T2', 'ce'}  # rows only in the α table
  students = {ROWS[r][0]: runs for r, runs in results.items()
              if r in ROWS and runs and r not in sweep}
  n = max([len(v) for v in results.values()] + [0])
  best = {}
  for key, _, _, _, lower in METRICS:
    means = {label: np.mean([r[key] for r in runs]) for label, runs in students.items()
             if key in runs[0]}
    if means:
      best[key] = (min if lower else max)(means, key=means.get)
  head = ['| model | ' + ' | '.join(m[1] for m in METRICS) + ' |',
          '|---|' + '---:|' * len(METRICS)]
  lines = [f'Tiny Shakespeare validation split, {n} seeds (mean ± std over seeds). Student loss '
           'α·CE + (1−α)·D(p_T, p_S) with D at temperature T (T² scaled); α = 0.5 and T = 2 '
           'unless the row says otherwise. ECE: 15 equal-width confidence bins over next-token '
           'max softmax probability. Best student mean in bold.', '', *head]
  if results.get('teacher'):
    lines.append(_line('teacher', results['teacher'], n, {}))
  lines += [_line(label, runs, n, best) for label, runs in students.items()]
  if any(results.get(r) for r in sweep):
    lines += ['', 'α sweep, kl at T = 2 (α = 1 is CE only: the no-KD row).', '', *head]
    lines += [_line(f'α = {a:g}', results[r], n, {}) for a, r in ALPHA_SWEEP.items()
              if results.get(r)]
  return '\n'.join(lines)


def plot(results: dict, path: str) -> None:
  """One panel per metric: mean ± std over seeds per row; the teacher as a dashed line."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  rows = [r for r in results if r in ROWS and results[r]]
  labels = [ROWS[r][0] for r in rows]
  fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 0.4 * len(rows) + 1.5),
                           sharey=True)
  y = np.arange(len(rows))
  for ax, (key, title, scale, _, _) in zip(axes, METRICS):
    vals = [np.asarray([x[key] for x in results[r]], np.float64) * scale for r in rows]
    std = [v.std(ddof=1) if len(v) > 1 else 0.0 for v in vals]
    ax.barh(y, [v.mean() for v in vals], xerr=std, color='tab:blue', alpha=0.8, capsize=3)
    lo = min(v.mean() - s for v, s in zip(vals, std))
    teacher = results.get('teacher') or []
    if teacher and key in teacher[0]:
      t = np.mean([x[key] for x in teacher]) * scale
      ax.axvline(t, color='k', ls='--', lw=1, label='teacher')
      lo = min(lo, t)
      ax.legend(loc='lower right', fontsize=8)
    hi = max(v.mean() + s for v, s in zip(vals, std))
    if key == 'perplexity':  # the differences are small next to the value itself
      ax.set_xlim(lo - 0.1 * (hi - lo), hi + 0.1 * (hi - lo))
    ax.set_title(title, fontsize=10)
    ax.grid(axis='x', alpha=0.3)
  axes[0].set_yticks(y, labels, fontsize=9)
  axes[0].invert_yaxis()
  n = len((results.get('teacher') or results[rows[0]]))
  fig.suptitle(f'Distillation objectives, Tiny Shakespeare decoder ({n} seeds, mean ± std)',
               fontsize=11)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  del argv
  seeds.run_experiment('objectives', table, plot, ROWS)


if __name__ == '__main__':
  seeds.define_flags(ROWS, '/tmp/kd/objectives')
  app.run(main)
