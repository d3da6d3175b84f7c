"""Load benchmark of the LoraRetriever service: dynamic batching over real HTTP.

The server is the real command (``python -m lora_retriever.service --threads 1``: one torch thread) in its own
process on a free loopback port; the load client is plain asyncio + httpx in this process.

16 requests, each with its own mixture (``auto`` top-3 and top-1, single adapters, explicit weighted mixtures,
the base model), greedy. Per round, the same 16 requests are sent one after another (sequential) and by 16
concurrent clients; phases interleave (sequential, concurrent, sequential, concurrent, ...) so both see the
same machine load, and the load average is recorded at the start of every phase. Reported per workload:
throughput (requests/s, tokens/s) of each phase, their ratio per round and its **median** (target >= 3),
the same ratio in the server's own CPU seconds (its process's user + system time: what the server did, not
how long other jobs on the shared cores kept it waiting), p50/p95 latency over all rounds, the batch sizes
the server formed, and whether every concurrent answer equals its sequential answer (greedy, same mixture).

Workloads: ``short`` = one-line questions, max_tokens 32 (prompt processing dominates); ``long`` = requests
for a paragraph, max_tokens 64 (decoding dominates).

Pool: the demo pool if ``make demo`` built it and ``--pool`` is not given; otherwise a synthetic pool of 8
random adapters with retrieval keys (tests/service/factories.py) in a temporary folder. The adapter cache
with 1,000 adapters on disk is ``benchmarks/bench_cache.py``.

    .venv/bin/python benchmarks/bench_service.py                 # writes benchmarks/results/service_load.{md,json}
    .venv/bin/python benchmarks/bench_service.py --workloads long --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.service.factories builds the synthetic pools

import torch  # noqa: E402
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

BASE = "smollm2-135m-instruct"
QUESTIONS = [
    "What is the capital of Peru?",
    "What is 23 + 19?",
    "Is the word 'lovely' positive or negative?",
    "Translate 'house' into French.",
    "What is the capital of Norway?",
    "Compute 57 + 36.",
    "Is 'dreadful' a positive word?",
    "Translate 'dog' into French.",
    "Which city is the capital of Chile?",
    "What is 14 + 88?",
    "Rate the sentiment of 'cheerful'.",
    "Translate 'water' into French.",
    "Name the capital of Egypt.",
    "Add 45 and 27.",
    "Is 'awful' negative?",
    "Translate 'bread' into French.",
]
DESCRIBE = [
    "Describe the city of Lima in a few sentences.",
    "Explain step by step how to add 47 and 38.",
    "Write a short paragraph about a sunny day at the beach.",
    "Describe how to make a cup of tea.",
    "Tell a short story about a lost dog.",
    "Explain why the sky is blue.",
    "Describe your favourite season and why.",
    "Write a short letter to a friend about a trip to Paris.",
    "Explain how a bicycle works.",
    "Describe a busy market in the morning.",
    "Write a few sentences about the ocean.",
    "Explain how plants grow from seeds.",
    "Describe the capital of Norway to a tourist.",
    "Write a short poem about the moon.",
    "Explain what a computer does.",
    "Describe a walk through a forest.",
]
#: name -> (prompts, max_tokens): short answers (prefill-heavy) and long answers (decode-heavy).
WORKLOADS = {"short": (QUESTIONS, 32), "long": (DESCRIBE, 64)}
SYNTHETIC_TASKS = {
    "capitals": ["What is the capital of France?", "Name the capital city of Brazil.", "Capital of Kenya?"],
    "arithmetic": ["What is 12 + 7?", "Compute 45 + 38.", "Add 9 and 16."],
    "sentiment": [
        "Is 'wonderful' positive or negative?",
        "Rate the sentiment of 'terrible'.",
        "Is 'gloomy' bad?",
    ],
    "translation": ["Translate 'cat' into French.", "Translate 'tree' into French.", "French for 'car'?"],
    "colors": ["What color is the sky?", "Mix blue and yellow.", "Name a warm colour."],
    "animals": ["Name a large animal.", "Which animal barks?", "What do cows eat?"],
    "units": ["How many grams in a kilogram?", "Convert 3 km to metres.", "How many minutes in an hour?"],
    "dates": ["What day comes after Monday?", "How many days in June?", "Which month follows March?"],
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--pool", help="pool config to serve (default: the demo pool if built, else synthetic)"
    )
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (and requests per round)")
    parser.add_argument(
        "--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS), help="prompt sets to run"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds of sequential + concurrent per workload (median of them)",
    )
    parser.add_argument("--max_wait_ms", type=float, default=10.0, help="the server's batching wait")
    parser.add_argument(
        "--max_prepare_wait_ms",
        type=float,
        default=500.0,
        help="the server's wait for requests still in preparation",
    )
    parser.add_argument(
        "--out_dir", default=str(ROOT / "benchmarks/results"), help="where service_load.{md,json} go"
    )
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    if args.rounds < 1 or args.clients < 1:
        parser.error(f"--rounds and --clients must be >= 1, got {args.rounds} and {args.clients}")
    return args


# -- the server ----------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m lora_retriever.service`` in a child process, one torch thread, on a free loopback port."""

    def __init__(self, pool: Path, data_dir: Path, *extra: str, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [
            sys.executable, "-m", "lora_retriever.service", "--pool", str(pool), "--data_dir", str(data_dir),
            "--port", str(self.port), "--threads", "1", "--quiet", *extra,
        ]  # fmt: skip
        self.log = log.open("w")
        self.process = subprocess.Popen(command, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)

    def wait(self, timeout: float = 300) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}; see {self.log.name}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"the server did not answer /health within {timeout} s; see {self.log.name}")

    def cpu_seconds(self) -> float:
        """User + system CPU time the server process has used so far (Linux ``/proc``), all its threads."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


# -- pools ---------------------------------------------------------------------------------------------------


def synthetic_pool(root: Path) -> Path:
    from lora_retriever.embedders import EmbedderConfig, get_embedder
    from swift.llm import get_model_tokenizer
    from tests.service.factories import build_pool

    model, _ = get_model_tokenizer(BASE)
    return build_pool(model, root, get_embedder(EmbedderConfig()), SYNTHETIC_TASKS, std=0.05)


# -- the client ----------------------------------------------------------------------------------------------


def mixture(i: int, adapters: list[str]) -> dict[str, Any]:
    kinds = [
        {"model": "auto"},
        {"model": "auto", "top_k": 1},
        {"model": adapters[i % len(adapters)]},
        {
            "model": "mixture",
            "adapters": [
                {"name": adapters[i % len(adapters)], "weight": 0.6},
                {"name": adapters[(i + 1) % len(adapters)], "weight": 0.4},
            ],
        },
        {"model": BASE},
    ]
    return kinds[i % len(kinds)]


async def send(client: Any, body: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    start = time.perf_counter()
    response = await client.post("/v1/chat/completions", json=body)
    latency = time.perf_counter() - start
    if response.status_code != 200:
        raise RuntimeError(f"{response.status_code}: {response.text}")
    return latency, response.json()


async def sequential(url: str, bodies: list[dict[str, Any]]) -> tuple[float, list[tuple[float, dict]]]:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=1800) as client:
        start = time.perf_counter()
        results = [await send(client, body) for body in bodies]
        return time.perf_counter() - start, results


async def concurrent(url: str, bodies: list[dict[str, Any]]) -> tuple[float, list[tuple[float, dict]]]:
    import httpx

    limits = httpx.Limits(max_connections=len(bodies))
    async with httpx.AsyncClient(base_url=url, timeout=1800, limits=limits) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(send(client, body) for body in bodies))
        return time.perf_counter() - start, list(results)


def answer(result: dict[str, Any]) -> str:
    return result["choices"][0]["message"]["content"]


def scheduler_totals(url: str) -> tuple[float, int]:
    """``(seconds, batches)`` the server's scheduler has spent in ``generate`` so far (from /metrics)."""
    import httpx

    values = {}
    for line in httpx.get(f"{url}/metrics", timeout=60).text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("lora_retriever_batch_seconds_sum", "lora_retriever_batch_seconds_count"):
            values[name] = float(value)
    return values["lora_retriever_batch_seconds_sum"], int(values["lora_retriever_batch_seconds_count"])


