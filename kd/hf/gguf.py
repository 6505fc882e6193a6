"""GGUF decoder checkpoints (llama.cpp's format) in, without torch: `load(path)`, `read_tokenizer`.

A GGUF file holds the config as metadata, the weights (often quantized) and the tokenizer. The
metadata become a transformers config.json dict and the tensors, dequantized to float32 by the
`gguf` package, get transformers' names and [out, in] layout; kd.hf.decoders does the rest, as
for a safetensors checkpoint. llama.cpp stores llama's q and k rows permuted for its interleaved
rotary layout (convert_hf_to_gguf's `permute`); that is undone here (qwen2/qwen3 are stored as
they are). Only what kd runs exactly is read: llama, qwen2, qwen3 without rope scaling, and
byte-level BPE tokenizers; anything else is a ValueError that says so.
"""

import math
import os
import re

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer
from tokenizers import decoders, models as tok_models, pre_tokenizers, processors

from kd import hf
from kd.models.model import Model

try:
  import gguf  # llama.cpp's gguf-py: parses the file and dequantizes in numpy
except ImportError as e:  # pragma: no cover
  raise ImportError('kd.hf.gguf reads GGUF files with the `gguf` package: pip install gguf') from e

ARCHITECTURES = ('llama', 'qwen2', 'qwen3')
_HINT = ('load the Hugging Face checkpoint directory (config.json + safetensors) with kd.hf.load '
         'instead')

# GGUF tensor names -> transformers state-dict names.
_GLOBAL = {'token_embd': 'model.embed_tokens', 'output_norm': 'model.norm', 'output': 'lm_head'}
_LAYER = {'attn_q': 'self_attn.q_proj', 'attn_k': 'self_attn.k_proj',
          'attn_v': 'self_attn.v_proj', 'attn_output': 'self_attn.o_proj',
          'attn_q_norm': 'self_attn.q_norm', 'attn_k_norm': 'self_attn.k_norm',
          'ffn_gate': 'mlp.gate_proj', 'ffn_up': 'mlp.up_proj', 'ffn_down': 'mlp.down_proj',
          'attn_norm': 'input_layernorm', 'ffn_norm': 'post_attention_layernorm'}
_BLOCK = re.compile(r'blk\.(\d+)\.(\w+)\.(weight|bias)')

# tokenizer.ggml.pre -> the regex that splits text before byte-level BPE (None: GPT-2's own).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {'default': None, 'gpt2': None, 'smollm': None,
                  'llama-bpe': _LLAMA3_SPLIT, 'llama3': _LLAMA3_SPLIT, 'llama-v3': _LLAMA3_SPLIT,
                  'smaug-bpe': _LLAMA3_SPLIT, 'qwen2': _QWEN2_SPLIT}
# llama.cpp's Llama-3 vocabularies take a word that is in the vocabulary whole, without merges
# (Meta's tokenizer.json says ignore_merges too), and add BOS unless the file says otherwise.
_LLAMA3 = ('llama-bpe', 'llama3', 'llama-v3')
_CONTROL, _USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values


