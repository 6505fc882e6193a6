"""Runs the tiny decoder through every parallel plan on 8 simulated CPU devices; prints JSON.

Started by tests/test_parallel.py in its own process, because the device count is fixed when
JAX starts. Every plan trains 5 steps on the same fixed ragged batches from the same state;
the output holds each run's losses, its params' largest deviation from the one-device run, eval
sums, the shardings the mesh plan gave, and a pmap run through `loop.fit` stopped after 3 steps
and resumed from its checkpoint.
"""

import dataclasses
import functools
import json
import os
import sys
import tempfile

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')
                           + ' --xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import ml_collections  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import optax  # pylint: disable=g-import-not-at-top,wrong-import-position

from kd import models  # pylint: disable=g-import-not-at-top,wrong-import-position
from kd import parallel  # pylint: disable=g-import-not-at-top,wrong-import-position
from kd import peft  # pylint: disable=g-import-not-at-top,wrong-import-position
from kd.train import build  # pylint: disable=g-import-not-at-top,wrong-import-position
from kd.train import compress  # pylint: disable=g-import-not-at-top,wrong-import-position
from kd.train import loop  # pylint: disable=g-import-not-at-top,wrong-import-position
from kd.train import step as step_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

V, B, T, STEPS = 61, 16, 16, 5
LOSSES = {'ce': 0.5, 'kl': 0.5, 'hidden_mse': 0.2}


def _config(accum, chunk_size=0):
  c = ml_collections.ConfigDict()
  c.losses = dict(LOSSES)
  c.loss_kwargs = {}
  c.temperature = 2.0
  c.chunk_size = chunk_size  # > 0: the fused chunked logit path (its psum'd coefficients)
  c.features = {'layer_map': 'uniform', 'pairs': ()}
  # SGD with momentum, not Adam: Adam's g/sqrt(v) blows float noise in near-zero gradients up
  # to lr-sized steps, which would hide a real mismatch behind a loose tolerance.
  c.optimizer = {'name': 'sgd', 'lr': 0.5, 'momentum': 0.9, 'warmup_steps': 0,
                 'schedule': 'constant'}
  c.train = {'accum_steps': accum}
  return c


def _batch(seed):
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, V, size=(B, T + 1)).astype(np.int32)
  lengths = rng.integers(2, T + 1, size=B)  # ragged: every device and micro-batch counts differ
  seg = (np.arange(T)[None] < lengths[:, None]).astype(np.int32)
  mask = (np.arange(T)[None] < lengths[:, None] - 1).astype(np.float32)
  return {'input_ids': ids[:, :-1], 'labels': ids[:, 1:], 'loss_mask': mask,
          'segment_ids': seg, 'positions': np.broadcast_to(np.arange(T), (B, T)).astype(np.int32)}


class ListIterator:
  """Fixed batches in order, checkpointable by orbax like a grain iterator (bytes state)."""

  def __init__(self, batches):
    self.batches, self.i = batches, 0

  def __next__(self):
    self.i += 1
    return self.batches[(self.i - 1) % len(self.batches)]

  def get_state(self) -> bytes:
    return str(self.i).encode()

  def set_state(self, state: bytes) -> None:
    self.i = int(state)

  def start_prefetch(self) -> None:
    pass


def _step(spec):
  return functools.partial(step_lib.train_step, spec=spec)


def _path(path):
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path)


