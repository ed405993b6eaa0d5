"""finetune: a plain-PyTorch engine for fine-tuning encoder-decoder transformers."""
from finetune.cpu_caches import bound_shape_caches

bound_shape_caches()  # before any model runs: oneDNN reads these once (finetune/cpu_caches.py)

from finetune.data import (DataError, NoiseConfig, add_noise, code_summary_pairs, codespell_pairs, read_pairs,
                           shift_tokens_right)
from finetune.methods import (METHODS, add_weighted_adapter, apply_lora, apply_method, bitfit, delete_adapter,
                              disable_adapter, freeze, load_adapter, merge_adapter, merge_lora, new_tensor_lr,
                              quantize_4bit, quantize_int8, save_adapter, set_adapter, trainable_report, unfreeze)
from finetune.models import bert2bert, load_quantized, load_seq2seq, minilm_path
from finetune.train import Engine, TrainConfig, TrainingStopped

__all__ = ["Engine", "TrainConfig", "TrainingStopped", "DataError", "read_pairs", "shift_tokens_right",
           "freeze", "unfreeze", "bitfit", "trainable_report", "apply_lora", "save_adapter", "load_adapter",
           "merge_lora", "set_adapter", "disable_adapter", "delete_adapter", "merge_adapter", "add_weighted_adapter",
           "NoiseConfig", "add_noise", "METHODS", "apply_method", "new_tensor_lr", "load_seq2seq",
           "load_quantized",
           "bert2bert", "minilm_path", "quantize_int8", "quantize_4bit", "codespell_pairs", "code_summary_pairs"]
__version__ = "0.1.0"
