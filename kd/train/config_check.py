"""Checks a config before anything is compiled or written, the rules that span its sections;
every error says what to do. (Each section is read into what its subsystem takes by
kd.train.sections.)"""

import dataclasses
import math
import os
import re

import jax

from kd import losses
from kd import models
from kd import parallel
from kd.train import schedules
from kd.train import sections
from kd.train.sections import ConfigError


def check_losses(config, example: str = "{'ce': 0.5, 'kl': 0.5}") -> set:
  """Loss names exist, weights are valid schedules, loss_kwargs name configured losses.

  Returns the kinds of the configured losses.
  """
  terms = dict(config.losses)
  if not terms:
    raise ConfigError(f'config.losses is empty; name at least one loss, e.g. {example}')
  kinds = set()
  for name, weight in terms.items():
    try:
      kinds.add(losses.get(name).kind)
    except ValueError as e:
      raise ConfigError(f'config.losses: {e}') from None
    schedules.make(weight, f'losses.{name}')
    low, high = schedules.bounds(weight)
    if not (math.isfinite(low) and math.isfinite(high) and low >= 0):
      raise ConfigError(f'config.losses.{name}={weight!r}: a loss weight must stay finite and '
                        '>= 0 (0 turns the term off)')
  for name in dict(config.get('loss_kwargs', {}) or {}):
    if name not in terms:
      raise ConfigError(f"config.loss_kwargs names '{name}', which is not in config.losses "
                        f'{sorted(terms)}; add it to config.losses or remove its kwargs')
  return kinds


# dotted key -> (the test, its words): checked wherever the config has the key.
_POSITIVE, _NONNEGATIVE = (lambda v: v > 0, '> 0'), (lambda v: v >= 0, '>= 0')
_ONE, _TWO = (lambda v: v >= 1, '>= 1'), (lambda v: v >= 2, '>= 2')
NUMBERS = {
    'optimizer.lr': _POSITIVE, 'teacher.optimizer.lr': _POSITIVE,
    'optimizer.warmup_steps': _NONNEGATIVE, 'optimizer.weight_decay': _NONNEGATIVE,
    'optimizer.grad_clip_norm': _NONNEGATIVE,  # 0 = off
    'train.steps': _ONE, 'train.epochs': _NONNEGATIVE, 'teacher.steps': _NONNEGATIVE,
    'train.accum_steps': _ONE, 'train.log_every': _ONE,
    'train.eval_every': _NONNEGATIVE, 'train.checkpoint_every': _NONNEGATIVE,  # 0 = at the end
    'train.keep': _TWO,  # an older checkpoint remains when the newest is damaged
    'train.skip_nonfinite': _NONNEGATIVE,
    'data.batch_size': _ONE, 'data.eval_batch_size': _ONE, 'data.seq_len': _ONE,
    'data.vocab_size': _ONE,
}
# The Shakespeare job's model widths and depths (the llm job's student sizes, 0 = the teacher's,
# sit beside a `source` key and are checked by that job).
MODEL_SIZES = ('hidden_size', 'num_layers', 'num_heads', 'num_kv_heads', 'intermediate_size')


def _get(config, dotted: str):
  node = config
  for part in dotted.split('.'):
    if not hasattr(node, 'get') or part not in node:
      return None
    node = node[part]
  return node


