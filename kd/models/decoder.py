"""A decoder-only transformer in Flax linen: Llama by default, and by config switches Mistral,
Qwen2, Qwen3, Gemma, Gemma 2 and GPT-2.

The defaults are Llama: RMSNorm, rotary position embeddings, SwiGLU MLP, grouped-query attention,
no biases, optionally tied input/output embeddings. The other families change only config fields
(`norm`, `norm_offset`, `qkv_bias`, `qk_norm`, `mlp_activation`, `mlp_gated`, `positions`,
`embed_scale`, `sliding_window`, `rope_scaling`, `attn_softcap`, `sandwich_norm`, ...);
`kd.hf.decoders` fills them from a transformers config.json. Pure functional: parameters live
outside the module, so

  variables = init_params(config, jax.random.key(0))
  out = Decoder(config).apply(variables, input_ids_BxT)
  logits_BxTxV = out['logits']

Parameter names follow the layer roles (`layers_{i}/attn/q_proj/kernel`, ...) so a Hugging Face
checkpoint maps onto them by renaming and transposing linear weights. With scan_layers=True the
layers run as one `nn.scan` and their params are stacked under `layers/...` with a leading layer
axis (`stack_layers` / `unstack_layers` convert; kd.hf does it on load and save). Softmax, norms and RoPE are
always computed in float32 whatever the compute dtype. Pass `cache=` (kd.models.cache) to decode
incrementally.

Three parameter-efficient extensions, off by default (kd.peft.adapters selects, adds and strips
their params): `adapter_size` (bottleneck adapters), `prefix_len` (prefix tuning), `prompt_len`
(prompt tuning); see DecoderConfig.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kd.models import cache as kv_cache
from kd.models import splash
from kd.models.model import config_from_dict

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}
ACTIVATIONS = {
    'silu': nn.silu,
    'gelu_tanh': functools.partial(nn.gelu, approximate=True),  # HF gelu_new, gelu_pytorch_tanh
    'gelu': functools.partial(nn.gelu, approximate=False),  # erf
    'relu': nn.relu,
}
NORMS = ('rms', 'layer')
# DecoderConfig.remat_policy -> the jax.checkpoint policy (None: save nothing, recompute all).
REMAT_POLICIES = {
    'nothing': None,
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
ATTENTION_IMPLS = (None, 'xla', 'cudnn', 'splash')
POSITIONS = ('rope', 'learned')
LAYER_TYPES = ('full_attention', 'sliding_attention')
# rope_scaling['rope_type'] -> the keys it needs (transformers' names).
ROPE_TYPES = {
    'linear': ('factor',),
    'dynamic': ('factor', 'original_max_position_embeddings'),
    'llama3': ('factor', 'low_freq_factor', 'high_freq_factor',
               'original_max_position_embeddings'),
    'yarn': ('factor', 'original_max_position_embeddings'),
}

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
  rms_norm_eps: float = 1e-6  # RMSNorm eps (also the q/k norms).
  tie_embeddings: bool = False
  max_seq_len: int = 2048  # Longest input (and cache); the position table size when learned.
  dtype: str = 'float32'  # Compute dtype of activations and logits.
  param_dtype: str = 'float32'
  remat: bool = False  # jax.checkpoint each block.
  # What a rematerialised block keeps for the backward pass: a key of REMAT_POLICIES.
  remat_policy: str = 'nothing'
  # jax.nn.dot_product_attention's implementation: 'xla', 'cudnn' (the fused flash kernel on
  # NVIDIA GPUs; fails at compile time where cuDNN cannot run it), or None: cuDNN where it is
  # known to apply (GPU, bf16/fp16, causal without a padding or segment mask), else XLA.
  # 'splash': the TPU's Pallas flash kernel (kd.models.splash) for causal attention at lengths
  # that are multiples of 128 (a padding mask or packed segment_ids become its segment ids), XLA
  # for the rest (prompt/prefix tuning, a KV cache, output_attentions); asked for by name only.
  attention_impl: str | None = None
  # The layers as one nn.scan: params stored stacked under `layers` (each leaf [num_layers,
  # ...]; stack_layers / unstack_layers convert), one layer compiled instead of num_layers, and
  # a stacked KV cache (kd.models.cache.init_cache). Mixed layer_types select their mask (or,
  # without padding, the kernel's window) per layer inside the scan.
  scan_layers: bool = False
  # Family switches; the defaults are Llama.
  model_type: str = 'llama'  # The transformers family kd.hf.save exports to.
  norm: str = 'rms'  # 'rms' or 'layer' (LayerNorm with bias, GPT-2).
  norm_offset: float = 0.0  # Norms multiply by (norm_offset + scale): Gemma stores w for 1 + w.
  layer_norm_eps: float = 1e-5  # eps of norm='layer'.
  qkv_bias: bool = False  # Biases on q/k/v projections (Qwen2, GPT-2, Llama attention_bias).
  attn_out_bias: bool = False  # Bias on the attention output projection (GPT-2).
  mlp_bias: bool = False
  qk_norm: bool = False  # RMSNorm over head_dim on q and k before RoPE (Qwen3).
  mlp_activation: str = 'silu'  # A key of ACTIVATIONS.
  mlp_gated: bool = True  # act(gate(x)) * up(x) (Llama, Gemma); False: act(up(x)) (GPT-2).
  positions: str = 'rope'  # 'rope' or 'learned' (absolute position embeddings, GPT-2).
  embed_scale: bool = False  # Multiply embeddings by sqrt(hidden_size) (Gemma).
  attn_scale: float | None = None  # Attention logit scale; None: head_dim ** -0.5.
  # Soft-capping (Gemma 2): scores -> cap * tanh(scores / cap) after the scale, and the same on
  # the LM head's logits. An attention cap runs the explicit softmax (no fused kernel has it).
  attn_softcap: float | None = None
  logit_softcap: float | None = None
  # Norms on the attention and MLP outputs before each residual add (Gemma 2's post-attention
  # and post-feedforward norms), besides the usual norms on their inputs.
  sandwich_norm: bool = False
  # A query sees keys less than this many slots back. With no padding, segment or prompt mask
  # the fused kernel gets it as its local window (cuDNN's on a GPU; no [T, T] mask is made).
  sliding_window: int | None = None
  # Per layer 'full_attention' / 'sliding_attention' (Qwen2); None: every layer is sliding when
  # sliding_window is set (Mistral).
  layer_types: tuple[str, ...] | None = None
  # transformers' rope_parameters without rope_theta, e.g. {'rope_type': 'linear', 'factor': 2.0};
  # a dict is stored as sorted (key, value) pairs so the config stays hashable.
  rope_scaling: tuple[tuple[str, Any], ...] | None = None
  # Parameter-efficient students (kd.peft.adapters); 0 = off and the param tree is unchanged.
  # Bottleneck adapters (Houlsby et al. 2019): x + up(act(down(x))) on the attention output and
  # on the MLP output, before each residual add; width adapter_size, act = mlp_activation,
  # `up` zero-initialised so a fresh adapter is the identity.
  adapter_size: int = 0
  # Prefix tuning (Li & Liang 2021): per layer, prefix_len learned keys and values
  # [prefix_len, num_kv_heads, head_dim] that every query sees (also past sliding windows and
  # segment/padding masks, which apply to the real keys only). They are used as stored: no
  # norm, no rotation (RoPE at position 0 is the identity, so they sit at position 0). Always the
  # XLA attention kernel, even with attention_impl='cudnn'. Works with the KV cache.
  prefix_len: int = 0
  # Prompt tuning (Lester et al. 2021): prompt_len learned embeddings in front of the token
  # embeddings (embed_scale applies to them too), at positions 0..prompt_len-1; real tokens move
  # up by prompt_len and see the whole prompt. Outputs are sliced back to the T real positions.
  # prompt_len + T must fit max_seq_len. With a KV cache the prompt fills the first prompt_len
  # slots on the call with prefill=True (kd.models.sample.generate does this).
  prompt_len: int = 0

  def __post_init__(self):
    if hasattr(self.rope_scaling, 'items'):  # a dict or ConfigDict
      object.__setattr__(self, 'rope_scaling', tuple(sorted(self.rope_scaling.items())) or None)
    if self.layer_types is not None and not isinstance(self.layer_types, tuple):
      object.__setattr__(self, 'layer_types', tuple(self.layer_types))
    if self.head_dim is None and isinstance(self.num_heads, int) and self.num_heads > 0:
      if self.hidden_size % self.num_heads:
        raise ValueError(
            f'hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; '
            'set head_dim explicitly or change num_heads.')
      object.__setattr__(self, 'head_dim', self.hidden_size // self.num_heads)
    self.validate()

  @property
  def rope_params(self) -> dict[str, Any]:
    return dict(self.rope_scaling or ())

  def layer_type(self, i: int) -> str:
    if self.layer_types is not None:
      return self.layer_types[i]
    return 'sliding_attention' if self.sliding_window is not None else 'full_attention'

  def validate(self) -> None:
    """Raises ValueError naming the bad field and what to do about it."""
    for name in ('vocab_size', 'hidden_size', 'num_layers', 'num_heads', 'num_kv_heads',
                 'intermediate_size', 'head_dim', 'max_seq_len'):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f'DecoderConfig.{name} must be a positive int, got {value!r}.')
    for name in ('adapter_size', 'prefix_len', 'prompt_len'):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f'DecoderConfig.{name} must be an int >= 0 (0 = off), got {value!r}.')
    if self.prompt_len >= self.max_seq_len:
      raise ValueError(f'prompt_len={self.prompt_len} leaves no room for tokens in max_seq_len='
                       f'{self.max_seq_len}; raise max_seq_len or shorten the prompt.')
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f'num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads} '
          '(grouped-query attention shares each kv head among num_heads // num_kv_heads heads).')
    if self.positions == 'rope' and self.head_dim % 2:
      raise ValueError(f'head_dim={self.head_dim} must be even for rotary embeddings.')
    if self.rope_theta <= 0:
      raise ValueError(f'rope_theta must be > 0, got {self.rope_theta}.')
    for name in ('rms_norm_eps', 'layer_norm_eps'):
      if getattr(self, name) <= 0:
        raise ValueError(f'{name} must be > 0, got {getattr(self, name)}.')
    for name in ('dtype', 'param_dtype'):
      if getattr(self, name) not in DTYPES:
        raise ValueError(
            f'DecoderConfig.{name}={getattr(self, name)!r} is not supported; '
            f'use one of {sorted(DTYPES)}.')
    for name, allowed in (('norm', NORMS), ('positions', POSITIONS),
                          ('mlp_activation', tuple(ACTIVATIONS)),
                          ('remat_policy', tuple(REMAT_POLICIES)),
                          ('attention_impl', ATTENTION_IMPLS)):
      if getattr(self, name) not in allowed:
        raise ValueError(f'DecoderConfig.{name}={getattr(self, name)!r} is not supported; '
                         f'use one of {list(allowed)}.')
    for name in ('attn_scale', 'attn_softcap', 'logit_softcap'):
      value = getattr(self, name)
      if value is not None and not value > 0:
        raise ValueError(f'{name} must be > 0 or None, got {value!r}.')
    if self.sliding_window is not None and (not isinstance(self.sliding_window, int)
                                            or self.sliding_window <= 0):
      raise ValueError(f'sliding_window must be a positive int or None, got '
                       f'{self.sliding_window!r}.')
    if self.layer_types is not None:
      if len(self.layer_types) != self.num_layers:
        raise ValueError(f'layer_types has {len(self.layer_types)} entries for num_layers='
                         f'{self.num_layers}; give one per layer or None.')
      bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
      if bad:
        raise ValueError(f'layer_types {bad} are not supported; use {list(LAYER_TYPES)}.')
      if 'sliding_attention' in self.layer_types and self.sliding_window is None:
        raise ValueError("layer_types has 'sliding_attention' layers but sliding_window=None; "
                         'set sliding_window.')
    self._validate_rope_scaling()

  def _validate_rope_scaling(self) -> None:
    if self.rope_scaling is None:
      return
    if self.positions != 'rope':
      raise ValueError(f"rope_scaling needs positions='rope', got positions={self.positions!r}.")
    p = self.rope_params
    kind = p.get('rope_type')
    if kind not in ROPE_TYPES:
      raise ValueError(f'rope_scaling rope_type={kind!r} is not supported; kd supports '
                       f'{sorted(ROPE_TYPES)} (or rope_scaling=None for plain RoPE).')
    missing = [k for k in ROPE_TYPES[kind] if p.get(k) is None]
    if missing:
      raise ValueError(f'rope_scaling of type {kind!r} needs {missing}; got {p}.')
    if not p['factor'] > 0:
      raise ValueError(f"rope_scaling factor must be > 0, got {p['factor']}.")
    for key, value in p.items():
      if not isinstance(value, (int, float, str, bool, type(None))):
        raise ValueError(f'rope_scaling[{key!r}]={value!r}: only scalar values are supported.')

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> DecoderConfig:
    return config_from_dict(cls, d)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d['rope_scaling'] = self.rope_params or None
    d['layer_types'] = None if self.layer_types is None else list(self.layer_types)
    return d


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


def _norm(c: DecoderConfig, name: str, kind: str | None = None) -> Norm:
  kind = kind or c.norm
  eps = c.layer_norm_eps if kind == 'layer' else c.rms_norm_eps
  return Norm(kind, eps, c.norm_offset, DTYPES[c.dtype], DTYPES[c.param_dtype], name=name)


# ----------------------------------------------------------------------------- RoPE


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


# ----------------------------------------------------------------------------- attention


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
  """config.attention_impl, or when None the kernel to ask for: 'cudnn' where it applies.

  jax.nn.dot_product_attention's own default is the XLA path (2.7x slower for a whole KD step
  at 1b-160m-32k on an H100, experiments/bench_vs_peer.py), so kd asks for cuDNN itself.
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


