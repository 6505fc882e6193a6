"""Speed and memory of a model's forward pass, measured, on this machine's default device.

  encode_throughput(model, sentences, batch_size=64)  # sentences/s through kd.eval.sts.encode
  forward_memory(model, batch_size=64, seq_len=48)     # bytes XLA plans for one forward
  saved_residual_bytes(loss_fn, params, *consts)       # what autodiff keeps for the backward
  matmul_flops(fn, *args)                              # the matmul FLOPs fn's program runs
  sub_jaxprs(eqn)                                      # the jaxprs a jaxpr equation holds

Throughput is the best of `runs` timed passes after one untimed pass (which compiles), so it
measures the steady state and not the compiler; it includes tokenisation and the host copy,
like a user's `encode`. Memory is XLA's own plan for the compiled forward: the arguments
(parameters and inputs), the outputs and the temporary buffers, the peak a device must hold.
Saved residuals are JAX's, before any compiler: the same on every backend (XLA:CPU's temp bytes,
by contrast, do not show what remat saves; experiments/bench_step.py). Matmul FLOPs are counted
on the same traced program, loops multiplied out and remat's recomputation included, so they show
what a setting adds to the model's own FLOPs; XLA's cost_analysis counts a loop's body once.
"""

import collections
import contextlib
import io
import math
import re
import time

import jax
from jax.ad_checkpoint import print_saved_residuals
import jax.numpy as jnp

from kd.eval import sts


def param_bytes(params) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params)))


def encode_throughput(model, sentences, *, batch_size: int = 64, runs: int = 3,
                      max_length: int = 128) -> float:
  """Sentences per second of `kd.eval.sts.encode(model, sentences)`, best of `runs`."""
  sentences = list(sentences)
  sts.encode(model, sentences, batch_size=batch_size, max_length=max_length)
  best = float('inf')
  for _ in range(runs):
    t0 = time.perf_counter()
    sts.encode(model, sentences, batch_size=batch_size, max_length=max_length)
    best = min(best, time.perf_counter() - t0)
  return len(sentences) / best


def forward_memory(model, *, batch_size: int = 64, seq_len: int = 48) -> dict:
  """{'argument', 'output', 'temp', 'peak'} bytes of the jitted embedding forward at [B, T]."""
  ids = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32)
  pooling = getattr(model.config, 'pooling', 'mean')
  compiled = sts.embed.lower(model.module, model.params, ids, ids, pooling=pooling).compile()
  stats = compiled.memory_analysis()
  out = {'argument': int(stats.argument_size_in_bytes), 'output': int(stats.output_size_in_bytes),
         'temp': int(stats.temp_size_in_bytes)}
  out['peak'] = out['argument'] + out['output'] + out['temp']
  return out


_RESIDUAL = re.compile(r'^([a-z]+(\d*))\[([\d,]*)\] (.*)$')  # 'bf16[8,2048,768] output of ...'
_INPUTS = ('from the argument', 'from a constant')


def saved_residual_bytes(fn, wrt, *consts) -> int:
  """Bytes that autodiff of fn(wrt, *consts) with respect to `wrt` keeps from the forward pass
  for the backward (jax.ad_checkpoint's saved residuals), not counting `wrt` and `consts`
  themselves, which exist anyway: the activation memory that remat and its policy control.

  Everything may be jax.ShapeDtypeStruct: it traces, nothing runs or compiles. It is JAX's
  residual set, before XLA schedules, fuses or frees anything; a device's peak adds the
  arguments, the optimizer's buffers and the working set of the largest op.
  """
  out = io.StringIO()

  def trace(w, *c):
    with contextlib.redirect_stdout(out):
      print_saved_residuals(lambda w_: fn(w_, *c), w)
    return jnp.zeros(())

  jax.eval_shape(trace, wrt, *consts)
  total = 0
  for line in out.getvalue().splitlines():
    m = _RESIDUAL.match(line)
    if m is None:
      raise ValueError(f'saved_residual_bytes cannot read {line!r} from '
                       'jax.ad_checkpoint.print_saved_residuals; its format changed.')
    dtype, bits, dims, source = m.groups()
    if source.startswith(_INPUTS):
      continue
    bits = 8 if dtype == 'bool' else int(bits)
    total += -(-math.prod(int(d) for d in dims.split(',') if d) * bits // 8)
  return total


def matmul_flops(fn, *args, by_dtype: bool = False):
  """The FLOPs of every matrix product (dot_general) that fn(*args) runs, 2 per multiply-add;
  `by_dtype`: a dict of them by operand dtypes, e.g. {'bfloat16 x bfloat16': ..., 'int8 x
  int8': ...}, which shows what runs on int8 (or fp8) units.

  Counted on fn's jaxpr, so anything may be jax.ShapeDtypeStruct and nothing runs: a scan's
  body counts `length` times, a cond its costliest branch, and what remat recomputes in the
  backward pass counts again, as it runs. Elementwise work is left out; so are products XLA
  would call a library for that are not dot_generals in JAX (e.g. cuDNN's attention, asked for
  by name). A while loop's trip count is not known before it runs: it is refused.
  """
  counts = _jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)
  return dict(counts) if by_dtype else sum(counts.values())


def _jaxpr_flops(jaxpr) -> collections.Counter:
  total = collections.Counter()
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'dot_general':
      (contract, _), _ = eqn.params['dimension_numbers']
      lhs, rhs = (v.aval for v in eqn.invars)
      total[f'{lhs.dtype} x {rhs.dtype}'] += (
          2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs.shape[d] for d in contract))
    elif name == 'scan':
      body = _jaxpr_flops(eqn.params['jaxpr'].jaxpr)
      total.update({k: eqn.params['length'] * v for k, v in body.items()})
    elif name == 'cond':
      total.update(max((_jaxpr_flops(b.jaxpr) for b in eqn.params['branches']),
                       key=lambda c: sum(c.values())))
    elif name == 'while':
      raise ValueError('matmul_flops cannot count a while loop (its trip count is known only '
                       'when it runs); write the loop as a lax.scan or a fori_loop with '
                       'Python-int bounds.')
    else:  # pjit, remat, custom_jvp/vjp, shard_map, ...
      for sub in sub_jaxprs(eqn):
        total.update(_jaxpr_flops(sub))
  return total


def sub_jaxprs(eqn):
  """The jaxprs a jaxpr equation holds (a pjit's, remat's or shard_map's body, each branch of
  a cond, a scan's body, ...), each once."""
  for value in eqn.params.values():
    for sub in (value if isinstance(value, (tuple, list)) else (value,)):
      if isinstance(sub, jax.extend.core.ClosedJaxpr):
        yield sub.jaxpr
      elif isinstance(sub, jax.extend.core.Jaxpr):
        yield sub
