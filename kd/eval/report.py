"""Result tables and plots over seeds: mean ± std cells, a table of rows x columns, paired
differences within a seed, a metric against stored size, writing a table with its plot, and the
per-seed results behind it (<stem>.runs.json), so a later session can add seeds without rerunning
the earlier ones (`merge_runs`)."""

import json
import os
import subprocess
from typing import Callable

import numpy as np


def mean_std(values, scale: float = 1.0, digits: int = 2) -> str:
  """'m ± s' of `values` × scale (s: the sample std, ddof=1); just 'm' for a single value."""
  v = np.asarray(values, np.float64) * scale
  fmt = lambda x: f'{round(x, digits) + 0.0:.{digits}f}'  # (+ 0.0: no '-0.00' for a tiny -x)
  if len(v) == 1:
    return fmt(v[0])
  return f'{fmt(v.mean())} ± {fmt(v.std(ddof=1))}'


def table(results: dict, columns, caption: str, labels: dict) -> str:
  """Markdown: one row per entry of `results` ({row: [result of each seed]}) with a result,
  labelled by `labels` ({row: label}), then `columns` of (key, title, scale, digits) as mean ±
  std over the seeds that have the key ('-' where none has); `caption` may use {n} (seeds)."""
  n = max(len(v) for v in results.values())
  lines = [caption.format(n=n), '',
           '| student | ' + ' | '.join(c[1] for c in columns) + ' |',
           '|---|' + '---:|' * len(columns)]
  for row, runs in results.items():
    if not runs:
      continue
    values = [[r[k] for r in runs if k in r] for k, _, _, _ in columns]  # seeds that have it
    cells = [mean_std(v, s, d) if v else '-' for v, (_, _, s, d) in zip(values, columns)]
    lines.append(f'| {labels[row]} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def paired(runs: dict, key: str, base: str) -> dict:
  """`runs` with `<key>_vs_<base>` added to each row's result: its `key` minus the same seed's
  `base` row's. The paired difference drops the seed-to-seed spread that rows share (most of
  it comes from the seed's teacher)."""
  out = {}
  for seed, rows in runs.items():
    ref = rows.get(base, {}).get(key)
    out[seed] = {r: dict(v, **{f'{key}_vs_{base}': v[key] - ref})
                 if ref is not None and isinstance(v, dict) and key in v else v
                 for r, v in rows.items()}
  return out


def overlapping_labels(points: dict, x_rel: float = 0.02, y_frac: float = 0.04) -> dict:
  """{(x, y) of a row's point: [that row and the later rows drawn on top of it]}, from {row:
  (x, y)}: on top means x within x_rel of it (x is drawn on a log scale) and y within y_frac of
  the plot's y range."""
  ys = [y for _, y in points.values()]
  y_tol = y_frac * ((max(ys) - min(ys)) if ys else 0.0)
  groups = {}
  for row, (x, y) in points.items():
    near = next((p for p in groups if abs(x - p[0]) <= x_rel * p[0] and abs(y - p[1]) <= y_tol),
                None)
    groups.setdefault(near or (x, y), []).append(row)
  return groups


def size_plot(results: dict, path: str, metric: str, ylabel: str) -> None:
  """`metric` against stored size ('stored_bytes'), one point per row of `results` ({row:
  [result of each seed]}, means over seeds); rows whose points fall on one another share one
  label ('ptq8, qat8')."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7, 4.5))
  points = {row: (np.mean([r['stored_bytes'] for r in runs]) / 1024,
                  np.mean([r[metric] for r in runs]))
            for row, runs in results.items() if runs and 'stored_bytes' in runs[0]}
  for (x, y), rows in overlapping_labels(points).items():
    ax.scatter(x, y)
    ax.annotate(', '.join(rows), (x, y), fontsize=8, xytext=(3, 3), textcoords='offset points')
  ax.set_xscale('log')
  ax.set_xlabel('stored student (KB, log scale)')
  ax.set_ylabel(ylabel)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write(out_dir: str, stem: str, text: str, plot: Callable[[str], None] | None = None,
          runs: dict | None = None) -> None:
  """Writes <out_dir>/<stem>.md (and <stem>.png through `plot(path)`, <stem>.runs.json from
  `runs`, see `save_runs`), then prints the table."""
  os.makedirs(out_dir, exist_ok=True)
  if runs is not None:
    save_runs(os.path.join(out_dir, f'{stem}.runs.json'), runs)
  with open(os.path.join(out_dir, f'{stem}.md'), 'w') as f:
    f.write(text + '\n')
  if plot is not None:
    plot(os.path.join(out_dir, f'{stem}.png'))
  print(text)


# Per-seed results: {seed: {row: result dict}} ('teacher' is a row like any other), as
# <stem>.runs.json. Each seed also holds COMMIT: the git commit of the process that collected
# it. A row trained by kd.main holds its own COMMIT too (`stamp`): the commit its run started
# from, which is the code it trained with even when the collecting process started later.
COMMIT = '_commit'


def _head() -> str:
  """This checkout's git commit (with '-dirty' if tracked files changed), or '' outside one."""
  def git(*args):
    return subprocess.run(['git', *args], capture_output=True, text=True, check=True,
                          cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
  try:
    head = git('rev-parse', 'HEAD')
    return head + ('-dirty' if git('status', '--porcelain', '--untracked-files=no') else '')
  except (OSError, subprocess.CalledProcessError):
    return ''


# Taken when the experiment starts (it imports this module), so a commit made while it runs is
# not credited with its results.
HEAD = _head()


def write_results(workdir: str, results: dict, table: str) -> None:
  """A job's <workdir>/results.json (every number, with the commit it ran: `stamp`) and
  results.md (`table`), then the table printed; by process 0 only, since every process holds
  the same results."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() != 0:
    return
  write_atomic(os.path.join(workdir, 'results.json'), json.dumps(stamp(results), indent=1))
  write_atomic(os.path.join(workdir, 'results.md'), table + '\n')
  print(table)


def write_atomic(path: str, text: str) -> None:
  """`text` to `path` through a temporary file beside it and a rename: a reader, a kill or a
  full disk never leaves `path` half written (a failed write removes the temporary file)."""
  tmp = f'{path}.tmp{os.getpid()}'
  try:
    with open(tmp, 'w', encoding='utf-8') as f:
      f.write(text)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def stamp(results: dict) -> dict:
  """A run's {row: metrics} (as written to its results.json) with HEAD under COMMIT in each
  row, so tables collected from it later can tell which code trained each row."""
  return {name: {**r, COMMIT: HEAD} for name, r in results.items()}


def save_runs(path: str, runs: dict) -> None:
  """Writes `runs` ({seed: {row: result}}) to `path` atomically; seeds with results but no
  COMMIT yet (made by this process) get HEAD, the commit this process started from."""
  data = {str(s): {COMMIT: HEAD, **r} if r and COMMIT not in r else r for s, r in runs.items()}
  write_atomic(path, json.dumps(data, indent=1, sort_keys=True))


def load_runs(path: str) -> dict:
  """The {seed: {row: result}} that `save_runs` (or `write(..., runs=)`) wrote."""
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} does not exist; --prior takes a <stem>.runs.json written '
                            'by an earlier run of the experiment (e.g. under experiments/results).')
  with open(path) as f:
    data = json.load(f)
  if not isinstance(data, dict) or not all(isinstance(r, dict) for r in data.values()):
    raise ValueError(f'{path} is not a runs file: it needs {{seed: {{row: result}}}}.')
  return data


def merge_runs(runs: dict, prior: dict) -> dict:
  """`runs` with every (seed, row) that only `prior` has added: this run's results (and its
  COMMIT) win where both have one; a seed with no result in either is left out. Seeds are
  ordered by number."""
  merged = {str(s): dict(r) for s, r in prior.items() if r}
  for seed, rows in runs.items():
    if rows:
      merged.setdefault(str(seed), {}).pop(COMMIT, None)
      merged[str(seed)].update(rows)
  key = lambda s: (0, int(s), s) if s.lstrip('-').isdigit() else (1, 0, s)
  return {s: merged[s] for s in sorted(merged, key=key)}


def by_row(runs: dict, rows) -> dict:
  """{row: [its result in each seed that has one]} for `rows`, seeds in `runs`' order."""
  return {row: [r[row] for r in runs.values() if row in r] for row in rows}


def bubbles(ax, rows: list[dict], x: str, y: str, size: str) -> None:
  """One labelled marker per row on a matplotlib `ax`: at (row[x], mean of row['per_seed'][y])
  with its std over seeds as an error bar, area proportional to row[size]."""
  biggest = max(float(r[size]) for r in rows)
  for row in rows:
    ys = row['per_seed'][y]
    ax.errorbar(row[x], np.mean(ys), yerr=np.std(ys), fmt='none', color='gray')
    ax.scatter(row[x], np.mean(ys), s=600 * float(row[size]) / biggest, alpha=0.6)
    ax.annotate(row['name'], (row[x], np.mean(ys)), textcoords='offset points', xytext=(6, 6),
                fontsize=8)
  ax.margins(0.2)
