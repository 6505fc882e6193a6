r"""The dialogue task on Tiny Shakespeare: answer a speech as the next speaker, the prompt masked.

  python -m kd.main --config=configs/shakespeare/dialogue.py:objective=jsd \
      --workdir=/tmp/kd/dialogue

The teacher trains on the prompt/response pairs of kd/data/dialogue.py (prompts of 96 tokens,
responses of 64), then the KD student learns the divergence alone on the dataset's responses
(losses = {objective: 1}) beside the no-KD student; besides perplexity and agreement the table
gives the teacher's NLL of each model's greedy answers to 4 validation batches.
experiments/generation_kd.py compares this (supervised KD, SFT with objective=ce, born-again
with --config.born_again=1) with gkd.py, seqkd.py, distillm.py and ema.py:dialogue;
experiments/results/generation_kd.md has each student's training time.
Args (`:arg`, comma separated; kd.config_args), those every experiment here takes (base.py):
  tiny, long, objective=NAME   tiny models for tests; 4x the steps; the divergence (kl, jsd,
         ...; objective=ce is SFT, no KD)
A student of another kind takes its keys from lora.py, adapters.py or qat.py, e.g. a LoRA one:
--config.peft.method=lora --config.student_init.source=teacher --config.optimizer.weight_decay=0.0
"""

from kd import config_args

base = config_args.sibling(__file__, 'base')

ARGS = dict(base.ARGS)
EXAMPLES = ('tiny,long', 'tiny,objective=jsd')


def get_config(arg=None):
  args = config_args.parse(arg, ARGS)
  return base.finish(base.dialogue(base.config(args), args), args)
