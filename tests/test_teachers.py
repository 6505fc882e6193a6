"""Other teachers: several mixed into one distribution, and born-again self-distillation."""

import jax
import ml_collections
import numpy as np
import pytest

from kd import models
from kd.models.ensemble import Ensemble
from kd.train import build
from kd.train import run
from kd.train import step as step_lib

V, B, T = 37, 4, 12


def _decoder(width, layers):
  return build.build_model(dict(hidden_size=width, num_layers=layers, num_heads=2, num_kv_heads=2,
                                intermediate_size=2 * width), V)


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _setup(weights=(0.25, 0.75)):
  members = (_decoder(32, 2), _decoder(24, 1))
  params = tuple(models.init_params(m.config, jax.random.key(10 + i))
                 for i, m in enumerate(members))
  # Sharpen the members so their distributions differ visibly from uniform and each other.
  params = tuple(jax.tree.map(lambda x: x * 3.0, p) for p in params)
  ids = np.random.default_rng(0).integers(3, V, (B, T + 1)).astype(np.int32)
  return Ensemble(members, weights), params, ids


def test_ensemble_logits_are_the_log_of_the_weighted_mixture():
  ens, params, ids = _setup()
  got = np.asarray(ens.apply(params, ids[:, :-1])['logits'])
  probs = [np.exp(_log_softmax(np.asarray(m.apply(p, ids[:, :-1])['logits'], np.float64)))
           for m, p in zip(ens.members, params)]
  want = np.log(0.25 * probs[0] + 0.75 * probs[1])
  np.testing.assert_allclose(got, want, atol=2e-5)
  np.testing.assert_allclose(np.exp(got).sum(-1), 1.0, atol=1e-5)
  assert ens.config is ens.members[0].config


def test_kd_step_distils_from_the_mixture():
  ens, params, ids = _setup()
  student = _decoder(16, 1)
  c = ml_collections.ConfigDict(dict(
      losses={'kl': 1.0}, loss_kwargs={}, temperature=2.0, chunk_size=0,
      features={'layer_map': 'uniform', 'pairs': ()},
      optimizer={'name': 'sgd', 'lr': 0.1, 'warmup_steps': 0, 'schedule': 'constant'},
      train={'accum_steps': 1}))
  spec = build.make_spec(c, student, ens, dict(c.losses), 10)
  state = step_lib.create_state(build.init_student(spec, 0), spec.tx, 0)
  mask = np.ones((B, T), np.float32)
  mask[:, :3] = 0
  batch = {'input_ids': ids[:, :-1], 'labels': ids[:, 1:], 'loss_mask': mask}
  _, m = jax.jit(lambda s, t, b: step_lib.train_step(s, t, b, spec))(state, params, batch)
  # numpy: T^2 * KL(softmax(log p_mix / T) || softmax(z_student / T)), mean over masked tokens.
  probs = [np.exp(_log_softmax(np.asarray(mm.apply(p, ids[:, :-1])['logits'], np.float64)))
           for mm, p in zip(ens.members, params)]
  log_mix = np.log(0.25 * probs[0] + 0.75 * probs[1])
  z_s = np.asarray(student.apply(state.params['student'], ids[:, :-1])['logits'], np.float64)
  log_t, log_s = _log_softmax(log_mix / 2.0), _log_softmax(z_s / 2.0)
  kl = 4.0 * (np.exp(log_t) * (log_t - log_s)).sum(-1)
  s, n = m['terms']['kl']
  assert float(n) == mask.sum()
  np.testing.assert_allclose(float(s) / float(n), (kl * mask).sum() / mask.sum(), rtol=1e-4)


def test_ensemble_refuses_features_bad_weights_and_vocabularies():
  ens, params, ids = _setup()
  with pytest.raises(ValueError, match='logits only'):
    ens.apply(params, ids, output_hidden_states=True)
  with pytest.raises(ValueError, match='sum to 1'):
    Ensemble(ens.members, (0.5, 0.6))
  with pytest.raises(ValueError, match='one weight per teacher'):
    Ensemble(ens.members, (1.0,))
  other = build.build_model(dict(hidden_size=8, num_layers=1, num_heads=2, num_kv_heads=2,
                                 intermediate_size=16), V + 1)
  with pytest.raises(ValueError, match='share'):
    Ensemble((ens.members[0], other), (0.5, 0.5))


def test_job_trains_two_teachers_and_distils_their_mixture(tmp_path, shakespeare_config):
  config = shakespeare_config('distill:tiny')
  config.teacher.count = 2
  config.baseline = False
  results = run.main(config, str(tmp_path / 'w'))
  assert set(results) == {'teacher_0', 'teacher_1', 'student_kd'}
  assert (tmp_path / 'w' / 'teacher' / 'member_1' / 'checkpoints').is_dir()
  ce0, ce1 = results['teacher_0']['ce'], results['teacher_1']['ce']
  assert ce0 != ce1  # two seeds, two teachers
  # The student's eval scores the mixture, whose CE is at most the members' mean (Jensen).
  assert results['student_kd']['teacher_ce'] <= 0.5 * (ce0 + ce1) + 1e-6


@pytest.mark.parametrize('edit,message', [
    (lambda c: c.teacher.update(weights=(0.5, 0.6)), 'summing to 1'),
    (lambda c: c.losses.update({'hidden_mse': 0.1}), 'hidden states'),
    (lambda c: c.update(chunk_size=8), 'chunk_size'),
    (lambda c: c.student_init.update(source='teacher'), 'one teacher'),
])
def test_config_check_refuses_what_a_mixture_cannot_give(edit, message, shakespeare_config):
  from kd.train import config_check  # pylint: disable=g-import-not-at-top
  config = shakespeare_config('distill:tiny')
  config.teacher.count = 2
  config_check.check(config)
  edit(config)
  with pytest.raises(config_check.ConfigError, match=message):
    config_check.check(config)


def test_born_again_round_is_taught_by_the_previous_student(tmp_path, shakespeare_config):
  config = shakespeare_config('distill:tiny')
  config.born_again = 1
  config.baseline = False
  results = run.main(config, str(tmp_path / 'w'))
  assert set(results) == {'teacher', 'student_kd', 'student_born_again_1'}
  first, second = results['student_kd'], results['student_born_again_1']
  # Round 1's teacher is round 0's student: its eval CE is that student's CE, same batches.
  np.testing.assert_allclose(second['teacher_ce'], first['ce'], rtol=1e-5)
  assert second['params'] == first['params']
  assert abs(second['ce'] - first['ce']) > 1e-6  # and it trained a new student
