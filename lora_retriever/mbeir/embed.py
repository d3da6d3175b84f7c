"""UniIR's first step: embed a split's queries, its local pools and its global pool with one retriever.

    python -m lora_retriever.mbeir embed --data_root D --checkpoint runs/sf --out_dir runs/sf/embeddings [--split test]

Layout of ``out_dir`` (one folder per embedded file)::

    <split>/queries/<task>/      the task's queries (with its instruction when the retriever was trained so)
    <split>/local/<task>/        the task's local pool
    <split>/global/union/        the split's global pool
        shard_00000.npy          [<= shard_size, dim] float32 unit rows, in file order
        shard_00000.json         what the shard holds: encoder, source file hash, range, ids hash
        embeddings.json          written last: the ids in order, the encoder, the shards (the folder is complete)

Resumable: shards are written as they are made (each atomically, its ``.json`` after its ``.npy``), and a rerun
skips every shard whose ``.json`` matches the encoder, the source file's hash, the range and the ids; an
interrupted run loses at most the shard it was making. The data are validated before anything is embedded.

The encoder identity (:class:`~lora_retriever.embedders.meta.EmbeddingMeta`) is ``mbeir-<fusion>-<digest>``
(a hash of the checkpoint's config and weights): indexes and queries made by different checkpoints never mix.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lora_retriever.embedders.meta import EmbeddingMeta
from lora_retriever.mbeir.data import MBeirSplit, load_split
from lora_retriever.mbeir.formats import MBeirCandidate, MBeirQuery
from swift.utils import get_logger
from swift.utils.files import atomic_write

logger = get_logger(__name__)

__all__ = [
    "INSTRUCT_MODES",
    "EmbedConfig",
    "Embeddings",
    "embed_split",
    "encoder_meta",
    "load_embeddings",
]

INSTRUCT_MODES = ("auto", "on", "off")
SUMMARY_NAME = "embeddings.json"
RUN_NAME = (
    "embed_run.json"  # <split>/embed_run.json: the checkpoint, its training record, the last run's stats
)
INSTRUCTED = "uniir task prompts"  # EmbeddingMeta.instruction of queries embedded with their prompts


@dataclass
class EmbedConfig:
    """What :func:`embed_split` embeds (each field is a flag of ``python -m lora_retriever.mbeir embed``)."""

    data_root: str = field(metadata={"help": "M-BEIR folder (UniIR's layout)"})
    checkpoint: str = field(metadata={"help": "retriever checkpoint folder ('train' writes one)"})
    out_dir: str = field(metadata={"help": "embeddings folder (<split>/queries|local|global/<name>/ inside)"})
    split: str = field(default="test", metadata={"help": "split to embed"})
    instruct: str = field(
        default="auto",
        metadata={
            "help": "prefix query texts with task prompts: auto (as the retriever was trained), on, off",
            "choices": INSTRUCT_MODES,
        },
    )
    shard_size: int = field(default=256, metadata={"help": "items per shard file (the unit of resuming)"})
    batch_size: int = field(default=32, metadata={"help": "items per forward pass"})
    progress: bool = field(default=True, metadata={"help": "progress bar", "cli": False})

    def __post_init__(self) -> None:
        if self.instruct not in INSTRUCT_MODES:
            raise ValueError(f"instruct must be one of {INSTRUCT_MODES}, got {self.instruct!r}")
        for name in ("shard_size", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")


@dataclass
class Embeddings:
    """One embedded file: ``vectors [n, dim]`` (unit rows), its ``ids`` in order and the encoder ``meta``."""

    ids: list[str]
    vectors: np.ndarray
    meta: EmbeddingMeta
    source: str


def encoder_meta(checkpoint: str | Path, role: str, instruct: bool = False) -> EmbeddingMeta:
    """The identity of a checkpoint's vectors: queries carry their instruction mode, candidates none (their
    text never has a prompt, so one candidate index serves both modes)."""
    from lora_retriever.mbeir.embedder import retriever_id
    from lora_retriever.mbeir.models import RetrieverConfig, read_checkpoint_meta, text_width

    config = RetrieverConfig.from_dict(read_checkpoint_meta(checkpoint)["config"])
    instruction = None if role == "document" else (INSTRUCTED if instruct else "")
    return EmbeddingMeta(
        model_id=retriever_id(checkpoint),
        dim=text_width(config),
        instruction=instruction,
        backend=f"mbeir-{config.fusion}",
    )


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _ids_hash(ids: list[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]


def _save_npy(path: Path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array, dtype=np.float32))
    atomic_write(path, buffer.getvalue())


class _Job:
    """One file to embed: its items (text, image path) and where the shards go."""

    def __init__(
        self,
        folder: Path,
        source: Path,
        ids: list[str],
        items: list[tuple[str | None, str | None]],
        meta: EmbeddingMeta,
    ):
        self.folder, self.source, self.ids, self.items, self.meta = folder, source, ids, items, meta
        self.source_sha = _sha256(source)

    def shard_record(self, start: int, end: int) -> dict[str, Any]:
        return {
            "encoder": self.meta.to_dict(),
            "source": self.source.name,
            "source_sha256": self.source_sha,
            "start": start,
            "end": end,
            "ids_sha256": _ids_hash(self.ids[start:end]),
        }

    def shard_done(self, index: int, start: int, end: int) -> bool:
        record_file, array_file = (
            self.folder / f"shard_{index:05d}.json",
            self.folder / f"shard_{index:05d}.npy",
        )
        if not (record_file.is_file() and array_file.is_file()):
            return False
        try:
            if json.loads(record_file.read_text(encoding="utf-8")) != self.shard_record(start, end):
                return False
            shape = np.load(array_file, mmap_mode="r").shape
        except (OSError, ValueError):
            return False
        return shape == (end - start, self.meta.dim)


def _query_items(data: MBeirSplit, task: str, instruct: bool) -> list[tuple[str | None, str | None]]:
    spec = data.tasks[task]
    return [
        (data.query_text(q, spec.cand_modality, instruct), q.query_img_path or None) for q in spec.queries
    ]


def _pool_items(pool: list[MBeirCandidate]) -> list[tuple[str | None, str | None]]:
    return [(c.txt or None, c.img_path or None) for c in pool]


def _jobs(config: EmbedConfig, data: MBeirSplit, instruct: bool) -> list[_Job]:
    root = Path(config.out_dir).expanduser() / config.split
    q_meta = encoder_meta(config.checkpoint, "query", instruct)
    d_meta = encoder_meta(config.checkpoint, "document")
    jobs = []
    for name, task in data.tasks.items():
        queries: list[MBeirQuery] = task.queries
        jobs.append(
            _Job(
                root / "queries" / name,
                task.queries_file,
                [q.qid for q in queries],
                _query_items(data, name, instruct),
                q_meta,
            )
        )
        jobs.append(
            _Job(
                root / "local" / name,
                task.pool_file,
                [c.did for c in task.pool],
                _pool_items(task.pool),
                d_meta,
            )
        )
    pool = data.global_pool
    jobs.append(
        _Job(
            root / "global" / "union", data.global_pool_file, [c.did for c in pool], _pool_items(pool), d_meta
        )
    )
    return jobs


def embed_split(config: EmbedConfig) -> dict[str, Any]:
    """Embed a split (layout and resuming: the module docstring).

    Returns:
        ``{"computed_shards", "skipped_shards", "items_embedded", "seconds", "folders"}``.

    Raises:
        FileNotFoundError / MBeirFormatError / ValueError: bad data or checkpoint (checked before the model loads).
    """
    import torch
    from tqdm.auto import tqdm

    from lora_retriever.mbeir.models import load_retriever, read_checkpoint_meta

    data = load_split(config.data_root, config.split)
    trained = read_checkpoint_meta(config.checkpoint).get("training", {})
    instruct = trained.get("instruct", True) if config.instruct == "auto" else config.instruct == "on"
    jobs = _jobs(config, data, instruct)
    todo = []
    skipped = 0
    for job in jobs:
        job.folder.mkdir(parents=True, exist_ok=True)
        for index, start in enumerate(range(0, len(job.ids), config.shard_size)):
            end = min(start + config.shard_size, len(job.ids))
            if job.shard_done(index, start, end):
                skipped += 1
            else:
                todo.append((job, index, start, end))
    started, cpu_started = time.perf_counter(), time.process_time()
    model = load_retriever(config.checkpoint) if todo else None
    images: dict[str, Any] = {}
    bar = tqdm(
        total=sum(e - s for _, _, s, e in todo), desc="embed", unit="item", disable=not config.progress
    )
    for job, index, start, end in todo:
        parts = []
        for b in range(start, end, config.batch_size):
            batch = job.items[b : min(b + config.batch_size, end)]
            for _, path in batch:
                if path and path not in images:
                    images[path] = data.image(path)
            with torch.inference_mode():
                parts.append(
                    model.embed_items(
                        [t for t, _ in batch], [images[p] if p else None for _, p in batch]
                    ).numpy()
                )
            bar.update(len(batch))
        _save_npy(job.folder / f"shard_{index:05d}.npy", np.concatenate(parts))
        atomic_write(
            job.folder / f"shard_{index:05d}.json", json.dumps(job.shard_record(start, end), indent=1)
        )
    bar.close()
    for job in jobs:
        n_shards = -(-len(job.ids) // config.shard_size)
        for stale in sorted(job.folder.glob("shard_*.npy"))[n_shards:]:  # from an earlier, smaller shard_size
            stale.unlink()
            stale.with_suffix(".json").unlink(missing_ok=True)
        summary = {
            "encoder": job.meta.to_dict(),
            "source": str(job.source),
            "source_sha256": job.source_sha,
            "shard_size": config.shard_size,
            "n": len(job.ids),
            "ids": job.ids,
        }
        atomic_write(job.folder / SUMMARY_NAME, json.dumps(summary, indent=1))
    seconds = time.perf_counter() - started
    logger.info("embedded %d shards (%d skipped) in %.1f s", len(todo), skipped, seconds)
    stats = {
        "computed_shards": len(todo),
        "skipped_shards": skipped,
        "items_embedded": sum(e - s for _, _, s, e in todo),
        "seconds": round(seconds, 1),
        "cpu_seconds": round(time.process_time() - cpu_started, 1),
        "threads": torch.get_num_threads(),
    }
    run = {
        "checkpoint": str(Path(config.checkpoint).expanduser()),
        "instruct": instruct,
        "training": trained,
        "embed": stats,
    }
    atomic_write(Path(config.out_dir).expanduser() / config.split / RUN_NAME, json.dumps(run, indent=1))
    return {**stats, "folders": [str(job.folder) for job in jobs]}


def load_embeddings(folder: str | Path) -> Embeddings:
    """One embedded file's vectors, ids and encoder.

    Raises:
        FileNotFoundError: the folder is not a complete embedding (no ``embeddings.json``: rerun ``embed``).
        ValueError: shards that disagree with the summary.
    """
    folder = Path(folder).expanduser()
    summary_file = folder / SUMMARY_NAME
    if not summary_file.is_file():
        raise FileNotFoundError(
            f"{str(folder)!r} holds no complete embedding (no {SUMMARY_NAME}); run 'embed' (it resumes)"
        )
    summary = json.loads(summary_file.read_text(encoding="utf-8"))
    n, size = summary["n"], summary["shard_size"]
    vectors = (
        np.concatenate([np.load(folder / f"shard_{i:05d}.npy") for i in range(-(-n // size))])
        if n
        else np.zeros((0, 0))
    )
    if vectors.shape[0] != n or len(summary["ids"]) != n:
        raise ValueError(f"{folder}: {vectors.shape[0]} vectors for {n} ids; rerun 'embed'")
    return Embeddings(
        summary["ids"],
        vectors.astype(np.float32),
        EmbeddingMeta.from_dict(summary["encoder"]),
        summary["source"],
    )
