"""LoRA for kd's linen models through qwix's interception (qwix.LoraProvider).

qwix wraps the model class's methods so that every `jax.lax.dot_general` / `jnp.einsum` /
`jnp.dot` run inside a linen module whose path ('layers_0/attn/q_proj', ...) fully matches the
target regex adds `x @ A @ B * alpha / rank`, and creates the params `kernel_lora_a` [in, r]
(he_uniform) and `kernel_lora_b` [r, out] (zeros) beside that module's `kernel`. The Decoder
itself is untouched, so the same code path serves full fine-tuning and LoRA:

  lcfg = LoraConfig(target=r'.*/(q_proj|v_proj)', rank=8, alpha=16.0)
  model = lora_model(Decoder(config), lcfg)
  lora = init_lora(model, base_vars, rng)            # only the A/B leaves
  out = model.apply(combine(lora, base_vars), ids)   # the LoRA forward
  plain_vars = merge(combine(lora, base_vars), lcfg)  # a Decoder tree, for export

Train `lora` only (optimizer state and checkpoints hold just these leaves); pass the frozen base
into the step as an argument, like the teacher.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import qwix

from kd.peft import trees

LORA_SUFFIXES = ('_lora_a', '_lora_b')
# The model methods that run projections: `project` is the Decoder's LM head alone, which the
# chunked logit losses call by name (see kd.models.decoder.project_with); an Encoder has only
# `__call__`.
METHODS = ('__call__', 'project')


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Which projections get adapters, and their shape. Hashable (a static jit argument)."""

  target: str  # regex fully matching module paths, e.g. r'.*/(q_proj|k_proj|v_proj|o_proj)'
  rank: int
  alpha: float
  # Dropout on the adapters' input (x -> dropout(x) @ A @ B), in training only: the model
  # `lora_model(..., train=True)` makes draws from the 'dropout' rng stream.
  dropout: float = 0.0

  def __post_init__(self):
    if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank <= 0:
      raise ValueError(f'LoraConfig.rank must be a positive int, got {self.rank!r}.')
    if not self.alpha > 0:
      raise ValueError(f'LoraConfig.alpha must be > 0, got {self.alpha!r} (scale = alpha/rank).')
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f'LoraConfig.dropout must be in [0, 1), got {self.dropout!r}.')
    try:
      re.compile(self.target)
    except re.error as e:
      raise ValueError(f'LoraConfig.target={self.target!r} is not a valid regex: {e}.') from e

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


class _LoraProvider(qwix.LoraProvider):
  """qwix's LoRA with the output cast back to the compute dtype.

  qwix 0.1.8 adds the float32 adapter delta to a bfloat16 projection, which promotes the
  activation to float32 and breaks the Decoder downstream (jax.nn.dot_product_attention:
  'value dtype should be bfloat16, but got float32').
  """

  def dot_general(self, lhs, rhs, dimension_numbers, precision=None,
                  preferred_element_type=None, out_sharding=None):
    out = super().dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type,
                              out_sharding=out_sharding)
    return out.astype(preferred_element_type or lhs.dtype)


METHODS_BY_NAME = ('none', 'lora', 'adapter', 'prefix', 'prompt')  # see kd.peft.adapters


def from_config(cfg) -> LoraConfig | None:
  """`config.peft` ({method, target, rank, alpha}) -> a LoraConfig for method 'lora', else
  None (after checking that the method exists)."""
  method = (cfg or {}).get('method', 'none')
  if method not in METHODS_BY_NAME:
    raise ValueError(f'config.peft.method={method!r}; valid: {METHODS_BY_NAME}')
  if method != 'lora':
    return None
  return LoraConfig(target=cfg.target, rank=cfg.rank, alpha=float(cfg.alpha),
                    dropout=float(cfg.get('dropout', 0.0)))


