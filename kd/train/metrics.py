"""Metric aggregation as (sum, count) and writers: JSONL + TensorBoard events in the workdir."""

import json
import os

import numpy as np


def is_pair(v) -> bool:
  return isinstance(v, (tuple, list)) and len(v) == 2


class Accumulator:
  """Sums (sum, count) pairs over steps, so a logged mean is exact over the window."""

  def __init__(self):
    self.pairs, self.last = {}, {}

  def add(self, metrics: dict, prefix: str = '') -> None:
    for k, v in metrics.items():
      if isinstance(v, dict):
        self.add(v, prefix=f'{prefix}{k}/')
      elif is_pair(v):
        s, c = self.pairs.get(prefix + k, (0.0, 0.0))
        self.pairs[prefix + k] = (s + float(v[0]), c + float(v[1]))
      else:
        self.last[prefix + k] = float(np.asarray(v))

  def result(self) -> dict:
    out = {k: s / max(c, 1.0) for k, (s, c) in self.pairs.items()}
    out.update(self.last)
    return out


def summarize_eval(sums: dict) -> dict:
  """Turns eval (sum, count) totals into report metrics: ce -> perplexity etc."""
  out = {k: s / max(c, 1.0) for k, (s, c) in sums.items()}
  for k in ('ce', 'teacher_ce'):
    if k in out:
      out[k.replace('ce', 'perplexity')] = float(np.exp(out[k]))
  return out


class Writer:
  """Appends metrics to `<workdir>/metrics.jsonl` and TensorBoard event files."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self._tb = SummaryWriter(os.path.join(workdir, 'tb'))

  def write(self, step: int, metrics: dict, split: str = 'train') -> None:
    if not self.enabled:
      return
    row = {'step': int(step), 'split': split, **{k: float(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(row) + '\n')
    self._jsonl.flush()
    for k, v in metrics.items():
      self._tb.add_scalar(f'{split}/{k}', float(v), int(step))

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()
