"""Several teachers as one: the weighted mixture of their next-token distributions.

`Ensemble(members, weights).apply(params_tuple, input_ids, ...)` returns
{'logits': log Σ_i w_i softmax(z_i)} (float32), so softmax of the ensemble's logits is the
mixture and every logit loss distils from it unchanged (at temperature T the loss sees
softmax(log p / T), the mixture sharpened or softened like a single teacher's distribution).
Members must share the vocabulary; each runs with its own params. Only logits are given: a
mixture has no hidden states or attention maps to match.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_UNSUPPORTED = ('output_hidden_states', 'output_attentions', 'output_qkv', 'return_hidden_only')


@dataclasses.dataclass(frozen=True)
class Ensemble:
  members: tuple[Any, ...]  # flax modules with .config.vocab_size (e.g. kd.models.Decoder)
  weights: tuple[float, ...]

  def __post_init__(self):
    object.__setattr__(self, 'members', tuple(self.members))
    object.__setattr__(self, 'weights', tuple(float(w) for w in self.weights))
    if len(self.members) < 1 or len(self.weights) != len(self.members):
      raise ValueError(f'{len(self.members)} members but {len(self.weights)} weights; give one '
                       'weight per teacher.')
    if any(w < 0 for w in self.weights) or not np.isclose(sum(self.weights), 1.0):
      raise ValueError(f'ensemble weights must be >= 0 and sum to 1, got {self.weights}.')
    vocabs = {m.config.vocab_size for m in self.members}
    if len(vocabs) > 1:
      raise ValueError(f'ensemble members have vocabularies {sorted(vocabs)}; they must share '
                       'one tokenizer and vocab_size.')

  @property
  def config(self):
    """The first member's config (vocab size, layer count) for code that asks a teacher."""
    return self.members[0].config

  def apply(self, variables, input_ids, **kwargs) -> dict[str, jax.Array]:
    wanted = sorted(k for k in _UNSUPPORTED if kwargs.pop(k, False))
    if wanted:
      raise ValueError(f'an ensemble teacher gives logits only, not {wanted}; use logit losses '
                       '(kl, jsd, ...) and chunk_size=0 with several teachers.')
    if len(variables) != len(self.members):
      raise ValueError(f'{len(variables)} param sets for {len(self.members)} teachers.')
    log_probs = jnp.stack([
        jax.nn.log_softmax(m.apply(v, input_ids, **kwargs)['logits'].astype(jnp.float32), -1)
        for m, v in zip(self.members, variables)])
    log_w = jnp.log(jnp.asarray(self.weights, jnp.float32)).reshape(
        (-1,) + (1,) * (log_probs.ndim - 1))
    return {'logits': jax.scipy.special.logsumexp(log_probs + log_w, axis=0)}
