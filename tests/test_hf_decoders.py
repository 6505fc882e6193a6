"""kd.hf decoder families against transformers: load, forward parity, export, dtypes, errors,
vocabularies and student initialisation from a teacher."""

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from kd import hf  # pylint: disable=g-import-not-at-top,wrong-import-position
from kd.hf import io  # pylint: disable=g-import-not-at-top,wrong-import-position
from kd.models import Decoder  # pylint: disable=g-import-not-at-top,wrong-import-position
from kd.models import init_from  # pylint: disable=g-import-not-at-top,wrong-import-position

V, B, T = 97, 2, 12
ROPE = dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=96, max_position_embeddings=64,
            rms_norm_eps=1e-5)

# name -> (config class, kwargs). Tiny, but every switch of the family is on.
FAMILIES = {
    'llama': ('LlamaConfig', dict(ROPE)),
    'llama_bias_tied': ('LlamaConfig', dict(ROPE, attention_bias=True, mlp_bias=True,
                                            tie_word_embeddings=True)),
    'llama_linear': ('LlamaConfig', dict(ROPE, rope_scaling={'rope_type': 'linear',
                                                             'factor': 2.0})),
    'llama_dynamic': ('LlamaConfig', dict(ROPE, max_position_embeddings=8,  # T > 8: it scales
                                          rope_scaling={'rope_type': 'dynamic', 'factor': 2.0})),
    'llama_llama3': ('LlamaConfig', dict(ROPE, rope_scaling={
        'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
        'original_max_position_embeddings': 64})),
    'llama_yarn': ('LlamaConfig', dict(ROPE, rope_scaling={
        'rope_type': 'yarn', 'factor': 4.0, 'original_max_position_embeddings': 16})),
    'mistral': ('MistralConfig', dict(ROPE, sliding_window=5)),  # T = 12 > window
    'qwen2': ('Qwen2Config', dict(ROPE)),
    'qwen2_sliding': ('Qwen2Config', dict(ROPE, use_sliding_window=True, sliding_window=4,
                                          max_window_layers=1)),
    'qwen3': ('Qwen3Config', dict(ROPE, head_dim=32)),  # head_dim * heads != hidden
    'gemma': ('GemmaConfig', dict(ROPE, head_dim=32, num_key_value_heads=1)),
    # Caps small enough to bite at this scale (the published ones are 50 and 30), a window
    # shorter than T on layer 0, and a scale other than head_dim ** -0.5.
    'gemma2': ('Gemma2Config', dict(ROPE, head_dim=32, query_pre_attn_scalar=20,
                                    sliding_window=5, attn_logit_softcapping=0.05,
                                    final_logit_softcapping=0.5)),
    'gpt2': ('GPT2Config', dict(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                layer_norm_epsilon=1e-5)),
}


def _hf_model(name, seed=0, **overrides):
  """A random transformers model with norms and biases perturbed (identity inits hide bugs)."""
  cls_name, kwargs = FAMILIES[name]
  config = getattr(transformers, cls_name)(**{**kwargs, **overrides}, attn_implementation='eager')
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config).eval()
  with torch.no_grad():
    for pname, p in model.named_parameters():
      if 'norm' in pname or 'ln_' in pname or pname.endswith('bias'):
        p.add_(0.3 * torch.randn_like(p))
  return model


@functools.lru_cache(maxsize=None)
def _checkpoint(name, tmp_root):
  path = os.path.join(tmp_root, name)
  _hf_model(name).save_pretrained(path)
  return path


@pytest.fixture(scope='module')
def tmp_root(tmp_path_factory):
  return str(tmp_path_factory.mktemp('ckpt'))


def _ids(seed=0):
  return np.random.RandomState(seed).randint(0, V, (B, T))


MASK = np.array([[1] * T, [1] * 7 + [0] * (T - 7)])  # right padding
REAL = MASK.astype(bool)


def _torch_forward(model, ids, mask=MASK):
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask).long(),
                 output_hidden_states=True, output_attentions=True, use_cache=False)


close = functools.partial(np.testing.assert_allclose, atol=1e-4, rtol=1e-4)


