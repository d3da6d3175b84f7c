"""``LoraRetriever``: embed each input, find the top-k adapters by cosine similarity, weight them.

LoraRetriever (Zhao et al. 2024, Sec. 3.2): an adapter's key is the mean embedding of a few samples of its
training data (instruction-prefixed); a query retrieves the k keys most similar to its own embedding. The
paper composes the k adapters with uniform weights 1/k; ``softmax`` and ``similarity`` weightings are
offered as well. The out-of-domain protocol excludes each query's own adapter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lora_retriever.embedders.meta import check_compatible
from lora_retriever.index import INDEX_KINDS, KeyIndex, build_index
from lora_retriever.pool import AdapterPool
from swift.utils import get_logger

if TYPE_CHECKING:
    from PIL.Image import Image

logger = get_logger(__name__)

__all__ = ["WEIGHT_MODES", "LoraRetriever", "LoraRetrieverConfig", "RetrievedAdapter", "adapter_weights"]

WEIGHT_MODES = ("uniform", "softmax", "similarity")


@dataclass
class LoraRetrieverConfig:
    """Retrieval settings.

    Attributes:
        pool_configs: pool config JSON files (``--pool``; ``--app_config``/``--category_config`` add to it).
        lora_type: keep only adapters whose ``lora_type_field`` equals this (``None``/``"all"``: keep all).
        lora_type_field: the entry field ``lora_type`` filters on.
        top_k: adapters per query (the paper uses 3).
        weight_mode: ``uniform`` (1/k, the paper's default), ``softmax`` (of similarity / temperature) or
            ``similarity`` (positive similarities, normalised to sum 1).
        temperature: softmax temperature (> 0).
        index: ``auto`` (exact for small pools, HNSW for large), ``exact``, ``faiss-flat``, ``faiss-hnsw``.
        embedder: an ``EmbedderConfig``, a dict of its fields, or a backend name.
        batch_size: queries embedded per batch.
    """

    pool_configs: list[str] = field(default_factory=list)
    lora_type: str | None = None
    lora_type_field: str = "lora_type"
    top_k: int = 3
    weight_mode: str = "uniform"
    temperature: float = 1.0
    index: str = "auto"
    embedder: Any = "sentence-transformers"
    batch_size: int = 64

    def __post_init__(self) -> None:
        if isinstance(self.pool_configs, str | Path):
            self.pool_configs = [str(self.pool_configs)]
        if not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(f"top_k must be a positive integer, got {self.top_k!r}")
        if self.weight_mode not in WEIGHT_MODES:
            raise ValueError(f"weight_mode must be one of {WEIGHT_MODES}, got {self.weight_mode!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if self.index not in INDEX_KINDS:
            raise ValueError(f"index must be one of {INDEX_KINDS}, got {self.index!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoraRetrieverConfig:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown LoraRetrieverConfig field(s) {sorted(unknown)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if hasattr(self.embedder, "to_dict"):
            data["embedder"] = self.embedder.to_dict()
        return data


@dataclass(frozen=True)
class RetrievedAdapter:
    """One retrieved adapter for one query: its name, composition weight and cosine similarity."""

    name: str
    weight: float
    similarity: float


def adapter_weights(similarities: np.ndarray, mode: str, temperature: float = 1.0) -> np.ndarray:
    """Composition weights for one query's retrieved similarities ``[k]`` (sum to 1).

    Raises:
        ValueError: unknown ``mode``.
    """
    k = len(similarities)
    if k == 0:
        return np.zeros(0, dtype=np.float64)
    sims = np.asarray(similarities, dtype=np.float64)
    if mode == "uniform":
        return np.full(k, 1.0 / k)
    if mode == "softmax":
        z = sims / temperature
        e = np.exp(z - z.max())
        return e / e.sum()
    if mode == "similarity":
        pos = np.clip(sims, 0.0, None)
        total = pos.sum()
        return pos / total if total > 0 else np.full(k, 1.0 / k)
    raise ValueError(f"unknown weight mode {mode!r}; choose one of {WEIGHT_MODES}")


class LoraRetriever:
    """Retrieve the top-k adapters of a pool for each input.

    Args:
        config: retrieval settings.
        pool: a pool to use instead of loading ``config.pool_configs``.
        embedder: an embedder to use instead of building ``config.embedder``.
    """

    def __init__(
        self,
        config: LoraRetrieverConfig | None = None,
        *,
        pool: AdapterPool | None = None,
        embedder: Any | None = None,
    ):
        self.config = config or LoraRetrieverConfig()
        if pool is None:
            if not self.config.pool_configs:
                raise ValueError("no adapter pool: pass pool=... or LoraRetrieverConfig(pool_configs=[...])")
            pool = AdapterPool.from_configs(self.config.pool_configs)
        self.pool = pool.filter(self.config.lora_type_field, self.config.lora_type)
        self._embedder = embedder
        self._index: KeyIndex | None = None

    @property
    def embedder(self):
        if self._embedder is None:
            from lora_retriever.embedders import EmbedderConfig, get_embedder

            cfg = self.config.embedder
            if isinstance(cfg, dict):
                cfg = EmbedderConfig.from_dict(cfg)
            self._embedder = get_embedder(cfg)
        return self._embedder

    @property
    def index(self) -> KeyIndex:
        """The key index, built on first use; checked against the pool keys' embedder."""
        if self._index is None:
            meta = self.pool.key_meta()
            self._index = build_index(
                self.pool.keys(), self.config.index, model_id=meta.model_id if meta else None
            )
        return self._index

    def check_embedder(self) -> None:
        """Raise unless the query embedder is the one that made the keys (model, dim, instruction, adapter)."""
        keys_meta = self.pool.key_meta()
        if keys_meta is not None:
            check_compatible(keys_meta, self.embedder.meta("query"), "adapter keys vs query embedder")

    def embed_queries(
        self, queries: Sequence[str] | None, images: Sequence[Sequence[Image]] | None = None
    ) -> np.ndarray:
        """``[n, dim]`` normalised query vectors (text, images, or both per query)."""
        n = len(queries) if queries is not None else len(images or [])
        out = []
        step = self.config.batch_size
        for start in range(0, n, step):
            texts = None if queries is None else list(queries[start : start + step])
            imgs = None if images is None else list(images[start : start + step])
            out.append(self.embedder.encode(texts=texts, images=imgs, role="query"))
        dim = self.index.identity.dim
        return np.concatenate(out) if out else np.zeros((0, dim), dtype=np.float32)

    def retrieve(
        self,
        queries: Sequence[str] | None,
        top_k: int | None = None,
        *,
        images: Sequence[Sequence[Image]] | None = None,
        exclude: Sequence[str | None] | None = None,
        weight_mode: str | None = None,
        temperature: float | None = None,
    ) -> list[list[RetrievedAdapter]]:
        """Per query, a ranked list of ``RetrievedAdapter`` (best first; weights sum to 1).

        Args:
            queries: query texts (``None`` for image-only queries).
            top_k: adapters per query (default: config).
            images: per query, a list of images (may be empty).
            exclude: per query, an adapter name to leave out (the out-of-domain protocol) or ``None``.
            weight_mode / temperature: override the config.

        Raises:
            ValueError: ``exclude`` of the wrong length, bad ``top_k``/mode, or query vectors from another
                embedder than the keys.
        """
        self.check_embedder()
        vectors = self.embed_queries(queries, images)
        model_id = getattr(self.embedder, "model_id", None)
        return self.retrieve_vectors(
            vectors,
            top_k,
            exclude=exclude,
            weight_mode=weight_mode,
            temperature=temperature,
            model_id=model_id,
        )

    def retrieve_vectors(
        self,
        vectors: np.ndarray,
        top_k: int | None = None,
        *,
        exclude: Sequence[str | None] | None = None,
        weight_mode: str | None = None,
        temperature: float | None = None,
        model_id: str | None = None,
    ) -> list[list[RetrievedAdapter]]:
        """``retrieve`` for already-embedded, normalised query vectors ``[n, dim]``."""
        k = self.config.top_k if top_k is None else top_k
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"top_k must be a positive integer, got {k!r}")
        mode = weight_mode or self.config.weight_mode
        temp = self.config.temperature if temperature is None else temperature
        if mode not in WEIGHT_MODES:
            raise ValueError(f"weight_mode must be one of {WEIGHT_MODES}, got {mode!r}")
        if not temp > 0:
            raise ValueError(f"temperature must be > 0, got {temp!r}")
        vectors = self.index.check_queries(vectors, model_id)
        if exclude is not None and len(exclude) != len(vectors):
            raise ValueError(
                f"exclude has {len(exclude)} entries for {len(vectors)} queries; give one per query"
            )
        names = self.pool.names
        n_excl = int(exclude is not None and any(e is not None for e in exclude))  # one banned name per query
        sims, idx = self.index.search(vectors, min(k + n_excl, len(names)))
        results = []
        for q in range(len(vectors)):
            banned = exclude[q] if exclude is not None else None
            picked = [(names[i], float(s)) for s, i in zip(sims[q], idx[q]) if i >= 0 and names[i] != banned][
                :k
            ]
            weights = adapter_weights(np.array([s for _, s in picked]), mode, temp)
            results.append([RetrievedAdapter(n, float(w), s) for (n, s), w in zip(picked, weights)])
        return results

    def show_similarities(self, queries: Sequence[str], top_n: int | None = None) -> str:
        """A plain-text table of every (or the top ``top_n``) adapter's similarity for each query."""
        vectors = self.embed_queries(queries)
        keys = self.pool.keys()
        sims = vectors @ keys.T
        names = self.pool.names
        lines = []
        for q, query in enumerate(queries):
            order = np.argsort(-sims[q], kind="stable")[: top_n or len(names)]
            lines.append(f"query {q}: {query[:80]!r}")
            lines.extend(f"  {rank + 1:>3}. {names[i]:<32} {sims[q, i]: .4f}" for rank, i in enumerate(order))
        return "\n".join(lines)
