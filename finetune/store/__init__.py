"""The output folder a run owns: its lock, the refusal to overwrite another run's outputs, atomic folder swaps,
and the exported `model/` (a plain transformers checkpoint).

    outputs     the lock, what a fresh run may replace, atomic replacement of a folder
    export      `model/` and what the method's layers write beside it
"""
from finetune.store.export import save_model_folder
from finetune.store.outputs import OutputDirError, RunLock

__all__ = ["save_model_folder", "OutputDirError", "RunLock"]
