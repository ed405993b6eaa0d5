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
