r"""Compressed Shakespeare students: PEFT, QAT and post-training quantization, over seeds.

  KD_DATA_DIR=../shared/data .venv/bin/python experiments/compressed_lm.py \
      --seeds=0,1,2 --workdir=/tmp/kd/compressed [--rows=...] [--config_arg=tiny] [--out=DIR]

Trained rows: one `kd.main` run each of configs/shakespeare/distill.py, lora.py, adapters.py or
qat.py (KL at T = 2, α = 0.5), the runs of one seed sharing one teacher (kd.seeds). Every student
starts from the teacher's layers (every other one, cut to the student's widths): full
fine-tuning; LoRA r = 8 on every projection; bottleneck adapters (width 8); prefix tuning (8
key/value positions); prompt tuning (8 embeddings); QAT int8 (per output channel) and int4
(groups of 32 input rows); QLoRA (LoRA on a frozen base stored as int4, groups of 32).
Post-training rows quantize the full row's trained student (kd.quant): round-to-nearest int8 per
channel, int4 in groups of 32, GPTQ int4 in groups of 32 (calibrated on 8 train batches), and a
mixed int4/int8 plan (the quarter of the projections with the largest measured KL in int8),
and two that quantize the embedding tables too, per row: all int8, and int4 projections with
int8 tables.
Columns: held-out perplexity and top-1 agreement with the teacher (mean ± std over seeds); the
stored student's size (float32 params; quantized rows: kd.quant's file, int4 packed two per
byte, scales in float16; QLoRA: its quantized base's file plus the float32 adapters); trained
parameters; forward tokens/s at batch 1 and 32 (T = 128, this machine, best of 3; quantized rows
run on dequantized weights here, so their speed is that of the float model: the size is what
they save). Writes <out>/compressed.md, .png and .runs.json. The sentence encoder's table is
experiments/compressed_sts.py's.
Smoke test: --config_arg=tiny --seeds=0 --workdir=/tmp/comp_tiny --out=/tmp/comp_tiny_out.
"""

import functools
import json
import os
import time

import jax
import jax.numpy as jnp
from absl import app
from absl import flags

from kd import models
from kd import quant
from kd import seeds
from kd.data import lm_data
from kd.eval import compression
from kd.eval import report
from kd.train import build
from kd.train import compress
from kd.train import loop
from kd.train import run
from kd.train import sections
from kd.train import step as step_lib

L = compression.LABELS
FROM_TEACHER = {'student_init.source': 'teacher'}
# name -> (label, objective, {config key: value}, configs/shakespeare/ experiment[:args]):
# trained rows (kd.seeds' row specs).
TRAINED = {
    'full': (L['full'], 'kl', FROM_TEACHER, 'distill'),
    'lora': (L['lora'], 'kl', {}, 'lora'),
    'adapter': ('bottleneck adapters, width 8', 'kl', {}, 'adapters:method=adapter'),
    'prefix': ('prefix tuning, 8 positions', 'kl', {}, 'adapters:method=prefix'),
    'prompt': ('prompt tuning, 8 embeddings', 'kl', {}, 'adapters:method=prompt'),
    'qat8': (L['qat8'], 'kl', {**FROM_TEACHER, 'quant.group_size': 0}, 'qat:bits=8'),
    'qat4': (L['qat4'], 'kl', FROM_TEACHER, 'qat:bits=4'),
    'qlora': (L['qlora'], 'kl', {}, 'lora:qlora'),
}
POST = compression.POST  # the post-training rows: all of them
COLUMNS = (('perplexity', 'held-out ppl', 1.0, 2),
           ('perplexity_vs_full', 'Δ ppl vs full (paired)', 1.0, 2),
           ('agreement', 'agreement (%)', 100.0, 1),
           ('stored_bytes', 'stored KB', 1 / 1024, 0), ('trainable_params', 'trained params', 1, 0),
           ('tokens_per_s_b1', 'tok/s b=1', 1, 0), ('tokens_per_s_b32', 'tok/s b=32', 1, 0))
CAPTION = ('Tiny Shakespeare validation split, {n} seed(s), mean ± std. Students start from '
           "the teacher's layers; KD loss 0.5·CE + 0.5·T²·KL, T = 2. Δ: the row's "
           "perplexity minus the same seed's full fine-tuning (paired over seeds). "
           'Quantized rows are evaluated on their dequantized weights (exactly the stored '
           'model).')


def tiny_group(config) -> int:
  """32, or 8 for the tiny config's widths (16 and 32)."""
  return 8 if config.student.hidden_size < 32 else 32


def row_config(row: str, seed: str, workdir: str, config_arg: str):
  """The config `kd.seeds.command` runs for (row, seed), built in this process."""
  _, objective, settings, experiment = TRAINED[row]
  config = seeds.load_config(experiment, config_arg, objective)
  config.seed = int(seed)
  config.baseline = False
  config.train.progress = False
  config.teacher.workdir = os.path.join(workdir, f'seed_{seed}', 'teacher')
  seeds.override(config, settings)
  return config


