"""Round-to-nearest (RTN) symmetric weight-only quantization of kd Decoder projections.

A target kernel W [in, out] (an nn.Dense `kernel`, chosen by a regex fully matching its module
path, as in kd.peft) is cut along the input axis into groups of `group_size` rows (None: one
group, i.e. one scale per output channel); per group and output channel

  scale = max|W| / qmax   (qmax = 7 for int4, 127 for int8; rounded to scale_dtype)
  q = clip(round(W / scale), -qmax, qmax)       W ~ q * scale

so scales are [in / group_size, out], the layout qwix's PTQ uses for a tiled contraction axis.

Embedding tables (nn.Embed `embedding` [rows, features], every one in the tree when
`embed_bits` is set) are quantized per row, the unit a lookup reads: one scale per row and
group of `group_size` features (None: per row), so scales are [rows, features / group_size].
In a small encoder they are most of the bytes (MiniLM: 30522 x 384 of its ~17M parameters).

Own numpy code, not qwix.quantize_params, produces the stored representation, because:
  * storage must be portable and compact: qwix has no int4 packing of its own; it keeps int4 in
    jnp.int4 arrays (itemsize 1: a byte per value once on the host or in a file) inside its
    WithAux/QArray pytree, which only a qwix-wrapped model reads; kd.quant.export packs int4
    two per byte into a plain safetensors file;
  * GPTQ (kd.quant.gptq) and mixed precision (kd.quant.sensitivity) emit the same (values,
    scales) form, so one format, one dequantizer and one exporter serve all three;
  * qwix scales symmetric int4 by max|W| / 7.5 and lets -8 appear (round(-7.5)); we keep the
    symmetric [-qmax, qmax] grid of the GPTQ paper.
qwix is still the runtime: kd.quant.runtime turns a QuantizedParams into a qwix PtqProvider
model and param tree, so matmuls run on the int values and scales (no float kernel in memory).

  qcfg = QuantConfig(target=r'.*_proj|lm_head', bits=4, group_size=32)
  qparams = quantize_params(variables, qcfg)
  logits = Decoder(config).apply(dequantize(qparams), ids)['logits']
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from kd.models import stacking

BITS = (4, 8)
SCALE_DTYPES = ('float16', 'float32')
_SCALE_FLOOR = {'float16': float(np.finfo(np.float16).smallest_subnormal),
                'float32': float(np.finfo(np.float32).tiny)}


def qmax(bits: int) -> int:
  """Largest magnitude of the symmetric grid: 7 for int4, 127 for int8."""
  return 2 ** (bits - 1) - 1


def check_bits(bits, where: str) -> None:
  if bits not in BITS or isinstance(bits, bool):
    raise ValueError(f'{where} must be one of {list(BITS)} (int4 or int8), got {bits!r}.')


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """Which kernels to quantize and how. Hashable, so it can be a static jit argument."""

  target: str  # regex fully matching module paths, e.g. r'layers_\d+/.*_proj|lm_head'
  bits: int = 4  # 4 or 8
  group_size: int | None = 128  # rows of the input axis per scale; None: per output channel
  scale_dtype: str = 'float16'  # how scales are stored: 'float16' or 'float32'
  # Per-module bits overriding `bits` (a mixed-precision plan, kd.quant.sensitivity); a dict is
  # stored as sorted (path, bits) pairs so the config stays hashable.
  layer_bits: tuple[tuple[str, int], ...] | None = None
  # Bits of every embedding table (per row, see the module doc); None keeps them in float.
  embed_bits: int | None = None

  def __post_init__(self):
    if hasattr(self.layer_bits, 'items'):
      object.__setattr__(self, 'layer_bits', tuple(sorted(self.layer_bits.items())) or None)
    elif self.layer_bits is not None:
      object.__setattr__(self, 'layer_bits', tuple(sorted(tuple(p) for p in self.layer_bits)))
    check_bits(self.bits, 'QuantConfig.bits')
    for path, bits in self.layer_bits or ():
      check_bits(bits, f'QuantConfig.layer_bits[{path!r}]')
    if self.embed_bits is not None:
      check_bits(self.embed_bits, 'QuantConfig.embed_bits (None keeps embeddings in float)')
    g = self.group_size
    if g is not None and (not isinstance(g, int) or isinstance(g, bool) or g <= 0):
      raise ValueError(f'QuantConfig.group_size must be a positive int (e.g. 32, 64, 128) or '
                       f'None for one scale per output channel, got {g!r}.')
    if self.scale_dtype not in SCALE_DTYPES:
      raise ValueError(f'QuantConfig.scale_dtype={self.scale_dtype!r} is not supported; use one '
                       f'of {list(SCALE_DTYPES)}.')
    try:
      re.compile(self.target)
    except re.error as e:
      raise ValueError(f'QuantConfig.target={self.target!r} is not a valid regex: {e}.') from e

  def bits_for(self, path: str) -> int:
    return dict(self.layer_bits or ()).get(path, self.bits)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d['layer_bits'] = dict(self.layer_bits) if self.layer_bits else None
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> QuantConfig:
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
      raise ValueError(f'Unknown QuantConfig keys {unknown}; valid keys are {sorted(fields)}.')
    return cls(**d)


@dataclasses.dataclass(frozen=True, eq=False)
class QuantizedKernel:
  """One quantized kernel: W ~ values * scales broadcast over groups of `group_size` rows; or,
  with leaf 'embedding', one embedding table: E ~ values * scales over groups of `group_size`
  features of a row."""

  values: np.ndarray  # int8 [in, out] (embedding: [rows, features]), in [-qmax, qmax]
  scales: np.ndarray  # float16/float32 [in // group_size, out] (embedding: [rows, features // g])
  bits: int
  group_size: int  # in, when per output channel (embedding: features, when per row)
  dtype: str  # the float kernel's dtype, which `dequantize_kernel` returns
  leaf: str = 'kernel'  # the module's leaf it replaces: 'kernel' (nn.Dense) or 'embedding'

  @property
  def shape(self) -> tuple[int, int]:
    return tuple(self.values.shape)


@dataclasses.dataclass(frozen=True, eq=False)
class QuantizedParams:
  """A Decoder variables tree with its target kernels quantized."""

  config: QuantConfig
  # module path ('layers_0/attn/q_proj', 'embed' for an embedding table) -> kernel
  kernels: dict[str, QuantizedKernel]
  rest: dict[str, Any]  # every other leaf, by its full '/'-joined path ('params/embed/...')
  # Quantized from a scan_layers model's stacked tree: stored per layer like any other (the
  # paths above), and `dequantize` stacks the layers again.
  stacked: bool = False


# Pytrees, so that a quantized frozen base (QLoRA) can be an argument of a jitted step: the
# arrays are leaves, the rest is static.
jax.tree_util.register_dataclass(QuantizedKernel, data_fields=['values', 'scales'],
                                 meta_fields=['bits', 'group_size', 'dtype', 'leaf'])
jax.tree_util.register_dataclass(QuantizedParams, data_fields=['kernels', 'rest'],
                                 meta_fields=['config', 'stacked'])


def is_stacked(variables) -> bool:
  """Whether `variables` are a scan_layers decoder's (layers stacked under `layers`)."""
  return 'layers' in variables.get('params', {})


