"""Tests for kd.models.decoder: parity with transformers' Llama, masking, packing, numerics."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd import models
from kd.eval import speed
from kd.models import Decoder, DecoderConfig, count_params, head_fn, init_params
from kd.models import cache as kv_cache
from kd.models import attention as attention_lib

TINY = dict(vocab_size=97, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
            intermediate_size=96, rope_theta=10000.0, rms_norm_eps=1e-6, max_seq_len=64)


def _config(**overrides):
  return DecoderConfig(**{**TINY, **overrides})


B, T = 2, 8  # One shape for (almost) every run, so jit-compiled functions are shared by tests.


@functools.lru_cache(maxsize=None)
def _compiled(config, flags):
  return jax.jit(functools.partial(Decoder(config).apply, **dict(flags)))


def _run(config, variables, ids, explicit=False, **kwargs):
  """Jitted forward with hidden states; `explicit` also requests attentions (explicit softmax)."""
  flags = {'output_hidden_states': True, 'output_attentions': explicit}
  flags.update({k: v for k, v in kwargs.items() if isinstance(v, bool)})
  arrays = {k: v for k, v in kwargs.items() if not isinstance(v, bool)}
  return _compiled(config, tuple(sorted(flags.items())))(variables, ids, **arrays)


def _random_params(config, seed=0):
  """Random params of the right tree; norm scales around 1 so identity norms hide nothing.

  Built with numpy from the eval_shape tree: nothing to compile, unlike init_params.
  """
  rng = np.random.RandomState(seed)
  shapes = jax.eval_shape(functools.partial(init_params, config), jax.random.key(0))

  def fill(path, leaf):
    if path[-1].key == 'scale':
      return jnp.asarray(1.0 + 0.3 * rng.randn(*leaf.shape), leaf.dtype)
    return jnp.asarray(0.05 * rng.randn(*leaf.shape), leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _ids(seed, shape=(B, T)):
  return jnp.asarray(np.random.RandomState(seed).randint(0, 97, shape), jnp.int32)


RIGHT_PAD = jnp.array([[1] * T, [1] * 5 + [0] * (T - 5)])


# ----------------------------------------------------------------------------- HF parity


def _params_from_torch(state_dict, config):
  """Maps a transformers LlamaForCausalLM state dict onto our params (Linear weights transposed)."""
  sd = {k: v.detach().cpu().numpy() for k, v in state_dict.items()}
  linear = lambda name: {'kernel': jnp.asarray(sd[name].T)}
  params = {'embed': {'embedding': jnp.asarray(sd['model.embed_tokens.weight'])},
            'final_norm': {'scale': jnp.asarray(sd['model.norm.weight'])}}
  for i in range(config.num_layers):
    p = f'model.layers.{i}.'
    params[f'layers_{i}'] = {
        'attn': {n: linear(f'{p}self_attn.{n}.weight')
                 for n in ('q_proj', 'k_proj', 'v_proj', 'o_proj')},
        'mlp': {n: linear(f'{p}mlp.{n}.weight') for n in ('gate_proj', 'up_proj', 'down_proj')},
        'input_norm': {'scale': jnp.asarray(sd[f'{p}input_layernorm.weight'])},
        'post_attn_norm': {'scale': jnp.asarray(sd[f'{p}post_attention_layernorm.weight'])},
    }
  if not config.tie_embeddings:
    params['lm_head'] = linear('lm_head.weight')
  return {'params': params}


@pytest.mark.parametrize('tie', [False, True])
def test_matches_transformers_llama(tie):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  torch.manual_seed(0)
  hf_config = transformers.LlamaConfig(
      vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, intermediate_size=96, rope_theta=10000.0, rms_norm_eps=1e-6,
      tie_word_embeddings=tie, max_position_embeddings=64, attn_implementation='eager')
  hf = transformers.LlamaForCausalLM(hf_config).eval()
  with torch.no_grad():
    for name, p in hf.named_parameters():
      if 'norm' in name:
        p.add_(0.3 * torch.randn_like(p))
  assert (hf.lm_head.weight is hf.model.embed_tokens.weight) == tie

  config = _config(tie_embeddings=tie)
  variables = _params_from_torch(hf.state_dict(), config)
  assert (jax.tree_util.tree_structure(variables)
          == jax.tree_util.tree_structure(jax.eval_shape(functools.partial(init_params, config), jax.random.key(0))))

  ids, mask = np.asarray(_ids(0)), np.asarray(RIGHT_PAD)
  with torch.no_grad():
    ref = hf(input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask).long(),
             output_hidden_states=True, output_attentions=True)

  out = _run(config, variables, jnp.asarray(ids), explicit=True, attention_mask=RIGHT_PAD)
  real = mask.astype(bool)
  close = functools.partial(np.testing.assert_allclose, atol=1e-4, rtol=1e-4)
  close(out['logits'][real], ref.logits.numpy()[real])

  ref_hidden = [h.numpy() for h in ref.hidden_states]
  assert len(out['hidden_states']) == len(ref_hidden) == config.num_layers + 1
  for ours, theirs in zip(out['hidden_states'], ref_hidden):  # last one after the final norm
    close(ours[real], theirs[real])
  close(out['hidden'][real], ref_hidden[-1][real])

  assert len(out['attentions']) == len(ref.attentions) == config.num_layers
  for ours, theirs in zip(out['attentions'], ref.attentions):
    ours, theirs = np.asarray(ours).transpose(0, 2, 1, 3), theirs.numpy().transpose(0, 2, 1, 3)
    np.testing.assert_allclose(ours[real], theirs[real], atol=1e-5)  # [query, head, key]


# ----------------------------------------------------------------------------- masking


@pytest.mark.parametrize('explicit', [False, True])
def test_causal(explicit):
  config = _config()
  variables = _random_params(config)
  ids = _ids(1)
  changed = ids.at[:, 5].set((ids[:, 5] + 1) % 97)
  a = _run(config, variables, ids, explicit)['logits']
  b = _run(config, variables, changed, explicit)['logits']
  np.testing.assert_allclose(a[:, :5], b[:, :5], atol=1e-6)
  assert np.abs(a[:, 5:] - b[:, 5:]).max() > 1e-3


# Two rows of two packed sequences each (lengths 5+3 and 3+3+padding).
SEGMENTS = {'segment_ids': jnp.array([[1] * 5 + [2] * 3, [1] * 3 + [2] * 3 + [0] * 2]),
            'positions': jnp.array([[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 0, 1, 2, 0, 0]])}


@pytest.mark.parametrize('explicit', [False, True])
def test_packed_equals_separate(explicit):
  config = _config()
  variables = _random_params(config)
  packed = _ids(2)
  out = _run(config, variables, packed, explicit, **SEGMENTS)['logits']
  # Each packed sequence alone, left-aligned and right-padded to T.
  pieces = [(0, 0, 5), (0, 5, 8), (1, 0, 3), (1, 3, 6)]
  for row, start, end in pieces:
    alone = jnp.zeros((B, T), jnp.int32).at[0, :end - start].set(packed[row, start:end])
    mask = jnp.zeros((B, T), jnp.int32).at[0, :end - start].set(1).at[1].set(1)
    ref = _run(config, variables, alone, explicit, attention_mask=mask)['logits']
    np.testing.assert_allclose(out[row, start:end], ref[0, :end - start], atol=1e-5)


MASKS = {
    'none': {},
    'right_pad': {'attention_mask': RIGHT_PAD},
    # Row 1's first queries see no real key: they must stay finite and causal.
    'left_pad': {'attention_mask': jnp.array([[1] * T, [0] * 3 + [1] * (T - 3)])},
    'segments': SEGMENTS,
}


@pytest.mark.parametrize('kind, num_kv_heads', [(k, 2) for k in MASKS] + [('segments', 4),
                                                                         ('segments', 1)])
def test_fused_attention_matches_explicit(kind, num_kv_heads):
  config = _config(num_kv_heads=num_kv_heads)
  variables = _random_params(config)
  ids = _ids(4)
  fused = _run(config, variables, ids, **MASKS[kind])
  explicit = _run(config, variables, ids, explicit=True, **MASKS[kind])
  assert 'attentions' not in fused
  np.testing.assert_allclose(fused['logits'], explicit['logits'], atol=1e-5)
  for a, b in zip(fused['hidden_states'], explicit['hidden_states']):
    np.testing.assert_allclose(a, b, atol=1e-5)
  for probs in explicit['attentions']:
    assert probs.shape == (B, 4, T, T) and probs.dtype == jnp.float32
    assert np.isfinite(probs).all()
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    assert np.all(np.triu(np.asarray(probs), k=1) == 0)  # causal


def test_gqa_equals_mha_with_repeated_kv_heads():
  gqa = _config(num_kv_heads=2)
  mha = dataclasses.replace(gqa, num_kv_heads=4)
  variables = _random_params(gqa)
  hd, groups = gqa.head_dim, gqa.num_heads // gqa.num_kv_heads

  def repeat_heads(kernel_DxKH):  # kv head j serves query heads j*groups ... (j+1)*groups-1
    d = kernel_DxKH.shape[0]
    return jnp.repeat(kernel_DxKH.reshape(d, -1, hd), groups, axis=1).reshape(d, -1)

  mha_vars = jax.tree_util.tree_map_with_path(
      lambda path, x: repeat_heads(x) if path[-2].key in ('k_proj', 'v_proj') else x, variables)
  ids = _ids(5)
  for explicit in (False, True):
    a = _run(gqa, variables, ids, explicit, **SEGMENTS)['logits']
    b = _run(mha, mha_vars, ids, explicit, **SEGMENTS)['logits']
    np.testing.assert_allclose(a, b, atol=1e-5)


# ----------------------------------------------------------------------------- outputs


def test_outputs_qkv_and_head():
  config = _config()
  variables = _random_params(config)
  model = Decoder(config)
  ids = _ids(6)
  out = _run(config, variables, ids, output_qkv=True)
  assert set(out) == {'logits', 'hidden', 'hidden_states', 'qkv'}
  assert out['logits'].shape == (B, T, 97) and out['hidden'].shape == (B, T, 64)
  assert len(out['qkv']) == config.num_layers
  for qkv in out['qkv']:
    assert {k: v.shape for k, v in qkv.items()} == {k: (B, T, 64) for k in 'qkv'}

  # Layer 0's q and k are the pre-RoPE projections of the normed embeddings.
  p = variables['params']['layers_0']
  x = out['hidden_states'][0]
  normed = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * p['input_norm']['scale']
  np.testing.assert_allclose(out['qkv'][0]['q'], normed @ p['attn']['q_proj']['kernel'],
                             atol=1e-5)
  k_BxTxKxH = (normed @ p['attn']['k_proj']['kernel']).reshape(B, T, 2, 16)
  np.testing.assert_allclose(out['qkv'][0]['k'],
                             jnp.repeat(k_BxTxKxH, 2, axis=2).reshape(B, T, 64), atol=1e-5)

  hidden_only = _run(config, variables, ids, return_hidden_only=True)
  assert set(hidden_only) == {'hidden', 'hidden_states'}
  np.testing.assert_allclose(hidden_only['hidden'], out['hidden'], atol=1e-5)
  np.testing.assert_allclose(head_fn(model, variables)(out['hidden']), out['logits'], atol=1e-5)
  np.testing.assert_allclose(model.apply(variables, out['hidden'], method=Decoder.project),
                             out['logits'], atol=1e-5)


@pytest.mark.parametrize('tie', [False, True])
def test_count_params_and_init(tie):
  config = _config(tie_embeddings=tie)
  shapes = jax.eval_shape(functools.partial(init_params, config), jax.random.key(0))
  d, f, v, hd = 64, 96, 97, 16
  per_layer = d * 4 * hd + 2 * d * 2 * hd + 4 * hd * d + 3 * d * f + 2 * d
  expected = v * d + 2 * per_layer + d + (0 if tie else d * v)
  assert count_params(shapes) == expected
  assert ('lm_head' in shapes['params']) == (not tie)
  if not tie:  # One real init (slow-ish to compile) is enough.
    params = jax.jit(init_params, static_argnums=(0, 2))(config, jax.random.key(0))['params']
    assert count_params(params) == expected
    np.testing.assert_array_equal(params['final_norm']['scale'], 1.0)
    assert 0.015 < float(jnp.std(params['layers_0']['mlp']['up_proj']['kernel'])) < 0.025


def test_remat_same_outputs_and_grads():
  config = _config()
  rematted = dataclasses.replace(config, remat=True)
  variables = _random_params(config)
  assert (jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(
      jax.eval_shape(functools.partial(init_params, rematted), jax.random.key(0))))
  ids = _ids(7)

  def loss(cfg, params):
    out = Decoder(cfg).apply(params, ids, attention_mask=RIGHT_PAD, output_hidden_states=True)
    return jnp.mean(jax.nn.logsumexp(out['logits'], -1)) + jnp.mean(out['hidden_states'][1] ** 2)

  (l0, g0), (l1, g1) = (jax.jit(jax.value_and_grad(functools.partial(loss, c)))(variables)
                        for c in (config, rematted))
  np.testing.assert_allclose(l0, l1, rtol=1e-6)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5),
                         g0, g1)


@pytest.mark.parametrize('remat', [False, True])
def test_scan_layers_same_outputs_grads_and_cache(remat):
  """scan_layers: one nn.scan over stacked params equals the unrolled layers, on a model with
  mixed sliding/full layers (the mask picked per layer inside the scan) and padding."""
  config = _config(num_layers=3, sliding_window=3, remat=remat,
                   layer_types=('full_attention', 'sliding_attention', 'full_attention'))
  scanned = dataclasses.replace(config, scan_layers=True)
  variables = _random_params(config)
  stacked = models.stack_layers(variables)
  shapes = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)
  assert shapes(stacked) == shapes(jax.eval_shape(functools.partial(init_params, scanned),
                                                  jax.random.key(0)))
  assert stacked['params']['layers']['mlp']['up_proj']['kernel'].shape == (3, 64, 96)
  jax.tree.map(np.testing.assert_array_equal, models.unstack_layers(stacked), variables)
  assert shapes(models.stack_layers(stacked)) == shapes(stacked)  # already stacked: unchanged

  ids = _ids(3)
  for kwargs in ({}, {'attention_mask': RIGHT_PAD}):
    a = _run(config, variables, ids, explicit=True, output_qkv=True, **kwargs)
    b = _run(scanned, stacked, ids, explicit=True, output_qkv=True, **kwargs)
    assert len(b['hidden_states']) == 4 and len(b['attentions']) == len(b['qkv']) == 3
    jax.tree.map(functools.partial(np.testing.assert_allclose, atol=2e-6, rtol=1e-5), b, a)

  # Without padding the sliding layer takes the fused kernel's local window instead of a mask
  # (in the scan, a lax.cond on its flag): the same logits as the explicit path's band mask.
  explicit = _run(config, variables, ids, explicit=True)['logits']
  for cfg, params in ((config, variables), (scanned, stacked)):
    np.testing.assert_allclose(_run(cfg, params, ids)['logits'], explicit, atol=2e-6, rtol=1e-5)

  def loss(cfg, params, pad):
    out = Decoder(cfg).apply(params, ids, attention_mask=pad, output_hidden_states=True)
    return jnp.mean(jax.nn.logsumexp(out['logits'], -1)) + jnp.mean(out['hidden_states'][2] ** 2)

  for pad in (RIGHT_PAD, None):
    g0 = models.stack_layers(jax.jit(jax.grad(functools.partial(loss, config, pad=pad)))(
        variables))
    g1 = jax.jit(jax.grad(functools.partial(loss, scanned, pad=pad)))(stacked)
    jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-6, rtol=1e-5), g1, g0)

  # Incremental decoding with a stacked cache: the same logits as one full forward.
  cache = kv_cache.init_cache(scanned, B, T)
  assert cache['layers']['k'].shape == (3, B, T, 2, 16)
  out = Decoder(scanned).apply(stacked, ids[:, :5], cache=cache)
  steps = [out['logits']]
  for i in range(5, T):
    out = Decoder(scanned).apply(stacked, ids[:, i:i + 1], cache=out['cache'])
    steps.append(out['logits'])
  np.testing.assert_allclose(jnp.concatenate(steps, 1), _run(config, variables, ids)['logits'],
                             atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize('explicit', [False, True])
def test_bfloat16_compute_close_to_float32(explicit):
  config = _config()
  bf16 = dataclasses.replace(config, dtype='bfloat16')
  variables = _random_params(config)
  ids = _ids(8)
  ref = _run(config, variables, ids, explicit, attention_mask=RIGHT_PAD)['logits']
  out = _run(bf16, variables, ids, explicit, attention_mask=RIGHT_PAD)
  assert out['logits'].dtype == jnp.bfloat16 and out['hidden'].dtype == jnp.bfloat16
  assert all(h.dtype == jnp.bfloat16 for h in out['hidden_states'])
  err = np.abs(np.asarray(out['logits'], np.float32) - ref).max()
  assert err < 0.03 * np.abs(ref).max(), (err, np.abs(ref).max())


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize('overrides, message', [
    (dict(num_kv_heads=3), 'multiple of num_kv_heads'),
    (dict(hidden_size=66), 'not divisible by num_heads'),
    (dict(head_dim=15), 'must be even'),
    (dict(num_layers=0), 'num_layers must be a positive int'),
    (dict(dtype='float64'), "dtype='float64' is not supported"),
    (dict(param_dtype='fp32'), 'param_dtype'),
    (dict(rms_norm_eps=0.0), 'rms_norm_eps'),
    (dict(rope_theta=-1.0), 'rope_theta'),
    (dict(norm='batch'), "norm='batch' is not supported"),
    (dict(mlp_activation='gelu_new'), 'mlp_activation'),
    (dict(positions='alibi'), 'positions'),
    (dict(sliding_window=0), 'sliding_window must be a positive int'),
    (dict(layer_types=('full_attention',)), 'layer_types has 1 entries'),
    (dict(layer_types=('sliding_attention',) * 2), 'sliding_window=None'),
    (dict(rope_scaling={'rope_type': 'longrope', 'factor': 2.0}), 'longrope'),
    (dict(rope_scaling={'rope_type': 'llama3', 'factor': 8.0}), 'low_freq_factor'),
    (dict(rope_scaling={'rope_type': 'linear', 'factor': 2.0}, positions='learned'),
     "rope_scaling needs positions='rope'"),
])
def test_validate_errors(overrides, message):
  with pytest.raises(ValueError, match=message):
    _config(**overrides)


def test_config_dict_round_trip():
  config = _config(head_dim=32, tie_embeddings=True)
  assert DecoderConfig.from_dict(config.to_dict()) == config
  scaled = _config(rope_scaling={'rope_type': 'linear', 'factor': 2.0}, sliding_window=4,
                   layer_types=['full_attention', 'sliding_attention'])
  assert hash(scaled) == hash(DecoderConfig.from_dict(scaled.to_dict()))
  assert scaled.to_dict()['rope_scaling'] == {'rope_type': 'linear', 'factor': 2.0}
  assert DecoderConfig.from_dict(json.loads(json.dumps(scaled.to_dict()))) == scaled
  assert _config().head_dim == 16
  with pytest.raises(ValueError, match='Unknown DecoderConfig keys'):
    DecoderConfig.from_dict({**config.to_dict(), 'num_hidden_layers': 2})


def test_input_shape_errors():
  config = _config(max_seq_len=4)
  variables = _random_params(config)
  with pytest.raises(ValueError, match='exceeds max_seq_len=4'):
    Decoder(config).apply(variables, jnp.zeros((1, 5), jnp.int32))
  with pytest.raises(ValueError, match='attention_mask has shape'):
    Decoder(config).apply(variables, jnp.zeros((1, 4), jnp.int32),
                          attention_mask=jnp.ones((1, 5), jnp.int32))


def test_explicit_head_dim():
  config = _config(head_dim=8)  # head_dim * num_heads != hidden_size
  variables = _random_params(config)
  assert variables['params']['layers_0']['attn']['q_proj']['kernel'].shape == (64, 32)
  assert variables['params']['layers_0']['attn']['o_proj']['kernel'].shape == (32, 64)
  ids = _ids(9)
  a = _run(config, variables, ids, attention_mask=RIGHT_PAD)['logits']
  b = _run(config, variables, ids, explicit=True, attention_mask=RIGHT_PAD)['logits']
  np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize('scan', [False, True])
def test_splash_attention_equals_xla(scan):
  """attention_impl='splash' (the TPU's Pallas kernel, interpreted on the CPU) on a model with
  GQA and mixed sliding/full layers at T = 128: XLA's logits and gradients, unrolled and
  scanned (a lax.cond picks each layer's window); with padding on both sides or packed
  sequences, the mask as the kernel's segment ids (compared on real tokens). At a length that
  is not a multiple of 128, or when attention probabilities are asked for, XLA's path runs."""
  t = 128
  config = _config(num_layers=3, sliding_window=40, max_seq_len=t, layer_types=(
      'full_attention', 'sliding_attention', 'full_attention'), scan_layers=scan)
  splash_cfg = dataclasses.replace(config, attention_impl='splash')
  variables = _random_params(dataclasses.replace(config, scan_layers=False))
  variables = models.stack_layers(variables) if scan else variables
  ids = jnp.asarray(np.random.RandomState(3).randint(0, 97, (2, t)))
  pos = jnp.arange(t)
  padded = jnp.stack([(pos >= 10) & (pos < 100), pos < 128]).astype(jnp.int32)  # left + right
  packed = jnp.stack([1 + (pos >= 50) + (pos >= 90), jnp.where(pos < 120, 1, 0)])
  restart = jnp.stack([pos - jnp.where(pos >= 90, 90, jnp.where(pos >= 50, 50, 0)), pos])

  def loss(cfg, params, real, **kw):
    logits = Decoder(cfg).apply(params, ids, **kw)['logits']
    return jnp.sum(jax.nn.logsumexp(logits, -1) * real) / jnp.sum(real)

  pallas_calls = lambda cfg, **kw: _count(jax.make_jaxpr(functools.partial(
      loss, cfg, real=1.0, **kw))(variables).jaxpr, 'pallas_call')
  # Unrolled: a call per layer. Scanned: one body, whose cond holds the window and the full one.
  assert pallas_calls(splash_cfg) == (2 if scan else 3) and pallas_calls(config) == 0
  for kw, real in (({}, jnp.ones((2, t))), ({'attention_mask': padded}, padded),
                   ({'segment_ids': packed, 'positions': restart}, packed > 0)):
    assert pallas_calls(splash_cfg, **kw) == (2 if scan else 3)
    out, want = (Decoder(c).apply(variables, ids, **kw)['logits'] for c in (splash_cfg, config))
    keep = np.asarray(real, bool)
    np.testing.assert_allclose(np.asarray(out)[keep], np.asarray(want)[keep], atol=2e-6)
    grads = [jax.jit(jax.grad(functools.partial(loss, c, real=real, **kw)))(variables)
             for c in (splash_cfg, config)]
    jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-6, rtol=1e-5), *grads)
  short = ids[:, :8]
  assert not _count(jax.make_jaxpr(lambda p: Decoder(splash_cfg).apply(p, short)['logits'])(
      variables).jaxpr, 'pallas_call')
  assert not _count(jax.make_jaxpr(lambda p: Decoder(splash_cfg).apply(
      p, ids, output_attentions=True)['logits'])(variables).jaxpr, 'pallas_call')


def test_splash_on_a_gpu_is_refused(monkeypatch):
  """A GPU would run the TPU kernel interpreted: a clear error names the GPU's choices."""
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  config = _config(attention_impl='splash', max_seq_len=128)
  with pytest.raises(ValueError, match="on a GPU use None or 'cudnn'"):
    attention_lib.attention_impl(config, jnp.bfloat16, None, True, 128)


def _count(jaxpr, primitive: str) -> int:
  """Occurrences of `primitive` in jaxpr and every sub-jaxpr (each cond branch, a scan body
  once), also where jax shares one sub-jaxpr between calls."""
  return sum((eqn.primitive.name == primitive)
             + sum(_count(sub, primitive) for sub in speed.sub_jaxprs(eqn))
             for eqn in jaxpr.eqns)
