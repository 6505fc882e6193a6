"""One process, 2 CPU devices, the batches two hosts would feed: the reference of a 2-host run.

  python tests/multihost_reference.py WORKDIR '{"train.steps": 6, ...}'

Started by tests/test_parallel.py. A 2-process run reads documents i::2 on process i, each
process a half batch; here both halves are read in this one process and concatenated in
process order, so the mesh sees the same global batches and the final params must agree.
"""

import importlib.util
import json
import os
import pathlib
import sys

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')
                           + ' --xla_force_host_platform_device_count=2')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

from kd import data as data_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from kd.data import lm_data  # pylint: disable=g-import-not-at-top,wrong-import-position
from kd.train import run  # pylint: disable=g-import-not-at-top,wrong-import-position
from two_hosts import Concat  # pylint: disable=g-import-not-at-top,wrong-import-position

ROOT = pathlib.Path(__file__).resolve().parents[1]
HOSTS = 2


class TwoHostData(lm_data.LMData):

  def iterator(self, seed: int, teacher_cache: str = '', arrays=None, student: bool = True):
    assert not teacher_cache and arrays is None, 'the reference reads text, not a cache'
    return Concat([data_lib.make_iterator(
        self.student_source if student else self.teacher_source, self.tokenizer, seq_len=self.config.seq_len,
        batch_size=self.config.batch_size // HOSTS, seed=seed, shard_index=i,
        shard_count=HOSTS) for i in range(HOSTS)])


def main(workdir: str, overrides: dict):
  spec = importlib.util.spec_from_file_location('c', ROOT / 'configs/shakespeare/distill.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config('tiny')
  config.update_from_flattened_dict(overrides)
  lm_data.LMData = TwoHostData  # run.main builds its data through this name
  run.main(config, workdir)


if __name__ == '__main__':
  main(sys.argv[1], json.loads(sys.argv[2]))
