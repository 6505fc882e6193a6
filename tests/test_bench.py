"""experiments/bench_vs_peer.py: runs kd's step and a peer process, and divides their numbers;
experiments/bench_sample.py: kd's and transformers' generation on one checkpoint."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Stands in for ../shared/bench/peer_torch_kd.py (which needs CUDA): same argv, one JSON line.
FAKE_PEER = '''
import json, sys
assert sys.argv[2] == '--compile', sys.argv
print('warming up')
print(json.dumps(dict(peer='torch+hf', shape=sys.argv[1], tokens_per_s=100, peak_mem_gb=2.0)))
'''


def test_bench_vs_peer_prints_ratios_to_the_peer(tmp_path):
  peer = tmp_path / 'peer.py'
  peer.write_text(FAKE_PEER)
  out = tmp_path / 'bench.jsonl'
  proc = subprocess.run(
      [sys.executable, 'experiments/bench_vs_peer.py', f'--peer={peer}',
       f'--peer_python={sys.executable}', '--shapes=cpu-tiny', '--variant=plain:--steps=2',
       '--variant=fused:--chunk_size=16 --steps=2 --noremat', '--variant=bad:--shape_x=1',
       f'--out={out}'], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  rows = [json.loads(l) for l in out.read_text().splitlines()]
  assert [r['variant'] for r in rows] == ['peer', 'plain', 'fused', 'bad']
  peer_r, plain, fused, bad = rows
  assert peer_r['tokens_per_s'] == 100
  assert plain['chunk_size'] == 0 and not plain['fused_chunks'] and plain['remat']
  assert fused['chunk_size'] == 16 and fused['fused_chunks'] and not fused['remat']
  assert plain['tokens_per_s'] > 0 and plain['step_s'] > 0 and 'error' in bad
  # Same model, data and objective: the chunked fused step starts from the same loss.
  assert abs(plain['loss'] - fused['loss']) < 1e-2 * abs(plain['loss'])
  table = proc.stdout[proc.stdout.index('### cpu-tiny'):]
  ratio = plain['tokens_per_s'] / 100
  assert f"| plain | {plain['tokens_per_s']:,} |" in table and f'{ratio:.2f}x' in table
  assert '| bad | failed: exit' in table


def test_bench_sample_times_both_frameworks_on_the_same_greedy_tokens():
  pytest.importorskip('torch')
  sys.path.insert(0, os.path.join(ROOT, 'experiments'))
  import bench_sample  # pylint: disable=g-import-not-at-top
  (row,) = bench_sample.bench('tiny', [2], prompt=5, new=6, runs=1)
  assert row['same_tokens'] == 1.0  # kd's greedy answers are transformers' own
  assert row['kd_tokens_per_s'] > 0 and row['torch_tokens_per_s'] > 0
  np.testing.assert_allclose(row['ratio'], row['kd_tokens_per_s'] / row['torch_tokens_per_s'])


def test_bench_step_runs_a_quantized_teacher_in_less_memory():
  """bench_step --teacher_bits=8: the teacher's int8 projections (plus its bf16 embeddings,
  norms and scales) take less than the bf16 teacher; both steps run and give a finite loss."""
  out = {}
  for bits in (0, 8):
    run = subprocess.run([sys.executable, 'experiments/bench_step.py', '--shape=cpu-tiny',
                          '--steps=1', f'--teacher_bits={bits}'], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    out[bits] = json.loads(run.stdout.strip().splitlines()[-1])
  assert all(np.isfinite(r['loss']) for r in out.values())
  # cpu-tiny: 105,984 projection weights (2 layers + lm_head) of 138,880: 2 bytes -> 1 byte.
  assert out[8]['teacher_bytes'] < 0.7 * out[0]['teacher_bytes']


def _bench_step(*flags):
  run = subprocess.run([sys.executable, 'experiments/bench_step.py', *flags], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-2000:]
  return [json.loads(l) for l in run.stdout.splitlines() if l.startswith('{')]


@pytest.mark.parametrize('teacher', [
    (), ('--scan_layers', '--teacher_bits=4', '--teacher_group=32')])
def test_bench_step_compile_only_gives_the_memory_of_the_step_it_would_run(teacher):
  """--compile_only makes no parameters (abstract shapes) yet compiles the very step a run
  times: XLA's memory analysis is the same, with a bf16 teacher and unrolled layers, and with an
  int4 teacher and scanned layers."""
  (ran,) = _bench_step('--shape=cpu-tiny', '--steps=1', '--chunk_size=16', *teacher)
  (fused,) = _bench_step('--shape=cpu-tiny', '--compile_only', '--chunk_size=16', *teacher)
  assert fused['compile_only'] and 'loss' not in fused
  assert fused['chunk_size'] == 16 and fused['fused_chunks']
  assert fused['teacher_bits'] == (4 if teacher else 0)
  assert fused['scan_layers'] == ('--scan_layers' in teacher)
  for key in ('xla_temp_gb', 'xla_args_gb', 'teacher_bytes', 'residual_bytes'):
    assert fused[key] == ran[key], key


def test_bench_step_passes_xla_flags_to_the_compiler(tmp_path):
  """--xla_flag reaches XLA (here a dump directory it then fills) and the JSON line names it;
  a value that is not an XLA flag is refused before anything is built."""
  dump = tmp_path / 'dump'
  (line,) = _bench_step('--shape=cpu-tiny', '--compile_only', f'--xla_flag=--xla_dump_to={dump}')
  assert line['xla_flags'] == f'--xla_dump_to={dump}'
  assert any(p.name.endswith('.txt') for p in dump.iterdir())
  run = subprocess.run([sys.executable, 'experiments/bench_step.py', '--xla_flag=dump'],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert run.returncode != 0 and 'one XLA flag each' in run.stderr


def test_saved_residual_bytes_counts_what_the_backward_pass_keeps():
  """An MLP of 3 residual layers x + tanh(tanh(x W) W^T), x [16, 64], W [64, 32], counted by
  hand: per layer the backward keeps tanh(x W) and 1 - tanh^2 of it ([16, 32] each), W^T
  [32, 64], and the same two for the outer tanh ([16, 64] each); the inputs of layers 2 and 3
  are the layer outputs [16, 64]. Under jax.checkpoint only those two inputs stay. x and W are
  inputs, not counted; bfloat16 halves everything."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from kd.eval import speed  # pylint: disable=g-import-not-at-top

  def net(ws, x, remat):
    layer = lambda w, x: x + jnp.tanh(jnp.tanh(x @ w) @ w.T)
    for w in ws:
      x = (jax.checkpoint(layer) if remat else layer)(w, x)
    return x.astype(jnp.float32).sum()

  for dtype, size in ((jnp.float32, 4), (jnp.bfloat16, 2)):
    ws = [jax.ShapeDtypeStruct((64, 32), dtype)] * 3
    x = jax.ShapeDtypeStruct((16, 64), dtype)
    per_layer = 2 * 16 * 32 + 32 * 64 + 2 * 16 * 64
    assert speed.saved_residual_bytes(lambda w, x: net(w, x, False), ws, x) == size * (
        3 * per_layer + 2 * 16 * 64)
    assert speed.saved_residual_bytes(lambda w, x: net(w, x, True), ws, x) == size * 2 * 16 * 64


