"""Tests for kd.losses.logits and the kd.losses registry, against independent numpy math."""

import dataclasses
import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kd.losses as L
from kd.losses import chunked
from kd.losses import closed_form
from kd.losses import logits as LG

NAMES = ['kl', 'reverse_kl', 'jsd', 'tvd', 'skew_kl', 'skew_reverse_kl']

# (name, kwargs) cases, including the boundary weights 0 and 1.
CASES = ([('kl', {}), ('reverse_kl', {}), ('tvd', {})]
         + [('jsd', {'beta': b}) for b in (0.5, 0.1, 0.9, 0.0, 1.0)]
         + [('skew_kl', {'alpha': a}) for a in (0.1, 0.5, 0.0, 1.0)]
         + [('skew_reverse_kl', {'alpha': a}) for a in (0.1, 0.5, 0.0, 1.0)])


# ----------------------------------------------------------------------------- numpy reference


def np_softmax(z, temperature):
  z = np.asarray(z, np.float64) / temperature
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def np_kl(p, q):
  with np.errstate(divide='ignore', invalid='ignore'):
    return np.where(p > 0, p * np.log(p / q), 0.0).sum(-1)


def np_per_token(name, s, t, temperature, kw):
  ps, pt = np_softmax(s, temperature), np_softmax(t, temperature)
  if name == 'kl':
    d = np_kl(pt, ps)
  elif name == 'reverse_kl':
    d = np_kl(ps, pt)
  elif name == 'jsd':
    b = kw.get('beta', 0.5)
    m = b * pt + (1 - b) * ps
    d = b * np_kl(pt, m) + (1 - b) * np_kl(ps, m)
  elif name == 'tvd':
    d = 0.5 * np.abs(pt - ps).sum(-1)
  elif name == 'skew_kl':
    a = kw.get('alpha', 0.1)
    d = np_kl(pt, a * pt + (1 - a) * ps)
  elif name == 'skew_reverse_kl':
    a = kw.get('alpha', 0.1)
    d = np_kl(ps, a * ps + (1 - a) * pt)
  return temperature ** 2 * d


def np_sum_count(per_token, mask):
  mask = np.ones(per_token.shape, bool) if mask is None else np.asarray(mask, bool)
  return float((per_token * mask).sum()), float(mask.sum())


def random_logits(seed, shape, scale=2.0):
  rng = np.random.default_rng(seed)
  s = rng.normal(size=shape).astype(np.float32) * scale
  t = rng.normal(size=shape).astype(np.float32) * scale
  mask = rng.random(shape[:-1]) < 0.7
  mask.flat[0] = True
  return s, t, mask


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize('shape', [(2, 3, 11), (6, 11)])
@pytest.mark.parametrize('temperature', [0.5, 1.0, 2.0, 4.0])
@pytest.mark.parametrize('name,kw', CASES)
def test_divergence_matches_numpy(name, kw, temperature, shape):
  s, t, mask = random_logits(zlib.crc32(repr((name, kw, temperature, shape)).encode()), shape)
  want_sum, want_count = np_sum_count(np_per_token(name, s, t, temperature, kw), mask)
  got_sum, got_count = L.LOGIT_LOSSES[name](s, t, mask=mask, temperature=temperature, **kw)
  assert got_sum.dtype == jnp.float32 and got_count.dtype == jnp.float32
  np.testing.assert_allclose(got_sum, want_sum, rtol=1e-5, atol=1e-5)
  assert float(got_count) == want_count
  got_mean = getattr(L, name)(s, t, mask=mask, temperature=temperature, **kw)
  np.testing.assert_allclose(got_mean, want_sum / want_count, rtol=1e-5, atol=1e-6)
  per_token = getattr(LG, f'{name}_per_token')(s, t, temperature=temperature, **kw)
  np.testing.assert_allclose(per_token, np_per_token(name, s, t, temperature, kw),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name', NAMES)
def test_no_mask_counts_all_tokens(name):
  s, t, _ = random_logits(1, (3, 4, 9))
  got_sum, got_count = L.LOGIT_LOSSES[name](s, t)
  assert float(got_count) == 12.0
  np.testing.assert_allclose(got_sum, np_per_token(name, s, t, 1.0, {}).sum(), rtol=1e-5)


def test_hand_computed_two_token_vocab():
  # p_T = softmax([0, 0]) = [1/2, 1/2]; p_S = softmax([ln 3, 0]) = [3/4, 1/4].
  s = np.array([[math.log(3.0), 0.0]], np.float32)
  t = np.array([[0.0, 0.0]], np.float32)
  want = {
      'kl': 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25),  # = ½ ln(4/3)
      'reverse_kl': 0.75 * math.log(1.5) + 0.25 * math.log(0.5),
      'tvd': 0.5 * (0.25 + 0.25),
      # M = [5/8, 3/8]
      'jsd': 0.5 * (0.5 * math.log(0.8) + 0.5 * math.log(4 / 3))
             + 0.5 * (0.75 * math.log(1.2) + 0.25 * math.log(2 / 3)),
      # α = 1/2: the mixture is M again
      'skew_kl': 0.5 * math.log(0.8) + 0.5 * math.log(4 / 3),
      'skew_reverse_kl': 0.75 * math.log(1.2) + 0.25 * math.log(2 / 3),
  }
  kw = {'skew_kl': {'alpha': 0.5}, 'skew_reverse_kl': {'alpha': 0.5}}
  for name, value in want.items():
    np.testing.assert_allclose(getattr(L, name)(s, t, **kw.get(name, {})), value, rtol=1e-6)
    # Doubling the logits at T=2 leaves the probabilities unchanged; only the T² = 4 factor remains.
    np.testing.assert_allclose(
        getattr(L, name)(2 * s, 2 * t, temperature=2.0, **kw.get(name, {})), 4 * value,
        rtol=1e-6)


