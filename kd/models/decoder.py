"""A small Llama-style decoder-only transformer in Flax linen.

RMSNorm, rotary position embeddings, SwiGLU MLP, grouped-query attention, no biases, optionally
tied input/output embeddings. Pure functional: parameters live outside the module, so

  variables = init_params(config, jax.random.key(0))
  out = Decoder(config).apply(variables, input_ids_BxT)
  logits_BxTxV = out['logits']

Parameter names follow the layer roles (`layers_{i}/attn/q_proj/kernel`, ...) so a Hugging Face
checkpoint maps onto them by renaming and transposing linear weights. Softmax, RMSNorm and RoPE are
always computed in float32 whatever the compute dtype.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}

_INIT = nn.initializers.normal(stddev=0.02)


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Shape and numerics of a Decoder. Hashable, so it can be a static jit argument."""

  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  intermediate_size: int
  head_dim: int | None = None  # None: hidden_size // num_heads (filled in on construction).
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-6
  tie_embeddings: bool = False
  max_seq_len: int = 2048
  dtype: str = 'float32'  # Compute dtype of activations and logits.
  param_dtype: str = 'float32'
  remat: bool = False  # jax.checkpoint each block.
  scan_layers: bool = False  # Reserved; not implemented yet.

  def __post_init__(self):
    if self.head_dim is None and isinstance(self.num_heads, int) and self.num_heads > 0:
      if self.hidden_size % self.num_heads:
        raise ValueError(
            f'hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; '
            'set head_dim explicitly or change num_heads.')
      object.__setattr__(self, 'head_dim', self.hidden_size // self.num_heads)
    self.validate()

  def validate(self) -> None:
    """Raises ValueError naming the bad field and what to do about it."""
    for name in ('vocab_size', 'hidden_size', 'num_layers', 'num_heads', 'num_kv_heads',
                 'intermediate_size', 'head_dim', 'max_seq_len'):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f'DecoderConfig.{name} must be a positive int, got {value!r}.')
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f'num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads} '
          '(grouped-query attention shares each kv head among num_heads // num_kv_heads heads).')
    if self.head_dim % 2:
      raise ValueError(f'head_dim={self.head_dim} must be even for rotary embeddings.')
    if self.rope_theta <= 0:
      raise ValueError(f'rope_theta must be > 0, got {self.rope_theta}.')
    if self.rms_norm_eps <= 0:
      raise ValueError(f'rms_norm_eps must be > 0, got {self.rms_norm_eps}.')
    for name in ('dtype', 'param_dtype'):
      if getattr(self, name) not in DTYPES:
        raise ValueError(
            f'DecoderConfig.{name}={getattr(self, name)!r} is not supported; '
            f'use one of {sorted(DTYPES)}.')
    if self.scan_layers:
      raise ValueError('scan_layers=True is not implemented yet; set scan_layers=False '
                       '(remat=True still saves activation memory).')

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> DecoderConfig:
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
      raise ValueError(f'Unknown DecoderConfig keys {unknown}; valid keys are {sorted(fields)}.')
    return cls(**d)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


class RMSNorm(nn.Module):
  """x / rms(x) * scale, computed in float32 and returned in `dtype`."""

  eps: float
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x_BxTxD):
    scale_D = self.param('scale', nn.initializers.ones, (x_BxTxD.shape[-1],), self.param_dtype)
    x = x_BxTxD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return (x * scale_D.astype(jnp.float32)).astype(self.dtype)


def rope_cos_sin(positions_BxT, head_dim: int, theta: float):
  """float32 cos/sin tables [B,T,head_dim] in the rotate-half layout (Llama, not interleaved)."""
  inv_freq_F = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  freqs_BxTxF = positions_BxT.astype(jnp.float32)[..., None] * inv_freq_F
  angles_BxTxH = jnp.concatenate([freqs_BxTxF, freqs_BxTxF], axis=-1)
  return jnp.cos(angles_BxTxH), jnp.sin(angles_BxTxH)