def target_paths(variables, target: str) -> list[str]:
  """Module paths with a `kernel` under variables['params'] that `target` fully matches.

  Raises if nothing matches (listing the paths there are) or a match is not 2-D.
  """
  flat = flax.traverse_util.flatten_dict(variables['params'])
  kernels = {'/'.join(k[:-1]): v for k, v in flat.items() if k[-1] == 'kernel'}
  paths = sorted(p for p in kernels if re.fullmatch(target, p))
  if not paths:
    raise ValueError(f'QuantConfig.target={target!r} matches no kernel; module paths look like '
                     f'{sorted(kernels)[:8]} (the regex must match the whole path).')
  bad = [f'{p} {np.shape(kernels[p])}' for p in paths if np.ndim(kernels[p]) != 2]
  if bad:
    raise ValueError(f'Only 2-D [in, out] kernels can be quantized, but the target matches '
                     f'{bad}; narrow QuantConfig.target.')
  return paths


def embedding_paths(variables) -> list[str]:
  """Module paths with an `embedding` leaf (nn.Embed tables) under variables['params']."""
  flat = flax.traverse_util.flatten_dict(variables['params'])
  return sorted('/'.join(k[:-1]) for k, v in flat.items()
                if k[-1] == 'embedding' and np.ndim(v) == 2)


