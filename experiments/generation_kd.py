r"""Distillation from generated text on the dialogue task: SFT, supervised KD, SeqKD, on-policy.

  KD_DATA_DIR=../shared/data .venv/bin/python experiments/generation_kd.py \
      --seeds=0,1,2 --workdir=/tmp/kd/generation [--rows=...] [--config_arg=tiny] [--out=DIR]

Every (row, seed) is one run of a configs/shakespeare/ experiment on the prompt/response task of
kd/data/dialogue.py (dialogue.py, seqkd.py, gkd.py, ema.py:dialogue, distillm.py), in
<workdir>/seed_<s>/<row>; the runs of one seed share one teacher (trained on the task by the first
run). The divergence is JSD (β = 0.5, T = 2) throughout. Rows: SFT (CE on the dataset's responses,
no teacher); supervised KD (JSD on the dataset's responses = on-policy λ = 0); SeqKD (CE on the
teacher's greedy responses); SeqKD + JSD; on-policy λ = 0.5 and λ = 1 (the student samples the
responses, the teacher scores them); born-again (a second student distilled from the λ = 0 student);
self-distillation from the student's own EMA (0.5 CE + 0.5 JSD, no teacher in its loss); adaptive
off-policy (DistiLLM, kd/train/replay.py, validation every 100 steps, starting at p0 = 0.5). Metrics
on the validation split's real responses: perplexity, top-1 agreement with the teacher, ECE; the
teacher's per-token NLL of the model's own greedy answers to 128 validation prompts
(kd.eval.generation: how a model does on what it writes, where on-policy training aims); plus the
student run's wall time and, for on-policy rows, the student's sampling speed (tokens/s, first
call's compile included). Writes <out>/generation_kd.md, .png and .runs.json (kd.seeds' runner).
Smoke test: --config_arg=tiny --seeds=0 --workdir=/tmp/gen_tiny --out=/tmp/gen_tiny_out.
"""

import os

import numpy as np
from absl import app
from absl import flags

from kd import seeds
from kd.eval import report

# name -> (label, objective, {config key: value}, experiment[:args], results key).
ROWS = {
    'sft': ('SFT: CE on the dataset responses (no KD)', 'ce', {}, 'dialogue', 'student_kd'),
    'supervised_kd': ('supervised KD: JSD on the dataset responses (λ = 0)', 'jsd', {},
                      'dialogue', 'student_kd'),
    'seqkd': ("SeqKD: CE on the teacher's greedy responses", 'ce', {}, 'seqkd', 'student_kd'),
    'seqkd_jsd': ("SeqKD + JSD on the teacher's responses", 'jsd', {}, 'seqkd', 'student_kd'),
    'onpolicy_0.5': ('on-policy (GKD) λ = 0.5', 'jsd', {}, 'gkd:fraction=0.5', 'student_kd'),
    'onpolicy_1': ('on-policy (GKD) λ = 1', 'jsd', {}, 'gkd:fraction=1', 'student_kd'),
    'born_again': ('born-again: JSD from the λ = 0 student', 'jsd', {'born_again': 1},
                   'dialogue', 'student_born_again_1'),
    'ema_self': ("self-distillation: 0.5 CE + 0.5 JSD from the student's EMA (0.99; agreement "
                 'with the EMA)', 'jsd', {}, 'ema:dialogue', 'student_ema_self'),
    # p0 = 0.5: with DistiLLM's p0 = 0 the row equals λ = 0, since 800 steps never raise the
    # held-out CE (it falls at every check), so p never leaves p0. From 0.5 it pairs with GKD
    # λ = 0.5: the same share of student-written batches, some replayed from the buffer.
    'adaptive': ('adaptive off-policy (DistiLLM: p0 = 0.5, replay buffer, p raised on val. CE '
                 'rises)', 'jsd', {'train.eval_every': 100, 'on_policy.adaptive.p0': 0.5},
                 'distillm', 'student_kd'),
}
# (results key, column title, scale, digits)
METRICS = (('perplexity', 'perplexity', 1.0, 2), ('agreement', 'agreement (%)', 100.0, 1),
           ('sample_teacher_nll', "teacher NLL of the model's greedy answers", 1.0, 3),
           ('ece', 'ECE (%)', 100.0, 2), ('wall_s', 'train s', 1.0, 0),
           ('generation_tokens_per_s', 'sampling tokens/s', 1.0, 0))


