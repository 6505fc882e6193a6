r"""What the Tiny Shakespeare experiments share: a decoder teacher trained here, a smaller student.

Not a config by itself: each file beside it (distill.py, dialogue.py, gkd.py, ...) is one
experiment, `get_config(arg=None)` over `config(args)` here, and reaches this file with
`kd.config_args.sibling(__file__, 'base')`. Every experiment takes the args of ARGS besides its
own (`:arg`, comma separated; kd.config_args):
  tiny   a few steps of tiny models, for tests (seconds)
  long   4x the steps, for a GPU
  objective=NAME   distil with the logit loss NAME (kl, reverse_kl, jsd, tvd, skew_kl,
         skew_reverse_kl): losses = {ce: alpha, NAME: 1 - alpha}, with NAME's kwargs in
         config.loss_kwargs (e.g. --config.loss_kwargs.jsd.beta=0.1); objective=ce is no KD.
         On the dialogue task (`dialogue`) the loss is {NAME: 1} on the response tokens.
KD: L = a*CE + (1-a)*T^2*KL(p_T || p_S) with a=0.5, T=2 unless an experiment says otherwise.

Parallelism (`config.parallel`, see kd/parallel/); `data.batch_size` is the global batch:
  mode          'single' (default: jit on one device), 'pmap' (data parallel over this host's
                devices, params replicated) or 'mesh' (jit over a ('data', 'fsdp', 'tensor') mesh)
  data, fsdp, tensor   mesh sizes (mesh mode); one may be -1 = the devices left. The batch splits
                over data*fsdp; student params and optimizer state split over 'fsdp' (largest
                divisible axis) and 'tensor' (heads / MLP hidden / vocab)
  teacher_fsdp  mesh axes the teacher's params split over, comma separated: 'fsdp' (default),
                'data,fsdp' for a teacher that fits no single device, '' for replicated
  coordinator_address, num_processes, process_id   multi-host (with `distributed=True`); leave
                unset on a managed cluster, where JAX finds them
E.g. 8 devices, FSDP over 4 and tensor over 2:
  --config.parallel.mode=mesh --config.parallel.fsdp=4 --config.parallel.tensor=2
Two hosts (run on each, with its own process_id):
  --config.distributed=True --config.parallel.mode=mesh \
  --config.parallel.coordinator_address=HOST0:1234 --config.parallel.num_processes=2 \
  --config.parallel.process_id=0
"""

import ml_collections
from ml_collections import config_dict

ARGS = {'tiny': bool, 'long': bool, 'objective': str}
# The kwargs each objective takes (their defaults), so that the command line can set them.
OBJECTIVE_KWARGS = {'jsd': {'beta': 0.5}, 'skew_kl': {'alpha': 0.1},
                    'skew_reverse_kl': {'alpha': 0.1}}


