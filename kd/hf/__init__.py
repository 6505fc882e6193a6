"""Hugging Face checkpoints in and out: `kd.hf.load(path)` and `kd.hf.save(model, path)`.

A family is a `Family` record in `FAMILIES`, keyed by the `model_type` of `config.json`:
  config_from_hf(hf_config: dict) -> our model config
  module(config) -> the flax module
  params_from_hf(tensors: {name: np.ndarray}, config) -> variables {'params': ...}
  params_to_hf(variables, config) -> {name: np.ndarray}
  config_to_hf(config) -> dict for config.json (with model_type and architectures)
  extra_files(config, path) -> None, optional: more files for `save` (e.g. sentence-transformers)
Weights come from safetensors only; `trust_remote_code` is never used.
"""

import dataclasses
import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from kd.hf import io
from kd.hf.vocab import check_same_tokenizer, shared_vocab_rows, vocab_rows
from kd.models.model import Model


@dataclasses.dataclass(frozen=True)
class Family:
  model_type: str
  config_from_hf: Callable[[dict], Any]
  module: Callable[[Any], Any]
  params_from_hf: Callable[[dict, Any], dict]
  params_to_hf: Callable[[dict, Any], dict]
  config_to_hf: Callable[[Any], dict]
  extra_files: Callable[[Any, str], None] | None = None


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
  FAMILIES[family.model_type] = family
  return family


def family_for(hf_config: dict) -> Family:
  model_type = hf_config.get('model_type')
  if model_type not in FAMILIES:
    raise ValueError(f'unsupported model_type {model_type!r}; kd supports: '
                     f'{", ".join(sorted(FAMILIES))}. Add a Family to kd.hf.FAMILIES for it.')
  return FAMILIES[model_type]


def read_config(path: str) -> dict:
  if not os.path.isdir(path):
    raise FileNotFoundError(f'{path} is not a directory: kd.hf.load reads a local directory '
                            'written by save_pretrained (download it first, e.g. with '
                            'huggingface_hub.snapshot_download).')
  file = os.path.join(path, 'config.json')
  if not os.path.exists(file):
    raise FileNotFoundError(f'no config.json in {path}: expected a directory written by '
                            'transformers save_pretrained (config.json + model.safetensors).')
  with open(file) as f:
    return json.load(f)


def load_tokenizer(path: str):
  """The tokenizer saved beside the weights, through transformers; None when there is none."""
  if not any(os.path.exists(os.path.join(path, f))
             for f in ('tokenizer.json', 'tokenizer_config.json', 'vocab.txt')):
    return None
  import transformers  # pylint: disable=g-import-not-at-top
  return transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=False)


def load(path: str, dtype=None, *, tokenizer: bool = True) -> Model:
  """Reads config.json + safetensors in `path` into a `Model` (float32 params by default)."""
  hf_config = read_config(path)
  family = family_for(hf_config)
  config = family.config_from_hf(hf_config)
  if dtype is not None:
    name = jnp.dtype(dtype).name
    config = dataclasses.replace(config, dtype=name, param_dtype=name)
  variables = family.params_from_hf(io.read_tensors(path), config)
  param_dtype = jnp.dtype(getattr(config, 'param_dtype', 'float32'))
  variables = jax.tree.map(lambda x: jnp.asarray(x, param_dtype), variables)
  return Model(module=family.module(config), params=variables,
               tokenizer=load_tokenizer(path) if tokenizer else None, source=path)


def save(model: Model, path: str) -> None:
  """Writes config.json + model.safetensors (+ the tokenizer when known) for from_pretrained."""
  family = FAMILIES[model_type_of(model.config)]
  os.makedirs(path, exist_ok=True)
  tensors = family.params_to_hf(jax.device_get(model.params), model.config)
  io.write_tensors(tensors, path)
  hf_config = family.config_to_hf(model.config)
  for key in ('bos_token_id', 'eos_token_id', 'pad_token_id'):  # so generate() knows them
    value = getattr(model.tokenizer, key, None)
    if value is not None:
      hf_config.setdefault(key, value)
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump(hf_config, f, indent=2, sort_keys=True)
  if family.extra_files is not None:
    family.extra_files(model.config, path)
  if model.tokenizer is not None:
    model.tokenizer.save_pretrained(path)


def model_type_of(config) -> str:
  """The HF model_type a kd config was built for (configs carry it as `model_type`)."""
  model_type = getattr(config, 'model_type', None)
  if model_type not in FAMILIES:
    raise ValueError(f'cannot export a model whose config has model_type={model_type!r}; '
                     f'exportable: {", ".join(sorted(FAMILIES))}')
  return model_type


# Importing the family modules registers them.
from kd.hf import bert  # pylint: disable=g-import-not-at-top,wrong-import-position
from kd.hf import decoders  # pylint: disable=g-import-not-at-top,wrong-import-position
