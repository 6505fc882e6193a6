"""Adapters, prefix tuning and prompt tuning (DecoderConfig fields, kd.peft.adapters) against
hand-built references: numpy attention, a base Decoder fed the prompt as extra vocabulary."""

import dataclasses
import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd import models
from kd.models import Decoder, DecoderConfig, init_params
from kd.models import cache as kv_cache
from kd.models import attention as attention_lib
from kd.models import sample
from kd.peft import adapters

CFG = DecoderConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    intermediate_size=48, max_seq_len=16)
B, T = 2, 8
IDS = (jnp.arange(B * T, dtype=jnp.int32).reshape(B, T) * 7) % 64
RIGHT_PAD = jnp.array([[1] * T, [1] * 5 + [0] * (T - 5)], jnp.int32)
SIZES = {'adapter': 4, 'prefix': 3, 'prompt': 3}
# Two rows of packed sequences (5+3 and 3+3+padding), positions restarting per segment.
SEGMENTS = {'segment_ids': jnp.array([[1] * 5 + [2] * 3, [1] * 3 + [2] * 3 + [0] * 2]),
            'positions': jnp.array([[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 0, 1, 2, 0, 0]])}


def _flat(tree):
  return flax.traverse_util.flatten_dict(tree)


@functools.lru_cache(maxsize=None)
def _base(cfg=CFG):
  return jax.jit(init_params, static_argnums=(0, 2))(cfg, jax.random.key(0))


@functools.lru_cache(maxsize=None)
def _fwd(cfg, **flags):
  return jax.jit(functools.partial(Decoder(cfg).apply, **flags))


def _perturb(tree, seed=2, scale=0.3, only=None):
  """Random normal leaves (those whose path contains `only`, if given)."""
  flat = _flat(tree)
  keys = jax.random.split(jax.random.key(seed), len(flat))
  return flax.traverse_util.unflatten_dict({
      k: (scale * jax.random.normal(r, v.shape, v.dtype) if only is None or only in k else v)
      for r, (k, v) in zip(keys, flat.items())})


@functools.lru_cache(maxsize=None)
def _peft(method, cfg=CFG, seed=None, size=None):
  """(config, full variables) with the method added to the base; random PEFT params if seed."""
  new_cfg, variables = adapters.add_peft_params(cfg, _base(cfg), method, size or SIZES[method],
                                                jax.random.key(1))
  if seed is not None:
    trainable, frozen = adapters.split(method, variables)
    variables = adapters.combine(_perturb(trainable, seed), frozen)
  return new_cfg, variables


# ----------------------------------------------------------------------------- adapters


def test_adapters_start_as_the_identity_then_change_the_model():
  cfg, variables = _peft('adapter')
  trainable, frozen = adapters.split('adapter', variables)
  paths = sorted('/'.join(k) for k in _flat(trainable))
  assert paths == sorted(f'params/layers_{i}/{s}_adapter/{d}/{w}' for i in range(2)
                         for s in ('attn', 'mlp') for d in ('down', 'up') for w in ('kernel',
                                                                                    'bias'))
  r, d = SIZES['adapter'], CFG.hidden_size
  for k, v in _flat(trainable).items():
    want = {'kernel': (d, r) if k[-2] == 'down' else (r, d), 'bias': (r,) if k[-2] == 'down'
            else (d,)}[k[-1]]
    assert v.shape == want, k
    assert np.any(np.asarray(v)) == (k[-2:] == ('down', 'kernel')), k  # up and biases zero
  assert jax.tree.structure(frozen) == jax.tree.structure(_base())
  base_out = _fwd(CFG, output_hidden_states=True)(_base(), IDS)
  out = _fwd(cfg, output_hidden_states=True)(variables, IDS)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(base_out)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  moved = adapters.combine(_perturb(trainable, only='up'), frozen)
  diff = np.abs(np.asarray(_fwd(cfg)(moved, IDS)['logits'] - base_out['logits'])).max()
  assert diff > 1e-2, diff


def _np_rms(x, scale, eps):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * scale


