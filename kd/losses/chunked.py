"""Logit losses over sequence chunks: the [B, T, V] logits are never held whole. The plain
engine recomputes each chunk's logits in the backward pass; the fused one makes the gradient
in the forward pass from closed-form terms (kd.losses.closed_form)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from kd.losses.closed_form import CLOSED_FORM, _terms_with_grad, closed_form_applies
from kd.losses.logits import DIVERGENCES, _check_temperature, ce_sum


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
  """[B, T, ...] -> [n, B, C, ...]: n = ceil(T / chunk_size) chunks of C = ceil(T / n) <=
  chunk_size positions, so the padding is under n positions (a chunk_size past T would
  otherwise compute logits for positions that do not exist); the last chunk is padded (`mode`
  as in jnp.pad: zeros, or 'edge' to repeat the last token)."""
  b, t = x_BxTx.shape[:2]
  n = math.ceil(t / chunk_size)
  c = math.ceil(t / n)
  x = jnp.pad(x_BxTx, [(0, 0), (0, n * c - t)] + [(0, 0)] * (x_BxTx.ndim - 2), mode=mode)
  return jnp.moveaxis(x.reshape((b, n, c) + x.shape[2:]), 1, 0)


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

  `terms` maps a loss name (a key of DIVERGENCES, or 'ce' which uses `labels`) to its kwargs (a term
  may carry its own 'temperature'). The sequence is scanned in chunks of at most `chunk_size`
  (to_chunks); each chunk projects both models and evaluates every term under `jax.checkpoint`, so
  the backward pass recomputes [B, C, V] logits per chunk instead of storing them. Teacher logits
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
