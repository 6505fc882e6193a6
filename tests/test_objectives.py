"""Expected calibration error in the eval step, a teacher shared by runs (kd.seeds), the objectives
table."""

import importlib.util
import json
import pathlib

import jax
import numpy as np
import pytest

from kd import seeds
from kd.eval import report
from kd.train import config_check
from kd.train import loop
from kd.train import metrics as metrics_lib
from kd.train import run
from kd.train import step as step_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
V, T = 37, 12


def _numpy_ece(logits, labels, mask, bins=15):
  """Guo et al. (2017): bins (b/n, (b+1)/n] of the max softmax probability."""
  logits = np.asarray(logits, np.float64).reshape(-1, logits.shape[-1])
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  conf, pred = p.max(-1), p.argmax(-1)
  hit = (pred == np.asarray(labels).reshape(-1)).astype(np.float64)
  keep = np.asarray(mask).reshape(-1) > 0
  conf, hit = conf[keep], hit[keep]
  edges = np.linspace(0.0, 1.0, bins + 1)
  ece = 0.0
  for lo, hi in zip(edges[:-1], edges[1:]):
    in_bin = (conf > lo) & (conf <= hi)
    if in_bin.any():
      ece += in_bin.mean() * abs(conf[in_bin].mean() - hit[in_bin].mean())
  return ece


class _Fixed:
  """A stand-in model whose logits are given: `forward` returns variables['logits'][rows]."""

  def apply(self, variables, input_ids, **_):
    return {'logits': variables['logits'][input_ids[:, 0]]}


def _batches(rng, n_batches, b):
  out = []
  for i in range(n_batches):
    rows = np.arange(i * b, (i + 1) * b)
    ids = np.repeat(rows[:, None], T, axis=1).astype(np.int32)
    lengths = rng.integers(0, T + 1, size=b)  # uneven masks, some rows fully masked
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.float32)
    out.append({'input_ids': ids, 'labels': rng.integers(0, V, size=(b, T)).astype(np.int32),
                'loss_mask': mask})
  return out


def _spec(teacher=True):
  return step_lib.Spec(student=_Fixed(), teacher=_Fixed() if teacher else None, tx=None,
                       terms={}, weights={}, temperature=lambda s: 1.0, lr=lambda s: 0.0)


def test_ece_matches_numpy_and_adds_over_batches():
  rng = np.random.default_rng(0)
  n, b = 3, 4
  # Logits at several scales, so confidences fill many bins; the teacher is sharper.
  scale = rng.choice([0.3, 1.0, 3.0, 8.0], size=(n * b, T, 1))
  s_logits = (rng.normal(size=(n * b, T, V)) * scale).astype(np.float32)
  t_logits = (rng.normal(size=(n * b, T, V)) * 2 * scale).astype(np.float32)
  batches = _batches(rng, n, b)
  labels = np.concatenate([x['labels'] for x in batches])
  mask = np.concatenate([x['loss_mask'] for x in batches])
  labels[:, ::3] = s_logits[:, ::3].argmax(-1)  # some right answers, so accuracy is not ~0
  for i, x in enumerate(batches):
    x['labels'] = labels[i * b:(i + 1) * b]
  params, teacher_params = {'student': {'logits': s_logits}}, {'logits': t_logits}
  eval_fn = jax.jit(lambda p, tp, x: step_lib.eval_step(p, tp, x, _spec()))

  got = loop.evaluate(eval_fn, params, teacher_params, batches)
  np.testing.assert_allclose(got['ece'], _numpy_ece(s_logits, labels, mask), rtol=1e-5)
  np.testing.assert_allclose(got['teacher_ece'], _numpy_ece(t_logits, labels, mask), rtol=1e-5)
  assert 0.02 < got['ece'] < 0.98 and got['ece'] != got['teacher_ece']
  assert not any('/' in k for k in got), 'per-bin sums are summarised, not reported'

  # One batch of all rows, or the rows split in two calls: the same sums, the same ECE.
  whole = {k: np.concatenate([x[k] for x in batches]) for k in batches[0]}
  halves = [jax.tree.map(lambda a: a[:5], whole), jax.tree.map(lambda a: a[5:], whole)]
  one = loop.evaluate(eval_fn, params, teacher_params, [whole])
  two = loop.evaluate(eval_fn, params, teacher_params, halves)
  for k in ('ece', 'teacher_ece', 'accuracy', 'agreement'):
    np.testing.assert_allclose(one[k], got[k], rtol=1e-5)
    np.testing.assert_allclose(two[k], got[k], rtol=1e-5)

  # Without a teacher there is no teacher ECE; the eval step's values stay (sum, count) pairs.
  sums = step_lib.eval_step(params, None, batches[0], _spec(teacher=False))
  assert all(metrics_lib.is_pair(v) and np.ndim(v[0]) == 0 for v in sums.values())
  assert 'ece' in metrics_lib.summarize_eval(sums)
  assert 'teacher_ece' not in metrics_lib.summarize_eval(sums)


