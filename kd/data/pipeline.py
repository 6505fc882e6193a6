"""grain pipelines from documents to packed language-model batches.

Every batch is a dict of numpy arrays, all [B, T]:
  input_ids   int32    tokens fed to the model (0 = `<pad>`)
  labels      int32    next token within the same segment (0 where masked)
  loss_mask   float32  1 where `labels` is a real next token of the segment
  segment_ids int32    1, 2, ... per packed piece in the row, 0 = padding
  positions   int32    0, 1, ... restarting at every segment

How: each document is tokenized once as `<bos> text <eos>` (cached in memory,
not redone per epoch), cut into pieces of at most T+1 tokens that overlap by one
token, and the pieces are packed into rows of T+1 by grain's
`FirstFitPackIterDataset`. A row gives inputs `row[:-1]` and labels `row[1:]`.
Because pieces overlap by one, every token of a document after `<bos>` is a
label exactly once, so long documents are split without losing a prediction;
positions restart at 0 in each piece (attention never crosses a segment).

Documents tokenized elsewhere (a checkpoint's own tokenizer, a chat template)
enter through `make_packed_dataset` / `make_packed_eval_batches` as `Doc`s: their
token ids and, optionally, a per-token weight; a token of weight 0 is never a
label (a chat's system and user turns), so `loss_mask` is 1 only where the
label token has weight 1 and the same segment.

Multi-host: each host passes its own `shard_index` (e.g.
`jax.process_index()`) and `shard_count` (`jax.process_count()`) and reads only
documents `shard_index::shard_count`, which it tokenizes, shuffles and packs on
its own. Shards are disjoint and together cover the split; with `repeat=True`
(the training default) every host yields batches forever, so hosts never run out
at different steps.

Checkpointing: the iterator of `make_iterator` restores its exact position
through `get_state()` / `set_state()`, and through orbax with
`grain.checkpoint.CheckpointSave(it)` / `grain.checkpoint.CheckpointRestore(it)`
inside `ocp.args.Composite`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import grain
import numpy as np
import tokenizers

from kd.data import tokenizer as tokenizer_lib

FEATURES = ("input_ids", "labels", "loss_mask", "segment_ids", "positions")
_DTYPES = {
    "input_ids": np.int32,
    "labels": np.int32,
    "loss_mask": np.float32,
    "segment_ids": np.int32,
    "positions": np.int32,
}
DEFAULT_PACKING_BINS = 16


@dataclasses.dataclass(frozen=True)
class Doc:
  """One tokenized document: int32 ids [N] and the weight of each as a label
  (None: every token counts; else float32 [N] of 0s and 1s)."""

  ids: np.ndarray
  weights: np.ndarray | None = None

  def __post_init__(self):
    if self.weights is not None and self.weights.shape != self.ids.shape:
      raise ValueError(
          f"Doc weights {self.weights.shape} must match ids {self.ids.shape}."
      )


def tokenize_documents(
    source: Sequence[str],
    tok: tokenizers.Tokenizer,
    *,
    shard_index: int = 0,
    shard_count: int = 1,
) -> list[np.ndarray]:
  """`<bos> doc <eos>` ids (int32) of documents `shard_index::shard_count`."""
  if not 0 <= shard_index < shard_count:
    raise ValueError(
        f"Need 0 <= shard_index < shard_count, got {shard_index=},"
        f" {shard_count=}."
    )
  docs = [source[i] for i in range(shard_index, len(source), shard_count)]
  if not docs:
    raise ValueError(
        f"Shard {shard_index}/{shard_count} of a source with {len(source)}"
        " documents is empty; use fewer shards."
    )
  ids = tokenizer_lib.encode_batch(tok, docs, add_bos=True, add_eos=True)
  return [np.asarray(x, dtype=np.int32) for x in ids]


def split_long(docs: Sequence[np.ndarray | Doc], seq_len: int) -> list:
  """Pieces of at most seq_len + 1 tokens, consecutive pieces sharing a token.

  Piece k of a document is `doc[k*seq_len : k*seq_len + seq_len + 1]`, so the
  labels of its pieces (`piece[1:]`) concatenate to `doc[1:]`. A `Doc` gives
  `Doc` pieces (its weights cut alike); pieces without a label are dropped.
  """
  pieces = []
  for doc in docs:
    ids = doc.ids if isinstance(doc, Doc) else doc
    for start in range(0, max(len(ids) - 1, 1), seq_len):
      cut = slice(start, start + seq_len + 1)
      if not isinstance(doc, Doc):
        pieces.append(doc[cut])
      elif doc.weights is None:
        pieces.append(Doc(doc.ids[cut]))
      elif doc.weights[cut][1:].any():
        pieces.append(Doc(doc.ids[cut], doc.weights[cut]))
  return pieces


def _as_features(piece) -> dict[str, np.ndarray]:
  if not isinstance(piece, Doc):
    return {"tokens": piece}
  weights = piece.weights
  if weights is None:
    weights = np.ones(piece.ids.shape, np.float32)
  return {"tokens": piece.ids, "weights": np.asarray(weights, np.float32)}


def _to_example(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A packed row of T+1 tokens -> the T-long model inputs and targets."""
  tokens = packed["tokens"]
  segments = packed["tokens_segment_ids"]
  mask = (segments[:-1] == segments[1:]) & (segments[:-1] > 0)
  if "weights" in packed:  # a label counts only where its token has weight
    mask &= packed["weights"][1:] > 0
  example = {
      "input_ids": tokens[:-1],
      "labels": np.where(mask, tokens[1:], tokenizer_lib.PAD_ID),
      "loss_mask": mask,
      "segment_ids": segments[:-1],
      "positions": packed["tokens_positions"][:-1],
  }
  return {k: np.asarray(v, dtype=_DTYPES[k]) for k, v in example.items()}


