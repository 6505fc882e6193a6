"""`jax.pmap` data parallelism: params replicated on every local device, the batch split.

The step is the unchanged pure `train_step` with `Spec.axis_name = 'batch'`, which sums every
loss term's (sum, count), the micro-batch counts and the gradients over the devices before the
optimizer update: every device applies the same update, that of the whole batch. One host only
(use the mesh plan across hosts).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from kd.train import step as step_lib

AXIS = 'batch'


def replicate(tree, devices=None):
  """One copy of every leaf per device, stacked on a leading axis; copied device to device."""
  devices = list(devices or jax.local_devices())
  sharding = NamedSharding(Mesh(np.array(devices), (AXIS,)), P(AXIS))

  def rep(x):
    x = jnp.asarray(x)
    shards = [jax.device_put(x[None], d) for d in devices]
    return jax.make_array_from_single_device_arrays((len(devices),) + x.shape, sharding, shards)
  return jax.tree.map(rep, tree)


def unreplicate(tree):
  """The first device's copy of every leaf (no leading axis)."""
  return jax.tree.map(lambda x: x.addressable_data(0)[0], tree)


def shard_batch(batch, n: int | None = None):
  """[B, ...] host arrays -> [n, B/n, ...]: device i gets rows i*B/n ... (i+1)*B/n - 1."""
  n = n or jax.local_device_count()
  return jax.tree.map(lambda x: np.reshape(x, (n, x.shape[0] // n) + x.shape[1:]), batch)


def _eval_sums(params, teacher_params, batch, spec):
  return jax.lax.psum(step_lib.eval_step(params, teacher_params, batch, spec), AXIS)


class PmapPlan:
  """Replicated params, `jax.pmap` over the local devices; see the module docstring."""

  name = 'pmap'

  def __init__(self, devices=None):
    self.devices = list(devices or jax.local_devices())
    self.data_parallel = len(self.devices)

  def init_state(self, init_fn):
    return replicate(init_fn(), self.devices)

  def place_state(self, state):
    return replicate(state, self.devices)

  def place_teacher(self, params):
    return None if params is None else replicate(params, self.devices)

  def unreplicate(self, tree):
    return unreplicate(tree)

  def shard_batch(self, batch):
    return shard_batch(batch, len(self.devices))

  def train_step(self, spec: step_lib.Spec, state=None):
    """fn(state, teacher_params, batch) -> (state, metrics of device 0); `state` is donated."""
    del state  # the replicated layout does not depend on it
    spec = dataclasses.replace(spec, axis_name=AXIS)
    fn = jax.pmap(functools.partial(step_lib.train_step, spec=spec), axis_name=AXIS,
                  devices=self.devices, donate_argnums=(0,))

    def train(state, teacher_params, batch):
      state, metrics = fn(state, teacher_params, self.shard_batch(batch))
      return state, unreplicate(metrics)
    return train

  def eval_step(self, spec: step_lib.Spec):
    fn = jax.pmap(functools.partial(_eval_sums, spec=spec), axis_name=AXIS, devices=self.devices)
    return lambda params, teacher_params, batch: unreplicate(
        fn(params, teacher_params, self.shard_batch(batch)))
