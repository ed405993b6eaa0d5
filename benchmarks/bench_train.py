"""Training throughput and peak memory by model, method, checkpointing and precision; ours vs HF Trainer + PEFT.

    python benchmarks/bench_train.py --quick            # a few minutes on 2 CPU cores
    python benchmarks/bench_train.py                    # the full matrix (long on a CPU)
    python benchmarks/bench_train.py --models minilm --methods full lora --peers

Each configuration runs in its own fresh process (clean peak memory), on synthetic token ids of fixed
lengths (the same batches for both engines). Reported: samples/s and target tokens/s after warm-up, peak
memory during the training steps (CPU: the process's peak RSS counted from just before the first step, so that
building the float model before int8 quantisation does not count; CUDA: torch.cuda.max_memory_allocated after a
reset), trainable parameters, and
model-FLOPs utilisation against the matrix-multiply peak that this script measures on this machine in
this run. Output: results.json (every figure and the machine), results.md, results.png in --out.

Model FLOPs count the linear layers only (attention-score matmuls are small at these lengths): per token,
2*in*out for the forward, 2*in*out for the input gradient and 2*in*out for the weight gradient where the
weight trains. Encoder layers see the source tokens, decoder layers and the LM head the target tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from finetune.methods import METHODS, exact_names_pattern, settings_of  # noqa: E402
from finetune.train.optim import OPTIMIZERS, optimizer_state_bytes  # noqa: E402

MODELS = ("minilm", "bart-base", "t5-base")
# PEFT's target_modules as one regex (full match), equal to what finetune.methods wraps: BART q_proj/v_proj,
# T5 q/v, bert2bert the pretrained self-attention query/value (its new cross-attention trains in full).
PEER_LORA_TARGETS = {"bart": r".*\.(q_proj|v_proj)", "t5": r".*\.(q|v)",
                     "encoder-decoder": r".*(?<!cross)attention\.self\.(query|value)"}


# ------------------------------------------------------------------------------------------------
# the worker: one configuration in this process


def build(model_name: str):
    """(model, tokenizer, new parameter names): the bundled MiniLM bert2bert, or bart-base / t5-base sizes from
    their configs with random weights (finetune.models.base_sized)."""
    from finetune.models import base_sized, bert2bert, minilm_path

    if model_name == "minilm":
        built = bert2bert(minilm_path())
        return built.model, built.tokenizer, built.new_parameters
    model, tok = base_sized(model_name)
    return model, tok, []


def synthetic_examples(n: int, src_len: int, tgt_len: int, vocab: int, seed: int, eos: int):
    import random

    from finetune.data.tokenize import Example

    rng = random.Random(seed)
    return [Example([rng.randrange(5, vocab) for _ in range(src_len - 1)] + [eos],
                    [rng.randrange(5, vocab) for _ in range(tgt_len - 1)] + [eos]) for _ in range(n)]


def synthetic_examples_for(model, tok, n: int, src_len: int, tgt_len: int):
    """`synthetic_examples` over the model's own vocabulary, ended by the tokenizer's eos (BERT's: [SEP])."""
    vocab = model.get_input_embeddings().num_embeddings
    eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
    return synthetic_examples(n, src_len, tgt_len, vocab, 0, eos)


def linear_flops_per_sample(model, src_len: int, tgt_len: int) -> float:
    import torch

    total = 0.0
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(module, torch.nn.Linear) and not getattr(type(module), "is_quantized_linear", False):
            continue
        if ".lora_" in name or name.endswith(".inner"):
            continue
        if weight is None or weight.dim() != 2:
            continue
        out_f, in_f = getattr(module, "out_features", None), getattr(module, "in_features", None)
        if out_f is None:
            out_f, in_f = weight.shape  # (a 4-bit weight is packed: its shape is not the layer's)
        tokens = src_len if "encoder" in name.split(".")[:2] else tgt_len
        passes = 2 + (1 if weight.requires_grad else 0)
        total += 2 * in_f * out_f * tokens * passes
    return total


def matmul_peak(dtype_name: str, device: str) -> float:
    """Measured FLOP/s of a large matrix multiply in this process."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    n = 2048 if device == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    reps = 3 if device == "cpu" else 50
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - start)


def reset_peak_memory(device: str) -> None:
    """Start the peak-memory count at the training steps: the model is built (in float, even for int8) before.

    CPU: give freed memory back to the OS (malloc_trim), then reset the kernel's high-water mark (VmHWM) by
    writing 5 to /proc/self/clear_refs (Linux >= 4.0). CUDA: torch.cuda.reset_peak_memory_stats()."""
    import gc

    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory_mib(device: str) -> float:
    """Peak since reset_peak_memory (CPU: VmHWM of this process, else its lifetime peak RSS)."""
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def apply(model, method, new):
    from finetune.methods import apply_method

    apply_method(model, method, new, lora_targets=None)


def run_ours(cfg: dict, model, tok, examples, device: str):
    import torch

    from finetune import Engine, TrainConfig

    train_cfg = TrainConfig(lr=1e-4, batch_size=cfg["batch_size"], precision=cfg["precision"],
                            optimizer=cfg.get("optimizer", "adamw"),
                            grad_checkpointing=cfg["checkpointing"], progress=False, device=device,
                            fused_loss={"on": True, "off": False}.get(cfg.get("fused_loss", "auto")),
                            output_dir=tempfile.mkdtemp(), save_model=False)
    engine = Engine(model, tok, train_cfg)
    if cfg["checkpointing"]:
        engine.enable_checkpointing()
    model.train()
    total = cfg["warmup"] + cfg["steps"]
    engine.build_optimizer(total, 0)
    bs = cfg["batch_size"]
    windows = [[engine.collate(examples[i * bs:(i + 1) * bs])] for i in range(total)]
    reset_peak_memory(device)
    for w in windows[:cfg["warmup"]]:
        engine.train_step(w)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for w in windows[cfg["warmup"]:]:
        engine.train_step(w)
    if device == "cuda":
        torch.cuda.synchronize()
    cfg["optimizer_state_bytes"] = optimizer_state_bytes(engine.optimizer)
    return time.perf_counter() - start


PEER_OPTIM = {"adamw": "adamw_torch", "adafactor": "adafactor", "adamw8bit": "adamw_bnb_8bit"}  # HF Trainer's names


def peer_model(model, method: str, new):
    """The peer's model for a method: PEFT for LoRA and DoRA (PEFT's int8 / 4-bit LoRA layers over the same
    bitsandbytes layers for int8 + LoRA and QLoRA: transformers' own quantised loading wants a checkpoint on disk
    and, for 8-bit, CUDA), our freezing for the others (the same tensors train on both sides)."""
    if method in ("lora", "int8-lora", "dora", "qlora"):
        import peft

        from finetune.methods.quant import prepare_quantized_training

        if method in ("int8-lora", "qlora"):
            skip = [exact_names_pattern(new)] if new else ()
            if method == "int8-lora":
                from finetune.methods.int8 import quantize_int8

                quantize_int8(model, skip=skip)
                model.is_loaded_in_8bit = True  # how PEFT learns that its int8 LoRA layer is wanted
            else:
                from finetune.methods.int4 import quantize_4bit

                quantize_4bit(model, skip=skip)
                model.is_loaded_in_4bit = True  # ... and its 4-bit one
            prepare_quantized_training(model)
            for name, module in list(model.named_modules()):  # PEFT wraps bitsandbytes' own layer
                if getattr(type(module), "is_quantized_linear", False):
                    parent, _, child = name.rpartition(".")
                    setattr(model.get_submodule(parent), child, module.inner)
        target = PEER_LORA_TARGETS[model.config.model_type]
        ours = settings_of(method)  # the same adapter as ours: the method's declared defaults
        model = peft.get_peft_model(model, peft.LoraConfig(r=ours["lora_r"], lora_alpha=ours["lora_alpha"],
                                                           lora_dropout=ours["lora_dropout"], target_modules=target,
                                                           task_type="SEQ_2_SEQ_LM", use_dora=method == "dora"))
        if new:  # the newly initialised tensors train in full, as in ours
            pattern = re.compile(exact_names_pattern(new).lstrip("^"))
            for name, param in model.named_parameters():
                if pattern.search(name.removeprefix("base_model.model.")):
                    param.requires_grad_(True)
    elif method != "full":
        apply(model, method, new)
    return model


def run_peer(cfg: dict, model, tok, examples, device: str):
    """transformers' Seq2SeqTrainer (and PEFT for LoRA / int8 + LoRA) on the same batches and schedule."""
    import torch
    from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments, TrainerCallback

    model = peer_model(model, cfg["method"], cfg["new"])
    times = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter())

    total = cfg["warmup"] + cfg["steps"]
    data = [{"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids), "labels": e.labels}
            for e in examples[:total * cfg["batch_size"]]]
    args = Seq2SeqTrainingArguments(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=cfg["batch_size"], max_steps=total,
        learning_rate=1e-4, weight_decay=0.01, lr_scheduler_type="linear", warmup_steps=0, logging_steps=10**6,
        save_strategy="no", report_to=[], bf16=cfg["precision"] == "bf16", fp16=cfg["precision"] == "fp16",
        gradient_checkpointing=cfg["checkpointing"], gradient_checkpointing_kwargs={"use_reentrant": False},
        use_cpu=device == "cpu", dataloader_num_workers=0, optim=PEER_OPTIM[cfg.get("optimizer", "adamw")],
        max_grad_norm=1.0,
        disable_tqdm=True, seed=0,
    )
    trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=data,
                             data_collator=DataCollatorForSeq2Seq(tok, model=model, label_pad_token_id=-100),
                             callbacks=[Clock()])
    reset_peak_memory(device)
    trainer.train()
    return times[-1] - times[cfg["warmup"] - 1]


