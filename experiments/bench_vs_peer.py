r"""kd's train step beside the PyTorch peer, shape by shape, in one call: a ratio table.

  python experiments/bench_vs_peer.py --peer=.peer/peer_torch_kd.py \
      --shapes=1b-160m-32k,1b-160m-152k --variant=plain:--chunk_size=0 \
      --variant=chunked:--chunk_size=1024 --out=$OUT/bench.jsonl

For every shape the peer (`python3 PEER SHAPE --compile`) and each variant of
experiments/bench_step.py (its flags after the colon) run as separate processes one after the
other, so each has the GPU to itself and its own peak memory. Every JSON line goes to --out;
the table printed last gives tokens/s, MFU, peak memory and the ratio of each to the peer's
(and kd's HFU: the matmul FLOPs its step runs, remat's recomputation included, over the peak).
Without --peer only kd's variants run (e.g. on a CPU).
"""

import json
import os
import subprocess
import sys
import time

from absl import app
from absl import flags

_PEER = flags.DEFINE_string('peer', '', 'Path of peer_torch_kd.py ("" = no peer).')
_PEER_PYTHON = flags.DEFINE_string('peer_python', 'python3', 'Python that has torch.')
_SHAPES = flags.DEFINE_list('shapes', ['1b-160m-32k'], 'Shapes (bench_step.SHAPES keys).')
_VARIANTS = flags.DEFINE_multi_string('variant', ['plain:'], 'NAME:FLAGS for bench_step.py.')
_OUT = flags.DEFINE_string('out', '', 'Append every result as a JSON line here.')
_TIMEOUT = flags.DEFINE_integer('timeout', 300, 'Seconds per process.')

_HERE = os.path.dirname(os.path.abspath(__file__))


def _last_json(cmd: list[str], name: str, env=None) -> dict:
  """Runs one benchmark process; its last JSON line (or the error), printed and saved at once."""
  t0 = time.time()
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_TIMEOUT.value, env=env)
    lines = [l for l in proc.stdout.splitlines() if l.startswith('{')]
    if lines:
      r = json.loads(lines[-1])
    else:
      tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
      r = {'error': f'exit {proc.returncode}: ' + ' | '.join(tail)[-400:]}
  except subprocess.TimeoutExpired:
    r = {'error': f'timeout after {_TIMEOUT.value} s'}
  r.update(variant=name, process_s=round(time.time() - t0, 1))
  print(json.dumps(r), flush=True)
  if _OUT.value:
    with open(_OUT.value, 'a') as f:
      f.write(json.dumps(r) + '\n')
  return r


def _row(name: str, r: dict, peer: dict | None) -> str:
  if 'error' in r:
    return f'| {name} | failed: {r["error"]} | | | | | |'
  ratio = lambda k: (f'{r[k] / peer[k]:.2f}x' if peer and 'error' not in peer and k in r
                     and peer.get(k) else '-')
  mfu, hfu = r.get('mfu', '-'), r.get('hfu', '-')
  return (f"| {name} | {r['tokens_per_s']:,} | {mfu} | {hfu} | {r.get('peak_mem_gb', '-')} | "
          f"{ratio('tokens_per_s')} | {ratio('peak_mem_gb')} |")


def main(argv):
  del argv
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE='false')
  lines = []
  for shape in _SHAPES.value:
    peer = None
    if _PEER.value:
      peer = _last_json([_PEER_PYTHON.value, _PEER.value, shape, '--compile'], 'peer')
      results = [('torch peer (--compile)', peer)]
    else:
      results = []
    for variant in _VARIANTS.value:
      name, _, extra = variant.partition(':')
      cmd = [sys.executable, os.path.join(_HERE, 'bench_step.py'), f'--shape={shape}',
             *extra.split()]
      results.append((name, _last_json(cmd, name, env)))
    lines += [f'### {shape}', '',
              '| run | tokens/s | MFU | HFU | peak GB | speed vs peer | memory vs peer |',
              '|---|---:|---:|---:|---:|---:|---:|']
    lines += [_row(name, r, peer) for name, r in results] + ['']
  print('\n'.join(lines))


if __name__ == '__main__':
  app.run(main)
