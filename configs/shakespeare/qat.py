r"""Quantization-aware KD on Tiny Shakespeare: the student trains through low-bit weights.

  python -m kd.main --config=configs/shakespeare/qat.py:bits=4 --workdir=/tmp/kd/qat4

The student's projections are fake-quantized to `bits` on kd.quant's RTN grid, one scale per 32
input rows, gradients straight through (config.quant; kd/quant); the saved student is the
quantized model. experiments/compressed_lm.py runs it from the teacher's layers
(--config.student_init.source=teacher), int8 per output channel (--config.quant.group_size=0)
and int4 in groups of 32.
Args (`:arg`, comma separated; kd.config_args):
  bits=B   4 or 8 (default 8)
  tiny, long, objective=NAME   as in base.py: tiny models for tests; 4x the steps; the logit loss
"""

from kd import config_args

base = config_args.sibling(__file__, 'base')

ARGS = {**base.ARGS, 'bits': int}
EXAMPLES = ('tiny,long', 'tiny,bits=4,objective=jsd')


def get_config(arg=None):
  args = config_args.parse(arg, ARGS)
  bits = args.get('bits', 8)
  if bits not in (4, 8):
    raise ValueError(f'bits={bits}: the student trains through 4- or 8-bit weights')
  c = base.config(args)
  c.quant.update(method='qat', bits=bits, group_size=32)
  return base.finish(c, args)