def _names() -> dict:
  """Dotted key -> the names it may hold, for every key that picks from a fixed set (paths,
  splits and data names are read, and refused by name, where the job opens them)."""
  from kd.models import decoder_config  # pylint: disable=g-import-not-at-top
  from kd.peft import lora  # pylint: disable=g-import-not-at-top
  from kd.train import JOBS  # pylint: disable=g-import-not-at-top
  from kd.train import optim  # pylint: disable=g-import-not-at-top
  from kd.train import replay  # pylint: disable=g-import-not-at-top
  dtypes = tuple(decoder_config.DTYPES)
  names = {
      'job': tuple(JOBS), 'logit_kernel': LOGIT_KERNELS,
      # 'kept' (the llm and sentence jobs): each layer of a cut with the one it came from
      'features.layer_map': (*losses.features.LAYER_MAPS, 'kept'),
      'peft.method': lora.METHODS_BY_NAME, 'quant.method': sections.QUANT_METHODS,
      'student_init.source': ('random', 'teacher', 'run'),
      'teacher.topk_semantics': losses.TOPK_SEMANTICS,
      'on_policy.adaptive.replay_schedule': tuple(replay.REPLAY_SCHEDULES),
      'features.attention_layers': ('last', 'all'),
      'data.task': ('lm', 'dialogue'), 'parallel.mode': tuple(parallel.MODES),
      'student.source': sections.STUDENT_SOURCES,
  }
  for prefix in ('', 'teacher.'):
    names[f'{prefix}optimizer.name'] = tuple(optim.OPTIMIZERS)
    names[f'{prefix}optimizer.schedule'] = optim.SCHEDULES
  for model in ('student', 'student.model', 'teacher.model'):
    names.update({f'{model}.{k}': dtypes for k in ('dtype', 'param_dtype')})
  return names


def check_names(config) -> None:
  """Every key that picks from a fixed set holds one of its names."""
  for key, valid in _names().items():
    value = _get(config, key)
    if value is not None and value not in valid:
      raise ConfigError(f'config.{key}={value!r}: use one of {tuple(valid)}')


# Keys that hold a regex over module paths, and folders a run may create.
TARGETS = ('peft.target', 'quant.target', 'teacher.quant.target')
FOLDERS = ('teacher.workdir', 'teacher.cache_dir')


def check_strings(config) -> None:
  """The free-form strings that can be read without loading anything: corpus name and TFDS
  splits, regexes, folders to create, a teacher cache to read, the coordinator's address.
  (Data sources, checkpoints and hub ids are refused by name where the job opens them.)"""
  from kd.data import text  # pylint: disable=g-import-not-at-top
  name = _get(config, 'data.name')
  if name is not None and name not in text.CORPORA:
    raise ConfigError(f'config.data.name={name!r}: use one of {tuple(text.CORPORA)}')
  for key in ('train_split', 'teacher_split', 'eval_split'):
    split = _get(config, f'data.{key}')
    if split is None or (split == '' and key != 'eval_split'):  # '' = 'train'
      continue
    try:
      text.check_split(split)
    except ValueError as e:
      raise ConfigError(f'config.data.{key}={split!r}: {e}') from None
  for key in TARGETS:
    target = _get(config, key)
    if target is None:
      continue
    try:
      re.compile(target)
    except (re.error, TypeError) as e:
      raise ConfigError(f'config.{key}={target!r} is not a regex ({e})') from None
    if not target:
      raise ConfigError(f"config.{key}='' matches nothing; give a regex over module paths, "
                        "e.g. '.*_proj'")
  for key in FOLDERS:
    folder = _get(config, key)
    if folder and '://' not in folder:
      _check_creatable(key, folder)
  cache = _get(config, 'teacher.cache')
  if cache and '://' not in cache and not os.path.isfile(os.path.join(cache, 'meta.json')):
    raise ConfigError(f'config.teacher.cache={cache!r} holds no teacher cache (no meta.json); '
                      'write one with `python -m kd.cache_teacher --config=... --workdir=...`')
  address = _get(config, 'parallel.coordinator_address')
  if address and not re.fullmatch(r'[^\s:]+:\d{1,5}', address):
    raise ConfigError(f'config.parallel.coordinator_address={address!r}: give host:port, e.g. '
                      "'10.0.0.2:1234' (or '' to let JAX find the coordinator)")


def _check_creatable(key: str, folder: str) -> None:
  """`folder` exists as a writable folder, or its nearest existing parent is one."""
  path = os.path.abspath(folder)
  while not os.path.exists(path):
    path = os.path.dirname(path)
  if not os.path.isdir(path) or not os.access(path, os.W_OK | os.X_OK):
    raise ConfigError(f'config.{key}={folder!r}: {path} is not a folder this user can write in; '
                      'give another path')


