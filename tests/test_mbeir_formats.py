"""M-BEIR formats: typed round-trip, and every validator problem kind reported with its file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_retriever.mbeir import (
    PROBLEM_KINDS,
    MBeirCandidate,
    MBeirFormatError,
    MBeirInstruction,
    MBeirQuery,
    read_candidates,
    read_instructions,
    read_queries,
    scan_instructions,
    validate_dataset,
    validate_files,
    write_candidates,
    write_instructions,
    write_queries,
)
from lora_retriever.mbeir.__main__ import main


def _query(qid: str, txt=None, img=None, modality="text", pos=("1:1",), neg=(), task_id=1, **extra) -> dict:
    record = {
        "qid": qid,
        "query_txt": txt,
        "query_img_path": img,
        "query_modality": modality,
        "query_src_content": None,
        "pos_cand_list": list(pos),
        "neg_cand_list": list(neg),
        "task_id": task_id,
    }
    record.update(extra)
    return record


def _cand(did: str, txt=None, img=None, modality="text") -> dict:
    return {"did": did, "txt": txt, "img_path": img, "modality": modality, "src_content": None}


def _lines(path: Path, lines: list) -> Path:
    path.write_text(
        "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8"
    )
    return path


def _found(problems) -> set[tuple[str, int | None, str]]:
    return {(Path(p.path).name, p.line, p.kind) for p in problems}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    from PIL import Image

    (tmp_path / "img").mkdir()
    Image.new("RGB", (4, 4), (255, 0, 0)).save(tmp_path / "img" / "a.png")
    return tmp_path


def test_round_trip_gives_the_same_typed_records(tmp_path: Path) -> None:
    queries = [
        MBeirQuery("9:1", "a red square", None, "text", '{"src": 1}', ("9:2",), (), 0),
        MBeirQuery("9:2", "same, but blue", "img/a.png", "image,text", None, ("9:2", "9:3"), ("9:1",), 7),
    ]
    candidates = [
        MBeirCandidate("9:1", "Paris", None, "text", None),
        MBeirCandidate("9:2", None, "img/a.png", "image", '{"k": "v"}'),
        MBeirCandidate("9:3", "a caption", "img/a.png", "image,text", None),
    ]
    instructions = [
        MBeirInstruction("text", "image", "toy", 9, ("Find the image.",)),
        MBeirInstruction(
            "image,text", "image", "toy", 9, ("Find it, changed.", "Retrieve the edited image.")
        ),
    ]
    write_queries(tmp_path / "q.jsonl", queries)
    write_candidates(tmp_path / "p.jsonl", candidates)
    write_instructions(tmp_path / "i.tsv", instructions)

    assert read_queries(tmp_path / "q.jsonl") == queries
    assert read_candidates(tmp_path / "p.jsonl") == candidates
    assert read_instructions(tmp_path / "i.tsv") == instructions
    first = json.loads((tmp_path / "q.jsonl").read_text().splitlines()[0])
    assert list(first) == [
        "qid",
        "query_txt",
        "query_img_path",
        "query_modality",
        "query_src_content",
        "pos_cand_list",
        "neg_cand_list",
        "task_id",
    ]
    assert queries[1].dataset_id == 9 and instructions[1].task_id == 7


def test_every_problem_is_reported_at_once_with_its_line(root: Path) -> None:
    queries = _lines(
        root / "q.jsonl",
        [
            _query("1:1", txt="capital of France?"),  # 1: valid
            '{"qid": "1:2",',  # 2: malformed JSON
            {k: v for k, v in _query("1:3", txt="x").items() if k != "task_id"},  # 3: missing task_id
            _query("1:4", txt="x") | {"pos_cand_list": "1:1"},  # 4: a string, not a list
            _query("1:5", txt="x", modality="audio"),  # 5: unknown modality
            _query("1:6", txt="x", modality="image"),  # 6: says image, has only text
            _query("1:1", txt="again"),  # 7: qid of line 1
            _query("1:8", txt="x", pos=("1:99",)),  # 8: positive not in the pool
            _query("1:9", img="img/nope.png", modality="image", task_id=3),  # 9: no such image
            _query("abc", txt="x"),  # 10: bad id
            _query("1:11", txt="x", pos=()),  # 11: no positive
            _query("1:12", txt="x", task_id=0),  # 12: text -> text is task 1, not 0
            "",  # 13: blank line
            _query("1:14", txt="x", img="img/a.png", modality="text,image", pos=("1:2",), task_id=7),  # 14
            _query("1:15", img="/abs/a.png", modality="image", task_id=3),  # 15: absolute path
            _query("1:16", txt="x", extra=1),  # 16: unknown field (a warning)
            "[1, 2]",  # 17: not an object
            _query("1:18", txt="x", neg=("1:98",)),  # 18: negative not in the pool
            _query("1:19", txt="x", pos=("1:1", "1:2")),  # 19: positives of two modalities
        ],
    )
    pool = _lines(
        root / "p.jsonl",
        [
            _cand("1:1", txt="Paris"),
            _cand("1:2", img="img/a.png", modality="image"),
            _cand("1:1", txt="Paris"),  # 3: duplicate did
            _cand("1:4", img="img/a.png", modality="text"),  # 4: says text, has only an image
            _cand("1:5", img="img/missing.png", modality="image"),  # 5: no such image
            "{oops",  # 6: malformed
            _cand("1:7", txt="", modality="text"),  # 7: empty text counts as absent
        ],
    )
    other_pool = _lines(root / "p2.jsonl", [_cand("1:1", txt="Lyon")])  # 1: same did, other content

    report = validate_files([queries], [pool, other_pool], data_root=root)

    assert _found(report.problems) == {
        ("q.jsonl", 2, "malformed_json"),
        ("q.jsonl", 3, "missing_field"),
        ("q.jsonl", 4, "wrong_type"),
        ("q.jsonl", 5, "unknown_modality"),
        ("q.jsonl", 6, "modality_mismatch"),
        ("q.jsonl", 7, "duplicate_id"),
        ("q.jsonl", 8, "unknown_candidate"),
        ("q.jsonl", 9, "missing_image"),
        ("q.jsonl", 10, "bad_id"),
        ("q.jsonl", 11, "empty_positives"),
        ("q.jsonl", 12, "task_mismatch"),
        ("q.jsonl", 13, "malformed_json"),
        ("q.jsonl", 14, "unknown_modality"),
        ("q.jsonl", 15, "bad_path"),
        ("q.jsonl", 16, "unknown_field"),
        ("q.jsonl", 17, "wrong_type"),
        ("q.jsonl", 18, "unknown_candidate"),
        ("q.jsonl", 19, "modality_mismatch"),
        ("p.jsonl", 3, "duplicate_id"),
        ("p.jsonl", 4, "modality_mismatch"),
        ("p.jsonl", 5, "missing_image"),
        ("p.jsonl", 6, "malformed_json"),
        ("p.jsonl", 7, "modality_mismatch"),
        ("p2.jsonl", 1, "conflicting_id"),
    }
    assert {p.line for p in report.warnings} == {16} and not report.ok
    assert all(p.kind in PROBLEM_KINDS for p in report.problems)
    line_14 = next(p for p in report.problems if p.line == 14)
    assert "image,text" in line_14.message  # the fix is named
    assert str(next(p for p in report.problems if p.line == 8)).startswith(
        f"{queries}:8: error: unknown_candidate"
    )


def test_reader_raises_with_every_error_and_returns_records_when_valid(root: Path) -> None:
    bad = _lines(
        root / "q.jsonl", [_query("1:1", txt="ok"), '{"qid":', _query("1:3", txt="x", modality="video")]
    )
    with pytest.raises(MBeirFormatError) as caught:
        read_queries(bad)
    assert _found(caught.value.problems) == {
        ("q.jsonl", 2, "malformed_json"),
        ("q.jsonl", 3, "unknown_modality"),
    }
    assert f"{bad}:2" in str(caught.value) and f"{bad}:3" in str(caught.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_candidates(root / "absent.jsonl")
    good = _lines(root / "ok.jsonl", [_query("1:1", txt="ok") | {"note": "kept out"}])  # warnings don't raise
    assert read_queries(good) == [MBeirQuery("1:1", "ok", None, "text", None, ("1:1",), (), 1)]


def test_instruction_rows_are_checked_and_queries_need_one(root: Path) -> None:
    tsv = root / "i.tsv"
    tsv.write_text(
        "query_modality\tcand_modality\tdataset\tdataset_id\tprompt_1\n"
        "text\ttext\tds\t1\tFind it.\n"  # 2: fine
        "text\timage\tds\t1\t\n"  # 3: no prompt
        "audio\ttext\tds\t1\tx\n"  # 4: unknown modality
        "text\ttext\tds\t1\tagain\n"  # 5: same key as line 2
        "text\ttext\tds\tone\tp\n"  # 6: dataset_id not an int
        "image\timage\tds\n",  # 7: too few columns
        encoding="utf-8",
    )
    rows, problems = scan_instructions(tsv)
    assert [line for line, _ in rows] == [2]
    assert _found(problems) == {
        ("i.tsv", 3, "bad_row"),
        ("i.tsv", 4, "unknown_modality"),
        ("i.tsv", 5, "duplicate_id"),
        ("i.tsv", 6, "bad_row"),
        ("i.tsv", 7, "bad_row"),
    }

    queries = _lines(
        root / "q.jsonl",
        [_query("1:1", txt="x"), _query("1:2", img="img/a.png", modality="image", task_id=3)],
    )
    pool = _lines(root / "p.jsonl", [_cand("1:1", txt="Paris")])
    report = validate_files([queries], [pool], [tsv], data_root=root)
    missing = [p for p in report.problems if p.kind == "missing_instruction"]
    assert [(Path(p.path).name, p.line) for p in missing] == [("q.jsonl", 2)]


def test_a_record_repeated_in_another_file_is_fine_if_it_is_the_same(root: Path) -> None:
    """UniIR's union files repeat the per-dataset files' queries and candidates."""
    first = _lines(root / "a.jsonl", [_query("1:1", txt="x"), _query("1:2", txt="y")])
    union = _lines(root / "union.jsonl", [_query("1:1", txt="x"), _query("1:2", txt="changed")])
    pool = _lines(root / "p.jsonl", [_cand("1:1", txt="Paris")])
    report = validate_files(
        [first, union], [pool, _lines(root / "p_union.jsonl", [_cand("1:1", txt="Paris")])]
    )
    assert _found(report.problems) == {("union.jsonl", 2, "conflicting_id")}


def test_checks_that_cannot_run_are_warnings_not_silence(root: Path) -> None:
    queries = _lines(root / "q.jsonl", [_query("1:1", img="img/a.png", modality="image", task_id=3)])
    report = validate_files([queries])
    assert report.ok
    assert [p.kind for p in report.warnings] == ["not_checked", "not_checked"]
    assert any("no candidate pool" in p.message for p in report.warnings)
    assert any("no data root" in p.message for p in report.warnings)


def test_cli_prints_every_problem_and_exits_nonzero(root: Path, capsys) -> None:
    (root / "query").mkdir()
    (root / "cand_pool").mkdir()
    _lines(root / "query" / "q.jsonl", [_query("1:1", txt="x"), "{", _query("1:3", txt="y", pos=("1:9",))])
    _lines(root / "cand_pool" / "p.jsonl", [_cand("1:1", txt="Paris")])

    assert main(["validate", str(root)]) == 1
    out = capsys.readouterr().out.splitlines()
    query_file = root / "query" / "q.jsonl"
    assert out[:2] == [
        f"{query_file}:2: error: malformed_json: not valid JSON (Expecting property name enclosed in double quotes "
        "at column 2)",
        f"{query_file}:3: error: unknown_candidate: positive did '1:9' of qid '1:3' is not in any candidate pool",
    ]
    assert out[-1].startswith("invalid: 2 error(s), 0 warning(s)")

    assert main(["validate", "--queries", str(query_file), "--json"]) == 1
    payload = json.loads(capsys.readouterr().out)
    assert payload["ok"] is False and [
        p["line"] for p in payload["problems"] if p["severity"] == "error"
    ] == [2]

    assert main(["validate", str(root / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_an_empty_folder_is_not_valid(tmp_path: Path) -> None:
    report = validate_dataset(tmp_path)
    assert [p.kind for p in report.errors] == ["no_files"]
