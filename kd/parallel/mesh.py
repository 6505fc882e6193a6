"""`jax.jit` over a device mesh ('data', 'fsdp', 'tensor'): data, FSDP and tensor parallelism.

The batch is split over ('data', 'fsdp'); student params and optimizer state follow
`kd.parallel.rules` (FSDP over 'fsdp', Megatron-style over 'tensor'); the teacher follows the same
rules with its own FSDP axes (`teacher_fsdp`, e.g. ('data', 'fsdp') to split a teacher that fits
no single device over every data-parallel device too). XLA inserts the all-gathers and
reduce-scatters; the step itself is the unchanged pure `train_step`, whose (sum, count) terms are
sums over the global batch because the batch is one global array.

Multi-host: every process builds the same mesh over all devices, feeds its own rows of the batch
(`jax.make_array_from_process_local_data`) and holds only its shards of the state; orbax writes
and restores those global arrays.
"""

import functools
import math

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from kd.models import sample
from kd.parallel import rules

AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')  # the batch dimension is split over both


def resolve_shape(data: int, fsdp: int, tensor: int, devices: int) -> tuple:
  """(data, fsdp, tensor) with one -1 filled in from the device count; checks the product."""
  shape = [int(data), int(fsdp), int(tensor)]
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f'parallel (data, fsdp, tensor) = {tuple(shape)}: give positive sizes, at '
                     'most one of them -1 (= the devices left)')
  if -1 in shape:
    rest = math.prod(s for s in shape if s != -1)
    if devices % rest:
      raise ValueError(f'the other mesh sizes multiply to {rest}, which does not divide the '
                       f'{devices} devices; pick sizes whose product divides the device count')
    shape[shape.index(-1)] = devices // rest
  if math.prod(shape) != devices:
    raise ValueError(f'parallel (data, fsdp, tensor) = {tuple(shape)} uses {math.prod(shape)} '
                     f'devices but there are {devices}; make the product equal the device count '
                     '(or set one size to -1)')
  return tuple(shape)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else list(devices)
  shape = resolve_shape(data, fsdp, tensor, len(devices))
  return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def shardings(tree, mesh: Mesh, fsdp_axes: tuple = ('fsdp',)):
  """NamedShardings of every leaf of `tree` (arrays or ShapeDtypeStructs) by `rules`."""
  specs = rules.tree_specs(tree, dict(mesh.shape), fsdp_axes=fsdp_axes)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, P))


def place(tree, target):
  """Puts `tree` onto the shardings `target` (a matching tree).

  Leaves may be host arrays (the same on every process), single-device arrays, or global arrays
  of another sharding (resharded on device, e.g. the teacher from its own training stage).
  """
  if jax.process_count() == 1:
    return jax.device_put(tree, target)
  leaves, treedef = jax.tree.flatten(tree)
  targets = treedef.flatten_up_to(target)
  out, moved = list(leaves), []
  for i, (x, s) in enumerate(zip(leaves, targets)):
    if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(s, x.ndim):
      continue
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      moved.append(i)
      continue
    host = np.asarray(x)
    out[i] = jax.make_array_from_callback(host.shape, s, lambda index, h=host: h[index])
  if moved:  # global arrays of another sharding: one program reshards them all on device
    new = jax.jit(lambda xs: xs, out_shardings=[targets[i] for i in moved])(
        [leaves[i] for i in moved])
    for i, x in zip(moved, new):
      out[i] = x
  return treedef.unflatten(out)


def _strided(step):
  """`step` with its micro-batches strided (kd.train.step._split): with the batch axis sharded,
  every device then holds an equal part of every micro-batch."""
  return functools.partial(step, strided_accum=True)


