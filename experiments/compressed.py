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
mixed int4/int8 plan (the quarter of the projections with the largest measured KL in int8),
and two that quantize the embedding tables too, per row: all int8, and int4 projections with
int8 tables.
Columns: held-out perplexity and top-1 agreement with the teacher (mean ± std over seeds); the
stored student's size (float32 params; quantized rows: kd.quant's file, int4 packed two per
byte, scales in float16; QLoRA: its quantized base's file plus the float32 adapters); trained
parameters; forward tokens/s at batch 1 and 32 (T = 128, this machine, best of 3; quantized rows
run on dequantized weights here, so their speed is that of the float model: the size is what
they save). Writes <out>/compressed.md and .png.
Smoke test: --config_arg=tiny --seeds=0 --workdir=/tmp/comp_tiny --out=/tmp/comp_tiny_out.

--task=minilm: the same for the sentence encoder (configs/minilm_sts.py: all-MiniLM-L6-v2 into
its layers 0, 3, 5, offline teacher features shared by every run in <workdir>/teacher_cache).
Trained rows (MINILM_TRAINED, one `kd.main` run each): full (the normal job), LoRA r = 8 on every
attention and MLP projection, bottleneck adapters (width 32) and prefix tuning (16 positions),
QAT int8 (per channel) and int4 (groups of 32), QLoRA (LoRA on an int4 base, groups of 32);
post-training rows ptq8, ptq4, gptq4, ptq8_emb, ptq4_emb8 quantize the
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
  --task=minilm --config_arg=tiny --seeds=0 --workdir=/tmp/comp_minilm_tiny \
      --out=/tmp/comp_minilm_tiny_out --override=teacher.path=DIR --override=student.layers=0,3