class Adapter(nn.Module):
  """Bottleneck adapter: x + up(act(down(x))), `up` zero-initialised (identity at init)."""

  config: DecoderConfig

  @nn.compact
  def __call__(self, x_BxTxD):
    c = self.config
    dense = functools.partial(nn.Dense, use_bias=True, dtype=DTYPES[c.dtype],
                              param_dtype=DTYPES[c.param_dtype])
    z_BxTxR = ACTIVATIONS[c.mlp_activation](
        dense(c.adapter_size, kernel_init=_INIT, name='down')(x_BxTxD))
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
                      kernel_init=_INIT, name=name)

    q_BxTxNH = proj(n * h, 'q_proj', c.qkv_bias)(x_BxTxD)
    k_BxTxKH = proj(k * h, 'k_proj', c.qkv_bias)(x_BxTxD)
    v_BxTxKH = proj(k * h, 'v_proj', c.qkv_bias)(x_BxTxD)
    q_BxTxNxH, k_BxTxKxH = q_BxTxNH.reshape(b, t, n, h), k_BxTxKH.reshape(b, t, k, h)
    v_BxTxKxH = v_BxTxKH.reshape(b, t, k, h)
    if c.qk_norm:  # per head, before RoPE (Qwen3)
      q_BxTxNxH = _norm(c, 'q_norm', 'rms')(q_BxTxNxH)
      k_BxTxKxH = _norm(c, 'k_norm', 'rms')(k_BxTxKxH)
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
      prefix_k = self.param('prefix_k', _INIT, (p, k, h), param_dtype).astype(keys_BxSxKxH.dtype)
      prefix_v = self.param('prefix_v', _INIT, (p, k, h), param_dtype).astype(
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
        kernel_init=_INIT, name=name)
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
      _norm(c, 'input_norm')(h_BxTxD), cos_BxTxH, sin_BxTxH, mask, want_probs, want_qkv,
      causal, kv, cache_index, window, sliding, segments)
  if c.sandwich_norm:
    attn_BxTxD = _norm(c, 'attn_out_norm')(attn_BxTxD)
  if c.adapter_size:
    attn_BxTxD = Adapter(c, name='attn_adapter')(attn_BxTxD)
  h_BxTxD = h_BxTxD + attn_BxTxD
  mlp_BxTxD = MLP(c, name='mlp')(_norm(c, 'post_attn_norm')(h_BxTxD))
  if c.sandwich_norm:
    mlp_BxTxD = _norm(c, 'mlp_out_norm')(mlp_BxTxD)
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


