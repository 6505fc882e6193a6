"""A BERT-style bidirectional encoder in Flax linen (BERT, MiniLM, sentence-transformers models).

Word + position + token-type embeddings and a LayerNorm, then post-LN blocks with biases:
h = LN(h + attn(h)), h = LN(h + mlp(h)), exact (erf) GELU. No dropout: the encoder is used as a
teacher or as a distilled student trained without it. Pure functional, like the decoder:

  variables = init_encoder_params(config, jax.random.key(0))
  out = Encoder(config).apply(variables, input_ids_BxT, attention_mask=mask_BxT)
  emb_BxD = mean_pool(out['hidden'], mask_BxT)

Parameter names follow the layer roles (`layers_{i}/attn/q_proj/kernel`, `layers_{i}/attn_norm`,
...) so a Hugging Face BertModel checkpoint maps onto them by renaming and transposing linear
weights (kd.hf.bert). Softmax and LayerNorm are computed in float32 whatever the compute dtype.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kd.models.attention import attention_mask_Bx1xTxT, explicit_attention, with_prefix_keys
from kd.models.layers import Adapter, Norm
from kd.models.model import config_from_dict

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}
POOLINGS = ('mean', 'cls')

_INIT = nn.initializers.normal(stddev=0.02)  # BERT's initializer_range


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """Shape and numerics of an Encoder; fields mirror transformers' BertConfig. Hashable."""

  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  dtype: str = 'float32'  # Compute dtype of activations.
  param_dtype: str = 'float32'
  model_type: str = 'bert'  # The HF family kd.hf.save exports to.
  pooling: str = 'mean'  # How a sentence embedding is made (kd.eval, sentence-transformers export).
  # BERT's [CLS] dense+tanh pooler. Kept so a loaded checkpoint exports with nothing missing;
  # nothing in kd trains or reads it, so students built from scratch leave it off.
  add_pooler: bool = False
  # Bottleneck adapters (Houlsby et al. 2019, made for BERT; kd.peft.adapters): 0 = off. Each
  # sublayer's output projection is followed by x + up(gelu(down(x))), width adapter_size,
  # before its residual add and LayerNorm; `up` starts at zero, so a fresh adapter is the
  # identity.
  adapter_size: int = 0
  # Prefix tuning (Li & Liang 2021; kd.peft.adapters): 0 = off. Per layer, prefix_len learned
  # keys and values [prefix_len, num_heads, head_dim] in front of the real ones, seen by every
  # query (padding masks only real keys). They have no position: positions, token types and
  # what output_attentions returns (probabilities over the real keys, rows short of 1 by the
  # prefix's share) are those of the real tokens.
  prefix_len: int = 0

  # (kd.models.layers.Adapter reads the activation by this name.)
  mlp_activation = 'gelu'  # exact (erf) GELU, BERT's hidden_act 'gelu'

  def __post_init__(self):
    self.validate()

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  def validate(self) -> None:
    """Raises ValueError naming the bad field and what to do about it."""
    for name in ('vocab_size', 'hidden_size', 'num_layers', 'num_heads', 'intermediate_size',
                 'max_position_embeddings', 'type_vocab_size'):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f'EncoderConfig.{name} must be a positive int, got {value!r}.')
    if self.hidden_size % self.num_heads:
      raise ValueError(f'hidden_size={self.hidden_size} is not divisible by '
                       f'num_heads={self.num_heads}; change one of them.')
    for name, what in (('adapter_size', 'adapters'), ('prefix_len', 'prefix')):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f'EncoderConfig.{name} must be an int >= 0 (0 = no {what}), '
                         f'got {value!r}.')
    if self.layer_norm_eps <= 0:
      raise ValueError(f'layer_norm_eps must be > 0, got {self.layer_norm_eps}.')
    for name in ('dtype', 'param_dtype'):
      if getattr(self, name) not in DTYPES:
        raise ValueError(f'EncoderConfig.{name}={getattr(self, name)!r} is not supported; '
                         f'use one of {sorted(DTYPES)}.')
    if self.pooling not in POOLINGS:
      raise ValueError(f'EncoderConfig.pooling={self.pooling!r} is not supported; '
                       f'use one of {list(POOLINGS)}.')

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> EncoderConfig:
    return config_from_dict(cls, d)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def _dense(c: EncoderConfig, features: int, name: str):
  return nn.Dense(features, dtype=DTYPES[c.dtype], param_dtype=DTYPES[c.param_dtype],
                  kernel_init=_INIT, name=name)