where DIR holds a small HF BERT checkpoint with a tokenizer (e.g. tests/conftest.py's tiny_bert).
"""

import ast
import functools
import json
import os
import subprocess
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

from kd import hf  # pylint: disable=g-import-not-at-top,wrong-import-position
from kd import models  # pylint: disable=g-import-not-at-top,wrong-import-position
from kd import quant  # pylint: disable=g-import-not-at-top,wrong-import-position
from kd import sweep  # pylint: disable=g-import-not-at-top,wrong-import-position
from kd.data import lm_data  # pylint: disable=g-import-not-at-top,wrong-import-position
from kd.data import sentences  # pylint: disable=g-import-not-at-top,wrong-import-position
from kd.eval import report  # pylint: disable=g-import-not-at-top,wrong-import-position
from kd.eval import speed  # pylint: disable=g-import-not-at-top,wrong-import-position
from kd.eval import sts  # pylint: disable=g-import-not-at-top,wrong-import-position
from kd.train import build  # pylint: disable=g-import-not-at-top,wrong-import-position
from kd.train import compress  # pylint: disable=g-import-not-at-top,wrong-import-position
from kd.train import loop  # pylint: disable=g-import-not-at-top,wrong-import-position
from kd.train import run  # pylint: disable=g-import-not-at-top,wrong-import-position
from kd.train import sections  # pylint: disable=g-import-not-at-top,wrong-import-position
from kd.train import sentence  # pylint: disable=g-import-not-at-top,wrong-import-position
from kd.train import step as step_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

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
    'ptq8_emb': ('PTQ int8, embedding tables too (per row)', dict(bits=8, group_size=None,
                                                                  embed_bits=8)),
    'ptq4_emb8': ('PTQ int4 (groups of 32) + int8 embedding tables',
                  dict(bits=4, group_size=32, embed_bits=8)),
}
TARGET = r'.*_proj'
CALIBRATION_BATCHES = 8
# --task=minilm: name -> (configs/minilm_sts.py variants, {config key: value}) of trained rows
# (labels as in TRAINED), and the post-training rows (as in POST).
MINILM_TRAINED = {
    'full': ('', {}),
    'lora': ('lora', {}),
    'adapter': ('peft=adapter', {}),
    'prefix': ('peft=prefix', {}),
    'qat8': ('qat=8', {'quant.group_size': 0}),
    'qat4': ('qat=4', {}),
    'qlora': ('lora,qlora', {}),
}
MINILM_POST = ('ptq8', 'ptq4', 'gptq4', 'ptq8_emb', 'ptq4_emb8')
# Labels of the --task=minilm rows whose size differs from the decoder's (configs/minilm_sts.py).
MINILM_LABELS = {'adapter': 'bottleneck adapters, width 32',
                 'prefix': 'prefix tuning, 16 positions'}
# Rows whose students add computation to the teacher's kept layers: timed on their own line.
MINILM_OWN_SPEED = ('adapter', 'prefix')
MINILM_CALIBRATION_BATCH = 32


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
  config.update_from_flattened_dict(settings)
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
                             group_size=how['group_size'] and tiny_group(config),
                             embed_bits=how.get('embed_bits'))
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
  data = lm_data.LMData(config, where)
  teacher = build.build_model(config.teacher.model, data.vocab_size)
  student = build.build_model(config.student, data.vocab_size)
  teacher_params, _ = run.train_teacher(config, data, teacher, where)
  init = build.student_init(config, student, teacher, teacher_params)
  student, init = build.peft_student(config, student, init)
  params, _ = run.run_stage(config, data, f'{where}/student_kd', student, teacher,
                            teacher_params, dict(config.losses), steps=config.train.steps,
                            seed=config.seed, name='restore', init_variables=init)
  method, qcfg = sections.quant_config(config)
  trainable = result.get('trainable_params', result['params'])
  # QAT: the packed file of the (on-grid) student. QLoRA: the packed base plus its float32
  # adapters (what it evaluates is base + A·B; the file's size depends on the shapes only, so
  # the merged params stand in for the base).
  size = stored_bytes(params, quant.quantize_params(params, qcfg) if method != 'none' else None)
  extra = dict(trainable_params=trainable,
               stored_bytes=size + (4 * trainable if method == 'qlora' else 0),
               **{f'tokens_per_s_b{b}': tokens_per_s(student, params, b) for b in (1, 32)})
  with open(cache, 'w') as f:
    json.dump(extra, f)
  return dict(result, **extra)


def paired(runs: dict, key: str, base: str = 'full') -> dict:
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


COLUMNS = (('perplexity', 'held-out ppl', 1.0, 2),
           ('perplexity_vs_full', 'Δ ppl vs full (paired)', 1.0, 2),
           ('agreement', 'agreement (%)', 100.0, 1),
           ('stored_bytes', 'stored KB', 1 / 1024, 0), ('trainable_params', 'trained params', 1, 0),
           ('tokens_per_s_b1', 'tok/s b=1', 1, 0), ('tokens_per_s_b32', 'tok/s b=32', 1, 0))
MINILM_COLUMNS = (('spearman', 'STS-B dev Spearman', 1.0, 2),
                  ('spearman_vs_full', 'Δ vs full (paired)', 1.0, 2),
                  ('stored_bytes', 'stored MB', 1 / 2**20, 2),
                  ('trainable_params', 'trained params', 1, 0))
MINILM_CAPTION = (
    'STS-B dev Spearman ×100 (cosine of mean-pooled embeddings), {{n}} seed(s), mean ± std. '
    "Students keep the teacher's layers {layers} and distil from cached teacher features "
    "(embedding MSE + 0.1 hidden MSE + 0.1 MiniLM relations). Δ: the row's Spearman minus "
    "the same seed's full fine-tuning (paired over seeds). The attention and MLP "
    'projections are quantized; the embedding tables stay float32 except in the rows that say '
    'so. Quantized rows are evaluated on their dequantized weights (exactly the stored '
    'model).')
MINILM_SPEED_CAPTION = (
    'Encode speed on this machine, measured once as this table was written '
    '(kd.eval.speed: sentences/s, best of {runs} passes over {n} dev sentences). Every student '
    'row runs the same float model (LoRA and QLoRA are merged on export, quantized rows run on '
    'their dequantized weights), so one line times them all{own}: what quantization saves here '
    'is size, not time.')
BATCHES = (1, 32)


def table(results: dict, columns=COLUMNS, caption: str | None = None, labels=None) -> str:
  """Markdown: one row per entry of `results` ({row: [result of each seed]}), `columns` of
  (key, title, scale, digits) as mean ± std over the seeds that have the key; `caption` may
  use {n} (seeds); `labels` {row: label} replaces the default labels of those rows."""
  n = max(len(v) for v in results.values())
  if caption is None:
    caption = ('Tiny Shakespeare validation split, {n} seed(s), mean ± std. Students start from '
               "the teacher's layers; KD loss 0.5·CE + 0.5·T²·KL, T = 2. Δ: the row's "
               "perplexity minus the same seed's full fine-tuning (paired over seeds). "
               'Quantized rows are evaluated on their dequantized weights (exactly the stored '
               'model).')
  lines = [caption.format(n=n), '',
           '| student | ' + ' | '.join(c[1] for c in columns) + ' |',
           '|---|' + '---:|' * len(columns)]
  labels = {**{k: v[0] for k, v in TRAINED.items()}, **{k: v[0] for k, v in POST.items()},
            'teacher': 'teacher', **(labels or {})}
  for row, runs in results.items():
    if not runs:
      continue
    values = [[r[k] for r in runs if k in r] for k, _, _, _ in columns]  # seeds that have it
    cells = [report.mean_std(v, s, d) if v else '-' for v, (_, _, s, d) in zip(values, columns)]
    lines.append(f'| {labels[row]} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


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


def plot(results: dict, path: str, metric: str = 'perplexity',
         ylabel: str = 'held-out perplexity') -> None:
  """`metric` (perplexity) against stored size, one point per row (mean over seeds); rows whose
  points fall on one another share one label ('ptq8, qat8')."""
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


# ----------------------------------------------------------------------------- --task=minilm


def _parse(value: str):
  """An override's value as kd.main's flags would read it: a Python literal, else the string
  ('0,3' -> (0, 3), '1e-3' -> 0.001, 'DIR' -> 'DIR')."""
  try:
    return ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return value


def minilm_config(row: str, seed: str, workdir: str, config_arg: str, overrides=()):
  """The config a trained row's run gets (its command's overrides applied here too)."""
  extra, settings = MINILM_TRAINED[row]
  arg = ','.join(a for a in [*config_arg.split(','), *extra.split(',')] if a)
  module = sweep.load(os.path.join(objectives.REPO, 'configs', 'minilm_sts.py'))[0]
  config = module.get_config(arg or None)
  config.seed = int(seed)
  config.train.progress = False
  config.teacher.cache_dir = os.path.join(workdir, 'teacher_cache')
  with config.ignore_type():
    config.update_from_flattened_dict({
        key: _parse(value) if isinstance(value, str) else value
        for key, value in [*settings.items(), *(o.split('=', 1) for o in overrides)]})
  return config


def minilm_command(row: str, seed: str, workdir: str, config_arg: str, overrides=()):
  """The `kd.main` command of a trained row; its runs share one teacher cache."""
  extra, settings = MINILM_TRAINED[row]
  arg = ','.join(a for a in [*config_arg.split(','), *extra.split(',')] if a)
  return [sys.executable, '-m', 'kd.main',
          '--config=configs/minilm_sts.py' + (f':{arg}' if arg else ''),
          f'--workdir={os.path.join(workdir, f"seed_{seed}", row)}', f'--config.seed={seed}',
          '--config.train.progress=False',
          f'--config.teacher.cache_dir={os.path.join(workdir, "teacher_cache")}',
          *[f'--config.{k}={v}' for k, v in settings.items()],
          *[f'--config.{o}' for o in overrides]]


def minilm_run(row: str, seed: str, workdir: str, config_arg: str, overrides=(),
               collect_only: bool = False) -> dict | None:
  """results.json of a trained row's run (run first unless present or `collect_only`)."""
  result = os.path.join(workdir, f'seed_{seed}', row, 'results.json')
  if not collect_only and not os.path.exists(result):
    t0 = time.perf_counter()
    subprocess.run(minilm_command(row, seed, workdir, config_arg, overrides), check=True,
                   cwd=objectives.REPO)
    print(f'{row} seed {seed}: {time.perf_counter() - t0:.0f} s', flush=True)
  if not os.path.exists(result):
    return None
  with open(result) as f:
    return json.load(f)


