"""The big model: LoRA on Flan-T5-XL (2.8B) and Flan-T5-XXL (11.1B) shapes on one CPU machine, the base quantised
while it loads.

    python benchmarks/bench_large.py --size xl                          # ~5.6 GB of disk, ~15 min
    python benchmarks/bench_large.py --size xxl --methods qlora-kept     # ~22 GB of disk, ~15 min
    python benchmarks/bench_large.py --size tiny --methods qlora --steps 2         # a smoke run (the tests)

First a random-weight checkpoint with the published config of the size (google/flan-t5-xl, -xxl: d_model, d_ff,
heads, 24 + 24 layers, vocabulary 32,128, gated GELU, an LM head of its own) is written as bf16 safetensors shards of
--shard-gb, one shard at a time (no hub, no download; a character tokenizer stands in for T5's: memory and speed
do not depend on the weights' values or the vocabulary's words). Then each method runs in a fresh process:

    load      qlora / int8-lora: finetune.models.load_quantized (quantised while it loads); lora: load_seq2seq (bf16);
              "-kept": with quantize_kept (T5's feed-forward output wo quantised too; transformers keeps it float)
    method    apply_method with LoRA's declared defaults: r 16, alpha 32, dropout 0.05 on q and v (the reference:
              18.9M trainable at XXL)
    training  --steps steps of --batch-size pairs (standard-library code -> docstring, cut at 64 / 16 tokens),
              activation checkpointing, precision auto (bf16 on a CPU with bf16 units), a training-state
              checkpoint after the last step (its size reported), no model/ written
    adapter   save_adapter, then load_adapter back over zeroed adapters: the same tensors
    generate  one greedy generation of 16 tokens
    save      with --save-model: model/ as a run writes it (a quantised base: shard by shard, dequantised to bf16,
              the adapters merged), its time, size and peak; then deleted

Per run: load seconds, peak RSS at load, whole-life peak RSS (what an OOM killer sees: VmHWM, phases reset through
/proc/self/clear_refs and the largest kept), seconds per step (median of the steps after the first), tokens/s
(source + target tokens), and MFU: the model's linear-layer FLOPs per second (2 per weight forward, 2 for the input
gradient, 2 more where the weight trains; recomputation not counted) over the throughput this benchmark measures
for the method's own layer (dequantise + matmul of a d_model x d_ff weight on one step's source tokens, forward).
Output: results.json and results.md in --out; the checkpoint is deleted at the end unless --keep.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))

# google/flan-t5-large, -xl and -xxl config.json (the fields that decide shapes and compute); tiny: tests
SHAPES = {
    "tiny": dict(d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=2, num_decoder_layers=2, vocab_size=512),
    "large": dict(d_model=1024, d_ff=2816, d_kv=64, num_heads=16, num_layers=24, num_decoder_layers=24,
                  vocab_size=32128),
    "xl": dict(d_model=2048, d_ff=5120, d_kv=64, num_heads=32, num_layers=24, num_decoder_layers=24,
               vocab_size=32128),
    "xxl": dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, num_decoder_layers=24,
                vocab_size=32128),
}
FLAN = dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False, relative_attention_num_buckets=32,
            relative_attention_max_distance=128, dropout_rate=0.1, layer_norm_epsilon=1e-6, decoder_start_token_id=0,
            pad_token_id=0, eos_token_id=1, is_encoder_decoder=True)
SOURCE_LENGTH, TARGET_LENGTH = 64, 16


def rss_mib(field: str = "VmHWM") -> float:
    with open("/proc/self/status", encoding="utf-8") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def write_checkpoint(size: str, folder: str, shard_bytes: int, seed: int = 0) -> dict:
    """A random-weight Flan-T5 of `size` in bf16 safetensors shards, written one shard at a time: T5's own
    initialisation scales (attention and feed-forward weights ~ N(0, fan_in^-1/2), embeddings ~ N(0, 1), norms 1)."""
    import torch
    from safetensors.torch import save_file
    from transformers import T5Config

    from finetune.models import char_tokenizer
    from finetune.models.streamed import empty_model

    config = T5Config(**SHAPES[size], **FLAN, dtype="bfloat16")
    skeleton = empty_model(config)
    names, seen = [], set()
    for name, param in skeleton.state_dict(keep_vars=True).items():
        if id(param) not in seen:  # tied tensors once (the encoder's and decoder's embed_tokens are `shared`)
            seen.add(id(param))
            names.append((name, tuple(param.shape)))
    if "lm_head.weight" not in dict(names):  # Flan-T5's checkpoints hold their LM head apart from the embedding
        names.append(("lm_head.weight", (config.vocab_size, config.d_model)))
    os.makedirs(folder, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    shards, current, used = [], [], 0
    for name, shape in names:
        nbytes = 2 * torch.Size(shape).numel()
        if current and used + nbytes > shard_bytes:
            shards.append(current)
            current, used = [], 0
        current.append((name, shape))
        used += nbytes
    shards.append(current)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: _random(name, shape, generator) for name, shape in shard}
        save_file(tensors, os.path.join(folder, file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        total += sum(t.numel() * 2 for t in tensors.values())
        del tensors
    with open(os.path.join(folder, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    config.save_pretrained(folder)
    char_tokenizer("t5").save_pretrained(folder)
    params = sum(torch.Size(shape).numel() for _, shape in names)
    return {"parameters": params, "bytes": total, "shards": len(shards)}


def _random(name: str, shape: tuple, generator):
    import torch

    if name.endswith("layer_norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    scale = 1.0 if len(shape) == 1 or "embed" in name or "shared" in name or "relative" in name else shape[1] ** -0.5
    return (torch.randn(shape, generator=generator, dtype=torch.float32) * scale).to(torch.bfloat16)


def training_pairs(count: int) -> list[tuple[str, str]]:
    """Standard-library code -> docstring pairs with sources of at least SOURCE_LENGTH characters."""
    from finetune.data.builtin import code_summary_pairs

    pairs = [(s, t) for s, t in code_summary_pairs("train", seed=0) if len(s) >= SOURCE_LENGTH and len(t) >= 8]
    return pairs[:count]


def layer_throughput(method: str, shape: dict, tokens: int, settings: dict) -> float:
    """GFLOP/s of the method's own d_model x d_ff layer on `tokens` rows under bf16 autocast (dequantise + matmul
    for the quantised bases), forward only: the ceiling the model's matmuls can reach on this machine."""
    import torch
    from torch import nn

    linear = nn.Linear(shape["d_model"], shape["d_ff"], bias=False).to(torch.bfloat16)
    if method == "qlora":
        from finetune.methods.int4 import Int4Linear

        layer = Int4Linear(linear, settings.get("quant_type", "nf4"), settings.get("double_quant", True))
        layer.set_compute_dtype(torch.bfloat16)
    elif method == "int8-lora":
        from finetune.methods.int8 import Int8Linear

        layer = Int8Linear(linear)
    else:
        layer = linear
    x = torch.randn(tokens, shape["d_model"])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x)
        start, runs = time.perf_counter(), 5
        for _ in range(runs):
            layer(x)
        seconds = (time.perf_counter() - start) / runs
    return 2 * tokens * shape["d_model"] * shape["d_ff"] / seconds / 1e9


