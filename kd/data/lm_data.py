"""The LM job's data: text splits of one TFDS dataset, a BPE tokenizer trained on the teacher's
split (kept in the workdir), and the held-out batches, shared by every stage of one workdir.

  data = lm_data.LMData(config, workdir)
  batches = data.iterator(seed)              # this process's rows of every global batch
"""

import jax

from kd import data as data_lib
from kd.data import dialogue
from kd.data import teacher_cache as teacher_cache_lib


def data_split(data_config, key: str) -> str:
  """config.data.<key> ('train_split' or 'teacher_split'); absent or '' is 'train'."""
  return data_config.get(key, 'train') or 'train'


class LMData:
  """The tokenizer, train split and eval batches shared by every stage of one workdir."""

  def __init__(self, config, workdir: str):
    dc = config.data
    # The teacher's and the tokenizer's text (data.teacher_split, the whole train split unless a
    # stream keeps its shards' held-out parts from them) and the students' (data.train_split,
    # e.g. 'train[:30%]', one shard of a stream). TFDS split arithmetic ('train[:27%]+...') works.
    teacher_split, train_split = data_split(dc, 'teacher_split'), data_split(dc, 'train_split')
    self.teacher_source = data_lib.load_text_split(dc.name, teacher_split)
    self.student_source = (self.teacher_source if train_split == teacher_split
                           else data_lib.load_text_split(dc.name, train_split))
    self.tokenizer = data_lib.get_or_train(
        workdir, lambda: (self.teacher_source[i] for i in range(len(self.teacher_source))),
        dc.vocab_size)
    self.vocab_size = self.tokenizer.get_vocab_size()
    eval_source = data_lib.load_text_split(dc.name, dc.get('eval_split', 'validation'))
    self.task = dc.get('task', 'lm')
    if self.task == 'dialogue':  # prompt -> response pairs of consecutive speeches
      arrays = lambda src: dialogue.encode(
          dialogue.speech_pairs([src[i] for i in range(len(src))]), self.tokenizer,
          prompt_len=dc.prompt_len, response_len=dc.response_len)
      # The students' pairs (data.train_split: what SeqKD's teacher answers too) and the
      # teacher's own (data.teacher_split), the same arrays when the splits are.
      self.teacher_arrays = arrays(self.teacher_source)
      self.train_arrays = (self.teacher_arrays if self.student_source is self.teacher_source
                           else arrays(self.student_source))
      self.eval_batches = dialogue.eval_batches(arrays(eval_source), dc.eval_batch_size)
    else:
      self.eval_batches = data_lib.make_eval_batches(
          eval_source, self.tokenizer, seq_len=dc.seq_len, batch_size=dc.eval_batch_size)
    if dc.get('max_eval_batches'):
      self.eval_batches = self.eval_batches[:dc.max_eval_batches]
    self.config = dc

  def iterator(self, seed: int, teacher_cache: str = '', arrays=None, student: bool = True):
    """This process's rows of every batch: `data.batch_size` is the global batch.

    With `teacher_cache`, rows come from that offline-teacher cache (rows + teacher top-k);
    with `arrays` (dialogue task), from those prompt/response arrays (e.g. SeqKD's). Otherwise
    a student reads data.train_split and the teacher (`student=False`) data.teacher_split.
    """
    shard = dict(batch_size=self.config.batch_size // jax.process_count(), seed=seed,
                 shard_index=jax.process_index(), shard_count=jax.process_count())
    if teacher_cache:
      return teacher_cache_lib.make_iterator(teacher_cache, **shard)
    if self.task == 'dialogue':
      if arrays is None:
        arrays = self.train_arrays if student else self.teacher_arrays
      return dialogue.make_iterator(arrays, **shard)
    return data_lib.make_iterator(self.student_source if student else self.teacher_source,
                                  self.tokenizer, seq_len=self.config.seq_len, **shard)
