"""From a config to results: the teacher stage, the distillation run, the no-KD baseline, the report.

Layout of a workdir:
  tokenizer.json       shared by every stage
  teacher/             the teacher's own training run (when config.teacher.source == 'train'),
                       or config.teacher.workdir: one teacher shared by several runs, with a
                       copy of the tokenizer it was trained with
  student_kd/          the student distilled with config.losses
  student_ce/          the same student with hard labels only (when config.baseline)
  results.json, results.md
Each stage resumes from its checkpoints; a finished stage is restored, not retrained. What a
stage builds (models, the Spec, starting variables) is kd.train.build's; how it trains,
kd.train.stage's.
"""

import json
import os

import jax
import jax.numpy as jnp
from absl import logging

from kd import data as data_lib
from kd.data import lm_data
from kd.data import seqkd
from kd import models
from kd import parallel
from kd.eval import generation as generation_eval
from kd.eval import report as report_lib
from kd.models import ensemble
from kd.train import build
from kd.train import compress
from kd.train import config_check
from kd.train import onpolicy
from kd.train import replay
from kd.train import stage


def run_stage(config, data: lm_data.LMData, workdir: str, student, teacher, teacher_params, terms,
              *, steps: int, seed: int, name: str, teacher_cache: str = '',
              init_variables=None, batch_fn=None, train_arrays=None, ema_decay: float = 0.0,
              online: bool = False, teacher_data: bool = False):
  """One training run (teacher training is a run with no teacher and `ce` only).

  A PEFT student (config.peft.method) trains only its adapters: the rest of its starting
  variables (`init_variables`, or a random init) is a frozen base that rides in `state.frozen`
  (never updated nor checkpointed; with config.quant.method 'qlora' stored RTN-quantized).
  LoRA returns the merged plain model; adapters, prefixes and prompts (whose fields are already
  in `student`'s config, see `peft_student`) return the base with them. Under QAT
  (config.quant.method 'qat') the returned params are the quantized student (RTN,
  dequantized), the model that was evaluated. With `ema_decay` > 0 (and `teacher` the student's
  own module) the teacher is the student's EMA, which starts as the student (state.ema). With
  `online` the teacher (a random init) trains in the same steps with CE (state.params['teacher'])
  while the student distils from it; `final` then also holds the teacher's held-out metrics.
  It reads the students' data (data.train_split), or with `teacher_data` the teacher's
  (data.teacher_split: a teacher's own training).
  """
  comp = compress.read(config)
  spec = build.train_spec(config, student, teacher, terms, steps, comp, ema_decay=ema_decay,
                          online=online)
  plan = parallel.make(config.get('parallel'))
  trainable, base = compress.split_student(  # (a LoRA base: init_student's random init)
      comp, student, init_variables, seed, random_init=lambda: jax.jit(
          models.init_params, static_argnums=0)(student.config, build.model_key(seed)))
  def params():
    out = build.init_student(spec, seed, trainable)
    if online:
      out['teacher'] = models.init_params(teacher.config, jax.random.key(seed + 1000))
    return out

  def prepare(state):  # the EMA teacher starts as the student
    if not spec.ema_decay:
      return state
    return state.replace(ema=jax.tree.map(jnp.array, state.params['student']))

  student_params, final = stage.fit(
      config, spec, plan, params, base, teacher_params,
      data.iterator(seed, teacher_cache, train_arrays, student=not teacher_data),
      data.eval_batches, compression=comp, seed=seed, workdir=workdir, steps=steps, name=name,
      batch_fn=batch_fn, prepare=prepare)
  if batch_fn is not None and getattr(batch_fn, 'stats', None):
    st = batch_fn.stats
    final.update(st, generation_tokens_per_s=st['generated_tokens'] / max(st['generation_s'],
                                                                          1e-9))
  return student_params, final


def teacher_workdir(config, workdir: str) -> str:
  """config.teacher.workdir, a teacher shared by several runs, or <workdir>/teacher."""
  return config.teacher.get('workdir', '') or f'{workdir}/teacher'