def speed_sentences(config) -> list[str]:
  s1, s2, _ = sentences.read_sts(sentence.eval_path(config))
  return list(dict.fromkeys(s1 + s2))[:config.eval.get('speed_sentences', 0) or None]


def encode_speeds(model, sents, runs: int) -> dict:
  """sentences/s of kd.eval.speed.encode_throughput at each of BATCHES."""
  return {f'sentences_per_s_b{b}': speed.encode_throughput(model, sents, batch_size=b, runs=runs)
          for b in BATCHES}


def minilm_student(config, teacher=None):
  """The students' architecture and init: the teacher's kept layers (sentence.main's student);
  the LoRA students' frozen base."""
  teacher = teacher or hf.load(sentence.teacher_path(config.teacher.path))
  keep, _, _ = sentence.plan_layers(config, teacher.config.num_layers)
  return models.student_from_teacher(teacher, keep)


def minilm_speeds(config, sents, own=()) -> dict:
  """{'teacher', 'student', and each of `own`: encode_speeds over `sents`}, timed one after the
  other here; `own` are (row, its config) of rows whose students add computation (adapters,
  prefixes), timed with their config's PEFT params added to the students' architecture.

  Timing the students' architecture once, not each row's export, is exact here: every exported
  row is that float model with other weights, and a forward's time does not depend on them."""
  teacher = hf.load(sentence.teacher_path(config.teacher.path))
  runs = config.eval.speed_runs
  student = minilm_student(config, teacher)
  out = {'teacher': encode_speeds(teacher, sents, runs),
         'student': encode_speeds(student, sents, runs)}
  for row, row_config in own:
    cfg, params = compress.grow_peft(row_config, student.config, student.params, 0)
    out[row] = encode_speeds(student.replace(module=models.Encoder(cfg), params=params), sents,
                             runs)
  return out


