"""Hidden-state (feature) distillation: layer maps, projections, MSE and cosine losses.

Hidden-state lists follow the HF convention: length num_layers + 1, index 0 is the embedding
output and index i the output of layer i. Activations are [..., D]; masks are [...].
"""

import jax
import jax.numpy as jnp

from kd.losses.logits import masked_sum, mean

_COSINE_EPS = 1e-8


# ----------------------------------------------------------------------------- layer maps


def _uniform(s, t, include_embeddings):
  # Round half up in integers; clamp at 1 so a transformer layer never maps to the embeddings.
  pairs = [(i, max(1, (2 * i * t + s) // (2 * s))) for i in range(1, s + 1)]
  return ([(0, 0)] if include_embeddings else []) + pairs


def _last(s, t, include_embeddings):
  del include_embeddings
  return [(s, t)]


_LAYER_MAPS = {'uniform': _uniform, 'last': _last, 'explicit': None}
LAYER_MAPS = tuple(_LAYER_MAPS)


def layer_map(kind, num_student_layers, num_teacher_layers, pairs=None, *,
              include_embeddings=True):
  """Pairs (student_idx, teacher_idx) of hidden-state indices to distil.

  'uniform': student layer i ↔ teacher layer round(i·Tn/S), plus (0, 0) for the embeddings
  unless include_embeddings=False (attention maps have no embedding entry). 'last': (S, Tn).
  'explicit': `pairs` as given, validated against 0..S and 0..Tn.
  """
  if kind not in _LAYER_MAPS:
    raise ValueError(f'unknown layer map {kind!r}; valid: {sorted(_LAYER_MAPS)}.')
  s, t = num_student_layers, num_teacher_layers
  if not (isinstance(s, int) and isinstance(t, int) and s >= 1 and t >= 1):
    raise ValueError(f'layer counts must be positive ints, got student={s!r}, teacher={t!r}.')
  if kind != 'explicit':
    if pairs is not None:
      raise ValueError(f"pairs are only used with kind='explicit', got kind={kind!r}.")
    return tuple(_LAYER_MAPS[kind](s, t, include_embeddings))
  if not pairs:
    raise ValueError("kind='explicit' needs a non-empty pairs=[(student_idx, teacher_idx), ...].")
  out = []
  for pair in pairs:
    if len(pair) != 2:
      raise ValueError(f'each pair must be (student_idx, teacher_idx), got {pair!r}.')
    si, ti = int(pair[0]), int(pair[1])
    if not (0 <= si <= s and 0 <= ti <= t):
      raise ValueError(f'pair {tuple(pair)} out of range: student index must be in [0, {s}] '
                       f'and teacher index in [0, {t}] (0 = embeddings, i = output of layer i).')
    out.append((si, ti))
  return tuple(out)


# ----------------------------------------------------------------------------- projection


def init_projection(key, student_dim, teacher_dim):
  """Linear map student width -> teacher width: {'kernel': [Ds, Dt], 'bias': [Dt]}."""
  kernel = jax.random.normal(key, (student_dim, teacher_dim), jnp.float32)
  return {'kernel': kernel / jnp.sqrt(float(student_dim)),
          'bias': jnp.zeros((teacher_dim,), jnp.float32)}


def project(params, h):
  """h [..., Ds] -> [..., Dt] in float32."""
  return jnp.asarray(h, jnp.float32) @ params['kernel'] + params['bias']


def _aligned(student_h, teacher_h, projection):
  """float32 (student, teacher) activations of equal width, or a ValueError saying what to do."""
  student_h = jnp.asarray(student_h, jnp.float32)
  teacher_h = jnp.asarray(teacher_h, jnp.float32)
  if student_h.shape[:-1] != teacher_h.shape[:-1]:
    raise ValueError(f'student {student_h.shape} and teacher {teacher_h.shape} activations must '
                     'share all but the last (feature) axis.')
  ds, dt = student_h.shape[-1], teacher_h.shape[-1]
  if projection is None:
    if ds != dt:
      raise ValueError(f'student width {ds} != teacher width {dt}: enable the projection '
                       f'(projection=init_projection(key, {ds}, {dt}), trained with the student).')
    return student_h, teacher_h
  kernel_shape = tuple(projection['kernel'].shape)
  if kernel_shape != (ds, dt):
    raise ValueError(f'projection kernel {kernel_shape} must be [student width, teacher width] '
                     f'= {(ds, dt)}.')
  return project(projection, student_h), teacher_h


# ----------------------------------------------------------------------------- losses


def hidden_mse_sum(student_h_BxTxD, teacher_h_BxTxE, *, mask=None, projection=None):
  """Per-token mean over features of the squared error, summed over masked tokens."""
  s, t = _aligned(student_h_BxTxD, teacher_h_BxTxE, projection)
  return masked_sum(jnp.mean(jnp.square(s - t), axis=-1), mask)


def hidden_cosine_sum(student_h_BxTxD, teacher_h_BxTxE, *, mask=None, projection=None):
  """Per-token 1 − cosine similarity, summed over masked tokens; a zero vector gives 1."""
  s, t = _aligned(student_h_BxTxD, teacher_h_BxTxE, projection)
  # max inside the sqrt: the norm of a zero vector has a finite (zero) gradient.
  eps2 = _COSINE_EPS ** 2
  norm_s = jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(s), axis=-1), eps2))
  norm_t = jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(t), axis=-1), eps2))
  cos = jnp.sum(s * t, axis=-1) / (norm_s * norm_t)
  return masked_sum(1.0 - cos, mask)


