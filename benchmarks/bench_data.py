"""Data at any size: start-up time and memory of a run on a 10,000- and a 1,000,000-pair JSONL, tokenising in one
process and in every core, from a cold and a warm cache, and the old path (a Python list) beside them; then the
main job's and the code-summary job's training rate and losses on the old path and the new (file, cache,
prefetch thread).

    python benchmarks/bench_data.py                       # start-up (~15 min), rate (~10 min), collation
    python benchmarks/bench_data.py --part start --pairs 10000 100000

The data: the codespell train pairs and the code-summary train pairs (finetune.data.builtin), alternated and repeated
with variation (row i carries its number, in the source as a trailing word or comment and in the target) to the
wanted count: 3-10-token words beside 30-256-token functions. The model: MiniLM bert2bert (the main job's),
sources cut at 128 tokens, targets at 48, batches of 32. Each measurement is a fresh process (a cold cache is a
new cache folder); "start" is the wall time from the start of `Engine.prepare` to the end of the first training
step; memory is the whole-life peak RSS of the process (ru_maxrss, what an OOM killer sees) and, apart, the
peak of the tokenising workers (RUSAGE_CHILDREN). Output: results.json and results.md in --out.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def generate(path: str, pairs: int) -> str:
    """A JSONL of `pairs` rows: codespell and code-summary pairs alternated, each row numbered (variation)."""
    from finetune.data.builtin import code_summary_pairs, codespell_pairs

    if os.path.exists(path):
        return path
    words, code = codespell_pairs("train"), code_summary_pairs("train")
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for i in range(pairs):
            if i % 2:
                s, t = code[(i // 2) % len(code)]
                row = {"source": f"{s}\n# variant {i}", "target": f"{t} ({i})"}
            else:
                s, t = words[(i // 2) % len(words)]
                row = {"source": f"{s} {i}", "target": f"{t} {i}"}
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)
    return path


def worker(args) -> dict:
    """One start-up: prepare + the first step, in this fresh process."""
    import torch

    from finetune import Engine, TrainConfig
    from finetune.data.pairs import read_pairs
    from finetune.models import bert2bert_by_name

    torch.manual_seed(0)
    built = bert2bert_by_name("minilm")
    cfg = TrainConfig(max_steps=2, batch_size=32, max_source_length=128, max_target_length=48, progress=False,
                      save_model=False, output_dir=tempfile.mkdtemp(prefix="bench-data-"), cache_dir=args.cache,
                      num_proc=args.num_proc, prefetch=args.prefetch, precision="fp32")
    engine = Engine(built.model, built.tokenizer, cfg)
    started = time.perf_counter()
    data = read_pairs(args.data) if args.path == "list" else args.data  # the old path reads into a list first
    run = engine.prepare(data)
    prepared, peak_prepared = time.perf_counter(), peak_mib()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    _, window = next(iter(engine.windows(run, 0)))
    peak_window = peak_mib()
    engine.train_step(window)
    first = time.perf_counter()
    return {"path": args.path, "pairs": len(run.data.examples), "num_proc": args.num_proc, "cache": args.cache_state,
            "prepare_s": round(prepared - started, 2), "start_s": round(first - started, 2),
            "origin": getattr(run.data.examples, "origin", "list"),
            "peak_prepared_mib": peak_prepared, "peak_first_window_mib": peak_window, "peak_rss_mib": peak_mib(),
            "workers_cpu_s": round(children.ru_utime + children.ru_stime, 1),
            "workers_peak_rss_mib": round(children.ru_maxrss / 1024)}


def peak_mib() -> int:
    """The whole-life peak RSS of this process so far (what an OOM killer sees)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def rate_worker(args) -> dict:
    """The training rate and losses of --steps steps of a job, on the old path or the new."""
    import torch

    from finetune import Engine, TrainConfig
    from finetune.data.builtin import code_summary_pairs, codespell_pairs
    from finetune.methods import new_tensor_lr
    from finetune.models import bert2bert_by_name

    pairs = codespell_pairs("train", limit=4000, seed=0) if args.job == "codespell" else \
        code_summary_pairs("train", seed=0)
    shape = dict(batch_size=64, max_source_length=32, max_target_length=32) if args.job == "codespell" else \
        dict(max_tokens=2048, max_source_length=128, max_target_length=48)
    data = pairs
    if args.path != "list":
        data = os.path.join(args.cache, f"{args.job}.jsonl")
        if not os.path.exists(data):
            with open(data, "w", encoding="utf-8") as f:
                f.writelines(json.dumps({"source": s, "target": t}) + "\n" for s, t in pairs)
    torch.manual_seed(0)
    built = bert2bert_by_name("minilm")
    cfg = TrainConfig(lr=1e-4, lr_overrides=new_tensor_lr(built.new_parameters, 1e-3), max_steps=args.steps,
                      log_every=1, progress=False, save_model=False, prefetch=args.prefetch, precision="fp32",
                      output_dir=tempfile.mkdtemp(prefix="bench-rate-"), cache_dir=args.cache, **shape)
    times, losses = [], []

    def on_step(engine, stats):
        times.append((time.perf_counter(), stats["samples"]))
        losses.append(stats["loss"])

    Engine(built.model, built.tokenizer, cfg).fit(data, on_step=on_step)
    span = times[-1][0] - times[0][0]
    return {"job": args.job, "path": args.path, "prefetch": args.prefetch, "losses": losses,
            "samples_per_s": round(sum(n for _, n in times[1:]) / span, 2)}


