"""Compressed sentence-encoder students (config.peft / config.quant in kd.train.sentence) and
experiments/compressed_sts.py, each checked against numpy written here."""

import dataclasses
import functools
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import filelock
import flax
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import kd.hf
from kd import models
from kd import peft
from kd import quant
from kd.train import build
from kd.train import compress
from kd.train import config_check
from kd.train import sentence
from kd.train import step as step_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEEP = [0, 3]  # the tiny teacher's layers every student here keeps
H, I, RANK, ALPHA = 32, 64, 8, 16.0  # the tiny BERT's widths; configs/minilm_sts.py's LoRA
TARGETS = sorted(f'layers_{i}/{m}' for i in range(len(KEEP))
                 for m in ('attn/q_proj', 'attn/k_proj', 'attn/v_proj', 'attn/o_proj', 'up_proj',
                           'down_proj'))
SENTENCES = ['A man is playing a guitar.', 'Two dogs run.', 'The cat sleeps on the warm mat.',
             'A woman is slicing an onion into thin pieces for dinner.']


def _load(name, path):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


minilm_sts = _load('minilm_sts', f'{ROOT}/configs/minilm_sts.py')


@pytest.fixture(scope='module')
def teacher_dir(tmp_path_factory, tiny_bert):
  return tiny_bert(tmp_path_factory.mktemp('tiny_bert'), 0, 4)


def _config(arg, teacher_dir):
  c = minilm_sts.get_config(arg)
  c.teacher.path = teacher_dir
  c.student.layers = tuple(KEEP)
  return c


def _flat(tree):
  return {'/'.join(k): np.asarray(v) for k, v in flax.traverse_util.flatten_dict(tree).items()}


