"""The offline mini M-BEIR builder: valid, deterministic, every task type, positives where they belong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from lora_retriever.mbeir import (
    MBEIR_TASKS,
    MiniMBeirConfig,
    build_mini_mbeir,
    read_candidates,
    read_instructions,
    read_queries,
    validate_dataset,
)
from lora_retriever.mbeir.__main__ import main
from lora_retriever.tasks import build_splits
from lora_retriever.tasks.multimodal import IMAGE_SIZE

SIZES = {"n_train": 3, "n_val": 2, "n_test": 3, "n_distractors": 2}
SIX_PAIRS = {
    ("text", "text"),
    ("text", "image"),
    ("image", "text"),
    ("image,text", "text"),
    ("image,text", "image"),
    ("image", "image"),
}


def _build(out_dir: Path, **overrides) -> dict:
    return build_mini_mbeir(MiniMBeirConfig(out_dir=str(out_dir), progress=False, **{**SIZES, **overrides}))


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("mbeir") / "mini"
    return root, _build(root)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _split_files(root: Path, manifest: dict, split: str):
    """(spec, queries, local pool, global pool) of each task in one split, read back with the typed readers."""
    global_pool = {c.did: c for c in read_candidates(root / manifest["global_pools"][split]["file"])}
    for task, entry in manifest["tasks"].items():
        files = entry["splits"][split]
        yield (
            MBEIR_TASKS[task],
            read_queries(root / files["queries"]),
            read_candidates(root / files["local_pool"]),
            global_pool,
        )


def test_the_built_folder_is_valid_without_a_warning(built) -> None:
    root, _ = built
    report = validate_dataset(root)
    assert report.problems == []
    assert report.counts["query files"] == 7 * 3 and report.counts["instruction rows"] == 7


def test_every_task_type_is_built_with_the_counts_asked(built) -> None:
    root, manifest = built
    pairs = {(e["query_modality"], e["cand_modality"]) for e in manifest["tasks"].values()}
    assert pairs == SIX_PAIRS and len(manifest["tasks"]) >= 6
    for split, n in (("train", 3), ("val", 2), ("test", 3)):
        for spec, queries, pool, _ in _split_files(root, manifest, split):
            assert len(queries) == n == manifest["tasks"][spec.name]["splits"][split]["n_queries"]
            assert len(pool) == manifest["tasks"][spec.name]["splits"][split]["n_candidates"]
            assert {q.query_modality for q in queries} == {spec.query_modality}
            assert {c.modality for c in pool} == {spec.cand_modality}
            assert {q.task_id for q in queries} == {spec.task_id}
    rows = {
        (r.dataset_id, r.query_modality, r.cand_modality)
        for r in read_instructions(root / manifest["instructions"])
    }
    assert rows == {(s.dataset_id, s.query_modality, s.cand_modality) for s in MBEIR_TASKS.values()}


def test_positives_are_in_the_local_and_the_global_pool(built) -> None:
    root, manifest = built
    for split in ("train", "val", "test"):
        for _, queries, pool, global_pool in _split_files(root, manifest, split):
            local = {c.did: c for c in pool}
            for query in queries:
                assert query.pos_cand_list and set(query.pos_cand_list) <= set(local)
                for did in query.pos_cand_list:
                    assert global_pool[did] == local[did]


def test_modality_fields_match_the_content(built) -> None:
    root, manifest = built
    for split in ("train", "val", "test"):
        for _, queries, pool, _ in _split_files(root, manifest, split):
            items = [(q.query_modality, q.query_txt, q.query_img_path) for q in queries]
            items += [(c.modality, c.txt, c.img_path) for c in pool]
            for modality, text, image in items:
                assert (text is not None) == ("text" in modality.split(","))
                assert (image is not None) == ("image" in modality.split(","))
                if image is not None:
                    with Image.open(root / image) as picture:
                        assert picture.format == "PNG" and picture.size == (IMAGE_SIZE, IMAGE_SIZE)


def test_no_image_is_shared_between_splits_nor_is_a_query_its_own_candidate(built) -> None:
    root, manifest = built
    partitions = manifest["split_partitions"]
    images: dict[str, set[str]] = {}
    for split in ("train", "val", "test"):
        images[split] = set()
        for _, queries, pool, _ in _split_files(root, manifest, split):
            pool_images = {c.img_path for c in pool if c.img_path}
            for query in queries:
                assert query.query_img_path is None or query.query_img_path not in pool_images
                if query.query_img_path:  # drawn from the split's own image partition
                    assert json.loads(query.query_src_content)["partition"] == partitions[split]
            images[split] |= pool_images | {q.query_img_path for q in queries if q.query_img_path}
    assert images["train"] and images["test"]
    assert not images["train"] & images["test"] and not images["train"] & images["val"]
    assert not images["val"] & images["test"]


def test_positives_answer_the_query(built) -> None:
    """Checked against the sources: the text suite's answers and the images' labels."""
    root, manifest = built
    capital = build_splits("capital", 0, n_train=3, n_keys=2, n_test=3)
    answer_of = {r.input: r.output for r in capital.train + capital.keys + capital.test}
    for split in ("train", "val", "test"):
        for spec, queries, pool, _ in _split_files(root, manifest, split):
            local = {c.did: c for c in pool}
            for query in queries:
                source = json.loads(query.query_src_content)
                positives = [local[d] for d in query.pos_cand_list]
                if spec.name == "capital":
                    assert [p.txt for p in positives] == [answer_of[query.query_txt]]
                elif spec.name == "digit_match":  # every image of the same digit, and only those
                    same = {
                        d for d, c in local.items() if json.loads(c.src_content)["labels"] == source["labels"]
                    }
                    assert set(query.pos_cand_list) == same
                elif spec.name == "clock_restyle":
                    theme, hands = query.query_txt.removeprefix("the same time on a ").split(" face with ")
                    for p in positives:
                        key = json.loads(p.src_content)["key"].split(":")
                        assert key[:3] == [str(source["labels"]["hour"]), theme, hands.removesuffix(" hands")]
                elif spec.name == "screen_caption":
                    assert all(json.loads(p.src_content)["domain"] == source["domain"] for p in positives)
                    assert source["key"] in {json.loads(p.src_content)["key"] for p in positives}


def test_same_seed_same_bytes_other_seed_other_data(built, tmp_path: Path) -> None:
    root, _ = built
    _build(tmp_path / "again")
    assert _files(tmp_path / "again") == _files(root)
    _build(tmp_path / "other", seed=1)
    assert _files(tmp_path / "other") != _files(root)


def test_a_non_empty_folder_is_refused_without_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="--overwrite"):
        _build(out, tasks=["capital"])
    assert (out / "mine.txt").read_text() == "keep me"
    _build(out, tasks=["capital"], overwrite=True)
    assert not (out / "mine.txt").exists() and validate_dataset(out).ok
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left behind


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"n_test": 0}, "n_test must be an int >= 1"),
        ({"n_distractors": -1}, "n_distractors must be an int >= 0"),
        ({"tasks": ["nope"]}, "unknown task"),
        ({"tasks": ["capital", "capital"]}, "more than once"),
        ({"tasks": []}, "tasks is empty"),
    ],
)
def test_bad_settings_are_refused(tmp_path: Path, overrides: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MiniMBeirConfig(out_dir=str(tmp_path), **overrides)


def test_cli_builds_and_validates(tmp_path: Path, capsys) -> None:
    out = tmp_path / "cli"
    args = ["--n_train", "2", "--n_val", "1", "--n_test", "2", "--n_distractors", "1", "--quiet"]
    assert main(["build", "--out_dir", str(out), "--tasks", "screen_qa", "digit_match", *args]) == 0
    printed = capsys.readouterr().out
    assert "screen_qa" in printed and "image,text -> text" in printed
    assert main(["validate", str(out)]) == 0
    assert capsys.readouterr().out.startswith("valid: 0 error(s), 0 warning(s)")
    assert main(["build", "--out_dir", str(out), *args]) == 2  # not empty, no --overwrite
    assert "--overwrite" in capsys.readouterr().err
