"""Every count, size, rate and loss weight of every config, set out of range, and every key that
picks a name, given an empty or unknown one, stops the job's own check with a ConfigError (before
anything is compiled or written); a probe through kd.main leaves no workdir behind."""

import math
import pathlib
import subprocess
import sys

import pytest

from kd import sweep
from kd.jobs import llm
from kd.train import config_check
from kd.train import sentence

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = 'configs/shakespeare/distill.py:tiny'
CONFIGS = sorted(p for p in (ROOT / 'configs').rglob('*.py') if p.name != 'base.py')
CHECKS = {'lm': config_check.check, 'llm': llm.check, 'sentence_embedding': sentence.check}
# Values a command line can give each type of field (ml_collections keeps a field's type).
BAD = {int: {'>= 1': (0, -1, -5), '>= 2': (1, 0, -1), '>= 0': (-1, -7), '> 0': (0, -1)},
       float: {'> 0': (0.0, -1.0, math.nan, math.inf), '>= 0': (-1e-3, math.nan, -math.inf),
               '>= 1': (0.0, -1.0, math.nan), '>= 2': (1.0, math.nan)}}


def _configs():
  for path in CONFIGS:
    module, _ = sweep.load(str(path))
    arg = next((e for e in getattr(module, 'EXAMPLES', ()) if 'tiny' in e), None)
    yield path.relative_to(ROOT), module.get_config(arg)


def _mutations(config):
  """(what, dotted key, bad value) for every checked number and loss weight the config holds."""
  rules = dict(config_check.NUMBERS)
  if 'source' not in config.student:
    rules.update({f'{m}.{k}': (None, '>= 1') for m in ('student', 'teacher.model')
                  for k in config_check.MODEL_SIZES})
  if config.get('train', {}).get('epochs') is not None:
    rules['train.steps'] = (None, '>= 0')
  for key, (_, words) in rules.items():
    value = config_check._get(config, key)  # pylint: disable=protected-access
    if value is None or isinstance(value, bool):
      continue
    for bad in BAD[type(value)][words]:
      yield key, bad
  for name in config.losses:
    for bad in (math.nan, math.inf, -0.5):
      yield f'losses.{name}', bad
  if 'temperature' in config:
    for bad in (math.nan, 0.0, -2.0):
      yield 'temperature', bad


def _set(config, key, value):
  *parents, leaf = key.split('.')
  node = config
  for p in parents:
    node = node[p]
  with config.unlocked(), config.ignore_type():
    node[leaf] = value


def test_every_out_of_range_number_is_a_config_error():
  tried, escaped = 0, []
  for path, base in _configs():
    check = CHECKS[base.get('job', 'lm')]
    check(base)  # the config itself passes
    for key, bad in _mutations(base):
      config = base.copy_and_resolve_references()
      _set(config, key, bad)
      tried += 1
      try:
        check(config)
        escaped.append(f'{path}: {key}={bad!r} passed')
      except config_check.ConfigError as e:
        assert key.split('.')[-1] in str(e), (path, key, str(e))
      except Exception as e:  # pylint: disable=broad-except
        escaped.append(f'{path}: {key}={bad!r} -> {type(e).__name__}: {e}')
  assert not escaped, '\n'.join(escaped)
  assert tried >= 400, tried  # measured: see the count printed with -s
  print(f'{tried} mutations over {len(CONFIGS)} configs, each a ConfigError')


def test_every_name_key_given_an_empty_or_unknown_name_and_every_number_a_word_is_refused():
  """Keys that pick from a fixed set (optimizer, schedule, PEFT and quantization method, dtype,
  layer map, ...) and numbers given as words: each a ConfigError naming the key."""
  names = config_check._names()  # pylint: disable=protected-access
  tried, escaped = 0, []
  for path, base in _configs():
    check = CHECKS[base.get('job', 'lm')]
    keys = [(k, bad) for k in names if isinstance(config_check._get(base, k), str)  # pylint: disable=protected-access
            for bad in ('', 'bogus', 'Adamw')]
    keys += [(k, 'ten') for k in config_check.NUMBERS
             if config_check._get(base, k) is not None]  # pylint: disable=protected-access
    for key, bad in keys:
      config = base.copy_and_resolve_references()
      _set(config, key, bad)
      tried += 1
      try:
        check(config)
        escaped.append(f'{path}: {key}={bad!r} passed')
      except config_check.ConfigError as e:
        assert f'config.{key}=' in str(e), (path, key, str(e))
      except Exception as e:  # pylint: disable=broad-except
        escaped.append(f'{path}: {key}={bad!r} -> {type(e).__name__}: {e}')
  assert not escaped, '\n'.join(escaped)
  assert tried >= 600, tried
  print(f'{tried} name and type mutations over {len(CONFIGS)} configs, each a ConfigError')


@pytest.mark.parametrize('override,key', [
    ('--config.optimizer.lr=-1', 'optimizer.lr'), ('--config.train.steps=0', 'train.steps'),
    ('--config.losses.kl=nan', 'losses.kl'), ('--config.data.batch_size=0', 'data.batch_size'),
    ('--config.optimizer.name=adamw2', 'optimizer.name')])
def test_kd_main_stops_before_writing_anything(tmp_path, override, key):
  out = subprocess.run([sys.executable, '-m', 'kd.main', f'--config={TINY}',
                        f'--workdir={tmp_path / "w"}', override], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode != 0 and f'config.{key}=' in out.stderr, out.stderr[-2000:]
  assert not (tmp_path / 'w').exists()


@pytest.mark.parametrize('override,message', [
    ('--config.losses.bogus=1.0', "config.losses has no key 'bogus'; its keys: ce, kl."),
    ('--config.optimizer.lrr=1',
     "config.optimizer has no key 'lrr'; its keys: grad_clip_norm, lr,"),
])
def test_an_override_of_a_missing_key_names_it_and_the_keys_there(tmp_path, override, message):
  out = subprocess.run([sys.executable, '-m', 'kd.main', f'--config={TINY}',
                        f'--workdir={tmp_path / "w"}', override], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 2 and message in out.stderr, out.stderr[-2000:]
  assert 'Traceback' not in out.stderr and not (tmp_path / 'w').exists()
  if 'losses' in override:
    assert 'jsd' in out.stderr and 'reverse_kl' in out.stderr  # the registry's names