def test_ece_of_a_perfectly_calibrated_bin_is_zero():
  # Two tokens at confidence 0.5 (same bin), one right and one wrong: gap 0.
  sums = {f'ece/{k}_{b:02d}': (0.0, 0.0) for k in ('conf', 'hit') for b in range(15)}
  sums['ece/conf_07'], sums['ece/hit_07'] = (1.0, 2.0), (1.0, 2.0)
  assert metrics_lib.summarize_eval(sums)['ece'] == 0.0
  sums['ece/hit_07'] = (0.0, 2.0)  # both wrong: |1.0 - 0| / 2 tokens
  assert metrics_lib.summarize_eval(sums)['ece'] == 0.5


def _load(path, name):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _tiny(arg='tiny'):
  return _load(ROOT / 'configs' / 'shakespeare' / 'distill.py', 'distill').get_config(arg)


def test_objective_variants_build_the_losses():
  c = _tiny('tiny,objective=jsd')
  assert dict(c.losses) == {'ce': 0.5, 'jsd': 0.5} and c.loss_kwargs.jsd.beta == 0.5
  c.alpha = 0.25  # the weights follow alpha
  assert dict(c.losses) == {'ce': 0.25, 'jsd': 0.75}
  assert dict(_tiny('objective=ce').losses) == {'ce': 1.0}
  assert dict(_tiny('tiny').losses) == {'ce': 0.5, 'kl': 0.5}
  for name in ('reverse_kl', 'tvd', 'skew_kl', 'skew_reverse_kl'):
    config_check.check(_tiny(f'tiny,objective={name}'))
  with pytest.raises(ValueError, match="unknown config arg 'objectve'"):
    _tiny('tiny,objectve=jsd')


def test_runs_share_one_teacher(tmp_path):
  """The second run restores the first one's teacher and tokenizer instead of training them."""
  config = _tiny()
  config.baseline = False
  config.teacher.workdir = str(tmp_path / 'teacher')
  first = run.main(config, str(tmp_path / 'a'))
  assert (tmp_path / 'teacher' / 'tokenizer.json').read_bytes() == (
      tmp_path / 'a' / 'tokenizer.json').read_bytes()
  assert not (tmp_path / 'a' / 'teacher').exists()
  steps = [json.loads(l)['step'] for l in (tmp_path / 'teacher' / 'metrics.jsonl').open()
           if json.loads(l)['split'] == 'train']
  config.alpha = 0.0
  second = run.main(config, str(tmp_path / 'b'))
  steps_after = [json.loads(l)['step'] for l in (tmp_path / 'teacher' / 'metrics.jsonl').open()
                 if json.loads(l)['split'] == 'train']
  assert steps_after == steps, 'the shared teacher was trained again'
  assert (tmp_path / 'b' / 'tokenizer.json').read_bytes() == (
      tmp_path / 'a' / 'tokenizer.json').read_bytes()
  assert second['teacher']['perplexity'] == pytest.approx(first['teacher']['perplexity'])
  assert second['student_kd']['teacher_ece'] == pytest.approx(first['student_kd']['teacher_ece'])
  assert second['teacher']['ece'] == pytest.approx(first['student_kd']['teacher_ece'], rel=1e-5)

  config.seed = 1  # another seed would train another teacher: refused
  with pytest.raises(config_check.ConfigError, match='the shared teacher in .* was trained with'):
    run.main(config, str(tmp_path / 'c'))


