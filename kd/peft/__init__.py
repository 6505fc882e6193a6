"""Parameter-efficient fine-tuning: LoRA adapters on kd models (via qwix)."""

from kd.peft.lora import (LoraConfig, combine, count, from_config, init_lora, is_lora,
                          lora_model, merge, split, target_kernels)

__all__ = ['LoraConfig', 'combine', 'count', 'from_config', 'init_lora', 'is_lora', 'lora_model',
           'merge', 'split', 'target_kernels']
