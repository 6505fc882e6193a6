"""DistiLLM's adaptive off-policy pieces: replay buffer, SGO schedule, and the batch_fn."""

import json
import types

import jax
import numpy as np
import pytest

from kd import models
from kd.data import dialogue
from kd.data import tokenizer as tok_lib
from kd.train import onpolicy
from kd.train import replay

P, R, B, VOCAB = 6, 5, 4, 32


def _rows(start, n):
  """n rows whose contents name them: row i is all i."""
  ids = np.arange(start, start + n, dtype=np.int32)
  return {'input_ids': np.repeat(ids[:, None], 3, 1),
          'loss_mask': np.repeat(ids[:, None], 3, 1).astype(np.float32)}


def test_buffer_is_fifo_with_a_fixed_capacity_in_rows():
  buf = replay.ReplayBuffer(capacity=5, seed=0)
  assert len(buf) == 0 and not buf.full
  buf.add(_rows(0, 2))
  buf.add(_rows(2, 2))
  assert len(buf) == 4 and not buf.full
  np.testing.assert_array_equal(buf.rows()['input_ids'][:, 0], [0, 1, 2, 3])
  buf.add(_rows(4, 2))  # one row too many: row 0, the oldest, goes
  assert len(buf) == 5 and buf.full
  np.testing.assert_array_equal(buf.rows()['input_ids'][:, 0], [1, 2, 3, 4, 5])
  assert buf.rows()['loss_mask'].dtype == np.float32
  buf.add(_rows(10, 7))  # larger than the buffer: its last 5 rows
  np.testing.assert_array_equal(buf.rows()['input_ids'][:, 0], [12, 13, 14, 15, 16])
  with pytest.raises(ValueError, match='do not match'):
    buf.add({'input_ids': np.zeros((2, 4), np.int32), 'loss_mask': np.zeros((2, 3), np.float32)})
  with pytest.raises(ValueError, match='do not match'):
    buf.add({'input_ids': np.zeros((2, 3), np.int32)})
  with pytest.raises(ValueError, match='capacity'):
    replay.ReplayBuffer(capacity=0)


def test_buffer_sampling_is_pure_of_seed_and_step_and_survives_state_dict():
  buf = replay.ReplayBuffer(capacity=8, seed=3)
  with pytest.raises(ValueError, match='empty'):
    buf.sample(2, step=0)
  for i in range(5):  # 10 rows into 8 slots: the ring has wrapped
    buf.add(_rows(2 * i, 2))
  a = buf.sample(4, step=7)
  assert a['input_ids'].shape == (4, 3) and a['loss_mask'].dtype == np.float32
  assert len(set(a['input_ids'][:, 0])) == 4  # without replacement
  assert set(a['input_ids'][:, 0]) <= set(range(2, 10))
  np.testing.assert_array_equal(buf.sample(4, step=7)['input_ids'], a['input_ids'])
  assert any(not np.array_equal(buf.sample(4, step=s)['input_ids'], a['input_ids'])
             for s in range(8, 12))
  assert not np.array_equal(replay.ReplayBuffer.from_state_dict(
      dict(buf.state_dict(), seed=4)).sample(4, step=7)['input_ids'], a['input_ids'])

  state = buf.state_dict()
  assert all(isinstance(state[k], int) for k in ('capacity', 'seed', 'size', 'head'))
  assert all(isinstance(v, np.ndarray) for v in state['arrays'].values())
  back = replay.ReplayBuffer.from_state_dict(state)
  for s in (0, 7, 100):
    np.testing.assert_array_equal(back.sample(4, s)['input_ids'], buf.sample(4, s)['input_ids'])
  # A restored, not yet full buffer goes on exactly like the original.
  half = replay.ReplayBuffer(capacity=8, seed=1)
  half.add(_rows(0, 3))
  again = replay.ReplayBuffer.from_state_dict(half.state_dict())
  for b in (half, again):
    b.add(_rows(3, 7))
  np.testing.assert_array_equal(again.rows()['input_ids'], half.rows()['input_ids'])
  np.testing.assert_array_equal(again.sample(5, 2)['input_ids'], half.sample(5, 2)['input_ids'])


