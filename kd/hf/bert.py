"""BERT-family checkpoints (BERT, MiniLM, sentence-transformers encoders): names and config.

Reads `BertModel` safetensors and those of its task models (`bert.` prefix: BertForMaskedLM,
BertForSequenceClassification, ...; their heads are ignored). Writes a plain `BertModel` that
transformers loads with nothing missing, plus the sentence-transformers files (modules.json,
pooling config) so `SentenceTransformer(path)` gives the same embeddings as `kd.eval.sts.encode`.
"""

import json
import logging
import os

import numpy as np

from kd import hf
from kd.hf import io
from kd.models import encoder as encoder_lib

# HF name stem -> (our module path, is_linear). Linear weights are stored [out, in] by torch.
_EMBED = {
    'embeddings.word_embeddings': ('word_embed',),
    'embeddings.position_embeddings': ('position_embed',),
    'embeddings.token_type_embeddings': ('token_type_embed',),
}
_NORMS = {'embeddings.LayerNorm': ('embed_norm',)}
_LAYER_LINEAR = {
    'attention.self.query': ('attn', 'q_proj'),
    'attention.self.key': ('attn', 'k_proj'),
    'attention.self.value': ('attn', 'v_proj'),
    'attention.output.dense': ('attn', 'o_proj'),
    'intermediate.dense': ('up_proj',),
    'output.dense': ('down_proj',),
}
_LAYER_NORMS = {'attention.output.LayerNorm': ('attn_norm',), 'output.LayerNorm': ('mlp_norm',)}
_POOLER = 'pooler.dense'
# Checkpoint entries that are not encoder weights: buffers and task heads.
_IGNORED_PREFIXES = ('embeddings.position_ids', 'cls.', 'classifier.', 'qa_outputs.')


def _name_map(config):
  """Yields (hf_name, our param path tuple, transpose) for every tensor of `config`."""
  for stem, path in _EMBED.items():
    yield f'{stem}.weight', path + ('embedding',), False
  linears, norms = {}, dict(_NORMS)
  for i in range(config.num_layers):
    linears.update({f'encoder.layer.{i}.{k}': (f'layers_{i}',) + v for k, v in _LAYER_LINEAR.items()})
    norms.update({f'encoder.layer.{i}.{k}': (f'layers_{i}',) + v for k, v in _LAYER_NORMS.items()})
  if config.add_pooler:
    linears[_POOLER] = ('pooler',)
  for stem, path in norms.items():
    yield f'{stem}.weight', path + ('scale',), False
    yield f'{stem}.bias', path + ('bias',), False
  for stem, path in linears.items():
    yield f'{stem}.weight', path + ('kernel',), True
    yield f'{stem}.bias', path + ('bias',), False


def config_from_hf(c: dict) -> encoder_lib.EncoderConfig:
  act = c.get('hidden_act', 'gelu')
  if act != 'gelu':
    raise ValueError(f'hidden_act={act!r}: kd.models.Encoder implements the exact (erf) GELU '
                     "that transformers calls 'gelu' only.")
  pos = c.get('position_embedding_type', 'absolute')
  if pos != 'absolute':
    raise ValueError(f"position_embedding_type={pos!r}: only 'absolute' is supported.")
  if c.get('is_decoder') or c.get('add_cross_attention'):
    raise ValueError('a BERT decoder / cross-attention checkpoint is not an encoder; kd cannot '
                     'load it as one.')
  return encoder_lib.EncoderConfig(
      vocab_size=c['vocab_size'], hidden_size=c['hidden_size'],
      num_layers=c['num_hidden_layers'], num_heads=c['num_attention_heads'],
      intermediate_size=c['intermediate_size'],
      max_position_embeddings=c.get('max_position_embeddings', 512),
      type_vocab_size=c.get('type_vocab_size', 2), layer_norm_eps=c.get('layer_norm_eps', 1e-12),
      model_type='bert', add_pooler=True)  # BertModel's default add_pooling_layer=True


def config_to_hf(config) -> dict:
  return {
      'architectures': ['BertModel'], 'model_type': 'bert',
      'vocab_size': config.vocab_size, 'hidden_size': config.hidden_size,
      'num_hidden_layers': config.num_layers, 'num_attention_heads': config.num_heads,
      'intermediate_size': config.intermediate_size, 'hidden_act': 'gelu',
      'max_position_embeddings': config.max_position_embeddings,
      'type_vocab_size': config.type_vocab_size, 'layer_norm_eps': config.layer_norm_eps,
      'position_embedding_type': 'absolute', 'pad_token_id': 0, 'initializer_range': 0.02,
      'hidden_dropout_prob': 0.1, 'attention_probs_dropout_prob': 0.1,
  }