def share_teacher(config, workdir: str) -> None:
  """With a shared teacher (config.teacher.workdir), checks that this run would train the same
  teacher, and makes every run use the tokenizer that teacher was trained with.

  The first run to get there leaves its tokenizer and teacher settings beside the teacher; later
  runs copy the tokenizer into their workdir before loading data. A mismatch is refused.
  """
  shared = config.teacher.get('workdir', '')
  if not shared:
    return
  os.makedirs(shared, exist_ok=True)
  c = config.copy_and_resolve_references()
  keys = ('name', 'vocab_size', 'seq_len', 'batch_size')
  if c.data.get('task', 'lm') != 'lm':  # (absent for LM runs: older shared teachers match)
    keys += ('task', 'prompt_len', 'response_len')
  model = {k: v for k, v in c.teacher.model.to_dict().items()
           if k != 'attention_impl'}  # (the kernel does not change what the teacher learns)
  mine = dict(seed=c.seed, model=model, steps=c.teacher.steps,
              optimizer=c.teacher.get('optimizer', c.optimizer).to_dict(),
              data={k: c.data[k] for k in keys})
  if int(c.teacher.get('count', 1)) > 1:
    mine['count'] = int(c.teacher.count)
  if lm_data.data_split(c.data, 'teacher_split') != 'train':  # (older shared teachers match)
    mine['data']['teacher_split'] = c.data.teacher_split
  settings = json.dumps(mine, sort_keys=True)
  _write_once(os.path.join(shared, 'teacher_settings.json'), settings.encode(),
              lambda theirs: f'the shared teacher in {shared} was trained with {theirs.decode()}, '
              f'this run would train {settings}; use the same teacher settings and seed or '
              'another config.teacher.workdir')
  mine, theirs = (os.path.join(d, 'tokenizer.json') for d in (workdir, shared))
  src, dst = (mine, theirs) if os.path.isfile(mine) else (theirs, mine)
  if os.path.isfile(src):
    with open(src, 'rb') as f:
      _write_once(dst, f.read(), lambda _: (
          f"{mine} differs from the shared teacher's {theirs}: the teacher was trained with "
          'another tokenizer; use a fresh workdir or unset config.teacher.workdir'))


def _write_once(path: str, content: bytes, mismatch) -> None:
  """Writes `path` atomically if absent; if present with other content, raises
  ConfigError(mismatch(existing content))."""
  if os.path.isfile(path):
    with open(path, 'rb') as f:
      existing = f.read()
    if existing != content:
      raise config_check.ConfigError(mismatch(existing))
    return
  with open(f'{path}.tmp{os.getpid()}', 'wb') as f:
    f.write(content)
  os.replace(f'{path}.tmp{os.getpid()}', path)  # atomic: a reader never sees half a file


def train_teacher(config, data: lm_data.LMData, teacher, workdir: str, member: int | None = None):
  """The teacher's own run (CE only) in `teacher_workdir`; restored when already finished.
  `member` i of an ensemble trains in `<teacher_workdir>/member_i` with its own seed."""
  teacher_cfg = config.copy_and_resolve_references()
  with teacher_cfg.unlocked():
    teacher_cfg.optimizer = config.teacher.get('optimizer', config.optimizer)
    # Compressing the student is not the teacher's job.
    teacher_cfg.quant = {'method': 'none'}
    teacher_cfg.peft = {'method': 'none'}
  where = teacher_workdir(config, workdir)
  if member is not None:
    where = f'{where}/member_{member}'
  return run_stage(teacher_cfg, data, where, teacher, None, None, {'ce': 1.0},
                   steps=config.teacher.steps, seed=config.seed + 1000 + (member or 0),
                   name='teacher' if member is None else f'teacher_{member}',
                   teacher_data=True)


def train_teachers(config, data: lm_data.LMData, teacher, workdir: str, results: dict):
  """(teacher model, params): one teacher, or with config.teacher.count > 1 an Ensemble of
  that many (same architecture, seeds seed+1000+i) mixed with config.teacher.weights."""
  count = int(config.teacher.get('count', 1))
  if count == 1:
    params, results['teacher'] = train_teacher(config, data, teacher, workdir)
    return teacher, params
  params = []
  for i in range(count):
    p, results[f'teacher_{i}'] = train_teacher(config, data, teacher, workdir, member=i)
    params.append(p)
  weights = tuple(config.teacher.get('weights', ()) or ()) or (1.0 / count,) * count
  return ensemble.Ensemble((teacher,) * count, weights), tuple(params)