# ----------------------------------------------------------------------------- dtypes, edge cases


@pytest.mark.parametrize('name', NAMES)
def test_bf16_inputs(name):
  s, t, mask = random_logits(2, (2, 5, 33))
  sb, tb = jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16)
  got = getattr(L, name)(sb, tb, mask=mask, temperature=2.0)
  assert got.dtype == jnp.float32
  # Math is float32 on the upcast values: identical to feeding those values in float32 ...
  same = getattr(L, name)(sb.astype(jnp.float32), tb.astype(jnp.float32), mask=mask,
                          temperature=2.0)
  np.testing.assert_allclose(got, same, rtol=1e-6)
  # ... and close to the unrounded float32 loss (bf16 keeps ~3 significant digits).
  np.testing.assert_allclose(got, getattr(L, name)(s, t, mask=mask, temperature=2.0), rtol=5e-2)


@pytest.mark.parametrize('name,kw', CASES)
def test_shared_neg_inf_vocab_is_finite(name, kw):
  s, t, mask = random_logits(3, (2, 4, 10))
  vocab_off = np.zeros(10, bool)
  vocab_off[[2, 7, 9]] = True
  s_inf = np.where(vocab_off, -np.inf, s).astype(np.float32)
  t_inf = np.where(vocab_off, -np.inf, t).astype(np.float32)
  fn = lambda a, b: getattr(L, name)(a, b, mask=mask, temperature=2.0, **kw)
  value, (gs, gt) = jax.value_and_grad(fn, argnums=(0, 1))(s_inf, t_inf)
  assert np.isfinite(value)
  assert np.all(np.isfinite(gs)) and np.all(np.isfinite(gt))
  assert np.all(gs[..., vocab_off] == 0)
  # Same as dropping those vocab entries altogether.
  np.testing.assert_allclose(value, fn(s[..., ~vocab_off], t[..., ~vocab_off]), rtol=1e-5,
                             atol=1e-7)


@pytest.mark.parametrize('name', NAMES)
def test_fully_masked_is_exact_zero_with_zero_grads(name):
  s, t, _ = random_logits(4, (2, 3, 8))
  s[..., 0] = -np.inf
  t[..., 0] = -np.inf
  mask = np.zeros((2, 3), bool)
  fn = lambda a, b: getattr(L, name)(a, b, mask=mask, temperature=2.0)
  value, (gs, gt) = jax.value_and_grad(fn, argnums=(0, 1))(s, t)
  assert float(value) == 0.0
  assert np.all(gs == 0) and np.all(gt == 0)
  assert float(L.LOGIT_LOSSES[name](s, t, mask=mask)[1]) == 0.0


def test_ce_fully_masked_is_zero():
  logits = np.random.default_rng(0).normal(size=(2, 3, 5)).astype(np.float32)
  value, g = jax.value_and_grad(L.ce)(logits, np.zeros((2, 3), np.int32),
                                      mask=np.zeros((2, 3), bool))
  assert float(value) == 0.0 and np.all(g == 0)


