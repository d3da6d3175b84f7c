"""Add a trained adapter to a pool config, safely when several trainings finish at once.

``register_adapter(config_path, entry)`` adds the entry, or replaces the one with the same ``lora_name``, in
a pool config (a JSON list, see ``lora_retriever.pool``) through the one pool writer,
``lora_retriever.pool_config.pool_transaction``: locked, re-read under the lock, written atomically. Two
concurrent registrations both survive; a crash leaves the old file intact.

``register_trained_adapter`` does both for a freshly trained adapter (``train.py --register_pool``).

``write_adapter_key`` builds an adapter's retrieval key (mean embedding of N of its samples) into
``<config folder>/keys/<name>.npy`` with its ``.meta.json``, as ``python -m lora_retriever.embed_pool`` does;
with ``modality="image"`` its image key (mean image embedding) into ``<config folder>/keys/<name>.image.npy``.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lora_retriever.pool_config import default_key_path, pool_transaction, resolve_config_path, stored_entry
from swift.utils import get_logger
from swift.utils.files import atomic_write

logger = get_logger(__name__)

__all__ = ["register_adapter", "register_trained_adapter", "write_adapter_key"]


def register_adapter(
    config_path: str | Path,
    entry: dict[str, Any],
    *,
    lock_timeout: float = 120.0,
) -> dict[str, Any]:
    """Add ``entry`` to the pool config, replacing an entry with the same ``lora_name``; atomic and locked.

    Args:
        config_path: the pool config JSON; created (with its folder) if missing.
        entry: at least ``lora_name`` and ``lora_path``; any other fields are stored as given. Path fields
            (``lora_path``, ``embedding_path``, ``samples_path``) may be absolute or relative to the current
            directory; they are stored relative to the config's folder, as pool configs hold them.
        lock_timeout: seconds to wait for a concurrent writer to finish.

    Returns:
        The entry as stored (relative paths).

    Raises:
        ValueError: ``entry`` lacks ``lora_name`` / ``lora_path``, or the existing config isn't a JSON list of
            objects (it is left untouched; fix or move it).
        TimeoutError: the lock wasn't obtained within ``lock_timeout``.
    """
    missing = [name for name in ("lora_name", "lora_path") if not entry.get(name)]
    if missing:
        raise ValueError(f"entry is missing {missing}; a pool entry needs lora_name and lora_path.")
    stored = stored_entry(entry, config_path)
    name = stored["lora_name"]
    with pool_transaction(config_path, lock_timeout=lock_timeout) as entries:
        positions = [i for i, e in enumerate(entries) if e.get("lora_name") == name]
        if positions:
            entries[positions[0]] = stored
            for index in reversed(positions[1:]):
                logger.warning(
                    "%s held %r more than once; dropping the duplicate at index %d", config_path, name, index
                )
                del entries[index]
            logger.info("replaced adapter %r in %s", name, config_path)
        else:
            entries.append(stored)
            logger.info("added adapter %r to %s (%d adapters)", name, config_path, len(entries))
    return stored


def write_adapter_key(
    config_path: str | Path,
    lora_name: str,
    samples: Sequence[tuple[str, str]] | Sequence[tuple[str, Sequence[Path]]],
    *,
    embedder: Any,
    modality: str = "text",
    num_samples: int = 20,
    seed: int = 0,
    samples_path: str | Path | None = None,
    text_weight: float | None = None,
) -> Path:
    """Embed ``num_samples`` of ``samples`` into ``<config folder>/keys/<lora_name>.npy`` (+ ``.meta.json``),
    or for ``modality="image"`` into ``<lora_name>.image.npy``.

    Args:
        config_path: the pool config the key belongs to.
        lora_name: the adapter's name (the key file's name).
        samples: ``(sample id, input text)`` pairs (text key), or ``(sample id, image files)`` pairs (image
            key), e.g. from the training split.
        embedder: a ``lora_retriever.embedders.Embedder``: the text embedder (``encode_queries``) or the image
            embedder (``encode_images``).
        modality: ``"text"`` or ``"image"``.
        num_samples: samples averaged into the key (all if fewer).
        seed: chooses the samples.
        samples_path: recorded in the metadata.
        text_weight: image keys: the fusion weight recorded with them (default 0.7).

    Returns:
        The key file's path.
    """
    from lora_retriever.embed_pool import embed_key

    key_path = default_key_path(config_path, lora_name, modality)
    ids = embed_key(
        key_path,
        embedder,
        samples,
        modality=modality,
        num_samples=num_samples,
        seed=seed,
        samples_path=samples_path,
        text_weight=text_weight,
    )
    logger.info(
        "wrote the %s retrieval key of %r (%d samples) to %s", modality, lora_name, len(ids), key_path
    )
    return key_path


def register_trained_adapter(
    config_path: str | Path,
    *,
    lora_name: str,
    lora_path: str | Path,
    samples: Sequence[tuple[str, str]],
    samples_path: str | Path,
    embedder: Any,
    num_key_samples: int = 20,
    seed: int = 0,
    copy_samples: bool = False,
    fields: dict[str, Any] | None = None,
    image_embedder: Any | None = None,
    image_samples: Sequence[tuple[str, Sequence[Path]]] = (),
    text_weight: float | None = None,
) -> dict[str, Any]:
    """Write the adapter's retrieval key (and image key), then add (or replace) its pool entry; the entry
    comes last, so the config never names a key that isn't there yet.

    Args:
        config_path: the pool config JSON.
        lora_name / lora_path: the adapter's name and folder.
        samples: ``(sample id, input text)`` pairs to build the key from (the training split); empty texts
            (image-only queries) are left out.
        samples_path: the training data file; the entry points at it, or at a copy in
            ``<config folder>/samples/<lora_name><suffix>`` with ``copy_samples``.
        embedder: embeds the key samples (``encode_queries``).
        num_key_samples / seed: how many samples go into the key, and which.
        fields: more entry fields (``description``, ``task``, ``category``, ``base_model``, ...).
        image_embedder: with ``image_samples``, builds the adapter's image key (``image_embedding_path``);
            ``None``, or no sample with images: no image key (the adapter is scored on text alone).
        image_samples: ``(sample id, image files)`` of the samples that have images.
        text_weight: the fusion weight recorded with the image key (default 0.7).

    Returns:
        The entry as stored.

    Raises:
        ValueError: no sample has text to embed.
    """
    config_path = resolve_config_path(config_path)
    samples_path = Path(samples_path).expanduser().absolute()
    if copy_samples:
        samples_path = _copy_file(
            samples_path, config_path.parent / "samples" / f"{lora_name}{samples_path.suffix}"
        )
    texts = [(sample_id, text) for sample_id, text in samples if text.strip()]
    if not texts:
        raise ValueError(
            f"no sample of {lora_name!r} has text to embed into a retrieval key (image-only queries?); build its "
            "key another way and call register_adapter."
        )
    key_path = write_adapter_key(
        config_path,
        lora_name,
        texts,
        embedder=embedder,
        num_samples=num_key_samples,
        seed=seed,
        samples_path=samples_path,
    )
    entry = {
        "lora_name": lora_name,
        "lora_path": str(Path(lora_path).expanduser().absolute()),
        "embedding_path": str(key_path),
        "samples_path": str(samples_path),
        **(fields or {}),
    }
    if image_embedder is not None and image_samples:
        entry["image_embedding_path"] = str(
            write_adapter_key(
                config_path,
                lora_name,
                image_samples,
                embedder=image_embedder,
                modality="image",
                num_samples=num_key_samples,
                seed=seed,
                samples_path=samples_path,
                text_weight=text_weight,
            )
        )
    elif image_embedder is not None:
        logger.info("%r: no training sample has images, so it gets no image key", lora_name)
    return register_adapter(config_path, entry)


def _copy_file(source: Path, target: Path) -> Path:
    """Copy ``source`` to ``target`` atomically (never a half-copied file)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with source.open("rb") as src:
        return atomic_write(target, lambda out: shutil.copyfileobj(src, out))
