r"""The fused chunked logit loss alone: closed-form logit gradient against autodiff, per divergence.

  .venv/bin/python experiments/bench_logit_chunk.py [--vocab=152064] [--batch=4] [--seq=256] \
      [--chunk_size=128] [--hidden=256] [--temperature=2] [--runs=5] [--divergences=kl,jsd]

One program per (divergence, closed_form): the gradient, with respect to the student's hidden
states and head, of 0.5·CE + 0.5·divergence through `kd.losses.fused_logit_losses`, bf16 hidden
states and heads, random weights. Prints a markdown table: XLA's temp bytes of each compiled
program and the median wall time of `--runs` calls after one untimed call, closed form next to
autodiff. A small `--hidden` keeps the [B, C, V] elementwise work (what the closed form changes)
the larger part of the time. The 152k default takes about four minutes on a 2-core CPU.
"""

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags

from kd import losses

_VOCAB = flags.DEFINE_integer('vocab', 152064, 'Vocabulary size V.')
_BATCH = flags.DEFINE_integer('batch', 4, 'Batch size B.')
_SEQ = flags.DEFINE_integer('seq', 256, 'Sequence length T.')
_CHUNK = flags.DEFINE_integer('chunk_size', 128, 'Tokens per chunk C.')
_HIDDEN = flags.DEFINE_integer('hidden', 256, 'Hidden width of both models.')
_TEMPERATURE = flags.DEFINE_float('temperature', 2.0, 'Distillation temperature.')
_RUNS = flags.DEFINE_integer('runs', 5, 'Timed calls per program (median reported).')
_DIVERGENCES = flags.DEFINE_list('divergences', sorted(losses.DIVERGENCES),
                                 'Divergences to time, each beside CE.')


def measure(terms, closed_form, args, runs):
  """(temp GB, median s) of the gradient program of Σ 0.5·term through the fused chunks."""
  hs, params, ht, teacher_w, labels = args
  coeffs = {name: 0.5 for name in terms}

  def loss(h, p):
    out, surrogate = losses.fused_logit_losses(
        terms, coeffs, h, p, lambda q, x: x @ q['w'], ht, lambda x: x @ teacher_w,
        labels=labels, temperature=_TEMPERATURE.value, chunk_size=_CHUNK.value,
        closed_form=closed_form)
    return sum(coeffs[k] * s for k, (s, _) in out.items()) + surrogate

  compiled = jax.jit(jax.grad(loss, (0, 1))).lower(hs, params).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes / 1e9
  jax.block_until_ready(compiled(hs, params))
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    jax.block_until_ready(compiled(hs, params))
    times.append(time.perf_counter() - start)
  return temp, statistics.median(times)


def main(argv):
  del argv
  unknown = sorted(set(_DIVERGENCES.value) - set(losses.DIVERGENCES))
  if unknown:
    raise app.UsageError(f'--divergences: unknown {unknown}; valid: {sorted(losses.DIVERGENCES)}')
  b, t, d, v = _BATCH.value, _SEQ.value, _HIDDEN.value, _VOCAB.value
  rng = np.random.default_rng(0)
  bf16 = lambda *shape, scale=1.0: jnp.asarray(rng.normal(size=shape) * scale, jnp.bfloat16)
  args = (bf16(b, t, d), {'w': bf16(d, v, scale=0.1)}, bf16(b, t, d), bf16(d, v, scale=0.1),
          jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32))
  print(f'B={b} T={t} C={_CHUNK.value} D={d} V={v} T_kd={_TEMPERATURE.value}, '
        f'{jax.devices()[0].device_kind}')
  print('| terms | autodiff temp GB | closed temp GB | autodiff s | closed s | time ratio |')
  print('|---|---:|---:|---:|---:|---:|')
  for name in _DIVERGENCES.value:
    terms = {name: {}, 'ce': {}}
    (temp_a, s_a), (temp_c, s_c) = (measure(terms, cf, args, _RUNS.value) for cf in (False, True))
    print(f'| {name} + ce | {temp_a:.3f} | {temp_c:.3f} | {s_a:.3g} | {s_c:.3g} | '
          f'{s_c / s_a:.2f} |', flush=True)


if __name__ == '__main__':
  app.run(main)
