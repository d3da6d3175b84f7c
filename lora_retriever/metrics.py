"""Answer and retrieval metrics: exact match, ROUGE-L (F1), BLEU-4, retrieval top-1 / top-k accuracy."""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence

__all__ = ["bleu", "exact_match", "normalize_answer", "rouge_l", "tokenize"]

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_answer(text: str) -> str:
    """Lower-case, punctuation to spaces, whitespace collapsed: 'Paris.' == 'paris'."""
    text = _PUNCT.sub(" ", text.lower())
    return " ".join(text.split())


def tokenize(text: str) -> list[str]:
    return normalize_answer(text).split()


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalised prediction equals the normalised reference."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 over normalised tokens (Lin 2004): LCS-based precision/recall harmonic mean."""
    pred, ref = tokenize(prediction), tokenize(reference)
    if not pred or not ref:
        return float(pred == ref)
    lcs = _lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def bleu(predictions: Sequence[str], references: Sequence[str], max_n: int = 4) -> float:
    """Corpus BLEU (Papineni et al. 2002) over normalised tokens, with add-one smoothing for n > 1
    (Lin & Och 2004) so short answers don't collapse to 0. Range [0, 1].

    Raises:
        ValueError: the two lists differ in length.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    matches = [0] * max_n
    totals = [0] * max_n
    pred_len = ref_len = 0
    for prediction, reference in zip(predictions, references):
        pred, ref = tokenize(prediction), tokenize(reference)
        pred_len, ref_len = pred_len + len(pred), ref_len + len(ref)
        for n in range(1, max_n + 1):
            pred_ngrams = Counter(tuple(pred[i : i + n]) for i in range(len(pred) - n + 1))
            ref_ngrams = Counter(tuple(ref[i : i + n]) for i in range(len(ref) - n + 1))
            matches[n - 1] += sum((pred_ngrams & ref_ngrams).values())
            totals[n - 1] += max(len(pred) - n + 1, 0)
    if pred_len == 0 or matches[0] == 0:
        return 0.0
    log_precision = 0.0
    for n in range(max_n):
        num, den = (matches[n], totals[n]) if n == 0 else (matches[n] + 1, totals[n] + 1)
        log_precision += math.log(num / den) / max_n
    brevity = 1.0 if pred_len > ref_len else math.exp(1 - ref_len / pred_len)
    return brevity * math.exp(log_precision)
