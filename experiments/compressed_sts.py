r"""Compressed sentence-encoder students: PEFT, QAT and post-training quantization, over seeds.

  KD_DATA_DIR=../shared/data .venv/bin/python experiments/compressed_sts.py \
      --seeds=0,1,2 --workdir=/tmp/kd/compressed_minilm [--rows=...] [--out=DIR]

The sentence encoder's version of experiments/compressed_lm.py (configs/minilm_sts.py:
all-MiniLM-L6-v2 into its layers 0, 3, 5, offline teacher features shared by every run in
<workdir>/teacher_cache). Trained rows (TRAINED, one `kd.main` run each): full (the normal job),
LoRA r = 8 on every attention and MLP projection, bottleneck adapters (width 32) and prefix
tuning (16 positions), QAT int8 (per channel) and int4 (groups of 32), QLoRA (LoRA on an int4
base, groups of 32); post-training rows ptq8, ptq4, gptq4, ptq8_emb, ptq4_emb8 quantize the
full row's exported student (GPTQ calibrated on 8 batches of 32 train sentences; the _emb rows
quantize the embedding tables too, which hold most of MiniLM's bytes). Columns: STS-B dev
Spearman (mean ± std over seeds), stored size (float32; quantized rows kd.quant's packed file,
QLoRA its packed base plus float32 adapters), trained parameters; below it, encode
sentences/s at batch 1 and 32 (kd.eval.speed) of the teacher and of the students' float
architecture, timed once as the table is written (every row's stored student is that model, so
seeds run in other sessions or on other hosts share one timing), and of the adapter and prefix
students' architectures, which add computation, on their own lines. Writes
<out>/compressed_minilm.md, .png and .runs.json. Smoke test (a tiny random BERT teacher; ~4 min
on 2 cores):
  --config_arg=tiny --seeds=0 --workdir=/tmp/comp_minilm_tiny \
      --out=/tmp/comp_minilm_tiny_out --override=teacher.path=DIR --override=student.layers=0,3
where DIR holds a small HF BERT checkpoint with a tokenizer (e.g. tests/conftest.py's tiny_bert).
"""

import json
import os
import sys
import time

import numpy as np
from absl import app
from absl import flags

from kd import hf
from kd import models
from kd import quant
from kd import seeds
from kd import sweep
from kd.data import sentences
from kd.eval import compression
from kd.eval import report
from kd.eval import speed
from kd.eval import sts
from kd.train import compress
from kd.train import sections
from kd.train import sentence

# name -> (configs/minilm_sts.py variants, {config key: value}) of the trained rows.
TRAINED = {
    'full': ('', {}),
    'lora': ('lora', {}),
    'adapter': ('peft=adapter', {}),
    'prefix': ('peft=prefix', {}),
    'qat8': ('qat=8', {'quant.group_size': 0}),
    'qat4': ('qat=4', {}),
    'qlora': ('lora,qlora', {}),
}
POST = ('ptq8', 'ptq4', 'gptq4', 'ptq8_emb', 'ptq4_emb8')  # of kd.eval.compression.POST
# Labels of the rows not in kd.eval.compression.LABELS (sizes of configs/minilm_sts.py).
LABELS = {'adapter': 'bottleneck adapters, width 32', 'prefix': 'prefix tuning, 16 positions'}
# Rows whose students add computation to the teacher's kept layers: timed on their own line.
OWN_SPEED = ('adapter', 'prefix')
CALIBRATION_BATCH = 32
BATCHES = (1, 32)
COLUMNS = (('spearman', 'STS-B dev Spearman', 1.0, 2),
           ('spearman_vs_full', 'Δ vs full (paired)', 1.0, 2),
           ('stored_bytes', 'stored MB', 1 / 2**20, 2),
           ('trainable_params', 'trained params', 1, 0))
