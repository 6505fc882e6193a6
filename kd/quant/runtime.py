"""Running a QuantizedParams with quantized matmuls, through qwix's PTQ provider.

`dequantize` (kd.quant.rtn) gives float kernels back; this instead hands qwix the int values and
scales, so each target projection runs as qwix's quantized dot_general (int4 tiled along the
contraction axis with tile_size = group_size, int8 or int4 per output channel when the group is
the whole input axis) and no float copy of the kernel is kept:

  pmodel = ptq_model(Decoder(cfg), qparams)               # weights int, activations float
  pmodel = ptq_model(Decoder(cfg), qparams, act_bits=8)   # int8 x int8 matmuls (W8A8)
  pvars = ptq_variables(pmodel, qparams, ids)
  logits = pmodel.apply(pvars, ids)['logits']

With act_bits=8 each target projection's input is quantized too, as it runs: int8 with one
scale per token (absmax / 127 over each row of the non-contracted axes), so the product is int8 x int8 with
int32 accumulation, scaled back after (qwix's dynamic-range path). That is the matmul int8 tensor
cores run (twice bf16's rate on an H100); the weights must then be int8 (bits 8).

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

from kd.models import stacking
from kd.quant import rtn

QTYPES = {4: jnp.int4, 8: jnp.int8}
METHODS = ('__call__', 'project')  # as kd.peft: `project` is the LM head alone


_LAYER = re.compile(r'^layers_\d+/')


def _is_scanned(model: nn.Module) -> bool:
  return bool(getattr(getattr(model, 'config', None), 'scan_layers', False))


ACT_BITS = (None, 8)
# qwix's symmetric int8 bound is 127.5 (scale = absmax / 127.5), which puts every token's largest
# input exactly on a rounding tie (+-127.5), decided by one ulp of a division that XLA may
# compile differently in two programs (-128 or -127). Widening the range by 127.5 / 127 gives
# the usual grid instead, scale = absmax / 127 and values in [-127, 127], with no tie.
_ACT_CALIBRATION = f'absmax,{127.5 / 127!r}'


def rules(qparams: rtn.QuantizedParams, scanned: bool = False,
          act_bits: int | None = None) -> list[qwix.QuantizationRule]:
  """One qwix rule per quantized kernel (exact path), with its bits and tile size.

  `scanned`: for a model with DecoderConfig.scan_layers, whose layers are one module `layers`:
  each projection's rule covers every layer, so all layers must agree on its bits and group.
  `act_bits=8` quantizes each such projection's input per token as it runs (module doc).
  """
  if act_bits not in ACT_BITS:
    raise ValueError(f'act_bits={act_bits!r} is not supported: use 8 (int8 x int8 matmuls) or '
                     'None (the activations stay in float).')
  found = {}
  for p, qk in sorted(qparams.kernels.items()):
    if qk.leaf != 'kernel':
      continue
    how = (qk.bits, None if qk.group_size == qk.shape[0] else qk.group_size)
    if act_bits and qk.bits != 8:
      raise ValueError(f'act_bits=8 multiplies int8 by int8, but {p} is stored in {qk.bits} '
                       'bits: quantize the weights with bits=8, or leave act_bits unset.')
    path = _LAYER.sub('layers/', p) if scanned else p
    if found.setdefault(path, how) != how:
      raise ValueError(f'{p} has (bits, group) {how} but another layer\'s {path} has '
                       f'{found[path]}: scanned layers run one quantization per projection. '
                       'Use one setting for every layer, or scan_layers=False.')
  act = dict(act_qtype=QTYPES[act_bits], act_calibration_method=_ACT_CALIBRATION,
             act_static_scale=False) if act_bits else {}
  return [qwix.QuantizationRule(module_path=re.escape(path), weight_qtype=QTYPES[bits],
                                tile_size=tile, **act)
          for path, (bits, tile) in sorted(found.items())]


def ptq_model(model: nn.Module, qparams: rtn.QuantizedParams,
              act_bits: int | None = None) -> nn.Module:
  """`model` (a linen module) whose quantized projections run on qwix's PTQ path. `qparams`
  name each layer (`layers_{i}/...`), also for a model with scan_layers. `act_bits=8`: their
  inputs are quantized per token as they run, so the matmuls are int8 x int8 (module doc)."""
  provider = qwix.PtqProvider(rules(qparams, scanned=_is_scanned(model), act_bits=act_bits))
  return qwix.quantize_model(model, provider, methods=METHODS)


def ptq_variables(pmodel: nn.Module, qparams: rtn.QuantizedParams, sample_ids) -> dict:
  """The variables of `pmodel` holding the int values and scales of `qparams`.

  `sample_ids` ([B, T] ints) only trace the model to get qwix's param layout (no compute).
  """
  abstract = jax.eval_shape(pmodel.init, jax.random.key(0), sample_ids)
  abstract = flax.traverse_util.flatten_dict(abstract)  # WithAux is a leaf (not a dict)
  scanned = _is_scanned(pmodel)
  flat = {tuple(k.split('/')): jnp.asarray(v) for k, v in qparams.rest.items()}
  for p, qk in qparams.kernels.items():
    key = ('params', *p.split('/'), qk.leaf)
    if qk.leaf != 'kernel':
      flat[key] = rtn.dequantize_kernel(qk)
      continue
    # qwix's WithAux(array=QArray(...), how=...); a scanned model's has a layer axis first.
    stacked = scanned and bool(_LAYER.match(p))
    abs_w = abstract.get(('params', 'layers', *key[2:]) if stacked else key)
    if not isinstance(getattr(abs_w, 'array', None), qwix.QArray):
      raise ValueError(f'qwix did not quantize {p}; it must be an nn.Dense that the model calls '
                       'through dot_general.')
    want, got = abs_w.array.scale.shape[1 if stacked else 0:], qk.scales.shape
    if want != got:
      raise ValueError(f'{p}: qwix expects scales {want} but the kernel has {got}.')
    flat[key] = (jnp.asarray(qk.values, jnp.int8).astype(QTYPES[qk.bits]),
                 jnp.asarray(qk.scales).astype(abs_w.array.scale.dtype))
  if scanned:  # each layer's leaves (values and scales too) stacked along a new first axis
    n = pmodel.config.num_layers
    for role in {_LAYER.sub('', p) for p in qparams.kernels if _LAYER.match(p)}:
      layers = [i for i in range(n) if f'layers_{i}/{role}' in qparams.kernels]
      if len(layers) != n:
        raise ValueError(f'{role} is quantized in layers {layers} of {n}; a scanned model runs '
                         'every layer alike, so quantize it in all of them (or none), or set '
                         'scan_layers=False.')
    flat = flax.traverse_util.flatten_dict(
        stacking.stack_layers(flax.traverse_util.unflatten_dict(flat)))
  for key, value in flat.items():
    if isinstance(value, tuple):
      abs_w = abstract.get(key)
      if getattr(abs_w, 'array', None) is None or abs_w.array.scale.shape != value[1].shape:
        raise ValueError(f"{'/'.join(key)}: the stacked layers' kernels do not match qwix's "
                         'layout; quantize every layer of a scanned model the same way.')
      qtype = abs_w.array.qtype
      flat[key] = abs_w.replace(array=qwix.QArray(value[0], value[1], None, qtype))
  return flax.traverse_util.unflatten_dict(flat)