def _assert_same_forward(model, ref, ids):
  out = model(ids, MASK, output_hidden_states=True, output_attentions=True)
  close(np.asarray(out.logits)[REAL], ref.logits.numpy()[REAL])
  assert len(out.hidden_states) == len(ref.hidden_states) == model.config.num_layers + 1
  for ours, theirs in zip(out.hidden_states, ref.hidden_states):
    close(np.asarray(ours)[REAL], theirs.numpy()[REAL])
  assert len(out.attentions) == len(ref.attentions)
  for ours, theirs in zip(out.attentions, ref.attentions):  # [B, H, Tq, Tk] -> rows of real queries
    ours = np.asarray(ours).transpose(0, 2, 1, 3)[REAL]
    np.testing.assert_allclose(ours, theirs.numpy().transpose(0, 2, 1, 3)[REAL], atol=1e-5)


@pytest.mark.parametrize('name', sorted(FAMILIES))
def test_load_matches_transformers_and_exports(name, tmp_root):
  path = _checkpoint(name, tmp_root)
  reference = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation='eager')
  model = hf.load(path)
  assert model.config.model_type == reference.config.model_type
  as_json = json.loads(json.dumps(model.config.to_dict()))
  assert type(model.config).from_dict(as_json) == model.config
  ids = _ids()
  ref = _torch_forward(reference, ids)
  _assert_same_forward(model, ref, ids)

  # Export, and transformers rebuilds the same model; kd reads back the same params.
  out_dir = os.path.join(tmp_root, name + '_export')
  hf.save(model, out_dir)
  with open(os.path.join(out_dir, 'config.json')) as f:
    exported = json.load(f)
  assert exported['architectures'] == reference.config.architectures
  again = transformers.AutoModelForCausalLM.from_pretrained(out_dir, attn_implementation='eager')
  close(_torch_forward(again, ids).logits.numpy()[REAL], ref.logits.numpy()[REAL])
  ref_sd = {k: v for k, v in reference.state_dict().items()}
  for key, value in again.state_dict().items():
    np.testing.assert_array_equal(value.numpy(), ref_sd[key].numpy(), err_msg=key)
  reloaded = hf.load(out_dir)
  assert reloaded.config == model.config
  jax.tree.map(np.testing.assert_array_equal, reloaded.params, model.params)


@pytest.mark.parametrize('name, scan', [('mistral', False), ('qwen2_sliding', False),
                                        ('qwen2_sliding', True)])
def test_sliding_layers_without_padding_use_the_kernels_window(name, scan, tmp_root):
  """No padding mask: the sliding layers give the fused kernel its local window (no [T, T]
  mask is made; in a scanned stack of mixed layer types, a lax.cond on each layer's flag), and
  the logits are transformers'. (The tests above, with padding, fold the band into the mask.)"""
  path = _checkpoint(name, tmp_root)
  reference = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation='eager')
  model = hf.load(path, scan_layers=scan)
  ids = _ids()
  want = _torch_forward(reference, ids, mask=np.ones_like(MASK)).logits.numpy()
  fn = jax.jit(lambda p, i: Decoder(model.config).apply(p, i)['logits'])
  jaxpr = str(jax.make_jaxpr(fn)(model.params, ids))
  assert 'cond[' in jaxpr if scan else 'cond[' not in jaxpr
  close(np.asarray(fn(model.params, ids)), want)


def test_sliding_window_matters(tmp_root):
  """The Mistral test is not vacuous: without the window the logits differ."""
  model = hf.load(_checkpoint('mistral', tmp_root))
  full = model.replace(module=type(model.module)(
      dataclasses.replace(model.config, sliding_window=None)))
  a, b = model(_ids(), MASK).logits, full(_ids(), MASK).logits
  np.testing.assert_allclose(a[:, :5], b[:, :5], atol=1e-5)  # within the window: the same
  assert np.abs(np.asarray(a - b))[REAL].max() > 1e-3


