r"""Continual distillation on a stream: does the student keep what it learned on earlier shards?

  KD_DATA_DIR=../shared/data .venv/bin/python experiments/continual.py \
      --seeds=0,1,2 --workdir=/tmp/kd/continual [--shards=3] [--config_arg=tiny] [--out=DIR]

Tiny Shakespeare's train split arrives as `shards` contiguous shards (in text order, so each
holds other plays and speakers); the last 10% of each shard is held out. Phase k trains the
student on shard k only, starting from phase k-1's student (`student_init.source='run'`), for
configs/shakespeare/distill.py's steps, with KD from one teacher trained once on all the shards'
training parts (`kd`: 0.5·CE + 0.5·T²·KL, T = 2) or with hard labels only (`ce`). After every phase the
student is evaluated on every shard's held-out part. Table: held-out perplexity per (method,
phase, shard), mean ± std over seeds, and forgetting = perplexity on shard 1 after the last
phase minus after phase 1. Writes <out>/continual.md, .png and .runs.json (per-seed results;
`--prior=<that file>` adds an earlier session's seeds without rerunning them).
The teacher and the tokenizer train on the union of the shards' training parts
(`data.teacher_split`), so no held-out text reaches the student through them.
Smoke test: --config_arg=tiny --seeds=0 --shards=2 --workdir=/tmp/cont_tiny --out=/tmp/cont_out.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
from absl import app
from absl import flags

from kd import data as data_lib
from kd import seeds
from kd.eval import report
from kd.train import build
from kd.train import loop
from kd.train import step as step_lib

METHODS = {'kd': 'kl', 'ce': 'ce'}  # method -> configs/shakespeare/distill.py objective


def shard_splits(shards: int, held_out: float = 0.1) -> list[tuple[str, str]]:
  """(train split, held-out split) of each shard, as TFDS percent slices of 'train'."""
  edges = np.linspace(0, 100, shards + 1).round().astype(int)
  out = []
  for a, b in zip(edges[:-1], edges[1:]):
    cut = int(round(b - (b - a) * held_out))
    out.append((f'train[{a}%:{cut}%]', f'train[{cut}%:{b}%]'))
  return out


def phase_dir(workdir, seed, method, k) -> str:
  return os.path.join(workdir, f'seed_{seed}', method, f'phase_{k}')


def teacher_split(splits) -> str:
  """The union of the shards' training parts (TFDS split arithmetic): the teacher's text."""
  return '+'.join(train for train, _ in splits)


def command(workdir, seed, method, k, splits, config_arg) -> list[str]:
  """kd.main's command line for phase k: the student trains on shard k's training part."""
  config = seeds.config_file('distill', config_arg, METHODS[method])
  cmd = [sys.executable, '-m', 'kd.main', f'--config={config}',
         f'--workdir={phase_dir(workdir, seed, method, k)}', f'--config.seed={seed}',
         '--config.baseline=False', '--config.train.progress=False',
         f'--config.data.train_split={splits[k][0]}',
         f'--config.data.teacher_split={teacher_split(splits)}',
         f'--config.teacher.workdir={os.path.join(workdir, f"seed_{seed}", "teacher")}']
  if k > 0:
    cmd += ['--config.student_init.source=run', '--config.student_init.path='
            + os.path.join(phase_dir(workdir, seed, method, k - 1), 'student_kd')]
  return cmd


def evaluate_phase(workdir, seed, method, k, splits, config_arg) -> list[float]:
  """Held-out perplexity on every shard of phase k's student (cached in eval.json)."""
  where = phase_dir(workdir, seed, method, k)
  cache = os.path.join(where, 'shards_eval.json')
  if os.path.exists(cache):
    return json.load(open(cache))
  config = seeds.load_config('distill', config_arg, METHODS[method])
  tokenizer = data_lib.get_or_train(where, None, config.data.vocab_size)
  student = build.build_model(config.student, tokenizer.get_vocab_size())
  params = build.restore_student(config, student, os.path.join(where, 'student_kd'))
  spec = build.make_spec(config, student, None, {'ce': 1.0}, 1)
  fn = jax.jit(lambda p, t, b: step_lib.eval_step(p, t, b, spec))
  out = []
  for _, held in splits:
    batches = data_lib.make_eval_batches(
        data_lib.load_text_split(config.data.name, held), tokenizer,
        seq_len=config.data.seq_len, batch_size=config.data.eval_batch_size)
    out.append(loop.evaluate(fn, {'student': params, 'proj': {}}, None, batches)['perplexity'])
  with open(cache, 'w') as f:
    json.dump(out, f)
  return out