class SelfAttention(nn.Module):
  config: EncoderConfig

  @nn.compact
  def __call__(self, x_BxTxD, mask_Bx1xTxT, want_probs: bool, want_qkv: bool):
    c = self.config
    b, t, _ = x_BxTxD.shape
    n, h = c.num_heads, c.head_dim
    q_BxTxD = _dense(c, c.hidden_size, 'q_proj')(x_BxTxD)
    k_BxTxD = _dense(c, c.hidden_size, 'k_proj')(x_BxTxD)
    v_BxTxD = _dense(c, c.hidden_size, 'v_proj')(x_BxTxD)
    q_BxTxNxH, k_BxSxNxH, v_BxSxNxH = (a.reshape(b, t, n, h) for a in (q_BxTxD, k_BxTxD, v_BxTxD))
    p = c.prefix_len
    if p:
      param_dtype = DTYPES[c.param_dtype]
      prefix = lambda name, like: jnp.broadcast_to(
          self.param(name, _INIT, (p, n, h), param_dtype).astype(like.dtype), (b, p, n, h))
      k_BxSxNxH = jnp.concatenate([prefix('prefix_k', k_BxSxNxH), k_BxSxNxH], axis=1)
      v_BxSxNxH = jnp.concatenate([prefix('prefix_v', v_BxSxNxH), v_BxSxNxH], axis=1)
      mask_Bx1xTxT = with_prefix_keys(mask_Bx1xTxT, False, t, t, p)  # now [B|1,1,T,P+T]

    if want_probs:
      out_BxTxNxH, probs = explicit_attention(q_BxTxNxH, k_BxSxNxH, v_BxSxNxH, mask_Bx1xTxT,
                                              h ** -0.5, causal=False)
      probs = probs[..., p:]  # the real keys only
    else:
      out_BxTxNxH = jax.nn.dot_product_attention(q_BxTxNxH, k_BxSxNxH, v_BxSxNxH,
                                                 mask=mask_Bx1xTxT, scale=h ** -0.5)
      probs = None
    out_BxTxD = _dense(c, c.hidden_size, 'o_proj')(out_BxTxNxH.reshape(b, t, n * h))
    qkv = {'q': q_BxTxD, 'k': k_BxTxD, 'v': v_BxTxD} if want_qkv else None
    return out_BxTxD, probs, qkv


class Block(nn.Module):
  """Post-LN residual block: h = LN(h + attn(h)), then h = LN(h + mlp(h)).

  With config.adapter_size, attn(h) and mlp(h) each pass an Adapter before the residual add.
  """

  config: EncoderConfig

  @nn.compact
  def __call__(self, h_BxTxD, mask_Bx1xTxT, want_probs: bool, want_qkv: bool):
    c = self.config
    norm = lambda name: Norm('layer', c.layer_norm_eps, 0.0, DTYPES[c.dtype],
                             DTYPES[c.param_dtype], name=name)
    attn_BxTxD, probs, qkv = SelfAttention(c, name='attn')(h_BxTxD, mask_Bx1xTxT, want_probs,
                                                           want_qkv)
    adapt = ((lambda name, x: Adapter(c, name=name)(x)) if c.adapter_size
             else (lambda name, x: x))
    h_BxTxD = norm('attn_norm')(h_BxTxD + adapt('attn_adapter', attn_BxTxD))
    up_BxTxF = nn.gelu(_dense(c, c.intermediate_size, 'up_proj')(h_BxTxD), approximate=False)
    mlp_BxTxD = _dense(c, c.hidden_size, 'down_proj')(up_BxTxF)
    h_BxTxD = norm('mlp_norm')(h_BxTxD + adapt('mlp_adapter', mlp_BxTxD))
    return h_BxTxD, probs, qkv


