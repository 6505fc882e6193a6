"""Key/value cache for incremental decoding with `Decoder`.

A cache is a plain pytree, so it can be a `lax.while_loop` carry and be donated:

  {'index': int32 scalar,        # the slot the next token is written to (shared by the batch)
   'mask': bool [B, S],          # which slots hold real tokens (left padding stays False)
   'layers': ({'k': [B, S, K, H], 'v': [B, S, K, H]}, ...)}  # post-RoPE keys, values
  # (with config.scan_layers one dict {'k': [L, B, S, K, H], 'v': ...}, scanned with the layers)

Every row writes to the same slot, so batched prompts must be left-padded to one length. Keys of
sliding-window layers are kept in full and masked by slot distance, exactly as transformers
masks them; memory is S slots whatever the window.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def init_cache(config, batch: int, max_len: int, dtype=None) -> dict[str, Any]:
  """An empty cache for `batch` rows of up to `max_len` tokens (prompt + generated), plus the
  learned prompt's slots of a prompt-tuned config (config.prompt_len)."""
  dtype = jnp.dtype(dtype or config.dtype)
  max_len += getattr(config, 'prompt_len', 0)
  shape = (batch, max_len, config.num_kv_heads, config.head_dim)
  if getattr(config, 'scan_layers', False):  # one stacked entry, scanned with the layers
    shape = (config.num_layers,) + shape
    layers = {'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype)}
  else:
    layers = tuple({'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype)}
                   for _ in range(config.num_layers))
  return {'index': jnp.zeros((), jnp.int32), 'mask': jnp.zeros((batch, max_len), bool),
          'layers': layers}


def write(buffer_BxSx___, new_BxTx___, index):
  """`new` written into `buffer` at slots [index, index + T)."""
  start = (0, index) + (0,) * (buffer_BxSx___.ndim - 2)
  return jax.lax.dynamic_update_slice(buffer_BxSx___, new_BxTx___.astype(buffer_BxSx___.dtype),
                                      start)


def default_positions(cache_mask_BxS, new_mask_BxT):
  """Positions that count real tokens only, as transformers' generate does for left padding:
  padding gets 0, the first real token 0, the next 1, ..."""
  before_Bx1 = jnp.sum(cache_mask_BxS, axis=-1, dtype=jnp.int32)[:, None]
  return jnp.maximum(before_Bx1 + jnp.cumsum(new_mask_BxT.astype(jnp.int32), axis=-1) - 1, 0)


def attention_masks(key_mask_BxS, index, num_queries: int, sliding_window: int | None,
                    always_visible: int = 0):
  """Masks [B,1,T,S] (True = may attend) for T new queries at slots index..index+T-1.

  A query sees real keys at or before its own slot, and always itself (so padded queries stay
  finite). The first `always_visible` slots (a prompt-tuned model's learned prompt) are outside
  every sliding window. Returns {'full_attention': ..., 'sliding_attention': ... or None}.
  """
  q_T1 = index + jnp.arange(num_queries)[:, None]
  k_1S = jnp.arange(key_mask_BxS.shape[1])[None, :]
  allowed_BxTxS = ((k_1S <= q_T1)[None] & key_mask_BxS[:, None, :]) | (k_1S == q_T1)[None]
  masks = {'full_attention': allowed_BxTxS[:, None], 'sliding_attention': None}
  if sliding_window is not None:  # transformers: key slot > query slot - window
    in_window = (q_T1 - k_1S < sliding_window) | (k_1S < always_visible)
    masks['sliding_attention'] = (allowed_BxTxS & in_window[None])[:, None]
  return masks
