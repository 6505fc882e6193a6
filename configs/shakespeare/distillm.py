r"""DistiLLM's adaptive off-policy (Ko et al., 2024) on the dialogue task.

  python -m kd.main --config=configs/shakespeare/distillm.py:objective=jsd \
      --workdir=/tmp/kd/distillm

dialogue.py, where a KD batch uses the student's own samples with a probability p that starts at
config.on_policy.adaptive.p0 and grows whenever the held-out CE rises; the samples are kept in a
replay buffer and reused (config.on_policy.adaptive; kd/train/replay.py).
experiments/generation_kd.py runs it from p0 = 0.5, validating every 100 steps.
Args (`:arg`, comma separated; kd.config_args), those every experiment here takes (base.py):
  tiny, long, objective=NAME   tiny models for tests; 4x the steps; the divergence
"""

from kd import config_args

base = config_args.sibling(__file__, 'base')

ARGS = dict(base.ARGS)
EXAMPLES = ('tiny,long', 'tiny,objective=jsd')


def get_config(arg=None):
  args = config_args.parse(arg, ARGS)
  c = base.dialogue(base.config(args), args)
  c.on_policy.adaptive.enabled = True
  return base.finish(c, args)