def config(args: dict) -> ml_collections.ConfigDict:
  """The default experiment (distill.py) before `finish`: teacher, KD student, no-KD student."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.distributed = False  # jax.distributed.initialize() first (multi-host)
  c.parallel = ml_collections.ConfigDict(dict(
      mode='single', data=-1, fsdp=1, tensor=1, teacher_fsdp='fsdp',
      coordinator_address='', num_processes=0, process_id=-1))

  c.data = ml_collections.ConfigDict(dict(
      name='tiny_shakespeare', vocab_size=512, seq_len=128, batch_size=16, eval_batch_size=32,
      eval_split='validation', max_eval_batches=0,
      train_split='train',  # what the students train on (e.g. 'train[:30%]', a stream's shard)
      teacher_split='train',  # what the teacher and tokenizer train on ('train[:27%]+train[30%:57%]')
      task='lm', prompt_len=0, response_len=0,  # task 'dialogue': see `dialogue` below
      sample_eval_batches=0))  # dialogue: eval batches whose greedy answers the teacher scores
  # GKD: the fraction of KD batches whose responses the student samples (dialogue task only).
  c.on_policy = ml_collections.ConfigDict(dict(fraction=0.0, temperature=1.0, top_k=0,
                                               top_p=1.0))
  # DistiLLM's adaptive off-policy (kd/train/replay.py; instead of `fraction`): a batch uses the
  # student's samples with probability p, which starts at p0 and grows by delta (up to p_max)
  # whenever the held-out CE rises by more than eps; samples are kept in a replay buffer of
  # `capacity` rows and reused (more often as training goes on, replay_schedule 'linear').
  c.on_policy.adaptive = ml_collections.ConfigDict(dict(
      enabled=False, p0=0.0, delta=0.1, p_max=1.0, eps=0.1, capacity=1000, replay_fraction=1.0,
      replay_schedule='linear', fill_first=True))
  # SeqKD: the KD student's responses are the teacher's (temperature 0 = greedy), made once.
  c.seqkd = ml_collections.ConfigDict(dict(enabled=False, temperature=0.0, top_k=0, top_p=1.0,
                                           batch_size=64))

  c.teacher = ml_collections.ConfigDict()
  # Any kd.models.DecoderConfig field may be added, e.g. remat=True, or scan_layers=True (the
  # layers as one nn.scan over stacked params: one layer compiled instead of all of them).
  # attention_impl: None (cuDNN on a GPU where it applies, else XLA), 'xla', 'cudnn', or
  # 'splash' (the TPU's Pallas kernel; e.g. --config.student.attention_impl=splash).
  c.teacher.model = ml_collections.ConfigDict(dict(
      hidden_size=192, num_layers=4, num_heads=6, num_kv_heads=2, intermediate_size=512,
      scan_layers=False, attention_impl=ml_collections.config_dict.placeholder(str)))
  c.teacher.steps = 800
  # Where the teacher's run lives: '' = <workdir>/teacher. Runs that name the same directory
  # share one teacher (trained by the first, restored by the rest; same teacher settings, seed
  # and tokenizer, which are checked).
  c.teacher.workdir = ''
  # > 1: an ensemble of that many teachers (seeds seed+1000+i), distilled from as the mixture
  # of their distributions, weighted by `weights` (() = equal); logit losses only.
  c.teacher.count = 1
  c.teacher.weights = ()
  # An offline teacher: a cache written by `python -m kd.cache_teacher` (top-k logits + logsumexp)
  # replaces the teacher forward in the KD step; see kd/losses/topk.py for the semantics.
  c.teacher.cache = ''
  c.teacher.topk_semantics = 'rest_bucket'
  # A quantized teacher (kd.quant): once trained or loaded, its `target` projections are stored
  # as int8 or int4 (`bits`; 0 = float) with one scale per `group_size` input rows (0 = per
  # output channel) and run as quantized matmuls (qwix), a half or a quarter of their bf16
  # memory. The student's init (student_init.source='teacher') takes the float weights.
  # act_bits=8 (with bits=8) quantizes those projections' inputs too, per token as they run:
  # int8 x int8 matmuls, the rate of int8 tensor cores (W8A8); 0 keeps the inputs in float.
  c.teacher.quant = ml_collections.ConfigDict(dict(bits=0, group_size=0, act_bits=0,
                                                   target=r'.*_proj|lm_head'))
  c.teacher.optimizer = ml_collections.ConfigDict(dict(
      name='adamw', lr=3e-3, warmup_steps=50, schedule='cosine', weight_decay=0.05,
      grad_clip_norm=1.0))

  c.student = ml_collections.ConfigDict(dict(
      hidden_size=96, num_layers=2, num_heads=3, num_kv_heads=1, intermediate_size=256,
      scan_layers=False, attention_impl=ml_collections.config_dict.placeholder(str)))

  # 'random', or 'teacher': start from the teacher's layers `layers` ('every_k' with stride k,
  # 'first_last', or the list `layers_list`), weights cut to the student's widths.
  # ... or 'run': the student of an earlier run, `path` = that run's <workdir>/student_kd
  # (continual distillation: each phase starts from the last).
  c.student_init = ml_collections.ConfigDict(dict(source='random', layers='every_k', k=2,
                                                  layers_list=(), path=''))
  # A parameter-efficient student: method 'lora' trains only adapters (rank, alpha: scale
  # alpha/rank) on the projections whose module path `target` fully matches, with `dropout` on
  # the adapters' input in training; the student's starting weights (student_init) stay frozen
  # and the saved student is the merged model.
  # 'adapter', 'prefix' and 'prompt' add bottleneck adapters of width `size` to every block, a
  # learned key/value prefix of `size` positions to every attention layer, or `size` learned
  # input embeddings (kd.peft.adapters); only those train, and they stay in the saved student.
  # lora.py and adapters.py set it, through `peft()` below.
  c.peft = ml_collections.ConfigDict(dict(
      method='none', target=r'.*_proj', rank=8, alpha=16.0, dropout=0.0, size=8))
  # A quantized student (kd/quant): 'qat' trains through weights fake-quantized to `bits` (4 or
  # 8) on kd.quant's RTN grid, one scale per `group_size` input rows (0 = per output channel),
  # gradients straight through; 'qlora' (with peft.method='lora') stores the frozen base
  # quantized. The saved student is the quantized model.
  # embed_bits (4 or 8; 0 = float): the embedding tables too, per row.
  c.quant = ml_collections.ConfigDict(dict(method='none', bits=8, group_size=0,
                                           target=r'.*_proj', embed_bits=0))

  # alpha * CE + (1 - alpha) * the objective (T^2 * KL by default: 'kl' already carries T^2).
  c.alpha = 0.5
  objective = args.get('objective', 'kl')
  c.losses = with_ce(c, args)
  c.loss_kwargs = ml_collections.ConfigDict()
  if objective == 'ce':  # no KD: hard labels only (agreement with the teacher is still measured)
    c.losses = ml_collections.ConfigDict({'ce': 1.0})
  if objective in OBJECTIVE_KWARGS:
    c.loss_kwargs[objective] = ml_collections.ConfigDict(OBJECTIVE_KWARGS[objective])
  c.temperature = 2.0
  c.chunk_size = 0  # > 0: logit losses per sequence chunk, no [B, T, V] logits held
  c.fused_chunks = True  # chunked: gradient made in the forward pass, nothing recomputed
  c.closed_form = config_dict.placeholder(bool)  # fused: None = closed-form gradients where known
  c.logit_kernel = 'xla'  # 'pallas': CE and KL fused with both heads, no logits array
  c.same_tokenizer = True  # the student shares the teacher's tokenizer (padded rows are sliced)
  c.features = ml_collections.ConfigDict(dict(layer_map='uniform', pairs=()))
  c.baseline = True  # also train the student on hard labels only, for the same steps
  # Self-distillation: this many born-again rounds after the KD student, each distilling the
  # previous round's student into a fresh one of the same architecture (same losses).
  c.born_again = 0
  # Self-distillation from an EMA of the student: > 0 adds a run whose teacher is the student's
  # own exponential moving average with this decay (updated every step), same losses (ema.py).
  c.self_distill = ml_collections.ConfigDict(dict(ema_decay=0.0))
  # Online distillation: also a run where a fresh teacher trains (CE) in the same steps as the
  # student, which distils from the teacher's current predictions (online.py).
  c.online = False

  c.optimizer = ml_collections.ConfigDict(dict(
      name='adamw', lr=3e-3, warmup_steps=50, schedule='cosine', weight_decay=0.05,
      grad_clip_norm=1.0))
  # skip_nonfinite: updates whose loss or gradient is NaN/Inf skipped (counted, logged) before
  # the run stops (0: stop at the first); keep >= 2 checkpoints, so one remains if the newest
  # is damaged.
  c.train = ml_collections.ConfigDict(dict(
      steps=800, accum_steps=1, log_every=50, eval_every=200, checkpoint_every=200, keep=2,
      progress=True, skip_nonfinite=0))
  return c


def with_ce(c, args: dict) -> ml_collections.ConfigDict:
  """alpha * CE + (1 - alpha) * the objective, the weights following `c.alpha`."""
  return ml_collections.ConfigDict({'ce': c.get_ref('alpha'),
                                    args.get('objective', 'kl'): 1.0 - c.get_ref('alpha')})


def dialogue(c, args: dict) -> ml_collections.ConfigDict:
  """The prompt/response task (kd/data/dialogue.py: answer a speech as the next speaker):
  losses = {objective: 1} on the response tokens, the prompt masked."""
  c.data.update(task='dialogue', prompt_len=96, response_len=64, batch_size=16,
                sample_eval_batches=4)
  c.losses = ml_collections.ConfigDict({args.get('objective', 'kl'): 1.0})
  return c


def peft(c, method: str) -> ml_collections.ConfigDict:
  """A parameter-efficient student (config.peft): it starts from the teacher's layers (every
  other one, cut to the student's widths) and only the PEFT parameters train; the no-KD baseline
  is the same kind of student."""
  c.peft.method = method
  c.student_init.source = 'teacher'
  c.optimizer.weight_decay = 0.0  # decay would pull the adapters, not the base, to zero
  return c


def finish(c, args: dict) -> ml_collections.ConfigDict:
  """The `tiny` and `long` args, after the experiment's own settings (which they shrink)."""
  if 'tiny' in args:
    c.data.update(vocab_size=300, seq_len=32, batch_size=8, eval_batch_size=8,
                  max_eval_batches=2)
    c.teacher.model.update(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                           intermediate_size=64)
    c.student.update(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                     intermediate_size=32)
    c.teacher.steps = 4
    c.train.update(steps=4, log_every=2, checkpoint_every=2, progress=False)
    if c.quant.group_size:
      c.quant.group_size = 8  # the tiny student's widths are 16 and 32
    if c.data.task == 'dialogue':
      c.data.update(prompt_len=16, response_len=8, sample_eval_batches=1)
  if 'long' in args:
    c.teacher.steps *= 4
    c.train.steps *= 4
  return c