@pytest.mark.parametrize('scan', [False, True])
def test_gemma2_switches_each_matter_and_scan(scan, tmp_root):
  """Gemma 2 parity is not vacuous: dropping either soft-cap, the output norms or the window
  changes the logits. Stacked layers of mixed types, with and without padding, still give
  transformers' logits (the soft-capped softmax takes the window as a traced band)."""
  path = _checkpoint('gemma2', tmp_root)
  reference = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation='eager')
  model = hf.load(path, scan_layers=scan)
  ids, ones = _ids(), np.ones_like(MASK)
  _assert_same_forward(model, _torch_forward(reference, ids), ids)
  close(np.asarray(model(ids, ones).logits), _torch_forward(reference, ids, ones).logits.numpy())
  if scan:
    return
  base = np.asarray(model(ids, MASK).logits)[REAL]
  for change in (dict(attn_softcap=None), dict(logit_softcap=None), dict(sliding_window=None,
                                                                         layer_types=None)):
    other = model.replace(module=type(model.module)(dataclasses.replace(model.config, **change)))
    assert np.abs(np.asarray(other(ids, MASK).logits)[REAL] - base).max() > 1e-3, change
  unnormed = jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.zeros_like(x) if 'out_norm' in jax.tree_util.keystr(path) else x,
      model.params)  # norm_offset 1: a zero scale is a bare RMS normalisation
  assert np.abs(np.asarray(model.replace(params=unnormed)(ids, MASK).logits)[REAL]
                - base).max() > 1e-3


# ----------------------------------------------------------------------------- configs


@pytest.mark.parametrize('name', ['llama', 'mistral', 'qwen2', 'qwen3', 'gemma', 'gemma2',
                                  'gpt2'])
def test_missing_keys_take_transformers_defaults(name):
  """A config.json with only the model_type: kd reads what transformers' class defaults to."""
  cls = {'llama': 'LlamaConfig', 'mistral': 'MistralConfig', 'qwen2': 'Qwen2Config',
         'qwen3': 'Qwen3Config', 'gemma': 'GemmaConfig', 'gemma2': 'Gemma2Config',
         'gpt2': 'GPT2Config'}[name]
  ref = getattr(transformers, cls)()
  ours = hf.FAMILIES[name].config_from_hf({'model_type': name})
  assert ours.vocab_size == ref.vocab_size and ours.hidden_size == ref.hidden_size
  assert ours.num_layers == ref.num_hidden_layers and ours.num_heads == ref.num_attention_heads
  assert ours.tie_embeddings == ref.tie_word_embeddings
  if name == 'gpt2':
    assert ours.intermediate_size == 4 * ref.n_embd and ours.max_seq_len == ref.n_positions
    assert ours.layer_norm_eps == ref.layer_norm_epsilon
    return
  assert ours.num_kv_heads == ref.num_key_value_heads
  assert ours.head_dim == (getattr(ref, 'head_dim', None)
                           or ref.hidden_size // ref.num_attention_heads)
  assert ours.intermediate_size == ref.intermediate_size
  assert ours.max_seq_len == ref.max_position_embeddings
  assert ours.rms_norm_eps == ref.rms_norm_eps
  assert ours.rope_theta == ref.rope_parameters['rope_theta']
  assert ours.sliding_window == getattr(ref, 'sliding_window', None)
  if name == 'gemma2':
    assert [ours.layer_type(i) for i in range(ours.num_layers)] == ref.layer_types
    assert ours.attn_scale == ref.query_pre_attn_scalar ** -0.5
    assert (ours.attn_softcap, ours.logit_softcap) == (ref.attn_logit_softcapping,
                                                       ref.final_logit_softcapping)


@pytest.mark.parametrize('change, message', [
    ({'rope_scaling': {'rope_type': 'longrope', 'short_factor': [1.0], 'long_factor': [1.0]}},
     "rope type 'longrope'"),
    ({'rope_scaling': {'type': 'su', 'factor': 2.0}}, "rope type 'su'"),
    ({'partial_rotary_factor': 0.5}, 'partial_rotary_factor'),
    ({'hidden_act': 'quick_gelu'}, 'quick_gelu'),
])
def test_unsupported_features_refused(change, message):
  with pytest.raises(ValueError, match=message):
    hf.FAMILIES['llama'].config_from_hf({'model_type': 'llama', **change})


def test_unsupported_family_features_refused():
  for name in ('gemma', 'gemma2'):
    with pytest.raises(ValueError, match='use_bidirectional_attention'):
      hf.FAMILIES[name].config_from_hf({'model_type': name, 'use_bidirectional_attention': True})
  with pytest.raises(ValueError, match='add_cross_attention'):
    hf.FAMILIES['gpt2'].config_from_hf({'model_type': 'gpt2', 'add_cross_attention': True})


def test_unsupported_model_type_and_missing_dir(tmp_path):
  (tmp_path / 'config.json').write_text(json.dumps({'model_type': 'falcon'}))
  with pytest.raises(ValueError, match=r"unsupported model_type 'falcon'.*gemma.*gpt2.*llama"):
    hf.load(str(tmp_path))
  with pytest.raises(FileNotFoundError, match='is not a directory'):
    hf.load(str(tmp_path / 'nope'))
  (tmp_path / 'config.json').write_text(json.dumps({'model_type': 'llama'}))
  with pytest.raises(FileNotFoundError, match='safetensors'):
    hf.load(str(tmp_path))


def test_weights_not_matching_config_refused(tmp_root):
  path = _checkpoint('llama', tmp_root)
  tensors = io.read_tensors(path)
  family, config = hf.FAMILIES['llama'], hf.load(path).config
  extra = dict(tensors, **{'model.layers.0.self_attn.q_proj.bias': np.zeros(64, np.float32)})
  with pytest.raises(ValueError, match='unexpected.*q_proj.bias'):
    family.params_from_hf(extra, config)
  with pytest.raises(ValueError, match='does not fit'):
    family.params_from_hf(tensors, dataclasses.replace(config, intermediate_size=48))
  with pytest.raises(ValueError, match='cannot express'):
    hf.save(hf.load(path).replace(module=type(hf.load(path).module)(
        dataclasses.replace(config, qk_norm=True))), os.path.join(tmp_root, 'bad'))


# ----------------------------------------------------------------------------- dtypes, shards


def test_bfloat16_checkpoint_round_trip(tmp_root):
  path = os.path.join(tmp_root, 'llama_bf16')
  _hf_model('llama').to(torch.bfloat16).save_pretrained(path)
  header = io.read_tensors(path)['model.norm.weight']
  assert header.dtype.name == 'bfloat16'

  model = hf.load(path)  # float32 params holding the bf16 values
  assert model.params['params']['embed']['embedding'].dtype == jnp.float32
  ref = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation='eager')
  ref = ref.float()
  close(np.asarray(model(_ids(), MASK).logits)[REAL],
        _torch_forward(ref, _ids()).logits.numpy()[REAL])

  bf16 = hf.load(path, dtype='bfloat16')
  assert bf16.config.param_dtype == 'bfloat16'
  assert bf16.params['params']['layers_0']['attn']['q_proj']['kernel'].dtype == jnp.bfloat16
  out_dir = os.path.join(tmp_root, 'llama_bf16_export')
  hf.save(bf16, out_dir)
  with open(os.path.join(out_dir, 'config.json')) as f:
    assert json.load(f)['dtype'] == 'bfloat16'
  again = transformers.AutoModelForCausalLM.from_pretrained(out_dir)
  assert again.dtype == torch.bfloat16
  original = transformers.AutoModelForCausalLM.from_pretrained(path)
  for (key, a), b in zip(again.state_dict().items(), original.state_dict().values()):
    assert torch.equal(a, b), key


