"""Speed and memory of a model's forward pass, measured, on this machine's default device.

  encode_throughput(model, sentences, batch_size=64)  # sentences/s through kd.eval.sts.encode
  forward_memory(model, batch_size=64, seq_len=48)     # bytes XLA plans for one forward

Throughput is the best of `runs` timed passes after one untimed pass (which compiles), so it
measures the steady state and not the compiler; it includes tokenisation and the host copy,
like a user's `encode`. Memory is XLA's own plan for the compiled forward: the arguments
(parameters and inputs), the outputs and the temporary buffers, the peak a device must hold.
"""

import time

import jax
import jax.numpy as jnp

from kd.eval import sts


def param_bytes(params) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params)))


def encode_throughput(model, sentences, *, batch_size: int = 64, runs: int = 3,
                      max_length: int = 128) -> float:
  """Sentences per second of `kd.eval.sts.encode(model, sentences)`, best of `runs`."""
  sentences = list(sentences)
  sts.encode(model, sentences, batch_size=batch_size, max_length=max_length)
  best = float('inf')
  for _ in range(runs):
    t0 = time.perf_counter()
    sts.encode(model, sentences, batch_size=batch_size, max_length=max_length)
    best = min(best, time.perf_counter() - t0)
  return len(sentences) / best


def forward_memory(model, *, batch_size: int = 64, seq_len: int = 48) -> dict:
  """{'argument', 'output', 'temp', 'peak'} bytes of the jitted embedding forward at [B, T]."""
  ids = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32)
  pooling = getattr(model.config, 'pooling', 'mean')
  compiled = sts.embed.lower(model.module, model.params, ids, ids, pooling=pooling).compile()
  stats = compiled.memory_analysis()
  out = {'argument': int(stats.argument_size_in_bytes), 'output': int(stats.output_size_in_bytes),
         'temp': int(stats.temp_size_in_bytes)}
  out['peak'] = out['argument'] + out['output'] + out['temp']
  return out
