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