def apply_rope(x_BxTxNxH, cos_BxTxH, sin_BxTxH):
  x = x_BxTxNxH.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  cos, sin = cos_BxTxH[:, :, None, :], sin_BxTxH[:, :, None, :]
  return (x * cos + rotated * sin).astype(x_BxTxNxH.dtype)


def attention_mask_Bx1xTxT(attention_mask_BxT=None, segment_ids_BxT=None):
  """Non-causal part of the attention mask (True = may attend), or None if nothing to mask.

  Padded keys (attention_mask == 0) are hidden; with segment_ids a query sees only keys of its
  own segment (padding, segment 0, then sees only padding). Every token may attend to itself,
  so no row is fully masked (e.g. left padding): padded queries stay causal and finite. Real
  tokens are unaffected. Causality is added by the caller.
  """
  mask_BxTxT = None
  if segment_ids_BxT is not None:
    mask_BxTxT = segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
  if attention_mask_BxT is not None:
    keys_Bx1xT = attention_mask_BxT.astype(bool)[:, None, :]
    mask_BxTxT = keys_Bx1xT if mask_BxTxT is None else mask_BxTxT & keys_Bx1xT
  if mask_BxTxT is None:
    return None
  t = mask_BxTxT.shape[-1]
  return (mask_BxTxT | jnp.eye(t, dtype=bool))[:, None]