def _strip(tensors: dict) -> dict:
  """Drops a task model's `bert.` prefix and renames old `gamma`/`beta` LayerNorm names."""
  if 'embeddings.word_embeddings.weight' not in tensors:
    if 'bert.embeddings.word_embeddings.weight' not in tensors:
      raise ValueError('not a BERT checkpoint: no embeddings.word_embeddings.weight (with or '
                       'without a bert. prefix).')
    tensors = {k[len('bert.'):] if k.startswith('bert.') else k: v for k, v in tensors.items()}
  renamed = {}
  for k, v in tensors.items():
    if 'LayerNorm.' in k:
      k = k.replace('LayerNorm.gamma', 'LayerNorm.weight').replace('LayerNorm.beta', 'LayerNorm.bias')
    renamed[k] = v
  return renamed


def params_from_hf(tensors: dict, config) -> dict:
  tensors = _strip(tensors)
  shapes = encoder_lib.param_shapes(config)['params']
  params, missing, used = {}, [], set()
  for name, path, transpose in _name_map(config):
    leaf = shapes
    for key in path:
      leaf = leaf[key]
    if name not in tensors:
      if name.startswith(_POOLER):  # e.g. BertForMaskedLM has no pooler; transformers would
        logging.warning('%s is not in the checkpoint; set to zeros (kd never uses it).', name)
        value = np.zeros(leaf.shape, np.float32)  # ... initialise it randomly.
      else:
        missing.append(name)
        continue
    else:
      used.add(name)
      value = np.asarray(tensors[name])
      value = value.T if transpose else value
    if value.shape != leaf.shape:
      raise ValueError(f'{name} has shape {value.shape} (after transposing linear weights); the '
                       f'config expects {leaf.shape}. Is config.json from the same checkpoint?')
    io.set_path(params, path, value)
  if missing:
    raise ValueError(f'BERT checkpoint lacks {len(missing)} tensors, e.g. {missing[:5]}; the '
                     f'config asks for {config.num_layers} layers.')
  unused = sorted(set(tensors) - used)
  unknown = [k for k in unused if not k.startswith(_IGNORED_PREFIXES + (_POOLER,))]
  if unknown:
    raise ValueError(f'BERT checkpoint has {len(unknown)} tensors kd does not know, e.g. '
                     f'{unknown[:5]}: more layers than config.json says, or not a BertModel.')
  if unused:
    logging.info('kd.hf.bert: ignoring %d non-encoder tensors (task heads, buffers): %s',
                 len(unused), unused[:8])
  return {'params': params}


def params_to_hf(variables, config) -> dict:
  if config.adapter_size or config.prefix_len:  # BertModel has no place for them
    raise ValueError(f'adapter_size={config.adapter_size}, prefix_len={config.prefix_len}: '
                     'adapters and prefixes have no place in a BERT checkpoint; kd.hf.save '
                     'writes them beside it (kd_peft.safetensors), or train a LoRA student '
                     '(merged into the base on export)')
  params = variables['params']
  out = {}
  for name, path, transpose in _name_map(config):
    value = params
    for key in path:
      value = value[key]
    value = np.asarray(value)
    out[name] = value.T if transpose else value
  return out


def sentence_transformers_files(config, path: str) -> None:
  """modules.json, the pooling config and sentence_bert_config.json for SentenceTransformer(path).

  The embedding is the pooled hidden state without normalisation, as `kd.models.encoder.pool`.
  Written with the long-standing `pooling_mode_*` keys that every sentence-transformers reads.
  """
  modules = [
      {'idx': 0, 'name': '0', 'path': '', 'type': 'sentence_transformers.models.Transformer'},
      {'idx': 1, 'name': '1', 'path': '1_Pooling', 'type': 'sentence_transformers.models.Pooling'},
  ]
  pooling = {'word_embedding_dimension': config.hidden_size,
             'pooling_mode_cls_token': config.pooling == 'cls',
             'pooling_mode_mean_tokens': config.pooling == 'mean',
             'pooling_mode_max_tokens': False, 'pooling_mode_mean_sqrt_len_tokens': False}
  files = {'modules.json': modules, os.path.join('1_Pooling', 'config.json'): pooling,
           'sentence_bert_config.json': {'max_seq_length': config.max_position_embeddings,
                                         'do_lower_case': False}}
  os.makedirs(os.path.join(path, '1_Pooling'), exist_ok=True)
  for name, content in files.items():
    with open(os.path.join(path, name), 'w') as f:
      json.dump(content, f, indent=2)


FAMILY = hf.register(hf.Family(
    model_type='bert', config_from_hf=config_from_hf, module=encoder_lib.Encoder,
    params_from_hf=params_from_hf, params_to_hf=params_to_hf, config_to_hf=config_to_hf,
    extra_files=sentence_transformers_files))
