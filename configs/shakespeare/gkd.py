r"""GKD (Agarwal et al., 2024) on the dialogue task: the student learns on its own samples too.

  python -m kd.main --config=configs/shakespeare/gkd.py:fraction=0.5,objective=jsd \
      --workdir=/tmp/kd/gkd

dialogue.py, where each KD batch's responses are the student's own samples (temperature 1) with
probability `fraction` and the dataset's otherwise; the teacher scores them token by token
(config.on_policy; kd/train/onpolicy.py). The table adds the batches generated and the
student's sampling speed. experiments/generation_kd.py runs it at fraction 0.5 and 1.
Args (`:arg`, comma separated; kd.config_args):
  fraction=F   the probability of a student-written batch (default 0.5; 0 is dialogue.py)
  tiny, long, objective=NAME   as in base.py: tiny models for tests; 4x the steps; the
         divergence (GKD's is jsd)
"""

from kd import config_args

base = config_args.sibling(__file__, 'base')

ARGS = {**base.ARGS, 'fraction': float}
EXAMPLES = ('tiny,long', 'tiny,fraction=1.0,objective=jsd')


def get_config(arg=None):
  args = config_args.parse(arg, ARGS)
  c = base.dialogue(base.config(args), args)
  c.on_policy.fraction = args.get('fraction', 0.5)
  return base.finish(c, args)
