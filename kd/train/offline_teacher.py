"""A teacher's top-k logits over packed rows: what an offline-teacher cache holds
(kd.data.teacher_cache writes and reads it; kd.cache_teacher and kd.jobs.llm.write_cache make it).
"""

import jax
import numpy as np

from kd import data as data_lib
from kd import models
from kd.losses import topk
from kd.train import config_check
from kd.train import schedules
from kd.train import step as step_lib


def cache_rows(teacher, teacher_params, batches, *, k: int, temperature: float,
               chunk_size: int = 0):
  """Yields one dict per packed row: the batch fields plus topk_ids, topk_logits, lse.

  With `chunk_size` the teacher's logits are made and reduced to top-k `chunk_size` tokens at a
  time (the same rows; no [B, T, V] logits held)."""
  @jax.jit
  def teacher_topk(params, batch):
    if not chunk_size:
      logits = step_lib.forward(teacher, params, batch)['logits']
      return topk.topk_from_logits(logits, k, temperature=temperature)
    hidden = step_lib.forward(teacher, params, batch, return_hidden_only=True)['hidden']
    return topk.topk_from_hidden(hidden, models.head_fn(teacher, params), k,
                                 temperature=temperature, chunk_size=chunk_size)

  for batch in batches:
    ids, values, lse = jax.device_get(teacher_topk(teacher_params, batch))
    for i in range(batch['input_ids'].shape[0]):
      row = {name: batch[name][i] for name in data_lib.FEATURES}
      row.update(topk_ids=ids[i], topk_logits=values[i].astype(np.float32), lse=lse[i])
      yield row


def cache_temperature(config) -> float:
  """The one temperature a cache's logsumexp is stored at: config.temperature, refused unless
  it is a constant."""
  low, high = schedules.bounds(config.temperature)
  if low != high:
    raise config_check.ConfigError(
        'a teacher cache stores the logsumexp at one temperature; config.temperature must be '
        f'a constant, got {config.temperature!r}')
  return low