def group_size_for(in_features: int, group_size: int | None, path: str = 'kernel') -> int:
  """The rows per scale for a kernel with `in_features` inputs; raises if it does not divide."""
  if group_size is None:
    return in_features
  if in_features % group_size:
    divisors = [d for d in (16, 32, 64, 128, 256) if in_features % d == 0]
    raise ValueError(
        f'group_size={group_size} does not divide the input size {in_features} of {path}; '
        f'use a divisor such as {divisors or [in_features]}, group_size=None (per output '
        'channel), or a target that leaves this kernel out.')
  return group_size


def scales_from_absmax(absmax, bits: int, scale_dtype: str, xp=np):
  """max|W| per group -> scale in scale_dtype, floored so that it stays nonzero (an all-zero
  group gets q = 0): at float16's smallest subnormal, at float32's smallest normal (a float32
  subnormal may be flushed to zero on accelerators)."""
  return xp.maximum(absmax / np.float32(qmax(bits)), _SCALE_FLOOR[scale_dtype]).astype(
      scale_dtype)


def quantize_kernel(w, bits: int, group_size: int | None = None,
                    scale_dtype: str = 'float16', path: str = 'kernel') -> QuantizedKernel:
  """RTN of a 2-D kernel [in, out] along its input axis (computed in float32, numpy)."""
  check_bits(bits, 'bits')
  w = np.asarray(w)
  if w.ndim != 2:
    raise ValueError(f'{path} has shape {w.shape}; only 2-D [in, out] kernels are supported.')
  g = group_size_for(w.shape[0], group_size, path)
  q_GxgxF, scales_GxF = round_to_grid(w, bits, g, scale_dtype)
  return QuantizedKernel(q_GxgxF.astype(np.int8).reshape(w.shape), scales_GxF, bits, g,
                         w.dtype.name)


def quantize_embedding(e, bits: int, group_size: int | None = None,
                       scale_dtype: str = 'float16', path: str = 'embedding') -> QuantizedKernel:
  """RTN of an embedding table [rows, features] per row (groups of `group_size` features): the
  kernel grid of its transpose, stored row-major."""
  t = quantize_kernel(np.asarray(e).T, bits, group_size, scale_dtype, path)
  return QuantizedKernel(np.ascontiguousarray(t.values.T), np.ascontiguousarray(t.scales.T),
                         bits, t.group_size, t.dtype, leaf='embedding')


