"""Flan-T5 with int8 base weights and LoRA on q, v: spelling correction with an instruction prefix.

    python examples/lora_int8_flan_t5.py --model tiny        # offline smoke run, random weights
    python examples/lora_int8_flan_t5.py                     # google/flan-t5-base (hub or its cache)
    python examples/lora_int8_flan_t5.py --method qlora      # 4-bit NF4 base weights instead (QLoRA)

Every linear layer but the LM head is quantised to int8 (bitsandbytes, CPU or CUDA); LoRA adapters
(the declared defaults: r 16, alpha 32, dropout 0.05) on the attention's q and v train; LayerNorm gains
stay float32 and the LM head's output is float32. Only the adapter is saved (adapter/, also in PEFT's format under adapter_peft/).
"""
import argparse
import os
import sys

from common import load_model

from finetune import Engine, TrainConfig, read_pairs, save_adapter, trainable_report
from finetune.data.builtin import codespell_pairs
from finetune.methods import METHODS, apply_method, settings_of
from finetune.models import tiny_t5

PREFIX = "correct spelling of following word: "


def main(argv=None):
    ap = argparse.ArgumentParser(description="int8 + LoRA (or QLoRA, LoRA, DoRA) on Flan-T5")
    ap.add_argument("--model", default="google/flan-t5-base", help="hub name, local folder, or 'tiny'")
    ap.add_argument("--data", default=None, help="(.jsonl/.tsv/.csv) pairs; default: codespell; the prefix is added")
    ap.add_argument("--train-size", type=int, default=2000)
    ap.add_argument("--eval-size", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None, help="default 3e-4 (pretrained) / 3e-3 (tiny)")
    adapter_methods = [m for m in METHODS if "lora_r" in settings_of(m)]  # every method with LoRA adapters
    ap.add_argument("--method", choices=adapter_methods, default="int8-lora",
                    help="int8 base (default), 4-bit NF4 base (QLoRA), or a float base with LoRA / DoRA")
    ap.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                    help="auto: bf16 where the hardware has bf16 units, else fp32 (T5 overflows fp16)")
    ap.add_argument("--output-dir", default="runs/lora_int8_flan_t5")
    ap.add_argument("--overwrite-output-dir", action="store_true",
                    help="replace the outputs of an earlier run in --output-dir (otherwise refused)")
    args = ap.parse_args(argv)

    model, tokenizer = load_model(args.model, tiny_t5, "lora_int8_flan_t5.py")
    apply_method(model, args.method)  # LoRA as people use it: the declared defaults (r 16, alpha 32, dropout 0.05)
    print(trainable_report(model))
    train = read_pairs(args.data) if args.data else codespell_pairs("train", limit=args.train_size)
    test = codespell_pairs("test", limit=args.eval_size)
    train = [(PREFIX + s, t) for s, t in train]
    test = [(PREFIX + s, t) for s, t in test]
    config = TrainConfig(lr=args.lr or (3e-3 if args.model == "tiny" else 3e-4), epochs=args.epochs,
                         max_steps=args.max_steps, batch_size=32, warmup_ratio=0.05, precision=args.precision,
                         max_source_length=64, max_target_length=32, max_new_tokens=24, num_beams=4,
                         output_dir=args.output_dir,
                         overwrite_output_dir=args.overwrite_output_dir, log_every=10, save_model=False)
    engine = Engine(model, tokenizer, config)
    engine.fit(train)
    metrics = engine.evaluate(test)
    print(f"exact match {metrics['exact_match']:.3f} on {metrics['n']} pairs")
    save_adapter(model, os.path.join(args.output_dir, "adapter"))
    save_adapter(model, os.path.join(args.output_dir, "adapter_peft"), format="peft")
    print(f"adapter saved to {os.path.join(args.output_dir, 'adapter')} (and adapter_peft/ for PEFT)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
