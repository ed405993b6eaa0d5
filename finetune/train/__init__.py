"""Training: the Engine and everything its loop uses, readable top to bottom.

    engine      `Engine`: prepare / train_step / fit / evaluate / generate / check; the step in one place
    config      `TrainConfig`, every setting checked once
    run         what a prepared run holds; what fit does at an evaluation and at the end
    best        the best evaluation so far, early stopping
    checkpointer, steplog, signals   checkpoints while it trains, the step log, SIGTERM / SIGINT
    loss        the token loss (fused with the LM head where it saves memory)
    optim       optimizers, parameter groups (decay / no decay, learning-rate overrides), schedules
    precision   fp32 / bf16 / fp16 autocast and the loss scaler
    checkpoint  checkpoints on disk: write, verify, find, resume
    recorder    metrics.jsonl and the trackers
    guards      the checks the loop makes as it runs
    preflight   `finetune check`: the recipe's PASS / WARN / FAIL table
"""
from finetune.train.config import TrainConfig
from finetune.train.engine import Engine
from finetune.train.guards import TrainingStopped

__all__ = ["Engine", "TrainConfig", "TrainingStopped"]