def explicit_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, mask_Bx1xTxT, scale: float):
  """Causal attention that also returns the probabilities [B,N,T,T] (float32 softmax)."""
  num_heads, num_kv = q_BxTxNxH.shape[2], k_BxTxKxH.shape[2]
  k_BxTxNxH = jnp.repeat(k_BxTxKxH, num_heads // num_kv, axis=2)
  v_BxTxNxH = jnp.repeat(v_BxTxKxH, num_heads // num_kv, axis=2)
  logits_BxNxTxT = jnp.einsum('btnh,bsnh->bnts', q_BxTxNxH, k_BxTxNxH,
                              preferred_element_type=jnp.float32) * scale
  t = q_BxTxNxH.shape[1]
  allowed = jnp.tril(jnp.ones((t, t), bool))[None, None]
  if mask_Bx1xTxT is not None:
    allowed = allowed & mask_Bx1xTxT
  # A finite fill (as in jax.nn.dot_product_attention) keeps any fully masked row finite.
  logits_BxNxTxT = jnp.where(allowed, logits_BxNxTxT, jnp.finfo(jnp.float32).min)
  probs_BxNxTxT = jax.nn.softmax(logits_BxNxTxT, axis=-1)
  out_BxTxNxH = jnp.einsum('bnts,bsnh->btnh', probs_BxNxTxT.astype(v_BxTxNxH.dtype), v_BxTxNxH)
  return out_BxTxNxH, probs_BxNxTxT


class Attention(nn.Module):
  config: DecoderConfig

  @nn.compact
  def __call__(self, x_BxTxD, cos_BxTxH, sin_BxTxH, mask_Bx1xTxT, want_probs: bool,
               want_qkv: bool):
    c = self.config
    dtype, param_dtype = DTYPES[c.dtype], DTYPES[c.param_dtype]
    b, t, _ = x_BxTxD.shape
    h, n, k = c.head_dim, c.num_heads, c.num_kv_heads

    def proj(features, name):
      return nn.Dense(features, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                      kernel_init=_INIT, name=name)

    q_BxTxNH = proj(n * h, 'q_proj')(x_BxTxD)
    k_BxTxKH = proj(k * h, 'k_proj')(x_BxTxD)
    v_BxTxKH = proj(k * h, 'v_proj')(x_BxTxD)
    q_BxTxNxH = apply_rope(q_BxTxNH.reshape(b, t, n, h), cos_BxTxH, sin_BxTxH)
    k_BxTxKxH = apply_rope(k_BxTxKH.reshape(b, t, k, h), cos_BxTxH, sin_BxTxH)
    v_BxTxKxH = v_BxTxKH.reshape(b, t, k, h)
    scale = h ** -0.5

    if want_probs:
      out_BxTxNxH, probs = explicit_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, mask_Bx1xTxT, scale)
    else:
      # Lets JAX pick a fused kernel where the backend has one; handles GQA without repeats.
      out_BxTxNxH = jax.nn.dot_product_attention(
          q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, mask=mask_Bx1xTxT, scale=scale, is_causal=True)
      probs = None
    out_BxTxD = proj(c.hidden_size, 'o_proj')(out_BxTxNxH.reshape(b, t, n * h))

    if not want_qkv:
      return out_BxTxD, probs, None
    # Pre-RoPE projections; k and v repeated up to num_heads so all three have width N*H.
    qkv = {'q': q_BxTxNH,
           'k': jnp.repeat(k_BxTxKH.reshape(b, t, k, h), n // k, axis=2).reshape(b, t, n * h),
           'v': jnp.repeat(v_BxTxKxH, n // k, axis=2).reshape(b, t, n * h)}
    return out_BxTxD, probs, qkv


class MLP(nn.Module):
  config: DecoderConfig

  @nn.compact
  def __call__(self, x_BxTxD):
    c = self.config
    dense = lambda features, name: nn.Dense(
        features, use_bias=False, dtype=DTYPES[c.dtype], param_dtype=DTYPES[c.param_dtype],
        kernel_init=_INIT, name=name)
    gate_BxTxF = dense(c.intermediate_size, 'gate_proj')(x_BxTxD)
    up_BxTxF = dense(c.intermediate_size, 'up_proj')(x_BxTxD)
    return dense(c.hidden_size, 'down_proj')(nn.silu(gate_BxTxF) * up_BxTxF)


class Block(nn.Module):
  """Pre-norm residual block: h + attn(norm(h)), then h + mlp(norm(h))."""

  config: DecoderConfig

  @nn.compact
  def __call__(self, h_BxTxD, cos_BxTxH, sin_BxTxH, mask_Bx1xTxT, want_probs: bool,
               want_qkv: bool):
    c = self.config
    norm = lambda name: RMSNorm(c.rms_norm_eps, DTYPES[c.dtype], DTYPES[c.param_dtype], name=name)
    attn_BxTxD, probs, qkv = Attention(c, name='attn')(
        norm('input_norm')(h_BxTxD), cos_BxTxH, sin_BxTxH, mask_Bx1xTxT, want_probs,
        want_qkv)
    h_BxTxD = h_BxTxD + attn_BxTxD
    h_BxTxD = h_BxTxD + MLP(c, name='mlp')(norm('post_attn_norm')(h_BxTxD))
    return h_BxTxD, probs, qkv


class Decoder(nn.Module):
  """Decoder-only LM. Apply with `Decoder(config).apply(variables, input_ids_BxT, ...)`."""

  config: DecoderConfig

  def setup(self):
    c = self.config
    dtype, param_dtype = DTYPES[c.dtype], DTYPES[c.param_dtype]
    self.embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=dtype, param_dtype=param_dtype,
                          embedding_init=_INIT)
    # self (0), h, cos, sin, mask are traced; the two output flags (5, 6) are static.
    block = nn.remat(Block, static_argnums=(5, 6)) if c.remat else Block
    self.layers = [block(c) for _ in range(c.num_layers)]  # Named layers_0, layers_1, ...
    self.final_norm = RMSNorm(c.rms_norm_eps, dtype, param_dtype)
    if not c.tie_embeddings:
      self.lm_head = nn.Dense(c.vocab_size, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                              kernel_init=_INIT)

  def __call__(self, input_ids_BxT, *, segment_ids=None, positions=None, attention_mask=None,
               output_hidden_states: bool = False, output_attentions: bool = False,
               output_qkv: bool = False, return_hidden_only: bool = False) -> dict[str, Any]:
    """Runs the model.

    Args:
      input_ids_BxT: int token ids.
      segment_ids: [B,T] packed-sequence ids; tokens attend causally within their own segment;
        0 marks padding.
      positions: [B,T] rotary positions; default arange(T). Restart them per packed segment.
      attention_mask: [B,T], 1 = real token, 0 = padding (padded keys are masked).
      output_hidden_states: add 'hidden_states', num_layers + 1 arrays [B,T,D]: the embeddings,
        then each layer's output (the last one after the final norm, as in transformers).
      output_attentions: add 'attentions', num_layers float32 arrays [B,H,T,T] of probabilities.
        Uses an explicit softmax instead of the fused kernel.
      output_qkv: add 'qkv', num_layers dicts {'q','k','v'} of [B,T,H*head_dim] pre-RoPE
        projections, k and v repeated up to num_heads.
      return_hidden_only: skip the LM head (no 'logits'); use `project` on 'hidden' later.

    Returns:
      dict with 'hidden' [B,T,D] (after the final norm), 'logits' [B,T,V] in the compute dtype,
      and the optional entries above.
    """
    c = self.config
    b, t = input_ids_BxT.shape
    if t > c.max_seq_len:
      raise ValueError(f'Sequence length {t} exceeds max_seq_len={c.max_seq_len}; '
                       'raise DecoderConfig.max_seq_len or truncate the inputs.')
    for name, arr in (('segment_ids', segment_ids), ('positions', positions),
                      ('attention_mask', attention_mask)):
      if arr is not None and arr.shape != (b, t):
        raise ValueError(f'{name} has shape {arr.shape}; expected {(b, t)} like input_ids.')
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))

    mask_Bx1xTxT = attention_mask_Bx1xTxT(attention_mask, segment_ids)
    cos_BxTxH, sin_BxTxH = rope_cos_sin(positions, c.head_dim, c.rope_theta)
    h_BxTxD = self.embed(input_ids_BxT)
    hidden_states, attentions, qkvs = [h_BxTxD], [], []
    for layer in self.layers:
      h_BxTxD, probs, qkv = layer(h_BxTxD, cos_BxTxH, sin_BxTxH, mask_Bx1xTxT,
                                  output_attentions, output_qkv)
      hidden_states.append(h_BxTxD)
      attentions.append(probs)
      qkvs.append(qkv)

    out = {'hidden': self.final_norm(h_BxTxD)}
    if not return_hidden_only:
      out['logits'] = self.project(out['hidden'])
    if output_hidden_states:  # as in transformers, the last entry is after the final norm
      out['hidden_states'] = tuple(hidden_states[:-1]) + (out['hidden'],)
    if output_attentions:
      out['attentions'] = tuple(attentions)
    if output_qkv:
      out['qkv'] = tuple(qkvs)
    return out

  def project(self, hidden_BxTxD):
    """LM head alone: final-normed hidden states [..., D] -> logits [..., V] (compute dtype)."""
    if self.config.tie_embeddings:
      return self.embed.attend(hidden_BxTxD)
    return self.lm_head(hidden_BxTxD)


def init_params(config: DecoderConfig, rng, seq_len: int = 8) -> dict[str, Any]:
  """Returns the variables {'params': ...} to pass to `Decoder(config).apply`.

  Pure in (config, rng): `jax.eval_shape(functools.partial(init_params, config), rng)` gives
  shapes without allocating, and `jax.jit(init_params, static_argnums=(0, 2))` works.
  """
  ids_1xT = jnp.zeros((1, min(seq_len, config.max_seq_len)), jnp.int32)
  return dict(Decoder(config).init(rng, ids_1xT, return_hidden_only=False))


def count_params(params) -> int:
  """Number of scalars in a params pytree (arrays or jax.ShapeDtypeStruct leaves)."""
  return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params))


def head_fn(model: Decoder, params) -> Callable[[jax.Array], jax.Array]:
  """h [..., D] -> logits [..., V] with `model`'s LM head (tied or untied) and `params`."""

  def head(hidden_BxTxD):
    return model.apply(params, hidden_BxTxD, method=Decoder.project)

  return head
