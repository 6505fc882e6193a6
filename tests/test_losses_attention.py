"""Tests for kd.losses.attention: attention-map KL/MSE and MiniLM relations, against numpy."""

import jax
import numpy as np
import pytest

import kd.losses as L
from kd.losses import attention as A

B, T = 3, 6
MASK = np.array([[1, 1, 1, 1, 1, 1],
                 [1, 1, 1, 1, 0, 0],
                 [1, 1, 0, 0, 0, 0]], bool)


def np_softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def attention_probs(seed, heads, mask=MASK):
  """Softmax attention like a model makes it: padded keys get a -1e9 bias (≈0 probability)."""
  scores = np.random.default_rng(seed).normal(size=(B, heads, T, T)) * 2
  scores = np.where(mask[:, None, None, :], scores, -1e9)
  return np_softmax(scores).astype(np.float32)


def np_attention_kl(s, t, mask):
  s, t = s.astype(np.float64), t.astype(np.float64)
  keys = mask[:, None, None, :]
  rows = np.where(keys & (t > 0), t * np.log(np.where(keys, t, 1) / np.where(keys, s, 1)), 0)
  rows = rows.sum(-1)  # [B, H, Tq]
  valid = np.broadcast_to(mask[:, None, :], rows.shape)
  return (rows * valid).sum(), valid.sum()


def np_attention_mse(s, t, mask):
  valid = np.broadcast_to(mask[:, None, :, None] & mask[:, None, None, :], s.shape)
  return (((s.astype(np.float64) - t) ** 2) * valid).sum(), valid.sum()


def np_relation(sa, sb, ta, tb, heads, mask):
  def rel(a, b):
    bsz, t, d = a.shape
    dr = d // heads
    a = a.astype(np.float64).reshape(bsz, t, heads, dr).transpose(0, 2, 1, 3)
    b = b.astype(np.float64).reshape(bsz, t, heads, dr).transpose(0, 2, 1, 3)
    scores = a @ b.transpose(0, 1, 3, 2) / np.sqrt(dr)
    scores = np.where(mask[:, None, None, :], scores, -np.inf)
    return np_softmax(scores)

  ps, pt = rel(sa, sb), rel(ta, tb)
  with np.errstate(divide='ignore', invalid='ignore'):
    rows = np.where(pt > 0, pt * np.log(pt / ps), 0).sum(-1)  # [B, R, T]
  valid = np.broadcast_to(mask[:, None, :], rows.shape)
  return (rows * valid).sum(), valid.sum()


# ----------------------------------------------------------------------------- attention maps


@pytest.mark.parametrize('mask', [MASK, None])
@pytest.mark.parametrize('name,ref', [('attention_kl', np_attention_kl),
                                      ('attention_mse', np_attention_mse)])
def test_attention_losses_match_numpy(name, ref, mask):
  np_mask = np.ones((B, T), bool) if mask is None else mask
  s, t = attention_probs(0, 4, np_mask), attention_probs(1, 4, np_mask)
  want_sum, want_count = ref(s, t, np_mask)
  got_sum, got_count = L.get(name).fn_sum(s, t, mask=mask)
  np.testing.assert_allclose(got_sum, want_sum, rtol=1e-5)
  assert float(got_count) == want_count
  np.testing.assert_allclose(getattr(L, name)(s, t, mask=mask), want_sum / want_count, rtol=1e-5)


def test_attention_kl_counts_valid_rows():
  s, t = attention_probs(0, 4), attention_probs(1, 4)
  assert float(A.attention_kl_sum(s, t, mask=MASK)[1]) == 4 * MASK.sum()
  assert float(A.attention_mse_sum(s, t, mask=MASK)[1]) == 4 * (MASK.sum(-1) ** 2).sum()
  np.testing.assert_allclose(A.attention_kl(t, t, mask=MASK), 0.0, atol=1e-7)