def test_temperature_squared_keeps_gradient_scale():
  # ∂[T²·KL(p_T‖p_S)]/∂z_S = T²·(1/T)·(p_S − p_T) = T·(p_S − p_T).
  # For |z|/T small, p ≈ (1 + (z − z̄)/T)/V, so p_S − p_T ≈ (Δ − Δ̄)/(T·V) with Δ = z_S − z_T,
  # and the gradient ≈ (Δ − Δ̄)/V does not depend on T: ‖g(T=4)‖/‖g(T=1)‖ ≈ 1 (within 2 since
  # T=1 is not fully linear). Without T² the gradient is (p_S − p_T)/T ≈ (Δ − Δ̄)/(T²·V):
  # the ratio would be ≈ 1/T² = 1/16.
  rng = np.random.default_rng(5)
  s = rng.normal(size=(8, 16)).astype(np.float32) * 0.5
  t = rng.normal(size=(8, 16)).astype(np.float32) * 0.5
  grad_norm = lambda fn, temp: float(jnp.linalg.norm(jax.grad(fn)(s, t, temp)))
  with_t2 = lambda a, b, temp: L.kl(a, b, temperature=temp)
  without_t2 = lambda a, b, temp: L.kl(a, b, temperature=temp) / temp ** 2
  ratio = grad_norm(with_t2, 4.0) / grad_norm(with_t2, 1.0)
  assert 0.5 < ratio < 2.0
  ratio_without = grad_norm(without_t2, 4.0) / grad_norm(without_t2, 1.0)
  assert 1 / 32 < ratio_without < 1 / 8


@pytest.mark.parametrize('name,kw,factor', [
    ('kl', {}, 1.0), ('reverse_kl', {}, 1.0), ('jsd', {'beta': 0.3}, 0.3 * 0.7),
    ('skew_kl', {'alpha': 0.2}, 0.8 ** 2), ('skew_reverse_kl', {'alpha': 0.2}, 0.8 ** 2)])
def test_high_temperature_limit_is_logit_matching(name, kw, factor):
  # Hinton et al.: KL ≈ ½Σ(p_T − p_S)²/p and p_T − p_S ≈ −(Δ − Δ̄)/(T·V), so
  # T²·KL → (1/2V)·Σ(Δ − Δ̄)². Mixtures scale the difference: JSD by β(1−β), skew by (1−α)².
  rng = np.random.default_rng(6)
  s = rng.normal(size=(5, 8)) * 3
  t = rng.normal(size=(5, 8)) * 3
  delta = s - t
  centered = delta - delta.mean(-1, keepdims=True)
  want = factor * (centered ** 2).sum(-1).mean() / (2 * 8)
  got = getattr(L, name)(s.astype(np.float32), t.astype(np.float32), temperature=100.0, **kw)
  np.testing.assert_allclose(got, want, rtol=0.05)


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize('temperature', [0.0, -1.0])
def test_bad_temperature_raises(name, temperature):
  s, t, _ = random_logits(7, (2, 5))
  with pytest.raises(ValueError, match='temperature'):
    getattr(L, name)(s, t, temperature=temperature)


def test_traced_temperature_is_allowed():
  s, t, _ = random_logits(8, (3, 7))
  jitted = jax.jit(lambda a, b, temp: L.kl(a, b, temperature=temp))
  np.testing.assert_allclose(jitted(s, t, 2.0), L.kl(s, t, temperature=2.0), rtol=1e-6)
  np.testing.assert_allclose(jitted(s, t, jnp.float32(3.0)), L.kl(s, t, temperature=3.0),
                             rtol=1e-6)


@pytest.mark.parametrize('name,kw', [('jsd', {'beta': -0.1}), ('jsd', {'beta': 1.5}),
                                     ('skew_kl', {'alpha': 2.0}),
                                     ('skew_reverse_kl', {'alpha': -1.0})])
def test_bad_weight_raises(name, kw):
  s, t, _ = random_logits(9, (2, 5))
  with pytest.raises(ValueError, match=list(kw)[0]):
    getattr(L, name)(s, t, **kw)


