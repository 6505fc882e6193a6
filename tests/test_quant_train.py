"""Quantized students in training: QAT (fake quantization, straight-through) and QLoRA (LoRA on
an RTN-quantized frozen base), each against an independent computation of its update."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd import quant
from kd.data import lm_data
from kd.train import build
from kd.train import compress
from kd.train import config_check
from kd.train import run
from kd.train import step as step_lib
from kd.train import student_weights

from test_peft_train import _config, _merged_by_hand, _setup

QCFG = quant.QuantConfig(target=r'.*_proj', bits=4, group_size=8)


def test_fake_quant_forward_is_the_exported_model_and_backward_is_the_identity():
  w = jax.random.normal(jax.random.key(0), (16, 24)) * jnp.linspace(0.1, 3.0, 24)
  got = quant.qat.fake_quant_kernel(w, 4, 8)
  exported = quant.dequantize_kernel(quant.quantize_kernel(np.asarray(w), 4, 8))
  np.testing.assert_array_equal(np.asarray(got), np.asarray(exported))
  # By hand: one group of 8 rows, one column.
  col = np.asarray(w)[:8, 3]
  scale = np.float32(np.float16(np.abs(col).max() / 7))
  np.testing.assert_allclose(np.asarray(got)[:8, 3], np.clip(np.round(col / scale), -7, 7) * scale,
                             rtol=1e-6)
  r = jax.random.normal(jax.random.key(1), w.shape)
  g = jax.grad(lambda x: jnp.sum(quant.qat.fake_quant_kernel(x, 4, 8) * r))(w)
  np.testing.assert_array_equal(np.asarray(g), np.asarray(r))


def test_qat_step_is_sgd_with_the_gradient_taken_at_the_quantized_weights():
  config = _config('sgd')
  _, plain_spec, tp, base, _, batch = _setup(config)
  spec = dataclasses.replace(plain_spec, student_weights=student_weights.FakeQuant(QCFG))
  state = step_lib.create_state({'student': base, 'proj': {}}, spec.tx, 0)
  new, metrics = jax.jit(functools.partial(step_lib.train_step, spec=spec))(state, tp, batch)
  w_q = quant.dequantize(quant.quantize_params(base, QCFG))  # what the student computes with

  def loss_at(student):
    params = {'student': student, 'proj': {}}
    t_out = step_lib.teacher_forward(plain_spec, tp, batch)
    terms = step_lib.loss_terms(params, tp, t_out, batch, plain_spec, 0)
    return sum(plain_spec.weights[n](0) * s / c for n, (s, c) in terms.items())

  loss, grads = jax.jit(jax.value_and_grad(loss_at))(w_q)
  np.testing.assert_allclose(metrics['loss'], loss, rtol=1e-5)
  expected = jax.tree.map(lambda p, g: p - 0.1 * g, base, grads)  # float master weights move
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               new.params['student'], expected)


@pytest.mark.parametrize('embed_bits', [None, 8])
def test_qlora_step_trains_adapters_on_the_dequantized_base(embed_bits):
  config = _config('sgd')
  spec, plain_spec, tp, base, lora, batch = _setup(config)
  qbase = quant.quantize_params(base, dataclasses.replace(QCFG, embed_bits=embed_bits))
  assert ('embed' in qbase.kernels) == bool(embed_bits)
  state = step_lib.create_state({'student': lora, 'proj': {}}, spec.tx, 0, frozen=qbase)
  new, _ = jax.jit(functools.partial(step_lib.train_step, spec=spec))(state, tp, batch)
  w_q = quant.dequantize(qbase)

  def reference_loss(adapters):
    params = {'student': _merged_by_hand(adapters, w_q), 'proj': {}}
    t_out = step_lib.teacher_forward(plain_spec, tp, batch)
    terms = step_lib.loss_terms(params, tp, t_out, batch, plain_spec, 0)
    return sum(plain_spec.weights[n](0) * s / c for n, (s, c) in terms.items())

  grads = jax.jit(jax.grad(reference_loss))(lora)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               new.params['student'], jax.tree.map(lambda p, g: p - 0.1 * g, lora, grads))
  assert all(x.dtype == np.int8 for x in jax.tree.leaves(
      {p: k.values for p, k in new.frozen.kernels.items()}))


def test_quant_config_errors_say_what_to_do(shakespeare_config):
  student = build.build_model(dict(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                                   intermediate_size=32), 61)
  with pytest.raises(config_check.ConfigError, match="use quant.method='qlora'"):
    c = shakespeare_config('lora:tiny')
    c.quant.update(method='qat', bits=4, group_size=8)
    config_check.check_quant(c, student)
  c = shakespeare_config('qat:tiny,bits=4')
  c.peft.method = 'none'
  c.quant.method = 'qlora'
  with pytest.raises(config_check.ConfigError, match="set config.peft.method='lora'"):
    config_check.check_quant(c, student)
  c = shakespeare_config('qat:tiny,bits=8')
  c.quant.group_size = 12
  with pytest.raises(config_check.ConfigError, match='group_size=12 does not divide'):
    config_check.check_quant(c, student)
  c.quant.update(group_size=0, bits=3)
  with pytest.raises(config_check.ConfigError, match=r'bits must be one of \[4, 8\]'):
    config_check.check_quant(c, student)


@pytest.mark.parametrize('embed_bits', [0, 8])
def test_qat_run_saves_a_student_on_the_4_bit_grid(shakespeare_config, tmp_path, embed_bits):
  config = shakespeare_config('qat:tiny,bits=4')
  config.quant.embed_bits = embed_bits  # 8: the embedding table on the int8 per-row grid too
  config.baseline = False
  params, _ = run.run_stage(config, lm_data.LMData(config, str(tmp_path)), str(tmp_path / 's'),
                            build.build_model(config.student, 300), None, None, {'ce': 1.0},
                            steps=2, seed=0, name='s')
  qcfg = compress.read(config).qat
  again = quant.dequantize(quant.quantize_params(params, qcfg))  # the grid is a fixed point
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), params, again)
  q = quant.quantize_params(params, qcfg)
  assert all(np.abs(k.values).max() <= 7 for k in q.kernels.values() if k.leaf == 'kernel')
  assert ('embed' in q.kernels) == bool(embed_bits)


def test_a_quantized_teacher_teaches_as_its_dequantized_weights():
  """config.teacher.quant: the KD step with the teacher on qwix's int matmuls equals the step
  with the teacher's RTN-dequantized float weights; the teacher's params hold int8 values."""
  config = _config('sgd')
  config.teacher = {'quant': {'bits': 8, 'group_size': 0, 'target': r'.*_proj|lm_head'}}
  _, plain_spec, tp, base, _, batch = _setup(config)
  teacher, qparams = compress.quantized_teacher(compress.read(config), plain_spec.teacher, tp)
  leaf = qparams['params']['layers_0']['attn']['q_proj']['kernel'].array
  assert leaf.qvalue.dtype == jnp.int8
  spec = dataclasses.replace(plain_spec, teacher=teacher)
  state = step_lib.create_state({'student': base, 'proj': {}}, spec.tx, 0)
  step = lambda sp, t: jax.jit(functools.partial(step_lib.train_step, spec=sp))(
      jax.tree.map(jnp.array, state), t, batch)
  qcfg = quant.QuantConfig(target=r'.*_proj|lm_head', bits=8, group_size=None)
  new, m = step(spec, qparams)
  ref, m_ref = step(plain_spec, quant.dequantize(quant.quantize_params(tp, qcfg)))
  _, m_float = step(plain_spec, tp)
  np.testing.assert_allclose(m['loss'], m_ref['loss'], rtol=1e-5)
  assert m['loss'] != m_float['loss']  # the rounding is there
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               new.params, ref.params)
  # W8A8 (act_bits=8): the projections' inputs rounded per token too; a nearby, different KL.
  config.teacher.quant['act_bits'] = 8
  w8a8, w8a8_params = compress.quantized_teacher(compress.read(config), plain_spec.teacher, tp)
  _, m_act = step(dataclasses.replace(plain_spec, teacher=w8a8), w8a8_params)
  kl_act, kl = m_act['terms']['kl'][0], m['terms']['kl'][0]  # (the CE term is the same)
  assert kl_act != kl
  np.testing.assert_allclose(kl_act, kl, rtol=1e-2)


@pytest.mark.parametrize('edit,message', [
    (lambda c: c.teacher.quant.update(bits=3), 'config.teacher.quant'),
    (lambda c: c.teacher.update(count=2), 'teacher.count=1'),
    (lambda c: c.teacher.quant.update(target='nothing'), 'matches no kernel'),
    (lambda c: c.teacher.quant.update(act_bits=4), r'act_bits=4: use 8'),
    (lambda c: c.teacher.quant.update(act_bits=8, bits=4), 'needs teacher.quant.bits=8'),
])
def test_teacher_quant_config_errors(edit, message, shakespeare_config):
  config = shakespeare_config('distill:tiny')
  config.teacher.quant.bits = 8
  student = build.build_model(config.student, 61)
  teacher = build.build_model(config.teacher.model, 61)
  config_check.check_models(config, student, teacher)  # fine before the edit
  edit(config)
  with pytest.raises(config_check.ConfigError, match=message):
    config_check.check(config)
    config_check.check_models(config, student, teacher)
