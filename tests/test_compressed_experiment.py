"""experiments/compressed.py: every row builds the config it names, and the table reads results."""

import importlib.util
import pathlib

import pytest

from kd.train import config_check

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def compressed():
  spec = importlib.util.spec_from_file_location('compressed_experiment',
                                                ROOT / 'experiments' / 'compressed.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


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
  assert '| LoRA r=8, every projection | 30.00 ± 0.00 | 50.0 ± 0.0 | 2 ± 0 | 10 ± 0 |' in text
  assert '| GPTQ int4 (groups of 32) | 32.00 |' in text
  assert '| teacher | 20.00 | - |' in text
