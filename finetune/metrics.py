"""Generation metrics, accumulated one prediction at a time (nothing but counters is kept).

- exact match: prediction == target after stripping surrounding white space;
- accuracy by edit distance: exact match bucketed by the Levenshtein distance between the source and
  the target (1, 2, 3, 4, 5, 6+; 0 when they are equal), the spelling-correction view;
- ROUGE-1/2/L F-measure through `rouge-score` (Lin, 2004), the summarisation view.
"""
from __future__ import annotations

BUCKETS = ("0", "1", "2", "3", "4", "5", "6+")


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions each cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def bucket(distance: int) -> str:
    return "6+" if distance >= 6 else str(distance)


class GenerationMetrics:
    def __init__(self, rouge: bool = True):
        self.n = 0
        self.exact = 0
        self.bucket_total = {b: 0 for b in BUCKETS}
        self.bucket_exact = {b: 0 for b in BUCKETS}
        self.rouge_sums = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
        self._scorer = None
        if rouge:
            from rouge_score import rouge_scorer

            self._scorer = rouge_scorer.RougeScorer(list(self.rouge_sums), use_stemmer=True)

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
        return hit

    def result(self) -> dict:
        out = {
            "exact_match": self.exact / self.n if self.n else 0.0,
            "by_edit_distance": {
                b: {"n": self.bucket_total[b], "exact_match": self.bucket_exact[b] / self.bucket_total[b]}
                for b in BUCKETS if self.bucket_total[b]
            },
            "n": self.n,
        }
        if self._scorer is not None:
            out.update({k: v / self.n if self.n else 0.0 for k, v in self.rouge_sums.items()})
        return out
