"""Top-k offline-teacher KL in its three semantics, against numpy written from the definitions."""

import functools

import jax
import numpy as np
import pytest

from kd.losses import topk

RNG = np.random.default_rng(0)


def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _reference(s, t, k, temperature, semantics):
  """One token at a time, float64, straight from the module docstring's definitions."""
  np.seterr(divide='ignore', invalid='ignore')  # 0 * log(0) terms are dropped by nansum
  out = []
  for s_row, t_row in zip(s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])):
    ids = np.argsort(-t_row, kind='stable')[:k]
    p_t_full = np.exp(_np_log_softmax(t_row / temperature))
    p_s_full = np.exp(_np_log_softmax(s_row / temperature))
    if semantics == 'renormalize':
      q = p_t_full[ids] / p_t_full[ids].sum()
      p = p_s_full[ids] / p_s_full[ids].sum()
    elif semantics == 'student_full':
      q, p = p_t_full[ids], p_s_full[ids]
    else:  # the rest of the vocabulary (empty when k = V) as one more outcome
      rest = np.setdiff1d(np.arange(len(t_row)), ids)
      q = np.append(p_t_full[ids], p_t_full[rest].sum())
      p = np.append(p_s_full[ids], p_s_full[rest].sum())
    out.append(temperature**2 * np.nansum(np.where(q > 0, q * (np.log(q) - np.log(p)), 0.0)))
  return np.array(out).reshape(s.shape[:-1])


@pytest.mark.parametrize('semantics', topk.SEMANTICS)
@pytest.mark.parametrize('k', [1, 5, 31])
@pytest.mark.parametrize('temperature', [1.0, 2.0])
def test_against_numpy(semantics, k, temperature):
  s = RNG.normal(size=(2, 3, 31)) * 2
  t = RNG.normal(size=(2, 3, 31)) * 2
  ids, vals, lse = topk.topk_from_logits(t.astype(np.float32), k, temperature=temperature)
  got = topk.topk_kl_per_token(s.astype(np.float32), ids, vals, lse, temperature=temperature,
                               semantics=semantics)
  want = _reference(s, t, k, temperature, semantics)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize('semantics', topk.SEMANTICS)
def test_full_vocab_k_equals_full_kl(semantics):
  from kd.losses import kl_per_token  # pylint: disable=g-import-not-at-top
  s = RNG.normal(size=(4, 17)).astype(np.float32)
  t = RNG.normal(size=(4, 17)).astype(np.float32)
  ids, vals, lse = topk.topk_from_logits(t, 17, temperature=2.0)
  np.testing.assert_allclose(
      topk.topk_kl_per_token(s, ids, vals, lse, temperature=2.0, semantics=semantics),
      kl_per_token(s, t, temperature=2.0), rtol=1e-4, atol=1e-5)
  grad = jax.grad(lambda x: topk.topk_kl_sum(x, ids, vals, lse, temperature=2.0,
                                             semantics=semantics)[0])(s)
  want = jax.grad(lambda x: kl_per_token(x, t, temperature=2.0).sum())(s)
  np.testing.assert_allclose(grad, want, rtol=1e-3, atol=1e-5)


def test_rest_bucket_gradients_are_finite_and_masking_works():
  s = RNG.normal(size=(3, 9)).astype(np.float32)
  t = np.full((3, 9), -30.0, np.float32)
  t[:, 0] = 10.0  # almost all teacher mass in the top-1: the rest bucket is ~exp(-40)
  ids, vals, lse = topk.topk_from_logits(t, 2)
  mask = np.array([1, 0, 1], bool)
  fn = lambda x: topk.topk_kl_sum(x, ids, vals, lse, mask=mask)[0]
  g = jax.grad(fn)(s)
  assert np.all(np.isfinite(g)) and np.all(g[1] == 0)
  assert float(topk.topk_kl_sum(s, ids, vals, lse, mask=np.zeros(3, bool))[0]) == 0.0


def test_errors():
  s = np.zeros((2, 5), np.float32)
  ids, vals, lse = topk.topk_from_logits(s, 2)
  with pytest.raises(ValueError, match='valid: renormalize, student_full, rest_bucket'):
    topk.topk_kl_per_token(s, ids, vals, lse, semantics='sparse')
  with pytest.raises(ValueError, match="needs the teacher's logsumexp"):
    topk.topk_kl_per_token(s, ids, vals, None, semantics='student_full')


