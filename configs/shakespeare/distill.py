r"""A decoder LM on Tiny Shakespeare: train a teacher, distil a smaller student, compare to no KD.

  python -m kd.main --config=configs/shakespeare/distill.py --workdir=/tmp/kd/shakespeare

Hardware: a 2-core CPU, about 10 minutes (teacher, KD student, no-KD student). Prints a table:
teacher perplexity, student perplexity with KD and without, teacher-student top-1 agreement on
the held-out split. KD: L = a*CE + (1-a)*T^2*KL(p_T || p_S) with a=0.5, T=2.
Args (`:arg`, comma separated; kd.config_args), those every experiment here takes (base.py):
  tiny, long, objective=NAME   tiny models for tests; 4x the steps; the logit loss NAME
         (kl, reverse_kl, jsd, tvd, skew_kl, skew_reverse_kl) beside CE, objective=ce is no KD
E.g. `--config=configs/shakespeare/distill.py:tiny,objective=jsd`. The other experiments sit
beside this file (dialogue, gkd, distillm, seqkd, lora, adapters, qat, ema, online); base.py
holds the keys they share and the parallelism settings (`--config.parallel.*`).
"""

from kd import config_args

base = config_args.sibling(__file__, 'base')

ARGS = dict(base.ARGS)
# Args that build every other arg into a config (tests/test_configs.py builds each of them).
EXAMPLES = ('tiny,long', 'tiny,objective=jsd')


def get_config(arg=None):
  args = config_args.parse(arg, ARGS)
  return base.finish(base.config(args), args)


def get_hyper(hyper):
  """3 seeds x 2 temperatures: `python -m kd.sweep configs/shakespeare/distill.py --workdir=DIR`."""
  return hyper.product([hyper.sweep('config.seed', [0, 1, 2]),
                        hyper.sweep('config.temperature', [1.0, 2.0])])
