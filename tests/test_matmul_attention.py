"""kd.models.matmul_attention (the CPU's default attention): values against numpy, gradients
against autodiff of the written-out softmax (kd.models.attention.explicit_attention), with GQA,
causality, packed-segment and padding masks, sliding windows, T != S, query blocks and bf16;
and a decoder on it against the same decoder on XLA's attention."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd import models
from kd.models import attention as attention_lib
from kd.models import matmul_attention


def _numpy_attention(q, k, v, allowed, scale):
  """float64 softmax attention; q [B,T,N,H], k/v [B,S,K,H], allowed [B,N,T,S] bool."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  g = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
  s = np.einsum('btnh,bsnh->bnts', q, k) * scale
  s = np.where(allowed, s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum('bnts,bsnh->btnh', p, v)


def _inputs(b, t, s, n, kv, h, dtype=jnp.float32, seed=0):
  r = np.random.default_rng(seed)
  return [jnp.asarray(r.standard_normal(shape), dtype)
          for shape in ((b, t, n, h), (b, s, kv, h), (b, s, kv, h), (b, t, n, h))]


CASES = {
    # name: (b, t, s, n, kv, h, causal, window, mask maker)
    'gqa_causal': (2, 16, 16, 6, 2, 8, True, None, None),
    'mha_causal': (1, 12, 12, 4, 4, 8, True, None, None),
    'segments': (2, 16, 16, 4, 2, 8, True, None,
                 lambda b, t, s: np.repeat(np.arange(4), 4)[None, :, None]
                 == np.repeat(np.arange(4), 4)[None, None, :]),
    'padding_keys': (2, 10, 10, 4, 1, 8, True, None,
                     lambda b, t, s: (np.arange(s) < np.array([[7], [10]]))[:, None, :]),
    'window': (1, 16, 16, 4, 2, 8, True, 5, None),
    'decode_t1_of_s9': (2, 1, 9, 4, 2, 8, False, None,
                        lambda b, t, s: (np.arange(s) < np.array([[6], [9]]))[:, None, :]),
    'not_causal': (1, 8, 12, 2, 1, 8, False, None, None),
}


@pytest.mark.parametrize('num_blocks', [None, 3])  # None: one block at these lengths
@pytest.mark.parametrize('name', sorted(CASES))
def test_values_and_gradients_against_numpy_and_autodiff(name, num_blocks):
  b, t, s, n, kv, h, causal, window, make_mask = CASES[name]
  q, k, v, d_out = _inputs(b, t, s, n, kv, h)
  scale = h ** -0.5
  mask = None if make_mask is None else jnp.asarray(make_mask(b, t, s))[:, None]  # [B|1,1,T,S]
  allowed = np.ones((b, n, t, s), bool)
  i, j = np.arange(t)[:, None], np.arange(s)[None, :]
  if causal:
    allowed &= j <= i
  if window is not None:
    allowed &= i - j < window
  if mask is not None:
    allowed &= np.asarray(mask)
  assert allowed.any(-1).all()  # (no case leaves a row empty)

  got = matmul_attention.attention(q, k, v, mask, scale, causal, window, num_blocks)
  np.testing.assert_allclose(got, _numpy_attention(q, k, v, allowed, scale), rtol=1e-5,
                             atol=1e-5)

  def loss(fn):
    return lambda q, k, v: jnp.sum(fn(q, k, v) * d_out)
  ours = jax.grad(loss(lambda q, k, v: matmul_attention.attention(
      q, k, v, mask, scale, causal, window, num_blocks)), argnums=(0, 1, 2))(q, k, v)
  explicit_mask = jnp.asarray(allowed[:, :1]) if causal or window or mask is not None else None
  ref = jax.grad(loss(lambda q, k, v: attention_lib.explicit_attention(
      q, k, v, explicit_mask, scale, causal=False)[0]), argnums=(0, 1, 2))(q, k, v)
  for a, r, what in zip(ours, ref, 'qkv'):
    np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-5, err_msg=f'd{what}')


def test_query_blocks_reach_only_the_keys_they_may_see():
  blocks = matmul_attention.query_blocks
  # Causal at 256 positions: 4 blocks of 64, each up to its own last position.
  assert blocks(256, 256, True, None) == [(0, 64, 0, 64), (64, 128, 0, 128),
                                          (128, 192, 0, 192), (192, 256, 0, 256)]
  assert blocks(100, 100, True, None) == [(0, 100, 0, 100)]  # under 2 * MIN_BLOCK: one block
  assert blocks(256, 256, False, None) == [(0, 256, 0, 256)]  # not causal: every key
  # Ragged blocks and a window of 5: keys from the block's first query's reach.
  assert blocks(16, 16, True, 5, 3) == [(0, 5, 0, 5), (5, 10, 1, 10), (10, 16, 6, 16)]
  assert blocks(16, 4, True, 2, 2) == [(0, 8, 0, 4), (8, 16, 0, 4)]  # none in reach: all keys
  assert blocks(1, 9, False, None, 4) == [(0, 1, 0, 9)]  # never more blocks than queries


def test_blocks_at_a_real_length_match_one_block():
  # 4 blocks of 64 (the default at 256 positions) against one block over every key.
  q, k, v, d_out = _inputs(1, 256, 256, 4, 2, 16, seed=3)
  f = lambda nb: lambda q, k, v: jnp.sum(
      matmul_attention.attention(q, k, v, None, 0.25, True, None, nb) * d_out)
  (a, ga), (b, gb) = (jax.value_and_grad(f(nb), argnums=(0, 1, 2))(q, k, v) for nb in (None, 1))
  np.testing.assert_allclose(a, b, rtol=1e-5)
  for x, y in zip(ga, gb):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


def test_bf16_inputs_stay_close_to_float32_and_keep_their_dtype():
  q, k, v, d_out = _inputs(2, 16, 16, 4, 2, 16)
  f = lambda q, k, v: matmul_attention.attention(q, k, v, None, 0.25, True, None)
  want = f(q, k, v)
  bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  got = f(*bf)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(got.astype(jnp.float32), want, atol=3e-2)
  grads = jax.grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32) * d_out),
                   argnums=(0, 1, 2))(*bf)
  want_grads = jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) * d_out), argnums=(0, 1, 2))(q, k, v)
  for a, r in zip(grads, want_grads):
    assert a.dtype == jnp.bfloat16
    np.testing.assert_allclose(a.astype(jnp.float32), r, atol=0.1, rtol=0.05)


def test_the_cpu_default_is_matmul_and_a_decoder_on_it_matches_xla():
  config = models.DecoderConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                                num_kv_heads=2, intermediate_size=64, max_seq_len=32)
  assert attention_lib.attention_impl(config, jnp.float32, None, True) == 'matmul'
  ids = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 16)), jnp.int32)
  segments = jnp.asarray(np.repeat([[1, 1, 2, 2]], 2, 0).repeat(4, 1), jnp.int32)
  ours, xla = models.Decoder(config), models.Decoder(
      dataclasses.replace(config, attention_impl='xla'))
  params = ours.init(jax.random.key(0), ids)

  def loss(model):
    return lambda p: jnp.mean(model.apply(p, ids, segment_ids=segments)['logits'] ** 2)
  (a, ga), (b, gb) = (jax.value_and_grad(loss(m))(params) for m in (ours, xla))
  np.testing.assert_allclose(a, b, rtol=1e-5)
  for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
