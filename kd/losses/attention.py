"""Attention distillation: attention-map KL/MSE (TinyBERT) and self-attention relations (MiniLM).

Attention probabilities are [B, H, Tq, Tk]; `mask` is the [B, T] padding mask (true = real
token). Padded query rows are excluded from the loss and padded keys contribute nothing.
"""

import math

import jax
import jax.numpy as jnp

from kd.losses.logits import kl_from_log_probs, masked_sum, mean

# Finite stand-in for -inf on padded keys: an all-padded row stays finite (uniform) instead of NaN.
_NEG = -1e30
_TINY = float(jnp.finfo(jnp.float32).tiny)


def _valid(mask, b, tq, tk):
  """Boolean [B, Tq] query and [B, Tk] key validity from the [B, T] padding mask."""
  if mask is None:
    return jnp.ones((b, tq), bool), jnp.ones((b, tk), bool)
  mask = jnp.asarray(mask).astype(bool)
  if tq != tk or mask.shape != (b, tq):
    raise ValueError(f'mask shape {mask.shape} must be the [B, T] padding mask {(b, tq)} of a '
                     f'self-attention map (got Tq={tq}, Tk={tk}).')
  return mask, mask


def _check_probs(student_probs, teacher_probs):
  s, t = jnp.shape(student_probs), jnp.shape(teacher_probs)
  if len(s) != 4 or len(t) != 4:
    raise ValueError(f'attention probabilities must be [B, H, Tq, Tk], got student {s}, '
                     f'teacher {t}.')
  if s[1] != t[1] and (s[0], s[2:]) == (t[0], t[2:]):
    raise ValueError(f'student has {s[1]} heads and teacher {t[1]}: attention maps need equal '
                     "head counts; use the relation loss ('minilm_relations') instead.")
  if s != t:
    raise ValueError(f'student {s} and teacher {t} attention maps must have the same shape.')


def attention_kl_sum(student_probs, teacher_probs, *, mask=None):
  """KL(teacher‖student) per valid (b, h, query) row -> (sum, count)."""
  _check_probs(student_probs, teacher_probs)
  b, h, tq, tk = jnp.shape(student_probs)
  q_ok, k_ok = _valid(mask, b, tq, tk)
  p = jnp.asarray(teacher_probs, jnp.float32)
  q = jnp.asarray(student_probs, jnp.float32)
  ok = (p > 0) & k_ok[:, None, None, :]
  # log of where-guarded inputs; the student is clamped at float32 tiny so an underflowed
  # student probability gives a large finite loss rather than inf.
  logp = jnp.where(ok, jnp.log(jnp.where(ok, p, 1.0)), -jnp.inf)
  logq = jnp.log(jnp.maximum(jnp.where(ok, q, 1.0), _TINY))
  rows_BxHxQ = kl_from_log_probs(logp, logq)
  return masked_sum(rows_BxHxQ, jnp.broadcast_to(q_ok[:, None, :], (b, h, tq)))


def attention_mse_sum(student_probs, teacher_probs, *, mask=None):
  """Squared error over valid (b, h, query, key) entries -> (sum, count)."""
  _check_probs(student_probs, teacher_probs)
  b, h, tq, tk = jnp.shape(student_probs)
  q_ok, k_ok = _valid(mask, b, tq, tk)
  err = jnp.square(jnp.asarray(student_probs, jnp.float32) -
                   jnp.asarray(teacher_probs, jnp.float32))
  ok = jnp.broadcast_to(q_ok[:, None, :, None] & k_ok[:, None, None, :], err.shape)
  return masked_sum(err, ok)


def attention_kl(student_probs, teacher_probs, *, mask=None):
  return mean(attention_kl_sum(student_probs, teacher_probs, mask=mask))


def attention_mse(student_probs, teacher_probs, *, mask=None):
  return mean(attention_mse_sum(student_probs, teacher_probs, mask=mask))


# ----------------------------------------------------------------------------- MiniLM relations


def _relation_log_probs(a_BxTxD, b_BxTxD, num_heads, k_ok, who):
  """log softmax(a bᵀ / sqrt(d_r)) over keys per relation head -> [B, R, T, T]."""
  a = jnp.asarray(a_BxTxD, jnp.float32)
  b = jnp.asarray(b_BxTxD, jnp.float32)
  bsz, t, d = a.shape
  if d % num_heads:
    raise ValueError(f'{who} width {d} is not divisible by num_relation_heads={num_heads}; '
                     'pick a head count that divides both student and teacher widths.')
  dr = d // num_heads
  a_BxRxTxd = a.reshape(bsz, t, num_heads, dr).transpose(0, 2, 1, 3)
  b_BxRxTxd = b.reshape(bsz, t, num_heads, dr).transpose(0, 2, 1, 3)
  scores = jnp.einsum('brqd,brkd->brqk', a_BxRxTxd, b_BxRxTxd) / math.sqrt(dr)
  scores = jnp.where(k_ok[:, None, None, :], scores, _NEG)
  return jax.nn.log_softmax(scores, axis=-1)


