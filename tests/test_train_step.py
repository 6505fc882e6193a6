"""The pure train step: it learns, accumulation is exact, schedules and NaN checks behave."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from kd import losses as kd_losses
from kd import models
from kd.train import build
from kd.train import loop
from kd.train import schedules
from kd.train import step as step_lib

V, B, T = 61, 8, 16


def _config(**losses):
  c = ml_collections.ConfigDict()
  c.losses = losses or {'ce': 0.5, 'kl': 0.5}
  c.loss_kwargs = {}
  c.temperature = 2.0
  c.chunk_size = 0
  c.features = {'layer_map': 'uniform', 'pairs': ()}
  c.optimizer = {'name': 'adamw', 'lr': 1e-2, 'warmup_steps': 0, 'schedule': 'constant'}
  c.train = {'accum_steps': 1}
  return c


def _models():
  teacher = build.build_model(dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                   intermediate_size=64), V)
  student = build.build_model(dict(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                                   intermediate_size=32), V)
  return teacher, student


def _batch(seed=0, ragged=True):
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, V, size=(B, T + 1)).astype(np.int32)
  lengths = rng.integers(2, T + 1, size=B) if ragged else np.full(B, T)
  seg = (np.arange(T)[None] < lengths[:, None]).astype(np.int32)
  mask = (np.arange(T)[None] < lengths[:, None] - 1).astype(np.float32)
  return {'input_ids': ids[:, :-1], 'labels': ids[:, 1:], 'loss_mask': mask,
          'segment_ids': seg, 'positions': np.broadcast_to(np.arange(T), (B, T)).astype(np.int32)}


def _setup(config, steps=10):
  teacher, student = _models()
  teacher_params = models.init_params(teacher.config, jax.random.key(1))
  spec = build.make_spec(config, student, teacher, dict(config.losses), steps)
  state = step_lib.create_state(build.init_student(spec, 0), spec.tx, 0)
  return spec, state, teacher_params


def test_train_step_lowers_the_loss_on_a_fixed_batch():
  spec, state, tp = _setup(_config())
  batch = _batch()
  # One compilation for the whole run: a retrace would raise.
  @chex.assert_max_traces(n=1)
  def one_step(state, teacher_params, batch):
    return step_lib.train_step(state, teacher_params, batch, spec)

  fn = jax.jit(one_step)
  losses = []
  for _ in range(25):
    state, m = fn(state, tp, batch)
    losses.append(float(m['loss']))
  assert losses[-1] < 0.6 * losses[0], losses
  assert int(state.step) == 25


def test_jit_and_plain_step_agree():
  spec, state, tp = _setup(_config())
  batch = _batch()
  s1, m1 = step_lib.train_step(state, tp, batch, spec)
  s2, m2 = jax.jit(functools.partial(step_lib.train_step, spec=spec))(state, tp, batch)
  np.testing.assert_allclose(m1['loss'], m2['loss'], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), s1.params, s2.params)


@pytest.mark.parametrize('losses', [{'ce': 0.5, 'kl': 0.5}, {'ce': 0.3, 'jsd': 0.7},
                                    {'kl': 1.0, 'hidden_mse': 0.5}])
def test_gradient_accumulation_equals_one_big_batch(losses):
  # Micro-batches have different token counts: a mean of means would differ from the truth.
  config = _config(**losses)
  spec, state, tp = _setup(config)
  batch = _batch(ragged=True)
  s1, m1 = step_lib.train_step(state, tp, batch, spec)
  config.train.accum_steps = 4
  spec4 = build.make_spec(config, spec.student, spec.teacher, dict(config.losses), 10)
  s4, m4 = step_lib.train_step(state, tp, batch, spec4)
  np.testing.assert_allclose(m1['loss'], m4['loss'], rtol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               s1.params, s4.params)
  for name in losses:
    np.testing.assert_allclose(m1['terms'][name], m4['terms'][name], rtol=1e-4)


def test_objective_is_weighted_sum_of_term_means():
  config = _config(ce=0.25, kl=0.75)
  spec, state, tp = _setup(config)
  _, m = step_lib.train_step(state, tp, _batch(), spec)
  terms = {k: float(s) / float(c) for k, (s, c) in m['terms'].items()}
  np.testing.assert_allclose(float(m['loss']), 0.25 * terms['ce'] + 0.75 * terms['kl'], rtol=1e-6)
  # CE term against a hand computation from the student logits.
  out = step_lib.forward(spec.student, state.params['student'], _batch())
  logp = jax.nn.log_softmax(np.asarray(out['logits'], np.float64), -1)
  b = _batch()
  nll = -np.take_along_axis(np.asarray(logp), b['labels'][..., None], -1)[..., 0]
  np.testing.assert_allclose(terms['ce'], (nll * b['loss_mask']).sum() / b['loss_mask'].sum(),
                             rtol=1e-5)


def test_weight_and_temperature_schedules_follow_the_step():
  config = _config(ce={'kind': 'linear', 'start': 1.0, 'end': 0.0, 'steps': 4},
                   kl={'kind': 'linear', 'start': 0.0, 'end': 1.0, 'steps': 4})
  with config.ignore_type():
    config.temperature = {'kind': 'cosine', 'start': 4.0, 'end': 1.0, 'steps': 4}
  spec, state, tp = _setup(config)
  fn = jax.jit(functools.partial(step_lib.train_step, spec=spec))
  seen = []
  for _ in range(5):
    state, m = fn(state, tp, _batch())
    seen.append((float(m['weight/ce']), float(m['weight/kl']), float(m['temperature'])))
  np.testing.assert_allclose([s[0] for s in seen], [1, 0.75, 0.5, 0.25, 0], atol=1e-6)
  np.testing.assert_allclose([s[1] for s in seen], [0, 0.25, 0.5, 0.75, 1], atol=1e-6)
  expected_t = [4 - 3 * 0.5 * (1 - np.cos(np.pi * i / 4)) for i in range(5)]
  np.testing.assert_allclose([s[2] for s in seen], expected_t, atol=1e-5)


def test_schedules_by_hand():
  assert float(schedules.make(3.0)(100)) == 3.0
  lin = schedules.make({'kind': 'linear', 'start': 2.0, 'end': 4.0, 'steps': 10, 'warmup': 5})
  assert [float(lin(s)) for s in (0, 5, 10, 15, 30)] == [2.0, 2.0, 3.0, 4.0, 4.0]
  with pytest.raises(ValueError, match="valid: \\['constant', 'cosine', 'linear'\\]"):
    schedules.make({'kind': 'exp', 'start': 1.0})
  with pytest.raises(ValueError, match='unknown schedule keys'):
    schedules.make({'kind': 'linear', 'start': 1.0, 'stop': 2})


def test_teacher_outputs_in_the_batch_skip_the_teacher():
  spec, state, tp = _setup(_config(ce=0.5, kl=0.5))
  batch = _batch()
  t_logits = step_lib.forward(spec.teacher, tp, batch)['logits']
  _, m_online = step_lib.train_step(state, tp, batch, spec)
  # With teacher logits in the batch, the teacher params are never read.
  _, m_offline = step_lib.train_step(state, None, {**batch, 'teacher_logits': t_logits}, spec)
  np.testing.assert_allclose(m_online['loss'], m_offline['loss'], rtol=1e-6)


def test_non_finite_loss_names_the_step_and_term():
  m = {'loss': float('nan'), 'grad_norm': 1.0, 'terms': {'ce': (1.0, 2.0), 'kl': (float('nan'), 2.0)}}
  with pytest.raises(loop.NonFiniteError, match="step 7: loss term 'kl'"):
    loop.check_finite(7, m)
  with pytest.raises(loop.NonFiniteError, match=r'step 3: the gradient norm = inf \(terms: ce=0.5'):
    loop.check_finite(3, {'loss': 0.5, 'grad_norm': float('inf'), 'terms': {'ce': (1.0, 2.0)}})
  loop.check_finite(7, {'loss': 1.0, 'grad_norm': 1.0, 'terms': {'ce': (1.0, 0.0)}})


@pytest.mark.parametrize('terms', [{'ce': 0.5, 'kl': 0.5}, {'ce': 0.2, 'skew_kl': 0.5, 'tvd': 0.3}])
@pytest.mark.parametrize('fused,accum', [(False, 1), (True, 1), (True, 2)])
def test_chunked_step_equals_plain_step(terms, fused, accum):
  config = _config(**terms)
  config.train.accum_steps = accum
  spec, state, tp = _setup(config)
  config.chunk_size = 5  # T=16 is not a multiple: the last chunk is padded and masked
  config.fused_chunks = fused
  chunked = build.make_spec(config, spec.student, spec.teacher, dict(config.losses), 10)
  assert chunked.fused_chunks == fused and chunked.accum_steps == accum
  batch = _batch()
  s1, m1 = step_lib.train_step(state, tp, batch, spec)
  s2, m2 = step_lib.train_step(state, tp, batch, chunked)
  np.testing.assert_allclose(m1['loss'], m2['loss'], rtol=1e-5)
  # One AdamW step at lr 1e-2 moves each param by about lr·g/|g|: a wrong gradient shows as a
  # difference near 1e-2, float32 rounding of a small g (both paths are within 1e-6 of float64
  # relative to the largest g) as one near 1e-6.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
               s1.params, s2.params)


@pytest.mark.parametrize('semantics', ['rest_bucket', 'renormalize'])
@pytest.mark.parametrize('fused', [False, True])
def test_cached_teacher_chunked_step_equals_plain_step(semantics, fused):
  # An offline top-k teacher (the batch carries topk_ids, topk_logits, lse) with the student's
  # logits made in chunks: the same loss and update as with its full [B, T, V] logits.
  config = _config()
  config.teacher = {'topk_semantics': semantics}
  spec, state, tp = _setup(config)
  batch = _batch()
  t_logits = step_lib.forward(spec.teacher, tp, batch)['logits']
  ids, values, lse = kd_losses.topk_from_logits(t_logits, 8, temperature=config.temperature)
  batch.update(topk_ids=np.asarray(ids), topk_logits=np.asarray(values), lse=np.asarray(lse))
  config.chunk_size = 5  # T=16: the last chunk is padded
  config.fused_chunks = fused
  chunked = build.make_spec(config, spec.student, spec.teacher, dict(config.losses), 10)
  assert chunked.topk_semantics == semantics and chunked.chunk_size == 5
  s1, m1 = step_lib.train_step(state, tp, batch, spec)
  s2, m2 = step_lib.train_step(state, tp, batch, chunked)
  full = dict(batch)
  for key in ('topk_ids', 'topk_logits', 'lse'):
    del full[key]
  s_online, m_online = step_lib.train_step(state, tp, full, spec)
  assert abs(float(m1['loss']) - float(m_online['loss'])) > 1e-4  # the cache is really read
  # The teacher's full logits carried by the batch, in chunks too: the online teacher's step.
  full['teacher_logits'] = np.asarray(t_logits)
  s_full, m_full = step_lib.train_step(state, tp, full, chunked)
  np.testing.assert_allclose(m_full['loss'], m_online['loss'], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
               s_online.params, s_full.params)
  np.testing.assert_allclose(m2['loss'], m1['loss'], rtol=1e-5)
  for name in ('kl', 'ce'):
    np.testing.assert_allclose(m2['terms'][name], m1['terms'][name], rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
               s1.params, s2.params)


def test_feature_attention_and_relation_terms_train():
  config = _config(hidden_mse=1.0, attention_kl=1.0, minilm_relations=1.0)
  config.loss_kwargs = {'minilm_relations': {'num_relation_heads': 4}}
  teacher, _ = _models()
  student = build.build_model(dict(hidden_size=16, num_layers=1, num_heads=4, num_kv_heads=2,
                                   intermediate_size=32), V)  # attention maps need equal heads
  tp = models.init_params(teacher.config, jax.random.key(1))
  # Sharpen the teacher's attention (random init is near uniform, leaving nothing to learn).
  tp = jax.tree_util.tree_map_with_path(
      lambda path, x: x * 8.0 if any(getattr(k, 'key', '') in ('q_proj', 'k_proj') for k in path)
      else x, tp)
  spec = build.make_spec(config, student, teacher, dict(config.losses), 10)
  state = step_lib.create_state(build.init_student(spec, 0), spec.tx, 0)
  assert set(state.params['proj']) == {'0', '1'}  # widths 16 -> 32: one projection per pair
  assert spec.feature_pairs == ((0, 0), (1, 2)) and spec.attention_pairs == ((1, 2),)
  fn = jax.jit(functools.partial(step_lib.train_step, spec=spec))
  first = None
  for _ in range(15):
    state, m = fn(state, tp, _batch())
    first = first or {k: float(s) / float(c) for k, (s, c) in m['terms'].items()}
  last = {k: float(s) / float(c) for k, (s, c) in m['terms'].items()}
  for k in ('hidden_mse', 'attention_kl', 'minilm_relations'):
    assert np.isfinite(last[k]) and last[k] < first[k], (k, first[k], last[k])


def test_padded_teacher_vocab_compares_shared_rows():
  config = _config(ce=0.5, kl=0.5)
  _, student = _models()
  teacher = build.build_model(dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                   intermediate_size=64), V + 3)  # 3 padding rows
  tp = models.init_params(teacher.config, jax.random.key(1))
  spec = build.make_spec(config, student, teacher, dict(config.losses), 10)
  assert spec.vocab == V
  state = step_lib.create_state(build.init_student(spec, 0), spec.tx, 0)
  batch = _batch()
  _, m = step_lib.train_step(state, tp, batch, spec)
  s_logits = step_lib.forward(student, state.params['student'], batch)['logits']
  t_logits = step_lib.forward(teacher, tp, batch)['logits'][..., :V]
  p_t = jax.nn.softmax(np.asarray(t_logits) / 2.0, -1)
  kl = (p_t * (jax.nn.log_softmax(np.asarray(t_logits) / 2.0, -1)
               - jax.nn.log_softmax(np.asarray(s_logits) / 2.0, -1))).sum(-1) * 4.0
  mask = batch['loss_mask']
  np.testing.assert_allclose(float(m['terms']['kl'][0]) / float(m['terms']['kl'][1]),
                             (kl * mask).sum() / mask.sum(), rtol=1e-4)


@pytest.mark.parametrize('semantics', ['renormalize', 'student_full', 'rest_bucket'])
def test_cached_full_vocab_teacher_equals_the_online_teacher(semantics):
  config = _config(ce=0.5, kl=0.5)
  spec, state, tp = _setup(config)
  spec = dataclasses.replace(spec, topk_semantics=semantics)
  batch = _batch()
  t_logits = step_lib.forward(spec.teacher, tp, batch)['logits']
  ids, values, lse = kd_losses.topk_from_logits(t_logits, V, temperature=2.0)
  cached = {**batch, 'topk_ids': ids, 'topk_logits': values, 'lse': lse}
  s1, m1 = step_lib.train_step(state, tp, batch, spec)
  s2, m2 = step_lib.train_step(state, None, cached, spec)  # the teacher is never run
  np.testing.assert_allclose(m1['loss'], m2['loss'], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               s1.params, s2.params)


def test_optimizer_mu_dtype_keeps_adams_first_moment_in_bfloat16():
  from kd.train import optim  # pylint: disable=g-import-not-at-top
  params = {'w': jnp.ones((3, 2), jnp.float32)}
  grads = {'w': jnp.full((3, 2), 0.3, jnp.float32)}
  tx, _ = optim.make({'name': 'adamw', 'lr': 0.1, 'schedule': 'constant', 'mu_dtype': 'bfloat16'},
                     10)
  state = tx.init(params)
  mus = [x for x in jax.tree.leaves(state) if getattr(x, 'shape', ()) == (3, 2)]
  assert sorted(str(x.dtype) for x in mus) == ['bfloat16', 'float32']  # mu, nu
  updates, _ = tx.update(grads, state, params)
  # The first Adam step is -lr * sign(g) (bias-corrected m/sqrt(v) = g/|g|) in either dtype.
  np.testing.assert_allclose(updates['w'], -0.1, rtol=1e-2)
  with pytest.raises(ValueError, match='mu_dtype'):
    optim.make({'name': 'sgd', 'lr': 0.1, 'mu_dtype': 'bfloat16'}, 10)


def test_ema_self_distillation_uses_and_updates_the_average():
  config = _config(ce=0.5, kl=0.5)
  config.optimizer.name = 'sgd'
  _, student = _models()
  spec = build.make_spec(config, student, student, dict(config.losses), 10, ema_decay=0.9)
  params = build.init_student(spec, 0)
  ema = models.init_params(student.config, jax.random.key(7))  # a teacher unlike the student
  state = step_lib.create_state(params, spec.tx, 0, ema=ema)
  batch = _batch()
  new, m = jax.jit(functools.partial(step_lib.train_step, spec=spec))(state, None, batch)
  # The same step with the EMA passed as an ordinary teacher, and no averaging.
  plain = dataclasses.replace(spec, ema_decay=0.0)
  ref, m_ref = step_lib.train_step(step_lib.create_state(params, spec.tx, 0), ema, batch, plain)
  np.testing.assert_allclose(m["loss"], m_ref["loss"], rtol=1e-5)
  chex.assert_trees_all_close(new.params, ref.params, rtol=1e-5, atol=1e-8)
  # ema <- 0.9 ema + 0.1 student, computed in numpy.
  want = jax.tree.map(lambda e, p: 0.9 * np.asarray(e) + 0.1 * np.asarray(p), ema,
                      new.params['student'])
  chex.assert_trees_all_close(new.ema, want, rtol=1e-6, atol=1e-7)


def test_ema_config_is_checked(shakespeare_config):
  from kd.train import config_check  # pylint: disable=g-import-not-at-top
  c = shakespeare_config('ema:tiny')
  c.self_distill.ema_decay = 1.0
  with pytest.raises(config_check.ConfigError, match=r'ema_decay must be in \[0, 1\)'):
    config_check.check(c)
  c = shakespeare_config('ema:tiny')  # a LoRA student averages adapters (lora.py's settings)
  c.peft.method = 'lora'
  c.student_init.source = 'teacher'
  c.optimizer.weight_decay = 0.0
  config_check.check(c)
  # The EMA alone as target lets both stay at their init: a label term is required.
  c = shakespeare_config('ema:tiny')
  c.losses = ml_collections.ConfigDict({'jsd': 1.0})
  with pytest.raises(config_check.ConfigError, match='needs a label term'):
    config_check.check(c)
  c = shakespeare_config('ema:tiny,dialogue,objective=jsd')  # dialogue's pure JSD gets CE back
  assert dict(c.copy_and_resolve_references().losses) == {'ce': 0.5, 'jsd': 0.5}
  config_check.check(c)


def test_online_step_trains_the_teacher_on_ce_and_the_student_from_it():
  config = _config(ce=0.5, kl=0.5)
  config.optimizer.name = 'sgd'
  teacher, student = _models()
  spec = build.make_spec(config, student, teacher, dict(config.losses), 10, online=True)
  tp = models.init_params(teacher.config, jax.random.key(1))
  params = {**build.init_student(spec, 0), 'teacher': tp}
  batch = _batch()
  new, m = jax.jit(functools.partial(step_lib.train_step, spec=spec))(
      step_lib.create_state(params, spec.tx, 0), None, batch)
  # Student: the ordinary KD step from the teacher as it was before the step.
  offline = build.make_spec(config, student, teacher, dict(config.losses), 10)
  ref, _ = step_lib.train_step(step_lib.create_state(build.init_student(offline, 0), offline.tx, 0),
                               tp, batch, offline)
  chex.assert_trees_all_close(new.params['student'], ref.params['student'], rtol=1e-5, atol=1e-8)
  # Teacher: SGD (lr 1e-2) on its own mean CE over the masked tokens.
  def teacher_ce(p):
    logits = teacher.apply(p, batch['input_ids'], segment_ids=batch['segment_ids'],
                           positions=batch['positions'])['logits']
    s, c = kd_losses.ce_sum(logits, batch['labels'], mask=batch['loss_mask'])
    return s / c
  g = jax.grad(teacher_ce)(tp)
  chex.assert_trees_all_close(new.params['teacher'], jax.tree.map(lambda p, d: p - 1e-2 * d, tp, g),
                              rtol=1e-5, atol=1e-7)
  s, c = m['terms'][step_lib.ONLINE_TEACHER_CE]
  np.testing.assert_allclose(s / c, teacher_ce(tp), rtol=1e-5)
  # Accumulated over ragged micro-batches: the same update as the whole batch at once.
  accum = dataclasses.replace(spec, accum_steps=4)
  ragged = _batch(ragged=True)
  s1, m1 = step_lib.train_step(step_lib.create_state(params, spec.tx, 0), None, ragged, spec)
  s4, m4 = step_lib.train_step(step_lib.create_state(params, spec.tx, 0), None, ragged, accum)
  chex.assert_trees_all_close(s4.params, s1.params, rtol=1e-4, atol=1e-6)
  for name, v in m1['terms'].items():
    np.testing.assert_allclose(m4['terms'][name], v, rtol=1e-4)
  # Chunked logits, the teacher's CE too (fused: gradients made in the forward pass; not fused:
  # recomputed in the backward pass), whole or accumulated: the update of full logits.
  for chunked in (dataclasses.replace(spec, chunk_size=4),
                  dataclasses.replace(spec, chunk_size=4, fused_chunks=False),
                  dataclasses.replace(spec, chunk_size=4, accum_steps=4)):
    s_c, m_c = step_lib.train_step(step_lib.create_state(params, spec.tx, 0), None, ragged,
                                   chunked)
    chex.assert_trees_all_close(s_c.params, s1.params, rtol=1e-4, atol=1e-6)
    for name, v in m1['terms'].items():
      np.testing.assert_allclose(m_c['terms'][name], v, rtol=1e-4)


def test_a_checkpoint_from_before_a_state_field_existed_restores(tmp_path):
  """A state saved without `frozen`/`ema` (as runs did before those fields existed) restores
  into today's TrainState when the run leaves them None, and is refused when it needs them."""
  import flax.struct
  import optax
  from kd.train import checkpoint

  @flax.struct.dataclass
  class OldState:  # TrainState as it was: four fields.
    step: jax.Array
    params: dict
    opt_state: object
    rng: jax.Array

  tx = optax.adam(1e-3)
  params = {'student': {'w': jnp.arange(6.0).reshape(2, 3)}, 'proj': {}}
  new = step_lib.create_state(params, tx, seed=3)
  old = OldState(step=jnp.asarray(7, jnp.int32), params=jax.tree.map(lambda x: x + 1, params),
                 opt_state=tx.init(params), rng=new.rng + 1)
  mngr = checkpoint.manager(str(tmp_path / 'ckpt'))
  checkpoint.save(mngr, 7, old)
  mngr.wait_until_finished()
  restored = checkpoint.restore_latest(mngr, new)
  assert isinstance(restored, step_lib.TrainState) and restored.ema is None
  assert int(restored.step) == 7
  np.testing.assert_array_equal(restored.params['student']['w'], np.arange(6.0).reshape(2, 3) + 1)
  np.testing.assert_array_equal(restored.rng, np.asarray(new.rng) + 1)
  with pytest.raises(ValueError, match=r"no \['ema'\].*fresh --workdir"):
    checkpoint.restore_latest(mngr, new.replace(ema=params['student']))