CAPTION = (
    'STS-B dev Spearman ×100 (cosine of mean-pooled embeddings), {{n}} seed(s), mean ± std. '
    "Students keep the teacher's layers {layers} and distil from cached teacher features "
    "(embedding MSE + 0.1 hidden MSE + 0.1 MiniLM relations). Δ: the row's Spearman minus "
    "the same seed's full fine-tuning (paired over seeds). The attention and MLP "
    'projections are quantized; the embedding tables stay float32 except in the rows that say '
    'so. Quantized rows are evaluated on their dequantized weights (exactly the stored '
    'model).')
SPEED_CAPTION = (
    'Encode speed on this machine, measured once as this table was written '
    '(kd.eval.speed: sentences/s, best of {runs} passes over {n} dev sentences). Every student '
    'row runs the same float model (LoRA and QLoRA are merged on export, quantized rows run on '
    'their dequantized weights), so one line times them all{own}: what quantization saves here '
    'is size, not time.')


def _arg(row: str, config_arg: str) -> str:
  return ','.join(a for a in [*config_arg.split(','), *TRAINED[row][0].split(',')] if a)


def row_config(row: str, seed: str, workdir: str, config_arg: str, overrides=()):
  """The config a trained row's run gets (its command's overrides applied here too)."""
  arg = _arg(row, config_arg)
  module = sweep.load(os.path.join(seeds.REPO, 'configs', 'minilm_sts.py'))[0]
  config = module.get_config(arg or None)
  config.seed = int(seed)
  config.train.progress = False
  config.teacher.cache_dir = os.path.join(workdir, 'teacher_cache')
  seeds.override(config, TRAINED[row][1], overrides)
  return config


def command(row: str, seed: str, workdir: str, config_arg: str, overrides=()) -> list[str]:
  """The `kd.main` command of a trained row; its runs share one teacher cache."""
  arg = _arg(row, config_arg)
  return [sys.executable, '-m', 'kd.main',
          '--config=configs/minilm_sts.py' + (f':{arg}' if arg else ''),
          f'--workdir={os.path.join(workdir, f"seed_{seed}", row)}', f'--config.seed={seed}',
          '--config.train.progress=False',
          f'--config.teacher.cache_dir={os.path.join(workdir, "teacher_cache")}',
          *[f'--config.{k}={v}' for k, v in TRAINED[row][1].items()],
          *[f'--config.{o}' for o in overrides]]


def speed_sentences(config) -> list[str]:
  s1, s2, _ = sentences.read_sts(sentence.eval_path(config))
  return list(dict.fromkeys(s1 + s2))[:config.eval.get('speed_sentences', 0) or None]


def encode_speeds(model, sents, runs: int) -> dict:
  """sentences/s of kd.eval.speed.encode_throughput at each of BATCHES."""
  return {f'sentences_per_s_b{b}': speed.encode_throughput(model, sents, batch_size=b, runs=runs)
          for b in BATCHES}


def student_base(config, teacher=None):
  """The students' architecture and init: the teacher's kept layers (sentence.main's student);
  the LoRA students' frozen base."""
  teacher = teacher or hf.load(sentence.teacher_path(config.teacher.path))
  keep, _, _ = sentence.plan_layers(config, teacher.config.num_layers)
  return models.student_from_teacher(teacher, keep)


def measure_speeds(config, sents, own=()) -> dict:
  """{'teacher', 'student', and each of `own`: encode_speeds over `sents`}, timed one after the
  other here; `own` are (row, its config) of rows whose students add computation (adapters,
  prefixes), timed with their config's PEFT params added to the students' architecture.

  Timing the students' architecture once, not each row's export, is exact here: every exported
  row is that float model with other weights, and a forward's time does not depend on them."""
  teacher = hf.load(sentence.teacher_path(config.teacher.path))
  runs = config.eval.speed_runs
  base = student_base(config, teacher)
  out = {'teacher': encode_speeds(teacher, sents, runs),
         'student': encode_speeds(base, sents, runs)}
  for row, own_config in own:
    cfg, params = compress.grow_peft(compress.read(own_config), base.config, base.params, 0)
    out[row] = encode_speeds(base.replace(module=models.Encoder(cfg), params=params), sents,
                             runs)
  return out


