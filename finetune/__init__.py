"""finetune: a plain-PyTorch engine for fine-tuning encoder-decoder transformers."""
from .adapters import load_adapter, save_adapter
from .config import TrainConfig
from .data import DataError, read_pairs
from .engine import Engine
from .freeze import bitfit, freeze, trainable_report, unfreeze
from .guards import TrainingStopped
from .lora import apply_lora, merge_lora
from .masks import shift_tokens_right
from .methods import METHODS, apply_method, new_tensor_lr
from .models import load_seq2seq
from .noise import NoiseConfig, add_noise

__all__ = ["Engine", "TrainConfig", "TrainingStopped", "DataError", "read_pairs", "shift_tokens_right",
           "freeze", "unfreeze", "bitfit", "trainable_report", "apply_lora", "save_adapter", "load_adapter",
           "merge_lora", "NoiseConfig", "add_noise", "METHODS", "apply_method", "new_tensor_lr", "load_seq2seq"]
__version__ = "0.1.0"
