"""Logit distillation losses: divergences between softened distributions, and hard-label CE.

Every loss is computed in float32 whatever the input dtype and comes in three forms:
`<name>_per_token` (float32 [...], already multiplied by T²), `<name>_sum` -> (sum, count) over
unmasked tokens, and `<name>` -> sum / max(count, 1). Logits are [..., V], masks are [...].

Vocab entries that are -inf in *both* models (masked vocab) are skipped with where-guards on
the inputs of every log/exp, so values and gradients stay finite.
"""

import functools
import math

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


# ----------------------------------------------------------------------------- chunked


def _chunk_inputs(terms, student_hidden_BxTxD, teacher_hidden_BxTxE, labels, mask, temperature,
                  chunk_size, divergences):
  """Checks the arguments of the chunked paths -> (needs_teacher, chunks, unchunk).

  `chunks` = (student hidden, teacher hidden or None, mask, labels), each [n, B, C, ...] with
  the last chunk padded (and masked); `unchunk` maps an [n, B, C, ...] array back to [B, T, ...].
  The teacher's input may be any pytree of [B, T, ...] arrays; its padding repeats the last
  token, so a divergence function never sees a made-up all-zero teacher row (it is masked).
  """
  unknown = sorted(set(terms) - set(divergences) - {'ce'})
  if unknown:
    raise ValueError(f'unknown logit loss(es) {unknown}; valid: {sorted(divergences) + ["ce"]}.')
  if 'ce' in terms and labels is None:
    raise ValueError("the 'ce' term needs labels=...; pass the target token ids [B, T].")
  needs_teacher = any(name != 'ce' for name in terms)
  if needs_teacher and teacher_hidden_BxTxE is None:
    raise ValueError('divergence terms need teacher_hidden_BxTxE and teacher_project.')
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f'chunk_size must be a positive int, got {chunk_size!r}.')
  _check_temperature(temperature)

  b, t = student_hidden_BxTxD.shape[:2]
  if needs_teacher and any(x.shape[:2] != (b, t) for x in jax.tree.leaves(teacher_hidden_BxTxE)):
    raise ValueError(f'student hidden {student_hidden_BxTxD.shape} and teacher input '
                     f'{jax.tree.map(jnp.shape, teacher_hidden_BxTxE)} must share [B, T].')
  mask_BxT = jnp.ones((b, t), bool) if mask is None else jnp.asarray(mask).astype(bool)
  labels_BxT = jnp.zeros((b, t), jnp.int32) if labels is None else jnp.asarray(labels)
  for what, arr in (('mask', mask_BxT), ('labels', labels_BxT)):
    if arr.shape != (b, t):
      raise ValueError(f'{what} shape {arr.shape} must be [B, T] = {(b, t)}.')

  chunk = functools.partial(to_chunks, chunk_size=chunk_size)
  chunks = (chunk(student_hidden_BxTxD),
            jax.tree.map(lambda x: chunk(x, mode='edge'), teacher_hidden_BxTxE)
            if needs_teacher else None,
            chunk(mask_BxT), chunk(labels_BxT))
  return needs_teacher, chunks, functools.partial(from_chunks, length=t)


def to_chunks(x_BxTx, chunk_size: int, mode='constant'):
  """[B, T, ...] -> [n, B, C, ...] with n = ceil(T / C); the last chunk is padded (`mode` as in
  jnp.pad: zeros, or 'edge' to repeat the last token)."""
  b, t = x_BxTx.shape[:2]
  n = math.ceil(t / chunk_size)
  x = jnp.pad(x_BxTx, [(0, 0), (0, n * chunk_size - t)] + [(0, 0)] * (x_BxTx.ndim - 2), mode=mode)
  return jnp.moveaxis(x.reshape((b, n, chunk_size) + x.shape[2:]), 1, 0)


def from_chunks(x_nxBxCx, length: int):
  """The inverse of `to_chunks`: [n, B, C, ...] -> [B, length, ...], the padding dropped."""
  n, b, c = x_nxBxCx.shape[:3]
  return jnp.moveaxis(x_nxBxCx, 0, 1).reshape((b, n * c) + x_nxBxCx.shape[3:])[:, :length]