def _experiment():
  return _load(ROOT / 'experiments' / 'objectives.py', 'objectives_experiment')


def _fake_results(exp, n_seeds=3):
  rng = np.random.default_rng(0)
  res = lambda: {'perplexity': float(rng.uniform(15, 20)), 'ece': float(rng.uniform(0, 0.1)),
                 'agreement': float(rng.uniform(0.6, 0.8)), 'params': 1000}
  out = {r: [res() for _ in range(n_seeds)] for r in exp.ROWS}
  out['teacher'] = [{k: v for k, v in res().items() if k != 'agreement'} for _ in range(n_seeds)]
  return out


def test_table_and_plot_format(tmp_path):
  """Formatting only, on made-up numbers of the shape the table gets ({row: [per seed]})."""
  exp = _experiment()
  results = _fake_results(exp)
  text = exp.table(results)
  lines = text.splitlines()
  assert '3 seeds' in lines[0]
  sweep_only = set(exp.ALPHA_SWEEP.values()) - {'kl_T2', 'ce'}  # shown as 'α = ...' only
  for key, (label, _, _) in exp.ROWS.items():
    assert sum(l.startswith(f'| {label} |') for l in lines) == (key not in sweep_only), key
  alpha = [l for l in lines if l.startswith('| α = ')]
  assert [l.split(' |')[0] for l in alpha] == ['| α = 0', '| α = 0.25', '| α = 0.5', '| α = 0.75',
                                               '| α = 1']
  teacher = next(l for l in lines if l.startswith('| teacher |'))
  assert teacher.split(' | ')[2] == '-'  # no agreement with itself
  v = np.asarray([r['perplexity'] for r in results['ce']])
  assert f'{v.mean():.2f} ± {v.std(ddof=1):.2f}' in text
  assert text.count('**') == 2 * len(exp.METRICS)  # one best value per column
  exp.plot(results, str(tmp_path / 'o.png'))
  assert (tmp_path / 'o.png').read_bytes()[:4] == b'\x89PNG'

  results['tvd'] = results['tvd'][:2]  # a missing run is shown, not hidden
  assert '| tvd (2 seeds) |' in exp.table(results)


def test_experiment_command_shares_the_seed_teacher():
  exp = _experiment()
  cmd = seeds.command('jsd_b0.1', '2', workdir='/w', config_arg='tiny',
                      overrides=['train.steps=3'], row_specs=exp.ROWS)
  assert cmd[1:] == [
      '-m', 'kd.main', '--config=configs/shakespeare/distill.py:tiny,objective=jsd',
      '--workdir=/w/seed_2/jsd_b0.1', '--config.seed=2', '--config.baseline=False',
      '--config.train.progress=False', '--config.teacher.workdir=/w/seed_2/teacher',
      '--config.loss_kwargs.jsd.beta=0.1', '--config.train.steps=3']


def test_experiment_collects_finished_runs(tmp_path):
  """--collect_only reads <workdir>/seed_<s>/<row>/results.json (an end-to-end run of two tiny
  rows over two seeds takes ~2 minutes, so it is left to the smoke command in the docstring)."""
  exp = _experiment()
  for seed, rows in (('0', ('ce', 'tvd')), ('1', ('ce',))):
    for row in rows:
      d = tmp_path / f'seed_{seed}' / row
      d.mkdir(parents=True)
      d.joinpath('results.json').write_text(json.dumps({
          'teacher': {'perplexity': 10.0 + int(seed)},
          'student_kd': {'perplexity': 20.0, 'row': row, 'seed': seed}}))
  rows = ['ce', 'tvd', 'jsd_b0.1']
  results = report.by_row(seeds.run_seeds(rows, ['0', '1'], workdir=str(tmp_path),
                                          collect_only=True, row_specs=exp.ROWS),
                          ['teacher', *rows])
  assert results['teacher'] == [{'perplexity': 10.0}, {'perplexity': 11.0}]
  assert [(r['row'], r['seed']) for r in results['ce']] == [('ce', '0'), ('ce', '1')]
  assert [(r['row'], r['seed']) for r in results['tvd']] == [('tvd', '0')]
  assert results['jsd_b0.1'] == []


