"""Validate M-BEIR data: every problem of every file at once, each with its file and line.

    from lora_retriever.mbeir import validate_dataset, validate_files

    report = validate_dataset("data/mini_mbeir")       # the layout below, or a UniIR M-BEIR download
    report = validate_files(queries=["q.jsonl"], pools=["pool.jsonl"], instructions=["i.tsv"], data_root=".")
    for problem in report.problems: ...                # Problem(path, line, kind, message, severity)
    report.ok                                          # no errors (warnings allowed)

CLI: ``python -m lora_retriever.mbeir validate DIR`` (or ``--queries/--pools/--instructions/--data_root``)
prints one problem per line and exits 1 when there is an error.

Beyond the per-line checks of :mod:`.formats` (fields, types, ids, modalities, paths), this checks across files:
a qid or did twice in one file, or with two contents in two files (UniIR's union files repeat records), every
positive and negative id present in the query's candidate pools, ``task_id`` agreeing with the query's and its
positives' modalities, an instruction row for each query's (dataset, modalities) when instructions are given,
and every image path naming a file under the data root. A check that cannot run (no pool, no data root) is a
``not_checked`` warning, never a silent skip.

Layout :func:`validate_dataset` reads (UniIR's; :mod:`.build` writes it)::

    query/**/*.jsonl          query files
    cand_pool/**/*.jsonl      candidate pools (local and global)
    instructions/*.tsv        task instructions
    manifest.json             optional (written by the builder): which local and global pool each query file
                              retrieves from; without it, ids are checked against the union of all pools
"""

from __future__ import annotations

import json
from collections.abc import Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_retriever.mbeir.formats import (
    TASK_IDS,
    MBeirCandidate,
    MBeirQuery,
    scan_candidates,
    scan_instructions,
    scan_queries,
)
from lora_retriever.mbeir.problems import Problem

__all__ = ["MANIFEST_NAME", "ValidationReport", "validate_dataset", "validate_files"]

MANIFEST_NAME = "manifest.json"


@dataclass
class ValidationReport:
    """What :func:`validate_files` found: every problem, and how many records each kind of file held."""

    problems: list[Problem] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def ok(self) -> bool:
        """No errors (warnings allowed)."""
        return not self.errors

    def summary(self) -> str:
        files = ", ".join(f"{n} {what}" for what, n in self.counts.items())
        return f"{len(self.errors)} error(s), {len(self.warnings)} warning(s) in {files}"

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "counts": dict(self.counts), "problems": [p.to_dict() for p in self.problems]}


def validate_files(
    queries: Sequence[str | Path] = (),
    pools: Sequence[str | Path] = (),
    instructions: Sequence[str | Path] = (),
    data_root: str | Path | None = None,
    *,
    pools_of: Mapping[str | Path, Sequence[str | Path]] | None = None,
) -> ValidationReport:
    """Check M-BEIR files, alone and against one another; every problem is reported.

    Args:
        queries: query JSONL files.
        pools: candidate pool JSONL files.
        instructions: instruction TSV files (their rows are pooled).
        data_root: the folder image paths are relative to; ``None``: images are not checked (a warning).
        pools_of: query file -> the pools (among ``pools``) its positive and negative ids must be in; a query
            file not listed is checked against the union of all ``pools``.

    Returns:
        The report; ``report.ok`` when there is no error.

    Raises:
        FileNotFoundError: a listed file or the data root does not exist.
    """
    if data_root is not None:
        data_root = Path(data_root).expanduser()
        if not data_root.is_dir():
            raise FileNotFoundError(
                f"data_root {str(data_root)!r} is not a folder; pass the M-BEIR data root"
            )
    report = ValidationReport()
    problems = report.problems
    pool_records = _scan_pools(pools, problems)
    instruction_keys = _scan_instruction_files(instructions, problems)
    query_records = {str(path): _scan(scan_queries, path, problems) for path in queries}
    report.counts = {
        "query files": len(queries),
        "queries": sum(map(len, query_records.values())),
        "pools": len(pools),
        "candidates": len({c.did for records in pool_records.values() for _, c in records}),
        "instruction rows": len(instruction_keys),
    }
    if not queries and not pools and not instructions:
        problems.append(
            Problem(
                str(data_root or "."), None, "no_files", "no M-BEIR file found; pass query files and pools"
            )
        )

    by_did = {c.did: c for records in pool_records.values() for _, c in records}
    dids_of_pool = {path: {c.did for _, c in records} for path, records in pool_records.items()}
    explicit = {str(q): [str(p) for p in ps] for q, ps in (pools_of or {}).items()}
    for query_path, ps in explicit.items():
        missing = [p for p in ps if p not in dids_of_pool]
        if missing:
            raise ValueError(
                f"pools_of[{query_path!r}] names {missing}, which are not among pools; add them to pools"
            )
    if queries and not pools:
        problems.append(
            Problem(
                str(queries[0]),
                None,
                "not_checked",
                "positive and negative ids not checked: no candidate pool given; pass the pools",
                "warning",
            )
        )

    first_qid: dict[str, tuple[str, int, MBeirQuery]] = {}
    for path, records in query_records.items():
        allowed = (
            set().union(*(dids_of_pool[p] for p in explicit[path])) if path in explicit else by_did.keys()
        )
        for line, query in records:
            seen = first_qid.setdefault(query.qid, (path, line, query))
            if seen[:2] != (path, line) and (seen[0] == path or seen[2] != query):
                # One query in two files (e.g. a per-dataset file and UniIR's union file) is fine.
                kind, what = (
                    ("duplicate_id", "already used")
                    if seen[0] == path
                    else ("conflicting_id", "differs from")
                )
                problems.append(Problem(path, line, kind, f"qid {query.qid!r} {what} at {seen[0]}:{seen[1]}"))
            if pools:
                _check_candidates(query, path, line, allowed, explicit.get(path), problems)
            _check_task(query, path, line, by_did, instruction_keys, bool(instructions), problems)

    if data_root is not None:
        _check_images(query_records, pool_records, data_root, problems)
    elif any(q.query_img_path for records in query_records.values() for _, q in records) or any(
        c.img_path for records in pool_records.values() for _, c in records
    ):
        problems.append(
            Problem(
                str(data_root or "."),
                None,
                "not_checked",
                "image paths not checked: no data root given; pass data_root",
                "warning",
            )
        )
    return report


