"""Continual distillation: students train on a shard of the split and resume from an earlier run."""

import importlib.util
import pathlib

import jax
import numpy as np

from kd.train import run

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_a_phase_trains_on_its_shard_and_the_next_starts_from_its_student(shakespeare_config,
                                                                          tmp_path):
  config = shakespeare_config('tiny')
  config.data.train_split = 'train[:50%]'
  data = run.Data(config, str(tmp_path))
  assert 0 < len(data.student_source) < len(data.train_source)  # the teacher sees it all
  student = run.build_model(config.student, data.vocab_size)
  params, _ = run.run_stage(config, data, str(tmp_path / 'phase_0'), student, None, None,
                            {'ce': 1.0}, steps=2, seed=0, name='phase_0')
  config.student_init.update(source='run', path=str(tmp_path / 'phase_0'))
  init = run.student_init(config, student, None, None)
  jax.tree.map(np.testing.assert_array_equal, init, params)


def test_shards_cover_the_split_and_hold_out_each_tail():
  spec = importlib.util.spec_from_file_location('continual', ROOT / 'experiments' / 'continual.py')
  continual = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(continual)
  assert continual.shard_splits(3) == [('train[0%:30%]', 'train[30%:33%]'),
                                       ('train[33%:64%]', 'train[64%:67%]'),
                                       ('train[67%:97%]', 'train[97%:100%]')]
  cmd = continual.command('/w', '1', 'kd', 1, 'train[33%:64%]', 'tiny')
  assert '--config.student_init.path=/w/seed_1/kd/phase_0/student_kd' in cmd
  assert '--config=configs/shakespeare_kd.py:tiny,objective=kl' in cmd
