"""The pure train and eval steps: functions of pytrees, jitted once by the caller.

`train_step(state, teacher_params, batch, spec, *, axis_name=None, strided_accum=False)`:
  - the teacher forward runs inside the same compiled step under `stop_gradient` (skipped when
    the batch carries `teacher_logits`, an offline teacher);
  - every loss term reduces to (sum, count); the objective is sum_i w_i(step) * sum_i / count_i
    with counts over the whole batch, so gradient accumulation gives the same update as one big
    batch (a mean of micro-batch means would not);
  - the RNG is folded by step, never threaded out;
  - under `jax.pmap` (`axis_name` given) every count, term and gradient is summed over the
    devices before it is used, so the mean is over the global token count (never a mean of
    per-device means) and every device applies the update of the whole batch. Under `jax.jit`
    on a mesh the batch is one global array and no axis name is needed;
  - the student's weights come from two functions in the Spec, `student_variables` (its params
    joined with a PEFT student's frozen base) and `student_weights` (those seen through the
    QAT grid), made by kd.train.student_weights: the step itself knows no PEFT or quantization.

The parallel plans (kd.parallel) pass `axis_name` (pmap) and `strided_accum` (mesh) when they
bind the step for compiling.
"""

import dataclasses
import functools
from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import optax

from kd import losses
from kd.models import head_fn
from kd.models.decoder import head_matrix, head_params, project_with
from kd.models.encoder import pool


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any  # {'student': model variables, 'proj': feature projections (may be empty)}
  opt_state: Any
  rng: jax.Array
  # A PEFT student's frozen base variables (params['student'] then holds only the adapters):
  # an input of the step placed like the state, never differentiated, updated or checkpointed.
  frozen: Any = None
  # Self-distillation from an EMA of the student (Spec.ema_decay > 0): the teacher's variables,
  # updated after every step and checkpointed with the state.
  ema: Any = None


def create_state(params, tx, seed: int, frozen=None, ema=None) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=jax.random.key_data(jax.random.key(seed)), frozen=frozen, ema=ema)


def own_variables(params, frozen=None):
  """params['student']: Spec.student_variables of a student with no frozen base."""
  if frozen is not None:
    raise ValueError('the state holds a frozen base (a PEFT student) that this Spec does not '
                     'join: build the Spec with kd.train.build, or set student_variables='
                     'kd.train.student_weights.joined')
  return params['student']


def plain_weights(variables):
  """The variables themselves: Spec.student_weights of a student trained in float."""
  return variables