def _terms_of_logits(terms, logits_BxCxV, teacher_BxCxV, mask_BxC, labels_BxC, temperature,
                     divergences):
  out = {}
  for name, kw in terms.items():
    kw = dict(kw or {})
    if name == 'ce':
      out[name] = ce_sum(logits_BxCxV, labels_BxC, mask=mask_BxC, **kw)
    else:
      kw.setdefault('temperature', temperature)
      out[name] = divergences[name](logits_BxCxV, teacher_BxCxV, mask=mask_BxC, **kw)
  return out


def chunked_logit_losses(terms, student_hidden_BxTxD, student_project, teacher_hidden_BxTxE,
                         teacher_project, *, labels=None, mask=None, temperature=1.0,
                         chunk_size=128, divergences=None):
  """Logit losses from hidden states without ever holding [B, T, V] logits.

  `terms` maps a loss name (a key of DIVERGENCES, or 'ce' which uses `labels`) to its kwargs
  (a term may carry its own 'temperature'). The sequence is scanned in chunks of `chunk_size`;
  each chunk projects both models and evaluates every term under `jax.checkpoint`, so the
  backward pass recomputes [B, C, V] logits per chunk instead of storing them. Teacher logits
  are gradient-stopped. Returns {name: (sum, count)}, equal to projecting fully then `<name>_sum`.
  `fused_logit_losses` does the same work without the recomputation, when the loss weights are
  known before the backward pass (they are in kd.train.step).

  `teacher_hidden_BxTxE` may be any pytree of [B, T, ...] arrays and `teacher_project` any map
  of its chunk to what the divergences take as the teacher: with `divergences` ({name:
  fn(student_logits, teacher, *, mask, temperature, **kw) -> (sum, count)}, by default
  DIVERGENCES) that is how a cached top-k teacher is chunked (kd.losses.topk.chunk_divergences).
  """
  divergences = DIVERGENCES if divergences is None else divergences
  needs_teacher, xs, _ = _chunk_inputs(terms, student_hidden_BxTxD, teacher_hidden_BxTxE, labels,
                                       mask, temperature, chunk_size, divergences)

  @jax.checkpoint
  def chunk_terms(hs_BxCxD, ht_BxCxE, mask_BxC, labels_BxC):
    teacher_BxCxV = (jax.lax.stop_gradient(teacher_project(ht_BxCxE)) if needs_teacher
                     else None)
    return _terms_of_logits(terms, student_project(hs_BxCxD), teacher_BxCxV, mask_BxC,
                            labels_BxC, temperature, divergences)

  def step(acc, chunk):
    out = chunk_terms(*chunk)
    return jax.tree.map(jnp.add, acc, out), None

  zero = jnp.zeros((), jnp.float32)
  init = {name: (zero, zero) for name in terms}
  totals, _ = jax.lax.scan(step, init, xs)
  return totals


# Terms (and their kwargs) whose gradient with respect to the student's logits
# `_terms_with_grad` writes in closed form.
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


