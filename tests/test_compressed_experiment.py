"""experiments/compressed_lm.py and compressed_sts.py: every row builds the config it names, and
the table reads results."""

import importlib.util
import pathlib

import pytest

from kd.eval import report
from kd.train import config_check

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(name):
  spec = importlib.util.spec_from_file_location(f'{name}_experiment',
                                                ROOT / 'experiments' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope='module')
def compressed():
  return _load('compressed_lm')


@pytest.fixture(scope='module')
def encoder():
  return _load('compressed_sts')


@pytest.mark.parametrize('row,peft,quant,group', [
    ('full', 'none', 'none', 32), ('lora', 'lora', 'none', 32), ('adapter', 'adapter', 'none', 32),
    ('prefix', 'prefix', 'none', 32), ('prompt', 'prompt', 'none', 32),
    ('qat8', 'none', 'qat', 0), ('qat4', 'none', 'qat', 32), ('qlora', 'lora', 'qlora', 32)])
def test_rows_build_the_configs_they_name(compressed, row, peft, quant, group):
  c = compressed.row_config(row, '1', '/tmp/w', '')
  config_check.check(c)
  assert (c.peft.method, c.quant.method, c.seed) == (peft, quant, 1)
  assert c.student_init.source == 'teacher'  # every student starts from the teacher's layers
  assert c.quant.group_size == group or quant == 'none'
  assert c.teacher.workdir == '/tmp/w/seed_1/teacher'


def test_table_rows_and_columns(compressed):
  run = dict(perplexity=30.0, agreement=0.5, stored_bytes=2048, trainable_params=10,
             tokens_per_s_b1=100.0, tokens_per_s_b32=900.0)
  text = compressed.table({'teacher': [dict(perplexity=20.0)], 'lora': [run, run],
                           'gptq4': [dict(run, perplexity=32.0)]})
  assert '| LoRA r=8, every projection | 30.00 ± 0.00 | - | 50.0 ± 0.0 | 2 ± 0 | 10 ± 0 |' in text
  assert '| GPTQ int4 (groups of 32) | 32.00 | - |' in text
  assert '| teacher | 20.00 | - | - |' in text


def test_paired_differences_are_taken_within_a_seed(compressed):
  runs = {'0': {'full': dict(perplexity=16.0), 'ptq4': dict(perplexity=16.3),
                'teacher': dict(perplexity=15.9), '_commit': 'abc'},
          '1': {'full': dict(perplexity=17.0), 'ptq4': dict(perplexity=17.2)},
          '2': {'ptq4': dict(perplexity=18.0)}}  # no full row: no difference
  got = report.paired(runs, 'perplexity', 'full')
  assert got['0']['ptq4']['perplexity_vs_full'] == pytest.approx(0.3)
  assert got['0']['teacher']['perplexity_vs_full'] == pytest.approx(-0.1)
  assert got['1']['ptq4']['perplexity_vs_full'] == pytest.approx(0.2)
  assert got['0']['full']['perplexity_vs_full'] == 0 and got['0']['_commit'] == 'abc'
  assert 'perplexity_vs_full' not in got['2']['ptq4']
  assert 'perplexity_vs_full' not in runs['0']['ptq4']  # the input is left as it was
  text = compressed.table(report.by_row(got, ['teacher', 'full', 'ptq4']))
  # 0.3 and 0.2 paired: 0.25 ± 0.07, though the rows' own spread across seeds is far wider.
  assert '| PTQ int4 (RTN, groups of 32) | 17.17 ± 0.85 | 0.25 ± 0.07 |' in text


@pytest.mark.parametrize('row,peft,quant,bits,group', [
    ('full', 'none', 'none', 8, 0), ('lora', 'lora', 'none', 8, 0), ('qat8', 'none', 'qat', 8, 0),
    ('qat4', 'none', 'qat', 4, 32), ('qlora', 'lora', 'qlora', 4, 32)])