def round_to_grid(w, bits: int, g: int, scale_dtype: str, xp=np):
  """The RTN grid of a kernel [in, out] in groups of g input rows: (q [in/g, g, out] float32
  integers in [-qmax, qmax], scales [in/g, out] in scale_dtype). `xp`: numpy, or jax.numpy to
  trace it (kd.quant.qat)."""
  d_in, d_out = w.shape
  w_GxgxF = w.astype(xp.float32).reshape(d_in // g, g, d_out)
  scales_GxF = scales_from_absmax(xp.abs(w_GxgxF).max(axis=1), bits, scale_dtype, xp)
  q = xp.round(w_GxgxF / scales_GxF[:, None, :].astype(xp.float32))
  return xp.clip(q, -qmax(bits), qmax(bits)), scales_GxF


def dequantize_kernel(qk: QuantizedKernel):
  """values * scales in float32, cast to the original kernel dtype (a jax array). Leading axes
  (e.g. a pmap state's device axis) are kept."""
  if qk.leaf == 'embedding':  # the kernel grid of the transpose (see quantize_embedding)
    t = dataclasses.replace(qk, values=jnp.swapaxes(jnp.asarray(qk.values), -1, -2),
                            scales=jnp.swapaxes(jnp.asarray(qk.scales), -1, -2), leaf='kernel')
    return jnp.swapaxes(dequantize_kernel(t), -1, -2)
  *lead, d_in, d_out = qk.values.shape
  q_GxgxF = jnp.asarray(qk.values, jnp.float32).reshape(
      (*lead, d_in // qk.group_size, qk.group_size, d_out))
  w = q_GxgxF * jnp.expand_dims(jnp.asarray(qk.scales, jnp.float32), -2)
  return w.reshape((*lead, d_in, d_out)).astype(qk.dtype)


def check_layer_bits(paths, config: QuantConfig) -> None:
  stray = sorted(set(dict(config.layer_bits or ())) - set(paths))
  if stray:
    raise ValueError(f'QuantConfig.layer_bits names {stray}, which QuantConfig.target '
                     f'{config.target!r} does not match; targets are {paths[:8]}...')


def split_rest(variables, paths, embeddings=()) -> dict[str, Any]:
  """Every leaf but the kernels of `paths` and the tables of `embeddings`, keyed by its
  '/'-joined full path."""
  kernel_keys = ({('params', *p.split('/'), 'kernel') for p in paths} |
                 {('params', *p.split('/'), 'embedding') for p in embeddings})
  return {'/'.join(k): v for k, v in flax.traverse_util.flatten_dict(variables).items()
          if k not in kernel_keys}


def kernel(variables, path: str, leaf: str = 'kernel'):
  node = variables['params']
  for name in path.split('/'):
    node = node[name]
  return node[leaf]


def embed_group_size(features: int, group_size: int | None) -> int | None:
  """The features per scale of an embedding row: `group_size` where it divides them, else the
  whole row (a table is one lookup per row; a group that does not fit is not an error)."""
  return group_size if group_size and features % group_size == 0 else None


def quantize_embeddings(variables, config: QuantConfig) -> dict[str, QuantizedKernel]:
  """RTN of every embedding table at config.embed_bits ({} when it is None)."""
  if config.embed_bits is None:
    return {}
  out = {}
  for p in embedding_paths(variables):
    e = kernel(variables, p, 'embedding')
    out[p] = quantize_embedding(e, config.embed_bits,
                                embed_group_size(np.shape(e)[1], config.group_size),
                                config.scale_dtype, p)
  return out


def assemble(config: QuantConfig, variables, kernels: dict[str, QuantizedKernel]
             ) -> QuantizedParams:
  """QuantizedParams of `kernels` (the target projections, however quantized) plus, when
  config.embed_bits is set, the RTN embedding tables; every other leaf kept in `rest`."""
  tables = quantize_embeddings(variables, config)
  return QuantizedParams(config, {**kernels, **tables},
                         split_rest(variables, list(kernels), list(tables)))


def quantize_params(variables, config: QuantConfig) -> QuantizedParams:
  """RTN-quantizes the kernels `config.target` matches (and the embedding tables when
  config.embed_bits is set); other leaves are kept as they are. A scan_layers tree is
  quantized per layer (the target sees `layers_{i}/...` paths)."""
  if is_stacked(variables):
    return dataclasses.replace(
        quantize_params(stacking.unstack_layers(variables), config), stacked=True)
  paths = target_paths(variables, config.target)
  check_layer_bits(paths, config)
  kernels = {p: quantize_kernel(kernel(variables, p), config.bits_for(p), config.group_size,
                                config.scale_dtype, p) for p in paths}
  return assemble(config, variables, kernels)


def dequantize(qparams: QuantizedParams) -> dict[str, Any]:
  """A plain variables tree {'params': ...} for Decoder.apply (the kernels dequantized)."""
  flat = {tuple(k.split('/')): v for k, v in qparams.rest.items()}
  for p, qk in qparams.kernels.items():
    flat[('params', *p.split('/'), qk.leaf)] = dequantize_kernel(qk)
  out = flax.traverse_util.unflatten_dict(flat)
  return stacking.stack_layers(out) if qparams.stacked else out


def replace_kernels(variables, new: dict[str, Any]) -> dict[str, Any]:
  """`variables` with the kernels of the module paths in `new` replaced (a new tree)."""
  flat = dict(flax.traverse_util.flatten_dict(variables))
  for p, w in new.items():
    flat[('params', *p.split('/'), 'kernel')] = w
  return flax.traverse_util.unflatten_dict(flat)
