"""Parallel plans: the sharding rules, the config checks, pmap and mesh against one device (8
simulated CPU devices, in a subprocess), and a real 2-process run over loopback, killed,
preempted and resumed, against a one-process run of the same global batches."""

import importlib.util
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import portpicker
import pytest
from jax.sharding import PartitionSpec as P

from conftest import FAST_COMPILE
from kd import parallel
from kd.train import config_check

ROOT = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT_S = 900  # (a loaded 2-core machine runs these several times slower)


# Every subprocess compiles with conftest's cheap settings (FAST_COMPILE, not a user's
# XLA_FLAGS); the scripts add their device count, kd.main gets one device per process.


def _env(**extra):
  # KD_XLA_DEFAULTS=0: YNNPACK's dots (kd.xla_flags) split their work by the process's thread
  # pool, so one process of 8 devices and two of 4 round alike only with XLA's own dots.
  return dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=FAST_COMPILE, KD_XLA_DEFAULTS='0',
              **extra)


def _tiny_config():
  spec = importlib.util.spec_from_file_location('c', ROOT / 'configs/shakespeare/distill.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config('tiny')


def _key(*names):
  return tuple(jax.tree_util.DictKey(n) for n in names)


# --- rules and config checks, in this process ---------------------------------------------------

def test_fsdp_splits_the_largest_divisible_axis():
  spec = lambda shape, fsdp: parallel.partition_spec(_key('proj', '0', 'kernel'), shape, fsdp=fsdp)
  assert spec((16, 32), 4) == P(None, 'fsdp')
  assert spec((32, 30), 4) == P('fsdp', None)  # 30 % 4: the next largest axis
  assert spec((6, 10), 4) == P(None, None)  # nothing divides: replicated, not an error
  assert spec((16, 16), 4) == P('fsdp', None)  # ties: the first axis
  assert spec((32,), 4) == P(None)  # vectors stay whole
  assert parallel.partition_spec(_key('w'), (8, 16), fsdp=8,
                                 fsdp_axes=('data', 'fsdp')) == P(None, ('data', 'fsdp'))


def test_tensor_rules_split_heads_mlp_hidden_and_vocab_by_name():
  spec = lambda owner, shape: parallel.partition_spec(
      _key('layers_0', 'attn', owner, 'kernel'), shape, tensor=2, fsdp=2)
  assert spec('q_proj', (16, 32)) == P('fsdp', 'tensor')  # column parallel: heads
  assert spec('up_proj', (16, 64)) == P('fsdp', 'tensor')  # MLP hidden
  assert spec('o_proj', (32, 16)) == P('tensor', 'fsdp')  # row parallel
  assert spec('down_proj', (64, 16)) == P('tensor', 'fsdp')
  assert spec('lm_head', (16, 61)) == P('fsdp', None)  # vocab 61 % 2: not split over tensor
  assert parallel.partition_spec(_key('embed', 'embedding'), (64, 16), tensor=2) == P('tensor',
                                                                                       None)
  # Optimizer moments carry the param's path as a suffix, so they follow it.
  mu = (jax.tree_util.GetAttrKey('mu'),) + _key('student', 'layers_0', 'attn', 'q_proj', 'kernel')
  assert parallel.partition_spec(mu, (16, 32), tensor=2, fsdp=2) == P('fsdp', 'tensor')


def test_stacked_layers_keep_their_layer_axis_whole():
  """A scanned decoder's leaves ([L, ...] under `layers`) get the per-layer rule on the rest."""
  spec = lambda owner, shape: parallel.partition_spec(
      _key('layers', 'attn', owner, 'kernel'), shape, tensor=2, fsdp=2)
  assert spec('q_proj', (4, 16, 32)) == P(None, 'fsdp', 'tensor')
  assert spec('o_proj', (4, 32, 16)) == P(None, 'tensor', 'fsdp')
  assert parallel.partition_spec(_key('layers', 'input_norm', 'scale'), (4, 16),
                                 fsdp=4) == P(None, None)  # stacked vectors stay whole
  mu = (jax.tree_util.GetAttrKey('mu'),) + _key('student', 'layers', 'mlp', 'down_proj', 'kernel')
  assert parallel.partition_spec(mu, (4, 64, 16), tensor=2, fsdp=2) == P(None, 'tensor', 'fsdp')
  # A tuple of per-layer entries (an unstacked KV cache) is not a layer axis.
  assert parallel.partition_spec(_key('layers', '0', 'k'), (4, 16), fsdp=4) == P(None, 'fsdp')


def test_data_parallel_size_follows_the_mode():
  assert parallel.data_parallel_size(None, devices=8) == 1
  assert parallel.data_parallel_size({'mode': 'single'}, devices=8) == 1
  assert parallel.data_parallel_size({'mode': 'pmap'}, devices=8) == 8
  assert parallel.data_parallel_size({'mode': 'mesh', 'data': -1, 'fsdp': 2, 'tensor': 2},
                                     devices=8) == 4
  assert parallel.data_parallel_size({'mode': 'mesh', 'data': 8}, devices=8) == 8
  with pytest.raises(ValueError, match="valid: \\['mesh', 'pmap', 'single'\\]"):
    parallel.data_parallel_size({'mode': 'dp'})
  with pytest.raises(ValueError, match='uses 6 devices but there are 8'):
    parallel.data_parallel_size({'mode': 'mesh', 'data': 3, 'fsdp': 2}, devices=8)
  with pytest.raises(ValueError, match="valid mesh axes"):
    parallel.data_parallel_size({'mode': 'mesh', 'teacher_fsdp': 'data,model'}, devices=8)


@pytest.mark.parametrize('edit, message', [
    (lambda c: c.parallel.update(mode='dp'), "config.parallel.mode='dp': use one of"),
    (lambda c: c.parallel.update(mode='mesh', data=2), 'uses 2 devices but there are 1'),
    (lambda c: c.update({'data': {'batch_size': 6}, 'train': {'accum_steps': 4}}),
     r"not divisible by devices \(1, data parallel in parallel.mode='single'\)"),
])
def test_config_check_refuses_a_bad_parallel_config(edit, message):
  config = _tiny_config()
  with config.unlocked():
    edit(config)
  with pytest.raises(config_check.ConfigError, match=message):
    config_check.check(config)


def test_on_policy_run_generates_on_a_pmap_state(tmp_path):
  """GKD with every batch generated, under pmap on 2 devices: the student samples with its
  replicated params (one device's generate would reject their leading device axis)."""
  workdir = tmp_path / 'w'
  env = _env()
  env['XLA_FLAGS'] += ' --xla_force_host_platform_device_count=2'
  cmd = [sys.executable, '-m', 'kd.main', '--config=configs/shakespeare/gkd.py:tiny,fraction=1.0',
         f'--workdir={workdir}', '--config.parallel.mode=pmap',
         '--config.baseline=False', '--config.train.progress=False']
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
  assert out.returncode == 0, out.stderr[-3000:]
  kd = json.loads((workdir / 'results.json').read_text())['student_kd']
  steps = _tiny_config().train.steps
  assert kd['generated_batches'] == steps and kd['generated_tokens'] > 0
  assert np.isfinite(kd['perplexity'])


# --- 8 simulated devices, in a subprocess -------------------------------------------------------

def test_pmap_and_mesh_match_one_device_and_the_mesh_shards(tmp_path):
  env = _env(JAX_COMPILATION_CACHE_DIR=str(tmp_path / 'jax_cache'))  # the resumed fit reuses
  out = subprocess.run([sys.executable, 'tests/parallel_equivalence.py'], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=TIMEOUT_S)
  assert out.returncode == 0, out.stderr[-3000:]
  runs = json.loads(out.stdout)
  ref = runs.pop('single/accum2')
  shardings, init = runs.pop('shardings'), runs.pop('init')
  gen, lora, qteacher = runs.pop('generate'), runs.pop('lora'), runs.pop('quantized_teacher')
  splash = runs.pop('splash')
  scan = runs.pop('scan')
  # Stopped and resumed through loop.fit (unreplicated checkpoint, replicated on restore).
  assert runs.pop('pmap/fit_resumed')['same']
  assert set(runs) == {'pmap/accum1', 'pmap/accum2', 'mesh2x2x2/accum2', 'mesh8x1x1/accum1'}
  for name, r in runs.items():
    np.testing.assert_allclose(r['losses'], ref['losses'], rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(r['grad_norms'], ref['grad_norms'], rtol=1e-5, err_msg=name)
    assert r['param_err'] <= 1.0, (name, r['param_abs'])  # rtol 1e-4, atol 1e-6 on every param
    for k, v in r['eval'].items():  # eval (sum, count) are global sums, not device means
      np.testing.assert_allclose(v, ref['eval'][k], rtol=1e-5, err_msg=f'{name} eval {k}')
  assert runs['mesh2x2x2/accum2']['eval'], 'the mesh eval step did not run'

  state = shardings['state']
  q = 'student/params/layers_0/attn/q_proj/kernel'
  assert state[f'params/{q}'] == ["P('fsdp', 'tensor')", False]
  assert state['params/student/params/layers_0/mlp/down_proj/kernel'] == ["P('tensor', 'fsdp')",
                                                                          False]
  moments = [v for k, v in state.items() if k.startswith('opt_state/') and k.endswith(q)]
  assert moments and all(m == state[f'params/{q}'] for m in moments), moments  # follow the param
  assert state['params/student/params/final_norm/scale'][1], 'vectors stay replicated'
  assert state['step'][1]
  teacher = shardings['teacher']  # teacher_fsdp=('data', 'fsdp'): split over 4 devices too
  assert teacher['params/layers_1/attn/q_proj/kernel'] == ["P(('data', 'fsdp'), 'tensor')", False]
  assert teacher['params/embed/embedding'] == ["P(None, ('data', 'fsdp'))", False]
  assert init['same_shardings'] and init['err'] < 1e-6, init  # init sharded at birth

  # Scanned layers (params stacked, one [L, ...] leaf per weight): the same trajectory on the
  # mesh, the layer axis whole and the rest split by the same rules.
  np.testing.assert_allclose(scan['losses'], ref['losses'], rtol=1e-5)
  assert scan['param_abs'] < 1e-5, scan['param_abs']
  assert scan['student_q'] == "P(None, 'fsdp', 'tensor')", scan
  assert scan['teacher_q'] == "P(None, ('data', 'fsdp'), 'tensor')", scan

  # Generation: each device decodes its rows. The mesh samples equal one device's (the same key
  # gives the same random bits however the batch is split); pmap samples device i's rows with
  # key split(key, 8)[i], so they equal those rows decoded alone with that key.
  single = gen['single']
  assert len(single['sampled']) == 16 and len(single['sampled'][0]) == 8
  assert single['sampled'] != single['greedy']
  for name in ('mesh2x2x2', 'mesh8x1x1', 'pmap'):
    assert gen[name]['greedy'] == single['greedy'], name
  assert gen['mesh2x2x2']['sampled'] == single['sampled']
  assert gen['mesh8x1x1']['sampled'] == single['sampled']
  assert gen['pmap']['sampled'] == gen['pmap_reference']

  # A LoRA student (frozen base in state.frozen): the adapters train alike under every plan.
  assert lora['single']['moved'] > 1e-3 and all(r['frozen_kept'] for r in lora.values())
  for name in ('pmap', 'mesh2x2x2'):
    np.testing.assert_allclose(lora[name]['losses'], lora['single']['losses'], rtol=1e-5)
    assert lora[name]['param_abs'] < 1e-5, (name, lora[name]['param_abs'])

  # An int8 teacher on qwix's matmuls, FSDP-split over ('data', 'fsdp') like a float teacher.
  assert qteacher.pop('mesh_up_proj') == ['int8', "P(None, ('data', 'fsdp'))"]
  for name in ('pmap', 'mesh2x2x2', 'w8a8/pmap', 'w8a8/mesh2x2x2'):
    np.testing.assert_allclose(qteacher[name], qteacher[name.replace(name.split('/')[-1],
                                                                     'single')], rtol=1e-5)
  assert qteacher['w8a8/single'] != qteacher['single']  # the inputs were rounded too

  # The splash kernel (Pallas, interpreted here): XLA's losses on one device, and on the mesh,
  # where it runs per shard under shard_map.
  for name in ('single', 'pmap', 'mesh2x2x2'):
    np.testing.assert_allclose(splash[name], splash['xla'], rtol=1e-5, err_msg=name)


# --- two processes over loopback ----------------------------------------------------------------

# The SIGTERM goes in once the checkpoint of one of the steps KILL_AT + 1..KILL_AT + 3 is on
# disk, when the run may be several steps further on (5 on a fast machine; the two processes then
# agree on a step within about 60 ms): the steps after it leave room, so the run stops midway
# rather than at its end.
STEPS, KILL_AT = 20, 2
# FSDP over the two processes: each holds and writes half of every param and moment.
OVERRIDES = {'train.steps': STEPS, 'teacher.steps': 3, 'train.checkpoint_every': 1,
             'train.keep': 3, 'baseline': False, 'parallel.mode': 'mesh', 'parallel.data': 1,
             'parallel.fsdp': 2, 'data.max_eval_batches': 1}


def _launch(workdir, logs):
  # The resumed run loads the killed run's compiled steps instead of compiling them again.
  env = _env(JAX_COMPILATION_CACHE_DIR=str(logs / 'jax_cache'))
  port = portpicker.pick_unused_port()
  procs = []
  for i in range(2):
    cmd = [sys.executable, '-m', 'kd.main', '--config=configs/shakespeare/distill.py:tiny',
           f'--workdir={workdir}', *[f'--config.{k}={v}' for k, v in OVERRIDES.items()],
           '--config.distributed=True', f'--config.parallel.coordinator_address=127.0.0.1:{port}',
           '--config.parallel.num_processes=2', f'--config.parallel.process_id={i}']
    with open(logs / f'process{i}.log', 'ab') as log:  # the child keeps its own handle
      procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=log))
  return procs


