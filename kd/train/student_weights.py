"""The weights a student computes with, from what its train state holds.

A PEFT student's state holds its adapters (params['student']) apart from a frozen base
(state.frozen, stored RTN-quantized under QLoRA); a QAT student sees its float weights through
the RTN grid. The step receives both operations as functions of its Spec, so it imports
neither kd.peft nor kd.quant:

  spec = Spec(..., **student_weights.spec_fields(qat))   # kd.train.build does this
  variables = student_weights.joined(state.params, state.frozen)  # sampling, export
"""

import dataclasses

from kd import peft
from kd import quant
from kd.train import step as step_lib


def joined(params, frozen=None):
  """The student's full variables: params['student'], joined with a PEFT student's frozen base
  (kd.peft.combine) when there is one; a base stored quantized (kd.quant.QuantizedParams,
  QLoRA) is dequantized first."""
  if frozen is None:
    return params['student']
  if isinstance(frozen, quant.QuantizedParams):
    frozen = quant.dequantize(frozen)
  return peft.combine(params['student'], frozen)


@dataclasses.dataclass(frozen=True)
class FakeQuant:
  """variables -> the same with `config`'s target kernels fake-quantized (kd.quant.qat:
  RTN-rounded forward, straight-through gradient). A value, not a closure: equal configs give
  equal, equally hashed instances."""
  config: quant.QuantConfig

  def __call__(self, variables):
    return quant.fake_quant(variables, self.config)


def spec_fields(qat: quant.QuantConfig | None = None) -> dict:
  """kd.train.step.Spec's `student_variables` (joined) and `student_weights`: FakeQuant under
  QAT config `qat`, else the variables as they are."""
  return dict(student_variables=joined,
              student_weights=step_lib.plain_weights if qat is None else FakeQuant(qat))
