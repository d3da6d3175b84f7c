"""A PEFT LoRA adapter on the embedding model itself (a retriever fine-tuned with LoRA).

The adapter is injected in place into the backend's transformers module (``PeftModel.from_pretrained``
wraps it and swaps the targeted ``nn.Linear`` layers for LoRA layers inside the same module object), so
the backend's own encode path runs through it unchanged.

Behaviour (what users of embedding adapters expect):

- the directory is validated strictly (exists, is a directory, has ``adapter_config.json``, is a LoRA);
- no ``peft`` installed -> a loud warning naming the adapter and ``pip install peft``, and the base model
  is used;
- loading the same directory again is a no-op; loading another one replaces the first (it is unloaded,
  restoring the base weights, then the new one is loaded);
- an adapter whose ``lora_B`` weights are all zero changes nothing (an untrained adapter, or weights
  whose names did not match this model, so PEFT left its zero init) -> ``ValueError``;
- the load time is logged in ms.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_retriever.embedders.config import ADAPTER_CONFIG_NAME, validate_adapter_path

if TYPE_CHECKING:
    from torch import nn

__all__ = ["LoraAdapterMixin", "adapter_weights_digest", "check_lora_b_nonzero"]

logger = logging.getLogger(__name__)


def _check_is_lora(path: Path) -> None:
    config_file = path / ADAPTER_CONFIG_NAME
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {config_file}: {err}; re-save the adapter with PEFT") from err
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise ValueError(
            f"{config_file} has peft_type={config.get('peft_type')!r}; only LoRA adapters are supported "
            "on the embedding model (peft_type 'LORA')"
        )


def adapter_weights_digest(path: str | Path) -> str:
    """The first 12 hex digits of the SHA-256 of an adapter directory's weight files (``adapter_model.*``):
    the identity key metadata records with the adapter's folder name, so keys built with one training of an
    adapter are never compared with queries embedded by another saved under the same name."""
    import hashlib

    digest = hashlib.sha256()
    for weights in sorted(Path(path).glob("adapter_model.*")):
        digest.update(weights.name.encode())
        with weights.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:12]


def check_lora_b_nonzero(module: nn.Module, adapter_path: str | Path) -> None:
    """Raise if ``module`` has no LoRA ``B`` weights or all of them are zero (the adapter is a no-op).

    Raises:
        ValueError: naming the adapter path and the likely causes.
    """
    b_params = [
        p for name, p in module.named_parameters() if ".lora_B." in name or ".lora_embedding_B." in name
    ]
    if not b_params:
        raise ValueError(
            f"LoRA adapter {adapter_path} put no lora_B weights into the embedding model; check that its "
            "target_modules name modules of this model"
        )
    if all(not bool(p.detach().any()) for p in b_params):
        raise ValueError(
            f"LoRA adapter {adapter_path}: all {len(b_params)} lora_B weights are zero, so it changes nothing "
            "(an untrained adapter, or saved weights whose names do not match this model and were not "
            "loaded); train it, or check that it was made for this embedding model"
        )


class LoraAdapterMixin:
    """Adds ``load_adapter`` / ``unload_adapter`` to an ``Embedder`` whose model is a torch module.

    The host class provides ``model_id``, ``adapter_loaded``, ``adapter_path`` (from ``Embedder``) and
    ``_adapter_target()``: the transformers module to put the adapter on.
    """

    model_id: str
    adapter_loaded: bool
    adapter_path: str | None
    _peft_model: Any = None

    def _adapter_target(self) -> nn.Module:
        raise NotImplementedError

    def load_adapter(self, adapter_path: str | os.PathLike[str]) -> bool:
        """Load a PEFT LoRA adapter onto the embedding model.

        Idempotent: the same directory again is a no-op. Another directory replaces the loaded adapter.

        Args:
            adapter_path: a PEFT adapter directory (``~`` is expanded).

        Returns:
            ``True`` if the adapter is active afterwards; ``False`` if ``peft`` is missing (warning logged;
            the base model is used).

        Raises:
            ValueError: invalid directory, not a LoRA adapter, or all ``lora_B`` weights zero.
        """
        path = validate_adapter_path(adapter_path)
        if self.adapter_loaded and self.adapter_path == str(path):
            logger.info(
                "embedder LoRA adapter %s is already loaded on %s; nothing to do", path, self.model_id
            )
            return True
        try:
            from peft import PeftModel
        except ImportError:
            logger.warning(
                "peft is not installed, so the embedder's LoRA adapter %s can NOT be loaded: continuing with "
                "the BASE model %s (its vectors differ from the adapted model's). Install it with: "
                "pip install peft",
                path,
                self.model_id,
            )
            return False
        _check_is_lora(path)
        if self.adapter_loaded:
            logger.info("replacing the embedder's LoRA adapter %s with %s", self.adapter_path, path)
            self.unload_adapter()

        target = self._adapter_target()
        start = time.perf_counter()
        peft_model = PeftModel.from_pretrained(target, str(path), is_trainable=False)
        elapsed_ms = (time.perf_counter() - start) * 1000
        try:
            check_lora_b_nonzero(target, path)
        except ValueError:
            peft_model.unload()  # restore the base layers before reporting
            raise
        target.eval()
        self._peft_model = peft_model
        self.adapter_loaded = True
        self.adapter_path = str(path)
        self.adapter_digest = adapter_weights_digest(path)
        logger.info("loaded LoRA adapter %s on embedder %s in %.1f ms", path, self.model_id, elapsed_ms)
        return True

    def unload_adapter(self) -> None:
        """Remove the loaded adapter, restoring the base model exactly (no-op if none is loaded)."""
        if not self.adapter_loaded or self._peft_model is None:
            return
        self._peft_model.unload()
        logger.info("unloaded LoRA adapter %s from embedder %s", self.adapter_path, self.model_id)
        self._peft_model = None
        self.adapter_loaded = False
        self.adapter_path = None
        self.adapter_digest = None
