"""Rotary position embeddings: inverse frequencies (with linear, dynamic, Llama 3 and YaRN
scaling), their cos/sin at given positions, and their application to queries and keys."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from kd.models.decoder_config import DecoderConfig


def _llama3_inv_freq(inv_freq_F, p):
  factor, low, high = p['factor'], p['low_freq_factor'], p['high_freq_factor']
  old_len = p['original_max_position_embeddings']
  wavelen_F = np.float32(2 * math.pi) / inv_freq_F
  scaled_F = np.where(wavelen_F > old_len / low, inv_freq_F / np.float32(factor), inv_freq_F)
  smooth_F = (np.float32(old_len) / wavelen_F - np.float32(low)) / np.float32(high - low)
  smoothed_F = (1 - smooth_F) * scaled_F / np.float32(factor) + smooth_F * scaled_F
  medium_F = ~(wavelen_F < old_len / high) & ~(wavelen_F > old_len / low)
  return np.where(medium_F, smoothed_F, scaled_F).astype(np.float32)


def _yarn_inv_freq(head_dim: int, theta: float, p):
  """YaRN (arXiv 2309.00071) frequencies and attention factor, as transformers computes them."""
  factor, orig = p['factor'], p['original_max_position_embeddings']
  attention_factor = p.get('attention_factor')
  if attention_factor is None:
    mscale = lambda s, m=1.0: 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0
    if p.get('mscale') and p.get('mscale_all_dim'):
      attention_factor = mscale(factor, p['mscale']) / mscale(factor, p['mscale_all_dim'])
    else:
      attention_factor = mscale(factor)

  def correction_dim(rotations):
    return head_dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))

  low, high = correction_dim(p.get('beta_fast') or 32), correction_dim(p.get('beta_slow') or 1)
  if p.get('truncate', True):
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, head_dim - 1)
  if low == high:
    high += 0.001
  pos_freqs_F = theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
  ramp_F = np.clip((np.arange(head_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
  extrapolate_F = 1 - ramp_F
  inv_freq_F = (1.0 / (factor * pos_freqs_F)) * (1 - extrapolate_F) + (
      1.0 / pos_freqs_F) * extrapolate_F
  return inv_freq_F.astype(np.float32), float(attention_factor)


def rope_frequencies(config: DecoderConfig, positions_BxT=None):
  """(inverse frequencies [head_dim/2] float32, cos/sin multiplier) for config.rope_scaling.

  'dynamic' (NTK) frequencies depend on the longest position of the call, like transformers.
  """
  h, theta = config.head_dim, config.rope_theta
  p = config.rope_params
  kind = p.get('rope_type')
  if kind == 'dynamic':
    orig, factor = p['original_max_position_embeddings'], p['factor']
    seq_len = jnp.maximum(jnp.max(positions_BxT) + 1, orig).astype(jnp.float32)
    base = theta * ((factor * seq_len / orig) - (factor - 1)) ** (h / (h - 2))
    return 1.0 / (base ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h)), 1.0
  if kind == 'yarn':
    return _yarn_inv_freq(h, theta, p)
  inv_freq_F = (1.0 / (theta ** (np.arange(0, h, 2, dtype=np.float32) / h))).astype(np.float32)
  if kind == 'linear':
    return inv_freq_F / np.float32(p['factor']), 1.0
  if kind == 'llama3':
    return _llama3_inv_freq(inv_freq_F, p), 1.0
  return inv_freq_F, 1.0


def rope_cos_sin(positions_BxT, config: DecoderConfig):
  """float32 cos/sin tables [B,T,head_dim] in the rotate-half layout (Llama, not interleaved)."""
  inv_freq_F, attention_factor = rope_frequencies(config, positions_BxT)
  freqs_BxTxF = positions_BxT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq_F)
  angles_BxTxH = jnp.concatenate([freqs_BxTxF, freqs_BxTxF], axis=-1)
  cos, sin = jnp.cos(angles_BxTxH), jnp.sin(angles_BxTxH)
  if attention_factor != 1.0:
    cos, sin = cos * attention_factor, sin * attention_factor
  return cos, sin


def apply_rope(x_BxTxNxH, cos_BxTxH, sin_BxTxH):
  x = x_BxTxNxH.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  cos, sin = cos_BxTxH[:, :, None, :], sin_BxTxH[:, :, None, :]
  return (x * cos + rotated * sin).astype(x_BxTxNxH.dtype)
