"""Answer metrics: exact match, ROUGE-L (F1), BLEU-4.

Exact match has one rule in this project, :func:`normalize_answer`, used by the CLI
(``infer_lora_retriever.py``'s metrics), the paper protocol (``lora_retriever.tasks.is_correct``) and spectral
editing's ``--match normalized``. ROUGE-L and BLEU compare every token of the whole answer
(:func:`tokenize`: case-folded, punctuation removed).
"""

from __future__ import annotations

import math
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence

__all__ = ["bleu", "exact_match", "normalize_answer", "rouge_l", "tokenize"]

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
# Curly quotes and apostrophes (CLDR writes "Côte d’Ivoire") compare equal to their ASCII forms.
_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u02bc": "'", "\u201c": '"', "\u201d": '"'})
# A leading "Answer:" label is formatting, not content.
_LABEL = re.compile(r"^(?:final\s+)?answer\s*[:\-]\s*", re.IGNORECASE)
# Wrapping quotes / markdown emphasis, and a closing period or exclamation mark.
_EDGES = re.compile(r"^[\s\"'`*_]+|[\s\"'`*_.!]+$")


def normalize_answer(text: str) -> str:
    """The comparison form of a short answer: the one rule behind exact match.

    1. Unicode NFKC; curly quotes and apostrophes become ASCII ones.
    2. Only the first non-empty line counts (a model that answers and then explains still answered).
    3. A leading ``Answer:`` / ``Final answer:`` label is dropped.
    4. Wrapping quotes, backticks and markdown ``*``/``_`` are dropped, as is a trailing ``.`` or ``!``.
    5. Case-folded, runs of whitespace collapsed to one space.

    Everything else counts: accents (``Équateur`` != ``Equateur``), hyphens, word order, and any extra
    words. In particular a full sentence such as ``"The answer is Paris"`` does **not** match ``"Paris"``:
    answering in the task's short format is part of the task (the base model answers in sentences; the
    adapters are what teach the format), so exact match keeps meaning "answered right, as asked".
    """
    text = unicodedata.normalize("NFKC", text).translate(_QUOTES)
    lines = [line for line in text.splitlines() if line.strip()]
    text = lines[0] if lines else ""
    text = _LABEL.sub("", _EDGES.sub("", text))
    text = _EDGES.sub("", text)
    return " ".join(text.casefold().split())


def tokenize(text: str) -> list[str]:
    """Tokens for ROUGE/BLEU: the whole text, NFKC, case-folded, punctuation as spaces."""
    return _PUNCT.sub(" ", unicodedata.normalize("NFKC", text).casefold()).split()


def exact_match(prediction: str, reference: str, normalize: Callable[[str], str] = normalize_answer) -> float:
    """1.0 when the normalised prediction equals the normalised reference; an empty reference matches nothing."""
    expected = normalize(reference)
    return float(bool(expected) and normalize(prediction) == expected)


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