def worker(args) -> dict:
    """One method on the checkpoint, in this (fresh) process."""
    import torch

    from bench_long import flops_per_token
    from common import PhasePeaks, cpu_description
    from finetune import Engine, TrainConfig, apply_method, load_adapter, save_adapter
    from finetune.methods.adapters import adapter_state_dict
    from finetune.models import load_quantized, load_seq2seq

    method, kept = args.method.removesuffix("-kept"), args.method.endswith("-kept")
    settings = {"quantize_kept": True} if kept else {}  # LoRA: the declared defaults (r 16, alpha 32, q and v)
    peaks, start = PhasePeaks(), time.perf_counter()
    peaks.mark("load")
    if method == "lora":
        model, tokenizer = load_seq2seq(args.model)
    else:
        model, tokenizer = load_quantized(args.model, method, **settings)
    load_s = time.perf_counter() - start
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in model.state_dict().values()}
    model_mib = sum(storages.values()) / 2**20
    peaks.mark("method")
    apply_method(model, method, **settings)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for n, p in model.named_parameters() if not p.requires_grad)
    pairs = training_pairs(args.steps * args.batch_size)
    peaks.mark("training")
    scratch = tempfile.mkdtemp(prefix="bench_large_")
    config = TrainConfig(lr=1e-3, batch_size=args.batch_size, max_steps=args.steps, max_source_length=SOURCE_LENGTH,
                         max_target_length=TARGET_LENGTH, grad_checkpointing=True, precision="auto",
                         output_dir=scratch, save_model=False, save_every=args.steps, log_every=1, progress=False,
                         warmup_ratio=0.0, cache_data=False)
    engine = Engine(model, tokenizer, config)
    stamps, losses = [time.perf_counter()], []

    def on_step(engine, stats):
        stamps.append(time.perf_counter())
        losses.append(round(float(stats["loss"]), 4))

    engine.fit(pairs, on_step=on_step)
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    checkpoints = os.path.join(scratch, "checkpoints")
    checkpoint_mib = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(checkpoints)
                         for f in files) / 2**20
    peaks.mark("adapter")
    adapter_dir = os.path.join(scratch, "adapter")
    before = {k: v.clone() for k, v in adapter_state_dict(model).items()}
    save_adapter(model, adapter_dir)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.zero_()
    load_adapter(model, adapter_dir)
    after = adapter_state_dict(model)
    reloaded = all(torch.equal(before[k], after[k]) for k in before)
    adapter_mb = sum(os.path.getsize(os.path.join(adapter_dir, f)) for f in os.listdir(adapter_dir)) / 2**20
    peaks.mark("generate")
    gen_start = time.perf_counter()
    output = engine.generate([pairs[0][0][:SOURCE_LENGTH]], num_beams=1, max_new_tokens=16)[0]
    gen_s = time.perf_counter() - gen_start
    saved = {}
    if args.save_model:  # model/ as a run writes it: shard by shard for a quantised base
        peaks.mark("save")
        save_start, path = time.perf_counter(), os.path.join(scratch, "model")
        engine.save(path)
        saved = {"save_s": round(time.perf_counter() - save_start, 1),
                 "saved_gib": round(sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)) / 2**30, 2)}
        shutil.rmtree(path, ignore_errors=True)
    peaks.mark("end")
    tokens = [min(len(tokenizer(s)["input_ids"]), SOURCE_LENGTH) for s, _ in pairs]
    targets = [min(len(tokenizer(t)["input_ids"]), TARGET_LENGTH) for _, t in pairs]
    per_step = statistics.median(steps[1:] if len(steps) > 1 else steps)
    src_flops, tgt_flops = flops_per_token(model)
    step_flops = (src_flops * sum(tokens) + tgt_flops * sum(targets)) / args.steps
    ceiling = layer_throughput(method, SHAPES[args.size], args.batch_size * SOURCE_LENGTH, settings)
    shutil.rmtree(scratch, ignore_errors=True)
    return {
        "size": args.size, "method": method, "quantize_kept": kept,
        "precision": str(engine.precision), "cpu": cpu_description(), "trainable": trainable, "frozen": total,
        "load_s": round(load_s, 1), "load_peak_mib": round(peaks.peaks["load"]), "model_mib": round(model_mib),
        "peak_mib": round(peaks.whole_life), "phase_peaks_mib": {k: round(v) for k, v in peaks.peaks.items()},
        "step_s": [round(s, 2) for s in steps], "s_per_step": round(per_step, 2),
        "tokens_per_s": round((sum(tokens) + sum(targets)) / args.steps / per_step, 1),
        "model_gflop_per_s": round(step_flops / per_step / 1e9, 1), "layer_gflop_per_s": round(ceiling, 1),
        "mfu": round(step_flops / per_step / 1e9 / ceiling, 3), "adapter_mib": round(adapter_mb, 1),
        "checkpoint_mib": round(checkpoint_mib, 1),
        "adapter_reloaded": reloaded, "generate_s": round(gen_s, 1), "generated": output, "losses": losses, **saved,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=sorted(SHAPES), default="xl")
    ap.add_argument("--methods", nargs="+", default=["qlora", "qlora-kept", "int8-lora", "int8-lora-kept", "lora"],
                    choices=["qlora", "qlora-kept", "int8-lora", "int8-lora-kept", "lora"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--shard-gb", type=float, default=2.0)
    ap.add_argument("--save-model", action="store_true", help="also write model/ as a run does (timed, its peak)")
    ap.add_argument("--checkpoint", default=None, help="where to write the checkpoint (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results/large_SIZE)")
    ap.add_argument("--table", action="store_true", help="only write results.md again from --out's results.json")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--method", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        result = worker(args)
        with open(args.worker, "w", encoding="utf-8") as f:
            json.dump(result, f)
        return 0
    return run_all(args)


def run_all(args) -> int:
    out = args.out or os.path.join(ROOT, "benchmarks", "results", f"large_{args.size}")
    if args.table:
        with open(os.path.join(out, "results.json"), encoding="utf-8") as f:
            data = json.load(f)
        with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as f:
            f.write(markdown(data["checkpoint"], data["runs"], args))
        return 0
    os.makedirs(out, exist_ok=True)
    folder = args.checkpoint or tempfile.mkdtemp(prefix=f"flan_t5_{args.size}_")
    try:
        start = time.perf_counter()
        written = write_checkpoint(args.size, folder, int(args.shard_gb * 2**30))
        written["write_s"] = round(time.perf_counter() - start, 1)
        print(f"checkpoint: {written['parameters'] / 1e9:.2f}B parameters, {written['bytes'] / 2**30:.2f} GiB in "
              f"{written['shards']} shards, written in {written['write_s']} s", flush=True)
        runs = [_run_method(args, folder, method, out) for method in args.methods]
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"checkpoint": written, "runs": runs}, f, indent=1)
    table = markdown(written, runs, args)
    with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as f:
        f.write(table)
    print(table)
    return 0 if all(r.get("ok") for r in runs) else 1


