"""DistiLLM's adaptive off-policy approach (Ko et al., ICML 2024): reuse what the student wrote.

On-policy KD (kd.train.onpolicy) pays for a generation on every on-policy batch. DistiLLM keeps
the student-generated outputs (SGOs) in a replay buffer and trains on them again, and decides
how often to use SGOs at all by watching the validation loss:

* `ReplayBuffer`: a FIFO of rows of generated batches, sampled from a numpy Generator seeded by
  (seed, step); its state is plain numpy arrays and ints (`state_dict` / `from_state_dict`).
* `AdaptiveSchedule`: the probability p (the paper's φ) of using SGOs for a batch; a pure
  `update(state, val_loss) -> state` after each validation check.
* `AdaptiveOffPolicy`: a loop.fit `batch_fn(state, batch, step)`: with probability p the batch
  is replaced by SGOs, either freshly generated (kd.train.onpolicy's sampler, added to the
  buffer) or replayed from the buffer. Every choice is a pure function of (seed, step, p,
  buffer); p and the buffer are the only state, and `state_dict()` holds both.

kd.train.loop.fit calls `observe_validation` with each periodic eval's held-out CE, and saves
`state_dict()` with every checkpoint (restored on resume), so a resumed run continues with the
same p and buffer. Config: `config.on_policy.adaptive` (kd.train.run.on_policy_fn).

Batches use kd.data.dialogue's layout (they carry `prompt_ids` / `prompt_mask`).
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import numpy as np

from kd.train import onpolicy
from kd.train import student_weights

_CHOICE_TAG, _SAMPLE_TAG = 0x7270, 0x7273  # streams of their own, apart from onpolicy's draws
_COUNTERS = {'data': 'data_batches', 'generate': 'generated_batches',
             'replay': 'replayed_batches'}


class ReplayBuffer:
  """The last `capacity` rows added (rows of dicts of arrays), oldest evicted first."""

  def __init__(self, capacity: int, seed: int = 0):
    if capacity < 1:
      raise ValueError(f'replay buffer capacity must be >= 1 row, got {capacity}.')
    self.capacity, self.seed = int(capacity), int(seed)
    self.size = self.head = 0  # rows held; the slot the next row goes to
    self.arrays: dict[str, np.ndarray] = {}  # [capacity, ...] per key, allocated on first add

  def __len__(self) -> int:
    return self.size

  @property
  def full(self) -> bool:
    return self.size == self.capacity

  def add(self, batch: dict) -> None:
    """Appends the rows of `batch` (arrays with one leading batch dim), evicting the oldest."""
    batch = {k: np.asarray(v) for k, v in jax.device_get(dict(batch)).items()}
    n = len(next(iter(batch.values())))
    if not self.arrays:
      self.arrays = {k: np.zeros((self.capacity,) + v.shape[1:], v.dtype)
                     for k, v in batch.items()}
    want = {k: (a.shape[1:], a.dtype) for k, a in self.arrays.items()}
    got = {k: (v.shape[1:], v.dtype) for k, v in batch.items()}
    if got != want or any(len(v) != n for v in batch.values()):
      raise ValueError(f'rows do not match the replay buffer: buffer holds {want}, got {got} '
                       f'with leading dims {[len(v) for v in batch.values()]}.')
    keep = min(n, self.capacity)  # a batch larger than the buffer keeps its last rows
    slots = (self.head + np.arange(keep)) % self.capacity
    for k, v in batch.items():
      self.arrays[k][slots] = v[n - keep:]
    self.head = int((self.head + keep) % self.capacity)
    self.size = min(self.size + keep, self.capacity)

  def rows(self) -> dict[str, np.ndarray]:
    """Every row held, oldest first."""
    slots = (self.head - self.size + np.arange(self.size)) % self.capacity
    return {k: a[slots] for k, a in self.arrays.items()}

  def sample(self, batch_size: int, step: int) -> dict[str, np.ndarray]:
    """`batch_size` rows drawn uniformly (without replacement when enough are held), a pure
    function of (seed, step) and the buffer's contents, so a resumed run draws the same rows."""
    if not self.size:
      raise ValueError('cannot sample from an empty replay buffer.')
    rng = np.random.default_rng([self.seed, step, _SAMPLE_TAG])
    slots = np.sort(rng.choice(self.size, size=batch_size, replace=self.size < batch_size))
    return {k: a[slots] for k, a in self.arrays.items()}  # slots < size: all filled

  def state_dict(self) -> dict:
    return {'capacity': self.capacity, 'seed': self.seed, 'size': self.size, 'head': self.head,
            'arrays': {k: a[:self.size].copy() for k, a in self.arrays.items()}}

  @classmethod
  def from_state_dict(cls, d: dict) -> ReplayBuffer:
    out = cls(int(d['capacity']), int(d['seed']))
    out.size, out.head = int(d['size']), int(d['head'])
    for k, a in d['arrays'].items():  # slots [0, size) are the filled ones (the ring starts at 0)
      a = np.asarray(a)
      out.arrays[k] = np.zeros((out.capacity,) + a.shape[1:], a.dtype)
      out.arrays[k][:out.size] = a
    return out