def _relation_pair_sum(student_a, student_b, teacher_a, teacher_b, num_heads, mask):
  s_shape, t_shape = jnp.shape(student_a), jnp.shape(teacher_a)
  if len(s_shape) != 3 or len(t_shape) != 3 or s_shape[:2] != t_shape[:2]:
    raise ValueError(f'relation inputs must be [B, T, D] with equal [B, T], got student '
                     f'{s_shape}, teacher {t_shape}.')
  if not isinstance(num_heads, int) or num_heads < 1:
    raise ValueError(f'num_relation_heads must be a positive int, got {num_heads!r}.')
  bsz, t = s_shape[:2]
  q_ok, k_ok = _valid(mask, bsz, t, t)
  logp_s = _relation_log_probs(student_a, student_b, num_heads, k_ok, 'student')
  logp_t = _relation_log_probs(teacher_a, teacher_b, num_heads, k_ok, 'teacher')
  # Padded keys carry exactly-zero probability (exp(_NEG − max) underflows) but are dropped
  # explicitly anyway so all-padded rows cannot contribute either.
  logp_t = jnp.where(k_ok[:, None, None, :], logp_t, -jnp.inf)
  rows_BxRxT = kl_from_log_probs(logp_t, logp_s)
  return masked_sum(rows_BxRxT, jnp.broadcast_to(q_ok[:, None, :], rows_BxRxT.shape))


def relation_sum(student_x_BxTxD, teacher_x_BxTxE, *, num_relation_heads, mask=None):
  """MiniLM self-relation: KL(teacher_rel‖student_rel) per valid (b, relation head, query) row.

  relation = softmax(x xᵀ / sqrt(d_r)) over keys after splitting the width into R heads, so
  student and teacher may differ in width and attention head count.
  """
  return _relation_pair_sum(student_x_BxTxD, student_x_BxTxD, teacher_x_BxTxE, teacher_x_BxTxE,
                            num_relation_heads, mask)


def minilm_relations_sum(student_qkv, teacher_qkv, *, num_relation_heads, mask=None,
                         relations=('qq', 'kk', 'vv')):
  """Sum of MiniLM relations over `relations` -> (sum, count).

  Each qkv is {'q', 'k', 'v'} of [B, T, D]; a relation 'xy' is softmax(x yᵀ / sqrt(d_r)), so
  'qq', 'kk', 'vv' (MiniLMv2) and cross relations such as 'qk' are all accepted.
  """
  if not relations:
    raise ValueError("relations is empty; use e.g. ('qq', 'kk', 'vv').")
  total = jnp.zeros((), jnp.float32)
  count = jnp.zeros((), jnp.float32)
  for rel in relations:
    if len(rel) != 2 or set(rel) - set('qkv'):
      raise ValueError(f"relation {rel!r} must be two letters from 'q', 'k', 'v', e.g. 'qq'.")
    for who, qkv in (('student', student_qkv), ('teacher', teacher_qkv)):
      missing = set(rel) - set(qkv)
      if missing:
        raise ValueError(f'{who} qkv lacks {sorted(missing)} needed by relation {rel!r}.')
    s, c = _relation_pair_sum(student_qkv[rel[0]], student_qkv[rel[1]], teacher_qkv[rel[0]],
                              teacher_qkv[rel[1]], num_relation_heads, mask)
    total, count = total + s, count + c
  return total, count


def minilm_relations(student_qkv, teacher_qkv, *, num_relation_heads, mask=None,
                     relations=('qq', 'kk', 'vv')):
  return mean(minilm_relations_sum(student_qkv, teacher_qkv, num_relation_heads=num_relation_heads,
                                   mask=mask, relations=relations))


ATTENTION_LOSSES = {
    'attention_kl': attention_kl_sum,
    'attention_mse': attention_mse_sum,
    'minilm_relations': minilm_relations_sum,
}


def attention_loss_sum(name, student_attns, teacher_attns, pairs, *, mask=None, **kw):
  """Sum of `name` over layer pairs -> (sum, count).

  Pair indices are layer numbers 1..L: layer i is element i-1 of the tuple (attention maps, or
  qkv dicts for 'minilm_relations', which also needs num_relation_heads=...). Build pairs with
  layer_map(..., include_embeddings=False).
  """
  if name not in ATTENTION_LOSSES:
    raise ValueError(f'unknown attention loss {name!r}; valid: {sorted(ATTENTION_LOSSES)}.')
  if not pairs:
    raise ValueError('pairs is empty; build it with layer_map(..., include_embeddings=False).')
  total = jnp.zeros((), jnp.float32)
  count = jnp.zeros((), jnp.float32)
  for si, ti in pairs:
    if not (1 <= si <= len(student_attns) and 1 <= ti <= len(teacher_attns)):
      raise ValueError(f'pair {(si, ti)} out of range: attention layers are 1..'
                       f'{len(student_attns)} (student) and 1..{len(teacher_attns)} (teacher); '
                       'drop the embedding pair with layer_map(..., include_embeddings=False).')
    if teacher_attns[ti - 1] is None:
      raise ValueError(f'teacher layer {ti} is missing (an offline-teacher cache without that '
                       'layer); rewrite the cache with the layers the pairs use.')
    s, c = ATTENTION_LOSSES[name](student_attns[si - 1], teacher_attns[ti - 1], mask=mask, **kw)
    total, count = total + s, count + c
  return total, count
