r"""Online distillation on Tiny Shakespeare: a teacher that trains in the same steps as the student.

  python -m kd.main --config=configs/shakespeare/online.py --workdir=/tmp/kd/online

Adds a run where a fresh teacher trains (CE) step by step beside the student, which distils from
the teacher's current predictions (config.online), to compare with KD from the pre-trained
teacher and with no KD.
Args (`:arg`, comma separated; kd.config_args), those every experiment here takes (base.py):
  tiny, long, objective=NAME   tiny models for tests; 4x the steps; the logit loss
"""

from kd import config_args

base = config_args.sibling(__file__, 'base')

ARGS = dict(base.ARGS)
EXAMPLES = ('tiny,long', 'tiny,objective=jsd')


def get_config(arg=None):
  args = config_args.parse(arg, ARGS)
  c = base.config(args)
  c.online = True
  return base.finish(c, args)
