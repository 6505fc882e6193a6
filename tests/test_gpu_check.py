"""experiments/gpu_check.sh, the one-call GPU run, end to end as a dry run on this CPU."""

import json
import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _plan():
  """{shape: [variant names]} as the script lists them."""
  text = open(os.path.join(ROOT, 'experiments', 'gpu_check.sh'), encoding='utf-8').read()
  rows = re.findall(r'^  "([^"]+)"$', text, re.M)
  return {r.split('|')[0]: [v.split(':')[0] for v in r.split('|')[1:]] for r in rows}


def test_gpu_check_runs_every_planned_variant_and_writes_its_lines(tmp_path):
  plan = _plan()
  assert list(plan) == ['1b-160m-32k', '1b-160m-152k', '8b-1b-128k']
  assert all(any('pallas' in v for v in vs) for vs in plan.values())
  env = dict(os.environ, OUT=str(tmp_path), TIMEOUT='300')
  env.pop('PEER', None)
  proc = subprocess.run(['experiments/gpu_check.sh', '--shape=cpu-tiny'], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  rows = [json.loads(l) for l in (tmp_path / 'bench.jsonl').read_text().splitlines()]
  assert [r['variant'] for r in rows] == [v for vs in plan.values() for v in vs]
  assert not [r for r in rows if 'error' in r], rows
  assert all(r['shape'] == 'cpu-tiny' and r['tokens_per_s'] > 0 for r in rows)
  # The same model, data and objective: every float32-student variant ends at one loss.
  f32 = {r['variant']: r['loss'] for r in rows[:2]}
  assert abs(f32['scan-256'] - f32['pallas']) < 1e-4 * abs(f32['scan-256']), f32
  assert rows[1]['logit_kernel'] == 'pallas' and rows[0]['chunk_size'] == 256
  tables = (tmp_path / 'tables.md').read_text()
  assert tables.count('| run | tokens/s |') == 3


def test_gpu_check_refuses_an_unknown_argument(tmp_path):
  proc = subprocess.run(['experiments/gpu_check.sh', '--shapes=x'], cwd=ROOT, capture_output=True,
                        text=True, env=dict(os.environ, OUT=str(tmp_path)), timeout=60)
  assert proc.returncode == 2 and '--shape=NAME' in proc.stderr
  assert not (tmp_path / 'bench.jsonl').exists()
