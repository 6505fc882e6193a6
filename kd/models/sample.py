"""Batched autoregressive generation with a KV cache, compiled once per shape and setting.

  new_BxN = generate(model, prompt_ids_BxT, prompt_mask_BxT, max_new_tokens=32, temperature=0.0)

Prompts are left-padded to one length (the last column is real for every row). The prompt is
run once (prefill), then one token per `lax.while_loop` step, which stops early when every row
has produced `eos_id`. Temperature 0 is greedy and matches transformers'
`generate(do_sample=False)`; otherwise top-k, then top-p (nucleus) filtering, then sampling
with `jax.random.fold_in(rng, step)`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kd.models import cache as kv_cache


def filter_logits(logits_BxV, top_k: int = 0, top_p=None):
  """Logits with everything outside the top-k, then outside the top-p mass, set to -inf.

  top_k: static int, 0 = off. top_p: None = off, else a (possibly traced) float; keeps the
  smallest set of most likely tokens whose probability reaches top_p (at least one token).
  """
  logits_BxV = logits_BxV.astype(jnp.float32)
  if top_k > 0:
    kth_Bx1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
  if top_p is not None:
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    kept_BxV = mass_before_BxV < top_p  # the first token always: its mass before is 0
    cutoff_Bx1 = jnp.min(jnp.where(kept_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
    logits_BxV = jnp.where(logits_BxV < cutoff_Bx1, -jnp.inf, logits_BxV)
  return logits_BxV


def _next_token(logits_BxV, rng, temperature, top_p, *, greedy: bool, top_k: int,
                use_top_p: bool):
  if greedy:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits_BxV = logits_BxV.astype(jnp.float32) / temperature
  if top_k > 0:
    logits_BxV = filter_logits(logits_BxV, top_k=top_k)
  if use_top_p:
    logits_BxV = filter_logits(logits_BxV, top_p=top_p)
  return jax.random.categorical(rng, logits_BxV, axis=-1).astype(jnp.int32)


# Static: what changes the program. Traced: temperature, top_p, eos and pad ids (no recompiles).
@functools.partial(jax.jit, static_argnames=('module', 'max_new_tokens', 'greedy', 'top_k',
                                             'use_top_p', 'use_eos'))
def decode(module, params, prompt_ids_BxT, prompt_mask_BxT, rng, temperature, top_p, eos_id,
           pad_id, *, max_new_tokens: int, greedy: bool, top_k: int, use_top_p: bool,
           use_eos: bool):
  """The compiled prefill + decode loop behind `generate` (unchecked; see `settings`)."""
  b, t = prompt_ids_BxT.shape
  n = max_new_tokens
  cache = kv_cache.init_cache(module.config, b, t + n)
  pick = functools.partial(_next_token, greedy=greedy, top_k=top_k, use_top_p=use_top_p)

  def step(ids_BxT, mask_BxT, cache, **kw):
    out = module.apply(params, ids_BxT, attention_mask=mask_BxT, cache=cache,
                       return_hidden_only=True, **kw)
    logits_BxV = module.apply(params, out['hidden'][:, -1], method='project')
    return logits_BxV, out['cache']

  # A prompt-tuned decoder writes its learned prompt into the cache's first slots.
  prefill = {'prefill': True} if getattr(module.config, 'prompt_len', 0) else {}
  logits_BxV, cache = step(prompt_ids_BxT, prompt_mask_BxT, cache, **prefill)

  def cond(carry):
    i, _, _, _, done_B = carry
    return (i < n) & ~jnp.all(done_B)

  def body(carry):
    i, cache, logits_BxV, tokens_BxN, done_B = carry
    token_B = pick(logits_BxV, jax.random.fold_in(rng, i), temperature, top_p)
    token_B = jnp.where(done_B, pad_id, token_B)
    if use_eos:  # eos_id: [K] stop tokens
      done_B = done_B | jnp.any(token_B[:, None] == eos_id[None, :], axis=-1)
    tokens_BxN = jax.lax.dynamic_update_slice(tokens_BxN, token_B[:, None], (0, i))
    logits_BxV, cache = step(token_B[:, None], jnp.ones((b, 1), jnp.int32), cache)
    return i + 1, cache, logits_BxV, tokens_BxN, done_B

  tokens_BxN = jnp.full((b, n), pad_id, jnp.int32)
  carry = (jnp.zeros((), jnp.int32), cache, logits_BxV, tokens_BxN, jnp.zeros((b,), bool))
  return jax.lax.while_loop(cond, body, carry)[3]


def module_and_params(model):
  """(module, variables) of a kd `Model` or of a (module, variables) pair."""
  return (model.module, model.params) if hasattr(model, 'module') else model


def check_prompts(prompt_ids, prompt_mask, *, max_new_tokens: int, temperature: float,
                  top_k: int, top_p: float, rng) -> tuple[np.ndarray, np.ndarray, jax.Array]:
  """(ids, mask, rng) as host arrays and a key, after the checks `generate` documents."""
  prompt_ids = np.asarray(prompt_ids, np.int32)
  prompt_mask = (np.ones_like(prompt_ids) if prompt_mask is None
                 else np.asarray(prompt_mask, np.int32))
  if prompt_mask.shape != prompt_ids.shape:
    raise ValueError(f'prompt_mask shape {prompt_mask.shape} != prompt_ids shape '
                     f'{prompt_ids.shape}.')
  if not np.all(prompt_mask[:, -1]):
    raise ValueError('prompts must be left-padded: the last column of prompt_mask must be 1 for '
                     'every row (pad on the left, e.g. tokenizer.padding_side = "left").')
  if max_new_tokens <= 0:
    raise ValueError(f'max_new_tokens must be > 0, got {max_new_tokens}.')
  if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
    raise ValueError(f'need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, '
                     f'{top_p}, {top_k}.')
  if rng is None:
    if temperature > 0:
      raise ValueError('sampling (temperature > 0) needs rng=jax.random.key(...).')
    rng = jax.random.key(0)
  return prompt_ids, prompt_mask, rng


def stop_ids(eos_id) -> jax.Array:
  """eos_id (None, one id or several) as an int32 vector [K] (K >= 1; [-1] when None)."""
  ids = np.atleast_1d(np.asarray(-1 if eos_id is None else eos_id, np.int32))
  if ids.ndim != 1 or ids.size == 0:
    raise ValueError(f'eos_id must be an int or a non-empty list of ints, got {eos_id!r}.')
  return jnp.asarray(ids)


def settings(*, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
             eos_id, pad_id: int) -> tuple[tuple, dict]:
  """(traced scalars, static keywords) of `decode` for these settings."""
  traced = (jnp.float32(temperature), jnp.float32(top_p),
            stop_ids(eos_id), jnp.int32(pad_id))
  static = dict(max_new_tokens=max_new_tokens, greedy=temperature == 0, top_k=int(top_k),
                use_top_p=top_p < 1.0, use_eos=eos_id is not None)
  return traced, static


def generate(model, prompt_ids, prompt_mask=None, *, max_new_tokens: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             eos_id=None, pad_id: int = 0, rng=None, place=None) -> jax.Array:
  """New tokens [B, max_new_tokens] after left-padded prompts; `pad_id` after a row's eos.

  Args:
    model: a kd `Model`, or a (decoder module, variables) pair.
    prompt_ids: [B, T] int ids, left-padded.
    prompt_mask: [B, T] 1 = real token; default all real. Its last column must be all 1.
    max_new_tokens: tokens generated per row.
    temperature: 0 for greedy decoding.
    top_k: keep only the k most likely tokens (0: all).
    top_p: keep the most likely tokens up to this probability mass (1: all).
    eos_id: a stop token, or a list of them (e.g. an instruction model's eos and end-of-turn);
      a row stops after producing one; the loop stops when every row has.
    pad_id: what fills a row after its eos.
    rng: a jax PRNG key for sampling (unused when greedy).
    place: `place((ids, mask))` puts the checked host prompts on the devices, e.g. a mesh plan's
      `shard_batch`, so rows, KV cache and sampling are split like a train batch (the result is
      then a global array); default: the default device.
  """
  module, params = module_and_params(model)
  ids, mask, rng = check_prompts(prompt_ids, prompt_mask, max_new_tokens=max_new_tokens,
                                 temperature=temperature, top_k=top_k, top_p=top_p, rng=rng)
  ids, mask = place((ids, mask)) if place is not None else (jnp.asarray(ids), jnp.asarray(mask))
  traced, static = settings(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                            top_p=top_p, eos_id=eos_id, pad_id=pad_id)
  return decode(module, params, ids, mask, rng, *traced, **static)