def _open(path: str):
  """(reader, metadata {key: python value}) of a GGUF file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'no GGUF file at {path}')
  try:
    reader = gguf.GGUFReader(path)
  except (ValueError, IndexError) as e:  # 'GGUF magic invalid', a truncated file, ...
    raise ValueError(f'{path} is not a readable GGUF file, or a truncated one ({e}); pass a '
                     f'complete .gguf file written by llama.cpp, or {_HINT}.') from None
  meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith('GGUF.')}
  return reader, meta


# ----------------------------------------------------------------------------- config


def config_from_gguf(meta: dict, tensor_names, path: str) -> dict:
  """A transformers config.json dict for the model this metadata describes."""
  arch = meta.get('general.architecture')
  if arch not in ARCHITECTURES:
    raise ValueError(f'{path}: GGUF architecture {arch!r} is not supported by kd.hf.gguf '
                     f'(supported: {", ".join(ARCHITECTURES)}); {_HINT}.')
  missing = object()

  def get(key, default=missing):
    value = meta.get(f'{arch}.{key}', default)
    if value is missing:
      raise ValueError(f'{path} lacks the metadata key {arch}.{key} that a {arch} model needs; '
                       f'the file is incomplete: convert it again, or {_HINT}.')
    if isinstance(value, list):
      raise ValueError(f'{path}: {arch}.{key} differs per layer ({value[:4]}...), which kd\'s '
                       f'decoder cannot express; {_HINT}.')
    return value

  names = set(tensor_names)
  scaling = get('rope.scaling.type', 'none')
  factor = get('rope.scaling.factor', get('rope.scale_linear', 1.0))
  if scaling != 'none' or factor not in (0.0, 1.0) or 'rope_freqs.weight' in names:
    what = ('a rope_freqs.weight tensor' if 'rope_freqs.weight' in names
            else f'rope scaling {scaling!r} (factor {factor})')
    raise ValueError(f'{path} uses {what}; kd.hf.gguf does not read GGUF rope scaling (it would '
                     f'be silently wrong): {_HINT}.')
  if get('expert_count', 0):
    raise ValueError(f'{path} is a mixture of experts ({get("expert_count")} experts), which kd\'s '
                     'decoder does not model.')
  hidden, heads = int(get('embedding_length')), int(get('attention.head_count'))
  head_dim = int(get('attention.key_length', hidden // heads))
  if int(get('attention.value_length', head_dim)) != head_dim:
    raise ValueError(f'{path}: key_length {head_dim} != value_length '
                     f'{get("attention.value_length")}; kd\'s attention has one head_dim.')
  if int(get('rope.dimension_count', head_dim)) != head_dim:
    raise ValueError(f'{path}: rope on {get("rope.dimension_count")} of {head_dim} head '
                     'dimensions (partial rotary) is not supported by kd.')
  vocab = get('vocab_size', None) or len(meta.get('tokenizer.ggml.tokens') or ())
  if not vocab:
    raise ValueError(f'{path} states no vocabulary size ({arch}.vocab_size nor '
                     'tokenizer.ggml.tokens); convert it again with llama.cpp.')
  out = dict(model_type=arch, vocab_size=int(vocab), hidden_size=hidden,
             intermediate_size=int(get('feed_forward_length')),
             num_hidden_layers=int(get('block_count')), num_attention_heads=heads,
             num_key_value_heads=int(get('attention.head_count_kv', heads)), head_dim=head_dim,
             rms_norm_eps=float(get('attention.layer_norm_rms_epsilon')),
             rope_theta=float(get('rope.freq_base', 10000.0)),
             max_position_embeddings=int(get('context_length')), hidden_act='silu',
             tie_word_embeddings='output.weight' not in names)
  if arch in ('llama', 'qwen3'):
    out['attention_bias'] = 'blk.0.attn_q.bias' in names
  if arch == 'llama':
    out['mlp_bias'] = 'blk.0.ffn_up.bias' in names
  return out


# ----------------------------------------------------------------------------- tensors


def _hf_name(name: str) -> str | None:
  """transformers' name of a GGUF tensor, None for one a decoder has no place for."""
  base, _, kind = name.rpartition('.')
  if base in _GLOBAL and kind == 'weight':
    return f'{_GLOBAL[base]}.weight'
  m = _BLOCK.fullmatch(name)
  if m and m.group(2) in _LAYER:
    return f'model.layers.{m.group(1)}.{_LAYER[m.group(2)]}.{m.group(3)}'
  return None


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
  """The inverse of convert_hf_to_gguf's `permute(w, n_head, n_head_kv)` (rows of each head
  from llama.cpp's interleaved rotary pairs back to transformers' two halves)."""
  return (w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def _dequantize(t, shape: tuple[int, ...], path: str) -> np.ndarray:
  """A GGUF tensor as float32 of `shape`, in numpy's (torch's) order: [out, in] for a matrix."""
  try:
    x = gguf.quants.dequantize(t.data, t.tensor_type)
  except NotImplementedError:
    raise ValueError(f'{path}: tensor {t.name} is stored as {t.tensor_type.name}, which the gguf '
                     'package cannot dequantize; requantize the file with llama.cpp to a '
                     f'supported type (F16, Q8_0, Q4_K, ...), or {_HINT}.') from None
  if math.prod(x.shape) != math.prod(shape):
    raise ValueError(f'{path}: tensor {t.name} ({t.tensor_type.name}) holds {x.shape} values, '
                     f'not its stated shape {shape}; the file is damaged.')
  return np.asarray(x, np.float32).reshape(shape)


def _shape(name: str, c: dict) -> tuple[int, ...]:
  """The [out, in] shape the config asks of a GGUF tensor."""
  h, v, f = c['hidden_size'], c['vocab_size'], c['intermediate_size']
  q, kv = c['num_attention_heads'] * c['head_dim'], c['num_key_value_heads'] * c['head_dim']
  shapes = {'token_embd': (v, h), 'output': (v, h), 'output_norm': (h,), 'attn_norm': (h,),
            'ffn_norm': (h,), 'attn_q': (q, h), 'attn_k': (kv, h), 'attn_v': (kv, h),
            'attn_output': (h, q), 'ffn_gate': (f, h), 'ffn_up': (f, h), 'ffn_down': (h, f),
            'attn_q_norm': (c['head_dim'],), 'attn_k_norm': (c['head_dim'],)}
  base, kind = name.rsplit('.', 1)
  shape = shapes[base.rsplit('.', 1)[-1]]
  return shape[:1] if kind == 'bias' else shape


def tensors_from_gguf(reader, hf_config: dict, path: str) -> dict[str, np.ndarray]:
  """The file's tensors as a transformers state dict of float32 numpy arrays."""
  unknown = [t.name for t in reader.tensors if _hf_name(t.name) is None]
  if unknown:
    raise ValueError(f'{path} has tensors a {hf_config["model_type"]} decoder has no place for: '
                     f'{unknown[:8]}{"..." if len(unknown) > 8 else ""}; {_HINT}.')
  out = {}
  for t in reader.tensors:
    want = _shape(t.name, hf_config)
    have = tuple(int(n) for n in reversed(t.shape))  # GGUF lists dimensions innermost first
    if have != want:
      raise ValueError(f'{path}: tensor {t.name} has shape {have}, but the metadata '
                       f'({hf_config["model_type"]}, {_sizes(hf_config)}) needs {want}; the file '
                       'is inconsistent: convert it again.')
    x = _dequantize(t, have, path)
    if hf_config['model_type'] == 'llama' and re.search(r'\.attn_[qk]\.', t.name):
      x = unpermute(x, hf_config['num_attention_heads'] if '.attn_q.' in t.name
                    else hf_config['num_key_value_heads'])
    out[_hf_name(t.name)] = x
  return out


def _sizes(c: dict) -> str:
  keys = ('vocab_size', 'hidden_size', 'intermediate_size', 'num_attention_heads',
          'num_key_value_heads', 'head_dim')
  return ', '.join(f'{k}={c[k]}' for k in keys)


# ----------------------------------------------------------------------------- tokenizer


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's printable spelling of each byte (the alphabet of byte-level BPE vocabularies)."""
  keep = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1),
          *range(ord('®'), ord('ÿ') + 1)]
  extra = iter(range(256, 512))
  return {b: chr(b if b in keep else next(extra)) for b in range(256)}