def test_adapters_sit_on_each_sublayer_output_before_the_residual():
  cfg, variables = _peft('adapter', seed=3)
  out, state = Decoder(cfg).apply(variables, IDS, output_hidden_states=True,
                                  capture_intermediates=True, mutable=['intermediates'])
  inter = state['intermediates']['layers_0']
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), variables['params']['layers_0'])

  def adapter(name, x):
    a = p[name]
    z = x @ a['down']['kernel'] + a['down']['bias']
    z = z / (1 + np.exp(-z))  # silu, CFG.mlp_activation
    return x + z @ a['up']['kernel'] + a['up']['bias']

  h0 = np.asarray(out['hidden_states'][0], np.float64)
  attn = np.asarray(inter['attn']['__call__'][0][0], np.float64)
  mlp = np.asarray(inter['mlp']['__call__'][0], np.float64)
  h1 = h0 + adapter('attn_adapter', attn)
  np.testing.assert_allclose(
      np.asarray(inter['post_attn_norm']['__call__'][0]),
      _np_rms(h1, p['post_attn_norm']['scale'], cfg.rms_norm_eps), atol=1e-5)
  np.testing.assert_allclose(np.asarray(out['hidden_states'][1]),
                             h1 + adapter('mlp_adapter', mlp), atol=1e-5)


# ----------------------------------------------------------------------------- prefix tuning


def _np_rope(x_BxTxNxH, theta):
  h = x_BxTxNxH.shape[-1]
  inv = 1.0 / theta ** (np.arange(0, h, 2) / h)
  ang = np.arange(x_BxTxNxH.shape[1])[:, None] * inv
  ang = np.concatenate([ang, ang], -1)[None, :, None, :]
  x1, x2 = np.split(x_BxTxNxH, 2, axis=-1)
  return x_BxTxNxH * np.cos(ang) + np.concatenate([-x2, x1], -1) * np.sin(ang)


