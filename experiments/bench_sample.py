r"""Greedy generation speed: kd.models.sample.generate (jax.jit, KV cache) vs transformers'
generate (PyTorch, KV cache) on the same random Llama checkpoint.

  .venv/bin/python experiments/bench_sample.py [--size=small] [--batch=1,32] [--prompt=64] \
      [--new=64] [--runs=3] [--out=FILE.jsonl]

A random LlamaForCausalLM of `--size` (SIZES) is saved as an HF checkpoint and loaded by kd.hf;
both frameworks answer the same random prompts (no padding) greedily with exactly `--new` new
tokens (no eos), float32, on this machine's default device (a GPU where jax and torch see one).
The runs alternate between the frameworks so background load hits both alike; the best of
`--runs` after one untimed warm-up call (kd's includes the compile, reported apart) is kept.
Prints one JSON line per batch size: new tokens/s of each, the kd/torch ratio, and the share of
kd's greedy tokens equal to transformers' (they part where float noise flips an argmax). Takes
about two minutes on a 2-core CPU at the defaults.
"""

import json
import os
import sys
import tempfile
import time

import jax
import numpy as np
from absl import app
from absl import flags

import kd.hf
from kd.models import sample

# name -> LlamaConfig fields.
SIZES = {
    'tiny': dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
    'small': dict(vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4),
    'medium': dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                   num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=8),
}

def define_flags() -> None:
  """The command line (defined only when run as a script, so importing this module for its
  functions adds no absl flags)."""
  flags.DEFINE_enum('size', 'small', list(SIZES), 'Model size.')
  flags.DEFINE_list('batch', ['1', '32'], 'Batch sizes.')
  flags.DEFINE_integer('prompt', 64, 'Prompt tokens.')
  flags.DEFINE_integer('new', 64, 'New tokens per row.')
  flags.DEFINE_integer('runs', 3, 'Timed calls per framework and batch (best kept).')
  flags.DEFINE_string('out', '', 'Also append the JSON lines to this file.')
  flags.DEFINE_bool('single_thread', False, 'One CPU thread for both (XLA and torch): steadier '
                    'numbers when other jobs share the machine (torch threads that wait on a '
                    'busy core slow it by 10x and more).')


def checkpoint(size: str, directory: str):
  """A random LlamaForCausalLM saved in `directory`; returns the torch model (eval mode)."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  config = transformers.LlamaConfig(**SIZES[size], max_position_embeddings=1024,
                                    bos_token_id=None, eos_token_id=None, pad_token_id=0,
                                    attn_implementation='sdpa')
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(config).eval()
  model.save_pretrained(directory)
  return model


def time_best(fn, runs: int) -> float:
  best = float('inf')
  for _ in range(runs):
    t0 = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t0)
  return best


def bench(size: str, batches, prompt: int, new: int, runs: int,
          single_thread: bool = False) -> list[dict]:
  """One result dict per batch size (see the module docstring)."""
  import torch  # pylint: disable=g-import-not-at-top
  if single_thread:
    torch.set_num_threads(1)
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  with tempfile.TemporaryDirectory() as d:
    ref = checkpoint(size, d).to(device)
    model = kd.hf.load(d, tokenizer=False)
  rows = []
  for b in batches:
    ids = np.random.default_rng(b).integers(1, SIZES[size]['vocab_size'], (b, prompt),
                                            dtype=np.int32)
    ids_t = torch.tensor(ids, dtype=torch.long, device=device)

    def kd_call():
      return jax.block_until_ready(sample.generate(model, ids, max_new_tokens=new,
                                                   temperature=0.0))

    def torch_call():
      with torch.no_grad():
        out = ref.generate(ids_t, attention_mask=torch.ones_like(ids_t), max_new_tokens=new,
                           min_new_tokens=new, do_sample=False, use_cache=True, pad_token_id=0)
      if device == 'cuda':
        torch.cuda.synchronize()
      return out

    t0 = time.perf_counter()
    ours = np.asarray(kd_call())  # the compile
    compile_s = time.perf_counter() - t0
    theirs = torch_call()[:, prompt:].cpu().numpy()
    kd_s, torch_s = float('inf'), float('inf')
    for _ in range(runs):  # alternate, so background load hits both alike
      kd_s = min(kd_s, time_best(kd_call, 1))
      torch_s = min(torch_s, time_best(torch_call, 1))
    rows.append(dict(
        size=size, batch=b, prompt=prompt, new=new, device=str(jax.devices()[0].platform),
        threads=1 if single_thread else os.cpu_count(),
        kd_tokens_per_s=b * new / kd_s, torch_tokens_per_s=b * new / torch_s,
        ratio=torch_s / kd_s, kd_compile_s=compile_s,
        same_tokens=float(np.mean(ours == theirs))))
  return rows


def main(argv):
  del argv
  f = flags.FLAGS
  rows = bench(f.size, [int(b) for b in f.batch], f.prompt, f.new, f.runs, f.single_thread)
  for r in rows:
    line = json.dumps(r)
    print(line, flush=True)
    if f.out:
      os.makedirs(os.path.dirname(os.path.abspath(f.out)), exist_ok=True)
      with open(f.out, 'a') as out:
        out.write(line + '\n')


if __name__ == '__main__':
  define_flags()
  if '--single_thread' in sys.argv:  # XLA reads its flags when the backend starts
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_cpu_multi_thread_eigen='
                               'false intra_op_parallelism_threads=1').strip()
  sys.exit(app.run(main))
