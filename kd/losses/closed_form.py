"""Closed-form gradients of the logit losses with respect to the student's logits: for a
chunk, each term's value and d(value)/d(logits) from the log-probabilities alone, so the fused
chunked engine (kd.losses.chunked) never differentiates through the softmax."""

from __future__ import annotations


import jax.numpy as jnp

from kd.losses.logits import (_check_pair, _check_temperature, _check_weight, _log_mix,
                              kl_from_log_probs)


CLOSED_FORM = {'kl': {'temperature'}, 'reverse_kl': {'temperature'}, 'tvd': {'temperature'},
               'jsd': {'temperature', 'beta'}, 'skew_kl': {'temperature', 'alpha'},
               'skew_reverse_kl': {'temperature', 'alpha'},
               'ce': {'label_smoothing', 'temperature'}}


def closed_form_applies(terms) -> bool:
  """Whether every term of `terms` ({name: kwargs}) has a closed-form logit gradient."""
  return all(n in CLOSED_FORM and set(kw or {}) <= CLOSED_FORM[n] for n, kw in terms.items())


def _divergence_and_h(name, kw, lq, lp):
  """(D per token, h = q ⊙ ∂D/∂q) of divergence `name` between the student's log-probs `lq`
  and the teacher's `lp` (float32 [..., V], -inf allowed), q = e^lq and p = e^lp.

  With q = softmax(a), ∂D/∂a = h − q·Σh (the softmax Jacobian), so each divergence needs its
  value and one elementwise array h. Constants in ∂D/∂q cancel there (Σq = 1) and are left out.
  h is written in log space where ∂D/∂q has a ratio (p/m, q/m), so a tiny q or m never makes
  0·inf.
  """
  ok_q = jnp.isfinite(lq)
  q = jnp.exp(lq)
  if name == 'tvd':  # ∂/∂q = −½ sign(p − q)
    p = jnp.exp(lp)
    return 0.5 * jnp.sum(jnp.abs(p - q), axis=-1), -0.5 * q * jnp.sign(p - q)
  if name == 'skew_kl':  # KL(p‖m), m = αp + (1−α)q: ∂/∂q = −(1−α)·p/m
    alpha = kw.get('alpha', 0.1)
    _check_weight('alpha', alpha)
    lm = _log_mix(alpha, lp, lq)
    ok = ok_q & jnp.isfinite(lp)
    h = -(1.0 - jnp.asarray(alpha, jnp.float32)) * jnp.exp(
        jnp.where(ok, lq + lp - jnp.where(ok, lm, 0.0), -jnp.inf))
    return kl_from_log_probs(lp, lm), h
  if name == 'skew_reverse_kl':  # KL(q‖m), m = αq + (1−α)p: ∂/∂q = log q − log m − α·q/m (+1)
    alpha = kw.get('alpha', 0.1)
    if _check_weight('alpha', alpha) == 1.0:  # m = q: identically 0
      return jnp.zeros(lq.shape[:-1], jnp.float32), jnp.zeros_like(lq)
    lm = _log_mix(alpha, lq, lp)
    lq0, lm0 = jnp.where(ok_q, lq, 0.0), jnp.where(ok_q, lm, 0.0)
    h = jnp.where(ok_q, q * (lq0 - lm0) - jnp.asarray(alpha, jnp.float32)
                  * jnp.exp(2.0 * lq0 - lm0), 0.0)
    return kl_from_log_probs(lq, lm), h
  if name == 'jsd':  # β·KL(p‖m) + (1−β)·KL(q‖m), m = βp + (1−β)q: ∂/∂q = (1−β)·log(q/m) (+c)
    beta = _check_weight('beta', kw.get('beta', 0.5))
    if beta in (0.0, 1.0):  # M equals one of the two: identically 0, as jsd_per_token
      return jnp.zeros(lq.shape[:-1], jnp.float32), jnp.zeros_like(lq)
    lm = _log_mix(beta, lp, lq)
    beta = jnp.asarray(kw.get('beta', 0.5), jnp.float32)
    d = beta * kl_from_log_probs(lp, lm) + (1.0 - beta) * kl_from_log_probs(lq, lm)
    lq0, lm0 = jnp.where(ok_q, lq, 0.0), jnp.where(ok_q, lm, 0.0)
    return d, (1.0 - beta) * jnp.where(ok_q, q * (lq0 - lm0), 0.0)
  raise ValueError(f'no closed form for {name!r}; valid: {sorted(CLOSED_FORM)}.')


