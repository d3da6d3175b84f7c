"""The ``Embedder`` interface: text, image and fused text+image vectors, L2-normalised float32.

A backend implements ``_encode_texts`` (and ``_encode_images`` if it has an image tower that shares the
text space); this base class owns everything that must be identical across backends: the instruction
prefix, input checks, normalisation and the fusion of text and image vectors for multimodal inputs
(DESIGN.md, Retrieval: weighted sum of the normalised text and image vectors, renormalised).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from lora_retriever.embedders.config import EmbedderConfig, validate_fusion_weights
from lora_retriever.embedders.meta import EmbeddingMeta

if TYPE_CHECKING:
    from PIL.Image import Image

__all__ = [
    "DEFAULT_INSTRUCTION",
    "ROLES",
    "Embedder",
    "batch_starts",
    "retrieval_text",
    "UnsupportedInputError",
    "l2_normalize",
    "model_id_from_path",
]

logger = logging.getLogger(__name__)

#: The instruction prefix for query texts and adapter key samples (LoraRetriever embeds both with the
#: same instruction so that a query lands next to the samples of the task it belongs to).
DEFAULT_INSTRUCTION = "Represent the task of this request for retrieving a suitable LoRA adapter: "

ROLES = ("query", "document")

_EPS = 1e-12


class UnsupportedInputError(ValueError):
    """The backend cannot embed this kind of input (e.g. images on a text-only model)."""


def l2_normalize(x: np.ndarray, what: str = "embedding") -> np.ndarray:
    """Row-wise L2 normalisation of ``[n, dim]`` to float32.

    Raises:
        ValueError: a row is zero or not finite (it has no direction; cosine similarity is undefined).
    """
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    bad = ~np.isfinite(norms[..., 0]) | (norms[..., 0] < _EPS)
    if bad.any():
        rows = np.flatnonzero(bad).tolist()
        raise ValueError(f"{what}: rows {rows[:10]} are zero or not finite and cannot be normalised")
    return np.ascontiguousarray(x / norms, dtype=np.float32)


def model_id_from_path(path: str | Path) -> str:
    """A model id from a local directory: its name, or ``org/name`` for a Hugging Face cache snapshot
    (``.../models--org--name/snapshots/<hash>``)."""
    path = Path(path).absolute()
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return path.parent.parent.name[len("models--") :].replace("--", "/")
    return path.name


def torch_dtype(name: str) -> Any:
    """``"float32"`` -> ``torch.float32`` (torch imported lazily)."""
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def warn_if_slow_dtype(device: str, dtype: str) -> None:
    """Half precision on a CPU is usually much slower than fp32 (no bf16/fp16 units on most CPUs)."""
    if device.startswith("cpu") and dtype != "float32":
        logger.warning(
            "embedder dtype %s on %s is usually several times slower than float32 there", dtype, device
        )


def retrieval_text(text: str | None) -> str | None:
    """The text to embed for retrieval: ``<image>`` tags (image positions in VLM prompts) removed and
    whitespace stripped; ``None`` when nothing is left (an image-only input). Adapter key samples and queries
    both go through it, so a tag never makes them differ."""
    if text is None:
        return None
    from swift.llm.template import IMAGE_TAG  # the one spelling of the tag (imports torch: call lazily)

    return text.replace(IMAGE_TAG, " ").strip() or None


def batch_starts(n: int, batch_size: int, show_progress: bool, desc: str) -> Sequence[int]:
    """Start offsets of ``n`` inputs in batches of ``batch_size``; a tqdm bar over them with ``show_progress``."""
    starts = range(0, n, batch_size)
    if not show_progress:
        return starts
    from tqdm.auto import tqdm

    return tqdm(starts, desc=desc, unit="batch")


def _as_text_list(texts: str | Sequence[str], what: str) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    if not isinstance(texts, Sequence):
        raise ValueError(f"{what} must be a string or a list of strings, got {type(texts).__name__}")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise ValueError(f"{what} must all be strings; items {bad[:10]} are not (e.g. {texts[bad[0]]!r})")
    return list(texts)


def _is_image(obj: Any) -> bool:
    from PIL.Image import Image as PILImage

    return isinstance(obj, PILImage)


class Embedder(ABC):
    """An embedding model behind one interface.

    Attributes:
        backend: the backend name (``"sentence-transformers"``, ``"jina-v4"``, ``"clip"``).
        model_id: the model's name, stored with every key and index.
        dim: vector dimension.
        supports_images: whether ``encode_images`` works.
        supports_texts: whether texts can be embedded (False for image-only embedders such as
            ``vision-tower``; when both are True, text and image vectors share one space).
        query_instruction / document_instruction: the prefixes actually used.
        text_weight / image_weight: default fusion weights for ``encode``.
        batch_size: default inputs per forward pass.
        adapter_loaded / adapter_path: whether a PEFT adapter is active on the embedding model, and its dir.
    """

    backend: ClassVar[str] = ""
    supports_images: ClassVar[bool] = False
    supports_texts: ClassVar[bool] = True
    #: the instruction used when ``EmbedderConfig.query_instruction`` is ``None``.
    default_instruction: ClassVar[str] = ""

    model_id: str
    dim: int

    def __init__(self, config: EmbedderConfig):
        self.config = config
        self.query_instruction: str = (
            self.default_instruction if config.query_instruction is None else config.query_instruction
        )
        self.document_instruction: str = (
            self.query_instruction if config.document_instruction is None else config.document_instruction
        )
        self.batch_size: int = config.batch_size
        self.text_weight: float = config.text_weight
        self.image_weight: float = config.image_weight
        self.adapter_loaded: bool = False
        self.adapter_path: str | None = None
        self.adapter_digest: str | None = None  # of the loaded adapter's weights (``adapter_weights_digest``)

    def __repr__(self) -> str:
        adapter = f", adapter={self.adapter_path!r}" if self.adapter_loaded else ""
        return f"{type(self).__name__}(model_id={self.model_id!r}, dim={self.dim}{adapter})"

    # ------------------------------------------------------------------ backend hooks

    @abstractmethod
    def _encode_texts(self, texts: list[str], role: str, batch_size: int, show_progress: bool) -> Any:
        """Embed already-prefixed texts; ``[n, dim]`` (array or tensor, normalised or not)."""

    def _encode_images(self, images: list[Image], batch_size: int, show_progress: bool) -> Any:
        """Embed images; ``[n, dim]``. Backends with an image tower override this."""
        raise self._images_unsupported()

    def _images_unsupported(self) -> UnsupportedInputError:
        return UnsupportedInputError(
            f"the {self.backend!r} embedder ({self.model_id}) is text-only and cannot embed images; "
            "use backend='jina-v4' or 'clip' (EmbedderConfig.backend) for image inputs, or give the retriever an "
            "image_embedder (backend='vision-tower')"
        )

    # ------------------------------------------------------------------ public API

    def instruction(self, role: str = "query") -> str:
        """The prefix put before texts of ``role`` (``"query"`` or ``"document"``)."""
        _check_role(role)
        return self.query_instruction if role == "query" else self.document_instruction

    def meta(self, role: str = "query") -> EmbeddingMeta:
        """The identity to store with vectors made by this embedder for ``role``."""
        adapter = None
        if self.adapter_loaded and self.adapter_path:
            # name@digest: two adapters saved under the same folder name (a retrained one) differ here
            adapter = Path(self.adapter_path).name
            adapter += f"@{self.adapter_digest}" if self.adapter_digest else ""
        return EmbeddingMeta(
            model_id=self.model_id,
            dim=self.dim,
            instruction=self.instruction(role),
            adapter=adapter,
            backend=self.backend,
        )

    def encode_queries(
        self, texts: str | Sequence[str], *, batch_size: int | None = None, show_progress: bool = False
    ) -> np.ndarray:
        """Embed query texts (and adapter key samples) with the query instruction prefix.

        Args:
            texts: one string or a list of ``n`` strings.
            batch_size: texts per forward pass (default: the config's).
            show_progress: show a progress bar.

        Returns:
            ``[n, dim]`` float32, each row of unit L2 norm.
        """
        return self._encode_role(texts, "query", batch_size, show_progress)

    def encode_documents(
        self, texts: str | Sequence[str], *, batch_size: int | None = None, show_progress: bool = False
    ) -> np.ndarray:
        """Embed document texts with the document prefix (and the backend's passage prompt, if any).

        Returns:
            ``[n, dim]`` float32, each row of unit L2 norm.
        """
        return self._encode_role(texts, "document", batch_size, show_progress)

    def encode_images(
        self, images: Sequence[Image], *, batch_size: int | None = None, show_progress: bool = False
    ) -> np.ndarray:
        """Embed images into the text space.

        Args:
            images: ``n`` PIL images.

        Returns:
            ``[n, dim]`` float32, each row of unit L2 norm.

        Raises:
            UnsupportedInputError: the backend is text-only.
            ValueError: an item is not a PIL image.
        """
        if not self.supports_images:
            raise self._images_unsupported()
        if not isinstance(images, Sequence) or isinstance(images, str):
            raise ValueError(f"images must be a list of PIL images, got {type(images).__name__}")
        bad = [i for i, im in enumerate(images) if not _is_image(im)]
        if bad:
            raise ValueError(
                f"images must all be PIL images; items {bad[:10]} are not "
                f"(e.g. {type(images[bad[0]]).__name__}); open files with PIL.Image.open first"
            )
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = self._encode_images(list(images), batch_size or self.batch_size, show_progress)
        return self._finish(out, len(images), "image embeddings")

    def encode(
        self,
        texts: Sequence[str | None] | None = None,
        images: Sequence[Image | Sequence[Image] | None] | None = None,
        *,
        role: str = "query",
        text_weight: float | None = None,
        image_weight: float | None = None,
        batch_size: int | None = None,
        show_progress: bool = False,
    ) -> np.ndarray:
        """Embed ``n`` inputs, each text only, images only, or both (fused).

        Per item: the text vector ``t`` (with the ``role`` prefix) and the image vector ``v`` (the mean of
        the item's normalised image vectors, renormalised) are fused as
        ``normalise(text_weight * t + image_weight * v)``. An item with one modality gets that modality's
        vector; the weights only matter for items that have both.

        Args:
            texts: ``n`` texts (``None`` or ``""`` = no text for that item), or ``None`` for image-only inputs.
            images: ``n`` entries, each a PIL image, a list of images (may be empty) or ``None``; or ``None``.
            role: ``"query"`` or ``"document"`` (which instruction prefix the texts get).
            text_weight / image_weight: fusion weights (default: the config's); non-negative, not both 0.
            batch_size / show_progress: as for ``encode_queries``.

        Returns:
            ``[n, dim]`` float32, each row of unit L2 norm.

        Raises:
            ValueError: bad role or weights, ``texts``/``images`` of different lengths, an item with neither
                text nor image, or a zero fused vector.
            UnsupportedInputError: images given to a text-only backend.
        """
        _check_role(role)
        tw, iw = validate_fusion_weights(
            self.text_weight if text_weight is None else text_weight,
            self.image_weight if image_weight is None else image_weight,
        )
        if texts is None and images is None:
            raise ValueError("encode needs texts, images or both; got neither")
        if isinstance(texts, str):
            raise ValueError("texts must be a list (one entry per input), not a single string")
        if texts is not None and images is not None and len(texts) != len(images):
            raise ValueError(
                f"texts has {len(texts)} items but images has {len(images)}; give one entry per input "
                "(None or [] where an input has no image, None where it has no text)"
            )
        n = len(texts) if texts is not None else len(images)  # type: ignore[arg-type]

        item_texts: list[str | None] = [None] * n
        if texts is not None:
            for i, t in enumerate(texts):
                if t is not None and not isinstance(t, str):
                    raise ValueError(f"texts[{i}] must be a string or None, got {type(t).__name__}")
                item_texts[i] = t if t else None
        item_images: list[list[Image]] = [[] for _ in range(n)]
        if images is not None:
            for i, entry in enumerate(images):
                if entry is None:
                    continue
                entry_list = [entry] if _is_image(entry) else entry
                if isinstance(entry_list, (str, bytes)) or not isinstance(entry_list, Sequence):
                    raise ValueError(
                        f"images[{i}] must be a PIL image, a list of PIL images or None, got {type(entry).__name__}"
                    )
                item_images[i] = list(entry_list)
        empty = [i for i in range(n) if item_texts[i] is None and not item_images[i]]
        if empty:
            raise ValueError(f"inputs {empty[:10]} have neither text nor images; every input needs one")

        out = np.zeros((n, self.dim), dtype=np.float32)
        if n == 0:
            return out
        text_idx = [i for i in range(n) if item_texts[i] is not None]
        if text_idx:
            text_vecs = self._encode_role(
                [item_texts[i] for i in text_idx],
                role,
                batch_size,
                show_progress,  # type: ignore[misc]
            )
        image_idx = [i for i in range(n) if item_images[i]]
        if image_idx:
            flat = [im for i in image_idx for im in item_images[i]]
            flat_vecs = self.encode_images(flat, batch_size=batch_size, show_progress=show_progress)
            bounds = np.cumsum([0] + [len(item_images[i]) for i in image_idx])
            image_vecs = l2_normalize(
                np.stack([flat_vecs[a:b].mean(axis=0) for a, b in zip(bounds[:-1], bounds[1:])]),
                "mean image embeddings",
            )
        text_pos = {i: p for p, i in enumerate(text_idx)}
        image_pos = {i: p for p, i in enumerate(image_idx)}
        for i in range(n):
            t = text_vecs[text_pos[i]] if i in text_pos else None
            v = image_vecs[image_pos[i]] if i in image_pos else None
            if t is not None and v is not None:
                out[i] = tw * t + iw * v
            else:
                out[i] = t if t is not None else v
        return l2_normalize(out, "fused text+image embeddings")

    # ------------------------------------------------------------------ helpers

    def _encode_role(
        self, texts: str | Sequence[str], role: str, batch_size: int | None, show_progress: bool
    ) -> np.ndarray:
        items = _as_text_list(texts, f"{role} texts")
        if not items:
            return np.zeros((0, self.dim), dtype=np.float32)
        prefix = self.instruction(role)
        prefixed = [prefix + t for t in items] if prefix else items
        out = self._encode_texts(prefixed, role, batch_size or self.batch_size, show_progress)
        return self._finish(out, len(items), f"{role} embeddings")

    def _finish(self, out: Any, n: int, what: str) -> np.ndarray:
        """Backend output (tensor, array or list of vectors) -> normalised float32 ``[n, dim]``."""
        arr = _to_numpy(out)
        if arr.shape != (n, self.dim):
            raise RuntimeError(
                f"{self.backend} embedder {self.model_id!r} returned {what} of shape {arr.shape}, "
                f"expected {(n, self.dim)}"
            )
        return l2_normalize(arr, f"{self.model_id} {what}")


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")


def _to_numpy(out: Any) -> np.ndarray:
    """A tensor, array or list of 1-D vectors as a float32 numpy array."""
    if isinstance(out, np.ndarray):
        return out.astype(np.float32, copy=False)
    if isinstance(out, (list, tuple)):
        return np.stack([_to_numpy(o) for o in out]) if out else np.zeros((0, 0), np.float32)
    if hasattr(out, "detach"):  # torch.Tensor, without importing torch here
        return out.detach().float().cpu().numpy()
    return np.asarray(out, dtype=np.float32)
