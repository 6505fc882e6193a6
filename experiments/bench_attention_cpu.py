r"""Attention's forward and backward on this CPU: kd's 'matmul' path against
jax.nn.dot_product_attention's XLA path, at one decoder's shape.

  .venv/bin/python experiments/bench_attention_cpu.py [--batch=4 --seq_len=256 --heads=9 \
      --kv_heads=3 --head_dim=64] [--segments=4] [--iters=30]

Defaults are SmolLM2-135M's attention at experiments/bench_cpu_vs_torch.py's batch. Both run
causal, float32, with `--segments` packed sequences per row as a mask (0: none), under the XLA
flags kd.main sets (kd.xla_flags). Prints the median ms per call of value-and-gradient for each
and their ratio, after checking that both give the same values and gradients.
"""

import time

import numpy as np
from absl import app
from absl import flags

_BATCH = flags.DEFINE_integer('batch', 4, 'Rows.')
_SEQ = flags.DEFINE_integer('seq_len', 256, 'Tokens per row.')
_HEADS = flags.DEFINE_integer('heads', 9, 'Query heads.')
_KV = flags.DEFINE_integer('kv_heads', 3, 'Key/value heads.')
_DIM = flags.DEFINE_integer('head_dim', 64, 'Head width.')
_SEGMENTS = flags.DEFINE_integer('segments', 0, 'Packed sequences per row (0: no mask).')
_ITERS = flags.DEFINE_integer('iters', 30, 'Timed calls per path.')


def main(argv):
  del argv
  from kd import xla_flags  # pylint: disable=g-import-not-at-top
  xla_flags.apply()  # as kd.main does, before the backend starts
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from kd.models import matmul_attention  # pylint: disable=g-import-not-at-top

  b, t, n, kv, h = _BATCH.value, _SEQ.value, _HEADS.value, _KV.value, _DIM.value
  r = np.random.default_rng(0)
  q, d_out = (jnp.asarray(r.standard_normal((b, t, n, h)), jnp.float32) for _ in range(2))
  k, v = (jnp.asarray(r.standard_normal((b, t, kv, h)), jnp.float32) for _ in range(2))
  mask = None
  if _SEGMENTS.value:
    seg = np.arange(t) * _SEGMENTS.value // t
    mask = jnp.asarray(seg[:, None] == seg[None, :])[None, None]
  scale = h ** -0.5
  paths = {
      'kd matmul': lambda q, k, v: matmul_attention.attention(q, k, v, mask, scale, True),
      'jax xla': lambda q, k, v: jax.nn.dot_product_attention(
          q, k, v, mask=mask, scale=scale, is_causal=True, implementation='xla'),
  }
  times, results = {}, {}
  for name, fn in paths.items():
    step = jax.jit(jax.value_and_grad(lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v) * d_out),
                                      argnums=(0, 1, 2)))
    results[name] = jax.block_until_ready(step(q, k, v))
    laps = []
    for _ in range(_ITERS.value):
      start = time.perf_counter()
      jax.block_until_ready(step(q, k, v))
      laps.append(time.perf_counter() - start)
    times[name] = float(np.median(laps)) * 1e3
  for a, c in zip(jax.tree.leaves(results['kd matmul']), jax.tree.leaves(results['jax xla'])):
    np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-4)
  print(f'attention forward+backward, B={b} T={t} heads={n}/{kv} head_dim={h} '
        f'segments={_SEGMENTS.value}, float32, {jax.devices()[0].device_kind}')
  print('| path | ms per call (median) | vs jax xla |\n|---|---:|---:|')
  for name, ms in times.items():
    print(f'| {name} | {ms:.1f} | {ms / times["jax xla"]:.2f}× |')


if __name__ == '__main__':
  app.run(main)