def _examples(
    pieces: list,
    *,
    seq_len: int,
    seed: int,
    shuffle: bool,
    num_epochs: int | None,
    packing_bins: int,
) -> grain.IterDataset:
  """Unbatched packed examples over `num_epochs` passes (None = forever)."""
  ds = grain.MapDataset.source(pieces)
  if shuffle:
    ds = ds.shuffle(seed=seed)  # reshuffled differently in every epoch
  return _packed(ds.repeat(num_epochs), with_weights=bool(pieces) and isinstance(
      pieces[0], Doc), seq_len=seq_len, seed=seed, shuffle=shuffle, packing_bins=packing_bins)


def _packed(ds: grain.MapDataset, *, with_weights: bool, seq_len: int, seed: int,
            shuffle: bool, packing_bins: int) -> grain.IterDataset:
  """Pieces packed into rows of seq_len + 1 tokens, as model examples."""
  # The pieces are already in memory: no reader threads needed.
  ds = ds.map(_as_features).to_iter_dataset(grain.ReadOptions(num_threads=0))
  length_struct = {"tokens": seq_len + 1}
  if with_weights:
    length_struct["weights"] = seq_len + 1
  ds = grain.experimental.FirstFitPackIterDataset(
      ds,
      length_struct=length_struct,
      num_packing_bins=packing_bins,
      seed=seed,
      shuffle_bins=shuffle,
  )
  return ds.map(_to_example)


def make_mixed_dataset(
    groups: Sequence[Sequence[Doc]],
    weights: Sequence[float],
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    packing_bins: int = DEFAULT_PACKING_BINS,
) -> grain.IterDataset:
  """Packed batches, forever, of pieces drawn from `groups` of `Doc`s with probabilities
  `weights` (shares of pieces, each group shuffled and repeated on its own; grain's mix)."""
  _check_positive(seq_len=seq_len, batch_size=batch_size, packing_bins=packing_bins)
  if len(groups) != len(weights) or min(weights) <= 0 or not all(groups):
    raise ValueError(f"{len(groups)} groups need as many weights > 0 and documents in each; got "
                     f"weights {list(weights)}, sizes {[len(g) for g in groups]}.")
  parts = [grain.MapDataset.source(split_long(g, seq_len)).shuffle(seed=seed + i).repeat(None)
           for i, g in enumerate(groups)]
  mixed = grain.MapDataset.mix(parts, weights=list(weights))
  return _packed(mixed, with_weights=True, seq_len=seq_len, seed=seed, shuffle=True,
                 packing_bins=packing_bins).batch(batch_size, drop_remainder=True)


