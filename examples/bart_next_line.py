"""Next-line generation with BART, trained with BART's own noise on the source line.

Each pair is (line, next line) of a poem or lyric. The source line is corrupted afresh every epoch:
by default 25% of its tokens are masked but never the last word, which carries the rhyme that the next
line must answer; `--noise infill` uses text infilling (Poisson(3) spans over 30% of the tokens) instead.

    python examples/bart_next_line.py --model tiny                   # offline smoke run, random weights
    python examples/bart_next_line.py --model /path/to/bart --lines lyrics.txt

--lines takes a text file, one line of verse a line (blank lines separate songs); the default is a small
built-in sample of public-domain nursery rhymes.
"""
import argparse
import sys

from common import load_model

from finetune import Engine, NoiseConfig, TrainConfig
from finetune.models import tiny_bart

SAMPLE = """Twinkle, twinkle, little star,
How I wonder what you are!
Up above the world so high,
Like a diamond in the sky.

Hey diddle diddle, the cat and the fiddle,
The cow jumped over the moon;
The little dog laughed to see such sport,
And the dish ran away with the spoon.

Jack and Jill went up the hill
To fetch a pail of water;
Jack fell down and broke his crown,
And Jill came tumbling after.

Humpty Dumpty sat on a wall,
Humpty Dumpty had a great fall;
All the king's horses and all the king's men
Couldn't put Humpty together again.

Mary had a little lamb,
Its fleece was white as snow;
And everywhere that Mary went,
The lamb was sure to go.
"""


def line_pairs(text: str):
    """(line, next line) within each blank-line-separated song."""
    pairs = []
    for song in text.strip().split("\n\n"):
        lines = [line.strip() for line in song.splitlines() if line.strip()]
        pairs += list(zip(lines, lines[1:]))
    return pairs


NOISE = {
    "mask": NoiseConfig(mask_rate=0.25, protect="last_word"),
    "infill": NoiseConfig(infill_rate=0.3, poisson_lambda=3.0, protect="last_word"),
    "none": NoiseConfig(),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description="Next-line generation with BART noise")
    ap.add_argument("--model", default="facebook/bart-base", help="hub name, local folder, or 'tiny'")
    ap.add_argument("--lines", default=None, help="text file of verse, one line a line")
    ap.add_argument("--noise", choices=sorted(NOISE), default="mask")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--lr", type=float, default=None, help="default 5e-5 (pretrained) / 3e-3 (tiny)")
    ap.add_argument("--output-dir", default="runs/bart_next_line")
    ap.add_argument("--overwrite-output-dir", action="store_true",
                    help="replace the outputs of an earlier run in --output-dir (otherwise refused)")
    args = ap.parse_args(argv)

    model, tokenizer = load_model(args.model, tiny_bart, "bart_next_line.py")
    text = open(args.lines, encoding="utf-8").read() if args.lines else SAMPLE
    pairs = line_pairs(text)
    print(f"{len(pairs)} (line, next line) pairs; noise: {NOISE[args.noise]}")
    config = TrainConfig(lr=args.lr or (3e-3 if args.model == "tiny" else 5e-5), epochs=args.epochs, batch_size=8,
                         warmup_ratio=0.1, max_source_length=64, max_target_length=64, max_new_tokens=48,
                         num_beams=4, output_dir=args.output_dir,
                         overwrite_output_dir=args.overwrite_output_dir, log_every=10)
    engine = Engine(model, tokenizer, config, noise=NOISE[args.noise])
    engine.fit(pairs)
    prompts = [src for src, _ in pairs[:4]]
    for prompt, line in zip(prompts, engine.generate(prompts)):
        print(f"  {prompt}\n    -> {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