@pytest.mark.parametrize('explicit', [False, True])
def test_prefix_attention_matches_numpy(explicit):
  """Layer 0's attention by hand: RoPE'd real keys, unrotated prefix keys seen by every query,
  causal and padding masks on the real keys only."""
  cfg, variables = _peft('prefix', seed=4)
  out, state = Decoder(cfg).apply(variables, IDS, attention_mask=RIGHT_PAD,
                                  output_attentions=explicit, capture_intermediates=True,
                                  mutable=['intermediates'])
  inter = state['intermediates']['layers_0']
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), variables['params']['layers_0']['attn'])
  x = np.asarray(inter['input_norm']['__call__'][0], np.float64)
  n, k, h, pl = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.prefix_len
  q = _np_rope((x @ p['q_proj']['kernel']).reshape(B, T, n, h), cfg.rope_theta)
  keys = _np_rope((x @ p['k_proj']['kernel']).reshape(B, T, k, h), cfg.rope_theta)
  vals = (x @ p['v_proj']['kernel']).reshape(B, T, k, h)
  keys = np.concatenate([np.broadcast_to(p['prefix_k'], (B, pl, k, h)), keys], 1)
  vals = np.concatenate([np.broadcast_to(p['prefix_v'], (B, pl, k, h)), vals], 1)
  keys, vals = np.repeat(keys, n // k, 2), np.repeat(vals, n // k, 2)
  scores = np.einsum('btnh,bsnh->bnts', q, keys) / np.sqrt(h)
  real = np.tril(np.ones((T, T), bool))[None] & (
      np.asarray(RIGHT_PAD, bool)[:, None, :] | np.eye(T, dtype=bool))  # attend_self
  allowed = np.concatenate([np.ones((B, T, pl), bool), real], -1)[:, None]
  scores = np.where(allowed, scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  attn = np.einsum('bnts,bsnh->btnh', probs, vals).reshape(B, T, n * h) @ p['o_proj']['kernel']
  np.testing.assert_allclose(np.asarray(inter['attn']['__call__'][0][0]), attn, atol=1e-5)
  if explicit:  # the real-key columns, rows short of 1 by the prefix's share
    np.testing.assert_allclose(np.asarray(out['attentions'][0]), probs[..., pl:], atol=1e-6)


@pytest.mark.parametrize('method', ['prefix', 'prompt'])
def test_packed_equals_separate(method):
  """Segment masks apply to real keys; the prefix / prompt is seen by every segment."""
  cfg, variables = _peft(method, seed=5)
  packed = (IDS * 3 + 1) % 64
  out = _fwd(cfg)(variables, packed, **SEGMENTS)['logits']
  for row, start, end in [(0, 0, 5), (0, 5, 8), (1, 0, 3), (1, 3, 6)]:
    alone = jnp.zeros((B, T), jnp.int32).at[0, :end - start].set(packed[row, start:end])
    mask = jnp.zeros((B, T), jnp.int32).at[0, :end - start].set(1).at[1].set(1)
    ref = _fwd(cfg)(variables, alone, attention_mask=mask)['logits']
    np.testing.assert_allclose(out[row, start:end], ref[0, :end - start], atol=1e-5)


def test_prefix_visible_past_the_sliding_window_and_fused_equals_explicit():
  cfg, variables = _peft('prefix', dataclasses.replace(CFG, sliding_window=3), seed=6)
  fused = _fwd(cfg)(variables, IDS, attention_mask=RIGHT_PAD)['logits']
  explicit = _fwd(cfg, output_attentions=True)(variables, IDS, attention_mask=RIGHT_PAD)
  np.testing.assert_allclose(np.asarray(fused), np.asarray(explicit['logits']), atol=1e-5)
  probs = np.asarray(explicit['attentions'][0])  # [B, N, T, T] real keys
  assert not np.any(np.tril(np.ones((T, T)), -3)[None, None] * probs)  # window on real keys
  assert np.all(probs.sum(-1) < 1 - 1e-3)  # every row gives mass to the prefix


def test_prefix_always_takes_the_xla_kernel():
  cfg = dataclasses.replace(CFG, prefix_len=2, attention_impl='cudnn', dtype='bfloat16')
  assert attention_lib.attention_impl(cfg, jnp.bfloat16, None, True) == 'xla'
  # On a CPU the cuDNN kernel would fail to compile.
  assert _fwd(cfg)(_base(cfg), IDS)['logits'].shape == (B, T, CFG.vocab_size)


# ----------------------------------------------------------------------------- prompt tuning

FAMILIES = {
    'llama': {},
    'gemma_tied': dict(tie_embeddings=True, embed_scale=True, norm_offset=1.0),
    'gpt2_learned': dict(positions='learned', norm='layer', mlp_gated=False, qkv_bias=True,
                         mlp_activation='gelu_tanh'),
}


def _as_extra_tokens(cfg, variables):
  """A base Decoder whose tokens V..V+P-1 embed as the prompt (LM head zero-padded)."""
  v, pl = cfg.vocab_size, cfg.prompt_len
  params = dict(variables['params'])
  prompt = params.pop('prompt')
  params['embed'] = {'embedding': jnp.concatenate([params['embed']['embedding'], prompt], 0)}
  if not cfg.tie_embeddings:
    kernel = params['lm_head']['kernel']
    params['lm_head'] = {'kernel': jnp.pad(kernel, ((0, 0), (0, pl)))}
  return dataclasses.replace(cfg, vocab_size=v + pl, prompt_len=0), {'params': params}


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_prompt_equals_base_on_prepended_tokens(family):
  cfg, variables = _peft('prompt', dataclasses.replace(CFG, **FAMILIES[family]), seed=7)
  ref_cfg, ref_vars = _as_extra_tokens(cfg, variables)
  pl = cfg.prompt_len
  flags = dict(output_hidden_states=True, output_attentions=True, output_qkv=True)
  out = _fwd(cfg, **flags)(variables, IDS, attention_mask=RIGHT_PAD)
  prompt_ids = jnp.broadcast_to(CFG.vocab_size + jnp.arange(pl, dtype=jnp.int32), (B, pl))
  ref = _fwd(ref_cfg, **flags)(ref_vars, jnp.concatenate([prompt_ids, IDS], 1),
                              attention_mask=jnp.concatenate([jnp.ones((B, pl), jnp.int32),
                                                              RIGHT_PAD], 1))
  close = functools.partial(np.testing.assert_allclose, atol=2e-5, rtol=1e-5)
  close(out['logits'], ref['logits'][:, pl:, :CFG.vocab_size])
  close(out['hidden'], ref['hidden'][:, pl:])
  assert len(out['hidden_states']) == len(ref['hidden_states'])
  for a, b in zip(out['hidden_states'], ref['hidden_states']):
    close(a, b[:, pl:])
  for a, b in zip(out['attentions'], ref['attentions']):
    close(a, b[:, :, pl:, pl:])
  for a, b in zip(out['qkv'], ref['qkv']):
    for name in 'qkv':
      close(a[name], b[name][:, pl:])
  # The LM head alone on the (sliced) hidden states, and the fused kernel.
  close(Decoder(cfg).apply(variables, out['hidden'], method='project'), out['logits'])
  hidden = _fwd(cfg, return_hidden_only=True)(variables, IDS, attention_mask=RIGHT_PAD)
  assert 'logits' not in hidden and hidden['hidden'].shape == (B, T, CFG.hidden_size)
  close(hidden['hidden'], out['hidden'])


def test_prompt_sampled_vocab_init_is_real_token_embeddings():
  cfg, variables = _peft('prompt')
  table = np.asarray(variables['params']['embed']['embedding'])
  rows = np.asarray(variables['params']['prompt'])
  ids = [int(np.flatnonzero((table == r).all(-1))[0]) for r in rows]
  base = _fwd(CFG)(_base(), jnp.concatenate([jnp.broadcast_to(jnp.array(ids), (B, 3)), IDS], 1))
  np.testing.assert_allclose(_fwd(cfg)(variables, IDS)['logits'], base['logits'][:, 3:],
                             atol=2e-5)


def test_prompt_refuses_overlong_inputs():
  cfg, variables = _peft('prompt')
  with pytest.raises(ValueError, match=r'14 \+ prompt_len 3 exceeds max_seq_len=16'):
    Decoder(cfg).apply(variables, jnp.zeros((1, 14), jnp.int32))


# ----------------------------------------------------------------------------- KV cache


@pytest.mark.parametrize('method,window', [('adapter', None), ('prefix', None), ('prompt', None),
                                           ('prompt', 2)])
def test_cached_decoding_equals_full_forward(method, window):
  """Prefill + one token at a time, and generate, against full forwards (for the prompt: the
  learned prompt enters the cache on the first call; a sliding window never hides it)."""
  cfg, variables = _peft(method, dataclasses.replace(CFG, sliding_window=window), seed=8)
  mask = jnp.array([[1] * T, [0] * 3 + [1] * (T - 3)], jnp.int32)  # left-padded
  positions = kv_cache.default_positions(jnp.zeros((B, 0), bool), mask)
  full = _fwd(cfg)(variables, IDS, attention_mask=mask, positions=positions)['logits']
  apply, t0 = _fwd(cfg), 5
  out = _fwd(cfg, prefill=True)(variables, IDS[:, :t0], attention_mask=mask[:, :t0],
                                cache=kv_cache.init_cache(cfg, B, T))
  real = np.asarray(mask[:, :t0], bool)
  np.testing.assert_allclose(np.asarray(out['logits'])[real], np.asarray(full[:, :t0])[real],
                             atol=1e-5)
  for i in range(t0, T):
    out = apply(variables, IDS[:, i:i + 1], cache=out['cache'])
    np.testing.assert_allclose(out['logits'][:, 0], full[:, i], atol=1e-5)
  # generate: greedy equals an argmax loop over full forwards.
  n, t = 3, 5
  new = np.asarray(sample.generate((Decoder(cfg), variables), IDS[:, :t], mask[:, :t],
                                   max_new_tokens=n, temperature=0.0))
  ids, m = np.zeros((B, t + n), np.int32), np.zeros((B, t + n), np.int32)
  ids[:, :t], m[:, :t] = IDS[:, :t], mask[:, :t]
  for i in range(n):
    pos = kv_cache.default_positions(jnp.zeros((B, 0), bool), jnp.asarray(m))
    logits = _fwd(cfg)(variables, jnp.asarray(ids), attention_mask=jnp.asarray(m),
                       positions=pos)['logits']
    ids[:, t + i], m[:, t + i] = np.argmax(np.asarray(logits[:, t + i - 1]), -1), 1
  np.testing.assert_array_equal(new, ids[:, t:])


# ----------------------------------------------------------------------------- split / combine


@pytest.mark.parametrize('method', sorted(SIZES))
def test_gradients_reach_only_the_peft_params(method):
  cfg, variables = _peft(method, dataclasses.replace(CFG, remat=True))
  trainable, frozen = adapters.split(method, variables)
  assert all(adapters.is_trainable(method, k) for k in _flat(trainable))
  assert not any(adapters.is_trainable(method, k) for k in _flat(frozen))
  assert jax.tree.structure(frozen) == jax.tree.structure(_base())

  @jax.jit
  def grads(trainable, frozen):
    def loss(trainable):
      logits = Decoder(cfg).apply(adapters.combine(trainable, frozen), IDS,
                                  attention_mask=RIGHT_PAD)['logits']
      return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])
    return jax.grad(loss)(trainable)

  g = grads(trainable, frozen)
  assert jax.tree.structure(g) == jax.tree.structure(trainable)
  for k, v in _flat(g).items():
    assert np.all(np.isfinite(v)), k
    # While `up` is zero nothing flows back into `down` (as LoRA's A while B is zero).
    assert np.any(np.asarray(v)) == ('down' not in k), k
  if method == 'adapter':
    moved = _perturb(trainable, only='up')
    assert all(np.any(np.asarray(v)) for v in jax.tree.leaves(grads(moved, frozen)))


