"""Choose the code-summary job's decoding on its validation split, never on the test split: a trained run's model
decoded over a grid of beam counts, length penalties and no-repeat n-gram sizes, each scored on the same
validation pairs (ROUGE-L, BLEU, mean prediction length beside the references').

    python examples/code_summary_bert2bert.py --output-dir runs/code-summary --overwrite-output-dir
    python benchmarks/decoding_sweep.py runs/code-summary/model --length-penalties 0.6 1.0 1.5 2.0

The validation pairs are those of the job (code_summary_pairs("validation"), lowercased targets) with the job's
source and target lengths; --valid-size draws a sample with --seed (default: the whole split). Prints a markdown
table and writes it with the raw figures to --out (a .json beside a .md).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))

from common import cpu_description  # noqa: E402

from finetune import Engine, TrainConfig  # noqa: E402
from finetune.data.builtin import code_summary_pairs  # noqa: E402
from finetune.models import ModelNotAvailable, load_seq2seq  # noqa: E402


def sweep(args) -> list[dict]:
    model, tokenizer = load_seq2seq(args.model_dir)
    tokenizer.clean_up_tokenization_spaces = True  # as the job decodes (examples/code_summary_bert2bert.py)
    pairs = [(code, summary.lower()) for code, summary in
             code_summary_pairs("validation", limit=args.valid_size, seed=args.seed)]
    rows = []
    for beams, penalty, ngram in itertools.product(args.num_beams, args.length_penalties, args.no_repeat_ngram_size):
        with tempfile.TemporaryDirectory(prefix="decode-") as out:
            config = TrainConfig(max_source_length=args.max_source_length, max_target_length=args.max_target_length,
                                 num_beams=beams, max_new_tokens=args.max_new_tokens, eval_batch_size=32,
                                 length_penalty=penalty if beams > 1 else None, no_repeat_ngram_size=ngram or None,
                                 output_dir=out, overwrite_output_dir=True, precision=args.precision)
            engine = Engine(model, tokenizer, config)
            metrics = engine.evaluate(pairs, predictions_file="predictions.jsonl")
            with open(os.path.join(out, "predictions.jsonl"), encoding="utf-8") as f:
                lines = [json.loads(line) for line in f]
        words = sum(len(r["prediction"].split()) for r in lines) / len(lines)
        wanted = sum(len(r["target"].split()) for r in lines) / len(lines)
        rows.append({"num_beams": beams, "length_penalty": penalty if beams > 1 else None, "no_repeat_ngram": ngram,
                     "rougeL": metrics["rougeL"], "bleu": metrics["bleu"], "words": words, "target_words": wanted,
                     "distinct_share": metrics["distinct_share"], "pairs": len(lines)})
        print(f"beams {beams} length_penalty {penalty} no_repeat {ngram}: ROUGE-L {metrics['rougeL']:.4f} "
              f"BLEU {metrics['bleu']:.2f} words {words:.1f} (references {wanted:.1f})", flush=True)
    return rows


def table(rows: list[dict], machine: str, args) -> str:
    lines = [f"Model: {args.model_dir}; {rows[0]['pairs']} validation pairs; machine: {machine}", "",
             "| beams | length penalty | no repeat n-gram | ROUGE-L | BLEU | words (references) | distinct |",
             "|---|---|---|---|---|---|---|"]
    best = max(range(len(rows)), key=lambda i: rows[i]["rougeL"])  # the first of equals
    for i, r in enumerate(rows):
        rouge = f"**{r['rougeL']:.4f}**" if i == best else f"{r['rougeL']:.4f}"
        lines.append(f"| {r['num_beams']} | {r['length_penalty'] if r['length_penalty'] is not None else '-'} | "
                     f"{r['no_repeat_ngram'] or '-'} | {rouge} | {r['bleu']:.2f} | {r['words']:.1f} "
                     f"({r['target_words']:.1f}) | {r['distinct_share']:.0%} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", help="a trained run's model/ folder")
    ap.add_argument("--num-beams", type=int, nargs="+", default=[4])
    ap.add_argument("--length-penalties", type=float, nargs="+", default=[1.0])
    ap.add_argument("--no-repeat-ngram-size", type=int, nargs="+", default=[3], help="0: no constraint")
    ap.add_argument("--valid-size", type=int, default=None, help="validation pairs (default: the whole split)")
    ap.add_argument("--seed", type=int, default=0, help="the sample of --valid-size")
    ap.add_argument("--max-source-length", type=int, default=128)
    ap.add_argument("--max-target-length", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    ap.add_argument("--out", default=None, help="write OUT.json and OUT.md (default: print only)")
    args = ap.parse_args(argv)
    for name in ("num_beams", "no_repeat_ngram_size"):
        if any(v < (1 if name == "num_beams" else 0) for v in getattr(args, name)):
            ap.error(f"--{name.replace('_', '-')}: every value must be >= {1 if name == 'num_beams' else 0}")
    if args.valid_size is not None and args.valid_size < 1:
        ap.error(f"--valid-size must be >= 1, got {args.valid_size}")
    try:
        rows = sweep(args)
    except ModelNotAvailable as err:
        ap.error(str(err))
    text = table(rows, cpu_description(), args)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out + ".json", "w", encoding="utf-8") as f:
            json.dump({"model_dir": args.model_dir, "valid_size": args.valid_size, "rows": rows}, f, indent=1)
        with open(args.out + ".md", "w", encoding="utf-8") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
