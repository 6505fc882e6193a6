"""Parameter-efficient students: LoRA (via qwix, kd.peft.lora), bottleneck adapters, prefix and
prompt tuning (Decoder fields, kd.peft.adapters)."""

from kd.peft import adapters
from kd.peft.lora import (LoraConfig, combine, count, from_config, init_lora, is_lora,
                          lora_model, merge, split, target_kernels)

__all__ = ['LoraConfig', 'adapters', 'combine', 'count', 'from_config', 'init_lora', 'is_lora',
           'lora_model', 'merge', 'split', 'target_kernels']
