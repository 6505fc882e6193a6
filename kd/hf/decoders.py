"""Decoder checkpoints (llama, mistral, qwen2, qwen3, gemma, gemma2, gpt2): configs, name maps.

Every family is the one `kd.models.Decoder` with different `DecoderConfig` switches. Reading a
config.json fills what is missing with the defaults of transformers' config class and refuses
what the decoder cannot run (an unknown rope type, Gemma's bidirectional attention, GPT-2
cross-attention, ...) with a ValueError. Linear weights are stored [out, in] by torch and
transposed; GPT-2's Conv1D weights are already [in, out] and its fused c_attn is split into
q/k/v. Tied embeddings have no lm_head in the file.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np

from kd import hf
from kd.hf import io
from kd.models import decoder as decoder_lib
from kd.models import decoder_config

DecoderConfig = decoder_lib.DecoderConfig

# transformers' defaults for the keys kd reads, per config class (transformers 5.x).
_ROPE_COMMON = dict(num_key_value_heads=None, head_dim=None, hidden_act='silu', rms_norm_eps=1e-6,
                    tie_word_embeddings=False, attention_bias=False, mlp_bias=False)
DEFAULTS = {
    'llama': dict(_ROPE_COMMON, vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                  num_hidden_layers=32, num_attention_heads=32, max_position_embeddings=2048),
    'mistral': dict(_ROPE_COMMON, vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                    max_position_embeddings=4096 * 32, sliding_window=4096),
    'qwen2': dict(_ROPE_COMMON, vocab_size=151936, hidden_size=4096, intermediate_size=22016,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                  max_position_embeddings=32768, use_sliding_window=False, sliding_window=4096,
                  max_window_layers=28, layer_types=None),
    'gemma': dict(_ROPE_COMMON, vocab_size=256000, hidden_size=3072, intermediate_size=24576,
                  num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=16,
                  head_dim=256, hidden_act='gelu_pytorch_tanh', max_position_embeddings=8192,
                  tie_word_embeddings=True, use_bidirectional_attention=None),
    'gemma2': dict(_ROPE_COMMON, vocab_size=256000, hidden_size=2304, intermediate_size=9216,
                   num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                   head_dim=256, hidden_activation='gelu_pytorch_tanh',
                   max_position_embeddings=8192, tie_word_embeddings=True,
                   query_pre_attn_scalar=256, sliding_window=4096, layer_types=None,
                   final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
                   use_bidirectional_attention=None),
    'gpt2': dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                 n_inner=None, activation_function='gelu_new', layer_norm_epsilon=1e-5,
                 scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
                 add_cross_attention=False, tie_word_embeddings=True),
}
DEFAULTS['qwen3'] = dict(DEFAULTS['qwen2'], head_dim=128)

ARCHITECTURES = {'llama': 'LlamaForCausalLM', 'mistral': 'MistralForCausalLM',
                 'qwen2': 'Qwen2ForCausalLM', 'qwen3': 'Qwen3ForCausalLM',
                 'gemma': 'GemmaForCausalLM', 'gemma2': 'Gemma2ForCausalLM',
                 'gpt2': 'GPT2LMHeadModel'}

# HF activation name -> DecoderConfig.mlp_activation, and back per family.
_ACTIVATIONS = {'silu': 'silu', 'swish': 'silu', 'gelu_pytorch_tanh': 'gelu_tanh',
                'gelu_new': 'gelu_tanh', 'gelu': 'gelu', 'relu': 'relu'}
_HF_ACTIVATION = {'silu': 'silu', 'gelu_tanh': 'gelu_pytorch_tanh', 'gelu': 'gelu',
                  'relu': 'relu'}

# Checkpoint entries that are buffers, not weights (old transformers versions saved them).
_BUFFER_SUFFIXES = ('rotary_emb.inv_freq', 'attn.bias', 'attn.masked_bias')


class _Reader:
  """config.json values with transformers' defaults; a null counts as missing."""

  def __init__(self, hf_config: dict, model_type: str):
    self.d, self.defaults, self.model_type = hf_config, DEFAULTS[model_type], model_type

  def __call__(self, key, default=None):
    value = self.d.get(key)
    if value is None:
      value = self.defaults.get(key, default)
    return value

  def raw(self, key):
    """The value as written, null included; the default only when the key is absent."""
    return self.d[key] if key in self.d else self.defaults.get(key)

  def refuse(self, what: str):
    raise ValueError(f'{self.model_type} checkpoint with {what} is not supported by kd.')


