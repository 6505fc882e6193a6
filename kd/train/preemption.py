"""Preemption: on SIGTERM (a spot or preemptible machine's notice) or SIGINT, the run finishes
the step in flight, writes a checkpoint and exits with `EXIT_CODE`, so a scheduler can requeue
it and the same command resumes where it stopped.

One process: a signal handler sets a flag that the loop reads after every step. Several
processes (`jax.distributed`): JAX's preemption service receives the SIGTERM, tells every
process, and `reached_preemption_sync_point(step)` turns true on all of them at the same step,
so every host saves the same checkpoint. A second SIGINT stops at once (KeyboardInterrupt).
Without `install` (kd used as a library) no handler is installed and `reached` stays false.
"""

import signal

import jax
from jax.experimental import multihost_utils

# EX_TEMPFAIL (sysexits.h): a temporary failure, run the same command again.
EXIT_CODE = 75


class Preempted(Exception):
  """Raised by the loop after the checkpoint of `step` is written."""

  def __init__(self, step: int, directory: str):
    super().__init__(f'preempted: the checkpoint of step {step} is in {directory}; run the same '
                     'command again to resume from it')
    self.step = step


_received = []  # the signals received since `install` (one process)


def _handle(signum, frame):
  del frame
  if signum == signal.SIGINT and signal.SIGINT in _received:
    raise KeyboardInterrupt  # asked twice: stop now
  _received.append(signum)


def install() -> None:
  """Catches SIGTERM and SIGINT from now on (kd.main calls it once, before any stage). With
  several processes JAX's preemption service owns SIGTERM, and nothing is installed."""
  if jax.process_count() == 1:
    for s in (signal.SIGTERM, signal.SIGINT):
      signal.signal(s, _handle)


def reached(step: int) -> bool:
  """True when the run should save `step` and stop; the loop asks after every step, on every
  process, so that all of them agree."""
  if jax.process_count() > 1:
    return multihost_utils.reached_preemption_sync_point(step)
  return bool(_received)
