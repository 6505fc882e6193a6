"""Parallelism for the pure train step: one device, `jax.pmap`, or `jax.jit` over a mesh.

  plan = parallel.make(config.parallel)     # mode 'single' | 'pmap' | 'mesh'
  state = plan.init_state(lambda: step.create_state(params_fn(), tx, seed))
  train = plan.train_step(functools.partial(step.train_step, spec=spec), state)
  # train(state, teacher_params, batch) -> (state, metrics), compiled for the plan's devices
See `plan.py` for the interface, `pmap.py` and `mesh.py` for the two parallel wrappers,
`rules.py` for how arrays are sharded and `distributed.py` for multi-host start-up.
"""

from kd.parallel.distributed import initialize, to_host
from kd.parallel.mesh import MeshPlan, make_mesh
from kd.parallel.plan import MODES, SinglePlan, data_parallel_size, make
from kd.parallel.pmap import PmapPlan, replicate, shard_batch, unreplicate
from kd.parallel.rules import TENSOR_AXIS, partition_spec, tree_specs

__all__ = ['initialize', 'to_host', 'MeshPlan', 'make_mesh', 'MODES', 'SinglePlan', 'data_parallel_size',
           'make', 'PmapPlan', 'replicate', 'shard_batch', 'unreplicate', 'TENSOR_AXIS',
           'partition_spec', 'tree_specs']
