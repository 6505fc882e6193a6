"""KV cache and generation: cached decoding equals the full forward, greedy equals transformers."""

import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from kd import hf  # pylint: disable=g-import-not-at-top,wrong-import-position
from kd.models import cache as kv_cache  # pylint: disable=g-import-not-at-top,wrong-import-position
from kd.models import sample  # pylint: disable=g-import-not-at-top,wrong-import-position

V = 97
ROPE = dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=96, max_position_embeddings=64,
            bos_token_id=1, eos_token_id=None, pad_token_id=0)
CONFIGS = {
    'llama': ('LlamaConfig', ROPE),
    'mistral': ('MistralConfig', dict(ROPE, sliding_window=4)),  # prompt + new > window
    'qwen3': ('Qwen3Config', dict(ROPE, head_dim=32)),
    'gpt2': ('GPT2Config', dict(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                bos_token_id=1, eos_token_id=None, pad_token_id=0)),
}

# Two left-padded prompts: row 1 has 3 pads.
PROMPT = np.array([[5, 17, 42, 8, 3, 60, 11], [0, 0, 0, 23, 9, 71, 30]])
PROMPT_MASK = np.array([[1] * 7, [0, 0, 0, 1, 1, 1, 1]])
N = 10


@pytest.fixture(scope='module')
def models(tmp_path_factory):
  """name -> (transformers model, kd Model), random with perturbed norms and biases."""
  root = tmp_path_factory.mktemp('ckpt')
  out = {}
  for name, (cls_name, kwargs) in CONFIGS.items():
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(
        getattr(transformers, cls_name)(**kwargs, attn_implementation='eager')).eval()
    with torch.no_grad():
      for pname, p in ref.named_parameters():
        if 'norm' in pname or 'ln_' in pname or pname.endswith('bias'):
          p.add_(0.3 * torch.randn_like(p))
    ref.save_pretrained(os.path.join(root, name))
    out[name] = (ref, hf.load(os.path.join(root, name)))
  return out


def _hf_greedy(ref, eos_id=None):
  ref.generation_config.eos_token_id = eos_id
  with torch.no_grad():
    out = ref.generate(torch.tensor(PROMPT), attention_mask=torch.tensor(PROMPT_MASK),
                       max_new_tokens=N, do_sample=False, pad_token_id=0, eos_token_id=eos_id)
  return out[:, PROMPT.shape[1]:].numpy()


def _tokens_per_s(fn, num_tokens):
  """Prints generation throughput after a compile-warming call; not asserted."""
  jax.block_until_ready(fn())
  start = time.perf_counter()
  jax.block_until_ready(fn())
  rate = num_tokens / (time.perf_counter() - start)
  print(f'  {rate:.0f} tokens/s')
  return rate


@pytest.mark.parametrize('name', ['llama', 'gpt2'])
def test_greedy_matches_transformers_generate(models, name):
  ref, model = models[name]
  ours = np.asarray(sample.generate(model, PROMPT, PROMPT_MASK, max_new_tokens=N,
                                    temperature=0.0))
  np.testing.assert_array_equal(ours, _hf_greedy(ref))
  print(name, end='')
  _tokens_per_s(lambda: sample.generate(model, PROMPT, PROMPT_MASK, max_new_tokens=N,
                                        temperature=0.0), PROMPT.shape[0] * N)


def test_scanned_layers_generate_like_transformers(models):
  """scan_layers=True: the stacked KV cache through the scan, a sliding window that the prompt
  plus the new tokens pass; greedy tokens equal transformers'."""
  ref, model = models['mistral']
  scanned = hf.load(model.source, scan_layers=True)
  assert scanned.config.scan_layers
  ours = np.asarray(sample.generate(scanned, PROMPT, PROMPT_MASK, max_new_tokens=N,
                                    temperature=0.0))
  np.testing.assert_array_equal(ours, _hf_greedy(ref))


def test_eos_stops_rows_like_transformers(models):
  ref, model = models['llama']
  free = np.asarray(sample.generate(model, PROMPT, PROMPT_MASK, max_new_tokens=N,
                                    temperature=0.0))
  eos = int(free[0, 2])  # row 0 stops after its third token
  ours = np.asarray(sample.generate(model, PROMPT, PROMPT_MASK, max_new_tokens=N,
                                    temperature=0.0, eos_id=eos, pad_id=0))
  theirs = _hf_greedy(ref, eos_id=eos)
  np.testing.assert_array_equal(ours[:, :theirs.shape[1]], theirs)
  assert (ours[:, theirs.shape[1]:] == 0).all()
  first = int(np.argmax(free[0] == eos))
  assert (ours[0, first + 1:] == 0).all() and ours[0, first] == eos
  # Several stop tokens (transformers takes a list too): a row stops at the first of any.
  stops = [int(free[1, 1]), eos]
  ours = np.asarray(sample.generate(model, PROMPT, PROMPT_MASK, max_new_tokens=N,
                                    temperature=0.0, eos_id=stops, pad_id=0))
  theirs = _hf_greedy(ref, eos_id=stops)
  np.testing.assert_array_equal(ours[:, :theirs.shape[1]], theirs)
  assert (ours[:, theirs.shape[1]:] == 0).all()
  assert ours[1, 1] == stops[0] and (ours[1, 2:] == 0).all()


