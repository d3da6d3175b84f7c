"""Nearest-key search over adapter keys: exact (numpy) for small pools, FAISS flat / HNSW / IVF for large ones;
and the exact score-level fusion of text and image similarities for image-aware retrieval.

All indexes work on L2-normalised vectors with inner product (= cosine similarity) and remember the
embedder (``model_id``, ``dim``) that made the keys: querying with vectors of another embedder is an error.

Image-aware retrieval (DESIGN.md, "Image-aware retrieval is score-level fusion") scores query ``q`` against
adapter ``j`` over the modalities both have: ``a * cos(text_q, text_j) + (1 - a) * cos(image_q, image_j)``
when both have text and images, the one shared modality's cosine otherwise, and ``-inf`` (never retrieved)
when they share none. ``fused_similarities`` computes the whole ``[n, N]`` matrix exactly (pools are small);
FAISS indexes serve text-only scoring only.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace

import numpy as np

from lora_retriever.embedders.meta import EmbeddingMeta

__all__ = [
    "DEFAULT_TEXT_WEIGHT",
    "INDEX_KINDS",
    "MODALITIES",
    "ExactIndex",
    "FaissFlatIndex",
    "FaissHNSWIndex",
    "FaissIVFIndex",
    "KeyIndex",
    "QueryVectors",
    "build_index",
    "fused_similarities",
    "top_k_scores",
]

#: which parts of a query are scored: its text, its images, or both fused.
MODALITIES = ("text", "image", "fused")
#: the text weight ``a`` of score fusion when neither the retriever config nor the image keys give one: the
#: seed's 0.7 (``0.7 * text + 0.3 * image``).
DEFAULT_TEXT_WEIGHT = 0.7

INDEX_KINDS = ("auto", "exact", "faiss-flat", "faiss-hnsw", "faiss-ivf")
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
        return top_k_scores(queries @ self.keys_t, k)  # [n, N] similarities


def top_k_scores(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best columns of each row of ``scores [n, N]``: ``(scores [n, k], indices [n, k])``, best
    first, ties broken by column (so the same scores always give the same order); index -1 and score
    ``-inf`` pad rows when ``k > N``. Columns scored ``-inf`` sort last (callers drop them)."""
    size = scores.shape[1]
    k_eff = min(k, size)
    if k_eff < size:
        # Partition on the scores themselves (no negated [n, N] copy: 256 MB per call at 64 x 1M keys).
        part = np.argpartition(scores, size - k_eff, axis=1)[:, size - k_eff :]
    else:
        part = np.broadcast_to(np.arange(size), (scores.shape[0], size))
    part_scores = np.take_along_axis(scores, part, axis=1)
    order = np.lexsort((part, -part_scores), axis=1)
    idx = np.take_along_axis(part, order, axis=1)
    return _pad(np.take_along_axis(scores, idx, axis=1), idx, k)


@dataclass(frozen=True)
class QueryVectors:
    """Embedded queries for score-level fusion: per query a text vector, an image vector, or both.

    Attributes:
        text: ``[n, d_text]`` float32 unit rows (zero where ``has_text`` is False), or ``None``: no text part.
        image: ``[n, d_image]`` float32 unit rows (zero where ``has_image`` is False), or ``None``.
        has_text / has_image: ``[n]`` bool, which queries have that part (default: every row of a given part).
        text_meta / image_meta: the embedders that made each part (checked against the keys' when known).
    """

    text: np.ndarray | None
    image: np.ndarray | None = None
    has_text: np.ndarray | None = None
    has_image: np.ndarray | None = None
    text_meta: EmbeddingMeta | None = None
    image_meta: EmbeddingMeta | None = None

    def __post_init__(self) -> None:
        lengths = {len(part) for part in (self.text, self.image) if part is not None}
        if self.text is None and self.image is None or len(lengths) != 1:
            raise ValueError(
                f"QueryVectors needs a text part, an image part or both, of one length; got lengths {lengths}"
            )
        n = lengths.pop()
        for name in ("text", "image"):
            part, mask_name = getattr(self, name), f"has_{name}"
            if part is not None:
                part = np.ascontiguousarray(part, dtype=np.float32)
                if part.ndim != 2:
                    raise ValueError(f"QueryVectors.{name} must be [n, dim], got shape {part.shape}")
                object.__setattr__(self, name, part)
            mask = getattr(self, mask_name)
            mask = np.full(n, part is not None) if mask is None else np.asarray(mask, dtype=bool)
            if mask.shape != (n,) or (part is None and mask.any()):
                raise ValueError(f"QueryVectors.{mask_name} must be [n={n}] bool, False where no {name} part")
            object.__setattr__(self, mask_name, mask)

    def __len__(self) -> int:
        return len(self.has_text)

    @classmethod
    def from_array(
        cls, vectors: np.ndarray | QueryVectors, meta: EmbeddingMeta | None = None
    ) -> QueryVectors:
        """``[n, dim]`` text (or single-space) query vectors as text-only ``QueryVectors``; ``QueryVectors``
        pass through."""
        if isinstance(vectors, QueryVectors):
            return vectors
        return cls(text=np.asarray(vectors, dtype=np.float32), text_meta=meta)

    def only(self, modality: str) -> QueryVectors:
        """The same queries scored on one part: ``"text"`` drops the image part, ``"image"`` drops the text
        part, ``"fused"`` keeps both. Queries left with no part score ``-inf`` everywhere.

        Raises:
            ValueError: unknown ``modality``, or the part it asks for was not embedded.
        """
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
        if modality == "fused":
            return self
        keep = self.text if modality == "text" else self.image
        if keep is None:
            raise ValueError(f"these query vectors have no {modality} part (it was not embedded)")
        none = np.zeros(len(self), dtype=bool)
        if modality == "text":
            return replace(self, image=None, has_image=none, image_meta=None)
        return replace(self, text=None, has_text=none, text_meta=None)


