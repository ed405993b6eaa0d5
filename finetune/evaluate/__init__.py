"""Evaluation: teacher-forced loss, then generation (greedy or beam search) decoded and scored.

    evaluation  `evaluate` and `generate` over an engine's model
    generation  the generation settings (length penalty, n-gram blocking, ...) and their checks
    metrics     exact match, accuracy by edit distance, ROUGE-1/2/L, BLEU, chrF
"""
from finetune.evaluate.generation import SETTINGS as GENERATION_SETTINGS
from finetune.evaluate.metrics import METRIC_DIRECTIONS, GenerationMetrics, edit_distance

__all__ = ["GENERATION_SETTINGS", "METRIC_DIRECTIONS", "GenerationMetrics", "edit_distance"]
