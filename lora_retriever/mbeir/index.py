"""UniIR's second step: a FAISS index over an embedded candidate pool, saved with the encoder that made it;
sharded for pools that do not fit in memory.

    python -m lora_retriever.mbeir index --embeddings runs/sf/embeddings/test --kind flat|ivf|hnsw [--shard_size N]

Every pool folder under ``--embeddings`` (``local/<task>/``, ``global/union/``) gets ``index-<kind>/``::

    index.json          kind, options, the encoder (EmbeddingMeta), the candidate ids, the shards' ranges
    shard_00000.faiss   a FAISS index over candidates [start, end) (faiss.write_index)

A search reads one shard at a time (so memory holds one shard), takes each shard's top k and merges them into
the global top k; with ``flat`` shards that is exactly the unsharded result. The indexes themselves are
:mod:`lora_retriever.index`'s (``faiss-flat``, ``faiss-ivf``, ``faiss-hnsw``), inner product on unit vectors.

Querying with vectors of another encoder (another checkpoint, dimension or instruction mode) is an error that
names both (:func:`~lora_retriever.embedders.meta.check_compatible`).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lora_retriever.embedders.meta import EmbeddingMeta, check_compatible
from lora_retriever.index import build_index, top_k_scores
from lora_retriever.mbeir.embed import SUMMARY_NAME, Embeddings, load_embeddings
from swift.utils import get_logger
from swift.utils.files import replace_dir, temp_name

logger = get_logger(__name__)

__all__ = ["KINDS", "IndexConfig", "PoolIndex", "build_pool_index", "index_embeddings", "index_folder"]

KINDS = {"flat": "faiss-flat", "ivf": "faiss-ivf", "hnsw": "faiss-hnsw"}
"""``--kind`` -> the :mod:`lora_retriever.index` kind."""
INDEX_FILE = "index.json"


@dataclass
class IndexConfig:
    """What :func:`index_embeddings` builds (each field is a flag of ``python -m lora_retriever.mbeir index``)."""

    embeddings: str = field(
        metadata={"help": "an 'embed' split folder (every pool in it) or one pool folder"}
    )
    kind: str = field(default="flat", metadata={"help": "FAISS index kind", "choices": tuple(KINDS)})
    shard_size: int = field(default=0, metadata={"help": "candidates per shard (0: one shard)"})
    nlist: int = field(default=0, metadata={"help": "ivf: cells per shard (0: about sqrt(shard size))"})
    nprobe: int = field(default=0, metadata={"help": "ivf: cells searched (0: a quarter of nlist)"})
    hnsw_m: int = field(default=32, metadata={"help": "hnsw: graph degree"})
    ef_search: int = field(default=64, metadata={"help": "hnsw: search breadth"})

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {tuple(KINDS)}, got {self.kind!r}")
        for name in ("shard_size", "nlist", "nprobe"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        for name in ("hnsw_m", "ef_search"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")

    def options(self) -> dict[str, Any]:
        """Keyword options of the index kind."""
        if self.kind == "ivf":
            return {"nlist": self.nlist, "nprobe": self.nprobe}
        if self.kind == "hnsw":
            return {"m": self.hnsw_m, "ef_search": self.ef_search}
        return {}


def index_folder(pool_folder: str | Path, kind: str) -> Path:
    """Where the ``kind`` index of an embedded pool lives."""
    return Path(pool_folder) / f"index-{kind}"


def build_pool_index(
    embeddings: Embeddings, out_dir: str | Path, kind: str = "flat", shard_size: int = 0, **options: Any
) -> Path:
    """Write a (sharded) index over ``embeddings`` to ``out_dir`` (staged, then renamed into place).

    Args:
        embeddings: the pool's vectors, ids and encoder.
        out_dir: the index folder (replaced if present).
        kind: ``flat``, ``ivf`` or ``hnsw``.
        shard_size: candidates per shard; 0 = one shard.
        options: the kind's options (``nlist``/``nprobe``; ``m``/``ef_search``).

    Raises:
        ValueError: unknown kind, an empty pool, or options the kind rejects.
    """
    import faiss

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {tuple(KINDS)}, got {kind!r}")
    n = len(embeddings.ids)
    if n == 0:
        raise ValueError(f"the pool {embeddings.source!r} is empty; nothing to index")
    size = shard_size or n
    out_dir = Path(out_dir)
    staging = temp_name(out_dir)
    staging.mkdir(parents=True)
    shards = []
    try:
        for number, start in enumerate(range(0, n, size)):
            end = min(start + size, n)
            index = build_index(
                embeddings.vectors[start:end], KINDS[kind], embeddings.meta.model_id, **options
            )
            name = f"shard_{number:05d}.faiss"
            faiss.write_index(index.index, str(staging / name))
            shards.append({"file": name, "start": start, "end": end})
        record = {
            "kind": kind,
            "options": options,
            "encoder": embeddings.meta.to_dict(),
            "source": embeddings.source,
            "shards": shards,
            "ids": embeddings.ids,
        }
        (staging / INDEX_FILE).write_text(json.dumps(record, indent=1), encoding="utf-8")
        replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def index_embeddings(config: IndexConfig) -> list[Path]:
    """Index every embedded pool under ``config.embeddings`` (pool folders: ``local/*``, ``global/*``; or the
    folder itself when it is one). Returns the index folders.

    Raises:
        FileNotFoundError: no embedded pool there.
    """
    root = Path(config.embeddings).expanduser()
    if (root / SUMMARY_NAME).is_file():
        pools = [root]
    else:
        pools = sorted(
            p.parent for p in root.glob("*/*/" + SUMMARY_NAME) if p.parent.parent.name in ("local", "global")
        )
    if not pools:
        raise FileNotFoundError(
            f"no embedded pool under {str(root)!r} (expected local/<task>/ and global/union/ with {SUMMARY_NAME}); "
            "run 'embed' first"
        )
    built = []
    for pool in pools:
        out = build_pool_index(
            load_embeddings(pool),
            index_folder(pool, config.kind),
            config.kind,
            config.shard_size,
            **config.options(),
        )
        logger.info(
            "indexed %s (%s, shard size %s) -> %s", pool, config.kind, config.shard_size or "all", out
        )
        built.append(out)
    return built


