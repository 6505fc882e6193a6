"""What a job builds from its config: models, the step's Spec, the student's starting
variables (random, cut from the teacher, restored from an earlier run, grown for PEFT).

  student = build.build_model(config.student, vocab_size)
  spec = build.make_spec(config, student, teacher, dict(config.losses), total_steps)
  params = build.init_student(spec, seed, variables)   # {'student': ..., 'proj': ...}
"""

from __future__ import annotations

import dataclasses
import os

import jax

from kd import losses
from kd import models
from kd import peft
from kd.train import compress
from kd.train import config_check
from kd.train import optim
from kd.train import schedules
from kd.train import sections
from kd.train import step as step_lib
from kd.train import student_weights


def build_model(model_cfg, vocab_size: int):
  cfg = models.DecoderConfig(vocab_size=vocab_size, **dict(model_cfg))
  cfg.validate()
  return models.Decoder(cfg)


def make_spec(config, student, teacher, terms, total_steps, ema_decay: float = 0.0,
              online: bool = False, *, pairs=None, attention_pairs=None, compression=None):
  """The step's Spec for modules `student` and `teacher` (None: no teacher) and loss `terms`
  ({name: weight}). Feature losses pair layers by config.features.layer_map unless `pairs`
  ((student, teacher) hidden-state indices) is given; attention losses use `attention_pairs`
  (default: those of `pairs` past the embeddings). Relation losses default to the teacher's
  head count. The student's weights join a PEFT student's frozen base and, under QAT, are
  fake-quantized (kd.train.student_weights), as `compression` (default compress.read(config))
  says."""
  comp = compress.read(config) if compression is None else compression
  tx, lr_fn = optim.make(config.optimizer, total_steps,
                         (config.get('train') or {}).get('skip_nonfinite', 0))
  kwargs = {n: dict(kw) for n, kw in dict(config.get('loss_kwargs', {}) or {}).items()}
  for n in terms:
    if teacher is not None and losses.get(n).kind == 'relation':
      kwargs.setdefault(n, {}).setdefault('num_relation_heads', teacher.config.num_heads)
  feats = config.get('features', {}) or {}
  n_s = student.config.num_layers
  n_t = teacher.config.num_layers if teacher is not None else n_s
  if pairs is None:
    pairs = () if teacher is None else losses.layer_map(
        feats.get('layer_map', 'uniform'), n_s, n_t,
        pairs=tuple(tuple(p) for p in feats.get('pairs', ())) or None)
  if attention_pairs is None:
    attention_pairs = tuple(p for p in pairs if p[0] > 0 and p[1] > 0)
  weights = {n: schedules.make(w, f'losses.{n}') for n, w in terms.items()}
  if online:  # the co-trained teacher's own CE, weight 1
    weights[step_lib.ONLINE_TEACHER_CE] = schedules.make(1.0, 'online teacher CE')
  return step_lib.Spec(
      student=student, teacher=teacher, tx=tx,
      terms={n: dict(kwargs.get(n, {})) for n in terms}, weights=weights,
      temperature=schedules.make(config.get('temperature', 1.0), 'temperature'), lr=lr_fn,
      feature_pairs=tuple(pairs), attention_pairs=tuple(attention_pairs),
      chunk_size=int(config.get('chunk_size', 0)),
      fused_chunks=bool(config.get('fused_chunks', True)),
      closed_form=config.get('closed_form', None),
      logit_kernel=config.get('logit_kernel', 'xla'),
      vocab=0 if teacher is None else sections.vocab_slice(
          student.config.vocab_size, teacher.config.vocab_size,
          same_tokenizer=config.get('same_tokenizer', True)),
      accum_steps=int(config.train.get('accum_steps', 1)),
      topk_semantics=(config.get('teacher') or {}).get('topk_semantics', 'rest_bucket'),
      ema_decay=ema_decay, online=online, **student_weights.spec_fields(comp.qat))


