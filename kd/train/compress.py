"""Compressed students in training, shared by the decoder job (kd.train.run) and the sentence job
(kd.train.sentence): PEFT (config.peft) and quantization (config.quant, config.teacher.quant).

  comp = compress.read(config)                                  # once, a Compression
  model_config, init_variables = grow_peft(comp, model_config, init_variables, seed)
  spec = Spec(**students(comp, module), ...)             # LoRA-wrapped when peft is 'lora'
  trainable, base = split_student(comp, module, init_variables, seed, random_init=...)
  state = create_state({'student': trainable, ...}).replace(frozen=place(frozen_base(comp, base)))
  ... train ...
  params, trainable_count = finish(comp, state.params['student'], state.frozen)

A PEFT student trains only its adapters (LoRA A/B, or the adapter / prefix / prompt params);
the rest of its starting variables is a frozen base that rides in `TrainState.frozen` (an input
of the step, never updated nor checkpointed), stored RTN-quantized under QLoRA
(config.quant.method 'qlora'). `finish` returns the plain model: LoRA merged into its base, and
under QAT (config.quant.method 'qat') the student quantized and dequantized, the model that was
evaluated and is exported.
"""

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from kd import peft
from kd import quant
from kd.train import sections
from kd.train import student_weights


@dataclasses.dataclass(frozen=True)
class Compression:
  """What config.peft, config.quant and config.teacher.quant ask for (`read`); the default
  compresses nothing."""
  peft_method: str = 'none'  # 'none', 'lora', 'adapter', 'prefix' or 'prompt'
  lora: peft.LoraConfig | None = None  # peft_method 'lora'
  peft_size: int = 0  # the adapter width, prefix or prompt length
  quant_method: str = 'none'  # 'none', 'qat' or 'qlora'
  quant_config: quant.QuantConfig | None = None  # the student's grid under 'qat' / 'qlora'
  teacher_quant: quant.QuantConfig | None = None  # the teacher run quantized; None: in float
  teacher_act_bits: int | None = None  # 8: its quantized projections' inputs too

  @property
  def qat(self) -> quant.QuantConfig | None:
    """The QuantConfig the student trains through (quant_method 'qat'), or None."""
    return self.quant_config if self.quant_method == 'qat' else None

  @property
  def qlora(self) -> quant.QuantConfig | None:
    """The QuantConfig a LoRA student's frozen base is stored in ('qlora'), or None."""
    return self.quant_config if self.quant_method == 'qlora' else None


def read(config) -> Compression:
  """config.peft, config.quant and config.teacher.quant as a Compression (the sections' own
  parsers: kd.peft.from_config, sections.quant_config, sections.teacher_quant_config)."""
  pc = config.get('peft') or {}
  method = pc.get('method', 'none')
  lora = peft.from_config(pc)  # (checks the method)
  size = int(pc.get('size', 0)) if method in peft.adapters.CONFIG_FIELDS else 0
  quant_method, qcfg = sections.quant_config(config)
  teacher_quant = sections.teacher_quant_config(config)
  act_bits = None if teacher_quant is None else sections.teacher_act_bits(config)
  return Compression(peft_method=method, lora=lora, peft_size=size, quant_method=quant_method,
                     quant_config=qcfg, teacher_quant=teacher_quant, teacher_act_bits=act_bits)


def student_model(comp: Compression, module, train: bool = False):
  """`module` with LoRA adapters when comp.lora says so (qwix intercepts its projections; the
  module itself is unchanged). `train`: with the adapters' dropout (lora.dropout > 0), which
  draws from the 'dropout' rng stream; otherwise deterministic (evaluation, sampling)."""
  return module if comp.lora is None else peft.lora_model(module, comp.lora, train=train)