@dataclasses.dataclass(frozen=True)
class Spec:
  """Everything static about a step: models, optimizer, loss terms and their schedules."""
  student: Any  # a flax module
  teacher: Any | None
  tx: optax.GradientTransformation
  terms: Mapping[str, Mapping[str, Any]]  # loss name -> kwargs
  weights: Mapping[str, Callable]  # loss name -> schedule(step)
  temperature: Callable
  lr: Callable
  feature_pairs: tuple = ()
  attention_pairs: tuple = ()
  chunk_size: int = 0
  # With chunk_size: make the logit losses' gradient in the forward pass
  # (losses.fused_logit_losses) instead of recomputing each chunk's logits in the backward pass.
  fused_chunks: bool = True
  # Fused: the logits' gradient in closed form (losses.closed_form_applies: every built-in term),
  # None where the terms allow it.
  closed_form: bool | None = None
  # 'pallas': the 'ce' and 'kl' terms through kd.losses.fused_head, a kernel that reads the
  # final hidden states and both heads' weights and never holds a logits array; 'xla': logits.
  logit_kernel: str = 'xla'
  accum_steps: int = 1
  vocab: int = 0  # > 0: logit losses use only the first `vocab` rows (padded vocabs)
  topk_semantics: str = 'rest_bucket'  # for a cached top-k teacher, see kd/losses/topk.py
  # (params, frozen) -> the student's full variables: params['student'] joined with a PEFT
  # student's frozen base (kd.train.student_weights.joined); the EMA teacher and eval use them.
  student_variables: Callable = own_variables
  # The student's full variables -> the weights its forward computes with: under QAT the
  # target kernels seen through the RTN grid (kd.train.student_weights.FakeQuant).
  student_weights: Callable = plain_weights
  # > 0: the teacher is an exponential moving average of the student (state.ema, updated as
  # ema <- d * ema + (1 - d) * student after each step); the teacher_params argument is unused.
  ema_decay: float = 0.0
  # Online distillation: the teacher trains in the same step (params['teacher'], CE on the
  # labels, term ONLINE_TEACHER_CE) while the student distils from its current predictions.
  online: bool = False
  # A student whose training forward is stochastic (LoRA dropout, kd.train.compress.students):
  # the rng streams it draws from, keyed per step from state.rng (and per device and
  # micro-batch), and the deterministic module eval_step runs instead.
  student_rngs: tuple = ()
  student_eval: Any = None

  def logit_terms(self) -> list:
    return [n for n in self.terms if losses.get(n).kind in ('ce', 'logits')]

  def kinds(self) -> set:
    return {losses.get(n).kind for n in self.terms}

  def needs(self) -> dict:
    """The model outputs the loss terms consume (the same for teacher and student)."""
    kinds = self.kinds()
    needs = dict(output_hidden_states='hidden' in kinds, output_attentions='attention' in kinds,
                 output_qkv='relation' in kinds)
    if self.chunk_size or self.logit_kernel == 'pallas':  # a decoder-only flag: the loss
      # makes the logits (per chunk, or per tile in the kernel)
      needs['return_hidden_only'] = True
    return needs


def current_teacher(state: TrainState, teacher_params, spec: Spec):
  """The teacher's variables: the student's EMA under EMA self-distillation (a PEFT student's:
  the EMA of its adapters on its frozen base), the co-trained teacher under online
  distillation, else the `teacher_params` passed in."""
  if state.ema is not None:
    return spec.student_variables({'student': state.ema}, state.frozen)
  return state.params['teacher'] if 'teacher' in state.params else teacher_params


def eval_params(state: TrainState, spec: Spec):
  """state.params with the student's full variables, for eval_step."""
  if state.frozen is None:
    return state.params
  return {**state.params, 'student': spec.student_variables(state.params, state.frozen)}


def forward(model, variables, batch, rngs=None, **needs):
  if rngs:
    needs['rngs'] = rngs
  return model.apply(variables, batch['input_ids'], segment_ids=batch.get('segment_ids'),
                     positions=batch.get('positions'),
                     attention_mask=batch.get('attention_mask'), **needs)


def student_rngs(spec: Spec, rng):
  """{stream: key} for the student's training forward, from one key (None: no streams)."""
  if not spec.student_rngs:
    return None
  return {name: jax.random.fold_in(rng, i) for i, name in enumerate(spec.student_rngs)}


# An offline teacher's features travel in the batch under these keys, each a dict from the
# teacher's layer index (str) to arrays: what `loss_terms` reads from a live teacher's outputs.
CACHED_FEATURES = {'teacher_hidden_states': 'hidden_states', 'teacher_attentions': 'attentions',
                   'teacher_qkv': 'qkv'}


def cached_teacher_outputs(batch) -> dict:
  """A teacher's outputs rebuilt from batch fields (kd.data.sentence_cache writes them).

  Hidden states / attentions / qkv become tuples indexed like a live teacher's (hidden state j
  at position j, layer i's attention at i − 1) with None where the cache holds no layer, so
  layer pairs index them unchanged; 'teacher_embedding' [B, D] becomes 'embedding'.
  """
  out = {}
  for key, name in CACHED_FEATURES.items():
    if key in batch:
      by_index = {int(j): v for j, v in batch[key].items()}
      offset = 0 if name == 'hidden_states' else 1  # attentions/qkv start at layer 1
      out[name] = tuple(by_index.get(j + offset) for j in range(max(by_index) + 1 - offset))
  if 'teacher_embedding' in batch:
    out['embedding'] = batch['teacher_embedding']
  return out