def test_matmul_flops_counts_loops_branches_and_recomputation():
  """The same 3-layer MLP, by hand, in units of one [16, 64] x [64, 32] product (65536 FLOPs):
  forward 2 a layer, 6; its gradient with respect to the Ws adds dW twice and dx twice a layer,
  but no dx for layer 1, whose input is not differentiated: 6 + 11 = 17. Under jax.checkpoint
  the backward pass runs each layer's 2 products again: 23. As a scan over stacked Ws the body is
  one program, so layer 1 makes its dx too: 18. A cond counts its costlier branch; a while loop,
  whose trip count is unknown, is refused."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from kd.eval import speed  # pylint: disable=g-import-not-at-top

  layer = lambda w, x: x + jnp.tanh(jnp.tanh(x @ w) @ w.T)

  def net(ws, x, remat):
    for w in ws:
      x = (jax.checkpoint(layer) if remat else layer)(w, x)
    return x.sum()

  scanned = lambda ws, x: jax.lax.scan(lambda x, w: (layer(w, x), None), x, ws)[0].sum()
  w = jax.ShapeDtypeStruct((64, 32), jnp.float32)
  x = jax.ShapeDtypeStruct((16, 64), jnp.float32)
  unit = 2 * 16 * 64 * 32
  count = lambda f, *a: speed.matmul_flops(f, *a) / unit
  assert count(lambda ws, x: net(ws, x, False), [w] * 3, x) == 6
  assert count(jax.grad(lambda ws, x: net(ws, x, False)), [w] * 3, x) == 17
  assert count(jax.grad(lambda ws, x: net(ws, x, True)), [w] * 3, x) == 23
  stacked = jax.ShapeDtypeStruct((3, 64, 32), jnp.float32)
  assert count(scanned, stacked, x) == 6 and count(jax.grad(scanned), stacked, x) == 18
  branches = lambda w, x: jax.lax.cond(x.sum() > 0, lambda: x @ w, lambda: (x @ w) @ (w.T @ w))
  assert count(branches, w, x) == 1 + 2 + 0.5  # x@w, w.T@w [32, 64]x[64, 32], then [16, 32]x[32, 32]
  loop = lambda x: jax.lax.while_loop(lambda c: c.sum() < 1, lambda c: c @ c.T @ c, x)
  with pytest.raises(ValueError, match='while loop'):
    speed.matmul_flops(loop, x)


def test_bench_step_residuals_and_flops_under_remat():
  """bench_step's residual bytes (what the step's backward keeps): remat keeps far less. (The
  compile-only test above checks they equal a run's.) Its matmul count: with nothing
  rematerialised and the head's gradient made in the forward pass (fused chunks) the step runs
  what plain autodiff of the full logits runs; remat adds the blocks' forward again; unfused
  chunks add both heads again (the loss recomputes them in the backward pass)."""
  (remat,) = _bench_step('--shape=cpu-tiny', '--compile_only', '--chunk_size=16')
  (no_remat,) = _bench_step('--shape=cpu-tiny', '--compile_only', '--chunk_size=16', '--noremat')
  (unfused,) = _bench_step('--shape=cpu-tiny', '--compile_only', '--chunk_size=16', '--noremat',
                           '--nofused_chunks')
  assert no_remat['residual_bytes'] > 2 * remat['residual_bytes'] > 0
  assert no_remat['recompute'] == 1.0
  assert no_remat['step_gflops_per_token'] == no_remat['plain_gflops_per_token']
  assert 1.0 < remat['recompute'] < 4 / 3  # at most the whole forward once more
  # Both heads once more, [512, 64] and [512, 32], per token: 2 * 512 * (64 + 32) FLOPs.
  extra = unfused['step_gflops_per_token'] - no_remat['step_gflops_per_token']
  np.testing.assert_allclose(extra, 2 * 512 * (64 + 32) / 1e9, rtol=2e-3)


def test_bench_logit_chunk_times_closed_form_and_autodiff_per_divergence():
  proc = subprocess.run(
      [sys.executable, 'experiments/bench_logit_chunk.py', '--vocab=300', '--seq=12',
       '--chunk_size=5', '--hidden=8', '--runs=1'], cwd=ROOT, capture_output=True, text=True,
      timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  rows = [line.split('|')[1:-1] for line in proc.stdout.splitlines() if ' + ce |' in line]
  assert [r[0].strip() for r in rows] == [f'{n} + ce' for n in sorted(
      ['kl', 'reverse_kl', 'jsd', 'tvd', 'skew_kl', 'skew_reverse_kl'])]
  for row in rows:
    temp_a, temp_c, s_a, s_c, ratio = map(float, row[1:])
    assert s_a > 0 and s_c > 0 and temp_a >= 0 and temp_c >= 0 and ratio > 0
  bad = subprocess.run([sys.executable, 'experiments/bench_logit_chunk.py', '--divergences=klx'],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert bad.returncode != 0 and "unknown ['klx']" in bad.stderr
