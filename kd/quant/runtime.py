"""Running a QuantizedParams with quantized matmuls, through qwix's PTQ provider.

`dequantize` (kd.quant.rtn) gives float kernels back; this instead hands qwix the int values and
scales, so each target projection runs as qwix's quantized dot_general (int4 tiled along the
contraction axis with tile_size = group_size, int8 or int4 per output channel when the group is
the whole input axis) and no float copy of the kernel is kept:

  pmodel = ptq_model(Decoder(cfg), qparams)
  pvars = ptq_variables(pmodel, qparams, ids)
  logits = pmodel.apply(pvars, ids)['logits']

qwix keeps jnp.int4 values one per byte in memory on CPU; the packed form is kd.quant.export's.
Quantized embedding tables (QuantConfig.embed_bits) are lookups, not matmuls: they are handed
to the model dequantized.
"""

from __future__ import annotations

import re

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import qwix

from kd.quant import rtn

QTYPES = {4: jnp.int4, 8: jnp.int8}
METHODS = ('__call__', 'project')  # as kd.peft: `project` is the LM head alone


def rules(qparams: rtn.QuantizedParams) -> list[qwix.QuantizationRule]:
  """One qwix rule per quantized kernel (exact path), with its bits and tile size."""
  out = []
  for p, qk in sorted(qparams.kernels.items()):
    if qk.leaf != 'kernel':
      continue
    tile = None if qk.group_size == qk.shape[0] else qk.group_size
    out.append(qwix.QuantizationRule(module_path=re.escape(p), weight_qtype=QTYPES[qk.bits],
                                     tile_size=tile))
  return out


def ptq_model(model: nn.Module, qparams: rtn.QuantizedParams) -> nn.Module:
  """`model` (a linen module) whose quantized projections run on qwix's PTQ path."""
  return qwix.quantize_model(model, qwix.PtqProvider(rules(qparams)), methods=METHODS)


def ptq_variables(pmodel: nn.Module, qparams: rtn.QuantizedParams, sample_ids) -> dict:
  """The variables of `pmodel` holding the int values and scales of `qparams`.

  `sample_ids` ([B, T] ints) only trace the model to get qwix's param layout (no compute).
  """
  abstract = jax.eval_shape(pmodel.init, jax.random.key(0), sample_ids)
  abstract = flax.traverse_util.flatten_dict(abstract)  # WithAux is a leaf (not a dict)
  flat = {tuple(k.split('/')): jnp.asarray(v) for k, v in qparams.rest.items()}
  for p, qk in qparams.kernels.items():
    key = ('params', *p.split('/'), qk.leaf)
    if qk.leaf != 'kernel':
      flat[key] = rtn.dequantize_kernel(qk)
      continue
    abs_w = abstract.get(key)  # qwix's WithAux(array=QArray(...), how=...)
    if not isinstance(getattr(abs_w, 'array', None), qwix.QArray):
      raise ValueError(f'qwix did not quantize {p}; it must be an nn.Dense that the model calls '
                       'through dot_general.')
    want, got = abs_w.array.scale.shape, qk.scales.shape
    if want != got:
      raise ValueError(f'{p}: qwix expects scales {want} but the kernel has {got}.')
    qtype = QTYPES[qk.bits]
    values = jnp.asarray(qk.values, jnp.int8).astype(qtype)
    scales = jnp.asarray(qk.scales).astype(abs_w.array.scale.dtype)
    flat[key] = abs_w.replace(array=qwix.QArray(values, scales, None, qtype))
  return flax.traverse_util.unflatten_dict(flat)