def teacher_forward(spec: Spec, teacher_params, batch):
  """Teacher outputs for the loss terms; None when no term needs the teacher."""
  if not (spec.kinds() - {'ce', 'pairs'}):
    return None
  if 'teacher_logits' in batch:
    return {'logits': batch['teacher_logits']}
  if 'topk_ids' in batch:  # a cached teacher: its top-k logits and full logsumexp
    return {'topk': (batch['topk_ids'], batch['topk_logits'], batch['lse'])}
  if 'teacher_embedding' in batch or set(CACHED_FEATURES) & set(batch):
    return cached_teacher_outputs(batch)
  out = forward(spec.teacher, teacher_params, batch, **spec.needs())
  return jax.lax.stop_gradient(out)


def loss_terms(params, teacher_params, t_out, batch, spec: Spec, step, frozen=None,
               rng=None) -> dict:
  """Every configured loss term as a (sum, count) pair of float32 scalars. `rng`: a key for a
  stochastic student (spec.student_rngs)."""
  return _loss_terms(params, teacher_params, t_out, batch, spec, step, frozen=frozen,
                     rng=rng)[0]


def _loss_terms(params, teacher_params, t_out, batch, spec: Spec, step, logit_coeffs=None,
                frozen=None, rng=None):
  """(terms, surrogate). With `logit_coeffs` ({logit term: weight of its sum}) and chunking,
  the logit terms go through losses.fused_logit_losses: their sums come gradient-stopped and
  `surrogate` (value 0) carries the gradient of Σ coeff·sum; otherwise surrogate is 0."""
  surrogate = jnp.zeros((), jnp.float32)
  student = spec.student_weights(spec.student_variables(params, frozen))
  s_out = forward(spec.student, student, batch, student_rngs(spec, rng), **spec.needs())
  mask = batch['loss_mask']
  if 'segment_ids' in batch:
    token_mask = batch['segment_ids'] > 0
  else:
    token_mask = batch.get('attention_mask')
  temperature = spec.temperature(step)
  by_kind = {}
  for name, kw in spec.terms.items():
    by_kind.setdefault(losses.get(name).kind, {})[name] = dict(kw)
  logit_terms = {**by_kind.get('ce', {}), **by_kind.get('logits', {})}
  out = {}
  # With padded vocabularies every logit loss sees the shared rows only (labels never fall in
  # the padding, so CE is unchanged but for the padded rows' mass).
  cut = (lambda x: x[..., :spec.vocab]) if spec.vocab else (lambda x: x)
  if logit_terms and spec.logit_kernel == 'pallas':
    terms, surrogate = _kernel_terms(logit_terms, logit_coeffs, student, teacher_params, s_out,
                                     t_out, batch, spec, temperature)
    out.update(terms)
  elif logit_terms and spec.chunk_size:
    # The teacher per chunk: its hidden states through its head, a cache's top-k rows as they
    # are (config_check allows only 'kl' with a cache), or the batch's full teacher logits.
    teacher_in, teacher_project, divergences = None, None, None
    if t_out is not None and 'topk' in t_out:
      teacher_in, teacher_project = t_out['topk'], lambda chunk: chunk
      divergences = losses.topk_chunk_divergences(spec.topk_semantics)
    elif t_out is not None and 'hidden' not in t_out:
      teacher_in, teacher_project = t_out['logits'], cut
    elif t_out is not None:
      teacher_head = head_fn(spec.teacher, teacher_params)
      teacher_in, teacher_project = t_out['hidden'], lambda h: cut(teacher_head(h))
    chunked = dict(labels=batch['labels'], mask=mask, temperature=temperature,
                   chunk_size=spec.chunk_size, divergences=divergences)
    if logit_coeffs is not None:
      terms, surrogate = losses.fused_logit_losses(
          logit_terms, logit_coeffs, s_out['hidden'], head_params(spec.student, student),
          lambda p, h: cut(project_with(spec.student)(p, h)), teacher_in, teacher_project,
          closed_form=spec.closed_form, **chunked)
      out.update(terms)
    else:
      student_head = head_fn(spec.student, student)
      out.update(losses.chunked_logit_losses(
          logit_terms, s_out['hidden'], lambda h: cut(student_head(h)), teacher_in,
          teacher_project, **chunked))
  else:
    for name, kw in logit_terms.items():
      fn = losses.get(name).fn_sum
      if name in by_kind.get('ce', {}):
        out[name] = fn(cut(s_out['logits']), batch['labels'], mask=mask, **kw)
      elif 'topk' in t_out:  # config_check allows only 'kl' here
        out[name] = losses.topk_kl_sum(cut(s_out['logits']), *t_out['topk'], mask=mask,
                                       temperature=temperature, semantics=spec.topk_semantics)
      else:
        out[name] = fn(cut(s_out['logits']), cut(t_out['logits']), mask=mask,
                       temperature=temperature, **kw)
  for name, kw in by_kind.get('hidden', {}).items():
    out[name] = losses.feature_loss_sum(name, s_out['hidden_states'], t_out['hidden_states'],
                                        spec.feature_pairs, mask=mask,
                                        projections=params.get('proj') or None, **kw)
  for name, kw in by_kind.get('attention', {}).items():
    out[name] = losses.attention_loss_sum(name, s_out['attentions'], t_out['attentions'],
                                          spec.attention_pairs, mask=token_mask, **kw)
  for name, kw in by_kind.get('relation', {}).items():
    total = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
    for s_i, t_i in spec.attention_pairs:
      s, c = losses.get(name).fn_sum(s_out['qkv'][s_i - 1], t_out['qkv'][t_i - 1],
                                     mask=token_mask, **kw)
      total = (total[0] + s, total[1] + c)
    out[name] = total
  pooling = getattr(spec.student.config, 'pooling', 'mean')
  for name, kw in by_kind.get('pairs', {}).items():  # labelled pairs: no teacher
    out[name] = losses.get(name).fn_sum(pool(s_out['hidden'], token_mask, pooling),
                                        batch['pair_scores'], mask=batch['pair_mask'], **kw)
  if 'embedding' in by_kind:
    s_emb = pool(s_out['hidden'], token_mask, pooling)
    t_emb = t_out['embedding'] if 'embedding' in t_out else pool(t_out['hidden'], token_mask,
                                                                 pooling)
    rows = None if token_mask is None else jnp.any(token_mask, axis=-1)
    for name, kw in by_kind['embedding'].items():
      out[name] = losses.get(name).fn_sum(s_emb, t_emb, mask=rows, **kw)
  return out, surrogate