def worker(cfg: dict) -> dict:
    import torch

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok, new = build(cfg["model"])
    cfg["new"] = new
    n = (cfg["warmup"] + cfg["steps"]) * cfg["batch_size"]
    examples = synthetic_examples_for(model, tok, n, cfg["src_len"], cfg["tgt_len"])
    if cfg["engine"] == "ours":
        apply(model, cfg["method"], new)
    from finetune.methods.freeze import trainable_report

    if cfg["engine"] == "ours":
        seconds = run_ours(cfg, model, tok, examples, device)
        report = trainable_report(model)
        flops = linear_flops_per_sample(model, cfg["src_len"], cfg["tgt_len"])
    else:
        seconds = run_peer(cfg, model, tok, examples, device)
        report = None
        flops = None
    samples = cfg["steps"] * cfg["batch_size"]
    result = {**{k: v for k, v in cfg.items() if k != "new"}, "device": device,
              "samples_per_s": samples / seconds, "target_tokens_per_s": samples * cfg["tgt_len"] / seconds,
              "peak_memory_mib": peak_memory_mib(device),
              "peak_rss_whole_life_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if report is not None:
        result.update(trainable=report.trainable, total=report.total,
                      optimizer_state_bytes_per_param=cfg["optimizer_state_bytes"] / report.trainable)
        peak = matmul_peak(cfg["precision"] if cfg["precision"] != "fp16" or device == "cuda" else "fp32", device)
        result.update(matmul_peak_tflops=peak / 1e12, mfu=flops * samples / seconds / peak)
    return result


# ------------------------------------------------------------------------------------------------
# the orchestrator: one fresh process per configuration


def machine() -> dict:
    import torch
    import transformers

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def configurations(args) -> list[dict]:
    import torch

    precisions = args.precisions or (["bf16", "fp16"] if torch.cuda.is_available() else ["fp32", "bf16"])
    out = []
    for model in args.models:
        for method in args.methods:
            for ckpt in args.checkpointing:
                for precision in precisions:
                    for optimizer in args.optimizers:
                        base = dict(model=model, method=method, checkpointing=ckpt, precision=precision,
                                    batch_size=args.batch_size, src_len=args.src_len, tgt_len=args.tgt_len,
                                    warmup=args.warmup, steps=args.steps, fused_loss=args.fused_loss,
                                    optimizer=optimizer)
                        out.append({**base, "engine": "ours"})
                        if args.peers:
                            out.append({**base, "engine": "peer"})
    return out


def run_one(cfg: dict, timeout: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(cfg)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**cfg, "error": f"timed out after {timeout} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {**cfg, "error": tail[:300]}
    return json.loads(lines[-1][len("RESULT "):])


def median_run(runs: list[dict]) -> dict:
    """The run with the median samples/s (every run's figure kept under `repeats`)."""
    good = sorted((r for r in runs if "error" not in r), key=lambda r: r["samples_per_s"])
    if not good:
        return runs[-1]
    chosen = dict(good[(len(good) - 1) // 2])
    chosen["repeats"] = [{"samples_per_s": r["samples_per_s"], "peak_memory_mib": r["peak_memory_mib"]} for r in good]
    return chosen


def key(r):
    return (r["model"], r["method"], r["checkpointing"], r["precision"], r.get("optimizer", "adamw"))


def markdown(results: list[dict], info: dict) -> str:
    ours = {key(r): r for r in results if r["engine"] == "ours"}
    peers = {key(r): r for r in results if r["engine"] == "peer"}
    lines = [f"Machine: {info['cpu']}, {info['cores']} cores" + (f", {info['gpu']}" if "gpu" in info else "") +
             f"; torch {info['torch']}, transformers {info['transformers']}.", "",
             "| model | method | ckpt | precision | optimizer | trainable | samples/s | tokens/s | peak MiB | "
             "whole-life peak RSS MiB | optimizer state bytes/param | MFU | peer samples/s | peer peak MiB | "
             "speed ours/peer | memory ours/peer |",
             "|" + "---|" * 16]
    for k, r in ours.items():
        p = peers.get(k)
        if "error" in r:
            lines.append(f"| {k[0]} | {k[1]} | {'on' if k[2] else 'off'} | {k[3]} | {k[4]} | error: {r['error']} |"
                         + " |" * 10)
            continue
        peer_cells = ["-"] * 4
        if p is not None and "error" in p:
            peer_cells = [f"error: {p['error'][:60]}", "-", "-", "-"]
        elif p is not None:
            peer_cells = [f"{p['samples_per_s']:.2f}", f"{p['peak_memory_mib']:.0f}",
                          f"{r['samples_per_s'] / p['samples_per_s']:.2f}x",
                          f"{r['peak_memory_mib'] / p['peak_memory_mib']:.2f}x"]
        lines.append(f"| {k[0]} | {k[1]} | {'on' if k[2] else 'off'} | {k[3]} | {k[4]} | "
                     f"{100 * r['trainable'] / r['total']:.2f}% | {r['samples_per_s']:.2f} | "
                     f"{r['target_tokens_per_s']:.0f} | {r['peak_memory_mib']:.0f} | "
                     f"{r.get('peak_rss_whole_life_mib', 0):.0f} | {r.get('optimizer_state_bytes_per_param', 0):.2f} | "
                     f"{100 * r['mfu']:.1f}% | "
                     + " | ".join(peer_cells) + " |")
    return "\n".join(lines)


def chart(results: list[dict], png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ours = [r for r in results if r["engine"] == "ours" and "error" not in r]
    peers = {key(r): r for r in results if r["engine"] == "peer" and "error" not in r}
    labels = [f"{r['model']}\n{r['method']}\n{'ckpt ' if r['checkpointing'] else ''}{r['precision']}" for r in ours]
    x = range(len(ours))
    fig, axes = plt.subplots(2, 1, figsize=(max(8, len(ours) * 0.9), 7))
    for ax, field, title in zip(axes, ("samples_per_s", "peak_memory_mib"), ("samples/s", "peak memory (MiB)")):
        ax.bar([i - 0.2 for i in x], [r[field] for r in ours], width=0.4, label="finetune")
        ax.bar([i + 0.2 for i in x], [peers[key(r)][field] if key(r) in peers else 0 for r in ours], width=0.4,
               label="HF Trainer (+PEFT)")
        ax.set_title(title)
        ax.set_xticks(list(x))
        ax.set_xticklabels(labels, fontsize=7)
        ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="MiniLM bert2bert, every method, fp32, no checkpointing")
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--checkpointing", nargs="+", type=lambda s: s == "on", default=[False, True],
                    help="on / off (default: both)")
    ap.add_argument("--precisions", nargs="+", choices=("fp32", "bf16", "fp16"), default=None)
    ap.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=["adamw"],
                    help="ours and the peer with the same optimizer (HF Trainer: adamw_torch, adafactor, "
                         "adamw_bnb_8bit)")
    ap.add_argument("--peers", action=argparse.BooleanOptionalAction, default=True,
                    help="also run HF Seq2SeqTrainer (+ PEFT) on the same configuration")
    ap.add_argument("--fused-loss", choices=("on", "off", "auto"), default="auto",
                    help="ours: output layer + cross-entropy fused in blocks (TrainConfig.fused_loss; auto: by size)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--src-len", type=int, default=32)
    ap.add_argument("--tgt-len", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=1,
                    help="run each (ours, peer) pair this many times, alternating; report the median")
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = ap.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    if args.quick:
        args.models, args.checkpointing, args.precisions = ["minilm"], [False], args.precisions or ["fp32"]
    info = machine()
    configs = configurations(args)
    print(f"{len(configs)} runs on {info}", flush=True)
    runs: dict[int, list[dict]] = {i: [] for i in range(len(configs))}
    for repeat in range(args.repeats):  # ours and the peer alternate, pair by pair; odd rounds run the peer first
        order = list(range(len(configs)))
        if args.peers and repeat % 2:
            order = [j for k in range(0, len(order), 2) for j in (order[k + 1], order[k])]
        for i in order:
            cfg = configs[i]
            r = run_one(cfg, args.timeout)
            runs[i].append(r)
            status = r.get("error") or f"{r['samples_per_s']:.2f} samples/s, peak {r['peak_memory_mib']:.0f} MiB"
            print(f"[{repeat + 1}.{i + 1}/{len(configs)}] {cfg['engine']:>4} {cfg['model']} {cfg['method']} "
                  f"ckpt={'on' if cfg['checkpointing'] else 'off'} {cfg['precision']} {cfg['optimizer']}: {status}",
                  flush=True)
    results = [median_run(runs[i]) for i in range(len(configs))]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"machine": info, "command": " ".join(sys.argv), "results": results}, f, indent=1)
    table = (f"Batch {args.batch_size}, {args.src_len} source / {args.tgt_len} target tokens, {args.warmup} warm-up + "
             f"{args.steps} timed steps, median of {args.repeats} round(s), fused loss "
             f"{args.fused_loss} (ours).\n" + markdown(results, info))
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table + "\n")
    chart(results, os.path.join(args.out, "results.png"))
    print("\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
