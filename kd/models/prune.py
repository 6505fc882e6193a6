"""Students cut from a teacher by measured importance (Minitron, arXiv 2407.14679; ShortGPT,
arXiv 2403.03853).

  scores = importance(teacher, calibration_batches)
  drop = rank_layers(scores, 4)  # the 4 layers that change the residual stream least
  student = prune(teacher, layers=layers_to_keep(teacher.config.num_layers, drop),
                  intermediate_size=1024, num_kv_heads=2, scores=scores)

Width units are ranked by their activations on calibration tokens: an MLP neuron by the mean
|input of down_proj|, a query head by the mean L2 norm of its output before o_proj, a KV head
by the sum over the query heads of its group. Pruning KV heads removes whole GQA groups (the KV
head and its query heads); pruning query heads keeps the same number in every group. Kept units
stay in teacher order, so a student computes exactly the teacher with the pruned units'
contributions removed (unlike init_from.student_from_teacher, which takes leading slices).

Not pruned here: the residual width (hidden_size: embeddings, norms and every projection's
D side stay whole) and head_dim. Works on kd Decoders, scan_layers or not; the internals are
read with a Flax method interceptor, so the decoder itself carries no hooks.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kd.models import decoder
from kd.models import stacking
from kd.models import init_from

_COL = 'intermediates'
SCORES = ('neurons', 'heads', 'kv_heads', 'blocks')


def _plain(model) -> tuple[decoder.DecoderConfig, dict[str, Any]]:
  """The model's config and variables as one unscanned, unrematerialised stack of layers."""
  if not isinstance(model.module, decoder.Decoder):
    raise ValueError(f'kd.models.prune works on kd Decoders, got {type(model.module).__name__}; '
                     'prune the base decoder before wrapping it (LoRA, quantisation, ...).')
  config, variables = model.config, model.params
  if config.scan_layers:
    variables = stacking.unstack_layers(variables)
  return dataclasses.replace(config, scan_layers=False, remat=False), variables


def _real_tokens(batch, shape) -> jax.Array:
  """1.0 where a token counts: loss_mask > 0, else segment_ids > 0, else attention_mask, else
  every token."""
  for key in ('loss_mask', 'segment_ids', 'attention_mask'):
    if batch.get(key) is not None:
      return (jnp.asarray(batch[key]) > 0).astype(jnp.float32)
  return jnp.ones(shape, jnp.float32)


