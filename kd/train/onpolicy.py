"""On-policy distillation (GKD, Agarwal et al. 2024): the student writes what it is taught on.

With probability `fraction` (λ) a batch's responses are replaced by the student's own samples
for its prompts; the teacher then scores those tokens inside the usual train step, and the
configured divergence is applied on the generated tokens only (the prompt stays masked, as do
the tokens after a row's <eos>). λ = 0 is supervised KD on the dataset's responses, λ = 1 fully
on-policy. Which batches are generated is a pure function of (seed, step), and so is the
sampling key, so a resumed run makes the same choices and samples.

Batches use kd.data.dialogue's layout (they carry `prompt_ids` / `prompt_mask`).
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np

from kd.data import dialogue
from kd.data import tokenizer as tok_lib
from kd.models import sample
from kd.train import student_weights


@dataclasses.dataclass(frozen=True)
class OnPolicy:
  """config.on_policy: λ and how the student samples."""
  fraction: float = 0.0
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0
  eos_id: int = tok_lib.EOS_ID  # where a sample ends (a chat model's end-of-turn token)

  @classmethod
  def from_config(cls, c, seed: int, eos_id: int = tok_lib.EOS_ID) -> OnPolicy:
    c = dict(c or {})
    out = cls(fraction=float(c.get('fraction', 0.0)),
              temperature=float(c.get('temperature', 1.0)), top_k=int(c.get('top_k', 0)),
              top_p=float(c.get('top_p', 1.0)), seed=seed, eos_id=eos_id)
    if not 0.0 <= out.fraction <= 1.0:
      raise ValueError(f'on_policy.fraction must be in [0, 1], got {out.fraction}.')
    return out

  def use_student(self, step: int) -> bool:
    """Whether batch `step` is generated: a Bernoulli(λ) draw, pure of (seed, step)."""
    if self.fraction <= 0.0:
      return False
    return bool(np.random.default_rng([self.seed, step, 0x6b64]).random() < self.fraction)

  def student_batch(self, module, params, batch: dict, step: int, plan=None) -> dict:
    """`batch` with its responses replaced by the student's samples (same length), generated
    by `plan` (a kd.parallel plan holding `params` as its state's; default one device)."""
    generate = plan.generate if plan is not None else sample.generate
    return dialogue.answered((module, params), batch, generate, self.eos_id,
                             temperature=self.temperature,
                             top_k=self.top_k, top_p=self.top_p,
                             rng=jax.random.fold_in(jax.random.key(self.seed), step))

  def batch_fn(self, module, plan=None):
    """loop.fit's `batch_fn(state, batch, step)`: generates the chosen batches, with the
    state placed by `plan` (the run's kd.parallel plan; default one device). `module` is the
    train step's student (a PEFT student's: LoRA-wrapped, its params joined with state.frozen).

    `fn.stats` counts what was generated (batches, tokens up to each <eos>, seconds), for the
    run's report only; the batches do not depend on it.
    """
    stats = {'generated_batches': 0, 'generated_tokens': 0, 'generation_s': 0.0}

    def fn(state, batch, step):
      if not self.use_student(step):
        return batch
      t0 = time.perf_counter()
      variables = student_weights.joined(state.params, state.frozen)  # a PEFT base joined
      out = self.student_batch(module, variables, batch, step, plan)
      stats['generated_tokens'] += int(jax.device_get(out['loss_mask']).sum())
      stats['generation_s'] += time.perf_counter() - t0
      stats['generated_batches'] += 1
      return out

    fn.stats = stats
    return fn
