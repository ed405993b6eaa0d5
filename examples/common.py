"""What the examples share: making the package importable from a checkout, and loading a model by name."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from finetune.models import ModelNotAvailable, load_seq2seq  # noqa: E402


def load_model(name: str, tiny_builder, script: str):
    """`tiny` builds a random model for a smoke run; anything else loads from disk or the hub cache.

    Where the model cannot be loaded (offline, not cached) this prints what to pass instead and exits 2.
    """
    if name == "tiny":
        print(f"--model tiny: a small RANDOMLY INITIALISED {tiny_builder.__name__.removeprefix('tiny_')} with a "
              "character tokenizer (smoke run only)")
        return tiny_builder(d_model=64, layers=2)
    try:
        return load_seq2seq(name)
    except ModelNotAvailable as err:
        print(f"{script}: {err}\n  Try: --model tiny (offline smoke run) or --model /path/to/a/local/checkpoint",
              file=sys.stderr)
        raise SystemExit(2) from None


# --------------------------------------------------------------------------------------------------
# what the real jobs share: the CPU line of a report, training rates, and --compare over the methods

def mean_rate(records) -> float:
    """The mean samples/s of training log records (0 if none)."""
    return sum(r["samples_per_s"] for r in records) / max(1, len(records))


def probe_result(method: str, engine, history) -> dict:
    """What --compare's timing probe reports: the training rate without the first log window (warm-up: first
    calls, allocator growth) and the samples a step takes (fixed, or on average under a token budget)."""
    records = history["train"][1:] or history["train"]
    return {"method": method, "steps": engine.global_step, "samples_per_s": mean_rate(records),
            "samples_per_step": sum(r["samples"] for r in history["train"]) / max(1, engine.global_step)}


class PhasePeaks:
    """Peak RSS of each phase of a run (setup, training steps, validation, the final test evaluation), beside the
    whole-life peak an OOM killer sees. Linux: the peak is VmHWM of /proc/self/status, set back to the current RSS
    through /proc/self/clear_refs at each mark; the whole-life peak is the largest of all the phases' peaks (the
    reset also lowers ru_maxrss). Elsewhere every phase reads the whole-life peak (ru_maxrss)."""

    def __init__(self):
        self.peaks: dict[str, float] = {}
        self.current = "setup"

    @staticmethod
    def _hwm_mib() -> float:
        import resource

        try:
            with open("/proc/self/status", encoding="utf-8") as f:
                return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
        except (OSError, StopIteration, ValueError):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def mark(self, next_phase: str) -> None:
        """The phase that ran since the last mark ends here (its peak kept, the largest if it ran before); the
        next one starts."""
        self.peaks[self.current] = max(self.peaks.get(self.current, 0.0), self._hwm_mib())
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        self.current = next_phase

    @property
    def whole_life(self) -> float:
        return max([*self.peaks.values(), self._hwm_mib()])

    def hooks(self):
        """(on_step, on_evaluate) for `Engine.fit`: what runs up to a step is "training", what runs between a step
        and the end of an evaluation is "validation"."""
        def on_evaluate(engine, result):
            self.current = "validation"
            self.mark("training")
        return (lambda engine, stats: self.mark("training")), on_evaluate


def cpu_description() -> str:
    """The CPU's model name and whether it has bf16 matrix units, for the report."""
    import platform

    from finetune.train.precision import cpu_bf16_units

    name, fields = platform.processor() or "unknown CPU", {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
        name = fields.get("model name", name)
    except OSError:
        pass
    family = f" (family {fields['cpu family']} model {fields['model']})" if "cpu family" in fields else ""
    return f"{name}{family}, {os.cpu_count()} cores, bf16 units: {cpu_bf16_units() or 'none'}"


def curves(ax, results, final, metric: str) -> None:
    """A --compare chart's right panel: each method's validation curve against training minutes (validation
    included), and its final test figure (`final(result)`) as a star."""
    for r in results:
        per_step = r["train_seconds"] / 60 / max(1, r["steps"])  # minutes per step, validation included
        curve = r.get("curve") or []
        line = ax.plot([step * per_step for step, _ in curve], [v for _, v in curve], marker=".",
                       label=f"{r['method']} (validation)")
        ax.scatter(r["train_seconds"] / 60, final(r), s=40, color=line[0].get_color(), marker="*")
    ax.set_xlabel("training minutes (validation included)")
    ax.set_ylabel(f"{metric} (lines: validation, greedy; stars: test, beam)")
    ax.legend(fontsize=7)


COMPARE_FLAGS = ("--compare", "--methods", "--budget", "--budget-minutes", "--compare-probe-steps")


def compare(args, argv, script, table, chart):
    """Every method of `args.methods` in a fresh process of `script` (so each peak memory is its own), then one
    table (`table(results)`: markdown) and chart (`chart(results, png)`); methods not run now but with a result in
    --output-dir join the table."""
    import json
    import subprocess

    from finetune.methods import METHODS

    os.makedirs(args.output_dir, exist_ok=True)
    passthrough, dropping = [], False
    for a in argv:  # everything but the flags of --compare itself (and their values)
        if a.startswith("--"):
            dropping = a.split("=", 1)[0] in COMPARE_FLAGS
        if not dropping:
            passthrough.append(a)
    steps = budget_steps(args, passthrough, script) if args.budget == "time" else {}
    results = []
    for method in METHODS:
        out = os.path.join(args.output_dir, method)
        result = os.path.join(out, "result.json")
        if method in args.methods:
            os.makedirs(out, exist_ok=True)
            # argparse keeps the last value of a repeated flag: these override the user's --method / --output-dir
            cmd = [sys.executable, os.path.abspath(script), *passthrough, "--method", method,
                   "--output-dir", out, "--result-json", result]
            if method in steps:  # the same minutes: this method's steps, validated 4 times like every other
                cmd += ["--max-steps", str(steps[method]), "--eval-every", str(max(1, steps[method] // 4))]
            print(f"== {method}: {' '.join(cmd[1:])}", flush=True)
            subprocess.run(cmd, check=True)
        elif not os.path.exists(result):
            continue  # neither run now nor earlier: not in the table
        with open(result, encoding="utf-8") as f:
            results.append(json.load(f))
    text = table(results)
    print("\n" + text)
    with open(os.path.join(args.output_dir, "compare.md"), "w", encoding="utf-8") as f:
        f.write(text + "\n")
    chart(results, os.path.join(args.output_dir, "compare.png"))
    print(f"\nsaved {os.path.join(args.output_dir, 'compare.md')} and compare.png")
    return 0


def budget_steps(args, passthrough, script) -> dict[str, int]:
    """Each method's step count for the same training minutes: a timed probe of its steps (its own process, the
    same flags), then steps = budget x its samples/s / its samples per step, rounded to 20. The budget is
    --budget-minutes, or the minutes full fine-tuning's probed rate needs for --max-steps. Validation runs come
    on top, 4 per method (equal cost for every method)."""
    import json
    import subprocess

    from finetune.methods import METHODS

    probed = {}
    for method in [m for m in METHODS if m in args.methods or (m == "full" and args.budget_minutes is None)]:
        path = os.path.join(args.output_dir, f"probe-{method}.json")
        cmd = [sys.executable, os.path.abspath(script), *passthrough, "--method", method,
               "--probe-steps", str(args.compare_probe_steps), "--result-json", path]
        print(f"== timing probe, {method}: {args.compare_probe_steps} steps", flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        with open(path, encoding="utf-8") as f:
            probed[method] = json.load(f)
    full = probed.get("full")
    seconds = args.budget_minutes * 60 if args.budget_minutes else \
        args.max_steps * full["samples_per_step"] / full["samples_per_s"]
    steps = {m: max(20, round(seconds * p["samples_per_s"] / p["samples_per_step"] / 20) * 20)
             for m, p in probed.items() if m in args.methods}
    print(f"budget {seconds / 60:.1f} training minutes each: " +
          ", ".join(f"{m} {probed[m]['samples_per_s']:.0f} samples/s -> {n} steps" for m, n in steps.items()),
          flush=True)
    return steps
