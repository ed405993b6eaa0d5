"""The real job, side by side: our engine against HF Seq2SeqTrainer (+ PEFT) on MiniLM bert2bert and codespell.

    python benchmarks/bench_real.py                          # every method, fp32, 3 rounds (about 25 min, 2 cores)
    python benchmarks/bench_real.py --precision bf16 --methods full lora --rounds 3

Both sides get the same model (the bundled all-MiniLM-L6-v2 warm-started as a bert2bert), the same codespell
training pairs (--pairs, a seeded sample of the train split), batch size, AdamW, learning rates (pretrained
--lr, newly initialised tensors --new-lr), linear schedule with 5% warm-up, weight decay, gradient clipping,
precision and one epoch. Each run is a fresh process; ours and the peer alternate (the peer first on odd
rounds), and the table reports the median of the rounds. Reported per run: samples/s over the epoch (from the
end of the first step to the end of the last: start-up and the first step's one-time costs excluded on both
sides alike) and peak RSS counted from the first training step (the process's VmHWM reset after the model is
built). Each side runs as its users run it: ours is `Engine.fit` with its defaults, the peer is
`Seq2SeqTrainer.train()` with `DataCollatorForSeq2Seq` and its defaults. Output: results.json, results.md in --out.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from finetune.methods import METHODS  # noqa: E402


def worker(args) -> dict:
    import torch

    from bench_train import peak_memory_mib, peer_model, reset_peak_memory
    from finetune import Engine, TrainConfig, apply_method, new_tensor_lr, trainable_report
    from finetune.data.builtin import codespell_pairs
    from finetune.models import bert2bert, minilm_path

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    built = bert2bert(minilm_path())
    model, tok, new = built.model, built.tokenizer, built.new_parameters
    pairs = codespell_pairs("train", limit=args.pairs, seed=0)
    times = []
    if args.engine == "ours":
        apply_method(model, args.method, new)
        trainable = trainable_report(model).trainable
        cfg = TrainConfig(lr=args.lr, lr_overrides=new_tensor_lr(new, args.new_lr), weight_decay=0.01,
                          warmup_ratio=0.05, epochs=1, batch_size=args.batch_size, precision=args.precision,
                          max_source_length=32, max_target_length=32, progress=False, save_model=False,
                          output_dir=tempfile.mkdtemp(), seed=0,
                          fused_loss={"on": True, "off": False, "auto": None}[args.fused_loss])
        engine = Engine(model, tok, cfg)

        def clock(engine, stats):
            if device == "cuda":
                torch.cuda.synchronize()
            if engine.global_step == 1:
                reset_peak_memory(device)
            times.append(time.perf_counter())

        engine.fit(pairs, on_step=clock)
    else:
        from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments, TrainerCallback

        model = peer_model(model, args.method, new)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

        class Clock(TrainerCallback):
            def on_step_end(self, a, state, control, **kw):
                if device == "cuda":
                    torch.cuda.synchronize()
                if state.global_step == 1:
                    reset_peak_memory(device)
                times.append(time.perf_counter())

        def encode(batch_pairs):
            sources = tok([s for s, _ in batch_pairs], truncation=True, max_length=32)
            targets = tok(text_target=[t for _, t in batch_pairs], truncation=True, max_length=32)["input_ids"]
            # bert2bert: the decoder starts from [CLS], which the shift adds; labels drop the tokenizer's [CLS]
            return [{"input_ids": s, "attention_mask": m, "labels": t[1:] if t and t[0] == tok.cls_token_id else t}
                    for s, m, t in zip(sources["input_ids"], sources["attention_mask"], targets)]

        data = encode(pairs)
        new_params = {n for n in new}
        groups = _peer_groups(model, new_params, args)
        optimizer = torch.optim.AdamW(groups, lr=args.lr, fused=True)  # HF's default optim: adamw_torch_fused
        targs = Seq2SeqTrainingArguments(
            output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch_size, num_train_epochs=1,
            learning_rate=args.lr, weight_decay=0.01, lr_scheduler_type="linear",
            warmup_steps=math.ceil(0.05 * math.ceil(len(data) / args.batch_size)),  # our warmup_ratio=0.05
            logging_steps=10**6, save_strategy="no", report_to=[], bf16=args.precision == "bf16",
            use_cpu=device == "cpu", dataloader_num_workers=0, max_grad_norm=1.0, disable_tqdm=True, seed=0)
        trainer = Seq2SeqTrainer(model=model, args=targs, train_dataset=data, optimizers=(optimizer, None),
                                 data_collator=DataCollatorForSeq2Seq(tok, model=model, label_pad_token_id=-100),
                                 callbacks=[Clock()])
        trainer.train()
    steps = len(times)
    if device == "cuda":
        torch.cuda.synchronize()
    return {"engine": args.engine, "method": args.method, "precision": args.precision, "steps": steps,
            "pairs": len(pairs), "trainable": trainable,
            "samples_per_s": (steps - 1) * args.batch_size / (times[-1] - times[0]),
            "peak_rss_mib": peak_memory_mib(device)}


def run_worker(cmd: list[str], timeout: int, what: str) -> dict:
    """One benchmark run in a fresh process: the JSON object its last stdout line holds; a failed run stops the
    benchmark with its stderr."""
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if done.returncode:
        print(done.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{what} failed (exit {done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _peer_groups(model, new_params, args):
    """The peer's AdamW groups: the same decay rule (no decay on biases and LayerNorm gains: what HF Trainer
    does too) and the new tensors at their own learning rate, as ours."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        plain = name.removeprefix("base_model.model.")
        lr = args.new_lr if plain in new_params else args.lr
        decay = 0.01 if p.dim() >= 2 else 0.0
        groups.setdefault((lr, decay), []).append(p)
    return [{"params": ps, "lr": lr, "weight_decay": decay} for (lr, decay), ps in groups.items()]