@pytest.mark.parametrize('semantics', topk.SEMANTICS)
def test_chunked_and_fused_cached_teacher_equal_the_full_logits_loss(semantics):
  # A cached top-k teacher through the chunked paths (T = 13 in chunks of 4: the last one
  # padded): the KL and CE sums and their gradients equal those of full [B, T, V] logits, and
  # the KL equals the numpy reference.
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from kd import losses  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(3)
  b, t, d, v, k, temp = 2, 13, 6, 40, 5, 2.0
  hs = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
  params = {'w': jnp.asarray(rng.normal(size=(d, v)), jnp.float32)}
  t_logits = rng.normal(size=(b, t, v)).astype(np.float32) * 2.0
  cache = topk.topk_from_logits(t_logits, k, temperature=temp)
  labels = jnp.asarray(rng.integers(0, v, (b, t)))
  mask = jnp.asarray(rng.random((b, t)) < 0.7)
  coeffs = {'kl': 0.7, 'ce': 0.3}
  terms = {'kl': {}, 'ce': {}}
  project = lambda p, x: x @ p['w']

  def plain(h, p):
    s_logits = project(p, h)
    out = {'kl': topk.topk_kl_sum(s_logits, *cache, mask=mask, temperature=temp,
                                  semantics=semantics),
           'ce': losses.ce_sum(s_logits, labels, mask=mask)}
    return sum(coeffs[n] * s for n, (s, _) in out.items()), out

  def chunked(h, p):
    out = losses.chunked_logit_losses(
        terms, h, lambda x: project(p, x), cache, lambda c: c, labels=labels, mask=mask,
        temperature=temp, chunk_size=4, divergences=topk.chunk_divergences(semantics))
    return sum(coeffs[n] * s for n, (s, _) in out.items()), out

  def fused(h, p, closed_form=None):  # None: topk_kl_with_grad's closed form
    out, surrogate = losses.fused_logit_losses(
        terms, coeffs, h, p, project, cache, lambda c: c, labels=labels, mask=mask,
        temperature=temp, chunk_size=4, divergences=topk.chunk_divergences(semantics),
        closed_form=closed_form)
    return sum(coeffs[n] * s for n, (s, _) in out.items()) + surrogate, out

  grad = lambda fn: jax.jit(jax.value_and_grad(fn, (0, 1), has_aux=True))(hs, params)
  (_, want_terms), want = grad(plain)
  ref = _reference(np.asarray(project(params, hs)), t_logits, k, temp, semantics)
  np.testing.assert_allclose(want_terms['kl'][0], (ref * np.asarray(mask)).sum(), rtol=1e-4)
  assert float(np.abs(want[0]).max()) > 0.01
  for fn in (chunked, fused, functools.partial(fused, closed_form=False)):
    (_, got_terms), got = grad(fn)
    for name in terms:
      np.testing.assert_allclose(got_terms[name][0], want_terms[name][0], rtol=1e-5, atol=1e-5)
      assert float(got_terms[name][1]) == float(mask.sum())
    for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
      assert np.all(np.isfinite(g))
      np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match='unknown top-k semantics'):
    topk.chunk_divergences('rest')


def test_topk_from_hidden_in_chunks_equals_full_logits():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(4)
  hidden = jnp.asarray(rng.normal(size=(2, 11, 6)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(6, 50)), jnp.float32)
  ids, values, lse = topk.topk_from_logits(hidden @ w, 7, temperature=2.0)
  got = topk.topk_from_hidden(hidden, lambda h: h @ w, 7, temperature=2.0, chunk_size=4)
  assert [x.shape for x in got] == [(2, 11, 7), (2, 11, 7), (2, 11)]
  np.testing.assert_array_equal(got[0], ids)
  np.testing.assert_allclose(got[1], values, rtol=1e-6)
  np.testing.assert_allclose(got[2], lse, rtol=1e-6)
  with pytest.raises(ValueError, match='chunk_size must be a positive int'):
    topk.topk_from_hidden(hidden, lambda h: h @ w, 7, chunk_size=0)


@pytest.mark.parametrize('semantics', topk.SEMANTICS)
@pytest.mark.parametrize('k', [1, 5, 40])  # 40 = V: no rest at all
def test_closed_form_gradient_equals_autodiff_of_the_loss(semantics, k):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(k)
  s = rng.normal(size=(3, 4, 40)).astype(np.float32) * 3
  t = rng.normal(size=(3, 4, 40)).astype(np.float32) * 3
  mask = rng.random((3, 4)) < 0.7
  cache = topk.topk_from_logits(t, k, temperature=2.0)
  kw = dict(mask=mask, temperature=2.0, semantics=semantics)
  want, want_grad = jax.value_and_grad(lambda z: topk.topk_kl_sum(z, *cache, **kw)[0])(
      jnp.asarray(s))
  (got, count), grad = topk.topk_kl_with_grad(s, *cache, **kw)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert float(count) == mask.sum()
  assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[~mask] == 0)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-6)
  if not (semantics == 'renormalize' and k == 1):  # one outcome: KL and gradient are 0
    assert float(np.abs(want_grad).max()) > 0.1
