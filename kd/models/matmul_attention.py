"""Attention as batched matmuls per KV head and query block, with its backward pass written out.

The queries of the G heads that share a KV head are stacked into one [G*L, H] matrix, so scores
and outputs are plain batched matmuls over (batch, KV head): no repeated keys, no 5-D batch
dimensions. Causal attention splits the queries into blocks of positions, and each block's
products run over the keys it can see, no further: 4 blocks skip 3/8 of the scores, their
softmax and their products, forward and backward. The softmax is float32 and its
unnormalised exponentials are saved for the backward pass, which applies the closed form
(dS = P * (dP - rowsum(dO * O)) * scale) instead of differentiating the softmax, the masks and
the layout changes op by op. On XLA:CPU this is the fastest formulation measured (docs/speed.md);
it is kd's default attention on the CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_F32 = jnp.float32
# Query blocks of a causal or windowed call. Each is unrolled in the graph: 8 blocks ran the
# attention a little faster than 4 but took twice as long to compile in a 50-layer KD step.
MAX_BLOCKS = 4
MIN_BLOCK = 64  # positions: smaller blocks cost more in per-product overhead than they skip


def _dot(a, b, contract):
  """Batched over the two leading axes; `contract` the (a, b) axes summed over."""
  return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((0, 1), (0, 1))),
                             preferred_element_type=_F32)


def query_blocks(t: int, s: int, causal: bool, window: int | None,
                 num_blocks: int | None = None) -> list[tuple[int, int, int, int]]:
  """[(a, b, lo, hi)]: query positions [a, b) and the keys [lo, hi) they may see. Causality is
  top-left aligned (query i sees keys j <= i), as jax.nn.dot_product_attention's; `window` keeps
  keys i - j < window. `num_blocks` None: up to MAX_BLOCKS blocks of at least MIN_BLOCK
  positions when causal or windowed, else one block over every key."""
  if num_blocks is None:
    num_blocks = min(MAX_BLOCKS, t // MIN_BLOCK) if causal or window is not None else 1
  num_blocks = max(1, min(num_blocks, t))
  edges = [i * t // num_blocks for i in range(num_blocks + 1)]
  blocks = []
  for a, b in zip(edges, edges[1:]):
    lo = max(0, a - window + 1) if window is not None else 0
    hi = min(s, b) if causal else s
    if hi <= lo:  # no key in reach: every key, all masked (rows averaged, as below)
      lo, hi = 0, s
    blocks.append((a, b, lo, hi))
  return blocks


def _allowed(mask, causal: bool, window: int | None, block):
  """[B|1, 1, 1, L, S'] bool (True = may attend) for one block's queries and keys, or None."""
  a, b, lo, hi = block
  i, j = jnp.arange(a, b)[:, None], jnp.arange(lo, hi)[None, :]
  allowed = (j <= i) if causal else None
  if window is not None:
    band = i - j < window
    allowed = band if allowed is None else allowed & band
  allowed = None if allowed is None else allowed[None, None, None]
  if mask is not None:  # [B|1, 1, T|1, S|1] -> [B|1, 1, 1, L|1, S'|1]
    rows = slice(a, b) if mask.shape[-2] > 1 else slice(None)
    mask = mask[:, :, None, rows, lo:hi] if mask.shape[-1] > 1 else mask[:, :, None, rows]
    allowed = mask if allowed is None else allowed & mask
  return allowed


def _stack(x_BxLxNxH, kv: int):
  """[B, L, N, H] -> [B, K, G*L, H]: each KV head's G query heads, one under another."""
  b, l, n, h = x_BxLxNxH.shape
  return x_BxLxNxH.reshape(b, l, kv, n // kv, h).transpose(0, 2, 3, 1, 4).reshape(
      b, kv, n // kv * l, h)


def _unstack(x_BxKxRxH, l: int):
  """The inverse of _stack."""
  b, kv, r, h = x_BxKxRxH.shape
  g = r // l
  return x_BxKxRxH.reshape(b, kv, g, l, h).transpose(0, 3, 1, 2, 4).reshape(b, l, kv * g, h)


def _forward(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask, scale, causal, window, num_blocks):
  b, t, n, _ = q_BxTxNxH.shape
  s, kv = k_BxSxKxH.shape[1], k_BxSxKxH.shape[2]
  g = n // kv
  k_BxKxSxH = k_BxSxKxH.transpose(0, 2, 1, 3)
  v_BxKxSxH = v_BxSxKxH.transpose(0, 2, 1, 3)
  outs, saved = [], []
  for block in query_blocks(t, s, causal, window, num_blocks):
    a, z, lo, hi = block
    l = z - a
    q_BxKxRxH = _stack(q_BxTxNxH[:, a:z], kv)
    scores = (_dot(q_BxKxRxH, k_BxKxSxH[:, :, lo:hi], (3, 3)) * scale).reshape(
        b, kv, g, l, hi - lo)
    allowed = _allowed(mask, causal, window, block)
    if allowed is not None:
      # A finite fill (as in jax.nn.dot_product_attention) keeps any fully masked row finite.
      scores = jnp.where(allowed, scores, jnp.finfo(_F32).min)
    exp = jnp.exp(scores - jnp.max(scores, -1, keepdims=True))
    recip_BxKxRx1 = (1 / jnp.sum(exp, -1, keepdims=True)).reshape(b, kv, g * l, 1)
    exp_BxKxRxS = exp.reshape(b, kv, g * l, hi - lo)
    # Normalised after the product: [R, H] divisions instead of [R, S'].
    out_BxKxRxH = _dot(exp_BxKxRxS.astype(v_BxKxSxH.dtype), v_BxKxSxH[:, :, lo:hi],
                       (3, 2)) * recip_BxKxRx1
    outs.append(_unstack(out_BxKxRxH, l))
    saved.append((q_BxKxRxH, out_BxKxRxH, exp_BxKxRxS, recip_BxKxRx1))
  out = jnp.concatenate(outs, 1)
  return out.astype(q_BxTxNxH.dtype), (k_BxKxSxH, v_BxKxSxH, saved)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask=None, scale: float = 1.0,
              causal: bool = True, window: int | None = None, num_blocks: int | None = None):
  """softmax(q k^T * scale + masks) v for queries [B, T, N, H] and keys and values
  [B, S, K, H] (N a multiple of K); `mask` [B|1, 1, T|1, S] bool or None; `window`: keys less
  than `window` positions back only; `num_blocks`: query blocks (query_blocks). Returns
  [B, T, N, H] in q's dtype. A row with no key allowed averages the values of the keys in its
  block's reach."""
  return _forward(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask, scale, causal, window, num_blocks)[0]


def _fwd(q, k, v, mask, scale, causal, window, num_blocks):
  out, saved = _forward(q, k, v, mask, scale, causal, window, num_blocks)
  del mask  # (no cotangent)
  return out, saved


def _bwd(scale, causal, window, num_blocks, res, d_out_BxTxNxH):
  k_BxKxSxH, v_BxKxSxH, saved = res
  b, t, _, h = d_out_BxTxNxH.shape
  kv, s = k_BxKxSxH.shape[1], k_BxKxSxH.shape[2]
  dq, dk_BxKxSxH, dv_BxKxSxH = [], jnp.zeros((b, kv, s, h), _F32), jnp.zeros((b, kv, s, h), _F32)
  blocks = query_blocks(t, s, causal, window, num_blocks)
  for (a, z, lo, hi), (q_BxKxRxH, out_BxKxRxH, exp_BxKxRxS, recip_BxKxRx1) in zip(blocks, saved):
    d_out = _stack(d_out_BxTxNxH[:, a:z], kv)
    dt = d_out.dtype
    keys = (slice(None), slice(None), slice(lo, hi))
    dv_BxKxSxH = dv_BxKxSxH.at[keys].add(_dot(
        exp_BxKxRxS.astype(dt), (d_out.astype(_F32) * recip_BxKxRx1).astype(dt), (2, 2)))
    dp_BxKxRxS = _dot(d_out, v_BxKxSxH[keys], (3, 3))
    delta_BxKxRx1 = jnp.sum(d_out.astype(_F32) * out_BxKxRxH, -1, keepdims=True)
    ds_BxKxRxS = (exp_BxKxRxS * ((dp_BxKxRxS - delta_BxKxRx1) * (recip_BxKxRx1 * scale))
                  ).astype(q_BxKxRxH.dtype)
    dq.append(_unstack(_dot(ds_BxKxRxS, k_BxKxSxH[keys], (3, 2)), z - a))
    dk_BxKxSxH = dk_BxKxSxH.at[keys].add(_dot(ds_BxKxRxS, q_BxKxRxH, (2, 2)))
  dq = jnp.concatenate(dq, 1)
  return (dq.astype(q_BxKxRxH.dtype), dk_BxKxSxH.transpose(0, 2, 1, 3).astype(k_BxKxSxH.dtype),
          dv_BxKxSxH.transpose(0, 2, 1, 3).astype(v_BxKxSxH.dtype), None)


attention.defvjp(_fwd, _bwd)