def _activation(get: _Reader, key: str) -> str:
  name = get(key)
  if get.model_type in ('gemma', 'gemma2') and name == 'gelu':  # transformers: the tanh GELU
    name = 'gelu_pytorch_tanh'
  if name not in _ACTIVATIONS:
    get.refuse(f'{key}={name!r} (supported: {sorted(_ACTIVATIONS)})')
  return _ACTIVATIONS[name]


def _rope(get: _Reader, max_positions: int) -> dict[str, Any]:
  """rope_theta, rope_scaling and max_seq_len from rope_parameters (5.x) or rope_scaling (4.x)."""
  params = dict(get.d.get('rope_parameters') or get.d.get('rope_scaling') or {})
  if any(isinstance(v, dict) for v in params.values()):
    get.refuse('per-layer-type rope_parameters')
  theta = params.pop('rope_theta', None) or get('rope_theta', 10000.0)
  kind = params.pop('rope_type', None) or params.pop('type', None) or 'default'
  params.pop('type', None)
  partial = params.pop('partial_rotary_factor', None) or get('partial_rotary_factor', 1.0)
  if partial != 1.0:
    get.refuse(f'partial_rotary_factor={partial}')
  out = dict(rope_theta=float(theta), rope_scaling=None, max_seq_len=max_positions)
  if kind == 'default':
    return out
  if kind not in decoder_config.ROPE_TYPES:
    get.refuse(f'rope type {kind!r} (supported: default, {", ".join(decoder_config.ROPE_TYPES)})')
  if kind == 'dynamic':  # NTK scaling relative to max_position_embeddings, up to factor times it
    params['original_max_position_embeddings'] = max_positions
    out['max_seq_len'] = int(max_positions * params.get('factor', 1.0))
  elif get.d.get('original_max_position_embeddings') is not None:  # wins, as in transformers
    params['original_max_position_embeddings'] = get.d['original_max_position_embeddings']
  elif params.get('original_max_position_embeddings') is None:
    params['original_max_position_embeddings'] = max_positions
  if kind == 'yarn' and params.get('factor') is None:
    params['factor'] = max_positions / params['original_max_position_embeddings']
  out['rope_scaling'] = {'rope_type': kind, **params}
  return out


def _sliding(get: _Reader, num_layers: int) -> dict[str, Any]:
  """Mistral: every layer slides when sliding_window is set; Qwen: only with use_sliding_window,
  on the layers layer_types (or max_window_layers) mark; Gemma 2: those layer_types marks
  (default: layers 0, 2, 4, ...)."""
  window = get.raw('sliding_window')
  if get.model_type == 'mistral':
    return dict(sliding_window=window, layer_types=None)
  if get.model_type == 'gemma2':  # every other layer slides, starting with the first
    types = get('layer_types') or ['full_attention' if (i + 1) % 2 == 0 else 'sliding_attention'
                                   for i in range(num_layers)]
    if window is None or 'sliding_attention' not in types:
      return dict(sliding_window=None, layer_types=None)
    return dict(sliding_window=window, layer_types=tuple(types))
  if not get('use_sliding_window') or window is None:
    return dict(sliding_window=None, layer_types=None)
  types = get('layer_types') or [
      'sliding_attention' if i >= get('max_window_layers') else 'full_attention'
      for i in range(num_layers)]
  if 'sliding_attention' not in types:
    return dict(sliding_window=None, layer_types=None)
  return dict(sliding_window=window, layer_types=tuple(types))


