"""The `finetune` command (also `python -m finetune`).

    finetune train CONFIG.toml [--set section.key=value ...] [--resume latest|PATH]
    finetune eval --model DIR --data FILE [--num-beams N]
    finetune generate --model DIR "text" ... [--num-beams N]
    finetune check CONFIG.toml [--set ...] [--steps N] [--resume]   the recipe's preflight: PASS / WARN / FAIL, exit 1
                                                                    on FAIL
    finetune report DIR            trainable report, metrics summary, loss / learning-rate plot (DIR/report.png)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from finetune.data.pairs import DataError, read_pairs
from finetune.models.load import ModelNotAvailable
from finetune.store.outputs import OutputDirError
from finetune.train.checkpoint import CheckpointError


def cmd_train(args) -> int:
    from finetune.methods.freeze import trainable_report
    from finetune.run_build import build_run
    from finetune.run_config import load_run_config
    from finetune.store.outputs import RunLock, claim_for_fresh_run
    from finetune.train.engine import Engine

    run = load_run_config(args.config, args.set)
    built = build_run(run)
    model, tokenizer, cfg = built.model, built.tokenizer, built.config
    train, evaluation = built.train, built.eval
    engine = Engine(model, tokenizer, cfg, noise=run.noise)
    with RunLock(cfg.output_dir):  # the run's files are written only once it owns the folder
        if args.resume is None:
            claim_for_fresh_run(cfg.output_dir, cfg.overwrite_output_dir, dry_run=True)
        with open(os.path.join(cfg.output_dir, "trainable.txt"), "w", encoding="utf-8") as f:
            f.write(str(trainable_report(model)) + "\n")
        with open(os.path.join(cfg.output_dir, "run_config.json"), "w", encoding="utf-8") as f:
            json.dump({"config_file": os.path.abspath(args.config), "overrides": args.set,
                       **{k: _plain(getattr(run, k)) for k in ("model", "method", "data", "train", "noise")}}, f,
                      indent=1)
        history = engine.fit(train, eval=evaluation, resume=args.resume)
    if history["eval"]:
        print(json.dumps(history["eval"][-1], indent=1))
    return 0


def cmd_check(args) -> int:
    from finetune.run_build import build_run, check_setup
    from finetune.run_config import load_run_config

    built = build_run(load_run_config(args.config, args.set))
    report = check_setup(built.model, built.tokenizer, built.config, built.train, built.new_parameters, args.steps,
                         eval=built.eval, resume=args.resume)
    print(report)
    return 1 if report.failed else 0


def _plain(section):
    if section is None:
        return None
    return {k: v for k, v in dataclasses.asdict(section).items() if not callable(v)}


def _engine_for(args, output_dir: str | None = None):
    """The engine `finetune eval` / `generate` run: the model folder (`--model`), quantised while it loads with
    `--quantize`, with `--adapter` (a LoRA adapter folder, ours or PEFT's) on top."""
    from finetune.methods.adapters import load_adapter
    from finetune.models import load_quantized, load_seq2seq
    from finetune.train.config import TrainConfig
    from finetune.train.engine import Engine

    if not os.path.isdir(args.model):
        raise ModelNotAvailable(f"--model {args.model}: not a folder (pass the model/ folder a training run wrote, or "
                                "the base model's folder with --adapter)")
    adapters = _adapters(args.adapter)
    cfg = TrainConfig(num_beams=args.num_beams, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                      output_dir=output_dir or os.path.join(args.model, "eval"), progress=False, **_generation(args))
    if args.quantize:  # after the settings are checked
        model, tokenizer = load_quantized(args.model, args.quantize, quantize_kept=args.quantize_kept)
    else:
        model, tokenizer = load_seq2seq(args.model)
    for name, path in adapters.items():
        load_adapter(model, path, adapter_name=name if len(adapters) > 1 else None)
    return Engine(model, tokenizer, cfg)


def _adapters(values) -> dict[str, str]:
    """--adapter values by name: one PATH (the adapter alone), or NAME=PATH each (several on one base); every
    folder checked before the model loads."""
    adapters = {}
    for value in values or ():
        name, path = ("", value) if os.path.isdir(value) or "=" not in value else value.split("=", 1)
        if len(values) > 1 and not name:
            raise ModelNotAvailable(f"--adapter {value}: with several adapters, name each one: --adapter NAME=PATH")
        if name in adapters:
            raise ModelNotAvailable(f"--adapter {value}: the name {name!r} is given twice")
        if not os.path.isdir(path):
            raise ModelNotAvailable(f"--adapter {value}: {path} is not a folder (pass the adapter/ folder a LoRA run "
                                    "wrote, or PEFT's)")
        adapters[name] = path
    return adapters


def _each_adapter(engine):
    """(name, engine) for each adapter `_engine_for` loaded (set active in turn), or ("", engine) for one or none."""
    from finetune.methods import adapter_names, set_adapter

    names = adapter_names(engine.model)
    if len(names) < 2:
        yield "", engine
        return
    for name in names:
        set_adapter(engine.model, name)
        yield name, engine


def cmd_eval(args) -> int:
    if not os.path.isdir(args.model):
        raise ModelNotAvailable(f"--model {args.model}: not a folder (pass the model/ folder a training run wrote)")
    pairs = read_pairs(args.data)  # a bad data file fails before the model loads
    engine = _engine_for(args, args.output_dir)
    results = {name: engine.evaluate(pairs) for name, engine in _each_adapter(engine)}
    print(json.dumps(results[""] if "" in results else results, indent=1))
    return 0


def cmd_generate(args) -> int:
    for name, engine in _each_adapter(_engine_for(args)):
        for text, out in zip(args.texts, engine.generate(args.texts)):
            print(f"{name}\t{text}\t{out}" if name else f"{text}\t{out}")
    return 0


def _generation(args) -> dict:
    from finetune.evaluate.generation import SETTINGS

    return {name: getattr(args, name) for name in SETTINGS if getattr(args, name) is not None}


def cmd_report(args) -> int:
    path = os.path.join(args.dir, "metrics.jsonl")
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file (is {args.dir} the output_dir of a training run?)")
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise DataError(f"{path}:{line_no}: invalid JSON") from None
    train = [r for r in rows if r.get("split") == "train"]
    evals = [r for r in rows if r.get("split") == "eval" and not r.get("final")]
    finals = [r for r in rows if r.get("split") == "eval" and r.get("final")]
    best = next((r for r in reversed(rows) if r.get("event") == "best_model"), None)
    stopped = next((r for r in reversed(rows) if r.get("event") == "early_stopping"), None)
    trainable = os.path.join(args.dir, "trainable.txt")
    if os.path.exists(trainable):
        print(open(trainable, encoding="utf-8").read().rstrip())
    if train:
        print(f"train: {len(train)} records, steps {train[0]['step']}..{train[-1]['step']}, loss "
              f"{train[0]['loss']:.4f} -> {train[-1]['loss']:.4f}, token accuracy {train[-1]['token_accuracy']:.3f}, "
              f"{sum(r['samples_per_s'] for r in train) / len(train):.1f} samples/s")
    for last, what in ((evals[-1] if evals else None, "eval"), (finals[-1] if finals else None, "final eval")):
        if last is None:
            continue
        print(f"{what} (step {last.get('step')}, {last.get('num_beams', '?')} beams, {last.get('n', '?')} pairs): loss "
              f"{last['loss']:.4f}, exact match {last['exact_match']:.3f}, ROUGE-L {last.get('rougeL', 0):.3f}, "
              f"BLEU {last.get('bleu', 0):.2f}, chrF {last.get('chrf', 0):.2f}")
        for b, v in last.get("by_edit_distance", {}).items():
            print(f"  edit distance {b:>3}: {v['exact_match']:.3f} ({v['n']} pairs)")
    if best:
        print(f"best model: step {best['step']} ({best['path']}); model/ holds it, the last weights are in "
              f"{best.get('last_checkpoint')}")
    if stopped:
        print(stopped["reason"])
    if train:
        png = args.png or os.path.join(args.dir, "report.png")
        plot_history(train, evals, png, best["step"] if best else None)
        print(f"plot: {png}")
    return 0


def plot_history(train, evals, png: str, best_step: int | None = None) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ModelNotAvailable("the plot needs matplotlib: pip install -e '.[examples]'") from err
    fig, axes = plt.subplots(3 if evals else 2, 1, figsize=(7, 8 if evals else 6), sharex=True)
    ax_loss, ax_lr = axes[0], axes[-1]
    steps = [r["step"] for r in train]
    ax_loss.plot(steps, [r["loss"] for r in train], label="train loss")
    if evals:
        ax_loss.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="eval loss")
        ax_metric = axes[1]
        for key in ("exact_match", "rougeL", "chrf"):
            if any(key in r for r in evals):
                ax_metric.plot([r["step"] for r in evals], [r.get(key, 0) for r in evals], "o-", label=f"eval {key}")
        ax_metric.set_ylabel("eval metric")
        ax_metric.legend()
    for ax in axes:
        if best_step is not None:
            ax.axvline(best_step, color="tab:green", linestyle="--", label="best" if ax is ax_loss else None)
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_lr.plot(steps, [r["lr"] for r in train], color="tab:orange")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def _model_arguments(p, name: str):
    """The arguments of `finetune eval` and `finetune generate`."""
    p.add_argument("--model", required=True, help="a model/ folder a run wrote, or a base model's folder")
    p.add_argument("--adapter", action="append", default=None, metavar="[NAME=]PATH",
                   help="a LoRA adapter folder (adapter/ of a run, or PEFT's) on --model; repeat as NAME=PATH for "
                        "several on one base: each is evaluated / generates in turn, under its name")
    p.add_argument("--quantize", choices=("qlora", "int8-lora"), default=None,
                   help="quantise --model while it loads (4-bit NF4 or int8), as the run that trained the adapter")
    p.add_argument("--quantize-kept", action="store_true",
                   help="with --quantize: the layers transformers keeps float too (the run's quantize_kept)")
    p.add_argument("--num-beams", type=_positive, default=4)
    p.add_argument("--batch-size", type=_positive, default=64)
    p.add_argument("--max-new-tokens", type=_positive, default=64)
    p.add_argument("--length-penalty", type=float, default=None, help="beam search: score / length**this")
    p.add_argument("--early-stopping", action=argparse.BooleanOptionalAction, default=None,
                   help="beam search: stop once num_beams candidates are finished")
    p.add_argument("--no-repeat-ngram-size", type=int, default=None, help="no n-gram of this size twice")
    p.add_argument("--min-new-tokens", type=int, default=None, help="tokens generated before eos may end")
    p.add_argument("--repetition-penalty", type=float, default=None, help="> 1 discourages repeated tokens")
    if name == "eval":
        p.add_argument("--data", required=True)
        p.add_argument("--output-dir", default=None)
    else:
        p.add_argument("texts", nargs="+")
    return p


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="finetune", description="Fine-tune encoder-decoder transformers.")
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train from a TOML run file")
    t.add_argument("config")
    t.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    t.add_argument("--resume", default=None, help="'latest' or a checkpoint folder")
    t.set_defaults(func=cmd_train)
    c = sub.add_parser("check", help="preflight of a run file: tokens, one batch, groups, gradients, overfit one batch")
    c.add_argument("config")
    c.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    c.add_argument("--steps", type=_positive, default=200, help="overfitting steps (default 200)")
    c.add_argument("--resume", action="store_true", help="the run will be resumed: its output folder may hold it")
    c.set_defaults(func=cmd_check)
    for name, func in (("eval", cmd_eval), ("generate", cmd_generate)):
        _model_arguments(sub.add_parser(name, help=f"{name} with a saved model folder"), name).set_defaults(func=func)
    r = sub.add_parser("report", help="summarise a run folder and plot its loss and learning rate")
    r.add_argument("dir")
    r.add_argument("--png", default=None)
    r.set_defaults(func=cmd_report)
    args = ap.parse_args(argv)
    from finetune.train.engine import TrainingStopped

    try:
        return args.func(args)
    except (ValueError, TypeError, DataError, ModelNotAvailable, CheckpointError, OutputDirError, OSError,
            ImportError) as err:
        _error(args.command, err)
        return 2
    except TrainingStopped as err:
        _error(args.command, f"training stopped: {err}")
        return 1
    except KeyboardInterrupt:
        _error(args.command, "interrupted")
        return 130
    except Exception as err:  # a bug, not a user error: still one line; FINETUNE_TRACEBACK=1 shows where
        if os.environ.get("FINETUNE_TRACEBACK"):
            raise
        _error(args.command, f"unexpected {type(err).__name__}: {err} (set FINETUNE_TRACEBACK=1 to see the traceback "
                             "and please report it)")
        return 1


def _error(command: str, err) -> None:
    text = " ".join(str(err).split()) if str(err).strip() else type(err).__name__
    if isinstance(err, OSError) and err.filename and str(err.filename) not in text:
        text = f"{err.filename}: {text}"
    print(f"finetune {command}: error: {text}", file=sys.stderr)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


if __name__ == "__main__":
    sys.exit(main())
