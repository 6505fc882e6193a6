"""One of two processes over loopback: sampling on a mesh that spans both (started by
tests/test_parallel.py, which compares the rows with one process's generation).

  python tests/multihost_generate.py PROCESS_ID PORT OUT_DIR

Each process holds one CPU device; the mesh is (data 1, fsdp 2), so the student's params are
FSDP-split across the processes and the prompt rows too: process i passes rows 2i, 2i + 1 of
the global prompts and gets their tokens back. Both processes also score one dialogue batch
(the whole batch, as every process holds the eval batches) with kd.eval.generation, student and
teacher FSDP-split. Writes OUT_DIR/process_<i>.json.
"""

import json
import os
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from kd import models  # pylint: disable=g-import-not-at-top,wrong-import-position
from kd.data import dialogue  # pylint: disable=g-import-not-at-top,wrong-import-position
from kd.eval import generation  # pylint: disable=g-import-not-at-top,wrong-import-position
from kd.parallel import mesh as mesh_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

CFG = models.DecoderConfig(vocab_size=48, hidden_size=32, num_layers=2, num_heads=4,
                           num_kv_heads=2, intermediate_size=64, max_seq_len=32)
ROWS, PROMPT, NEW = 4, 6, 7


def prompts():
  """The global left-padded prompts [ROWS, PROMPT] and their mask (the same in every process)."""
  rng = np.random.default_rng(0)
  ids = rng.integers(3, CFG.vocab_size, (ROWS, PROMPT)).astype(np.int32)
  lengths = np.array([PROMPT, 3, 5, 1])
  mask = (np.arange(PROMPT)[None] >= PROMPT - lengths[:, None]).astype(np.int32)
  return ids * mask, mask


def kinds():
  """name -> generate kwargs: greedy, and sampled with top-k and a stop token."""
  return {'greedy': dict(temperature=0.0),
          'sampled': dict(temperature=1.0, top_k=8, eos_id=[5, 7], rng=jax.random.key(3))}


def teacher_params():
  """The teacher that scores the answers: the student's architecture, other weights."""
  return models.init_params(CFG, jax.random.key(1))


def dialogue_batch():
  """One kd.data.dialogue eval batch on prompts(): responses of NEW tokens, the last row padding
  (no response tokens), as eval_batches pads."""
  ids, mask = prompts()
  rng = np.random.default_rng(1)
  response = rng.integers(3, CFG.vocab_size, (ROWS, NEW)).astype(np.int32)
  response_mask = np.ones_like(response)
  response_mask[-1] = 0
  return dialogue.to_batch(ids, mask, response * response_mask, response_mask)


def main(process_id: int, port: int, out_dir: str):
  jax.distributed.initialize(coordinator_address=f'127.0.0.1:{port}', num_processes=2,
                             process_id=process_id)
  module = models.Decoder(CFG)
  params = models.init_params(CFG, jax.random.key(0))
  plan = mesh_lib.MeshPlan(mesh_lib.make_mesh(1, 2, 1))
  placed = mesh_lib.place(params, plan.state_shardings(params))
  ids, mask = prompts()
  rows = slice(2 * process_id, 2 * process_id + 2)
  out = {'fsdp_split': not placed['params']['lm_head']['kernel'].is_fully_addressable}
  for name, kw in kinds().items():
    local = plan.generate((module, placed), ids[rows], mask[rows], max_new_tokens=NEW, **kw)
    out[name] = np.asarray(local).tolist()
  teacher = mesh_lib.place(teacher_params(), plan.state_shardings(params))
  out['teacher_nll'] = generation.teacher_nll_of_samples(module, placed, module, teacher,
                                                         [dialogue_batch()])
  with open(os.path.join(out_dir, f'process_{process_id}.json'), 'w') as f:
    json.dump(out, f)


if __name__ == '__main__':
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