def main():
  teacher = build.build_model(dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                   intermediate_size=64), V)
  student = build.build_model(dict(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                                   intermediate_size=32), V)
  teacher_params = models.init_params(teacher.config, jax.random.key(1))
  batches = [_batch(i) for i in range(STEPS)]
  # Keyed by (accum_steps, chunk_size); chunk_size 6 (T=16: one chunk padded) takes the fused
  # chunked logit losses, whose weights need the psum'd token count under pmap.
  specs = {(a, c): build.make_spec(_config(a, c), student, teacher, LOSSES, 10)
           for a in (1, 2) for c in (0, 6)}
  init = lambda: step_lib.create_state(build.init_student(specs[1, 0], 0), specs[1, 0].tx, 0)
  state0 = jax.device_get(init())  # on the host: every plan starts from the same values

  def train(plan, key, evaluate=True):
    state = plan.place_state(jax.tree.map(np.copy, state0))  # the step donates it
    tp = plan.place_teacher(teacher_params)
    fn = plan.train_step(_step(specs[key]), state)
    losses, grad_norms = [], []
    for b in batches:
      state, m = fn(state, tp, b)
      losses.append(float(m['loss']))
      grad_norms.append(float(m['grad_norm']))
    sums = {}
    if evaluate:
      sums = jax.device_get(plan.eval_step(functools.partial(step_lib.eval_step, spec=specs[key]))(state.params, tp, batches[0]))
    return state, tp, (losses, grad_norms), jax.device_get(plan.unreplicate(state).params), sums

  # One reference: accumulation and chunking are exact, so every run must match one device
  # with accum 2 and plain (unchunked) logits.
  _, _, losses, ref, sums = train(parallel.SinglePlan(), (2, 0))
  out = {'single/accum2': dict(losses=losses[0], grad_norms=losses[1], param_err=0.0,
                               eval={k: list(map(float, v)) for k, v in sums.items()})}
  runs = [('pmap', parallel.PmapPlan(), (1, 6), False),
          ('pmap', parallel.PmapPlan(), (2, 0), True),
          ('mesh2x2x2', parallel.MeshPlan(parallel.make_mesh(2, 2, 2), ('data', 'fsdp')), (2, 6),
           True),
          ('mesh8x1x1', parallel.MeshPlan(parallel.make_mesh(8, 1, 1)), (1, 0), False)]
  for name, plan, (accum, chunk), evaluate in runs:
    state, tp, losses, params, sums = train(plan, (accum, chunk), evaluate)
    # |a - b| <= atol + rtol * |b| holds for every element iff err <= 1 (atol 1e-6, rtol 1e-4).
    err = max(float(np.max(np.abs(a - b) / (1e-6 + 1e-4 * np.abs(b))))
              for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref)))
    out[f'{name}/accum{accum}'] = dict(
        losses=losses[0], grad_norms=losses[1], param_err=err,
        param_abs=max(float(np.max(np.abs(a - b))) for a, b in
                      zip(jax.tree.leaves(params), jax.tree.leaves(ref))),
        eval={k: list(map(float, v)) for k, v in sums.items()})
    if name == 'mesh2x2x2':
      out['shardings'] = {
          'state': {_path(p): [str(x.sharding.spec), x.sharding.is_fully_replicated]
                    for p, x in jax.tree_util.tree_leaves_with_path(state)},
          'teacher': {_path(p): [str(x.sharding.spec), x.sharding.is_fully_replicated]
                      for p, x in jax.tree_util.tree_leaves_with_path(tp)}}
      born = plan.init_state(init)  # sharded at birth: same values as the host init
      out['init'] = dict(
          err=max(float(np.max(np.abs(np.asarray(a) - b)))
                  for a, b in zip(jax.tree.leaves(born), jax.tree.leaves(state0))),
          same_shardings=all(
              a.sharding == b.sharding for a, b in
              zip(jax.tree.leaves(born), jax.tree.leaves(plan.place_state(state0)))))
    if name == 'pmap' and accum == 1:
      # Through the loop: 3 steps with a checkpoint each, then a new run that resumes to STEPS.
      with tempfile.TemporaryDirectory() as workdir:
        for steps in (3, STEPS):
          state, _ = loop.fit(
              specs[accum, chunk], plan.place_state(jax.tree.map(np.copy, state0)),
              plan.place_teacher(teacher_params), ListIterator(batches), [batches[0]],
              workdir=workdir, total_steps=steps, log_every=1, checkpoint_every=1,
              progress=False, plan=plan)
      resumed = jax.device_get(plan.unreplicate(state).params)
      out['pmap/fit_resumed'] = dict(same=all(
          np.array_equal(a, b) for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(params))))
  out['scan'] = scan_run(student, teacher, teacher_params, state0, batches, ref)
  out['generate'] = generation(student, state0.params['student'])
  out['lora'] = lora_runs(student, teacher, teacher_params, batches)
  out['quantized_teacher'] = quantized_teacher_runs(student, teacher, teacher_params, batches)
  out['splash'] = splash_runs(student, teacher, teacher_params)
  json.dump(out, sys.stdout)


