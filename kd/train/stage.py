"""One training stage, the sequence every job runs for each model it trains: the state made
on the plan's devices, a frozen base beside it (PEFT), `loop.fit` (which checkpoints and
resumes), then the plain trained student read back (kd.train.compress.finish).

  params, final = stage.fit(config, spec, plan, make_params, base, teacher_params, batches,
                            eval_batches, compression=compress.read(config), seed=0,
                            workdir=DIR, steps=100, name='student_kd')
"""

from __future__ import annotations

import time
from typing import Any, Callable

from kd import models
from kd.train import compress
from kd.train import loop
from kd.train import step as step_lib


def fit(config, spec: step_lib.Spec, plan, make_params: Callable[[], dict], base,
        teacher_params, batches, eval_batches, *, compression: compress.Compression, seed: int,
        workdir: str, steps: int, name: str, batch_fn=None,
        prepare: Callable[[Any], Any] | None = None):
  """Trains `spec`'s student for `steps` steps in `workdir`; returns (its plain variables,
  final metrics with 'wall_s', 'params' and, for a PEFT student, 'trainable_params').

  `make_params()` gives the state's params ({'student': trainable, ...}) and runs under the
  plan (placed or sharded as it says); `base` is the frozen part of a PEFT student (None
  otherwise), kept in state.frozen as `compression` stores it (quantized under QLoRA), which
  also says how the trained student is read back; `prepare(state)` edits the fresh state (e.g.
  an EMA copy). Of `config` it reads config.train.
  """
  state = plan.init_state(lambda: step_lib.create_state(make_params(), spec.tx, seed))
  if prepare is not None:
    state = prepare(state)
  if base is not None:
    state = state.replace(frozen=plan.place_state(compress.frozen_base(compression, base)))
  tc = config.train
  t0 = time.perf_counter()
  state, final = loop.fit(
      spec, state, None if teacher_params is None else plan.place_teacher(teacher_params),
      batches, eval_batches, workdir=workdir, total_steps=steps, log_every=tc.log_every,
      eval_every=tc.get('eval_every', 0), checkpoint_every=tc.checkpoint_every,
      keep=tc.get('keep', 2), progress=tc.get('progress', True), name=name, plan=plan,
      batch_fn=batch_fn, skip_nonfinite=tc.get('skip_nonfinite', 0))
  final['wall_s'] = time.perf_counter() - t0
  # (the state was donated to the step: read the base back from it)
  params, trainable_count = compress.finish(
      compression, plan.unreplicate(state.replace(frozen=None)).params['student'],
      None if base is None else plan.unreplicate(state.frozen))
  final['params'] = models.count_params(params)
  if trainable_count is not None:
    final['trainable_params'] = trainable_count
  return params, final
