"""The "LLM ranking" of sentence encoders: quality, latency, memory, cost, robustness,
generalization, and one overall rank.

  report = sts_report(model, dev_path, train_path)   # Spearman overall, per genre, held out
  sts_under_noise(model, dev_path, rate=0.1)          # Spearman with 10% character noise
  latency(model, batch_size=32, seq_len=32)           # sentences/s and tokens/s of the forward
  flops_per_token(model, seq_len=32)                  # XLA's count for the compiled forward
  memory(model, batch_size=32, seq_len=32)            # parameter and peak bytes
  rank(rows, {'spearman': 'max', 'peak_bytes': 'min'})

Generalization: the STS-B test split is deliberately absent, so it is measured on the dev pairs
whose source (column 1: MSRvid, headlines, answers-forums, ...) never occurs in STS-B train, the
text the students are distilled on. On STS-B these are answers-forums 2015 and track5.en-en 2017
(500 of the 1,500 dev pairs). Per-genre Spearman (column 0) is reported too.
"""

import csv
import glob
import string
import time

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats

from kd.data import sentences
from kd.eval import speed
from kd.eval import sts

NOISE_OPS = ('delete', 'substitute', 'insert')
_LETTERS = np.array(list(string.ascii_lowercase))
DIRECTIONS = ('max', 'min')


def char_noise(sentences, rate: float, seed: int = 0, ops=NOISE_OPS) -> list[str]:
  """Each character (spaces and punctuation too) is edited independently with probability
  `rate`, by one of `ops` picked uniformly: 'delete' it, 'substitute' a random lowercase letter
  (which may equal the original), or 'insert' a random lowercase letter after it.

  Deterministic in (sentence, its index, rate, seed): sentence i draws from its own generator
  seeded (seed, i), so noising a prefix of a list gives the prefix of the noised list.
  """
  if not 0.0 <= rate <= 1.0:
    raise ValueError(f'rate must be in [0, 1], got {rate}.')
  unknown = sorted(set(ops) - set(NOISE_OPS))
  if unknown or not ops:
    raise ValueError(f'ops {unknown or "()"} invalid; use a non-empty subset of {NOISE_OPS}.')
  out = []
  for i, s in enumerate(sentences):
    rng = np.random.default_rng((seed, i))
    hit = rng.random(len(s)) < rate
    op = rng.integers(0, len(ops), len(s))
    letter = _LETTERS[rng.integers(0, 26, len(s))]
    chars = []
    for c, h, o, l in zip(s, hit, op, letter):
      kind = ops[o] if h else 'keep'
      if kind == 'keep':
        chars.append(c)
      elif kind == 'substitute':
        chars.append(l)
      elif kind == 'insert':
        chars += [c, l]
    out.append(''.join(chars))
  return out


def read_sts_meta(path: str) -> tuple[list[str], list[str]]:
  """(genres, sources) of every pair of an STS-B file, in `sentences.read_sts` order (columns 0, 1)."""
  genres, sources = [], []
  with open(path, encoding='utf-8', newline='') as f:
    for row in csv.reader(f, delimiter='\t', quoting=csv.QUOTE_NONE):
      if row:
        genres.append(row[0])
        sources.append(row[1])
  return genres, sources


def spearman(cos, gold) -> float:
  """Spearman x100 of predicted similarities vs gold scores."""
  return 100.0 * float(scipy.stats.spearmanr(cos, gold).statistic)


def pair_cosines(model, s1, s2, **encode_kw) -> np.ndarray:
  """Cosine similarity of every (s1[i], s2[i]) pair's embeddings, float64."""
  emb = sts.encode(model, list(s1) + list(s2), **encode_kw)
  return np.sum(emb[:len(s1)] * emb[len(s1):], axis=-1, dtype=np.float64)


def sts_report(model, path: str, train_path: str | None = None, **encode_kw) -> dict:
  """One encode of `path`: {'spearman', 'n', 'genres': {genre: {'spearman', 'n'}}} and, given
  `train_path`, 'held_out': {'spearman', 'n', 'sources'} over the pairs whose source is absent
  from train (a held-out domain)."""
  s1, s2, gold = sentences.read_sts(path)
  genres, sources = read_sts_meta(path)
  cos = pair_cosines(model, s1, s2, **encode_kw)
  out = {'spearman': spearman(cos, gold), 'n': len(gold), 'genres': {}}
  for g in sorted(set(genres)):
    m = np.array([x == g for x in genres])
    out['genres'][g] = {'spearman': spearman(cos[m], gold[m]), 'n': int(m.sum())}
  if train_path is not None:
    held = held_out_sources(path, train_path)
    if not held:
      raise ValueError(f'every source of {path} also occurs in {train_path}: no held-out domain.')
    m = np.array([x in held for x in sources])
    out['held_out'] = {'spearman': spearman(cos[m], gold[m]), 'n': int(m.sum()),
                       'sources': held}
  return out


def held_out_sources(path: str, train_path: str) -> list[str]:
  """Sources (column 1) of `path` that never occur in `train_path`, sorted."""
  return sorted(set(read_sts_meta(path)[1]) - set(read_sts_meta(train_path)[1]))


def sts_by_genre(model, path: str, **encode_kw) -> dict:
  """{genre: {'spearman', 'n'}} of an STS-B file (main-news, main-captions, main-forums)."""
  return sts_report(model, path, **encode_kw)['genres']