def test_schedule_follows_distillm_rule_on_a_hand_computed_sequence():
  sched = replay.AdaptiveSchedule(p0=0.0, delta=0.25, p_max=0.6, eps=0.25)
  losses = [2.0, 2.1, 2.25, 2.3, 2.0, 2.4, 2.6, 3.0, 4.0]
  # 2.0 sets the reference; 2.25 >= 2.0 + eps raises (reference 2.25); 2.3, 2.0 and 2.4 stay
  # below 2.25 + eps (2.4 would raise were the reference the previous or the best loss); 2.6
  # raises (ref 2.6); 3.0 >= 2.85 raises to the cap 0.6; 4.0 raises at the cap.
  want_p = [0.0, 0.0, 0.25, 0.25, 0.25, 0.25, 0.5, 0.6, 0.6]
  want_ref = [2.0, 2.0, 2.25, 2.25, 2.25, 2.25, 2.6, 3.0, 4.0]
  state, got_p, got_ref = sched.init(), [], []
  for loss in losses:
    state = sched.update(state, loss)
    got_p.append(state.p)
    got_ref.append(state.reference)
  np.testing.assert_allclose(got_p, want_p)
  assert got_ref == want_ref and state.checks == 9 and state.raises == 4
  assert sched.init() == replay.ScheduleState(p=0.0)  # update is pure: init is untouched
  with pytest.raises(ValueError, match='finite'):
    sched.update(state, float('nan'))
  with pytest.raises(ValueError, match='p0'):
    replay.AdaptiveSchedule(p0=0.5, p_max=0.4)


def test_choose_draws_data_generate_and_replay_with_the_right_odds():
  pol = replay.AdaptiveOffPolicy(replay_fraction=0.5, replay_schedule='constant', seed=2)
  picks = [pol.choose(s, 0.6, can_replay=True) for s in range(4000)]
  assert picks == [pol.choose(s, 0.6, can_replay=True) for s in range(4000)]
  freq = {c: picks.count(c) / 4000 for c in ('data', 'generate', 'replay')}
  assert abs(freq['data'] - 0.4) < 0.03 and abs(freq['replay'] - 0.3) < 0.03
  assert all(pol.choose(s, 0.6, can_replay=False) != 'replay' for s in range(200))
  assert all(pol.choose(s, 0.0, can_replay=True) == 'data' for s in range(200))
  lin = replay.AdaptiveOffPolicy(replay_schedule='linear', total_steps=100)
  assert [lin.replay_probability(s) for s in (0, 50, 100, 150)] == [0.0, 0.5, 1.0, 1.0]


def test_from_config_refuses_bad_settings():
  pol = replay.AdaptiveOffPolicy.from_config(
      {'enabled': True, 'p0': 0.1, 'eps': 0.05, 'capacity': 64, 'replay_schedule': 'constant'},
      seed=5, total_steps=0)
  assert pol.schedule == replay.AdaptiveSchedule(p0=0.1, eps=0.05) and pol.capacity == 64
  assert pol.seed == 5
  with pytest.raises(ValueError, match='unknown adaptive off-policy keys'):
    replay.AdaptiveOffPolicy.from_config({'capcity': 3}, seed=0, total_steps=10)
  with pytest.raises(ValueError, match="valid: \\['constant', 'linear'\\]"):
    replay.AdaptiveOffPolicy.from_config({'replay_schedule': 'cosine'}, seed=0, total_steps=10)
  with pytest.raises(ValueError, match='total_steps'):
    replay.AdaptiveOffPolicy.from_config({}, seed=0, total_steps=0)


@pytest.fixture(scope='module')
def student():
  config = models.DecoderConfig(vocab_size=VOCAB, hidden_size=16, num_layers=1, num_heads=2,
                                num_kv_heads=2, intermediate_size=32)
  return models.Decoder(config), models.init_params(config, jax.random.key(0))


