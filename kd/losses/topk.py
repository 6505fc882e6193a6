"""KL against an offline teacher stored as its top-k logits plus the full-vocabulary logsumexp.

A cache holds, per token, the teacher's k largest logits `topk_logits` [..., k], their vocab ids
`topk_ids` [..., k], and `lse` = logsumexp(teacher_logits / T) over the whole vocabulary at the
temperature T the cache was written with, so the probability mass outside the top-k is known.
Three conventions exist in the literature and in peer code; `semantics` picks one:

  'renormalize'   both distributions renormalised over the k kept ids (needs no `lse`):
                  KL(softmax(t_k / T) ‖ softmax(s_k / T))
  'student_full'  teacher top-k probabilities exp(t_k / T − lse) against the student's
                  full-vocabulary log-probabilities at those ids; the teacher's missing mass is
                  dropped, so this is a truncated sum, not a divergence (it can go below 0)
  'rest_bucket'   k + 1 outcomes: the k ids and one bucket holding everything else, for both
                  models; a proper KL that equals the full-vocabulary KL when k = V

Every form is multiplied by T², like the full-vocabulary losses, and reduces to (sum, count).
"""

import jax
import jax.numpy as jnp

from kd.losses.chunked import from_chunks, to_chunks
from kd.losses.logits import _check_temperature, _t2, kl_from_log_probs, masked_sum

SEMANTICS = ('renormalize', 'student_full', 'rest_bucket')


def _log1mexp(x):
  """log(1 − exp(x)) for x ≤ 0, stable at both ends; −inf at x = 0."""
  x = jnp.minimum(x, 0.0)
  safe = jnp.where(x < 0.0, x, -1.0)  # keeps the untaken branch finite for gradients
  out = jnp.where(safe > -0.6931, jnp.log(-jnp.expm1(safe)), jnp.log1p(-jnp.exp(safe)))
  return jnp.where(x < 0.0, out, -jnp.inf)


def _check(semantics, lse=0.0, temperature=1.0):  # lse: None when the cache has none
  if semantics not in SEMANTICS:
    raise ValueError(f'unknown top-k semantics {semantics!r}; valid: {", ".join(SEMANTICS)}')
  if semantics != 'renormalize' and lse is None:
    raise ValueError(f"semantics {semantics!r} needs the teacher's logsumexp `lse`; the cache "
                     "writes it, or use semantics='renormalize'")
  _check_temperature(temperature)


def _rest_log_prob(s_scaled, topk_ids):
  """log Σ softmax(s) over the ids *not* in topk_ids, without cancellation: [..., 1]."""
  v = s_scaled.shape[-1]
  flat = s_scaled.reshape(-1, v)
  ids = topk_ids.reshape(-1, topk_ids.shape[-1])
  kept = jnp.zeros(flat.shape, bool).at[jnp.arange(flat.shape[0])[:, None], ids].set(True)
  nothing_left = jnp.all(kept, axis=-1)  # k = V; keep the logsumexp input finite for its grad
  rest = jax.nn.logsumexp(jnp.where(kept & ~nothing_left[:, None], -jnp.inf, flat), axis=-1)
  rest = jnp.where(nothing_left, -jnp.inf, rest)
  rest = rest - jax.nn.logsumexp(flat, axis=-1)
  return rest.reshape(s_scaled.shape[:-1] + (1,))


def topk_kl_per_token(student_logits, topk_ids, topk_logits, lse=None, *, temperature=1.0,
                      semantics='rest_bucket'):
  """T²·KL per token between the cached teacher top-k and the student (float32 [...])."""
  _check(semantics, lse, temperature)
  t = jnp.asarray(temperature, jnp.float32)
  s_scaled = jnp.asarray(student_logits, jnp.float32) / t
  s_k = jnp.take_along_axis(s_scaled, topk_ids, axis=-1)
  t_k = jnp.asarray(topk_logits, jnp.float32) / t
  if semantics == 'renormalize':
    kl = kl_from_log_probs(jax.nn.log_softmax(t_k, -1), jax.nn.log_softmax(s_k, -1))
    return _t2(temperature) * kl
  # The student's rest is exact (its full logits are here); the teacher's comes from the cached
  # logsumexp, so a rest below float32 resolution of k summed probabilities is rounding: zero.
  logp_t, rest_t = _teacher_log_probs(topk_logits, lse, t, topk_ids.shape[-1])
  logp_s = s_k - jax.nn.logsumexp(s_scaled, axis=-1, keepdims=True)
  if semantics == 'student_full':
    return _t2(temperature) * kl_from_log_probs(logp_t, logp_s)
  rest_s = _rest_log_prob(s_scaled, topk_ids)
  kl = kl_from_log_probs(jnp.concatenate([logp_t, rest_t], -1),
                         jnp.concatenate([logp_s, rest_s], -1))
  return _t2(temperature) * kl


def topk_kl_sum(student_logits, topk_ids, topk_logits, lse=None, *, mask=None, temperature=1.0,
                semantics='rest_bucket'):
  return masked_sum(topk_kl_per_token(student_logits, topk_ids, topk_logits, lse,
                                      temperature=temperature, semantics=semantics), mask)


def _teacher_log_probs(topk_logits, lse, t, k):
  """The teacher's log-probs at its top-k and of the rest, as topk_kl_per_token makes them."""
  logp_t = jnp.asarray(topk_logits, jnp.float32) / t - jnp.asarray(lse, jnp.float32)[..., None]
  rest_t = _log1mexp(jax.nn.logsumexp(logp_t, axis=-1, keepdims=True))
  rest_t = jnp.where(rest_t < jnp.log(4.0 * k * jnp.finfo(jnp.float32).eps), -jnp.inf, rest_t)
  return logp_t, rest_t


