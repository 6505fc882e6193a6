"""The fused LM head + KD loss kernel (kd.losses.fused_head) against full logits and autodiff."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd.losses import ce_sum, kl_sum
from kd.losses import fused_head

D, E, V = 16, 24, 300
BLOCKS = dict(block_rows=16, block_vocab=128)


def _inputs(tokens, vocab, dtype, teacher_width=V, seed=0):
  """Random heads whose columns past `vocab` hold values that would dominate any softmax."""
  k = jax.random.split(jax.random.PRNGKey(seed), 6)
  h_s = jax.random.normal(k[0], tokens + (D,))
  h_t = jax.random.normal(k[1], tokens + (E,))
  w_s = 0.5 * jax.random.normal(k[2], (D, V))
  w_t = 0.5 * jax.random.normal(k[3], (E, teacher_width))
  w_s, w_t = w_s.at[:, vocab:].set(40.0), w_t.at[:, vocab:].set(-40.0)
  labels = jax.random.randint(k[4], tokens, 0, vocab)
  mask = jax.random.bernoulli(k[5], 0.7, tokens)
  assert 0 < int(mask.sum()) < mask.size
  cast = lambda x: x.astype(dtype)
  return cast(h_s), cast(w_s), cast(h_t), cast(w_t), labels, mask


def _reference(coeffs, h_s, w_s, h_t, w_t, labels, mask, temperature, vocab):
  """({name: (sum, count)}, (d/dh_s, d/dw_s) of Σ coeff·sum) from full float32 logits."""
  f32 = lambda x: None if x is None else jnp.asarray(x, jnp.float32)
  h_t, w_t = f32(h_t), f32(w_t)

  def objective(h_s, w_s):
    hi = jax.lax.Precision.HIGHEST
    logits = jnp.einsum('...d,dv->...v', h_s, w_s, precision=hi)[..., :vocab]
    out = {}
    if 'kl' in coeffs:
      teacher = jnp.einsum('...e,ev->...v', h_t, w_t, precision=hi)[..., :vocab]
      out['kl'] = kl_sum(logits, teacher, mask=mask, temperature=temperature)
    if 'ce' in coeffs:
      out['ce'] = ce_sum(logits, labels, mask=mask)
    return sum(coeffs[n] * s for n, (s, _) in out.items()), out

  grads, out = jax.grad(objective, argnums=(0, 1), has_aux=True)(f32(h_s), f32(w_s))
  return out, grads


def _check_close(got, want, rtol):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())


@pytest.mark.parametrize('coeffs,vocab,tokens', [
    ({'kl': 0.7}, 270, (40,)),             # kl only; the heads padded to whole tiles
    ({'ce': 1.3}, None, (37,)),            # ce only, no vocab tail, no teacher
    ({'kl': 0.5, 'ce': 2.0}, 250, (5, 8)),  # both; tail inside the last read tile
    ({'kl': 1.0, 'ce': 0.0}, 200, (40,)),  # a zero weight
])
def test_float32_matches_full_logits(coeffs, vocab, tokens):
  h_s, w_s, h_t, w_t, labels, mask = _inputs(tokens, vocab or V, jnp.float32)
  if 'kl' not in coeffs:
    h_t = w_t = None
  # Masked tokens may hold any label (an ignore index).
  kernel_labels = jnp.where(mask, labels, -100) if 'ce' in coeffs else None
  temperature = 2.5

  @jax.jit
  def run(h_s, w_s, h_t, w_t, temperature):
    def surrogate(h_s, w_s, h_t, w_t):
      out, sur = fused_head.fused_head_kd(h_s, w_s, h_t, w_t, kernel_labels, mask,
                                          temperature=temperature, coeffs=coeffs, vocab=vocab,
                                          **BLOCKS)
      return sur, (out, sur)
    return jax.grad(surrogate, argnums=(0, 1, 2, 3), has_aux=True)(h_s, w_s, h_t, w_t)

  grads, (out, sur) = run(h_s, w_s, h_t, w_t, temperature)
  want, (dh, dw) = _reference(coeffs, h_s, w_s, h_t, w_t, labels, mask, temperature, vocab or V)
  assert sorted(out) == sorted(coeffs)
  assert float(sur) == 0.0
  for name, (total, count) in want.items():
    _check_close(out[name][0], total, 1e-5)
    assert float(out[name][1]) == float(count) == float(mask.sum())
  _check_close(grads[0], dh, 1e-5)
  _check_close(grads[1], dw, 1e-5)
  assert grads[0].shape == h_s.shape and grads[1].shape == w_s.shape
  assert not np.any(np.asarray(grads[1])[:, vocab or V:])  # the tail gets no gradient
  if h_t is not None:  # the teacher gets none either
    assert not np.any(np.asarray(grads[2])) and not np.any(np.asarray(grads[3]))


def test_bfloat16_losses_are_differentiable():
  """bfloat16 inputs against float32 logits of the same values; the teacher's head is wider."""
  vocab, temperature = 250, 0.8
  h_s, w_s, h_t, w_t, labels, mask = _inputs((40,), vocab, jnp.bfloat16, teacher_width=320)

  @jax.jit
  def run(h_s, w_s, temperature):
    def objective(h_s, w_s):
      out = fused_head.fused_head_losses(h_s, w_s, h_t, w_t, labels, mask,
                                         temperature=temperature, vocab=vocab, **BLOCKS)
      return 0.5 * out['kl'][0] + out['ce'][0], out
    return jax.grad(objective, argnums=(0, 1), has_aux=True)(h_s, w_s)

  (dh_s, dw_s), out = run(h_s, w_s, temperature)
  coeffs = {'kl': 0.5, 'ce': 1.0}
  want, (dh, dw) = _reference(coeffs, h_s, w_s, h_t, w_t, labels, mask, temperature, vocab)
  assert dh_s.dtype == dw_s.dtype == jnp.bfloat16
  for name, (total, _) in want.items():
    _check_close(out[name][0], total, 1e-3)  # float32 accumulation of exact products
  _check_close(dh_s, dh, 2e-2)
  _check_close(dw_s, dw, 2e-2)


