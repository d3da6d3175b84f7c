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
from typing import Any

__all__ = ["OUTPUT_DIR", "protocol_argv", "run_protocol"]

#: Where the job writes the command's outputs, inside its folder.
OUTPUT_DIR = "protocol"


def protocol_argv(params: dict[str, Any], job_dir: Path) -> list[str]:
    """The ``lora-retriever-eval`` arguments of a protocol job (``routes.protocol_params`` made ``params``)."""
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