def _wait(procs, logs):
  deadline = time.time() + TIMEOUT_S
  for i, p in enumerate(procs):
    p.wait(timeout=max(1, deadline - time.time()))
    assert p.returncode == 0, (logs / f'process{i}.log').read_text()[-3000:]


def _params(workdir, stage):
  ckpts = pathlib.Path(workdir) / stage / 'checkpoints'
  path = ckpts / str(max(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())) / 'state'
  ckptr = ocp.PyTreeCheckpointer()  # as numpy: the saved shardings name the run's devices
  tree = ckptr.metadata(path).item_metadata.tree
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))['params']


def _signal_after(procs, marker, signum, *, to=None):
  """Sends `signum` to `to` (default: every one of `procs`) once `marker` exists."""
  deadline = time.time() + TIMEOUT_S
  while not marker.exists() and all(p.poll() is None for p in procs):
    assert time.time() < deadline, 'no checkpoint in time'
    time.sleep(0.01)
  for p in to or procs:
    p.send_signal(signum)
  for p in procs:
    p.wait(timeout=TIMEOUT_S)


def test_two_processes_killed_then_preempted_resume_and_match_one_process(tmp_path):
  """SIGKILL of both processes at a checkpoint; the resumed run then gets SIGTERM on process 1
  alone, and both processes agree (JAX's preemption sync) on one step to save and exit 75; the
  third launch ends bitwise where one process does."""
  multi, single = tmp_path / 'two_hosts', tmp_path / 'one_host'
  ckpts = multi / 'student_kd' / 'checkpoints'
  procs = []
  try:
    with open(tmp_path / 'reference.log', 'ab') as log:  # the reference runs meanwhile
      reference = subprocess.Popen(
          [sys.executable, 'tests/multihost_reference.py', str(single), json.dumps(OVERRIDES)],
          cwd=ROOT, env=_env(), stdout=log, stderr=log)
    procs.append(reference)

    killed = _launch(multi, tmp_path)
    procs += killed
    _signal_after(killed, ckpts / str(KILL_AT), signal.SIGKILL)
    assert (ckpts / str(KILL_AT)).exists(), (tmp_path / 'process0.log').read_text()[-3000:]
    assert not (ckpts / str(STEPS)).exists(), 'killed too late'
    data_files = sorted(p.name for p in (ckpts / str(KILL_AT) / 'data').iterdir()
                        if p.suffix == '.json')
    assert data_files == ['process_0-of-2.json', 'process_1-of-2.json']

    termed = _launch(multi, tmp_path)
    procs += termed
    term_after = random.Random(os.getpid()).randint(KILL_AT + 1, KILL_AT + 3)  # a random step
    _signal_after(termed, ckpts / str(term_after), signal.SIGTERM, to=termed[1:])
    saved = max(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
    for i, p in enumerate(termed):
      assert p.returncode == 75, (f'SIGTERM after step {term_after}, last checkpoint {saved}\n'
                                  + (tmp_path / f'process{i}.log').read_text()[-3000:])
    assert 'preempted: the checkpoint of step' in (tmp_path / 'process0.log').read_text()
    assert term_after <= saved < STEPS, saved

    resumed = _launch(multi, tmp_path)
    procs += resumed
    _wait(resumed, tmp_path)
    reference.wait(timeout=TIMEOUT_S)
    assert reference.returncode == 0, (tmp_path / 'reference.log').read_text()[-3000:]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()

  for stage in ('teacher', 'student_kd'):
    a, b = jax.tree.leaves(_params(multi, stage)), jax.tree.leaves(_params(single, stage))
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):  # the same SPMD program per device, so the same bits
      np.testing.assert_array_equal(x, y, err_msg=stage)
  r_multi = json.loads((multi / 'results.json').read_text())
  r_single = json.loads((single / 'results.json').read_text())
  for stage in ('teacher', 'student_kd'):
    np.testing.assert_allclose(r_multi[stage]['ce'], r_single[stage]['ce'], rtol=1e-5)


