"""The ``protocol`` job: the LoraRetriever paper's protocol (``lora-retriever-eval``) run in a worker process.

The job runs the command itself (``lora_retriever.cli.eval.main``), so it validates, computes and writes exactly
what the command does: ``table.md``, ``results.json`` and ``results.png`` in ``<job folder>/protocol``. The text
suite runs over the served pools (merged into one pool config in the job's folder, since the command takes one);
the multimodal suite uses ``make demo-vlm``'s pools, test sets and VLM, as ``--suite multimodal`` does.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from lora_retriever.service.errors import ServiceError

__all__ = [
    "KIND",
    "OUTPUT_DIR",
    "ProtocolRequest",
    "protocol_argv",
    "protocol_file",
    "protocol_params",
    "run_protocol",
]

#: The job kind (``JobRunner``) that runs ``run_protocol`` in a worker process.
KIND = "protocol"
#: Where the job writes the command's outputs, inside its folder.
OUTPUT_DIR = "protocol"


def _all_methods() -> list[str]:
    from lora_retriever.eval import METHODS

    return list(METHODS)


class ProtocolRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    suite: Literal["text", "multimodal"] = "text"
    test_data: str | None = Field(default=None, max_length=4096, description="mixed-task JSONL on the server")
    methods: list[str] = Field(default_factory=lambda: _all_methods(), min_length=1)  # as the command
    num_samples: int = Field(default=20, ge=1, le=10_000)
    max_new_tokens: int = Field(default=16, ge=1, le=512)
    top_k: int = Field(default=3, ge=1, le=64)


def protocol_params(engine: Any, body: ProtocolRequest, multimodal_built: bool) -> dict[str, Any]:
    """The job's parameters, checked before it is queued: known methods, a test file whose every task has its
    own adapter in the served pool (the oracle and out-of-domain settings need it), a built multimodal suite.

    Raises:
        ServiceError: naming the field at fault.
    """
    from lora_retriever.data import read_samples
    from lora_retriever.eval import METHODS
    from lora_retriever.selection import own_adapters

    unknown = [m for m in body.methods if m not in METHODS]
    if unknown:
        raise ServiceError(f"unknown method(s) {unknown}; methods: {list(METHODS)}", param="methods")
    params: dict[str, Any] = {
        "suite": body.suite,
        "methods": list(dict.fromkeys(body.methods)),
        "num_samples": body.num_samples,
        "max_new_tokens": body.max_new_tokens,
        "top_k": body.top_k,
    }
    if body.suite == "multimodal":
        if not multimodal_built:
            raise ServiceError(
                "the multimodal suite's pools are not built on this server; `make demo-vlm` builds them",
                param="suite",
            )
        return params
    if body.test_data:
        test = Path(body.test_data).expanduser()
    else:
        from lora_retriever.cli.eval import PaperEvalConfig

        test = Path(PaperEvalConfig.__dataclass_fields__["test_data"].default).absolute()
    if not test.is_absolute() or not test.is_file():
        raise ServiceError(
            f"test_data must be an existing JSONL file on the server, got {str(test)!r}", param="test_data"
        )
    try:
        samples = read_samples(str(test), limit=body.num_samples)
    except (OSError, ValueError) as err:
        raise ServiceError(f"test_data {str(test)!r}: {err}", param="test_data") from err
    missing = sorted(
        {str(s.task) for s in samples if not own_adapters(engine.pool, s.task, s.extra.get("category"))}
    )
    if missing:
        raise ServiceError(
            f"tasks {missing} of {test.name} have no own adapter in the served pool (by name, 'task' or "
            "category); the protocol compares against each item's own adapter",
            param="test_data",
        )
    if not 1 <= body.top_k <= len(engine.pool):
        raise ServiceError(f"top_k must be in 1..{len(engine.pool)}, got {body.top_k}", param="top_k")
    params.update(
        test_data=str(test),
        pools=[str(p) for p in engine.pool_sources()],
        model_type=engine.config.model_type,
        model_path=engine.config.model_path,
    )
    return params


def protocol_file(job_dir: Path, job: dict[str, Any], name: str) -> Path:
    """A file a protocol job wrote to ``<job folder>/protocol`` (``results.json``, ``table.md``, ``results.png``)."""
    if job["kind"] != KIND:
        raise ServiceError(f"job {job['id']} is a {job['kind']} job, not a protocol run", param="job_id")
    path = job_dir / OUTPUT_DIR / name
    if not path.is_file():
        raise ServiceError(
            f"job {job['id']} ({job['state']}) has no {name} yet; it is written when the run completes",
            status=404,
            param="job_id",
        )
    return path


def protocol_argv(params: dict[str, Any], job_dir: Path) -> list[str]:
    """The ``lora-retriever-eval`` arguments of a protocol job (``protocol_params`` made ``params``)."""
    argv = [
        "--suite",
        params["suite"],
        "--output_dir",
        str(job_dir / OUTPUT_DIR),
        "--methods",
        *params["methods"],
        "--num_samples",
        str(params["num_samples"]),
        "--max_new_tokens",
        str(params["max_new_tokens"]),
        "--top_k",
        str(params["top_k"]),
    ]
    if params["suite"] == "text":
        argv += ["--pool", str(job_dir / "pool.json"), "--test_data", params["test_data"], "--test_alt", ""]
        argv += ["--model_type", params["model_type"]]
        if params.get("model_path"):
            argv += ["--model_path", params["model_path"]]
    return argv


def run_protocol(
    params: dict[str, Any], job_dir: Path, report: Callable[[dict[str, Any]], None]
) -> dict[str, Any]:
    """Job entry (``JobRunner`` kind ``protocol``): returns each column's average exact match."""
    from lora_retriever.cli.eval import main
    from lora_retriever.pool import AdapterPool

    if params["suite"] == "text":
        AdapterPool.from_configs(params["pools"]).save(job_dir / "pool.json")
    report({"stage": "protocol", "methods": params["methods"]})
    code = main(protocol_argv(params, job_dir))
    if code != 0:
        raise RuntimeError(f"lora-retriever-eval exited with code {code}; its message is in the log above")
    result = json.loads((job_dir / OUTPUT_DIR / "results.json").read_text())
    return {
        "averages": {label: score["average"] for label, score in result["scores"].items()},
        "retrieval": result["retrieval"],
    }