def sts_under_noise(model, path: str, rate: float, seed: int = 0, **encode_kw) -> float:
  """STS Spearman x100 with both sentences of every pair passed through `char_noise`."""
  s1, s2, gold = sentences.read_sts(path)
  # One list, so sentence1 and sentence2 of a pair get independent noise.
  noised = char_noise(s1 + s2, rate, seed)
  return spearman(pair_cosines(model, noised[:len(s1)], noised[len(s1):], **encode_kw), gold)


def _inputs(model, batch_size: int, seq_len: int):
  vocab = model.config.vocab_size
  ids = np.random.default_rng(0).integers(0, vocab, (batch_size, seq_len), dtype=np.int32)
  return jnp.asarray(ids), jnp.ones((batch_size, seq_len), jnp.int32)


def latency(model, batch_size: int, seq_len: int = 32, runs: int = 5) -> dict:
  """{'sentences_per_s', 'tokens_per_s', 'seconds'} of the jitted pooled forward
  (`sts.embed`) at a fixed [batch_size, seq_len] of real tokens, best of `runs` after one
  untimed call (which compiles). Inputs are already on the device: no tokenisation or copies,
  unlike `speed.encode_throughput`."""
  ids, mask = _inputs(model, batch_size, seq_len)
  pooling = getattr(model.config, 'pooling', 'mean')
  call = lambda: sts.embed(model.module, model.params, ids, mask, pooling=pooling)
  call().block_until_ready()
  best = float('inf')
  for _ in range(runs):
    t0 = time.perf_counter()
    call().block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return {'sentences_per_s': batch_size / best, 'tokens_per_s': batch_size * seq_len / best,
          'seconds': best}


def flops_per_token(model, seq_len: int = 32, batch_size: int = 1) -> float:
  """FLOPs per token XLA counts (`cost_analysis`) for the compiled pooled forward at
  [batch_size, seq_len]; a matmul's multiply-add counts 2, elementwise ops count too."""
  ids = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32)
  pooling = getattr(model.config, 'pooling', 'mean')
  compiled = sts.embed.lower(model.module, model.params, ids, ids, pooling=pooling).compile()
  return xla_flops(compiled) / (batch_size * seq_len)


def xla_flops(compiled) -> float:
  """FLOPs XLA's cost_analysis counts for a compiled computation."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
    cost = cost[0]
  return float(cost['flops'])


def analytic_flops_per_token(config, seq_len: int) -> float:
  """2 x the matmul weights of every layer (q, k, v, o: 4 D^2; MLP: 2 D F) plus attention's
  scores and weighted sum (2 x 2 T D), per token; embeddings, norms and activations ignored."""
  d, f = config.hidden_size, config.intermediate_size
  return config.num_layers * (2 * (4 * d * d + 2 * d * f) + 4 * seq_len * d)


def memory(model, batch_size: int = 32, seq_len: int = 32) -> dict:
  """{'param_bytes', 'peak_bytes'}: the parameters, and XLA's plan for the whole forward at
  [batch_size, seq_len] (arguments, including the parameters, + outputs + temporaries)."""
  return {'param_bytes': speed.param_bytes(model.params),
          'peak_bytes': speed.forward_memory(model, batch_size=batch_size, seq_len=seq_len)['peak']}


def rank(rows: list[dict], keys: dict[str, str]) -> list[dict]:
  """Per-column ranks and their mean: for each key, 1 = best ('max': higher is better, 'min':
  lower is better), ties share their mean rank (scipy.stats.rankdata). A row whose value is
  None or NaN gets no rank in that column and its average is over the columns it has.

  Returns one dict per row, in order: {key: rank or None, ..., 'average': float or None}.
  """
  for key, direction in keys.items():
    if direction not in DIRECTIONS:
      raise ValueError(f'rank direction {direction!r} for {key!r}; use one of {DIRECTIONS}.')
  out = [{} for _ in rows]
  for key, direction in keys.items():
    values = [r.get(key) for r in rows]
    have = [i for i, v in enumerate(values) if v is not None and not np.isnan(v)]
    sign = -1.0 if direction == 'max' else 1.0
    ranks = scipy.stats.rankdata([sign * values[i] for i in have]) if have else []
    for i in range(len(rows)):
      out[i][key] = None
    for i, r in zip(have, ranks):
      out[i][key] = float(r)
  for o in out:
    got = [o[k] for k in keys if o[k] is not None]
    o['average'] = float(np.mean(got)) if got else None
  return out


def named_paths(entries, resolve=lambda path: path) -> dict[str, list[str]]:
  """{name: [paths]} from a ranking's --models entries: `name=PATH` starts a model, a bare PATH
  adds a path (a seed) to the model before it; globs are expanded and each path passed through
  `resolve` (e.g. a package name to its checkpoint). Raises ValueError naming a bad entry."""
  out, name = {}, None
  for entry in entries:
    if '=' in entry:
      name, entry = entry.split('=', 1)
      if name in out:
        raise ValueError(f'--models names {name!r} twice; list its paths after one name.')
      out[name] = []
    if name is None:
      raise ValueError(f'--models entry {entry!r} has no name; write name=PATH first.')
    paths = sorted(glob.glob(entry)) if any(c in entry for c in '*?[') else [entry]
    if not paths:
      raise ValueError(f'--models glob {entry!r} matches nothing.')
    out[name] += [resolve(p) for p in paths]
  return out