# --- sampling across two processes --------------------------------------------------------------

def _two(cmd_of, logs):
  """Starts cmd_of(i, port) for processes 0 and 1 and waits for both."""
  port = portpicker.pick_unused_port()
  procs = []
  try:
    for i in range(2):
      with open(logs / f'process{i}.log', 'ab') as log:
        procs.append(subprocess.Popen(cmd_of(i, port), cwd=ROOT, env=_env(), stdout=log,
                                      stderr=log))
    _wait(procs, logs)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()


def test_two_processes_sample_their_rows_of_one_generation(tmp_path):
  """A mesh over 2 processes (params FSDP-split across them): each process's rows are those of
  one process generating the global prompts with the same key, greedy and sampled; the teacher's
  NLL of the student's greedy answers (kd.eval.generation) is one process's too."""
  from kd.eval import generation  # pylint: disable=g-import-not-at-top
  from kd import models  # pylint: disable=g-import-not-at-top
  from kd.models import sample  # pylint: disable=g-import-not-at-top
  _two(lambda i, port: [sys.executable, 'tests/multihost_generate.py', str(i), str(port),
                        str(tmp_path)], tmp_path)
  spec = importlib.util.spec_from_file_location('mh', ROOT / 'tests' / 'multihost_generate.py')
  mh = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mh)
  got = [json.loads((tmp_path / f'process_{i}.json').read_text()) for i in range(2)]
  assert got[0]['fsdp_split'] and got[1]['fsdp_split']
  params = models.init_params(mh.CFG, jax.random.key(0))
  module = models.Decoder(mh.CFG)
  ids, mask = mh.prompts()
  for name, kw in mh.kinds().items():
    ref = sample.generate((module, params), ids, mask,
                          max_new_tokens=mh.NEW, **kw)
    assert got[0][name] + got[1][name] == np.asarray(ref).tolist(), name
  ref = generation.teacher_nll_of_samples(module, params, module, mh.teacher_params(),
                                          [mh.dialogue_batch()])
  assert ref['sample_tokens'] > 0
  for g in got:
    assert g['teacher_nll'].keys() == ref.keys()
    for k, v in ref.items():
      np.testing.assert_allclose(g['teacher_nll'][k], v, rtol=1e-5, err_msg=k)


