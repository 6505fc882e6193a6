"""STS Benchmark: Spearman correlation of embedding cosine similarity with gold scores.

  model = kd.hf.load(path_to_minilm)
  kd.eval.sts.evaluate(model, 'data/stsbenchmark/sts-dev.csv')  # {'spearman': 86.7, ...}

Sentences are sorted by token length and batched with lengths padded up to a multiple of
`PAD_MULTIPLE`, so one jitted forward compiles once per bucket (a handful of times for STS-B),
not once per batch, and little compute goes to padding.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats

from kd.data import sentences
from kd.models import encoder as encoder_lib

PAD_MULTIPLE = 8


@functools.partial(jax.jit, static_argnames=('module', 'pooling', 'normalize'))
def embed(module, variables, input_ids_BxT, attention_mask_BxT, pooling: str = 'mean',
          normalize: bool = True):
  """Pooled embeddings [B,D] float32, L2-normalised by default (all-padding rows give zeros)."""
  out = module.apply(variables, input_ids_BxT, attention_mask=attention_mask_BxT)
  emb_BxD = encoder_lib.pool(out['hidden'], attention_mask_BxT, pooling)
  if not normalize:
    return emb_BxD
  norm_Bx1 = jnp.linalg.norm(emb_BxD, axis=-1, keepdims=True)
  return emb_BxD / jnp.maximum(norm_Bx1, 1e-12)


def _padded_length(n: int, max_length: int) -> int:
  return min(max_length, max(PAD_MULTIPLE, -(-n // PAD_MULTIPLE) * PAD_MULTIPLE))


def encode(model, sentences, batch_size: int = 64, max_length: int = 128, *,
           normalize: bool = True) -> np.ndarray:
  """Sentence embeddings [N, D] float32 (unit norm unless normalize=False), in input order.

  Tokenised by `model.tokenizer` (truncated to max_length); pooled by `model.config.pooling`
  (mean when the config has none). Every batch has `batch_size` rows (the last is padded with
  empty rows) so shapes repeat.
  """
  if model.tokenizer is None:
    raise ValueError(f'model from {model.source} has no tokenizer; load it from a directory with '
                     'tokenizer files or set Model.tokenizer.')
  sentences = list(sentences)
  unique = list(dict.fromkeys(sentences))  # STS-B repeats some sentences.
  ids = model.tokenizer(unique, truncation=True, max_length=max_length)['input_ids']
  pad_id = model.tokenizer.pad_token_id or 0
  pooling = getattr(model.config, 'pooling', 'mean')
  order = np.argsort([len(x) for x in ids], kind='stable')
  pending = []  # (indices, device embeddings); jax dispatch is asynchronous.
  for start in range(0, len(order), batch_size):
    idx = order[start:start + batch_size]
    t = _padded_length(max(len(ids[i]) for i in idx), max_length)
    ids_BxT = np.full((batch_size, t), pad_id, np.int32)
    mask_BxT = np.zeros((batch_size, t), np.int32)
    for row, i in enumerate(idx):
      ids_BxT[row, :len(ids[i])] = ids[i]
      mask_BxT[row, :len(ids[i])] = 1
    pending.append((idx, embed(model.module, model.params, ids_BxT, mask_BxT, pooling=pooling,
                                   normalize=normalize)))
  out = None
  for idx, emb in pending:
    emb = np.asarray(emb)
    if out is None:
      out = np.zeros((len(unique), emb.shape[-1]), np.float32)
    out[idx] = emb[:len(idx)]
  if out is None:
    return np.zeros((0, 0), np.float32)
  where = {s: i for i, s in enumerate(unique)}
  return out[[where[s] for s in sentences]]


def evaluate(model, path: str, *, batch_size: int = 64, max_length: int = 128) -> dict:
  """{'spearman', 'pearson'} (both x100) of cosine similarity vs gold, and 'n' pairs."""
  s1, s2, gold = sentences.read_sts(path)
  emb = encode(model, s1 + s2, batch_size=batch_size, max_length=max_length)
  cos = np.sum(emb[:len(s1)] * emb[len(s1):], axis=-1, dtype=np.float64)
  return {'spearman': 100.0 * float(scipy.stats.spearmanr(cos, gold).statistic),
          'pearson': 100.0 * float(scipy.stats.pearsonr(cos, gold).statistic),
          'n': len(gold)}
