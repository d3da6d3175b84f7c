"""Adapter cache benchmark: 1,000 small adapters on disk, a budget of 50 resident, requests through the engine.

What runs: the packaged SmolLM2-135M-Instruct (fp32, one torch thread) in a service ``Engine`` with
``--max_resident_adapters`` (default 50); ``--adapters`` (default 1,000) random PEFT adapters on disk (rank
``--r`` on ``--modules``: layer 0's q_proj and layer 15's v_proj by default), one pool entry each (one shared
retrieval key: retrieval is not measured here). ``--clients`` (16) closed-loop clients submit one-adapter
requests to the engine's real request path (``Engine.submit``: prefetch, the batching scheduler, the cache,
the mixture decode) with no HTTP in between; each request continues one short question by ``--max_tokens``.

Workloads (each on a fresh engine, so every one starts from a cold cache):

* ``zipf``: adapter popularity ~ 1 / rank (Zipf(1)): a hot head the cache can hold, a long tail it can't;
* ``uniform``: every adapter equally likely: the budget holds 5 % of the pool, so most requests miss.

Reported per workload: hit rate, hits / misses / evictions, adapter load latency p50 / p95 (the scheduler's
``AdapterCache.load_seconds``: a first load goes through ``SwiftModel.load_adapter``, a reload of an evicted
adapter installs weights prefetched when its request was queued), request latency p50 / p95, the most adapters
the model ever held (polled every millisecond, and from the cache's own gauges after every request) and the
most LoRA bytes resident, against the budget; and the answers of a sample of requests (the first
``--check`` of each workload) compared with an engine whose cache never evicts, each request sent alone.

    .venv/bin/python benchmarks/bench_cache.py                  # writes benchmarks/results/cache.{md,json}
    .venv/bin/python benchmarks/bench_cache.py --adapters 200 --requests 64   # a smoke run (~1 min)
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import logging
import math
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.service.factories writes the adapters

import torch  # noqa: E402
from bench_service import BASE, QUESTIONS  # noqa: E402  (one prompt set for the service benchmarks)
from bench_utils import (  # noqa: E402
    machine_info,
    machine_line,
    quantile,
    render_table,
    setup_logging,
    write_json,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORKLOADS = ("zipf", "uniform")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--adapters", type=int, default=1000, help="adapters written to disk")
    parser.add_argument("--budget", type=int, default=50, help="adapters resident at most (the cache budget)")
    parser.add_argument("--requests", type=int, default=512, help="requests per workload")
    parser.add_argument("--clients", type=int, default=16, help="concurrent closed-loop clients")
    parser.add_argument("--max_tokens", type=int, default=4, help="new tokens per request")
    parser.add_argument(
        "--check", type=int, default=48, help="requests per workload compared with no eviction"
    )
    parser.add_argument("--r", type=int, default=2, help="LoRA rank of the adapters")
    parser.add_argument(
        "--modules",
        nargs="+",
        default=["model.layers.0.self_attn.q_proj", "model.layers.15.self_attn.v_proj"],
        help="target modules of every adapter",
    )
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    parser.add_argument("--seed", type=int, default=0, help="seed of the request streams")
    parser.add_argument(
        "--out_dir", default=str(ROOT / "benchmarks/results"), help="where cache.{md,json} go"
    )
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    for name in ("adapters", "budget", "requests", "clients", "max_tokens", "r"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.check <= args.requests:
        parser.error(f"--check must be in 0..--requests ({args.requests}), got {args.check}")
    return args


# -- the pool on disk ----------------------------------------------------------------------------------------


def write_pool(model: Any, embedder: Any, root: Path, args: argparse.Namespace) -> tuple[Path, list[str]]:
    """``args.adapters`` random adapters under ``root`` and their ``pool.json`` (one shared key)."""
    from lora_retriever.embed_pool import embed_key
    from tests.service.factories import write_random_adapter

    embed_key(root / "keys" / "shared.npy", embedder, [("q0", QUESTIONS[0])])
    entries, names = [], []
    start = time.perf_counter()
    for j in range(args.adapters):
        name = f"a{j:04d}"
        write_random_adapter(model, root / name, args.modules, r=args.r, seed=1000 + j, std=0.3)
        entries.append({"lora_name": name, "lora_path": name, "embedding_path": "keys/shared.npy"})
        names.append(name)
    (root / "pool.json").write_text(json.dumps(entries))
    logging.getLogger(__name__).warning(
        "wrote %d adapters in %.1f s", args.adapters, time.perf_counter() - start
    )
    return root / "pool.json", names


def make_engine(base: Any, tokenizer: Any, embedder: Any, pool: Path, data_dir: Path, budget: int) -> Any:
    from lora_retriever.service.config import ServiceConfig
    from lora_retriever.service.engine import Engine

    config = ServiceConfig(
        pools=[str(pool)],
        data_dir=str(data_dir),
        max_resident_adapters=budget,
        adapter_memory_mb=1024.0,
        max_batch_size=16,
        max_wait_ms=5.0,
    )
    engine = Engine(config, copy.deepcopy(base), tokenizer, embedder=embedder)
    engine.start()
    return engine


# -- the workload ----------------------------------------------------------------------------------------------


def request_stream(kind: str, names: list[str], n: int, seed: int) -> list[str]:
    """The adapter of each of ``n`` requests: Zipf(1) popularity over a shuffled ranking, or uniform."""
    rng = random.Random(f"{kind}-{seed}")
    if kind == "uniform":
        return rng.choices(names, k=n)
    ranked = rng.sample(names, len(names))  # the hot adapters are not simply the first ones written
    return rng.choices(ranked, weights=[1.0 / (j + 1) for j in range(len(ranked))], k=n)


class ResidencyWatch:
    """Polls how many adapters the model holds (every ``interval`` s, in a thread) and keeps the maximum."""

    def __init__(self, model: Any, interval: float = 0.001):
        self.model = model
        self.interval = interval
        self.max_held = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="residency-watch", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.max_held = max(self.max_held, len(self.model.adapter_configs))
            time.sleep(self.interval)

    def __enter__(self) -> ResidencyWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


async def drive(
    engine: Any, requests: list[tuple[str, str]], clients: int, max_tokens: int
) -> list[dict[str, Any]]:
    """Send each ``(adapter, question)`` from ``clients`` closed-loop clients; per request its answer, latency
    and the cache's gauges right after it finished."""
    from lora_retriever.retriever import RetrievedAdapter
    from lora_retriever.service.scheduler import GenerationRequest

    loop = asyncio.get_running_loop()
    todo = list(enumerate(requests))
    results: list[dict[str, Any]] = [{} for _ in requests]
    gauges = engine.metrics

    async def client() -> None:
        while todo:
            i, (name, question) = todo.pop(0)
            request = GenerationRequest(
                prompt_ids=engine.encode_chat([{"role": "user", "content": question}]),
                adapters=[RetrievedAdapter(name, 1.0, math.nan)],
                max_tokens=max_tokens,
            )
            start = time.perf_counter()
            done = await engine.submit(request, loop).result()
            results[i] = {
                "adapter": name,
                "text": done.text,
                "latency": time.perf_counter() - start,
                "batch_size": done.batch_size,
                "resident": int(gauges.adapters_resident.value()),
                "resident_bytes": int(gauges.adapter_bytes.value()),
            }

    await asyncio.gather(*(client() for _ in range(clients)))
    return results