def collate_times(jobs) -> dict:
    """Milliseconds to collate one micro-batch of each job (the work the prefetch thread takes off the step)."""
    import torch

    from finetune import Engine, TrainConfig
    from finetune.data.builtin import code_summary_pairs, codespell_pairs
    from finetune.models import bert2bert_by_name

    torch.manual_seed(0)
    built, out = bert2bert_by_name("minilm"), {}
    for job in jobs:
        pairs = codespell_pairs("train", limit=4000) if job == "codespell" else code_summary_pairs("train")
        shape = dict(batch_size=64, max_source_length=32, max_target_length=32) if job == "codespell" else \
            dict(max_tokens=2048, max_source_length=128, max_target_length=48)
        engine = Engine(built.model, built.tokenizer, TrainConfig(max_steps=1, progress=False, save_model=False,
                        output_dir=tempfile.mkdtemp(prefix="bench-collate-"), **shape))
        run = engine.prepare(pairs)
        batches = run.data.sampler.batches(0)[:40]
        started = time.perf_counter()
        for b in batches:
            engine.collate([run.data.examples[i] for i in b])
        out[job] = round(1000 * (time.perf_counter() - started) / len(batches), 2)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", nargs="+", choices=("start", "rate", "collate"), default=["start", "rate", "collate"])
    ap.add_argument("--pairs", nargs="+", type=int, default=[10_000, 1_000_000])
    ap.add_argument("--list-pairs", type=int, default=100_000, help="the old path (a Python list) at this size")
    ap.add_argument("--jobs", nargs="+", choices=("codespell", "code-summary"), default=["codespell", "code-summary"])
    ap.add_argument("--steps", type=int, default=30, help="rate part: steps of each run")
    ap.add_argument("--rounds", type=int, default=2, help="rate part: rounds (the variants alternate)")
    ap.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "finetune-bench-data"))
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "data"))
    ap.add_argument("--timeout", type=int, default=3600)
    for name in ("--worker", "--rate-worker"):
        ap.add_argument(name, action="store_true", help=argparse.SUPPRESS)
    for name, kind in (("--data", str), ("--path", str), ("--cache", str), ("--cache-state", str), ("--job", str),
                       ("--num-proc", int), ("--prefetch", int)):
        ap.add_argument(name, type=kind, default=None if kind is str else 2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker or args.rate_worker:
        print(json.dumps(worker(args) if args.worker else rate_worker(args)))
        return 0

    from bench_real import machine, run_worker
    from finetune.data.corpus import default_num_proc

    os.makedirs(args.data_dir, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)
    cores, me = default_num_proc(), [sys.executable, os.path.abspath(__file__)]
    results = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "cores": cores, "start": [], "rate": []}

    def start(data, path, num_proc, cache, state):
        row = run_worker(me + ["--worker", "--data", data, "--path", path, "--num-proc", str(num_proc), "--cache",
                               cache, "--cache-state", state], args.timeout, f"start-up {data} {path} {num_proc}")
        row["file_pairs"] = sum(1 for _ in open(data, "rb"))
        print(json.dumps(row), flush=True)
        results["start"].append(row)

    if "start" in args.part:
        for n in args.pairs:
            data = generate(os.path.join(args.data_dir, f"pairs-{n}.jsonl"), n)
            procs = [1, cores] if n == max(args.pairs) and cores > 1 else [cores]
            for num_proc in procs:
                cache = tempfile.mkdtemp(prefix="cache-", dir=args.data_dir)  # cold
                start(data, "file", num_proc, cache, "cold")
            start(data, "file", cores, cache, "warm")
            if n <= args.list_pairs:
                start(data, "list", cores, cache, "none (list)")
        if args.list_pairs not in args.pairs:
            data = generate(os.path.join(args.data_dir, f"pairs-{args.list_pairs}.jsonl"), args.list_pairs)
            start(data, "list", cores, tempfile.mkdtemp(prefix="cache-", dir=args.data_dir), "none (list)")
    if "rate" in args.part:
        cache = tempfile.mkdtemp(prefix="cache-", dir=args.data_dir)
        variants = [("list", 0), ("file", 0), ("file", 2)]
        for job in args.jobs:
            for r in range(args.rounds):
                for path, prefetch in (variants if r % 2 == 0 else variants[::-1]):
                    row = run_worker(me + ["--rate-worker", "--job", job, "--path", path, "--prefetch", str(prefetch),
                                           "--cache", cache, "--steps", str(args.steps)], args.timeout,
                                     f"rate {job} {path} {prefetch}")
                    print(json.dumps({k: v for k, v in row.items() if k != "losses"}), flush=True)
                    results["rate"].append(row)
    if "collate" in args.part:
        results["collate_ms"] = collate_times(args.jobs)
        print(json.dumps({"collate_ms_per_micro_batch": results["collate_ms"]}), flush=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(markdown(results))
    print(markdown(results))
    return 0


def markdown(results) -> str:
    m = results["machine"]
    lines = [f"Machine: {m.get('cpu', m)}, {results['cores']} cores; {results['date']}", ""]
    if results["start"]:
        lines += ["| pairs | path | cache | processes | prepare s | start s (to the end of step 1) | workers' CPU s | "
                  "peak RSS MiB: prepared | + first window | + first step | child processes' peak MiB |",
                  "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in results["start"]:
            procs = r['num_proc'] if r['path'] == 'file' else 1
            lines.append(f"| {r['pairs']:,} | {r['path']} | {r['cache']} | {procs} | {r['prepare_s']} | {r['start_s']} "
                         f"| {r['workers_cpu_s']} | {r['peak_prepared_mib']} | {r['peak_first_window_mib']} "
                         f"| {r['peak_rss_mib']} | {r['workers_peak_rss_mib']} |")
        lines.append("")
    if results["rate"]:
        lines += ["| job | path | prefetch | samples/s (median) | losses equal to the list path's |",
                  "|---|---|---:|---:|---|"]
        groups = {}
        for r in results["rate"]:
            groups.setdefault((r["job"], r["path"], r["prefetch"]), []).append(r)
        for (job, path, prefetch), rows in groups.items():
            reference = groups[(job, "list", 0)][0]["losses"]
            same = all(r["losses"] == reference for r in rows)
            lines.append(f"| {job} | {path} | {prefetch} | {statistics.median(r['samples_per_s'] for r in rows):.2f} "
                         f"| {'bit-identical' if same else 'DIFFERENT'} |")
    if results.get("collate_ms"):
        lines += ["", "Collating one micro-batch: " + ", ".join(f"{job} {ms} ms" for job, ms in
                                                             results["collate_ms"].items())]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
