"""Logit distillation losses: divergences between softened distributions, and hard-label CE.

Every loss is computed in float32 whatever the input dtype and comes in three forms:
`<name>_per_token` (float32 [...], already multiplied by T²), `<name>_sum` -> (sum, count) over
unmasked tokens, and `<name>` -> sum / max(count, 1). Logits are [..., V], masks are [...].

Vocab entries that are -inf in *both* models (masked vocab) are skipped with where-guards on
the inputs of every log/exp, so values and gradients stay finite.
"""

import jax
import jax.numpy as jnp

Array = jax.Array


# ----------------------------------------------------------------------------- reductions


def masked_sum(per_token, mask=None):
  """Sums a per-token float array over entries where `mask` is true -> (sum, count) float32."""
  per_token = jnp.asarray(per_token, jnp.float32)
  if mask is None:
    return jnp.sum(per_token), jnp.asarray(per_token.size, jnp.float32)
  mask = jnp.asarray(mask)
  if mask.shape != per_token.shape:
    raise ValueError(
        f'mask shape {mask.shape} must equal the token shape {per_token.shape} '
        '(the logits/activations shape without the last axis).')
  mask = mask.astype(bool)
  # where (not multiply) so that NaN/inf at masked tokens cannot leak into the sum.
  total = jnp.sum(jnp.where(mask, per_token, 0.0))
  return total, jnp.sum(mask, dtype=jnp.float32)


def mean(sum_count):
  """(sum, count) -> sum / max(count, 1); a fully masked batch gives exactly 0."""
  total, count = sum_count
  return total / jnp.maximum(count, 1.0)


# ----------------------------------------------------------------------------- validation


def _concrete(x):
  """Python float of `x`, or None when it is a tracer (e.g. a temperature schedule under jit)."""
  if isinstance(x, jax.core.Tracer):
    return None
  try:
    return float(x)
  except (TypeError, jax.errors.ConcretizationTypeError):
    return None


def _check_temperature(temperature):
  t = _concrete(temperature)
  if t is not None and not t > 0:
    raise ValueError(f'temperature must be > 0, got {temperature}.')


def _check_weight(name, w):
  v = _concrete(w)
  if v is not None and not 0.0 <= v <= 1.0:
    raise ValueError(f'{name} must be in [0, 1], got {w}.')
  return v


def _check_pair(student_logits, teacher_logits):
  s, t = jnp.shape(student_logits), jnp.shape(teacher_logits)
  if s == t:
    return
  hint = ''
  if len(s) == len(t) and s[:-1] == t[:-1]:
    hint = (f' Only the vocab size differs: slice the padded vocab rows off the larger one, '
            f'e.g. logits[..., :{min(s[-1], t[-1])}], so both index the same tokenizer.')
  raise ValueError(f'student logits {s} and teacher logits {t} must have the same shape.{hint}')


# ----------------------------------------------------------------------------- log-prob math


def _log_probs(student_logits, teacher_logits, temperature):
  """float32 log softmax(z / T) of both models -> (logp_S, logp_T)."""
  _check_temperature(temperature)
  _check_pair(student_logits, teacher_logits)
  t = jnp.asarray(temperature, jnp.float32)
  logp_s = jax.nn.log_softmax(jnp.asarray(student_logits, jnp.float32) / t, axis=-1)
  logp_t = jax.nn.log_softmax(jnp.asarray(teacher_logits, jnp.float32) / t, axis=-1)
  return logp_s, logp_t


def kl_from_log_probs(logp, logq, axis=-1):
  """KL(p‖q) = Σ p (log p − log q) over `axis`, with 0·log 0 = 0.

  Entries with log p = -inf contribute 0; their log-probs are replaced *before* the arithmetic
  so the backward pass never sees inf − inf (a where on the output alone leaks NaN gradients).
  """
  ok = jnp.isfinite(logp)
  logp = jnp.where(ok, logp, 0.0)
  logq = jnp.where(ok, logq, 0.0)
  return jnp.sum(jnp.where(ok, jnp.exp(logp) * (logp - logq), 0.0), axis=axis)


