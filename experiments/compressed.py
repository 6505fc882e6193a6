r"""Compressed Shakespeare students: PEFT, QAT and post-training quantization, over seeds.

  KD_DATA_DIR=../shared/data .venv/bin/python experiments/compressed.py \
      --seeds=0,1,2 --workdir=/tmp/kd/compressed [--rows=...] [--config_arg=tiny] [--out=DIR]

Trained rows: one `kd.main` run of configs/shakespeare_kd.py each (KL at T = 2, α = 0.5), the
runs of one seed sharing one teacher (experiments/objectives.py's runner). Every student starts
from the teacher's layers (every other one, cut to the student's widths): full fine-tuning;
LoRA r = 8 on every projection; bottleneck adapters (width 8); prefix tuning (8 key/value
positions); prompt tuning (8 embeddings); QAT int8 (per output channel) and int4 (groups of 32
input rows); QLoRA (LoRA on a frozen base stored as int4, groups of 32).
Post-training rows quantize the full row's trained student (kd.quant): round-to-nearest int8 per
channel, int4 in groups of 32, GPTQ int4 in groups of 32 (calibrated on 8 train batches), and a
mixed int4/int8 plan (the quarter of the projections with the largest measured KL in int8).
Columns: held-out perplexity and top-1 agreement with the teacher (mean ± std over seeds); the
stored student's size (float32 params; quantized rows: kd.quant's file, int4 packed two per
byte, scales in float16); trained parameters; forward tokens/s at batch 1 and 32 (T = 128, this
machine, best of 3; quantized rows run on dequantized weights here, so their speed is that of
the float model: the size is what they save). Writes <out>/compressed.md and .png.
Smoke test: --config_arg=tiny --seeds=0 --workdir=/tmp/comp_tiny --out=/tmp/comp_tiny_out.
"""

import functools
import json
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import objectives  # pylint: disable=g-import-not-at-top,wrong-import-position

from kd import models  # pylint: disable=g-import-not-at-top,wrong-import-position
from kd import quant  # pylint: disable=g-import-not-at-top,wrong-import-position
from kd import sweep  # pylint: disable=g-import-not-at-top,wrong-import-position
from kd.eval import report  # pylint: disable=g-import-not-at-top,wrong-import-position
from kd.train import loop  # pylint: disable=g-import-not-at-top,wrong-import-position
from kd.train import run  # pylint: disable=g-import-not-at-top,wrong-import-position

FROM_TEACHER = {'student_init.source': 'teacher'}
# name -> (label, objective, {config key: value}, config variants): trained rows.
TRAINED = {
    'full': ('full fine-tuning', 'kl', FROM_TEACHER, ''),
    'lora': ('LoRA r=8, every projection', 'kl', {}, 'lora'),
    'adapter': ('bottleneck adapters, width 8', 'kl', {}, 'peft=adapter'),
    'prefix': ('prefix tuning, 8 positions', 'kl', {}, 'peft=prefix'),
    'prompt': ('prompt tuning, 8 embeddings', 'kl', {}, 'peft=prompt'),
    'qat8': ('QAT int8, per channel', 'kl', {**FROM_TEACHER, 'quant.group_size': 0}, 'qat=8'),
    'qat4': ('QAT int4, groups of 32', 'kl', FROM_TEACHER, 'qat=4'),
    'qlora': ('QLoRA: LoRA r=8 on an int4 base (groups of 32)', 'kl', {}, 'lora,qlora'),
}
# name -> (label, how): post-training rows made from the 'full' row's student.
POST = {
    'ptq8': ('PTQ int8 (RTN, per channel)', dict(bits=8, group_size=None)),
    'ptq4': ('PTQ int4 (RTN, groups of 32)', dict(bits=4, group_size=32)),
    'gptq4': ('GPTQ int4 (groups of 32)', dict(bits=4, group_size=32, gptq=True)),
    'mixed': ('mixed int4/int8 by measured sensitivity', dict(bits=4, group_size=32, mixed=0.25)),
}
TARGET = r'.*_proj'
CALIBRATION_BATCHES = 8


def tiny_group(config) -> int:
  """32, or 8 for the tiny config's widths (16 and 32)."""
  return 8 if config.student.hidden_size < 32 else 32