def test_traced_weight_matches_concrete():
  s, t, _ = random_logits(10, (3, 7))
  for alpha in (0.0, 0.3, 1.0):
    traced = jax.jit(lambda a, b, w: L.skew_kl(a, b, alpha=w))(s, t, alpha)
    np.testing.assert_allclose(traced, L.skew_kl(s, t, alpha=alpha), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('name', NAMES)
def test_vocab_mismatch_says_to_slice(name):
  s = np.zeros((2, 3, 10), np.float32)
  with pytest.raises(ValueError, match=r'slice.*\[\.\.\., :10\]'):
    getattr(L, name)(s, np.zeros((2, 3, 12), np.float32))
  with pytest.raises(ValueError, match='same shape') as err:
    getattr(L, name)(s, np.zeros((2, 4, 10), np.float32))
  assert 'slice' not in str(err.value)


def test_mask_shape_mismatch_raises():
  s, t, _ = random_logits(11, (2, 3, 5))
  with pytest.raises(ValueError, match='mask shape'):
    L.kl(s, t, mask=np.ones((2, 4), bool))


# ----------------------------------------------------------------------------- cross-entropy


def np_ce(logits, labels, eps):
  z = logits.astype(np.float64)
  logp = z - z.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  v = z.shape[-1]
  target = (1 - eps) * np.eye(v)[labels] + eps / v
  return -(target * logp).sum(-1)


@pytest.mark.parametrize('shape', [(2, 6, 13), (9, 13)])
@pytest.mark.parametrize('eps', [0.0, 0.1, 0.3])
def test_ce_matches_numpy(shape, eps):
  rng = np.random.default_rng(12)
  logits = (rng.normal(size=shape) * 3).astype(np.float32)
  labels = rng.integers(0, shape[-1], size=shape[:-1])
  mask = rng.random(shape[:-1]) < 0.6
  want_sum, want_count = np_sum_count(np_ce(logits, labels, eps), mask)
  got_sum, got_count = L.ce_sum(logits, labels, mask=mask, label_smoothing=eps,
                                temperature=3.0)  # ignored
  np.testing.assert_allclose(got_sum, want_sum, rtol=1e-5)
  assert float(got_count) == want_count
  np.testing.assert_allclose(L.ce(jnp.asarray(logits, jnp.bfloat16), labels, mask=mask,
                                  label_smoothing=eps), want_sum / want_count, rtol=2e-2)


def test_ce_validation():
  logits = np.zeros((2, 3, 5), np.float32)
  with pytest.raises(ValueError, match='labels shape'):
    L.ce(logits, np.zeros((2, 4), np.int32))
  with pytest.raises(ValueError, match='integer'):
    L.ce(logits, np.zeros((2, 3), np.float32))
  with pytest.raises(ValueError, match='label_smoothing'):
    L.ce(logits, np.zeros((2, 3), np.int32), label_smoothing=1.5)


# ----------------------------------------------------------------------------- chunked path

ALL_TERMS = {'kl': {}, 'reverse_kl': {'temperature': 1.5}, 'jsd': {'beta': 0.3}, 'tvd': {},
             'skew_kl': {'alpha': 0.2}, 'skew_reverse_kl': {'alpha': 0.4},
             'ce': {'label_smoothing': 0.1}}


def _chunk_setup(b=2, t=13, d=6, e=5, v=17, seed=13):
  rng = np.random.default_rng(seed)
  f32 = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  params = {'w': f32(d, v), 'b': f32(v) * 0.1}
  teacher_w = f32(e, v)
  hs, ht = f32(b, t, d), f32(b, t, e)
  labels = jnp.asarray(rng.integers(0, v, size=(b, t)))
  mask = jnp.asarray(rng.random((b, t)) < 0.7)
  return params, teacher_w, hs, ht, labels, mask


def _plain_terms(terms, hs, params, ht, teacher_w, labels, mask, temperature):
  s_logits = hs @ params['w'] + params['b']
  t_logits = ht @ teacher_w
  out = {}
  for name, kw in terms.items():
    if name == 'ce':
      out[name] = L.ce_sum(s_logits, labels, mask=mask, **kw)
    else:
      kw = {'temperature': temperature, **kw}
      out[name] = L.LOGIT_LOSSES[name](s_logits, t_logits, mask=mask, **kw)
  return out


def _chunked_terms(terms, hs, params, ht, teacher_w, labels, mask, temperature, chunk_size):
  return L.chunked_logit_losses(
      terms, hs, lambda h: h @ params['w'] + params['b'], ht, lambda h: h @ teacher_w,
      labels=labels, mask=mask, temperature=temperature, chunk_size=chunk_size)


@pytest.mark.parametrize('chunk_size,with_grads', [(4, True), (13, False), (32, False)])
def test_chunked_equals_plain(chunk_size, with_grads):
  # T = 13: chunk 4 gives three full chunks and a padded one, 13 one exact chunk, 32 one chunk
  # of 13 (to_chunks).
  params, teacher_w, hs, ht, labels, mask = _chunk_setup()
  args = (ht, teacher_w, labels, mask, 2.0)
  # Distinct weights per term, so a wrong gradient in one term shows in the combined gradient.
  coeffs = {name: 2.0 ** i for i, name in enumerate(ALL_TERMS)}

  def loss_and_terms(fn, *extra):
    def loss(h, p):
      out = fn(ALL_TERMS, h, p, *args, *extra)
      return sum(coeffs[k] * L.mean(v) for k, v in out.items()), out
    if with_grads:
      return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(hs, params)
    return (jax.jit(loss)(hs, params), None)

  (_, plain), grads_plain = loss_and_terms(_plain_terms)
  (_, chunked), grads_chunk = loss_and_terms(_chunked_terms, chunk_size)
  assert set(chunked) == set(ALL_TERMS)
  for name in ALL_TERMS:
    np.testing.assert_allclose(chunked[name][0], plain[name][0], rtol=1e-5, atol=1e-5)
    assert float(chunked[name][1]) == float(plain[name][1]) == float(mask.sum())
  for want, got in zip(jax.tree.leaves(grads_plain), jax.tree.leaves(grads_chunk)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  if with_grads:
    assert len(jax.tree.leaves(grads_chunk)) == 3  # hidden, w, b


@pytest.mark.parametrize('t,chunk_size,n,c', [(13, 4, 4, 4), (13, 6, 3, 5), (13, 13, 1, 13),
                                               (13, 32, 1, 13), (256, 1024, 1, 256),
                                               (256, 200, 2, 128), (1, 1, 1, 1)])
def test_chunks_are_equal_and_never_longer_than_needed(t, chunk_size, n, c):
  # ceil(T / chunk_size) chunks of ceil(T / n) positions: padding under n, none past T.
  x = jnp.arange(2 * t * 3, dtype=jnp.float32).reshape(2, t, 3)
  chunks = chunked.to_chunks(x, chunk_size)
  assert chunks.shape == (n, 2, c, 3)
  flat = np.moveaxis(np.asarray(chunks), 0, 1).reshape(2, n * c, 3)
  np.testing.assert_array_equal(flat[:, :t], x)
  np.testing.assert_array_equal(flat[:, t:], 0)
  edge = np.moveaxis(np.asarray(chunked.to_chunks(x, chunk_size, mode='edge')), 0, 1)
  np.testing.assert_array_equal(edge.reshape(2, n * c, 3)[:, t:],
                                np.broadcast_to(x[:, -1:], (2, n * c - t, 3)))
  np.testing.assert_array_equal(chunked.from_chunks(chunks, t), x)


KL_CE = {'kl': {'temperature': 3.0}, 'ce': {'label_smoothing': 0.1}}


@pytest.mark.parametrize('chunk_size,terms,closed_form', [
    (4, ALL_TERMS, False), (13, ALL_TERMS, False), (4, KL_CE, False),  # autodiff of the terms
    (4, ALL_TERMS, None), (13, ALL_TERMS, True), (4, KL_CE, True),  # closed form
    (13, {'kl': {}, 'ce': {}}, None), (5, {'kl': {}}, True), (5, {'ce': {}}, True)])
def test_fused_gradients_equal_plain(chunk_size, terms, closed_form):
  # The fused path's surrogate must carry the gradient of sum_i c_i * sum_i: compare with
  # autodiff of the plain [B, T, V] computation, every term weighted differently.
  params, teacher_w, hs, ht, labels, mask = _chunk_setup()
  coeffs = {name: 0.5 * 1.7 ** i for i, name in enumerate(terms)}

  def plain(h, p):
    out = _plain_terms(terms, h, p, ht, teacher_w, labels, mask, 2.0)
    return sum(coeffs[k] * s for k, (s, _) in out.items()), out

  def fused(h, p):
    out, surrogate = L.fused_logit_losses(
        terms, coeffs, h, p, lambda q, x: x @ q['w'] + q['b'], ht, lambda x: x @ teacher_w,
        labels=labels, mask=mask, temperature=2.0, chunk_size=chunk_size,
        closed_form=closed_form)
    return sum(coeffs[k] * s for k, (s, _) in out.items()) + surrogate, out

  (v_plain, plain_terms), g_plain = jax.jit(jax.value_and_grad(plain, (0, 1), has_aux=True))(
      hs, params)
  (v_fused, fused_terms), g_fused = jax.jit(jax.value_and_grad(fused, (0, 1), has_aux=True))(
      hs, params)
  np.testing.assert_allclose(v_fused, v_plain, rtol=1e-5)
  for name in terms:
    np.testing.assert_allclose(fused_terms[name][0], plain_terms[name][0], rtol=1e-5, atol=1e-5)
    assert float(fused_terms[name][1]) == float(mask.sum())
  assert float(np.abs(g_plain[0]).max()) > 0.01  # the check below is not vacuous
  for want, got in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_fused)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match='coeffs has no weight'):
    L.fused_logit_losses({'kl': {}}, {}, hs, params, lambda q, x: x @ q['w'], ht,
                         lambda x: x @ teacher_w, chunk_size=4)
  with pytest.raises(ValueError, match='closed_form=True covers'):
    L.fused_logit_losses({'kl': {'beta': 0.3}}, {'kl': 1.0}, hs, params, lambda q, x: x @ q['w'],
                         ht, lambda x: x @ teacher_w, chunk_size=4, closed_form=True)


