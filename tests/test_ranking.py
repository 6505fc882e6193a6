"""kd.eval.ranking (noise, held-out split, FLOPs, latency, ranks) and experiments/ranking.py."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import kd.hf
from kd.eval import ranking
from kd.models import Encoder, EncoderConfig, Model, init_encoder_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# genre, source, year, id, score, sentence1, sentence2 (a miniature STS-B)
PAIRS = [
    ('main-captions', 'MSRvid', 'A man is playing a guitar.', 'A man plays the guitar.', 4.8),
    ('main-captions', 'MSRvid', 'A woman is slicing an onion.', 'A dog runs in the park.', 0.2),
    ('main-captions', 'images', 'Two dogs run on the grass.', 'Two dogs are running.', 4.0),
    ('main-captions', 'images', 'A cat sleeps.', 'A boy rides a bike down the hill.', 0.4),
    ('main-news', 'headlines', 'Stocks fell on Monday.', 'Shares dropped Monday.', 4.2),
    ('main-news', 'headlines', 'Rain expected this weekend.', 'The president visits China.', 0.0),
    ('main-news', 'MSRpar', 'The company reported a loss.', 'The firm posted a loss.', 4.5),
    ('main-news', 'MSRpar', 'He was arrested on Friday.', 'Oil prices rose sharply.', 0.6),
    ('main-forums', 'answers-forums', 'You should ask your advisor.', 'Ask your advisor.', 4.0),
    ('main-forums', 'answers-forums', 'I use a text editor.', 'The weather is nice today.', 0.1),
    ('main-forums', 'answers-forums', 'Check the publisher policy.', 'See what publishers allow.',
     3.0),
    ('main-captions', 'track5.en-en', 'The sky has few clouds.', 'A woman is a nurse.', 0.5),
    ('main-captions', 'track5.en-en', 'A man is cooking.', 'A man cooks food.', 4.6),
]


def _write_sts(path, pairs):
  with open(path, 'w', encoding='utf-8') as f:
    for i, (genre, source, s1, s2, score) in enumerate(pairs):
      f.write(f'{genre}\t{source}\t2015\t{i:04d}\t{score}\t{s1}\t{s2}\n')
  return str(path)


@pytest.fixture(scope='module')
def sts_files(tmp_path_factory):
  d = tmp_path_factory.mktemp('sts')
  train = [p for p in PAIRS if p[1] not in ('answers-forums', 'track5.en-en')]
  train.append(('main-forum', 'deft-forum', 'A question.', 'An answer.', 1.0))
  return _write_sts(d / 'dev.csv', PAIRS), _write_sts(d / 'train.csv', train)


@pytest.fixture(scope='module')
def bert_dirs(tmp_path_factory, tiny_bert):
  """Two random 2-layer BERTs (seeds of one 'student') and a 1-layer one."""
  root = tmp_path_factory.mktemp('berts')
  return {'2l': [tiny_bert(root / 'two_s0', 0, 2), tiny_bert(root / 'two_s1', 1, 2)],
          '1l': [tiny_bert(root / 'one', 2, 1)]}


# ----------------------------------------------------------------------------- noise


def test_char_noise_deterministic_and_rate_zero_is_identity():
  sents = ['A man is playing a guitar.', 'Two dogs run.', '', 'Stocks fell sharply.']
  assert ranking.char_noise(sents, 0.0, seed=3) == sents
  a = ranking.char_noise(sents, 0.2, seed=0)
  assert a == ranking.char_noise(sents, 0.2, seed=0)
  assert a != ranking.char_noise(sents, 0.2, seed=1)
  assert a != sents and a[2] == ''
  # sentence i's noise depends on (seed, i) only, not on the other sentences
  assert ranking.char_noise(sents[:2], 0.2, seed=0) == a[:2]


@pytest.mark.parametrize('rate', [0.05, 0.1, 0.2])
def test_char_noise_edits_about_rate_of_characters(rate):
  n = 20_000
  text = ['#' * n]  # no lowercase letter, so every substitution is visible
  # 6 binomial standard deviations: fails by chance about once in 10^9 runs.
  tol = 6 * np.sqrt(n * rate * (1 - rate))
  sub = ranking.char_noise(text, rate, seed=0, ops=('substitute',))[0]
  assert len(sub) == n
  assert abs(sum(c != '#' for c in sub) - rate * n) < tol
  deleted = ranking.char_noise(text, rate, seed=0, ops=('delete',))[0]
  assert abs((n - len(deleted)) - rate * n) < tol
  inserted = ranking.char_noise(text, rate, seed=0, ops=('insert',))[0]
  assert abs((len(inserted) - n) - rate * n) < tol
  assert inserted.replace('#', '').isalpha() and inserted.replace('#', '').islower()
  # all three ops: each edit is one of them, about a third each
  mixed = ranking.char_noise(text, rate, seed=0)[0]
  letters = sum(c != '#' for c in mixed)
  assert abs(letters - 2 * rate * n / 3) < tol
  assert abs((len(mixed) - n)) < tol  # inserts and deletes cancel on average


def test_char_noise_rejects_bad_arguments():
  with pytest.raises(ValueError, match='rate'):
    ranking.char_noise(['a'], 1.5, 0)
  with pytest.raises(ValueError, match='swap'):
    ranking.char_noise(['a'], 0.1, 0, ops=('swap',))


# ----------------------------------------------------------------------------- STS splits


def test_held_out_sources_and_genres(sts_files, bert_dirs):
  dev, train = sts_files
  assert ranking.held_out_sources(dev, train) == ['answers-forums', 'track5.en-en']
  model = kd.hf.load(bert_dirs['1l'][0])
  r = ranking.sts_report(model, dev, train, batch_size=8)
  assert r['n'] == len(PAIRS)
  assert {g: v['n'] for g, v in r['genres'].items()} == {
      'main-captions': 6, 'main-news': 4, 'main-forums': 3}
  assert r['held_out']['n'] == 5
  # the subsets are computed from the same cosines as the whole file
  s1 = [p[2] for p in PAIRS]
  s2 = [p[3] for p in PAIRS]
  cos = ranking.pair_cosines(model, s1, s2, batch_size=8)
  held = np.array([p[1] in ('answers-forums', 'track5.en-en') for p in PAIRS])
  gold = np.array([p[4] for p in PAIRS])
  np.testing.assert_allclose(r['held_out']['spearman'],
                             ranking.spearman(cos[held], gold[held]), atol=1e-6)
  assert ranking.sts_by_genre(model, dev, batch_size=8) == r['genres']
  assert ranking.sts_under_noise(model, dev, 0.0, batch_size=8) == pytest.approx(r['spearman'])
  noisy = ranking.sts_under_noise(model, dev, 0.2, seed=0, batch_size=8)
  assert noisy == ranking.sts_under_noise(model, dev, 0.2, seed=0, batch_size=8)
  assert -100 <= noisy <= 100
  with pytest.raises(ValueError, match='held-out'):
    ranking.sts_report(model, dev, dev, batch_size=8)


# ----------------------------------------------------------------------------- cost


def _tiny_encoder(d=128, f=512, layers=2):
  cfg = EncoderConfig(vocab_size=500, hidden_size=d, num_layers=layers, num_heads=4,
                      intermediate_size=f, max_position_embeddings=64)
  return Model(Encoder(cfg), init_encoder_params(cfg, jax.random.key(0)))


@pytest.mark.parametrize('seq_len', [16, 32])
def test_flops_per_token_matches_analytic_count(seq_len):
  model = _tiny_encoder()
  got = ranking.flops_per_token(model, seq_len)
  want = ranking.analytic_flops_per_token(model.config, seq_len)
  # matmuls + attention are a lower bound; norms, GELU and softmax add a few percent at this width
  assert want <= got <= 1.15 * want, (got, want)
  # at batch 4 XLA counts 4x the work, so per token the same
  assert ranking.flops_per_token(model, seq_len, batch_size=4) == pytest.approx(got, rel=1e-3)


def test_flops_grow_with_layers_by_one_layer_of_matmuls():
  one, two = _tiny_encoder(layers=1), _tiny_encoder(layers=2)
  per_layer = ranking.flops_per_token(two, 16) - ranking.flops_per_token(one, 16)
  want = ranking.analytic_flops_per_token(one.config, 16)
  assert want <= per_layer <= 1.15 * want, (per_layer, want)


def test_latency_and_memory_mechanics():
  model = _tiny_encoder(d=32, f=64, layers=1)
  lat = ranking.latency(model, batch_size=4, seq_len=8, runs=2)
  assert lat['sentences_per_s'] > 0
  assert lat['tokens_per_s'] == pytest.approx(8 * lat['sentences_per_s'])
  assert lat['seconds'] == pytest.approx(4 / lat['sentences_per_s'])
  mem = ranking.memory(model, batch_size=4, seq_len=8)
  n = sum(x.size for x in jax.tree.leaves(model.params))
  assert mem['param_bytes'] == 4 * n
  assert mem['peak_bytes'] >= mem['param_bytes']


# ----------------------------------------------------------------------------- rank


def test_rank_by_direction_with_ties_and_missing():
  rows = [{'q': 80.0, 'mem': 100, 'speed': 10.0},
          {'q': 70.0, 'mem': 50, 'speed': 30.0},
          {'q': 70.0, 'mem': 10, 'speed': None},
          {'q': 60.0, 'mem': 10, 'speed': float('nan')}]
  r = ranking.rank(rows, {'q': 'max', 'mem': 'min', 'speed': 'max'})
  assert [x['q'] for x in r] == [1.0, 2.5, 2.5, 4.0]
  assert [x['mem'] for x in r] == [4.0, 3.0, 1.5, 1.5]
  assert [x['speed'] for x in r] == [2.0, 1.0, None, None]
  assert [x['average'] for x in r] == pytest.approx([7 / 3, 6.5 / 3, 2.0, 2.75])
  with pytest.raises(ValueError, match='higher'):
    ranking.rank(rows, {'q': 'higher'})


# ----------------------------------------------------------------------------- experiment


def test_experiment_end_to_end(tmp_path, sts_files, bert_dirs):
  dev, train = sts_files
  two = os.path.join(os.path.dirname(bert_dirs['2l'][0]), 'two_s*')  # a glob: both seeds
  out = tmp_path / 'out'
  cmd = [sys.executable, 'experiments/ranking.py', f'--models=2l={two},1l={bert_dirs["1l"][0]}',
         f'--dev={dev}', f'--train={train}', f'--out={out}', '--runs=1', '--seq_len=16',
         '--batch_sizes=1,4']
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  md = (out / 'ranking.md').read_text()
  assert (out / 'ranking.png').stat().st_size > 1000
  lines = [l for l in md.splitlines() if l.startswith('| ')]
  assert len(lines) == 3  # header + two models
  assert 'held-out domain' in lines[0] and '20% noise' in lines[0] and 'sent/s b=4' in lines[0]
  assert lines[1].startswith('| 2l | 2 |') and lines[2].startswith('| 1l | 1 |')
  assert 'answers-forums, track5.en-en' in md
  data = json.loads((out / 'ranking.json').read_text())
  rows = {r['name']: r for r in data['rows']}
  assert len(rows['2l']['per_seed']['spearman']) == 2
  # the two seeds are different random models: their mean is the table's mean
  assert rows['2l']['spearman'] == pytest.approx(np.mean(rows['2l']['per_seed']['spearman']))
  assert rows['1l']['params'] < rows['2l']['params']
  assert rows['1l']['flops_per_token'] < rows['2l']['flops_per_token']
  assert sorted([rows['1l']['rank']['flops_per_token'], rows['2l']['rank']['flops_per_token']]) \
      == [1.0, 2.0] and rows['1l']['rank']['flops_per_token'] == 1.0


# ----------------------------------------------------------------------------- decoders


def _decoder(**overrides):
  from kd.models import Decoder, DecoderConfig, init_params  # pylint: disable=g-import-not-at-top
  config = DecoderConfig(**{**dict(vocab_size=101, hidden_size=32, num_layers=3, num_heads=4,
                                   num_kv_heads=2, intermediate_size=48, max_seq_len=128),
                            **overrides})
  return Model(Decoder(config), init_params(config, jax.random.key(0)))


@pytest.mark.parametrize('overrides', [{}, {'scan_layers': True, 'dtype': 'bfloat16'}])
def test_kv_cache_bytes_by_hand(overrides):
  from kd.eval import decoder_cost  # pylint: disable=g-import-not-at-top
  model = _decoder(**overrides)
  c = model.config
  width = 2 if c.dtype == 'bfloat16' else 4
  want = 2 * c.num_layers * 5 * 64 * c.num_kv_heads * c.head_dim * width  # keys and values
  assert decoder_cost.kv_cache_bytes(c, batch_size=5, length=64) == want


@pytest.mark.parametrize('seq_len', [16, 64])
def test_decoder_flops_per_token_match_the_count_by_hand(seq_len):
  """XLA's count of the forward is the matmuls counted by hand plus a few percent of
  elementwise work (norms, rotary, softmax, activations)."""
  from kd.eval import decoder_cost  # pylint: disable=g-import-not-at-top
  model = _decoder()
  xla = decoder_cost.flops_per_token(model, seq_len)
  by_hand = decoder_cost.matmul_flops_per_token(model.config, seq_len)
  assert by_hand <= xla <= 1.25 * by_hand, (xla, by_hand)


def test_generation_speed_counts_generated_tokens():
  from kd.eval import decoder_cost  # pylint: disable=g-import-not-at-top
  out = decoder_cost.generation_speed(_decoder(), batch_size=2, prompt_len=4, new_tokens=6,
                                      runs=2)
  assert out['seconds'] > 0
  np.testing.assert_allclose(out['tokens_per_s'], 2 * 6 / out['seconds'])
