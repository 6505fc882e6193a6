"""Every config in configs/ builds; bad configs fail early with a message that says what to do."""

import importlib.util
import pathlib
import re
import shutil

import pytest

import kd.hf
from kd.hf import locate
from kd.jobs import llm
from kd.train import JOBS
from kd.train import build
from kd.train import config_check
from kd.train import run
from kd.train import sections
from kd.train import sentence

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / 'configs'
# base.py: what the experiment files of its directory share, not a config by itself.
CONFIGS = sorted(p for p in CONFIG_DIR.rglob('*.py') if p.name != 'base.py')
SHAKESPEARE = CONFIG_DIR / 'shakespeare'


def _module(path):
  spec = importlib.util.spec_from_file_location(path.stem, str(path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  assert module.__doc__ and 'python -m kd.main' in module.__doc__, f'{path}: docstring needs the command'
  return module


def load(path, arg=None):
  return _module(path).get_config(arg)


def _args(path):
  """None, then the config's EXAMPLES (or 'tiny'): together they give every arg it has."""
  return [None, *getattr(_module(path), 'EXAMPLES', ('tiny',))]


def _builds_lm(config):
  config_check.check(config)
  teacher = build.build_model(config.teacher.model, config.data.vocab_size)
  student = build.build_model(config.student, config.data.vocab_size)
  config_check.check_models(config, student, teacher)
  build.make_spec(config, student, teacher, dict(config.losses), config.train.steps)


def _builds_sentence(config):
  sentence.check(config)
  path = sentence.teacher_path(config.teacher.path)  # an installed package or a directory
  num_layers = kd.hf.read_config(path)['num_hidden_layers']
  keep, pairs, attention_pairs = sentence.plan_layers(config, num_layers)
  assert sentence.cache_fields(config.losses, pairs, attention_pairs)
  assert len(keep) < num_layers


def _builds_llm(config):
  llm.check(config)
  if '/' in config.teacher.path:  # a Hub id: tests/test_llm_recipes.py compiles it on shapes
    return
  path = locate.locate(config.teacher.path)  # an installed package, a directory or a .gguf
  assert path.endswith('.gguf') or kd.hf.read_config(path)


BUILDERS = {'lm': _builds_lm, 'sentence_embedding': _builds_sentence, 'llm': _builds_llm}


@pytest.mark.parametrize('path, arg', [(p, a) for p in CONFIGS for a in _args(p)],
                         ids=lambda x: str(x.relative_to(CONFIG_DIR)) if isinstance(x, pathlib.Path)
                         else str(x))
def test_config_builds(path, arg):
  config = load(path, arg)
  assert set(BUILDERS) == set(JOBS)
  BUILDERS[config.get('job', 'lm')](config)


@pytest.mark.parametrize('path', [p for p in CONFIGS if hasattr(_module(p), 'ARGS')],
                         ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_examples_give_every_documented_arg(path):
  module = _module(path)
  used = {token.split('=')[0] for example in module.EXAMPLES for token in example.split(',')}
  assert used == set(module.ARGS), f'{path}: EXAMPLES leave out {set(module.ARGS) - used}'
  for name, kind in module.ARGS.items():  # the docstring documents each, as `name` or `name=X`
    # at the start of an indented line, or after others there (`  tiny, long, objective=NAME`)
    assert re.search(rf'^\s+(?:\S+, )*{re.escape(name)}{"" if kind is bool else "="}',
                     module.__doc__, re.M), f'{path}: the docstring does not document {name!r}'


def test_every_shakespeare_experiment_builds_on_the_base_from_any_directory(tmp_path,
                                                                           monkeypatch):
  """The experiment files reach base.py by their own location: a copy of the directory loads
  with any working directory, by a relative path, as kd.main and kd.sweep load them."""
  from kd import sweep  # pylint: disable=g-import-not-at-top
  shutil.copytree(SHAKESPEARE, tmp_path / 'c')
  monkeypatch.chdir(tmp_path)
  experiments = sorted(p.name for p in SHAKESPEARE.glob('*.py') if p.name != 'base.py')
  assert len(experiments) >= 10
  for name in experiments:
    module, arg = sweep.load(f'c/{name}:tiny')
    assert module.get_config(arg).to_dict() == load(SHAKESPEARE / name, 'tiny').to_dict()
  (tmp_path / 'c' / 'base.py').unlink()
  with pytest.raises(FileNotFoundError, match='base.py, which is missing'):
    sweep.load('c/distill.py')


@pytest.mark.parametrize('path, arg, message', [
    ('minilm_sts.py', 'tiny,peft=adapter,lora', r"\['peft', 'lora'\] .* choose the same thing"),
    ('shakespeare/distill.py', 'tiny,bogus',
     "unknown config arg 'bogus'.*valid: tiny, long, objective=STR$"),
    ('shakespeare/gkd.py', 'tiny,bogus', 'valid: tiny, long, objective=STR, fraction=FLOAT'),
    ('shakespeare/distill.py', 'tiny=1', "'tiny' takes no value"),
    ('shakespeare/distill.py', 'objective', "'objective' needs a value: objective=STR"),
    ('shakespeare/distill.py', 'tiny,tiny', 'given twice'),
    ('shakespeare/qat.py', 'bits=four', "'four' is not of type int"),
    ('minilm_sts.py', 'qlora', "'qlora' needs 'lora' too"),
    ('shakespeare/qat.py', 'bits=2', '4- or 8-bit'),
    ('shakespeare/adapters.py', 'method=lora', r"use one of \('adapter', 'prefix', 'prompt'\)"),
    ('shakespeare/distill.py', 'fraction=0.5', "unknown config arg 'fraction'"),
])
def test_bad_config_args_are_refused_naming_the_valid_ones(path, arg, message):
  with pytest.raises(ValueError, match=message):
    load(CONFIG_DIR / path, arg)


def test_keys_the_readme_sets_are_declared():
  """A flag like --config.closed_form=False only works on a key the config declares."""
  for path in (SHAKESPEARE / 'distill.py', CONFIG_DIR / 'llm' / 'smollm2_kd.py'):
    config = load(path)
    for key in ('closed_form', 'same_tokenizer', 'chunk_size', 'fused_chunks', 'temperature'):
      assert key in config, (path, key)


def _set_ignoring_type(config, key, value):
  with config.ignore_type():
    setattr(config, key, value)


def _tiny():
  return load(SHAKESPEARE / 'distill.py', 'tiny')


@pytest.mark.parametrize('edit, message', [
    (lambda c: c.losses.update({'klx': 0.5}), "unknown loss 'klx'; valid: .*, kl, "),
    (lambda c: setattr(c, 'temperature', 0.0), 'temperature must stay > 0'),
    (lambda c: _set_ignoring_type(c, 'temperature',
                                  {'kind': 'linear', 'start': 2.0, 'end': -1.0}),
     'temperature must stay > 0'),
    (lambda c: c.loss_kwargs.update({'jsd': {'beta': 0.2}}), "names 'jsd', which is not in"),
    (lambda c: c.update({'data': {'batch_size': 6}, 'train': {'accum_steps': 4}}),
     'not divisible by devices'),
    (lambda c: c.train.update(accum_steps=3), 'use a multiple of 3'),
    (lambda c: c.update({'losses': {'kl': 1.0}, 'loss_kwargs': {'kl': {'beta': 0.3}},
                         'chunk_size': 8, 'closed_form': True}),
     'closed_form=True writes the gradient of these terms and kwargs only'),
])
def test_bad_config_is_refused_before_anything_runs(edit, message, tmp_path):
  config = _tiny()
  with config.unlocked():
    edit(config)
  with pytest.raises(ValueError, match=message):
    run.main(config, str(tmp_path / 'w'))
  assert not (tmp_path / 'w').exists(), 'nothing may be written for a bad config'


def test_layer_map_out_of_range_is_refused():
  config = _tiny()
  config.features.pairs = ((1, 9),)
  config.features.layer_map = 'explicit'
  teacher = build.build_model(config.teacher.model, 300)
  student = build.build_model(config.student, 300)
  with pytest.raises(ValueError, match='config.features'):
    config_check.check_models(config, student, teacher)


def test_scanned_layers_take_every_compression():
  """scan_layers in student and teacher passes the checks with PEFT, a quantized teacher and a
  quantized student (all stored per layer, run stacked)."""
  config = _tiny()
  config.student.scan_layers = True
  config.teacher.model.scan_layers = True
  teacher = build.build_model(config.teacher.model, 300)
  student = build.build_model(config.student, 300)
  config_check.check_models(config, student, teacher)
  config.teacher.quant.bits = 8
  for peft, quant in (({'method': 'lora'}, {'method': 'none'}),
                      ({'method': 'adapter', 'size': 4}, {'method': 'none'}),
                      ({'method': 'none'}, {'method': 'qat'}),
                      ({'method': 'lora'}, {'method': 'qlora', 'bits': 4, 'group_size': 16})):
    with config.unlocked():
      config.peft.update(peft)
      config.quant.update(quant)
    config_check.check_models(config, student, teacher)


def test_attention_maps_need_equal_head_counts():
  config = _tiny()
  config.losses.update({'attention_kl': 0.1})
  teacher = build.build_model(config.teacher.model, 300)
  student = build.build_model(config.student, 300)
  with pytest.raises(ValueError, match="use 'minilm_relations'"):
    config_check.check_models(config, student, teacher)


def test_vocab_mismatch():
  assert sections.vocab_slice(151936, 152064, same_tokenizer=True) == 151936
  with pytest.raises(ValueError, match='needs one tokenizer'):
    sections.vocab_slice(32000, 50257, same_tokenizer=False)
