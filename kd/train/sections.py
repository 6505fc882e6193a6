"""Config sections read into the typed values their subsystems take, with an error that says
what to do when a section is wrong: the student's quantization (method, kd.quant.QuantConfig),
the teacher's (QuantConfig, activation bits), the teacher layers a student starts from, and the
vocabulary rows logit losses compare.

  method, qcfg = sections.quant_config(config)     # ('qat', QuantConfig(bits=4, ...))
"""

from absl import logging


class ConfigError(ValueError):
  pass


def student_init_layers(config, num_teacher_layers: int) -> list:
  """The teacher layers a student starts from (config.student_init)."""
  from kd.models import init_from  # pylint: disable=g-import-not-at-top
  si = config.get('student_init') or {}
  layers = list(si.get('layers_list', ()) or ()) or si.get('layers', 'every_k')
  return init_from.select_layers(num_teacher_layers, layers, si.get('k', 2))


QUANT_METHODS = ('none', 'qat', 'qlora')
# Where the llm job's student comes from: a cut of the teacher, a checkpoint, or random weights.
STUDENT_SOURCES = ('cut', 'path', 'fresh')


def quant_config(config):
  """config.quant -> (method, kd.quant.QuantConfig or None)."""
  from kd import quant  # pylint: disable=g-import-not-at-top
  qc = config.get('quant') or {}
  method = qc.get('method', 'none')
  if method not in QUANT_METHODS:
    raise ConfigError(f'config.quant.method={method!r}; valid: {QUANT_METHODS} (qat: the '
                      'student trains through fake-quantized weights; qlora: with peft.method='
                      "'lora', the frozen base is stored quantized)")
  if method == 'none':
    return method, None
  try:
    return method, quant.QuantConfig(target=qc.target, bits=int(qc.bits),
                                      group_size=int(qc.group_size) or None,
                                      embed_bits=int(qc.get('embed_bits', 0)) or None)
  except ValueError as e:
    raise ConfigError(f'config.quant: {e}') from None


def teacher_quant_config(config):
  """config.teacher.quant -> the kd.quant.QuantConfig the teacher runs with, or None (bits 0)."""
  from kd import quant  # pylint: disable=g-import-not-at-top
  tq = (config.get('teacher') or {}).get('quant') or {}
  bits = int(tq.get('bits', 0))
  if not bits:
    return None
  try:
    return quant.QuantConfig(target=tq.get('target', r'.*_proj|lm_head'), bits=bits,
                             group_size=int(tq.get('group_size', 0)) or None)
  except ValueError as e:
    raise ConfigError(f'config.teacher.quant: {e} (bits 0 keeps the teacher in float)') from None


def teacher_act_bits(config) -> int | None:
  """config.teacher.quant.act_bits: 8 quantizes the quantized projections' inputs too, per
  token as they run (int8 x int8 matmuls, kd.quant.runtime); 0 or absent keeps them in float."""
  tq = (config.get('teacher') or {}).get('quant') or {}
  act = int(tq.get('act_bits', 0)) or None
  if act is not None and act != 8:
    raise ConfigError(f'config.teacher.quant.act_bits={act}: use 8 (int8 x int8 matmuls) or 0 '
                      '(the inputs of the quantized projections stay in float).')
  if act and int(tq.get('bits', 0)) != 8:
    raise ConfigError(f"config.teacher.quant.act_bits=8 multiplies int8 by int8, so it needs "
                      f"teacher.quant.bits=8 (got {tq.get('bits', 0)}): set bits=8, or act_bits=0.")
  return act


def vocab_slice(student_vocab: int, teacher_vocab: int, *, same_tokenizer: bool) -> int:
  """The number of vocabulary rows the logit losses compare.

  Models of one tokenizer often pad the embedding to a multiple of 64 or 128 (Qwen: 151936 vs
  152064): the extra rows are never real tokens, so both sides are sliced to the smaller size.
  Different tokenizers cannot be compared token by token.
  """
  if student_vocab == teacher_vocab:
    return student_vocab
  if not same_tokenizer:
    raise ConfigError(
        f'teacher vocab {teacher_vocab} != student vocab {student_vocab} and the tokenizers '
        'differ: logit distillation needs one tokenizer. Use the teacher\'s tokenizer for the '
        'student, or use feature losses only.')
  n = min(student_vocab, teacher_vocab)
  logging.warning('teacher vocab %d != student vocab %d with the same tokenizer: comparing the '
                  'first %d rows (padding rows dropped)', teacher_vocab, student_vocab, n)
  return n
