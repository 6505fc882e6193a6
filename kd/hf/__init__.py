"""Hugging Face checkpoints in and out: `kd.hf.load(path)` and `kd.hf.save(model, path)`.

A family is a `Family` record in `FAMILIES`, keyed by the `model_type` of `config.json`:
  config_from_hf(hf_config: dict) -> our model config
  module(config) -> the flax module
  params_from_hf(tensors: {name: np.ndarray}, config) -> variables {'params': ...}
  params_to_hf(variables, config) -> {name: np.ndarray}
  config_to_hf(config) -> dict for config.json (with model_type and architectures)
  extra_files(config, path) -> None, optional: more files for `save` (e.g. sentence-transformers)
Weights come from safetensors only; `trust_remote_code` is never used.

A student with bottleneck adapters, prefix tuning or a soft prompt (the configs' adapter_size,
prefix_len, prompt_len; kd.peft.adapters) has params no transformers architecture holds. `save`
writes its base as the family's checkpoint (what transformers loads: the base model, without
them) and the PEFT params beside it in kd_peft.safetensors, with their sizes under "kd_peft" in
config.json; `load` reads both back into the PEFT model. (LoRA needs none of this: it is merged
into the base before export.)
"""

import dataclasses
import json
import os
from typing import Any, Callable

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from kd import models
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


PEFT_FILE = 'kd_peft.safetensors'
PEFT_KEY = 'kd_peft'  # config.json: {config field: size} of the params in PEFT_FILE


def _peft_fields(config) -> dict[str, int]:
  from kd.peft import adapters  # pylint: disable=g-import-not-at-top
  return {f: getattr(config, f) for f in adapters.CONFIG_FIELDS.values()
          if getattr(config, f, 0)}


def split_peft(config, variables):
  """(base config, base variables, {field: size}, PEFT params as {'a/b/c': array}) of a model;
  the last two are empty for a model without adapters, prefixes or prompts."""
  from kd.peft import adapters  # pylint: disable=g-import-not-at-top
  fields = _peft_fields(config)
  if not fields:
    return config, variables, {}, {}
  methods = [m for m, f in adapters.CONFIG_FIELDS.items() if f in fields]
  peft_params, base = adapters.split(methods, variables)
  flat = {'/'.join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(peft_params).items()}
  return dataclasses.replace(config, **{f: 0 for f in fields}), base, fields, flat


def _with_peft(path: str, hf_config: dict, config, variables):
  """(config, variables) with the PEFT params that `save` wrote beside the base, if any."""
  from kd.peft import adapters  # pylint: disable=g-import-not-at-top
  fields = hf_config.get(PEFT_KEY)
  if not fields:
    return config, variables
  file = os.path.join(path, PEFT_FILE)
  if not os.path.exists(file):
    raise FileNotFoundError(f'config.json in {path} names PEFT params {fields} but {PEFT_FILE} '
                            'is missing; copy it from where the model was saved, or delete '
                            f'"{PEFT_KEY}" from config.json to load the base model alone.')
  try:
    config = dataclasses.replace(config, **fields)
  except (TypeError, ValueError) as e:
    raise ValueError(f'config.json "{PEFT_KEY}"={fields} does not fit a {type(config).__name__}: '
                     f'{e}') from None
  peft_params = {}
  for name, value in safetensors.numpy.load_file(file).items():
    io.set_path(peft_params, tuple(name.split('/')), value)
  variables = adapters.combine(peft_params, variables)
  shapes = lambda tree: {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(tree).items()}
  want = jax.eval_shape(lambda: adapters.init_variables(config, jax.random.key(0)))
  if shapes(want) != shapes(variables):
    raise ValueError(f'{file} does not match config.json "{PEFT_KEY}"={fields}: its params have '
                     'other names or shapes than that model; save the model again with '
                     'kd.hf.save.')
  return config, variables


def load(path: str, dtype=None, *, tokenizer: bool = True, scan_layers: bool = False) -> Model:
  """Reads config.json + safetensors in `path` into a `Model` (float32 params by default), with
  the PEFT params of kd_peft.safetensors when `save` wrote them. `scan_layers`: a decoder with
  DecoderConfig.scan_layers and its params stacked (kd.models.stack_layers). A `.gguf` file is
  read by kd.hf.gguf.load."""
  if os.fspath(path).endswith('.gguf') and not os.path.isdir(path):
    from kd.hf import gguf  # pylint: disable=g-import-not-at-top
    return gguf.load(path, dtype, tokenizer=tokenizer, scan_layers=scan_layers)
  hf_config = read_config(path)
  family = family_for(hf_config)
  config = family.config_from_hf(hf_config)
  variables = family.params_from_hf(io.read_tensors(path), config)
  config, variables = _with_peft(path, hf_config, config, variables)
  return as_model(family, config, variables, path, dtype=dtype, scan_layers=scan_layers,
                  tokenizer=load_tokenizer(path) if tokenizer else None)


def as_model(family: Family, config, variables, path: str, *, dtype=None,
             scan_layers: bool = False, tokenizer=None) -> Model:
  """The `Model` of a checkpoint's config and numpy variables: params as jax arrays of the
  config's param dtype (or `dtype`, which sets compute too), layers stacked with scan_layers."""
  if dtype is not None:
    name = jnp.dtype(dtype).name
    config = dataclasses.replace(config, dtype=name, param_dtype=name)
  param_dtype = jnp.dtype(getattr(config, 'param_dtype', 'float32'))
  variables = jax.tree.map(lambda x: jnp.asarray(x, param_dtype), variables)
  if scan_layers:
    if not hasattr(config, 'scan_layers'):
      raise ValueError(f'scan_layers=True is a decoder option; {path} holds a '
                       f'{type(config).__name__}. Load it with scan_layers=False.')
    config = dataclasses.replace(config, scan_layers=True)
    variables = models.stack_layers(variables)
  return Model(module=family.module(config), params=variables, tokenizer=tokenizer, source=path)


def save(model: Model, path: str) -> None:
  """Writes config.json + model.safetensors (+ the tokenizer when known) for from_pretrained;
  a PEFT model's adapter / prefix / prompt params go to kd_peft.safetensors (module docstring)."""
  family = FAMILIES[model_type_of(model.config)]
  config, params = model.config, jax.device_get(model.params)
  if getattr(config, 'scan_layers', False):  # checkpoints name each layer
    config, params = dataclasses.replace(config, scan_layers=False), models.unstack_layers(params)
  config, params, fields, peft_tensors = split_peft(config, params)
  os.makedirs(path, exist_ok=True)
  tensors = family.params_to_hf(params, config)
  io.write_tensors(tensors, path)
  stale = os.path.join(path, PEFT_FILE)
  if peft_tensors:
    io.save_file(peft_tensors, stale)
  elif os.path.exists(stale):  # a PEFT model saved here before
    os.remove(stale)
  hf_config = family.config_to_hf(config)
  if fields:
    hf_config[PEFT_KEY] = fields
  for key in ('bos_token_id', 'eos_token_id', 'pad_token_id'):  # so generate() knows them
    value = getattr(model.tokenizer, key, None)
    if value is not None:
      hf_config.setdefault(key, value)
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump(hf_config, f, indent=2, sort_keys=True)
  if family.extra_files is not None and not fields:  # (they would load the base alone)
    family.extra_files(config, path)
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