@pytest.mark.parametrize('name', ['attention_kl', 'attention_mse'])
def test_attention_ignores_padded_positions(name):
  s, t = attention_probs(2, 2), attention_probs(3, 2)
  fn = getattr(L, name)
  base = fn(s, t, mask=MASK)
  rng = np.random.default_rng(4)
  pad_q = ~MASK[:, None, :, None]
  pad_k = ~MASK[:, None, None, :]
  s2 = np.where(pad_q | pad_k, rng.random(s.shape), s).astype(np.float32)
  t2 = np.where(pad_q | pad_k, rng.random(t.shape), t).astype(np.float32)
  np.testing.assert_allclose(fn(s2, t2, mask=MASK), base, rtol=1e-6)
  grads = jax.grad(fn, argnums=(0, 1))(s2, t2, mask=MASK)
  for g in grads:
    assert np.all(np.isfinite(g)) and np.all(g[np.broadcast_to(pad_q | pad_k, g.shape)] == 0)


def test_attention_kl_zero_probabilities_are_finite():
  s, t = attention_probs(5, 2), attention_probs(6, 2)
  t[0, 0, 0, :] = [1, 0, 0, 0, 0, 0]  # 0·log 0 = 0 for the zero teacher entries
  s[0, 0, 1, 2] = 0.0                 # underflowed student where the teacher is positive
  value, grads = jax.value_and_grad(A.attention_kl, argnums=(0, 1))(s, t, mask=MASK)
  assert np.isfinite(value) and all(np.all(np.isfinite(g)) for g in grads)


def test_attention_shape_errors():
  s, t = attention_probs(0, 4), attention_probs(1, 2)
  with pytest.raises(ValueError, match='head counts.*minilm_relations'):
    A.attention_kl_sum(s, t)
  with pytest.raises(ValueError, match='same shape'):
    A.attention_mse_sum(s, s[:, :, :4, :4])
  with pytest.raises(ValueError, match=r'\[B, H, Tq, Tk\]'):
    A.attention_mse_sum(s[0], s[0])
  with pytest.raises(ValueError, match='padding mask'):
    A.attention_kl_sum(s, s, mask=MASK[:, :4])


# ----------------------------------------------------------------------------- relations


def _qkv(seed, width):
  rng = np.random.default_rng(seed)
  return {k: rng.normal(size=(B, T, width)).astype(np.float32) for k in 'qkv'}


@pytest.mark.parametrize('mask', [MASK, None])
@pytest.mark.parametrize('ds,dt,heads', [(12, 20, 4), (8, 8, 2), (6, 24, 3)])
def test_relation_matches_numpy(ds, dt, heads, mask):
  np_mask = np.ones((B, T), bool) if mask is None else mask
  xs, xt = _qkv(7, ds)['q'], _qkv(8, dt)['q']
  want_sum, want_count = np_relation(xs, xs, xt, xt, heads, np_mask)
  got_sum, got_count = A.relation_sum(xs, xt, num_relation_heads=heads, mask=mask)
  np.testing.assert_allclose(got_sum, want_sum, rtol=1e-5)
  assert float(got_count) == want_count == heads * np_mask.sum()


def test_minilm_relations_sum_of_chosen_relations():
  s, t = _qkv(9, 12), _qkv(10, 16)
  want_sum, want_count = 0.0, 0.0
  for rel in ('qq', 'kk', 'vv', 'qk'):
    rs, rc = np_relation(s[rel[0]], s[rel[1]], t[rel[0]], t[rel[1]], 4, MASK)
    want_sum, want_count = want_sum + rs, want_count + rc
  got_sum, got_count = A.minilm_relations_sum(s, t, num_relation_heads=4, mask=MASK,
                                              relations=('qq', 'kk', 'vv', 'qk'))
  np.testing.assert_allclose(got_sum, want_sum, rtol=1e-5)
  assert float(got_count) == want_count
  default = A.minilm_relations_sum(s, t, num_relation_heads=4, mask=MASK)
  parts = [A.relation_sum(s[k], t[k], num_relation_heads=4, mask=MASK) for k in 'qkv']
  np.testing.assert_allclose(default[0], sum(p[0] for p in parts), rtol=1e-6)
  assert float(default[1]) == 3 * 4 * MASK.sum()
  np.testing.assert_allclose(L.minilm_relations(s, t, num_relation_heads=4, mask=MASK),
                             default[0] / default[1], rtol=1e-6)


def test_relation_is_zero_for_identical_inputs():
  s = _qkv(11, 12)
  np.testing.assert_allclose(
      L.minilm_relations(s, s, num_relation_heads=3, mask=MASK), 0.0, atol=1e-6)


