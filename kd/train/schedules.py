"""Scalar schedules over training steps, for loss weights, temperature and the learning rate.

A schedule is given in a config as a plain number (constant) or a dict:
  {'kind': 'linear' | 'cosine' | 'constant', 'start': a, 'end': b, 'steps': n, 'warmup': w}
`steps` is the length of the ramp from `start` to `end` (after `warmup` steps at `start`);
past it the value stays at `end`.
"""

from typing import Any, Callable, Mapping

import jax.numpy as jnp

Schedule = Callable[[Any], Any]


def _constant(start, end, steps, warmup):
  del end, steps, warmup
  return lambda step: jnp.asarray(start, jnp.float32)


def _ramp(shape):
  def make(start, end, steps, warmup):
    def fn(step):
      t = jnp.clip((jnp.asarray(step, jnp.float32) - warmup) / max(steps, 1), 0.0, 1.0)
      return jnp.asarray(start + (end - start) * shape(t), jnp.float32)
    return fn
  return make


KINDS = {
    'constant': _constant,
    'linear': _ramp(lambda t: t),
    'cosine': _ramp(lambda t: 0.5 * (1.0 - jnp.cos(jnp.pi * t))),
}


def _plain(spec):
  return spec.to_dict() if hasattr(spec, 'to_dict') else spec  # a ConfigDict


def make(spec, name: str = 'schedule') -> Schedule:
  """Turns a number or a schedule dict into `fn(step) -> float32 scalar`."""
  spec = _plain(spec)
  if isinstance(spec, (int, float)):
    return _constant(float(spec), None, None, None)
  if not isinstance(spec, Mapping):
    raise ValueError(f'{name}: expected a number or a schedule dict, got {spec!r}')
  spec = dict(spec)
  kind = spec.pop('kind', 'constant')
  if kind not in KINDS:
    raise ValueError(f'{name}: unknown schedule kind {kind!r}; valid: {sorted(KINDS)}')
  unknown = set(spec) - {'start', 'end', 'steps', 'warmup'}
  if unknown:
    raise ValueError(f'{name}: unknown schedule keys {sorted(unknown)}; '
                     "valid: 'kind', 'start', 'end', 'steps', 'warmup'")
  if 'start' not in spec:
    raise ValueError(f"{name}: a {kind} schedule needs 'start'")
  start = float(spec['start'])
  return KINDS[kind](start, float(spec.get('end', start)), int(spec.get('steps', 1)),
                     int(spec.get('warmup', 0)))


def bounds(spec) -> tuple[float, float]:
  """The smallest and largest value a schedule takes (for validating before compiling)."""
  spec = _plain(spec)
  if isinstance(spec, (int, float)):
    return float(spec), float(spec)
  start = float(spec['start'])
  end = float(spec.get('end', start))
  return min(start, end), max(start, end)
