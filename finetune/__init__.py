"""finetune: a plain-PyTorch engine for fine-tuning encoder-decoder transformers."""
from .config import TrainConfig
from .data import DataError, read_pairs
from .engine import Engine, TrainingStopped
from .freeze import bitfit, freeze, trainable_report, unfreeze
from .masks import shift_tokens_right

__all__ = ["Engine", "TrainConfig", "TrainingStopped", "DataError", "read_pairs", "shift_tokens_right",
           "freeze", "unfreeze", "bitfit", "trainable_report"]
__version__ = "0.1.0"
