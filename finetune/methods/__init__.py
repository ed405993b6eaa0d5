"""Methods: what fine-tuning changes in a model before the optimizer is built.

    registry    the methods by name (`METHODS`, `apply_method`), each with its settings and learning rate
    freeze      freezing by pattern, BitFit (with zero-initialised biases where a family has none)
    lora        LoRA / DoRA layers (`apply_lora`, `merge_lora`)
    adapters    LoRA adapters on disk, in this package's format or PEFT's
    adapter_set several adapters on one base by name: switch, disable, delete, merge one, weighted combinations
    quant       what the int8 and 4-bit layers share; int8, int4: bitsandbytes' Linear8bitLt and NF4 / FP4
"""
from finetune.methods.adapter_set import (active_adapter, adapter_names, add_weighted_adapter, delete_adapter,
                                          disable_adapter, merge_adapter, set_adapter)
from finetune.methods.adapters import load_adapter, save_adapter
from finetune.methods.freeze import bitfit, freeze, trainable_report, unfreeze
from finetune.methods.int4 import quantize_4bit
from finetune.methods.int8 import quantize_int8
from finetune.methods.lora import LoRALinear, apply_lora, merge_lora
from finetune.methods.registry import (ADAPTER_LR, FULL_LR, LORA_SETTINGS, METHODS, REGISTRY, Method, Setting,
                                       apply_method, encoder_pattern, exact_names_pattern, method, new_tensor_lr,
                                       register, settings_of, with_defaults)

__all__ = ["METHODS", "REGISTRY", "Method", "Setting", "LORA_SETTINGS", "ADAPTER_LR", "FULL_LR", "register", "method",
           "apply_method", "settings_of", "with_defaults", "new_tensor_lr", "encoder_pattern", "exact_names_pattern",
           "freeze", "unfreeze", "bitfit", "trainable_report", "apply_lora", "merge_lora", "LoRALinear",
           "save_adapter", "load_adapter", "quantize_int8", "quantize_4bit", "active_adapter", "adapter_names",
           "set_adapter", "disable_adapter", "delete_adapter", "merge_adapter", "add_weighted_adapter"]
