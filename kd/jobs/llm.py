"""Distils a pretrained decoder from its checkpoint into a smaller student, on real data.

  python -m kd.main --config=configs/llm/smollm2_kd.py --workdir=DIR

1. The teacher is read from config.teacher.path: an HF checkpoint directory (config.json +
   safetensors), a .gguf file, or an installed package shipping one (kd.hf.locate). Its
   tokenizer and chat template are the run's; no tokenizer is trained.
2. The student (config.student.source) is a cut of the teacher ('cut': the listed layers, and
   narrower MLPs and fewer heads chosen by measured importance, kd.models.prune), another
   checkpoint with the same tokenizer ('path'), or a fresh model of the teacher's family and
   vocabulary ('fresh').
3. Text and chat sources are tokenized and packed (kd.data.tokenized); chat records count only
   their assistant tokens. With config.data.synthetic, the teacher's own continuations of real
   openings join the train set (kd.data.synthetic), made once in <workdir>/synthetic.jsonl.
4. The student distils with config.losses (student_kd), and with config.baseline the same
   student trains on the same tokens with CE only (student_ce); each run resumes from its
   checkpoints (kd.train.run.run_stage, the stage every decoder job shares). With
   config.data.task='dialogue' (chat records as prompt/response rows) the KD student may sample
   its own answers (config.on_policy: GKD, or DistiLLM's adaptive off-policy) or train on the
   teacher's (config.seqkd), every sample ending at the template's end-of-turn token.
5. Teacher, untrained student, KD and CE students are scored on every held-out set (perplexity,
   top-1 agreement with the teacher; kd.eval.heldout); with config.data.prompts, each answers
   held-out chat prompts greedily and the teacher scores the answers. The KD student is exported
   to <workdir>/hf (config.json, safetensors, tokenizer with its chat template), which
   transformers loads without kd (with config.export_all, the untrained and the CE students
   too: hf_init, hf_ce). results.json and results.md hold the table.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os

import jax
import jax.numpy as jnp
from absl import logging

from kd import hf
from kd import losses
from kd import models
from kd import parallel
from kd.data import chat
from kd.data import synthetic
from kd.data import teacher_cache
from kd.data import tokenized
from kd.eval import chat_answers
from kd.eval import heldout
from kd.eval import report as report_lib
from kd.hf import locate
from kd.hf import vocab as vocab_lib
from kd.models import prune
from kd.train import build
from kd.train import compress
from kd.train import config_check
from kd.train import offline_teacher
from kd.train import run
from kd.train import sections
from kd.train import step as step_lib

SOURCES = sections.STUDENT_SOURCES
# DecoderConfig fields a config may set on a loaded model: how it runs, not what it computes.
RUNTIME = ('scan_layers', 'remat', 'remat_policy', 'attention_impl', 'dtype', 'param_dtype')
WIDTHS = ('intermediate_size', 'num_heads', 'num_kv_heads')


def check(config) -> None:
  """Config errors before anything loads, compiles or writes."""
  if config.teacher.cache and config.data.task != 'lm':  # (before the cache's own checks)
    raise config_check.ConfigError(
        "config.teacher.cache holds the teacher's top-k over packed text rows; the dialogue task "
        'samples answers the cache cannot know (GKD, SeqKD): leave teacher.cache empty')
  config_check.check(config)
  sc = config.student
  if sc.source not in SOURCES:
    raise config_check.ConfigError(f'config.student.source={sc.source!r}; use one of {SOURCES}')
  if sc.source == 'path' and not sc.path:
    raise config_check.ConfigError("config.student.source='path' needs config.student.path")
  for section in ('teacher', 'student'):
    extra = sorted(set(config[section].model) - set(RUNTIME))
    if extra:
      raise config_check.ConfigError(
          f'config.{section}.model sets {extra}, which change what the checkpoint computes; '
          f'it may set {RUNTIME} (the widths of a cut are config.student.{"/".join(WIDTHS)})')
  for key in WIDTHS + ('calibration_batches',):
    if int(sc[key]) < 0:
      raise config_check.ConfigError(f'config.student.{key} must be >= 0 (0 = the teacher\'s)')
  if int(config.train.steps) < 1:
    raise config_check.ConfigError(f'config.train.steps must be >= 1, got {config.train.steps}')
  for key in ('seq_len', 'batch_size', 'eval_batch_size'):
    if int(config.data[key]) < 1:
      raise config_check.ConfigError(f'config.data.{key} must be >= 1, got {config.data[key]}')
  paired = [n for n in config.losses
            if losses.get(n).kind in ('hidden', 'attention', 'relation')]
  if config.features.layer_map == 'kept' and sc.source != 'cut' and paired:
    raise config_check.ConfigError(
        f"config.features.layer_map='kept' pairs a cut's layers with the teacher layers it "
        f"kept; a '{sc.source}' student has none: use 'uniform' or 'explicit' for {paired}")
  gen = config.data.synthetic
  if int(gen.count) and config.data.task == 'dialogue':
    raise config_check.ConfigError("config.data.synthetic adds text; the dialogue task trains on "
                                   'chat records only: set synthetic.count=0')
  if int(gen.count) < 0 or (int(gen.count) and not (gen.prompts and 0 < gen.weight < 1)):
    raise config_check.ConfigError('config.data.synthetic.count must be >= 0, and > 0 needs '
                                   'synthetic.prompts (a text source whose openings the teacher '
                                   'continues) and 0 < synthetic.weight < 1 (its share of pieces)')
  if not tokenized.eval_names(config.data.eval):
    raise config_check.ConfigError('config.data.eval names no held-out source; give one, e.g. '
                                   "'stsb:dev'")


def with_runtime(model: models.Model, settings) -> models.Model:
  """`model` with the RUNTIME fields of `settings` (scan_layers restacks its params)."""
  settings = {k: v for k, v in dict(settings).items() if v is not None}
  config, params = model.config, model.params
  scan = settings.pop('scan_layers', config.scan_layers)
  if scan != config.scan_layers:
    params = models.stack_layers(params) if scan else models.unstack_layers(params)
  param_dtype = settings.get('param_dtype')
  if param_dtype and param_dtype != config.param_dtype:
    params = jax.tree.map(lambda x: x.astype(param_dtype), params)
  config = dataclasses.replace(config, scan_layers=scan, **settings)
  config.validate()
  return model.replace(module=models.Decoder(config), params=params)


def _located(key: str, name: str) -> str:
  """kd.hf.locate's folder or file for config.<key>, or a ConfigError naming the key."""
  try:
    return locate.locate(name)
  except FileNotFoundError as e:
    raise config_check.ConfigError(f'config.{key}={name!r}: {e}') from None


