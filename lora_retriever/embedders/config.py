"""``EmbedderConfig``: which embedding model to load and how, validated when it is built.

Everything that can be checked without loading a model is checked in ``__post_init__`` (backend name,
dtype, batch size, fusion weights, and the embedder's optional PEFT adapter directory), so a bad config
fails at the entry point and not after minutes of indexing.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = [
    "BACKENDS",
    "DTYPES",
    "IMAGE_BACKENDS",
    "EmbedderConfig",
    "ImageRetrievalConfig",
    "VISION_MODEL_TYPES",
    "check_remote_code_allowed",
    "validate_adapter_path",
    "validate_fusion_weights",
    "validate_text_weight",
    "validate_vision_dir",
]

BACKENDS = ("sentence-transformers", "jina-v4", "clip", "vision-tower", "universal", "auto")
DTYPES = ("float32", "float16", "bfloat16")
ADAPTER_CONFIG_NAME = "adapter_config.json"
#: ``config.json`` model types the ``vision-tower`` backend loads: a LLaVA VLM (its vision tower) or a plain
#: CLIP / SigLIP vision model.
VISION_MODEL_TYPES = ("llava", "clip_vision_model", "siglip_vision_model")
#: backends that can be a retriever's image embedder.
IMAGE_BACKENDS = ("vision-tower", "clip", "universal")
_VISION_FIX = (
    "pass model_path (--image_embedder_path) a local LLaVA directory (LlavaForConditionalGeneration + its "
    "processor) or a CLIPVisionModel / SiglipVisionModel directory with its image processor"
)


def validate_adapter_path(adapter_path: str | os.PathLike[str]) -> Path:
    """Check a PEFT adapter directory for an embedder and return it, ``~`` expanded and absolute.

    Raises:
        ValueError: the path does not exist, is not a directory, or has no ``adapter_config.json``.
    """
    path = Path(adapter_path).expanduser().absolute()
    if not path.exists():
        raise ValueError(
            f"embedder adapter_path {str(adapter_path)!r} does not exist (resolved to {path}); "
            "pass the directory written by PEFT's save_pretrained, or adapter_path=None for the base model"
        )
    if not path.is_dir():
        raise ValueError(
            f"embedder adapter_path {str(path)!r} is a file, not a directory; pass the adapter directory "
            f"that holds {ADAPTER_CONFIG_NAME} and adapter_model.safetensors"
        )
    if not (path / ADAPTER_CONFIG_NAME).is_file():
        raise ValueError(
            f"embedder adapter_path {str(path)!r} has no {ADAPTER_CONFIG_NAME}: it is not a PEFT adapter "
            "directory; pass the directory written by PEFT's save_pretrained"
        )
    return path


def validate_vision_dir(model_path: str | os.PathLike[str]) -> tuple[Path, str]:
    """Check, without loading it, that a directory holds a vision model the ``vision-tower`` backend loads.

    Returns:
        The absolute path and its ``config.json`` model type (one of ``VISION_MODEL_TYPES``).

    Raises:
        FileNotFoundError: the path does not exist or has no ``config.json``.
        ValueError: the path is a file, its model type is not a vision model, or it has no image processor
            (``preprocessor_config.json``, or a ``processor_config.json`` with an ``image_processor``).
    """
    path = Path(model_path).expanduser().absolute()
    if not path.exists():
        raise FileNotFoundError(f"image embedder model_path {str(path)!r} does not exist; {_VISION_FIX}")
    if not path.is_dir():
        raise ValueError(f"image embedder model_path {str(path)!r} is a file, not a directory; {_VISION_FIX}")
    try:
        model_type = json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type")
    except FileNotFoundError:
        raise FileNotFoundError(
            f"image embedder model_path {str(path)!r} has no config.json (not a model directory); {_VISION_FIX}"
        ) from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise ValueError(f"image embedder model_path {str(path)!r}: unreadable config.json ({err})") from err
    if model_type not in VISION_MODEL_TYPES:
        raise ValueError(
            f"image embedder model_path {str(path)!r} holds a {model_type!r} model, not a vision model "
            f"(model types {list(VISION_MODEL_TYPES)}); {_VISION_FIX}"
        )
    if not _has_image_processor(path):
        raise ValueError(
            f"image embedder model_path {str(path)!r} has no image processor (preprocessor_config.json, or "
            "processor_config.json with an image_processor); save it beside the model with "
            "image_processor.save_pretrained (or the VLM's processor.save_pretrained)"
        )
    return path, model_type


def _has_image_processor(path: Path) -> bool:
    if (path / "preprocessor_config.json").is_file():
        return True
    try:
        data = json.loads((path / "processor_config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and "image_processor" in data


def check_remote_code_allowed(config: EmbedderConfig) -> None:
    """jina-embeddings-v4's model class is code inside its directory: load it only when the user said so.

    Raises:
        PermissionError: ``config.trust_remote_code`` is False (names the flag to pass).
    """
    if not config.trust_remote_code:
        raise PermissionError(
            f"embedder backend {config.backend!r} (model_path {config.model_path!r}) runs "
            "jina-embeddings-v4's model class, which is code inside that directory; running it executes that "
            "code. Pass --trust_remote_code (trust_remote_code=True) if you trust it, or use the "
            "sentence-transformers or clip backend."
        )


def validate_fusion_weights(text_weight: float, image_weight: float) -> tuple[float, float]:
    """Check the text/image fusion weights: finite, non-negative, not both zero.

    Returns:
        The weights as floats.

    Raises:
        ValueError: naming the bad weight.
    """
    out = []
    for name, value in (("text_weight", text_weight), ("image_weight", image_weight)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} must be a number, got {value!r}")
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        out.append(float(value))
    if out[0] == 0 and out[1] == 0:
        raise ValueError(
            "text_weight and image_weight are both 0: a query with text and images would have no vector; "
            "give at least one a positive weight (default 0.5 / 0.5)"
        )
    return out[0], out[1]


def validate_text_weight(text_weight: float | None) -> float | None:
    """Check the score-fusion text weight ``a`` (``a * cos(text) + (1 - a) * cos(image)``): a number in
    ``[0, 1]``, or ``None`` (use the weight stored with the image keys, else 0.7).

    Raises:
        ValueError: naming the value and the range.
    """
    if text_weight is None:
        return None
    if (
        isinstance(text_weight, bool)
        or not isinstance(text_weight, (int, float))
        or not 0 <= text_weight <= 1
    ):
        raise ValueError(
            f"text_weight must be a number in [0, 1] (the text share of the fused retrieval score) or None, "
            f"got {text_weight!r}"
        )
    return float(text_weight)


@dataclass
class EmbedderConfig:
    """How to build an ``Embedder`` (see ``get_embedder``).

    Attributes:
        backend: ``"sentence-transformers"`` (any local sentence-transformers folder; text only),
            ``"jina-v4"`` (a local jina-embeddings-v4 snapshot; text and images, needs remote code),
            ``"clip"`` (a local transformers CLIP folder; text and images), ``"vision-tower"`` (images only: the
            vision tower of a local LLaVA folder, or a CLIP / SigLIP vision model; the retriever's
            ``image_embedder``) or ``"auto"`` (jina-v4 or CLIP if
            ``model_path`` is one, a sentence-transformers folder as such, else the packaged default with a
            warning).
        model_path: local model directory; ``None`` means the packaged all-MiniLM-L6-v2 (sentence-transformers
            and auto only). ``~`` is expanded.
        model_id: the name stored with keys and indexes; ``None`` derives it from the path (the folder
            name; ``all-MiniLM-L6-v2`` for the packaged default). Set it when the folder name is not the
            model's name.
        adapter_path: optional PEFT LoRA adapter directory for the embedding model (sentence-transformers and
            clip). ``~`` is expanded; it must exist, be a directory and hold ``adapter_config.json``.
        device: torch device string, e.g. ``"cpu"``, ``"cuda:0"``.
        dtype: ``"float32"`` (default; this project's CPUs have no bf16 units), ``"float16"`` or ``"bfloat16"``.
        batch_size: texts/images per forward pass.
        text_weight / image_weight: fusion weights for inputs that have both text and images
            (weighted sum of the normalised vectors, renormalised). Non-negative, not both 0.
        query_instruction: prefix put before every query text; ``None`` = the backend's default
            (``DEFAULT_INSTRUCTION`` for sentence-transformers; none for jina-v4, which has its own
            query/passage prompts, and CLIP, which was not trained with instructions); ``""`` = no prefix.
        document_instruction: prefix for document texts; ``None`` = the same as the query prefix (adapter
            key samples and queries get the same prefix, as the LoraRetriever paper does).
        trust_remote_code: allow a model's own code (shipped in its directory) to run; required by
            ``jina-v4``, whose model class is remote code — as ``swift.llm`` requires it for such checkpoints.
    """

    backend: str = field(
        default="sentence-transformers",
        metadata={
            "help": "retrieval embedder backend (jina-v4 needs --trust_remote_code; vision-tower embeds images only)",
            "choices": BACKENDS,
        },
    )
    model_path: str | None = field(
        default=None, metadata={"help": "local embedder directory (default: the packaged all-MiniLM-L6-v2)"}
    )
    model_id: str | None = field(default=None, metadata={"help": "id stored with keys; None = from the path"})
    adapter_path: str | None = field(default=None, metadata={"help": "PEFT LoRA dir for the embedder"})
    device: str = field(default="cpu", metadata={"help": "torch device"})
    dtype: str = field(default="float32", metadata={"help": f"one of {DTYPES}"})
    batch_size: int = field(default=32, metadata={"help": "inputs per forward pass"})
    text_weight: float = field(default=0.5, metadata={"help": "fusion weight of the text vector"})
    image_weight: float = field(default=0.5, metadata={"help": "fusion weight of the image vector"})
    query_instruction: str | None = field(default=None, metadata={"help": "query prefix; None = backend's"})
    document_instruction: str | None = field(default=None, metadata={"help": "None = query_instruction"})
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "allow the embedder's own model code (in its directory) to run; jina-v4 needs it"},
    )

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"EmbedderConfig.backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.model_path is not None:
            if not isinstance(self.model_path, (str, os.PathLike)) or not str(self.model_path):
                raise ValueError(
                    f"EmbedderConfig.model_path must be a non-empty path, got {self.model_path!r}"
                )
            self.model_path = str(Path(self.model_path).expanduser())
        if self.backend == "vision-tower":
            if self.model_path is None:
                raise ValueError(f"backend='vision-tower' needs model_path; {_VISION_FIX}")
            validate_vision_dir(self.model_path)
            if self.adapter_path is not None:
                raise ValueError(
                    f"adapter_path={self.adapter_path!r} is not supported with backend='vision-tower'; drop it "
                    "(merge the adapter into the vision model first)"
                )
        if self.backend == "jina-v4" and self.model_path is None:
            raise ValueError(
                "backend='jina-v4' needs model_path: a local jina-embeddings-v4 directory (config.json, its "
                "remote-code *.py files and weights); or use backend='auto' to fall back to the packaged "
                "sentence-transformers model"
            )
        if self.model_id is not None and (not isinstance(self.model_id, str) or not self.model_id.strip()):
            raise ValueError(
                f"EmbedderConfig.model_id must be a non-empty string or None, got {self.model_id!r}"
            )
        if self.adapter_path is not None:
            if self.backend == "jina-v4":
                raise ValueError(
                    f"adapter_path={self.adapter_path!r} is not supported with backend='jina-v4' (the model "
                    "already carries its own task LoRAs); use backend='sentence-transformers' or 'clip'"
                )
            self.adapter_path = str(validate_adapter_path(self.adapter_path))
        if not isinstance(self.device, str) or not self.device:
            raise ValueError(
                f"EmbedderConfig.device must be a torch device string like 'cpu', got {self.device!r}"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"EmbedderConfig.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"EmbedderConfig.batch_size must be a positive integer, got {self.batch_size!r}")
        self.text_weight, self.image_weight = validate_fusion_weights(self.text_weight, self.image_weight)
        for name in ("query_instruction", "document_instruction"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"EmbedderConfig.{name} must be a string or None, got {value!r}")
        if self.backend == "jina-v4":
            check_remote_code_allowed(self)

    def to_dict(self) -> dict[str, Any]:
        """All fields as a JSON-serialisable dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EmbedderConfig:
        """Build from a dict (e.g. JSON); unknown keys are an error, not silently dropped.

        Raises:
            ValueError: unknown keys, or any field validation error.
        """
        if not isinstance(data, dict):
            raise ValueError(f"EmbedderConfig.from_dict needs a dict, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown EmbedderConfig keys {unknown}; valid keys are {sorted(known)}")
        return cls(**data)


@dataclass
class ImageRetrievalConfig:
    """The image side of retrieval (score-level fusion), as the entry points take it: which image embedder
    builds image keys and embeds query images, and the fusion weight.

    Attributes:
        image_embedder: ``"vision-tower"`` (a VLM's vision tower) or ``"clip"``; ``None`` with a path means
            ``"vision-tower"``; ``None`` without one: no image keys, text-only retrieval.
        image_embedder_path: the local model directory (checked up front: exists, a vision model, has an
            image processor).
        fusion_text_weight: ``a`` in ``a * cos(text) + (1 - a) * cos(image)`` (flag ``--text_weight``; not
            ``EmbedderConfig.text_weight``, which mixes vectors of one shared-space embedder); ``None`` = the
            weight stored with the image keys, else 0.7 (the seed's).
    """

    image_embedder: str | None = field(
        default=None,
        metadata={
            "help": "image embedder for image keys and image-aware retrieval (vision-tower: a VLM's vision tower)",
            "choices": IMAGE_BACKENDS,
        },
    )
    image_embedder_path: str | None = field(
        default=None,
        metadata={"help": "local LLaVA / CLIP-vision / SigLIP-vision directory for --image_embedder"},
    )
    fusion_text_weight: float | None = field(
        default=None,
        metadata={
            "help": "a in a*cos(text) + (1-a)*cos(image) (retrieval score fusion); default: the weight stored "
            "with the image keys, else 0.7",
            "flag": "text_weight",
        },
    )

    def __post_init__(self) -> None:
        if self.image_embedder is not None and self.image_embedder not in IMAGE_BACKENDS:
            raise ValueError(f"image_embedder must be one of {IMAGE_BACKENDS}, got {self.image_embedder!r}")
        if self.image_embedder is not None and self.image_embedder_path is None:
            raise ValueError(
                f"--image_embedder {self.image_embedder} needs --image_embedder_path: a local model directory"
            )
        if self.image_embedder is None and self.image_embedder_path is not None:
            self.image_embedder = "vision-tower"
        self.fusion_text_weight = validate_text_weight(self.fusion_text_weight)
        self.embedder_config()  # checks the directory before any model loads

    def embedder_config(self, device: str = "cpu") -> EmbedderConfig | None:
        """The image embedder's ``EmbedderConfig`` (validated), or ``None`` when none is asked for."""
        if self.image_embedder is None:
            return None
        return EmbedderConfig(backend=self.image_embedder, model_path=self.image_embedder_path, device=device)
