"""Part B of ``bench_retrieval``: fusing k SmolLM2-135M-sized LoRA adapters with ``lora_retriever.fusion.fuse``.

The sources are random in-memory ``LoraWeights`` (r on all 7 linear projections of all 30 layers). Every method
is timed round-robin with a dense baseline (``Σ w s B A`` as dense matrices); the PEFT-style dense SVD baseline
(dense ``ΔW`` + ``torch.linalg.svd``, ~0.5 s per layer here) runs alone, optionally on fewer layers and scaled.
Then each fused adapter is saved with ``FusedAdapter.save`` (wall clock: it is file I/O).
"""

from __future__ import annotations

import logging
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from bench_utils import TimingConfig, block, measure_interleaved

from lora_retriever.fusion import FusedAdapter, LoraModuleWeights, LoraWeights, fuse

logger = logging.getLogger("bench_retrieval")

# SmolLM2-135M linear layers: name -> (in_features, out_features); 30 decoder layers.
SMOLLM2_LAYERS = 30
SMOLLM2_SHAPES: dict[str, tuple[int, int]] = {
    "self_attn.q_proj": (576, 576),
    "self_attn.k_proj": (576, 192),
    "self_attn.v_proj": (576, 192),
    "self_attn.o_proj": (576, 576),
    "mlp.gate_proj": (576, 1536),
    "mlp.up_proj": (576, 1536),
    "mlp.down_proj": (1536, 576),
}

FUSION_COLUMNS = [
    "method", "options", "fuse_ms", "vs_cat", "rank", "max_trunc_err", "save_ms", "file_mb", "note",
]  # fmt: skip


def random_adapter(
    name: str, r: int, lora_alpha: float, layers: int, generator: torch.Generator
) -> LoraWeights:
    """SmolLM2-135M-sized LoRA: r on all 7 linear projections of ``layers`` layers; A ~ kaiming-like, B small."""
    modules = {}
    for layer in range(layers):
        for proj, (fan_in, fan_out) in SMOLLM2_SHAPES.items():
            lora_A = torch.randn(r, fan_in, generator=generator) / fan_in**0.5
            lora_B = 0.01 * torch.randn(fan_out, r, generator=generator)
            modules[f"model.layers.{layer}.{proj}"] = LoraModuleWeights(lora_A, lora_B, lora_alpha / r)
    return LoraWeights(name, modules)


def dense_sum(sources: Sequence[LoraWeights], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """Baseline: the dense ``ΔW = Σ_j w_j s_j B_j A_j`` per module (what a merge into the base weights forms)."""
    return {m: sum(w * s.modules[m].delta() for w, s in zip(weights, sources)) for m in sources[0].modules}


def dense_svd(sources: Sequence[LoraWeights], weights: Sequence[float], rank: int) -> int:
    """Baseline: PEFT's ``combination_type="svd"`` route — dense ``ΔW``, full ``torch.linalg.svd``, truncate."""
    for m in sources[0].modules:
        delta = sum(w * s.modules[m].delta() for w, s in zip(weights, sources))
        u, sigma, vh = torch.linalg.svd(delta, full_matrices=False)
        _ = (u[:, :rank] * sigma[:rank], vh[:rank])
    return len(sources[0].modules)


def run_fusion(
    cfg: dict[str, Any], seed: int = 0, clock: str = "cpu", tmp_dir: Path | None = None
) -> list[dict[str, Any]]:
    """Part B: ``fuse`` per method and the dense baselines (interleaved), then ``save`` of each result.

    ``tmp_dir``: parent of the temporary directory the fused adapters are saved to (default: the system's).
    """
    timing = TimingConfig(cfg["repeats"], 1, 0.0, clock=clock)
    generator = torch.Generator().manual_seed(seed)
    sources = [
        random_adapter(f"src{j}", cfg["r"], cfg["lora_alpha"], cfg["layers"], generator)
        for j in range(cfg["k"])
    ]
    weights = [1.0 / cfg["k"]] * cfg["k"]
    d = cfg["density"]
    methods: list[tuple[str, str, dict[str, Any]]] = [
        ("cat", "cat", {}),
        ("linear", "linear", {}),
        ("svd", "svd", {}),
        ("svd_r8", "svd", {"svd_rank": 8}),
        ("ties", "ties", {"density": d}),
        ("dare_linear", "dare_linear", {"density": d}),
        ("dare_ties", "dare_ties", {"density": d}),
    ]
    samplers = {
        label: block(lambda method=method, options=options: fuse(sources, weights, method, **options), timing)
        for label, method, options in methods
    }
    samplers["dense_sum (baseline)"] = block(lambda: dense_sum(sources, weights), timing)
    t0 = time.perf_counter()
    times = measure_interleaved(samplers, timing)
    logger.info("fusion methods timed in %.1f s", time.perf_counter() - t0)

    # PEFT-style dense SVD: ~0.5 s per layer here, so it runs alone, on `dense_svd_layers` layers, scaled to all.
    n_layers = cfg["dense_svd_layers"]
    subset = [
        LoraWeights(s.name, {m: w for m, w in s.modules.items() if int(m.split(".")[2]) < n_layers})
        for s in sources
    ]
    svd_time = measure_interleaved(
        {"dense": block(lambda: dense_svd(subset, weights, 8), timing)},
        TimingConfig(max(1, cfg["repeats"] // 2), 1, 0.0, clock=clock),
    )["dense"] * (cfg["layers"] / n_layers)

    rows = []
    parent = tempfile.mkdtemp(prefix="bench_retrieval_save_", dir=tmp_dir)
    try:
        for label, method, options in methods:
            fused: FusedAdapter = fuse(sources, weights, method, **options)
            out = Path(parent) / label
            saves = []
            for _ in range(cfg["repeats"] + 1):  # first save is the warm-up
                t0 = time.perf_counter()  # wall: writing files is I/O
                fused.save(out)
                saves.append(time.perf_counter() - t0)
            ranks = set(fused.ranks.values())
            rows.append(
                {
                    "method": label,
                    "options": options or "",
                    "fuse_ms": times[label] * 1e3,
                    "vs_cat": times[label] / times["cat"],
                    "rank": "/".join(map(str, sorted(ranks))),
                    "max_trunc_err": max(fused.truncation_error.values()) if fused.truncation_error else None,
                    "save_ms": statistics.median(saves[1:]) * 1e3,
                    "file_mb": sum(f.stat().st_size for f in out.iterdir()) / 2**20,
                    "note": "",
                }
            )
    finally:
        shutil.rmtree(parent, ignore_errors=True)
    rows.append(
        {
            "method": "dense_sum (baseline)",
            "options": "",
            "fuse_ms": times["dense_sum (baseline)"] * 1e3,
            "vs_cat": times["dense_sum (baseline)"] / times["cat"],
            "rank": "dense",
            "note": "Σ w s B A as dense [out, in] per module",
        }
    )
    rows.append(
        {
            "method": "dense_svd (PEFT-style baseline)",
            "options": {"svd_rank": 8},
            "fuse_ms": svd_time * 1e3,
            "vs_cat": svd_time / times["cat"],
            "rank": "8",
            "note": f"dense ΔW + torch.linalg.svd; measured on {n_layers} layer(s), scaled to {cfg['layers']}",
        }
    )
    return rows
