"""bert2bert summarisation: warm-start an EncoderDecoderModel from a BERT checkpoint, beam search, ROUGE.

    python examples/bert2bert_summarization.py --smoke                       # built-in sample, a few steps
    python examples/bert2bert_summarization.py --data news.jsonl --source-field document --target-field summary

The default BERT is the bundled all-MiniLM-L6-v2 (offline); `--model PATH` takes any BERT folder
(e.g. a local bert-base-uncased) and `--model tiny` a random one. The newly initialised tensors
(cross-attention, LM-head transform) train at --new-lr, the pretrained ones at --lr.
"""
import argparse
import sys

from common import load_model  # noqa: F401  (puts the checkout on sys.path)

from finetune import Engine, TrainConfig, read_pairs
from finetune.models import bert2bert_by_name
from finetune.methods import new_tensor_lr

SAMPLE = [
    ("The city council voted on Tuesday to extend the opening hours of the public library to nine in the evening "
     "on weekdays, after a survey found that most residents could not visit before work.",
     "Library opening hours extended to 9pm on weekdays."),
    ("Heavy rain overnight flooded several roads in the valley, and the regional transport office advised drivers "
     "to avoid the river road until the water level drops.",
     "Flooding closes valley roads after heavy rain."),
    ("A local bakery won the national bread competition with a sourdough loaf made from flour milled in the "
     "village, beating more than two hundred entries.",
     "Village bakery wins national bread prize."),
    ("The school announced that its new science laboratory, funded by donations from former students, will open "
     "to pupils at the start of the autumn term.",
     "School science lab to open in autumn."),
    ("Volunteers planted three thousand trees along the northern edge of the park on Saturday as part of a plan "
     "to double the city's tree cover within ten years.",
     "Volunteers plant 3,000 trees in city park."),
    ("The football club confirmed that its stadium will be renovated over the summer, adding a roof over the "
     "east stand and new seats for families.",
     "Football stadium to get roof and family seats."),
]


def main(argv=None):
    ap = argparse.ArgumentParser(description="bert2bert summarisation")
    ap.add_argument("--model", default="minilm", help="'minilm' (bundled), 'tiny', or a BERT folder")
    ap.add_argument("--data", default=None, help="JSONL of (document, summary); default: the built-in sample")
    ap.add_argument("--eval-data", default=None)
    ap.add_argument("--source-field", default="document")
    ap.add_argument("--target-field", default="summary")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--smoke", action="store_true", help="a few steps on the built-in sample")
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--new-lr", type=float, default=1e-3)
    ap.add_argument("--output-dir", default="runs/bert2bert_summarization")
    ap.add_argument("--overwrite-output-dir", action="store_true",
                    help="replace the outputs of an earlier run in --output-dir (otherwise refused)")
    args = ap.parse_args(argv)

    built = bert2bert_by_name(args.model)
    model, tokenizer, new = built.model, built.tokenizer, built.new_parameters
    train = read_pairs(args.data, args.source_field, args.target_field) if args.data else SAMPLE
    test = read_pairs(args.eval_data, args.source_field, args.target_field) if args.eval_data else train[:4]
    positions = model.config.encoder.max_position_embeddings
    config = TrainConfig(lr=args.lr, lr_overrides=new_tensor_lr(new, args.new_lr),
                         epochs=args.epochs, max_steps=3 if args.smoke else args.max_steps, batch_size=8,
                         warmup_ratio=0.1, max_source_length=min(256, positions), max_target_length=48,
                         max_new_tokens=40, num_beams=4, output_dir=args.output_dir,
                         overwrite_output_dir=args.overwrite_output_dir, log_every=5)
    engine = Engine(model, tokenizer, config)
    engine.fit(train)
    metrics = engine.evaluate(test)
    print(f"ROUGE-1 {metrics['rouge1']:.3f}  ROUGE-2 {metrics['rouge2']:.3f}  ROUGE-L {metrics['rougeL']:.3f} "
          f"on {metrics['n']} documents (beam 4)")
    for (doc, ref), out in zip(test[:2], engine.generate([d for d, _ in test[:2]])):
        print(f"  {doc[:70]}...\n    reference: {ref}\n    generated: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