def run_phase(server: Server, kind: str, bodies: list[dict[str, Any]]) -> dict[str, Any]:
    """One phase (``sequential`` or ``concurrent``): wall and server CPU seconds, the time the scheduler spent
    in ``generate`` and its number of batches, and every result."""
    load = os.getloadavg()[0]
    cpu, (busy, batches) = server.cpu_seconds(), scheduler_totals(server.url)
    seconds, results = asyncio.run((sequential if kind == "sequential" else concurrent)(server.url, bodies))
    busy_after, batches_after = scheduler_totals(server.url)
    return {
        "seconds": seconds,
        "cpu": server.cpu_seconds() - cpu,
        "generate_s": busy_after - busy,
        "batches": batches_after - batches,
        "load": load,
        "results": results,
    }


def run_batching(
    server: Server, adapters: list[str], workload: str, args: argparse.Namespace
) -> dict[str, Any]:
    prompts, max_tokens = WORKLOADS[workload]
    bodies = [
        {"messages": [{"role": "user", "content": prompts[i % len(prompts)]}], "max_tokens": max_tokens}
        | mixture(i, adapters)
        for i in range(args.clients)
    ]
    asyncio.run(concurrent(server.url, bodies[:4]))  # warm-up: first-call costs out of the timings
    rows, seq_lat, conc_lat, mismatches, batch_sizes = [], [], [], 0, []
    for r in range(args.rounds):
        seq = run_phase(server, "sequential", bodies)
        conc = run_phase(server, "concurrent", bodies)
        tokens = sum(res["usage"]["completion_tokens"] for _, res in seq["results"])
        seq_lat += [lat for lat, _ in seq["results"]]
        conc_lat += [lat for lat, _ in conc["results"]]
        mismatches += sum(answer(a) != answer(b) for (_, a), (_, b) in zip(seq["results"], conc["results"]))
        sizes = [res["lora_retriever"]["batch_size"] for _, res in conc["results"]]
        batch_sizes += sizes
        rows.append(
            {
                "workload": workload,
                "round": r + 1,
                "load_avg_seq/conc": f"{seq['load']:.1f} / {conc['load']:.1f}",
                "new_tokens_mean": tokens / len(bodies),
                "sequential_s": seq["seconds"],
                "concurrent_s": conc["seconds"],
                "seq_tok_per_s": tokens / seq["seconds"],
                "conc_tok_per_s": tokens / conc["seconds"],
                "batch_sizes": "+".join(str(n) for n in batch_partition(sizes)),
                "generate_share_seq/conc": f"{seq['generate_s'] / seq['seconds']:.0%} / "
                f"{conc['generate_s'] / conc['seconds']:.0%}",
                "ratio": seq["seconds"] / conc["seconds"],
                "server_cpu_seq/conc_s": f"{seq['cpu']:.1f} / {conc['cpu']:.1f}",
                "cpu_ratio": seq["cpu"] / conc["cpu"] if conc["cpu"] else float("nan"),
            }
        )
        print(render_table(rows[-1:], list(rows[-1]), markdown=False), flush=True)
    return {
        "workload": workload,
        "max_tokens": max_tokens,
        "rows": rows,
        "ratio_median": statistics.median(r["ratio"] for r in rows),
        "cpu_ratio_median": statistics.median(r["cpu_ratio"] for r in rows),
        "latency": {
            "sequential_p50_s": quantile(seq_lat, 0.5),
            "sequential_p95_s": quantile(seq_lat, 0.95),
            "concurrent_p50_s": quantile(conc_lat, 0.5),
            "concurrent_p95_s": quantile(conc_lat, 0.95),
        },
        "mismatches": mismatches,
        "compared": len(bodies) * args.rounds,
        "batch_size_mean": statistics.mean(batch_sizes),
        "batch_size_max": max(batch_sizes),
    }