def test_split_combine_strip_and_all_three_together():
  cfg, variables = CFG, _base()
  for method in ('adapter', 'prefix', 'prompt'):
    cfg, variables = adapters.add_peft_params(cfg, variables, method, SIZES[method],
                                              jax.random.key(4))
  assert (cfg.adapter_size, cfg.prefix_len, cfg.prompt_len) == (4, 3, 3)
  all_three = ('adapter', 'prefix', 'prompt')
  trainable, frozen = adapters.split(all_three, variables)
  assert {k[-1] for k in _flat(trainable)} >= {'prefix_k', 'prefix_v', 'prompt'}
  back = adapters.combine(trainable, frozen)
  assert jax.tree.structure(back) == jax.tree.structure(variables)
  with pytest.raises(ValueError, match='overlap'):
    adapters.combine(trainable, variables)
  out = _fwd(cfg)(variables, IDS, attention_mask=RIGHT_PAD)['logits']
  assert out.shape == (B, T, CFG.vocab_size) and np.all(np.isfinite(np.asarray(out)))
  # strip: the plain base tree and the base model again.
  base = adapters.strip(all_three, variables)
  assert jax.tree.structure(base) == jax.tree.structure(_base())
  np.testing.assert_array_equal(_fwd(CFG)(base, IDS)['logits'], _fwd(CFG)(_base(), IDS)['logits'])
  prompt_only = adapters.strip(('adapter', 'prefix'), variables)
  assert 'prompt' in prompt_only['params'] and 'attn_adapter' not in prompt_only['params'][
      'layers_0']
  assert adapters.is_trainable('prompt', ('params', 'prompt'))
  assert not adapters.is_trainable('adapter', ('params', 'layers_0', 'mlp', 'up_proj', 'kernel'))


