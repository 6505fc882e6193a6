r"""One KD train step at the shapes of ../shared/bench/peer_torch_kd.py: tokens/s, TFLOP/s, MFU, memory.

  .venv/bin/python experiments/bench_step.py --shape=1b-160m-32k [--chunk_size=512] [--steps=10]
  .venv/bin/python experiments/bench_step.py --shape=cpu-small --compare_chunked   # CPU: memory

Same objective as the peer: 0.5*CE + 0.5*T^2*KL(p_T || p_S), T=2, full vocabulary, AdamW, bf16
compute (teacher bf16 weights, student float32 master weights). Prints one JSON line per run
(`peer`-compatible keys) so a GPU session can run it beside the peer in one call and divide.
With --compare_chunked it runs the plain logit path, the chunked one with per-chunk remat and the
chunked fused one (gradient made in the forward pass), which on a CPU shows the memory the chunked
paths save (XLA's compiled temp bytes). experiments/bench_vs_peer.py runs it beside the peer.
--teacher_bits=8|4 runs the teacher quantized (config.teacher.quant: int values and scales on
qwix's matmuls, random values made on the device), for a teacher too big for its bf16 memory;
`teacher_bytes` and XLA's argument bytes show what it saves. --teacher_act_bits=8 (with
--teacher_bits=8) quantizes the inputs of those matmuls per token too, so they run int8 x int8
(W8A8), the rate of int8 tensor cores: a different teacher (numerically), for speed.
--compile_only makes no parameters: it compiles the step on abstract shapes and prints XLA's
memory analysis (argument, temp, output bytes) in seconds, so a setting can be sized before a
GPU is spent on it (with --teacher_bits too: the int values and scales as shapes). On a CPU the
attention is XLA's own, not cuDNN's, so its temp bytes are not a GPU's; compare settings with
each other there, not with a GPU's peak. Nor does XLA:CPU turn remat into saved memory: an
8-layer jax.checkpoint'd MLP compiles with the recomputation in it, yet to the same 704 MB of
temp as without it, and this step at 1b-160m-32k to 79 GB with remat and 78 GB without; so
remat settings cannot be compared on a CPU at all. The argument bytes (teacher,
student state, batch) follow from shapes and dtypes alone, and `residual_bytes` (every run, on
shapes) is what autodiff keeps from the student's forward for the backward pass
(kd.eval.speed.saved_residual_bytes): JAX's own count, the same on every backend, the memory
remat and its policy trade for recomputation. --xla_flag=--xla_... (repeatable) adds an XLA
flag for this run alone (reported as `xla_flags`), so bench_vs_peer's variants can compare
compiler settings side by side.
"""

import dataclasses
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app
from absl import flags

from kd import models
from kd import quant
from kd.eval import speed
from kd.train import build as build_lib
from kd.train import step as step_lib

# name: (teacher dims, student dims, batch, seq) -- the peer's shapes, plus a CPU-sized one.
SHAPES = {
    '1b-160m-32k': (dict(hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=32,
                         num_kv_heads=4, vocab_size=32000),
                    dict(hidden_size=768, intermediate_size=2048, num_layers=12, num_heads=12,
                         num_kv_heads=12, vocab_size=32000), 8, 2048),
    '1b-160m-152k': (dict(hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=32,
                          num_kv_heads=4, vocab_size=151936),
                     dict(hidden_size=768, intermediate_size=2048, num_layers=12, num_heads=12,
                          num_kv_heads=12, vocab_size=151936), 8, 2048),
    '8b-1b-128k': (dict(hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                        num_kv_heads=8, vocab_size=128256),
                   dict(hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
                        num_kv_heads=8, vocab_size=128256), 4, 2048),
    'cpu-small': (dict(hidden_size=256, intermediate_size=688, num_layers=4, num_heads=8,
                       num_kv_heads=4, vocab_size=32000),
                  dict(hidden_size=128, intermediate_size=344, num_layers=2, num_heads=4,
                       num_kv_heads=4, vocab_size=32000), 2, 512),
    'cpu-tiny': (dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, vocab_size=512),
                 dict(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                      num_kv_heads=2, vocab_size=512), 2, 64),  # tests
}