def table(results: dict) -> str:
  n = max([len(v) for v in results.values()] + [0])
  head = ['| model | ' + ' | '.join(m[1] for m in METRICS) + ' |',
          '|---|' + '---:|' * len(METRICS)]
  lines = [f'Dialogue task (answer a speech as the next speaker), Tiny Shakespeare validation '
           f'responses, {n} seed(s), mean ± std. JSD at β = 0.5, T = 2; the prompt is masked.',
           '', *head]
  for row, runs in [('teacher', results.get('teacher') or [])] + [
      (r, results[r]) for r in results if r in ROWS]:
    if not runs:
      continue
    # (A teacher restored from an earlier run reports only its restore time as wall_s.)
    # (An adaptive run whose probability never rose sampled nothing: its speed is '-', not 0.)
    cells = [report.mean_std([x[k] for x in runs], scale, digits)
             if k in runs[0] and not (row == 'teacher' and k == 'wall_s')
             and (k != 'generation_tokens_per_s' or any(x[k] for x in runs)) else '-'
             for k, _, scale, digits in METRICS]
    label = 'teacher' if row == 'teacher' else ROWS[row][0]
    seeds = '' if len(runs) == n else f' ({len(runs)} seeds)'
    lines.append(f'| {label}{seeds} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def plot(results: dict, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  rows = [r for r in results if r in ROWS and results[r]]
  fig, axes = plt.subplots(1, 2, figsize=(10, 0.45 * len(rows) + 1.5), sharey=True)
  y = np.arange(len(rows))
  for ax, (key, title, scale, _) in zip(axes, METRICS[:2]):
    vals = [np.asarray([x[key] for x in results[r]], np.float64) * scale for r in rows]
    ax.barh(y, [v.mean() for v in vals], xerr=[v.std() for v in vals], capsize=3)
    if results.get('teacher') and key in results['teacher'][0]:
      ax.axvline(np.mean([x[key] for x in results['teacher']]) * scale, color='k', ls='--',
                 lw=1, label='teacher')
      ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
  axes[0].set_yticks(y, [ROWS[r][0] for r in rows], fontsize=8)
  axes[0].invert_yaxis()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _latest_params(run_dir: str):
  """The params of the newest checkpoint under <run_dir>/checkpoints (raw numpy tree)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  ckpts = os.path.join(run_dir, 'checkpoints')
  step = max(int(d) for d in os.listdir(ckpts) if d.isdigit())
  path = os.path.abspath(os.path.join(ckpts, str(step), 'state'))
  return ocp.StandardCheckpointer().restore(path)['params']['student']


def rescore(workdir: str, seed: str, row: str, config_arg: str = '') -> bool:
  """Adds the teacher's NLL of greedy answers to a finished run made before that metric
  existed, from its checkpoints (the student's and the seed's teacher's). True if it did."""
  import json  # pylint: disable=g-import-not-at-top
  from kd.eval import generation  # pylint: disable=g-import-not-at-top
  from kd.data import lm_data  # pylint: disable=g-import-not-at-top
  from kd.train import build  # pylint: disable=g-import-not-at-top
  run_dir = os.path.join(workdir, f'seed_{seed}', row)
  path = os.path.join(run_dir, 'results.json')
  if not os.path.exists(path):
    return False
  with open(path) as f:
    results = json.load(f)
  key = ROWS[row][4]
  if 'sample_teacher_nll' in results[key]:
    return False
  config = seeds.load_config(ROWS[row][3], config_arg, ROWS[row][1])
  data = lm_data.LMData(config, run_dir)
  teacher = build.build_model(config.teacher.model, data.vocab_size)
  student = build.build_model(config.student, data.vocab_size)
  t_params = _latest_params(os.path.join(workdir, f'seed_{seed}', 'teacher'))
  for name, model, params in (('teacher', teacher, t_params),
                              (key, student, _latest_params(os.path.join(run_dir, key)))):
    results[name].update(generation.teacher_nll_of_samples(
        model, params, teacher, t_params, data.eval_batches,
        max_batches=config.data.sample_eval_batches), sample_rescored=True)
  with open(path + '.tmp', 'w') as f:
    json.dump(results, f, indent=1)
  os.replace(path + '.tmp', path)
  return True


def main(argv):
  del argv
  f = flags.FLAGS
  if f.rescore:
    for seed in f.seeds:
      for row in f.rows:
        if rescore(f.workdir, seed, row, f.config_arg):
          print(f'rescored {row} seed {seed}', flush=True)
  seeds.run_experiment('generation_kd', table, plot, row_specs=ROWS)


if __name__ == '__main__':
  seeds.define_flags(ROWS, '/tmp/kd/generation')
  flags.DEFINE_bool('rescore', False, 'First add the greedy-answer score to finished runs made '
                    'before it existed (from their checkpoints).')
  app.run(main)