def stack_layers(variables: dict[str, Any]) -> dict[str, Any]:
  """Per-layer variables (`layers_0`, `layers_1`, ...) -> one `layers` subtree whose leaves
  have a leading layer axis: the layout of a config with scan_layers=True. Other entries and
  collections pass through; a tree that is already stacked is returned as it is."""
  def stack(tree):
    n = sum(1 for k in tree if k.startswith('layers_'))
    if not n:
      return tree
    out = {k: v for k, v in tree.items() if not k.startswith('layers_')}
    out['layers'] = jax.tree.map(lambda *xs: jnp.stack(xs), *[tree[f'layers_{i}']
                                                               for i in range(n)])
    return out
  return {col: stack(tree) for col, tree in variables.items()}


def unstack_layers(variables: dict[str, Any]) -> dict[str, Any]:
  """The inverse of `stack_layers`: a stacked `layers` subtree -> `layers_0`, `layers_1`, ..."""
  def unstack(tree):
    if 'layers' not in tree:
      return tree
    n = jax.tree.leaves(tree['layers'])[0].shape[0]
    out = {k: v for k, v in tree.items() if k != 'layers'}
    out.update({f'layers_{i}': jax.tree.map(lambda x, i=i: x[i], tree['layers'])
                for i in range(n)})
    return out
  return {col: unstack(tree) for col, tree in variables.items()}


