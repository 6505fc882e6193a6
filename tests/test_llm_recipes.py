"""Every recipe in configs/llm at full shape: the KD step compiled on abstract parameters (no
weights) on 8 simulated devices, its mesh layout and XLA's memory plan printed and checked
against the models' published sizes and an independent count of what each device must hold."""

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Published parameter counts (the model cards / safetensors index of each checkpoint).
PARAMS = {'meta-llama/Llama-3.1-8B-Instruct': 8_030_261_248,
          'meta-llama/Llama-3.2-1B-Instruct': 1_235_814_400,
          'Qwen/Qwen2.5-7B-Instruct': 7_615_616_512,
          'Qwen/Qwen2.5-0.5B-Instruct': 494_032_768,
          'google/gemma-2-9b-it': 9_241_705_984,
          'google/gemma-2-2b-it': 2_614_341_888}
CUT16 = 8_030_261_248 - 16 * 218_112_000  # Llama-3.1-8B without 16 of its 32 layers


def test_recipes_compile_at_full_shape_and_fit_their_memory_plan():
  out = subprocess.run([sys.executable, 'tests/llm_recipe_plan.py'], cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  plans = {p['recipe']: p for p in map(json.loads, out.stdout.splitlines())}
  print(json.dumps(plans, indent=1))  # the layouts and memory plans (pytest -s shows them)
  want = {'llama31_8b_to_1b': ('meta-llama/Llama-3.1-8B-Instruct',
                               PARAMS['meta-llama/Llama-3.2-1B-Instruct']),
          'llama31_8b_to_1b:cut16': ('meta-llama/Llama-3.1-8B-Instruct', CUT16),
          'qwen25_7b_to_05b': ('Qwen/Qwen2.5-7B-Instruct', PARAMS['Qwen/Qwen2.5-0.5B-Instruct']),
          'gemma2_9b_to_2b': ('google/gemma-2-9b-it', PARAMS['google/gemma-2-2b-it'])}
  assert set(plans) == set(want)
  for name, (teacher, student) in want.items():
    p = plans[name]
    assert p['mesh'] == {'data': 1, 'fsdp': 8, 'tensor': 1}
    assert (p['teacher_params'], p['student_params']) == (PARAMS[teacher], student)
    assert all("'fsdp'" in s for s in {**p['teacher_layout'], **p['student_layout']}.values())
    # Per device: the bf16 teacher and the student's float32 params and two Adam moments, each
    # split 8 ways, plus this device's rows of the batch.
    batch = 5 * 4 * p['tokens_per_step'] / 8
    held = (2 * p['teacher_params'] + 3 * 4 * p['student_params']) / 8 + batch
    assert abs(p['argument_gb'] * 2**30 - held) / held < 0.01, (name, p['argument_gb'])
    assert abs(p['output_gb'] * 2**30 - 12 * p['student_params'] / 8) / held < 0.01
    assert p['temp_gb'] > 0