def test_io_keeps_half_precision_dtypes(tmp_path):
  ml_dtypes = pytest.importorskip('ml_dtypes')
  tensors = {'a': np.arange(6, dtype=np.float32).astype(ml_dtypes.bfloat16).reshape(2, 3),
             'b': np.linspace(-1, 1, 5).astype(np.float16)}
  io.write_tensors(tensors, str(tmp_path))
  back = io.read_tensors(str(tmp_path))
  for key, value in tensors.items():
    assert back[key].dtype == value.dtype
    np.testing.assert_array_equal(back[key].astype(np.float32), value.astype(np.float32))
  import safetensors.torch  # pylint: disable=g-import-not-at-top
  as_torch = safetensors.torch.load_file(os.path.join(str(tmp_path), io.SINGLE))
  assert as_torch['a'].dtype == torch.bfloat16 and as_torch['b'].dtype == torch.float16
  # Readable as any new file under the umask (safetensors alone writes 0600), no temp file left.
  umask = os.umask(0o022)
  try:
    io.write_tensors(tensors, str(tmp_path))
  finally:
    os.umask(umask)
  assert os.stat(os.path.join(str(tmp_path), io.SINGLE)).st_mode & 0o777 == 0o644
  assert sorted(os.listdir(tmp_path)) == [io.SINGLE]


