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
