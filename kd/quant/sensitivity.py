"""Mixed precision: 4 or 8 bits per projection, by how much each one's 4-bit error hurts.

A projection's sensitivity is the mean per-token KL(p_float || p_quant) of the next-token
distributions on calibration batches when only that projection is RTN-quantized to 4 bits
(everything else float). `choose_bits` then gives 8 bits to the most sensitive projections under
a budget: a number of 8-bit projections, or an average of bits per weight (weighted by kernel
size, greedily by sensitivity per extra bit). The plan is QuantConfig.layer_bits:

  sens = layer_sensitivity(Decoder(cfg), variables, batches, qcfg)
  qcfg8 = dataclasses.replace(qcfg, layer_bits=choose_bits(sens, num_8bit=4))
  qparams = quantize_params(variables, qcfg8)       # or kd.quant.gptq.quantize_model
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kd.quant import rtn
from kd.quant.gptq import split_batch


def kl_sum(logits_ref_BxTxV, logits_BxTxV, mask_BxT=None) -> tuple[jax.Array, jax.Array]:
  """(sum over real tokens of KL(softmax(ref) || softmax(logits)), token count), float32."""
  logp_ref = jax.nn.log_softmax(logits_ref_BxTxV.astype(jnp.float32), axis=-1)
  logp = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
  kl_BxT = jnp.sum(jnp.exp(logp_ref) * (logp_ref - logp), axis=-1)
  mask = jnp.ones(kl_BxT.shape, jnp.float32) if mask_BxT is None else mask_BxT.astype(jnp.float32)
  return jnp.sum(kl_BxT * mask), jnp.sum(mask)


@functools.partial(jax.jit, static_argnames=('model',))
def _kl(model, float_vars, quant_vars, ids_BxT, mask_BxT):
  # The float forward is recomputed per call rather than cached: [B, T, V] log-probs per batch
  # would not fit for a real vocabulary and many batches.
  kw = {} if mask_BxT is None else {'attention_mask': mask_BxT}
  ref = jax.lax.stop_gradient(model.apply(float_vars, ids_BxT, **kw)['logits'])
  return kl_sum(ref, model.apply(quant_vars, ids_BxT, **kw)['logits'], mask_BxT)


def mean_kl(model, float_vars, quant_vars, batches) -> float:
  """Mean per-token KL(float || quantized) over `batches` (the sums, then one division)."""
  total, count = 0.0, 0.0
  for batch in batches:
    s, n = _kl(model, float_vars, quant_vars, *split_batch(batch))
    total, count = total + float(s), count + float(n)
  if count == 0:
    raise ValueError('The calibration batches hold no real tokens; pass non-empty batches.')
  return total / count


def layer_sensitivity(model, variables, batches: Sequence[Any], config: rtn.QuantConfig,
                      bits: int = 4) -> dict[str, float]:
  """{module path: mean KL when only that kernel is RTN-quantized to `bits`} for the targets.

  `model` must be hashable (a linen module is); its apply must return {'logits': ...}.
  """
  batches = list(batches)
  paths = rtn.target_paths(variables, config.target)
  out = {}
  for p in paths:
    qk = rtn.quantize_kernel(rtn.kernel(variables, p), bits, config.group_size,
                             config.scale_dtype, p)
    quant = rtn.replace_kernels(variables, {p: rtn.dequantize_kernel(qk)})
    out[p] = mean_kl(model, variables, quant, batches)
  return out


def choose_bits(sensitivity: dict[str, float], sizes: dict[str, int] | None = None, *,
                num_8bit: int | None = None, avg_bits: float | None = None) -> dict[str, int]:
  """{path: 4 or 8}: the most sensitive projections get 8 bits within the budget.

  Give exactly one budget: `num_8bit` projections at 8 bits, or `avg_bits` in [4, 8], the
  size-weighted mean bits per weight (needs `sizes`, e.g. `kernel_sizes(variables, paths)`);
  then projections are taken greedily by sensitivity per weight while they fit. Ties go to the
  earlier path name.
  """
  if (num_8bit is None) == (avg_bits is None):
    raise ValueError('choose_bits needs exactly one budget: num_8bit=... or avg_bits=...')
  order = sorted(sensitivity, key=lambda p: (-sensitivity[p], p))
  if num_8bit is not None:
    if not 0 <= num_8bit <= len(order):
      raise ValueError(f'num_8bit={num_8bit} must be in [0, {len(order)}] (the number of '
                       'target projections).')
    wide = set(order[:num_8bit])
  else:
    if not 4 <= avg_bits <= 8:
      raise ValueError(f'avg_bits={avg_bits} must be in [4, 8] (all int4 .. all int8).')
    if sizes is None or not set(sensitivity) <= set(sizes):
      raise ValueError('avg_bits needs `sizes` with the number of weights of every path; use '
                       'kernel_sizes(variables, paths).')
    budget = (avg_bits - 4) * sum(sizes[p] for p in sensitivity)  # extra bits for 8-bit layers
    order = sorted(sensitivity, key=lambda p: (-sensitivity[p] / sizes[p], p))
    wide, spent = set(), 0
    for p in order:
      if spent + 4 * sizes[p] <= budget + 1e-9:
        wide.add(p)
        spent += 4 * sizes[p]
  return {p: 8 if p in wide else 4 for p in sorted(sensitivity)}


def kernel_sizes(variables, paths: Sequence[str]) -> dict[str, int]:
  return {p: int(np.prod(np.shape(rtn.kernel(variables, p)))) for p in paths}


def average_bits(plan: dict[str, int], sizes: dict[str, int]) -> float:
  """Size-weighted mean bits per weight of a plan (scales not counted)."""
  return sum(plan[p] * sizes[p] for p in plan) / sum(sizes[p] for p in plan)