def test_closed_form_matches_numpy_and_ignores_a_shared_neg_inf_vocab():
  # The closed form's values and logit gradient against float64 numpy (log-softmax by its
  # definition), on logits where three vocabulary entries are -inf for both models: those
  # entries add nothing and get a zero gradient.
  s, t, mask = random_logits(5, (2, 6, 12), scale=4.0)
  labels = np.random.default_rng(5).integers(0, 9, (2, 6))
  off = np.zeros(12, bool)
  off[[9, 10, 11]] = True  # labels are below 9
  s_inf, t_inf = (np.where(off, -np.inf, x).astype(np.float32) for x in (s, t))
  coeffs, temp = {'kl': 0.7, 'ce': 0.3}, 3.0
  out, grad = closed_form._terms_with_grad({'kl': {}, 'ce': {}}, coeffs, s_inf, t_inf, mask, labels, temp)

  def log_softmax(x):
    x = x.astype(np.float64)
    return x - x.max(-1, keepdims=True) - np.log(
        np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))
  sk, tk = s[..., ~off], t[..., ~off]
  ls, lt, l1 = log_softmax(sk / temp), log_softmax(tk / temp), log_softmax(sk)
  kl = temp ** 2 * (np.exp(lt) * (lt - ls)).sum(-1)
  nll = -np.take_along_axis(l1, labels[..., None], -1)[..., 0]
  np.testing.assert_allclose(out['kl'][0], (kl * mask).sum(), rtol=1e-5)
  np.testing.assert_allclose(out['ce'][0], (nll * mask).sum(), rtol=1e-5)
  onehot = np.eye(9)[labels]
  want = mask[..., None] * (coeffs['kl'] * temp * (np.exp(ls) - np.exp(lt))
                            + coeffs['ce'] * (np.exp(l1) - onehot))
  grad = np.asarray(grad)
  assert np.all(grad[..., off] == 0)
  np.testing.assert_allclose(grad[..., ~off], want, rtol=1e-5, atol=1e-6)
  assert np.abs(want).max() > 0.1  # not vacuous