def test_sharded_checkpoints(tmp_root):
  path = os.path.join(tmp_root, 'llama_sharded')
  _hf_model('llama').save_pretrained(path, max_shard_size='50KB')
  assert os.path.exists(os.path.join(path, io.INDEX))
  single = hf.load(_checkpoint('llama', tmp_root))
  jax.tree.map(np.testing.assert_array_equal, hf.load(path).params, single.params)

  # kd writes shards too, and transformers reads them.
  out_dir = os.path.join(tmp_root, 'llama_sharded_export')
  hf.save(single, out_dir)
  os.remove(os.path.join(out_dir, io.SINGLE))
  tensors = hf.FAMILIES['llama'].params_to_hf(single.params, single.config)
  io.write_tensors(tensors, out_dir, max_shard_bytes=40_000)
  assert len([f for f in os.listdir(out_dir) if f.endswith('.safetensors')]) > 2
  again = transformers.AutoModelForCausalLM.from_pretrained(out_dir)
  reference = transformers.AutoModelForCausalLM.from_pretrained(_checkpoint('llama', tmp_root))
  for (key, a), b in zip(again.state_dict().items(), reference.state_dict().values()):
    assert torch.equal(a, b), key


# ----------------------------------------------------------------------------- vocabularies


def _tokenizer(words):
  tokenizers = pytest.importorskip('tokenizers')
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(
      {w: i for i, w in enumerate(words)}, unk_token=words[0]))
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=words[0])


def test_vocab_rows_and_tokenizer_check(tmp_root):
  model = hf.load(_checkpoint('llama', tmp_root))
  words = ['<unk>'] + [f'w{i}' for i in range(89)]
  tok = _tokenizer(words)
  assert hf.vocab_rows(model) == V  # no tokenizer: every row
  padded = model.replace(tokenizer=tok)
  assert hf.vocab_rows(padded) == 90  # rows 90..96 are padding
  assert hf.check_same_tokenizer(tok, _tokenizer(list(words))) == 90
  assert hf.shared_vocab_rows(padded, model.replace(tokenizer=_tokenizer(list(words)))) == 90
  with pytest.raises(ValueError, match='differ.*2 shared tokens have other ids'):
    hf.check_same_tokenizer(tok, _tokenizer(words[:1] + [words[2], words[1]] + words[3:]))
  with pytest.raises(ValueError, match="1 are only in the teacher's"):
    hf.check_same_tokenizer(tok, _tokenizer(words[:-1]))
  with pytest.raises(ValueError, match='only 97 vocabulary rows'):
    hf.vocab_rows(model.replace(tokenizer=_tokenizer(['<unk>'] + [f'w{i}' for i in range(99)])))


# ----------------------------------------------------------------------------- students


def _hf_without_layers(reference, keep):
  """transformers' model with only `keep` layers: an independent student construction."""
  import copy  # pylint: disable=g-import-not-at-top
  student = copy.deepcopy(reference)
  student.model.layers = torch.nn.ModuleList([student.model.layers[i] for i in keep])
  student.config.num_hidden_layers = len(keep)
  if getattr(student.config, 'layer_types', None):
    student.config.layer_types = [student.config.layer_types[i] for i in keep]
  return student


@pytest.mark.parametrize('name, layers, keep', [
    ('llama', 'every_k', [0, 2]),
    ('qwen2_sliding', [1, 3], [1, 3]),  # layers 2, 3 slide: the student's layer_types follow
])
def test_student_from_teacher_equals_teacher_without_layers(name, layers, keep, tmp_root):
  path = os.path.join(tmp_root, name + '_4layers')
  overrides = dict(num_hidden_layers=4) if name == 'llama' else dict(num_hidden_layers=4,
                                                                     max_window_layers=2)
  _hf_model(name, **overrides).save_pretrained(path)
  teacher = hf.load(path)
  student = init_from.student_from_teacher(teacher, layers, k=2)
  assert student.config.num_layers == len(keep)
  for j, i in enumerate(keep):
    jax.tree.map(np.testing.assert_array_equal, student.params['params'][f'layers_{j}'],
                 teacher.params['params'][f'layers_{i}'])
  for key in ('embed', 'final_norm', 'lm_head'):
    jax.tree.map(np.testing.assert_array_equal, student.params['params'][key],
                 teacher.params['params'][key])
  if name == 'qwen2_sliding':
    assert student.config.layer_types == ('full_attention', 'sliding_attention')
  reference = _hf_without_layers(
      transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation='eager'), keep)
  ref = _torch_forward(reference, _ids())
  _assert_same_forward(student, ref, _ids())