def speed_table(speeds: dict, config, n_sentences: int) -> str:
  """Markdown: MINILM_SPEED_CAPTION, then the teacher's, the students' and the adapter / prefix
  students' speeds (× teacher)."""
  t = speeds['teacher']
  keep = ', '.join(str(i) for i in config.student.layers)
  key = lambda b: f'sentences_per_s_b{b}'
  own = [r for r in speeds if r not in ('teacher', 'student')]
  names = {'student': f"every {'other ' if own else ''}student (the teacher's layers {keep})",
           **{r: f'{MINILM_LABELS[r]} (same layers)' for r in own}}
  return '\n'.join([
      MINILM_SPEED_CAPTION.format(
          runs=config.eval.speed_runs, n=n_sentences,
          own=' but the adapter and prefix rows, which add computation and have their own'
          if own else ''), '',
      '| model | ' + ' | '.join(f'sent/s b={b}' for b in BATCHES) + ' |',
      '|---|' + '---:|' * len(BATCHES),
      '| teacher | ' + ' | '.join(f'{t[key(b)]:.0f}' for b in BATCHES) + ' |',
      *[f'| {names[r]} | ' + ' | '.join(
          f'{speeds[r][key(b)]:.0f} ({speeds[r][key(b)] / t[key(b)]:.2f}×)' for b in BATCHES)
        + ' |' for r in ('student', *own)]])