def test_a_checkpoint_of_the_other_layer_layout_is_refused_clearly(tmp_path):
  """A run resumed with scan_layers flipped: the checkpoint's layers_{i} against the model's
  stacked `layers` (and back) is named in the error, not left to orbax's tree diff."""
  import optax
  from kd.train import checkpoint

  cfg = models.DecoderConfig(vocab_size=V, hidden_size=16, num_layers=2, num_heads=2,
                             num_kv_heads=1, intermediate_size=32)
  per_layer = models.init_params(cfg, jax.random.key(0))
  tx = optax.sgd(0.1)
  state = lambda variables: step_lib.create_state({'student': variables, 'proj': {}}, tx, 0)
  for saved, resumed, words in ((per_layer, models.stack_layers(per_layer), 'per layer'),
                                (models.stack_layers(per_layer), per_layer, 'stacked')):
    mngr = checkpoint.manager(str(tmp_path / words.replace(' ', '_')))
    checkpoint.save(mngr, 3, state(saved))
    mngr.wait_until_finished()
    assert int(checkpoint.restore_latest(mngr, state(saved)).step) == 0  # same layout: fine
    with pytest.raises(ValueError, match=f'holds its layers {words}.*scan_layers differs'):
      checkpoint.restore_latest(mngr, state(resumed))