def test_relation_ignores_padded_tokens():
  s, t = _qkv(12, 12), _qkv(13, 8)
  fn = lambda a, b: L.minilm_relations(a, b, num_relation_heads=2, mask=MASK)
  base = fn(s, t)
  rng = np.random.default_rng(14)
  pad = ~MASK[:, :, None]
  s2 = {k: np.where(pad, rng.normal(size=v.shape) * 100, v).astype(np.float32)
        for k, v in s.items()}
  t2 = {k: np.where(pad, rng.normal(size=v.shape) * 100, v).astype(np.float32)
        for k, v in t.items()}
  np.testing.assert_allclose(fn(s2, t2), base, rtol=1e-6)
  grads = jax.grad(fn)(s2, t2)
  for g in grads.values():
    assert np.all(np.isfinite(g)) and np.all(g[np.broadcast_to(pad, g.shape)] == 0)


def test_relation_errors():
  s, t = _qkv(15, 12), _qkv(16, 10)
  with pytest.raises(ValueError, match='teacher width 10 is not divisible by '
                                       'num_relation_heads=4'):
    A.relation_sum(s['q'], t['q'], num_relation_heads=4)
  with pytest.raises(ValueError, match='student width 12 is not divisible'):
    A.relation_sum(s['q'], t['q'], num_relation_heads=5)
  with pytest.raises(ValueError, match='two letters'):
    A.minilm_relations_sum(s, t, num_relation_heads=2, relations=('qx',))
  with pytest.raises(ValueError, match="student qkv lacks \\['v'\\]"):
    A.minilm_relations_sum({'q': s['q'], 'k': s['k']}, t, num_relation_heads=2)
  with pytest.raises(ValueError, match='equal \\[B, T\\]'):
    A.relation_sum(s['q'], t['q'][:, :4], num_relation_heads=2)


# ----------------------------------------------------------------------------- layer pairs


def test_attention_loss_sum_over_layer_pairs():
  student = tuple(attention_probs(20 + i, 2) for i in range(2))
  teacher = tuple(attention_probs(30 + i, 2) for i in range(4))
  pairs = L.layer_map('uniform', 2, 4, include_embeddings=False)
  assert pairs == ((1, 2), (2, 4))
  got = A.attention_loss_sum('attention_kl', student, teacher, pairs, mask=MASK)
  parts = [A.attention_kl_sum(student[0], teacher[1], mask=MASK),
           A.attention_kl_sum(student[1], teacher[3], mask=MASK)]
  np.testing.assert_allclose(got[0], parts[0][0] + parts[1][0], rtol=1e-6)
  assert float(got[1]) == 2 * 2 * MASK.sum()
  qkv_s = tuple(_qkv(40 + i, 8) for i in range(2))
  qkv_t = tuple(_qkv(50 + i, 12) for i in range(4))
  got = A.attention_loss_sum('minilm_relations', qkv_s, qkv_t, ((2, 4),), mask=MASK,
                             num_relation_heads=4)
  want = A.minilm_relations_sum(qkv_s[1], qkv_t[3], num_relation_heads=4, mask=MASK)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)


def test_attention_loss_sum_errors():
  attns = (attention_probs(0, 2),)
  with pytest.raises(ValueError, match="unknown attention loss 'attn_l1'"):
    A.attention_loss_sum('attn_l1', attns, attns, ((1, 1),))
  with pytest.raises(ValueError, match='include_embeddings=False'):
    A.attention_loss_sum('attention_mse', attns, attns, ((0, 0), (1, 1)))
  with pytest.raises(ValueError, match='pairs is empty'):
    A.attention_loss_sum('attention_mse', attns, attns, ())


def test_bf16_and_jit():
  s, t = attention_probs(60, 2), attention_probs(61, 2)
  want = A.attention_kl(s, t, mask=MASK)
  got = A.attention_kl(s.astype(jax.numpy.bfloat16), t.astype(jax.numpy.bfloat16), mask=MASK)
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=5e-2)
  np.testing.assert_allclose(jax.jit(A.attention_kl)(s, t, mask=MASK), want, rtol=1e-6)
  qs, qt = _qkv(62, 8), _qkv(63, 12)
  rel = jax.jit(A.minilm_relations, static_argnames='num_relation_heads')
  np.testing.assert_allclose(rel(qs, qt, num_relation_heads=2, mask=MASK),
                             A.minilm_relations(qs, qt, num_relation_heads=2, mask=MASK),
                             rtol=1e-6)