def test_two_processes_train_adaptive_off_policy(tmp_path):
  """DistiLLM's adaptive off-policy across 2 processes: every batch is the student's samples
  (p0 = 1), generated or replayed from each process's own buffer, saved per process."""
  workdir = tmp_path / 'w'
  settings = {'baseline': False, 'train.progress': False, 'parallel.mode': 'mesh',
              'parallel.data': 1, 'parallel.fsdp': 2, 'on_policy.adaptive.p0': 1.0,
              'on_policy.adaptive.fill_first': False, 'on_policy.adaptive.replay_fraction': 0.5,
              'on_policy.adaptive.replay_schedule': 'constant', 'train.checkpoint_every': 2,
              'data.max_eval_batches': 1, 'data.sample_eval_batches': 0}
  _two(lambda i, port: [
      sys.executable, '-m', 'kd.main', '--config=configs/shakespeare/distillm.py:tiny',
      f'--workdir={workdir}', *[f'--config.{k}={v}' for k, v in settings.items()],
      '--config.distributed=True', f'--config.parallel.coordinator_address=127.0.0.1:{port}',
      '--config.parallel.num_processes=2', f'--config.parallel.process_id={i}'], tmp_path)
  kd = json.loads((workdir / 'results.json').read_text())['student_kd']
  steps = _tiny_config().train.steps
  assert kd['generated_batches'] > 0 and kd['data_batches'] == 0
  assert kd['generated_batches'] + kd['replayed_batches'] == steps
  saved = workdir / 'student_kd' / 'batch_fn'
  buffers = [np.load(saved / f'{steps}.process_{i}-of-2.npz') for i in range(2)]
  rows = [b['/buffer/arrays/input_ids'] for b in buffers]
  assert rows[0].shape == rows[1].shape and rows[0].shape[0] > 0
  assert not np.array_equal(rows[0], rows[1])  # each process keeps its own rows
