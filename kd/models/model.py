"""`Model`: a config, its params and the pure apply, callable like a transformers model."""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp


def config_from_dict(cls, d: dict):
  """`cls(**d)` for a config dataclass, refusing unknown keys with the valid ones listed."""
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - fields)
  if unknown:
    raise ValueError(f'Unknown {cls.__name__} keys {unknown}; valid keys are {sorted(fields)}.')
  return cls(**d)


@dataclasses.dataclass(frozen=True)
class Outputs:
  """What a forward pass returns; fields a model does not produce are None."""
  logits: Any = None  # decoders: [B, T, V]
  last_hidden_state: Any = None  # [B, T, D] after the final norm
  hidden_states: tuple | None = None  # num_layers + 1 arrays, HF convention
  attentions: tuple | None = None  # num_layers arrays [B, H, T, T]


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
  """`module` is a flax module whose __call__ takes input ids and `attention_mask=`, and returns
  a dict with 'hidden' and optionally 'logits', 'hidden_states', 'attentions'."""
  module: Any
  params: Any  # the variables dict, {'params': ...}
  tokenizer: Any = None  # a transformers tokenizer, when known
  source: str | None = None  # where it was loaded from

  @property
  def config(self):
    return self.module.config

  @property
  def is_decoder(self) -> bool:
    return hasattr(self.module, 'project')

  def apply(self, params, input_ids, **kw):
    return self.module.apply(params, input_ids, **kw)

  @functools.cached_property
  def _jitted(self):
    return jax.jit(self.apply, static_argnames=('output_hidden_states', 'output_attentions'))

  def __call__(self, input_ids, attention_mask=None, *, output_hidden_states=False,
               output_attentions=False) -> Outputs:
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    out = self._jitted(self.params, input_ids, attention_mask=jnp.asarray(attention_mask),
                       output_hidden_states=output_hidden_states,
                       output_attentions=output_attentions)
    return Outputs(logits=out.get('logits'), last_hidden_state=out['hidden'],
                   hidden_states=out.get('hidden_states'), attentions=out.get('attentions'))

  def replace(self, **kw) -> 'Model':
    return dataclasses.replace(self, **kw)
