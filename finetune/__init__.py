"""finetune: a plain-PyTorch engine for fine-tuning encoder-decoder transformers."""
from .config import TrainConfig
from .data import DataError, read_pairs
from .engine import Engine, TrainingStopped
from .freeze import bitfit, freeze, trainable_report, unfreeze
from .lora import apply_lora, load_adapter, merge_lora, save_adapter
from .masks import shift_tokens_right
from .noise import NoiseConfig, add_noise

__all__ = ["Engine", "TrainConfig", "TrainingStopped", "DataError", "read_pairs", "shift_tokens_right",
           "freeze", "unfreeze", "bitfit", "trainable_report", "apply_lora", "save_adapter", "load_adapter",
           "merge_lora", "NoiseConfig", "add_noise"]
__version__ = "0.1.0"