def minilm_stored_size(row: str, seed: str, workdir: str, config, result: dict) -> dict:
  """`result` with the stored size of a trained row's exported student (cached in size.json).

  Stored: float32; QAT: kd.quant's packed file of the (on-grid) export; QLoRA: the packed
  quantized base plus its float32 adapters (the model it evaluates is base + A·B)."""
  cache = os.path.join(workdir, f'seed_{seed}', row, 'size.json')
  if os.path.exists(cache):
    return dict(result, **json.load(open(cache)))
  model = hf.load(os.path.join(workdir, f'seed_{seed}', row, 'hf'))
  method, qcfg = sections.quant_config(config)
  if method == 'qat':
    size = stored_bytes(qparams=quant.quantize_params(model.params, qcfg))
  elif method == 'qlora':
    size = (stored_bytes(qparams=quant.quantize_params(minilm_student(config).params, qcfg))
            + 4 * result['trainable_params'])
  else:
    size = stored_bytes(model.params)
  extra = dict(stored_bytes=size)
  with open(cache, 'w') as f:
    json.dump(extra, f)
  return dict(result, **extra)


def calibration_batches(config, tokenizer, n: int = CALIBRATION_BATCHES,
                        batch_size: int = MINILM_CALIBRATION_BATCH) -> list[dict]:
  """`n` padded batches {'input_ids', 'attention_mask'} of train sentences, for GPTQ."""
  sents = sentences.load(tuple(config.data.train))[:n * batch_size]
  out = []
  for i in range(0, len(sents), batch_size):
    enc = tokenizer(sents[i:i + batch_size], truncation=True, max_length=config.data.max_length,
                    padding=True, return_tensors='np')
    out.append({'input_ids': enc['input_ids'].astype(np.int32),
                'attention_mask': enc['attention_mask'].astype(np.int32)})
  return out


def minilm_post_training(seed: str, workdir: str, config, rows) -> dict:
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
    how = POST[row][1]
    qcfg = quant.QuantConfig(target=TARGET, bits=how['bits'], group_size=how['group_size'],
                             embed_bits=how.get('embed_bits'))
    t0 = time.perf_counter()
    if how.get('gptq'):
      calib = calib or calibration_batches(config, model.tokenizer)
      qparams = quant.quantize_model(model.module, model.params, calib, qcfg)
    else:
      qparams = quant.quantize_params(model.params, qcfg)
    seconds = time.perf_counter() - t0
    deq = model.replace(params=quant.dequantize(qparams))
    score = sts.evaluate(deq, dev, batch_size=config.eval.batch_size)['spearman']
    done[row] = dict(spearman=score, stored_bytes=stored_bytes(qparams=qparams),
                     quantize_s=seconds, params=models.count_params(deq.params),
                     trainable_params=0)
    with open(cache + '.tmp', 'w') as f:
      json.dump(done, f, indent=1)
    os.replace(cache + '.tmp', cache)
  return {r: done[r] for r in rows if r in done}


def minilm_runs(rows, seeds, workdir: str, config_arg: str = '', overrides=(),
                collect_only: bool = False) -> dict:
  """{seed: {'teacher' and each row with a result: its result}}; a post-training row needs
  the full row, which is added to the rows if missing."""
  unknown = sorted(set(rows) - set(MINILM_TRAINED) - set(MINILM_POST))
  if unknown:
    raise ValueError(f'rows {unknown} have no --task=minilm version; valid: '
                     f'{", ".join([*MINILM_TRAINED, *MINILM_POST])}')
  order = row_order(rows, MINILM_TRAINED, MINILM_POST)
  trained = [r for r in order if r in MINILM_TRAINED]
  post = [r for r in order if r in MINILM_POST]
  runs = {}
  for seed in seeds:
    runs[seed] = got = {}
    for row in trained:
      r = minilm_run(row, seed, workdir, config_arg, overrides, collect_only)
      if r is None:
        continue
      config = minilm_config(row, seed, workdir, config_arg, overrides)
      got[row] = minilm_stored_size(row, seed, workdir, config, r['student'])
      got['teacher'] = dict(r['teacher'], stored_bytes=r['teacher']['param_bytes'])
    config = minilm_config('full', seed, workdir, config_arg, overrides)
    got.update(minilm_post_training(seed, workdir, config, post))
  return runs