@pytest.mark.parametrize('change,match', [
    (dict(coeffs={'kl': 1.0, 'jsd': 1.0}), r"supports the terms \['ce', 'kl'\].*jsd"),
    (dict(w_s=jnp.zeros((D + 1, V))), r'w_s \[D, V\]'),
    (dict(h_t=jnp.zeros((39, E))), r'h_t must be \[\.\.\., E\]'),
    (dict(vocab=V + 1), r'vocab must be an int in \[1, 300\]'),
    (dict(w_t=jnp.zeros((E, V + 20))), r'pass vocab=\.\.\.'),
    (dict(labels=None), r"'ce' term needs labels"),
    (dict(mask=jnp.ones((39,), bool)), r'mask shape'),
    (dict(block_vocab=100), r'multiple of 128'),
])
def test_bad_input_raises_before_compiling(monkeypatch, change, match):
  def no_kernel(*args, **kwargs):
    raise AssertionError('a kernel was built before the arguments were checked')
  monkeypatch.setattr(fused_head.pl, 'pallas_call', no_kernel)
  h_s, w_s, h_t, w_t, labels, mask = _inputs((40,), V, jnp.float32)
  kw = dict(h_s=h_s, w_s=w_s, h_t=h_t, w_t=w_t, labels=labels, mask=mask, temperature=1.0,
            coeffs={'kl': 1.0, 'ce': 1.0}, **BLOCKS)
  kw.update(change)
  with pytest.raises(ValueError, match=match):
    fused_head.fused_head_kd(**kw)


# ------------------------------------------------------------------- in the train step, by config


def _step_config(kernel, accum=1):
  import ml_collections  # pylint: disable=g-import-not-at-top
  return ml_collections.ConfigDict(dict(
      losses={'ce': 0.5, 'kl': 0.5}, loss_kwargs={}, temperature=2.0, chunk_size=0,
      logit_kernel=kernel, features={'layer_map': 'uniform', 'pairs': ()},
      optimizer={'name': 'adamw', 'lr': 1e-2, 'warmup_steps': 0, 'schedule': 'constant'},
      train={'accum_steps': accum}))


@pytest.mark.parametrize('accum,tie,teacher_vocab', [(1, False, 61), (2, True, 64)])
def test_the_pallas_step_equals_the_logits_step(accum, tie, teacher_vocab):
  """config.logit_kernel='pallas' trains exactly as the plain logits step: the same loss and the
  same update (ragged loss mask, a tied student head, a padded teacher vocabulary)."""
  from kd import models  # pylint: disable=g-import-not-at-top
  from kd.train import build  # pylint: disable=g-import-not-at-top
  from kd.train import step as step_lib  # pylint: disable=g-import-not-at-top
  v, b, t = 61, 4, 12
  teacher = build.build_model(dict(hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                                   intermediate_size=64), teacher_vocab)
  student = build.build_model(dict(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                                   intermediate_size=32, tie_embeddings=tie), v)
  tp = models.init_params(teacher.config, jax.random.key(1))
  specs = [build.make_spec(_step_config(k, accum), student, teacher, {'ce': .5, 'kl': .5}, 10)
           for k in ('xla', 'pallas')]
  assert specs[1].logit_kernel == 'pallas' and specs[1].vocab == v
  state = step_lib.create_state(build.init_student(specs[0], 0), specs[0].tx, 0)
  rng = np.random.default_rng(0)
  ids = rng.integers(0, v, (b, t + 1)).astype(np.int32)
  mask = (np.arange(t)[None] < rng.integers(3, t + 1, (b, 1))).astype(np.float32)
  batch = {'input_ids': ids[:, :-1], 'labels': ids[:, 1:], 'loss_mask': mask}
  (s1, m1), (s2, m2) = [step_lib.train_step(state, tp, batch, s) for s in specs]
  np.testing.assert_allclose(m1['loss'], m2['loss'], rtol=1e-5)
  for n in ('ce', 'kl'):  # sums over 30-odd tokens of terms near 1e-2 (kl) and 4 (ce)
    np.testing.assert_allclose(m1['terms'][n], m2['terms'][n], rtol=1e-5, atol=2e-5)
  # One AdamW step at lr 1e-2: a wrong gradient moves a parameter by about 1e-2.
  jax.tree.map(lambda a, c: np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-5),
               s1.params, s2.params)


@pytest.mark.parametrize('key,value,message', [
    ('logit_kernel', 'triton', "use one of \\('xla', 'pallas'\\)"),
    ('losses', {'ce': 0.5, 'jsd': 0.5}, "among \\('ce', 'kl'\\) only"),
    ('teacher.cache', '/some/cache', 'teacher.cache'),
    ('loss_kwargs', {'ce': {'label_smoothing': 0.1}}, 'no loss_kwargs'),
])
def test_a_config_the_kernel_cannot_run_is_refused(shakespeare_config, key, value, message):
  from kd.train import config_check  # pylint: disable=g-import-not-at-top
  config = shakespeare_config('distill:tiny')
  config.logit_kernel = 'pallas'
  with config.unlocked():
    target, name = config, key
    if '.' in key:
      head, name = key.split('.')
      target = config[head]
    target[name] = value
  with pytest.raises(config_check.ConfigError, match=message):
    config_check.check(config)