@dataclasses.dataclass(frozen=True)
class ScheduleState:
  """p: probability of SGOs; reference: the validation loss rises are measured from."""
  p: float
  reference: float = math.nan
  checks: int = 0
  raises: int = 0


@dataclasses.dataclass(frozen=True)
class AdaptiveSchedule:
  """DistiLLM's adaptive SGO scheduler (Ko et al. 2024, Sec. 3, adaptive off-policy approach).

  The paper raises the probability of using SGOs when the validation loss goes up by more than
  a tolerance ε, and never lowers it. Precisely, as the authors' code does it (jongwooko/distillm, finetune.py: the
  reference is the validation loss before training, `--loss-eps 0.1`, step 0.1, cap 1.0,
  `--init-threshold 0.0`), at each validation check with loss L:

    if L >= reference + eps:  p = min(p + delta, p_max);  reference = L
    else:                     unchanged (the reference too: it is the loss at the last raise)

  Here the first check only sets the reference (call it once before training to match the
  paper, which evaluates at step 0).
  """
  p0: float = 0.0
  delta: float = 0.1
  p_max: float = 1.0
  eps: float = 0.1

  def __post_init__(self):
    if not 0.0 <= self.p0 <= self.p_max <= 1.0:
      raise ValueError(f'need 0 <= p0 <= p_max <= 1, got p0={self.p0}, p_max={self.p_max}.')
    if self.delta < 0 or self.eps < 0:
      raise ValueError(f'need delta >= 0 and eps >= 0, got {self.delta}, {self.eps}.')

  def init(self) -> ScheduleState:
    return ScheduleState(p=self.p0)

  def update(self, state: ScheduleState, val_loss: float) -> ScheduleState:
    val_loss = float(val_loss)
    if not math.isfinite(val_loss):
      raise ValueError(f'validation loss {val_loss} is not finite; the schedule needs a number.')
    checks = state.checks + 1
    if state.checks == 0:
      return dataclasses.replace(state, reference=val_loss, checks=checks)
    if val_loss >= state.reference + self.eps:
      return ScheduleState(p=min(state.p + self.delta, self.p_max), reference=val_loss,
                           checks=checks, raises=state.raises + 1)
    return dataclasses.replace(state, checks=checks)


# How likely a batch of SGOs is replayed rather than generated (when the buffer allows it).
# 'linear' is the paper's default (`--replay-ratio decreasing`: generation share 1 - step/T).
REPLAY_SCHEDULES = {
    'constant': lambda fraction, step, total: fraction,
    'linear': lambda fraction, step, total: fraction * min(step / total, 1.0),
}


@dataclasses.dataclass(frozen=True)
class AdaptiveOffPolicy:
  """Adaptive off-policy SGOs: the schedule, the buffer's size, and how the student samples.

  capacity is in rows (the paper's `--capacity 1000`). With `fill_first` (the paper), batches of
  SGOs are generated until the buffer is full, and replayed only after; without it, as soon as
  it holds a batch.
  """
  schedule: AdaptiveSchedule = AdaptiveSchedule()
  capacity: int = 1000
  replay_fraction: float = 1.0
  replay_schedule: str = 'linear'
  fill_first: bool = True
  total_steps: int = 0
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0
  eos_id: int = onpolicy.tok_lib.EOS_ID  # where a sample ends (a chat model's end-of-turn token)

  def __post_init__(self):
    if self.replay_schedule not in REPLAY_SCHEDULES:
      raise ValueError(f'unknown replay_schedule {self.replay_schedule!r}; valid: '
                       f'{sorted(REPLAY_SCHEDULES)}.')
    if self.replay_schedule == 'linear' and self.total_steps < 1:
      raise ValueError("replay_schedule='linear' needs total_steps >= 1.")
    if not 0.0 <= self.replay_fraction <= 1.0:
      raise ValueError(f'replay_fraction must be in [0, 1], got {self.replay_fraction}.')
    if self.capacity < 1:
      raise ValueError(f'capacity must be >= 1 row, got {self.capacity}.')

  @classmethod
  def from_config(cls, c, seed: int, total_steps: int,
                  eos_id: int = onpolicy.tok_lib.EOS_ID) -> AdaptiveOffPolicy:
    """From a dict of this class's field names (schedule fields: p0, delta, p_max, eps)."""
    c = dict(c or {})
    c.pop('enabled', None)
    names = {f.name for f in dataclasses.fields(cls)} - {'schedule', 'seed', 'total_steps',
                                                         'eos_id'}
    sched = {k: float(c.pop(k)) for k in ('p0', 'delta', 'p_max', 'eps') if k in c}
    unknown = set(c) - names
    if unknown:
      raise ValueError(f'unknown adaptive off-policy keys {sorted(unknown)}; valid: '
                       f"{sorted(names | {'p0', 'delta', 'p_max', 'eps', 'enabled'})}.")
    return cls(schedule=AdaptiveSchedule(**sched), seed=seed, total_steps=total_steps,
               eos_id=eos_id, **c)

  def replay_probability(self, step: int) -> float:
    return REPLAY_SCHEDULES[self.replay_schedule](self.replay_fraction, step, self.total_steps)

  def choose(self, step: int, p: float, can_replay: bool) -> str:
    """'data', 'generate' or 'replay' for batch `step`: pure of (seed, step, p, can_replay)."""
    use_sgo, replay = np.random.default_rng([self.seed, step, _CHOICE_TAG]).random(2)
    if not use_sgo < p:
      return 'data'
    return 'replay' if can_replay and replay < self.replay_probability(step) else 'generate'

  def sampler(self) -> onpolicy.OnPolicy:
    """kd.train.onpolicy's generation with these sampling settings (same key per step)."""
    return onpolicy.OnPolicy(fraction=1.0, temperature=self.temperature, top_k=self.top_k,
                             top_p=self.top_p, seed=self.seed, eos_id=self.eos_id)

  def batch_fn(self, module, plan=None) -> AdaptiveBatchFn:
    return AdaptiveBatchFn(self, module, plan)


