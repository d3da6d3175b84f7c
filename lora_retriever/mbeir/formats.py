"""UniIR's M-BEIR formats as typed records: queries, candidates and task instructions; parse, read, write.

M-BEIR (Wei et al., "UniIR: Training and Benchmarking Universal Multimodal Information Retrievers", 2023,
§3) stores a retrieval task as

* a **query JSONL** file, one object per line::

      {"qid": "9:12", "query_txt": "A dog on a sofa", "query_img_path": null, "query_modality": "text",
       "query_src_content": "{...json...}", "pos_cand_list": ["9:40"], "neg_cand_list": [], "task_id": 0}

* a **candidate pool JSONL** file::

      {"did": "9:40", "txt": null, "img_path": "mbeir_images/mscoco_images/40.jpg", "modality": "image",
       "src_content": "{...json...}"}

* a **task-instruction TSV**: a header line, then one row per (dataset, query modality, candidate modality):
  ``query_modality  cand_modality  dataset  dataset_id  prompt_1 [prompt_2 ...]``.

Ids are ``"<dataset_id>:<n>"``. A modality is ``"text"``, ``"image"`` or ``"image,text"`` and must agree with
which of the text and the image path is present (an empty string counts as absent, as UniIR reads it). Image
paths are relative to a data root. ``task_id`` is UniIR's number for the (query modality, candidate modality)
pair (:data:`TASK_IDS`); ``query_src_content`` / ``src_content`` are free strings (UniIR: ``json.dumps`` of
the source record) or null.

Parsing never stops at the first problem: :func:`scan_queries`, :func:`scan_candidates` and
:func:`scan_instructions` return the records that parsed *and* every :class:`~.problems.Problem` with its file
and line; :func:`read_queries` & co. return typed records or raise :class:`MBeirFormatError` listing them all.
Checks that need several files (ids present in a pool, images on disk, duplicates across files) are in
:mod:`lora_retriever.mbeir.validate`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import Any

from lora_retriever.mbeir.problems import MBeirFormatError, Problem
from swift.utils.files import atomic_write

__all__ = [
    "INSTRUCTION_COLUMNS",
    "MODALITIES",
    "TASK_IDS",
    "MBeirCandidate",
    "MBeirInstruction",
    "MBeirQuery",
    "dataset_id_of",
    "modality_of",
    "read_candidates",
    "read_instructions",
    "read_queries",
    "scan_candidates",
    "scan_instructions",
    "scan_queries",
    "task_id_of",
    "write_candidates",
    "write_instructions",
    "write_queries",
]

MODALITIES = ("text", "image", "image,text")
"""The modalities of a query or candidate: text only, image only, or both (UniIR writes ``"image,text"``)."""

TASK_IDS: Mapping[tuple[str, str], int] = MappingProxyType(
    {
        ("text", "image"): 0,
        ("text", "text"): 1,
        ("text", "image,text"): 2,
        ("image", "text"): 3,
        ("image", "image"): 4,
        # 5 is UniIR's "image -> text,image", which it lists as not a valid task.
        ("image,text", "text"): 6,
        ("image,text", "image"): 7,
        ("image,text", "image,text"): 8,
    }
)
"""UniIR's task numbers: ``(query modality, candidate modality) -> task_id``."""

INSTRUCTION_COLUMNS = ("query_modality", "cand_modality", "dataset", "dataset_id")
"""The fixed leading columns of the instruction TSV; prompt columns (one or more) follow."""

_ID = re.compile(r"^(\d+):(\d+)$")


def modality_of(text: str | None, image_path: str | None) -> str | None:
    """The modality the present fields make: ``"text"``, ``"image"``, ``"image,text"``, or ``None`` (neither).
    An empty or blank string counts as absent, as UniIR reads it (``entry.get("query_txt") or ""``)."""
    has_text = isinstance(text, str) and bool(text.strip())
    has_image = isinstance(image_path, str) and bool(image_path.strip())
    return {(True, False): "text", (False, True): "image", (True, True): "image,text"}.get(
        (has_text, has_image)
    )