def _full_forward_greedy(model, n):
  """Greedy decoding without a cache: one fixed-shape full forward per token."""
  b, t = PROMPT.shape
  ids = np.zeros((b, t + n), np.int32)
  mask = np.zeros((b, t + n), np.int32)
  ids[:, :t], mask[:, :t] = PROMPT, PROMPT_MASK
  forward = jax.jit(model.apply)
  for i in range(n):
    positions = kv_cache.default_positions(jnp.zeros((b, 0), bool), jnp.asarray(mask))
    logits = forward(model.params, jnp.asarray(ids), attention_mask=jnp.asarray(mask),
                     positions=positions)['logits']
    ids[:, t + i] = np.argmax(np.asarray(logits[:, t + i - 1]), -1)
    mask[:, t + i] = 1
  return ids[:, t:]


def test_greedy_equals_full_forward_argmax_loop(models):
  _, model = models['llama']
  ours = np.asarray(sample.generate(model, PROMPT, PROMPT_MASK, max_new_tokens=N,
                                    temperature=0.0))
  np.testing.assert_array_equal(ours, _full_forward_greedy(model, N))


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_cached_steps_equal_full_forward(models, name):
  """Prefill the prompt, then feed tokens one by one: the same logits as one full forward."""
  _, model = models[name]
  b, t = PROMPT.shape
  extra = np.random.RandomState(1).randint(0, V, (b, 6))
  ids = jnp.asarray(np.concatenate([PROMPT, extra], 1))
  mask = jnp.asarray(np.concatenate([PROMPT_MASK, np.ones_like(extra)], 1))
  positions = kv_cache.default_positions(jnp.zeros((b, 0), bool), mask)
  full = model.apply(model.params, ids, attention_mask=mask, positions=positions)['logits']

  apply = jax.jit(model.apply)
  cache = kv_cache.init_cache(model.config, b, ids.shape[1])
  out = apply(model.params, ids[:, :t], attention_mask=mask[:, :t], cache=cache)
  real = PROMPT_MASK.astype(bool)
  np.testing.assert_allclose(np.asarray(out['logits'])[real], np.asarray(full[:, :t])[real],
                             atol=1e-4, rtol=1e-4)
  cache = out['cache']
  for i in range(t, ids.shape[1]):
    out = apply(model.params, ids[:, i:i + 1], cache=cache)
    cache = out['cache']
    np.testing.assert_allclose(out['logits'][:, 0], full[:, i], atol=1e-4, rtol=1e-4)
  assert int(cache['index']) == ids.shape[1]
  np.testing.assert_array_equal(cache['mask'], mask.astype(bool))


def test_sampling_filters_and_determinism(models):
  _, model = models['llama']
  kw = dict(max_new_tokens=N, rng=jax.random.key(3))
  greedy = np.asarray(sample.generate(model, PROMPT, PROMPT_MASK, max_new_tokens=N,
                                      temperature=0.0))
  np.testing.assert_array_equal(sample.generate(model, PROMPT, PROMPT_MASK, top_k=1, **kw),
                                greedy)
  # One compiled program (temperature and top_p are traced): a tiny nucleus is greedy, a wide
  # one at a high temperature samples, reproducibly for one rng.
  hot = functools.partial(sample.generate, model, PROMPT, PROMPT_MASK, temperature=2.0, **kw)
  np.testing.assert_array_equal(hot(top_p=1e-6), greedy)
  a = np.asarray(hot(top_p=0.999))
  np.testing.assert_array_equal(a, hot(top_p=0.999))
  assert a.shape == (2, N) and (a != greedy).any()

  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  keep = lambda **kw: np.isfinite(np.asarray(sample.filter_logits(logits, **kw)))[0].tolist()
  assert keep(top_k=2) == [True, True, False, False]
  assert keep(top_p=0.5) == [True, False, False, False]
  assert keep(top_p=0.7) == [True, True, False, False]
  assert keep(top_p=0.9) == [True, True, True, False]
  assert keep(top_k=3, top_p=0.99) == [True, True, True, False]


def test_generate_errors(models):
  _, model = models['llama']
  with pytest.raises(ValueError, match='left-padded'):
    sample.generate(model, PROMPT, PROMPT_MASK[:, ::-1], max_new_tokens=2, temperature=0.0)
  with pytest.raises(ValueError, match='needs rng'):
    sample.generate(model, PROMPT, max_new_tokens=2)
  with pytest.raises(ValueError, match='exceeds max_seq_len'):
    sample.generate(model, PROMPT, max_new_tokens=64, temperature=0.0)
