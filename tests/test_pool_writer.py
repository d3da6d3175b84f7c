"""The one pool writer (``lora_retriever.pool_config``): concurrent writers, writers that die, permissions,
paths and unknown fields, ``check_pool_writable``, and ``embed_pool`` racing a registration.

Writers run in real processes (``fork``: the children only run json / fcntl code) on real files.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import stat
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from lora_retriever.embed_pool import embed_pool
from lora_retriever.pool import AdapterPool, key_meta_path
from lora_retriever.pool_config import check_pool_writable, pool_lock, pool_transaction, read_pool_entries
from lora_retriever.training import register_adapter
from tests.test_pool_and_index import write_adapter_dir

FORK = multiprocessing.get_context("fork")


def names_in(config: Path) -> list[str]:
    return [e["lora_name"] for e in json.loads(config.read_text())]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


# ------------------------------------------------------------------------------------------ concurrency


def _register_many(config: str, who: int, count: int, start: multiprocessing.Event) -> None:
    start.wait(10)
    folder = Path(config).parent
    for i in range(count):
        register_adapter(
            config, {"lora_name": f"w{who}-{i}", "lora_path": str(folder / f"w{who}-{i}"), "i": i}
        )


def test_eight_concurrent_registrations_all_survive(tmp_path):
    config = tmp_path / "pool.json"
    first = {"lora_name": "seed", "lora_path": "/abs/seed", "owner": {"team": "x"}}
    config.write_text(json.dumps([first]))
    count, start = 10, FORK.Event()
    writers = [FORK.Process(target=_register_many, args=(str(config), w, count, start)) for w in range(8)]
    for writer in writers:
        writer.start()
    start.set()
    reads = 0
    while any(w.is_alive() for w in writers):
        json.loads(config.read_text())  # readers never see a partial file
        reads += 1
    for writer in writers:
        writer.join(30)
        assert writer.exitcode == 0
    entries = json.loads(config.read_text())
    expected = ["seed"] + [f"w{w}-{i}" for w in range(8) for i in range(count)]
    assert sorted(e["lora_name"] for e in entries) == sorted(expected)  # nothing lost, nothing doubled
    assert entries[0] == first  # untouched: absolute path and unknown nested field kept
    assert all(e["lora_path"] == e["lora_name"] and e["i"] == int(e["lora_name"][3:]) for e in entries[1:])
    assert reads > 0 and leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------ dying writers


def _die_before_rename(config: str) -> None:
    os.replace = lambda *args: os.kill(os.getpid(), signal.SIGKILL)  # the temp file is complete by now
    register_adapter(config, {"lora_name": "b", "lora_path": "b"})


def test_writer_killed_between_temp_file_and_rename_leaves_the_old_file(tmp_path):
    config = tmp_path / "pool.json"
    register_adapter(config, {"lora_name": "a", "lora_path": str(tmp_path / "a")})
    before = config.read_bytes()
    child = FORK.Process(target=_die_before_rename, args=(str(config),))
    child.start()
    child.join(30)
    assert child.exitcode == -signal.SIGKILL
    assert config.read_bytes() == before and names_in(config) == ["a"]
    (leftover,) = leftovers(tmp_path)  # what the dead writer had written, never renamed
    assert [e["lora_name"] for e in json.loads((tmp_path / leftover).read_text())] == ["a", "b"]
    with pool_lock(config, timeout=0.5):  # the kernel released the dead writer's lock
        pass
    register_adapter(config, {"lora_name": "c", "lora_path": "c"}, lock_timeout=1)
    assert names_in(config) == ["a", "c"] and leftovers(tmp_path) == []  # the next writer cleans up


def _hold_the_lock(config: str, holding: multiprocessing.Event) -> None:
    with pool_transaction(config) as entries:
        entries.append({"lora_name": "never", "lora_path": "never"})
        holding.set()
        time.sleep(60)


def test_writer_killed_while_holding_the_lock_releases_it(tmp_path):
    config = tmp_path / "pool.json"
    register_adapter(config, {"lora_name": "a", "lora_path": "a"})
    before = config.read_bytes()
    holding = FORK.Event()
    child = FORK.Process(target=_hold_the_lock, args=(str(config), holding))
    child.start()
    assert holding.wait(30)
    with pytest.raises(TimeoutError, match="another process is writing the pool config"):
        register_adapter(config, {"lora_name": "b", "lora_path": "b"}, lock_timeout=0.3)
    os.kill(child.pid, signal.SIGKILL)
    child.join(30)
    assert config.read_bytes() == before  # the dead writer's edit ("never") was not written
    started = time.monotonic()
    register_adapter(config, {"lora_name": "b", "lora_path": "b"}, lock_timeout=5)
    assert time.monotonic() - started < 2  # no waiting out the timeout: the lock died with its holder
    assert names_in(config) == ["a", "b"]


@pytest.mark.parametrize("fail_in", ["fsync", "replace"])
def test_a_failed_write_keeps_the_old_file_and_no_temp_file(tmp_path, monkeypatch, fail_in):
    config = tmp_path / "pool.json"
    register_adapter(config, {"lora_name": "a", "lora_path": "a"})
    before = config.read_bytes()
    real = getattr(os, fail_in)

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, fail_in, fail)
    with pytest.raises(OSError, match="disk full"):
        register_adapter(config, {"lora_name": "b", "lora_path": "b"})
    monkeypatch.setattr(os, fail_in, real)
    assert config.read_bytes() == before and leftovers(tmp_path) == []
    register_adapter(config, {"lora_name": "b", "lora_path": "b"}, lock_timeout=1)  # the lock was released
    assert names_in(config) == ["a", "b"]


def test_an_exception_in_the_transaction_writes_nothing(tmp_path):
    config = tmp_path / "pool.json"
    register_adapter(config, {"lora_name": "a", "lora_path": "a"})
    before = config.read_bytes()
    with pytest.raises(KeyError), pool_transaction(config) as entries:
        entries.clear()
        raise KeyError("changed my mind")
    assert config.read_bytes() == before


def test_register_adds_replaces_and_refuses_incomplete_entries(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths in an entry are relative to the current directory
    config = tmp_path / "pool.json"
    register_adapter(config, {"lora_name": "a", "lora_path": "a", "task": "x"})
    register_adapter(config, {"lora_name": "b", "lora_path": "b"})
    register_adapter(config, {"lora_name": "a", "lora_path": str(tmp_path / "a2")})
    # replaced in place; a replacement is the new entry as given (the old fields go)
    assert read_pool_entries(config) == [
        {"lora_name": "a", "lora_path": "a2"},
        {"lora_name": "b", "lora_path": "b"},
    ]
    with pytest.raises(ValueError, match=r"missing \['lora_path'\]"):
        register_adapter(config, {"lora_name": "c"})


def test_register_leaves_an_invalid_config_untouched(tmp_path):
    config = tmp_path / "pool.json"
    config.write_text('[{"lora_name": "a", "lora_path": "a"},')
    with pytest.raises(ValueError, match="is not valid JSON"):
        register_adapter(config, {"lora_name": "b", "lora_path": "b"})
    assert config.read_text() == '[{"lora_name": "a", "lora_path": "a"},'


# ------------------------------------------------------------------------------- files, paths and fields


def test_permissions_are_kept_and_new_files_are_not_private(tmp_path, umask_022):
    config = tmp_path / "pool.json"
    register_adapter(config, {"lora_name": "a", "lora_path": "a"})
    assert stat.S_IMODE(config.stat().st_mode) == 0o644  # new: 0o666 minus the umask, not mkstemp's 0o600
    config.chmod(0o640)
    register_adapter(config, {"lora_name": "b", "lora_path": "b"})
    assert stat.S_IMODE(config.stat().st_mode) == 0o640 and names_in(config) == ["a", "b"]


def test_paths_stay_as_stored_and_new_ones_are_relative_to_the_config(tmp_path, monkeypatch):
    config = tmp_path / "pools" / "pool.json"
    config.parent.mkdir()
    old = [
        {
            "lora_name": "rel",
            "lora_path": "../adapters/rel",
            "embedding_path": "keys/rel.npy",
            "x": [1, {"y": 2}],
        },
        {"lora_name": "abs", "lora_path": "/srv/adapters/abs", "description": "kept absolute"},
    ]
    config.write_text(json.dumps(old))
    monkeypatch.chdir(tmp_path)
    stored = register_adapter(config, {"lora_name": "new", "lora_path": "adapters/new", "samples_path": None})
    assert stored == {"lora_name": "new", "lora_path": "../adapters/new", "samples_path": None}
    register_adapter(config, {"lora_name": "cwd", "lora_path": str(tmp_path / "pools" / "adapters" / "cwd")})
    assert read_pool_entries(config) == [*old, stored, {"lora_name": "cwd", "lora_path": "adapters/cwd"}]


def test_pool_save_goes_through_the_locked_writer(tmp_path):
    config = tmp_path / "pool.json"
    write_adapter_dir(tmp_path / "adapters" / "a")
    register_adapter(config, {"lora_name": "a", "lora_path": str(tmp_path / "adapters" / "a"), "note": "n"})
    pool = AdapterPool.from_configs(config, require_keys=False)
    holding = FORK.Event()
    child = FORK.Process(target=_hold_the_lock, args=(str(config), holding))
    child.start()
    assert holding.wait(30)
    try:
        with pytest.raises(TimeoutError):
            pool.save(config, lock_timeout=0.3)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.join(30)
    pool.save(tmp_path / "copy" / "pool.json")
    assert read_pool_entries(tmp_path / "copy" / "pool.json") == [
        {"lora_name": "a", "lora_path": "../adapters/a", "description": "", "note": "n"}
    ]


# ------------------------------------------------------------------------------------ check_pool_writable


def test_check_pool_writable_accepts_missing_and_valid_configs(tmp_path):
    assert check_pool_writable(tmp_path / "new" / "deeper" / "pool.json") == tmp_path / "new/deeper/pool.json"
    assert not (tmp_path / "new").exists()  # a check creates nothing
    (tmp_path / "empty.json").write_text("")  # an empty file is an empty pool
    check_pool_writable(tmp_path / "empty.json")
    register_adapter(tmp_path / "pool.json", {"lora_name": "a", "lora_path": "a"})
    check_pool_writable(tmp_path / "pool.json")


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda p: p.write_text('[{"lora_name": "a"},'), ValueError, "is not valid JSON"),
        (lambda p: p.write_text('{"lora_name": "a"}'), ValueError, "must be a JSON list"),
        (lambda p: p.write_text('[{"lora_name": "a"}, 3]'), ValueError, r"entries \[1\] are not objects"),
        (lambda p: p.write_bytes(b"\xff\xfe["), ValueError, "is not valid JSON"),
        (lambda p: p.mkdir(), ValueError, "is a directory"),
    ],
)
def test_check_pool_writable_refuses_a_bad_config(tmp_path, make, error, message):
    config = tmp_path / "pool.json"
    make(config)
    with pytest.raises(error, match=message):
        check_pool_writable(config)


def test_check_pool_writable_refuses_a_folder_under_a_file(tmp_path):
    (tmp_path / "data").write_text("a file")
    with pytest.raises(NotADirectoryError, match="data is a file"):
        check_pool_writable(tmp_path / "data" / "pools" / "pool.json")


def _check_as_nobody(config: str) -> None:
    if os.geteuid() == 0:
        os.setuid(65534)  # root may write anywhere: check as an ordinary user
    try:
        check_pool_writable(config)
    except PermissionError as err:
        os._exit(0 if "is not writable" in str(err) else 2)
    os._exit(1)


def test_check_pool_writable_refuses_a_read_only_folder():
    # pytest's tmp_path sits in a 0700 folder that another user can't enter: use a fresh world-readable one
    root = Path(tempfile.mkdtemp(prefix="pool-writer-"))
    try:
        root.chmod(0o755)
        folder = root / "read_only"
        folder.mkdir(mode=0o555)
        folder.chmod(0o555)
        for config in (folder / "pool.json", folder / "new" / "pool.json"):
            child = FORK.Process(target=_check_as_nobody, args=(str(config),))
            child.start()
            child.join(30)
            assert child.exitcode == 0, config
    finally:
        (root / "read_only").chmod(0o755)
        shutil.rmtree(root)


# ------------------------------------------------------------------------------------ embed_pool vs writer


class RegisterWhileEmbedding:
    """The real MiniLM embedder; the first time keys are embedded, another process registers an adapter
    (so it lands between embed_pool's read of the config and its write)."""

    def __init__(self, embedder, config: Path, entry: dict):
        self.embedder, self.config, self.entry = embedder, config, entry
        self.registered = False

    def __getattr__(self, name):
        return getattr(self.embedder, name)

    def encode_queries(self, texts, **kwargs):
        if not self.registered:
            child = FORK.Process(target=register_adapter, args=(str(self.config), self.entry))
            child.start()
            child.join(30)
            assert child.exitcode == 0
            self.registered = True
        return self.embedder.encode_queries(texts, **kwargs)


@pytest.fixture(scope="module")
def minilm():
    from lora_retriever.embedders import EmbedderConfig, get_embedder

    return get_embedder(EmbedderConfig())


def test_embed_pool_keeps_a_registration_made_while_it_runs(tmp_path, minilm, umask_022):
    config = tmp_path / "pool.json"
    for name, samples in (
        ("capitals", ["capital of France?", "capital of Peru?"]),
        ("sums", ["2+2?", "3+4?"]),
    ):
        write_adapter_dir(tmp_path / "adapters" / name)
        (tmp_path / "samples").mkdir(exist_ok=True)
        (tmp_path / "samples" / f"{name}.jsonl").write_text(
            "".join(json.dumps({"input": s}) + "\n" for s in samples)
        )
    entries = [
        {"lora_name": n, "lora_path": f"adapters/{n}", "samples_path": f"samples/{n}.jsonl", "owner": n}
        for n in ("capitals", "sums")
    ]
    config.write_text(json.dumps(entries))
    config.chmod(0o664)
    # the late adapter comes with its own key, as register_trained_adapter writes it
    write_adapter_dir(tmp_path / "adapters" / "late")
    late_key = tmp_path / "keys" / "late.npy"
    late_key.parent.mkdir()
    np.save(late_key, minilm.encode_queries(["a late adapter"])[0])
    late = {
        "lora_name": "late",
        "lora_path": str(tmp_path / "adapters" / "late"),
        "embedding_path": str(late_key),
    }
    embedder = RegisterWhileEmbedding(minilm, config, late)

    pool = embed_pool(config, embedder, num_samples=2, progress=False)

    assert embedder.registered
    assert pool.names == ["capitals", "sums", "late"]  # the registration made meanwhile survived
    stored = read_pool_entries(config)
    assert [e.get("embedding_path") for e in stored] == [
        "keys/capitals.npy",
        "keys/sums.npy",
        "keys/late.npy",
    ]
    assert [e.get("owner") for e in stored] == ["capitals", "sums", None]  # unknown fields kept
    mean = minilm.encode_queries(["capital of France?", "capital of Peru?"]).mean(0)
    np.testing.assert_allclose(pool.keys()[0], mean / np.linalg.norm(mean), atol=1e-6)
    assert stat.S_IMODE(config.stat().st_mode) == 0o664
    for key in ("capitals", "sums"):
        for path in (tmp_path / "keys" / f"{key}.npy", key_meta_path(tmp_path / "keys" / f"{key}.npy")):
            assert stat.S_IMODE(path.stat().st_mode) == 0o644, path  # not mkstemp's 0o600
    assert leftovers(tmp_path) == [] and leftovers(tmp_path / "keys") == []


def test_embed_pool_checks_every_entry_before_embedding(tmp_path):
    config = tmp_path / "pool.json"
    for name in ("a", "b", "c", "d"):
        write_adapter_dir(tmp_path / "adapters" / name)
    (tmp_path / "c.jsonl").write_text('{"output": "no input"}\n')
    (tmp_path / "d.jsonl").write_text("\n")
    entries = [
        {"lora_name": "a", "lora_path": "adapters/a"},
        {"lora_name": "b", "lora_path": "adapters/b", "samples_path": "missing.jsonl"},
        {"lora_name": "c", "lora_path": "adapters/c", "samples_path": "c.jsonl"},
        {"lora_name": "d", "lora_path": "adapters/d", "samples_path": "d.jsonl"},
    ]
    config.write_text(json.dumps(entries))
    with pytest.raises(ValueError) as err:
        embed_pool(config, embedder=None, progress=False)  # fails before the embedder is used
    text = str(err.value)
    assert "'a' has no samples_path" in text and "missing.jsonl does not exist" in text
    assert "c.jsonl record line1: no 'input'" in text and "d.jsonl holds no records" in text
    with pytest.raises(ValueError, match=r"adapter names \['z'\] \(--only\) are not in"):
        embed_pool(config, embedder=None, names=["a", "z"], progress=False)
    assert json.loads(config.read_text()) == entries
