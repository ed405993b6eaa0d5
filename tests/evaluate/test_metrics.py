"""Generation metrics: exact match, accuracy by edit distance, ROUGE (parity with rouge-score, any script), BLEU."""
import pytest

from finetune.evaluate.metrics import GenerationMetrics, bucket, edit_distance


@pytest.mark.parametrize("a,b,d", [("", "", 0), ("abc", "abc", 0), ("kitten", "sitting", 3), ("teh", "the", 2),
                                   ("adress", "address", 1), ("", "abcdefg", 7), ("flaw", "lawn", 2)])
def test_edit_distance(a, b, d):
    assert edit_distance(a, b) == d == edit_distance(b, a)


def test_buckets():
    assert [bucket(d) for d in (0, 1, 5, 6, 40)] == ["0", "1", "5", "6+", "6+"]


def test_metrics_accumulate():
    m = GenerationMetrics()
    m.add("adress", "address", "address")
    m.add("teh", "the", "teh")
    m.add("abcdefghij", "zzzzzzzzzz", "zzzzzzzzzz")
    r = m.result()
    assert r["exact_match"] == pytest.approx(2 / 3)
    assert r["by_edit_distance"] == {"1": {"n": 1, "exact_match": 1.0}, "2": {"n": 1, "exact_match": 0.0},
                                     "6+": {"n": 1, "exact_match": 1.0}}
    assert r["rouge1"] == pytest.approx(2 / 3)


def test_rouge_matches_rouge_score():
    from rouge_score import rouge_scorer

    target, prediction = "the cat sat on the mat", "a cat sat on a mat today"
    m = GenerationMetrics()
    m.add("x", target, prediction)
    expected = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True).score(target, prediction)
    for key in ("rouge1", "rouge2", "rougeL"):
        assert m.result()[key] == pytest.approx(expected[key].fmeasure)


@pytest.mark.parametrize("text", ["今天天气很好", "Привет, как дела?", "Γειά σου κόσμε", "東京は晴れです"])
def test_rouge_of_an_identical_prediction_is_one_in_any_script(text):
    metrics = GenerationMetrics()
    metrics.add(text, text, text)
    result = metrics.result()
    assert result["exact_match"] == 1.0 and result["rouge1"] == result["rougeL"] == 1.0
    other = GenerationMetrics()
    other.add(text, text, "completely different words")
    assert other.result()["rougeL"] == 0.0


def test_rouge_tokens_on_ascii_text_are_rouge_scores_own():
    from rouge_score import rouge_scorer, tokenizers

    from finetune.evaluate.metrics import RougeTokenizer

    texts = ["The cats were running quickly, weren't they?", "A 3-step plan: re-run tests_now & ship v2.0!",
             "generalisation of the transformers' attention", "x_y  z\tw\nthe END"]
    reference = tokenizers.DefaultTokenizer(use_stemmer=True)
    ours = RougeTokenizer()
    for text in texts:
        assert ours.tokenize(text) == reference.tokenize(text)
    theirs = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    mine = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=ours)
    for a, b in zip(texts, reversed(texts)):
        assert theirs.score(a, b) == mine.score(a, b)


# --- a collapse is never silent ------------------------------------------------------------------------------------

def test_collapse_counts_the_share_of_the_most_frequent_prediction():
    from finetune.evaluate.metrics import collapse_of

    healthy = collapse_of(["a", "b", "c", "a"])
    assert healthy == {"distinct_share": 0.75, "top_share": 0.5, "top_prediction": "a", "collapsed": False}
    assert collapse_of(["x"] * 19 + ["y"])["collapsed"] and not collapse_of(["x"] * 17 + ["y", "z", "w"])["collapsed"]
    assert not collapse_of(["x", "x", "x"])["collapsed"]  # three outputs say too little
    metrics = GenerationMetrics()
    for source in ("a", "b", "c", "d"):
        metrics.add(source, f"{source}!", "the same summary")
    assert metrics.result()["collapsed"] and metrics.result()["top_prediction"] == "the same summary"


