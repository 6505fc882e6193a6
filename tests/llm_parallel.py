"""Runs the llm job's tiny config under every parallel plan; prints one JSON line per plan: the
KD student's train losses per step and held-out scores.

Started by tests/test_llm_job.py, each in its own process (the device count is fixed when JAX
starts):
  python tests/llm_parallel.py TEACHER_DIR WORKDIR
      2 simulated CPU devices, one process: one device, pmap, and an FSDP-2 mesh
  python tests/llm_parallel.py TEACHER_DIR WORKDIR PROCESS_ID PORT
      one of two processes over loopback, one device each: the FSDP-2 mesh across them
Every run sees the global batches two hosts feed (each host's rows of tokenized.TokenizedData),
so the two-process run must match the one-process mesh.
"""

import json
import os
import pathlib
import sys

DEVICES = 1 if len(sys.argv) > 3 else 2
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')
                           + f' --xla_force_host_platform_device_count={DEVICES}')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import importlib.util  # pylint: disable=g-import-not-at-top,wrong-import-position

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

from kd import parallel  # pylint: disable=g-import-not-at-top,wrong-import-position
from kd.data import tokenized  # pylint: disable=g-import-not-at-top,wrong-import-position
from kd.jobs import llm  # pylint: disable=g-import-not-at-top,wrong-import-position
from two_hosts import Concat  # pylint: disable=g-import-not-at-top,wrong-import-position

ROOT = pathlib.Path(__file__).resolve().parents[1]
HOSTS = 2
PLANS = {'single': dict(mode='single'), 'pmap': dict(mode='pmap'),
         'mesh_fsdp2': dict(mode='mesh', data=1, fsdp=2, tensor=1)}


ONE_HOST = tokenized.TokenizedData.iterator


def two_host_batches(data, seed, teacher_cache='', arrays=None, student=True):
  """Both hosts' rows of each batch, in process order, as the mesh of two processes sees it."""
  return Concat([ONE_HOST(data, seed, teacher_cache, arrays, student, shard=(i, HOSTS))
                 for i in range(HOSTS)])


def config_for(teacher: str, plan: dict):
  spec = importlib.util.spec_from_file_location('smollm2_kd', ROOT / 'configs/llm/smollm2_kd.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config('tiny')
  config.teacher.path = teacher
  config.student.layers = (0, 3)
  config.data.update(batch_size=4, eval_batch_size=4, eval='stsb:dev[-40:]')
  config.data.synthetic.count = 0
  config.train.update(steps=3, log_every=1)
  config.baseline = False  # (the KD student is exported: <workdir>/<plan>/hf)
  config.parallel.update(plan)
  return config


def run(name: str, config, workdir: str) -> None:
  results = llm.main(config, f'{workdir}/{name}')
  if jax.process_index():
    return
  rows = [json.loads(l) for l in open(f'{workdir}/{name}/student_kd/metrics.jsonl')]
  losses = {'student_kd': [r['loss'] for r in rows if r.get('split') == 'train' and 'loss' in r]}
  print(json.dumps({'plan': name, 'losses': losses,
                    'eval': {k: r['eval'] for k, r in results.items() if 'eval' in r}}),
        flush=True)


def main(teacher: str, workdir: str, process_id: str = '', port: str = ''):
  if process_id:
    config = config_for(teacher, PLANS['mesh_fsdp2'])
    config.distributed = True
    config.parallel.update(coordinator_address=f'127.0.0.1:{port}', num_processes=HOSTS,
                           process_id=int(process_id))
    parallel.initialize(config)
    run('two_processes', config, workdir)
    return
  tokenized.TokenizedData.iterator = two_host_batches
  for name, plan in PLANS.items():
    run(name, config_for(teacher, plan), workdir)


if __name__ == '__main__':
  main(*sys.argv[1:])