def seqkd_key(data_config) -> dict:
  """What SeqKD's teacher answers depends on: the data, its tokenizer and the prompts' split
  (named only when it is not all of 'train', so the caches written before it was keep theirs)."""
  key = {k: data_config[k] for k in ('name', 'vocab_size', 'prompt_len', 'response_len')}
  split = lm_data.data_split(data_config, 'train_split')
  return key if split == 'train' else {**key, 'train_split': split}


def seqkd_arrays(config, data, teacher, teacher_params, workdir: str,
                 eos_id: int = data_lib.EOS_ID, key: dict | None = None):
  """config.seqkd: the train prompts answered by the teacher until `eos_id` (made once, stored
  beside the teacher, named by `key`, default seqkd_key(config.data)), or None when off."""
  sc = config.get('seqkd') or {}
  if not sc.get('enabled', False):
    return None
  dc = config.data
  arrays, path = seqkd.get_or_write(
      teacher_workdir(config, workdir), (teacher, teacher_params), data.train_arrays,
      key=seqkd_key(dc) if key is None else key,
      batch_size=int(sc.get('batch_size', 64)), temperature=float(sc.get('temperature', 0.0)),
      top_k=int(sc.get('top_k', 0)), top_p=float(sc.get('top_p', 1.0)), seed=config.seed,
      eos_id=eos_id)
  logging.info('SeqKD: %d teacher responses from %s', len(arrays['prompt_ids']), path)
  return arrays


def on_policy_fn(config, student, eos_id: int = data_lib.EOS_ID):
  """loop.fit's batch_fn for config.on_policy: GKD with probability `fraction`, or with
  `adaptive.enabled` DistiLLM's adaptive off-policy (kd/train/replay.py: a replay buffer of the
  student's samples, used more often each time the validation loss rises); None when off. The
  student samples under the run's parallel plan (its rows split like the train batch), each
  sample ending at `eos_id` (a chat model's end-of-turn token)."""
  oc = config.get('on_policy') or {}
  adaptive = dict(oc.get('adaptive') or {})
  # As run_stage's step evaluates it.
  student = compress.student_model(compress.read(config), student)
  if adaptive.get('enabled', False):
    sampling = {k: oc.get(k, d) for k, d in (('temperature', 1.0), ('top_k', 0), ('top_p', 1.0))}
    return replay.AdaptiveOffPolicy.from_config(
        {**adaptive, **sampling}, config.seed, config.train.steps, eos_id).batch_fn(
            student, parallel.make(config.get('parallel')))
  op = onpolicy.OnPolicy.from_config(oc, config.seed, eos_id)
  return op.batch_fn(student, parallel.make(config.get('parallel'))) if op.fraction > 0 else None