class MeshPlan:
  """`jax.jit` with NamedShardings over `mesh`; see the module docstring."""

  name = 'mesh'

  def __init__(self, mesh: Mesh, teacher_fsdp: tuple = ('fsdp',)):
    unknown = set(teacher_fsdp) - set(BATCH_AXES)  # 'tensor' already splits by name
    if unknown:
      raise ValueError(f'teacher_fsdp names {sorted(unknown)}; valid: {list(BATCH_AXES)}')
    self.mesh = mesh
    self.teacher_fsdp = tuple(teacher_fsdp)
    self.data_parallel = mesh.shape['data'] * mesh.shape['fsdp']
    self.replicated = NamedSharding(mesh, P())
    self.batch_sharding = NamedSharding(mesh, P(BATCH_AXES))

  def state_shardings(self, state):
    return shardings(state, self.mesh)

  def teacher_shardings(self, params):
    return shardings(params, self.mesh, self.teacher_fsdp)

  def init_state(self, init_fn):
    """`init_fn()` (pure, no arguments) computed by one jit whose outputs are already sharded,
    so the whole state never sits on one device."""
    out = self.state_shardings(jax.eval_shape(init_fn))
    return jax.jit(init_fn, out_shardings=out)()

  def place_state(self, state):
    return place(state, self.state_shardings(state))

  def place_teacher(self, params):
    return None if params is None else place(params, self.teacher_shardings(params))

  def unreplicate(self, tree):
    return tree  # global arrays already are one logical copy

  def shard_batch(self, batch):
    """This process's rows of the batch -> one global array split over ('data', 'fsdp')."""
    return jax.make_array_from_process_local_data(self.batch_sharding, batch)

  def shard_global_batch(self, batch):
    """A batch that every process holds whole (eval batches) -> the same global array."""
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(
        self.batch_sharding, x, x.shape), batch)

  def train_step(self, step, state):
    """fn(state, teacher_params, local batch) -> (state, metrics); `state` fixes the shardings
    (arrays or ShapeDtypeStructs); the state argument is donated."""
    fn = jax.jit(_strided(step),
                 out_shardings=(self.state_shardings(state), self.replicated),
                 donate_argnums=(0,))
    return self._in_mesh(
        lambda state, teacher_params, batch: fn(state, teacher_params, self.shard_batch(batch)))

  def lower_train_step(self, step, state, teacher_params, batch):
    """The train step lowered on shapes (ShapeDtypeStructs are enough: nothing is made), with
    the shardings `train_step` gives its arguments and results; `.compile().memory_analysis()`
    is then what XLA plans per device, before any weights exist."""
    fn = jax.jit(_strided(step),
                 in_shardings=(self.state_shardings(state), self.teacher_shardings(teacher_params),
                               jax.tree.map(lambda _: self.batch_sharding, batch)),
                 out_shardings=(self.state_shardings(state), self.replicated),
                 donate_argnums=(0,))
    with jax.set_mesh(self.mesh):
      return fn.lower(state, teacher_params, batch)

  def _in_mesh(self, fn):
    """fn, traced and run with this mesh set (jax.set_mesh): a kernel XLA cannot partition
    (kd.models.splash) finds it there and runs per shard."""
    def call(*args):
      with jax.set_mesh(self.mesh):
        return fn(*args)
    return call

  def eval_step(self, evaluate):
    """fn(params, teacher_params, batch) -> {name: (sum, count)}; `batch` is the same on every
    process."""
    fn = jax.jit(evaluate, out_shardings=self.replicated)
    return self._in_mesh(lambda params, teacher_params, batch: fn(
        params, teacher_params, self.shard_global_batch(batch)))

  def generate(self, model, prompt_ids, prompt_mask=None, **kw):
    """kd.models.sample.generate on the sharded params with the prompt rows split over
    ('data', 'fsdp') like a train batch: each device decodes its rows (XLA partitions the KV
    cache and the loop the same way), and the samples equal one device's for the same key (the
    random bits do not depend on the sharding). `prompt_ids` are this process's rows, and
    so are the returned tokens: with several processes, the global result's local rows (every
    process must call this alike, as it does a train step; the same key gives each row the
    sample it would get in one process)."""
    out = sample.generate(model, prompt_ids, prompt_mask, place=self.shard_batch, **kw)
    if jax.process_count() == 1:
      return out
    return multihost_utils.global_array_to_host_local_array(out, self.mesh, P(BATCH_AXES))
