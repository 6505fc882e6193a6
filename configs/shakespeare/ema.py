r"""Self-distillation from an EMA of the student on Tiny Shakespeare, beside KD from the teacher.

  python -m kd.main --config=configs/shakespeare/ema.py --workdir=/tmp/kd/ema

Adds a run whose teacher is the student's own exponential moving average (decay 0.99, updated
every step; config.self_distill), with the same losses; the table gives its agreement with the
EMA. experiments/generation_kd.py runs it on the dialogue task with objective=jsd.
Args (`:arg`, comma separated; kd.config_args):
  dialogue   on dialogue.py's task; its pure divergence gets CE back (alpha*CE + (1-alpha)*NAME),
         since the EMA alone as target would let both stay where they start
  tiny, long, objective=NAME   as in base.py: tiny models for tests; 4x the steps; the logit loss
"""

from kd import config_args

base = config_args.sibling(__file__, 'base')

ARGS = {**base.ARGS, 'dialogue': bool}
EXAMPLES = ('tiny,long', 'tiny,dialogue,objective=jsd')


def get_config(arg=None):
  args = config_args.parse(arg, ARGS)
  c = base.config(args)
  if 'dialogue' in args:
    base.dialogue(c, args)
  c.self_distill.ema_decay = 0.99
  if 'ce' not in c.losses:  # (dialogue's pure divergence) the EMA needs labels beside it
    c.losses = base.with_ce(c, args)
  return base.finish(c, args)
