"""The decoder's layers: norms, attention, the MLP, adapters, and the pre-norm residual block
(one layer, or the body of the scanned stack)."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kd.models import cache as kv_cache
from kd.models import matmul_attention
from kd.models import splash
from kd.models.attention import (attention_impl, explicit_attention, sliding_window_mask,
                                 with_prefix_keys)
from kd.models.decoder_config import ACTIVATIONS, DTYPES, DecoderConfig
from kd.models.rope import apply_rope

INIT = nn.initializers.normal(stddev=0.02)


class Norm(nn.Module):
  """RMSNorm, x / rms(x) * (offset + scale), or LayerNorm (mean removed, plus a bias).

  Computed in float32, returned in `dtype`. Scales start at 1 - offset (identity).
  """

  kind: str
  eps: float
  offset: float
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x_BxTxD):
    d = x_BxTxD.shape[-1]
    scale_D = self.param('scale', nn.initializers.constant(1.0 - self.offset), (d,),
                         self.param_dtype)
    x = x_BxTxD.astype(jnp.float32)
    if self.kind == 'layer':
      x = x - jnp.mean(x, axis=-1, keepdims=True)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    x = x * (self.offset + scale_D.astype(jnp.float32))
    if self.kind == 'layer':
      x = x + self.param('bias', nn.initializers.zeros, (d,), self.param_dtype).astype(jnp.float32)
    return x.astype(self.dtype)


def norm(c: DecoderConfig, name: str, kind: str | None = None) -> Norm:
  kind = kind or c.norm
  eps = c.layer_norm_eps if kind == 'layer' else c.rms_norm_eps
  return Norm(kind, eps, c.norm_offset, DTYPES[c.dtype], DTYPES[c.param_dtype], name=name)


class Adapter(nn.Module):
  """Bottleneck adapter: x + up(act(down(x))), `up` zero-initialised (identity at init)."""

  config: DecoderConfig

  @nn.compact
  def __call__(self, x_BxTxD):
    c = self.config
    dense = functools.partial(nn.Dense, use_bias=True, dtype=DTYPES[c.dtype],
                              param_dtype=DTYPES[c.param_dtype])
    z_BxTxR = ACTIVATIONS[c.mlp_activation](
        dense(c.adapter_size, kernel_init=INIT, name='down')(x_BxTxD))
    return x_BxTxD + dense(c.hidden_size, kernel_init=nn.initializers.zeros, name='up')(z_BxTxR)


class Attention(nn.Module):
  config: DecoderConfig

  @nn.compact
  def __call__(self, x_BxTxD, cos_BxTxH, sin_BxTxH, mask, want_probs: bool, want_qkv: bool,
               causal: bool = True, kv=None, cache_index=None, window: int | None = None,
               sliding=None, segments=None):
    """`window`: a sliding-window layer with no other mask (`mask` None): keys less than
    `window` slots back, given to the fused kernel as its local window (no [T, T] mask is
    made); with `sliding`, a traced bool (a scanned stack of mixed layer types), only when it
    is true. `segments` [B, T]: the splash kernel's segment ids, in place of `mask`."""
    c = self.config
    dtype, param_dtype = DTYPES[c.dtype], DTYPES[c.param_dtype]
    b, t, _ = x_BxTxD.shape
    h, n, k = c.head_dim, c.num_heads, c.num_kv_heads

    def proj(features, name, bias):
      return nn.Dense(features, use_bias=bias, dtype=dtype, param_dtype=param_dtype,
                      kernel_init=INIT, name=name)

    q_BxTxNH = proj(n * h, 'q_proj', c.qkv_bias)(x_BxTxD)
    k_BxTxKH = proj(k * h, 'k_proj', c.qkv_bias)(x_BxTxD)
    v_BxTxKH = proj(k * h, 'v_proj', c.qkv_bias)(x_BxTxD)
    q_BxTxNxH, k_BxTxKxH = q_BxTxNH.reshape(b, t, n, h), k_BxTxKH.reshape(b, t, k, h)
    v_BxTxKxH = v_BxTxKH.reshape(b, t, k, h)
    if c.qk_norm:  # per head, before RoPE (Qwen3)
      q_BxTxNxH = norm(c, 'q_norm', 'rms')(q_BxTxNxH)
      k_BxTxKxH = norm(c, 'k_norm', 'rms')(k_BxTxKxH)
      q_BxTxNH, k_BxTxKH = q_BxTxNxH.reshape(b, t, n * h), k_BxTxKxH.reshape(b, t, k * h)
    if cos_BxTxH is not None:
      q_BxTxNxH = apply_rope(q_BxTxNxH, cos_BxTxH, sin_BxTxH)
      k_BxTxKxH = apply_rope(k_BxTxKxH, cos_BxTxH, sin_BxTxH)

    new_kv, keys_BxSxKxH, values_BxSxKxH = None, k_BxTxKxH, v_BxTxKxH
    if kv is not None:
      new_kv = {'k': kv_cache.write(kv['k'], k_BxTxKxH, cache_index),
                'v': kv_cache.write(kv['v'], v_BxTxKxH, cache_index)}
      keys_BxSxKxH, values_BxSxKxH = new_kv['k'].astype(dtype), new_kv['v'].astype(dtype)
    scale = c.attn_scale if c.attn_scale is not None else h ** -0.5
    p = c.prefix_len
    explicit = want_probs or c.attn_softcap is not None  # the softmax written out
    if window is not None and (explicit or p):  # these paths take the band as a mask
      band = sliding_window_mask(mask, t, window)
      mask = band if sliding is None else band | ~sliding
      window = None
    if p:
      prefix_k = self.param('prefix_k', INIT, (p, k, h), param_dtype).astype(keys_BxSxKxH.dtype)
      prefix_v = self.param('prefix_v', INIT, (p, k, h), param_dtype).astype(
          values_BxSxKxH.dtype)
      mask = with_prefix_keys(mask, causal, t, keys_BxSxKxH.shape[1], p)
      causal = False  # in the mask
      keys_BxSxKxH = jnp.concatenate([jnp.broadcast_to(prefix_k, (b, p, k, h)), keys_BxSxKxH], 1)
      values_BxSxKxH = jnp.concatenate(
          [jnp.broadcast_to(prefix_v, (b, p, k, h)), values_BxSxKxH], 1)

    if explicit:
      out_BxTxNxH, probs = explicit_attention(q_BxTxNxH, keys_BxSxKxH, values_BxSxKxH, mask,
                                              scale, causal, c.attn_softcap)
      # The real keys only: rows sum to 1 minus the prefix's share.
      probs = probs[..., p:] if want_probs else None
    else:
      # A fused kernel where the backend has one; handles GQA without repeats.
      impl = attention_impl(c, q_BxTxNxH.dtype, mask, causal, t)

      def attend(window):
        if impl == 'splash':
          return splash.attention(q_BxTxNxH, keys_BxSxKxH, values_BxSxKxH, scale, window,
                                  segments)
        if impl == 'matmul':
          return matmul_attention.attention(q_BxTxNxH, keys_BxSxKxH, values_BxSxKxH, mask,
                                            scale, causal, window)
        return jax.nn.dot_product_attention(  # jax's (left, right) window: i - j <= window - 1
            q_BxTxNxH, keys_BxSxKxH, values_BxSxKxH, mask=mask, scale=scale, is_causal=causal,
            local_window_size=None if window is None else (window - 1, 0), implementation=impl)

      if window is not None and sliding is not None:  # this layer's flag picks the window
        out_BxTxNxH = jax.lax.cond(sliding, lambda: attend(window), lambda: attend(None))
      else:
        out_BxTxNxH = attend(window)
      probs = None
    out_BxTxD = proj(c.hidden_size, 'o_proj', c.attn_out_bias)(out_BxTxNxH.reshape(b, t, n * h))

    qkv = None
    if want_qkv:
      # Pre-RoPE projections (after the q/k norms when qk_norm); k and v repeated up to num_heads
      # so all three have width N*H.
      qkv = {'q': q_BxTxNH,
             'k': jnp.repeat(k_BxTxKH.reshape(b, t, k, h), n // k, axis=2).reshape(b, t, n * h),
             'v': jnp.repeat(v_BxTxKxH, n // k, axis=2).reshape(b, t, n * h)}
    return out_BxTxD, probs, qkv, new_kv


class MLP(nn.Module):
  config: DecoderConfig

  @nn.compact
  def __call__(self, x_BxTxD):
    c = self.config
    dense = lambda features, name: nn.Dense(
        features, use_bias=c.mlp_bias, dtype=DTYPES[c.dtype], param_dtype=DTYPES[c.param_dtype],
        kernel_init=INIT, name=name)
    act = ACTIVATIONS[c.mlp_activation]
    if c.mlp_gated:
      hidden_BxTxF = act(dense(c.intermediate_size, 'gate_proj')(x_BxTxD)) * dense(
          c.intermediate_size, 'up_proj')(x_BxTxD)
    else:
      hidden_BxTxF = act(dense(c.intermediate_size, 'up_proj')(x_BxTxD))
    return dense(c.hidden_size, 'down_proj')(hidden_BxTxF)


def _block(c: DecoderConfig, h_BxTxD, cos_BxTxH, sin_BxTxH, mask, want_probs: bool,
           want_qkv: bool, causal: bool, kv, cache_index, window=None, sliding=None,
           segments=None):
  """One block's computation; called inside a compact method, whose module owns the params
  (`Block`, one layer, or `ScanBlock`, the body of the scanned stack)."""
  attn_BxTxD, probs, qkv, new_kv = Attention(c, name='attn')(
      norm(c, 'input_norm')(h_BxTxD), cos_BxTxH, sin_BxTxH, mask, want_probs, want_qkv,
      causal, kv, cache_index, window, sliding, segments)
  if c.sandwich_norm:
    attn_BxTxD = norm(c, 'attn_out_norm')(attn_BxTxD)
  if c.adapter_size:
    attn_BxTxD = Adapter(c, name='attn_adapter')(attn_BxTxD)
  h_BxTxD = h_BxTxD + attn_BxTxD
  mlp_BxTxD = MLP(c, name='mlp')(norm(c, 'post_attn_norm')(h_BxTxD))
  if c.sandwich_norm:
    mlp_BxTxD = norm(c, 'mlp_out_norm')(mlp_BxTxD)
  if c.adapter_size:
    mlp_BxTxD = Adapter(c, name='mlp_adapter')(mlp_BxTxD)
  h_BxTxD = h_BxTxD + mlp_BxTxD
  return h_BxTxD, probs, qkv, new_kv


class Block(nn.Module):
  """Pre-norm residual block: h + attn(norm(h)), then h + mlp(norm(h)).

  With config.sandwich_norm each sublayer output is normed too, and with config.adapter_size it
  then passes an Adapter, before its residual add.
  """

  config: DecoderConfig

  @nn.compact
  def __call__(self, h_BxTxD, cos_BxTxH, sin_BxTxH, mask, want_probs: bool, want_qkv: bool,
               causal: bool = True, kv=None, cache_index=None, window: int | None = None,
               segments=None):
    return _block(self.config, h_BxTxD, cos_BxTxH, sin_BxTxH, mask, want_probs, want_qkv,
                  causal, kv, cache_index, window, None, segments)


class ScanBlock(nn.Module):
  """The body of `nn.scan` over the layers (config.scan_layers): one block, carry h.

  `xs` is this layer's (cache entry or None, is-sliding flag or None); `masks` is the one mask
  every layer uses, or (full, sliding) for mixed layer types, picked by the flag. With `window`
  there is no mask to pick: the flag (or, with none, every layer) takes the kernel's window.
  Returns the new h and (h if want_hidden, probs, qkv, new cache entry), stacked by the scan.
  """

  config: DecoderConfig

  @nn.compact
  def __call__(self, h_BxTxD, xs, cos_BxTxH, sin_BxTxH, masks, cache_index, want_probs: bool,
               want_qkv: bool, want_hidden: bool, causal: bool, window: int | None = None,
               segments=None):
    kv, sliding = xs
    if window is None and sliding is not None:
      masks, sliding = jnp.where(sliding, masks[1], masks[0]), None
    h_BxTxD, probs, qkv, new_kv = _block(self.config, h_BxTxD, cos_BxTxH, sin_BxTxH, masks,
                                         want_probs, want_qkv, causal, kv, cache_index, window,
                                         sliding, segments)
    return h_BxTxD, (h_BxTxD if want_hidden else None, probs, qkv, new_kv)
