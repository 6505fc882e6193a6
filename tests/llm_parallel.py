"""Runs the llm job's tiny config on 2 simulated CPU devices under every parallel plan; prints
one JSON line per plan: the KD student's train losses per step and held-out scores.

Started by tests/test_llm_job.py in its own process (the device count is fixed when JAX
starts): python tests/llm_parallel.py TEACHER_DIR WORKDIR
"""

import json
import os
import pathlib
import sys

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')
                           + ' --xla_force_host_platform_device_count=2')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import importlib.util  # pylint: disable=g-import-not-at-top,wrong-import-position

from kd.jobs import llm  # pylint: disable=g-import-not-at-top,wrong-import-position

ROOT = pathlib.Path(__file__).resolve().parents[1]
PLANS = {'single': dict(mode='single'), 'pmap': dict(mode='pmap'),
         'mesh_fsdp2': dict(mode='mesh', data=1, fsdp=2, tensor=1)}


def main(teacher: str, workdir: str):
  spec = importlib.util.spec_from_file_location('smollm2_kd', ROOT / 'configs/llm/smollm2_kd.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  for name, plan in PLANS.items():
    config = module.get_config('tiny')
    config.teacher.path = teacher
    config.student.layers = (0, 3)
    config.data.update(batch_size=4, eval_batch_size=4, eval='stsb:dev[-40:]')
    config.data.synthetic.count = 0
    config.train.update(steps=3, log_every=1)
    config.export = config.baseline = False
    config.parallel.update(plan)
    results = llm.main(config, f'{workdir}/{name}')
    losses = {}
    for run in ('student_kd',):
      rows = [json.loads(l) for l in open(f'{workdir}/{name}/{run}/metrics.jsonl')]
      losses[run] = [r['loss'] for r in rows if r.get('split') == 'train' and 'loss' in r]
    print(json.dumps({'plan': name, 'losses': losses,
                      'eval': {k: r['eval'] for k, r in results.items() if 'eval' in r}}),
          flush=True)


if __name__ == '__main__':
  main(*sys.argv[1:])