def config_from_hf(hf_config: dict) -> DecoderConfig:
  """A DecoderConfig equal to what transformers builds from this config.json dict."""
  model_type = hf_config.get('model_type')
  get = _Reader(hf_config, model_type)
  if model_type == 'gpt2':
    return _gpt2_config(get)
  hidden, heads = get('hidden_size'), get('num_attention_heads')
  num_layers = get('num_hidden_layers')
  fields = dict(
      model_type=model_type, vocab_size=get('vocab_size'), hidden_size=hidden,
      num_layers=num_layers, num_heads=heads,
      num_kv_heads=get.raw('num_key_value_heads') or heads,
      intermediate_size=get('intermediate_size'), head_dim=get('head_dim') or hidden // heads,
      rms_norm_eps=float(get('rms_norm_eps')), tie_embeddings=bool(get('tie_word_embeddings')),
      mlp_activation=_activation(get, 'hidden_activation' if model_type == 'gemma2'
                                 else 'hidden_act'),
      **_rope(get, get('max_position_embeddings')))
  attention_bias = bool(get('attention_bias'))
  if model_type == 'llama':
    fields.update(qkv_bias=attention_bias, attn_out_bias=attention_bias,
                  mlp_bias=bool(get('mlp_bias')))
  elif model_type == 'mistral':
    fields.update(_sliding(get, num_layers))
  elif model_type == 'qwen2':
    fields.update(qkv_bias=True, **_sliding(get, num_layers))
  elif model_type == 'qwen3':
    fields.update(qkv_bias=attention_bias, attn_out_bias=attention_bias, qk_norm=True,
                  **_sliding(get, num_layers))
  elif model_type == 'gemma':
    if get('use_bidirectional_attention'):
      get.refuse('use_bidirectional_attention=True')
    fields.update(qkv_bias=attention_bias, attn_out_bias=attention_bias, norm_offset=1.0,
                  embed_scale=True)
  elif model_type == 'gemma2':
    if get('use_bidirectional_attention'):
      get.refuse('use_bidirectional_attention=True')
    fields.update(qkv_bias=attention_bias, attn_out_bias=attention_bias, norm_offset=1.0,
                  embed_scale=True, sandwich_norm=True,
                  attn_scale=float(get('query_pre_attn_scalar')) ** -0.5,
                  attn_softcap=get.raw('attn_logit_softcapping'),
                  logit_softcap=get.raw('final_logit_softcapping'), **_sliding(get, num_layers))
  return DecoderConfig(**fields)


def _gpt2_config(get: _Reader) -> DecoderConfig:
  if get('add_cross_attention'):
    get.refuse('add_cross_attention=True')
  if get('scale_attn_by_inverse_layer_idx'):
    get.refuse('scale_attn_by_inverse_layer_idx=True')
  hidden, heads = get('n_embd', get('hidden_size')), get('n_head', get('num_attention_heads'))
  return DecoderConfig(
      model_type='gpt2', vocab_size=get('vocab_size'), hidden_size=hidden,
      num_layers=get('n_layer', get('num_hidden_layers')), num_heads=heads, num_kv_heads=heads,
      intermediate_size=get('n_inner') or 4 * hidden,
      max_seq_len=get('n_positions', get('max_position_embeddings')),
      tie_embeddings=bool(get('tie_word_embeddings')), norm='layer',
      layer_norm_eps=float(get('layer_norm_epsilon')), qkv_bias=True, attn_out_bias=True,
      mlp_bias=True, mlp_activation=_activation(get, 'activation_function'), mlp_gated=False,
      positions='learned', attn_scale=None if get('scale_attn_weights') else 1.0)


# ----------------------------------------------------------------------------- export


# What each family's config.json cannot express: these DecoderConfig fields must have these values.
_FIXED_ROPE = dict(norm='rms', norm_offset=0.0, qk_norm=False, mlp_gated=True, positions='rope',
                   embed_scale=False, attn_scale=None, sliding_window=None, layer_types=None,
                   qkv_bias=False, attn_out_bias=False, mlp_bias=False, attn_softcap=None,
                   logit_softcap=None, sandwich_norm=False)