def fused_logit_losses(terms, coeffs, student_hidden_BxTxD, head_params, student_project,
                       teacher_hidden_BxTxE, teacher_project, *, labels=None, mask=None,
                       temperature=1.0, chunk_size=128, closed_form=None, divergences=None):
  """The chunked logit losses with their gradient made in the forward pass (no recomputation).

  For each chunk of the sequence both heads project once, every term is evaluated, and
  `jax.vjp` of Σ_i coeffs[i]·sum_i gives that chunk's gradients with respect to the student's
  hidden states and head parameters right away; the [B, C, V] logits are then dropped. The
  backward pass has nothing left to recompute (chunked_logit_losses projects both heads a second
  time there), and only [B, T, D] and head-sized gradients are kept.

  Args:
    terms: as in chunked_logit_losses.
    coeffs: {name: weight}, the objective's weight of each term's *sum* (in kd.train.step
      w_i(step) / global count_i); not differentiated.
    student_hidden_BxTxD: the student's final hidden states.
    head_params: the student's head parameters (any pytree); gradients reach them.
    student_project: (head_params, h [..., D]) -> logits [..., V].
    teacher_hidden_BxTxE, teacher_project, labels, mask, temperature, chunk_size: as in
      chunked_logit_losses.
    closed_form: write the logits' gradient in closed form (`_terms_with_grad`: fewer
      [B, C, V] arrays live per chunk) rather than by autodiff of the terms. None: when every
      term allows it (`closed_form_applies`: the names and kwargs of CLOSED_FORM, for the
      built-in divergences).
    divergences: as in chunked_logit_losses; a name it maps to its own function is
      differentiated by autodiff, or by the function's `with_grad(logits, teacher, *, mask,
      temperature, **kw) -> ((sum, count), d sum / d logits)` when it has one and closed_form
      allows (as kd.losses.topk.chunk_divergences' has).

  Returns:
    ({name: (sum, count)} with gradient-stopped sums, surrogate): `surrogate` is exactly 0 and
    its gradient with respect to the hidden states and head parameters is that of
    Σ_i coeffs[i]·sum_i. Add it to the objective (together with the stopped sums' weighted
    value) to train on the terms.
  """
  divergences = DIVERGENCES if divergences is None else divergences
  needs_teacher, xs, unchunk = _chunk_inputs(terms, student_hidden_BxTxD, teacher_hidden_BxTxE,
                                             labels, mask, temperature, chunk_size, divergences)
  sg = jax.lax.stop_gradient
  fixed_params, coeffs = sg(head_params), sg(dict(coeffs))
  missing = sorted(set(terms) - set(coeffs))
  if missing:
    raise ValueError(f'coeffs has no weight for {missing}; give one per term.')
  hs_chunks = sg(xs[0])
  own = {n: divergences[n] for n in terms
         if n != 'ce' and divergences[n] is not DIVERGENCES.get(n)}
  applies = (closed_form_applies({n: kw for n, kw in terms.items() if n not in own})
             and all(hasattr(fn, 'with_grad') for fn in own.values()))
  if closed_form is None:
    closed_form = applies
  elif closed_form and not applies:
    raise ValueError(f'closed_form=True covers {sorted(CLOSED_FORM)} with kwargs '
                     f'{ {k: sorted(v) for k, v in CLOSED_FORM.items()} }, and divergence '
                     f'functions with a `with_grad`, not {dict(terms)} (own functions: '
                     f'{sorted(own)}); pass closed_form=None to use it only where it applies.')

  def step(carry, chunk):
    acc, d_params = carry
    hs_BxCxD, ht_BxCxE, mask_BxC, labels_BxC = chunk
    teacher_BxCxV = sg(teacher_project(ht_BxCxE)) if needs_teacher else None

    if closed_form:
      logits_BxCxV, project_vjp = jax.vjp(student_project, fixed_params, hs_BxCxD)
      out, d_logits = _terms_with_grad(terms, coeffs, logits_BxCxV, teacher_BxCxV, mask_BxC,
                                       labels_BxC, temperature, own)
      d_chunk_params, d_h_BxCxD = project_vjp(d_logits.astype(logits_BxCxV.dtype))
    else:
      def weighted(params, h_BxCxD):
        out = _terms_of_logits(terms, student_project(params, h_BxCxD), teacher_BxCxV,
                               mask_BxC, labels_BxC, temperature, divergences)
        return sum(coeffs[n] * s for n, (s, _) in out.items()), out

      _, vjp, out = jax.vjp(weighted, fixed_params, hs_BxCxD, has_aux=True)
      d_chunk_params, d_h_BxCxD = vjp(jnp.ones((), jnp.float32))
    return (jax.tree.map(jnp.add, acc, out),
            jax.tree.map(jnp.add, d_params, d_chunk_params)), d_h_BxCxD

  zero = jnp.zeros((), jnp.float32)
  init = ({name: (zero, zero) for name in terms}, jax.tree.map(jnp.zeros_like, fixed_params))
  (totals, d_params), d_h = jax.lax.scan(step, init, (hs_chunks, *xs[1:]))
  d_h_BxTxD = sg(unchunk(d_h))

  def inner(grad, x):  # value 0; d/dx = grad
    return jnp.sum(grad.astype(jnp.float32) * (x - sg(x)).astype(jnp.float32))

  surrogate = inner(d_h_BxTxD, student_hidden_BxTxD) + sum(
      inner(g, p) for g, p in zip(jax.tree.leaves(sg(d_params)), jax.tree.leaves(head_params)))
  return sg(totals), surrogate