def test_scanned_layers_load_cut_and_export(tmp_root):
  """scan_layers=True (stacked params, one nn.scan) on a model with mixed sliding and full
  layers: the same forward as transformers, a student cut from it equals transformers' model
  without those layers, and the export is the checkpoint transformers reads."""
  path = os.path.join(tmp_root, 'qwen2_sliding_scan')
  _hf_model('qwen2_sliding', num_hidden_layers=4, max_window_layers=2).save_pretrained(path)
  reference = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation='eager')
  teacher = hf.load(path, scan_layers=True)
  assert teacher.config.scan_layers and 'layers_0' not in teacher.params['params']
  assert teacher.params['params']['layers']['attn']['q_proj']['kernel'].shape == (4, 64, 64)
  _assert_same_forward(teacher, _torch_forward(reference, _ids()), _ids())

  student = init_from.student_from_teacher(teacher, [1, 3])
  assert student.config.scan_layers and student.config.layer_types == (
      'full_attention', 'sliding_attention')
  _assert_same_forward(student, _torch_forward(_hf_without_layers(reference, [1, 3]), _ids()),
                       _ids())
  unrolled = init_from.student_from_teacher(teacher, [1, 3], scan_layers=False)
  assert not unrolled.config.scan_layers and 'layers_1' in unrolled.params['params']

  out_dir = os.path.join(tmp_root, 'qwen2_sliding_scan_export')
  hf.save(teacher, out_dir)
  again = transformers.AutoModelForCausalLM.from_pretrained(out_dir, attn_implementation='eager')
  ref_sd = reference.state_dict()
  for key, value in again.state_dict().items():
    np.testing.assert_array_equal(value.numpy(), ref_sd[key].numpy(), err_msg=key)
  with pytest.raises(ValueError, match='decoder option'):
    hf.load(_bert_checkpoint(tmp_root), scan_layers=True)


def _bert_checkpoint(tmp_root):
  path = os.path.join(tmp_root, 'bert_tiny')
  if not os.path.exists(path):
    config = transformers.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=48)
    transformers.BertModel(config).save_pretrained(path)
  return path


def test_student_layer_choices_and_narrowing(tmp_root):
  assert init_from.select_layers(12, 'every_k', 2) == [0, 2, 4, 6, 8, 10]
  assert init_from.select_layers(12, 'every_k', 3) == [0, 3, 6, 9]
  assert init_from.select_layers(12, 'first_last') == [0, 11]
  assert init_from.select_layers(12, [1, 5]) == [1, 5]
  for bad in ([3, 1], [0, 12], [], 'middle'):
    with pytest.raises(ValueError):
      init_from.select_layers(12, bad)

  teacher = hf.load(_checkpoint('llama', tmp_root))
  narrow = init_from.student_from_teacher(teacher, 'first_last', hidden_size=32,
                                          intermediate_size=48)
  c = narrow.config
  assert (c.num_layers, c.hidden_size, c.intermediate_size, c.head_dim) == (2, 32, 48, 16)
  t, s = teacher.params['params'], narrow.params['params']
  np.testing.assert_array_equal(s['embed']['embedding'], t['embed']['embedding'][:, :32])
  np.testing.assert_array_equal(s['layers_1']['attn']['q_proj']['kernel'],
                                t['layers_1']['attn']['q_proj']['kernel'][:32])
  np.testing.assert_array_equal(s['layers_1']['mlp']['down_proj']['kernel'],
                                t['layers_1']['mlp']['down_proj']['kernel'][:48, :32])
  np.testing.assert_array_equal(s['final_norm']['scale'], t['final_norm']['scale'][:32])
  logits = narrow(_ids(), MASK).logits
  assert logits.shape == (B, T, V) and np.isfinite(np.asarray(logits)).all()
  assert narrow.tokenizer is teacher.tokenizer
  with pytest.raises(ValueError, match='larger than the teacher'):
    init_from.student_from_teacher(teacher, hidden_size=128)
  with pytest.raises(ValueError, match='add or remove parameters'):
    init_from.student_from_teacher(teacher, qkv_bias=True, hidden_size=32)