def _batch(seed):
  """A dialogue batch of B rows (left-padded prompts, responses ending in <eos>), numpy."""
  rng = np.random.default_rng(seed)
  p_ids = rng.integers(3, VOCAB, (B, P)).astype(np.int32)
  p_mask = np.ones((B, P), np.int32)
  for i, n in enumerate(rng.integers(1, P - 1, B)):
    p_ids[i, :n], p_mask[i, :n] = tok_lib.PAD_ID, 0
  p_ids[np.arange(B), P - p_mask.sum(1)] = tok_lib.BOS_ID
  r_ids = rng.integers(3, VOCAB, (B, R)).astype(np.int32)
  r_mask = np.ones((B, R), np.int32)
  for i, n in enumerate(rng.integers(1, R, B)):
    r_ids[i, n], r_ids[i, n + 1:], r_mask[i, n + 1:] = tok_lib.EOS_ID, tok_lib.PAD_ID, 0
  return dialogue.to_batch(p_ids, p_mask, r_ids, r_mask)


def _check_layout(out, like):
  """Same keys, shapes and dtypes as `like`; one consistent dialogue batch."""
  out = jax.device_get(out)
  assert set(out) == set(like)
  for k, v in like.items():
    assert out[k].shape == v.shape and out[k].dtype == v.dtype, k
  np.testing.assert_array_equal(out['input_ids'][:, :P], out['prompt_ids'])
  np.testing.assert_array_equal(out['attention_mask'][:, :P], out['prompt_mask'])
  np.testing.assert_array_equal(out['labels'][:, :-1], out['input_ids'][:, 1:])
  assert out['loss_mask'][:, :P - 1].sum() == 0  # never a prompt token
  # A label is in the loss only if it is a real token (the next position's attention mask).
  assert np.all(out['loss_mask'][:, :-1] <= out['attention_mask'][:, 1:])
  return out


@pytest.fixture
def spy(monkeypatch):
  calls = []
  real = onpolicy.OnPolicy.student_batch

  def student_batch(self, module, params, batch, step, plan=None):
    calls.append(step)
    return real(self, module, params, batch, step, plan)

  monkeypatch.setattr(onpolicy.OnPolicy, 'student_batch', student_batch)
  return calls


def test_batch_fn_generates_once_then_replays_from_the_buffer(student, spy):
  module, params = student
  state = types.SimpleNamespace(params={'student': params}, frozen=None)
  pol = replay.AdaptiveOffPolicy(schedule=replay.AdaptiveSchedule(p0=1.0), capacity=B,
                                 replay_fraction=1.0, replay_schedule='constant', seed=3)
  fn = pol.batch_fn(module)
  batch = _batch(0)
  first = _check_layout(fn(state, batch, 0), batch)
  # A fresh sample of the student, as kd.train.onpolicy draws it for this step and prompts.
  want = jax.device_get(dialogue.answered((module, params), batch, temperature=1.0,
                                          rng=jax.random.fold_in(jax.random.key(3), 0)))
  for k in want:
    np.testing.assert_array_equal(first[k], want[k])
  for k in ('prompt_ids', 'prompt_mask'):
    np.testing.assert_array_equal(first[k], batch[k])
  np.testing.assert_array_equal(first['input_ids'][:, :P], batch['input_ids'][:, :P])
  assert first['loss_mask'].sum() > 0
  assert spy == [0]
  rows = {first['labels'][i].tobytes() for i in range(B)}
  for step in range(1, 4):
    got = _check_layout(fn(state, _batch(step), step), batch)
    assert all(got['labels'][i].tobytes() in rows for i in range(B))  # the generated rows
  assert spy == [0]  # no second generation
  assert fn.stats['generated_batches'] == 1 and fn.stats['replayed_batches'] == 3
  assert fn.stats['data_batches'] == 0 and fn.stats['sgo_probability'] == 1.0
  assert fn.stats['generated_tokens'] == int(first['loss_mask'].sum())
  assert fn.stats['buffer_rows'] == B and fn.stats['generation_s'] > 0

  # A batch_fn restored from the state dict replays exactly the same rows.
  again = pol.batch_fn(module)
  again.load_state_dict(fn.state_dict())
  for step in (4, 9):
    a, b = fn(state, _batch(step), step), again(state, _batch(step), step)
    assert all(np.array_equal(a[k], b[k]) for k in a)
  assert again.stats['replayed_batches'] == 5 and spy == [0]