_FIXED = {
    'llama': {k: v for k, v in _FIXED_ROPE.items() if not k.endswith('bias')},
    'mistral': {k: v for k, v in _FIXED_ROPE.items() if k not in ('sliding_window',)},
    'qwen2': dict({k: v for k, v in _FIXED_ROPE.items()
                   if k not in ('sliding_window', 'layer_types')}, qkv_bias=True),
    'qwen3': dict({k: v for k, v in _FIXED_ROPE.items()
                   if k not in ('sliding_window', 'layer_types', 'qkv_bias', 'attn_out_bias')},
                  qk_norm=True),
    'gemma': dict({k: v for k, v in _FIXED_ROPE.items()
                   if k not in ('qkv_bias', 'attn_out_bias')}, norm_offset=1.0, embed_scale=True),
    'gemma2': dict({k: v for k, v in _FIXED_ROPE.items()
                    if k not in ('qkv_bias', 'attn_out_bias', 'attn_scale', 'sliding_window',
                                 'layer_types', 'attn_softcap', 'logit_softcap')},
                   norm_offset=1.0, embed_scale=True, sandwich_norm=True),
    'gpt2': dict(norm='layer', norm_offset=0.0, qk_norm=False, mlp_gated=False,
                 positions='learned', embed_scale=False, sliding_window=None, layer_types=None,
                 qkv_bias=True, attn_out_bias=True, mlp_bias=True, rope_scaling=None,
                 attn_softcap=None, logit_softcap=None, sandwich_norm=False),
}


def _check_exportable(c: DecoderConfig) -> None:
  wrong = {k: getattr(c, k) for k, v in _FIXED[c.model_type].items() if getattr(c, k) != v}
  if c.model_type in ('llama', 'qwen3', 'gemma', 'gemma2') and c.qkv_bias != c.attn_out_bias:
    wrong['qkv_bias != attn_out_bias'] = (c.qkv_bias, c.attn_out_bias)
  peft_fields = {k: getattr(c, k) for k in ('adapter_size', 'prefix_len', 'prompt_len')
                 if getattr(c, k)}
  if peft_fields:  # no HF architecture holds them; saving would silently drop them
    raise ValueError(f'{peft_fields}: adapters, prefixes and soft prompts have no place in a '
                     f'{c.model_type} checkpoint; kd.hf.save writes them beside it '
                     '(kd_peft.safetensors), or train a LoRA student (merged on export)')
  if c.model_type == 'gpt2' and (c.num_kv_heads != c.num_heads
                                 or c.head_dim * c.num_heads != c.hidden_size
                                 or c.attn_scale not in (None, 1.0)):
    wrong['heads'] = (c.num_heads, c.num_kv_heads, c.head_dim, c.attn_scale)
  if wrong:
    raise ValueError(f'a {c.model_type} config.json cannot express {wrong}; change model_type '
                     f'or these fields (a {c.model_type} needs {_FIXED[c.model_type]}).')


def _rope_to_hf(c: DecoderConfig) -> dict[str, Any]:
  params = c.rope_params
  kind = params.pop('rope_type', 'default')
  out = {'max_position_embeddings': c.max_seq_len, 'rope_theta': c.rope_theta}
  if kind == 'dynamic':
    out['max_position_embeddings'] = params.pop('original_max_position_embeddings')
  out['rope_parameters'] = {'rope_type': kind, 'rope_theta': c.rope_theta, **params}
  return out


def _pre_attn_scalar(c: DecoderConfig) -> float:
  """Gemma 2's query_pre_attn_scalar s, where the attention scale is s ** -0.5 (an int if whole)."""
  s = c.head_dim if c.attn_scale is None else round(c.attn_scale ** -2, 6)
  return int(s) if float(s).is_integer() else s