@pytest.mark.parametrize('name,kw', CASES)
def test_every_divergence_closed_form_matches_numpy_finite_differences(name, kw):
  # Each divergence's closed-form value and student-logit gradient against float64 numpy: the
  # value by its definition (np_per_token), the gradient by central differences of it. Two
  # vocabulary entries are -inf for both models; they add nothing and get a zero gradient.
  s, t, mask = random_logits(11, (2, 3, 9), scale=2.0)
  off = np.zeros(9, bool)
  off[[2, 7]] = True
  s, t = (np.where(off, -np.inf, x).astype(np.float32) for x in (s, t))
  temp, coeff = 1.7, 0.6
  out, grad = closed_form._terms_with_grad({name: kw}, {name: coeff}, s, t, mask, None, temp)

  per_token = lambda s64: np_per_token(name, s64, t, temp, kw)  # [2, 3], float64
  np.testing.assert_allclose(out[name][0], (per_token(s) * mask).sum(), rtol=2e-5, atol=1e-6)
  assert float(out[name][1]) == mask.sum()
  want, step = np.zeros(s.shape), 1e-5
  for j in np.flatnonzero(~off):  # rows are independent: move entry j of every row at once
    up, down = s.astype(np.float64), s.astype(np.float64)
    up[..., j] += step
    down[..., j] -= step
    want[..., j] = coeff * mask * (per_token(up) - per_token(down)) / (2 * step)
  grad = np.asarray(grad)
  assert np.all(grad[..., off] == 0)
  np.testing.assert_allclose(grad, want, rtol=1e-4, atol=2e-6)
  if per_token(s).max() > 0:  # every case but the weights that make D identically 0
    assert np.abs(want).max() > 0.01  # not vacuous (atol is 2e-6)