def _tokenizer(meta: dict, path: str):
  """A transformers PreTrainedTokenizerFast from the tokenizer.* metadata (imports no torch)."""
  import transformers  # pylint: disable=g-import-not-at-top

  kind = meta.get('tokenizer.ggml.model')
  if kind != 'gpt2':
    raise ValueError(f'{path}: tokenizer model {kind!r} is not supported by kd.hf.gguf (it builds '
                     "byte-level BPE, 'gpt2', only); load with tokenizer=False and take the "
                     f'tokenizer from elsewhere, or {_HINT}.')
  pre = meta.get('tokenizer.ggml.pre', 'default')
  if pre not in PRE_TOKENIZERS:
    raise ValueError(f'{path}: pre-tokenizer {pre!r} is unknown to kd.hf.gguf (known: '
                     f'{", ".join(sorted(PRE_TOKENIZERS))}); splitting text another way would '
                     f'give other token ids. Load with tokenizer=False, or {_HINT}.')
  tokens = meta.get('tokenizer.ggml.tokens')
  if not tokens or 'tokenizer.ggml.merges' not in meta:
    raise ValueError(f'{path}: a byte-level BPE tokenizer needs tokenizer.ggml.tokens and '
                     '.merges, and the file lacks them; convert it again with llama.cpp, or load '
                     'with tokenizer=False.')
  types = meta.get('tokenizer.ggml.token_type') or [1] * len(tokens)
  spelling = _bytes_to_unicode()
  alphabet = set(spelling.values())
  # llama.cpp writes tokens in the byte alphabet, but some user-defined ones as raw text.
  spelled = [t if set(t) <= alphabet else ''.join(spelling[b] for b in t.encode('utf-8'))
             for t in tokens]
  vocab = {t: i for i, t in enumerate(spelled)}
  merges = [tuple(m.split(' ')) for m in meta['tokenizer.ggml.merges']]
  split = PRE_TOKENIZERS[pre]
  tok = Tokenizer(tok_models.BPE(vocab=vocab, merges=merges, dropout=None,
                                 continuing_subword_prefix='', end_of_word_suffix='',
                                 fuse_unk=False, ignore_merges=pre in _LLAMA3))
  if split is None:
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  else:
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior='isolated'),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  # Control tokens outside the byte alphabet are llama.cpp mislabels (transformers skips them too).
  tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                          for t, k in zip(tokens, types) if k == _CONTROL and set(t) <= alphabet])
  tok.add_tokens([AddedToken(t, normalized=False, special=False)
                  for t, k in zip(tokens, types) if k == _USER_DEFINED and t in vocab])

  keys = {'bos': 'bos', 'eos': 'eos', 'unk': 'unknown', 'pad': 'padding'}  # llama.cpp's names
  ids = {k: int(meta[f'tokenizer.ggml.{g}_token_id']) for k, g in keys.items()
         if 0 <= meta.get(f'tokenizer.ggml.{g}_token_id', -1) < len(tokens)}
  add = [k for k in ('bos', 'eos') if k in ids and meta.get(
      f'tokenizer.ggml.add_{k}_token', k == 'bos' and pre in _LLAMA3)]
  bos, eos = ([tokens[ids[k]]] if k in add else [] for k in ('bos', 'eos'))
  tok.post_processor = processors.TemplateProcessing(
      single=[*bos, '$A', *eos],
      pair=[*bos, '$A', *eos, *(f'{t}:1' for t in bos), '$B:1', *(f'{t}:1' for t in eos)],
      special_tokens=[(tokens[ids[k]], ids[k]) for k in add])
  named = {f'{k}_token': tokens[i] for k, i in ids.items()}
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, chat_template=meta.get('tokenizer.chat_template'),
      add_bos_token='bos' in add, add_eos_token='eos' in add, clean_up_tokenization_spaces=False,
      **named)


