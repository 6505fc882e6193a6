r"""Sequence-level KD (Kim & Rush, 2016) on the dialogue task: learn the teacher's own answers.

  python -m kd.main --config=configs/shakespeare/seqkd.py:objective=ce --workdir=/tmp/kd/seqkd

dialogue.py, where the KD student trains on the teacher's greedy responses to the train prompts,
made once and stored (config.seqkd; kd/data/seqkd.py) instead of the dataset's; with
objective=ce that is Kim & Rush's SeqKD, with a divergence the teacher also scores its own text.
experiments/generation_kd.py runs both.
Args (`:arg`, comma separated; kd.config_args), those every experiment here takes (base.py):
  tiny, long, objective=NAME   tiny models for tests; 4x the steps; the loss on the teacher's
         responses (ce, or a divergence)
"""

from kd import config_args

base = config_args.sibling(__file__, 'base')

ARGS = dict(base.ARGS)
EXAMPLES = ('tiny,long', 'tiny,objective=ce')


def get_config(arg=None):
  args = config_args.parse(arg, ARGS)
  c = base.dialogue(base.config(args), args)
  c.seqkd.enabled = True
  return base.finish(c, args)
