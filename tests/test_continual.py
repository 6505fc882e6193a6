"""Continual distillation: students train on a shard of the split and resume from an earlier run."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np

from kd import data as data_lib
from kd import models
from kd.data import dialogue
from kd.data import lm_data
from kd.train import build
from kd.train import run

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_a_phase_trains_on_its_shard_and_the_next_starts_from_its_student(shakespeare_config,
                                                                          tmp_path):
  config = shakespeare_config('distill:tiny')
  config.data.train_split = 'train[:50%]'
  data = lm_data.LMData(config, str(tmp_path))
  assert 0 < len(data.student_source) < len(data.teacher_source)  # the teacher sees it all
  student = build.build_model(config.student, data.vocab_size)
  read, iterator = [], data.iterator
  data.iterator = lambda *a, **k: (read.append(k.get('student', True)), iterator(*a, **k))[1]
  params, _ = run.run_stage(config, data, str(tmp_path / 'phase_0'), student, None, None,
                            {'ce': 1.0}, steps=2, seed=0, name='phase_0')
  assert read == [True]  # the students' split, though no teacher runs in this phase
  run.run_stage(config, data, str(tmp_path / 'teacher'), student, None, None, {'ce': 1.0},
                steps=1, seed=0, name='teacher', teacher_data=True)
  assert read == [True, False]
  config.student_init.update(source='run', path=str(tmp_path / 'phase_0'))
  init = build.student_init(config, student, None, None)
  jax.tree.map(np.testing.assert_array_equal, init, params)
  # A next phase with scanned layers takes the same params, stacked.
  config.student.scan_layers = True
  scanned = build.build_model(config.student, data.vocab_size)
  init = build.student_init(config, scanned, None, None)
  jax.tree.map(np.testing.assert_array_equal, init, models.stack_layers(params))


def test_the_teacher_and_tokenizer_never_see_the_held_out_text(shakespeare_config, tmp_path,
                                                              monkeypatch):
  config = shakespeare_config('distill:tiny')
  config.data.train_split = 'train[:40%]'
  config.data.teacher_split = 'train[:40%]+train[50%:90%]'  # held out: [40%:50%], [90%:]
  seen = []
  def get_or_train(workdir, texts, vocab_size, get_or_train=data_lib.get_or_train):
    seen.extend(texts())
    return get_or_train(workdir, lambda: iter(seen), vocab_size)
  monkeypatch.setattr(run.data_lib, 'get_or_train', get_or_train)
  data = lm_data.LMData(config, str(tmp_path))
  part = lambda split: [t for t in data_lib.load_text_split(config.data.name, split)]
  expected = part('train[:40%]') + part('train[50%:90%]')
  assert [data.teacher_source[i] for i in range(len(data.teacher_source))] == expected
  assert seen == expected  # the tokenizer's text
  assert [data.student_source[i] for i in range(len(data.student_source))] == part('train[:40%]')
  held = set(part('train[40%:50%]') + part('train[90%:]')) - set(expected)
  assert held and not held & set(seen)


def test_dialogue_students_read_their_split_and_the_teacher_its_own(shakespeare_config,
                                                                    tmp_path):
  config = shakespeare_config('dialogue:tiny')
  config.data.train_split = 'train[:40%]'
  data = lm_data.LMData(config, str(tmp_path))
  texts = lambda split: list(data_lib.load_text_split(config.data.name, split))
  pairs = lambda split: dialogue.encode(
      dialogue.speech_pairs(texts(split)), data.tokenizer,
      prompt_len=config.data.prompt_len, response_len=config.data.response_len)
  for got, split in [(data.train_arrays, 'train[:40%]'), (data.teacher_arrays, 'train')]:
    want = pairs(split)
    assert set(got) == set(want)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  assert len(data.train_arrays['prompt_ids']) < len(data.teacher_arrays['prompt_ids'])
  # Every batch a student reads holds pairs of its split; the teacher reads beyond it.
  rows = lambda arr: {r.tobytes() for r in arr['prompt_ids']}
  read = lambda student: {r.tobytes() for _ in range(40)
                          for r in np.asarray(next(it[student])['prompt_ids'])}
  it = {s: data.iterator(0, student=s) for s in (True, False)}
  assert read(True) <= rows(data.train_arrays)
  assert read(False) - rows(data.train_arrays)
  # SeqKD's answers are cached per split of the prompts (the whole 'train' keeps its old key).
  assert run.seqkd_key(config.data)['train_split'] == 'train[:40%]'
  config.data.train_split = 'train'
  assert 'train_split' not in run.seqkd_key(config.data)


def _continual():
  spec = importlib.util.spec_from_file_location('continual', ROOT / 'experiments' / 'continual.py')
  continual = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(continual)
  return continual


def test_shards_cover_the_split_and_hold_out_each_tail():
  continual = _continual()
  splits = continual.shard_splits(3)
  assert splits == [('train[0%:30%]', 'train[30%:33%]'),
                    ('train[33%:64%]', 'train[64%:67%]'),
                    ('train[67%:97%]', 'train[97%:100%]')]
  cmd = continual.command('/w', '1', 'kd', 1, splits, 'tiny')
  assert '--config.student_init.path=/w/seed_1/kd/phase_0/student_kd' in cmd
  assert '--config=configs/shakespeare/distill.py:tiny,objective=kl' in cmd
  assert '--config.data.train_split=train[33%:64%]' in cmd
  assert '--config.data.teacher_split=train[0%:30%]+train[33%:64%]+train[67%:97%]' in cmd


def _script(tmp_path, *args):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, str(ROOT / 'experiments' / 'continual.py'),
                         f'--out={tmp_path}', f'--workdir={tmp_path / "w"}', *args],
                        cwd=ROOT, env=env, capture_output=True, text=True, check=False)


def test_prior_seeds_make_the_table_without_rerunning(tmp_path):
  rng = np.random.default_rng(0)
  ppl = {s: {m: rng.uniform(20, 40, (2, 2)) for m in ('kd', 'ce')} for s in ('0', '1')}
  prior = tmp_path / 'earlier.runs.json'
  prior.write_text(json.dumps({s: {'_commit': 'abc', **{m: {'ppl': p.tolist()}
                                                        for m, p in r.items()}}
                               for s, r in ppl.items()}))
  out = _script(tmp_path, '--seeds=', '--shards=2', f'--prior={prior}')
  assert out.returncode == 0, out.stderr[-2000:]
  table = (tmp_path / 'continual.md').read_text()
  kd = np.stack([ppl[s]['kd'] for s in ('0', '1')])
  forgetting = kd[:, 1, 0] - kd[:, 0, 0]
  assert f'| kd | {forgetting.mean():.2f} ± {forgetting.std(ddof=1):.2f} |' in table
  after_2 = kd[:, 1, 1]
  assert f'{after_2.mean():.2f} ± {after_2.std(ddof=1):.2f}' in table
  assert json.loads((tmp_path / 'continual.runs.json').read_text())['1']['_commit'] == 'abc'
  assert not (tmp_path / 'w').exists()  # nothing ran
  out = _script(tmp_path, '--seeds=', '--shards=3', f'--prior={prior}')
  assert out.returncode != 0 and 'use the --prior file' in out.stderr
