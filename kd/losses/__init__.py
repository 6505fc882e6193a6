"""Distillation losses: pure float32 functions returning (sum, count), and their registry.

Config names map to `Loss(name, fn_sum, kind)`; `kind` says what the loss consumes:
  'logits'    fn_sum(student_logits, teacher_logits, *, mask, temperature, **kw)
  'ce'        fn_sum(logits, labels, *, mask, label_smoothing)
  'hidden'    fn_sum(student_h, teacher_h, *, mask, projection)
  'attention' fn_sum(student_probs, teacher_probs, *, mask)
  'relation'  fn_sum(student_qkv, teacher_qkv, *, num_relation_heads, mask, relations)
  'embedding' fn_sum(student_emb_BxD, teacher_emb_BxD, *, mask)  (pooled sentence embeddings)
  'pairs'     fn_sum(student_emb_2BxD, scores_B, *, mask)  (labelled pairs, no teacher)
Reduce with `mean((sum, count))` or `weighted_total(...)` after summing (sum, count) pairs
across devices and accumulation steps, never by averaging means.
"""

import dataclasses
from typing import Callable

import jax.numpy as jnp

from kd.losses.attention import (ATTENTION_LOSSES, attention_kl, attention_kl_sum,
                                 attention_loss_sum, attention_mse, attention_mse_sum,
                                 minilm_relations, minilm_relations_sum, relation_sum)
from kd.losses.embeddings import (EMBEDDING_LOSSES, PAIR_LOSSES, cosine_score_mse_sum,
                                  embedding_cosine_sum, embedding_mse_sum,
                                  embedding_similarity_sum)
from kd.losses.features import (FEATURE_LOSSES, feature_loss_sum, hidden_cosine,
                                hidden_cosine_sum, hidden_mse, hidden_mse_sum, init_projection,
                                layer_map, project)
from kd.losses.chunked import chunked_logit_losses, fused_logit_losses
from kd.losses.fused_head import fused_head_kd, fused_head_losses
from kd.losses.closed_form import CLOSED_FORM, closed_form_applies
from kd.losses.logits import (DIVERGENCES, ce, ce_sum, jsd, jsd_per_token,
                              jsd_sum, kl, kl_from_log_probs, kl_per_token, kl_sum, masked_sum,
                              mean, reverse_kl, reverse_kl_per_token, reverse_kl_sum, skew_kl,
                              skew_kl_per_token, skew_kl_sum, skew_reverse_kl,
                              skew_reverse_kl_per_token, skew_reverse_kl_sum, tvd,
                              tvd_per_token, tvd_sum)

from kd.losses.topk import SEMANTICS as TOPK_SEMANTICS
from kd.losses.topk import (chunk_divergences as topk_chunk_divergences, topk_from_logits,
                            topk_kl_per_token, topk_kl_sum)

KINDS = ('logits', 'ce', 'hidden', 'attention', 'relation', 'embedding', 'pairs')


@dataclasses.dataclass(frozen=True)
class Loss:
  name: str
  fn_sum: Callable
  kind: str


# The same dict object the chunked path looks names up in, so registered 'logits' losses work
# there too.
LOGIT_LOSSES = DIVERGENCES

LOSSES = {name: Loss(name, fn, 'logits') for name, fn in LOGIT_LOSSES.items()}
LOSSES['ce'] = Loss('ce', ce_sum, 'ce')
LOSSES.update({name: Loss(name, fn, 'hidden') for name, fn in FEATURE_LOSSES.items()})
LOSSES['attention_kl'] = Loss('attention_kl', attention_kl_sum, 'attention')
LOSSES['attention_mse'] = Loss('attention_mse', attention_mse_sum, 'attention')
LOSSES['minilm_relations'] = Loss('minilm_relations', minilm_relations_sum, 'relation')
LOSSES.update({name: Loss(name, fn, 'embedding') for name, fn in EMBEDDING_LOSSES.items()})
LOSSES.update({name: Loss(name, fn, 'pairs') for name, fn in PAIR_LOSSES.items()})


def get(name):
  """The registered Loss called `name`, or a ValueError listing the valid names."""
  if name not in LOSSES:
    raise ValueError(f'unknown loss {name!r}; valid: {", ".join(sorted(LOSSES))}')
  return LOSSES[name]


def register(name, fn_sum, kind, *, override=False):
  """Adds a user loss returning (sum, count); see the module docstring for each kind's call."""
  if not isinstance(name, str) or not name:
    raise ValueError(f'loss name must be a non-empty str, got {name!r}.')
  if not callable(fn_sum):
    raise ValueError(f'fn_sum for {name!r} must be callable, got {fn_sum!r}.')
  if kind not in KINDS:
    raise ValueError(f'unknown kind {kind!r} for loss {name!r}; valid: {", ".join(KINDS)}.')
  if name in LOSSES and not override:
    raise ValueError(f'loss {name!r} is already registered; pass override=True to replace it.')
  LOSSES[name] = Loss(name, fn_sum, kind)
  if kind == 'logits':
    LOGIT_LOSSES[name] = fn_sum
  else:
    LOGIT_LOSSES.pop(name, None)
  return LOSSES[name]


def weighted_total(terms, weights):
  """terms {name: (sum, count)}, weights {name: float} -> (Σ w·sum/max(count,1), {name: mean})."""
  missing = sorted(set(terms) - set(weights))
  extra = sorted(set(weights) - set(terms))
  if missing or extra:
    raise ValueError(f'loss terms {sorted(terms)} and weights {sorted(weights)} must name the '
                     f'same losses (no weight for {missing}, no term for {extra}).')
  means = {name: mean(sc) for name, sc in terms.items()}
  total = jnp.zeros((), jnp.float32)
  for name, m in means.items():
    total = total + jnp.asarray(weights[name], jnp.float32) * m
  return total, means
