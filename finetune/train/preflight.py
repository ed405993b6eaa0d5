"""`finetune check` / `Engine.check`: the fine-tuning recipe's preflight, on the real model and the user's data.

Each check gives PASS, WARN or FAIL with what to do:

    evaluation        the evaluation data read (if given) and the evaluation settings able to act: FAIL for
                      best_metric / eval_every / eval_max_samples / eval_num_beams without evaluation data, or a
                      best model whose evaluations would all come after the last step (what `fit` refuses)
    special tokens    pad / decoder start / eos agree across the model config, its generation config and the
                      tokenizer (a disagreement is a FAIL naming both ids)
    first batch       one real batch decoded - source, decoder input, labels - so a wrong shift or pad in the
                      labels is visible; FAIL when the decoder input does not start with the start token, is not
                      the labels shifted right, or the labels hold the pad id instead of -100
    truncation        how many sources / targets the length limits cut (WARN when any)
    parameter groups  decay and learning rate of each group; FAIL when a 1-D tensor (bias, norm gain) decays, or
                      when newly initialised tensors train at the pretrained rate and it is too small to move them
    gradients         one backward: every trainable tensor gets a gradient, not all zero (FAIL otherwise; FAIL
                      when nothing trains)
    overfit           the first batch trained alone for `steps` steps: loss near zero and token accuracy 100%
    outputs differ    after that overfit, greedy generation gives different outputs for different inputs (the
                      bert2bert "same output for every input" failure)

The training checks run on a copy of the model, so checking changes nothing.
"""
from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass, field

import torch

from finetune.data.collate import IGNORE_INDEX
from finetune.data.pairs import read_pairs
from finetune.evaluate.metrics import collapse_of

SMALL_LR = 1e-4  # a rate at or below this barely moves randomly initialised tensors in an epoch (docs/guards.md)


@dataclass
class CheckReport:
    rows: list[tuple[str, str, str]] = field(default_factory=list)  # (status, check, detail)

    def add(self, status: str, name: str, detail: str) -> None:
        self.rows.append((status, name, detail))

    @property
    def failed(self) -> bool:
        return any(status == "FAIL" for status, _, _ in self.rows)

    def __str__(self) -> str:
        width = max((len(n) for _, n, _ in self.rows), default=0)
        lines = []
        for status, name, detail in self.rows:
            first, *rest = detail.split("\n")
            lines.append(f"{status:<4}  {name:<{width}}  {first}")
            lines += [f"{'':<4}  {'':<{width}}  {line}" for line in rest]
        verdict = "FAIL: fix the failed checks before a long run" if self.failed else "ready to train"
        return "\n".join(lines + ["", verdict])


def check(engine, train, new_parameters=(), steps: int = 200, eval=None) -> CheckReport:
    rng = torch.get_rng_state()
    try:
        with tempfile.TemporaryDirectory(prefix="finetune-check-") as scratch:  # the trial run's output folder
            return _check(engine, train, new_parameters, steps, eval, scratch)
    finally:
        torch.set_rng_state(rng)  # checking changes nothing, the random state included


def _check_evaluation(report, engine, eval, data) -> None:
    """The batches, the evaluation data and settings, as `Engine.prepare` will see them."""
    from finetune.data.batching import describe_batches, padding_fraction
    from finetune.data.sources import DataError
    from finetune.train.guards import check_evaluation_settings

    cfg = engine.config
    detail = "no evaluation data"
    if eval is not None:
        try:
            detail = f"{len(read_pairs(eval, cfg.source_field, cfg.target_field, 'evaluation data'))} evaluation pairs"
        except DataError as err:
            report.add("FAIL", "evaluation", str(err))
            return
    total = data.schedule()[1]
    first, examples = data.first_batches()
    report.add("PASS", "batches", f"{len(first)} batches {describe_batches(cfg)} in the first epoch (a stream: "
               f"buffer), padding {padding_fraction(first, examples, engine.dist.world_size):.1%}")
    try:
        check_evaluation_settings(cfg, eval is not None, total)
    except ValueError as err:
        report.add("FAIL", "evaluation", str(err))
        return
    report.add("PASS", "evaluation", f"{detail}; {total} optimizer steps, "
               + (f"best model by {cfg.best_metric}" if cfg.best_metric else "no best model (best_metric unset)"))


