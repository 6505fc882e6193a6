"""The batches two hosts would feed a mesh, read in one process (the references of the
two-process tests)."""

import json

import numpy as np


class Concat:
  """Batches of several shard iterators side by side; checkpoints as one (bytes) state."""

  def __init__(self, iterators):
    self.iterators = iterators

  def __next__(self):
    parts = [next(it) for it in self.iterators]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def get_state(self) -> bytes:
    return json.dumps([it.get_state() for it in self.iterators]).encode()

  def set_state(self, state: bytes) -> None:
    for it, s in zip(self.iterators, json.loads(state)):
      it.set_state(s)

  def start_prefetch(self) -> None:
    pass
