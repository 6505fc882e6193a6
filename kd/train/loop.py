"""The host loop: feed batches, dispatch steps, log, evaluate, checkpoint, resume."""

import functools
import math
import time

from absl import logging
import jax
import numpy as np
import tqdm

from kd import parallel
from kd.train import checkpoint
from kd.train import metrics as metrics_lib
from kd.train import preemption
from kd.train import step as step_lib


class NonFiniteError(FloatingPointError):
  """A loss term or the gradient became NaN/Inf."""


def nonfinite(m: dict) -> list[str]:
  """What in a step's metrics is NaN/Inf, in words (empty: all finite)."""
  means = {k: v[0] / max(v[1], 1.0) for k, v in m['terms'].items()}
  bad = [f"loss term '{k}' = {v}" for k, v in means.items() if not math.isfinite(v)]
  if not math.isfinite(m['grad_norm']):
    bad.append(f"the gradient norm = {m['grad_norm']} (terms: "
               + ', '.join(f'{k}={v:.4g}' for k, v in means.items()) + ')')
  return bad


def check_finite(step: int, m: dict) -> None:
  bad = nonfinite(m)
  if bad:
    raise NonFiniteError(
        f'step {step}: {"; ".join(bad)}. Stopped; the last good checkpoint is kept. Lower '
        'optimizer.lr, set optimizer.grad_clip_norm, check the inputs of that term, or let '
        'train.skip_nonfinite updates be skipped.')


def _host_state_path(workdir: str, step: int) -> str:
  """Where the batch_fn's host state (e.g. a replay buffer of this process's rows) is saved:
  one file per process when there are several."""
  if jax.process_count() == 1:
    return f'{workdir}/batch_fn/{step}.npz'
  return f'{workdir}/batch_fn/{step}.process_{jax.process_index()}-of-{jax.process_count()}.npz'


def evaluate(eval_fn, params, teacher_params, batches) -> dict:
  totals = {}
  for batch in batches:
    for k, (s, c) in jax.device_get(eval_fn(params, teacher_params, batch)).items():
      ts, tc = totals.get(k, (0.0, 0.0))
      totals[k] = (ts + float(s), tc + float(c))
  return metrics_lib.summarize_eval(totals)