def deaf_bert2bert():
    """A tiny bert2bert whose decoder cannot hear the encoder: the cross-attention outputs zeroed and frozen (what a
    cross-attention that never learns looks like from outside: one output for every input)."""
    import torch

    from finetune.models import tiny_bert2bert

    model, tok = tiny_bert2bert(hidden=32)
    with torch.no_grad():
        for layer in model.decoder.bert.encoder.layer:
            dense = layer.crossattention.output.dense
            dense.weight.zero_()
            dense.bias.zero_()
            dense.requires_grad_(False)
    return model, tok


def test_a_collapsed_run_is_flagged_in_the_log_the_records_and_by_a_warning(tmp_path, capsys):
    import json

    from conftest import SPELLING

    from finetune import Engine, TrainConfig

    model, tok = deaf_bert2bert()
    cfg = TrainConfig(lr=3e-3, batch_size=3, max_steps=4, eval_every=2, log_every=1, num_beams=1, precision="fp32",
                      output_dir=str(tmp_path))
    with pytest.warns(UserWarning, match=r"step 2: the evaluation COLLAPSED: 100% of the 6 predictions are"):
        Engine(model, tok, cfg).fit(SPELLING, eval=SPELLING)
    assert "the evaluation COLLAPSED" in capsys.readouterr().out
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    evals = [r for r in records if r["split"] == "eval"]
    assert evals and all(r["collapsed"] and r["top_share"] == 1.0 for r in evals)
    events = [r for r in records if r.get("event") == "collapse"]
    assert [e["step"] for e in events][:2] == [2, 4] and events[0]["prediction"] == evals[0]["top_prediction"]


def test_the_best_model_never_keeps_a_collapsed_evaluation_over_a_healthy_one():
    from finetune.train.best import Best

    best = Best("exact_match")
    assert best.update({"exact_match": 0.2, "collapsed": False}, 1)
    assert not best.update({"exact_match": 0.5, "collapsed": True}, 2)  # higher, but one output for every input
    assert best.step == 1
    worse = Best("exact_match")
    assert worse.update({"exact_match": 0.5, "collapsed": True}, 1)  # nothing healthy yet
    assert worse.update({"exact_match": 0.1, "collapsed": False}, 2)  # healthy beats collapsed, whatever the value
    state = worse.state()
    again = Best("exact_match")
    again.load({**state, "path": None, "checkpoint": None}, "/nowhere")
    assert not again.update({"exact_match": 0.9, "collapsed": True}, 3)


def test_finetune_check_fails_a_decoder_that_cannot_hear_the_encoder(tmp_path):
    from conftest import SPELLING

    from finetune import TrainConfig
    from finetune.run_build import check_setup

    model, tok = deaf_bert2bert()
    cfg = TrainConfig(lr=3e-3, batch_size=6, precision="fp32", output_dir=str(tmp_path / "out"))
    report = check_setup(model, tok, cfg, SPELLING, steps=30)
    rows = {name: (status, detail) for status, name, detail in report.rows}
    assert rows["outputs differ"][0] == "FAIL" and "the decoder ignores the encoder" in rows["outputs differ"][1]


def test_the_code_summary_report_marks_a_collapsed_row(monkeypatch):
    import importlib.util
    import os

    examples = os.path.join(os.path.dirname(__file__), "..", "..", "examples")
    monkeypatch.syspath_prepend(examples)  # the examples' shared helpers (common.py)
    path = os.path.join(examples, "code_summary_bert2bert.py")
    spec = importlib.util.spec_from_file_location("code_summary_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    row = {"method": "lora", "lr": 1e-3, "trainable": 10, "total": 100, "steps": 400, "train_seconds": 60,
           "samples_per_s": 10.0, "peak_rss_mib": 2000, "baseline": {"rougeL": 0.16, "bleu": 0.04, "exact_match": 0},
           "model": {"rougeL": 0.163, "bleu": 0.9, "exact_match": 0.0},
           "variety": {"collapsed": True, "top_share": 0.97, "distinct_share": 0.01, "top_prediction": "return x"}}
    table = example.markdown_table([row])
    assert "| COLLAPSED (97% one summary; 0.163) |" in table and "**0.163**" not in table