def topk_kl_with_grad(student_logits, topk_ids, topk_logits, lse=None, *, mask=None,
                      temperature=1.0, semantics='rest_bucket'):
  """(topk_kl_sum(...), its gradient with respect to `student_logits`) in closed form.

  With s = z / T, q = softmax(s) over the vocabulary, K the cached ids and p the teacher's
  probabilities there, d(T²·KL)/dz = T·g with
    'student_full'  g = q·Σ_K p − p·[j ∈ K]
    'rest_bucket'   g = q·(Σ_K p + p_rest) − p·[j ∈ K] − p_rest·q / q_rest·[j ∉ K]
    'renormalize'   g = (softmax(s_K) − softmax(t_K / T))·[j ∈ K]
  so a chunk keeps a [.., V] bool of the kept ids (rest_bucket only) and the gradient, not
  autodiff's log-probs and scatter residuals.
  """
  _check(semantics, lse, temperature)
  t = jnp.asarray(temperature, jnp.float32)
  s = jnp.asarray(student_logits, jnp.float32) / t
  k = topk_ids.shape[-1]
  m = jnp.max(s, axis=-1, keepdims=True)
  e = jnp.exp(s - m)
  total = jnp.sum(e, axis=-1, keepdims=True)
  s_k = jnp.take_along_axis(s, topk_ids, axis=-1)
  scatter = lambda x, upd: jnp.put_along_axis(x, topk_ids, upd, axis=-1, inplace=False)
  if semantics == 'renormalize':
    logq_k = jax.nn.log_softmax(s_k, -1)
    logp_k = jax.nn.log_softmax(jnp.asarray(topk_logits, jnp.float32) / t, -1)
    per_token = kl_from_log_probs(logp_k, logq_k)
    grad = scatter(jnp.zeros_like(s), jnp.exp(logq_k) - jnp.exp(logp_k))
  else:
    logp_t, rest_t = _teacher_log_probs(topk_logits, lse, t, k)
    p = jnp.exp(logp_t)
    logq_k = s_k - m - jnp.log(total)
    mass = jnp.sum(p, axis=-1, keepdims=True)
    if semantics == 'student_full':
      per_token = kl_from_log_probs(logp_t, logq_k)
      grad, scale = e / total * mass, mass
    else:  # 'rest_bucket': the student's rest summed over the ids not kept, not 1 − Σ_K q
      kept = scatter(jnp.zeros(s.shape, bool), True)
      rest = jnp.sum(jnp.where(kept, 0.0, e), axis=-1, keepdims=True)
      p_rest = jnp.exp(rest_t)
      logq_rest = jnp.where(rest > 0, jnp.log(jnp.where(rest > 0, rest, 1.0)), -jnp.inf)
      per_token = kl_from_log_probs(jnp.concatenate([logp_t, rest_t], -1),
                                    jnp.concatenate([logq_k, logq_rest - jnp.log(total)], -1))
      to_rest = jnp.where(rest > 0, p_rest / jnp.where(rest > 0, rest, 1.0), 0.0)
      scale = mass + p_rest
      grad = e / total * scale - jnp.where(kept, 0.0, e * to_rest)
    grad = scatter(grad, jnp.exp(logq_k) * scale - p)  # the kept ids' entries, from their logits
  if mask is not None:
    grad = jnp.where(jnp.asarray(mask, bool)[..., None], grad, 0.0)
  return masked_sum(_t2(temperature) * per_token, mask), t * grad


def chunk_divergences(semantics='rest_bucket'):
  """{'kl': fn} for the chunked logit losses (kd.losses.chunked_logit_losses and
  fused_logit_losses) with a cached teacher: pass the cache's (topk_ids, topk_logits, lse),
  each [B, T, ...], as the teacher's input and the identity as its projection. `fn.with_grad`
  is its closed form (topk_kl_with_grad), which fused_logit_losses takes by default."""
  _check(semantics)

  def kl_sum(student_logits, teacher, *, mask=None, temperature=1.0):
    return topk_kl_sum(student_logits, *teacher, mask=mask, temperature=temperature,
                       semantics=semantics)

  def with_grad(student_logits, teacher, *, mask=None, temperature=1.0):
    return topk_kl_with_grad(student_logits, *teacher, mask=mask, temperature=temperature,
                             semantics=semantics)
  kl_sum.with_grad = with_grad
  return {'kl': kl_sum}


def topk_from_logits(teacher_logits, k: int, *, temperature=1.0):
  """What a cache stores for `teacher_logits` [..., V]: (ids int32, logits, lse at T)."""
  logits = jnp.asarray(teacher_logits, jnp.float32)
  values, ids = jax.lax.top_k(logits, k)
  lse = jax.nn.logsumexp(logits / jnp.asarray(temperature, jnp.float32), axis=-1)
  return ids.astype(jnp.int32), values, lse


def topk_from_hidden(hidden_BxTxD, project, k: int, *, temperature=1.0, chunk_size: int):
  """`topk_from_logits(project(hidden), k)` made `chunk_size` tokens at a time, so only
  [B, C, V] logits are ever held (the cache writer's teacher at a large vocabulary)."""
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f'chunk_size must be a positive int, got {chunk_size!r}.')
  chunks = jax.lax.map(lambda h: topk_from_logits(project(h), k, temperature=temperature),
                       to_chunks(hidden_BxTxD, chunk_size))
  return tuple(from_chunks(x, hidden_BxTxD.shape[1]) for x in chunks)
