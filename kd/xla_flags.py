"""The XLA flags kd adds by default, before a backend starts.

On a CPU, `--xla_cpu_experimental_ynn_fusion_type=dot` runs the matrix products through
YNNPACK and leaves the elementwise work to XLA's own fusions: the backward pass then keeps its
operands' layouts instead of copying them into transposed ones, and a whole KD step
(SmolLM2-135M teacher, 20-layer student, 4 × 256 tokens, float32) takes 10.7 s instead of 14.1 s
on a 2-core AMD EPYC (experiments/bench_cpu_vs_torch.py, kd_full against
kd_full_xla_defaults). The flag means nothing to a GPU or TPU backend.

A flag already in XLA_FLAGS wins, and KD_XLA_DEFAULTS=0 adds none.
"""

from __future__ import annotations

import os

DEFAULTS = ('--xla_cpu_experimental_ynn_fusion_type=dot',)
OFF_ENV = 'KD_XLA_DEFAULTS'


def apply(env=None) -> list[str]:
  """Adds to XLA_FLAGS each default whose flag it does not set yet; returns those added. XLA
  reads XLA_FLAGS when the first backend starts, so call this before any jax computation."""
  env = os.environ if env is None else env
  if env.get(OFF_ENV, '1') == '0':
    return []
  current = env.get('XLA_FLAGS', '')
  added = [f for f in DEFAULTS if f.split('=')[0] not in current]
  if added:
    env['XLA_FLAGS'] = ' '.join([current, *added]).strip()
  return added