class Decoder(nn.Module):
  """Decoder-only LM. Apply with `Decoder(config).apply(variables, input_ids_BxT, ...)`."""

  config: DecoderConfig

  def setup(self):
    c = self.config
    dtype, param_dtype = DTYPES[c.dtype], DTYPES[c.param_dtype]
    self.embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=dtype, param_dtype=param_dtype,
                          embedding_init=_INIT)
    if c.positions == 'learned':
      self.pos_embed = nn.Embed(c.max_seq_len, c.hidden_size, dtype=dtype,
                                param_dtype=param_dtype, embedding_init=_INIT)
    policy = REMAT_POLICIES[c.remat_policy]
    if c.scan_layers:  # one `layers` subtree, each leaf [num_layers, ...]
      # self (0), h, xs, cos, sin, masks, cache_index are traced; flags and window (7-11) static.
      body = (nn.remat(ScanBlock, static_argnums=(7, 8, 9, 10, 11), policy=policy,
                       prevent_cse=False) if c.remat else ScanBlock)
      self.layers = nn.scan(body, variable_axes={'params': 0},
                            split_rngs={'params': True, 'dropout': True},  # (LoRA dropout)
                            in_axes=(0,) + (nn.broadcast,) * 10, length=c.num_layers)(c)
    else:
      # self (0), h, cos, sin, mask are traced; want_probs, want_qkv, causal (5-7) and window
      # (10) are static.
      block = (nn.remat(Block, static_argnums=(5, 6, 7, 10), policy=policy) if c.remat
               else Block)
      self.layers = [block(c) for _ in range(c.num_layers)]  # Named layers_0, layers_1, ...
    self.final_norm = _norm(c, None)
    if c.prompt_len:
      self.prompt = self.param('prompt', _INIT, (c.prompt_len, c.hidden_size), param_dtype)
    if not c.tie_embeddings:
      self.lm_head = nn.Dense(c.vocab_size, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                              kernel_init=_INIT)

  def __call__(self, input_ids_BxT, *, segment_ids=None, positions=None, attention_mask=None,
               cache=None, output_hidden_states: bool = False, output_attentions: bool = False,
               output_qkv: bool = False, return_hidden_only: bool = False,
               prefill: bool = False) -> dict[str, Any]:
    """Runs the model.

    Args:
      input_ids_BxT: int token ids.
      segment_ids: [B,T] packed-sequence ids; tokens attend causally within their own segment;
        0 marks padding. Not with a cache.
      positions: [B,T] positions (rotary or learned); default arange(T), or with a cache the
        count of real tokens before each one (kd.models.cache.default_positions). Restart them
        per packed segment.
      attention_mask: [B,T], 1 = real token, 0 = padding (padded keys are masked).
      cache: a kd.models.cache.init_cache pytree. The T tokens are written at slots
        cache['index']...+T-1 and attend to every real earlier slot; the updated cache is
        returned as out['cache']. Prefill a left-padded prompt, then feed one token at a time.
        With config.prompt_len P the cache needs P more slots (kd.models.cache.init_cache adds
        them) and the first call must pass `prefill=True`.
      output_hidden_states: add 'hidden_states', num_layers + 1 arrays [B,T,D]: the embeddings,
        then each layer's output (the last one after the final norm, as in transformers).
      output_attentions: add 'attentions', num_layers float32 arrays [B,H,T,T] (with a cache
        [B,H,T,S]) of probabilities. Uses an explicit softmax instead of the fused kernel.
      output_qkv: add 'qkv', num_layers dicts {'q','k','v'} of [B,T,H*head_dim] pre-RoPE
        projections, k and v repeated up to num_heads.
      return_hidden_only: skip the LM head (no 'logits'); use `project` on 'hidden' later.
      prefill: with a cache and config.prompt_len P, this call starts the sequence: the learned
        prompt goes into slots 0..P-1 before the T tokens (later calls attend to it there).
        Ignored without prompt tuning.

    Returns:
      dict with 'hidden' [B,T,D] (after the final norm), 'logits' [B,T,V] in the compute dtype,
      'cache' when one was given, and the optional entries above.

    With config.prompt_len = P the model runs on P + T positions and every output is sliced
    back to the T real ones ('attentions' to real queries and real keys, so a row sums to 1
    minus its mass on the prompt; likewise for prefix_len and the prefix keys).
    """
    c = self.config
    b, t = input_ids_BxT.shape
    for name, arr in (('segment_ids', segment_ids), ('positions', positions),
                      ('attention_mask', attention_mask)):
      if arr is not None and arr.shape != (b, t):
        raise ValueError(f'{name} has shape {arr.shape}; expected {(b, t)} like input_ids.')

    p = c.prompt_len
    window = None  # set below where sliding layers use the kernel's local window
    segments = None  # set below where the splash kernel takes segment ids for the mask
    lead = p if cache is None or prefill else 0  # prompt positions in front of this call's T
    if cache is None:
      if t + p > c.max_seq_len:
        prompt = f' + prompt_len {p}' if p else ''
        raise ValueError(f'Sequence length {t}{prompt} exceeds max_seq_len={c.max_seq_len}; '
                         'raise DecoderConfig.max_seq_len or truncate the inputs.')
      if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
      if (c.attention_impl == 'splash' and splash.fits(t) and not p and not c.prefix_len
          and not output_attentions and c.attn_softcap is None):
        # the kernel's segment ids instead of a [T, T] mask
        segments = segment_ids if segment_ids is not None else attention_mask
        segment_ids = attention_mask = None
      full_mask = attention_mask_Bx1xTxT(attention_mask, segment_ids)
      masks = {'full_attention': full_mask, 'sliding_attention': None}
      # Sliding layers with no padding, segment or prompt mask: the kernel's local window
      # (cuDNN's on a GPU), no [T, T] mask; otherwise the band is folded into the mask.
      if c.sliding_window is not None and full_mask is None and not p:
        window = c.sliding_window
      elif c.sliding_window is not None:
        masks['sliding_attention'] = sliding_window_mask(full_mask, t, c.sliding_window)
      if p:  # the prompt takes positions 0..P-1; real tokens keep their offsets, shifted by P
        masks = {kind: with_prompt_queries(m, p) for kind, m in masks.items()}
        positions = jnp.concatenate(
            [jnp.broadcast_to(jnp.arange(p, dtype=positions.dtype), (b, p)), positions + p], 1)
      causal, cache_index = True, None
    else:
      if lead:  # the prompt as P real slots in front: positions 0..P-1, tokens counted after
        real = (jnp.ones((b, t), jnp.int32) if attention_mask is None
                else attention_mask.astype(jnp.int32))
        attention_mask = jnp.concatenate([jnp.ones((b, lead), jnp.int32), real], 1)
        if positions is not None:
          positions = jnp.concatenate(
              [jnp.broadcast_to(jnp.arange(lead, dtype=positions.dtype), (b, lead)),
               positions + lead], 1)
      masks, positions, cache_index, key_mask = self._cache_inputs(
          cache, t + lead, segment_ids, positions, attention_mask)
      causal = False  # in the masks

    h_BxTxD = self.embed(input_ids_BxT)
    if lead:  # before the scale, like the token embeddings
      prompt_BxPxD = jnp.broadcast_to(self.prompt.astype(h_BxTxD.dtype), (b, p, c.hidden_size))
      h_BxTxD = jnp.concatenate([prompt_BxPxD, h_BxTxD], axis=1)
    if c.embed_scale:  # in the compute dtype, as transformers' Gemma does
      h_BxTxD = h_BxTxD * jnp.asarray(c.hidden_size ** 0.5, h_BxTxD.dtype)
    cos_BxTxH = sin_BxTxH = None
    if c.positions == 'learned':
      h_BxTxD = h_BxTxD + self.pos_embed(positions)
    else:
      cos_BxTxH, sin_BxTxH = rope_cos_sin(positions, c)

    hidden_states, attentions, qkvs, new_kvs = [h_BxTxD], [], [], []
    if c.scan_layers:
      h_BxTxD, (hs, probs, qkv, new_kvs) = self._scan(
          h_BxTxD, cos_BxTxH, sin_BxTxH, masks, causal, cache, cache_index,
          output_attentions, output_qkv, output_hidden_states, window, segments)
      layers = range(c.num_layers)  # the stacked outputs, per layer (the cache stays stacked)
      if output_hidden_states:
        hidden_states += [hs[i] for i in layers]
      if output_attentions:
        attentions = [probs[i] for i in layers]
      if output_qkv:
        qkvs = [{name: x[i] for name, x in qkv.items()} for i in layers]
    else:
      for i, layer in enumerate(self.layers):
        kv = None if cache is None else cache['layers'][i]
        sliding = c.layer_type(i) == 'sliding_attention'
        h_BxTxD, probs, qkv, new_kv = layer(h_BxTxD, cos_BxTxH, sin_BxTxH,
                                            masks[c.layer_type(i)], output_attentions,
                                            output_qkv, causal, kv, cache_index,
                                            window if sliding else None, segments)
        hidden_states.append(h_BxTxD)
        attentions.append(probs)
        qkvs.append(qkv)
        new_kvs.append(new_kv)

    out = {'hidden': self.final_norm(h_BxTxD[:, lead:])}
    if not return_hidden_only:
      out['logits'] = self.project(out['hidden'])
    if output_hidden_states:  # as in transformers, the last entry is after the final norm
      out['hidden_states'] = tuple(x[:, lead:] for x in hidden_states[:-1]) + (out['hidden'],)
    if output_attentions:  # (with a cache: every key slot, the prompt's included)
      out['attentions'] = tuple(a[:, :, lead:, lead if cache is None else 0:]
                                for a in attentions)
    if output_qkv:
      out['qkv'] = tuple({name: x[:, lead:] for name, x in qkv.items()} for qkv in qkvs)
    if cache is not None:
      out['cache'] = {'index': cache_index + t + lead, 'mask': key_mask,
                      'layers': new_kvs if c.scan_layers else tuple(new_kvs)}
    return out

  def _scan(self, h_BxTxD, cos_BxTxH, sin_BxTxH, masks, causal, cache, cache_index,
            want_probs, want_qkv, want_hidden, window, segments):
    """The layers as one lax.scan (config.scan_layers): one layer is traced and compiled."""
    c = self.config
    types = [c.layer_type(i) for i in range(c.num_layers)]
    if len(set(types)) == 1:
      sliding_L, layer_masks = None, masks[types[0]]
      window = window if types[0] == 'sliding_attention' else None
    elif window is not None:  # no mask: each layer's flag picks the kernel's window or none
      sliding_L = jnp.asarray([k == 'sliding_attention' for k in types])
      layer_masks = None
    else:  # both masks, picked per layer by a scanned flag; causality made explicit
      full = masks['full_attention']
      if causal:
        tq = h_BxTxD.shape[1]
        tril = jnp.tril(jnp.ones((tq, tq), bool))[None, None]
        full = tril if full is None else full & tril
      sliding_L = jnp.asarray([k == 'sliding_attention' for k in types])
      layer_masks = (full, masks['sliding_attention'])
    kv = None if cache is None else cache['layers']
    return self.layers(h_BxTxD, (kv, sliding_L), cos_BxTxH, sin_BxTxH, layer_masks, cache_index,
                       want_probs, want_qkv, want_hidden, causal, window, segments)

  def _cache_inputs(self, cache, t, segment_ids, positions, attention_mask):
    c = self.config
    if segment_ids is not None:
      raise ValueError('segment_ids cannot be used with a cache; left-pad the prompts instead.')
    s = cache['mask'].shape[1]
    if t > s:
      raise ValueError(f'{t} tokens do not fit a cache of {s} slots; make a longer cache.')
    if s > c.max_seq_len:
      raise ValueError(f'cache length {s} exceeds max_seq_len={c.max_seq_len}; make a shorter '
                       'cache or raise DecoderConfig.max_seq_len.')
    new_mask_BxT = (jnp.ones((cache['mask'].shape[0], t), bool) if attention_mask is None
                    else attention_mask.astype(bool))
    if positions is None:
      positions = kv_cache.default_positions(cache['mask'], new_mask_BxT)
    index = cache['index']
    key_mask_BxS = kv_cache.write(cache['mask'], new_mask_BxT, index)
    masks = kv_cache.attention_masks(key_mask_BxS, index, t, c.sliding_window,
                                     always_visible=c.prompt_len)
    return masks, positions, index, key_mask_BxS

  def project(self, hidden_BxTxD):
    """LM head alone: final-normed hidden states [..., D] -> logits [..., V] (compute dtype)."""
    if self.config.tie_embeddings:
      logits = self.embed.attend(hidden_BxTxD)
    else:
      logits = self.lm_head(hidden_BxTxD)
    return softcap(logits, self.config.logit_softcap)