def _check(engine, train, new_parameters, steps: int, eval, scratch: str) -> CheckReport:
    report = CheckReport()
    tokens, tok = engine.tokens, engine.tokenizer
    report.add("PASS", "special tokens",
               f"pad {tokens.pad} {tok.convert_ids_to_tokens(tokens.pad)!r}, decoder start {tokens.decoder_start} "
               f"{tok.convert_ids_to_tokens(tokens.decoder_start)!r}, eos {tokens.eos} "
               f"{tok.convert_ids_to_tokens(tokens.eos)!r}: config, generation config and tokenizer agree")
    cfg = engine.config
    data = _training_data(report, engine, train)
    if data is None:
        return report
    _check_evaluation(report, engine, eval, data)
    pairs, examples, _ = data.sample()
    counts = examples.report
    size = min(len(examples), max(2, min(cfg.batch_size, 8)))
    batch = engine.collate(examples[:size])
    _check_batch(report, engine, batch, pairs[:size])
    cut_src, cut_tgt = counts.truncated_sources, counts.truncated_targets
    report.add("WARN" if cut_src or cut_tgt else "PASS", "truncation",
               f"{cut_src} of {len(pairs)} sources longer than max_source_length={cfg.max_source_length}, {cut_tgt} "
               f"targets longer than max_target_length={cfg.max_target_length}"
               + ("; raise the limits or check the data" if cut_src or cut_tgt else ""))
    if not _check_groups(report, engine, new_parameters):
        return report
    _check_training(report, engine, batch, pairs[:size], steps, scratch)
    return report


def _training_data(report, engine, train):
    """The training data as the run will read it (finetune.data.training: the cache it uses, or a stream), or None
    after a FAIL row; the "data" row says which source and which cache."""
    from finetune.data.sources import DataError
    from finetune.data.training import open_training_data

    try:
        data = open_training_data(train, engine.tokenizer, engine.config, engine.tokens.decoder_start, engine.dist)
        detail = data.sample()[2]
    except (DataError, ValueError) as err:
        report.add("FAIL", "data", str(err))
        return None
    what = train if isinstance(train, str) else f"a {type(train).__name__} of pairs"
    report.add("PASS", "data", f"training data {what}: {detail}")
    return data


def _check_batch(report, engine, batch, pairs) -> None:
    tok, tokens = engine.tokenizer, engine.tokens
    inputs, labels = batch["decoder_input_ids"], batch["labels"]
    shown = []
    for row in range(min(3, len(pairs))):
        shown.append(f"source:        {tok.decode(batch['input_ids'][row], skip_special_tokens=False)!r}")
        shown.append(f"decoder input: {tok.convert_ids_to_tokens(inputs[row].tolist())}")
        shown.append(f"labels:        {[t if t != IGNORE_INDEX else -100 for t in labels[row].tolist()]} = "
                     f"{tok.decode([t for t in labels[row].tolist() if t != IGNORE_INDEX], skip_special_tokens=False)!r}")
    problems = []
    if not bool((inputs[:, 0] == tokens.decoder_start).all()):
        problems.append(f"the decoder input does not start with the decoder start token {tokens.decoder_start}")
    real = labels[:, :-1] != IGNORE_INDEX
    if not bool((inputs[:, 1:][real] == labels[:, :-1][real]).all()):
        problems.append("the decoder input is not the labels shifted right by one (the shift is missing or wrong)")
    eos_positions = labels == tokens.eos
    if bool(((labels == tokens.pad) & ~eos_positions).any()):
        problems.append(f"the labels hold the pad id {tokens.pad} where they should hold -100 (padding is trained "
                        "as a target)")
    if problems:
        report.add("FAIL", "first batch", "; ".join(problems) + ". Use the engine's collator (Engine.collate).\n"
                   + "\n".join(shown))
    else:
        report.add("PASS", "first batch", "decoder input = start token + labels shifted right; label padding "
                   "-100\n" + "\n".join(shown))


