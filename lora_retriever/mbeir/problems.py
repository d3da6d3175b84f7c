"""Problems found in M-BEIR files: :class:`Problem` (file, line, kind, message, severity), the kinds there
are (:data:`PROBLEM_KINDS`), and :class:`MBeirFormatError`, which a reader raises with all of them."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

__all__ = ["PROBLEM_KINDS", "MBeirFormatError", "Problem"]

PROBLEM_KINDS = MappingProxyType(
    {
        "malformed_json": "a line that is not valid JSON (or is blank)",
        "wrong_type": "a record that is not an object, or a field of the wrong type",
        "missing_field": "a required field is absent",
        "unknown_field": "a field M-BEIR does not define (a warning: it is ignored)",
        "bad_id": "an id that is not '<dataset_id>:<n>'",
        "unknown_modality": "a modality other than text, image, image,text",
        "modality_mismatch": "the modality disagrees with the fields present (or positives disagree)",
        "bad_path": "an image path that is absolute or leaves the data root",
        "empty_positives": "a query with no positive candidate",
        "bad_task_id": "a task_id that is not one of UniIR's",
        "task_mismatch": "task_id disagrees with the query and positive-candidate modalities",
        "duplicate_id": "a qid, did or instruction key seen twice",
        "conflicting_id": "one qid or did with different contents in two files",
        "unknown_candidate": "a positive or negative id absent from the candidate pool",
        "missing_image": "an image path with no file under the data root",
        "missing_instruction": "no instruction row for a query's (dataset, modalities)",
        "bad_row": "an instruction row with too few columns, an empty prompt list or a bad dataset_id",
        "not_checked": "a check that could not run (a warning naming what to pass)",
        "no_files": "no M-BEIR file where one was expected",
    }
)
"""Every kind of :class:`Problem` and what it means."""


_MAX_MESSAGE_PROBLEMS = 20


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an M-BEIR file.

    Attributes:
        path: the file, as given.
        line: 1-based line number, or ``None`` for a problem of the whole file.
        kind: one of :data:`PROBLEM_KINDS`.
        message: what is wrong and how to fix it.
        severity: ``"error"`` (the data is unusable as is) or ``"warning"`` (usable; something was ignored
            or not checked).
    """

    path: str
    line: int | None
    kind: str
    message: str
    severity: str = "error"

    def __post_init__(self) -> None:
        if self.kind not in PROBLEM_KINDS:
            raise ValueError(f"kind {self.kind!r} is not one of {', '.join(PROBLEM_KINDS)}")
        if self.severity not in ("error", "warning"):
            raise ValueError(f"severity must be 'error' or 'warning', got {self.severity!r}")

    def __str__(self) -> str:
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        return f"{where}: {self.severity}: {self.kind}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "line": self.line,
            "kind": self.kind,
            "severity": self.severity,
            "message": self.message,
        }


class MBeirFormatError(ValueError):
    """M-BEIR data with errors; ``problems`` holds every one of them (the message lists the first 20)."""

    def __init__(self, problems: Iterable[Problem], what: str = "M-BEIR data") -> None:
        self.problems = list(problems)
        errors = [p for p in self.problems if p.severity == "error"]
        shown = "\n".join(str(p) for p in errors[:_MAX_MESSAGE_PROBLEMS])
        more = len(errors) - _MAX_MESSAGE_PROBLEMS
        tail = (
            f"\n... and {more} more (run `python -m lora_retriever.mbeir validate` to list all)"
            if more > 0
            else ""
        )
        super().__init__(f"{what} has {len(errors)} error(s); fix them:\n{shown}{tail}")
