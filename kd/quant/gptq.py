"""GPTQ (Frantar et al. 2022, arXiv 2210.17323): weight quantization with error feedback.

For one projection y = x W, W [in, out], and calibration inputs X [n, in], GPTQ minimises
||X W - X W_q||^2 one input row of W at a time: row i is rounded (symmetric grid, scales per
group of `group_size` rows as in kd.quant.rtn, taken from the already-updated rows when a group
starts), and its error is spread over the rows not yet quantized through the upper Cholesky
factor U of H^-1, H = 2 X^T X / n + damp * mean(diag) I:

  err = (W[i] - W_q[i]) / U[i, i];   W[j] -= U[i, j] * err   for j > i

(the Cholesky form of OBQ's H^-1 downdates; identical results). The factorisation runs on the
host in float64 (H is only [in, in]); the row loop is one jitted lax.fori_loop in float32 that
updates all remaining rows per step (no lazy-batch blocking; O(in^2 out) like the paper's).

The model driver captures each target nn.Dense's inputs with flax's nn.intercept_methods (a
`sow` of the per-batch X^T X, so it also works through nn.remat) and quantizes *sequentially* by
default: projections are grouped by shared input (q/k/v, gate/up, ...) in call order, and each
group's Hessian is collected on the model whose earlier groups are already quantized, as the
paper's per-layer procedure does. `sequential=False` collects every Hessian from the float model
in one pass (cheaper: one pass over the batches instead of one per group).

qwix 0.1.8 has a GPTQ (qwix.contrib.gptq) but it only emits qwix's PTQ param tree, recomputes
group scales from stale weights inside its 128-column blocks, and uses its own [-8, 7] / 7.5
grid; kd keeps one (values, scales) form for RTN, GPTQ, export and the qwix runtime.

  qparams = quantize_model(Decoder(cfg), variables, calib_batches,
                           QuantConfig(target=r'.*_proj', bits=4, group_size=32))
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from kd.models import stacking
from kd.quant import rtn

COLLECTION = 'kd_quant_stats'  # the flax collection the capture sows X^T X into


def hessian(xtx_sum, count) -> np.ndarray:
  """H = 2 X^T X / n (float64) from a (sum of x x^T, token count) pair."""
  if count <= 0:
    raise ValueError('No calibration tokens reached this layer; pass non-empty batches (and an '
                     'attention_mask that is not all zeros).')
  return 2.0 * np.asarray(xtx_sum, np.float64) / float(count)


def inverse_cholesky(h: np.ndarray, damp: float) -> np.ndarray:
  """Upper U with U^T U = H^-1 (float64)."""
  try:
    lower = scipy.linalg.cho_factor(h, lower=True)
    h_inv = scipy.linalg.cho_solve(lower, np.eye(h.shape[0]))
    return np.linalg.cholesky(h_inv).T
  except np.linalg.LinAlgError as e:
    raise ValueError(f'The calibration Hessian is not positive definite ({e}); raise damp '
                     f'(now {damp}) or calibrate on more tokens.') from e


@functools.partial(jax.jit, static_argnames=('bits', 'group_size', 'scale_dtype'))
def _gptq_rows(w_DxF, u_DxD, bits: int, group_size: int, scale_dtype: str):
  """The GPTQ row loop: (int8 values [D, F], scales [D / group_size, F])."""
  d, f = w_DxF.shape
  qmax = rtn.qmax(bits)

  def row(i, carry):
    w, q, scales = carry
    gi = i // group_size

    def new_scales(scales):
      block_gxF = jax.lax.dynamic_slice(w, (i, 0), (group_size, f))
      s = rtn.scales_from_absmax(jnp.max(jnp.abs(block_gxF), axis=0), bits, scale_dtype, jnp)
      return scales.at[gi].set(s)

    scales = jax.lax.cond(i % group_size == 0, new_scales, lambda s: s, scales)
    s_F = scales[gi].astype(jnp.float32)
    w_F = w[i]
    q_F = jnp.clip(jnp.round(w_F / s_F), -qmax, qmax)
    err_F = (w_F - q_F * s_F) / u_DxD[i, i]
    # U is upper triangular, so rows < i (already quantized) are left exactly as they are.
    w = w - u_DxD[i][:, None] * err_F[None, :]
    return w, q.at[i].set(q_F.astype(jnp.int8)), scales

  init = (w_DxF, jnp.zeros((d, f), jnp.int8),
          jnp.zeros((d // group_size, f), jnp.dtype(scale_dtype)))
  _, q, scales = jax.lax.fori_loop(0, d, row, init)
  return q, scales


def gptq_kernel(w, h, bits: int, group_size: int | None = None, *, damp: float = 0.01,
                scale_dtype: str = 'float16', path: str = 'kernel') -> rtn.QuantizedKernel:
  """GPTQ of one kernel W [in, out] given H = 2 X^T X / n [in, in] (see `hessian`).

  Adds damp * mean(diag(H)) to the diagonal; inputs never seen (H[i, i] = 0) get H[i, i] = 1
  and a zero weight row, as in the reference implementation.
  """
  rtn.check_bits(bits, 'bits')
  w = np.asarray(w)
  if w.ndim != 2 or np.shape(h) != (w.shape[0],) * 2:
    raise ValueError(f'{path}: kernel {w.shape} and Hessian {np.shape(h)} do not fit; H must be '
                     '[in, in] for a kernel [in, out].')
  g = rtn.group_size_for(w.shape[0], group_size, path)
  h = np.array(h, np.float64)
  dead = np.diag(h) == 0
  h[dead, dead] = 1.0
  h[np.diag_indices_from(h)] += damp * np.mean(np.diag(h))
  w32 = np.where(dead[:, None], 0.0, w.astype(np.float32)).astype(np.float32)
  u = inverse_cholesky(h, damp).astype(np.float32)
  q, scales = _gptq_rows(jnp.asarray(w32), jnp.asarray(u), bits, g, scale_dtype)
  return rtn.QuantizedKernel(np.asarray(q), np.asarray(scales), bits, g, w.dtype.name)


# ----------------------------------------------------------------------------- model driver


def split_batch(batch) -> tuple[jax.Array, jax.Array | None]:
  """An int [B, T] array, or a dict with 'input_ids' and optionally 'attention_mask'."""
  if isinstance(batch, dict):
    mask = batch.get('attention_mask')
    return jnp.asarray(batch['input_ids']), None if mask is None else jnp.asarray(mask)
  return jnp.asarray(batch), None


def _module_path(module: nn.Module) -> str:
  return '/'.join(module.path)


def _capture_fn(model: nn.Module, paths: tuple[str, ...]):
  """jit(variables, ids, mask) -> ({path: X^T X summed over real tokens}, token count)."""
  wanted = frozenset(paths)

  def run(variables, ids_BxT, mask_BxT):
    weights_N1 = (jnp.ones(ids_BxT.shape, jnp.float32) if mask_BxT is None
                  else mask_BxT.astype(jnp.float32)).reshape(-1, 1)

    def interceptor(next_fun, args, kwargs, context):
      m = context.module
      if (isinstance(m, nn.Dense) and context.method_name == '__call__'
          and _module_path(m) in wanted):
        x_NxD = args[0].reshape(-1, args[0].shape[-1]).astype(jnp.float32)
        if x_NxD.shape[0] != weights_N1.shape[0]:
          raise ValueError(f'{_module_path(m)} saw {x_NxD.shape[0]} input rows for '
                           f'{weights_N1.shape[0]} tokens; only per-token projections can be '
                           'calibrated.')
        m.sow(COLLECTION, 'xtx', (x_NxD * weights_N1).T @ x_NxD)
      return next_fun(*args, **kwargs)

    kw = {} if mask_BxT is None else {'attention_mask': mask_BxT}
    with nn.intercept_methods(interceptor):
      _, stats = model.apply(variables, ids_BxT, mutable=[COLLECTION], **kw)
    flat = flax.traverse_util.flatten_dict(stats[COLLECTION])
    xtx = {'/'.join(k[:-1]): sum(v) for k, v in flat.items()}
    return xtx, jnp.sum(weights_N1)

  return jax.jit(run)


def call_groups(model: nn.Module, variables, batch, paths: Sequence[str]) -> list[list[str]]:
  """`paths` in the order the forward pass calls them, grouped by shared input (q/k/v, ...)."""
  wanted, calls = set(paths), []

  def interceptor(next_fun, args, kwargs, context):
    m = context.module
    if isinstance(m, nn.Dense) and context.method_name == '__call__':
      if _module_path(m) in wanted:  # the input itself (not its id, which can be reused)
        calls.append((_module_path(m), args[0]))
    return next_fun(*args, **kwargs)

  ids, mask = split_batch(batch)
  kw = {} if mask is None else {'attention_mask': mask}

  def trace(v):
    with nn.intercept_methods(interceptor):
      return model.apply(v, ids, **kw)

  jax.eval_shape(trace, variables)
  missing = sorted(wanted - {p for p, _ in calls})
  if missing:
    raise ValueError(f'{missing} are never called as nn.Dense in the forward pass, so GPTQ '
                     'cannot calibrate them; leave them out of QuantConfig.target.')
  groups, seen, last_input = [], set(), None
  for p, x in calls:
    if p in seen:
      continue
    seen.add(p)
    if groups and x is last_input:
      groups[-1].append(p)
    else:
      groups.append([p])
    last_input = x
  return groups


def collect_hessians(model: nn.Module, variables, batches, paths: Sequence[str], *,
                     _capture=None) -> dict[str, tuple[np.ndarray, float]]:
  """{path: (sum over calibration tokens of x x^T [in, in] float64, token count)}."""
  capture = _capture or _capture_fn(model, tuple(paths))
  sums, count = {p: 0.0 for p in paths}, 0.0
  for batch in batches:
    xtx, n = capture(variables, *split_batch(batch))
    for p in paths:
      sums[p] = sums[p] + np.asarray(xtx[p], np.float64)
    count += float(n)
  return {p: (sums[p], count) for p in paths}


def quantize_model(model: nn.Module, variables, batches: Sequence[Any],
                   config: rtn.QuantConfig, *, damp: float = 0.01,
                   sequential: bool = True) -> rtn.QuantizedParams:
  """GPTQ of every kernel `config.target` matches, calibrated on `batches`.

  Args:
    model: the linen module (e.g. Decoder(config)); `model.apply(variables, ids)` runs it.
    variables: its float variables {'params': ...}.
    batches: a sequence (iterated once per group when sequential) of int [B, T] token arrays or
      dicts {'input_ids', 'attention_mask'}; padded tokens do not enter the Hessians.
    config: targets, bits (and per-layer `layer_bits`), group_size, scale_dtype.
    damp: dampening, a fraction of the mean Hessian diagonal.
    sequential: calibrate each group on the model with earlier groups already quantized.
  """
  batches = list(batches)
  if not batches:
    raise ValueError('quantize_model needs at least one calibration batch.')
  if getattr(getattr(model, 'config', None), 'scan_layers', False):  # calibrate it unrolled
    unrolled = type(model)(dataclasses.replace(model.config, scan_layers=False))
    return dataclasses.replace(quantize_model(
        unrolled, stacking.unstack_layers(variables), batches, config, damp=damp,
        sequential=sequential), stacked=True)
  paths = rtn.target_paths(variables, config.target)
  rtn.check_layer_bits(paths, config)
  groups = call_groups(model, variables, batches[0], paths) if sequential else [paths]
  capture = _capture_fn(model, tuple(paths))
  kernels, current = {}, variables
  for group in groups:
    stats = collect_hessians(model, current, batches, paths, _capture=capture)
    for p in group:
      h = hessian(*stats[p])
      kernels[p] = gptq_kernel(rtn.kernel(variables, p), h, config.bits_for(p),
                               config.group_size, damp=damp, scale_dtype=config.scale_dtype,
                               path=p)
    if sequential:
      current = rtn.replace_kernels(current, {p: rtn.dequantize_kernel(kernels[p])
                                              for p in group})
  # Embedding tables are lookups, not matmuls of calibrated inputs: RTN (config.embed_bits).
  return rtn.assemble(config, variables, {p: kernels[p] for p in paths})