def _log_mix(w, logp, logq):
  """log(w·p + (1−w)·q) via logaddexp of log-probs plus log weights."""
  v = _concrete(w)
  if v == 0.0:
    return logq
  if v == 1.0:
    return logp
  ok = jnp.isfinite(logp) | jnp.isfinite(logq)  # logaddexp(-inf, -inf) has NaN gradients
  w = jnp.asarray(w, jnp.float32)
  mixed = jnp.logaddexp(jnp.log(w) + jnp.where(ok, logp, 0.0),
                        jnp.log1p(-w) + jnp.where(ok, logq, 0.0))
  return jnp.where(ok, mixed, -jnp.inf)


def _t2(temperature):
  return jnp.square(jnp.asarray(temperature, jnp.float32))


# ----------------------------------------------------------------------------- per token


def kl_per_token(student_logits, teacher_logits, *, temperature):
  """T²·KL(p_T‖p_S) per token (forward KL, Hinton et al.)."""
  logp_s, logp_t = _log_probs(student_logits, teacher_logits, temperature)
  return _t2(temperature) * kl_from_log_probs(logp_t, logp_s)


def reverse_kl_per_token(student_logits, teacher_logits, *, temperature):
  """T²·KL(p_S‖p_T) per token (mode seeking)."""
  logp_s, logp_t = _log_probs(student_logits, teacher_logits, temperature)
  return _t2(temperature) * kl_from_log_probs(logp_s, logp_t)


def jsd_per_token(student_logits, teacher_logits, *, temperature, beta=0.5):
  """T²·[β·KL(p_T‖M) + (1−β)·KL(p_S‖M)] with M = β·p_T + (1−β)·p_S."""
  b = _check_weight('beta', beta)
  logp_s, logp_t = _log_probs(student_logits, teacher_logits, temperature)
  if b in (0.0, 1.0):  # M equals one of the two: the divergence is identically 0
    return jnp.zeros(logp_s.shape[:-1], jnp.float32)
  logm = _log_mix(beta, logp_t, logp_s)
  beta = jnp.asarray(beta, jnp.float32)
  jsd = beta * kl_from_log_probs(logp_t, logm) + (1.0 - beta) * kl_from_log_probs(logp_s, logm)
  return _t2(temperature) * jsd


def tvd_per_token(student_logits, teacher_logits, *, temperature):
  """T²·½Σ|p_T − p_S| per token."""
  logp_s, logp_t = _log_probs(student_logits, teacher_logits, temperature)
  tvd = 0.5 * jnp.sum(jnp.abs(jnp.exp(logp_t) - jnp.exp(logp_s)), axis=-1)
  return _t2(temperature) * tvd


def skew_kl_per_token(student_logits, teacher_logits, *, temperature, alpha=0.1):
  """T²·KL(p_T ‖ α·p_T + (1−α)·p_S) per token (DistiLLM skew KL)."""
  _check_weight('alpha', alpha)
  logp_s, logp_t = _log_probs(student_logits, teacher_logits, temperature)
  return _t2(temperature) * kl_from_log_probs(logp_t, _log_mix(alpha, logp_t, logp_s))


def skew_reverse_kl_per_token(student_logits, teacher_logits, *, temperature, alpha=0.1):
  """T²·KL(p_S ‖ α·p_S + (1−α)·p_T) per token (DistiLLM skew reverse KL)."""
  _check_weight('alpha', alpha)
  logp_s, logp_t = _log_probs(student_logits, teacher_logits, temperature)
  return _t2(temperature) * kl_from_log_probs(logp_s, _log_mix(alpha, logp_s, logp_t))


# ----------------------------------------------------------------------------- (sum, count)


def kl_sum(student_logits, teacher_logits, *, mask=None, temperature=1.0):
  return masked_sum(kl_per_token(student_logits, teacher_logits, temperature=temperature), mask)