def test_closed_form_keeps_fewer_logits_sized_arrays():
  """KL + CE in closed form: XLA's compiled temp bytes of the fused step fall (CPU, at a
  vocabulary large enough for [B, C, V] arrays to dominate)."""
  rng = np.random.default_rng(0)
  b, t, d, v = 2, 64, 16, 8192
  hs, ht = (jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32) for _ in range(2))
  params = {'w': jnp.asarray(rng.normal(size=(d, v)), jnp.float32)}
  labels = jnp.asarray(rng.integers(0, v, (b, t)))
  coeffs = {'kl': 0.5, 'ce': 0.5}

  def temp_bytes(closed_form):
    def loss(h, p):
      out, surrogate = L.fused_logit_losses(
          {'kl': {}, 'ce': {}}, coeffs, h, p, lambda q, x: x @ q['w'], ht,
          lambda x: x @ params['w'], labels=labels, temperature=2.0, chunk_size=32,
          closed_form=closed_form)
      return sum(coeffs[k] * s for k, (s, _) in out.items()) + surrogate
    compiled = jax.jit(jax.grad(loss, (0, 1))).lower(hs, params).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  logits_bytes = b * 32 * v * 4  # one [B, C, V] float32 array
  row_bytes = b * 32 * 4  # one [B, C] float32 row statistic (the closed form keeps a few)
  assert temp_bytes(False) - temp_bytes(True) >= logits_bytes - 4 * row_bytes


def test_chunked_no_mask_ce_only_and_errors():
  params, teacher_w, hs, ht, labels, _ = _chunk_setup()
  got = L.chunked_logit_losses({'ce': {}}, hs, lambda h: h @ params['w'] + params['b'], None,
                               None, labels=labels, chunk_size=5)
  want = L.ce_sum(hs @ params['w'] + params['b'], labels)
  np.testing.assert_allclose(got['ce'][0], want[0], rtol=1e-5)
  assert float(got['ce'][1]) == 26.0
  proj = lambda h: h @ params['w']
  with pytest.raises(ValueError, match='unknown logit loss'):
    L.chunked_logit_losses({'kll': {}}, hs, proj, ht, proj)
  with pytest.raises(ValueError, match='labels'):
    L.chunked_logit_losses({'ce': {}}, hs, proj, ht, proj)
  with pytest.raises(ValueError, match='teacher'):
    L.chunked_logit_losses({'kl': {}}, hs, proj, None, None)


def _avals(jaxpr):
  """Every intermediate abstract value in a (closed) jaxpr, sub-jaxprs (scan, remat) included."""
  jaxpr = getattr(jaxpr, 'jaxpr', jaxpr)
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      yield var.aval
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if hasattr(sub, 'eqns') or hasattr(getattr(sub, 'jaxpr', None), 'eqns'):
          yield from _avals(sub)


def test_chunked_never_materialises_full_logits():
  b, t, d, v = 2, 512, 32, 8192
  rng = np.random.default_rng(14)
  f32 = lambda *s: jnp.asarray(rng.normal(size=s) * 0.1, jnp.float32)
  hs, ht, w, tw = f32(b, t, d), f32(b, t, d), f32(d, v), f32(d, v)
  labels = jnp.zeros((b, t), jnp.int32)
  terms = {'kl': {}, 'ce': {}}

  # Everything is an argument: closed-over arrays would be constant-folded by XLA.
  def plain_loss(h, w, ht, tw, labels):
    s_logits = h @ w
    return L.mean(L.kl_sum(s_logits, ht @ tw)) + L.mean(L.ce_sum(s_logits, labels))

  def chunked_loss(h, w, ht, tw, labels):
    out = L.chunked_logit_losses(terms, h, lambda x: x @ w, ht, lambda x: x @ tw,
                                 labels=labels, chunk_size=128)
    return L.mean(out['kl']) + L.mean(out['ce'])

  full = b * t * v
  args = (hs, w, ht, tw, labels)
  grad_plain = jax.grad(plain_loss, argnums=(0, 1))
  grad_chunk = jax.grad(chunked_loss, argnums=(0, 1))
  assert max(a.size for a in _avals(jax.make_jaxpr(grad_plain)(*args))) >= full  # sanity
  assert max(a.size for a in _avals(jax.make_jaxpr(grad_chunk)(*args))) <= full // 4

  stats_plain = jax.jit(grad_plain).lower(*args).compile().memory_analysis()
  stats_chunk = jax.jit(grad_chunk).lower(*args).compile().memory_analysis()
  if stats_plain is not None and stats_chunk is not None:
    # Plain holds several [B, T, V] float32 buffers (32 MiB each; ~160 MiB on CPU); chunked
    # holds the same number of [B, C, V] ones, C/T = 1/4 of that.
    assert stats_chunk.temp_size_in_bytes < stats_plain.temp_size_in_bytes / 3