def test_minilm_rows_build_the_configs_they_name(encoder, row, peft, quant, bits, group):
  from kd.train import sentence  # pylint: disable=g-import-not-at-top
  c = encoder.row_config(row, '1', '/tmp/w', '', ['teacher.path=/x', 'student.layers=(0,3)'])
  sentence.check(c)
  assert (c.peft.method, c.quant.method, c.quant.bits, c.quant.group_size, c.seed) == (
      peft, quant, bits, group, 1)
  assert c.teacher.cache_dir == '/tmp/w/teacher_cache'  # one teacher cache for every run
  assert (c.teacher.path, tuple(c.student.layers)) == ('/x', (0, 3))
  cmd = encoder.command(row, '1', '/tmp/w', '', ['teacher.path=/x'])
  assert '--workdir=/tmp/w/seed_1/' + row in cmd and cmd[-1] == '--config.teacher.path=/x'
  variants = {'full': '', 'lora': ':lora', 'qat8': ':qat=8', 'qat4': ':qat=4',
              'qlora': ':lora,qlora'}[row]
  assert cmd[3] == f'--config=configs/minilm_sts.py{variants}'


def test_minilm_table_and_unknown_rows(encoder):
  run = dict(spearman=80.0, stored_bytes=2 * 2**20, trainable_params=10)
  text = encoder.table({'teacher': [dict(spearman=86.0, stored_bytes=2**22)],
                        'qlora': [run, dict(run, spearman=82.0)]}, layers='0, 3')
  assert text.startswith('STS-B dev Spearman ×100 (cosine of mean-pooled embeddings), 2 seed(s)')
  assert "the teacher's layers 0, 3 and" in text
  assert ('| QLoRA: LoRA r=8 on an int4 base (groups of 32) | 81.00 ± 1.41 | - | 2.00 ± 0.00 | '
          '10 ± 0 |') in text
  assert '| teacher | 86.00 | - | 4.00 | - |' in text
  with pytest.raises(ValueError, match='no sentence-encoder version'):
    encoder.run_seeds(['prompt'], ['0'], '/tmp/w')


def test_minilm_speed_table_states_the_ratio_to_the_teacher(encoder):
  config = encoder.row_config('full', '0', '/tmp/w', 'tiny', ['student.layers=(0,3)'])
  config.eval.path = '/nonexistent'  # the sentence count is passed in, not read
  speeds = {'teacher': dict(sentences_per_s_b1=40.0, sentences_per_s_b32=200.0),
            'student': dict(sentences_per_s_b1=130.0, sentences_per_s_b32=500.0)}
  text = encoder.speed_table(speeds, config, n_sentences=32)
  assert 'best of 1 passes over 32 dev sentences' in text
  assert '| teacher | 40 | 200 |' in text
  assert "| every student (the teacher's layers 0, 3) | 130 (3.25×) | 500 (2.50×) |" in text
  # Rows whose students add computation get their own line, and the others are 'every other'.
  speeds['prefix'] = dict(sentences_per_s_b1=120.0, sentences_per_s_b32=400.0)
  text = encoder.speed_table(speeds, config, n_sentences=32)
  assert "| every other student (the teacher's layers 0, 3) | 130 (3.25×) | 500 (2.50×) |" in text
  assert '| prefix tuning, 16 positions (same layers) | 120 (3.00×) | 400 (2.00×) |' in text
  assert 'but the adapter and prefix rows, which add computation and have their own' in text


def test_rows_drawn_on_one_another_share_a_label():
  points = {'full': (65000.0, 86.51), 'qat8': (52400.0, 86.51), 'ptq8': (52410.0, 86.52),
            'ptq4': (50100.0, 86.39), 'teacher': (88700.0, 86.72)}
  groups = report.overlapping_labels(points)
  assert list(groups.values()) == [['full'], ['qat8', 'ptq8'], ['ptq4'], ['teacher']]
  assert list(groups) == [points['full'], points['qat8'], points['ptq4'], points['teacher']]
