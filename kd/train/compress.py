"""Compressed students in training, shared by the decoder job (kd.train.run) and the sentence job
(kd.train.sentence): PEFT (config.peft) and quantization (config.quant).

  model_config, init_variables = grow_peft(config, model_config, init_variables, seed)
  spec = Spec(**students(config, module), ...)           # LoRA-wrapped when peft is 'lora'
  trainable, base = split_student(config, module, init_variables, seed, random_init=...)
  state = create_state({'student': trainable, ...}).replace(frozen=place(frozen_base(config, base)))
  ... train ...
  params, trainable_count = finish(config, state.params['student'], state.frozen)

A PEFT student trains only its adapters (LoRA A/B, or the adapter / prefix / prompt params);
the rest of its starting variables is a frozen base that rides in `TrainState.frozen` (an input
of the step, never updated nor checkpointed), stored RTN-quantized under QLoRA
(config.quant.method 'qlora'). `finish` returns the plain model: LoRA merged into its base, and
under QAT (config.quant.method 'qat') the student quantized and dequantized, the model that was
evaluated and is exported.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp

from kd import peft
from kd import quant
from kd.train import sections
from kd.train import step as step_lib


def peft_method(config) -> str:
  return (config.get('peft') or {}).get('method', 'none')


def lora_config(config):
  """The kd.peft.LoraConfig of config.peft (method 'lora'), or None."""
  return peft.from_config(config.get('peft'))


def qat_config(config):
  """The kd.quant.QuantConfig the student trains through (config.quant.method 'qat'), or None."""
  method, qcfg = sections.quant_config(config)
  return qcfg if method == 'qat' else None


def student_model(config, module, train: bool = False):
  """`module` with LoRA adapters when config.peft says so (qwix intercepts its projections; the
  module itself is unchanged). `train`: with the adapters' dropout (peft.dropout > 0), which
  draws from the 'dropout' rng stream; otherwise deterministic (evaluation, sampling)."""
  lora = lora_config(config)
  return module if lora is None else peft.lora_model(module, lora, train=train)


def students(config, module) -> dict[str, Any]:
  """The step's student fields (kd.train.step.Spec): `student`, the module trained, and under
  LoRA dropout `student_eval`, the same adapters without it, and `student_rngs`, the rng
  streams the training forward draws from."""
  lora = lora_config(config)
  if lora is None or not lora.dropout:
    return dict(student=student_model(config, module))
  return dict(student=student_model(config, module, train=True),
              student_eval=student_model(config, module), student_rngs=('dropout',))


def grow_peft(config, model_config, variables, seed: int):
  """(model config, variables) of the student config.peft trains: for 'adapter', 'prefix' and
  'prompt' the config gains the method's field (= peft.size) and `variables` its new params
  (kd.peft.adapters.add_peft_params); for other methods both pass through."""
  method = peft_method(config)
  if method not in peft.adapters.CONFIG_FIELDS:
    return model_config, variables
  return peft.adapters.add_peft_params(model_config, variables, method, int(config.peft.size),
                                       jax.random.key(seed + 7))


def split_student(config, module, init_variables, seed: int, *,
                  random_init: Callable[[], Any] | None = None):
  """(trained variables, frozen base or None) of a student (`module`, unwrapped) starting from
  `init_variables`.

  LoRA: the base is `init_variables` (or `random_init()` when None) and the trained variables
  are fresh A/B leaves (B = 0, so the student starts as its base); adapter / prefix / prompt:
  their params, already in `init_variables`, are split off it; no PEFT: everything trains (None
  = the caller's random init). The trained variables are a copy (the step donates the state;
  the caller keeps its arrays).
  """
  method, lora = peft_method(config), lora_config(config)
  trainable, base = init_variables, None
  if lora is not None:
    base = random_init() if init_variables is None else init_variables
    trainable = peft.init_lora(student_model(config, module), base, jax.random.key(seed + 7),
                               lora)
  elif method != 'none':
    trainable, base = peft.adapters.split(method, init_variables)
  if trainable is not None:
    trainable = jax.tree.map(jnp.array, trainable)
  return trainable, base


def frozen_base(config, base):
  """What `TrainState.frozen` holds for `base`: a copy (the step donates the state), RTN-quantized
  under QLoRA (a kd.quant.QuantizedParams, dequantized inside the step); None for no base."""
  if base is None:
    return None
  method, qcfg = sections.quant_config(config)
  if method == 'qlora':
    base = quant.quantize_params(base, qcfg)
  return jax.tree.map(jnp.array, base)


def finish(config, trained, frozen):
  """(the plain student's variables, trained parameter count or None) at the end of a run.

  `trained` is state.params['student'], `frozen` state.frozen (both on one device). A PEFT
  student's adapters join their (dequantized) base, LoRA merged in (kd.peft.merge); under QAT the
  student is its RTN-quantized-then-dequantized self, the model the step evaluated.
  """
  count = None if frozen is None else peft.count(trained)
  params = step_lib.student_variables({'student': trained}, frozen)  # (dequantizes a QLoRA base)
  if frozen is not None:
    lora = lora_config(config)
    if lora is not None:
      params = peft.merge(params, lora)
  qcfg = qat_config(config)
  if qcfg is not None:
    params = quant.dequantize(quant.quantize_params(params, qcfg))
  return params, count


def quantized_teacher(config, teacher, teacher_params, seq_len: int = 8):
  """(teacher, params) as config.teacher.quant says: the target projections stored as int8 /
  int4 values and scales (kd.quant RTN) and run as qwix's quantized matmuls
  (kd.quant.runtime), so no float copy of them is kept; the pair unchanged when bits is 0.
  With teacher.quant.act_bits=8 their inputs are quantized per token too (int8 x int8)."""
  qcfg = sections.teacher_quant_config(config)
  if qcfg is None:
    return teacher, teacher_params
  qparams = quant.quantize_params(teacher_params, qcfg)  # (per layer, also when scanned)
  model = quant.ptq_model(teacher, qparams, act_bits=sections.teacher_act_bits(config))
  return model, quant.ptq_variables(model, qparams, jnp.zeros((1, seq_len), jnp.int32))