def batch_sums(config: decoder.DecoderConfig, variables, batch) -> dict[str, jax.Array]:
  """One batch's token-weighted sums: neurons [L,F], heads [L,N], cosines [L], tokens [].

  `config` must have scan_layers=False and remat=False (the interceptor sows from inside each
  layer); `importance` arranges that. Pure: jit it with config static.
  """
  ids_BxT = jnp.asarray(batch['input_ids'], jnp.int32)
  b, t = ids_BxT.shape
  w_BxT = _real_tokens(batch, (b, t))

  def weighted_sum(x_BxTx):  # the last t positions: a learned prompt sits in front of them
    return jnp.einsum('bt,bt...->...', w_BxT, x_BxTx[:, -t:].astype(jnp.float32))

  def sow_stats(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != '__call__':
      return next_fun(*args, **kwargs)
    if isinstance(module, nn.Dense) and module.name == 'down_proj':
      module.sow(_COL, 'neurons', weighted_sum(jnp.abs(args[0])))
    elif isinstance(module, nn.Dense) and module.name == 'o_proj':
      x_BxTxNH = args[0].astype(jnp.float32)
      x_BxTxNxH = x_BxTxNH.reshape(x_BxTxNH.shape[:2] + (config.num_heads, config.head_dim))
      module.sow(_COL, 'heads', weighted_sum(jnp.sqrt(jnp.sum(x_BxTxNxH ** 2, axis=-1))))
    out = next_fun(*args, **kwargs)
    if isinstance(module, decoder.Block):
      a_BxTxD, b_BxTxD = args[0].astype(jnp.float32), out[0].astype(jnp.float32)
      cos_BxT = jnp.sum(a_BxTxD * b_BxTxD, -1) / jnp.maximum(
          jnp.linalg.norm(a_BxTxD, axis=-1) * jnp.linalg.norm(b_BxTxD, axis=-1), 1e-30)
      module.sow(_COL, 'cosines', weighted_sum(cos_BxT))
    return out

  extra = {k: jnp.asarray(batch[k]) for k in ('segment_ids', 'positions', 'attention_mask')
           if batch.get(k) is not None}
  with nn.intercept_methods(sow_stats):
    _, state = decoder.Decoder(config).apply(variables, ids_BxT, return_hidden_only=True,
                                             mutable=[_COL], **extra)
  layers = [state[_COL][f'layers_{i}'] for i in range(config.num_layers)]
  return {'neurons': jnp.stack([x['mlp']['down_proj']['neurons'][0] for x in layers]),
          'heads': jnp.stack([x['attn']['o_proj']['heads'][0] for x in layers]),
          'cosines': jnp.stack([x['cosines'][0] for x in layers]),
          'tokens': jnp.sum(w_BxT)}


_batch_sums = jax.jit(batch_sums, static_argnums=0)


def importance(model, batches: Iterable[dict[str, Any]]) -> dict[str, jax.Array]:
  """Activation-based importance of every layer, MLP neuron and attention head.

  Args:
    model: a kd `Model` holding a Decoder (scan_layers or not).
    batches: calibration batches, dicts with `input_ids` [B,T] and optionally `segment_ids`,
      `positions`, `loss_mask` (kd.data.pipeline) or `attention_mask`. Only real tokens count:
      loss_mask > 0, else segment_ids > 0, else attention_mask > 0, else all.

  Returns:
    float32 arrays, means over the real tokens of all batches: 'neurons' [L,F] |input of
    down_proj| (act(gate(x)) * up(x), or act(up(x)) when not gated); 'heads' [L,N] the L2 norm
    of each query head's attention output before o_proj; 'kv_heads' [L,K] the sum of 'heads'
    over each GQA group; 'blocks' [L] Block Influence, 1 - cos(layer input, layer output);
    'tokens' [] the number of tokens counted.
  """
  config, variables = _plain(model)
  total = None
  for batch in batches:
    keys = ('input_ids', 'segment_ids', 'positions', 'loss_mask', 'attention_mask')
    sums = _batch_sums(config, variables, {k: batch[k] for k in keys if batch.get(k) is not None})
    total = sums if total is None else jax.tree.map(jnp.add, total, sums)
  if total is None or not float(total['tokens']) > 0:
    raise ValueError('importance needs calibration tokens: the batches are empty or every token '
                     'is masked (loss_mask / segment_ids are 0); pass batches with real tokens.')
  n, k = config.num_heads, config.num_kv_heads
  heads_LxN = total['heads'] / total['tokens']
  return {'neurons': total['neurons'] / total['tokens'],
          'heads': heads_LxN,
          'kv_heads': heads_LxN.reshape(-1, k, n // k).sum(-1),
          'blocks': 1.0 - total['cosines'] / total['tokens'],
          'tokens': total['tokens']}


def _top(scores_LxU, k: int) -> jax.Array:
  """Indices [L,k] of the k largest scores per row (ties: the lower index), in increasing order."""
  order_LxU = jnp.argsort(-scores_LxU, axis=-1, stable=True)
  return jnp.sort(order_LxU[:, :k], axis=-1)


def keep_units(scores: dict[str, Any], *, intermediate_size: int, num_kv_heads: int,
               num_heads: int) -> dict[str, jax.Array]:
  """Which units each layer keeps, by score: 'neurons' [L,F'], 'kv_heads' [L,K'], 'heads' [L,N'].

  KV heads are ranked by 'kv_heads'; within each kept group the num_heads // num_kv_heads query
  heads with the highest 'heads' stay. Query head n belongs to KV head n // (N // K), as in the
  decoder's grouped-query attention. Pure (jit with the sizes static); sizes are not validated.
  """
  heads_LxN = jnp.asarray(scores['heads'])
  k_all = scores['kv_heads'].shape[-1]
  g_all, g = heads_LxN.shape[-1] // k_all, num_heads // num_kv_heads
  groups_LxK = _top(jnp.asarray(scores['kv_heads']), num_kv_heads)
  grouped_LxKxG = heads_LxN.reshape(heads_LxN.shape[0], k_all, g_all)
  in_kept_LxKxG = jnp.take_along_axis(grouped_LxKxG, groups_LxK[..., None], axis=1)
  members_LxKxG = jax.vmap(_top, in_axes=(0, None))(in_kept_LxKxG, g)
  heads_LxN = (groups_LxK[..., None] * g_all + members_LxKxG).reshape(heads_LxN.shape[0], -1)
  return {'neurons': _top(jnp.asarray(scores['neurons']), intermediate_size),
          'kv_heads': groups_LxK, 'heads': heads_LxN}


def _head_columns(heads_U, head_dim: int) -> jax.Array:
  return (heads_U[:, None] * head_dim + jnp.arange(head_dim)).reshape(-1)


def _cut(name: str, leaves: dict[str, Any], index, kernel_axis: int, bias: bool = True):
  unknown = sorted(set(leaves) - {'kernel', 'bias'})
  if unknown:
    raise ValueError(f'{name} holds {unknown} besides kernel/bias; prune the plain decoder '
                     'before adding LoRA, quantisation or other per-projection params.')
  out = dict(leaves, kernel=jnp.take(leaves['kernel'], index, axis=kernel_axis))
  if bias and 'bias' in leaves:
    out['bias'] = jnp.take(leaves['bias'], index, axis=-1)
  return out


def prune_layer(layer: dict[str, Any], units: dict[str, jax.Array],
                head_dim: int) -> dict[str, Any]:
  """One layer's params with only `units` (keep_units' rows for this layer) left. Pure."""
  mlp, attn = dict(layer['mlp']), dict(layer['attn'])
  neurons = units['neurons']
  for name in ('gate_proj', 'up_proj'):
    if name in mlp:
      mlp[name] = _cut(f'mlp/{name}', mlp[name], neurons, -1)
  mlp['down_proj'] = _cut('mlp/down_proj', mlp['down_proj'], neurons, 0, bias=False)
  q_cols = _head_columns(units['heads'], head_dim)
  kv_cols = _head_columns(units['kv_heads'], head_dim)
  attn['q_proj'] = _cut('attn/q_proj', attn['q_proj'], q_cols, -1)
  attn['k_proj'] = _cut('attn/k_proj', attn['k_proj'], kv_cols, -1)
  attn['v_proj'] = _cut('attn/v_proj', attn['v_proj'], kv_cols, -1)
  attn['o_proj'] = _cut('attn/o_proj', attn['o_proj'], q_cols, 0, bias=False)
  for name in ('prefix_k', 'prefix_v'):  # [prefix_len, K, head_dim]
    if name in attn:
      attn[name] = jnp.take(attn[name], units['kv_heads'], axis=1)
  return dict(layer, mlp=mlp, attn=attn)


def _widths(c: decoder.DecoderConfig, intermediate_size, num_kv_heads, num_heads):
  def check(name, value, most, what):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or not 0 < value <= most:
      raise ValueError(f'{name}={value!r}: the teacher has {most} {what} per layer; ask for an '
                       f'int in [1, {most}].')
    return int(value)

  f = check('intermediate_size', c.intermediate_size if intermediate_size is None
            else intermediate_size, c.intermediate_size, 'MLP neurons')
  k = check('num_kv_heads', c.num_kv_heads if num_kv_heads is None else num_kv_heads,
            c.num_kv_heads, 'KV heads')
  g = c.num_heads // c.num_kv_heads
  n = check('num_heads', k * g if num_heads is None else num_heads, c.num_heads, 'query heads')
  if n % k or n // k > g:
    raise ValueError(
        f'num_heads={n} with num_kv_heads={k}: every KV head keeps the same number of its '
        f'{g} query heads, so num_heads must be num_kv_heads times 1..{g}: one of '
        f'{[k * i for i in range(1, g + 1)]}.')
  return f, k, n


def _check_scores(scores, c: decoder.DecoderConfig) -> dict[str, jax.Array]:
  if scores is None:
    raise ValueError('pruning widths needs scores: pass scores=importance(model, batches) '
                     '(or hand-made arrays of the same shapes).')
  want = {'neurons': (c.num_layers, c.intermediate_size), 'heads': (c.num_layers, c.num_heads),
          'kv_heads': (c.num_layers, c.num_kv_heads)}
  for key, shape in want.items():
    if key not in scores or tuple(np.shape(scores[key])) != shape:
      got = np.shape(scores[key]) if key in scores else 'missing'
      raise ValueError(f"scores['{key}'] must have shape {shape} (the teacher's layers x units), "
                       f'got {got}; measure them with importance() on this teacher.')
  return {key: jnp.asarray(scores[key], jnp.float32) for key in want}


def prune(model, *, layers: str | Sequence[int] | None = None,
          intermediate_size: int | None = None, num_kv_heads: int | None = None,
          num_heads: int | None = None, scores: dict[str, Any] | None = None):
  """A new `Model`: the teacher's listed layers, each keeping its most important units.

  Args:
    model: the teacher `Model` (a Decoder).
    layers: teacher layer indices to keep (or 'every_k' / 'first_last', see
      init_from.select_layers); None keeps all. `layers_to_keep(n, rank_layers(...))` gives one.
    intermediate_size: MLP neurons kept per layer (gate/up columns and down rows, biases too).
    num_kv_heads: KV heads kept per layer; each drops with its whole GQA group.
    num_heads: query heads kept per layer, the same number in every kept group; defaults to the
      teacher's group size times num_kv_heads.
    scores: importance(model, batches), measured on this teacher (all its layers); needed when
      any width shrinks.

  Returns the student with a consistent DecoderConfig, the teacher's scan layout, embeddings,
  norms, head and tokenizer; hidden_size and head_dim are unchanged.
  """
  config, variables = _plain(model)
  keep = (list(range(config.num_layers)) if layers is None
          else init_from.select_layers(config.num_layers, layers))
  f, k, n = _widths(config, intermediate_size, num_kv_heads, num_heads)
  units = None
  if (f, k, n) != (config.intermediate_size, config.num_kv_heads, config.num_heads):
    rows = jnp.asarray(keep)
    units = keep_units({key: x[rows] for key, x in _check_scores(scores, config).items()},
                       intermediate_size=f, num_kv_heads=k, num_heads=n)

  def cut(collection, tree):
    out = {key: x for key, x in tree.items() if not key.startswith('layers_')}
    for new, old in enumerate(keep):
      layer = tree[f'layers_{old}']
      if units is not None and collection == 'params':
        layer = prune_layer(layer, {key: x[new] for key, x in units.items()}, config.head_dim)
      out[f'layers_{new}'] = layer
    return out

  changes = dict(num_layers=len(keep), intermediate_size=f, num_kv_heads=k, num_heads=n,
                 head_dim=config.head_dim, scan_layers=model.config.scan_layers,
                 remat=model.config.remat)
  if config.layer_types is not None:
    changes['layer_types'] = tuple(config.layer_types[i] for i in keep)
  new_config = dataclasses.replace(config, **changes)
  new_variables = {col: cut(col, tree) for col, tree in variables.items()}
  if new_config.scan_layers:
    new_variables = stacking.stack_layers(new_variables)
  return model.replace(module=type(model.module)(new_config), params=new_variables, source=None)


def rank_layers(scores: dict[str, Any], n_drop: int) -> list[int]:
  """The n_drop layers of lowest Block Influence (scores['blocks']), in increasing order; they
  need not be contiguous. Ties go to the lower index."""
  blocks_L = np.asarray(scores['blocks'])
  if not isinstance(n_drop, (int, np.integer)) or not 0 <= n_drop < blocks_L.shape[0]:
    raise ValueError(f'n_drop={n_drop!r}: the model has {blocks_L.shape[0]} layers; drop an int '
                     f'in [0, {blocks_L.shape[0] - 1}] so at least one stays.')
  return sorted(int(i) for i in np.argsort(blocks_L, kind='stable')[:n_drop])


def layers_to_keep(num_layers: int, drop: Sequence[int]) -> list[int]:
  """The keep-list for `prune(layers=...)` that leaves out the layers in `drop`."""
  drop = [int(i) for i in drop]
  if len(set(drop)) != len(drop) or any(not 0 <= i < num_layers for i in drop):
    raise ValueError(f'drop={drop} must be distinct layer indices in [0, {num_layers}).')
  if len(drop) == num_layers:
    raise ValueError(f'drop={drop} removes all {num_layers} layers; keep at least one.')
  return [i for i in range(num_layers) if i not in set(drop)]