def row_config(row: str, seed: str, workdir: str, config_arg: str):
  """The config `objectives.command` runs for (row, seed), built in this process."""
  _, objective, settings, extra = TRAINED[row]
  arg = ','.join([a for a in config_arg.split(',') if a] + [a for a in extra.split(',') if a]
                 + [f'objective={objective}'])
  config = sweep.load(os.path.join(objectives.REPO, 'configs', 'shakespeare_kd.py'))[0]
  config = config.get_config(arg)
  config.seed = int(seed)
  config.baseline = False
  config.train.progress = False
  config.teacher.workdir = os.path.join(workdir, f'seed_{seed}', 'teacher')
  for key, value in settings.items():
    node = config
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def restore_full(seed: str, workdir: str, config_arg: str):
  """(config, data, student, its params, teacher, teacher params) of the finished 'full' run."""
  config = row_config('full', seed, workdir, config_arg)
  where = os.path.join(workdir, f'seed_{seed}', 'full')
  data = run.Data(config, where)
  teacher = run.build_model(config.teacher.model, data.vocab_size)
  student = run.build_model(config.student, data.vocab_size)
  teacher_params, _ = run.train_teacher(config, data, teacher, where)  # restored
  params = run.restore_student(config, student, f'{where}/student_kd')
  return config, data, student, params, teacher, teacher_params


def evaluate(config, data, student, params, teacher, teacher_params) -> dict:
  spec = run.make_spec(config, student, teacher, dict(config.losses), 1)
  fn = jax.jit(functools.partial(run.step_lib.eval_step, spec=spec))
  return loop.evaluate(fn, {'student': params, 'proj': {}}, teacher_params, data.eval_batches)


def tokens_per_s(model, params, batch_size: int, seq_len: int = 128, runs: int = 3) -> float:
  """Forward (logits) tokens/s at [batch_size, seq_len], best of `runs` after a compile."""
  ids = jnp.zeros((batch_size, min(seq_len, model.config.max_seq_len)), jnp.int32)
  fn = jax.jit(lambda p, x: model.apply(p, x)['logits'])
  fn(params, ids).block_until_ready()
  best = float('inf')
  for _ in range(runs):
    t0 = time.perf_counter()
    fn(params, ids).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return ids.size / best


def stored_bytes(params=None, qparams=None) -> int:
  """Bytes on disk: kd.quant's packed file for quantized params, else float32 params."""
  if qparams is None:
    return int(sum(np.asarray(x).size * 4 for x in jax.tree.leaves(params)))
  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, 'student.safetensors')
    quant.save(path, qparams)
    return quant.size_on_disk(path)


def post_training(seed: str, workdir: str, config_arg: str, rows) -> dict:
  """{row: result} for the post-training rows, cached in <workdir>/seed_<s>/post.json."""
  cache = os.path.join(workdir, f'seed_{seed}', 'post.json')
  done = json.load(open(cache)) if os.path.exists(cache) else {}
  todo = [r for r in rows if r not in done]
  if not todo or not os.path.exists(
      os.path.join(workdir, f'seed_{seed}', 'full', 'results.json')):
    return {r: done[r] for r in rows if r in done}
  config, data, student, params, teacher, tp = restore_full(seed, workdir, config_arg)
  calib = [b['input_ids'] for _, b in zip(range(CALIBRATION_BATCHES), data.iterator(0))]
  for row in todo:
    how = POST[row][1]
    qcfg = quant.QuantConfig(target=TARGET, bits=how['bits'],
                             group_size=how['group_size'] and tiny_group(config))
    if how.get('mixed'):
      sens = quant.layer_sensitivity(student, params, calib, qcfg, bits=4)
      plan = quant.choose_bits(sens, num_8bit=max(1, round(how['mixed'] * len(sens))))
      qcfg = quant.QuantConfig(target=TARGET, bits=4, group_size=qcfg.group_size,
                               layer_bits=plan)
    t0 = time.perf_counter()
    qparams = (quant.quantize_model(student, params, calib, qcfg) if how.get('gptq')
               else quant.quantize_params(params, qcfg))
    seconds = time.perf_counter() - t0
    deq = quant.dequantize(qparams)
    done[row] = dict(evaluate(config, data, student, deq, teacher, tp),
                     stored_bytes=stored_bytes(qparams=qparams), quantize_s=seconds,
                     params=models.count_params(deq), trainable_params=0,
                     **{f'tokens_per_s_b{b}': tokens_per_s(student, deq, b) for b in (1, 32)})
    with open(cache + '.tmp', 'w') as f:
      json.dump(done, f, indent=1)
    os.replace(cache + '.tmp', cache)
  return {r: done[r] for r in rows if r in done}


