"""The long-input job, side by side: our engine against HF Seq2SeqTrainer (+ PEFT) on MiniLM bert2bert summarising
standard-library code (finetune.data.builtin.code_summary_pairs: sources of 100-1,000 tokens, cut at 256).

    python benchmarks/bench_long.py                                  # every method, fp32, 3 rounds
    python benchmarks/bench_long.py --subset long --checkpointing off on --methods full lora

Both sides get the same model (the bundled all-MiniLM-L6-v2 warm-started as a bert2bert), the same pairs (the
first --steps x --batch-size of a seeded shuffle of the train split; `--subset long`: only those whose source
has >= 100 tokens, the tail where memory decides), the same lengths (--max-source-length, 32 target tokens),
batch size, length grouping (ours by default, the peer's `train_sampling_strategy="group_by_length"`), AdamW,
learning rates (pretrained --lr, new tensors --new-lr), linear schedule with 5% warm-up, weight decay, clipping,
precision,
activation checkpointing (non-reentrant on both sides) and the same trainable tensors (both counts printed: they
must be equal, or the run stops). Each run is a fresh process; ours and the peer alternate (the peer first on odd
rounds); the table gives the median of the rounds. Per run: samples/s and real (non-padding) tokens/s from the
end of the first step to the end of the last; memory as the whole-life peak RSS of the process (ru_maxrss, never
reset: what an OOM killer sees), beside the peak before training (the model and pairs, the same on both sides:
`setup_peak_rss_mib` in results.json); our MFU = the FLOPs of the real tokens per second / this machine's measured matmul
peak of the precision (benchmarks/matmul_peak.py): the linear layers' (2 per weight forward, 2 for the input
gradient, 2 more where the weight trains) plus attention's (scores and weighted sum, forward and backward, as PaLM
counts them: 12 x hidden x queries x keys per layer, for encoder self-, decoder self- and cross-attention of each
pair); element-wise work is not counted. Engine `packed`: ours with packed batches (TrainConfig.pack, no padding
computed), beside `ours` (padded, length-grouped); the peer pads as it does. Output: results.json, results.md in --out.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

METHODS = ("full", "bitfit", "lora", "int8-lora", "qlora", "dora")
TARGET_LENGTH = 32
LONG = 100  # --subset long: sources of at least this many tokens


def job_pairs(tok, args) -> list[tuple[str, str]]:
    """The benchmark's pairs: a seeded shuffle of the train split (targets lowercased: the tokenizer is uncased),
    the long tail only with --subset long, the first steps x batch of them."""
    from finetune.data.builtin import code_summary_pairs

    pairs = [(c, s.lower()) for c, s in code_summary_pairs("train")]
    random.Random(0).shuffle(pairs)
    if args.subset == "long":
        lengths = [len(x) for x in tok([c for c, _ in pairs])["input_ids"]]
        pairs = [p for p, n in zip(pairs, lengths) if n >= LONG]
    need = args.steps * args.batch_size
    if len(pairs) < need:
        raise SystemExit(f"--steps {args.steps} x --batch-size {args.batch_size} needs {need} pairs, the {args.subset} "
                         f"subset has {len(pairs)}")
    return pairs[:need]


def flops_per_token(model) -> tuple[float, float]:
    """(per source token, per target token) FLOPs of the linear layers in one training step: 2 per weight forward,
    2 for the input gradient, 2 more where the weight trains. The decoder's cross-attention key / value layers
    read the source, so they count per source token."""
    import torch

    source = target = 0.0
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not (isinstance(module, torch.nn.Linear) or getattr(type(module), "is_quantized_linear", False)):
            continue
        if ".lora_" in name or name.endswith(".inner") or weight is None:
            continue
        out_f, in_f = getattr(module, "out_features", None), getattr(module, "in_features", None)
        if out_f is None:
            out_f, in_f = weight.shape
        flops = 2 * in_f * out_f * (2 + (1 if weight.requires_grad else 0))
        reads_source = name.split(".")[0] == "encoder" or ("crossattention" in name and name.endswith(("key", "value")))
        if reads_source:
            source += flops
        else:
            target += flops
    return source, target


def attention_flops(model, src: list[int], tgt: list[int]) -> float:
    """Attention FLOPs of one training step over pairs of these lengths (see the module docstring)."""
    enc, dec = model.config.encoder, model.config.decoder
    return 12 * sum(enc.hidden_size * enc.num_hidden_layers * s * s
                    + dec.hidden_size * dec.num_hidden_layers * (t * t + t * s) for s, t in zip(src, tgt))


def worker(args) -> dict:
    import torch

    from bench_real import _peer_groups
    from bench_train import peer_model
    from finetune import Engine, TrainConfig, apply_method, new_tensor_lr, trainable_report
    from finetune.models import bert2bert, minilm_path

    torch.manual_seed(0)
    built = bert2bert(minilm_path())
    model, tok, new = built.model, built.tokenizer, built.new_parameters
    pairs = job_pairs(tok, args)
    src = [min(len(x), args.max_source_length) for x in tok([s for s, _ in pairs])["input_ids"]]
    tgt = [min(len(x) - 1, TARGET_LENGTH) for x in tok(text_target=[t for _, t in pairs])["input_ids"]]
    checkpointing = args.checkpointing == "on"
    times = []
    setup_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # model and pairs, before either side
    if args.engine in ("ours", "packed"):
        apply_method(model, args.method, new, lora_targets=None)
        trainable = trainable_report(model).trainable
        cfg = TrainConfig(lr=args.lr, lr_overrides=new_tensor_lr(new, args.new_lr), weight_decay=0.01,
                          warmup_ratio=0.05, epochs=1, batch_size=args.batch_size, precision=args.precision,
                          optimizer="adamw", max_source_length=args.max_source_length,
                          max_target_length=TARGET_LENGTH, grad_checkpointing=checkpointing, progress=False,
                          save_model=False, output_dir=tempfile.mkdtemp(), seed=0, pack=args.engine == "packed")
        engine = Engine(model, tok, cfg)
        engine.fit(pairs, on_step=lambda engine, stats: times.append(time.perf_counter()))
        flops_model = engine.model
    else:
        from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments, TrainerCallback

        model = peer_model(model, args.method, new)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

        class Clock(TrainerCallback):
            def on_step_end(self, a, state, control, **kw):
                times.append(time.perf_counter())

        sources = tok([s for s, _ in pairs], truncation=True, max_length=args.max_source_length)
        targets = tok(text_target=[t for _, t in pairs], truncation=True, max_length=TARGET_LENGTH + 1)["input_ids"]
        data = [{"input_ids": s, "attention_mask": m, "labels": t[1:] if t and t[0] == tok.cls_token_id else t}
                for s, m, t in zip(sources["input_ids"], sources["attention_mask"], targets)]
        optimizer = torch.optim.AdamW(_peer_groups(model, set(new), args), lr=args.lr, fused=True)
        targs = Seq2SeqTrainingArguments(
            output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch_size, num_train_epochs=1,
            learning_rate=args.lr, weight_decay=0.01, lr_scheduler_type="linear",
            warmup_steps=math.ceil(0.05 * args.steps), logging_steps=10**6, save_strategy="no", report_to=[],
            bf16=args.precision == "bf16", use_cpu=True, dataloader_num_workers=0, max_grad_norm=1.0,
            disable_tqdm=True, seed=0, train_sampling_strategy="group_by_length",
            gradient_checkpointing=checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None)
        trainer = Seq2SeqTrainer(model=model, args=targs, train_dataset=data, optimizers=(optimizer, None),
                                 data_collator=DataCollatorForSeq2Seq(tok, model=model, label_pad_token_id=-100),
                                 callbacks=[Clock()])
        trainer.train()
        flops_model = model
    seconds = times[-1] - times[0]
    timed = (len(times) - 1) / len(times)  # the steps after the first, of an average batch
    per_source, per_target = flops_per_token(flops_model)
    flops = (per_source * sum(src) + per_target * sum(tgt) + attention_flops(flops_model, src, tgt)) * timed
    return {"engine": args.engine, "method": args.method, "precision": args.precision, "subset": args.subset,
            "checkpointing": args.checkpointing, "steps": len(times), "pairs": len(pairs), "trainable": trainable,
            "samples_per_s": (len(times) - 1) * args.batch_size / seconds,
            "tokens_per_s": (sum(src) + sum(tgt)) * timed / seconds, "gflops_per_s": flops / seconds / 1e9,
            "mean_source_tokens": sum(src) / len(src),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "setup_peak_rss_mib": setup_peak}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--checkpointing", nargs="+", choices=("off", "on"), default=["off"])
    ap.add_argument("--subset", choices=("all", "long"), default="all")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=16, help="optimizer steps a run (the first is not timed)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-source-length", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--new-lr", type=float, default=1e-3)
    ap.add_argument("--engines", nargs="+", choices=("ours", "packed", "peer"), default=["ours", "packed", "peer"],
                    help="ours: padded, length-grouped batches; packed: ours with TrainConfig.pack; peer: the Trainer")
    ap.add_argument("--out", default=None)
    ap.add_argument("--timeout", type=int, default=1200)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--engine", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--method", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        args.checkpointing = args.checkpointing[0]
        print(json.dumps(worker(args)))
        return 0
    from bench_real import machine, run_worker
    from matmul_peak import peaks

    out = args.out or os.path.join(ROOT, "benchmarks", "results", f"long_{args.subset}_{args.precision}")
    os.makedirs(out, exist_ok=True)
    runs = []
    for r in range(args.rounds):
        for checkpointing in args.checkpointing:
            for method in args.methods:
                order = list(args.engines) if r % 2 == 0 else list(reversed(args.engines))
                for engine in order:
                    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--engine", engine, "--method",
                           method, "--precision", args.precision, "--subset", args.subset, "--steps", str(args.steps),
                           "--batch-size", str(args.batch_size), "--max-source-length", str(args.max_source_length),
                           "--lr", str(args.lr), "--new-lr", str(args.new_lr), "--checkpointing", checkpointing]
                    result = run_worker(cmd, args.timeout, f"{engine} {method}")
                    result["round"] = r
                    runs.append(result)
                    print(f"round {r} ckpt {checkpointing:>3} {method:>9} {engine:>4}: {result['trainable']:>11,} "
                          f"trainable, {result['samples_per_s']:6.2f} samples/s, {result['tokens_per_s']:6.0f} "
                          f"tokens/s, peak {result['peak_rss_mib']:6.0f} MiB", flush=True)
                    same = [x["trainable"] for x in runs if x["method"] == method]
                    if len(set(same)) > 1:
                        raise SystemExit(f"{method}: the two sides train different tensors ({sorted(set(same))})")
    peak = peaks((args.precision,))[args.precision]
    info = {**machine(), "matmul_peak_gflops": {args.precision: peak}}
    table = markdown(runs, info, args)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"machine": info, "args": vars(args), "runs": runs}, f, indent=1)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table + "\n")
    print("\n" + table)
    return 0


def markdown(runs, info, args) -> str:
    peak = info["matmul_peak_gflops"][args.precision]
    mean_src = statistics.mean(r["mean_source_tokens"] for r in runs)
    setup = statistics.median(r.get("setup_peak_rss_mib", 0.0) for r in runs)
    lines = [f"{info.get('cpu')} ({info.get('cores')} cores, bf16 units: {info['bf16_units']}), torch "
             f"{info.get('torch')}, transformers {info.get('transformers')}, Python {info.get('python')}; code "
             f"summaries ({args.subset}: {runs[0]['pairs']} pairs, mean source {mean_src:.0f} tokens, cut at "
             f"{args.max_source_length}), batch {args.batch_size}, {args.steps} steps, {args.precision}, "
             "both length-grouped (packed: no padding computed), "
             f"{args.precision} matmul peak {peak:.0f} GFLOP/s, median of {args.rounds} rounds; MFU = (linear FLOPs "
             "of real tokens + 12 x hidden x layers x (src^2 + tgt^2 + tgt x src) per pair) / s / peak; peak RSS "
             f"before training (model + pairs, either side): {setup:.0f} MiB", "",
             "| method | checkpointing | ours | trainable (both) | ours samples/s | peer samples/s | speed ours/peer | "
             "ours tokens/s | ours MFU | ours peak RSS MiB | peer peak RSS MiB | memory ours/peer |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for checkpointing in args.checkpointing:
        for method in args.methods:
            rows = {e: [r for r in runs if r["method"] == method and r["engine"] == e
                        and r["checkpointing"] == checkpointing] for e in ("ours", "packed", "peer")}
            for ours in ("ours", "packed"):
                if rows[ours] and rows["peer"]:
                    lines.append(row(method, checkpointing, ours, rows, peak))
    return "\n".join(lines)


def row(method, checkpointing, ours, rows, peak) -> str:
    def med(engine, key):
        return statistics.median(r[key] for r in rows[engine])

    return (f"| {method} | {checkpointing} | {ours} | {rows[ours][0]['trainable']:,} | "
            f"{med(ours, 'samples_per_s'):.2f} | {med('peer', 'samples_per_s'):.2f} | "
            f"**{med(ours, 'samples_per_s') / med('peer', 'samples_per_s'):.2f}x** | "
            f"{med(ours, 'tokens_per_s'):.0f} | {med(ours, 'gflops_per_s') / peak:.0%} | "
            f"{med(ours, 'peak_rss_mib'):.0f} | {med('peer', 'peak_rss_mib'):.0f} | "
            f"{med(ours, 'peak_rss_mib') / med('peer', 'peak_rss_mib'):.2f}x |")


if __name__ == "__main__":
    sys.exit(main())