def speed_table(speeds: dict, config, n_sentences: int) -> str:
  """Markdown: SPEED_CAPTION, then the teacher's, the students' and the adapter / prefix
  students' speeds (× teacher)."""
  t = speeds['teacher']
  keep = ', '.join(str(i) for i in config.student.layers)
  key = lambda b: f'sentences_per_s_b{b}'
  own = [r for r in speeds if r not in ('teacher', 'student')]
  names = {'student': f"every {'other ' if own else ''}student (the teacher's layers {keep})",
           **{r: f'{LABELS[r]} (same layers)' for r in own}}
  return '\n'.join([
      SPEED_CAPTION.format(
          runs=config.eval.speed_runs, n=n_sentences,
          own=' but the adapter and prefix rows, which add computation and have their own'
          if own else ''), '',
      '| model | ' + ' | '.join(f'sent/s b={b}' for b in BATCHES) + ' |',
      '|---|' + '---:|' * len(BATCHES),
      '| teacher | ' + ' | '.join(f'{t[key(b)]:.0f}' for b in BATCHES) + ' |',
      *[f'| {names[r]} | ' + ' | '.join(
          f'{speeds[r][key(b)]:.0f} ({speeds[r][key(b)] / t[key(b)]:.2f}×)' for b in BATCHES)
        + ' |' for r in ('student', *own)]])


def stored_size(row: str, seed: str, workdir: str, config, result: dict) -> dict:
  """`result` with the stored size of a trained row's exported student (cached in size.json).

  Stored: float32; QAT: kd.quant's packed file of the (on-grid) export; QLoRA: the packed
  quantized base plus its float32 adapters (the model it evaluates is base + A·B)."""
  cache = os.path.join(workdir, f'seed_{seed}', row, 'size.json')
  if os.path.exists(cache):
    return dict(result, **json.load(open(cache)))
  model = hf.load(os.path.join(workdir, f'seed_{seed}', row, 'hf'))
  method, qcfg = sections.quant_config(config)
  if method == 'qat':
    size = compression.stored_bytes(qparams=quant.quantize_params(model.params, qcfg))
  elif method == 'qlora':
    base = quant.quantize_params(student_base(config).params, qcfg)
    size = compression.stored_bytes(qparams=base) + 4 * result['trainable_params']
  else:
    size = compression.stored_bytes(model.params)
  extra = dict(stored_bytes=size)
  with open(cache, 'w') as f:
    json.dump(extra, f)
  return dict(result, **extra)


def calibration_batches(config, tokenizer, n: int = compression.CALIBRATION_BATCHES,
                        batch_size: int = CALIBRATION_BATCH) -> list[dict]:
  """`n` padded batches {'input_ids', 'attention_mask'} of train sentences, for GPTQ."""
  sents = sentences.load(tuple(config.data.train))[:n * batch_size]
  out = []
  for i in range(0, len(sents), batch_size):
    enc = tokenizer(sents[i:i + batch_size], truncation=True, max_length=config.data.max_length,
                    padding=True, return_tensors='np')
    out.append({'input_ids': enc['input_ids'].astype(np.int32),
                'attention_mask': enc['attention_mask'].astype(np.int32)})
  return out