def machine() -> dict:
    from bench_train import machine as bench_machine

    from finetune.train.precision import cpu_bf16_units

    info = bench_machine()
    info["bf16_units"] = cpu_bf16_units() or "none"
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=3840)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--new-lr", type=float, default=1e-3)
    ap.add_argument("--fused-loss", choices=("on", "off", "auto"), default="auto",
                    help="ours: TrainConfig.fused_loss (auto: by the logits' size)")
    ap.add_argument("--engines", nargs="+", choices=("ours", "peer"), default=["ours", "peer"])
    ap.add_argument("--out", default=None)
    ap.add_argument("--timeout", type=int, default=1200)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--engine", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--method", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    out = args.out or os.path.join(ROOT, "benchmarks", "results", f"real_{args.precision}")
    os.makedirs(out, exist_ok=True)
    runs = []
    for r in range(args.rounds):
        for method in args.methods:
            order = list(args.engines) if r % 2 == 0 else list(reversed(args.engines))
            for engine in order:
                cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--engine", engine, "--method", method,
                       "--precision", args.precision, "--pairs", str(args.pairs), "--batch-size", str(args.batch_size),
                       "--lr", str(args.lr), "--new-lr", str(args.new_lr), "--fused-loss", args.fused_loss]
                result = run_worker(cmd, args.timeout, f"{engine} {method}")
                result["round"] = r
                runs.append(result)
                print(f"round {r} {method:>14} {engine:>4}: {result['samples_per_s']:7.1f} samples/s, "
                      f"peak {result['peak_rss_mib']:6.0f} MiB", flush=True)
    info = machine()
    table = markdown(runs, info, args)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"machine": info, "args": vars(args), "runs": runs}, f, indent=1)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table + "\n")
    print("\n" + table)
    return 0


def markdown(runs, info, args) -> str:
    lines = [f"{info.get('cpu')} ({info.get('cores')} cores, bf16 units: {info['bf16_units']}), torch "
             f"{info.get('torch')}, transformers {info.get('transformers')}; {args.pairs} codespell pairs, batch "
             f"{args.batch_size}, {args.precision}, median of {args.rounds} rounds", "",
             "| method | ours samples/s | peer samples/s | speed ours/peer | ours peak MiB | peer peak MiB | "
             "memory ours/peer |", "|---|---|---|---|---|---|---|"]
    for method in args.methods:
        med = {}
        for engine in ("ours", "peer"):
            rows = [r for r in runs if r["method"] == method and r["engine"] == engine]
            if rows:
                med[engine] = (statistics.median(r["samples_per_s"] for r in rows),
                               statistics.median(r["peak_rss_mib"] for r in rows))
        if len(med) == 2:
            (s_o, m_o), (s_p, m_p) = med["ours"], med["peer"]
            lines.append(f"| {method} | {s_o:.1f} | {s_p:.1f} | **{s_o / s_p:.2f}x** | {m_o:.0f} | {m_p:.0f} | "
                         f"{m_o / m_p:.2f}x |")
        else:
            for engine, (s, m) in med.items():
                lines.append(f"| {method} ({engine}) | {s:.1f} | | | {m:.0f} | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
