"""LoRA students in the train step and the run: only adapters train, the base stays out of the
optimizer and the checkpoints, and the update is the one an independent merge gives."""

import dataclasses
import functools
import json
import os

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from kd import peft
from kd.train import build
from kd.train import config_check
from kd.train import run
from kd.train import step as step_lib

V, B, T = 61, 4, 12
LORA = peft.LoraConfig(target=r'.*_proj', rank=4, alpha=8.0)


def _config(optimizer='sgd'):
  c = ml_collections.ConfigDict()
  c.losses = {'ce': 0.5, 'kl': 0.5}
  c.loss_kwargs = {}
  c.temperature = 2.0
  c.chunk_size = 0
  c.features = {'layer_map': 'uniform', 'pairs': ()}
  c.optimizer = {'name': optimizer, 'lr': 0.1, 'warmup_steps': 0, 'schedule': 'constant'}
  c.train = {'accum_steps': 1}
  return c


def _setup(config):
  teacher = build.build_model(dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                   intermediate_size=64), V)
  student = build.build_model(dict(hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1,
                                   intermediate_size=32), V)
  teacher_params = jax.jit(run.models.init_params, static_argnums=0)(teacher.config,
                                                                    jax.random.key(1))
  base = run.models.init_params(student.config, jax.random.key(2))
  model = peft.lora_model(student, LORA)
  lora = peft.init_lora(model, base, jax.random.key(3), LORA)
  # B starts at zero; make it non-zero so that A gets a gradient too.
  lora = jax.tree_util.tree_map_with_path(
      lambda p, x: 0.1 * jax.random.normal(jax.random.key(len(jax.tree_util.keystr(p))),
                                           x.shape) if 'lora_b' in jax.tree_util.keystr(p)
      else x, lora)
  rng = np.random.default_rng(0)
  ids = rng.integers(0, V, size=(B, T + 1)).astype(np.int32)
  batch = {'input_ids': ids[:, :-1], 'labels': ids[:, 1:],
           'loss_mask': np.ones((B, T), np.float32)}
  spec = build.make_spec(config, model, teacher, dict(config.losses), 10)
  plain_spec = build.make_spec(config, student, teacher, dict(config.losses), 10)
  return spec, plain_spec, teacher_params, base, lora, batch


def _merged_by_hand(lora, base):
  """W + (alpha / rank) A @ B per adapted kernel, written here apart from kd.peft.merge."""
  flat = dict(flax.traverse_util.flatten_dict(base))
  for k, a in flax.traverse_util.flatten_dict(lora).items():
    if k[-1] == 'kernel_lora_a':
      b = flax.traverse_util.flatten_dict(lora)[(*k[:-1], 'kernel_lora_b')]
      flat[(*k[:-1], 'kernel')] = flat[(*k[:-1], 'kernel')] + LORA.alpha / LORA.rank * a @ b
  return flax.traverse_util.unflatten_dict(flat)


def test_lora_step_is_sgd_on_the_gradient_of_an_independently_merged_model():
  config = _config('sgd')
  spec, plain_spec, tp, base, lora, batch = _setup(config)
  state = step_lib.create_state({'student': lora, 'proj': {}}, spec.tx, 0, frozen=base)
  base_copy = jax.tree.map(np.array, base)
  new, metrics = jax.jit(functools.partial(step_lib.train_step, spec=spec))(state, tp, batch)

  def reference_loss(adapters):  # the plain model's objective on merged weights
    params = {'student': _merged_by_hand(adapters, base_copy), 'proj': {}}
    t_out = step_lib.teacher_forward(plain_spec, tp, batch)
    terms = step_lib.loss_terms(params, tp, t_out, batch, plain_spec, 0)
    return sum(plain_spec.weights[n](0) * s / c for n, (s, c) in terms.items())

  loss, grads = jax.jit(jax.value_and_grad(reference_loss))(lora)
  np.testing.assert_allclose(metrics['loss'], loss, rtol=1e-5)
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
  expected = jax.tree.map(lambda p, g: p - 0.1 * g, lora, grads)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               new.params['student'], expected)
  # The base went through the step untouched.
  jax.tree.map(np.testing.assert_array_equal, new.frozen, base_copy)


def test_optimizer_state_holds_only_the_adapters():
  config = _config('adamw')
  spec, _, tp, base, lora, batch = _setup(config)
  state = step_lib.create_state({'student': lora, 'proj': {}}, spec.tx, 0, frozen=base)
  moments = [x for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0]
  assert sum(x.size for x in moments) == 2 * peft.count(lora)  # Adam's mu and nu


def test_eval_sees_the_adapters():
  config = _config('sgd')
  spec, plain_spec, tp, base, lora, batch = _setup(config)
  state = step_lib.create_state({'student': lora, 'proj': {}}, spec.tx, 0, frozen=base)
  got = step_lib.eval_step(step_lib.eval_params(state, spec), tp, batch, spec)
  merged = {'student': _merged_by_hand(lora, base), 'proj': {}}
  want = step_lib.eval_step(merged, tp, batch, plain_spec)
  np.testing.assert_allclose(got['ce'][0], want['ce'][0], rtol=1e-5)