def config_to_hf(c: DecoderConfig) -> dict[str, Any]:
  """config.json for transformers' AutoModelForCausalLM (model_type and architectures set)."""
  _check_exportable(c)
  out = {'architectures': [ARCHITECTURES[c.model_type]], 'model_type': c.model_type,
         'vocab_size': c.vocab_size, 'tie_word_embeddings': c.tie_embeddings,
         'dtype': c.param_dtype, 'torch_dtype': c.param_dtype}
  if c.model_type == 'gpt2':
    out.update(n_embd=c.hidden_size, n_layer=c.num_layers, n_head=c.num_heads,
               n_inner=c.intermediate_size, n_positions=c.max_seq_len,
               activation_function='gelu_new' if c.mlp_activation == 'gelu_tanh'
               else _HF_ACTIVATION[c.mlp_activation],
               layer_norm_epsilon=c.layer_norm_eps, scale_attn_weights=c.attn_scale is None)
    return out
  out.update(hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
             num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
             num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim,
             hidden_act=_HF_ACTIVATION[c.mlp_activation], rms_norm_eps=c.rms_norm_eps,
             **_rope_to_hf(c))
  if c.model_type in ('llama', 'qwen3', 'gemma', 'gemma2'):
    out['attention_bias'] = c.qkv_bias
  if c.model_type == 'gemma2':
    types = [c.layer_type(i) for i in range(c.num_layers)]
    out.update(hidden_activation=out.pop('hidden_act'), sliding_window=c.sliding_window,
               layer_types=types, attn_logit_softcapping=c.attn_softcap,
               final_logit_softcapping=c.logit_softcap,
               query_pre_attn_scalar=_pre_attn_scalar(c))
  if c.model_type == 'llama':
    out['mlp_bias'] = c.mlp_bias
  if c.model_type == 'mistral':
    out['sliding_window'] = c.sliding_window
  if c.model_type in ('qwen2', 'qwen3'):
    types = [c.layer_type(i) for i in range(c.num_layers)]
    sliding = 'sliding_attention' in types
    out.update(use_sliding_window=sliding, sliding_window=c.sliding_window if sliding else None,
               layer_types=types,
               max_window_layers=types.index('sliding_attention') if sliding else c.num_layers)
  return out


# ----------------------------------------------------------------------------- weights


def _name_map(c: DecoderConfig) -> list[tuple[str, tuple[tuple[str, ...], ...], str]]:
  """(hf name, our param paths, kind) for every tensor; kind is 'copy', 'linear' (transposed) or
  'fused' (GPT-2 c_attn: [in, 3 * out] split into q, k, v along the last axis)."""
  if c.model_type == 'gpt2':
    return _gpt2_names(c)
  out = [('model.embed_tokens.weight', (('embed', 'embedding'),), 'copy'),
         ('model.norm.weight', (('final_norm', 'scale'),), 'copy')]
  for i in range(c.num_layers):
    hf_layer, ours = f'model.layers.{i}.', (f'layers_{i}',)
    linears = {'self_attn.q_proj': ('attn', 'q_proj', c.qkv_bias),
               'self_attn.k_proj': ('attn', 'k_proj', c.qkv_bias),
               'self_attn.v_proj': ('attn', 'v_proj', c.qkv_bias),
               'self_attn.o_proj': ('attn', 'o_proj', c.attn_out_bias),
               'mlp.gate_proj': ('mlp', 'gate_proj', c.mlp_bias),
               'mlp.up_proj': ('mlp', 'up_proj', c.mlp_bias),
               'mlp.down_proj': ('mlp', 'down_proj', c.mlp_bias)}
    for name, (group, proj, bias) in linears.items():
      out.append((f'{hf_layer}{name}.weight', (ours + (group, proj, 'kernel'),), 'linear'))
      if bias:
        out.append((f'{hf_layer}{name}.bias', (ours + (group, proj, 'bias'),), 'copy'))
    norms = {'input_layernorm': ('input_norm',), 'post_attention_layernorm': ('post_attn_norm',)}
    if c.sandwich_norm:  # Gemma 2's names: the norm before the MLP is the pre-feedforward one
      norms = {'input_layernorm': ('input_norm',), 'post_attention_layernorm': ('attn_out_norm',),
               'pre_feedforward_layernorm': ('post_attn_norm',),
               'post_feedforward_layernorm': ('mlp_out_norm',)}
    if c.qk_norm:
      norms.update({'self_attn.q_norm': ('attn', 'q_norm'), 'self_attn.k_norm': ('attn', 'k_norm')})
    for name, path in norms.items():
      out.append((f'{hf_layer}{name}.weight', (ours + path + ('scale',),), 'copy'))
  if not c.tie_embeddings:
    out.append(('lm_head.weight', (('lm_head', 'kernel'),), 'linear'))
  return out


