"""Attention as two batched matmuls per KV head, with its backward pass written out.

The queries of the G heads that share a KV head are stacked into one [G*T, H] matrix, so scores
and outputs are plain batched matmuls over (batch, KV head): no repeated keys, no 5-D batch
dimensions. The softmax is float32 and saved for the backward pass, which applies the closed
form (dS = P * (dP - rowsum(dO * O)) * scale) instead of differentiating the softmax, the
masks and the layout changes op by op. On XLA:CPU this is the fastest formulation measured
(docs/speed.md); it is kd's default attention on the CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_F32 = jnp.float32


def _dot(a, b, contract):
  """Batched over the two leading axes; `contract` the (a, b) axes summed over."""
  return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((0, 1), (0, 1))),
                             preferred_element_type=_F32)


def _allowed(mask, causal: bool, window: int | None, t: int, s: int):
  """[B|1, 1, 1, T, S] bool (True = may attend), or None: the mask, causality (top-left
  aligned, as jax.nn.dot_product_attention's) and a sliding window of `window` keys."""
  i, j = jnp.arange(t)[:, None], jnp.arange(s)[None, :]
  allowed = (j <= i) if causal else None
  if window is not None:
    band = i - j < window
    allowed = band if allowed is None else allowed & band
  allowed = None if allowed is None else allowed[None, None, None]
  if mask is not None:
    mask = mask[:, :, None]  # [B|1, 1, T, S] -> [B|1, 1, 1, T, S]
    allowed = mask if allowed is None else allowed & mask
  return allowed


def _forward(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask, scale, causal, window):
  b, t, n, h = q_BxTxNxH.shape
  s, kv = k_BxSxKxH.shape[1], k_BxSxKxH.shape[2]
  g = n // kv
  q_BxKxRxH = q_BxTxNxH.reshape(b, t, kv, g, h).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, h)
  k_BxKxSxH = k_BxSxKxH.transpose(0, 2, 1, 3)
  v_BxKxSxH = v_BxSxKxH.transpose(0, 2, 1, 3)
  scores = (_dot(q_BxKxRxH, k_BxKxSxH, (3, 3)) * scale).reshape(b, kv, g, t, s)
  allowed = _allowed(mask, causal, window, t, s)
  if allowed is not None:
    # A finite fill (as in jax.nn.dot_product_attention) keeps any fully masked row finite.
    scores = jnp.where(allowed, scores, jnp.finfo(_F32).min)
  probs_BxKxRxS = jax.nn.softmax(scores, axis=-1).reshape(b, kv, g * t, s)
  out_BxKxRxH = _dot(probs_BxKxRxS.astype(v_BxKxSxH.dtype), v_BxKxSxH, (3, 2))
  out = out_BxKxRxH.reshape(b, kv, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)
  return out.astype(q_BxTxNxH.dtype), (q_BxKxRxH, k_BxKxSxH, v_BxKxSxH, out_BxKxRxH,
                                       probs_BxKxRxS)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask=None, scale: float = 1.0,
              causal: bool = True, window: int | None = None):
  """softmax(q k^T * scale + masks) v for queries [B, T, N, H] and keys and values
  [B, S, K, H] (N a multiple of K); `mask` [B|1, 1, T, S] bool or None; `window`: keys less
  than `window` positions back only. Returns [B, T, N, H] in q's dtype."""
  return _forward(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask, scale, causal, window)[0]


def _fwd(q, k, v, mask, scale, causal, window):
  out, saved = _forward(q, k, v, mask, scale, causal, window)
  del mask  # (no cotangent)
  return out, saved


def _bwd(scale, causal, window, res, d_out_BxTxNxH):
  del causal, window  # in the saved probabilities
  q_BxKxRxH, k_BxKxSxH, v_BxKxSxH, out_BxKxRxH, probs_BxKxRxS = res  # (in the inputs' dtypes)
  b, t, n, h = d_out_BxTxNxH.shape
  kv = k_BxKxSxH.shape[1]
  g = n // kv
  d_out = d_out_BxTxNxH.reshape(b, t, kv, g, h).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, h)
  dv_BxKxSxH = _dot(probs_BxKxRxS.astype(d_out.dtype), d_out, (2, 2))
  dp_BxKxRxS = _dot(d_out, v_BxKxSxH, (3, 3))
  delta_BxKxRx1 = jnp.sum(d_out.astype(_F32) * out_BxKxRxH, -1, keepdims=True)
  ds_BxKxRxS = (probs_BxKxRxS * (dp_BxKxRxS - delta_BxKxRx1) * scale).astype(q_BxKxRxH.dtype)
  dq_BxKxRxH = _dot(ds_BxKxRxS, k_BxKxSxH, (3, 2))
  dk_BxKxSxH = _dot(ds_BxKxRxS, q_BxKxRxH, (2, 2))
  dq = dq_BxKxRxH.reshape(b, kv, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)
  return (dq.astype(q_BxKxRxH.dtype), dk_BxKxSxH.transpose(0, 2, 1, 3).astype(k_BxKxSxH.dtype),
          dv_BxKxSxH.transpose(0, 2, 1, 3).astype(v_BxKxSxH.dtype), None)


attention.defvjp(_fwd, _bwd)