def test_hf_save_and_load_round_trip_all_three(tmp_path):
  """kd.hf.save writes the base llama checkpoint and the adapter, prefix and prompt params
  beside it; kd.hf.load gives the same model back (the same logits)."""
  import json  # pylint: disable=g-import-not-at-top
  import kd.hf  # pylint: disable=g-import-not-at-top
  from kd.models import Model  # pylint: disable=g-import-not-at-top
  cfg, variables = CFG, _base()
  for method in ('adapter', 'prefix', 'prompt'):
    cfg, variables = adapters.add_peft_params(cfg, variables, method, SIZES[method],
                                              jax.random.key(4))
  trainable, frozen = adapters.split(('adapter', 'prefix', 'prompt'), variables)
  variables = adapters.combine(_perturb(trainable, 5), frozen)
  kd.hf.save(Model(Decoder(cfg), variables), str(tmp_path))
  with open(tmp_path / 'config.json') as f:
    assert json.load(f)['kd_peft'] == {'adapter_size': 4, 'prefix_len': 3, 'prompt_len': 3}
  loaded = kd.hf.load(str(tmp_path))
  assert loaded.config == cfg
  np.testing.assert_allclose(_fwd(cfg)(loaded.params, IDS, attention_mask=RIGHT_PAD)['logits'],
                             _fwd(cfg)(variables, IDS, attention_mask=RIGHT_PAD)['logits'],
                             atol=1e-6)
  with open(tmp_path / 'config.json') as f:
    hf_config = json.load(f)
  del hf_config['kd_peft']
  with open(tmp_path / 'config.json', 'w') as f:
    json.dump(hf_config, f)
  base = kd.hf.load(str(tmp_path))  # without config.json's entry: the base model
  np.testing.assert_array_equal(_fwd(CFG)(base.params, IDS)['logits'],
                                _fwd(CFG)(_base(), IDS)['logits'])