def check_numbers(config) -> None:
  """Every count, size and rate the config holds is a finite number in its range; every key
  that picks from a fixed set holds one of its names (check_names), and the free-form strings
  that can be checked without loading anything are sound (check_strings)."""
  check_names(config)
  check_strings(config)
  rules = dict(NUMBERS)
  if 'source' not in (config.get('student') or {}):
    rules.update({f'{m}.{k}': _ONE for m in ('student', 'teacher.model') for k in MODEL_SIZES})
  epochs = _get(config, 'train.epochs')
  if epochs is not None:  # the sentence job: steps 0 = as many as `epochs` take
    rules['train.steps'] = _NONNEGATIVE
  for key, (ok, words) in rules.items():
    value = _get(config, key)
    if value is None:
      continue
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ConfigError(f'config.{key}={value!r}: expected a number {words}')
    if not (math.isfinite(value) and ok(value)):
      raise ConfigError(f'config.{key}={value!r}: must be a finite number {words}')
  if epochs is not None and not (config.train.steps or epochs):
    raise ConfigError('config.train.steps and config.train.epochs are both 0: set one of them')


def check(config) -> None:
  """Checks that need no model: numbers in range, loss names and weights, temperature, batch
  split."""
  check_numbers(config)
  kinds = check_losses(config)
  low, _ = schedules.bounds(config.temperature)
  if not low > 0:  # (also NaN)
    raise ConfigError(f'config.temperature must stay > 0, got {config.temperature!r}')
  check_parallel(config)
  if int(config.get('chunk_size', 0)) < 0:
    raise ConfigError('config.chunk_size must be >= 0 (0 = no chunking)')
  if config.get('closed_form', None) is True:
    kwargs = dict(config.get('loss_kwargs', {}) or {})
    logit = {n: dict(kwargs.get(n, {})) for n in config.losses
             if losses.get(n).kind in ('logits', 'ce')}
    if not losses.closed_form_applies(logit):
      allowed = {n: sorted(kw) for n, kw in losses.CLOSED_FORM.items()}
      raise ConfigError(f'config.closed_form=True writes the gradient of these terms and kwargs '
                        f'only: {allowed}; the logit terms are {logit}. Set closed_form=None '
                        '(where it applies) or False.')
  check_on_policy(config)
  check_ensemble(config)
  check_logit_kernel(config)
  decay = float((config.get('self_distill') or {}).get('ema_decay', 0.0))
  if not 0.0 <= decay < 1.0:
    raise ConfigError(f'config.self_distill.ema_decay must be in [0, 1) (0 = off), got {decay}')
  if decay and not kinds & {'ce', 'pairs'}:
    # The EMA only follows the student: with it as the sole target, the student's fastest way
    # down is to stay where the EMA is, and both stay at their init (measured: perplexity = the
    # vocabulary size, agreement 100%).
    raise ConfigError(f'self-distillation from the EMA (self_distill.ema_decay={decay}) needs a '
                      f'label term beside the divergence, e.g. ce in config.losses '
                      f'(now {sorted(dict(config.losses))}); or set self_distill.ema_decay=0')
  if decay and config.teacher.get('cache', ''):
    raise ConfigError('an EMA teacher runs online: unset config.teacher.cache or set '
                      'self_distill.ema_decay=0')
  if config.get('online', False):
    problems = [p for p, bad in (
        ("peft.method='none'", (config.get('peft') or {}).get('method', 'none') != 'none'),
        ("teacher.cache=''", config.teacher.get('cache', '')),
        ('teacher.count=1', int(config.teacher.get('count', 1)) != 1)) if bad]
    if problems:
      raise ConfigError('online distillation (config.online) trains the teacher in the student '
                        f"step, which needs {', '.join(problems)}")
  rounds = config.get('born_again', 0)
  if not isinstance(rounds, int) or rounds < 0:
    raise ConfigError(f'config.born_again must be an int >= 0 (extra self-distillation rounds), '
                      f'got {rounds!r}')