class AdaptiveBatchFn:
  """loop.fit's `batch_fn(state, batch, step)` for `AdaptiveOffPolicy`, and its state.

  `observe_validation(loss)` is called at each eval by the training loop. `stats` counts
  batches by source, generated tokens and seconds, and the current p and buffer size, for the
  run's report. `state_dict()` / `load_state_dict()` hold p, the buffer and the stats, which
  loop.fit checkpoints beside the train state.
  """

  def __init__(self, policy: AdaptiveOffPolicy, module, plan=None):
    self.policy, self.module, self.plan = policy, module, plan
    self.sampler = policy.sampler()
    self.buffer = ReplayBuffer(policy.capacity, policy.seed)
    self.schedule = policy.schedule.init()
    self.stats = {'generated_batches': 0, 'replayed_batches': 0, 'data_batches': 0,
                  'generated_tokens': 0, 'generation_s': 0.0,
                  'sgo_probability': self.schedule.p, 'buffer_rows': 0}

  def can_replay(self, batch_size: int) -> bool:
    if self.policy.fill_first:
      return self.buffer.full
    return len(self.buffer) >= min(batch_size, self.buffer.capacity)

  def __call__(self, state, batch, step):
    b = batch['input_ids'].shape[0]
    choice = self.policy.choose(step, self.schedule.p, self.can_replay(b))
    self.stats[_COUNTERS[choice]] += 1
    if choice == 'data':
      return batch
    if 'prompt_ids' not in batch:
      raise ValueError('adaptive off-policy needs dialogue batches (with prompt_ids): set '
                       "config.data.task='dialogue'.")
    if choice == 'replay':
      out = self.buffer.sample(b, step)
    else:
      t0 = time.perf_counter()
      variables = student_weights.joined(state.params, state.frozen)  # a PEFT base joined
      out = self.sampler.student_batch(self.module, variables, batch, step, self.plan)
      host = jax.device_get(out)
      self.buffer.add(host)
      self.stats['generated_tokens'] += int(host['loss_mask'].sum())
      self.stats['generation_s'] += time.perf_counter() - t0
      self.stats['buffer_rows'] = len(self.buffer)
    return out

  def observe_validation(self, loss: float) -> float:
    """Updates p from a validation loss (see AdaptiveSchedule); returns the new p."""
    self.schedule = self.policy.schedule.update(self.schedule, loss)
    self.stats['sgo_probability'] = self.schedule.p
    return self.schedule.p

  def state_dict(self) -> dict:
    return {'schedule': dataclasses.asdict(self.schedule), 'buffer': self.buffer.state_dict(),
            'stats': dict(self.stats)}

  def load_state_dict(self, d: dict) -> None:
    s = d['schedule']
    self.schedule = ScheduleState(p=float(s['p']), reference=float(s['reference']),
                                  checks=int(s['checks']), raises=int(s['raises']))
    self.buffer = ReplayBuffer.from_state_dict(d['buffer'])
    self.stats.update({k: type(v)(d['stats'][k]) for k, v in self.stats.items()})
