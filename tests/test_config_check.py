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


def _mutated(check, base, key, bad):
  """`check` run on a copy of `base` with config.<key> = bad: None when it passes, else what
  it raised (a ConfigError, or any other exception: an escape)."""
  config = base.copy_and_resolve_references()
  _set(config, key, bad)
  try:
    check(config)
  except Exception as e:  # pylint: disable=broad-except
    return e
  return None


def _escape(path, key, bad, error) -> str:
  if error is None:
    return f'{path}: {key}={bad!r} passed'
  return f'{path}: {key}={bad!r} -> {type(error).__name__}: {error}'


def test_every_out_of_range_number_is_a_config_error():
  tried, escaped = 0, []
  for path, base in _configs():
    check = CHECKS[base.get('job', 'lm')]
    check(base)  # the config itself passes
    for key, bad in _mutations(base):
      tried += 1
      e = _mutated(check, base, key, bad)
      if isinstance(e, config_check.ConfigError):
        assert key.split('.')[-1] in str(e), (path, key, str(e))
      else:
        escaped.append(_escape(path, key, bad, e))
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
      tried += 1
      e = _mutated(check, base, key, bad)
      if isinstance(e, config_check.ConfigError):
        assert f'config.{key}=' in str(e), (path, key, str(e))
      else:
        escaped.append(_escape(path, key, bad, e))
  assert not escaped, '\n'.join(escaped)
  assert tried >= 600, tried
  print(f'{tried} name and type mutations over {len(CONFIGS)} configs, each a ConfigError')


# The free-form strings. Read where the job opens them (data sources, checkpoints):
OPENED_BY_THE_JOB = ('data.train', 'data.eval', 'data.prompts', 'data.synthetic.prompts',
                     'teacher.path', 'student.path')
# Read only with another key (student_init.source; parallel.mode='mesh', where '' = a
# replicated teacher), or any text:
NOT_READ_ALONE = ('student_init.layers', 'student_init.path', 'parallel.teacher_fsdp',
                  'data.text_prefix')
# The rest, checked by check_strings, and which of BAD_STRINGS each may hold: '' is a default; a
# folder is made; a regex is matched against the model's paths later (check_models).
_REGEX = {'bogus', 'x[:200%]', '/etc/hostname/x'}
ACCEPTED = {'data.train_split': {''}, 'data.teacher_split': {''}, 'data.eval_split': set(),
            'data.name': set(), 'teacher.cache': {''}, 'eval.path': {''},
            'parallel.coordinator_address': {''},
            'teacher.workdir': {'', 'bogus', 'x[:200%]'}, 'teacher.cache_dir': {'', 'bogus',
                                                                                'x[:200%]'},
            'peft.target': _REGEX, 'quant.target': _REGEX, 'teacher.quant.target': _REGEX}
BAD_STRINGS = ('', 'bogus', 'x[:200%]', '/etc/hostname/x')  # the last: a folder under a file


def _string_keys(node, prefix=''):
  for k, v in node.items():
    if hasattr(v, 'items'):
      yield from _string_keys(v, f'{prefix}{k}.')
    elif isinstance(v, str):
      yield f'{prefix}{k}'


def test_every_free_form_string_is_refused_by_name_or_accepted_as_listed():
  names = config_check._names()  # pylint: disable=protected-access
  tried, escaped = 0, []
  for path, base in _configs():
    check = CHECKS[base.get('job', 'lm')]
    for key in _string_keys(base):
      if key in names or key in OPENED_BY_THE_JOB or key in NOT_READ_ALONE:
        continue
      assert key in ACCEPTED, f'{path}: config.{key} is a string no list above places'
      for bad in BAD_STRINGS:
        tried += 1
        e = _mutated(check, base, key, bad)
        if isinstance(e, config_check.ConfigError):
          if bad in ACCEPTED[key]:
            escaped.append(f'{path}: {key}={bad!r} refused: {e}')
          assert f'config.{key}=' in str(e), (path, key, str(e))
        elif e is not None or bad not in ACCEPTED[key]:
          escaped.append(_escape(path, key, bad, e))
  assert not escaped, '\n'.join(escaped)
  assert tried >= 300, tried
  print(f'{tried} free-form string mutations over {len(CONFIGS)} configs')


@pytest.mark.parametrize('bad', BAD_STRINGS)
def test_data_sources_and_checkpoints_the_job_opens_refuse_bad_strings_by_name(bad):
  from kd.data import sources  # pylint: disable=g-import-not-at-top
  with pytest.raises(sources.DataError):
    sources.read(bad)
  for key in ('teacher.path', 'student.path'):
    with pytest.raises(config_check.ConfigError, match=f'config.{key}='):
      llm._located(key, bad)  # pylint: disable=protected-access


@pytest.mark.parametrize('override,key', [
    ('--config.data.eval_split=', 'data.eval_split'),
    ('--config.teacher.workdir=/etc/hostname/x', 'teacher.workdir'),
    ('--config.optimizer.lr=-1', 'optimizer.lr'), ('--config.train.steps=0', 'train.steps'),
    ('--config.losses.kl=nan', 'losses.kl'), ('--config.data.batch_size=0', 'data.batch_size'),
    ('--config.optimizer.name=adamw2', 'optimizer.name')])
def test_kd_main_stops_before_writing_anything(tmp_path, override, key):
  out = subprocess.run([sys.executable, '-m', 'kd.main', f'--config={TINY}',
                        f'--workdir={tmp_path / "w"}', override], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode != 0 and f'config.{key}=' in out.stderr, out.stderr[-2000:]
  assert 'Traceback' not in out.stderr and not (tmp_path / 'w').exists()


def test_a_regex_matching_no_module_stops_kd_main_before_writing(tmp_path):
  out = subprocess.run([sys.executable, '-m', 'kd.main', '--config=configs/shakespeare/lora.py:tiny',
                        f'--workdir={tmp_path / "w"}', '--config.peft.target=bogus'], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode != 0 and "config.peft.target='bogus' matches no" in out.stderr
  assert 'Traceback' not in out.stderr and not (tmp_path / 'w').exists()


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