def bank_bytes(model: Any) -> int:
    """Bytes the model's LoRA banks have allocated (they grow geometrically and never shrink)."""
    return sum(
        (layer.lora_A_bank.numel() + layer.lora_B_bank.numel()) * layer.lora_A_bank.element_size()
        for _, layer in model.lora_layers()
    )


def run_workload(
    kind: str, names: list[str], setup: dict[str, Any], reference: Any, args: argparse.Namespace, tmp: Path
) -> dict[str, Any]:
    picks = request_stream(kind, names, args.requests, args.seed)
    requests = [(name, QUESTIONS[i % len(QUESTIONS)]) for i, name in enumerate(picks)]
    engine = make_engine(**setup, data_dir=tmp / f"data_{kind}", budget=args.budget)
    load_start = os.getloadavg()[0]
    try:
        with ResidencyWatch(engine.model) as watch:
            start = time.perf_counter()
            results = asyncio.run(drive(engine, requests, args.clients, args.max_tokens))
            seconds = time.perf_counter() - start
        stats = engine.cache.stats()
        banks = bank_bytes(engine.model)
        load_ms = [s * 1000 for s in engine.cache.load_seconds]
    finally:
        engine.stop()
    sample = requests[: args.check]
    alone = [asyncio.run(drive(reference, [one], 1, args.max_tokens))[0]["text"] for one in sample]
    equal = sum(r["text"] == a for r, a in zip(results[: args.check], alone))
    latencies = [r["latency"] for r in results]
    row = {
        "workload": kind,
        "load_avg": f"{load_start:.1f} -> {os.getloadavg()[0]:.1f}",
        "requests": len(picks),
        "distinct": len(set(picks)),
        "seconds": round(seconds, 1),
        "hit_rate": stats["hit_rate"],
        "hits": stats["hits"],
        "misses": stats["misses"],
        "evictions": stats["evictions"],
        "loads": stats["loads"],
        "load_ms_p50": quantile(load_ms, 0.5) if load_ms else None,
        "load_ms_p95": quantile(load_ms, 0.95) if load_ms else None,
        "latency_s_p50": quantile(latencies, 0.5),
        "latency_s_p95": quantile(latencies, 0.95),
        "batch_mean": statistics.mean(r["batch_size"] for r in results),
        "max_held_polled": watch.max_held,
        "max_resident_gauge": max(r["resident"] for r in results),
        "max_resident_mb": round(max(r["resident_bytes"] for r in results) / 2**20, 3),
        "bank_mb": round(banks / 2**20, 3),
        "answers_equal": f"{equal}/{len(sample)}",
    }
    print(render_table([row], list(row), markdown=False), flush=True)
    return row


