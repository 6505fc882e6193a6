"""The decoder's config: DecoderConfig (every family switch, validated) and the tables of
dtypes, activations, norms, remat policies, attention kernels and RoPE scalings it names."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

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
ATTENTION_IMPLS = (None, 'xla', 'cudnn', 'splash', 'matmul')
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
  # known to apply (GPU, bf16/fp16, causal without a padding or segment mask), 'matmul' on the
  # CPU (kd.models.matmul_attention: batched matmuls per KV head, closed-form backward), else XLA.
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
