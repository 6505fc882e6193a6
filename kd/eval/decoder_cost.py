"""What a decoder costs to run: generated tokens/s through kd's KV-cached sampler, the bytes
of its weights and of its KV cache, and the FLOPs per token XLA counts.

  generation_speed(model, batch_size=32, prompt_len=32, new_tokens=32)   # best of `runs`
  kv_cache_bytes(model.config, batch_size=1, length=2048)   # (weights: kd.eval.speed.param_bytes)
  flops_per_token(model, seq_len=128)
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from kd.eval import ranking
from kd.models import cache as kv_cache
from kd.models import sample


def generation_speed(model, *, batch_size: int, prompt_len: int, new_tokens: int,
                     runs: int = 3) -> dict:
  """{'tokens_per_s', 'seconds'}: greedy generation of `new_tokens` after fixed random prompts
  [batch_size, prompt_len] (prefill included, no early stop), best of `runs` after one untimed
  call (which compiles). tokens/s counts generated tokens only."""
  ids = np.random.default_rng(0).integers(0, model.config.vocab_size,
                                          (batch_size, prompt_len), dtype=np.int32)
  call = lambda: sample.generate(model, ids, max_new_tokens=new_tokens, temperature=0.0)
  jax.block_until_ready(call())
  best = float('inf')
  for _ in range(runs):
    t0 = time.perf_counter()
    jax.block_until_ready(call())
    best = min(best, time.perf_counter() - t0)
  return {'tokens_per_s': batch_size * new_tokens / best, 'seconds': best}


def kv_cache_bytes(config, *, batch_size: int, length: int) -> int:
  """Bytes of the keys and values kd's sampler holds for `batch_size` rows of `length` tokens
  (kd.models.cache.init_cache, in the compute dtype), without allocating them."""
  shapes = jax.eval_shape(lambda: kv_cache.init_cache(config, batch_size, length))
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes['layers']))


def flops_per_token(model, seq_len: int = 128) -> float:
  """FLOPs per token XLA counts (cost_analysis) for the compiled forward to logits at
  [1, seq_len]; a multiply-add counts 2, elementwise ops count too."""
  ids = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
  forward = jax.jit(lambda params, ids: model.module.apply(params, ids)['logits'])
  return ranking.xla_flops(forward.lower(model.params, ids).compile()) / seq_len


def matmul_flops_per_token(config, seq_len: int) -> float:
  """The same count by hand: 2 x every projection's weights (q and o: D x N·H; k and v: D x
  K·H; the MLP's 2 or 3 D x F), attention's scores and weighted sum averaged over a causal
  window of `seq_len` (2 x 2 x N·H x seq_len, as XLA computes the full square), and the LM head
  (2 D V); norms, activations and the softmax not counted."""
  d, f, n, k, h = (config.hidden_size, config.intermediate_size, config.num_heads,
                   config.num_kv_heads, config.head_dim)
  mlp = (3 if config.mlp_gated else 2) * d * f
  per_layer = 2 * (2 * d * n * h + 2 * d * k * h + mlp) + 4 * n * h * seq_len
  return config.num_layers * per_layer + 2 * d * config.vocab_size