def _check_groups(report, engine, new_parameters) -> bool:
    from finetune.train.optim import param_groups

    cfg, lr = engine.config, engine.recipe().lr
    try:
        groups = param_groups(engine.model, cfg.weight_decay, cfg.no_decay, cfg.lr_overrides, lr)
    except ValueError as err:
        report.add("FAIL", "parameter groups", str(err))
        return False
    if not groups:
        report.add("FAIL", "parameter groups", "nothing is trainable: every tensor is frozen, so training would "
                   "change nothing (see finetune.trainable_report)")
        return False
    lines, problems = [], []
    for g in groups:
        n = sum(p.numel() for p in g["params"])
        lines.append(f"weight_decay {g['weight_decay']:g}, lr {g.get('lr', lr):g}: {len(g['params'])} tensors, "
                     f"{n:,} parameters")
        decaying_1d = [name for name, p in zip(g["names"], g["params"]) if p.dim() < 2 and g["weight_decay"]]
        if decaying_1d:
            problems.append(f"1-D tensors decay (biases / norm gains must not): {decaying_1d[:3]}")
    lr_of = {name: g.get("lr", lr) for g in groups for name in g["names"]}
    new = [n for n in new_parameters if n in lr_of]
    status = "PASS"
    if new:
        slow = [n for n in new if lr_of[n] <= lr]
        if slow and lr <= SMALL_LR:
            problems.append(f"{len(slow)} newly initialised tensors (e.g. {slow[0]}) train at the pretrained rate "
                            f"{lr:g}, too small to move them from their random start in a short run; give them "
                            "their own rate (finetune.new_tensor_lr, [model] new_lr = 1e-3)")
        elif slow:
            status = "WARN"
            lines.append(f"{len(slow)} newly initialised tensors train at the pretrained rate {lr:g}; a higher "
                         "rate of their own (new_tensor_lr) usually trains them faster")
        else:
            lines.append(f"{len(new)} newly initialised tensors train at their own rate {lr_of[new[0]]:g}")
    if problems:
        report.add("FAIL", "parameter groups", "; ".join(problems) + "\n" + "\n".join(lines))
        return True
    report.add(status, "parameter groups", "no decay on 1-D tensors (biases, norm gains)\n" + "\n".join(lines))
    return True


def _check_training(report, engine, batch, pairs, steps: int, scratch: str) -> None:
    """The trial steps on the model itself, its trainable tensors (and train / eval mode) put back afterwards: a
    copy of the model would double the memory an 11B base needs, and the frozen tensors never change."""
    model = engine.model
    saved = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    training = model.training
    try:
        _trial(report, engine, batch, pairs, steps, scratch)
    finally:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in saved:
                    p.copy_(saved[name])
                    p.grad = None
        model.train(training)


def _trial(report, engine, batch, pairs, steps: int, scratch: str) -> None:
    from finetune.train.guards import TrainingStopped

    model = engine.model
    config = dataclasses.replace(engine.config, output_dir=scratch,
                                 progress=False, grad_accum=1, max_grad_norm=engine.config.max_grad_norm)
    trial = type(engine)(model, engine.tokenizer, config, noise=None)
    trial.build_optimizer(1, 0, schedule="constant")
    try:
        trial.optimizer.zero_grad(set_to_none=True)
        stats = trial.train_step([batch])
        report.add("PASS", "gradients", f"every trainable tensor got a gradient (first loss {stats['loss']:.4f})")
    except TrainingStopped as err:
        report.add("FAIL", "gradients", str(err))
        return
    history = trial.overfit_batch(pairs, steps=steps)  # the run's own learning rates (and lr_overrides)
    last = history[-1]
    ok = last["loss"] < 0.1 and last["token_accuracy"] == 1.0
    report.add("PASS" if ok else "FAIL", "overfit one batch",
               f"{len(pairs)} pairs, {steps} steps at the run's learning rates: loss {history[0]['loss']:.3f}"
               f" -> {last['loss']:.4f}, token accuracy {last['token_accuracy']:.1%}"
               + ("" if ok else "; a model that cannot learn one batch will not learn the data: check the labels, "
                  "the shift, what is frozen and the learning rate"))
    outputs = trial.generate([s for s, _ in pairs], num_beams=1)
    targets = {t for _, t in pairs}
    same = len(set(outputs)) == 1 and len(targets) > 1
    variety = collapse_of(outputs)
    nearly = variety["collapsed"] and len(targets) > 1
    report.add("FAIL" if same else "WARN" if nearly else "PASS", "outputs differ",
               (f"after the overfit every input gives the same output {outputs[0]!r}: the decoder ignores the encoder "
                "(cross-attention not trained? wrong attention mask?)") if same else
               (f"after the overfit {variety['top_share']:.0%} of the inputs give the same output "
                f"{variety['top_prediction']!r}: the decoder barely reads the encoder") if nearly else
               f"{len(set(outputs))} different outputs for {len(pairs)} inputs, e.g. {pairs[0][0]!r} -> {outputs[0]!r}")
    del trial