def hidden_mse(student_h_BxTxD, teacher_h_BxTxE, *, mask=None, projection=None):
  return mean(hidden_mse_sum(student_h_BxTxD, teacher_h_BxTxE, mask=mask, projection=projection))


def hidden_cosine(student_h_BxTxD, teacher_h_BxTxE, *, mask=None, projection=None):
  return mean(hidden_cosine_sum(student_h_BxTxD, teacher_h_BxTxE, mask=mask,
                                projection=projection))


FEATURE_LOSSES = {'hidden_mse': hidden_mse_sum, 'hidden_cosine': hidden_cosine_sum}


def _projection_for(projections, i):
  """Projection of the i-th pair: a list indexed by pair position, or a dict keyed by i / 'i'."""
  if projections is None:
    return None
  if isinstance(projections, dict):
    return projections.get(i, projections.get(str(i)))
  if i >= len(projections):
    raise ValueError(f'{len(projections)} projections given for more pairs; give one per pair '
                     '(None where the widths already match).')
  return projections[i]


def feature_loss_sum(name, student_hiddens, teacher_hiddens, pairs, *, mask=None,
                     projections=None):
  """Sum of `name` over mapped layer pairs -> (sum, count); the mean is over pairs × tokens.

  `projections`: None, a list aligned with `pairs`, or a dict keyed by pair position (int or
  str); pairs without an entry are compared unprojected.
  """
  if name not in FEATURE_LOSSES:
    raise ValueError(f'unknown feature loss {name!r}; valid: {sorted(FEATURE_LOSSES)}.')
  if not pairs:
    raise ValueError('pairs is empty; build it with layer_map(...).')
  total = jnp.zeros((), jnp.float32)
  count = jnp.zeros((), jnp.float32)
  for i, (si, ti) in enumerate(pairs):
    if not (0 <= si < len(student_hiddens) and 0 <= ti < len(teacher_hiddens)):
      raise ValueError(f'pair {(si, ti)} out of range for {len(student_hiddens)} student and '
                       f'{len(teacher_hiddens)} teacher hidden states (index 0 = embeddings).')
    if teacher_hiddens[ti] is None:
      raise ValueError(f'teacher hidden state {ti} is missing (an offline-teacher cache without '
                       'that layer); rewrite the cache with the layers the pairs use.')
    s, c = FEATURE_LOSSES[name](student_hiddens[si], teacher_hiddens[ti], mask=mask,
                                projection=_projection_for(projections, i))
    total, count = total + s, count + c
  return total, count