def fit(spec: step_lib.Spec, state, teacher_params, data_iter, eval_batches, *, workdir: str,
        total_steps: int, log_every: int = 50, eval_every: int = 0, checkpoint_every: int = 0,
        keep: int = 2, progress: bool = True, name: str = 'train', plan=None, batch_fn=None,
        skip_nonfinite: int = 0):
  """Trains until `total_steps`, resuming from `workdir` if it holds a checkpoint.

  Returns (final state, final eval metrics). `data_iter` is a grain iterator whose position is
  checkpointed with the state, so a resumed run sees exactly the batches it would have seen.
  `plan` (`kd.parallel.make`; default one device) wraps the step; `state` and `teacher_params`
  arrive already placed by it, and `data_iter` yields this process's rows of each batch.
  `batch_fn(state, batch, step) -> batch`, if given, rewrites each batch before its step (e.g.
  kd.train.onpolicy: the student generates the responses); it must be a function of its
  arguments only, so a resumed run rewrites the same way. If it has `observe_validation(ce)`
  (kd.train.replay's adaptive off-policy), every periodic eval's held-out CE is passed to it; if
  it has `state_dict()` / `load_state_dict()` (its replay buffer and schedule), that state is
  saved with every checkpoint (<workdir>/batch_fn/<step>.npz) and restored with it.
  With `skip_nonfinite` > 0 (and the optimizer made with it, kd.train.optim), a step whose loss
  or gradient is NaN/Inf leaves the state as it was, with a warning; the run stops at the
  (skip_nonfinite + 1)-th. The count is logged as `skipped_nonfinite`.
  After a preemption notice (kd.train.preemption) it checkpoints the step just done and raises
  `preemption.Preempted`.
  """
  plan = plan or parallel.SinglePlan()
  mngr = checkpoint.manager(f'{workdir}/checkpoints', max_to_keep=keep)
  # Restored into the placed state's shapes and shardings, so arrays come back sharded. A PEFT
  # student's frozen base (state.frozen) is an input, like the teacher: never saved.
  frozen = state.frozen
  logical = plan.unreplicate(state.replace(frozen=None))
  restored = checkpoint.restore_latest(mngr, logical, data_iter)
  if restored is not logical:
    state = plan.place_state(restored).replace(frozen=frozen)
  start = int(restored.step)
  if start and hasattr(batch_fn, 'load_state_dict'):  # e.g. an adaptive off-policy buffer
    batch_fn.load_state_dict(checkpoint.load_host_state(_host_state_path(workdir, start)))
  writer = metrics_lib.Writer(workdir, enabled=jax.process_index() == 0)
  train_fn = plan.train_step(functools.partial(step_lib.train_step, spec=spec), state)
  eval_fn = plan.eval_step(functools.partial(step_lib.eval_step, spec=spec))

  acc, pending, t0, tokens = metrics_lib.Accumulator(), None, time.perf_counter(), 0
  bar = tqdm.tqdm(total=total_steps, initial=start, desc=name, disable=not progress,
                  dynamic_ncols=True)

  skipped = 0

  def pull(step, m):  # host side of step `step`: runs after step+1 was dispatched
    nonlocal skipped
    m = jax.device_get(m)
    if skipped < skip_nonfinite and nonfinite(m):
      skipped += 1
      logging.warning('%s step %d: %s; the update was not applied (%d of %d allowed, '
                      'train.skip_nonfinite)', name, step, '; '.join(nonfinite(m)), skipped,
                      skip_nonfinite)
      return
    check_finite(step, m)
    acc.add(m)

  try:
    for i in range(start, total_steps):
      batch = next(data_iter)
      if batch_fn is not None:
        batch = batch_fn(state, batch, i)
      tokens += int(np.sum(batch['segment_ids'] > 0)) if 'segment_ids' in batch else batch[
          'input_ids'].size
      state, m = train_fn(state, teacher_params, batch)
      if pending is not None:
        pull(*pending)
      pending = (i, m)
      done = i + 1
      if done % log_every == 0 or done == total_steps:
        pull(*pending)
        pending = None
        row = acc.result()
        dt = time.perf_counter() - t0
        row['tokens_per_s'] = tokens / max(dt, 1e-9)
        if skip_nonfinite:
          row['skipped_nonfinite'] = skipped
        writer.write(done, row)
        bar.set_postfix(loss=f"{row.get('loss', math.nan):.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
        acc, t0, tokens = metrics_lib.Accumulator(), time.perf_counter(), 0
      bar.update(1)
      if eval_every and done % eval_every == 0 and done != total_steps:
        ev = evaluate(eval_fn, step_lib.eval_params(state, spec),
                      step_lib.current_teacher(state, teacher_params, spec), eval_batches)
        if hasattr(batch_fn, 'observe_validation'):  # adaptive off-policy (kd/train/replay.py)
          ev['sgo_probability'] = batch_fn.observe_validation(ev['ce'])
        writer.write(done, ev, 'eval')
      preempted = done < total_steps and preemption.reached(done)
      if (checkpoint_every and done % checkpoint_every == 0) or done == total_steps or preempted:
        if pending is not None:  # never save a state whose metrics were not checked
          pull(*pending)
          pending = None
        if hasattr(batch_fn, 'state_dict'):  # first, so every saved step has its file
          checkpoint.save_host_state(_host_state_path(workdir, done), batch_fn.state_dict())
        checkpoint.save(mngr, done, plan.unreplicate(state.replace(frozen=None)), data_iter)
      if preempted:
        checkpoint.wait(mngr)
        raise preemption.Preempted(done, mngr.directory)
    checkpoint.wait(mngr)
    final = evaluate(eval_fn, step_lib.eval_params(state, spec),
                     step_lib.current_teacher(state, teacher_params, spec), eval_batches)
    writer.write(total_steps, final, 'eval')
  finally:  # also on errors, so that pending writes end before the interpreter does
    bar.close()
    writer.close()
    mngr.close()
  return state, final