def lora_model(model: nn.Module, config: LoraConfig, train: bool = False) -> nn.Module:
  """A copy of `model` (a linen module: Decoder or Encoder) whose matching projections carry
  LoRA adapters. With `train` and config.dropout > 0 the adapters' input goes through dropout,
  so `apply` needs rngs={'dropout': key}; otherwise the model is deterministic (evaluation,
  sampling, export all use the same adapters without dropout)."""
  provider = _LoraProvider(module_path=config.target, rank=config.rank, alpha=config.alpha,
                           dropout=config.dropout if train else 0.0)
  methods = tuple(m for m in METHODS if hasattr(type(model), m))
  return qwix.apply_lora_to_model(model, provider, methods=methods)


def is_lora(path: tuple[str, ...]) -> bool:
  return path[-1].endswith(LORA_SUFFIXES)


def split(variables) -> tuple[dict, dict]:
  """{'params': ...} -> (LoRA leaves only, everything else), both nested dicts."""
  return trees.split_by(is_lora, variables)


combine = trees.combine  # the inverse of `split`; raises if the two trees share a path


def target_kernels(variables, config: LoraConfig) -> list[str]:
  """Paths of the modules with a 2-D `kernel` (3-D, [layers, in, out], under the stacked
  `layers` of a scan_layers model) that `config.target` fully matches."""
  flat = flax.traverse_util.flatten_dict(variables['params'])
  return sorted('/'.join(k[:-1]) for k, v in flat.items()
                if k[-1] == 'kernel' and len(v.shape) == 2 + (k[0] == 'layers')
                and re.fullmatch(config.target, '/'.join(k[:-1])))


def init_lora(model: nn.Module, base_variables, rng, config: LoraConfig,
              seq_len: int = 8) -> dict:
  """The LoRA leaves {'params': {... 'kernel_lora_a', 'kernel_lora_b'}} for `base_variables`.

  Runs the LoRA model once (jitted, on dummy ids) so qwix creates the adapters; only the new
  leaves come back. Raises if the target matches no projection, or if some matched projection
  got no adapter (e.g. a kernel not used through a dot_general qwix sees).
  """
  expected = target_kernels(base_variables, config)
  if not expected:
    flat = flax.traverse_util.flatten_dict(base_variables['params'])
    names = sorted({'/'.join(k[:-1]) for k in flat if k[-1] == 'kernel'})
    raise ValueError(f'LoraConfig.target={config.target!r} matches no projection; module paths '
                     f'look like {names[:8]} (the regex must match the whole path).')
  ids_1xT = jnp.zeros((1, seq_len), jnp.int32)

  def make(base, key):
    _, variables = model.apply(base, ids_1xT, mutable=['params'], rngs={'params': key})
    return split(variables)[0]

  lora = jax.jit(make)(base_variables, rng)
  got = sorted({'/'.join(k[1:-1]) for k in flax.traverse_util.flatten_dict(lora)})
  if got != expected:
    raise ValueError(f'LoRA adapters were made for {got} but the target matches {expected}; '
                     'narrow LoraConfig.target to nn.Dense projections.')
  return lora


def merge(variables, config: LoraConfig) -> dict:
  """A plain-model variables tree: kernel + scale * A @ B for each adapter, adapters dropped.

  Computed in float32, cast back to the kernel's dtype (stacked layers: one product per layer).
  """
  flat = flax.traverse_util.flatten_dict(variables)
  out = {k: v for k, v in flat.items() if not is_lora(k)}
  for k in flat:
    if k[-1].endswith('_lora_a'):
      name = k[-1][:-len('_lora_a')]
      w_key, b_key = (*k[:-1], name), (*k[:-1], name + '_lora_b')
      if w_key not in flat or b_key not in flat:
        raise ValueError(f"{'/'.join(k)} has no matching {name} / {name}_lora_b; the tree is "
                         'not a LoRA model variables tree.')
      w = flat[w_key]
      delta = jnp.asarray(flat[k], jnp.float32) @ jnp.asarray(flat[b_key], jnp.float32)
      out[w_key] = (w.astype(jnp.float32) + config.scale * delta).astype(w.dtype)
  return flax.traverse_util.unflatten_dict(out)


def count(tree: Any) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))