def _rtn4_by_hand(w, g=32):
  """int4 round-to-nearest in groups of g input rows, float16 scales, dequantized (numpy)."""
  w = np.asarray(w, np.float32)
  blocks = w.reshape(w.shape[0] // g, g, w.shape[1])
  scale = (np.abs(blocks).max(axis=1) / np.float32(7)).astype(np.float16).astype(np.float32)
  q = np.clip(np.round(blocks / scale[:, None, :]), -7, 7)
  return (q * scale[:, None, :]).reshape(w.shape)


# ----------------------------------------------------------------------------- the step


def test_lora_encoder_gives_every_feature_of_the_merged_encoder():
  cfg = models.EncoderConfig(vocab_size=50, hidden_size=H, num_layers=2, num_heads=4,
                             intermediate_size=I)
  base = models.init_encoder_params(cfg, jax.random.key(0))
  lcfg = peft.LoraConfig(target=r'.*_proj', rank=4, alpha=8.0)
  model = peft.lora_model(models.Encoder(cfg), lcfg)
  lora = peft.init_lora(model, base, jax.random.key(1), lcfg)
  assert sorted({k.rsplit('/', 1)[0][len('params/'):] for k in _flat(lora)}) == TARGETS
  lora = jax.tree.map(lambda x: x + 0.05, lora)  # B != 0, so the adapters change the model
  merged = _flat(base)
  for k, a in _flat(lora).items():
    if k.endswith('kernel_lora_a'):
      path = k[:-len('_lora_a')]
      merged[path] = merged[path] + 8.0 / 4 * a @ _flat(lora)[path + '_lora_b']
  merged = flax.traverse_util.unflatten_dict({tuple(k.split('/')): v for k, v in merged.items()})
  ids = np.random.default_rng(0).integers(0, 50, (2, 7))
  mask = np.ones((2, 7), np.int32)
  mask[1, 5:] = 0
  want = dict(attention_mask=mask, output_hidden_states=True, output_attentions=True,
              output_qkv=True)
  got = model.apply(peft.combine(lora, base), ids, **want)
  ref = models.Encoder(cfg).apply(merged, ids, **want)
  plain = models.Encoder(cfg).apply(base, ids, attention_mask=mask)
  assert np.abs(np.asarray(plain['hidden']) - np.asarray(ref['hidden'])).max() > 1e-2
  close = functools.partial(np.testing.assert_allclose, atol=2e-5, rtol=2e-5)
  close(got['hidden'], ref['hidden'])
  for a, b in zip(got['hidden_states'], ref['hidden_states'], strict=True):
    close(a, b)
  for a, b in zip(got['attentions'], ref['attentions'], strict=True):
    close(a, b)
  for a, b in zip(got['qkv'], ref['qkv'], strict=True):
    for k in 'qkv':
      close(a[k], b[k])


def test_qat_step_is_sgd_with_the_gradient_at_hand_quantized_weights(teacher_dir):
  config = _config('tiny,qat=4', teacher_dir)
  config.optimizer = {'name': 'sgd', 'lr': 0.1, 'warmup_steps': 0, 'schedule': 'constant'}
  teacher = kd.hf.load(teacher_dir)
  student = models.student_from_teacher(teacher, KEEP)
  pairs, att = sentence.layer_pairs(config, KEEP, 4)
  spec = build.train_spec(config, student.module, teacher.module, dict(config.losses), 10,
                          pairs=pairs, attention_pairs=att)
  qcfg = spec.student_weights.config  # (a kd.train.student_weights.FakeQuant)
  assert qcfg.bits == 4 and qcfg.group_size == 32
  plain_spec = dataclasses.replace(spec, student_weights=step_lib.plain_weights)
  enc = teacher.tokenizer(SENTENCES, padding=True, return_tensors='np')
  mask = enc['attention_mask'].astype(np.int32)
  batch = {'input_ids': enc['input_ids'].astype(np.int32), 'attention_mask': mask,
           'loss_mask': mask}
  base = jax.tree.map(np.array, student.params)
  state = step_lib.create_state({'student': jax.tree.map(np.array, base), 'proj': {}}, spec.tx, 0)
  new, metrics = jax.jit(functools.partial(step_lib.train_step, spec=spec))(
      state, teacher.params, batch)

  flat = _flat(base)
  quantized = {k: (_rtn4_by_hand(v) if k.rsplit('/', 1)[0][len('params/'):] in TARGETS
                   and k.endswith('/kernel') else v) for k, v in flat.items()}
  assert sum(not np.array_equal(quantized[k], flat[k]) for k in flat) == len(TARGETS)
  w_q = flax.traverse_util.unflatten_dict({tuple(k.split('/')): v for k, v in quantized.items()})

  def loss_at(variables):  # the float model's objective, evaluated at the quantized weights
    params = {'student': variables, 'proj': {}}
    t_out = step_lib.teacher_forward(plain_spec, teacher.params, batch)
    terms = step_lib.loss_terms(params, None, t_out, batch, plain_spec, 0)
    return sum(plain_spec.weights[n](0) * s / c for n, (s, c) in terms.items())

  loss, grads = jax.jit(jax.value_and_grad(loss_at))(w_q)
  np.testing.assert_allclose(metrics['loss'], loss, rtol=1e-5)
  grads = _flat(grads)
  assert all(np.abs(grads[k]).max() > 0 for k in grads if k.endswith('_proj/kernel'))
  got = _flat(new.params['student'])
  for k, v in flat.items():  # the float master weights take the step
    np.testing.assert_allclose(got[k], v - 0.1 * grads[k], rtol=1e-4, atol=1e-6, err_msg=k)


def test_qlora_base_is_stored_on_the_int4_grid(teacher_dir):
  config = _config('tiny,lora,qlora', teacher_dir)
  base = models.student_from_teacher(kd.hf.load(teacher_dir), KEEP).params
  frozen = compress.frozen_base(compress.read(config), base)
  assert isinstance(frozen, quant.QuantizedParams)
  assert sorted(frozen.kernels) == TARGETS
  flat = _flat(base)
  for path, qk in frozen.kernels.items():
    values = np.asarray(qk.values)
    assert values.dtype == np.int8 and np.abs(values).max() <= 7
    assert np.asarray(qk.scales).dtype == np.float16
    np.testing.assert_allclose(quant.dequantize_kernel(qk),
                               _rtn4_by_hand(flat[f'params/{path}/kernel']), rtol=1e-6)
  rest = {k for k in flat if k.rsplit('/', 1)[0][len('params/'):] not in TARGETS
          or not k.endswith('/kernel')}
  assert set(frozen.rest) == rest


# ----------------------------------------------------------------------------- config errors


def test_prompt_tuning_is_refused_for_the_encoder(teacher_dir, tmp_path):
  config = _config('tiny', teacher_dir)
  config.peft.method = 'prompt'
  config.peft.size = 4
  with pytest.raises(config_check.ConfigError,
                     match=r"supports \('none', 'lora', 'adapter', 'prefix'\)"):
    sentence.main(config, str(tmp_path / 'w'))
  assert not (tmp_path / 'w').exists()
  student = models.student_from_teacher(kd.hf.load(teacher_dir), KEEP)
  with pytest.raises(config_check.ConfigError, match='prompt tuning is a decoder field'):
    config_check.check_peft(config, student)
  config.peft.method = 'adapter'
  config.peft.size = 0
  with pytest.raises(config_check.ConfigError, match='config.peft.size must be a positive int'):
    sentence.main(config, str(tmp_path / 'w'))
  assert not (tmp_path / 'w').exists()


def test_targets_that_match_no_encoder_kernel_are_refused(teacher_dir, tmp_path):
  config = _config('tiny,lora', teacher_dir)
  config.peft.target = r'.*/attn'
  with pytest.raises(config_check.ConfigError,
                     match=r'matches no projection.*layers_0/attn/k_proj'):
    sentence.main(config, str(tmp_path / 'w'))
  assert not (tmp_path / 'w' / 'teacher_cache').exists()
  config = _config('tiny,qat=8', teacher_dir)
  config.quant.target = r'.*_projection'
  with pytest.raises(config_check.ConfigError, match='config.quant: .* matches no kernel'):
    sentence.main(config, str(tmp_path / 'w'))
  config = _config('tiny,qat=8', teacher_dir)
  config.quant.group_size = 24
  with pytest.raises(config_check.ConfigError, match='group_size=24 does not divide'):
    sentence.main(config, str(tmp_path / 'w'))
  assert not (tmp_path / 'w' / 'teacher_cache').exists()


# ------------------------------------------------- the tiny experiment and its LoRA / QLoRA runs


@pytest.fixture(scope='module')
def experiment(teacher_dir, tmp_path_factory, worker_id):
  """experiments/compressed_sts.py, one seed, on the tiny teacher: (workdir, out).

  Built once per test session: under xdist, every worker shares the first one's result (a file
  lock around the run, the pattern of pytest-xdist's docs).
  """
  if worker_id == 'master':
    return _run_experiment(tmp_path_factory.mktemp('compressed_minilm'), teacher_dir)
  shared = tmp_path_factory.getbasetemp().parent  # this session's, common to the workers
  root = shared / 'compressed_minilm'
  with filelock.FileLock(str(shared / 'compressed_minilm.lock')):
    if not (root / 'out' / 'compressed_minilm.md').exists():
      shutil.rmtree(root, ignore_errors=True)
      root.mkdir()
      _run_experiment(root, teacher_dir)
  return root / 'w', root / 'out'


def _command(root, teacher_dir, *flags):
  return [sys.executable, 'experiments/compressed_sts.py', '--config_arg=tiny',
          f'--workdir={root / "w"}', f'--override=teacher.path={teacher_dir}',
          '--override=student.layers=(0,3)', f'--override=eval.path={root / "dev.csv"}', *flags]


def _run_experiment(root, teacher_dir):
  dev = os.path.join(os.environ['KD_DATA_DIR'], 'stsbenchmark', 'sts-dev.csv')
  with open(dev, encoding='utf-8') as f, open(root / 'dev.csv', 'w', encoding='utf-8') as g:
    g.writelines(f.readlines()[:120])  # a small dev split: the test scores, it does not rank
  subprocess.run(_command(root, teacher_dir, '--seeds=0', f'--out={root / "out"}'), check=True,
                 cwd=ROOT, capture_output=True)
  return root / 'w', root / 'out'


def _adapters(run_dir):
  ckpt = run_dir / 'student' / 'checkpoints'
  last = max(int(d) for d in os.listdir(ckpt) if d.isdigit())
  return _flat(ocp.StandardCheckpointer().restore(ckpt / str(last) / 'state')['params']['student'])


def _check_merged_export(run_dir, teacher_dir, base_kernel):
  """The run trained exactly the A/B leaves of every target, and its export is its base with
  base_kernel(W) + (alpha / rank) A @ B at each target: returns the adapters."""
  adapters = _adapters(run_dir)
  # rank * (in + out) per target kernel, by hand: q/k/v/o [H, H], up [H, I], down [I, H].
  per_layer = 4 * RANK * (H + H) + RANK * (H + I) + RANK * (I + H)
  assert sum(v.size for v in adapters.values()) == len(KEEP) * per_layer
  assert sorted(adapters) == sorted(f'params/{t}/kernel_lora_{ab}' for t in TARGETS
                                    for ab in 'ab')
  for t in TARGETS:
    a, b = adapters[f'params/{t}/kernel_lora_a'], adapters[f'params/{t}/kernel_lora_b']
    assert a.shape[1] == b.shape[0] == RANK and np.abs(b).max() > 0  # B left zero: trained
  with open(run_dir / 'results.json') as f:
    assert json.load(f)['student']['trainable_params'] == len(KEEP) * per_layer
  base = _flat(models.student_from_teacher(kd.hf.load(teacher_dir), KEEP).params)
  exported = _flat(kd.hf.load(str(run_dir / 'hf')).params)
  assert set(exported) == set(base)
  for k, w in base.items():
    module = k.rsplit('/', 1)[0][len('params/'):]
    if module in TARGETS and k.endswith('/kernel'):
      a = adapters[f'params/{module}/kernel_lora_a'].astype(np.float64)
      b = adapters[f'params/{module}/kernel_lora_b'].astype(np.float64)
      want = base_kernel(w) + ALPHA / RANK * a @ b
      np.testing.assert_allclose(exported[k], want, rtol=1e-5, atol=1e-6, err_msg=k)
    else:  # the frozen base: untouched
      np.testing.assert_array_equal(exported[k], w, err_msg=k)
  return adapters


def test_lora_run_trains_only_adapters_and_exports_base_plus_ab(experiment, teacher_dir):
  _check_merged_export(experiment[0] / 'seed_0' / 'lora', teacher_dir, lambda w: w)


def test_qlora_run_exports_the_quantized_base_plus_ab(experiment, teacher_dir):
  _check_merged_export(experiment[0] / 'seed_0' / 'qlora', teacher_dir, _rtn4_by_hand)


# (peft=M's config.peft.size) -> the trained params' paths and shapes, by hand.
PEFT_SHAPES = {
    'adapter': lambda w: {f'params/layers_{i}/{a}_adapter/{d}/{k}': shape
                          for i in range(len(KEEP)) for a in ('attn', 'mlp')
                          for d, k, shape in (('down', 'kernel', (H, w)), ('down', 'bias', (w,)),
                                              ('up', 'kernel', (w, H)), ('up', 'bias', (H,)))},
    'prefix': lambda p: {f'params/layers_{i}/attn/prefix_{kv}': (p, 4, H // 4)
                         for i in range(len(KEEP)) for kv in 'kv'},
}


@pytest.mark.parametrize('method', ['adapter', 'prefix'])
def test_adapter_and_prefix_runs_train_only_theirs_and_export_base_plus_them(
    experiment, teacher_dir, method):
  """The run's checkpoint holds exactly the method's params, trained away from their init; the
  export is the untouched truncated teacher plus those params (kd_peft.safetensors), and it is
  the model the run scored: its STS-B Spearman, recomputed here, is results.json's."""
  from kd.eval import sts  # pylint: disable=g-import-not-at-top
  run_dir = experiment[0] / 'seed_0' / method
  size = minilm_sts.PEFT_SIZES[method]
  trained = _adapters(run_dir)
  want = PEFT_SHAPES[method](size)
  assert {k: v.shape for k, v in trained.items()} == want
  with open(run_dir / 'results.json') as f:
    result = json.load(f)['student']
  assert result['trainable_params'] == sum(int(np.prod(s)) for s in want.values())
  teacher = kd.hf.load(teacher_dir)
  start = compress.grow_peft(compress.read(_config(f'tiny,peft={method}', teacher_dir)),
                             models.student_from_teacher(teacher, KEEP).config,
                             models.student_from_teacher(teacher, KEEP).params, 0)[1]
  for k, v in _flat(start).items():
    if k in trained:
      assert np.abs(trained[k] - v).max() > 0, k
  exported = kd.hf.load(str(run_dir / 'hf'))
  assert getattr(exported.config, peft.adapters.CONFIG_FIELDS[method]) == size
  got = _flat(exported.params)
  base = _flat(models.student_from_teacher(teacher, KEEP).params)
  assert set(got) == set(base) | set(want)
  for k, v in got.items():
    np.testing.assert_array_equal(v, trained[k] if k in want else base[k], err_msg=k)
  score = sts.evaluate(exported, str(experiment[0].parent / 'dev.csv'), batch_size=64)['spearman']
  assert score == pytest.approx(result['spearman'], abs=1e-6)


def test_minilm_experiment_writes_every_row(experiment):
  workdir, out = experiment
  text = (out / 'compressed_minilm.md').read_text()
  assert (out / 'compressed_minilm.png').stat().st_size > 0
  main, speed = text.split('\n\nEncode speed on this machine')
  rows = {line.split(' | ')[0][2:]: line.split(' | ')[1:] for line in main.splitlines()
          if line.startswith('| ') and not line.startswith('| student')}
  labels = ['teacher', 'full fine-tuning', 'LoRA r=8, every projection',
            'bottleneck adapters, width 32', 'prefix tuning, 16 positions',
            'QAT int8, per channel', 'QAT int4, groups of 32', 'QLoRA: LoRA r=8 on an int4 base (groups of 32)',
            'PTQ int8 (RTN, per channel)', 'PTQ int4 (RTN, groups of 32)',
            'GPTQ int4 (groups of 32)', 'PTQ int8, embedding tables too (per row)',
            'PTQ int4 (groups of 32) + int8 embedding tables']
  assert list(rows) == labels
  assert "the teacher's layers 0, 3 and" in text  # the caption names the overridden layers
  # One timing of the teacher and one of the students' architecture, as the table is written:
  # the printed ratio is the students' speed over the teacher's.
  speed = re.findall(r'^\| ([^|]+) \| (.*) \|$', speed, re.M)[1:]  # (past the header)
  assert [name for name, _ in speed] == [
      'teacher', "every other student (the teacher's layers 0, 3)",
      'bottleneck adapters, width 32 (same layers)', 'prefix tuning, 16 positions (same layers)']
  teacher = [float(c) for c in speed[0][1].split(' | ')]
  for _, cells in speed[1:]:
    for cell, t in zip(cells.split(' | '), teacher, strict=True):
      s, ratio = re.fullmatch(r'(\d+) \(([\d.]+)×\)', cell).groups()
      assert float(ratio) == pytest.approx(float(s) / t, rel=0.02, abs=0.01)
  for label in labels[1:]:
    float(rows[label][0])  # a Spearman in every row
  with open(workdir / 'seed_0' / 'full' / 'results.json') as f:
    full = json.load(f)['student']
  assert full['trainable_params'] == full['params']
  with open(workdir / 'seed_0' / 'post.json') as f:
    post = json.load(f)
  sizes = {r: json.load(open(workdir / 'seed_0' / r / 'size.json'))['stored_bytes']
           for r in ('full', 'lora', 'adapter', 'prefix', 'qat8', 'qat4', 'qlora')}
  sizes.update({r: post[r]['stored_bytes'] for r in ('ptq8', 'ptq4', 'gptq4', 'ptq8_emb',
                                                      'ptq4_emb8')})
  assert sizes['full'] == sizes['lora'] == 4 * full['params']  # float32, LoRA merged
  for method in ('adapter', 'prefix'):  # float32, the base plus the PEFT params
    shapes = PEFT_SHAPES[method](minilm_sts.PEFT_SIZES[method]).values()
    extra = sum(int(np.prod(s)) for s in shapes)
    assert sizes[method] == sizes['full'] + 4 * extra
  # The projections: 2 layers of 4 [H, H] + [H, I] + [I, H] kernels, H*H*4 + 2*H*I scalars.
  proj = len(KEEP) * (4 * H * H + 2 * H * I)
  assert 0 < sizes['full'] - sizes['ptq8'] <= 3 * proj  # 4 bytes -> 1 byte (+ scales)
  assert sizes['ptq4'] == sizes['gptq4'] == sizes['qat4'] < sizes['ptq8'] == sizes['qat8']
  assert sizes['qlora'] == sizes['qat4'] + 4 * len(KEEP) * (
      4 * RANK * (H + H) + RANK * (H + I) + RANK * (I + H))
  assert all(post[r]['trainable_params'] == 0 for r in post)
  # Embedding tables per row in int8: 4 bytes -> 1 byte a value, plus a float16 scale a row.
  tables = [v for k, v in _flat(kd.hf.load(str(workdir / 'seed_0' / 'full' / 'hf')).params).items()
            if k.endswith('/embedding')]
  rows_, values = sum(t.shape[0] for t in tables), sum(t.size for t in tables)
  for plain, emb in (('ptq8', 'ptq8_emb'), ('ptq4', 'ptq4_emb8')):
    saved = sizes[plain] - sizes[emb]
    assert abs(saved - (3 * values - 2 * rows_)) < 1024, (plain, saved, values, rows_)


def test_a_later_seed_joins_the_table_through_prior(experiment, teacher_dir, tmp_path):
  """The runs file beside the table holds each row's seed-0 result; a run of seed 1 alone (here
  with nothing finished for it) with --prior rebuilds the same rows from it (the speeds below
  them are timed again)."""
  workdir, out = experiment
  runs = json.loads((out / 'compressed_minilm.runs.json').read_text())
  assert list(runs) == ['0']
  with open(workdir / 'seed_0' / 'full' / 'results.json') as f:
    assert runs['0']['full']['spearman'] == json.load(f)['student']['spearman']
  with open(workdir / 'seed_0' / 'post.json') as f:
    assert runs['0']['gptq4'] == json.load(f)['gptq4']
  cmd = _command(workdir.parent, teacher_dir, '--seeds=1', '--collect_only',
                 f'--prior={out / "compressed_minilm.runs.json"}', f'--out={tmp_path}')
  subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)
  # The same rows; the speeds below them are timed anew by every write.
  again, before = [(d / 'compressed_minilm.md').read_text().split('\n\nEncode speed')
                   for d in (tmp_path, out)]
  assert len(again) == len(before) == 2 and again[0] == before[0]
  assert json.loads((tmp_path / 'compressed_minilm.runs.json').read_text()) == runs