def load_teacher(config) -> models.Model:
  """The teacher as its checkpoint holds it (config.teacher.model not applied yet: a cut is
  made from these weights, not from a lower-precision copy)."""
  path = _located('teacher.path', config.teacher.path)
  teacher = hf.load(path)
  if not isinstance(teacher.config, models.DecoderConfig):
    raise config_check.ConfigError(f'config.teacher.path={path} holds a '
                                   f'{type(teacher.config).__name__}; this job distils decoders')
  if teacher.tokenizer is None:
    raise config_check.ConfigError(f'{path} has no tokenizer; the run uses the teacher\'s own, so '
                                   'put its tokenizer files beside the weights')
  logging.info('teacher %s: %s params', path, f'{models.count_params(teacher.params):,}')
  return teacher


def build_student(config, teacher: models.Model, data) -> models.Model:
  """The student config.student.source names, starting as its weights say (module docstring);
  `teacher` as loaded (load_teacher), so a cut keeps the checkpoint's precision and runs as
  config.student.model says, whatever config.teacher.model sets."""
  sc = config.student
  flat = with_runtime(teacher, {'scan_layers': False})
  if sc.source == 'path':
    student = hf.load(_located('student.path', sc.path))
    if student.tokenizer is None:
      raise config_check.ConfigError(f'config.student.path={sc.path} has no tokenizer, so it '
                                     "cannot be checked against the teacher's")
    try:
      vocab_lib.check_same_tokenizer(teacher.tokenizer, student.tokenizer)
    except ValueError as e:
      raise config_check.ConfigError(f'config.student.path={sc.path}: {e}') from None
  elif sc.source == 'fresh':
    fields = {k: v for k, v in dict(sc.fresh).items() if v}
    cfg = dataclasses.replace(flat.config, **fields)
    if cfg.num_heads * cfg.head_dim != cfg.hidden_size and 'head_dim' not in fields:
      cfg = dataclasses.replace(cfg, head_dim=cfg.hidden_size // cfg.num_heads)
    cfg.validate()
    student = models.Model(models.Decoder(cfg), models.init_params(cfg, jax.random.key(
        config.seed)), tokenizer=teacher.tokenizer)
  else:
    layers = list(sc.layers) or list(range(teacher.config.num_layers))
    widths = {k: int(sc[k]) for k in WIDTHS if int(sc[k])}
    try:
      if widths:
        batches = calibration_batches(data, int(sc.calibration_batches), config.seed)
        student = prune.prune(flat, layers=layers, scores=prune.importance(flat, batches),
                              **widths)
      else:
        student = models.student_from_teacher(flat, layers)
    except ValueError as e:
      raise config_check.ConfigError(f'config.student: {e}') from None
  return with_runtime(student.replace(tokenizer=teacher.tokenizer), config.student.model)


def calibration_batches(data, n: int, seed: int) -> list:
  """The first `n` train batches (seed + 77: not the runs' own order), measuring importance."""
  it = data.iterator(seed + 77)
  return [next(it) for _ in range(max(n, 1))]


def with_kept_layer_map(config, layers) -> object:
  """config with features.layer_map 'kept' turned into the explicit pairs of a cut: the
  embeddings, then student layer j after teacher layer layers[j] (hidden-state indices, 0 = the
  embeddings); for another student (which check() allows only without layer-paired losses)
  'uniform'. Other maps pass through."""
  if config.features.layer_map != 'kept':
    return config
  config = config.copy_and_resolve_references()
  if config.student.source != 'cut':
    config.features.layer_map = 'uniform'
    return config
  config.features.layer_map = 'explicit'
  config.features.pairs = ((0, 0),) + tuple((j + 1, t + 1) for j, t in enumerate(layers))
  return config


def score(named: dict, eval_sets: dict) -> dict:
  """{model: {eval set: heldout.compare row}}; the first model (the teacher) is the reference
  for agreement and runs once per set."""
  out = {name: {} for name in named}
  for set_name, batches in eval_sets.items():
    reference = None
    for name, model in named.items():
      stats = heldout.token_stats(model.module, model.params, batches)
      out[name][set_name] = heldout.compare(stats, reference)
      reference = reference or stats
  return out


def teacher_and_data(config):
  """(the teacher as loaded, the teacher as it runs, its tokenized data)."""
  check(config)
  loaded = load_teacher(config)
  teacher = with_runtime(loaded, config.teacher.model)
  data = tokenized.TokenizedData(config.data, teacher.tokenizer,
                                 vocab_size=vocab_lib.vocab_rows(teacher),
                                 max_positions=teacher.config.max_seq_len)
  return loaded, teacher, data


def add_synthetic(config, data, teacher, workdir: str) -> None:
  """Teacher-generated text joins the train set (kd.data.synthetic), made once in workdir."""
  gen = config.data.synthetic
  if not int(gen.count):
    return
  settings = dict(gen, text_prefix=config.data.text_prefix, seed=config.seed,
                  teacher=config.teacher.path)
  settings.pop('weight')  # (how often it is drawn, not what it holds)
  data.add_train(synthetic.get_or_write(f'{workdir}/synthetic.jsonl', teacher, settings),
                 'teacher-generated text', float(gen.weight))
  logging.info('train with teacher-generated text: %s tokens', f'{data.train_tokens:,}')


def write_cache(config, workdir: str, *, k: int, out: str | None = None) -> str:
  """The teacher's top-k logits over the rows the KD run trains on: the first
  train.steps batches of its own stream at config.seed (mixture weights and teacher-generated
  text included), written to `out` (default <workdir>/teacher_cache) for
  --config.teacher.cache. Runs in one process; returns the path."""
  if config.teacher.cache:
    raise config_check.ConfigError('config.teacher.cache is what this writes; leave it empty')
  if config.data.task != 'lm':
    raise config_check.ConfigError("a teacher cache holds packed text rows: data.task='lm'")
  low = offline_teacher.cache_temperature(config)
  _, teacher, data = teacher_and_data(config)
  if not 0 < k <= teacher.config.vocab_size:
    raise config_check.ConfigError(
        f'--k={k} must be in [1, vocab size {teacher.config.vocab_size}]')
  os.makedirs(workdir, exist_ok=True)
  add_synthetic(config, data, teacher, workdir)
  steps, out = int(config.train.steps), out or f'{workdir}/teacher_cache'
  t_module, t_params = compress.quantized_teacher(compress.read(config), teacher.module,
                                                  teacher.params)
  rows = offline_teacher.cache_rows(
      t_module, t_params, itertools.islice(data.iterator(config.seed), steps),
      k=k, temperature=low, chunk_size=int(config.chunk_size))
  n = teacher_cache.write_records(rows, out, dict(
      k=k, temperature=low, vocab_size=teacher.config.vocab_size,
      seq_len=int(config.data.seq_len), teacher=config.teacher.path))
  logging.info('wrote %d rows with the teacher top-%d to %s', n, k, out)
  return out


def check_cache(config) -> None:
  """A teacher cache's rows must have this run's length (its losses and temperature are
  config_check.check_teacher_cache's)."""
  if not config.teacher.cache:
    return
  seq_len = teacher_cache.read_meta(config.teacher.cache).get('seq_len')
  if seq_len != int(config.data.seq_len):
    raise config_check.ConfigError(
        f'the teacher cache at {config.teacher.cache} holds rows of {seq_len} tokens, but '
        f'config.data.seq_len={config.data.seq_len}; write it with this config '
        '(python -m kd.cache_teacher --config=... --workdir=...)')


def main(config, workdir: str) -> dict:
  loaded, teacher, data = teacher_and_data(config)
  if data.task == 'dialogue':
    logging.info('train: %d prompt/response rows', len(data.train_arrays['prompt_ids']))
  else:
    logging.info('train: %d documents, %s tokens', len(data.train_docs), f'{data.train_tokens:,}')
  student = build_student(config, loaded, data)
  del loaded  # (the teacher keeps its own copy, as it runs)
  config = with_kept_layer_map(
      config, list(config.student.layers) or list(range(teacher.config.num_layers)))
  config_check.check_models(config, student.module, teacher.module)
  check_cache(config)
  os.makedirs(workdir, exist_ok=True)  # (nothing is written before the checks above)
  if not config.teacher.cache:  # (a cache's rows already hold the teacher's text)
    add_synthetic(config, data, teacher, workdir)
  results = {'teacher': {'params': models.count_params(teacher.params)},
             'student_init': {'params': models.count_params(student.params)}}
  trained = {'teacher': teacher, 'student_init': student}
  # An adapter, prefix or prompt student (config.peft) gains its new params here.
  comp = compress.read(config)
  student = student.replace(**dict(zip(('module', 'params'), build.peft_student(
      comp, student.module, student.params, config.seed))))
  t_module, t_params = compress.quantized_teacher(comp, teacher.module, teacher.params)
  runs = {'student_kd': dict(config.losses)}
  if config.baseline:
    runs['student_ce'] = {'ce': 1.0}
  kd_inputs = {}
  if data.task == 'dialogue':  # the student samples (GKD) or trains on the teacher's answers
    eos = chat.end_of_turn_id(teacher.tokenizer)
    seqkd_key = {k: config.data[k] for k in ('train', 'prompt_len', 'response_len')}
    kd_inputs = dict(batch_fn=run.on_policy_fn(config, student.module, eos),
                     train_arrays=run.seqkd_arrays(config, data, t_module, t_params, workdir,
                                                   eos, key={**seqkd_key,
                                                             'teacher': config.teacher.path}))
  for name, terms in runs.items():
    # With a teacher cache both runs read its rows: the same tokens, with and without it.
    params, results[name] = run.run_stage(
        config, data, f'{workdir}/{name}', student.module, t_module, t_params, terms,
        steps=config.train.steps, seed=config.seed, name=name, init_variables=student.params,
        teacher_cache=config.teacher.cache, **(kd_inputs if name == 'student_kd' else {}))
    trained[name] = student.replace(params=params)
  for name, per_set in score(trained, data.eval_sets).items():
    results[name]['eval'] = per_set
  examples = []
  if data.prompts:
    answers = chat_answers.answer(trained, data.prompts, teacher,
                                  max_new_tokens=int(config.data.answer_tokens))
    for name, r in answers['scores'].items():
      results[name].update(r)
    examples = answers['examples']
  exports = {name: folder for name, folder in (
      ('student_kd', 'hf' if config.export else None),
      ('student_init', 'hf_init' if config.export_all else None),
      ('student_ce', 'hf_ce' if config.export_all else None)) if folder and name in trained}
  for name, folder in exports.items():
    # Every process joins the gather of a student split over several hosts; one writes.
    params = parallel.to_host(trained[name].params)
    if jax.process_index() == 0:
      export(trained[name].replace(params=params), f'{workdir}/{folder}')
  if jax.process_index() == 0:
    if examples:
      with open(f'{workdir}/answers.json', 'w') as f:
        json.dump(examples, f, indent=1)
  report_lib.write_results(
      workdir, results, report(results, tokenized.eval_names(config.data.eval), examples))
  logging.info('wrote %s/results.md', workdir)
  return results


def abstract_models(config, teacher_hf: dict, student_hf: dict | None = None):
  """(teacher, student) flax modules of a recipe from config.json dicts alone (no weights):
  the student as config.student.source says, a cut with its listed layers and widths."""
  family = hf.family_for(teacher_hf)
  settings = lambda section: {k: v for k, v in dict(config[section].model).items()
                              if v is not None}
  loaded = family.config_from_hf(teacher_hf)  # the student starts from this, as in main
  teacher_cfg = dataclasses.replace(loaded, **settings('teacher'))
  sc = config.student
  if sc.source == 'path':
    if student_hf is None:
      raise config_check.ConfigError("config.student.source='path': give the student's "
                                     'config.json too')
    student_cfg = hf.family_for(student_hf).config_from_hf(student_hf)
  elif sc.source == 'fresh':
    student_cfg = dataclasses.replace(loaded, **{k: v for k, v in dict(sc.fresh).items() if v})
  else:
    layers = list(sc.layers) or list(range(teacher_cfg.num_layers))
    widths = {k: int(sc[k]) for k in WIDTHS if int(sc[k])}
    if 'num_kv_heads' in widths and 'num_heads' not in widths:
      widths['num_heads'] = (widths['num_kv_heads'] * teacher_cfg.num_heads
                             // teacher_cfg.num_kv_heads)
    student_cfg = dataclasses.replace(loaded, num_layers=len(layers), **widths)
    if teacher_cfg.layer_types is not None:
      student_cfg = dataclasses.replace(
          student_cfg, layer_types=tuple(teacher_cfg.layer_types[i] for i in layers))
  student_cfg = dataclasses.replace(student_cfg, **settings('student'))
  for c in (teacher_cfg, student_cfg):
    c.validate()
  return models.Decoder(teacher_cfg), models.Decoder(student_cfg)


def plan(config, teacher_hf: dict, student_hf: dict | None = None) -> dict:
  """What one KD step of `config` needs at full shape, before any weights exist: the train
  step compiled on abstract parameters under config.parallel's mesh, with XLA's memory plan
  per device. Returns the mesh, parameter counts, how the largest weights are split, and the
  argument / temp / output GB per device."""
  check(config)
  teacher, student = abstract_models(config, teacher_hf, student_hf)
  layers = list(config.student.layers) or list(range(teacher.config.num_layers))
  config = with_kept_layer_map(config, layers)
  config_check.check_models(config, student, teacher)
  spec = build.make_spec(config, student, teacher, dict(config.losses), config.train.steps)
  shape = lambda module, seed: jax.eval_shape(
      functools.partial(models.init_params, module.config), jax.random.key(seed))
  teacher_params, student_params = shape(teacher, 1), shape(student, 0)
  state = jax.eval_shape(
      lambda p: step_lib.create_state(build.init_student(spec, 0, p), spec.tx, 0), student_params)
  b, t = int(config.data.batch_size), int(config.data.seq_len)
  batch = {k: jax.ShapeDtypeStruct((b, t), d) for k, d in (
      ('input_ids', jnp.int32), ('labels', jnp.int32), ('loss_mask', jnp.float32),
      ('segment_ids', jnp.int32), ('positions', jnp.int32))}
  mesh_plan = parallel.make(config.parallel)
  if not hasattr(mesh_plan, 'lower_train_step'):
    raise config_check.ConfigError("plan() sizes a mesh run: set config.parallel.mode='mesh'")
  compiled = mesh_plan.lower_train_step(
      functools.partial(step_lib.train_step, spec=spec), state, teacher_params, batch).compile()
  mem = compiled.memory_analysis()
  gb = lambda name: round(getattr(mem, name, 0) / 2**30, 3)
  biggest = lambda tree, sh: {jax.tree_util.keystr(path): str(s.spec) for (path, x), s in zip(
      jax.tree_util.tree_flatten_with_path(tree)[0], jax.tree.leaves(sh))
      if x.size == max(y.size for y in jax.tree.leaves(tree))}
  return dict(
      mesh=dict(mesh_plan.mesh.shape), devices=mesh_plan.mesh.devices.size,
      teacher_params=models.count_params(teacher_params),
      student_params=models.count_params(student_params),
      teacher_layout=biggest(teacher_params, mesh_plan.teacher_shardings(teacher_params)),
      student_layout=biggest(state.params['student'],
                             mesh_plan.state_shardings(state).params['student']),
      tokens_per_step=b * t,
      argument_gb=gb('argument_size_in_bytes'), temp_gb=gb('temp_size_in_bytes'),
      output_gb=gb('output_size_in_bytes'), alias_gb=gb('alias_size_in_bytes'))


def export(model: models.Model, path: str) -> None:
  """The student as a transformers checkpoint: config.json, model.safetensors and the
  teacher's tokenizer files with its chat template (generation stops at its end of turn)."""
  flat = with_runtime(model, {'scan_layers': False, 'remat': False})
  hf.save(flat, path)
  logging.info('exported %s', path)


def report(results: dict, eval_names: list[str], examples=()) -> str:
  """The results table: params, held-out perplexity and top-1 agreement with the teacher per
  held-out set, training time; then the chat scores and `examples` (kd.eval.chat_answers)."""
  cols = [f'ppl {n}' for n in eval_names] + [f'agree {n}' for n in eval_names]
  rows = ['| model | params | ' + ' | '.join(cols) + ' | train wall s |',
          '|---|' + '---:|' * (len(cols) + 2)]
  for name, r in results.items():
    ev = r.get('eval', {})
    cells = [f"{ev[n]['perplexity']:.2f}" if n in ev else '-' for n in eval_names]
    cells += [f"{100 * ev[n]['agreement']:.1f}%" if 'agreement' in ev.get(n, {}) else '-'
              for n in eval_names]
    wall = f"{r['wall_s']:.0f}" if 'wall_s' in r else '-'
    rows.append(f"| {name} | {r['params']:,} | {' | '.join(cells)} | {wall} |")
  if any('answer_teacher_nll' in r for r in results.values()):
    rows.append('\nGreedy answers to held-out chat prompts, per-token NLL under the teacher '
                '(lower: more teacher-like): ' + ', '.join(
                    f"{n} {r['answer_teacher_nll']:.3f} ({r['answer_tokens']:.1f} tokens)"
                    for n, r in results.items() if 'answer_teacher_nll' in r) + '.')
  for example in examples:
    rows.append(f"\n**Prompt:** {example['prompt']}\n")
    rows += [f"- *{n}*: {a}" for n, a in example['answers'].items()]
  return '\n'.join(rows)
