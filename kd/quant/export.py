"""Compact storage of QuantizedParams: one safetensors file, written atomically.

Tensors:
  kernels/<module path>/values   int4: uint8 [ceil(in * out / 2)], two values per byte (element
                                 2k in the low nibble, 2k+1 in the high one, two's complement);
                                 int8: int8 [in, out]
  kernels/<module path>/scales   float16 or float32 [in / group_size, out]
                                 (an embedding table, leaf 'embedding': values [rows, features]
                                 packed alike, scales [rows, features / group_size])
  rest/<full path>               every other leaf as it is (bfloat16 stored as its uint16 bits)
The header's metadata holds the JSON under 'kd.quant': the QuantConfig and per kernel its bits,
group_size, shape, float dtype and leaf, so `load` needs nothing else (and no model code).

  save('/tmp/m.safetensors', qparams); qparams = load('/tmp/m.safetensors')
"""

from __future__ import annotations

import json
import os

import numpy as np
from safetensors import safe_open

from kd.hf import io
from kd.quant import rtn

FORMAT = 'kd.quant'
VERSION = 1
# Dtypes safetensors.numpy cannot hold, stored as raw bits of the same width.
_AS_BITS = {'bfloat16': np.uint16}


def pack_int4(values) -> np.ndarray:
  """int values in [-8, 7] (any shape) -> uint8 [ceil(size / 2)], two per byte, row-major."""
  v = np.asarray(values).reshape(-1).astype(np.int8)
  if v.size and (v.min() < -8 or v.max() > 7):
    raise ValueError(f'int4 values must lie in [-8, 7], got [{v.min()}, {v.max()}].')
  nibbles = (v.astype(np.uint8) & 0xF)
  if nibbles.size % 2:
    nibbles = np.append(nibbles, np.uint8(0))
  return (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8)


def unpack_int4(packed, shape) -> np.ndarray:
  """The inverse of `pack_int4`: int8 values of `shape`."""
  p = np.asarray(packed, np.uint8)
  nibbles = np.stack([p & 0xF, p >> 4], axis=-1).reshape(-1)[:int(np.prod(shape))]
  return ((nibbles.astype(np.int8) ^ 8) - 8).astype(np.int8).reshape(shape)


def _to_numpy(x) -> tuple[np.ndarray, str]:
  a = np.ascontiguousarray(np.asarray(x))
  name = a.dtype.name
  return (a.view(_AS_BITS[name]) if name in _AS_BITS else a), name


def _from_numpy(a: np.ndarray, name: str) -> np.ndarray:
  return a.view(np.dtype(name)) if name in _AS_BITS else a


def save(path: str, qparams: rtn.QuantizedParams) -> None:
  """Writes `qparams` to `path` (a .safetensors file), atomically (kd.hf.io.save_file)."""
  tensors, dtypes, kernels = {}, {}, {}
  for p, qk in qparams.kernels.items():
    if qk.bits == 4:
      values = pack_int4(qk.values)
    else:
      values = np.ascontiguousarray(qk.values, np.int8)
    tensors[f'kernels/{p}/values'] = values
    tensors[f'kernels/{p}/scales'] = np.ascontiguousarray(qk.scales)
    kernels[p] = {'bits': qk.bits, 'group_size': qk.group_size, 'shape': list(qk.shape),
                  'dtype': qk.dtype, 'leaf': qk.leaf}
  for k, v in qparams.rest.items():
    tensors[f'rest/{k}'], name = _to_numpy(v)
    if name in _AS_BITS:
      dtypes[k] = name
  header = {'version': VERSION, 'config': qparams.config.to_dict(), 'kernels': kernels,
            'rest_dtypes': dtypes, 'stacked': qparams.stacked}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  io.save_file(tensors, path, metadata={FORMAT: json.dumps(header)})


def load(path: str) -> rtn.QuantizedParams:
  """Reads a file `save` wrote; values come back as int8 [in, out], arrays as numpy."""
  with safe_open(path, framework='np') as f:
    meta = f.metadata() or {}
    if FORMAT not in meta:
      raise ValueError(f'{path} has no {FORMAT!r} header; it was not written by '
                       'kd.quant.export.save.')
    header = json.loads(meta[FORMAT])
    if header.get('version') != VERSION:
      raise ValueError(f'{path} is kd.quant format version {header.get("version")}; this code '
                       f'reads version {VERSION}.')
    kernels = {}
    for p, info in header['kernels'].items():
      shape = tuple(info['shape'])
      values = f.get_tensor(f'kernels/{p}/values')
      values = unpack_int4(values, shape) if info['bits'] == 4 else values.reshape(shape)
      kernels[p] = rtn.QuantizedKernel(values, f.get_tensor(f'kernels/{p}/scales'),
                                       info['bits'], info['group_size'], info['dtype'],
                                       info.get('leaf', 'kernel'))
    rest = {}
    for key in f.keys():
      if key.startswith('rest/'):
        k = key[len('rest/'):]
        rest[k] = _from_numpy(f.get_tensor(key), header['rest_dtypes'].get(k, ''))
  config = rtn.QuantConfig.from_dict(header['config'])
  return rtn.QuantizedParams(config, kernels, rest, stacked=header.get('stacked', False))


def size_on_disk(path: str) -> int:
  """Bytes of the saved file."""
  return os.path.getsize(path)
