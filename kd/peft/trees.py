"""Splitting a variables tree into trained and frozen leaves, and joining them back."""

from typing import Any, Callable

import flax


def split_by(trained: Callable[[tuple], bool], variables) -> tuple[dict, dict]:
  """{'params': ...} -> (the leaves whose path tuple `trained` accepts, all others), nested."""
  flat = flax.traverse_util.flatten_dict(variables)
  picked = {k: v for k, v in flat.items() if trained(k)}
  rest = {k: v for k, v in flat.items() if not trained(k)}
  return flax.traverse_util.unflatten_dict(picked), flax.traverse_util.unflatten_dict(rest)


def combine(trained, frozen) -> dict[str, Any]:
  """The inverse of `split_by`; raises if the two trees share a path."""
  flat_t, flat_f = (flax.traverse_util.flatten_dict(t) for t in (trained, frozen))
  both = sorted('/'.join(k) for k in set(flat_t) & set(flat_f))
  if both:
    raise ValueError(f'trained and frozen params overlap at {both[:5]}; pass the two trees a '
                     'split returned (the frozen base without the adapters).')
  return flax.traverse_util.unflatten_dict({**flat_f, **flat_t})
