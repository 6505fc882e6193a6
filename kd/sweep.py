r"""Expands a config's sweep into runs of `kd.main`, one workdir per point, and tabulates them.

  python -m kd.sweep configs/shakespeare/distill.py[:arg] --workdir=ROOT [--dry-run]
      [--override=k=v ...] [--grid=k=v1,v2,... ...] [--launch=local|tpu]
      [--tpu_args='--name=kd --zone=...'] [--summary]

The config file defines `get_hyper(hyper)` (big_vision style) or a module-level generator
`sweep()` yielding dicts; keys are config paths, with or without a leading 'config.':

  def get_hyper(hyper):
    return hyper.product([hyper.sweep('config.seed', [0, 1, 2]),
                          hyper.sweep('config.temperature', [1.0, 2.0])])

`--grid` (repeatable) sweeps from the command line instead: the product of the grids replaces
the config's own sweep, e.g. `--grid=optimizer.lr=1e-3,1e-2 --grid=peft.rank=8,64` (values are
Python literals, `(0,3),(0,5)` included; bare words are strings).

Each point runs `python -m kd.main --config=FILE[:arg] --workdir=ROOT/<name> --config.k=v ...`,
where <name> is built from the values that vary (e.g. `seed_0-temperature_1.0`); `--override`
values are added to every point. Every key is checked against the built config before anything
runs. `--launch=local` runs the points one after another, carries on past failures, then writes
the summary; a point that exits with kd's preemption code (75: it checkpointed on SIGTERM) runs
again and resumes, up to `--retries` times, unless the sweep itself was told to stop.
`--launch=tpu` starts each point on its own TPU VM via launch_tpu.sh (VM name `<--name>-<i>`,
ROOT must be gs://). `--summary` alone only collects each point's results.json
into ROOT/summary.md: one row per point and result row (teacher, student_kd, ...).
"""

import argparse
import ast
import importlib.util
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import types

PREEMPTED = 75  # kd.main's exit code after a checkpoint on SIGTERM (kd.train.preemption)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The `hyper` helper handed to get_hyper: each function returns a list of {key: value} points.
def _sweep(name, values):
  return [{name: v} for v in values]


def _fixed(name, value, length=1):
  return [{name: value}] * length


def _product(*parts):
  parts = parts[0] if len(parts) == 1 and _is_list_of_lists(parts[0]) else parts
  return [dict(kv for d in combo for kv in d.items()) for combo in itertools.product(*parts)]


def _zip(*parts):
  parts = parts[0] if len(parts) == 1 and _is_list_of_lists(parts[0]) else parts
  if len({len(p) for p in parts}) > 1:
    raise ValueError(f'hyper.zip needs parts of equal length, got {[len(p) for p in parts]}')
  return [dict(kv for d in combo for kv in d.items()) for combo in zip(*parts)]


def _is_list_of_lists(x):
  return isinstance(x, (list, tuple)) and all(isinstance(p, (list, tuple)) for p in x)


hyper = types.SimpleNamespace(sweep=_sweep, fixed=_fixed, product=_product, zip=_zip)