def test_all_three_on_scanned_layers(tmp_path):
  """scan_layers: adapters and prefixes grow stacked under `layers`; the scanned model equals
  the unrolled one on the same values; kd.hf saves it per layer and loads it stacked again."""
  import kd.hf  # pylint: disable=g-import-not-at-top
  from kd.models import Model  # pylint: disable=g-import-not-at-top
  cfg, variables = dataclasses.replace(CFG, scan_layers=True), models.stack_layers(_base())
  for method in ('adapter', 'prefix', 'prompt'):
    cfg, variables = adapters.add_peft_params(cfg, variables, method, SIZES[method],
                                              jax.random.key(4))
  flat = {'/'.join(k): v.shape for k, v in _flat(variables).items()}
  assert flat['params/layers/attn_adapter/down/kernel'] == (2, 32, 4)
  assert flat['params/layers/attn/prefix_k'] == (2, 3, 2, 8)
  trainable, frozen = adapters.split(('adapter', 'prefix', 'prompt'), variables)
  variables = adapters.combine(_perturb(trainable, 5), frozen)
  unrolled = dataclasses.replace(cfg, scan_layers=False)
  want = _fwd(unrolled)(models.unstack_layers(variables), IDS, attention_mask=RIGHT_PAD)['logits']
  got = _fwd(cfg)(variables, IDS, attention_mask=RIGHT_PAD)['logits']
  np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-5)
  kd.hf.save(Model(Decoder(cfg), variables), str(tmp_path))
  loaded = kd.hf.load(str(tmp_path), scan_layers=True)
  assert loaded.config == cfg
  jax.tree.map(np.testing.assert_array_equal, loaded.params, variables)


def test_round_trip_of_the_new_config_fields():
  cfg = dataclasses.replace(CFG, adapter_size=4, prefix_len=2, prompt_len=3)
  assert DecoderConfig.from_dict(cfg.to_dict()) == cfg
  # The defaults (0) leave the base tree as it was: no PEFT params at all.
  assert not any(adapters.is_trainable(('adapter', 'prefix', 'prompt'), k) for k in _flat(_base()))


@pytest.mark.parametrize('overrides, message', [
    (dict(adapter_size=-1), 'adapter_size must be an int >= 0'),
    (dict(prefix_len=-2), 'prefix_len must be an int >= 0'),
    (dict(prompt_len=1.5), 'prompt_len must be an int >= 0'),
    (dict(adapter_size=True), 'adapter_size must be an int >= 0'),
    (dict(prompt_len=16), 'prompt_len=16 leaves no room'),
])
def test_bad_configs_say_what_to_do(overrides, message):
  with pytest.raises(ValueError, match=message):
    dataclasses.replace(CFG, **overrides)


def test_bad_peft_calls_say_what_to_do():
  base, key = _base(), jax.random.key(0)
  with pytest.raises(ValueError, match=r"not supported; use one of \['adapter', 'prefix'"):
    adapters.split('lora', base)
  with pytest.raises(ValueError, match='positive int'):
    adapters.add_peft_params(CFG, base, 'adapter', 0, key)
  with pytest.raises(ValueError, match='one method at a time'):
    adapters.add_peft_params(CFG, base, ('adapter', 'prefix'), 2, key)
  cfg, variables = _peft('adapter')
  with pytest.raises(ValueError, match='already has adapter_size=4'):
    adapters.add_peft_params(cfg, variables, 'adapter', 2, key)
  with pytest.raises(ValueError, match='do not match model_config'):
    adapters.add_peft_params(CFG, variables, 'prefix', 2, key)  # base already has adapters
  with pytest.raises(ValueError, match='prompt_init'):
    adapters.add_peft_params(CFG, base, 'prompt', 2, key, prompt_init='zeros')


@pytest.mark.parametrize('method', sorted(SIZES))
def test_bfloat16_compute_keeps_the_dtype(method):
  cfg, variables = _peft(method, dataclasses.replace(CFG, dtype='bfloat16'), seed=9)
  logits = _fwd(cfg)(variables, IDS, attention_mask=RIGHT_PAD)['logits']
  assert logits.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(logits, np.float32)))


@pytest.mark.parametrize('field', ['adapter_size', 'prefix_len', 'prompt_len'])
def test_the_family_converter_refuses_what_a_checkpoint_cannot_hold(field):
  """config_to_hf alone has no place for PEFT fields (kd.hf.save splits them off first)."""
  from kd.hf import decoders as hf_decoders  # pylint: disable=g-import-not-at-top
  cfg = DecoderConfig(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                      intermediate_size=32, max_seq_len=32)
  hf_decoders.config_to_hf(cfg)  # the plain model exports
  with pytest.raises(ValueError, match=f"{field}.*kd.hf.save writes them beside it"):
    hf_decoders.config_to_hf(dataclasses.replace(cfg, **{field: 2}))
