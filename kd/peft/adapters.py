"""Bottleneck adapters, prefix tuning and prompt tuning for kd's Decoder (adapters and prefix
tuning for the Encoder too).

The Decoder builds them from three DecoderConfig fields (0 = off): `adapter_size`
('layers_{i}/attn_adapter', 'layers_{i}/mlp_adapter'), `prefix_len` ('layers_{i}/attn/prefix_k',
'prefix_v') and `prompt_len` ('prompt'); the Encoder has `adapter_size` and `prefix_len`, at the
same paths.
This module selects their params by path, and grows a trained base into a PEFT student:

  cfg, variables = add_peft_params(base_cfg, base_vars, 'adapter', 16, rng)
  trainable, frozen = split('adapter', variables)
  out = Decoder(cfg).apply(combine(trainable, frozen), ids)

Train `trainable` only and pass `frozen` into the step as an argument, as with kd.peft.lora.
Unlike LoRA, whose delta `kd.peft.lora.merge` folds into the base kernels, these add computation
the base architecture has no slot for, so they cannot be merged: the exported student keeps the
extended config; kd.hf.save writes the base as a transformers checkpoint and these params beside
it (kd.hf.load reads both back). `strip` drops them again, giving the base tree (and the base
model's behaviour) back.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterable

import flax
import jax
import jax.numpy as jnp

from kd.models import decoder as decoder_lib
from kd.models import encoder as encoder_lib
from kd.peft import trees

# Method -> the substring that marks its params in a path.
PEFT_PARAM_MARKERS = {'adapter': 'adapter', 'prefix': 'prefix', 'prompt': 'prompt'}
# Method -> the DecoderConfig (and EncoderConfig, where it has it) field that sizes it.
CONFIG_FIELDS = {'adapter': 'adapter_size', 'prefix': 'prefix_len', 'prompt': 'prompt_len'}
PROMPT_INITS = ('vocab', 'random')


def _markers(method: str | Iterable[str]) -> tuple[str, ...]:
  methods = (method,) if isinstance(method, str) else tuple(method)
  bad = [m for m in methods if m not in PEFT_PARAM_MARKERS]
  if bad or not methods:
    raise ValueError(f'PEFT method {method!r} is not supported; use one of '
                     f'{sorted(PEFT_PARAM_MARKERS)} (or a tuple of them).')
  return tuple(PEFT_PARAM_MARKERS[m] for m in methods)


def is_trainable(method: str | Iterable[str], path_tuple: tuple[Any, ...]) -> bool:
  """Whether a flattened variables path belongs to `method` (a name or a tuple of names)."""
  return any(marker in str(part) for marker in _markers(method) for part in path_tuple)


def split(method: str | Iterable[str], variables) -> tuple[dict, dict]:
  """{'params': ...} -> (the method's params, everything else), both nested dicts."""
  markers = _markers(method)
  return trees.split_by(lambda k: any(m in str(part) for m in markers for part in k), variables)


combine = trees.combine  # the inverse of `split`; raises if the two trees share a path


def strip(method: str | Iterable[str], variables) -> dict:
  """The base tree: `variables` without the method's params.

  Pair it with the config's field set back to 0 (e.g. dataclasses.replace(cfg, adapter_size=0));
  the result is the base model, not a merge: what the PEFT params learned is dropped.
  """
  return split(method, variables)[1]


def _shapes(tree) -> dict:
  return {'/'.join(k): (tuple(v.shape), jnp.dtype(v.dtype))
          for k, v in flax.traverse_util.flatten_dict(tree).items()}


def init_variables(config, rng):
  """The variables of a Decoder or an Encoder of `config` (their own random init)."""
  if isinstance(config, encoder_lib.EncoderConfig):
    return encoder_lib.init_encoder_params(config, rng)
  return decoder_lib.init_params(config, rng)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _init_new(config, method, rng):
  return split(method, init_variables(config, rng))[0]


def add_peft_params(model_config: decoder_lib.DecoderConfig | encoder_lib.EncoderConfig,
                    base_variables, method: str, size: int, rng, *, prompt_init: str = 'vocab'):
  """(the config with the method's field = size, base variables plus the new params).

  The base leaves are passed through unchanged. New params: adapters as the Decoder initialises
  them (`up` zero, so the model still equals the base), prefix keys/values normal(0.02), and the
  prompt as embedding rows of `size` random vocabulary tokens (Lester et al.'s sampled-vocab
  init; prompt_init='random' for normal(0.02)). Initialised under jit with only the new params
  as outputs, so the base model's own init is compiled away.
  """
  if not isinstance(method, str):
    raise ValueError(f'add_peft_params adds one method at a time, got {method!r}; call it once '
                     'per method.')
  (marker,) = _markers(method)
  field = CONFIG_FIELDS[method]
  if not hasattr(model_config, field):
    raise ValueError(f'{method} tuning is a Decoder field ({field}); an Encoder takes '
                     "method='adapter' or 'prefix' (or LoRA, kd.peft.lora).")
  if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
    raise ValueError(f'{method} size must be a positive int ({field}), got {size!r}.')
  if getattr(model_config, field):
    raise ValueError(f'the config already has {field}={getattr(model_config, field)}; '
                     f'strip({method!r}, ...) and set {field}=0 first, or keep training it.')
  if prompt_init not in PROMPT_INITS:
    raise ValueError(f'prompt_init={prompt_init!r}; valid: {list(PROMPT_INITS)}.')
  want = _shapes(jax.eval_shape(functools.partial(init_variables, model_config), rng))
  got = _shapes(base_variables)
  if got != want:
    diff = sorted(set(got.items()) ^ set(want.items()))
    raise ValueError(f'base_variables do not match model_config (differences, path -> (shape, '
                     f'dtype): {diff[:6]}); pass the variables of a model of model_config.')
  config = dataclasses.replace(model_config, **{field: size})
  new = _init_new(config, method, rng)
  if method == 'prompt' and prompt_init == 'vocab':
    table = base_variables['params']['embed']['embedding']
    ids = jax.random.randint(jax.random.fold_in(rng, 1), (size,), 0, table.shape[0])
    new['params'][marker] = jnp.asarray(table[ids], new['params'][marker].dtype)
  return config, combine(new, base_variables)
