"""Fixtures of the dashboard tests: a real service (SmolLM2, the 3-adapter test pool of ``tests.service``, a job
runner, a read and an admin key) on a loopback port, a 200-adapter pool on a second server, and headless
Chromium from Debian's package driven by Playwright.

Chromium missing: the browser tests are skipped with a message naming ``make browser``, except in CI
(``CI=true``), where that is a failure.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.service.conftest import embedder, service_pool, smollm2  # noqa: F401  (shared session fixtures)

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
#: Where the tests save a screenshot of every page (committed from a real run: docs/dashboard.md shows them).
SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
DESKTOP = {"width": 1280, "height": 800}
NARROW = {"width": 420, "height": 860}


def chromium_path() -> str | None:
    found = os.environ.get("CHROMIUM") or shutil.which("chromium")
    candidates = [found] if found else list(CHROMIUM_CANDIDATES)
    return next((p for p in candidates if p and Path(p).is_file()), None)


def _unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: the browser tests must run; .ci/run calls `make browser`)")
    pytest.skip(
        f"{reason}; `make browser` installs Debian's chromium (apt-get install chromium chromium-driver)"
    )


@pytest.fixture(scope="session")
def chromium():
    """A headless Chromium (Debian's binary; Playwright's own browser download can't work here)."""
    path = chromium_path()
    if path is None:
        _unavailable("chromium not found (looked for /usr/bin/chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed (the [browser] extra)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=path, args=["--no-sandbox", "--disable-gpu"])
        yield browser
        browser.close()


@pytest.fixture(scope="session")
def keys():
    from lora_retriever.service.auth import new_key

    read_key, read_entry = new_key("read", "reader")
    admin_key, admin_entry = new_key("admin", "admin")
    return {"read": read_key, "admin": admin_key, "entries": [read_entry, admin_entry]}


@pytest.fixture(scope="session")
def dash_engine(smollm2, embedder, service_pool, keys, tmp_path_factory):  # noqa: F811
    from lora_retriever.service.config import ServiceConfig
    from lora_retriever.service.engine import Engine

    model, tokenizer = smollm2
    config = ServiceConfig(
        pools=[str(service_pool)],
        data_dir=str(tmp_path_factory.mktemp("dashboard_data")),
        max_batch_size=4,
        max_wait_ms=20.0,
        default_max_tokens=8,
        job_workers=2,
        api_keys=keys["entries"],
    )
    return Engine(config, model, tokenizer, embedder=embedder)


@pytest.fixture(scope="session")
def dash_server(dash_engine):
    """The service with a job runner and keys, on a free loopback port."""
    from lora_retriever.service.server import ServerThread, make_job_runner

    with ServerThread(dash_engine, jobs=make_job_runner(dash_engine)) as running:
        yield running


def write_big_pool(root: Path, source_pool: Path, model, n: int = 200) -> Path:
    """A pool config of ``n`` tiny adapters (one LoRA module each) in 8 categories, with keys scattered around the
    test pool's three keys (their metadata copied, so the service's embedder accepts them)."""
    from lora_retriever.pool import key_meta_path
    from tests.service.factories import linear_names, write_random_adapter

    entries = json.loads(source_pool.read_text())
    bases = []
    for entry in entries:
        key_path = (source_pool.parent / entry["embedding_path"]).resolve()
        bases.append((np.load(key_path), json.loads(key_meta_path(key_path).read_text())))
    module = linear_names(model, ("q_proj",), layers=[0])
    rng = np.random.default_rng(0)
    pool = []
    for i in range(n):
        task = ["capitals", "arithmetic", "sentiment"][i % 3]
        name = f"{task}-variant-{i:03d}" + ("-with-a-rather-long-descriptive-name" if i % 17 == 0 else "")
        adapter = write_random_adapter(model, root / "adapters" / name, module, r=2, seed=i)
        base, meta = bases[i % 3]
        key = base + rng.normal(0, 0.02, base.shape).astype(np.float32)
        key_path = root / "keys" / f"{name}.npy"
        key_path.parent.mkdir(parents=True, exist_ok=True)
        np.save(key_path, (key / np.linalg.norm(key)).astype(np.float32))
        key_meta_path(key_path).write_text(json.dumps(meta))
        pool.append(
            {
                "lora_name": name,
                "lora_path": str(adapter),
                "embedding_path": str(key_path),
                "description": f"generated adapter {i} of {n} for the layout test",
                "category": f"category-{i % 8}",
                "task": task,
            }
        )
    config = root / "pool.json"
    config.write_text(json.dumps(pool))
    return config


@pytest.fixture(scope="session")
def big_server(dash_engine, embedder, service_pool, tmp_path_factory):  # noqa: F811
    """A second server (no keys, no jobs) over a generated 200-adapter pool, sharing the first one's model."""
    from lora_retriever.service.config import ServiceConfig
    from lora_retriever.service.engine import Engine
    from lora_retriever.service.server import ServerThread

    root = tmp_path_factory.mktemp("big_pool")
    config_path = write_big_pool(root, service_pool, dash_engine.model)
    config = ServiceConfig(pools=[str(config_path)], data_dir=str(root / "data"), default_max_tokens=4)
    engine = Engine(config, dash_engine.model, dash_engine.tokenizer, embedder=embedder)
    with ServerThread(engine) as running:
        yield running