def test_generation_experiment_rows_commands_and_table(tmp_path):
  gen = _load(ROOT / 'experiments' / 'generation_kd.py', 'generation_experiment')
  cmd = seeds.command('seqkd', '1', workdir='/w', config_arg='tiny', row_specs=gen.ROWS)
  assert '--config=configs/shakespeare/seqkd.py:tiny,objective=ce' in cmd
  cmd = seeds.command('onpolicy_0.5', '1', workdir='/w', config_arg='tiny', row_specs=gen.ROWS)
  assert '--config=configs/shakespeare/gkd.py:tiny,fraction=0.5,objective=jsd' in cmd
  config = seeds.load_config('ema:dialogue', 'tiny', 'jsd')  # the row's config, built here
  assert config.data.task == 'dialogue' and config.self_distill.ema_decay == 0.99
  cmd = seeds.command('born_again', '1', workdir='/w', row_specs=gen.ROWS)
  assert '--config.born_again=1' in cmd and '--config.teacher.workdir=/w/seed_1/teacher' in cmd
  # run_seeds reads each row's own results key (born-again's second student).
  for row in ('sft', 'born_again'):
    path = tmp_path / 'seed_0' / row
    path.mkdir(parents=True)
    kd = {'perplexity': 20.0, 'agreement': 0.5, 'ece': 0.01, 'wall_s': 9.0}
    (path / 'results.json').write_text(json.dumps(
        {'teacher': {'perplexity': 15.0, 'ece': 0.02, 'wall_s': 5.0}, 'student_kd': kd,
         'student_born_again_1': {**kd, 'perplexity': 19.0}}))
  results = report.by_row(seeds.run_seeds(['sft', 'born_again'], ['0'], workdir=str(tmp_path),
                                          collect_only=True, row_specs=gen.ROWS),
                          ['teacher', 'sft', 'born_again'])
  assert [r['perplexity'] for r in results['born_again']] == [19.0]
  text = gen.table(results)
  assert '| born-again: JSD from the λ = 0 student | 19.00 | 50.0 | - | 1.00 | 9 | - |' in text
  assert '| teacher | 15.00 | - | - | 2.00 | - | - |' in text  # a restored teacher's wall_s: no
  # Sampling speed: shown where the row sampled; '-' where it never did (an adaptive run whose
  # probability never rose reports 0).
  results['sft'] = [{**kd, 'generation_tokens_per_s': 0.0}]
  results['born_again'] = [{**kd, 'generation_tokens_per_s': 1234.4}]
  text = gen.table(results)
  assert '| SFT: CE on the dataset responses (no KD) | 20.00 | 50.0 | - | 1.00 | 9 | - |' in text
  assert '| born-again: JSD from the λ = 0 student | 20.00 | 50.0 | - | 1.00 | 9 | 1234 |' in text


def test_generation_rescore_matches_the_in_run_score(tmp_path):
  """--rescore (for runs made before the greedy-answer score existed) recomputes it from the
  checkpoints: the same value the run itself wrote."""
  gen = _load(ROOT / 'experiments' / 'generation_kd.py', 'generation_experiment')
  r = seeds.run('supervised_kd', '0', workdir=str(tmp_path), config_arg='tiny',
                row_specs=gen.ROWS)
  want = r['student_kd']['sample_teacher_nll'], r['teacher']['sample_teacher_nll']
  path = tmp_path / 'seed_0' / 'supervised_kd' / 'results.json'
  for k in ('student_kd', 'teacher'):
    for m in ('sample_teacher_nll', 'sample_tokens'):
      del r[k][m]
  path.write_text(json.dumps(r))
  assert gen.rescore(str(tmp_path), '0', 'supervised_kd', 'tiny')
  again = json.loads(path.read_text())
  np.testing.assert_allclose(again['student_kd']['sample_teacher_nll'], want[0], rtol=1e-5)
  np.testing.assert_allclose(again['teacher']['sample_teacher_nll'], want[1], rtol=1e-5)
  assert not gen.rescore(str(tmp_path), '0', 'supervised_kd', 'tiny')  # nothing left to add
