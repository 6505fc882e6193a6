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
axis (kd.models.stacking converts; kd.hf does it on load and save). Softmax, norms and RoPE are
always computed in float32 whatever the compute dtype. Pass `cache=` (kd.models.cache) to decode
incrementally.

Three parameter-efficient extensions, off by default (kd.peft.adapters selects, adds and strips
their params): `adapter_size` (bottleneck adapters), `prefix_len` (prefix tuning), `prompt_len`
(prompt tuning); see DecoderConfig.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kd.models import cache as kv_cache
from kd.models import splash
from kd.models.attention import (attention_mask_Bx1xTxT, sliding_window_mask, softcap,
                                 with_prompt_queries)
from kd.models.decoder_config import DTYPES, REMAT_POLICIES, DecoderConfig
from kd.models.layers import INIT, Block, ScanBlock, norm
from kd.models.rope import rope_cos_sin


class Decoder(nn.Module):
  """Decoder-only LM. Apply with `Decoder(config).apply(variables, input_ids_BxT, ...)`."""

  config: DecoderConfig

  def setup(self):
    c = self.config
    dtype, param_dtype = DTYPES[c.dtype], DTYPES[c.param_dtype]
    self.embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=dtype, param_dtype=param_dtype,
                          embedding_init=INIT)
    if c.positions == 'learned':
      self.pos_embed = nn.Embed(c.max_seq_len, c.hidden_size, dtype=dtype,
                                param_dtype=param_dtype, embedding_init=INIT)
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
    self.final_norm = norm(c, None)
    if c.prompt_len:
      self.prompt = self.param('prompt', INIT, (c.prompt_len, c.hidden_size), param_dtype)
    if not c.tie_embeddings:
      self.lm_head = nn.Dense(c.vocab_size, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                              kernel_init=INIT)

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


def head_matrix(model: Decoder, params) -> jax.Array:
  """The LM head as one [D, V] matrix (the embedding's transpose when tied), in the compute
  dtype, for kernels that read the head's weights themselves (kd.losses.fused_head)."""
  c = model.config
  if c.logit_softcap:
    raise ValueError(f'logit_softcap={c.logit_softcap}: a head matrix leaves out the softcap; '
                     "use config.logit_kernel='xla' for this model.")
  p = params['params']
  try:
    w = p['embed']['embedding'].T if c.tie_embeddings else p['lm_head']['kernel']
  except KeyError as e:
    raise ValueError(f'no plain head weight {e} in the params (a quantized or wrapped head?); '
                     "use config.logit_kernel='xla' for this model.") from None
  if not isinstance(w, (jax.Array, np.ndarray)):
    raise ValueError(f'the head weight is a {type(w).__name__}, not an array (a quantized '
                     "teacher?); use config.logit_kernel='xla' for this model.")
  return w.astype(c.dtype)


def head_fn(model: Decoder, params) -> Callable[[jax.Array], jax.Array]:
  """h [..., D] -> logits [..., V] with `model`'s LM head (tied or untied) and `params`."""

  return functools.partial(project_with(model), params)