def _kernel_terms(logit_terms, logit_coeffs, student, teacher_params, s_out, t_out, batch,
                  spec: Spec, temperature):
  """(terms, surrogate) of the 'ce' and 'kl' terms through kd.losses.fused_head (config_check
  allows no other terms, no kwargs, and a teacher with its head). With `logit_coeffs` the sums
  come gradient-stopped and the surrogate carries their gradient (fused_head_kd); without, the
  sums are differentiable and the surrogate is 0."""
  if t_out is None or 'hidden' not in t_out:
    raise ValueError("logit_kernel='pallas' reads the teacher's final hidden states and head; "
                     "this teacher gives logits only (a cache or a mixture): use 'xla'.")
  args = (s_out['hidden'], head_matrix(spec.student, student), t_out['hidden'],
          head_matrix(spec.teacher, teacher_params), batch['labels'], batch['loss_mask'] > 0)
  kw = dict(temperature=temperature, vocab=spec.vocab or None)
  if logit_coeffs is not None:
    return losses.fused_head_kd(*args, coeffs={n: logit_coeffs[n] for n in logit_terms}, **kw)
  return (losses.fused_head_losses(*args, terms=tuple(logit_terms), **kw),
          jnp.zeros((), jnp.float32))


ONLINE_TEACHER_CE = 'online_teacher_ce'