_SHAPE = flags.DEFINE_enum('shape', 'cpu-small', list(SHAPES), 'Model and batch shape.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps (after 3 warm-up steps).')
_CHUNK = flags.DEFINE_integer('chunk_size', 0, 'Logit-loss chunk over the sequence (0 = plain).')
_COMPARE = flags.DEFINE_bool(
    'compare_chunked', False, 'Run plain, chunked with remat, chunked fused (--chunk_size or 256).')
_FUSED = flags.DEFINE_bool('fused_chunks', True,
                           'Chunked logit losses: gradient made in the forward pass (fused) '
                           'instead of recomputing each chunk in the backward pass.')
_DTYPE = flags.DEFINE_string('dtype', 'bfloat16', 'Compute dtype.')
_REMAT = flags.DEFINE_bool('remat', True, 'jax.checkpoint each block.')
_POLICY = flags.DEFINE_string('remat_policy', 'nothing', 'kd.models.decoder.REMAT_POLICIES key.')
_SCAN = flags.DEFINE_bool('scan_layers', False,
                          'Layers as one nn.scan over stacked params (one layer compiled), in '
                          'the student and the teacher (also a quantized one).')
_ATTN = flags.DEFINE_string('attention_impl', None, "None (JAX picks), 'xla' or 'cudnn'.")
_SPD = flags.DEFINE_string('student_param_dtype', 'float32',
                           'Student master weights (and so optimizer state) dtype.')
_MU = flags.DEFINE_string('mu_dtype', None, "Adam's first-moment dtype (None: the params').")
_TBITS = flags.DEFINE_integer('teacher_bits', 0, 'Run the teacher quantized (config.teacher.quant):'
                              ' 8 or 4 (0 = bf16), int values on qwix\'s matmuls.')
_TGROUP = flags.DEFINE_integer('teacher_group', 0, 'Its input rows per scale (0 = per channel).')
_TACT = flags.DEFINE_integer('teacher_act_bits', 0, 'With --teacher_bits=8: 8 quantizes the '
                             'projections\' inputs per token too (int8 x int8 matmuls, W8A8).')
_KERNEL = flags.DEFINE_enum(
    'logit_kernel', 'xla', ['xla', 'pallas'],
    "config.logit_kernel: 'pallas' = CE and KL through kd.losses.fused_head (no logits array).")
_CLOSED = flags.DEFINE_enum(
    'closed_form', 'auto', ['auto', 'true', 'false'],
    "Fused chunks: the logits' gradient in closed form (auto: where the terms allow, as here).")
_COMPILE_ONLY = flags.DEFINE_bool(
    'compile_only', False, "Compile the step on abstract shapes and print XLA's memory analysis "
    '(no parameters made, nothing run): what a shape and setting need, on any backend.')
_PEAK = flags.DEFINE_float('peak_tflops', 790.0, 'Peak matmul TFLOP/s for MFU (H100 bf16 measured).')
_XLA = flags.DEFINE_multi_string(
    'xla_flag', [], 'An XLA flag for this run, added to XLA_FLAGS before the backend starts '
    '(repeatable; e.g. --xla_flag=--xla_gpu_enable_latency_hiding_scheduler=true).')


@functools.partial(jax.jit, static_argnums=(1, 2))
def _normal(key, shape, dtype):
  return (0.02 * jax.random.normal(key, shape)).astype(dtype)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _int8(key, shape, qmax):
  return jax.random.randint(key, shape, -qmax, qmax + 1, jnp.int8)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _scales(key, shape, qmax):
  return (0.02 / qmax * (1 + jax.random.uniform(key, shape))).astype(jnp.float16)


def _random_params(config, seed: int):
  """Params of the right shapes and dtypes, N(0, 0.02) (norm scales 1), a jit per distinct
  shape and dtype.

  The benchmark times the step, not the init. On an H100 XLA took over 100 s to compile the
  random fill of the 1B shapes as one program (in models.init_params as in a plain normal
  fill), whose 200 outputs are as many kernels; the same few shapes recur in every layer, so
  here each distinct one compiles once (7 at 1b-160m-152k unrolled). 'rbg' (XLA's
  RngBitGenerator) draws the values: as good for timing, which they do not change."""
  shapes = jax.eval_shape(functools.partial(models.init_params, config), jax.random.key(seed))
  paths, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  keys = jax.random.split(jax.random.key(seed, impl='rbg'), len(paths))
  leaves = [jnp.ones(s.shape, s.dtype) if 'scale' in jax.tree_util.keystr(p)
            else _normal(k, s.shape, jnp.dtype(s.dtype)) for k, (p, s) in zip(keys, paths)]
  return jax.tree_util.tree_unflatten(treedef, leaves)


