"""Tests for kd.losses.features: layer maps, projections, hidden-state MSE and cosine."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kd.losses as L
from kd.losses import features as F

# ----------------------------------------------------------------------------- layer maps


@pytest.mark.parametrize('s,t,want', [
    (4, 12, ((0, 0), (1, 3), (2, 6), (3, 9), (4, 12))),
    (3, 8, ((0, 0), (1, 3), (2, 5), (3, 8))),      # 8/3 = 2.67 -> 3, 5.33 -> 5
    (4, 6, ((0, 0), (1, 2), (2, 3), (3, 5), (4, 6))),  # halves round up: 1.5 -> 2, 4.5 -> 5
    (2, 2, ((0, 0), (1, 1), (2, 2))),
    (4, 2, ((0, 0), (1, 1), (2, 1), (3, 2), (4, 2))),  # deeper student: 0.5 -> 1, 1.5 -> 2
])
def test_uniform_layer_map(s, t, want):
  assert F.layer_map('uniform', s, t) == want
  assert F.layer_map('uniform', s, t, include_embeddings=False) == want[1:]


def test_last_and_explicit_layer_maps():
  assert F.layer_map('last', 4, 12) == ((4, 12),)
  assert F.layer_map('explicit', 4, 12, pairs=[(0, 0), [2, 7], (4, 12)]) == (
      (0, 0), (2, 7), (4, 12))
  assert L.layer_map is F.layer_map


@pytest.mark.parametrize('args,kw,match', [
    (('diagonal', 4, 12), {}, r"unknown layer map 'diagonal'; valid: \['explicit', 'last', "
                              r"'uniform'\]"),
    (('explicit', 4, 12), {}, 'non-empty pairs'),
    (('explicit', 4, 12), {'pairs': []}, 'non-empty pairs'),
    (('explicit', 4, 12), {'pairs': [(5, 12)]}, r'student index must be in \[0, 4\]'),
    (('explicit', 4, 12), {'pairs': [(1, -1)]}, r'teacher index in \[0, 12\]'),
    (('explicit', 4, 12), {'pairs': [(1, 2, 3)]}, 'student_idx, teacher_idx'),
    (('uniform', 4, 12), {'pairs': [(1, 1)]}, "only used with kind='explicit'"),
    (('uniform', 0, 12), {}, 'positive ints'),
])
def test_layer_map_errors(args, kw, match):
  with pytest.raises(ValueError, match=match):
    F.layer_map(*args, **kw)


# ----------------------------------------------------------------------------- projection


def test_projection_is_sized_by_hidden_dims():
  params = F.init_projection(jax.random.key(0), 6, 10)
  assert params['kernel'].shape == (6, 10) and params['bias'].shape == (10,)
  h = np.random.default_rng(0).normal(size=(2, 3, 6)).astype(np.float32)
  out = F.project(params, jnp.asarray(h, jnp.bfloat16))
  assert out.shape == (2, 3, 10) and out.dtype == jnp.float32


# ----------------------------------------------------------------------------- losses


def _data(seed, ds=8, dt=8, shape=(2, 5)):
  rng = np.random.default_rng(seed)
  s = rng.normal(size=shape + (ds,)).astype(np.float32)
  t = rng.normal(size=shape + (dt,)).astype(np.float32)
  mask = rng.random(shape) < 0.6
  mask.flat[0] = True
  return s, t, mask


def np_mse(s, t):
  return ((s.astype(np.float64) - t) ** 2).mean(-1)


def np_cosine(s, t):
  s, t = s.astype(np.float64), t.astype(np.float64)
  return 1 - (s * t).sum(-1) / (np.linalg.norm(s, axis=-1) * np.linalg.norm(t, axis=-1))


@pytest.mark.parametrize('name,ref', [('hidden_mse', np_mse), ('hidden_cosine', np_cosine)])
@pytest.mark.parametrize('shape', [(2, 5), (7,)])
def test_hidden_losses_match_numpy(name, ref, shape):
  s, t, mask = _data(1, shape=shape)
  got_sum, got_count = F.FEATURE_LOSSES[name](s, t, mask=mask)
  np.testing.assert_allclose(got_sum, (ref(s, t) * mask).sum(), rtol=1e-5)
  assert float(got_count) == mask.sum()
  np.testing.assert_allclose(getattr(L, name)(s, t, mask=mask),
                             (ref(s, t) * mask).sum() / mask.sum(), rtol=1e-5)
  no_mask_sum, no_mask_count = F.FEATURE_LOSSES[name](s, t)
  np.testing.assert_allclose(no_mask_sum, ref(s, t).sum(), rtol=1e-5)
  assert float(no_mask_count) == np.prod(shape)


@pytest.mark.parametrize('name,ref', [('hidden_mse', np_mse), ('hidden_cosine', np_cosine)])
def test_hidden_losses_with_projection(name, ref):
  s, t, mask = _data(2, ds=6, dt=10)
  params = F.init_projection(jax.random.key(1), 6, 10)
  params['bias'] = params['bias'] + 0.3
  projected = s.astype(np.float64) @ np.asarray(params['kernel']) + np.asarray(params['bias'])
  got_sum, _ = F.FEATURE_LOSSES[name](s, t, mask=mask, projection=params)
  np.testing.assert_allclose(got_sum, (ref(projected, t) * mask).sum(), rtol=1e-5)
  # The projection trains with the student: its gradient is non-zero and finite.
  grads = jax.grad(lambda p: getattr(L, name)(s, t, mask=mask, projection=p))(params)
  assert all(np.all(np.isfinite(g)) and np.any(g != 0) for g in jax.tree.leaves(grads))


def test_width_mismatch_says_to_enable_projection():
  s, t, _ = _data(3, ds=6, dt=10)
  with pytest.raises(ValueError, match=r'enable the projection.*init_projection\(key, 6, 10\)'):
    L.hidden_mse(s, t)
  with pytest.raises(ValueError, match=r'projection kernel \(10, 6\)'):
    L.hidden_cosine(s, t, projection=F.init_projection(jax.random.key(0), 10, 6))
  with pytest.raises(ValueError, match='share all but the last'):
    L.hidden_mse(s, t[:, :3])
  with pytest.raises(ValueError, match='mask shape'):
    L.hidden_mse(s, s, mask=np.ones((2, 4), bool))


def test_cosine_of_zero_vectors_is_finite():
  s, t, _ = _data(4)
  s[0, 0] = 0.0
  t[0, 1] = 0.0
  value, (gs, gt) = jax.value_and_grad(L.hidden_cosine, argnums=(0, 1))(s, t)
  assert np.isfinite(value) and np.all(np.isfinite(gs)) and np.all(np.isfinite(gt))
  per_token_sum, _ = L.hidden_cosine_sum(s[:1, :2], t[:1, :2])
  np.testing.assert_allclose(per_token_sum, 2.0, rtol=1e-6)  # both pairs have cosine 0
  assert float(L.hidden_cosine(s[:1, :1], s[:1, :1])) == pytest.approx(1.0)  # zero vs zero
  np.testing.assert_allclose(L.hidden_cosine(s[1:], 3 * s[1:]), 0.0, atol=1e-6)


def test_fully_masked_hidden_loss_is_zero():
  s, t, _ = _data(5)
  mask = np.zeros((2, 5), bool)
  value, grad = jax.value_and_grad(L.hidden_mse)(s, t, mask=mask)
  assert float(value) == 0.0 and np.all(grad == 0)


def test_feature_loss_sum_over_pairs():
  rng = np.random.default_rng(6)
  ds, dt, s_layers, t_layers = 4, 6, 2, 4
  student = [rng.normal(size=(2, 3, ds)).astype(np.float32) for _ in range(s_layers + 1)]
  teacher = [rng.normal(size=(2, 3, dt)).astype(np.float32) for _ in range(t_layers + 1)]
  mask = np.array([[1, 1, 0], [1, 0, 0]], bool)
  pairs = F.layer_map('uniform', s_layers, t_layers)
  projs = [F.init_projection(jax.random.key(i), ds, dt) for i in range(len(pairs))]
  want_sum, want_count = 0.0, 0.0
  for (si, ti), p in zip(pairs, projs):
    proj = student[si].astype(np.float64) @ np.asarray(p['kernel']) + np.asarray(p['bias'])
    want_sum += (np_mse(proj, teacher[ti]) * mask).sum()
    want_count += mask.sum()
  for projections in (projs, {i: p for i, p in enumerate(projs)},
                      {str(i): p for i, p in enumerate(projs)}):
    got_sum, got_count = F.feature_loss_sum('hidden_mse', student, teacher, pairs, mask=mask,
                                            projections=projections)
    np.testing.assert_allclose(got_sum, want_sum, rtol=1e-5)
    assert float(got_count) == want_count == len(pairs) * mask.sum()


def test_feature_loss_sum_errors():
  h = [np.zeros((1, 2, 4), np.float32)] * 3
  with pytest.raises(ValueError, match="unknown feature loss 'hidden_l1'"):
    F.feature_loss_sum('hidden_l1', h, h, ((1, 1),))
  with pytest.raises(ValueError, match='pairs is empty'):
    F.feature_loss_sum('hidden_mse', h, h, ())
  with pytest.raises(ValueError, match=r'pair \(3, 1\) out of range for 3 student'):
    F.feature_loss_sum('hidden_mse', h, h, ((3, 1),))
  with pytest.raises(ValueError, match='one per pair'):
    F.feature_loss_sum('hidden_mse', h, h, ((1, 1), (2, 2)), projections=[None])
  unprojected = F.feature_loss_sum('hidden_cosine', h, h, ((1, 1), (2, 2)), projections=[None] * 2)
  assert float(unprojected[1]) == 4.0


def test_bf16_and_jit():
  s, t, mask = _data(7)
  want = L.hidden_mse(s, t, mask=mask)
  got = L.hidden_mse(jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16), mask=mask)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=2e-2)
  np.testing.assert_allclose(jax.jit(L.hidden_cosine)(s, t, mask=mask),
                             L.hidden_cosine(s, t, mask=mask), rtol=1e-6)
