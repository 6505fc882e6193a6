"""Causal attention on the TPU's Pallas splash kernel (`DecoderConfig.attention_impl='splash'`).

  out_BxTxNxH = attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, scale, window=None,
                          segments_BxT=None)

jax.nn.dot_product_attention has no TPU flash kernel (its 'xla' path holds the [B, N, T, T]
logits); the splash kernel in jax.experimental.pallas.ops.tpu streams key blocks with an online
softmax and skips the blocks the causal (or sliding-window) mask leaves empty, forward and
backward. `segments_BxT` (ints) restricts each query to keys of its own segment: packed
sequences, or padding (0) apart from real tokens (1), whose rows are then not a real token's.
Grouped-query attention runs as the kernel's MQA form, once per KV head: the N / K
query heads of a group share their key and value, which are never repeated.

Under pmap each device calls the kernel on its own rows. Under a mesh (`jax.set_mesh`, as
kd.parallel.MeshPlan traces its step) the kernel runs per shard
through `jax.shard_map`: the batch split over the mesh's 'data' and 'fsdp' axes and the KV heads
over 'tensor' (where they divide), since a Pallas call cannot be partitioned by XLA itself.
Off a TPU the kernel runs in Pallas' interpret mode (slow; for tests).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
from jax.sharding import PartitionSpec as P

BLOCK = 128  # the kernel's lane width: sequence blocks are multiples of it


def fits(t: int) -> bool:
  """Whether the kernel takes a sequence of length t (whole blocks; Decoder uses XLA else)."""
  return t > 0 and t % BLOCK == 0


@functools.lru_cache(maxsize=None)
def _kernel(t: int, group: int, window: int | None, interpret: bool):
  """The MQA kernel for `group` query heads of length t sharing one key/value head."""
  one = (masks.CausalMask((t, t)) if window is None
         else masks.LocalMask((t, t), window_size=(window - 1, 0), offset=0))
  block = max(b for b in (512, 256, BLOCK) if t % b == 0)
  sizes = kernel.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                            block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                            block_q_dq=block, block_kv_dq=block)
  with jax.ensure_compile_time_eval():  # its mask tables: concrete, so the cache holds no tracer
    return kernel.make_splash_mqa_single_device(masks.MultiHeadMask([one] * group),
                                                block_sizes=sizes, interpret=interpret)


def _local(q_BxKxGxTxH, k_BxKxTxH, v_BxKxTxH, segments_BxT, window, interpret):
  _, _, g, t, _ = q_BxKxGxTxH.shape
  run = _kernel(t, g, window, interpret)
  if segments_BxT is None:
    return jax.vmap(jax.vmap(run))(q_BxKxGxTxH, k_BxKxTxH, v_BxKxTxH)
  per_example = lambda q, k, v, s: jax.vmap(
      lambda q, k, v: run(q, k, v, segment_ids=kernel.SegmentIds(s, s)))(q, k, v)
  return jax.vmap(per_example)(q_BxKxGxTxH, k_BxKxTxH, v_BxKxTxH, segments_BxT)


def attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, scale: float, window: int | None = None,
              segments_BxT=None):
  """Causal attention (keys less than `window` slots back, if given; within each query's
  segment, if `segments_BxT` is given), [B, T, N, H] out."""
  b, t, n, h = q_BxTxNxH.shape
  k = k_BxTxKxH.shape[2]
  if not fits(t):
    raise ValueError(f'splash attention needs a sequence length that is a multiple of {BLOCK} '
                     f'(the kernel\'s blocks), got {t}: pad or cut the sequences.')
  q_BxKxGxTxH = (q_BxTxNxH * jnp.asarray(scale, q_BxTxNxH.dtype)).reshape(
      b, t, k, n // k, h).transpose(0, 2, 3, 1, 4)
  k_BxKxTxH, v_BxKxTxH = k_BxTxKxH.transpose(0, 2, 1, 3), v_BxTxKxH.transpose(0, 2, 1, 3)
  local = functools.partial(_local, window=window, interpret=jax.default_backend() != 'tpu')
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty:
    batch = tuple(a for a in ('data', 'fsdp') if a in mesh.axis_names and mesh.shape[a] > 1)
    if not batch or b % math.prod(mesh.shape[a] for a in batch):
      batch = None
    heads = 'tensor' if 'tensor' in mesh.axis_names and k % mesh.shape['tensor'] == 0 else None
    spec = P(batch, heads)
    local = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, P(batch)),
                          out_specs=spec, check_vma=False)
  segments = None if segments_BxT is None else segments_BxT.astype(jnp.int32)
  out_BxKxGxTxH = local(q_BxKxGxTxH, k_BxKxTxH, v_BxKxTxH, segments)
  return out_BxKxGxTxH.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)

