r"""Gemma-2-9B-it distilled into Gemma-2-2B-it on chat data, on a GPU or TPU mesh.

  python -m kd.main --config=configs/llm/gemma2_9b_to_2b.py --workdir=gs://bucket/kd/gemma2 \
      --config.data.train=/data/chat_train.jsonl --config.data.eval=/data/chat_dev.jsonl

The pair Google trained the 2B model with (Gemma 2 report: the 2B and 9B learned from a larger
teacher's distributions). Both share Gemma's 256k-token vocabulary and chat template, which has
no system role. Each model soft-caps its attention scores (50) and its logits (30), so the KL
compares the capped distributions the models actually produce; every other layer attends over
a 4096-token window. A soft-capped softmax runs the explicit attention (no fused kernel), which
holds a [heads, T, T] score array per layer: the student recomputes its layers, and the
sequences are 2048 tokens (the window does not bind below 4096). The teacher runs in bf16 split
over every device; the student keeps float32 master weights, computes in bf16 and makes its
logits 512 positions at a time. Loss 0.5·CE + 0.5·KL (T=1), 2,000 steps of 32 × 2048 tokens,
AdamW 1e-5. By default the data are the offline paraphrase chats (kd/data/sources.py,
stsb_paraphrase). tests/test_llm_recipes.py compiles the step on 8 simulated devices and
prints XLA's memory plan.
"""

from kd.jobs import llm_config


def get_config(arg=None):
  c = llm_config.base()
  llm_config.at_scale(c, arg)
  c.teacher.path = 'google/gemma-2-9b-it'
  c.student.update(source='path', path='google/gemma-2-2b-it')
  c.data.update(train='stsb_paraphrase:train', eval='stsb_paraphrase:dev')
  return c