# ----------------------------------------------------------------------------- registry


def test_registry_kinds_and_means():
  kinds = {name: L.get(name).kind for name in L.LOSSES}
  assert kinds == {**{n: 'logits' for n in NAMES}, 'ce': 'ce', 'hidden_mse': 'hidden',
                   'hidden_cosine': 'hidden', 'attention_kl': 'attention',
                   'attention_mse': 'attention', 'minilm_relations': 'relation',
                   'embedding_mse': 'embedding', 'embedding_cosine': 'embedding',
                   'embedding_similarity': 'embedding', 'cosine_score_mse': 'pairs'}
  assert set(L.LOGIT_LOSSES) == set(NAMES)
  assert L.get('kl').fn_sum is L.kl_sum and L.get('ce').fn_sum is L.ce_sum
  with pytest.raises(dataclasses.FrozenInstanceError):
    L.get('kl').kind = 'ce'
  s, t, mask = random_logits(15, (3, 6))
  for name in NAMES:
    np.testing.assert_allclose(getattr(L, name)(s, t, mask=mask),
                               L.mean(L.get(name).fn_sum(s, t, mask=mask)), rtol=1e-7)


def test_get_unknown_lists_sorted_names():
  with pytest.raises(ValueError, match="unknown loss 'klx'") as err:
    L.get('klx')
  assert ', '.join(sorted(L.LOSSES)) in str(err.value)


def test_register_and_override():
  def l2_sum(student_logits, teacher_logits, *, mask=None, temperature=1.0):
    del temperature
    return LG.masked_sum(jnp.sum(jnp.square(student_logits - teacher_logits), -1), mask)

  try:
    loss = L.register('l2_logits', l2_sum, 'logits')
    assert L.get('l2_logits') == loss == L.Loss('l2_logits', l2_sum, 'logits')
    with pytest.raises(ValueError, match='override=True'):
      L.register('l2_logits', l2_sum, 'logits')
    with pytest.raises(ValueError, match='override=True'):
      L.register('kl', l2_sum, 'logits')
    with pytest.raises(ValueError, match='unknown kind'):
      L.register('l2_other', l2_sum, 'logitz')
    # A registered logit loss works in the chunked path too.
    params, teacher_w, hs, ht, labels, mask = _chunk_setup()
    got = _chunked_terms({'l2_logits': {}}, hs, params, ht, teacher_w, labels, mask, 1.0, 4)
    want = l2_sum(hs @ params['w'] + params['b'], ht @ teacher_w, mask=mask)
    np.testing.assert_allclose(got['l2_logits'][0], want[0], rtol=1e-5)
    L.register('l2_logits', L.ce_sum, 'ce', override=True)
    assert L.get('l2_logits').kind == 'ce' and 'l2_logits' not in L.LOGIT_LOSSES
  finally:
    L.LOSSES.pop('l2_logits', None)
    L.LOGIT_LOSSES.pop('l2_logits', None)


def test_weighted_total():
  terms = {'kl': (jnp.float32(6.0), jnp.float32(3.0)), 'ce': (jnp.float32(10.0), jnp.float32(4.0)),
           'hidden_mse': (jnp.float32(0.0), jnp.float32(0.0))}
  total, means = L.weighted_total(terms, {'kl': 0.5, 'ce': 2.0, 'hidden_mse': 7.0})
  np.testing.assert_allclose(total, 0.5 * 6 / 3 + 2.0 * 10 / 4 + 7.0 * 0.0)
  np.testing.assert_allclose(means['kl'], 2.0)
  np.testing.assert_allclose(means['ce'], 2.5)
  assert float(means['hidden_mse']) == 0.0
  with pytest.raises(ValueError, match='no weight for'):
    L.weighted_total(terms, {'kl': 1.0, 'ce': 1.0})
  with pytest.raises(ValueError, match="no term for \\['tvd'\\]"):
    L.weighted_total(terms, {'kl': 1.0, 'ce': 1.0, 'hidden_mse': 1.0, 'tvd': 1.0})
