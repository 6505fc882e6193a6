"""Quantization-aware training: the student's weights seen through the RTN grid, gradients
passed straight through.

`fake_quant(variables, config)` replaces every target kernel W by

  W + stop_gradient(dequantize(quantize(W)) - W)

with exactly kd.quant.rtn's grid (symmetric, scale = max|W| / qmax per group of `group_size`
input rows and output channel, rounded to `scale_dtype`): the forward pass is the model that
`quantize_params` + `dequantize` will export, and the backward pass is the identity (the
straight-through estimator of Bengio et al. 2013), so the float master weights keep learning.
With config.embed_bits set, every embedding table is fake-quantized alike on its per-row grid.
Pure jnp, traced inside the train step; it works on the params tree, so it needs no method
interception (unlike qwix's QtProvider, whose int4 grid is max|W| / 7.5: training on it and
exporting with RTN would not give the trained model).
"""

from typing import Any

import flax
import jax
import jax.numpy as jnp

from kd.models import stacking
from kd.quant import rtn


def fake_quant_kernel(w, bits: int, group_size: int | None, scale_dtype: str = 'float16',
                      path: str = 'kernel'):
  """The RTN-dequantized kernel in the forward pass, the identity in the backward pass."""
  g = rtn.group_size_for(w.shape[0], group_size, path)
  q_GxgxF, scales_GxF = rtn.round_to_grid(w, bits, g, scale_dtype, xp=jnp)
  w_q = (q_GxgxF * scales_GxF.astype(jnp.float32)[:, None, :]).reshape(w.shape).astype(w.dtype)
  return w + jax.lax.stop_gradient(w_q - w)


def fake_quant(variables, config: rtn.QuantConfig) -> dict[str, Any]:
  """`variables` with every kernel `config.target` matches fake-quantized (see module doc); a
  scan_layers tree per layer, as rtn.quantize_params stores it."""
  if rtn.is_stacked(variables):
    return stacking.stack_layers(fake_quant(stacking.unstack_layers(variables), config))
  paths = rtn.target_paths(variables, config.target)
  rtn.check_layer_bits(paths, config)
  out = rtn.replace_kernels(variables, {
      p: fake_quant_kernel(rtn.kernel(variables, p), config.bits_for(p), config.group_size,
                           config.scale_dtype, p) for p in paths})
  if config.embed_bits is None:
    return out
  flat = dict(flax.traverse_util.flatten_dict(out))
  for p in rtn.embedding_paths(variables):  # per row: the kernel grid of the transpose
    key = ('params', *p.split('/'), 'embedding')
    e = flat[key]
    flat[key] = fake_quant_kernel(
        e.T, config.embed_bits, rtn.embed_group_size(e.shape[1], config.group_size),
        config.scale_dtype, p).T
  return flax.traverse_util.unflatten_dict(flat)