def validate_dataset(root: str | Path) -> ValidationReport:
    """Validate an M-BEIR folder (UniIR's layout, see the module docstring): every query file, pool and
    instruction file under it, images relative to ``root``.

    With the builder's ``manifest.json``, each query file's ids must be in its own local pool *and* its
    split's global pool, and every local pool's candidates must be in that global pool.

    Raises:
        FileNotFoundError: ``root`` is not a folder.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"M-BEIR folder {str(root)!r} does not exist; pass the data root")
    queries = sorted((root / "query").rglob("*.jsonl"))
    pools = sorted((root / "cand_pool").rglob("*.jsonl"))
    instructions = sorted((root / "instructions").glob("*.tsv"))
    pools_of, unions, manifest_problems = _manifest_pools(root)
    report = validate_files(queries, pools, instructions, root, pools_of=pools_of)
    report.problems[:0] = manifest_problems
    if not queries and not pools and instructions:  # with no file at all, validate_files said so
        report.problems.append(
            Problem(
                str(root),
                None,
                "no_files",
                "no query/**/*.jsonl or cand_pool/**/*.jsonl under it; is it an M-BEIR root?",
            )
        )
    for global_pool, locals_ in unions.items():
        if not Path(global_pool).is_file():
            continue
        union = {c.did for c in _candidates_quietly(global_pool)}
        for local in locals_:
            if not Path(local).is_file():
                continue
            for line, candidate in scan_candidates(local)[0]:
                if candidate.did not in union:
                    report.problems.append(
                        Problem(
                            local,
                            line,
                            "unknown_candidate",
                            f"did {candidate.did!r} of this local pool is missing from the global pool {global_pool}",
                        )
                    )
    return report


# ----------------------------------------------------------------------------------------------------------


def _scan(scan, path: str | Path, problems: list[Problem]) -> list:
    records, found = scan(path)
    problems.extend(found)
    return records


def _scan_pools(
    pools: Iterable[str | Path], problems: list[Problem]
) -> dict[str, list[tuple[int, MBeirCandidate]]]:
    """Each pool's parsed candidates; duplicate dids within a pool, and one did with two contents across
    pools, are problems (the same candidate in a local and the global pool is expected)."""
    records: dict[str, list[tuple[int, MBeirCandidate]]] = {}
    first: dict[str, tuple[str, int, MBeirCandidate]] = {}
    for path in pools:
        path = str(path)
        records[path] = _scan(scan_candidates, path, problems)
        in_this: dict[str, int] = {}
        for line, candidate in records[path]:
            if candidate.did in in_this:
                problems.append(
                    Problem(
                        path,
                        line,
                        "duplicate_id",
                        f"did {candidate.did!r} already on line {in_this[candidate.did]}",
                    )
                )
                continue
            in_this[candidate.did] = line
            seen = first.setdefault(candidate.did, (path, line, candidate))
            if seen[2] != candidate:
                problems.append(
                    Problem(
                        path,
                        line,
                        "conflicting_id",
                        f"did {candidate.did!r} differs from its entry at {seen[0]}:{seen[1]}; one did, one content",
                    )
                )
    return records


def _scan_instruction_files(
    paths: Iterable[str | Path], problems: list[Problem]
) -> dict[tuple[int, str, str], str]:
    keys: dict[tuple[int, str, str], str] = {}
    for path in paths:
        for line, instruction in _scan(scan_instructions, path, problems):
            where = f"{path}:{line}"
            if instruction.key in keys:
                problems.append(
                    Problem(
                        str(path),
                        line,
                        "duplicate_id",
                        f"a second row for {instruction.key} (first at {keys[instruction.key]})",
                    )
                )
            else:
                keys[instruction.key] = where
    return keys


def _check_candidates(
    query: MBeirQuery,
    path: str,
    line: int,
    allowed: Container[str],
    pools: Sequence[str] | None,
    problems: list[Problem],
) -> None:
    where = f"its pools {', '.join(pools)}" if pools else "any candidate pool"
    for name, ids in (("positive", query.pos_cand_list), ("negative", query.neg_cand_list)):
        for did in ids:
            if did not in allowed:
                problems.append(
                    Problem(
                        path,
                        line,
                        "unknown_candidate",
                        f"{name} did {did!r} of qid {query.qid!r} is not in {where}",
                    )
                )


def _check_task(
    query: MBeirQuery,
    path: str,
    line: int,
    by_did: Mapping[str, MBeirCandidate],
    instruction_keys: Mapping[tuple[int, str, str], str],
    have_instructions: bool,
    problems: list[Problem],
) -> None:
    """task_id against the modalities of the query and its positives; the instruction row UniIR will look up."""
    modalities = sorted({by_did[d].modality for d in query.pos_cand_list if d in by_did})
    if len(modalities) > 1:
        problems.append(
            Problem(
                path,
                line,
                "modality_mismatch",
                f"the positives of qid {query.qid!r} mix modalities {modalities}; one task, one modality",
            )
        )
        return
    if not modalities:
        return  # positives unknown: reported by _check_candidates (or not checked, with a warning)
    pair = (query.query_modality, modalities[0])
    expected = TASK_IDS.get(pair)
    if expected is None:
        problems.append(Problem(path, line, "task_mismatch", f"{pair[0]} -> {pair[1]} is not an M-BEIR task"))
    elif query.task_id != expected:
        problems.append(
            Problem(
                path,
                line,
                "task_mismatch",
                f"task_id is {query.task_id} but {pair[0]} -> {pair[1]} (query -> positives) is task {expected}",
            )
        )
    if have_instructions and (query.dataset_id, *pair) not in instruction_keys:
        problems.append(
            Problem(
                path,
                line,
                "missing_instruction",
                f"no instruction row for dataset {query.dataset_id}, {pair[0]} -> {pair[1]}; add one",
            )
        )


def _check_images(
    query_records: Mapping[str, list[tuple[int, MBeirQuery]]],
    pool_records: Mapping[str, list[tuple[int, MBeirCandidate]]],
    root: Path,
    problems: list[Problem],
) -> None:
    exists: dict[str, bool] = {}

    def check(path: str, line: int, rel: str | None, name: str) -> None:
        if not rel:
            return
        if rel not in exists:
            exists[rel] = (root / rel).is_file()
        if not exists[rel]:
            problems.append(
                Problem(path, line, "missing_image", f"{name} {rel!r} is not a file under {root}")
            )

    for path, records in query_records.items():
        for line, query in records:
            check(path, line, query.query_img_path, "query_img_path")
    for path, records in pool_records.items():
        for line, candidate in records:
            check(path, line, candidate.img_path, "img_path")


def _candidates_quietly(path: str) -> list[MBeirCandidate]:
    return [c for _, c in scan_candidates(path)[0]]


def _manifest_pools(root: Path) -> tuple[dict[str, list[str]], dict[str, list[str]], list[Problem]]:
    """From the builder's manifest: query file -> [local pool, global pool], and global pool -> local pools."""
    path = root / MANIFEST_NAME
    if not path.is_file():
        return {}, {}, []
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        pools_of: dict[str, list[str]] = {}
        unions: dict[str, list[str]] = {}
        for task in manifest["tasks"].values():
            for split, files in task["splits"].items():
                global_pool = str(root / manifest["global_pools"][split]["file"])
                local_pool = str(root / files["local_pool"])
                pools_of[str(root / files["queries"])] = [local_pool, global_pool]
                unions.setdefault(global_pool, []).append(local_pool)
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        problem = Problem(
            str(path),
            None,
            "wrong_type",
            f"manifest unreadable ({type(err).__name__}: {err}); ids checked against all pools",
        )
        return {}, {}, [problem]
    missing = [
        p for p in {*pools_of, *unions, *(x for ps in unions.values() for x in ps)} if not Path(p).is_file()
    ]
    problems = [
        Problem(str(path), None, "no_files", f"the manifest names {p}, which does not exist")
        for p in sorted(missing)
    ]
    pools_of = {
        q: ps for q, ps in pools_of.items() if Path(q).is_file() and all(Path(p).is_file() for p in ps)
    }
    return pools_of, unions, problems