def _terms_with_grad(terms, coeffs, logits_BxCxV, teacher_BxCxV, mask_BxC, labels_BxC,
                     temperature, own=None):
  """({name: (sum, count)}, d/d logits of Σ coeffs[n]·sum_n) for the terms of CLOSED_FORM, and
  those `own` ({name: fn}) maps to a function with its own `with_grad` closed form.

  d(T²·KL(p_T‖p_S))/dz = T·(p_S − p_T) with p = softmax(z / T), and d CE/dz = softmax(z) −
  target, so a chunk needs its two logits arrays and the gradient, where autodiff of the terms
  keeps their log-probs for the backward pass too. Reverse KL's is T·q·(log q − log p − KL)
  with q = p_S; the other divergences go through the softmax Jacobian (`_divergence_and_h`):
  d(T²·D)/dz = T·(h − q·Σh). Same values as `_terms_of_logits`.

  Every row statistic is a sum over the vocabulary of an elementwise function of the logits,
  shifted by one row maximum per model (max(z / T) = max(z) / T for every T > 0), so the
  compiler can make them in one pass over the two arrays and the gradient in a second one: no
  logsumexp recomputes its own maximum, and no probabilities array is kept between the two.
  """
  z = jnp.asarray(logits_BxCxV, jnp.float32)
  mask = jnp.asarray(mask_BxC).astype(bool)
  count = jnp.sum(mask, dtype=jnp.float32)

  def row_max(x):  # [B, C, 1]; 0 for a row of -inf, as jax.nn.logsumexp does
    m = jnp.max(x, axis=-1, keepdims=True)
    return jnp.where(jnp.isfinite(m), m, 0.0)

  z_shift = z - row_max(z)  # <= 0
  zt_shift = None
  out, grads = {}, []
  for name, kw in terms.items():
    kw = dict(kw or {})
    if name == 'ce':
      eps = _check_weight('label_smoothing', kw.get('label_smoothing', 0.0))
      log_sum = jnp.log(jnp.sum(jnp.exp(z_shift), axis=-1))  # lse(z) - max(z)
      nll = log_sum - jnp.take_along_axis(z_shift, labels_BxC[..., None], axis=-1)[..., 0]
      onehot = labels_BxC[..., None] == jnp.arange(z.shape[-1])
      target = jnp.where(onehot, 1.0, 0.0)
      if eps != 0.0:
        nll = (1.0 - eps) * nll + eps * (log_sum - jnp.mean(z_shift, axis=-1))
        target = (1.0 - eps) * target + eps / z.shape[-1]
      out[name] = (jnp.sum(jnp.where(mask, nll, 0.0)), count)
      grads.append(coeffs[name] * (jnp.exp(z_shift - log_sum[..., None]) - target))
      continue
    t = kw.pop('temperature', temperature)
    if own and name in own:  # (sum, count), d sum / d logits
      out[name], grad = own[name].with_grad(logits_BxCxV, teacher_BxCxV, mask=mask, temperature=t,
                                            **kw)
      grads.append(coeffs[name] * grad)
      continue
    _check_temperature(t)
    _check_pair(logits_BxCxV, teacher_BxCxV)
    t = jnp.asarray(t, jnp.float32)
    if zt_shift is None:
      zt = jnp.asarray(teacher_BxCxV, jnp.float32)
      zt_shift = zt - row_max(zt)
    a, b = z_shift / t, zt_shift / t  # z / T and z_T / T, each less its row max
    sum_s, sum_t = jnp.sum(jnp.exp(a), axis=-1), jnp.sum(jnp.exp(b), axis=-1)
    if name == 'kl':
      # KL = Σ p_T (b − a) − log Σ e^b + log Σ e^a (the maxima cancel), with Σ p_T (b − a) =
      # Σ e^b (b − a) / Σ e^b: no log-prob arrays. Entries with p_T = 0 add 0.
      cross = jnp.sum(jnp.where(jnp.isfinite(b), jnp.exp(b) * (b - a), 0.0), axis=-1)
      per_token = cross / sum_t - jnp.log(sum_t) + jnp.log(sum_s)
      grad = jnp.exp(a) / sum_s[..., None] - jnp.exp(b) / sum_t[..., None]
    elif name == 'reverse_kl':
      # KL(q‖p) = Σ e^a (a − b) / Σ e^a − log Σ e^a + log Σ e^b; d/da = q·(log q − log p − KL).
      fa = jnp.isfinite(a)
      cross = jnp.sum(jnp.where(fa, jnp.exp(a) * (a - b), 0.0), axis=-1)
      shift = jnp.log(sum_t) - jnp.log(sum_s)
      per_token = cross / sum_s + shift
      grad = jnp.where(fa, jnp.exp(a) / sum_s[..., None]
                       * (a - b + (shift - per_token)[..., None]), 0.0)
    else:
      lq = a - jnp.log(sum_s)[..., None]
      per_token, h = _divergence_and_h(name, kw, lq, b - jnp.log(sum_t)[..., None])
      grad = h - jnp.exp(lq) * jnp.sum(h, axis=-1, keepdims=True)
    out[name] = (jnp.sum(jnp.where(mask, jnp.square(t) * per_token, 0.0)), count)
    grads.append(coeffs[name] * t * grad)
  return out, jnp.where(mask[..., None], sum(grads), 0.0)