def row_order(rows, trained, post) -> list[str]:
  """The table's rows: the teacher, the trained rows (full first when a post-training row
  needs it), then the post-training rows, each in `rows`' order."""
  trained = [r for r in rows if r in trained]
  post = [r for r in rows if r in post]
  return ['teacher', *(['full'] if post and 'full' not in trained else []), *trained, *post]


def main_minilm(f) -> None:
  rows = f.rows if f['rows'].present else [*MINILM_TRAINED, *MINILM_POST]
  prior = objectives.load_prior(f.prior)
  try:
    runs = minilm_runs(rows, f.seeds, f.workdir, f.config_arg, f.override, f.collect_only)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  config = minilm_config('full', '0', f.workdir, f.config_arg, f.override)
  layers = ', '.join(str(i) for i in config.student.layers)
  sents = speed_sentences(config)
  own = [(r, minilm_config(r, '0', f.workdir, f.config_arg, f.override))
         for r in MINILM_OWN_SPEED if r in rows]
  write(f, 'compressed_minilm', report.merge_runs(runs, prior), 'spearman',
        row_order(rows, MINILM_TRAINED, MINILM_POST), rows, MINILM_COLUMNS,
        MINILM_CAPTION.format(layers=layers), 'STS-B dev Spearman', labels=MINILM_LABELS,
        after=lambda: speed_table(minilm_speeds(config, sents, own), config, len(sents)))


def write(f, stem: str, runs: dict, metric: str, order, rows, columns=COLUMNS, caption=None,
          ylabel: str = 'held-out perplexity', after=None, labels=None) -> None:
  """<f.out>/<stem>.md, .png and .runs.json of `runs` (rows in `order`, with the paired
  column of `metric`, then the text `after()` returns); refused when none of `rows` has a
  result."""
  results = report.by_row(paired(runs, metric), order)
  if not any(results.get(r) for r in rows):
    raise app.UsageError(f'no finished runs under {f.workdir}')
  report.write(f.out, stem,
               table(results, columns, caption, labels) + ('\n\n' + after() if after else ''),
               lambda path: plot(results, path, metric, ylabel), runs=runs)


def main(argv):
  del argv
  f = flags.FLAGS
  if f.task == 'minilm':
    main_minilm(f)
    return
  unknown = sorted(set(f.rows) - set(TRAINED) - set(POST))
  if unknown:
    raise app.UsageError(f'unknown rows {unknown}; valid: {", ".join([*TRAINED, *POST])}')
  prior = objectives.load_prior(f.prior)
  order = row_order(f.rows, TRAINED, POST)
  trained = [r for r in order if r in TRAINED]  # with 'full' when post-training rows need it
  post = [r for r in order if r in POST]
  specs = {k: (*v, 'student_kd') for k, v in TRAINED.items()}
  runs = objectives.run_seeds(trained, f.seeds, workdir=f.workdir, collect_only=f.collect_only,
                              config_arg=f.config_arg, overrides=f.override, row_specs=specs)
  for seed, got in runs.items():  # sizes and speeds (the runs' own results lack them)
    for row in trained:
      if row in got:
        got[row] = speed_and_size(seed, f.workdir, f.config_arg, row, got[row])
    got.update(post_training(seed, f.workdir, f.config_arg, post))
  write(f, 'compressed', report.merge_runs(runs, prior), 'perplexity', order, f.rows)


if __name__ == '__main__':
  objectives.define_flags(row_specs={**TRAINED, **POST}, workdir='/tmp/kd/compressed')
  flags.DEFINE_enum('task', 'shakespeare', ['shakespeare', 'minilm'],
                    'shakespeare: the decoder rows; minilm: the sentence-encoder rows '
                    '(default rows then: full, lora, adapter, prefix, qat8, qat4, qlora, ptq8, '
                    'ptq4, gptq4, ptq8_emb, ptq4_emb8).')
  app.run(main)
