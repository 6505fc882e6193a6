"""Top-k offline-teacher KL in its three semantics, against numpy written from the definitions."""

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
