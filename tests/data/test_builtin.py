"""The code-summary job's data: pairs built from a standard library folder (here a small fake one, and the real
one of this interpreter), the filters, the split by the qualified name's hash, the name baseline, the run-file
spec, and the example end to end on a tiny model."""
import sys
import textwrap

import pytest

from finetune.data.builtin import SPLITS, code_summaries, code_summary_pairs, name_baseline
from finetune.run_build import load_data

MODULE = '''
"""A module."""
import os


def get_user_name(user):
    """Return the name of the user.

    More text that is not the summary.
    """
    # the name field
    return user.name


@decorated
def wrapped(x):
    """Add one to the given number."""
    return x + 1


def _private_helper(x):
    """Double the given number quickly."""
    return 2 * x


def only_a_docstring():
    """This body is only the docstring."""


def short_doc(x):
    """Short doc."""
    return x


def no_doc(x):
    return x


class Box:
    """A box."""

    def open_the_lid(self):
        """Open the lid of the box. Then more."""
        self.lid = True

    def __repr__(self):
        """Show the box as a string."""
        return "Box()"
'''


@pytest.fixture()
def stdlib(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "tools.py").write_text(MODULE)
    (tmp_path / "pkg" / "copy.py").write_text(MODULE)  # the same code twice: kept once
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "test_tools.py").write_text(MODULE)
    (tmp_path / "pkg" / "test_more.py").write_text(MODULE)
    (tmp_path / "broken.py").write_text("def (:\n")
    (tmp_path / "deep.py").write_text("x = " + "+".join(["1"] * 200_000) + "\n")  # RecursionError in ast.parse
    return str(tmp_path)


def test_public_functions_with_a_summary_sentence_and_a_body(stdlib):
    rows = code_summaries(stdlib)
    assert [name for name, _, _ in rows] == ["pkg.copy.Box.open_the_lid", "pkg.copy.get_user_name", "pkg.copy.wrapped"]
    by_name = {name: (code, summary) for name, code, summary in rows}
    code, summary = by_name["pkg.copy.get_user_name"]
    assert summary == "Return the name of the user"  # first sentence, its period dropped
    assert code == "def get_user_name(user):\n    # the name field\n    return user.name"  # no docstring
    assert by_name["pkg.copy.wrapped"][0].startswith("@decorated\ndef wrapped(x):")
    assert by_name["pkg.copy.Box.open_the_lid"] == ("def open_the_lid(self):\n    self.lid = True",
                                                    "Open the lid of the box")
    private = {name for name, _, _ in code_summaries(stdlib, private=True)}
    assert "pkg.copy._private_helper" in private and not any(n.endswith("__repr__") for n in private)


def test_the_split_is_fixed_by_the_name_and_covers_every_pair_once():
    every = code_summaries()
    splits = {s: code_summary_pairs(s) for s in SPLITS}
    assert sum(len(p) for p in splits.values()) == len(every) > 1000
    assert code_summary_pairs("test") == splits["test"]  # the same interpreter: the same split
    assert not set(splits["train"]) & set(splits["test"])
    assert len(code_summary_pairs("train", limit=50, seed=1)) == 50
    with pytest.raises(ValueError, match="split must be one of"):
        code_summary_pairs("dev")


@pytest.mark.parametrize("code, words", [("def get_user_name(x):\n    pass", "get user name"),
                                         ("@cache\ndef getUserName(self):\n  return 1", "get user name"),
                                         ("async def HTTPError_407(self): ...", "httperror 407")])
def test_the_name_baseline_splits_the_name_into_words(code, words):
    assert name_baseline(code) == words


def test_a_run_file_names_the_job_like_codespell():
    pairs = load_data("code-summary:validation", 5, 0, "source", "target")
    assert len(pairs) == 5 and all(p in code_summary_pairs("validation") for p in pairs)


def test_the_example_runs_end_to_end_on_a_tiny_model(tmp_path):
    from test_examples import run

    out = run("code_summary_bert2bert.py", "--model", "tiny", "--train-size", "64", "--valid-size", "8",
              "--eval-size", "12", "--max-steps", "4", "--eval-every", "2", "--max-tokens", "1024",
              "--max-source-length", "64", "--num-beams", "2", "--max-new-tokens", "8", "--output-dir", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "ROUGE-L" in out.stdout and "baseline" in out.stdout and "test split: 12 pairs" in out.stdout
    import json

    result = json.load(open(tmp_path / "results.json"))
    assert set(result["model"]) == set(result["baseline"]) == {"rougeL", "bleu", "exact_match"}
    assert result["test_pairs"] == 12 and result["python"] == textwrap.dedent(sys.version.split()[0])
    assert 0 <= result["model"]["rougeL"] <= 1 and result["train_seconds"] > 0 and result["cpu"]
    phases = result["peak_rss_by_phase_mib"]  # where the memory goes, beside the whole-life peak
    assert {"setup", "training", "validation", "final test evaluation (beam search)"} <= phases.keys()
    assert result["peak_rss_mib"] >= max(phases.values()) - 0.1 and set(result["variety"]) >= {"collapsed", "top_share"}


def test_the_example_compares_methods_beside_the_baseline(tmp_path):
    from test_examples import run

    out = run("code_summary_bert2bert.py", "--model", "tiny", "--compare", "--methods", "bitfit", "--budget", "steps",
              "--train-size", "32", "--valid-size", "4", "--eval-size", "4", "--max-steps", "2", "--eval-every", "1",
              "--max-tokens", "0", "--batch-size", "16", "--max-source-length", "64", "--num-beams", "1",
              "--no-repeat-ngram-size", "0", "--max-new-tokens", "8", "--output-dir", str(tmp_path))
    assert out.returncode == 0, out.stderr
    table = (tmp_path / "compare.md").read_text()
    assert "| bitfit |" in table and "| name baseline |" in table
    assert (tmp_path / "compare.png").stat().st_size > 0 and (tmp_path / "bitfit" / "results.json").exists()


@pytest.mark.parametrize("flags, message", [(["--max-tokens", "-1"], "--max-tokens must be >= 0"),
                                            (["--max-tokens", "100"], "max_tokens=100: must hold one example"),
                                            (["--min-steps-typo"], "unrecognized arguments"),
                                            (["--budget-minutes", "2"], "it does nothing here"),
                                            (["--lr", "0"], "TrainConfig.lr=0.0: must be > 0")])
def test_the_example_refuses_bad_flags(tmp_path, flags, message):
    from test_examples import run

    out = run("code_summary_bert2bert.py", "--model", "tiny", "--train-size", "8", *flags, "--output-dir",
              str(tmp_path))
    assert out.returncode != 0 and message in out.stderr + out.stdout