LOGIT_KERNELS = ('xla', 'pallas')


def check_logit_kernel(config) -> None:
  """config.logit_kernel='pallas' (kd.losses.fused_head) computes 'ce' and 'kl' from the final
  hidden states and the plain heads of one student and one teacher."""
  kernel = config.get('logit_kernel', 'xla')
  if kernel not in LOGIT_KERNELS:
    raise ConfigError(f'config.logit_kernel={kernel!r}: use one of {LOGIT_KERNELS}')
  if kernel == 'xla':
    return
  logit = sorted(n for n in config.losses if losses.get(n).kind in ('logits', 'ce'))
  kwargs = {n: dict(kw) for n, kw in dict(config.get('loss_kwargs', {}) or {}).items()
            if n in logit and dict(kw)}
  peft = (config.get('peft') or {}).get('method', 'none')
  problems = [p for p, bad in (
      (f"logit losses among ('ce', 'kl') only, not {logit}", not set(logit) <= {'ce', 'kl'}),
      (f'no loss_kwargs for them, not {kwargs}', kwargs),
      ("teacher.cache='' (a cache holds logits, not the teacher's head)",
       config.teacher.get('cache', '')),
      ('teacher.count=1', int(config.teacher.get('count', 1)) != 1),
      ('teacher.quant.bits=0 (the kernel reads a plain head)',
       int((config.teacher.get('quant') or {}).get('bits', 0) or 0)),
      ('online=False', config.get('online', False)),
      (f"peft.method='none', not {peft!r}", peft != 'none')) if bad]
  if problems:
    raise ConfigError("config.logit_kernel='pallas' needs " + '; '.join(problems) +
                      "; or set logit_kernel='xla'")


def check_ensemble(config) -> None:
  """config.teacher.count > 1 (a mixture of teachers) gives logits only."""
  count = int(config.teacher.get('count', 1))
  weights = tuple(config.teacher.get('weights', ()) or ())
  if count < 1:
    raise ConfigError(f'config.teacher.count must be >= 1, got {count}')
  if weights and (len(weights) != count or min(weights) < 0 or abs(sum(weights) - 1) > 1e-6):
    raise ConfigError(f'config.teacher.weights={weights}: give {count} weights >= 0 summing to '
                      '1, or () for equal weights')
  if count == 1:
    return
  other = sorted(n for n in config.losses if losses.get(n).kind not in ('ce', 'logits'))
  problems = [f'losses {other} need hidden states, which a mixture has not'] if other else []
  if int(config.get('chunk_size', 0)):
    problems.append('chunk_size > 0 needs a teacher head (set chunk_size=0)')
  if config.teacher.get('cache', ''):
    problems.append('an offline teacher cache holds one teacher (unset teacher.cache)')
  if (config.get('student_init') or {}).get('source', 'random') == 'teacher':
    problems.append("student_init.source='teacher' needs one teacher (use 'random')")
  if problems:
    raise ConfigError(f'config.teacher.count={count} (an ensemble of teachers): '
                      + '; '.join(problems))