def scan_run(student, teacher, teacher_params, state0, batches, ref):
  """Student and teacher with scan_layers (params stacked from the same values) on the 2x2x2
  mesh with accum 2 and chunked logits: losses, params' deviation (unstacked) from the
  one-device reference, and the shardings of a stacked kernel."""
  scanned = lambda m: type(m)(dataclasses.replace(m.config, scan_layers=True, remat=True))
  s_student, s_teacher = scanned(student), scanned(teacher)
  spec = build.make_spec(_config(2, 6), s_student, s_teacher, LOSSES, 10)
  params = dict(state0.params, student=models.stack_layers(state0.params['student']))
  state = step_lib.create_state(params, spec.tx, 0)  # (SGD momentum starts at 0, as in state0)
  plan = parallel.MeshPlan(parallel.make_mesh(2, 2, 2), ('data', 'fsdp'))
  state = plan.place_state(jax.device_get(state))
  tp = plan.place_teacher(models.stack_layers(teacher_params))
  fn = plan.train_step(_step(spec), state)
  losses = []
  for b in batches:
    state, m = fn(state, tp, b)
    losses.append(float(m['loss']))
  got = jax.device_get(state.params)
  got = dict(got, student=models.unstack_layers(got['student']))
  kernel = lambda tree: tree['params']['layers']['attn']['q_proj']['kernel']
  return dict(losses=losses, param_abs=max(float(np.max(np.abs(a - b))) for a, b in zip(
      jax.tree.leaves(got), jax.tree.leaves(ref))),
              student_q=str(kernel(state.params['student']).sharding.spec),
              teacher_q=str(kernel(tp).sharding.spec))


def splash_runs(student, teacher, teacher_params):
  """Student and teacher on the splash kernel (attention_impl='splash', Pallas interpret mode
  on the CPU) at T = 128 with ragged right padding (the kernel's segment ids): 2 steps' losses
  on one device with XLA's attention, on one device with splash, under pmap (each device's
  own call), and on the 2x2x2 mesh, where
  the kernel runs per shard (shard_map: the batch and its segment ids over ('data', 'fsdp'),
  the teacher's 2 KV heads over 'tensor')."""
  t = 128
  rng = np.random.default_rng(9)
  batches = []
  for _ in range(2):
    ids = rng.integers(3, V, size=(B, t + 1)).astype(np.int32)
    real = np.arange(t)[None] < rng.integers(64, t + 1, size=B)[:, None]  # right padding
    batches.append({'input_ids': ids[:, :-1], 'labels': ids[:, 1:],
                    'attention_mask': real.astype(np.int32), 'loss_mask': real.astype(np.float32)})
  with_impl = lambda m, impl: type(m)(dataclasses.replace(m.config, attention_impl=impl,
                                                          max_seq_len=t))
  got = {}
  for name, impl, plan in (('xla', 'xla', parallel.SinglePlan()),
                           ('single', 'splash', parallel.SinglePlan()),
                           ('pmap', 'splash', parallel.PmapPlan()),
                           ('mesh2x2x2', 'splash', parallel.MeshPlan(parallel.make_mesh(2, 2, 2),
                                                                     ('data', 'fsdp')))):
    spec = build.make_spec(_config(1), with_impl(student, impl), with_impl(teacher, impl),
                           LOSSES, 10)
    state = plan.place_state(jax.device_get(
        step_lib.create_state(build.init_student(spec, 0), spec.tx, 0)))
    tp, fn = plan.place_teacher(teacher_params), plan.train_step(_step(spec), state)
    losses = []
    for b in batches:
      state, m = fn(state, tp, b)
      losses.append(float(m['loss']))
    got[name] = losses
  return got


def lora_runs(student, teacher, teacher_params, batches):
  """A LoRA student (adapters trained, base frozen in state.frozen) through each plan: losses
  and the trained adapters' largest deviation from one device's."""
  lcfg = peft.LoraConfig(target=r'.*/(q_proj|v_proj|up_proj)', rank=2, alpha=4.0)
  model = peft.lora_model(student, lcfg)
  base = models.init_params(student.config, jax.random.key(5))
  lora = peft.init_lora(model, base, jax.random.key(6), lcfg)
  # B starts at zero; a random B makes A's gradient non-zero from the first step.
  lora = jax.tree_util.tree_map_with_path(
      lambda p, x: 0.1 * jax.random.normal(jax.random.key(len(str(p))), x.shape)
      if str(p[-1]).endswith("_lora_b']") else x, lora)
  spec = build.make_spec(_config(1), model, teacher, LOSSES, 10)
  state0 = jax.device_get(step_lib.create_state(build.init_student(spec, 0, lora), spec.tx, 0,
                                                frozen=base))
  got, ref = {}, None
  for name, plan in (('single', parallel.SinglePlan()), ('pmap', parallel.PmapPlan()),
                     ('mesh2x2x2', parallel.MeshPlan(parallel.make_mesh(2, 2, 2)))):
    state = plan.place_state(jax.tree.map(np.copy, state0))
    tp = plan.place_teacher(teacher_params)
    fn = plan.train_step(_step(spec), state)
    losses = []
    for b in batches:
      state, m = fn(state, tp, b)
      losses.append(float(m['loss']))
    params = jax.device_get(plan.unreplicate(state.params)['student'])
    ref = params if ref is None else ref
    got[name] = dict(losses=losses, param_abs=max(
        float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(params),
                                                     jax.tree.leaves(ref))),
                     moved=max(float(np.max(np.abs(a - b))) for a, b in zip(
                         jax.tree.leaves(params), jax.tree.leaves(state0.params['student']))),
                     frozen_kept=all(np.array_equal(a, b) for a, b in zip(
                         jax.tree.leaves(jax.device_get(plan.unreplicate(state.frozen))),
                         jax.tree.leaves(base))))
  return got


