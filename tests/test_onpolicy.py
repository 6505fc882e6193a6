"""The dialogue prompt/response task and on-policy (GKD) batches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd import models
from kd.data import dialogue
from kd.data import tokenizer as tok_lib
from kd.models import sample
from kd.train import onpolicy

SPEECHES = ['First Citizen:\nBefore we proceed any further, hear me speak.',
            'All:\nSpeak, speak.',
            'All:\nResolved. resolved.',  # same speaker twice: no pair
            'not a speech',
            'MENENIUS:\nWhat work\'s, my countrymen, in hand?']


@pytest.fixture(scope='module')
def tokenizer(tmp_path_factory):
  texts = [s for s in SPEECHES] * 20 + ['abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ']
  return tok_lib.train_bpe(texts, 300, str(tmp_path_factory.mktemp('tok')))


def test_speech_pairs_answer_in_the_next_speakers_voice():
  pairs = dialogue.speech_pairs(SPEECHES)
  assert pairs == [('First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\n',
                    'Speak, speak.')]


def test_encode_and_to_batch_mask_the_prompt(tokenizer):
  short = 'A:\nhello there\n\nB:\n'
  pairs = [(short, 'hi'), ('A:\n' + 'word ' * 40 + '\n\nB:\n', 'yes ' * 40)]
  n0 = len(tok_lib.encode_batch(tokenizer, [short])[0]) + 1  # with <bos>
  p, r = n0 + 2, 6
  arr = dialogue.encode(pairs, tokenizer, prompt_len=p, response_len=r)
  p_ids, p_mask = arr['prompt_ids'], arr['prompt_mask']
  r_ids, r_mask = arr['response_ids'], arr['response_mask']
  # Row 0: short prompt, left-padded, starts with <bos>; response 'hi' + <eos>, right-padded.
  hi = tok_lib.encode_batch(tokenizer, ['hi'])[0]
  assert list(p_mask[0]) == [0, 0] + [1] * n0 and p_ids[0, 2] == tok_lib.BOS_ID
  assert list(r_ids[0, :len(hi) + 1]) == hi + [tok_lib.EOS_ID] and r_mask[0].sum() == len(hi) + 1
  # Row 1: a long prompt keeps its end (the "B:" line); the response is cut to 5 + <eos>.
  assert tok_lib.decode(tokenizer, p_ids[1]).endswith('\n\nB:\n') and p_mask[1].all()
  assert r_ids[1, -1] == tok_lib.EOS_ID and r_mask[1].all()

  b = jax.device_get(dialogue.to_batch(p_ids, p_mask, r_ids, r_mask))
  full = np.concatenate([p_ids, r_ids], 1)
  np.testing.assert_array_equal(b['input_ids'], full[:, :-1])
  np.testing.assert_array_equal(b['labels'], full[:, 1:])
  # The loss covers exactly the response tokens (as labels), <eos> included.
  for i in range(2):
    want = np.zeros(p + r - 1)
    want[p - 1:p - 1 + r_mask[i].sum()] = 1
    np.testing.assert_array_equal(b['loss_mask'][i], want)
  np.testing.assert_array_equal(b['attention_mask'], np.concatenate([p_mask, r_mask], 1)[:, :-1])
  assert b['positions'][0, 2] == 0 and b['positions'][0, p - 1] == n0 - 1
  assert b['positions'][1, 0] == 0 and b['positions'][1, p + r - 2] == p + r - 2


def test_response_mask_stops_after_the_first_eos():
  ids = jnp.array([[5, 2, 0, 0], [5, 6, 7, 8], [2, 9, 2, 9]])
  np.testing.assert_array_equal(dialogue.response_mask(ids),
                                [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])


def _tiny_student(vocab):
  config = models.DecoderConfig(vocab_size=vocab, hidden_size=32, num_layers=1, num_heads=2,
                                num_kv_heads=2, intermediate_size=64)
  return models.Decoder(config), models.init_params(config, jax.random.key(0))


def test_student_batch_is_the_students_own_sample(tokenizer):
  module, params = _tiny_student(300)
  pairs = [('A:\nhello there\n\nB:\n', 'hi'), ('A:\nwhat\n\nB:\n', 'no more')]
  arr = dialogue.encode(pairs, tokenizer, prompt_len=10, response_len=7)
  batch = dialogue.to_batch(*arr.values())
  op = onpolicy.OnPolicy(fraction=1.0, temperature=1.0, seed=3)
  got = jax.device_get(op.student_batch(module, params, batch, step=4))
  # The same call to the sampler directly gives the same tokens: the key is (seed, step).
  gen = sample.generate((module, params), arr['prompt_ids'], arr['prompt_mask'],
                        max_new_tokens=7, temperature=1.0, eos_id=tok_lib.EOS_ID,
                        rng=jax.random.fold_in(jax.random.key(3), 4))
  np.testing.assert_array_equal(got['labels'][:, 9:], gen)
  np.testing.assert_array_equal(got['input_ids'][:, :10], arr['prompt_ids'])
  np.testing.assert_array_equal(got['loss_mask'][:, 9:], dialogue.response_mask(gen))
  assert got['loss_mask'][:, :9].sum() == 0
  assert not np.array_equal(got['labels'], jax.device_get(batch['labels']))
  assert all(v.shape == np.shape(batch[k]) for k, v in got.items())


def test_a_lora_student_samples_with_its_adapters(tokenizer):
  """The batch_fn of a LoRA student (adapters in state.params, base in state.frozen) samples
  what the plain model with the merged weights samples."""
  from kd import peft  # pylint: disable=g-import-not-at-top
  from kd.train import step as step_lib  # pylint: disable=g-import-not-at-top
  module, base = _tiny_student(300)
  lcfg = peft.LoraConfig(target=r'.*_proj', rank=2, alpha=4.0)
  lora_module = peft.lora_model(module, lcfg)
  lora = jax.tree.map(lambda x: 0.5 * jax.random.normal(jax.random.key(x.size), x.shape),
                      peft.init_lora(lora_module, base, jax.random.key(1), lcfg))
  pairs = [('A:\nhello there\n\nB:\n', 'hi'), ('A:\nwhat\n\nB:\n', 'no more')]
  batch = dialogue.to_batch(*dialogue.encode(pairs, tokenizer, prompt_len=10,
                                             response_len=7).values())
  state = step_lib.TrainState(step=0, params={'student': lora}, opt_state=None, rng=None,
                              frozen=base)
  op = onpolicy.OnPolicy(fraction=1.0, temperature=0.05, seed=3)  # random init: flat logits
  got = jax.device_get(op.batch_fn(lora_module)(state, batch, 4))
  merged = peft.merge(peft.combine(lora, base), lcfg)
  want = jax.device_get(op.student_batch(module, merged, batch, 4))
  np.testing.assert_array_equal(got['labels'], want['labels'])
  without = jax.device_get(op.student_batch(module, base, batch, 4))  # the adapters matter
  assert not np.array_equal(got['labels'], without['labels'])


def test_use_student_is_a_bernoulli_of_seed_and_step():
  op = onpolicy.OnPolicy(fraction=0.3, seed=1)
  draws = [op.use_student(s) for s in range(2000)]
  assert draws == [op.use_student(s) for s in range(2000)]  # pure: a resumed run agrees
  assert 0.26 < np.mean(draws) < 0.34
  assert not any(onpolicy.OnPolicy(fraction=0.0).use_student(s) for s in range(100))
  assert all(onpolicy.OnPolicy(fraction=1.0).use_student(s) for s in range(100))
  with pytest.raises(ValueError, match='fraction'):
    onpolicy.OnPolicy.from_config({'fraction': 1.5}, 0)


def test_on_policy_job_trains_the_kd_student_on_its_own_samples(tmp_path, monkeypatch,
                                                                shakespeare_config):
  from kd.train import run  # pylint: disable=g-import-not-at-top
  # A LoRA student: it samples through its adapters on the frozen base (the plain student's
  # on-policy run is tests/test_parallel.py's, under pmap).
  config = shakespeare_config('gkd:tiny,fraction=1.0')
  config.peft.method = 'lora'  # a LoRA student (configs/shakespeare/lora.py's settings)
  config.student_init.source = 'teacher'
  config.optimizer.weight_decay = 0.0
  config.baseline = False
  calls = []
  real = onpolicy.OnPolicy.student_batch

  def spy(self, module, params, batch, step, plan=None):
    out = real(self, module, params, batch, step, plan)
    calls.append((step, float(np.sum(out['loss_mask'])), float(np.sum(batch['loss_mask']))))
    return out

  monkeypatch.setattr(onpolicy.OnPolicy, 'student_batch', spy)
  results = run.main(config, str(tmp_path / 'w'))
  assert [c[0] for c in calls] == list(range(config.train.steps))  # KD stage only, every step
  # The loss covers the generated tokens (up to each <eos>), not the dataset's responses.
  assert any(got != data for _, got, data in calls)
  assert all(0 < got <= 8 * config.data.batch_size for _, got, _ in calls)
  kd = results['student_kd']
  assert np.isfinite(kd['perplexity'])
  assert 0 < kd['trainable_params'] < kd['params']
  assert kd['generated_batches'] == config.train.steps
  assert kd['generated_tokens'] == sum(c[1] for c in calls) and kd['generation_tokens_per_s'] > 0
  assert 'batches on-policy' in run.report(results)


def test_on_policy_runs_under_any_plan_and_process_count(shakespeare_config, monkeypatch):
  from kd.train import config_check  # pylint: disable=g-import-not-at-top
  config = shakespeare_config('gkd:tiny,fraction=0.5')
  config.parallel.mode = 'pmap'
  config_check.check(config)  # one process, any plan (tests/test_parallel.py runs it)
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  with pytest.raises(config_check.ConfigError, match="pmap' runs on one host"):
    config_check.check(config)
  config.parallel.update(mode='mesh', data=1, fsdp=2)
  monkeypatch.setattr(jax, 'device_count', lambda: 2)
  config_check.check(config)  # across processes on a mesh (tests/test_parallel.py runs it)


@pytest.mark.parametrize('arg,edit,message', [
    ('gkd:tiny,fraction=0.5', lambda c: c.losses.update({'ce': 0.5}), "'ce' loss"),
    ('distill:tiny', lambda c: c.on_policy.update(fraction=0.5), "task='dialogue'"),
    ('distill:tiny', lambda c: c.seqkd.update(enabled=True), "prompts for the teacher"),
    ('dialogue:tiny', lambda c: c.data.update(response_len=1), 'response_len'),
    ('dialogue:tiny', lambda c: c.on_policy.update(fraction=2.0), r'\[0, 1\]'),
])
def test_config_check_refuses_bad_on_policy_settings(arg, edit, message, shakespeare_config):
  from kd.train import config_check  # pylint: disable=g-import-not-at-top
  config = shakespeare_config(arg)
  config_check.check(config)  # fine before the edit
  edit(config)
  with pytest.raises(config_check.ConfigError, match=message):
    config_check.check(config)


def test_seqkd_stores_the_teachers_responses_once(tmp_path, tokenizer, monkeypatch):
  from kd.data import seqkd  # pylint: disable=g-import-not-at-top
  module, params = _tiny_student(300)
  pairs = [(f'A:\nline {i}\n\nB:\n', 'reply ' * (i % 3 + 1)) for i in range(5)]
  arr = dialogue.encode(pairs, tokenizer, prompt_len=10, response_len=6)
  kw = dict(batch_size=2, temperature=0.0)
  got, path = seqkd.get_or_write(str(tmp_path), (module, params), arr, key={'k': 1}, **kw)
  # Greedy, so each row is what the sampler writes for that prompt alone (the last batch of
  # one row is padded to two): cut after <eos>, pad after.
  for i in range(5):
    gen = np.asarray(sample.generate((module, params), arr['prompt_ids'][i:i + 1],
                                     arr['prompt_mask'][i:i + 1], max_new_tokens=6,
                                     temperature=0.0, eos_id=tok_lib.EOS_ID))[0]
    keep = np.asarray(dialogue.response_mask(gen[None]))[0]
    np.testing.assert_array_equal(got['response_mask'][i], keep)
    np.testing.assert_array_equal(got['response_ids'][i], np.where(keep, gen, 0))
  np.testing.assert_array_equal(got['prompt_ids'], arr['prompt_ids'])
  # A second call reads the stored set instead of generating; other settings, another set.
  def regenerated(*args, **kwargs):
    raise AssertionError('regenerated')

  monkeypatch.setattr(seqkd, 'teacher_responses', regenerated)
  again, path2 = seqkd.get_or_write(str(tmp_path), (module, params), arr, key={'k': 1}, **kw)
  assert path2 == path and all(np.array_equal(again[k], got[k]) for k in got)
  with pytest.raises(AssertionError, match='regenerated'):
    seqkd.get_or_write(str(tmp_path), (module, params), arr, key={'k': 2}, **kw)


def test_teacher_nll_of_greedy_samples_against_numpy(tokenizer):
  from kd.eval import generation  # pylint: disable=g-import-not-at-top
  student, s_params = _tiny_student(300)
  t_cfg = models.DecoderConfig(vocab_size=300, hidden_size=48, num_layers=2, num_heads=2,
                               num_kv_heads=2, intermediate_size=64)
  teacher, t_params = models.Decoder(t_cfg), models.init_params(t_cfg, jax.random.key(5))
  pairs = [(f'A:\nline {i}\n\nB:\n', 'reply') for i in range(3)]
  arr = dialogue.encode(pairs, tokenizer, prompt_len=10, response_len=6)
  batches = dialogue.eval_batches(arr, batch_size=2)  # 3 rows: the second batch has a pad row
  got = generation.teacher_nll_of_samples(student, s_params, teacher, t_params, batches)
  total = tokens = 0.0
  for i in range(3):  # one prompt at a time, no padding rows, plain numpy NLL
    ids, mask = arr['prompt_ids'][i:i + 1], arr['prompt_mask'][i:i + 1]
    gen = np.asarray(sample.generate((student, s_params), ids, mask, max_new_tokens=6,
                                     temperature=0.0, eos_id=tok_lib.EOS_ID))[0]
    keep = np.asarray(dialogue.response_mask(gen[None]))[0]
    full = np.concatenate([ids[0], np.where(keep, gen, 0)])
    real = np.concatenate([mask[0], keep])
    logits = np.asarray(teacher.apply(
        t_params, full[None, :-1], attention_mask=real[None, :-1],
        positions=np.maximum(np.cumsum(real) - 1, 0)[None, :-1])['logits'][0], np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                                                           keepdims=True)) \
        - logits.max(-1, keepdims=True)
    for j in range(6):  # generated token j is the label at input position 9 + j
      if keep[j]:
        total -= logp[9 + j, full[10 + j]]
        tokens += 1
  np.testing.assert_allclose(got['sample_teacher_nll'], total / tokens, rtol=1e-4)
  np.testing.assert_allclose(got['sample_tokens'], tokens / 3, rtol=1e-6)
