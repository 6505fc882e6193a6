"""The LM head fused with the logit losses: a Pallas kernel that reads hidden states and head
weights and returns the 'kl' and 'ce' sums, never writing an [N, V] logits array.

The forward pass tiles the rows into blocks and, inside each block, streams the vocabulary in
tiles with an online log-sum-exp (three per row: the student at T and at 1, the teacher at T)
and the running sums that give KL(p_T‖q_S) and the label's logit. The backward pass recomputes
each logits tile from those per-row statistics and forms the closed-form gradient of the
logits (as kd.losses.closed_form does),

  d logits = c_kl·T·(q_S − p_T) + c_ce·(softmax(s) − onehot(label)),  masked,

in two kernels: one over row blocks accumulates dh_s = d logits @ W_sᵀ across vocab tiles, one
over vocab tiles accumulates dW_s = h_sᵀ @ d logits across row blocks, so neither needs atomics
or a cross-program reduction. The coefficients c are the cotangents of the two sums, so
`fused_head_losses` is an ordinary differentiable function of (h_s, W_s); `fused_head_kd` puts
it in the (stopped sums, zero surrogate) contract of kd.losses.fused_logit_losses.

Columns at or past `vocab` (a padded head) take no part in any softmax, and their dW_s is 0.
Inputs may be float32 or bfloat16; matmuls accumulate in float32 and so do all statistics.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kd.losses.logits import _check_temperature

TERMS = ('ce', 'kl')

_F32 = jnp.float32
_NT = (((1,), (1,)), ((), ()))  # x @ yᵀ
_TN = (((0,), (0,)), ((), ()))  # xᵀ @ y


@dataclasses.dataclass(frozen=True)
class _Plan:
  """What a kernel is specialised on (hashable: a nondiff argument of the custom_vjp)."""
  kl: bool
  ce: bool
  vocab: int
  block_rows: int
  block_vocab: int
  interpret: bool

  @property
  def vocab_tiles(self) -> int:
    return math.ceil(self.vocab / self.block_vocab)

  @property
  def stats(self) -> tuple:  # per-row statistics the backward pass reads
    return (('lse_a', 'lse_b') if self.kl else ()) + (('lse_1',) if self.ce else ())

  @property
  def rows(self) -> tuple:  # per-row outputs of the forward kernel
    return (('kl',) if self.kl else ()) + (('ce',) if self.ce else ()) + self.stats


# ----------------------------------------------------------------------------- kernels


def _unpack(plan, refs, stats=False):
  """refs in kernel order -> {name: ref} and the rest (the outputs)."""
  names = ['scal', 'hs', 'ws'] + (['ht', 'wt'] if plan.kl else []) + (['lab'] if plan.ce else [])
  if stats:
    names += ['mask', *plan.stats]
  return dict(zip(names, refs)), refs[len(names):]


def _tile(plan, ref, start):
  """Columns [start, start + block_vocab) of a [D, V] head ref, and which of them are < vocab."""
  cols = start + lax.broadcasted_iota(jnp.int32, (1, plan.block_vocab), 1)
  return ref[:, pl.ds(start, plan.block_vocab)], cols < plan.vocab


def _stats_kernel(plan, *refs):
  """One row block: stream the vocab tiles -> per-row KL·T², CE and log-sum-exps."""
  r, outs = _unpack(plan, refs)
  inv_t, t = r['scal'][0, 0], r['scal'][0, 1]
  hs = r['hs'][...]
  ht = r['ht'][...] if plan.kl else None
  labels = r['lab'][...] if plan.ce else None
  zero = jnp.zeros((plan.block_rows, 1), _F32)
  neg = jnp.full((plan.block_rows, 1), -jnp.inf, _F32)

  def body(j, c):
    start = pl.multiple_of(j * plan.block_vocab, plan.block_vocab)
    ws, valid = _tile(plan, r['ws'], start)
    s = jnp.dot(hs, ws, preferred_element_type=_F32)
    s_in = jnp.where(valid, s, -jnp.inf)
    m = jnp.maximum(c['m'], jnp.max(s_in, axis=1, keepdims=True))  # max(s / T) = max(s) / T
    out = dict(m=m)
    if plan.ce:
      out['l1'] = c['l1'] * jnp.exp(c['m'] - m) + jnp.sum(jnp.exp(s_in - m), axis=1, keepdims=True)
      hit = (lax.broadcasted_iota(jnp.int32, s.shape, 1) + start) == labels
      out['lab'] = c['lab'] + jnp.sum(jnp.where(hit & valid, s, 0.0), axis=1, keepdims=True)
    if plan.kl:
      wt, _ = _tile(plan, r['wt'], start)
      tl = jnp.dot(ht, wt, preferred_element_type=_F32)
      t_in = jnp.where(valid, tl, -jnp.inf)
      mt = jnp.maximum(c['mt'], jnp.max(t_in, axis=1, keepdims=True))
      out['la'] = (c['la'] * jnp.exp((c['m'] - m) * inv_t)
                   + jnp.sum(jnp.exp((s_in - m) * inv_t), axis=1, keepdims=True))
      e_b = jnp.exp((t_in - mt) * inv_t)  # 0 past vocab
      rescale = jnp.exp((c['mt'] - mt) * inv_t)
      out['mt'] = mt
      out['lb'] = c['lb'] * rescale + jnp.sum(e_b, axis=1, keepdims=True)
      cross = jnp.where(valid, e_b * (tl - s) * inv_t, 0.0)  # Σ e^(b − max b)·(b − a)
      out['x'] = c['x'] * rescale + jnp.sum(cross, axis=1, keepdims=True)
    return out

  init = dict(m=neg)
  if plan.ce:
    init.update(l1=zero, lab=zero)
  if plan.kl:
    init.update(mt=neg, la=zero, lb=zero, x=zero)
  c = lax.fori_loop(0, plan.vocab_tiles, body, init)
  rows = {}
  if plan.kl:
    rows['lse_a'] = c['m'] * inv_t + jnp.log(c['la'])
    rows['lse_b'] = c['mt'] * inv_t + jnp.log(c['lb'])
    # KL(p_T‖q_S) = Σ p_T (b − a) − lse(b) + lse(a), with a = s / T and b = t / T.
    rows['kl'] = t * t * (c['x'] / c['lb'] - rows['lse_b'] + rows['lse_a'])
  if plan.ce:
    rows['lse_1'] = c['m'] + jnp.log(c['l1'])
    rows['ce'] = rows['lse_1'] - c['lab']
  for name, ref in zip(plan.rows, outs):
    ref[...] = rows[name]


def _d_logits(plan, r, hs, ht, labels, row_ok, stats, start):
  """(d logits [rows, block_vocab] float32, W_s tile) for the vocab tile at `start`."""
  inv_t, t, c_kl, c_ce = (r['scal'][0, k] for k in range(4))
  ws, valid = _tile(plan, r['ws'], start)
  s = jnp.where(valid, jnp.dot(hs, ws, preferred_element_type=_F32), -jnp.inf)
  g = jnp.zeros(s.shape, _F32)
  if plan.kl:  # d(T²·KL)/ds = T·(q_S − p_T)
    wt, _ = _tile(plan, r['wt'], start)
    tl = jnp.where(valid, jnp.dot(ht, wt, preferred_element_type=_F32), -jnp.inf)
    q = jnp.exp(s * inv_t - stats['lse_a'])
    p = jnp.exp(tl * inv_t - stats['lse_b'])
    g = g + (c_kl * t) * (q - p)
  if plan.ce:
    hit = (lax.broadcasted_iota(jnp.int32, s.shape, 1) + start) == labels
    g = g + c_ce * (jnp.exp(s - stats['lse_1']) - jnp.where(hit, 1.0, 0.0))
  return jnp.where(valid & row_ok, g, 0.0), ws


def _grad_h_kernel(plan, *refs):
  """One row block: dh_s = Σ over vocab tiles of d logits @ W_s tileᵀ."""
  r, (dh_ref,) = _unpack(plan, refs, stats=True)
  hs = r['hs'][...]
  ht = r['ht'][...] if plan.kl else None
  labels = r['lab'][...] if plan.ce else None
  row_ok = r['mask'][...] > 0
  stats = {n: r[n][...] for n in plan.stats}

  def body(j, acc):
    start = pl.multiple_of(j * plan.block_vocab, plan.block_vocab)
    g, ws = _d_logits(plan, r, hs, ht, labels, row_ok, stats, start)
    return acc + lax.dot_general(g.astype(ws.dtype), ws, _NT, preferred_element_type=_F32)

  acc = lax.fori_loop(0, plan.vocab_tiles, body, jnp.zeros(dh_ref.shape, _F32))
  dh_ref[...] = acc.astype(dh_ref.dtype)


def _grad_w_kernel(plan, n_blocks, *refs):
  """One vocab tile: dW_s tile = Σ over row blocks of h_sᵀ @ d logits."""
  r, (dw_ref,) = _unpack(plan, refs, stats=True)
  start = pl.program_id(0) * plan.block_vocab

  def body(i, acc):
    rows = pl.ds(pl.multiple_of(i * plan.block_rows, plan.block_rows), plan.block_rows)
    hs = r['hs'][rows, :]
    ht = r['ht'][rows, :] if plan.kl else None
    labels = r['lab'][rows, :] if plan.ce else None
    stats = {n: r[n][rows, :] for n in plan.stats}
    g, _ = _d_logits(plan, r, hs, ht, labels, r['mask'][rows, :] > 0, stats, start)
    return acc + lax.dot_general(hs, g.astype(hs.dtype), _TN, preferred_element_type=_F32)

  acc = lax.fori_loop(0, n_blocks, body, jnp.zeros(dw_ref.shape, _F32))
  dw_ref[...] = acc.astype(dw_ref.dtype)


# ----------------------------------------------------------------------------- pallas calls


def _inputs(plan, scal, hs, ws, ht, wt, labels, extra=(), rows_whole=False):
  """(arrays, in_specs) in kernel order: row-indexed arrays by row block (whole when
  `rows_whole`), heads whole, `extra` ([Np, 1] arrays) like the rows."""
  bn = plan.block_rows

  def whole(x):
    return pl.BlockSpec(x.shape, lambda i: (0,) * x.ndim)

  def by_rows(x):
    return whole(x) if rows_whole else pl.BlockSpec((bn, x.shape[1]), lambda i: (i, 0))

  arrays = [scal, hs, ws] + ([ht, wt] if plan.kl else []) + ([labels] if plan.ce else [])
  arrays += list(extra)
  specs = [whole(scal), by_rows(hs), whole(ws)]
  if plan.kl:
    specs += [by_rows(ht), whole(wt)]
  if plan.ce:
    specs.append(by_rows(labels))
  specs += [by_rows(x) for x in extra]
  return arrays, specs


def _forward(plan, scal, hs, ws, ht, wt, labels):
  n = hs.shape[0]
  arrays, specs = _inputs(plan, scal, hs, ws, ht, wt, labels)
  out = pl.pallas_call(
      functools.partial(_stats_kernel, plan), grid=(n // plan.block_rows,), in_specs=specs,
      out_specs=[pl.BlockSpec((plan.block_rows, 1), lambda i: (i, 0)) for _ in plan.rows],
      out_shape=[jax.ShapeDtypeStruct((n, 1), _F32) for _ in plan.rows],
      interpret=plan.interpret, name='fused_head_kd_forward')(*arrays)
  return {name: x[:, 0] for name, x in zip(plan.rows, out)}


def _backward(plan, scal, hs, ws, ht, wt, labels, mask, stats):
  n, bn, bv = hs.shape[0], plan.block_rows, plan.block_vocab
  extra = [mask[:, None].astype(_F32)] + [stats[k][:, None] for k in plan.stats]
  arrays, specs = _inputs(plan, scal, hs, ws, ht, wt, labels, extra)
  dh = pl.pallas_call(
      functools.partial(_grad_h_kernel, plan), grid=(n // bn,), in_specs=specs,
      out_specs=pl.BlockSpec((bn, hs.shape[1]), lambda i: (i, 0)),
      out_shape=jax.ShapeDtypeStruct(hs.shape, hs.dtype),
      interpret=plan.interpret, name='fused_head_kd_grad_h')(*arrays)
  arrays, specs = _inputs(plan, scal, hs, ws, ht, wt, labels, extra, rows_whole=True)
  tiles = plan.vocab_tiles
  dw = pl.pallas_call(
      functools.partial(_grad_w_kernel, plan, n // bn), grid=(tiles,), in_specs=specs,
      out_specs=pl.BlockSpec((ws.shape[0], bv), lambda j: (0, j)),
      out_shape=jax.ShapeDtypeStruct((ws.shape[0], tiles * bv), ws.dtype),
      interpret=plan.interpret, name='fused_head_kd_grad_w')(*arrays)
  if dw.shape[1] < ws.shape[1]:  # columns no tile reaches (past vocab): zero gradient
    dw = jnp.pad(dw, ((0, 0), (0, ws.shape[1] - dw.shape[1])))
  return dh, dw


def _scalars(temperature, c_kl=0.0, c_ce=0.0):
  t = jnp.asarray(temperature, _F32)
  return jnp.stack([1.0 / t, t, jnp.asarray(c_kl, _F32), jnp.asarray(c_ce, _F32)])[None, :]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _head_sums(plan, hs, ws, ht, wt, labels, mask, temperature):
  return _head_sums_fwd(plan, hs, ws, ht, wt, labels, mask, temperature)[0]


def _head_sums_fwd(plan, hs, ws, ht, wt, labels, mask, temperature):
  rows = _forward(plan, _scalars(temperature), hs, ws, ht, wt, labels)
  sums = {n: jnp.sum(jnp.where(mask, rows[n], 0.0)) for n in ('kl', 'ce') if n in rows}
  stats = {n: rows[n] for n in plan.stats}
  return sums, (hs, ws, ht, wt, labels, mask, temperature, stats)


def _head_sums_bwd(plan, res, g):
  hs, ws, ht, wt, labels, mask, temperature, stats = res
  scal = _scalars(temperature, g.get('kl', 0.0), g.get('ce', 0.0))
  dh, dw = _backward(plan, scal, hs, ws, ht, wt, labels, mask, stats)
  # The teacher, labels, mask and temperature get no gradient.
  return dh, dw, None, None, None, None, None


_head_sums.defvjp(_head_sums_fwd, _head_sums_bwd)


# ----------------------------------------------------------------------------- public API


def _check(terms, h_s, w_s, h_t, w_t, labels, mask, vocab, block_rows, block_vocab):
  """Shape and argument checks, all before tracing a kernel -> (vocab, token shape)."""
  unknown = sorted(set(terms) - set(TERMS))
  if unknown or not terms:
    raise ValueError(f'fused_head_kd supports the terms {list(TERMS)} (weights may be 0), got '
                     f'{sorted(terms)}; compute other logit losses with '
                     'kd.losses.fused_logit_losses.')
  for name, b in (('block_rows', block_rows), ('block_vocab', block_vocab)):
    if not isinstance(b, int) or b < 1:
      raise ValueError(f'{name} must be a positive int, got {b!r}.')
  if block_rows % 8 or block_vocab % 128:
    raise ValueError(f'block_rows must be a multiple of 8 (16 suits bfloat16) and block_vocab '
                     f'a multiple of 128, got {block_rows} and {block_vocab}.')
  if jnp.ndim(h_s) < 2 or jnp.ndim(w_s) != 2 or h_s.shape[-1] != w_s.shape[0]:
    raise ValueError(f'h_s must be [..., D] and w_s [D, V], got {jnp.shape(h_s)} and '
                     f'{jnp.shape(w_s)}; pass a tied [V, D] embedding transposed (w.T).')
  tokens = h_s.shape[:-1]
  widths = [w_s.shape[1]]
  if 'kl' in terms:
    if h_t is None or w_t is None:
      raise ValueError("the 'kl' term needs the teacher's h_t [..., E] and w_t [E, V].")
    if jnp.ndim(w_t) != 2 or h_t.shape[:-1] != tokens or h_t.shape[-1] != w_t.shape[0]:
      raise ValueError(f'h_t must be [..., E] with the tokens {tokens} of h_s, and w_t [E, V]; '
                       f'got {jnp.shape(h_t)} and {jnp.shape(w_t)}.')
    widths.append(w_t.shape[1])
  if 'ce' in terms:
    if labels is None:
      raise ValueError("the 'ce' term needs labels=...: the target token ids, shaped like "
                       f'h_s without its last axis, {tokens}.')
    if jnp.shape(labels) != tokens or not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
      raise ValueError(f'labels must be integer token ids of shape {tokens}, got '
                       f'{jnp.shape(labels)} {jnp.result_type(labels)}.')
  if mask is not None and jnp.shape(mask) != tokens:
    raise ValueError(f'mask shape {jnp.shape(mask)} must equal the token shape {tokens} '
                     '(h_s without its last axis).')
  for name, x in (('h_s', h_s), ('w_s', w_s), ('h_t', h_t), ('w_t', w_t)):
    if x is not None and not jnp.issubdtype(jnp.result_type(x), jnp.floating):
      raise ValueError(f'{name} must be floating point (float32 or bfloat16), got '
                       f'{jnp.result_type(x)}.')
  if vocab is None:
    if len(set(widths)) > 1:
      raise ValueError(f'the student and teacher heads have {widths[0]} and {widths[1]} columns; '
                       f'pass vocab=... (at most {min(widths)}), the size of the shared '
                       'tokenizer, so the padding columns are ignored.')
    vocab = widths[0]
  if not isinstance(vocab, int) or not 1 <= vocab <= min(widths):
    raise ValueError(f'vocab must be an int in [1, {min(widths)}] (the heads have {widths} '
                     f'columns), got {vocab!r}; it is the tokenizer size, columns past it are '
                     'padding.')
  return vocab, tokens


def fused_head_losses(h_s, w_s, h_t, w_t, labels, mask, *, temperature, terms=TERMS,
                      vocab=None, block_rows=16, block_vocab=128, interpret=None):
  """The 'kl' and 'ce' losses of logits = h @ W, computed without materialising the logits.

  Args:
    h_s: the student's final hidden states [..., D] (float32 or bfloat16).
    w_s: the student's head [D, V] (a tied embedding transposed).
    h_t, w_t: the teacher's [..., E] and [E, V'] (None when 'kl' is not in `terms`).
    labels: int target ids [...] for 'ce' (None without it); must be < vocab where mask is on.
    mask: bool [...] or None (every token counts).
    temperature: T > 0 of 'kl' (a scalar, traced or not); 'ce' uses T = 1.
    terms: a subset of TERMS.
    vocab: only logits columns [0, vocab) take part (padded heads); None: all V (V = V').
    block_rows, block_vocab: the kernel's tile, multiples of 8 and 128.
    interpret: run the Pallas kernels in interpret mode; None: on the CPU backend only.

  Returns:
    {name: (sum, count)} float32, as kd.losses.kl_sum (T²·KL(p_T‖q_S) per token) and ce_sum
    of the logits cut to [..., :vocab]. The sums are differentiable with respect to h_s and w_s
    (a custom VJP whose backward pass is the second Pallas pass); the teacher, labels, mask and
    temperature get no gradient.
  """
  terms = tuple(terms)
  vocab, tokens = _check(terms, h_s, w_s, h_t, w_t, labels, mask, vocab, block_rows,
                         block_vocab)
  _check_temperature(temperature)
  if interpret is None:
    interpret = jax.default_backend() == 'cpu'
  plan = _Plan(kl='kl' in terms, ce='ce' in terms, vocab=vocab, block_rows=block_rows,
               block_vocab=block_vocab, interpret=bool(interpret))
  n = math.prod(tokens)
  pad = -n % block_rows
  width = plan.vocab_tiles * block_vocab

  def rows(x, fill=0):  # [..., k] -> [N + pad, k]
    x = jnp.reshape(x, (n, -1))
    return jnp.pad(x, ((0, pad), (0, 0)), constant_values=fill) if pad else x

  def cols(w):  # every tile the kernels read lies inside w
    w = jnp.asarray(w)
    return jnp.pad(w, ((0, 0), (0, width - w.shape[1]))) if w.shape[1] < width else w

  mask_n = jnp.ones((n,), bool) if mask is None else jnp.reshape(mask, (n,)).astype(bool)
  sg = lax.stop_gradient
  ht = wt = lab = None
  if plan.kl:
    ht, wt = sg(rows(h_t)), sg(cols(w_t))
  if plan.ce:
    lab = rows(jnp.asarray(labels, jnp.int32)[..., None])
  sums = _head_sums(plan, rows(h_s), cols(w_s), ht, wt, lab,
                    rows(mask_n[:, None], False)[:, 0], sg(jnp.asarray(temperature, _F32)))
  count = jnp.sum(mask_n, dtype=_F32)
  return {name: (sums[name], count) for name in terms}


def fused_head_kd(h_s, w_s, h_t, w_t, labels, mask, *, temperature, coeffs, vocab=None,
                  block_rows=16, block_vocab=128, interpret=None):
  """fused_head_losses in the contract of kd.losses.fused_logit_losses.

  `coeffs` ({'kl' and/or 'ce': weight of the term's sum}) names the terms; the weights are
  not differentiated. Returns ({name: (sum, count)} with gradient-stopped sums, surrogate):
  `surrogate` is 0 and its gradient with respect to h_s and w_s is that of Σ coeffs[n]·sum_n,
  made by the backward kernels only when something differentiates it.
  """
  coeffs = dict(coeffs)
  out = fused_head_losses(h_s, w_s, h_t, w_t, labels, mask, temperature=temperature,
                          terms=tuple(coeffs), vocab=vocab, block_rows=block_rows,
                          block_vocab=block_vocab, interpret=interpret)
  sg = lax.stop_gradient
  total = sum(sg(jnp.asarray(coeffs[n], _F32)) * s for n, (s, _) in out.items())
  return sg(out), total - sg(total)
