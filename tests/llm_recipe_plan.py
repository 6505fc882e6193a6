"""Prints llm.plan() of every recipe in configs/llm as JSON lines: run in its own process, since
it needs 8 simulated devices (tests/test_llm_recipes.py).

The architectures are the models' public config.json values (no weights, no hub access).
"""

import importlib.util
import json
import os
import pathlib
import sys

os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'

ROOT = pathlib.Path(__file__).resolve().parents[1]
_LLAMA3_ROPE = dict(rope_type='llama3', low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192)
ARCHITECTURES = {
    'meta-llama/Llama-3.1-8B-Instruct': dict(
        model_type='llama', vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        rope_theta=500000.0, rope_scaling=dict(_LLAMA3_ROPE, factor=8.0),
        max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False),
    'meta-llama/Llama-3.2-1B-Instruct': dict(
        model_type='llama', vocab_size=128256, hidden_size=2048, intermediate_size=8192,
        num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
        rope_theta=500000.0, rope_scaling=dict(_LLAMA3_ROPE, factor=32.0),
        max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True),
    'Qwen/Qwen2.5-7B-Instruct': dict(
        model_type='qwen2', vocab_size=152064, hidden_size=3584, intermediate_size=18944,
        num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
        rope_theta=1000000.0, max_position_embeddings=32768, rms_norm_eps=1e-6,
        use_sliding_window=False, sliding_window=131072, max_window_layers=28,
        tie_word_embeddings=False),
    'Qwen/Qwen2.5-0.5B-Instruct': dict(
        model_type='qwen2', vocab_size=151936, hidden_size=896, intermediate_size=4864,
        num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
        rope_theta=1000000.0, max_position_embeddings=32768, rms_norm_eps=1e-6,
        use_sliding_window=False, sliding_window=131072, max_window_layers=21,
        tie_word_embeddings=True),
}
_GEMMA2 = dict(model_type='gemma2', vocab_size=256000, head_dim=256, rope_theta=10000.0,
               max_position_embeddings=8192, rms_norm_eps=1e-6, query_pre_attn_scalar=256,
               sliding_window=4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
               hidden_activation='gelu_pytorch_tanh', tie_word_embeddings=True)
ARCHITECTURES.update({
    'google/gemma-2-9b-it': dict(_GEMMA2, hidden_size=3584, intermediate_size=14336,
                                 num_hidden_layers=42, num_attention_heads=16,
                                 num_key_value_heads=8),
    'google/gemma-2-2b-it': dict(_GEMMA2, hidden_size=2304, intermediate_size=9216,
                                 num_hidden_layers=26, num_attention_heads=8,
                                 num_key_value_heads=4),
})
RECIPES = [('llama31_8b_to_1b', None), ('llama31_8b_to_1b', 'cut16'), ('qwen25_7b_to_05b', None),
           ('gemma2_9b_to_2b', None)]


def main():
  from kd.jobs import llm  # pylint: disable=g-import-not-at-top
  names = sys.argv[1:] or [f'{r}:{a}' if a else r for r, a in RECIPES]
  for name in names:
    stem, _, arg = name.partition(':')
    spec = importlib.util.spec_from_file_location(stem, ROOT / 'configs' / 'llm' / f'{stem}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg or None)
    student = ARCHITECTURES.get(config.student.path) if config.student.source == 'path' else None
    out = llm.plan(config, ARCHITECTURES[config.teacher.path], student)
    print(json.dumps({'recipe': name, **out}), flush=True)


if __name__ == '__main__':
  main()