def main(config, workdir: str) -> dict:
  """Runs every stage the config asks for and writes `results.json` and `results.md`."""
  config_check.check(config)
  # The model checks (layer maps, PEFT and quantization targets, ...) before anything is
  # written, at the configured vocabulary; again below at the tokenizer's.
  vocab = int(config.data.vocab_size)
  config_check.check_models(config, build.build_model(config.student, vocab),
                            build.build_model(config.teacher.model, vocab))
  os.makedirs(workdir, exist_ok=True)
  share_teacher(config, workdir)  # before Data, which loads <workdir>/tokenizer.json if present
  data = lm_data.LMData(config, workdir)
  share_teacher(config, workdir)  # a tokenizer trained just now goes beside the teacher
  teacher = build.build_model(config.teacher.model, data.vocab_size)
  student = build.build_model(config.student, data.vocab_size)
  config_check.check_models(config, student, teacher)
  results = {}
  teacher, teacher_params = train_teachers(config, data, teacher, workdir, results)
  init = build.student_init(config, student, teacher, teacher_params)  # both students start alike
  comp = compress.read(config)
  student, init = build.peft_student(comp, student, init, config.seed)
  # From here on the teacher may run quantized (config.teacher.quant); the init above used it
  # in float.
  teacher, teacher_params = compress.quantized_teacher(comp, teacher, teacher_params)
  student_params, results['student_kd'] = run_stage(
      config, data, f'{workdir}/student_kd', student, teacher, teacher_params,
      dict(config.losses), steps=config.train.steps, seed=config.seed, name='student_kd',
      teacher_cache=config.teacher.get('cache', ''), init_variables=init,
      batch_fn=on_policy_fn(config, student),
      train_arrays=seqkd_arrays(config, data, teacher, teacher_params, workdir))
  trained = {'student_kd': student_params}
  decay = float((config.get('self_distill') or {}).get('ema_decay', 0.0))
  if config.get('online', False):
    # Online distillation: a teacher trained from scratch in the same steps as the student.
    name = 'student_online'
    trained[name], results[name] = run_stage(
        config, data, f'{workdir}/{name}', student, teacher, None, dict(config.losses),
        steps=config.train.steps, seed=config.seed, name=name, init_variables=init, online=True)
  if decay:
    # Self-distillation from the student's own EMA (Tarvainen & Valpola 2017; the "teacher"
    # of DINO-style training): same losses, the EMA in the teacher's place.
    name = 'student_ema_self'
    # A PEFT student's EMA covers its adapters; the teacher runs them on the frozen base.
    trained[name], results[name] = run_stage(
        config, data, f'{workdir}/{name}', student, compress.student_model(comp, student),
        None, dict(config.losses), steps=config.train.steps, seed=config.seed, name=name,
        init_variables=init, ema_decay=decay)
  # Born-again rounds (Furlanello et al. 2018): the last student teaches a fresh copy of itself.
  for r in range(1, int(config.get('born_again', 0)) + 1):
    name = f'student_born_again_{r}'
    student_params, results[name] = run_stage(
        config, data, f'{workdir}/{name}', student, student, student_params,
        dict(config.losses), steps=config.train.steps, seed=config.seed + r, name=name,
        init_variables=init)
    trained[name] = student_params
  if config.get('baseline', True):
    trained['student_ce'], results['student_ce'] = run_stage(
        config, data, f'{workdir}/student_ce', student, teacher, teacher_params, {'ce': 1.0},
        steps=config.train.steps, seed=config.seed, name='student_ce', init_variables=init)
  n = int(config.data.get('sample_eval_batches', 0))
  if data.task == 'dialogue' and n:  # the models' own greedy answers, scored by the teacher
    if not isinstance(teacher, ensemble.Ensemble):
      trained = {'teacher': teacher_params, **trained}
    for name, params in trained.items():
      results[name].update(generation_eval.teacher_nll_of_samples(
          teacher if name == 'teacher' else student, params, teacher, teacher_params,
          data.eval_batches, max_batches=n))
  report_lib.write_results(workdir, results, report(results))
  logging.info('wrote %s/results.md', workdir)
  return results


def report(results: dict) -> str:
  rows = ['| model | params | held-out ppl | top-1 agreement with teacher | train wall s |',
          '|---|---:|---:|---:|---:|']
  for name, r in results.items():
    agree = f"{100 * r['agreement']:.1f}%" if 'agreement' in r else '-'
    params = f"{r['params']:,}" + (f" ({r['trainable_params']:,} trained)"
                                   if 'trainable_params' in r else '')
    rows.append(f"| {name} | {params} | {r['perplexity']:.2f} | {agree} | "
                f"{r['wall_s']:.0f} |")
  sampled = [(n, r) for n, r in results.items() if 'sample_teacher_nll' in r]
  if sampled:
    rows.append('\nGreedy answers to held-out prompts, per-token NLL under the teacher: '
                + ', '.join(f"{n} {r['sample_teacher_nll']:.3f} ({r['sample_tokens']:.1f} "
                            'tokens)' for n, r in sampled) + '.')
  if 'student_online' in results and 'teacher_perplexity' in results['student_online']:
    rows.append('\nstudent_online distilled from a teacher trained in the same steps; that '
                f"teacher's held-out ppl: {results['student_online']['teacher_perplexity']:.2f}.")
  for name, r in results.items():
    if r.get('generated_batches'):
      rows.append(f"\n{name}: {r['generated_batches']} batches on-policy, "
                  f"{r['generated_tokens']:,} tokens sampled at "
                  f"{r['generation_tokens_per_s']:,.0f} tokens/s (first call compiles).")
  return '\n'.join(rows)
