"""A pretrained teacher's data: sources read, tokenized with its tokenizer and chat template,
packed with segment ids.

  data = TokenizedData(config.data, tokenizer, vocab_size=49152, max_positions=8192)
  it = data.iterator(seed)             # this process's rows of every train batch (checkpointable)
  data.eval_sets['stsb:dev']           # fixed held-out batches, every label once
  data.prompts                         # held-out chat prompts and reference answers

config.data:
  train            source string (kd.data.sources) of the train records, text or chat; sources
                   joined by '+' are one set, unless each ends in @W: then batches draw pieces
                   from each with probability W (e.g. 'a.jsonl@0.7+b.jsonl@0.3')
  eval             held-out sources, comma separated; each is reported on its own
  text_prefix      a token put before every text document ('' = none; kd.data.chat.encode)
  seq_len, batch_size (global), eval_batch_size, max_eval_batches (0 = all)
  monitor_batches  batches of the first eval set evaluated during training (train.eval_every)
  packing_bins     grain first-fit packing bins
  prompts          held-out chat prompts answered at evaluation ('' = none), max_prompts of them
  task             'lm': packed documents; 'dialogue': chat records as fixed prompt/response
                   rows (kd.data.dialogue's layout, prompt_len / response_len), what on-policy
                   (GKD) and SeqKD training need

Tokens are cached in memory once; the train pieces are split among processes, each packing
and shuffling its own (kd.data.pipeline).
"""

from __future__ import annotations

import jax

from kd.data import chat
from kd.data import dialogue
from kd.data import pipeline
from kd.data import sources
from kd.data import teacher_cache as teacher_cache_lib


def eval_names(spec: str) -> list[str]:
  return [s.strip() for s in spec.split(',') if s.strip()]


def mixture(spec: str) -> list[tuple[str, float | None]]:
  """[(source, weight)] of a train spec: one unweighted set, or every part with its @W."""
  parts = [p.strip() for p in spec.split('+')]
  weighted = [p.rpartition('@') if '@' in p else (p, '', '') for p in parts]
  if not any(w for _, _, w in weighted):
    return [(spec, None)]
  try:
    out = [(p, float(w)) for p, _, w in weighted]
  except ValueError:
    raise sources.DataError(f'config.data.train={spec!r}: give every part a weight '
                            '(SOURCE@W) or none') from None
  if min(w for _, w in out) <= 0:
    raise sources.DataError(f'config.data.train={spec!r}: weights must be > 0')
  return out