def _random_quantized(teacher, bits: int, group: int, seed: int, abstract: bool = False,
                      act_bits: int | None = None):
  """(qwix PTQ teacher, its variables) for random int values and scales of the right shapes,
  made on the device (RTN of a random float teacher would take minutes on the host at 8B);
  `abstract`: the variables as shapes only (nothing made), for --compile_only."""
  qcfg = quant.QuantConfig(target=r'.*_proj|lm_head', bits=bits, group_size=group or None)
  per_layer = dataclasses.replace(teacher.config, scan_layers=False)  # how kd.quant stores them
  shapes = jax.eval_shape(functools.partial(models.init_params, per_layer), jax.random.key(seed))
  paths = quant.target_paths(shapes, qcfg.target)
  for p in paths:  # a clear error for a group that does not divide, before any compile
    quant.rtn.group_size_for(quant.rtn.kernel(shapes, p).shape[0], group or None, p)
  rest = quant.rtn.split_rest(shapes, paths)
  qmax = quant.rtn.qmax(bits)

  def fill(key):  # as _random_params: a jit per distinct shape, not one for the whole teacher
    keys = iter(jax.random.split(key, 2 * len(paths) + len(rest)))
    kernels = {}
    for p in paths:
      d_in, d_out = quant.rtn.kernel(shapes, p).shape
      g = group or d_in
      kernels[p] = (_int8(next(keys), (d_in, d_out), qmax),
                    _scales(next(keys), (d_in // g, d_out), qmax))
    others = {k: (jnp.ones(v.shape, v.dtype) if k.endswith('scale') else
                  _normal(next(keys), v.shape, jnp.dtype(v.dtype)))
              for k, v in rest.items()}
    return kernels, others

  key = jax.random.key(seed, impl='rbg')
  arrays, others = jax.eval_shape(fill, key) if abstract else fill(key)
  groups = {p: group or quant.rtn.kernel(shapes, p).shape[0] for p in paths}

  def qparams(arrays, others):
    return quant.QuantizedParams(qcfg, {
        p: quant.QuantizedKernel(values=v, scales=sc, bits=bits, group_size=groups[p],
                                 dtype=str(quant.rtn.kernel(shapes, p).dtype))
        for p, (v, sc) in arrays.items()}, others)

  model = quant.ptq_model(teacher, qparams(arrays, others), act_bits)  # (the shapes only)
  variables = lambda a, o: quant.ptq_variables(model, qparams(a, o), jnp.zeros((1, 8), jnp.int32))
  return model, (jax.eval_shape(variables, arrays, others) if abstract
                 else variables(arrays, others))


def build(chunk_size: int, fused: bool):
  tdims, sdims, batch, seq = SHAPES[_SHAPE.value]
  common = dict(max_seq_len=seq, dtype=_DTYPE.value, remat=_REMAT.value,
                remat_policy=_POLICY.value, attention_impl=_ATTN.value)
  teacher = models.Decoder(models.DecoderConfig(
      **tdims, **common, param_dtype=_DTYPE.value, scan_layers=_SCAN.value))
  student = models.Decoder(models.DecoderConfig(**sdims, **common, param_dtype=_SPD.value,
                                                scan_layers=_SCAN.value))
  c = ml_collections.ConfigDict(dict(
      losses={'ce': 0.5, 'kl': 0.5}, loss_kwargs={}, temperature=2.0, chunk_size=chunk_size,
      fused_chunks=fused, logit_kernel=_KERNEL.value, closed_form={'auto': None, 'true': True, 'false': False}[_CLOSED.value],
      features={'layer_map': 'uniform', 'pairs': ()},
      optimizer={'name': 'adamw', 'lr': 1e-4, 'warmup_steps': 0, 'schedule': 'constant',
                 'mu_dtype': _MU.value},
      train={'accum_steps': 1}))
  spec = build_lib.make_spec(c, student, teacher, dict(c.losses), 100)
  abstract = ((lambda f, *a: jax.eval_shape(functools.partial(f, *a))) if _COMPILE_ONLY.value
              else lambda f, *a: f(*a))
  if _TBITS.value:
    model, teacher_params = _random_quantized(teacher, _TBITS.value, _TGROUP.value, 1,
                                              abstract=_COMPILE_ONLY.value,
                                              act_bits=_TACT.value or None)
    spec = dataclasses.replace(spec, teacher=model)
  else:
    teacher_params = abstract(_random_params, teacher.config, 1)
  student_params = abstract(_random_params, student.config, 0)
  state = abstract(jax.jit(lambda p: step_lib.create_state(build_lib.init_student(spec, 0, p),
                                                           spec.tx, 0)), student_params)
  ids = np.random.default_rng(0).integers(0, tdims['vocab_size'], (batch, seq + 1), np.int32)
  data = {'input_ids': ids[:, :-1], 'labels': ids[:, 1:],
          'loss_mask': np.ones((batch, seq), np.float32)}
  return spec, state, teacher_params, data, (tdims, sdims, batch, seq)


def flops_per_token(tdims, sdims, seq, n_teacher, n_student):
  attn = lambda d, mult: mult * 2 * 2 * d['num_layers'] * seq * d['hidden_size'] / 2
  return 2 * n_teacher + 6 * n_student + attn(tdims, 1) + attn(sdims, 3)


def residual_bytes(spec, state, teacher_params, batch) -> int:
  """What autodiff of the step's objective keeps from the student's forward for its backward
  pass (kd.eval.speed.saved_residual_bytes; the teacher's outputs, as in the step, are an
  input): traced on shapes, so the same with --compile_only and on any backend."""
  t_out = jax.eval_shape(functools.partial(step_lib.teacher_forward, spec), teacher_params, batch)
  return speed.saved_residual_bytes(lambda p, tp, t, b: step_lib.objective(p, tp, t, b, spec),
                                    state.params, teacher_params, t_out, batch)


def matmul_flops(spec, state, teacher_params, batch) -> dict:
  """Matmul GFLOPs per token, counted on traced programs (kd.eval.speed.matmul_flops: loops
  multiplied out, remat's recomputation included): the step's; the `plain` count, the teacher's
  forward and 3x the student's (full logits both), what autodiff runs with nothing recomputed;
  `recompute`, the first over the second; and `int8_share`, the step's part run int8 x int8
  (a W8A8 teacher, --teacher_act_bits=8)."""
  tokens = batch['input_ids'].shape[0] * batch['input_ids'].shape[1]
  forward = lambda model, params: speed.matmul_flops(
      lambda v, ids: model.apply(v, ids)['logits'], params, batch['input_ids'])
  plain = (forward(spec.teacher, teacher_params)
           + 3 * forward(spec.student, state.params['student']))
  by_dtype = speed.matmul_flops(lambda s, t, b: step_lib.train_step(s, t, b, spec), state,
                                teacher_params, batch, by_dtype=True)
  step = sum(by_dtype.values())
  per_token = lambda f: float(f'{f / tokens / 1e9:.6g}')
  return dict(step_gflops_per_token=per_token(step), plain_gflops_per_token=per_token(plain),
              recompute=round(step / plain, 4),
              int8_share=round(by_dtype.get('int8 x int8', 0) / step, 4))


def _phase(name: str, t0: float):
  print(f'[bench_step] {name}: {time.perf_counter() - t0:.1f} s', file=sys.stderr, flush=True)


def bench(chunk_size: int, fused: bool) -> dict:
  start = time.perf_counter()
  spec, state, teacher_params, batch, (tdims, sdims, b, seq) = build(chunk_size, fused)
  if not _COMPILE_ONLY.value:
    jax.block_until_ready((state, teacher_params))
  _phase('built', start)
  step = jax.jit(lambda s, t, x: step_lib.train_step(s, t, x, spec), donate_argnums=(0,))
  t0 = time.perf_counter()
  step = step.lower(state, teacher_params, batch).compile()  # Call this, not the jit: one compile.
  compile_s = time.perf_counter() - t0
  _phase('compiled', start)
  mem = step.memory_analysis()
  gb = lambda name: round(getattr(mem, name, 0) / 2**30, 4)
  settings = dict(peer='kd-jax', shape=_SHAPE.value, chunk_size=chunk_size,
                  fused_chunks=bool(chunk_size and fused), closed_form=_CLOSED.value,
                  logit_kernel=_KERNEL.value,
                  remat=_REMAT.value,
                  remat_policy=_POLICY.value, scan_layers=_SCAN.value,
                  attention_impl=_ATTN.value,
                  student_param_dtype=_SPD.value, mu_dtype=_MU.value, teacher_bits=_TBITS.value,
                  teacher_act_bits=_TACT.value,
                  teacher_bytes=sum(x.size * x.dtype.itemsize
                                    for x in jax.tree.leaves(teacher_params)),
                  xla_flags=' '.join(_XLA.value),
                  device=jax.devices()[0].device_kind, compile_s=round(compile_s, 1),
                  xla_temp_gb=gb('temp_size_in_bytes'), xla_args_gb=gb('argument_size_in_bytes'))
  settings['residual_bytes'] = residual_bytes(spec, state, teacher_params, batch)
  settings['residual_gb'] = round(settings['residual_bytes'] / 2**30, 4)
  settings.update(matmul_flops(spec, state, teacher_params, batch))
  settings['model_gflops_per_token'] = round(flops_per_token(
      tdims, sdims, seq, models.count_params(teacher_params),
      models.count_params(state.params['student'])) / 1e9, 4)
  if _COMPILE_ONLY.value:
    return dict(settings, compile_only=True, xla_output_gb=gb('output_size_in_bytes'),
                xla_alias_gb=gb('alias_size_in_bytes'))
  for _ in range(3):
    state, m = step(state, teacher_params, batch)
  jax.block_until_ready(state)
  _phase('warmed up', start)
  t0 = time.perf_counter()
  for _ in range(_STEPS.value):
    state, m = step(state, teacher_params, batch)
  jax.block_until_ready(state)
  dt = (time.perf_counter() - t0) / _STEPS.value
  n_t = models.count_params(teacher_params)  # (a quantized teacher: values and scales)
  n_s = models.count_params(state.params['student'])
  tps = b * seq / dt
  tflops = flops_per_token(tdims, sdims, seq, n_t, n_s) * tps / 1e12
  # hfu: the matmul FLOPs the step runs (counted, remat's recomputation included) per second
  # over the peak; mfu: the peer's model FLOPs, the one to compare with the peer's.
  hfu = settings['step_gflops_per_token'] * 1e9 * tps / 1e12 / _PEAK.value
  out = dict(settings, teacher_params=n_t, student_params=n_s, step_s=round(dt, 4),
             tokens_per_s=round(tps), tflops=round(tflops, 1), mfu=round(tflops / _PEAK.value, 3),
             hfu=round(hfu, 3), loss=float(m['loss']))
  stats = jax.devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    out['peak_mem_gb'] = round(stats['peak_bytes_in_use'] / 2**30, 2)
  return out


def main(argv):
  del argv
  if _TACT.value and _TBITS.value != 8:
    raise app.UsageError('--teacher_act_bits=8 multiplies int8 by int8: add --teacher_bits=8.')
  if _XLA.value:  # XLA reads XLA_FLAGS once, when the first backend starts: before any jax op.
    bad = [f for f in _XLA.value if not f.startswith('--xla_')]
    if bad:
      raise app.UsageError(f'--xla_flag takes one XLA flag each, like --xla_flag=--xla_..., '
                           f'not {bad}.')
    os.environ['XLA_FLAGS'] = ' '.join([os.environ.get('XLA_FLAGS', ''), *_XLA.value]).strip()
  chunk = _CHUNK.value or 256
  runs = ([(0, False), (chunk, False), (chunk, True)] if _COMPARE.value
          else [(_CHUNK.value, _FUSED.value)])
  for chunk_size, fused in runs:
    print(json.dumps(bench(chunk_size, fused)), flush=True)


if __name__ == '__main__':
  app.run(main)