@pytest.mark.parametrize('fill_first,generated', [(True, [0, 1, 2]), (False, [0])])
def test_fill_first_generates_until_the_buffer_is_full(student, spy, fill_first, generated):
  module, params = student
  state = types.SimpleNamespace(params={'student': params}, frozen=None)
  pol = replay.AdaptiveOffPolicy(schedule=replay.AdaptiveSchedule(p0=1.0), capacity=3 * B,
                                 replay_schedule='constant', fill_first=fill_first)
  fn = pol.batch_fn(module)
  for step in range(5):
    fn(state, _batch(step), step)
  assert spy == generated
  assert fn.stats['replayed_batches'] == 5 - len(generated)
  assert fn.stats['buffer_rows'] == B * len(generated)


def test_batch_fn_never_replaces_with_p_zero_and_follows_observed_losses(student, spy):
  module, params = student
  state = types.SimpleNamespace(params={'student': params}, frozen=None)
  pol = replay.AdaptiveOffPolicy(
      schedule=replay.AdaptiveSchedule(p0=0.0, delta=1.0, eps=0.1), capacity=B,
      replay_schedule='constant')
  fn = pol.batch_fn(module)
  batch = _batch(0)
  assert all(fn(state, batch, s) is batch for s in range(50))
  assert spy == [] and fn.stats['data_batches'] == 50
  assert fn.observe_validation(2.0) == 0.0  # the reference
  assert fn.observe_validation(2.05) == 0.0  # within eps
  assert fn(state, batch, 50) is batch
  assert fn.observe_validation(2.2) == 1.0  # rose by more than eps: p = min(0 + 1, 1)
  assert fn.stats['sgo_probability'] == 1.0
  _check_layout(fn(state, batch, 51), batch)
  assert spy == [51]
  state_dict = fn.state_dict()
  assert state_dict['schedule'] == {'p': 1.0, 'reference': 2.2, 'checks': 3, 'raises': 1}


def test_a_resumed_adaptive_run_continues_with_its_buffer(shakespeare_config, tmp_path):
  """Straight vs stopped after step 4 and resumed: same batches, so the same student. A
  one-batch buffer is full after step 1, so later steps replay it: a resume that lost the
  buffer would have to generate instead."""
  import shutil  # pylint: disable=g-import-not-at-top
  from kd.train import run  # pylint: disable=g-import-not-at-top
  config = shakespeare_config('distillm:tiny,objective=jsd')
  config.baseline = False
  config.data.sample_eval_batches = 0
  config.train.update(steps=6, eval_every=2, checkpoint_every=2)
  config.on_policy.adaptive.update(p0=1.0, capacity=config.data.batch_size)
  straight = run.main(config, str(tmp_path / 'a'))['student_kd']
  assert straight['replayed_batches'] > 0 and straight['data_batches'] == 0  # p0 = 1
  rows = [json.loads(l) for l in open(tmp_path / 'a' / 'student_kd' / 'metrics.jsonl')]
  assert [x['step'] for x in rows if 'sgo_probability' in x] == [2, 4]  # fit observed both
  # The same workdir stopped at step 4: drop the last checkpoint, its buffer file and results.
  shutil.copytree(tmp_path / 'a', tmp_path / 'b')
  shutil.rmtree(tmp_path / 'b' / 'student_kd' / 'checkpoints' / '6')
  (tmp_path / 'b' / 'student_kd' / 'batch_fn' / '6.npz').unlink()
  resumed = run.main(config, str(tmp_path / 'b'))['student_kd']
  for key in ('perplexity', 'agreement', 'replayed_batches', 'generated_batches',
              'sgo_probability', 'buffer_rows'):
    assert resumed[key] == straight[key], key