def check_on_policy(config) -> None:
  """config.data.task and config.on_policy (GKD) fit together."""
  task = config.data.get('task', 'lm')
  if task not in ('lm', 'dialogue'):
    raise ConfigError(f"config.data.task={task!r} is unknown; use 'lm' or 'dialogue'")
  if task == 'dialogue':
    for key in ('prompt_len', 'response_len'):
      if int(config.data.get(key, 0)) < (1 if key == 'prompt_len' else 2):
        raise ConfigError(f'config.data.{key} must be set (>= 1, response_len >= 2) for the '
                          "dialogue task")
  if (config.get('seqkd') or {}).get('enabled', False) and task != 'dialogue':
    raise ConfigError("config.seqkd.enabled needs prompts for the teacher to answer: set "
                      "config.data.task='dialogue'")
  fraction = float((config.get('on_policy') or {}).get('fraction', 0.0))
  if not 0.0 <= fraction <= 1.0:
    raise ConfigError(f'config.on_policy.fraction must be in [0, 1], got {fraction}')
  adaptive = dict((config.get('on_policy') or {}).get('adaptive') or {})
  if adaptive.get('enabled', False):
    if fraction:
      raise ConfigError('config.on_policy.adaptive.enabled replaces batches itself: set '
                        'on_policy.fraction=0 (or disable adaptive)')
    if not int(config.train.get('eval_every', 0)):
      raise ConfigError('adaptive off-policy raises its sampling probability on validation '
                        'losses: set config.train.eval_every > 0')
    from kd.train import replay  # pylint: disable=g-import-not-at-top
    try:
      replay.AdaptiveOffPolicy.from_config(adaptive, 0, int(config.train.steps))
    except (TypeError, ValueError) as e:
      raise ConfigError(f'config.on_policy.adaptive: {e}') from None
    fraction = 1.0  # the checks below hold for it as for GKD
  if fraction == 0.0:
    return
  if task != 'dialogue':
    raise ConfigError("config.on_policy.fraction > 0 needs prompts: set config.data.task="
                      "'dialogue'")
  if 'ce' in config.losses and schedules.bounds(config.losses['ce'])[1] > 0:
    raise ConfigError("config.on_policy.fraction > 0 with a 'ce' loss would fit the student to "
                      'its own samples; use divergence terms only (e.g. losses={jsd: 1.0})')
  if config.teacher.get('cache', ''):
    raise ConfigError('on-policy batches need the online teacher to score the samples; unset '
                      'config.teacher.cache')


def check_parallel(config) -> None:
  """The mode and mesh exist, and the global batch splits over the data-parallel devices, the
  processes and the accumulation steps."""
  pcfg = config.get('parallel')
  try:
    dp = parallel.data_parallel_size(pcfg)
  except ValueError as e:
    raise ConfigError(f'config.{e}' if str(e).startswith('parallel') else
                      f'config.parallel: {e}') from None
  mode = (pcfg or {}).get('mode', 'single')
  accum = int(config.train.get('accum_steps', 1))
  batch = int(config.data.batch_size)
  if batch % (dp * accum):
    raise ConfigError(
        f'config.data.batch_size={batch} is not divisible by devices ({dp}, data parallel in '
        f"parallel.mode='{mode}') x train.accum_steps ({accum}); use a multiple of {dp * accum}")
  hosts = jax.process_count()
  if dp % hosts:  # each process feeds rows of its own documents, never a copy of another's
    raise ConfigError(f'{hosts} processes but the batch splits {dp} ways: every process must '
                      "own its rows; use parallel.mode='mesh' with data*fsdp a multiple of the "
                      'process count (keep tensor within a host)')
  eval_batch = int(config.data.get('eval_batch_size', dp))
  if eval_batch % dp:
    raise ConfigError(f'config.data.eval_batch_size={eval_batch} is not divisible by the '
                      f'data-parallel devices ({dp}); use a multiple of {dp}')