def dataset_id_of(item_id: str) -> int:
    """The dataset part of a ``"<dataset_id>:<n>"`` id.

    Raises:
        ValueError: ``item_id`` is not of that form.
    """
    match = _ID.match(item_id) if isinstance(item_id, str) else None
    if match is None:
        raise ValueError(f"id {item_id!r} is not '<dataset_id>:<n>' (two non-negative integers, e.g. '9:12')")
    return int(match.group(1))


def task_id_of(query_modality: str, cand_modality: str) -> int:
    """UniIR's ``task_id`` of a (query modality, candidate modality) pair.

    Raises:
        ValueError: a pair UniIR has no task for.
    """
    try:
        return TASK_IDS[query_modality, cand_modality]
    except KeyError:
        pairs = ", ".join(f"{q} -> {c}" for q, c in TASK_IDS)
        raise ValueError(
            f"no M-BEIR task for {query_modality} -> {cand_modality}; tasks are: {pairs}"
        ) from None


# ----------------------------------------------------------------------------------------------------------
# records
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MBeirQuery:
    """One line of a query file (field names and order are UniIR's)."""

    qid: str
    query_txt: str | None
    query_img_path: str | None
    query_modality: str
    query_src_content: str | None
    pos_cand_list: tuple[str, ...]
    neg_cand_list: tuple[str, ...]
    task_id: int

    @property
    def dataset_id(self) -> int:
        return dataset_id_of(self.qid)

    def to_dict(self) -> dict[str, Any]:
        return {
            "qid": self.qid,
            "query_txt": self.query_txt,
            "query_img_path": self.query_img_path,
            "query_modality": self.query_modality,
            "query_src_content": self.query_src_content,
            "pos_cand_list": list(self.pos_cand_list),
            "neg_cand_list": list(self.neg_cand_list),
            "task_id": self.task_id,
        }


@dataclass(frozen=True)
class MBeirCandidate:
    """One line of a candidate pool file (field names and order are UniIR's)."""

    did: str
    txt: str | None
    img_path: str | None
    modality: str
    src_content: str | None

    @property
    def dataset_id(self) -> int:
        return dataset_id_of(self.did)

    def to_dict(self) -> dict[str, Any]:
        return {
            "did": self.did,
            "txt": self.txt,
            "img_path": self.img_path,
            "modality": self.modality,
            "src_content": self.src_content,
        }


@dataclass(frozen=True)
class MBeirInstruction:
    """One row of the instruction TSV: the prompts for one dataset's (query modality -> candidate modality)
    task. UniIR prepends one of ``prompts`` (drawn at random) to the query text."""

    query_modality: str
    cand_modality: str
    dataset: str
    dataset_id: int
    prompts: tuple[str, ...] = field(default_factory=tuple)

    @property
    def key(self) -> tuple[int, str, str]:
        """``(dataset_id, query_modality, cand_modality)``: how UniIR looks a prompt up."""
        return (self.dataset_id, self.query_modality, self.cand_modality)

    @property
    def task_id(self) -> int:
        return task_id_of(self.query_modality, self.cand_modality)

    def to_row(self) -> list[str]:
        return [self.query_modality, self.cand_modality, self.dataset, str(self.dataset_id), *self.prompts]


# ----------------------------------------------------------------------------------------------------------
# parsing: every problem of a record, not just the first
# ----------------------------------------------------------------------------------------------------------

_STR, _OPT_STR, _ID_LIST, _INT = "str", "str or null", "list of ids", "int"
_QUERY_FIELDS = {
    "qid": _STR,
    "query_txt": _OPT_STR,
    "query_img_path": _OPT_STR,
    "query_modality": _STR,
    "query_src_content": _OPT_STR,
    "pos_cand_list": _ID_LIST,
    "neg_cand_list": _ID_LIST,
    "task_id": _INT,
}
_CANDIDATE_FIELDS = {
    "did": _STR,
    "txt": _OPT_STR,
    "img_path": _OPT_STR,
    "modality": _STR,
    "src_content": _OPT_STR,
}