def test_config_errors_say_what_to_do(shakespeare_config):
  student = build.build_model(dict(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                                   intermediate_size=32), V)
  c = shakespeare_config('lora:tiny')
  c.peft.method = 'qlora'
  with pytest.raises(config_check.ConfigError, match=r"peft.method='qlora'; valid"):
    config_check.check_peft(c, student)
  c = shakespeare_config('lora:tiny')
  c.peft.target = 'attn'
  with pytest.raises(config_check.ConfigError, match=r'matches no projection.*layers_0/attn/'):
    config_check.check_peft(c, student)
  c = shakespeare_config('gkd:tiny,fraction=0.5')
  c.peft.method = 'lora'  # a LoRA student (configs/shakespeare/lora.py's settings)
  c.student_init.source = 'teacher'
  c.optimizer.weight_decay = 0.0
  config_check.check_peft(c, student)  # on-policy LoRA students sample through their adapters


def test_lora_dropout_masks_the_adapters_input_in_training_only():
  """y = x W + dropout(x) A B s, checked on one projection where W = 0 and A = B = I, so that
  y / s is dropout(x) itself: each entry 0 or x / (1 - p), about a fraction p of them zero; the
  evaluation model (train=False) has no dropout."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  class Proj(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(64, use_bias=False, name='x_proj')(x)

  cfg = peft.LoraConfig(target='x_proj', rank=64, alpha=128.0, dropout=0.25)  # scale 2
  x = jax.random.normal(jax.random.key(0), (16, 64)) + 3.0  # away from 0
  variables = {'params': {'x_proj': {'kernel': jnp.zeros((64, 64)), 'kernel_lora_a': jnp.eye(64),
                                     'kernel_lora_b': jnp.eye(64)}}}
  train = peft.lora_model(Proj(), cfg, train=True)
  y = np.asarray(train.apply(variables, x, rngs={'dropout': jax.random.key(1)})) / 2.0
  kept = y != 0
  np.testing.assert_allclose(y[kept], np.asarray(x)[kept] / 0.75, rtol=1e-5)
  assert 0.2 < 1 - kept.mean() < 0.3
  again = np.asarray(train.apply(variables, x, rngs={'dropout': jax.random.key(2)})) / 2.0
  assert not np.array_equal(again != 0, kept)  # a new key, a new mask
  np.testing.assert_allclose(peft.lora_model(Proj(), cfg).apply(variables, x), 2.0 * x,
                             rtol=1e-6)
  with pytest.raises(ValueError, match='dropout'):
    peft.LoraConfig(target='x', rank=1, alpha=1.0, dropout=1.0)


def test_lora_dropout_step_draws_per_step_and_evaluates_without_it(shakespeare_config):
  from kd.train import compress  # pylint: disable=g-import-not-at-top
  config = _config('sgd')
  _, plain_spec, tp, base, lora, batch = _setup(config)
  config.peft = {'method': 'lora', 'target': LORA.target, 'rank': LORA.rank,
                 'alpha': LORA.alpha, 'dropout': 0.3}
  spec = dataclasses.replace(plain_spec, **compress.students(compress.read(config),
                                                              plain_spec.student))
  assert spec.student_rngs == ('dropout',) and spec.student_eval is not None
  no_dropout = dataclasses.replace(plain_spec, **compress.students(
      compress.read(ml_collections.ConfigDict(
          dict(config.to_dict(), peft=dict(config.peft, dropout=0.0)))),
      plain_spec.student))
  state = step_lib.create_state({'student': lora, 'proj': {}}, spec.tx, 0, frozen=base)
  step = jax.jit(functools.partial(step_lib.train_step, spec=spec))
  loss = lambda st, sp=step: float(sp(jax.tree.map(jnp.array, st), tp, batch)[1]['loss'])
  plain = loss(state, jax.jit(functools.partial(step_lib.train_step, spec=no_dropout)))
  first = loss(state)
  assert first == loss(state)  # the key is a function of (state.rng, step): reproducible
  assert first != plain and first != loss(state.replace(step=jnp.asarray(1, jnp.int32)))
  # Accumulated micro-batches draw their own masks and still run.
  accum = dataclasses.replace(spec, accum_steps=2)
  assert np.isfinite(loss(state, jax.jit(functools.partial(step_lib.train_step, spec=accum))))
  # Evaluation is deterministic: the adapters without dropout.
  eval_params = step_lib.eval_params(state, spec)
  got = step_lib.eval_step(eval_params, tp, batch, spec)
  want = step_lib.eval_step(eval_params, tp, batch, no_dropout)
  jax.tree.map(np.testing.assert_array_equal, got, want)


def test_ema_self_distillation_of_a_lora_student_averages_its_adapters():
  """The EMA teacher of a LoRA student is its adapters' average on the frozen base: the step
  equals the plain KD step from the merged EMA model, and only the adapters are averaged."""
  config = _config('sgd')
  spec, plain_spec, _, base, lora, batch = _setup(config)
  ema_spec = dataclasses.replace(spec, teacher=spec.student, ema_decay=0.9)
  ema = jax.tree.map(lambda x: x + 0.05, lora)  # a teacher unlike the student
  state = step_lib.create_state({'student': lora, 'proj': {}}, spec.tx, 0, frozen=base, ema=ema)
  new, m = jax.jit(functools.partial(step_lib.train_step, spec=ema_spec))(state, None, batch)
  teacher = _merged_by_hand(ema, base)  # plain weights: base + scale A B, by hand
  ref_spec = dataclasses.replace(spec, teacher=plain_spec.student)
  ref, m_ref = step_lib.train_step(
      step_lib.create_state({'student': lora, 'proj': {}}, spec.tx, 0, frozen=base), teacher,
      batch, ref_spec)
  np.testing.assert_allclose(m['loss'], m_ref['loss'], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               new.params, ref.params)
  want = jax.tree.map(lambda e, p: 0.9 * np.asarray(e) + 0.1 * np.asarray(p), ema,
                      new.params['student'])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), new.ema,
               want)


def test_lora_run_trains_adapters_only_checkpoints_them_and_restores(shakespeare_config,
                                                                     tmp_path):
  config = shakespeare_config('lora:tiny')
  config.peft.dropout = 0.1  # (training only: the restored run below evaluates alike)
  config.teacher.quant.bits = 8  # an int8 teacher (on qwix's int matmuls) teaches the adapters
  config.self_distill.ema_decay = 0.9  # and a second stage distils them from their own EMA
  config.baseline = False
  results = run.main(config, str(tmp_path))
  r = results['student_kd']
  assert 0 < r['trainable_params'] < r['params']
  assert results['student_ema_self']['trainable_params'] == r['trainable_params']
  assert np.isfinite(results['student_ema_self']['perplexity'])
  # The checkpoint holds the adapters and their optimizer state, not the base.
  ckpt = tmp_path / 'student_kd' / 'checkpoints'
  last = max(int(d) for d in os.listdir(ckpt) if d.isdigit())
  saved = ocp.StandardCheckpointer().restore(ckpt / str(last) / 'state')
  leaves = flax.traverse_util.flatten_dict(saved['params']['student'])
  assert leaves and all(peft.is_lora(k) for k in leaves)
  assert saved.get('frozen') is None
  # A second run of the finished workdir restores the adapters onto the same base.
  again = run.main(config, str(tmp_path))
  drop_time = lambda d: json.dumps({k: v for k, v in d.items() if k != 'wall_s'}, sort_keys=True)
  assert drop_time(again['student_kd']) == drop_time(r)


@pytest.mark.parametrize('method', ['adapter', 'prefix', 'prompt'])
def test_adapter_prefix_prompt_steps_are_sgd_on_the_full_models_gradient(method):
  config = _config('sgd')
  _, plain_spec, tp, base, _, batch = _setup(config)
  cfg, full = peft.adapters.add_peft_params(plain_spec.student.config, base, method, 4,
                                            jax.random.key(5))
  if method == 'adapter':  # `up` starts at zero; make it non-zero so that `down` learns too
    full = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.1 if 'up' in jax.tree_util.keystr(p) else x, full)
  student = run.models.Decoder(cfg)
  spec = build.make_spec(config, student, plain_spec.teacher, dict(config.losses), 10)
  trainable, frozen = peft.adapters.split(method, full)
  state = step_lib.create_state({'student': trainable, 'proj': {}}, spec.tx, 0, frozen=frozen)
  new, _ = jax.jit(functools.partial(step_lib.train_step, spec=spec))(state, tp, batch)

  def loss_of_full(variables):  # the plain objective of the whole model
    params = {'student': variables, 'proj': {}}
    t_out = step_lib.teacher_forward(spec, tp, batch)
    terms = step_lib.loss_terms(params, tp, t_out, batch, spec, 0)
    return sum(spec.weights[n](0) * s / c for n, (s, c) in terms.items())

  grads = jax.jit(jax.grad(loss_of_full))(full)
  want = {k: v - 0.1 * flax.traverse_util.flatten_dict(grads)[k]
          for k, v in flax.traverse_util.flatten_dict(trainable).items()}
  got = flax.traverse_util.flatten_dict(new.params['student'])
  assert set(got) == set(want) and all(method in '/'.join(k) for k in got)
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-6)
  assert any(np.abs(got[k] - flax.traverse_util.flatten_dict(trainable)[k]).max() > 0
             for k in got)


def test_prompt_tuned_run_trains_only_the_prompt(shakespeare_config, tmp_path):
  config = shakespeare_config('adapters:tiny,method=prompt')
  config.baseline = False
  results = run.main(config, str(tmp_path))
  assert results['student_kd']['trainable_params'] == 8 * config.student.hidden_size