def students(comp: Compression, module) -> dict[str, Any]:
  """The step's student fields (kd.train.step.Spec): `student`, the module trained, and under
  LoRA dropout `student_eval`, the same adapters without it, and `student_rngs`, the rng
  streams the training forward draws from."""
  if comp.lora is None or not comp.lora.dropout:
    return dict(student=student_model(comp, module))
  return dict(student=student_model(comp, module, train=True),
              student_eval=student_model(comp, module), student_rngs=('dropout',))


def grow_peft(comp: Compression, model_config, variables, seed: int):
  """(model config, variables) of the student comp trains: for 'adapter', 'prefix' and
  'prompt' the config gains the method's field (= comp.peft_size) and `variables` its new
  params (kd.peft.adapters.add_peft_params); for other methods both pass through."""
  if comp.peft_method not in peft.adapters.CONFIG_FIELDS:
    return model_config, variables
  return peft.adapters.add_peft_params(model_config, variables, comp.peft_method, comp.peft_size,
                                       jax.random.key(seed + 7))


def split_student(comp: Compression, module, init_variables, seed: int, *,
                  random_init: Callable[[], Any] | None = None):
  """(trained variables, frozen base or None) of a student (`module`, unwrapped) starting from
  `init_variables`.

  LoRA: the base is `init_variables` (or `random_init()` when None) and the trained variables
  are fresh A/B leaves (B = 0, so the student starts as its base); adapter / prefix / prompt:
  their params, already in `init_variables`, are split off it; no PEFT: everything trains (None
  = the caller's random init). The trained variables are a copy (the step donates the state;
  the caller keeps its arrays).
  """
  trainable, base = init_variables, None
  if comp.lora is not None:
    base = random_init() if init_variables is None else init_variables
    trainable = peft.init_lora(student_model(comp, module), base, jax.random.key(seed + 7),
                               comp.lora)
  elif comp.peft_method != 'none':
    trainable, base = peft.adapters.split(comp.peft_method, init_variables)
  if trainable is not None:
    trainable = jax.tree.map(jnp.array, trainable)
  return trainable, base


def frozen_base(comp: Compression, base):
  """What `TrainState.frozen` holds for `base`: a copy (the step donates the state), RTN-quantized
  under QLoRA (a kd.quant.QuantizedParams, dequantized inside the step); None for no base."""
  if base is None:
    return None
  if comp.qlora is not None:
    base = quant.quantize_params(base, comp.qlora)
  return jax.tree.map(jnp.array, base)


def finish(comp: Compression, trained, frozen):
  """(the plain student's variables, trained parameter count or None) at the end of a run.

  `trained` is state.params['student'], `frozen` state.frozen (both on one device). A PEFT
  student's adapters join their (dequantized) base, LoRA merged in (kd.peft.merge); under QAT the
  student is its RTN-quantized-then-dequantized self, the model the step evaluated.
  """
  count = None if frozen is None else peft.count(trained)
  params = student_weights.joined({'student': trained}, frozen)  # (dequantizes a QLoRA base)
  if frozen is not None and comp.lora is not None:
    params = peft.merge(params, comp.lora)
  if comp.qat is not None:
    params = quant.dequantize(quant.quantize_params(params, comp.qat))
  return params, count


def quantized_teacher(comp: Compression, teacher, teacher_params, seq_len: int = 8):
  """(teacher, params) as comp.teacher_quant says: the target projections stored as int8 /
  int4 values and scales (kd.quant RTN) and run as qwix's quantized matmuls
  (kd.quant.runtime), so no float copy of them is kept; the pair unchanged when it is None.
  With teacher_act_bits=8 their inputs are quantized per token too (int8 x int8)."""
  if comp.teacher_quant is None:
    return teacher, teacher_params
  qparams = quant.quantize_params(teacher_params, comp.teacher_quant)  # (per layer, also scanned)
  model = quant.ptq_model(teacher, qparams, act_bits=comp.teacher_act_bits)
  return model, quant.ptq_variables(model, qparams, jnp.zeros((1, seq_len), jnp.int32))