def online_teacher_ce(spec: Spec, teacher_params, live, batch, coeff=None):
  """((sum, count), surrogate) of the co-trained teacher's CE on its live outputs `live`.

  With spec.chunk_size the teacher's logits are made per chunk from its hidden states, as the
  student's are: through losses.fused_logit_losses when `coeff` (the term's weight of its sum)
  is given and spec.fused_chunks, the sum then gradient-stopped and `surrogate` carrying its
  gradient; else through losses.chunked_logit_losses. Without chunking, CE of live['logits'].
  """
  zero = jnp.zeros((), jnp.float32)
  labels, mask = batch['labels'], batch['loss_mask']
  if not spec.chunk_size:
    return losses.ce_sum(live['logits'], labels, mask=mask), zero
  if coeff is not None and spec.fused_chunks:
    terms, surrogate = losses.fused_logit_losses(
        {'ce': {}}, {'ce': coeff}, live['hidden'], head_params(spec.teacher, teacher_params),
        project_with(spec.teacher), None, None, labels=labels, mask=mask,
        chunk_size=spec.chunk_size, closed_form=spec.closed_form)
    return terms['ce'], surrogate
  terms = losses.chunked_logit_losses({'ce': {}}, live['hidden'],
                                      head_fn(spec.teacher, teacher_params), None, None,
                                      labels=labels, mask=mask, chunk_size=spec.chunk_size)
  return terms['ce'], zero


def _objective(params, teacher_params, t_out, batch, spec, step, counts, frozen=None, rng=None,
               *, axis_name=None):
  if spec.online:  # the live teacher: its CE trains it, its stopped outputs teach the student
    live = forward(spec.teacher, params['teacher'], batch, **spec.needs())
    t_out = jax.lax.stop_gradient(live)
    teacher_params = jax.lax.stop_gradient(params['teacher'])  # its head, in chunked losses
  coeffs = None
  fused = (spec.chunk_size and spec.fused_chunks) or spec.logit_kernel == 'pallas'
  if fused and (spec.logit_terms() or spec.online):
    # The fused path needs each logit term's weight before the backward pass: w(step) over
    # its global count, which for a logit term is the number of loss-masked tokens.
    if counts is None:
      tokens = _psum(jnp.sum(batch['loss_mask'].astype(bool), dtype=jnp.float32), axis_name)
    coeffs = {n: spec.weights[n](step) / jnp.maximum(tokens if counts is None else counts[n], 1.0)
              for n in [*spec.logit_terms(), *([ONLINE_TEACHER_CE] if spec.online else [])]}
  student_coeffs = None if coeffs is None else {n: coeffs[n] for n in spec.logit_terms()}
  terms, surrogate = _loss_terms(params, teacher_params, t_out, batch, spec, step,
                                 student_coeffs, frozen, rng)
  if spec.online:
    terms[ONLINE_TEACHER_CE], teacher_surrogate = online_teacher_ce(
        spec, params['teacher'], live, batch, None if coeffs is None else coeffs[ONLINE_TEACHER_CE])
    surrogate = surrogate + teacher_surrogate
  if counts is None:
    counts = {n: c for n, (_, c) in terms.items()}
    if axis_name is not None:  # normalise by the global count, not this device's
      counts = jax.lax.psum(jax.lax.stop_gradient(counts), axis_name)
  total = sum(spec.weights[n](step) * s / jnp.maximum(counts[n], 1.0)
              for n, (s, _) in terms.items())
  return total + surrogate, terms


def objective(params, teacher_params, t_out, batch, spec: Spec, step=0):
  """The scalar a step differentiates with respect to `params` on one batch (normalised by its
  own counts), given the teacher's outputs `t_out` (teacher_forward); for tools that inspect
  the gradient's cost, e.g. kd.eval.speed.saved_residual_bytes."""
  return _objective(params, teacher_params, t_out, batch, spec, step, None)[0]


