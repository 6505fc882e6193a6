"""`jax.pmap` data parallelism: params replicated on every local device, the batch split.

The step is the unchanged pure train step, given `axis_name='batch'`: it then sums every
loss term's (sum, count), the micro-batch counts and the gradients over the devices before the
optimizer update, so every device applies the same update, that of the whole batch. One host
only (use the mesh plan across hosts).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from kd.models import sample

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


@functools.lru_cache(maxsize=32)
def _pmapped_generate(module, devices: tuple, static: tuple):
  """sample.decode over the devices: replicated params, rows and keys split, settings
  broadcast (cached, so a run compiles it once per setting)."""
  fn = functools.partial(sample.decode, module, **dict(static))
  return jax.pmap(fn, axis_name=AXIS, devices=list(devices),
                  in_axes=(0, 0, 0, 0, None, None, None, None))


def _eval_sums(params, teacher_params, batch, evaluate):
  return jax.lax.psum(evaluate(params, teacher_params, batch), AXIS)


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

  def train_step(self, step, state=None):
    """fn(state, teacher_params, batch) -> (state, metrics of device 0); `state` is donated."""
    del state  # the replicated layout does not depend on it
    fn = jax.pmap(functools.partial(step, axis_name=AXIS),
                  axis_name=AXIS, devices=self.devices, donate_argnums=(0,))

    def train(state, teacher_params, batch):
      state, metrics = fn(state, teacher_params, self.shard_batch(batch))
      return state, unreplicate(metrics)
    return train

  def eval_step(self, evaluate):
    fn = jax.pmap(functools.partial(_eval_sums, evaluate=evaluate), axis_name=AXIS,
                  devices=self.devices)
    return lambda params, teacher_params, batch: unreplicate(
        fn(params, teacher_params, self.shard_batch(batch)))

  def generate(self, model, prompt_ids, prompt_mask=None, *, max_new_tokens: int,
               temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
               eos_id=None, pad_id: int = 0, rng=None) -> np.ndarray:
    """kd.models.sample.generate with replicated params (a pmap state's): device i decodes
    rows i*B/n ... with its own key, `jax.random.split(rng, n)[i]` (so samples differ from one
    device's; greedy decoding is the same). Returns [B, max_new_tokens] on the host."""
    module, params = sample.module_and_params(model)
    ids, mask, rng = sample.check_prompts(prompt_ids, prompt_mask, max_new_tokens=max_new_tokens,
                                          temperature=temperature, top_k=top_k, top_p=top_p,
                                          rng=rng)
    n = len(self.devices)
    if ids.shape[0] % n:
      raise ValueError(f'{ids.shape[0]} prompts do not split over {n} devices; use a batch '
                       f'that is a multiple of {n}')
    traced, static = sample.settings(max_new_tokens=max_new_tokens, temperature=temperature,
                                     top_k=top_k, top_p=top_p, eos_id=eos_id, pad_id=pad_id)
    fn = _pmapped_generate(module, tuple(self.devices), tuple(sorted(static.items())))
    out = fn(params, *self.shard_batch((ids, mask)), jax.random.split(rng, n), *traced)
    return np.asarray(out).reshape(ids.shape[0], max_new_tokens)
