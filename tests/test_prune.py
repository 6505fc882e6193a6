"""Tests for kd.models.prune: importance against a numpy forward, exact pruning of units that
contribute nothing, GQA groups, layer selection, scan layout and errors.

The independent reference is `_numpy_stats`, a float64 numpy re-implementation of the Llama
forward (RMSNorm, rotate-half RoPE, causal GQA attention within segments, SwiGLU) written from
the params alone.
"""

import dataclasses
import functools

import jax
import numpy as np
import pytest

from kd.models import Decoder, DecoderConfig, Model, init_params, stack_layers, unstack_layers
from kd.models import init_from
from kd.models import prune as prune_lib

V, B, T = 61, 2, 12
LLAMA = dict(vocab_size=V, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2,
             head_dim=8, intermediate_size=24, max_seq_len=32, rms_norm_eps=1e-5)
# GPT-2-like switches (biases everywhere, LayerNorm, learned positions, non-gated GELU) plus
# Qwen3's q/k norms and a prefix, so every sliced leaf has a test.
BIASED = dict(LLAMA, qkv_bias=True, attn_out_bias=True, mlp_bias=True, mlp_gated=False,
              mlp_activation='gelu', norm='layer', positions='learned', qk_norm=True,
              prefix_len=2)


def _model(seed=0, **overrides):
  """A random decoder with weights large enough (std 0.3, norms near 1) that every unit counts."""
  config = DecoderConfig(**{**LLAMA, **overrides})
  shapes = jax.eval_shape(functools.partial(init_params, config), jax.random.key(0))
  leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  rng = np.random.RandomState(seed)
  new = []
  for path, x in leaves:
    noise = rng.normal(0, 0.3, x.shape).astype(np.float32)
    new.append(noise + (1.0 if 'scale' in jax.tree_util.keystr(path) else 0.0))
  return Model(Decoder(config), jax.tree_util.tree_unflatten(treedef, new))


def _packed_batch(seed, fields):
  """Two packed rows with padding; `fields` picks which of the pipeline's fields are present."""
  rng = np.random.RandomState(seed)
  segment_ids = np.array([[1] * 5 + [2] * 4 + [0] * 3, [1] * 9 + [2] * 3], np.int32)
  positions = np.zeros_like(segment_ids)
  for row in range(B):
    for s in (1, 2):
      where = segment_ids[row] == s
      positions[row, where] = np.arange(where.sum())
  loss_mask = (segment_ids > 0).astype(np.float32)
  loss_mask[:, [4, 8]] = 0  # a segment's last token has no label
  batch = {'input_ids': rng.randint(1, V, (B, T)).astype(np.int32), 'segment_ids': segment_ids,
           'positions': positions, 'loss_mask': loss_mask}
  return {k: batch[k] for k in fields}


PACKED = ('input_ids', 'segment_ids', 'positions', 'loss_mask')