class _Collector:
    """Problems of one file."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self.problems: list[Problem] = []

    def add(self, line: int | None, kind: str, message: str, severity: str = "error") -> None:
        self.problems.append(Problem(self.path, line, kind, message, severity))


def _type_ok(value: Any, expected: str) -> bool:
    if expected == _STR:
        return isinstance(value, str)
    if expected == _OPT_STR:
        return value is None or isinstance(value, str)
    if expected == _INT:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _check_fields(obj: Any, spec: dict[str, str], kind: str, out: _Collector, line: int) -> bool:
    """Field presence and types; ``False`` when the record can't be built."""
    if not isinstance(obj, dict):
        out.add(line, "wrong_type", f"a {kind} line must be a JSON object, got {type(obj).__name__}")
        return False
    ok = True
    for name, expected in spec.items():
        if name not in obj:
            out.add(line, "missing_field", f"{kind} lacks {name!r} ({expected}); add it")
            ok = False
        elif not _type_ok(obj[name], expected):
            out.add(line, "wrong_type", f"{name} must be a {expected}, got {json.dumps(obj[name])[:80]}")
            ok = False
    for name in obj.keys() - spec.keys():
        out.add(
            line, "unknown_field", f"field {name!r} is not an M-BEIR {kind} field; it is ignored", "warning"
        )
    return ok


def _check_id(value: Any, name: str, out: _Collector, line: int) -> None:
    if isinstance(value, str) and not _ID.match(value):
        out.add(line, "bad_id", f"{name} {value!r} is not '<dataset_id>:<n>' (e.g. '9:12')")


def _check_modality(
    declared: Any, text: Any, image: Any, names: tuple[str, str, str], out: _Collector, line: int
) -> None:
    modality_name, text_name, image_name = names
    if not isinstance(declared, str):
        return  # reported as a type problem
    if declared not in MODALITIES:
        hint = " (UniIR writes 'image,text')" if declared.replace(" ", "") == "text,image" else ""
        out.add(
            line,
            "unknown_modality",
            f"{modality_name} {declared!r} is not one of {', '.join(MODALITIES)}{hint}",
        )
        return
    text = text if isinstance(text, str) else None
    image = image if isinstance(image, str) else None
    present = modality_of(text, image)
    if present is None:
        out.add(
            line,
            "modality_mismatch",
            f"{modality_name} is {declared!r} but {text_name} and {image_name} are both empty",
        )
    elif present != declared:
        out.add(
            line,
            "modality_mismatch",
            f"{modality_name} is {declared!r} but the fields present make it {present!r} ({text_name}="
            f"{json.dumps(text)[:40]}, {image_name}={json.dumps(image)}); fix {modality_name} or the fields",
        )


def _check_image_path(value: Any, name: str, out: _Collector, line: int) -> None:
    if not isinstance(value, str) or not value.strip():
        return
    path = PurePosixPath(value.replace("\\", "/"))
    if path.is_absolute() or Path(value).is_absolute() or ".." in path.parts:
        out.add(line, "bad_path", f"{name} {value!r} must be relative to the data root, without '..'")


def _parse_query(obj: Any, out: _Collector, line: int) -> MBeirQuery | None:
    ok = _check_fields(obj, _QUERY_FIELDS, "query", out, line)
    if not isinstance(obj, dict):
        return None
    before = len([p for p in out.problems if p.severity == "error"])
    _check_id(obj.get("qid"), "qid", out, line)
    for name in ("pos_cand_list", "neg_cand_list"):
        if _type_ok(obj.get(name), _ID_LIST):
            for did in obj[name]:
                _check_id(did, f"{name} entry", out, line)
    if _type_ok(obj.get("pos_cand_list"), _ID_LIST) and not obj["pos_cand_list"]:
        out.add(line, "empty_positives", "pos_cand_list is empty; a query needs at least one positive did")
    _check_modality(
        obj.get("query_modality"),
        obj.get("query_txt"),
        obj.get("query_img_path"),
        ("query_modality", "query_txt", "query_img_path"),
        out,
        line,
    )
    _check_image_path(obj.get("query_img_path"), "query_img_path", out, line)
    task_id = obj.get("task_id")
    if _type_ok(task_id, _INT) and task_id not in TASK_IDS.values():
        out.add(line, "bad_task_id", f"task_id {task_id} is not one of UniIR's {sorted(TASK_IDS.values())}")
    if not ok or len([p for p in out.problems if p.severity == "error"]) > before:
        return None
    return MBeirQuery(
        qid=obj["qid"],
        query_txt=obj["query_txt"],
        query_img_path=obj["query_img_path"],
        query_modality=obj["query_modality"],
        query_src_content=obj["query_src_content"],
        pos_cand_list=tuple(obj["pos_cand_list"]),
        neg_cand_list=tuple(obj["neg_cand_list"]),
        task_id=obj["task_id"],
    )