def _split(batch, n, strided=False):
  """[B, ...] -> [n, B/n, ...]: contiguous blocks, or with `strided` rows i, i+n, i+2n, ...

  Strided when the batch axis is sharded over devices (`jax.jit` on a mesh): every device then
  holds an equal part of every micro-batch, so each micro-step stays data parallel instead of
  running on the few devices that hold one contiguous block.
  """
  if strided:
    return jax.tree.map(
        lambda x: jnp.swapaxes(x.reshape((x.shape[0] // n, n) + x.shape[1:]), 0, 1), batch)
  return jax.tree.map(lambda x: x.reshape((n, x.shape[0] // n) + x.shape[1:]), batch)


def _psum(tree, axis_name=None):
  return tree if axis_name is None else jax.lax.psum(tree, axis_name)


def _grads(params, teacher_params, batch, spec: Spec, step, frozen=None, rng=None, *,
           axis_name=None, strided_accum=False):
  """(grads of the objective, per-term (sum, count)) over the batch, micro-batched if asked.

  With `axis_name`, both are summed over the devices of that axis; with `strided_accum`,
  micro-batch i is rows i::accum_steps (see _split). `frozen` (a PEFT student's base) goes into
  the forward pass but gets no gradient. `rng`: a stochastic student's key (micro-batch i draws
  from fold_in(rng, i)).
  """
  grad_fn = jax.grad(functools.partial(_objective, axis_name=axis_name), has_aux=True)
  if spec.accum_steps == 1:
    t_out = None if spec.online else teacher_forward(spec, teacher_params, batch)
    return _psum(grad_fn(params, teacher_params, t_out, batch, spec, step, None, frozen, rng),
                 axis_name)
  micro = _split(batch, spec.accum_steps, strided_accum)
  keys = (None if rng is None else
          jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(spec.accum_steps)))
  names = [*spec.terms, *([ONLINE_TEACHER_CE] if spec.online else [])]

  # Pass 1, forward only: the global count of every term, so each micro-batch's contribution is
  # normalised by the whole batch's count (exact, for any registered loss).
  def count_body(acc, mb_key):
    mb, key = mb_key
    if spec.online:  # the co-trained teacher, as _objective runs it
      t_out = forward(spec.teacher, params['teacher'], mb, **spec.needs())
      terms = loss_terms(params, params['teacher'], t_out, mb, spec, step, frozen, key)
      terms[ONLINE_TEACHER_CE] = online_teacher_ce(spec, params['teacher'], t_out, mb)[0]
    else:
      t_out = teacher_forward(spec, teacher_params, mb)
      terms = loss_terms(params, teacher_params, t_out, mb, spec, step, frozen, key)
    return jax.tree.map(jnp.add, acc, {n: c for n, (_, c) in terms.items()}), None
  zero_counts = {n: jnp.zeros((), jnp.float32) for n in names}
  counts, _ = jax.lax.scan(count_body, zero_counts, (micro, keys))
  counts = _psum(counts, axis_name)

  def grad_body(acc, mb_key):
    mb, key = mb_key
    t_out = None if spec.online else teacher_forward(spec, teacher_params, mb)
    g, terms = grad_fn(params, teacher_params, t_out, mb, spec, step, counts, frozen, key)
    return jax.tree.map(jnp.add, acc, (g, terms)), None
  zero_terms = {n: (jnp.zeros((), jnp.float32),) * 2 for n in names}
  zero = (jax.tree.map(jnp.zeros_like, params), zero_terms)
  (grads, terms), _ = jax.lax.scan(grad_body, zero, (micro, keys))
  return _psum((grads, terms), axis_name)


def train_step(state: TrainState, teacher_params, batch, spec: Spec, *,
               axis_name: str | None = None, strided_accum: bool = False):
  """One optimizer update. Returns (new state, metrics); term metrics are (sum, count) pairs.

  `axis_name`: under `jax.pmap`, the axis to sum counts, terms and gradients over (the pmap
  plan's); `strided_accum`: micro-batch i is rows i::accum_steps (the mesh plan's, see _split).
  """
  step = state.step
  teacher_params = current_teacher(state, teacher_params, spec)
  rng = None
  if spec.student_rngs:  # a key per step, and per device under pmap (each has its own rows)
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), step)
    if axis_name is not None:
      rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
  grads, terms = _grads(state.params, teacher_params, batch, spec, step, state.frozen, rng,
                        axis_name=axis_name, strided_accum=strided_accum)
  updates, opt_state = spec.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  loss = sum(spec.weights[n](step) * s / jnp.maximum(c, 1.0) for n, (s, c) in terms.items())
  metrics = {
      'loss': loss,
      'terms': terms,
      'grad_norm': optax.tree.norm(grads),
      'update_norm': optax.tree.norm(updates),
      'param_norm': optax.tree.norm(params),
      'lr': spec.lr(step),
      'temperature': spec.temperature(step),
      **{f'weight/{n}': spec.weights[n](step) for n in spec.terms},
  }
  new_state = state.replace(step=step + 1, params=params, opt_state=opt_state)
  if spec.ema_decay:
    d = spec.ema_decay
    new_state = new_state.replace(ema=jax.tree.map(
        lambda e, p: (d * e.astype(jnp.float32) + (1 - d) * p.astype(jnp.float32)).astype(e.dtype),
        state.ema, params['student']))
  return new_state, metrics


def eval_step(params, teacher_params, batch, spec: Spec, num_bins: int = 15):
  """Held-out metrics as (sum, count): student CE (-> perplexity), the loss terms, and, with a
  teacher, teacher CE and teacher-student top-1 agreement on the masked tokens.

  Calibration: for each of `num_bins` equal-width bins of the max softmax probability,
  'ece/conf_<b>' = (sum of confidences, tokens in bin b) and 'ece/hit_<b>' = (correct top-1
  predictions, tokens in bin b), 'teacher_ece/...' likewise; plain sums, so they add up over
  batches and devices, and `metrics.summarize_eval` turns them into 'ece' / 'teacher_ece'.
  """
  mask = batch['loss_mask']
  mask_f = mask.astype(jnp.float32)

  def calibration(logits, prefix):
    logits = logits.astype(jnp.float32)
    conf = jnp.exp(jnp.max(jax.nn.log_softmax(logits, -1), -1))
    hit = (jnp.argmax(logits, -1) == batch['labels']).astype(jnp.float32)
    # Bins (b/n, (b+1)/n]; a confidence is > 0, and 1.0 falls in the last bin.
    bins = jnp.clip(jnp.ceil(conf * num_bins).astype(jnp.int32) - 1, 0, num_bins - 1)
    in_bin = jax.nn.one_hot(bins, num_bins, dtype=jnp.float32)
    n, conf_sum, hit_sum = (jnp.einsum('...b,...->b', in_bin, mask_f * x)
                            for x in (1.0, conf, hit))
    return {**{f'{prefix}/conf_{b:02d}': (conf_sum[b], n[b]) for b in range(num_bins)},
            **{f'{prefix}/hit_{b:02d}': (hit_sum[b], n[b]) for b in range(num_bins)}}

  student_logits = forward(spec.student_eval or spec.student,
                           spec.student_weights(params['student']), batch)['logits']
  out = {'ce': losses.ce_sum(student_logits, batch['labels'], mask=mask)}
  count = jnp.sum(mask_f)
  out['accuracy'] = (jnp.sum((jnp.argmax(student_logits, -1) == batch['labels']) * mask), count)
  out.update(calibration(student_logits, 'ece'))
  if spec.teacher is not None and teacher_params is not None:
    teacher_logits = forward(spec.teacher, teacher_params, batch)['logits']
    out['teacher_ce'] = losses.ce_sum(teacher_logits, batch['labels'], mask=mask)
    out.update(calibration(teacher_logits, 'teacher_ece'))
    agree = jnp.argmax(student_logits, -1) == jnp.argmax(teacher_logits, -1)
    out['agreement'] = (jnp.sum(agree * mask), count)
    # Divergences at T=1: the distance between the models' actual distributions.
    for name, kw in spec.terms.items():
      if losses.get(name).kind == 'logits':
        out[name] = losses.get(name).fn_sum(student_logits, teacher_logits, mask=mask,
                                            temperature=1.0, **kw)
  return out
