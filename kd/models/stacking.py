"""Per-layer params (`layers_0`, `layers_1`, ...) and the stacked layout of scanned layers."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def stack_layers(variables: dict[str, Any]) -> dict[str, Any]:
  """Per-layer variables (`layers_0`, `layers_1`, ...) -> one `layers` subtree whose leaves
  have a leading layer axis: the layout of a config with scan_layers=True. Other entries and
  collections pass through; a tree that is already stacked is returned as it is."""
  def stack(tree):
    n = sum(1 for k in tree if k.startswith('layers_'))
    if not n:
      return tree
    out = {k: v for k, v in tree.items() if not k.startswith('layers_')}
    out['layers'] = jax.tree.map(lambda *xs: jnp.stack(xs), *[tree[f'layers_{i}']
                                                               for i in range(n)])
    return out
  return {col: stack(tree) for col, tree in variables.items()}


def unstack_layers(variables: dict[str, Any]) -> dict[str, Any]:
  """The inverse of `stack_layers`: a stacked `layers` subtree -> `layers_0`, `layers_1`, ..."""
  def unstack(tree):
    if 'layers' not in tree:
      return tree
    n = jax.tree.leaves(tree['layers'])[0].shape[0]
    out = {k: v for k, v in tree.items() if k != 'layers'}
    out.update({f'layers_{i}': jax.tree.map(lambda x, i=i: x[i], tree['layers'])
                for i in range(n)})
    return out
  return {col: unstack(tree) for col, tree in variables.items()}