def fused_similarities(
    queries: QueryVectors,
    text_keys: np.ndarray,
    image_keys: np.ndarray | None = None,
    image_key_mask: np.ndarray | None = None,
    text_weight: float = DEFAULT_TEXT_WEIGHT,
) -> np.ndarray:
    """Score-level fusion of text and image cosine similarities, exactly, for every query and adapter.

    Per query ``q`` and adapter ``j``: ``a * cos(text_q, text_j) + (1 - a) * cos(image_q, image_j)`` when
    ``q`` has text and images and ``j`` an image key; ``cos(text_q, text_j)`` when they share only text;
    ``cos(image_q, image_j)`` when they share only images; ``-inf`` when they share nothing.

    Args:
        queries: the embedded queries.
        text_keys: ``[N, d_text]`` unit rows (every adapter has a text key).
        image_keys: ``[N, d_image]`` unit rows (zero where an adapter has no image key), or ``None``.
        image_key_mask: ``[N]`` bool, which adapters have an image key (default: all, when ``image_keys``).
        text_weight: ``a`` in ``[0, 1]``.

    Returns:
        ``[n, N]`` float32 scores.

    Raises:
        ValueError: ``text_weight`` outside ``[0, 1]``, or a part whose dimension differs from its keys'.
    """
    if not 0.0 <= text_weight <= 1.0:
        raise ValueError(f"text_weight must be in [0, 1], got {text_weight!r}")
    n, size = len(queries), len(text_keys)
    text_sims = np.zeros((n, size), dtype=np.float32)
    if queries.text is not None:
        _check_dim(queries.text, text_keys, "text")
        text_sims = queries.text @ text_keys.T
    image_sims = np.zeros((n, size), dtype=np.float32)
    shares_image = np.zeros((n, size), dtype=bool)
    if queries.image is not None and image_keys is not None:
        _check_dim(queries.image, image_keys, "image")
        image_sims = queries.image @ image_keys.T
        mask = np.ones(size, dtype=bool) if image_key_mask is None else np.asarray(image_key_mask, dtype=bool)
        shares_image = queries.has_image[:, None] & mask[None, :]
    shares_text = np.broadcast_to(queries.has_text[:, None], (n, size))
    fused = text_weight * text_sims + (1.0 - text_weight) * image_sims
    scores = np.where(shares_image, image_sims, -np.inf)
    scores = np.where(shares_text, text_sims, scores)
    return np.where(shares_text & shares_image, fused, scores).astype(np.float32)


def _check_dim(vectors: np.ndarray, keys: np.ndarray, part: str) -> None:
    if vectors.shape[1] != keys.shape[1]:
        raise ValueError(
            f"{part} query vectors are {vectors.shape[1]}-d but the {part} keys are {keys.shape[1]}-d; embed "
            f"queries with the embedder that made the keys"
        )


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


class FaissIVFIndex(_FaissIndex):
    """FAISS inverted file over flat vectors (approximate): k-means into ``nlist`` cells, ``nprobe`` of them
    searched per query (``nlist`` default: about sqrt(N); ``nprobe`` default: a quarter of the cells)."""

    kind = "faiss-ivf"

    def __init__(
        self, keys: np.ndarray, model_id: str | None = None, *, nlist: int = 0, nprobe: int = 0, seed: int = 0
    ):
        n = len(keys)
        self.nlist = nlist or max(1, round(n**0.5))
        if not 1 <= self.nlist <= n:
            raise ValueError(f"nlist must be in [1, {n}] (the number of keys), got {nlist}")
        self.nprobe = min(nprobe or max(1, self.nlist // 4), self.nlist)
        self.seed = seed
        super().__init__(keys, model_id)

    def _build(self, keys: np.ndarray):
        quantizer = self._faiss.IndexFlatIP(keys.shape[1])
        index = self._faiss.IndexIVFFlat(
            quantizer, keys.shape[1], self.nlist, self._faiss.METRIC_INNER_PRODUCT
        )
        index.cp.seed = self.seed  # k-means initialisation: the same cells every build
        index.cp.min_points_per_centroid = 1  # small pools: no warning, no subsampling
        index.train(keys)
        index.add(keys)
        index.nprobe = self.nprobe
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
    if kind == "faiss-ivf":
        return FaissIVFIndex(keys, model_id, **options)
    return FaissHNSWIndex(keys, model_id, **options)
