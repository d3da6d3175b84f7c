"""Reading adapters for spectral editing: ``swift.tuners.peft_format`` plus the editing-specific refusals.

The format itself (key dialects, pairing, ``rank_pattern`` / ``alpha_pattern``, scaling, the writer) lives in
``swift.tuners.peft_format``; this module only adds what editing needs on top: a lenient read (a weights file
or a directory without ``adapter_config.json`` is fine; tensors that aren't A/B pairs are kept and written back
unchanged) and the refusal of DoRA, whose output is not ``s·B·A``.
"""

from __future__ import annotations

from pathlib import Path

from swift.tuners.peft_format import LoraAdapter, read_adapter_dir

__all__ = ["load_lora_adapter"]


def load_lora_adapter(path: str | Path, *, adapter_name: str | None = None) -> LoraAdapter:
    """Read an adapter directory (or weights file) for editing: config, state dict, paired factors.

    Raises:
        FileNotFoundError: the path, or the directory's weights file, doesn't exist.
        AdapterLoadError (a ValueError): see ``swift.tuners.peft_format.read_adapter_dir``; also DoRA (its
            output is renormalised per column, so ``s·U diag(σ) Vᵀ`` is not what it adds).
    """
    adapter = read_adapter_dir(path, adapter_name=adapter_name, strict=False)
    if adapter.config is not None and adapter.config.raw.get("use_dora"):
        raise ValueError(
            f"{adapter.path}: use_dora=True; DoRA rescales each output column by a learned magnitude, so editing "
            "the singular values of B·A is not what the adapter adds. Use a plain LoRA adapter."
        )
    return adapter
