"""Sentence-embedding distillation: match pooled embeddings [B, D] row by row, or their geometry.

  embedding_mse         mean over features of (e_s − e_t)², per sentence (sentence-transformers'
                        MSELoss recipe of "Making Monolingual Sentence Embeddings Multilingual")
  embedding_cosine      1 − cos(e_s, e_t), per sentence
  embedding_similarity  (cos(e_s,i, e_s,j) − cos(e_t,i, e_t,j))² over pairs i≠j of the batch:
                        the in-batch similarity structure that STS scores read (relational KD);
                        widths may differ, no projection is needed

Masks are [B] (true = a real sentence; padding rows of a last batch are false). Every function
returns (sum, count) in float32 like the other losses.

Not distillation, but the baseline it is measured against: `cosine_score_mse` fits
cos(u_i, v_i) of labelled sentence pairs to their gold score scaled to [0, 1]
(sentence-transformers' CosineSimilarityLoss), with u = rows [0, B) and v = rows [B, 2B).
"""

import jax.numpy as jnp

from kd.losses.logits import masked_sum

_EPS = 1e-8


def _check(student_BxD, teacher_BxE, need_same_width: bool):
  s = jnp.asarray(student_BxD, jnp.float32)
  t = jnp.asarray(teacher_BxE, jnp.float32)
  if s.ndim != 2 or t.ndim != 2 or s.shape[0] != t.shape[0]:
    raise ValueError(f'embeddings must be [B, D] with equal B, got student {s.shape} and '
                     f'teacher {t.shape}.')
  if need_same_width and s.shape[1] != t.shape[1]:
    raise ValueError(f'student width {s.shape[1]} != teacher width {t.shape[1]}; use '
                     "'embedding_similarity', which compares widths freely, or a student of "
                     'the teacher\'s width.')
  return s, t


def _unit(x_BxD):
  # max inside the sqrt: a zero embedding has a finite (zero) gradient.
  return x_BxD * jnp.reciprocal(jnp.sqrt(jnp.maximum(jnp.sum(x_BxD * x_BxD, -1, keepdims=True),
                                                     _EPS ** 2)))


def embedding_mse_sum(student_BxD, teacher_BxD, *, mask=None):
  s, t = _check(student_BxD, teacher_BxD, True)
  return masked_sum(jnp.mean(jnp.square(s - t), axis=-1), mask)


def embedding_cosine_sum(student_BxD, teacher_BxD, *, mask=None):
  s, t = _check(student_BxD, teacher_BxD, True)
  return masked_sum(1.0 - jnp.sum(_unit(s) * _unit(t), axis=-1), mask)


def embedding_similarity_sum(student_BxD, teacher_BxE, *, mask=None):
  s, t = _check(student_BxD, teacher_BxE, False)
  b = s.shape[0]
  sim_s_BxB = _unit(s) @ _unit(s).T
  sim_t_BxB = _unit(t) @ _unit(t).T
  valid_B = jnp.ones((b,), bool) if mask is None else jnp.asarray(mask).astype(bool)
  pairs_BxB = valid_B[:, None] & valid_B[None, :] & ~jnp.eye(b, dtype=bool)
  return masked_sum(jnp.square(sim_s_BxB - sim_t_BxB), pairs_BxB)


def cosine_score_mse_sum(emb_2BxD, scores_B, *, mask=None, max_score: float = 5.0):
  e = jnp.asarray(emb_2BxD, jnp.float32)
  b = jnp.shape(scores_B)[0]
  if e.ndim != 2 or e.shape[0] != 2 * b:
    raise ValueError(f'embeddings must be [2B, D] (the pairs\' first sentences, then their '
                     f'second ones) for {b} scores, got {e.shape}.')
  u, v = _unit(e[:b]), _unit(e[b:])
  target = jnp.asarray(scores_B, jnp.float32) / max_score
  return masked_sum(jnp.square(jnp.sum(u * v, axis=-1) - target), mask)


PAIR_LOSSES = {'cosine_score_mse': cosine_score_mse_sum}

EMBEDDING_LOSSES = {
    'embedding_mse': embedding_mse_sum,
    'embedding_cosine': embedding_cosine_sum,
    'embedding_similarity': embedding_similarity_sum,
}