def load(config_arg: str):
  """`FILE[:arg]` -> (config module, arg or None)."""
  path, _, arg = config_arg.partition(':')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'no config file {path}')
  spec = importlib.util.spec_from_file_location('kd_sweep_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module, (arg or None)


def points(module) -> list[dict]:
  """The config's sweep as a list of {config path: value}, 'config.' prefixes dropped."""
  if hasattr(module, 'get_hyper'):
    raw = module.get_hyper(hyper)
  elif hasattr(module, 'sweep'):
    raw = list(module.sweep())
  else:
    raise ValueError(f'{module.__file__} defines neither get_hyper(hyper) nor sweep()')
  return [{k.removeprefix('config.'): v for k, v in p.items()} for p in raw]


def grid_points(grids) -> list[dict]:
  """The product of `--grid` values 'k=v1,v2,...' as points (k without 'config.')."""
  parts = []
  for g in grids:
    key, eq, values = g.partition('=')
    if not eq or not key or not values:
      raise ValueError(f'--grid needs K=V1,V2,..., got {g!r}')
    try:
      parsed = ast.literal_eval(f'[{values}]')
    except (ValueError, SyntaxError):
      parsed = values.split(',')  # bare words: strings
    parts.append(_sweep(key.removeprefix('config.'), parsed))
  return _product(parts)


def check_keys(config, keys) -> None:
  """Fails unless every dotted key is a field of the config (what config_flags would accept)."""
  bad = []
  for key in keys:
    node = config
    for part in key.split('.'):
      if not hasattr(node, 'keys') or part not in node.keys():
        bad.append(key)
        break
      node = node[part]
  if bad:
    raise ValueError(f'unknown config keys in the sweep: {sorted(set(bad))}; '
                     'every key must name an existing field of the config')


def _fmt(v) -> str:
  return repr(v) if isinstance(v, float) else str(v)


def names(pts: list[dict]) -> list[str]:
  """A short, distinct directory name per point from the values that vary across points."""
  varying = [k for k in dict.fromkeys(k for p in pts for k in p)
             if len({_fmt(p.get(k)) for p in pts}) > 1]
  leaves = [k.rsplit('.', 1)[-1] for k in varying]
  labels = {k: (l if leaves.count(l) == 1 else k) for k, l in zip(varying, leaves)}
  out = []
  for i, p in enumerate(pts):
    name = '-'.join(f'{labels[k]}_{_fmt(p[k])}' for k in varying if k in p) or 'run'
    name = re.sub(r'[^A-Za-z0-9._=-]', '_', name)
    out.append(f'{name}-{i}' if name in out or pts.count(p) > 1 else name)
  return out


def commands(config_arg, root, pts, fixed=()) -> list[tuple[str, list[str]]]:
  """(name, kd.main arguments) per point."""
  return [(name, [f'--config={config_arg}', f'--workdir={root.rstrip("/")}/{name}',
                  *[f'--config.{k}={_fmt(v)}' for k, v in p.items()],
                  *[f'--config.{o}' for o in fixed]])
          for name, p in zip(names(pts), pts)]


def tpu_command(tpu_args: str, i: int, main_args: list[str]) -> list[str]:
  """launch_tpu.sh with the user's flags, the VM named <--name>-<i>, then the kd.main args."""
  args, name = [], None
  it = iter(shlex.split(tpu_args))
  for a in it:
    if a == '--name':
      name = next(it, None)
    elif a.startswith('--name='):
      name = a.split('=', 1)[1]
    else:
      args.append(a)
  if not name:
    raise ValueError("--launch=tpu needs --tpu_args='--name=... --zone=... ...'")
  return [os.path.join(REPO, 'launch_tpu.sh'), f'--name={name}-{i}', *args, '--', *main_args]


def summary(root, pts) -> str:
  """One markdown row per (point, result row): the point's values, then the row's metrics."""
  keys = list(dict.fromkeys(k for p in pts for k in p))
  rows, metrics, missing = [], {}, []
  for name, p in zip(names(pts), pts):
    path = os.path.join(root, name, 'results.json')
    if not os.path.exists(path):
      missing.append(name)
      continue
    with open(path) as f:
      results = json.load(f)
    for row, values in results.items():
      flat = {m: v for m, v in values.items() if isinstance(v, (int, float))}
      metrics.update(dict.fromkeys(flat))
      rows.append(([_fmt(p.get(k, '')) for k in keys], row, flat))
  cols = [*keys, 'row', *metrics]
  lines = ['| ' + ' | '.join(cols) + ' |', '|' + '---|' * (len(keys) + 1) + '---:|' * len(metrics)]
  for vals, row, flat in rows:
    cells = [f'{flat[m]:.4g}' if m in flat else '-' for m in metrics]
    lines.append('| ' + ' | '.join([*vals, row, *cells]) + ' |')
  if missing:
    lines += ['', f'No results.json yet for: {", ".join(missing)}.']
  return '\n'.join(lines)


def write_summary(root, pts) -> str:
  text = summary(root, pts)
  with open(os.path.join(root, 'summary.md'), 'w') as f:
    f.write(text + '\n')
  print(text)
  return text


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog='python -m kd.sweep', description=__doc__.split('\n')[0])
  p.add_argument('config', help='config file, optionally :arg (e.g. configs/x.py:tiny)')
  p.add_argument('--workdir', required=True, help='root; each point runs in ROOT/<name>')
  p.add_argument('--dry-run', '--dry_run', action='store_true', help='list the runs, run none')
  p.add_argument('--launch', choices=('local', 'tpu'), default='local')
  p.add_argument('--tpu_args', default='', help='flags for launch_tpu.sh (--launch=tpu)')
  p.add_argument('--override', action='append', default=[], metavar='K=V',
                 help='fixed override added to every point (repeatable)')
  p.add_argument('--grid', action='append', default=[], metavar='K=V1,V2',
                 help="sweep K over these values instead of the config's sweep (repeatable: "
                      'the product)')
  p.add_argument('--retries', type=int, default=3,
                 help='reruns of a point that exits preempted (code 75), local runs')
  p.add_argument('--summary', action='store_true', help='only collect results into summary.md')
  a = p.parse_args(argv)

  for o in a.override:
    if '=' not in o:
      p.error(f'--override needs K=V, got {o!r}')
  try:  # a bad sweep fails here, before anything runs
    module, arg = load(a.config)
    config = module.get_config(arg) if arg is not None else module.get_config()
    pts = grid_points(a.grid) if a.grid else points(module)
    check_keys(config, [*(k for pt in pts for k in pt),
                        *(o.split('=', 1)[0].removeprefix('config.') for o in a.override)])
  except (ValueError, FileNotFoundError) as e:
    p.error(str(e))
  fixed = [o.removeprefix('config.') for o in a.override]
  if a.summary:
    write_summary(a.workdir, pts)
    return 0

  runs = commands(a.config, a.workdir, pts, fixed)
  if a.launch == 'tpu':
    if not a.workdir.startswith('gs://'):
      p.error('--launch=tpu needs --workdir=gs://...')
    cmds = [tpu_command(a.tpu_args, i, args) for i, (_, args) in enumerate(runs)]
  else:
    cmds = [[sys.executable, '-m', 'kd.main', *args] for _, args in runs]
  if a.dry_run:
    print('\n'.join(shlex.join(c) for c in cmds))
    return 0

  failed, stop = [], []
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.append(signum))
  try:
    for i, ((name, _), cmd) in enumerate(zip(runs, cmds)):
      print(f'[{i + 1}/{len(cmds)}] {name}: {shlex.join(cmd)}', flush=True)
      rc = subprocess.run(cmd).returncode
      for _ in range(a.retries if a.launch == 'local' else 0):
        if rc != PREEMPTED or stop:
          break
        print(f'[{i + 1}/{len(cmds)}] {name} was preempted; resuming it', flush=True)
        rc = subprocess.run(cmd).returncode
      if stop:  # the sweep itself is being preempted: its points resume when it is run again
        print(f'[{i + 1}/{len(cmds)}] {name}: stopped by SIGTERM; run the sweep again to resume',
              file=sys.stderr)
        return PREEMPTED
      if rc != 0:
        failed.append(name)
        print(f'[{i + 1}/{len(cmds)}] {name} FAILED', flush=True)
  finally:
    signal.signal(signal.SIGTERM, previous)
  if a.launch == 'local':
    write_summary(a.workdir, pts)
  if failed:
    print(f'{len(failed)} of {len(cmds)} runs failed: {", ".join(failed)}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
