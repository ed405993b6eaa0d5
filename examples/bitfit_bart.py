"""BitFit on BART: train only the bias terms (about 0.1% of bart-base) for a seq2seq task.

    python examples/bitfit_bart.py --model tiny           # offline smoke run, random weights, seconds
    python examples/bitfit_bart.py                        # facebook/bart-base (needs the hub or its cache)
    python examples/bitfit_bart.py --model /path/to/bart --data pairs.jsonl

--data takes a .jsonl/.tsv/.csv file of (source, target) pairs and defaults to codespell's spelling
pairs (pip install -e '.[examples]').
"""
import argparse
import os
import sys

from common import load_model

from finetune import Engine, TrainConfig, bitfit, read_pairs
from finetune.data.builtin import codespell_pairs
from finetune.models import tiny_bart


def main(argv=None):
    ap = argparse.ArgumentParser(description="BitFit on BART")
    ap.add_argument("--model", default="facebook/bart-base", help="hub name, local folder, or 'tiny'")
    ap.add_argument("--data", default=None, help="training pairs (.jsonl/.tsv/.csv); default: codespell")
    ap.add_argument("--eval-data", default=None, help="evaluation pairs; default: codespell test split")
    ap.add_argument("--train-size", type=int, default=2000)
    ap.add_argument("--eval-size", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=None, help="default 1e-3 (bart-base) / 3e-3 (tiny)")
    ap.add_argument("--output-dir", default="runs/bitfit_bart")
    ap.add_argument("--overwrite-output-dir", action="store_true",
                    help="replace the outputs of an earlier run in --output-dir (otherwise refused)")
    args = ap.parse_args(argv)

    model, tokenizer = load_model(args.model, tiny_bart, "bitfit_bart.py")
    report = bitfit(model)
    print(report)

    train = read_pairs(args.data) if args.data else codespell_pairs("train", limit=args.train_size)
    test = read_pairs(args.eval_data) if args.eval_data else codespell_pairs("test", limit=args.eval_size)
    config = TrainConfig(lr=args.lr or (3e-3 if args.model == "tiny" else 1e-3), weight_decay=0.0,
                         warmup_ratio=0.05, epochs=args.epochs, max_steps=args.max_steps,
                         batch_size=args.batch_size, max_source_length=64, max_target_length=64,
                         max_new_tokens=32, num_beams=4, output_dir=args.output_dir,
                         overwrite_output_dir=args.overwrite_output_dir, log_every=10)
    engine = Engine(model, tokenizer, config)
    engine.fit(train)
    metrics = engine.evaluate(test)
    print(f"exact match {metrics['exact_match']:.3f} on {metrics['n']} pairs; by edit distance:")
    for b, v in metrics["by_edit_distance"].items():
        print(f"  {b:>3}: {v['exact_match']:.3f} ({v['n']} pairs)")
    print(f"model saved to {os.path.join(args.output_dir, 'model')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