def one_adapter_bytes(args: argparse.Namespace, model: Any) -> int:
    """LoRA bytes of one adapter in the model's banks (fp32): r * (in + out) * 4 per target module."""
    total = 0
    for module in args.modules:
        linear = model.get_submodule(module)
        total += args.r * (linear.in_features + linear.out_features) * 4
    return total


# -- report --------------------------------------------------------------------------------------------------


def report(
    machine: dict, args: argparse.Namespace, rows: list[dict], adapter_bytes: int, written_s: float
) -> str:
    budget_mb = args.budget * adapter_bytes / 2**20
    columns = [
        "workload", "load_avg", "requests", "distinct", "seconds", "hit_rate", "hits", "misses", "evictions",
        "load_ms_p50", "load_ms_p95", "latency_s_p50", "latency_s_p95", "batch_mean",
        "max_held_polled", "max_resident_gauge", "max_resident_mb", "bank_mb", "answers_equal",
    ]  # fmt: skip
    lines = [
        "# Adapter cache benchmark (`benchmarks/bench_cache.py`)",
        "",
        machine_line(machine),
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {machine.get('git_commit')}. "
        "The machine's 2 cores are **shared** with other jobs (`load_avg` = the 1-minute load average at the start "
        "and end of each workload): times are wall-clock and swing with that load; hit rates, counts and the "
        "budget checks do not.",
        "",
        f"Setup: packaged SmolLM2-135M-Instruct fp32, one torch thread, a service `Engine` (no HTTP); "
        f"{args.adapters} random PEFT adapters on disk (r={args.r} on {', '.join(args.modules)}; "
        f"{adapter_bytes / 1024:.1f} KiB of LoRA weights each in the model, written in {written_s:.0f} s); "
        f"cache budget **{args.budget} resident** (= {budget_mb:.2f} MB of adapter weights); {args.clients} "
        f"closed-loop clients, one adapter per request, max_tokens {args.max_tokens}, greedy; "
        f"{args.requests} requests per workload, each workload on a fresh engine (cold cache).",
        "",
        render_table(rows, columns),
        "",
        "Columns: `distinct` = adapters the workload used; `load_ms_*` = time to put one adapter into the model "
        "on the scheduler thread (first loads read and validate the files there; reloads install weights "
        "prefetched when the request was queued); `latency_s_*` = one request, queueing included; "
        "`max_held_polled` = the most adapters the model held, polled every millisecond; "
        "`max_resident_gauge` / `max_resident_mb` = the cache's gauges after each request; `bank_mb` = what "
        "the LoRA banks allocated at the end (they grow geometrically and never shrink, so it is the peak); "
        f"`answers_equal` = the first {args.check} requests' answers equal to the same request sent alone to "
        "an engine whose cache never evicts.",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    args = parse_args()
    setup_logging(args.verbose, quiet=not args.verbose)
    torch.set_num_threads(1)
    machine = machine_info()
    print(machine_line(machine), flush=True)

    from lora_retriever.embedders import EmbedderConfig, get_embedder
    from swift.llm import get_model_tokenizer

    base, tokenizer = get_model_tokenizer(BASE)
    embedder = get_embedder(EmbedderConfig())
    setup_logging(args.verbose, quiet=not args.verbose)  # again: swift's logger resets itself on first use
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench_cache_") as tmp:
        tmp_path = Path(tmp)
        start = time.perf_counter()
        pool, names = write_pool(base, embedder, tmp_path / "pool", args)
        written_s = time.perf_counter() - start
        setup = {"base": base, "tokenizer": tokenizer, "embedder": embedder, "pool": pool}
        reference = make_engine(**setup, data_dir=tmp_path / "data_ref", budget=args.adapters)
        try:
            rows = [run_workload(kind, names, setup, reference, args, tmp_path) for kind in args.workloads]
        finally:
            reference.stop()
    text = report(machine, args, rows, one_adapter_bytes(args, base), written_s)
    print(text)
    (out_dir / "cache.md").write_text(text)
    write_json(out_dir / "cache.json", {"machine": machine, "args": vars(args), "rows": rows})
    print(f"wrote {out_dir / 'cache.md'} and cache.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
