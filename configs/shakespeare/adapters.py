r"""A student of few trained parameters on Tiny Shakespeare: adapters, a prefix or a prompt.

  python -m kd.main --config=configs/shakespeare/adapters.py:method=adapter \
      --workdir=/tmp/kd/adapter

The student starts from the teacher's layers (every other one, cut to the student's widths),
frozen, and only what `method` adds trains, without weight decay: bottleneck adapters of width 8
in every block, a learned key/value prefix of 8 positions in every attention layer, or 8 learned
input embeddings (config.peft, size = 8; kd.peft.adapters); they stay in the saved student. The
no-KD baseline is the same kind of student. LoRA is lora.py; experiments/compressed_lm.py compares
them.
Args (`:arg`, comma separated; kd.config_args):
  method=M   adapter (default), prefix or prompt
  tiny, long, objective=NAME   as in base.py: tiny models for tests; 4x the steps; the logit loss
"""

from kd import config_args

base = config_args.sibling(__file__, 'base')

ARGS = {**base.ARGS, 'method': str}
EXAMPLES = ('tiny,long', 'tiny,method=prefix,objective=jsd')
METHODS = ('adapter', 'prefix', 'prompt')


def get_config(arg=None):
  args = config_args.parse(arg, ARGS)
  method = args.get('method', METHODS[0])
  if method not in METHODS:
    raise ValueError(f'method={method}: use one of {METHODS} (LoRA is lora.py)')
  return base.finish(base.peft(base.config(args), method), args)
