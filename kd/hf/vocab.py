"""Vocabularies of teacher and student: padded embedding rows, one tokenizer or a clear refusal.

Checkpoints often pad the embedding past the tokenizer (to a multiple of 64 or 128: Qwen's
151936 vs 152064 rows, GPT-2 exports padded to 50304); those rows are never a real token, so
logit losses compare the first `vocab_rows` rows only. Two different tokenizers cannot be
compared token by token at all.
"""

from __future__ import annotations


def vocab_rows(model) -> int:
  """How many leading rows of the model's vocabulary are real tokens: len(tokenizer) when the
  model carries one, else config.vocab_size."""
  size = model.config.vocab_size
  if model.tokenizer is None:
    return size
  n = len(model.tokenizer)
  if n > size:
    raise ValueError(f'the tokenizer has {n} tokens but the model only {size} vocabulary rows '
                     f'(source: {model.source}); token ids >= {size} would index past the '
                     'embedding. Resize the embedding or use the matching tokenizer.')
  return n


def check_same_tokenizer(teacher_tok, student_tok) -> int:
  """Returns the vocabulary size if both tokenizers map the same strings to the same ids.

  Raises ValueError saying how they differ otherwise. Accepts transformers tokenizers or
  `tokenizers.Tokenizer`s (anything with get_vocab()).
  """
  t, s = teacher_tok.get_vocab(), student_tok.get_vocab()
  if t == s:
    return len(t)
  moved = sorted(k for k in t.keys() & s.keys() if t[k] != s[k])
  only_t, only_s = sorted(t.keys() - s.keys()), sorted(s.keys() - t.keys())
  examples = lambda keys: ', '.join(repr(k) for k in keys[:3]) or 'none'
  raise ValueError(
      f'the teacher and student tokenizers differ ({len(t)} vs {len(s)} tokens): '
      f'{len(moved)} shared tokens have other ids ({examples(moved)}), {len(only_t)} are only '
      f"in the teacher's ({examples(only_t)}), {len(only_s)} only in the student's "
      f'({examples(only_s)}). Logit distillation compares token by token: give the student the '
      "teacher's tokenizer (kd.models.init_from.student_from_teacher keeps it), or distil "
      'features only.')


def shared_vocab_rows(teacher, student) -> int:
  """Rows the logit losses of teacher and student `Model`s compare: their tokenizers must be
  the same (checked when both are known), and padded rows past the tokenizer are dropped."""
  if teacher.tokenizer is not None and student.tokenizer is not None:
    check_same_tokenizer(teacher.tokenizer, student.tokenizer)
  return min(vocab_rows(teacher), vocab_rows(student))