def check_teacher_cache(config, teacher) -> None:
  """An offline top-k teacher only supports what its cache can give: 'kl' (and 'ce')."""
  path = config.teacher.get('cache', '')
  if not path:
    return
  from kd.data import teacher_cache  # pylint: disable=g-import-not-at-top
  from kd.losses import topk  # pylint: disable=g-import-not-at-top
  meta = teacher_cache.read_meta(path)
  other = sorted(n for n in config.losses if n not in ('ce', 'kl'))
  if other:
    raise ConfigError(f'a teacher cache (config.teacher.cache={path}) holds top-k logits only: '
                      f"use 'kl' and 'ce'; {other} need the teacher run online (cache='')")
  semantics = config.teacher.get('topk_semantics', 'rest_bucket')
  if semantics not in topk.SEMANTICS:
    raise ConfigError(f'config.teacher.topk_semantics={semantics!r}; valid: {topk.SEMANTICS}')
  low, high = schedules.bounds(config.temperature)
  if semantics != 'renormalize' and not low == high == meta['temperature']:
    raise ConfigError(
        f"the cache at {path} stores the teacher's logsumexp at T={meta['temperature']}, but "
        f'config.temperature={config.temperature!r}; rewrite the cache at that temperature or '
        "use topk_semantics='renormalize'")
  if meta['vocab_size'] != teacher.config.vocab_size:
    raise ConfigError(f"the cache at {path} was written by a teacher with vocab "
                      f"{meta['vocab_size']}, this teacher has {teacher.config.vocab_size}")


def check_models(config, student, teacher) -> None:
  """Checks that need the model configs: layer maps and vocabularies."""
  feats = config.get('features', {}) or {}
  pairs = tuple(tuple(p) for p in feats.get('pairs', ())) or None
  try:
    losses.layer_map(feats.get('layer_map', 'uniform'), student.config.num_layers,
                     teacher.config.num_layers, pairs=pairs)
  except ValueError as e:
    raise ConfigError(f'config.features: {e}') from None
  check_teacher_cache(config, teacher)
  check_teacher_quant(config, teacher)
  si = config.get('student_init') or {}
  if si.get('source', 'random') not in ('random', 'teacher', 'run'):
    raise ConfigError(f"config.student_init.source={si.get('source')!r}; use 'random', 'teacher' "
                      "or 'run' (with student_init.path, an earlier run's student workdir)")
  if si.get('source') == 'run' and not si.get('path', ''):
    raise ConfigError("config.student_init.source='run' needs student_init.path (e.g. "
                      '<earlier workdir>/student_kd)')
  if si.get('source') == 'teacher':
    try:
      kept = sections.student_init_layers(config, teacher.config.num_layers)
    except ValueError as e:
      raise ConfigError(f'config.student_init: {e}') from None
    if len(kept) != student.config.num_layers:
      raise ConfigError(f'config.student_init keeps teacher layers {kept}, but config.student has '
                        f'num_layers={student.config.num_layers}; make them agree')
  attention_maps = [n for n in config.losses if losses.get(n).kind == 'attention']
  if attention_maps and student.config.num_heads != teacher.config.num_heads:
    raise ConfigError(
        f'{attention_maps} compare attention maps head by head, but the student has '
        f'{student.config.num_heads} heads and the teacher {teacher.config.num_heads}; use '
        "'minilm_relations' (any head counts) or give the student the teacher's head count")
  sections.vocab_slice(student.config.vocab_size, teacher.config.vocab_size,
              same_tokenizer=config.get('same_tokenizer', True))
  check_peft(config, student)
  check_quant(config, student)


# What config.peft.method may be for an Encoder student (the sentence job): soft prompts are a
# Decoder field (kd.peft.adapters).
ENCODER_PEFT_METHODS = ('none', 'lora', 'adapter', 'prefix')


def _is_encoder(student) -> bool:
  return isinstance(student.config, models.EncoderConfig)


def check_encoder_peft(config) -> None:
  """config.peft.method is one an Encoder student (the sentence job) supports."""
  method = (config.get('peft') or {}).get('method', 'none')
  if method not in ENCODER_PEFT_METHODS:
    raise ConfigError(f'config.peft.method={method!r}: the sentence-encoder job supports '
                      f'{ENCODER_PEFT_METHODS} (prompt tuning is a decoder field); use one of '
                      'those')


def _param_shapes(student, per_layer: bool = False):
  """The variables tree of `student` (a Decoder / Encoder module or a kd Model), as shapes;
  `per_layer`: named per layer (`layers_{i}`) even with scan_layers, as kd.quant stores them."""
  if _is_encoder(student):
    return models.encoder.param_shapes(student.config)
  config = student.config
  if per_layer and config.scan_layers:
    config = dataclasses.replace(config, scan_layers=False)
  return jax.eval_shape(lambda: models.init_params(config, jax.random.key(0)))