def _numpy_stats(c, params, batch):
  """Sums over counted tokens of |MLP hidden|, per-head output norms and block cosines."""
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), params['params'])
  ids = batch['input_ids']
  seg = batch.get('segment_ids')
  pos = batch.get('positions', np.broadcast_to(np.arange(T), (B, T)))
  if 'loss_mask' in batch:
    w = (batch['loss_mask'] > 0).astype(np.float64)
  elif seg is not None:
    w = (seg > 0).astype(np.float64)
  else:
    w = np.ones((B, T))
  n, k, hd = c.num_heads, c.num_kv_heads, c.head_dim
  allowed = np.tril(np.ones((T, T), bool))[None]
  if seg is not None:
    allowed = allowed & (seg[:, :, None] == seg[:, None, :])
  inv_freq = 1.0 / c.rope_theta ** (np.arange(0, hd, 2) / hd)
  angles = pos[..., None] * inv_freq
  cos, sin = np.cos(np.concatenate([angles] * 2, -1)), np.sin(np.concatenate([angles] * 2, -1))

  def rope(x):  # [B,T,heads,hd], rotate-half
    x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
    return x * cos[:, :, None] + np.concatenate([-x2, x1], -1) * sin[:, :, None]

  def rms(x, scale):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + c.rms_norm_eps) * scale

  h = p['embed']['embedding'][ids]
  neurons, heads, cosines = [], [], []
  for i in range(c.num_layers):
    lp = p[f'layers_{i}']
    a = lp['attn']
    x = rms(h, lp['input_norm']['scale'])
    q = rope((x @ a['q_proj']['kernel']).reshape(B, T, n, hd))
    kk = rope((x @ a['k_proj']['kernel']).reshape(B, T, k, hd))
    vv = (x @ a['v_proj']['kernel']).reshape(B, T, k, hd)
    kk, vv = np.repeat(kk, n // k, axis=2), np.repeat(vv, n // k, axis=2)  # head j -> kv j // g
    logits = np.einsum('btnh,bsnh->bnts', q, kk) / np.sqrt(hd)
    logits = np.where(allowed[:, None], logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum('bnts,bsnh->btnh', probs, vv)
    heads.append(np.einsum('bt,btn->n', w, np.linalg.norm(out, axis=-1)))
    h_in = h
    h = h + out.reshape(B, T, n * hd) @ a['o_proj']['kernel']
    x = rms(h, lp['post_attn_norm']['scale'])
    gate = x @ lp['mlp']['gate_proj']['kernel']
    hidden = gate / (1 + np.exp(-gate)) * (x @ lp['mlp']['up_proj']['kernel'])
    neurons.append(np.einsum('bt,btf->f', w, np.abs(hidden)))
    h = h + hidden @ lp['mlp']['down_proj']['kernel']
    cos_bt = np.sum(h_in * h, -1) / (np.linalg.norm(h_in, axis=-1) * np.linalg.norm(h, axis=-1))
    cosines.append(np.sum(w * cos_bt))
  return np.array(neurons), np.array(heads), np.array(cosines), w.sum()


@functools.lru_cache(maxsize=None)
def _apply(config):
  return jax.jit(lambda params, ids: Decoder(config).apply(params, ids)['logits'])


def _logits(model, ids):
  return np.asarray(_apply(model.config)(model.params, ids))


def _ids(seed=1):
  return np.random.RandomState(seed).randint(0, V, (B, T)).astype(np.int32)


def _edit(model, fn):
  """A copy of `model` whose params tree (plain dicts, unscanned) `fn` edits in place."""
  params = jax.tree.map(np.array, model.params)
  fn(params['params'])
  return model.replace(params=params)


def _scores(c, rng):
  """Hand-made scores: a random permutation per layer and unit kind, so ranks are unambiguous."""
  def perm(units):
    return np.stack([rng.permutation(units).astype(np.float32) for _ in range(c.num_layers)])
  heads = perm(c.num_heads)
  kv = heads.reshape(c.num_layers, c.num_kv_heads, -1).sum(-1)
  return {'neurons': perm(c.intermediate_size), 'heads': heads, 'kv_heads': kv,
          'blocks': rng.rand(c.num_layers).astype(np.float32)}


@pytest.mark.parametrize('fields', [
    PACKED,  # loss_mask picks the tokens
    ('input_ids', 'segment_ids', 'positions'),  # segment_ids > 0 picks them
    ('input_ids',),  # every token
])
def test_importance_matches_numpy_forward(fields):
  model = _model()
  c = model.config
  batches = [_packed_batch(0, fields), _packed_batch(1, fields)]
  got = prune_lib.importance(model, batches)
  sums = [_numpy_stats(c, model.params, b) for b in batches]
  neurons, heads, cosines, tokens = (sum(s[i] for s in sums) for i in range(4))
  assert float(got['tokens']) == tokens
  np.testing.assert_allclose(got['neurons'], neurons / tokens, rtol=2e-4, atol=1e-6)
  np.testing.assert_allclose(got['heads'], heads / tokens, rtol=2e-4, atol=1e-6)
  np.testing.assert_allclose(got['kv_heads'], (heads / tokens).reshape(3, 2, 2).sum(-1),
                             rtol=2e-4, atol=1e-6)
  np.testing.assert_allclose(got['blocks'], 1 - cosines / tokens, rtol=1e-3, atol=1e-6)
  assert got['neurons'].shape == (3, 24) and got['blocks'].shape == (3,)


@pytest.mark.parametrize('overrides', [{}, BIASED], ids=['llama', 'biased'])
def test_measured_dead_units_prune_exactly(overrides):
  """Neurons whose up_proj column is 0 and a KV group whose v_proj is 0 output exactly 0: they
  score 0, are pruned, and the student's logits equal the teacher's."""
  dead_neurons, dead_group = [1, 6, 7, 20], 1

  def kill(p):
    for i in range(3):
      mlp, attn = p[f'layers_{i}']['mlp'], p[f'layers_{i}']['attn']
      for leaf in mlp['up_proj'].values():
        leaf[..., dead_neurons] = 0
      cols = slice(dead_group * 8, dead_group * 8 + 8)
      for leaf in attn['v_proj'].values():
        leaf[..., cols] = 0
      if 'prefix_v' in attn:
        attn['prefix_v'][:, dead_group] = 0

  teacher = _edit(_model(**overrides), kill)
  scores = prune_lib.importance(teacher, [_packed_batch(0, PACKED)])
  assert np.all(np.asarray(scores['neurons'])[:, dead_neurons] == 0)
  assert np.all(np.delete(np.asarray(scores['neurons']), dead_neurons, axis=1) > 0)
  assert np.all(np.asarray(scores['heads'])[:, 2:] == 0) and np.all(scores['heads'][:, :2] > 0)
  student = prune_lib.prune(teacher, intermediate_size=20, num_kv_heads=1, scores=scores)
  c = student.config
  assert (c.intermediate_size, c.num_kv_heads, c.num_heads, c.head_dim) == (20, 1, 2, 8)
  np.testing.assert_allclose(_logits(student, _ids()), _logits(teacher, _ids()), atol=2e-5)


def test_prune_keeps_top_neurons_in_order_and_is_exact_on_zeroed_rows():
  teacher = _model()
  scores = _scores(teacher.config, np.random.RandomState(0))
  keep = [np.sort(np.argsort(-s)[:10]) for s in scores['neurons']]
  student = prune_lib.prune(teacher, intermediate_size=10, scores=scores)
  for i in range(3):
    t = teacher.params['params'][f'layers_{i}']['mlp']
    s = student.params['params'][f'layers_{i}']['mlp']
    np.testing.assert_array_equal(s['gate_proj']['kernel'], t['gate_proj']['kernel'][:, keep[i]])
    np.testing.assert_array_equal(s['up_proj']['kernel'], t['up_proj']['kernel'][:, keep[i]])
    np.testing.assert_array_equal(s['down_proj']['kernel'], t['down_proj']['kernel'][keep[i]])

  def zero_dropped(p):
    for i in range(3):
      dropped = np.setdiff1d(np.arange(24), keep[i])
      p[f'layers_{i}']['mlp']['down_proj']['kernel'][dropped] = 0

  zeroed = _edit(teacher, zero_dropped)
  pruned = prune_lib.prune(zeroed, intermediate_size=10, scores=scores)
  np.testing.assert_allclose(_logits(pruned, _ids()), _logits(zeroed, _ids()), atol=2e-5)


def _zero_heads(teacher, dropped_per_layer):
  def zero(p):
    for i, heads in enumerate(dropped_per_layer):
      for j in heads:
        p[f'layers_{i}']['attn']['o_proj']['kernel'][j * 8:(j + 1) * 8] = 0
  return _edit(teacher, zero)


@pytest.mark.parametrize('num_kv_heads,num_heads,kept', [
    # teacher: 4 query heads, 2 KV heads; query head j belongs to KV head j // 2.
    (1, None, [[2, 3], [0, 1], [2, 3]]),  # whole groups by kv score
    (1, 1, [[3], [1], [2]]),  # one group, then its best head
    (None, 2, [[1, 3], [1, 2], [0, 2]]),  # every group keeps its best head
])
def test_gqa_pruning_equals_zeroed_o_proj_rows(num_kv_heads, num_heads, kept):
  teacher = _model()
  heads = np.array([[0, 1, 2, 3], [2, 5, 4, 0], [9, 0, 8, 7]], np.float32)  # kv: 1 5 | 7 4 | 9 15
  scores = {'neurons': np.ones((3, 24)), 'heads': heads,
            'kv_heads': heads.reshape(3, 2, 2).sum(-1)}
  student = prune_lib.prune(teacher, num_kv_heads=num_kv_heads, num_heads=num_heads,
                            scores=scores)
  assert student.config.num_heads == len(kept[0])
  for i, heads_i in enumerate(kept):
    t = teacher.params['params'][f'layers_{i}']['attn']
    s = student.params['params'][f'layers_{i}']['attn']
    cols = np.concatenate([np.arange(j * 8, j * 8 + 8) for j in heads_i])
    groups = sorted({j // 2 for j in heads_i})
    kv_cols = np.concatenate([np.arange(g * 8, g * 8 + 8) for g in groups])
    np.testing.assert_array_equal(s['q_proj']['kernel'], t['q_proj']['kernel'][:, cols])
    np.testing.assert_array_equal(s['o_proj']['kernel'], t['o_proj']['kernel'][cols])
    np.testing.assert_array_equal(s['k_proj']['kernel'], t['k_proj']['kernel'][:, kv_cols])
    np.testing.assert_array_equal(s['v_proj']['kernel'], t['v_proj']['kernel'][:, kv_cols])
  zeroed = _zero_heads(teacher, [sorted(set(range(4)) - set(h)) for h in kept])
  np.testing.assert_allclose(_logits(student, _ids()), _logits(zeroed, _ids()), atol=2e-5)


def test_layers_and_widths_compose():
  teacher = _model(sliding_window=4, layer_types=('full_attention', 'sliding_attention',
                                                  'full_attention'))
  scores = _scores(teacher.config, np.random.RandomState(1))
  widths = dict(intermediate_size=12, num_kv_heads=1, scores=scores)
  both = prune_lib.prune(teacher, layers=[1, 2], **widths)
  assert both.config.num_layers == 2
  assert both.config.layer_types == ('sliding_attention', 'full_attention')
  wide = prune_lib.prune(teacher, **widths)  # widths chosen from each teacher layer's own scores
  for new, old in enumerate([1, 2]):
    jax.tree.map(np.testing.assert_array_equal, both.params['params'][f'layers_{new}'],
                 wide.params['params'][f'layers_{old}'])
  assert both.tokenizer is teacher.tokenizer
  only_layers = prune_lib.prune(teacher, layers=[1, 2])  # no widths: init_from's selection
  reference = init_from.student_from_teacher(teacher, layers=[1, 2])
  jax.tree.map(np.testing.assert_array_equal, only_layers.params, reference.params)
  assert only_layers.config == reference.config
  assert _logits(both, _ids()).shape == (B, T, V)


def test_scan_layers_round_trip():
  plain = _model()
  scanned = plain.replace(module=Decoder(dataclasses.replace(plain.config, scan_layers=True)),
                          params=stack_layers(plain.params))
  batches = [_packed_batch(0, PACKED)]
  want, got = prune_lib.importance(plain, batches), prune_lib.importance(scanned, batches)
  jax.tree.map(np.testing.assert_array_equal, got, want)
  kw = dict(layers=[0, 2], intermediate_size=16, num_heads=2, scores=want)
  student, reference = prune_lib.prune(scanned, **kw), prune_lib.prune(plain, **kw)
  assert student.config.scan_layers and 'layers' in student.params['params']
  assert student.config == dataclasses.replace(reference.config, scan_layers=True)
  jax.tree.map(np.testing.assert_array_equal, unstack_layers(student.params), reference.params)
  np.testing.assert_allclose(_logits(student, _ids()), _logits(reference, _ids()), atol=2e-5)


def test_rank_layers_and_keep_list():
  scores = {'blocks': np.array([0.5, 0.1, 0.3, 0.05, 0.1])}
  assert prune_lib.rank_layers(scores, 2) == [1, 3]
  assert prune_lib.rank_layers(scores, 3) == [1, 3, 4]  # the tie goes to the lower index first
  assert prune_lib.rank_layers(scores, 0) == []
  assert prune_lib.layers_to_keep(5, [3, 1]) == [0, 2, 4]
  with pytest.raises(ValueError, match='at least one stays'):
    prune_lib.rank_layers(scores, 5)
  with pytest.raises(ValueError, match=r'distinct layer indices in \[0, 5\)'):
    prune_lib.layers_to_keep(5, [5])
  with pytest.raises(ValueError, match='keep at least one'):
    prune_lib.layers_to_keep(2, [0, 1])


@pytest.mark.parametrize('kwargs,match', [
    (dict(intermediate_size=25), r'intermediate_size=25: the teacher has 24 MLP neurons'),
    (dict(num_kv_heads=3), r'num_kv_heads=3: the teacher has 2 KV heads'),
    (dict(num_heads=3), r'num_heads must be num_kv_heads times 1..2: one of \[2, 4\]'),
    (dict(num_kv_heads=1, num_heads=4), r'one of \[1, 2\]'),
    (dict(layers=[0, 3]), r'indices in \[0, 3\)'),
    (dict(intermediate_size=8), r'pass scores=importance\(model, batches\)'),
    (dict(intermediate_size=8, scores={'neurons': np.ones((2, 24))}),
     r"scores\['neurons'\] must have shape \(3, 24\)"),
])
def test_impossible_requests_are_refused(kwargs, match):
  with pytest.raises(ValueError, match=match):
    prune_lib.prune(_model(), **kwargs)


def test_importance_refuses_no_tokens():
  batch = _packed_batch(0, PACKED)  # segment_ids are real, but loss_mask decides
  batch['loss_mask'] = np.zeros_like(batch['loss_mask'])
  with pytest.raises(ValueError, match='every token is masked'):
    prune_lib.importance(_model(), [batch])
