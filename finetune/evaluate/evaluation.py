"""Evaluation and generation with a trained engine: teacher-forced loss, generated text, and its metrics.

`evaluate` runs over length-grouped batches under inference mode: for each, the teacher-forced loss (the
engine's TrainingLoss), then generation (greedy or beam search), decoded and scored at once (exact match,
accuracy by edit distance, ROUGE; finetune.evaluate.metrics), so no logits are kept. Predictions go next to
metrics.jsonl in the output folder.
"""
from __future__ import annotations

import json
import os

import torch

from finetune import distributed
from finetune.checks import is_integer
from finetune.data.batching import LengthGroupedBatches, lengths_of
from finetune.data.collate import IGNORE_INDEX
from finetune.evaluate.generation import generate_kwargs
from finetune.evaluate.metrics import GenerationMetrics
from finetune.models.tokens import check_length


@torch.inference_mode()
def evaluate(engine, data, num_beams: int | None = None, max_new_tokens: int | None = None,
             predictions_file: str | None = "eval_predictions.jsonl", final: bool = False) -> dict:
    """`data`: (pairs, examples) tokenised by the engine. Returns loss, exact_match, by_edit_distance, ROUGE.
    Under torchrun (DDP) every rank must call it: each generates every world-th batch, and every rank gets the
    metrics of all of them (the same figures as one process)."""
    cfg, model = engine.config, engine.model
    pairs, examples = data
    check_generation(model, num_beams, max_new_tokens)
    was_training = model.training
    model.eval()
    sampler = LengthGroupedBatches(lengths_of(examples)[0], cfg.eval_batch_size or cfg.batch_size,
                                   shuffle=False)
    batches, dist = sampler.batches(0), engine.dist
    split = dist.enabled and not engine.sharded  # FSDP: every rank runs every forward (its shards gather)
    done = {}  # batch number -> (its loss sum, label tokens, generated texts)
    for number, indices in enumerate(batches):
        if split and number % dist.world_size != dist.rank:
            continue  # another rank's batch
        batch = {k: v.to(engine.device) for k, v in engine.collate([examples[i] for i in indices]).items()}
        done[number] = (float(engine.loss(model, batch)[0]), int((batch["labels"] != IGNORE_INDEX).sum()),
                        generate_ids(engine, batch["input_ids"], batch["attention_mask"], num_beams, max_new_tokens))
    if split:  # every rank's batches, then the sums in batch order: the figures of one process
        done = {k: v for part in distributed.gather_objects(done, dist) for k, v in part.items()}
    metrics, predictions, loss_sum, tokens = GenerationMetrics(), [None] * len(pairs), 0.0, 0
    for number, indices in enumerate(batches):
        batch_loss, batch_tokens, texts = done[number]
        loss_sum, tokens = loss_sum + batch_loss, tokens + batch_tokens
        for i, text in zip(indices, texts):
            source, target = pairs[i]
            predictions[i] = {"source": source, "target": target, "prediction": text,
                              "correct": metrics.add(source, target, text)}
    result = {"loss": loss_sum / max(1, tokens), **metrics.result(), "step": engine.global_step,
              "num_beams": num_beams or cfg.num_beams,
              **generate_kwargs(cfg, num_beams or cfg.num_beams), **({"final": True} if final else {})}
    if predictions_file and engine.dist.is_main:
        os.makedirs(cfg.output_dir, exist_ok=True)
        with open(os.path.join(cfg.output_dir, predictions_file), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in predictions)
        engine.recorder.record({"split": "eval", **result})
        if result["collapsed"]:
            say_collapse(engine.recorder, result)
    model.train(was_training)
    return result


def say_collapse(recorder, result: dict) -> None:
    """A collapsed evaluation is never silent: a line in the log and a `collapse` event in metrics.jsonl."""
    message = (f"step {result['step']}: the evaluation COLLAPSED: {result['top_share']:.0%} of the {result['n']} "
               f"predictions are {result['top_prediction']!r} ({result['distinct_share']:.0%} distinct); the "
               "decoder is not reading the inputs (new cross-attention not trained yet? learning rate?)")
    recorder.log(message)
    import warnings

    warnings.warn(message, stacklevel=3)
    recorder.event("collapse", result["step"], top_share=result["top_share"], distinct_share=result["distinct_share"],
                   prediction=result["top_prediction"], final=bool(result.get("final")))


@torch.inference_mode()
def generate(engine, texts, num_beams: int | None = None, max_new_tokens: int | None = None) -> list[str]:
    """One output per input text (greedy when num_beams=1, beam search otherwise), in batches."""
    cfg, model = engine.config, engine.model
    texts = [texts] if isinstance(texts, str) else list(texts)
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise TypeError(f"generate: texts[{bad[0]}] is {type(texts[bad[0]]).__name__}, expected a string")
    check_generation(model, num_beams, max_new_tokens)
    was_training = model.training
    model.eval()
    size, outputs = cfg.eval_batch_size or cfg.batch_size, []
    for i in range(0, len(texts), size):
        enc = engine.tokenizer(texts[i:i + size], padding=True, truncation=True, max_length=cfg.max_source_length,
                               return_tensors="pt")
        outputs += generate_ids(engine, enc["input_ids"].to(engine.device), enc["attention_mask"].to(engine.device),
                                num_beams, max_new_tokens)
    model.train(was_training)
    return outputs


def check_generation(model, num_beams, max_new_tokens) -> None:
    for name, value in (("num_beams", num_beams), ("max_new_tokens", max_new_tokens)):
        if value is not None and not (is_integer(value) and value >= 1):
            raise ValueError(f"{name}={value!r}: must be an integer >= 1")
    if max_new_tokens is not None:
        check_length(model, "max_new_tokens", max_new_tokens, "max_new_tokens")


def generate_ids(engine, input_ids, attention_mask, num_beams=None, max_new_tokens=None) -> list[str]:
    cfg, tokens = engine.config, engine.tokens
    num_beams = num_beams or cfg.num_beams
    with engine.precision.autocast():
        out = engine.model.generate(
            input_ids=input_ids, attention_mask=attention_mask, num_beams=num_beams,
            max_new_tokens=max_new_tokens or cfg.max_new_tokens, decoder_start_token_id=tokens.decoder_start,
            eos_token_id=tokens.eos, pad_token_id=tokens.pad, do_sample=False, **generate_kwargs(cfg, num_beams),
        )
    return engine.tokenizer.batch_decode(out.cpu(), skip_special_tokens=True)