def read_tokenizer(path: str):
  """The tokenizer inside a GGUF file as a transformers PreTrainedTokenizerFast, built with the
  `tokenizers` library alone (no torch): byte-level BPE ('gpt2') vocabularies only."""
  _, meta = _open(path)
  if 'tokenizer.ggml.model' not in meta:
    raise ValueError(f'{path} holds no tokenizer (no tokenizer.ggml.model); take it from the '
                     "model's Hugging Face checkpoint.")
  return _tokenizer(meta, path)


# ----------------------------------------------------------------------------- load


def load(path: str, dtype=None, *, tokenizer: bool = True, scan_layers: bool = False) -> Model:
  """Reads a GGUF decoder into a `Model`, as kd.hf.load reads a checkpoint directory: float32
  params (dequantized) unless `dtype`, which sets params and compute; `scan_layers` stacks the
  layers. The tokenizer comes from the file (None when it has none, or tokenizer=False)."""
  reader, meta = _open(path)
  hf_config = config_from_gguf(meta, [t.name for t in reader.tensors], path)
  family = hf.family_for(hf_config)
  config = family.config_from_hf(hf_config)
  try:
    variables = family.params_from_hf(tensors_from_gguf(reader, hf_config, path), config)
  except ValueError as e:
    raise ValueError(f'{path}: {e}') from None
  tok = _tokenizer(meta, path) if tokenizer and 'tokenizer.ggml.model' in meta else None
  return hf.as_model(family, config, variables, path, dtype=dtype, scan_layers=scan_layers,
                     tokenizer=tok)