def check_peft(config, student) -> None:
  """config.peft: a valid LoRA config whose target matches projections of the student (a
  Decoder, or an Encoder for the sentence job), or a valid adapter / prefix / prompt size."""
  from kd import peft  # pylint: disable=g-import-not-at-top
  try:
    lora = peft.from_config(config.get('peft'))
  except ValueError as e:
    raise ConfigError(str(e)) from None
  method = config.peft.method if lora is None else 'lora'
  if method == 'none':
    return
  if _is_encoder(student):
    check_encoder_peft(config)
  if method != 'lora':  # adapter / prefix / prompt
    size = config.peft.get('size', 0)
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
      raise ConfigError(f'config.peft.size must be a positive int (the {method} '
                        f'{"bottleneck width" if method == "adapter" else "length"}), got {size!r}')
  if lora is None:
    return
  shapes = _param_shapes(student)
  targets = peft.target_kernels(shapes, lora)
  if not targets:
    names = sorted({'/'.join(k[1:-1]) for k in _flat_paths(shapes) if k[-1] == 'kernel'})
    raise ConfigError(f'config.peft.target={lora.target!r} matches no projection of the student; '
                      f'module paths look like {names[:6]} (the regex must match the whole path)')
  if lora.dropout and int(config.get('chunk_size', 0)) and 'lm_head' in targets:
    raise ConfigError('config.peft.dropout > 0 on the LM head is not supported with chunked '
                      "logits (chunk_size > 0): leave lm_head out of peft.target, or set "
                      'peft.dropout=0 or chunk_size=0')


def check_teacher_quant(config, teacher) -> None:
  """config.teacher.quant fits the run and the teacher's kernels."""
  sections.teacher_act_bits(config)
  qcfg = sections.teacher_quant_config(config)
  if qcfg is None:
    return
  problems = [p for p, bad in (
      ('teacher.count=1', int(config.teacher.get('count', 1)) != 1),
      ("teacher.cache=''", config.teacher.get('cache', ''))) if bad]
  if problems:
    raise ConfigError('a quantized teacher (config.teacher.quant.bits > 0) needs '
                      f"{', '.join(problems)}, or set teacher.quant.bits=0")
  _check_quant_targets(_param_shapes(teacher, per_layer=True), qcfg, 'config.teacher.quant')


def check_quant(config, student) -> None:
  """config.quant fits config.peft and the student's kernels (target, group size); `student`
  as for check_peft."""
  from kd import peft  # pylint: disable=g-import-not-at-top
  method, qcfg = sections.quant_config(config)
  if qcfg is None:
    return
  lora = peft.from_config(config.get('peft'))
  if method == 'qat' and lora is not None:
    raise ConfigError("config.quant.method='qat' trains every student weight; with "
                      "peft.method='lora' use quant.method='qlora' (a quantized frozen base)")
  if method == 'qlora' and lora is None:
    raise ConfigError("config.quant.method='qlora' quantizes a LoRA student's frozen base: set "
                      "config.peft.method='lora', or use quant.method='qat'")
  _check_quant_targets(_param_shapes(student, per_layer=True), qcfg, 'config.quant')


def _check_quant_targets(shapes, qcfg, where: str) -> None:
  """`qcfg.target` matches 2-D kernels of `shapes` whose input size its group size divides."""
  from kd import quant  # pylint: disable=g-import-not-at-top
  try:
    for path in quant.target_paths(shapes, qcfg.target):
      quant.rtn.group_size_for(quant.rtn.kernel(shapes, path).shape[0], qcfg.group_size, path)
  except ValueError as e:
    raise ConfigError(f'{where}: {e}') from None


def _flat_paths(tree) -> list:
  import flax  # pylint: disable=g-import-not-at-top
  return list(flax.traverse_util.flatten_dict(tree))
