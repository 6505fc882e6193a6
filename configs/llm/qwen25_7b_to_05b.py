r"""Qwen2.5-7B-Instruct distilled into Qwen2.5-0.5B-Instruct on chat data, on a GPU or TPU mesh.

  python -m kd.main --config=configs/llm/qwen25_7b_to_05b.py --workdir=gs://bucket/kd/qwen \
      --config.data.train=/data/chat_train.jsonl --config.data.eval=/data/chat_dev.jsonl

The two share Qwen's tokenizer but not its padding: the teacher's embedding has 152064 rows, the
student's 151936, so the logit losses compare the first 151936 (the real tokens) and nothing
else. Chat records ({"messages": [...]}) are rendered with Qwen's template and only assistant
tokens count. The teacher runs in bf16 split over every device; the student keeps float32
master weights, computes in bf16 with recomputed layers and 512-position logit chunks. Loss
0.5·CE + 0.5·KL (T=1), 2,000 steps of 32 × 2048 tokens, AdamW 1e-5. By default the data are the
offline paraphrase chats (kd/data/sources.py, stsb_paraphrase). tests/test_llm_recipes.py
compiles the step on 8 simulated devices and prints XLA's memory plan.
"""

from kd.jobs import llm_config


def get_config(arg=None):
  c = llm_config.base()
  llm_config.at_scale(c, arg)
  c.teacher.path = 'Qwen/Qwen2.5-7B-Instruct'
  c.student.update(source='path', path='Qwen/Qwen2.5-0.5B-Instruct')
  c.data.update(train='stsb_paraphrase:train', eval='stsb_paraphrase:dev')
  return c
