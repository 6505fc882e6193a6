"""Attention without parameters: masks (padding, packed segments, sliding windows, prefix and
prompt slots), the explicit softmax attention, soft-capping, and the choice of fused kernel."""

from __future__ import annotations


import jax
import jax.numpy as jnp

from kd.models import splash
from kd.models.decoder_config import DecoderConfig


def attention_mask_Bx1xTxT(attention_mask_BxT=None, segment_ids_BxT=None, *,
                           attend_self: bool = True):
  """Non-causal part of the attention mask (True = may attend), or None if nothing to mask.

  Padded keys (attention_mask == 0) are hidden; with segment_ids a query sees only keys of its
  own segment (padding, segment 0, then sees only padding). With `attend_self` every token may
  attend to itself, so no row is fully masked (e.g. left padding): padded queries stay causal
  and finite; real tokens are unaffected. Causality is added by the caller. The BERT encoder
  passes attend_self=False, as transformers does.
  """
  mask_BxTxT = None
  if segment_ids_BxT is not None:
    mask_BxTxT = segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
  if attention_mask_BxT is not None:
    keys_Bx1xT = attention_mask_BxT.astype(bool)[:, None, :]
    mask_BxTxT = keys_Bx1xT if mask_BxTxT is None else mask_BxTxT & keys_Bx1xT
  if mask_BxTxT is None:
    return None
  if attend_self:
    mask_BxTxT = mask_BxTxT | jnp.eye(mask_BxTxT.shape[-1], dtype=bool)
  return mask_BxTxT[:, None]


def sliding_window_mask(mask_Bx1xTxT, t: int, window: int):
  """`mask` restricted to keys less than `window` positions back (transformers' convention)."""
  i, j = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
  band_1x1xTxT = (i - j < window)[None, None]
  return band_1x1xTxT if mask_Bx1xTxT is None else mask_Bx1xTxT & band_1x1xTxT


def softcap(x, cap: float | None):
  """cap * tanh(x / cap) (Gemma 2's soft-capping), or x when cap is None."""
  return x if cap is None else jnp.tanh(x / cap) * cap


def explicit_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_Bx1xTxS, scale: float,
                       causal: bool = True, cap: float | None = None):
  """Attention that also returns the probabilities [B,N,T,S] (float32 softmax); `cap`
  soft-caps the scaled scores before the mask."""
  num_heads, num_kv = q_BxTxNxH.shape[2], k_BxSxKxH.shape[2]
  k_BxSxNxH = jnp.repeat(k_BxSxKxH, num_heads // num_kv, axis=2)
  v_BxSxNxH = jnp.repeat(v_BxSxKxH, num_heads // num_kv, axis=2)
  logits_BxNxTxS = jnp.einsum('btnh,bsnh->bnts', q_BxTxNxH, k_BxSxNxH,
                              preferred_element_type=jnp.float32) * scale
  logits_BxNxTxS = softcap(logits_BxNxTxS, cap)
  t, s = q_BxTxNxH.shape[1], k_BxSxKxH.shape[1]
  allowed = jnp.tril(jnp.ones((t, s), bool))[None, None] if causal else None
  if mask_Bx1xTxS is not None:
    allowed = mask_Bx1xTxS if allowed is None else allowed & mask_Bx1xTxS
  if allowed is not None:
    # A finite fill (as in jax.nn.dot_product_attention) keeps any fully masked row finite.
    logits_BxNxTxS = jnp.where(allowed, logits_BxNxTxS, jnp.finfo(jnp.float32).min)
  probs_BxNxTxS = jax.nn.softmax(logits_BxNxTxS, axis=-1)
  out_BxTxNxH = jnp.einsum('bnts,bsnh->btnh', probs_BxNxTxS.astype(v_BxSxNxH.dtype), v_BxSxNxH)
  return out_BxTxNxH, probs_BxNxTxS


def attention_impl(c: DecoderConfig, dtype, mask, causal: bool, length: int = 0) -> str | None:
  """config.attention_impl, or when None the kernel to ask for: 'cudnn' where it applies on a
  GPU, and on the CPU 'matmul' (kd.models.matmul_attention).

  jax.nn.dot_product_attention's own default is the XLA path (2.7x slower for a whole KD step
  at 1b-160m-32k on an H100, experiments/bench_vs_peer.py), so kd asks for cuDNN itself. On the
  CPU that path takes about twice as long, forward and backward, as 'matmul' (docs/speed.md).
  Prefix tuning always gets 'xla'.
  """
  if c.prefix_len:  # the prefix needs an explicit mask; kd sends those to XLA
    return 'xla'
  if c.attention_impl == 'splash':  # the TPU kernel (kd.models.splash): causal, no mask
    if jax.default_backend() == 'gpu':
      raise ValueError("attention_impl='splash' is the TPU's Pallas kernel (a GPU would run it "
                       "interpreted); on a GPU use None or 'cudnn'.")
    return 'splash' if mask is None and causal and splash.fits(length) else 'xla'
  if c.attention_impl is not None:
    return c.attention_impl
  if (jax.default_backend() == 'gpu' and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
      and mask is None and causal and c.head_dim <= 128 and c.head_dim % 8 == 0):
    return 'cudnn'
  if jax.default_backend() == 'cpu':
    return 'matmul'
  return 'xla'


def with_prefix_keys(mask_Bx1xTxS, causal: bool, t: int, s: int, p: int):
  """The mask [B|1,1,T,P+S] for P always-visible prefix keys in front of S keys.

  Causality (T == S, top-left aligned) is folded into the real-key part, since the fused call's
  is_causal would align it with the prefix instead.
  """
  real = jnp.tril(jnp.ones((t, s), bool))[None, None] if causal else None
  if mask_Bx1xTxS is not None:
    real = mask_Bx1xTxS if real is None else real & mask_Bx1xTxS
  if real is None:
    real = jnp.ones((1, 1, t, s), bool)
  real = jnp.broadcast_to(real, real.shape[:2] + (t, s))  # (a key-only mask may be [B,1,1,S])
  return jnp.concatenate([jnp.ones(real.shape[:2] + (t, p), bool), real], axis=-1)


def with_prompt_queries(mask_Bx1xTxT, p: int):
  """A real-token mask grown to [B|1,1,P+T,P+T] for P prompt slots in front (None stays None).

  Real queries see every prompt slot; prompt queries see the prompt (causality is the caller's).
  """
  if mask_Bx1xTxT is None:
    return None
  lead, t = mask_Bx1xTxT.shape[:2], mask_Bx1xTxT.shape[-1]
  real_rows = jnp.concatenate([jnp.ones(lead + (t, p), bool), mask_Bx1xTxT], axis=-1)
  return jnp.concatenate([jnp.ones(lead + (p, p + t), bool), real_rows], axis=-2)