class TokenizedData:
  """The train pieces, the held-out eval sets and prompts of one run (module docstring)."""

  def __init__(self, data_config, tokenizer, *, vocab_size: int, max_positions: int):
    dc = data_config
    if int(dc.seq_len) > max_positions:
      raise sources.DataError(f'config.data.seq_len={dc.seq_len} is longer than the model\'s '
                              f'{max_positions} positions; use seq_len <= {max_positions}')
    self.config, self.tokenizer, self.vocab_size = dc, tokenizer, vocab_size
    self.task = dc.get('task', 'lm')
    self.prompts = self._prompts()
    if self.task == 'dialogue':
      self._dialogue()
      return
    encode = lambda spec: self.encode(sources.read(spec), spec)
    self.train_groups = [(encode(spec), weight) for spec, weight in mixture(dc.train)]
    for (docs, _), (spec, _) in zip(self.train_groups, mixture(dc.train)):
      if not docs:
        raise sources.DataError(f'config.data.train: {spec!r} has no document of two tokens or '
                                'more')
    self.eval_sets = {}
    for name in eval_names(dc.eval):
      self.eval_sets[name] = pipeline.make_packed_eval_batches(
          encode(name), seq_len=dc.seq_len, batch_size=dc.eval_batch_size,
          packing_bins=dc.packing_bins, max_batches=int(dc.max_eval_batches))
    self._monitor()

  def _monitor(self):
    first = next(iter(self.eval_sets.values()), [])
    self.eval_batches = first[:int(self.config.get('monitor_batches', 0))]

  def _dialogue(self):
    """train_arrays (and teacher_arrays, the same) and eval sets in the dialogue layout."""
    dc = self.config
    if len(mixture(dc.train)) > 1:
      raise sources.DataError("config.data.task='dialogue' reads one set of chat records; give "
                              'config.data.train without @ weights')
    arrays = lambda spec: chat.dialogue_arrays(
        self.tokenizer, sources.read(spec), prompt_len=int(dc.prompt_len),
        response_len=int(dc.response_len), vocab_size=self.vocab_size, where=spec)
    self.train_arrays = self.teacher_arrays = arrays(dc.train)
    self.train_groups = []
    n = int(dc.max_eval_batches)
    self.eval_sets = {name: dialogue.eval_batches(arrays(name), dc.eval_batch_size)[:n or None]
                      for name in eval_names(dc.eval)}
    self._monitor()

  def _prompts(self) -> list[dict]:
    dc, out = self.config, []
    if not dc.get('prompts', ''):
      return out
    for n, r in enumerate(sources.read(dc.prompts)[:int(dc.max_prompts)]):
      messages = chat.messages_of(r, f'{dc.prompts}, record {n}')
      ids, answer = chat.prompt_ids(self.tokenizer, messages)
      asked = [m['content'] for m in messages if m['role'] == 'user']
      out.append({'ids': ids, 'reference': answer, 'prompt': asked[-1] if asked else ''})
    return out

  @property
  def train_docs(self) -> list:
    return [d for docs, _ in self.train_groups for d in docs]

  @property
  def train_tokens(self) -> int:
    return sum(len(d.ids) for d in self.train_docs)

  def encode(self, records, where: str) -> list:
    return chat.encode(self.tokenizer, records, vocab_size=self.vocab_size, where=where,
                       text_prefix=self.config.text_prefix)

  def add_train(self, records, where: str, weight: float) -> None:
    """More train records (e.g. teacher-generated text, kd.data.synthetic) drawn with
    probability `weight`, the other sources sharing the rest as before ('lm' task)."""
    if not 0 < weight < 1:
      raise sources.DataError(f'the weight of {where} must be in (0, 1), got {weight}')
    total = sum(w or 1.0 for _, w in self.train_groups)
    self.train_groups = [(docs, (w or 1.0) / total * (1 - weight))
                         for docs, w in self.train_groups]
    self.train_groups.append((self.encode(records, where), weight))

  def iterator(self, seed: int, teacher_cache: str = '', arrays=None, student: bool = True,
               shard: tuple[int, int] | None = None):
    """This process's rows of every batch (`data.batch_size` is the global batch); with
    `teacher_cache`, rows of that offline-teacher cache; in the dialogue task, rows of `arrays`
    (e.g. SeqKD's teacher answers) or of the train records. `shard` = (index, count) reads
    another shard than (jax.process_index(), jax.process_count()), e.g. every host's rows in
    one process. (`student`: the LM job's choice of split, one split here.)"""
    del student
    dc = self.config
    index, count = shard or (jax.process_index(), jax.process_count())
    sized = dict(batch_size=dc.batch_size // count, seed=seed)
    where = dict(shard_index=index, shard_count=count)
    if teacher_cache:
      return teacher_cache_lib.make_iterator(teacher_cache, **where, **sized)
    if self.task == 'dialogue':
      return dialogue.make_iterator(self.train_arrays if arrays is None else arrays, **where,
                                    **sized)
    groups, weights = [], []
    for docs, weight in self.train_groups:
      pieces = pipeline.split_long(docs, dc.seq_len)
      mine = pieces[index::count]
      if not mine:
        raise sources.DataError(f'config.data.train gives {len(pieces)} pieces of '
                                f'{dc.seq_len + 1} tokens, fewer than the {count} '
                                'processes; use more data or fewer processes')
      groups.append(mine)
      weights.append(weight)
    if len(groups) == 1:
      return iter(pipeline.make_packed_dataset(
          groups[0], seq_len=dc.seq_len, packing_bins=dc.packing_bins, **sized))
    return iter(pipeline.make_mixed_dataset(
        groups, weights, seq_len=dc.seq_len, packing_bins=dc.packing_bins, **sized))