def reverse_kl_sum(student_logits, teacher_logits, *, mask=None, temperature=1.0):
  per_token = reverse_kl_per_token(student_logits, teacher_logits, temperature=temperature)
  return masked_sum(per_token, mask)


def jsd_sum(student_logits, teacher_logits, *, mask=None, temperature=1.0, beta=0.5):
  per_token = jsd_per_token(student_logits, teacher_logits, temperature=temperature, beta=beta)
  return masked_sum(per_token, mask)


def tvd_sum(student_logits, teacher_logits, *, mask=None, temperature=1.0):
  return masked_sum(tvd_per_token(student_logits, teacher_logits, temperature=temperature), mask)


def skew_kl_sum(student_logits, teacher_logits, *, mask=None, temperature=1.0, alpha=0.1):
  per_token = skew_kl_per_token(
      student_logits, teacher_logits, temperature=temperature, alpha=alpha)
  return masked_sum(per_token, mask)


def skew_reverse_kl_sum(student_logits, teacher_logits, *, mask=None, temperature=1.0,
                        alpha=0.1):
  per_token = skew_reverse_kl_per_token(
      student_logits, teacher_logits, temperature=temperature, alpha=alpha)
  return masked_sum(per_token, mask)


# ----------------------------------------------------------------------------- means


def kl(student_logits, teacher_logits, *, mask=None, temperature=1.0):
  return mean(kl_sum(student_logits, teacher_logits, mask=mask, temperature=temperature))


def reverse_kl(student_logits, teacher_logits, *, mask=None, temperature=1.0):
  return mean(reverse_kl_sum(student_logits, teacher_logits, mask=mask, temperature=temperature))


def jsd(student_logits, teacher_logits, *, mask=None, temperature=1.0, beta=0.5):
  return mean(jsd_sum(student_logits, teacher_logits, mask=mask, temperature=temperature,
                      beta=beta))


def tvd(student_logits, teacher_logits, *, mask=None, temperature=1.0):
  return mean(tvd_sum(student_logits, teacher_logits, mask=mask, temperature=temperature))


def skew_kl(student_logits, teacher_logits, *, mask=None, temperature=1.0, alpha=0.1):
  return mean(skew_kl_sum(student_logits, teacher_logits, mask=mask, temperature=temperature,
                          alpha=alpha))


def skew_reverse_kl(student_logits, teacher_logits, *, mask=None, temperature=1.0, alpha=0.1):
  return mean(skew_reverse_kl_sum(student_logits, teacher_logits, mask=mask,
                                  temperature=temperature, alpha=alpha))


# ----------------------------------------------------------------------------- hard labels


def ce_sum(logits, labels, *, mask=None, label_smoothing=0.0, temperature=None):
  """Hard-label cross-entropy -> (sum, count); target (1−ε)·onehot + ε/V.

  `temperature` is accepted and ignored so every logit loss takes the same keywords.
  """
  del temperature
  eps = _check_weight('label_smoothing', label_smoothing)
  logits = jnp.asarray(logits, jnp.float32)
  labels = jnp.asarray(labels)
  if labels.shape != logits.shape[:-1]:
    raise ValueError(f'labels shape {labels.shape} must equal logits shape without the vocab '
                     f'axis, {logits.shape[:-1]}.')
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f'labels must be integer token ids, got dtype {labels.dtype}.')
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
  if eps != 0.0:
    smooth = -jnp.mean(logp, axis=-1)
    eps = jnp.asarray(label_smoothing, jnp.float32)
    nll = (1.0 - eps) * nll + eps * smooth
  return masked_sum(nll, mask)


def ce(logits, labels, *, mask=None, label_smoothing=0.0, temperature=None):
  return mean(ce_sum(logits, labels, mask=mask, label_smoothing=label_smoothing,
                     temperature=temperature))


DIVERGENCES = {
    'kl': kl_sum,
    'reverse_kl': reverse_kl_sum,
    'jsd': jsd_sum,
    'tvd': tvd_sum,
    'skew_kl': skew_kl_sum,
    'skew_reverse_kl': skew_reverse_kl_sum,
}