def speed_and_size(seed: str, workdir: str, config_arg: str, row: str, result: dict) -> dict:
  """Adds stored size and forward tokens/s to a trained row's result (a restore, cached)."""
  cache = os.path.join(workdir, f'seed_{seed}', row, 'speed.json')
  if os.path.exists(cache):
    return dict(result, **json.load(open(cache)))
  config = row_config(row, seed, workdir, config_arg)
  where = os.path.join(workdir, f'seed_{seed}', row)
  data = run.Data(config, where)
  teacher = run.build_model(config.teacher.model, data.vocab_size)
  student = run.build_model(config.student, data.vocab_size)
  teacher_params, _ = run.train_teacher(config, data, teacher, where)
  init = run.student_init(config, student, teacher, teacher_params)
  student, init = run.peft_student(config, student, init)
  params, _ = run.run_stage(config, data, f'{where}/student_kd', student, teacher,
                            teacher_params, dict(config.losses), steps=config.train.steps,
                            seed=config.seed, name='restore', init_variables=init)
  method, qcfg = run.config_check.quant_config(config)
  extra = dict(trainable_params=result.get('trainable_params', result['params']),
               stored_bytes=stored_bytes(
      params, quant.quantize_params(params, qcfg) if method != 'none' else None),
      **{f'tokens_per_s_b{b}': tokens_per_s(student, params, b) for b in (1, 32)})
  with open(cache, 'w') as f:
    json.dump(extra, f)
  return dict(result, **extra)


COLUMNS = (('perplexity', 'held-out ppl', 1.0, 2), ('agreement', 'agreement (%)', 100.0, 1),
           ('stored_bytes', 'stored KB', 1 / 1024, 0), ('trainable_params', 'trained params', 1, 0),
           ('tokens_per_s_b1', 'tok/s b=1', 1, 0), ('tokens_per_s_b32', 'tok/s b=32', 1, 0))


def table(results: dict) -> str:
  n = max(len(v) for v in results.values())
  lines = [f'Tiny Shakespeare validation split, {n} seed(s), mean ± std. Students start from the '
           "teacher's layers; KD loss 0.5·CE + 0.5·T²·KL, T = 2. Quantized rows are evaluated "
           'on their dequantized weights (exactly the stored model).', '',
           '| student | ' + ' | '.join(c[1] for c in COLUMNS) + ' |',
           '|---|' + '---:|' * len(COLUMNS)]
  labels = {**{k: v[0] for k, v in TRAINED.items()}, **{k: v[0] for k, v in POST.items()},
            'teacher': 'teacher'}
  for row, runs in results.items():
    if not runs:
      continue
    cells = [report.mean_std([r[k] for r in runs], s, d) if k in runs[0] else '-'
             for k, _, s, d in COLUMNS]
    lines.append(f'| {labels[row]} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def plot(results: dict, path: str) -> None:
  """Perplexity against stored size, one point per row (mean over seeds)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for row, runs in results.items():
    if runs and 'stored_bytes' in runs[0]:
      x = np.mean([r['stored_bytes'] for r in runs]) / 1024
      y = np.mean([r['perplexity'] for r in runs])
      ax.scatter(x, y)
      ax.annotate(row, (x, y), fontsize=8, xytext=(3, 3), textcoords='offset points')
  ax.set_xscale('log')
  ax.set_xlabel('stored student (KB, log scale)')
  ax.set_ylabel('held-out perplexity')
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  del argv
  f = flags.FLAGS
  trained = [r for r in f.rows if r in TRAINED]
  post = [r for r in f.rows if r in POST]
  unknown = sorted(set(f.rows) - set(TRAINED) - set(POST))
  if unknown:
    raise app.UsageError(f'unknown rows {unknown}; valid: {", ".join([*TRAINED, *POST])}')
  if post and 'full' not in trained:
    trained.insert(0, 'full')  # the post-training rows quantize it
  specs = {k: (*v, 'student_kd') for k, v in TRAINED.items()}
  results = objectives.run_all(trained, f.seeds, workdir=f.workdir,
                               collect_only=f.collect_only, config_arg=f.config_arg,
                               overrides=f.override, row_specs=specs)
  for row in trained:  # sizes and speeds, seed by seed (the runs' own results lack them)
    results[row] = [speed_and_size(s, f.workdir, f.config_arg, row, r)
                    for s, r in zip(f.seeds, results[row])]
  for seed in f.seeds:
    for row, r in post_training(seed, f.workdir, f.config_arg, post).items():
      results.setdefault(row, []).append(r)
  if not any(results.get(r) for r in f.rows):
    raise app.UsageError(f'no finished runs under {f.workdir}')
  report.write(f.out, 'compressed', table(results), lambda path: plot(results, path))


if __name__ == '__main__':
  objectives.define_flags(row_specs={**TRAINED, **POST}, workdir='/tmp/kd/compressed')
  app.run(main)
