"""Held-out perplexity of several decoders and their top-1 agreement with a reference (the
teacher), on fixed batches; the reference runs once, not once per model compared with it.

  stats = token_stats(module, params, batches)       # nll sum, token count, top-1 per token
  row = compare(stats, reference_stats)              # perplexity, agreement with the reference

Both sums are over the batches' `loss_mask` tokens, so the perplexity is exp(total NLL / total
tokens) over the whole set, never a mean of per-batch perplexities.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from kd import losses


@dataclasses.dataclass(frozen=True)
class TokenStats:
  nll: float  # summed over the masked tokens
  tokens: float
  top1: tuple  # per batch, int32 [B, T]: the model's most likely next token
  masks: tuple  # per batch, bool [B, T]: the tokens that count

  @property
  def perplexity(self) -> float:
    return math.exp(self.nll / max(self.tokens, 1.0))


@functools.partial(jax.jit, static_argnums=0)
def _batch_stats(module, params, batch):
  logits = module.apply(params, batch['input_ids'], segment_ids=batch.get('segment_ids'),
                        positions=batch.get('positions'),
                        attention_mask=batch.get('attention_mask'))['logits']
  nll, count = losses.ce_sum(logits, batch['labels'], mask=batch['loss_mask'])
  return nll, count, jnp.argmax(logits, -1).astype(jnp.int32)


def token_stats(module, params, batches) -> TokenStats:
  nll, tokens, top1, masks = 0.0, 0.0, [], []
  for batch in batches:
    s, c, t = jax.device_get(_batch_stats(module, params, batch))
    nll, tokens = nll + float(s), tokens + float(c)
    top1.append(np.asarray(t))
    masks.append(np.asarray(batch['loss_mask']) > 0)
  return TokenStats(nll, tokens, tuple(top1), tuple(masks))


def compare(stats: TokenStats, reference: TokenStats | None = None) -> dict:
  """{'perplexity', 'ce', 'tokens'} and, against `reference` on the same batches, 'agreement':
  the share of tokens where both models' top-1 next token is the same."""
  out = {'perplexity': stats.perplexity, 'ce': stats.nll / max(stats.tokens, 1.0),
         'tokens': stats.tokens}
  if reference is not None:
    same = sum(float(np.sum((a == b) & m))
               for a, b, m in zip(stats.top1, reference.top1, stats.masks))
    out['agreement'] = same / max(stats.tokens, 1.0)
  return out
