"""``LoraRetriever``: embed each input, find the top-k adapters by cosine similarity, weight them.

LoraRetriever (Zhao et al. 2024, Sec. 3.2): an adapter's key is the mean embedding of a few samples of its
training data (instruction-prefixed); a query retrieves the k keys most similar to its own embedding. The
paper composes the k adapters with uniform weights 1/k; ``softmax`` and ``similarity`` weightings are
offered as well. The out-of-domain protocol excludes each query's own adapter.

Image-aware retrieval (issue 9; DESIGN.md, "Image-aware retrieval is score-level fusion"): with an
``image_embedder`` and a pool whose adapters have image keys (mean image embedding of their key samples), a
query is scored against each adapter over the modalities both have (``lora_retriever.index.fused_similarities``):
``a * cos(text) + (1 - a) * cos(image)`` when both have text and images (``a = text_weight``, the seed's 0.7),
the shared modality's cosine when only one is shared, and never retrieved when none is. So a text-only query
is scored on text, an image-only query on images (adapters without an image key can't be retrieved for it),
and adapters without an image key are scored on text alone; the text and image embedders need not share a
space. Fused scoring searches exactly (a ``[n, N]`` matrix; pools are small); FAISS indexes serve text-only
scoring. Without an image embedder, images go to the text embedder when it embeds them into its own space
(CLIP, jina-v4), and are otherwise ignored with a warning.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lora_retriever.embedders.config import validate_text_weight
from lora_retriever.embedders.meta import EmbeddingMeta, check_compatible
from lora_retriever.index import (
    DEFAULT_TEXT_WEIGHT,
    INDEX_KINDS,
    MODALITIES,
    KeyIndex,
    QueryVectors,
    build_index,
    fused_similarities,
    top_k_scores,
)
from lora_retriever.pool import AdapterPool
from swift.utils import get_logger

if TYPE_CHECKING:
    from PIL.Image import Image

logger = get_logger(__name__)

__all__ = [
    "DEFAULT_TEXT_WEIGHT",
    "WEIGHT_MODES",
    "LoraRetriever",
    "LoraRetrieverConfig",
    "QueryVectors",
    "RetrievedAdapter",
    "accuracy_by_modality",
    "adapter_weights",
    "pool_similarities",
]

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
        embedder: the text embedder: an ``EmbedderConfig``, a dict of its fields, or a backend name.
        image_embedder: the image embedder for score-level fusion (same forms, e.g.
            ``EmbedderConfig(backend="vision-tower", model_path=VLM_DIR)``), or ``None``: no image scoring.
        text_weight: ``a`` in ``a * cos(text) + (1 - a) * cos(image)``, in ``[0, 1]``; ``None`` = the weight
            stored with the pool's image keys, else ``DEFAULT_TEXT_WEIGHT`` (0.7, the seed's).
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
    image_embedder: Any = None
    text_weight: float | None = None
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
        self.text_weight = validate_text_weight(self.text_weight)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoraRetrieverConfig:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown LoraRetrieverConfig field(s) {sorted(unknown)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for name in ("embedder", "image_embedder"):
            if hasattr(getattr(self, name), "to_dict"):
                data[name] = getattr(self, name).to_dict()
        return data


@dataclass(frozen=True)
class RetrievedAdapter:
    """One retrieved adapter for one query: its name, composition weight and (fused) cosine similarity."""

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
    """Retrieve the top-k adapters of a pool for each input (text, images, or both).

    Args:
        config: retrieval settings.
        pool: a pool to use instead of loading ``config.pool_configs``.
        embedder: a text embedder to use instead of building ``config.embedder``.
        image_embedder: an image embedder to use instead of building ``config.image_embedder``.
    """

    def __init__(
        self,
        config: LoraRetrieverConfig | None = None,
        *,
        pool: AdapterPool | None = None,
        embedder: Any | None = None,
        image_embedder: Any | None = None,
    ):
        self.config = config or LoraRetrieverConfig()
        if pool is None:
            if not self.config.pool_configs:
                raise ValueError("no adapter pool: pass pool=... or LoraRetrieverConfig(pool_configs=[...])")
            pool = AdapterPool.from_configs(self.config.pool_configs)
        self.pool = pool.filter(self.config.lora_type_field, self.config.lora_type)
        self._embedder = embedder
        self._image_embedder = image_embedder
        self._index: KeyIndex | None = None
        self._warned: set[str] = set()

    @property
    def embedder(self):
        """The text embedder (built on first use).

        Raises:
            ValueError: it embeds no text (an image-only backend given as the text embedder).
        """
        if self._embedder is None:
            self._embedder = _build_embedder(self.config.embedder)
            if not getattr(self._embedder, "supports_texts", True):
                raise ValueError(
                    f"the retriever's embedder ({self._embedder.backend} {self._embedder.model_id}) embeds "
                    "images only; give it as image_embedder and keep a text embedder as embedder"
                )
        return self._embedder

    @property
    def has_image_embedder(self) -> bool:
        """Whether an image embedder is configured (or given); it is not loaded by asking."""
        return self._image_embedder is not None or self.config.image_embedder is not None

    @property
    def image_embedder(self):
        """The image embedder (built on first use), or ``None`` when none is configured.

        Raises:
            ValueError: it cannot embed images.
        """
        if self._image_embedder is None and self.config.image_embedder is not None:
            self._image_embedder = _build_embedder(self.config.image_embedder)
            if not getattr(self._image_embedder, "supports_images", False):
                raise ValueError(
                    f"the retriever's image_embedder ({self._image_embedder.backend} "
                    f"{self._image_embedder.model_id}) cannot embed images; use backend='vision-tower' (or "
                    "'clip')"
                )
        return self._image_embedder

    @property
    def image_scoring(self) -> bool:
        """Whether queries' images are scored against image keys: an image embedder is configured and some
        adapter of the pool has an image key."""
        return self.has_image_embedder and bool(self.pool.image_key_mask().any())

    @property
    def text_weight(self) -> float:
        """The fusion weight ``a``: the config's, else the one stored with the image keys, else 0.7. A config
        weight that differs from the keys' is used, with a warning (once)."""
        meta = self.pool.image_key_meta() if self.pool.image_key_mask().any() else None
        stored = meta.text_weight if meta is not None else None
        if self.config.text_weight is None:
            return DEFAULT_TEXT_WEIGHT if stored is None else stored
        if stored is not None and stored != self.config.text_weight:
            self._warn_once(
                "text_weight",
                "scoring with text_weight %s, but the pool's image keys were built for text_weight %s",
                self.config.text_weight,
                stored,
            )
        return float(self.config.text_weight)

    @property
    def index(self) -> KeyIndex:
        """The text key index, built on first use; checked against the pool keys' embedder."""
        if self._index is None:
            meta = self.pool.key_meta()
            self._index = build_index(
                self.pool.keys(), self.config.index, model_id=meta.model_id if meta else None
            )
        return self._index

    def check_embedder(self) -> None:
        """Raise unless the query embedders are the ones that made the keys (model, dim, instruction,
        adapter): the text embedder against the text keys and, when images are scored, the image embedder
        against the image keys."""
        keys_meta = self.pool.key_meta()
        if keys_meta is not None:
            check_compatible(keys_meta, self.embedder.meta("query"), "adapter keys vs query embedder")
        if self.image_scoring:
            image_meta = self.pool.image_key_meta()
            if image_meta is not None:
                check_compatible(
                    image_meta, self.image_embedder.meta("query"), "image keys vs image embedder"
                )

    def embed_queries(
        self,
        queries: Sequence[str | None] | None,
        images: Sequence[Sequence[Image] | None] | None = None,
    ) -> QueryVectors:
        """Embed each query's text and images (either may be missing for a query).

        ``<image>`` tags are removed from query texts (``retrieval_text``). With image scoring (see
        ``image_scoring``) texts go to the text embedder and each query's images to the image embedder (the
        mean of its normalised image vectors, renormalised). Otherwise images go to the text embedder if it
        embeds them into its own space (one fused vector per query), or are ignored with a warning (once).

        Args:
            queries: ``n`` texts (``None``/``""`` = no text), or ``None`` for image-only queries.
            images: ``n`` lists of PIL images (empty or ``None`` = no image), or ``None``.

        Returns:
            ``QueryVectors`` with ``[n, d_text]`` text and ``[n, d_image]`` image parts.

        Raises:
            ValueError: ``queries`` and ``images`` of different lengths, or a query that can't be scored (no
                text and no scorable image), naming it and the fix.
        """
        from lora_retriever.embedders import retrieval_text

        if queries is not None and images is not None and len(queries) != len(images):
            raise ValueError(
                f"{len(queries)} queries but {len(images)} image lists; give one image list per query "
                "([] for a query without images)"
            )
        n = len(queries) if queries is not None else len(images or [])
        texts = [retrieval_text(q) for q in queries] if queries is not None else [None] * n
        image_lists = [list(im or []) for im in images] if images is not None else [[] for _ in range(n)]
        if any(image_lists):
            if self.image_scoring:
                return self._embed_fused(texts, image_lists)
            if getattr(self.embedder, "supports_images", False):
                return self._embed_single_space(texts, image_lists)
            self._warn_images_ignored()
        no_text = [i for i, t in enumerate(texts) if t is None]
        if no_text:
            raise ValueError(
                f"queries {no_text[:10]} have no text (image-only) but images are not scored here "
                f"({self._why_no_image_scoring()}); give them text, or configure an image embedder "
                "(--image_embedder vision-tower --image_embedder_path DIR) and build image keys"
            )
        return self._embed_single_space(texts, [[] for _ in range(n)])

    def _embed_single_space(self, texts: list[str | None], image_lists: list[list[Image]]) -> QueryVectors:
        """One vector per query from the text embedder (texts, and images if it embeds them too)."""
        out, step = [], self.config.batch_size
        for start in range(0, len(texts), step):
            imgs = image_lists[start : start + step]
            out.append(
                self.embedder.encode(
                    texts=texts[start : start + step], images=imgs if any(imgs) else None, role="query"
                )
            )
        dim = getattr(self.embedder, "dim", None) or self.index.identity.dim
        text = np.concatenate(out) if out else np.zeros((0, dim), dtype=np.float32)
        return QueryVectors(text=text, text_meta=_meta_of(self.embedder))

    def _embed_fused(self, texts: list[str | None], image_lists: list[list[Image]]) -> QueryVectors:
        """Text vectors from the text embedder, image vectors from the image embedder, per query."""
        from lora_retriever.embedders import l2_normalize

        n, step = len(texts), self.config.batch_size
        empty = [i for i in range(n) if texts[i] is None and not image_lists[i]]
        if empty:
            raise ValueError(f"queries {empty[:10]} have neither text nor images; every query needs one")
        has_text = np.array([t is not None for t in texts], dtype=bool)
        has_image = np.array([bool(im) for im in image_lists], dtype=bool)
        text = np.zeros((n, self.embedder.dim), dtype=np.float32)
        rows = np.flatnonzero(has_text)
        for start in range(0, len(rows), step):
            chunk = rows[start : start + step]
            text[chunk] = self.embedder.encode_queries([texts[i] for i in chunk])
        image = np.zeros((n, self.image_embedder.dim), dtype=np.float32)
        rows = np.flatnonzero(has_image)
        for start in range(0, len(rows), step):
            chunk = rows[start : start + step]
            flat = self.image_embedder.encode_images([im for i in chunk for im in image_lists[i]])
            bounds = np.cumsum([0] + [len(image_lists[i]) for i in chunk])
            means = np.stack([flat[a:b].mean(axis=0) for a, b in zip(bounds[:-1], bounds[1:])])
            image[chunk] = l2_normalize(means, "mean image embeddings of a query")
        return QueryVectors(
            text=text,
            image=image,
            has_text=has_text,
            has_image=has_image,
            text_meta=_meta_of(self.embedder),
            image_meta=_meta_of(self.image_embedder),
        )

    def _why_no_image_scoring(self) -> str:
        if not self.has_image_embedder:
            return "no image embedder is configured"
        return "no adapter of the pool has an image key"

    def _warn_images_ignored(self) -> None:
        self._warn_once(
            "images",
            "images are ignored for retrieval (text-only scoring): the text embedder %s is text-only and %s. "
            "To score images: --image_embedder vision-tower --image_embedder_path DIR, with image keys built "
            "by python -m lora_retriever.embed_pool",
            getattr(self.embedder, "model_id", type(self.embedder).__name__),
            self._why_no_image_scoring(),
        )

    def _warn_once(self, topic: str, message: str, *args: Any) -> None:
        if topic not in self._warned:
            self._warned.add(topic)
            logger.warning(message, *args)

    def similarities(self, vectors: QueryVectors | np.ndarray) -> np.ndarray:
        """``[n, N]`` scores of every query against every adapter of the pool (``pool_similarities`` with
        this retriever's ``text_weight``); ``-inf`` where a query and an adapter share no modality."""
        return pool_similarities(self.pool, vectors, self.text_weight)

    def retrieve(
        self,
        queries: Sequence[str | None] | None,
        top_k: int | None = None,
        *,
        images: Sequence[Sequence[Image] | None] | None = None,
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
        return self.retrieve_vectors(
            self.embed_queries(queries, images),
            top_k,
            exclude=exclude,
            weight_mode=weight_mode,
            temperature=temperature,
        )

    def retrieve_vectors(
        self,
        vectors: QueryVectors | np.ndarray,
        top_k: int | None = None,
        *,
        exclude: Sequence[str | Collection[str] | None] | None = None,
        weight_mode: str | None = None,
        temperature: float | None = None,
        model_id: str | None = None,
    ) -> list[list[RetrievedAdapter]]:
        """``retrieve`` for already-embedded queries (``exclude``: per query, an adapter name or a collection
        of names to leave out, or ``None``): ``QueryVectors`` from ``embed_queries``, or ``[n, dim]``
        normalised text vectors (``model_id``: the embedder that made them, checked against the keys').

        Text-only queries search the text key index (exact or FAISS); queries with an image part are scored
        exactly with ``similarities``. An adapter that shares no modality with a query is never retrieved
        for it (the query may then get fewer than ``top_k`` adapters).

        Raises:
            ValueError: ``exclude`` of the wrong length, bad ``top_k``/mode, vectors from another embedder or
                of another dimension than the keys, or a query with neither part.
        """
        k = self.config.top_k if top_k is None else top_k
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"top_k must be a positive integer, got {k!r}")
        mode = weight_mode or self.config.weight_mode
        temp = self.config.temperature if temperature is None else temperature
        if mode not in WEIGHT_MODES:
            raise ValueError(f"weight_mode must be one of {WEIGHT_MODES}, got {mode!r}")
        if not temp > 0:
            raise ValueError(f"temperature must be > 0, got {temp!r}")
        queries = QueryVectors.from_array(vectors)
        empty = np.flatnonzero(~queries.has_text & ~queries.has_image)
        if len(empty):
            raise ValueError(f"queries {empty[:10].tolist()} have neither a text nor an image vector")
        if exclude is not None and len(exclude) != len(queries):
            raise ValueError(
                f"exclude has {len(exclude)} entries for {len(queries)} queries; give one per query"
            )
        self._check_vectors(queries)
        names = self.pool.names
        banned = [_as_name_set(e) for e in exclude] if exclude is not None else [frozenset()] * len(queries)
        depth = min(k + max((len(b) for b in banned), default=0), len(names))
        if queries.image is None:
            text_model = model_id or (queries.text_meta.model_id if queries.text_meta else None)
            sims, idx = self.index.search(self.index.check_queries(queries.text, text_model), depth)
        else:
            sims, idx = top_k_scores(self.similarities(queries), depth)
        results = []
        for q in range(len(queries)):
            picked = [
                (names[i], float(s))
                for s, i in zip(sims[q], idx[q])
                if i >= 0 and np.isfinite(s) and names[i] not in banned[q]
            ][:k]
            weights = adapter_weights(np.array([s for _, s in picked]), mode, temp)
            results.append([RetrievedAdapter(n, float(w), s) for (n, s), w in zip(picked, weights)])
        return results

    def _check_vectors(self, queries: QueryVectors) -> None:
        """The embedders named by the vectors made the pool's keys."""
        pairs = (
            (queries.text_meta, self.pool.key_meta() if queries.text_meta else None, "adapter keys"),
            (
                queries.image_meta,
                self.pool.image_key_meta() if queries.image_meta else None,
                "image keys",
            ),
        )
        for query_meta, keys_meta, what in pairs:
            if query_meta is not None and keys_meta is not None:
                check_compatible(keys_meta, query_meta, f"{what} vs query vectors")

    def show_similarities(self, queries: Sequence[str], top_n: int | None = None) -> str:
        """A plain-text table of every (or the top ``top_n``) adapter's similarity for each query."""
        sims = self.similarities(self.embed_queries(queries))
        names = self.pool.names
        lines = []
        for q, query in enumerate(queries):
            order = np.argsort(-sims[q], kind="stable")[: top_n or len(names)]
            lines.append(f"query {q}: {query[:80]!r}")
            lines.extend(f"  {rank + 1:>3}. {names[i]:<32} {sims[q, i]: .4f}" for rank, i in enumerate(order))
        return "\n".join(lines)


