"""Multi-host start-up: `jax.distributed.initialize` before anything touches a device.

With `config.distributed`, each process calls `initialize(config)` first. On a managed cluster
(SLURM, Open MPI, Kubernetes, Cloud TPU) JAX finds the coordinator, process count and id on its
own; elsewhere set them in `config.parallel.{coordinator_address, num_processes, process_id}`
or set `JAX_COORDINATOR_ADDRESS` (the other two have no environment variable in JAX). CPU
processes talk over gloo (JAX's default CPU collectives), so a laptop can run two hosts over
loopback.

Afterwards every process runs the same program: the data pipeline reads documents
`process_index::process_count`, the mesh spans every process's devices, and orbax writes each
process's shards of the state plus one data-iterator file per process.
"""

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils


def initialize(config) -> bool:
  """Joins the other processes when `config.distributed`; returns whether it did."""
  if not config.get('distributed', False):
    return False
  p = config.get('parallel') or {}
  kwargs = {}
  if p.get('coordinator_address'):
    kwargs['coordinator_address'] = p['coordinator_address']
  if int(p.get('num_processes', 0)) > 0:
    kwargs['num_processes'] = int(p['num_processes'])
  if int(p.get('process_id', -1)) >= 0:
    kwargs['process_id'] = int(p['process_id'])
  jax.distributed.initialize(**kwargs)
  logging.info('process %d of %d, %d local of %d devices', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def to_host(tree):
  """Every leaf of `tree` whole, as numpy, on every process: arrays split over several processes
  (a multi-host FSDP student) are gathered, so every process must call this together."""
  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
  return jax.tree.map(one, tree)