def batch_partition(sizes: list[int]) -> list[int]:
    """The batches one concurrent phase formed, from each request's ``batch_size`` (a batch of n reports n,
    n times): e.g. ``[16]`` or ``[3, 13]``."""
    counts: dict[int, int] = {}
    for n in sizes:
        counts[n] = counts.get(n, 0) + 1
    return [n for n in sorted(counts) for _ in range(max(1, round(counts[n] / n)))]


# -- report --------------------------------------------------------------------------------------------------


def report(machine: dict, args: argparse.Namespace, pool_kind: str, batching: list[dict]) -> str:
    lines = [
        "# Service load benchmark (`benchmarks/bench_service.py`)",
        "",
        machine_line(machine),
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {machine.get('git_commit')}. "
        "**The machine is shared** with other jobs (2 cores; the load average of every phase is in the table): "
        "absolute times swing several-fold between runs; the ratios compare phases measured back to back, and "
        "`cpu_ratio` compares the server's own CPU seconds, which other jobs do not inflate.",
        "",
        f"Server: `python -m lora_retriever.service --threads 1 --max_wait_ms {args.max_wait_ms:g} "
        f"--max_prepare_wait_ms {args.max_prepare_wait_ms:g}` (max batch 16) "
        f"in its own process on loopback, packaged SmolLM2-135M-Instruct fp32; pool: {pool_kind}. Client: asyncio "
        f"+ httpx, {args.clients} requests per phase, each with its own mixture (auto top-3 / top-1, one adapter, "
        f"a 2-adapter weighted mixture, the base model), greedy; {args.rounds} rounds per workload, phases "
        "interleaved (sequential, concurrent, sequential, ...). Workloads: `short` = one-line questions, "
        "max_tokens 32 (prompt processing dominates); `long` = requests for a paragraph, max_tokens 64 "
        "(decoding dominates).",
        "",
        render_table([row for b in batching for row in b["rows"]], list(batching[0]["rows"][0])),
        "",
        "| workload | ratio (median) | server CPU ratio (median) | sequential p50 / p95 (s) | concurrent p50 / p95 "
        "(s) | batch size mean / max | concurrent answers == sequential |",
        "|---|---|---|---|---|---|---|",
    ]
    for b in batching:
        lat = b["latency"]
        lines.append(
            f"| {b['workload']} (max_tokens {b['max_tokens']}) | **{b['ratio_median']:.2f}x** | "
            f"{b['cpu_ratio_median']:.2f}x | "
            f"{lat['sequential_p50_s']:.2f} / {lat['sequential_p95_s']:.2f} | "
            f"{lat['concurrent_p50_s']:.2f} / {lat['concurrent_p95_s']:.2f} | "
            f"{b['batch_size_mean']:.1f} / {b['batch_size_max']} | {b['compared'] - b['mismatches']}/{b['compared']} |"
        )
    lines += [
        "",
        "Target (issue 11): >= 3x. `batch_sizes` = the batches each concurrent phase formed; `generate_share` = the "
        "share of the phase's wall time the server's scheduler spent inside `generate` (from its /metrics): near "
        "100 % the scheduler is the bottleneck, lower the requests wait elsewhere (HTTP, tokenising, retrieval, "
        "the batching window). Batching is per "
        "window (requests that arrive together decode together; a row that finishes early waits for the "
        "batch's longest), so the gain comes from the decode steps, which read the weights once for the whole "
        "batch; prompt processing costs the same FLOPs batched or not.",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    args = parse_args()
    setup_logging(args.verbose, quiet=not args.verbose)
    torch.set_num_threads(1)
    machine = machine_info()
    print(machine_line(machine), flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_service_") as tmp:
        tmp_path = Path(tmp)
        demo = ROOT / "data/demo/pool/pool.json"
        if args.pool:
            pool, pool_kind = Path(args.pool), f"`{args.pool}`"
        elif demo.is_file():
            pool, pool_kind = demo, "the demo pool (`make demo`)"
        else:
            pool = synthetic_pool(tmp_path / "pool")
            pool_kind = (
                f"{len(SYNTHETIC_TASKS)} random rank-4 q/v adapters with keys (the demo pool is not built)"
            )
        adapters = [e["lora_name"] for e in json.loads(pool.read_text())]
        waits = (
            "--max_wait_ms",
            str(args.max_wait_ms),
            "--max_prepare_wait_ms",
            str(args.max_prepare_wait_ms),
        )
        server = Server(pool, tmp_path / "data", *waits, log=tmp_path / "server.log")
        try:
            server.wait()
            batching = [run_batching(server, adapters, w, args) for w in args.workloads]
        finally:
            server.stop()
    text = report(machine, args, pool_kind, batching)
    print(text)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "service_load.md").write_text(text)
    write_json(out_dir / "service_load.json", {"machine": machine, "args": vars(args), "workloads": batching})
    print(f"wrote {out_dir / 'service_load.md'} and service_load.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