def pool_similarities(
    pool: AdapterPool, vectors: QueryVectors | np.ndarray, text_weight: float = DEFAULT_TEXT_WEIGHT
) -> np.ndarray:
    """``[n, N]`` scores of queries against a pool's adapters, in pool order: plain cosine for ``[n, dim]``
    text vectors; score-level fusion (``lora_retriever.index.fused_similarities``) for ``QueryVectors``
    with an image part and a pool with image keys.

    Raises:
        ValueError: a query part of another dimension than the pool's keys.
    """
    queries = QueryVectors.from_array(vectors)
    image_keys = pool.image_keys() if queries.image is not None else None
    return fused_similarities(queries, pool.keys(), image_keys, pool.image_key_mask(), text_weight)


def _as_name_set(names: str | Collection[str] | None) -> frozenset[str]:
    if names is None:
        return frozenset()
    return frozenset([names]) if isinstance(names, str) else frozenset(names)


def accuracy_by_modality(
    retriever: LoraRetriever,
    vectors: QueryVectors,
    own: Sequence[str],
    ks: Sequence[int] = (1, 3),
) -> dict[str, dict[str, float | int]]:
    """Retrieval accuracy when queries are scored on their text only, their images only, and both fused.

    A query counts as correct at ``k`` when its own adapter is among the ``k`` best-scored adapters (ties
    broken by pool order, as ``retrieve_vectors`` breaks them). A query that can't be scored in a modality
    (no part of that kind, or its own adapter has no image key) is counted wrong, never skipped.

    Args:
        retriever: scores against its pool with its ``text_weight``.
        vectors: the test queries, embedded with both parts (``retriever.embed_queries(texts, images)``).
        own: per query, the name of its own adapter.
        ks: the cut-offs to report.

    Returns:
        ``{"text"|"image"|"fused": {"top1": .., "top3": .., "n": queries, "unscored": count}}``.

    Raises:
        ValueError: ``own`` of another length than ``vectors``, an adapter name not in the pool, or vectors
            without both parts.
    """
    names = retriever.pool.names
    if len(own) != len(vectors):
        raise ValueError(f"own has {len(own)} names for {len(vectors)} queries; give one per query")
    unknown = sorted({name for name in own if name not in names})
    if unknown:
        raise ValueError(f"own adapters {unknown} are not in the pool; pool: {names}")
    if vectors.text is None or vectors.image is None:
        raise ValueError(
            "accuracy_by_modality needs queries embedded with text and images (an image embedder and a pool "
            "with image keys); got vectors without a "
            + ("text" if vectors.text is None else "image")
            + " part"
        )
    own_idx = np.array([names.index(name) for name in own])
    report: dict[str, dict[str, float | int]] = {}
    for modality in MODALITIES:
        sims = retriever.similarities(vectors.only(modality))
        scored = np.isfinite(sims[np.arange(len(own_idx)), own_idx])
        _, idx = top_k_scores(sims, max(ks))
        row: dict[str, float | int] = {}
        for k in ks:
            hit = (idx[:, :k] == own_idx[:, None]).any(axis=1) & scored
            row[f"top{k}"] = float(hit.mean()) if len(hit) else float("nan")
        row.update(n=len(own_idx), unscored=int((~scored).sum()))
        report[modality] = row
    return report


def _build_embedder(config: Any):
    from lora_retriever.embedders import get_embedder

    return get_embedder(config)  # an EmbedderConfig, a dict of its fields or a backend name


def _meta_of(embedder: Any) -> EmbeddingMeta | None:
    meta = getattr(embedder, "meta", None)
    return meta("query") if callable(meta) else None
