"""Where the parallelism is chosen: `config.parallel.mode` -> a plan that wraps the pure step.

Every plan has the same small interface, so the loop never asks which one it holds:
  data_parallel              how many ways the global batch is split
  init_state(fn)             `fn()` (pure) placed on the devices (sharded at birth on a mesh)
  place_state(state)         an existing state (e.g. from the host) placed on the devices
  place_teacher(params)      the teacher's params placed (None stays None)
  unreplicate(tree)          one logical copy, what checkpoints hold (identity but for pmap)
  train_step(step, state)    fn(state, teacher_params, this process's batch) -> (state, metrics),
                             `step` compiled for the devices (see below)
  eval_step(evaluate)        fn(params, teacher_params, eval batch) -> {name: (sum, count)}
  generate(model, ids, ...)  kd.models.sample.generate with the placed params, the prompt rows
                             split like a train batch; returns this process's rows
A plan receives the pure function it compiles: `step(state, teacher_params, batch, *,
axis_name=None, strided_accum=False)` (kd.train.step.train_step with its Spec bound), to which it
passes the arguments only it knows (pmap: the axis to sum over; mesh: strided micro-batches), and
`evaluate(params, teacher_params, batch)`. Nothing here imports the training code.
"""


import jax

from kd.models import sample
from kd.parallel import mesh as mesh_lib
from kd.parallel import pmap as pmap_lib


class SinglePlan:
  """One device, `jax.jit`: the behaviour before parallelism existed."""

  name = 'single'
  data_parallel = 1

  def init_state(self, init_fn):
    return init_fn()

  def place_state(self, state):
    return state

  def place_teacher(self, params):
    return params

  def unreplicate(self, tree):
    return tree

  def train_step(self, step, state=None):
    del state
    return jax.jit(step, donate_argnums=(0,))

  def eval_step(self, evaluate):
    return jax.jit(evaluate)

  def generate(self, model, prompt_ids, prompt_mask=None, **kw):
    return sample.generate(model, prompt_ids, prompt_mask, **kw)


def _axes(names: str) -> tuple:
  return tuple(a.strip() for a in str(names).split(',') if a.strip())


def _single(cfg):
  del cfg
  return SinglePlan()


def _pmap(cfg):
  del cfg
  if jax.process_count() > 1:
    raise ValueError("parallel.mode='pmap' runs on one host; use mode='mesh' across hosts")
  return pmap_lib.PmapPlan()


def _mesh(cfg):
  mesh = mesh_lib.make_mesh(cfg.get('data', -1), cfg.get('fsdp', 1), cfg.get('tensor', 1))
  return mesh_lib.MeshPlan(mesh, teacher_fsdp=_axes(cfg.get('teacher_fsdp', 'fsdp')))


MODES = {'single': _single, 'pmap': _pmap, 'mesh': _mesh}


def _mode(cfg) -> str:
  mode = (cfg or {}).get('mode', 'single')
  if mode not in MODES:
    raise ValueError(f"parallel.mode='{mode}' is unknown; valid: {sorted(MODES)}")
  return mode


def make(cfg=None):
  """The plan for `config.parallel` (None or no `mode`: single device)."""
  cfg = cfg or {}
  return MODES[_mode(cfg)](cfg)


def data_parallel_size(cfg=None, devices: int | None = None) -> int:
  """How many ways `config.parallel` splits the global batch, without building anything."""
  cfg = cfg or {}
  devices = jax.device_count() if devices is None else devices
  mode = _mode(cfg)
  if mode == 'pmap':
    if jax.process_count() > 1:
      raise ValueError("parallel.mode='pmap' runs on one host; use mode='mesh' across hosts")
    return devices
  if mode == 'mesh':
    data, fsdp, _ = mesh_lib.resolve_shape(cfg.get('data', -1), cfg.get('fsdp', 1),
                                           cfg.get('tensor', 1), devices)
    unknown = set(_axes(cfg.get('teacher_fsdp', 'fsdp'))) - set(mesh_lib.BATCH_AXES)
    if unknown:
      raise ValueError(f'parallel.teacher_fsdp names {sorted(unknown)}; valid mesh axes: '
                       f"{list(mesh_lib.BATCH_AXES)} ('tensor' already splits the teacher by "
                       'name)')
    return data * fsdp
  return 1
