"""Who made a set of vectors: stored with every key and index, and checked before vectors are compared.

Vectors from two embedders (another model, dimension, instruction prefix or embedder adapter) are not
comparable; cosine similarity between them is a silently wrong answer. ``check_compatible`` turns that
into an error.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

__all__ = ["EmbeddingMeta", "check_compatible"]


@dataclass(frozen=True)
class EmbeddingMeta:
    """The identity of the embedder that produced a set of vectors.

    Attributes:
        model_id: the embedding model's name (``Embedder.model_id``).
        dim: vector dimension.
        instruction: the text prefix used (``""`` for none; ``None`` if unknown, e.g. legacy keys).
        adapter: name of the PEFT adapter on the embedder (``None`` for the base model).
        backend: the backend that ran the model (informational; not compared).
        text_weight: for image keys only, the text weight ``a`` of the score fusion
            ``a * cos(text) + (1 - a) * cos(image)`` the pool was built for (travels with the keys; the
            retriever uses it unless told otherwise). Not an embedder property: not compared here.
    """

    model_id: str
    dim: int
    instruction: str | None = None
    adapter: str | None = None
    backend: str | None = None
    text_weight: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """As a JSON-serialisable dict (``text_weight`` only when set: text keys have none)."""
        data = asdict(self)
        if data["text_weight"] is None:
            del data["text_weight"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EmbeddingMeta:
        """Read from a ``.meta.json``-style dict; keys that are not fields (sample ids, date...) are ignored.

        Raises:
            ValueError: ``model_id`` or ``dim`` missing.
        """
        if "model_id" not in data or "dim" not in data:
            raise ValueError(f"embedding metadata needs 'model_id' and 'dim', got keys {sorted(data)}")
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        kwargs["dim"] = int(kwargs["dim"])
        if kwargs.get("text_weight") is not None:
            kwargs["text_weight"] = float(kwargs["text_weight"])
        return cls(**kwargs)


def check_compatible(a: EmbeddingMeta, b: EmbeddingMeta, what: str = "vectors") -> None:
    """Raise if vectors described by ``a`` and ``b`` cannot be compared.

    Compared: ``model_id``, ``dim``, ``adapter``, and ``instruction`` when both are known.

    Args:
        a, b: the two identities (e.g. the adapter keys' and the query embedder's).
        what: what is being compared, for the message (e.g. ``"adapter keys vs query embedder"``).

    Raises:
        ValueError: naming both model ids and dims (and the differing field), and the fix.
    """
    problems = []
    if a.model_id != b.model_id:
        problems.append(f"model_id {a.model_id!r} vs {b.model_id!r}")
    if a.dim != b.dim:
        problems.append(f"dim {a.dim} vs {b.dim}")
    if a.adapter != b.adapter:
        problems.append(f"embedder adapter {a.adapter!r} vs {b.adapter!r}")
    if a.instruction is not None and b.instruction is not None and a.instruction != b.instruction:
        problems.append(f"instruction prefix {a.instruction!r} vs {b.instruction!r}")
    if problems:
        raise ValueError(
            f"{what}: embedded by different embedders ({a.model_id!r}, {a.dim}-d vs {b.model_id!r}, "
            f"{b.dim}-d): {'; '.join(problems)}. Their similarities would be meaningless; re-embed one side "
            "with the other's embedder (same model, adapter and instruction)."
        )