def make_lm_dataset(
    source: Sequence[str],
    tokenizer: tokenizers.Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    repeat: bool = True,
    shard_index: int = 0,
    shard_count: int = 1,
    num_epochs: int | None = None,
    packing_bins: int = DEFAULT_PACKING_BINS,
) -> grain.IterDataset:
  """Packed LM batches (see module docstring) from a source of documents.

  Deterministic given `seed`. With `repeat=True` runs `num_epochs` passes
  (None = forever); with `repeat=False` one pass. A last incomplete batch is
  dropped (use `make_eval_batches` to see every token). `packing_bins` trades
  padding for order: with 1 bin and `shuffle=False` pieces come out in document
  order; more bins pack tighter.
  """
  _check_positive(seq_len=seq_len, batch_size=batch_size, packing_bins=packing_bins)
  docs = tokenize_documents(
      source, tokenizer, shard_index=shard_index, shard_count=shard_count
  )
  return make_packed_dataset(
      docs, seq_len=seq_len, batch_size=batch_size, seed=seed, shuffle=shuffle,
      repeat=repeat, num_epochs=num_epochs, packing_bins=packing_bins)


def make_packed_dataset(
    docs: Sequence[np.ndarray | Doc],
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    repeat: bool = True,
    num_epochs: int | None = None,
    packing_bins: int = DEFAULT_PACKING_BINS,
) -> grain.IterDataset:
  """Packed batches of documents that are already token ids (or `Doc`s)."""
  _check_positive(seq_len=seq_len, batch_size=batch_size, packing_bins=packing_bins)
  if not repeat and num_epochs not in (None, 1):
    raise ValueError(
        f"repeat=False means one pass but num_epochs={num_epochs}; set"
        " repeat=True to run several epochs."
    )
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}.")
  examples = _examples(
      split_long(docs, seq_len),
      seq_len=seq_len,
      seed=seed,
      shuffle=shuffle,
      num_epochs=num_epochs if repeat else 1,
      packing_bins=packing_bins,
  )
  return examples.batch(batch_size, drop_remainder=True)


def make_iterator(
    source: Sequence[str], tokenizer: tokenizers.Tokenizer, **kwargs
) -> grain.DatasetIterator:
  """`iter(make_lm_dataset(source, tokenizer, **kwargs))`: a checkpointable iterator."""
  return iter(make_lm_dataset(source, tokenizer, **kwargs))


def make_eval_batches(
    source: Sequence[str],
    tokenizer: tokenizers.Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    packing_bins: int = DEFAULT_PACKING_BINS,
) -> list[dict[str, np.ndarray]]:
  """Every token of the split once, in fixed order; the last batch is padded.

  Padding rows are all zeros (loss_mask 0), so sums over batches of
  `loss_mask` count each label of the split exactly once.
  """
  _check_positive(seq_len=seq_len, batch_size=batch_size, packing_bins=packing_bins)
  return make_packed_eval_batches(
      tokenize_documents(source, tokenizer), seq_len=seq_len,
      batch_size=batch_size, packing_bins=packing_bins)


def make_packed_eval_batches(
    docs: Sequence[np.ndarray | Doc],
    *,
    seq_len: int,
    batch_size: int,
    packing_bins: int = DEFAULT_PACKING_BINS,
    max_batches: int = 0,
) -> list[dict[str, np.ndarray]]:
  """`make_eval_batches` of documents that are already token ids (or `Doc`s);
  with `max_batches` > 0, only the first that many batches."""
  _check_positive(seq_len=seq_len, batch_size=batch_size, packing_bins=packing_bins)
  rows = []
  for row in _examples(
      split_long(docs, seq_len),
      seq_len=seq_len,
      seed=0,
      shuffle=False,
      num_epochs=1,
      packing_bins=packing_bins,
  ):
    rows.append(row)
    if max_batches and len(rows) == max_batches * batch_size:
      break
  rows += [_empty_example(seq_len)] * (-len(rows) % batch_size)
  return [
      {k: np.stack([r[k] for r in rows[i : i + batch_size]]) for k in FEATURES}
      for i in range(0, len(rows), batch_size)
  ]


def _empty_example(seq_len: int) -> dict[str, np.ndarray]:
  return {k: np.zeros((seq_len,), dtype=_DTYPES[k]) for k in FEATURES}


def _check_positive(**values: int) -> None:
  for name, value in values.items():
    if value < 1:
      raise ValueError(f"{name} must be >= 1, got {value}.")
