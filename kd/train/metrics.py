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


CALIBRATION = ('ece', 'teacher_ece')  # eval_step's per-bin sums: '<prefix>/conf_<b>', '/hit_<b>'


def expected_calibration_error(sums: dict, prefix: str = 'ece') -> float:
  """ECE = Σ_b |Σ_{i in b} conf_i − Σ_{i in b} correct_i| / N from eval_step's per-bin sums."""
  conf = {k.rsplit('_', 1)[1]: v for k, v in sums.items() if k.startswith(f'{prefix}/conf_')}
  hit = {k.rsplit('_', 1)[1]: v for k, v in sums.items() if k.startswith(f'{prefix}/hit_')}
  if not conf or set(conf) != set(hit):
    raise ValueError(f"no complete '{prefix}/conf_<bin>' and '{prefix}/hit_<bin>' sums; got "
                     f'{sorted(k for k in sums if k.startswith(prefix + "/"))}')
  total = sum(float(c) for _, c in conf.values())
  gap = sum(abs(float(conf[b][0]) - float(hit[b][0])) for b in conf)
  return gap / max(total, 1.0)


def summarize_eval(sums: dict) -> dict:
  """Turns eval (sum, count) totals into report metrics: ce -> perplexity, per-bin calibration
  sums -> ece (the bins themselves are dropped), the rest sum / count."""
  binned = tuple(f'{p}/' for p in CALIBRATION)
  out = {k: s / max(c, 1.0) for k, (s, c) in sums.items() if not k.startswith(binned)}
  for k in ('ce', 'teacher_ce'):
    if k in out:
      out[k.replace('ce', 'perplexity')] = float(np.exp(out[k]))
  for prefix in CALIBRATION:
    if any(k.startswith(f'{prefix}/') for k in sums):
      out[prefix] = expected_calibration_error(sums, prefix)
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