def init_params(config: DecoderConfig, rng, seq_len: int = 8) -> dict[str, Any]:
  """Returns the variables {'params': ...} to pass to `Decoder(config).apply`.

  Pure in (config, rng): `jax.eval_shape(functools.partial(init_params, config), rng)` gives
  shapes without allocating, and `jax.jit(init_params, static_argnums=(0, 2))` works.
  """
  ids_1xT = jnp.zeros((1, min(seq_len, config.max_seq_len - config.prompt_len)), jnp.int32)
  return dict(Decoder(config).init(rng, ids_1xT, return_hidden_only=False))


def count_params(params) -> int:
  """Number of scalars in a params pytree (arrays or jax.ShapeDtypeStruct leaves)."""
  return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params))


def head_params(model: Decoder, params) -> dict[str, Any]:
  """The variables `Decoder.project` reads (the LM head, or the embedding when tied)."""
  name = 'embed' if model.config.tie_embeddings else 'lm_head'
  return {'params': {name: params['params'][name]}}


def project_with(model: Decoder) -> Callable[[Any, jax.Array], jax.Array]:
  """(head_params(model, params), h [..., D]) -> logits [..., V]."""
  # By name, not Decoder.project: a wrapped model (e.g. kd.peft's LoRA) wraps its own `project`.
  return lambda head, hidden_BxTxD: model.apply(head, hidden_BxTxD, method='project')


def head_fn(model: Decoder, params) -> Callable[[jax.Array], jax.Array]:
  """h [..., D] -> logits [..., V] with `model`'s LM head (tied or untied) and `params`."""

  return functools.partial(project_with(model), params)