def restore_full(seed: str, workdir: str, config_arg: str):
  """(config, data, student, its params, teacher, teacher params) of the finished 'full' run."""
  config = row_config('full', seed, workdir, config_arg)
  where = os.path.join(workdir, f'seed_{seed}', 'full')
  data = lm_data.LMData(config, where)
  teacher = build.build_model(config.teacher.model, data.vocab_size)
  student = build.build_model(config.student, data.vocab_size)
  teacher_params, _ = run.train_teacher(config, data, teacher, where)  # restored
  params = build.restore_student(config, student, f'{where}/student_kd')
  return config, data, student, params, teacher, teacher_params


def evaluate(config, data, student, params, teacher, teacher_params) -> dict:
  spec = build.make_spec(config, student, teacher, dict(config.losses), 1)
  fn = jax.jit(functools.partial(step_lib.eval_step, spec=spec))
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


def post_training(seed: str, workdir: str, config_arg: str, rows) -> dict:
  """{row: result} for the post-training rows, cached in <workdir>/seed_<s>/post.json."""
  cache = os.path.join(workdir, f'seed_{seed}', 'post.json')
  done = json.load(open(cache)) if os.path.exists(cache) else {}
  todo = [r for r in rows if r not in done]
  if not todo or not os.path.exists(
      os.path.join(workdir, f'seed_{seed}', 'full', 'results.json')):
    return {r: done[r] for r in rows if r in done}
  config, data, student, params, teacher, tp = restore_full(seed, workdir, config_arg)
  calib = [b['input_ids'] for _, b in
           zip(range(compression.CALIBRATION_BATCHES), data.iterator(0))]
  for row in todo:
    how = POST[row][1]
    qcfg = compression.post_config(row, tiny_group(config))
    if how.get('mixed'):
      sens = quant.layer_sensitivity(student, params, calib, qcfg, bits=4)
      plan = quant.choose_bits(sens, num_8bit=max(1, round(how['mixed'] * len(sens))))
      qcfg = quant.QuantConfig(target=compression.TARGET, bits=4, group_size=qcfg.group_size,
                               layer_bits=plan)
    t0 = time.perf_counter()
    qparams = (quant.quantize_model(student, params, calib, qcfg) if how.get('gptq')
               else quant.quantize_params(params, qcfg))
    seconds = time.perf_counter() - t0
    deq = quant.dequantize(qparams)
    done[row] = dict(evaluate(config, data, student, deq, teacher, tp),
                     stored_bytes=compression.stored_bytes(qparams=qparams), quantize_s=seconds,
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
  data = lm_data.LMData(config, where)
  teacher = build.build_model(config.teacher.model, data.vocab_size)
  student = build.build_model(config.student, data.vocab_size)
  teacher_params, _ = run.train_teacher(config, data, teacher, where)
  init = build.student_init(config, student, teacher, teacher_params)
  student, init = build.peft_student(compress.read(config), student, init, config.seed)
  params, _ = run.run_stage(config, data, f'{where}/student_kd', student, teacher,
                            teacher_params, dict(config.losses), steps=config.train.steps,
                            seed=config.seed, name='restore', init_variables=init)
  method, qcfg = sections.quant_config(config)
  trainable = result.get('trainable_params', result['params'])
  # QAT: the packed file of the (on-grid) student. QLoRA: the packed base plus its float32
  # adapters (what it evaluates is base + A·B; the file's size depends on the shapes only, so
  # the merged params stand in for the base).
  size = compression.stored_bytes(
      params, quant.quantize_params(params, qcfg) if method != 'none' else None)
  extra = dict(trainable_params=trainable,
               stored_bytes=size + (4 * trainable if method == 'qlora' else 0),
               **{f'tokens_per_s_b{b}': tokens_per_s(student, params, b) for b in (1, 32)})
  with open(cache, 'w') as f:
    json.dump(extra, f)
  return dict(result, **extra)


def table(results: dict) -> str:
  """Markdown: the teacher and the rows of `results` ({row: [result of each seed]}), COLUMNS
  as mean ± std over the seeds that have them."""
  return report.table(results, COLUMNS, CAPTION,
                      compression.labels({k: v[0] for k, v in TRAINED.items()}))


def main(argv):
  del argv
  f = flags.FLAGS
  unknown = sorted(set(f.rows) - set(TRAINED) - set(POST))
  if unknown:
    raise app.UsageError(f'unknown rows {unknown}; valid: {", ".join([*TRAINED, *POST])}')
  prior = seeds.load_prior(f.prior)
  order = compression.row_order(f.rows, TRAINED, POST)
  trained = [r for r in order if r in TRAINED]  # with 'full' when post-training rows need it
  post = [r for r in order if r in POST]
  specs = {k: (*v, 'student_kd') for k, v in TRAINED.items()}
  runs = seeds.run_seeds(trained, f.seeds, workdir=f.workdir, collect_only=f.collect_only,
                         config_arg=f.config_arg, overrides=f.override, row_specs=specs)
  for seed, got in runs.items():  # sizes and speeds (the runs' own results lack them)
    for row in trained:
      if row in got:
        got[row] = speed_and_size(seed, f.workdir, f.config_arg, row, got[row])
    got.update(post_training(seed, f.workdir, f.config_arg, post))
  runs = report.merge_runs(runs, prior)
  seeds.check_finished(runs, f.rows, f.workdir)
  compression.write(f.out, 'compressed', runs, 'perplexity', order, table, 'held-out perplexity')


if __name__ == '__main__':
  seeds.define_flags([*TRAINED, *POST], workdir='/tmp/kd/compressed')
  app.run(main)
