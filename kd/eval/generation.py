"""Quality of generated responses, judged by the teacher (dialogue task).

Teacher-forced perplexity scores a student on the dataset's responses; an on-policy student is
trained on its own samples instead, so it is also judged on what it writes: the student answers
held-out prompts greedily and the teacher's per-token NLL of those answers is reported (lower:
the teacher finds them more likely), with their mean length in tokens.
"""

from __future__ import annotations

import jax
import numpy as np

from kd import losses
from kd.data import dialogue


def teacher_nll_of_samples(model, params, teacher, teacher_params, batches,
                           max_batches: int = 0) -> dict[str, float]:
  """{'sample_teacher_nll', 'sample_tokens'} over `batches` (kd.data.dialogue layout).

  Rows with no response tokens (an eval batch's padding) are left out. `model` / `teacher`:
  flax modules (an ensemble teacher works too); greedy decoding, so the result is repeatable.
  """
  total = count = rows = 0.0
  for batch in batches[:max_batches or None]:
    scored = dialogue.answered((model, params), batch, temperature=0.0)
    real = (np.asarray(batch['loss_mask']).sum(1) > 0)[:, None]
    mask = np.asarray(scored['loss_mask']) * real
    logits = teacher.apply(teacher_params, scored['input_ids'],
                           attention_mask=scored['attention_mask'],
                           positions=scored['positions'])['logits']
    s, c = jax.device_get(losses.ce_sum(logits, scored['labels'], mask=mask))
    total, count, rows = total + float(s), count + float(c), rows + float(real.sum())
  return {'sample_teacher_nll': total / max(count, 1.0), 'sample_tokens': count / max(rows, 1.0)}
