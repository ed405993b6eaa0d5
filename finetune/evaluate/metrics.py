"""Generation metrics, accumulated one prediction at a time.

- exact match: prediction == target after stripping surrounding white space;
- accuracy by edit distance: exact match bucketed by the Levenshtein distance between the source and
  the target (1, 2, 3, 4, 5, 6+; 0 when they are equal), the spelling-correction view. The distance comes
  from `rapidfuzz` (C; a 2,000 x 200 character pair takes microseconds, where a Python loop takes 0.1 s);
- ROUGE-1/2/L F-measure through `rouge-score` (Lin, 2004), the summarisation view, with its tokenisation made
  to work for every script (`RougeTokenizer`: its default keeps only `[a-z0-9]`, so Chinese, Russian or Greek
  text had no tokens and scored 0 even when identical to the target);
- BLEU and chrF through `sacrebleu` (Post, 2018: the published, tokenisation-pinned implementation), corpus
  level, the translation view: the predictions and targets are kept for them (strings, no tensors).

`METRIC_DIRECTIONS` says which way each reported metric improves (the loss down, the rest up), for choosing
the best evaluation.
"""
from __future__ import annotations

import collections
import re

BUCKETS = ("0", "1", "2", "3", "4", "5", "6+")
METRIC_DIRECTIONS = {"loss": "min", "exact_match": "max", "rouge1": "max", "rouge2": "max", "rougeL": "max",
                     "bleu": "max", "chrf": "max"}


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions each cost 1)."""
    from rapidfuzz.distance import Levenshtein

    return Levenshtein.distance(a, b)


def bucket(distance: int) -> str:
    return "6+" if distance >= 6 else str(distance)


# Chinese characters, Japanese kana and CJK extensions: no spaces between words, so each character is a token
# (the usual practice for ROUGE on Chinese and Japanese)
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f"
_TOKEN = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+")


class RougeTokenizer:
    """rouge-score's tokenisation for every script: lower case, runs of letters and digits as words (Porter stem
    for ASCII words over 3 characters), each Chinese / Japanese character a word. On ASCII text it gives exactly
    rouge-score's default tokens (a test pins that); its default drops every letter outside a-z."""

    def __init__(self):
        from nltk.stem import porter

        self._stemmer = porter.PorterStemmer()

    def tokenize(self, text: str) -> list[str]:
        return [self._stemmer.stem(t) if len(t) > 3 and t.isascii() else t for t in _TOKEN.findall(text.lower())]


COLLAPSE_SHARE = 0.9  # one prediction for this share of the inputs or more (and 4 inputs or more): a collapse


def collapse_of(predictions: list[str]) -> dict:
    """How varied the predictions are: the share of distinct ones, the most frequent one and its share, and
    whether they collapsed (the model emits (nearly) one output whatever the input: the cross-attention of a
    warm-started decoder that never learnt to read the encoder)."""
    if not predictions:
        return {"distinct_share": 0.0, "top_share": 0.0, "top_prediction": "", "collapsed": False}
    top, count = collections.Counter(p.strip() for p in predictions).most_common(1)[0]
    share = count / len(predictions)
    return {"distinct_share": len(set(p.strip() for p in predictions)) / len(predictions), "top_share": share,
            "top_prediction": top[:200], "collapsed": len(predictions) >= 4 and share >= COLLAPSE_SHARE}


class GenerationMetrics:
    def __init__(self, rouge: bool = True, bleu: bool = True):
        self.n = 0
        self.exact = 0
        self.bucket_total = {b: 0 for b in BUCKETS}
        self.bucket_exact = {b: 0 for b in BUCKETS}
        self.rouge_sums = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
        self._scorer = None
        if rouge:
            from rouge_score import rouge_scorer

            self._scorer = rouge_scorer.RougeScorer(list(self.rouge_sums), tokenizer=RougeTokenizer())
        self.bleu = bleu
        self.predictions: list[str] = []
        self.targets: list[str] = []

    def add(self, source: str, target: str, prediction: str) -> bool:
        hit = prediction.strip() == target.strip()
        b = bucket(edit_distance(source.strip(), target.strip()))
        self.n += 1
        self.exact += hit
        self.bucket_total[b] += 1
        self.bucket_exact[b] += hit
        if self._scorer is not None:
            scores = self._scorer.score(target, prediction)
            for key in self.rouge_sums:
                self.rouge_sums[key] += scores[key].fmeasure
        self.predictions.append(prediction)
        self.targets.append(target)
        return hit

    def result(self) -> dict:
        out = {
            "exact_match": self.exact / self.n if self.n else 0.0,
            "by_edit_distance": {
                b: {"n": self.bucket_total[b], "exact_match": self.bucket_exact[b] / self.bucket_total[b]}
                for b in BUCKETS if self.bucket_total[b]
            },
            "n": self.n,
            **collapse_of(self.predictions),
        }
        if self._scorer is not None:
            out.update({k: v / self.n if self.n else 0.0 for k, v in self.rouge_sums.items()})
        if self.bleu and self.n:
            import sacrebleu

            out["bleu"] = sacrebleu.corpus_bleu(self.predictions, [self.targets]).score
            out["chrf"] = sacrebleu.corpus_chrf(self.predictions, [self.targets]).score
        return out