def train_spec(config, student, teacher, terms, total_steps, compression=None, **kwargs):
  """make_spec with the student as `compression` (default compress.read(config)) trains it:
  LoRA-wrapped, with dropout, fake-quantized under QAT."""
  comp = compress.read(config) if compression is None else compression
  return dataclasses.replace(
      make_spec(config, student, teacher, terms, total_steps, compression=comp, **kwargs),
      **compress.students(comp, student))


def model_key(seed: int):
  return jax.random.split(jax.random.key(seed))[0]


def init_student(spec: step_lib.Spec, seed: int, variables=None):
  """The student's trainable params: `variables` (e.g. taken from the teacher) or a random
  init, plus feature projections when a hidden-state loss compares different widths."""
  key_proj = jax.random.split(jax.random.key(seed))[1]
  if variables is None:
    variables = models.init_params(spec.student.config, model_key(seed))
  params = {'student': variables, 'proj': {}}
  uses_hidden = any(losses.get(n).kind == 'hidden' for n in spec.terms)
  d_s = spec.student.config.hidden_size
  if uses_hidden and spec.teacher is not None and spec.teacher.config.hidden_size != d_s:
    keys = jax.random.split(key_proj, len(spec.feature_pairs))
    params['proj'] = {str(i): losses.init_projection(k, d_s, spec.teacher.config.hidden_size)
                      for i, k in enumerate(keys)}
  return params


def student_init(config, student, teacher, teacher_params):
  """The student's starting variables as `config.student_init` says: None (random) or the
  teacher's chosen layers, narrowed to config.student's widths (kd.models.init_from)."""
  si = config.get('student_init') or {}
  if si.get('source', 'random') == 'random':
    return None
  if si.source == 'run':  # continual training: the student of an earlier run
    return restore_student(config, student, si.path)
  sc = student.config
  init = models.student_from_teacher(
      models.Model(teacher, teacher_params),
      sections.student_init_layers(config, teacher.config.num_layers),
      hidden_size=sc.hidden_size, intermediate_size=sc.intermediate_size,
      num_heads=sc.num_heads, num_kv_heads=sc.num_kv_heads, scan_layers=sc.scan_layers)
  if init.config != sc:
    raise config_check.ConfigError(
        f'the student taken from the teacher has config {init.config}, but config.student '
        f'builds {sc}; make config.student match')
  return init.params


def restore_student(config, student, run_dir: str):
  """The student params of the newest checkpoint in `<run_dir>/checkpoints` (a run of the same
  student and optimizer, e.g. <workdir>/student_kd of an earlier phase)."""
  from kd.train import checkpoint  # pylint: disable=g-import-not-at-top
  mngr = checkpoint.manager(os.path.join(run_dir, 'checkpoints'))
  if mngr.latest_step() is None:
    raise config_check.ConfigError(f'config.student_init.path={run_dir} holds no checkpoint; '
                                   'give the workdir of a finished run (e.g. .../student_kd)')
  # The earlier run's layer layout (scan_layers stacks them), converted to this student's.
  saved = mngr.item_metadata(mngr.latest_step())['state']['params']['student']['params']
  scan = getattr(student.config, 'scan_layers', False)
  model = student
  if scan != ('layers' in saved):
    model = models.Decoder(dataclasses.replace(student.config, scan_layers=not scan))
  spec = make_spec(config, model, None, {'ce': 1.0}, 1)
  shapes = jax.eval_shape(lambda: step_lib.create_state(init_student(spec, 0), spec.tx, 0))
  params = checkpoint.restore_latest(mngr, shapes).params['student']
  if model is student:
    return params
  return models.stack_layers(params) if scan else models.unstack_layers(params)


def peft_student(comp: compress.Compression, student, init, seed: int):
  """(student, starting variables) for comp's PEFT method: for 'adapter', 'prefix' and
  'prompt' the student's config gains the method's field (= comp.peft_size) and its starting
  variables (`init`, or the random init a stage seeded `seed` would make) gain the new params;
  other methods pass through."""
  if comp.peft_method not in peft.adapters.CONFIG_FIELDS:
    return student, init
  if init is None:
    init = models.init_params(student.config, model_key(seed))
  cfg, variables = compress.grow_peft(comp, student.config, init, seed)
  return models.Decoder(cfg), variables
