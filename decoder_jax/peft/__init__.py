"""Parameter-efficient fine-tuning: LoRA adapters on the model's Dense layers."""

from decoder_jax.model.config import LoraConfig
from decoder_jax.peft.lora import (check_targets, combine, count, init_lora_params,
                                   is_lora_param, merge, split)

__all__ = ["LoraConfig", "check_targets", "combine", "count", "init_lora_params",
           "is_lora_param", "merge", "split"]