def table(ppl: dict, shards: int) -> str:
  """ppl[method] = array [seeds, phases, shards]."""
  n = next(iter(ppl.values())).shape[0]
  lines = [f'Tiny Shakespeare train split as a stream of {shards} shards; held-out perplexity on '
           f'each shard after each phase, {n} seed(s), mean ± std. `kd`: KD from a teacher '
           'trained on the training parts of all shards; `ce`: labels only.', '',
           '| method | after phase | ' + ' | '.join(f'shard {j + 1}' for j in range(shards))
           + ' |', '|---|---:|' + '---:|' * shards]
  for method, p in ppl.items():
    for k in range(shards):
      cells = [report.mean_std(p[:, k, j], 1.0, 2) for j in range(shards)]
      lines.append(f'| {method} | {k + 1} | ' + ' | '.join(cells) + ' |')
  lines += ['', '| method | forgetting on shard 1 (ppl after the last phase − after phase 1) |',
            '|---|---:|']
  lines += [f'| {m} | {report.mean_std(p[:, -1, 0] - p[:, 0, 0], 1.0, 2)} |'
            for m, p in ppl.items()]
  return '\n'.join(lines)


def plot(ppl: dict, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  shards = next(iter(ppl.values())).shape[2]
  fig, axes = plt.subplots(1, shards, figsize=(3.6 * shards, 3.2), sharey=True)
  for j, ax in enumerate(np.atleast_1d(axes)):
    for method, p in ppl.items():
      ax.plot(range(1, shards + 1), p[:, :, j].mean(0), marker='o', label=method)
    ax.set_title(f'held-out shard {j + 1}', fontsize=10)
    ax.set_xlabel('after phase')
    ax.grid(alpha=0.3)
  np.atleast_1d(axes)[0].set_ylabel('perplexity')
  np.atleast_1d(axes)[0].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  del argv
  f = flags.FLAGS
  prior = seeds.load_prior(f.prior)
  splits = shard_splits(f.shards)
  runs = {}
  for seed in f.seeds:
    runs[seed] = {}
    for method in METHODS:
      for k in range(len(splits)):
        done = os.path.join(phase_dir(f.workdir, seed, method, k), 'results.json')
        if not os.path.exists(done):
          subprocess.run(command(f.workdir, seed, method, k, splits, f.config_arg), check=True,
                         cwd=seeds.REPO)
      runs[seed][method] = {'ppl': [evaluate_phase(f.workdir, seed, method, k, splits,
                                                   f.config_arg) for k in range(len(splits))]}
  runs = report.merge_runs(runs, prior)
  for seed, rows in runs.items():
    for m in METHODS:
      if m in rows and np.shape(rows[m]['ppl']) != (f.shards, f.shards):
        raise app.UsageError(
            f'seed {seed} {m}: its runs hold {np.shape(rows[m]["ppl"])} (phases, shards) '
            f'results and this table has --shards={f.shards}; use the --prior file\'s --shards')
  ppl = {m: np.asarray([r['ppl'] for r in rows])
         for m, rows in report.by_row(runs, METHODS).items() if rows}
  if not ppl:
    raise app.UsageError('no results: give --seeds, or a --prior runs file that has some')
  report.write(f.out, 'continual', table(ppl, f.shards), lambda path: plot(ppl, path), runs=runs)


if __name__ == '__main__':
  flags.DEFINE_list('seeds', ['0', '1', '2'], 'Seeds to run.')
  flags.DEFINE_integer('shards', 3, 'Shards of the stream (= phases).')
  flags.DEFINE_string('workdir', '/tmp/kd/continual', 'Root of the runs.')
  flags.DEFINE_string('out', 'experiments/results', 'Where the table and plot go.')
  flags.DEFINE_string('config_arg', '', 'Variant passed to the config (e.g. tiny).')
  flags.DEFINE_string('prior', None, 'A continual.runs.json of earlier seeds (the one written '
                      'next to the table): they join the table; this run wins where both have '
                      'a result. E.g. --seeds=2 --prior=experiments/results/continual.runs.json.')
  app.run(main)
