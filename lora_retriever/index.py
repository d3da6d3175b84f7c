"""Nearest-key search over adapter keys: exact (numpy) for small pools, FAISS flat / HNSW for large ones.

All indexes work on L2-normalised vectors with inner product (= cosine similarity) and remember the
embedder (``model_id``, ``dim``) that made the keys: querying with vectors of another embedder is an error.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

__all__ = ["INDEX_KINDS", "ExactIndex", "FaissFlatIndex", "FaissHNSWIndex", "KeyIndex", "build_index"]

INDEX_KINDS = ("auto", "exact", "faiss-flat", "faiss-hnsw")
AUTO_HNSW_MIN_KEYS = 50_000  # below this, exact search is ~1 ms or less per query on one core


@dataclass(frozen=True)
class IndexIdentity:
    model_id: str | None
    dim: int


class KeyIndex(ABC):
    """Top-k inner-product search over ``[N, dim]`` normalised keys."""

    kind: str = ""

    def __init__(self, keys: np.ndarray, model_id: str | None = None):
        keys = np.ascontiguousarray(keys, dtype=np.float32)
        if keys.ndim != 2 or keys.shape[0] == 0:
            raise ValueError(f"keys must be a non-empty [N, dim] array, got shape {keys.shape}")
        self.identity = IndexIdentity(model_id, keys.shape[1])
        self.size = keys.shape[0]

    def check_queries(self, queries: np.ndarray, model_id: str | None) -> np.ndarray:
        """Validate query vectors against the index's embedder; returns them as contiguous float32.

        Raises:
            ValueError: other dimension, or another embedder's model id.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.identity.dim:
            raise ValueError(
                f"query vectors have shape {queries.shape} but the keys are {self.identity.dim}-d "
                f"(made by {self.identity.model_id!r}); embed queries with the same model as the keys."
            )
        if model_id and self.identity.model_id and model_id != self.identity.model_id:
            raise ValueError(
                f"queries were embedded with {model_id!r} but the adapter keys with {self.identity.model_id!r}; "
                "rebuild the keys (python -m lora_retriever.embed_pool) or use the keys' embedder."
            )
        return queries

    @abstractmethod
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(similarities [n, k], indices [n, k])``, best first; index -1 where fewer than k exist."""


class ExactIndex(KeyIndex):
    """Brute force: one matrix product and a partial sort."""

    kind = "exact"

    def __init__(self, keys: np.ndarray, model_id: str | None = None):
        super().__init__(keys, model_id)
        # Stored transposed and contiguous: [n, dim] @ [dim, N] is ~2x faster than multiplying by a
        # transposed view (benchmarks/bench_retrieval.py, "exact-keysT").
        self.keys_t = np.ascontiguousarray(np.asarray(keys, dtype=np.float32).T)  # [dim, N]

    @property
    def keys(self) -> np.ndarray:
        """``[N, dim]`` view of the keys."""
        return self.keys_t.T

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        sims = queries @ self.keys_t  # [n, N]
        k_eff = min(k, self.size)
        if k_eff < self.size:
            # Partition on the scores themselves (no negated [n, N] copy: 256 MB per call at 64 x 1M keys).
            part = np.argpartition(sims, self.size - k_eff, axis=1)[:, self.size - k_eff :]
        else:
            part = np.broadcast_to(np.arange(self.size), (sims.shape[0], self.size))
        part_sims = np.take_along_axis(sims, part, axis=1)
        # Stable order: by similarity, then by key position (ties resolve the same way every run).
        order = np.lexsort((part, -part_sims), axis=1)
        idx = np.take_along_axis(part, order, axis=1)
        top = np.take_along_axis(sims, idx, axis=1)
        return _pad(top, idx, k)


class _FaissIndex(KeyIndex):
    def __init__(self, keys: np.ndarray, model_id: str | None = None):
        super().__init__(keys, model_id)
        try:
            import faiss
        except ImportError as err:  # optional dependency
            raise ImportError(
                "FAISS indexes need faiss-cpu: pip install faiss-cpu (or the [retrieval] extra)"
            ) from err
        self._faiss = faiss
        self.index = self._build(np.ascontiguousarray(keys, dtype=np.float32))

    def _build(self, keys: np.ndarray):
        raise NotImplementedError

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        sims, idx = self.index.search(queries, min(k, self.size))
        return _pad(sims, idx.astype(np.int64), k)


class FaissFlatIndex(_FaissIndex):
    """FAISS exact inner-product search (same results as ``ExactIndex``)."""

    kind = "faiss-flat"

    def _build(self, keys: np.ndarray):
        index = self._faiss.IndexFlatIP(keys.shape[1])
        index.add(keys)
        return index


class FaissHNSWIndex(_FaissIndex):
    """FAISS HNSW graph (approximate; recall set by ``m`` and ``ef_search``)."""

    kind = "faiss-hnsw"

    def __init__(
        self,
        keys: np.ndarray,
        model_id: str | None = None,
        *,
        m: int = 32,
        ef_search: int = 64,
        ef_construction: int = 80,
    ):
        self.m, self.ef_search, self.ef_construction = m, ef_search, ef_construction
        super().__init__(keys, model_id)

    def set_ef_search(self, ef_search: int) -> None:
        """Trade speed for recall after building (larger = more accurate, slower)."""
        if ef_search < 1:
            raise ValueError(f"ef_search must be >= 1, got {ef_search}")
        self.ef_search = ef_search
        self.index.hnsw.efSearch = ef_search

    def _build(self, keys: np.ndarray):
        index = self._faiss.IndexHNSWFlat(keys.shape[1], self.m, self._faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = self.ef_construction
        index.add(keys)
        index.hnsw.efSearch = self.ef_search
        return index


def _pad(sims: np.ndarray, idx: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    if idx.shape[1] >= k:
        return sims[:, :k], idx[:, :k]
    n, have = idx.shape
    sims_out = np.full((n, k), -np.inf, dtype=np.float32)
    idx_out = np.full((n, k), -1, dtype=np.int64)
    sims_out[:, :have], idx_out[:, :have] = sims, idx
    return sims_out, idx_out


def build_index(keys: np.ndarray, kind: str = "auto", model_id: str | None = None, **options) -> KeyIndex:
    """Build a key index. ``auto``: exact below ``AUTO_HNSW_MIN_KEYS`` keys, HNSW above.

    Raises:
        ValueError: unknown ``kind``.
    """
    if kind not in INDEX_KINDS:
        raise ValueError(f"unknown index kind {kind!r}; choose one of {INDEX_KINDS}")
    if kind == "auto":
        kind = "exact" if len(keys) < AUTO_HNSW_MIN_KEYS else "faiss-hnsw"
    if kind == "exact":
        return ExactIndex(keys, model_id)
    if kind == "faiss-flat":
        return FaissFlatIndex(keys, model_id)
    return FaissHNSWIndex(keys, model_id, **options)