class PoolIndex:
    """A saved (sharded) pool index, searched shard by shard.

    Attributes:
        kind, options: how it was built.
        meta: the encoder of its vectors.
        ids: the candidate ids, in index order.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder).expanduser()
        record_file = self.folder / INDEX_FILE
        if not record_file.is_file():
            raise FileNotFoundError(
                f"{str(self.folder)!r} is not an index (no {INDEX_FILE}); run 'index' first"
            )
        record = json.loads(record_file.read_text(encoding="utf-8"))
        self.kind: str = record["kind"]
        self.options: dict[str, Any] = record["options"]
        self.meta = EmbeddingMeta.from_dict(record["encoder"])
        self.ids: list[str] = record["ids"]
        self.shards: list[dict[str, Any]] = record["shards"]

    def search(
        self, queries: np.ndarray, k: int, query_meta: EmbeddingMeta
    ) -> tuple[np.ndarray, list[list[str]]]:
        """The ``k`` best candidates of each query: ``(scores [n, k], ids)``, best first (fewer ids when the
        pool has fewer than ``k``).

        Raises:
            ValueError: ``query_meta`` is another encoder than the index's (both named), or ``k < 1``.
        """
        import faiss

        check_compatible(self.meta, query_meta, f"queries vs the index {self.folder}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        all_scores, all_rows = [], []
        for shard in self.shards:
            index = faiss.read_index(str(self.folder / shard["file"]))
            self._configure(index)
            scores, rows = index.search(queries, min(k, shard["end"] - shard["start"]))
            all_scores.append(scores)
            all_rows.append(np.where(rows >= 0, rows + shard["start"], -1))
        scores, rows = np.concatenate(all_scores, axis=1), np.concatenate(all_rows, axis=1)
        scores = np.where(rows >= 0, scores, -np.inf).astype(np.float32)
        best, cols = top_k_scores(scores, k)
        picked = np.take_along_axis(rows, np.where(cols >= 0, cols, 0), axis=1)
        ranked = [
            [self.ids[r] for r, s in zip(row, srow) if r >= 0 and np.isfinite(s)]
            for row, srow in zip(picked, best)
        ]
        return best, ranked

    def _configure(self, index: Any) -> None:
        import faiss

        if self.kind == "ivf":
            ivf = faiss.extract_index_ivf(index)
            ivf.nprobe = min(self.options.get("nprobe") or max(1, ivf.nlist // 4), ivf.nlist)
        elif self.kind == "hnsw":
            index.hnsw.efSearch = self.options.get("ef_search", 64)
