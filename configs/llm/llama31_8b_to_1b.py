r"""Llama-3.1-8B-Instruct distilled into Llama-3.2-1B-Instruct (same tokenizer), on a GPU or TPU mesh.

  python -m kd.main --config=configs/llm/llama31_8b_to_1b.py --workdir=gs://bucket/kd/llama \
      --config.data.train=/data/train.jsonl --config.data.eval=/data/dev.jsonl

Both checkpoints come from the Hugging Face Hub (meta-llama/..., gated: log in first) or local
directories (--config.teacher.path=DIR --config.student.path=DIR). The teacher runs in bf16,
split over every device (FSDP); the student keeps float32 master weights, computes in bf16,
recomputes its layers in the backward pass, and makes its 128k-vocabulary logits 512 positions
at a time. Loss 0.5·CE + 0.5·KL (T=1), 2,000 steps of 32 × 2048 tokens, AdamW 1e-5.
Args: `cut16` distils into a 16-layer cut of the teacher instead (every other layer, as in
MaxText's layer-recovery runs). What the step needs per device, before any weights are fetched:
tests/test_llm_recipes.py compiles it on 8 simulated devices and prints XLA's memory plan.
"""

from kd.jobs import llm_config


# Args that build every other arg into a config (tests/test_configs.py builds each of them).
EXAMPLES = ('tiny', 'cut16')


def get_config(arg=None):
  c = llm_config.base()
  args = llm_config.at_scale(c, arg, valid=('cut16', 'tiny'))
  c.teacher.path = 'meta-llama/Llama-3.1-8B-Instruct'
  c.student.update(source='path', path='meta-llama/Llama-3.2-1B-Instruct')
  if 'cut16' in args:
    c.student.update(source='cut', path='', layers=tuple(range(0, 32, 2)))
  c.data.update(train='shakespeare[:90%]+stsb:train', eval='shakespeare[90%:],stsb:dev')
  return c