def _parse_candidate(obj: Any, out: _Collector, line: int) -> MBeirCandidate | None:
    ok = _check_fields(obj, _CANDIDATE_FIELDS, "candidate", out, line)
    if not isinstance(obj, dict):
        return None
    before = len([p for p in out.problems if p.severity == "error"])
    _check_id(obj.get("did"), "did", out, line)
    _check_modality(
        obj.get("modality"), obj.get("txt"), obj.get("img_path"), ("modality", "txt", "img_path"), out, line
    )
    _check_image_path(obj.get("img_path"), "img_path", out, line)
    if not ok or len([p for p in out.problems if p.severity == "error"]) > before:
        return None
    return MBeirCandidate(
        did=obj["did"],
        txt=obj["txt"],
        img_path=obj["img_path"],
        modality=obj["modality"],
        src_content=obj["src_content"],
    )


def _json_lines(path: Path, out: _Collector) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed object)`` of each line that is valid JSON; the others become problems."""
    with path.open(encoding="utf-8") as f:
        for number, text in enumerate(f, start=1):
            if not text.strip():
                out.add(
                    number, "malformed_json", "blank line; remove it (every line must be one JSON object)"
                )
                continue
            try:
                yield number, json.loads(text.rstrip("\r\n"))  # so the error's column is on this line
            except json.JSONDecodeError as err:
                out.add(number, "malformed_json", f"not valid JSON ({err.msg} at column {err.colno})")


def _existing_file(path: str | Path, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"{what} {str(path)!r} does not exist or is not a file; pass an existing file"
        )
    return path


def _scan_jsonl(
    path: str | Path, what: str, parse: Callable[[Any, _Collector, int], Any]
) -> tuple[list, list[Problem]]:
    out = _Collector(path)
    records = []
    for line, obj in _json_lines(_existing_file(path, what), out):
        record = parse(obj, out, line)
        if record is not None:
            records.append((line, record))
    return records, out.problems


def scan_queries(path: str | Path) -> tuple[list[tuple[int, MBeirQuery]], list[Problem]]:
    """Parse a query JSONL file: ``([(line, query), ...], problems)``; a line with an error gives no query.

    Raises:
        FileNotFoundError: ``path`` is not a file.
    """
    return _scan_jsonl(path, "query file", _parse_query)


def scan_candidates(path: str | Path) -> tuple[list[tuple[int, MBeirCandidate]], list[Problem]]:
    """Parse a candidate pool JSONL file: ``([(line, candidate), ...], problems)``.

    Raises:
        FileNotFoundError: ``path`` is not a file.
    """
    return _scan_jsonl(path, "candidate pool", _parse_candidate)


def scan_instructions(path: str | Path) -> tuple[list[tuple[int, MBeirInstruction]], list[Problem]]:
    """Parse an instruction TSV (header line first, as UniIR's): ``([(line, instruction), ...], problems)``.

    Raises:
        FileNotFoundError: ``path`` is not a file.
    """
    out = _Collector(path)
    records = []
    lines = _existing_file(path, "instruction file").read_text(encoding="utf-8").splitlines()
    if not lines:
        out.add(
            None, "no_files", "the instruction file is empty; it needs a header line and one row per task"
        )
    header = lines[0].split("\t") if lines else []
    if lines and len(header) < len(INSTRUCTION_COLUMNS) + 1:
        out.add(
            1,
            "bad_row",
            f"the header has {len(header)} column(s); expected {', '.join(INSTRUCTION_COLUMNS)}, prompt_1, ...",
        )
    seen: dict[tuple[int, str, str], int] = {}
    for number, text in enumerate(lines[1:], start=2):
        if not text.strip():
            out.add(number, "bad_row", "blank line; remove it")
            continue
        parts = [p.strip() for p in text.split("\t")]
        if len(parts) < len(INSTRUCTION_COLUMNS) + 1:
            out.add(
                number,
                "bad_row",
                f"{len(parts)} tab-separated column(s); a row is {', '.join(INSTRUCTION_COLUMNS)}, then prompts",
            )
            continue
        query_modality, cand_modality, dataset, dataset_id = parts[:4]
        prompts = tuple(p for p in parts[4:] if p)
        errors = len(out.problems)
        for name, value in (("query_modality", query_modality), ("cand_modality", cand_modality)):
            if value not in MODALITIES:
                out.add(number, "unknown_modality", f"{name} {value!r} is not one of {', '.join(MODALITIES)}")
        if (
            query_modality in MODALITIES
            and cand_modality in MODALITIES
            and (query_modality, cand_modality) not in TASK_IDS
        ):
            out.add(number, "bad_task_id", f"{query_modality} -> {cand_modality} is not an M-BEIR task")
        if not dataset_id.isdigit():
            out.add(number, "bad_row", f"dataset_id {dataset_id!r} must be a non-negative integer")
        if not prompts:
            out.add(number, "bad_row", "no prompt; add at least one prompt column")
        if len(out.problems) > errors:
            continue
        instruction = MBeirInstruction(query_modality, cand_modality, dataset, int(dataset_id), prompts)
        if instruction.key in seen:
            out.add(
                number,
                "duplicate_id",
                f"a second row for {instruction.key} (first on line {seen[instruction.key]})",
            )
            continue
        seen[instruction.key] = number
        records.append((number, instruction))
    return records, out.problems


def _read(scan, path: str | Path, what: str) -> list:
    records, problems = scan(path)
    if any(p.severity == "error" for p in problems):
        raise MBeirFormatError(problems, f"{what} {str(path)!r}")
    return [record for _, record in records]


def read_queries(path: str | Path) -> list[MBeirQuery]:
    """The queries of a query JSONL file.

    Raises:
        FileNotFoundError: no such file.
        MBeirFormatError: any line with an error (all of them listed; warnings don't raise).
    """
    return _read(scan_queries, path, "query file")


def read_candidates(path: str | Path) -> list[MBeirCandidate]:
    """The candidates of a pool JSONL file.

    Raises:
        FileNotFoundError: no such file.
        MBeirFormatError: any line with an error (all of them listed).
    """
    return _read(scan_candidates, path, "candidate pool")


def read_instructions(path: str | Path) -> list[MBeirInstruction]:
    """The rows of an instruction TSV.

    Raises:
        FileNotFoundError: no such file.
        MBeirFormatError: any row with an error (all of them listed).
    """
    return _read(scan_instructions, path, "instruction file")


# ----------------------------------------------------------------------------------------------------------
# writing (atomic: a reader sees the old file or the new one)
# ----------------------------------------------------------------------------------------------------------


def _jsonl(records: Iterable[MBeirQuery | MBeirCandidate]) -> str:
    return "".join(json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in records)


def write_queries(path: str | Path, queries: Iterable[MBeirQuery]) -> Path:
    """Write a query JSONL file atomically (its folder must exist)."""
    return atomic_write(path, _jsonl(queries))


def write_candidates(path: str | Path, candidates: Iterable[MBeirCandidate]) -> Path:
    """Write a candidate pool JSONL file atomically (its folder must exist)."""
    return atomic_write(path, _jsonl(candidates))


def write_instructions(path: str | Path, instructions: Iterable[MBeirInstruction]) -> Path:
    """Write an instruction TSV atomically: a header, then one row per instruction.

    Raises:
        ValueError: a prompt or name holding a tab or a newline (it would break the row).
    """
    instructions = list(instructions)
    n_prompts = max((len(i.prompts) for i in instructions), default=1)
    rows = [[*INSTRUCTION_COLUMNS, *(f"prompt_{k}" for k in range(1, n_prompts + 1))]]
    for instruction in instructions:
        row = instruction.to_row()
        bad = [cell for cell in row if "\t" in cell or "\n" in cell or "\r" in cell]
        if bad:
            raise ValueError(f"instruction cell {bad[0]!r} holds a tab or newline; remove it")
        rows.append(row + [""] * (len(rows[0]) - len(row)))
    return atomic_write(path, "".join("\t".join(row) + "\n" for row in rows))
