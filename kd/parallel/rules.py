"""Sharding rules: which axis of each array goes over the mesh's 'tensor' and FSDP axes.

A rule sees one leaf's path and shape, nothing else, so the same rules shard params, the
optimizer's moments (their paths end like the param's and they have its shape) and any other
state:
  tensor  by the name of the module that owns the leaf, Megatron style: column-parallel kernels
          (q/k/v, gate/up, lm_head) split their output axis (heads, MLP hidden, vocabulary),
          row-parallel kernels (o_proj, down_proj) their input axis, the embedding its
          vocabulary axis. Other names are not split over 'tensor' (add them to TENSOR_AXIS).
  fsdp    every leaf of >= 2 dims splits its largest remaining axis that the FSDP size divides
          (the first such axis on ties). Vectors and scalars (norm scales, step, counts, RNG)
          are replicated: they are small and every device reads them whole.
A leaf under a stacked `layers` subtree (DecoderConfig.scan_layers) has a leading layer axis:
it stays whole, and the rules above apply to the rest of the shape.
An axis that a mesh size does not divide stays whole: the rule is skipped, never an error, so a
model of any width runs on any mesh (split heads still compute correctly, if slower).
"""

import math
from typing import Sequence

import jax
from jax.sharding import PartitionSpec as P

# Module name -> the axis of its kernel/embedding split over 'tensor'.
TENSOR_AXIS = {
    'q_proj': -1, 'k_proj': -1, 'v_proj': -1, 'gate_proj': -1, 'up_proj': -1, 'lm_head': -1,
    'o_proj': 0, 'down_proj': 0, 'embed': 0,
}


def _names(path) -> list:
  return [str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path]


def partition_spec(path, shape: Sequence[int], *, tensor: int = 1, fsdp: int = 1,
                   fsdp_axes: tuple = ('fsdp',)) -> P:
  """The PartitionSpec of one leaf at `path` (a jax key path) with `shape`.

  `tensor` and `fsdp` are the sizes of the mesh axes (`fsdp` the product over `fsdp_axes`).
  """
  names = _names(path)
  at = names.index('layers') + 1 if 'layers' in names[:-1] else 0
  if at and not names[at].isdigit() and shape:  # scanned layers, [num_layers, ...]
    inner = partition_spec(path[at:], shape[1:], tensor=tensor, fsdp=fsdp, fsdp_axes=fsdp_axes)
    return P(None, *inner)
  spec = [None] * len(shape)
  if len(shape) < 2:
    return P(*spec)
  owner = names[-2] if len(names) >= 2 else ''
  if tensor > 1 and owner in TENSOR_AXIS:
    axis = TENSOR_AXIS[owner] % len(shape)
    if shape[axis] % tensor == 0:
      spec[axis] = 'tensor'
  if fsdp > 1 and fsdp_axes:
    free = [a for a in range(len(shape)) if spec[a] is None and shape[a] % fsdp == 0]
    if free:
      axis = max(free, key=lambda a: (shape[a], -a))
      spec[axis] = fsdp_axes[0] if len(fsdp_axes) == 1 else tuple(fsdp_axes)
  return P(*spec)


def tree_specs(tree, axis_sizes: dict, *, fsdp_axes: tuple = ('fsdp',)):
  """PartitionSpecs for every leaf of `tree` (arrays or ShapeDtypeStructs) on a mesh whose axis
  sizes are `axis_sizes` (e.g. `dict(mesh.shape)`)."""
  fsdp = math.prod(axis_sizes.get(a, 1) for a in fsdp_axes)
  tensor = axis_sizes.get('tensor', 1)
  return jax.tree_util.tree_map_with_path(
      lambda path, x: partition_spec(path, x.shape, tensor=tensor, fsdp=fsdp,
                                     fsdp_axes=fsdp_axes), tree)
