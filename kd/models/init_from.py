"""Student initialisation from a teacher: keep some of its layers (DistilBERT), optionally narrower.

Works on any kd `Model` whose config is a dataclass with `num_layers` (and `hidden_size`) and
whose params hold one subtree per layer named `layers_{i}`: the decoder and the BERT encoder
(a decoder with scan_layers is unstacked, cut and stacked again).

  student = student_from_teacher(teacher, layers='every_k', k=2)
  student = student_from_teacher(teacher, layers=[0, 5, 11], hidden_size=256)

Narrower students (`hidden_size` or other size overrides) take the leading slice of every
teacher weight along every axis that shrinks: the first rows/columns of each matrix, the first
entries of each norm scale and bias. No projection is applied; it is a starting point for
distillation, not a compressed model that behaves like the teacher. Heads keep the teacher's
head_dim when the config has a head_dim field, so a narrower decoder keeps whole heads.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from kd.models import stacking

_LAYER = re.compile(r'layers_(\d+)$')


def select_layers(num_layers: int, layers: str | Sequence[int] = 'every_k',
                  k: int = 2) -> list[int]:
  """Teacher layer indices to keep.

  'every_k': 0, k, 2k, ... (DistilBERT keeps every other layer from the first);
  'first_last': the first and the last; a sequence: those indices, increasing.
  """
  if isinstance(layers, str):
    if layers == 'every_k':
      if not isinstance(k, int) or k < 1:
        raise ValueError(f"layers='every_k' needs an int k >= 1, got k={k!r}.")
      return list(range(0, num_layers, k))
    if layers == 'first_last':
      return sorted({0, num_layers - 1})
    raise ValueError(f"unknown layers={layers!r}; use 'every_k', 'first_last' or a list of "
                     'layer indices.')
  chosen = [int(i) for i in layers]
  if not chosen or chosen != sorted(set(chosen)) or chosen[0] < 0 or chosen[-1] >= num_layers:
    raise ValueError(f'layers={list(layers)} must be increasing, distinct indices in '
                     f'[0, {num_layers}).')
  return chosen


def _keep_layers(tree: dict[str, Any], keep: list[int]) -> dict[str, Any]:
  out = {k: v for k, v in tree.items() if not _LAYER.match(k)}
  for new, old in enumerate(keep):
    out[f'layers_{new}'] = tree[f'layers_{old}']
  return out


def _init_shapes(module):
  ids_1xT = jnp.zeros((1, 4), jnp.int32)
  return jax.eval_shape(lambda: module.init(jax.random.key(0), ids_1xT))


def _truncate(name, x, target):
  if any(n > m for n, m in zip(target.shape, x.shape)) or len(target.shape) != x.ndim:
    raise ValueError(f'{name}: the student shape {target.shape} is larger than the teacher '
                     f'{x.shape}; a student can only be narrower.')
  return jnp.asarray(x[tuple(slice(0, n) for n in target.shape)], target.dtype)


def student_from_teacher(model, layers: str | Sequence[int] = 'every_k', *, k: int = 2,
                         hidden_size: int | None = None, **overrides):
  """A new `Model` with the teacher's chosen layers (and its embeddings, norms, head, tokenizer).

  Args:
    model: the teacher `Model`.
    layers: 'every_k', 'first_last' or explicit teacher layer indices (see select_layers).
    k: the stride of 'every_k'.
    hidden_size: a smaller residual width; every weight is cut to its leading slice.
    **overrides: other config fields, e.g. intermediate_size=512 or num_heads=4; those that change
      shapes are cut the same way. Fields that add or remove parameters are refused.
      scan_layers (a decoder's) gives the student that layout, whatever the teacher's.
  """
  config, params = model.config, model.params
  scan = overrides.pop('scan_layers', getattr(config, 'scan_layers', False))
  if getattr(config, 'scan_layers', False):  # select and cut per layer; stacked again below
    config, params = dataclasses.replace(config, scan_layers=False), stacking.unstack_layers(params)
  keep = select_layers(config.num_layers, layers, k)
  changes = dict(overrides, num_layers=len(keep))
  if getattr(config, 'layer_types', None) is not None and 'layer_types' not in overrides:
    changes['layer_types'] = tuple(config.layer_types[i] for i in keep)
  if hidden_size is not None and hidden_size != config.hidden_size:
    changes['hidden_size'] = hidden_size
    fields = {f.name for f in dataclasses.fields(config)}
    if 'head_dim' in fields and 'head_dim' not in overrides:
      changes['head_dim'] = config.head_dim
  new_config = dataclasses.replace(config, **changes)
  module = type(model.module)(new_config)
  variables = {col: _keep_layers(tree, keep) for col, tree in params.items()}

  if set(changes) - {'num_layers', 'layer_types'}:  # shapes may change: cut to the student's
    target = _init_shapes(module)
    if jax.tree.structure(target) != jax.tree.structure(variables):
      raise ValueError(f'the overrides {sorted(overrides)} add or remove parameters; '
                       'student_from_teacher only selects layers and narrows weights.')
    variables = jax.tree_util.tree_map_with_path(
        lambda path, x, t: _truncate(jax.tree_util.keystr(path), x, t), variables, target)
  if scan:
    new_config = dataclasses.replace(new_config, scan_layers=True)
    module, variables = type(model.module)(new_config), stacking.stack_layers(variables)
  return model.replace(module=module, params=variables, source=None)