class Encoder(nn.Module):
  """Bidirectional encoder. Apply with `Encoder(config).apply(variables, input_ids_BxT, ...)`."""

  config: EncoderConfig

  @nn.compact
  def __call__(self, input_ids_BxT, *, attention_mask=None, token_type_ids=None, positions=None,
               segment_ids=None, output_hidden_states: bool = False,
               output_attentions: bool = False, output_qkv: bool = False) -> dict[str, Any]:
    """Runs the model.

    Args:
      input_ids_BxT: int token ids.
      attention_mask: [B,T], 1 = real token, 0 = padding (padded keys are masked).
      token_type_ids: [B,T] BERT segment (sentence A/B) ids; default 0.
      positions: [B,T] absolute positions; default arange(T). Restart them per packed segment.
      segment_ids: [B,T] packed-sequence ids; tokens attend only within their own segment.
      output_hidden_states: add 'hidden_states', num_layers + 1 arrays [B,T,D]: the embeddings
        (after their LayerNorm), then each layer's output, as in transformers.
      output_attentions: add 'attentions', num_layers float32 arrays [B,H,T,T] of probabilities.
      output_qkv: add 'qkv', num_layers dicts {'q','k','v'} of [B,T,H*head_dim] projections (with
        biases), for MiniLM self-attention relation distillation.

    Returns:
      dict with 'hidden' [B,T,D] (last layer's output), 'pooled' [B,D] when config.add_pooler,
      and the optional entries above.
    """
    c = self.config
    dtype, param_dtype = DTYPES[c.dtype], DTYPES[c.param_dtype]
    b, t = input_ids_BxT.shape
    if t > c.max_position_embeddings:
      raise ValueError(f'Sequence length {t} exceeds max_position_embeddings='
                       f'{c.max_position_embeddings}; truncate the inputs.')
    for name, arr in (('attention_mask', attention_mask), ('token_type_ids', token_type_ids),
                      ('positions', positions), ('segment_ids', segment_ids)):
      if arr is not None and arr.shape != (b, t):
        raise ValueError(f'{name} has shape {arr.shape}; expected {(b, t)} like input_ids.')
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if token_type_ids is None:
      token_type_ids = jnp.zeros((b, t), jnp.int32)

    embed = lambda num, name: nn.Embed(num, c.hidden_size, dtype=dtype, param_dtype=param_dtype,
                                       embedding_init=_INIT, name=name)
    h_BxTxD = (embed(c.vocab_size, 'word_embed')(input_ids_BxT)
               + embed(c.max_position_embeddings, 'position_embed')(positions)
               + embed(c.type_vocab_size, 'token_type_embed')(token_type_ids))
    h_BxTxD = Norm('layer', c.layer_norm_eps, 0.0, dtype, param_dtype, name='embed_norm')(h_BxTxD)

    # Padded keys are hidden from every query; padded queries still see the real keys, so
    # their outputs are finite and match transformers.
    mask_Bx1xTxT = attention_mask_Bx1xTxT(attention_mask, segment_ids, attend_self=False)
    hidden_states, attentions, qkvs = [h_BxTxD], [], []
    for i in range(c.num_layers):
      h_BxTxD, probs, qkv = Block(c, name=f'layers_{i}')(h_BxTxD, mask_Bx1xTxT,
                                                         output_attentions, output_qkv)
      hidden_states.append(h_BxTxD)
      attentions.append(probs)
      qkvs.append(qkv)

    out = {'hidden': h_BxTxD}
    if c.add_pooler:
      out['pooled'] = jnp.tanh(_dense(c, c.hidden_size, 'pooler')(h_BxTxD[:, 0]))
    if output_hidden_states:
      out['hidden_states'] = tuple(hidden_states)
    if output_attentions:
      out['attentions'] = tuple(attentions)
    if output_qkv:
      out['qkv'] = tuple(qkvs)
    return out


def mean_pool(hidden_BxTxD, attention_mask_BxT=None):
  """Mean of the real tokens' hidden states [B,D] in float32 (sentence-transformers' pooling)."""
  h = hidden_BxTxD.astype(jnp.float32)
  if attention_mask_BxT is None:
    return jnp.mean(h, axis=1)
  m_BxTx1 = attention_mask_BxT.astype(jnp.float32)[..., None]
  return jnp.sum(h * m_BxTx1, axis=1) / jnp.maximum(jnp.sum(m_BxTx1, axis=1), 1e-9)


def pool(hidden_BxTxD, attention_mask_BxT, pooling: str):
  """Sentence embeddings [B,D] float32 by `pooling` ('mean' or 'cls', EncoderConfig.pooling)."""
  if pooling == 'mean':
    return mean_pool(hidden_BxTxD, attention_mask_BxT)
  if pooling == 'cls':
    return hidden_BxTxD[:, 0].astype(jnp.float32)
  raise ValueError(f'unknown pooling {pooling!r}; use one of {list(POOLINGS)}.')


def init_encoder_params(config: EncoderConfig, rng, seq_len: int = 8) -> dict[str, Any]:
  """Returns the variables {'params': ...} to pass to `Encoder(config).apply`.

  Pure in (config, rng): `jax.eval_shape(functools.partial(init_encoder_params, config), rng)`
  gives shapes without allocating.
  """
  ids_1xT = jnp.zeros((1, min(seq_len, config.max_position_embeddings)), jnp.int32)
  return dict(Encoder(config).init(rng, ids_1xT))


@functools.lru_cache(maxsize=32)
def param_shapes(config: EncoderConfig) -> dict[str, Any]:
  """The variables tree of `config` as jax.ShapeDtypeStruct leaves (no allocation)."""
  return jax.eval_shape(functools.partial(init_encoder_params, config), jax.random.key(0))
