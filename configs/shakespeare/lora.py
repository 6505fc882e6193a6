r"""A LoRA student on Tiny Shakespeare: the teacher's layers, frozen, with rank-8 adapters.

  python -m kd.main --config=configs/shakespeare/lora.py --workdir=/tmp/kd/lora

The student starts from the teacher's layers (every other one, cut to the student's widths) and
only rank-8 adapters (alpha 16) on its attention and MLP projections train, without weight
decay (config.peft; kd/peft); the no-KD baseline is LoRA too, and the saved student is merged.
experiments/compressed_lm.py compares it with adapters.py, qat.py and post-training quantization.
Args (`:arg`, comma separated; kd.config_args):
  qlora  the frozen base is stored as 4-bit RTN weights, groups of 32 (QLoRA-style; config.quant)
  tiny, long, objective=NAME   as in base.py: tiny models for tests; 4x the steps; the logit loss
On another experiment (e.g. gkd.py, ema.py) the same student is
--config.peft.method=lora --config.student_init.source=teacher --config.optimizer.weight_decay=0.0
"""

from kd import config_args

base = config_args.sibling(__file__, 'base')

ARGS = {**base.ARGS, 'qlora': bool}
EXAMPLES = ('tiny,long', 'tiny,qlora,objective=jsd')


def get_config(arg=None):
  args = config_args.parse(arg, ARGS)
  c = base.peft(base.config(args), 'lora')
  if 'qlora' in args:
    c.quant.update(method='qlora', bits=4, group_size=32)
  return base.finish(c, args)