def _run_method(args, folder: str, method: str, out: str) -> dict:
    result_file = os.path.join(out, f"{method}.json")
    command = [sys.executable, os.path.abspath(__file__), "--worker", result_file, "--model", folder, "--method",
               method, "--size", args.size, "--steps", str(args.steps), "--batch-size", str(args.batch_size)]
    command += ["--save-model"] if args.save_model else []
    print(f"--- {method}", flush=True)
    with open(os.path.join(out, f"{method}.log"), "w", encoding="utf-8") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        return {"method": method, "ok": False, "error": f"exit code {code}: see {method}.log"}
    with open(result_file, encoding="utf-8") as f:
        result = json.load(f)
    return {**result, "ok": True}


def run_peak(r: dict) -> int:
    """The peak from the method's surgery to the generation (writing model/, if asked, excluded)."""
    return max(r["phase_peaks_mib"].get(k, 0) for k in ("method", "training", "adapter", "generate"))


def markdown(written: dict, runs: list, args) -> str:
    cpu = next((r["cpu"] for r in runs if r.get("cpu")), "?")
    command = (f"python benchmarks/bench_large.py --size {args.size} --methods {' '.join(args.methods)} --steps "
               f"{args.steps} --batch-size {args.batch_size}")
    lines = [f"# LoRA on a {written['parameters'] / 1e9:.2f}B-parameter Flan-T5-{args.size.upper()} shape "
             f"(random weights, bf16 checkpoint of {written['bytes'] / 2**30:.2f} GiB in {written['shards']} "
             f"shards)", "", f"Machine: {cpu}. `{command}`; {args.batch_size} pairs a step cut at {SOURCE_LENGTH} / "
             f"{TARGET_LENGTH} tokens, activation checkpointing.", "",
             "| method | trainable | model in memory MiB | load s | peak at load MiB | peak training, adapter, "
             "generation MiB | whole-life peak MiB | s / step | tokens / s | MFU (of the layer's measured GFLOP/s) | "
             "adapter saved + reloaded | checkpoint MiB | generate s |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        if not r.get("ok"):
            lines.append(f"| {r['method']} | FAILED: {r['error']} ||||||||||||")
            continue
        name = r["method"] + (" (wo quantised too)" if r["quantize_kept"] else "")
        adapter = f"{r['adapter_mib']} MiB, {'equal' if r['adapter_reloaded'] else 'DIFFER'}"
        lines.append(f"| {name} | {r['trainable'] / 1e6:.1f}M | {r.get('model_mib', '-'):,} | {r['load_s']} | "
                     f"{r['load_peak_mib']:,} | {run_peak(r):,} | {r['peak_mib']:,} | {r['s_per_step']} | "
                     f"{r['tokens_per_s']} | "
                     f"{r['mfu']:.0%} of {r['layer_gflop_per_s']} | {adapter} | {r.get('checkpoint_mib', '-')} | "
                     f"{r['generate_s']} |")
    saves = [r for r in runs if r.get("save_s") is not None]
    if saves:
        lines += ["", "model/ written as a run writes it (`--save-model`; a quantised base shard by shard, "
                  "dequantised to bf16 with the adapters merged):", ""]
        lines += [f"- {r['method']}{' (wo quantised too)' if r['quantize_kept'] else ''}: {r['saved_gib']} GiB in "
                  f"{r['save_s']} s, peak RSS while writing {r['phase_peaks_mib']['save']:,} MiB" for r in saves]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
