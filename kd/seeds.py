"""Rows x seeds of `python -m kd.main` runs, the runs of one seed sharing one teacher.

  ROWS = {'kl_T2': ('kl, T=2', 'kl', {}), 'jsd': ('jsd', 'jsd', {}, 'distill', 'student_kd')}
  runs = seeds.run_seeds(['kl_T2', 'jsd'], ['0', '1'], workdir=ROOT, row_specs=ROWS)

A row is (label, objective (the config's `objective=`), {config key: value}[, experiment
NAME[:ARGS] of configs/shakespeare/ (default: distill)[, its student's key in results.json
(default: student_kd)]]). Row `r` of seed `s` runs in ROOT/seed_<s>/<r> with
`config.teacher.workdir=ROOT/seed_<s>/teacher`, so the seed's first run trains the teacher and the
others restore it; a run with a results.json is not run again. The results are {seed: {row:
result, 'teacher': result}}, the form kd.eval.report saves beside a table (<stem>.runs.json) and
merges with an earlier session's (--prior). `define_flags` and `run_experiment` are the command
line and the main of an experiment script built on this.
"""

import ast
import json
import os
import subprocess
import sys
import time

from absl import app
from absl import flags

from kd import sweep
from kd.eval import report

REPO = sweep.REPO


def config_file(experiment: str, config_arg: str, objective: str) -> str:
  """The `--config` value (relative to REPO) of a row: `experiment` is NAME[:ARGS], a file of
  configs/shakespeare/ ('' = distill) with its args; `config_arg` (e.g. 'tiny') goes first."""
  name, _, args = experiment.partition(':')
  arg = ','.join([a for a in f'{config_arg},{args}'.split(',') if a] + [f'objective={objective}'])
  return f'configs/shakespeare/{name or "distill"}.py:{arg}'


def load_config(experiment: str, config_arg: str, objective: str):
  """The config `config_file(...)` names, built in this process."""
  path, _, arg = config_file(experiment, config_arg, objective).partition(':')
  return sweep.load(os.path.join(REPO, path))[0].get_config(arg)


def literal(value: str):
  """An override's value as a Python literal, else the string itself ('0,3' -> (0, 3),
  '1e-3' -> 0.001, 'DIR' -> 'DIR')."""
  try:
    return ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return value


def override(config, settings: dict, overrides=()) -> None:
  """Sets a row's {config key: value} and the 'key=value' strings of `overrides` (values read
  by `literal`) on `config` in place: the config a run's command gets, built here."""
  with config.ignore_type():
    config.update_from_flattened_dict(
        {**settings, **{k: literal(v) for k, v in (o.split('=', 1) for o in overrides)}})


def command(row: str, seed: str, *, workdir: str, row_specs: dict, config_arg: str = '',
            overrides=()) -> list[str]:
  """The `kd.main` command of one (row, seed) of `row_specs`."""
  _, objective, settings, *rest = row_specs[row]
  config = config_file(rest[0] if rest else '', config_arg, objective)
  return [sys.executable, '-m', 'kd.main', f'--config={config}',
          f'--workdir={os.path.join(workdir, f"seed_{seed}", row)}', f'--config.seed={seed}',
          '--config.baseline=False', '--config.train.progress=False',
          f'--config.teacher.workdir={os.path.join(workdir, f"seed_{seed}", "teacher")}',
          *[f'--config.{k}={v}' for k, v in settings.items()],
          *[f'--config.{o}' for o in overrides]]


def run(row: str, seed: str, *, workdir: str, collect_only: bool = False, command=command,
        **kw) -> dict | None:
  """One (row, seed): `command(row, seed, workdir=workdir, **kw)` run from REPO unless its
  results.json exists (or `collect_only`); the results, or None."""
  result = os.path.join(workdir, f'seed_{seed}', row, 'results.json')
  if not collect_only and not os.path.exists(result):
    t0 = time.perf_counter()
    subprocess.run(command(row, seed, workdir=workdir, **kw), check=True, cwd=REPO)
    print(f'{row} seed {seed}: {time.perf_counter() - t0:.0f} s', flush=True)
  if not os.path.exists(result):
    return None
  with open(result) as f:
    return json.load(f)


def run_seeds(rows, seeds, *, row_specs: dict, **kw) -> dict:
  """{seed: {row: result, 'teacher': its teacher's}} of the runs that have results, seed by
  seed, so the first run of a seed trains its teacher."""
  runs = {}
  for seed in seeds:
    runs[seed] = {}
    for row in rows:
      r = run(row, seed, row_specs=row_specs, **kw)
      if r is not None:
        spec = row_specs[row]
        runs[seed][row] = r[spec[4] if len(spec) > 4 else 'student_kd']
        runs[seed]['teacher'] = r['teacher']
  return runs


def load_prior(path: str | None) -> dict:
  """The --prior runs file ({} without one), read before anything runs so a bad path fails
  first: its seeds join the table without being rerun."""
  try:
    return report.load_runs(path) if path else {}
  except (OSError, ValueError) as e:
    raise app.UsageError(str(e)) from None


def check_finished(runs: dict, rows, workdir: str) -> None:
  """Refuses a table in which none of `rows` has a result."""
  if not any(row in got for got in runs.values() for row in rows):
    raise app.UsageError(f'no finished runs under {workdir}')


def define_flags(rows, workdir: str) -> None:
  """The command line (`rows`: the row names, the default --rows); defined by the script run,
  not on import, so tests can import experiment scripts."""
  flags.DEFINE_list('seeds', ['0', '1', '2'], 'Seeds to run.')
  flags.DEFINE_list('rows', list(rows), 'Rows of the table.')
  flags.DEFINE_string('workdir', workdir, 'Root of the runs.')
  flags.DEFINE_string('out', 'experiments/results', 'Where the table and plot go.')
  flags.DEFINE_string('config_arg', '', "Args added to every row's config (e.g. tiny).")
  flags.DEFINE_multi_string('override', [], 'Extra --config.k=v overrides.')
  flags.DEFINE_bool('collect_only', False, "Only read finished runs' results.")
  flags.DEFINE_string('prior', None, 'A <stem>.runs.json of earlier runs (the one written next '
                      'to the table): its seeds join the table; this run wins where both have a '
                      'result. E.g. --seeds=2 --prior=experiments/results/<stem>.runs.json.')


def run_experiment(stem: str, table_fn, plot_fn, row_specs: dict) -> None:
  """The flags' rows x seeds (running what is missing) with --prior's, then <out>/<stem>.md,
  .png and .runs.json (the per-seed results, a later --prior)."""
  f = flags.FLAGS
  unknown = sorted(set(f.rows) - set(row_specs))
  if unknown:
    raise app.UsageError(f'unknown rows {unknown}; valid: {", ".join(row_specs)}')
  prior = load_prior(f.prior)
  runs = report.merge_runs(run_seeds(f.rows, f.seeds, workdir=f.workdir,
                                     collect_only=f.collect_only, config_arg=f.config_arg,
                                     overrides=f.override, row_specs=row_specs), prior)
  check_finished(runs, f.rows, f.workdir)
  results = report.by_row(runs, ['teacher', *f.rows])
  report.write(f.out, stem, table_fn(results), lambda path: plot_fn(results, path), runs=runs)