def post_training(seed: str, workdir: str, config, rows) -> dict:
  """{row: result} of the post-training rows made from the full row's exported student, cached
  in <workdir>/seed_<s>/post.json."""
  cache = os.path.join(workdir, f'seed_{seed}', 'post.json')
  done = json.load(open(cache)) if os.path.exists(cache) else {}
  todo = [r for r in rows if r not in done]
  full = os.path.join(workdir, f'seed_{seed}', 'full', 'hf')
  if not todo or not os.path.exists(os.path.join(full, 'config.json')):
    return {r: done[r] for r in rows if r in done}
  model = hf.load(full)
  dev = sentence.eval_path(config)
  calib = None
  for row in todo:
    qcfg = compression.post_config(row)
    t0 = time.perf_counter()
    if compression.POST[row][1].get('gptq'):
      calib = calib or calibration_batches(config, model.tokenizer)
      qparams = quant.quantize_model(model.module, model.params, calib, qcfg)
    else:
      qparams = quant.quantize_params(model.params, qcfg)
    seconds = time.perf_counter() - t0
    deq = model.replace(params=quant.dequantize(qparams))
    score = sts.evaluate(deq, dev, batch_size=config.eval.batch_size)['spearman']
    done[row] = dict(spearman=score, stored_bytes=compression.stored_bytes(qparams=qparams),
                     quantize_s=seconds, params=models.count_params(deq.params),
                     trainable_params=0)
    with open(cache + '.tmp', 'w') as f:
      json.dump(done, f, indent=1)
    os.replace(cache + '.tmp', cache)
  return {r: done[r] for r in rows if r in done}


def run_seeds(rows, seed_ids, workdir: str, config_arg: str = '', overrides=(),
              collect_only: bool = False) -> dict:
  """{seed: {'teacher' and each row with a result: its result}}; a post-training row needs
  the full row, which is added to the rows if missing."""
  unknown = sorted(set(rows) - set(TRAINED) - set(POST))
  if unknown:
    raise ValueError(f'rows {unknown} have no sentence-encoder version; valid: '
                     f'{", ".join([*TRAINED, *POST])}')
  order = compression.row_order(rows, TRAINED, POST)
  trained = [r for r in order if r in TRAINED]
  post = [r for r in order if r in POST]
  runs = {}
  for seed in seed_ids:
    runs[seed] = got = {}
    for row in trained:
      r = seeds.run(row, seed, workdir=workdir, collect_only=collect_only, command=command,
                    config_arg=config_arg, overrides=overrides)
      if r is None:
        continue
      config = row_config(row, seed, workdir, config_arg, overrides)
      got[row] = stored_size(row, seed, workdir, config, r['student'])
      got['teacher'] = dict(r['teacher'], stored_bytes=r['teacher']['param_bytes'])
    config = row_config('full', seed, workdir, config_arg, overrides)
    got.update(post_training(seed, workdir, config, post))
  return runs


def table(results: dict, layers: str) -> str:
  """Markdown: the rows of `results` ({row: [result of each seed]}), COLUMNS as mean ± std over
  the seeds that have them; `layers` are the students' (the caption names them)."""
  return report.table(results, COLUMNS, CAPTION.format(layers=layers),
                      compression.labels(LABELS))


def main(argv):
  del argv
  f = flags.FLAGS
  prior = seeds.load_prior(f.prior)
  try:
    runs = run_seeds(f.rows, f.seeds, f.workdir, f.config_arg, f.override, f.collect_only)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  config = row_config('full', '0', f.workdir, f.config_arg, f.override)
  layers = ', '.join(str(i) for i in config.student.layers)
  sents = speed_sentences(config)
  own = [(r, row_config(r, '0', f.workdir, f.config_arg, f.override))
         for r in OWN_SPEED if r in f.rows]
  runs = report.merge_runs(runs, prior)
  seeds.check_finished(runs, f.rows, f.workdir)
  compression.write(f.out, 'compressed_minilm', runs, 'spearman',
                    compression.row_order(f.rows, TRAINED, POST),
                    lambda results: table(results, layers), 'STS-B dev Spearman',
                    after=lambda: speed_table(measure_speeds(config, sents, own), config,
                                              len(sents)))


if __name__ == '__main__':
  seeds.define_flags([*TRAINED, *POST], workdir='/tmp/kd/compressed_minilm')
  app.run(main)