def quantized_teacher_runs(student, teacher, teacher_params, batches):
  """An int8 teacher (config.teacher.quant, on qwix's matmuls) FSDP-sharded like a float one:
  each plan's losses, weight-only and W8A8 (act_bits=8, 'w8a8/' names), and the mesh's
  sharding of one int-valued kernel."""
  got = {}
  for act_bits, group, prefix in ((0, 16, ''), (8, 0, 'w8a8/')):
    cfg = ml_collections.ConfigDict({'teacher': {'quant': {
        'bits': 8, 'group_size': group, 'act_bits': act_bits, 'target': r'.*_proj|lm_head'}}})
    model, qparams = compress.quantized_teacher(compress.read(cfg), teacher, teacher_params)
    spec = dataclasses.replace(build.make_spec(_config(1), student, teacher, LOSSES, 10),
                               teacher=model)
    state0 = jax.device_get(step_lib.create_state(build.init_student(spec, 0), spec.tx, 0))
    for name, plan in (('single', parallel.SinglePlan()), ('pmap', parallel.PmapPlan()),
                       ('mesh2x2x2', parallel.MeshPlan(parallel.make_mesh(2, 2, 2),
                                                       ('data', 'fsdp')))):
      state, tp = plan.place_state(jax.tree.map(np.copy, state0)), plan.place_teacher(qparams)
      fn = plan.train_step(_step(spec), state)
      losses = []
      for b in batches:
        state, m = fn(state, tp, b)
        losses.append(float(m['loss']))
      got[prefix + name] = losses
      if name == 'mesh2x2x2' and not act_bits:
        q = tp['params']['layers_1']['mlp']['up_proj']['kernel'].array.qvalue
        got['mesh_up_proj'] = [str(q.dtype), str(q.sharding.spec)]
  return got


def generation(module, params):
  """Each plan's `generate` against one device: greedy and sampled tokens, as lists."""
  rng = np.random.default_rng(7)
  lengths = rng.integers(1, 7, size=B)  # left-padded prompts of 1..6 tokens
  mask = (np.arange(6)[None] >= 6 - lengths[:, None]).astype(np.int32)
  ids = np.where(mask, rng.integers(3, V, size=(B, 6)), 0).astype(np.int32)
  kw = dict(max_new_tokens=8, eos_id=7, pad_id=0)
  sampled = dict(temperature=1.0, top_k=20, top_p=0.9, rng=jax.random.key(11))
  mesh = parallel.MeshPlan(parallel.make_mesh(2, 2, 2), ('data', 'fsdp'))
  pmap = parallel.PmapPlan()
  got = {}
  for name, plan in (('single', parallel.SinglePlan()), ('mesh2x2x2', mesh),
                     ('mesh8x1x1', parallel.MeshPlan(parallel.make_mesh(8, 1, 1))),
                     ('pmap', pmap)):
    placed = plan.place_state(step_lib.create_state(
        {'student': jax.tree.map(np.copy, params)}, optax.sgd(0.1), 0)).params['student']
    got[name] = {k: np.asarray(plan.generate((module, placed), ids, mask, **kw, **extra)).tolist()
                 for k, extra in (('greedy', {'temperature': 0.0}), ('sampled', sampled))}
  # pmap's reference: device i's rows sampled alone on one device with key split(key, 8)[i].
  keys = jax.random.split(sampled['rng'], 8)
  rows = B // 8
  got['pmap_reference'] = np.concatenate([np.asarray(parallel.SinglePlan().generate(
      (module, params), ids[i * rows:(i + 1) * rows], mask[i * rows:(i + 1) * rows], **kw,
      **dict(sampled, rng=keys[i]))) for i in range(8)]).tolist()
  return got


if __name__ == '__main__':
  main()
