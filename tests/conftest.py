"""Shared test setup: offline, one thread, a private cache, and tiny random-weight models."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def tiny_llama():
    from tests.factories import tiny_causal_lm

    return tiny_causal_lm("llama")


@pytest.fixture
def tiny_qwen2():
    from tests.factories import tiny_causal_lm

    return tiny_causal_lm("qwen2")


def pytest_report_header(config: pytest.Config) -> str:
    """The CPU in the header: fp32 results differ in the last bits between AVX2 and AVX-512/AMX kernels."""
    from swift.utils import cpu_summary

    return f"cpu: {cpu_summary()}"