def _gpt2_names(c: DecoderConfig):
  out = [('transformer.wte.weight', (('embed', 'embedding'),), 'copy'),
         ('transformer.wpe.weight', (('pos_embed', 'embedding'),), 'copy'),
         ('transformer.ln_f.weight', (('final_norm', 'scale'),), 'copy'),
         ('transformer.ln_f.bias', (('final_norm', 'bias'),), 'copy')]
  for i in range(c.num_layers):
    hf_layer, ours = f'transformer.h.{i}.', (f'layers_{i}',)
    qkv = [ours + ('attn', p) for p in ('q_proj', 'k_proj', 'v_proj')]
    out += [(f'{hf_layer}attn.c_attn.weight', tuple(p + ('kernel',) for p in qkv), 'fused'),
            (f'{hf_layer}attn.c_attn.bias', tuple(p + ('bias',) for p in qkv), 'fused')]
    for name, path in {'attn.c_proj': ('attn', 'o_proj'), 'mlp.c_fc': ('mlp', 'up_proj'),
                       'mlp.c_proj': ('mlp', 'down_proj')}.items():
      out += [(f'{hf_layer}{name}.weight', (ours + path + ('kernel',),), 'copy'),
              (f'{hf_layer}{name}.bias', (ours + path + ('bias',),), 'copy')]
    for name, path in {'ln_1': ('input_norm',), 'ln_2': ('post_attn_norm',)}.items():
      out += [(f'{hf_layer}{name}.weight', (ours + path + ('scale',),), 'copy'),
              (f'{hf_layer}{name}.bias', (ours + path + ('bias',),), 'copy')]
  if not c.tie_embeddings:
    out.append(('lm_head.weight', (('lm_head', 'kernel'),), 'linear'))
  return out


def _prefix(c: DecoderConfig) -> str:
  return 'transformer.' if c.model_type == 'gpt2' else 'model.'


@functools.lru_cache(maxsize=16)
def _shapes(c: DecoderConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  tree = jax.eval_shape(functools.partial(decoder_lib.init_params, c), jax.random.key(0))
  return {tuple(k.key for k in path): leaf.shape
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree['params'])[0]}


def params_from_hf(tensors: dict[str, np.ndarray], c: DecoderConfig) -> dict[str, Any]:
  """Our variables {'params': ...} from a transformers state dict (numpy arrays)."""
  prefix = _prefix(c)
  # Base-model checkpoints (e.g. the original gpt2) have no 'model.'/'transformer.' prefix.
  tensors = {k if k.startswith(prefix) or k == 'lm_head.weight' else prefix + k: v
             for k, v in tensors.items()}
  shapes, params, missing, used = _shapes(c), {}, [], set()
  for name, paths, kind in _name_map(c):
    if name not in tensors:
      missing.append(name)
      continue
    used.add(name)
    x = tensors[name]
    parts = (np.split(x, 3, axis=-1) if kind == 'fused'
             else [x.T if kind == 'linear' else x])
    for path, part in zip(paths, parts):
      if part.shape != shapes[path]:
        raise ValueError(f'{name} has shape {x.shape}, which does not fit {"/".join(path)} '
                         f'{shapes[path]} of the config read from config.json.')
      io.set_path(params, path, part)
  unexpected = sorted(k for k in set(tensors) - used if not k.endswith(_BUFFER_SUFFIXES)
                      and not (k == 'lm_head.weight' and c.tie_embeddings))
  if missing or unexpected:
    raise ValueError(f'the {c.model_type} checkpoint does not match its config: missing '
                     f'{missing[:8]}{"..." if len(missing) > 8 else ""}, unexpected '
                     f'{unexpected[:8]}{"..." if len(unexpected) > 8 else ""}. A feature kd '
                     'does not model (extra biases or norms) also shows up here.')
  return {'params': params}


def params_to_hf(variables: dict[str, Any], c: DecoderConfig) -> dict[str, np.ndarray]:
  """transformers' state dict names -> numpy arrays (bfloat16 via ml_dtypes) for safetensors."""
  _check_exportable(c)
  params = variables['params']

  def get(path):
    node = params
    for key in path:
      node = node[key]
    return np.asarray(node)

  out = {}
  for name, paths, kind in _name_map(c):
    if kind == 'fused':
      out[name] = np.concatenate([get(p) for p in paths], axis=-1)
    else:
      x = get(paths[0])
      out[name] = x.T if kind == 'linear' else x
  return out


for _model_type in ARCHITECTURES:
  hf.register(hf.Family(model_type=_model_type, config_from_hf=config_from_hf,
                        module=decoder_lib.Decoder, params_from_hf=params_from_hf,
                        params_to_hf=params_to_hf, config_to_hf=config_to_hf))
