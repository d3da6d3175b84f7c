"""Merge LoRA adapters into one PEFT adapter: ``merge_adapters(MergeConfig(...))`` (CLI: ``lora-retriever-merge``,
also ``python -m lora_retriever.merge``).

    lora-retriever-merge --adapters adapters/a adapters/b --weights 0.5 0.5 --method cat --out merged

Methods: the ``lora_retriever.fusion`` registry — ``cat`` (exact, rank = sum of ranks), ``linear``
(LoraRetriever's fusion: A and B averaged separately), ``svd`` (exact weighted sum re-factored, truncated to
``svd_rank``), ``ties``, ``dare_linear``, ``dare_ties`` (``density``). The output loads with plain
``PeftModel.from_pretrained``.

Never destroys: ``out`` must be new or empty unless ``overwrite`` is set, and may never be (or contain) one of
the inputs; the adapter is written to a temporary folder beside ``out`` and moved into place when complete.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from swift.utils import get_logger
from swift.utils.files import replace_dir, temp_name

logger = get_logger(__name__)

__all__ = ["MergeConfig", "check_merge_output", "merge_adapters"]


def _fusion_methods() -> list[str]:
    from lora_retriever.fusion import available_methods  # the registry: the one list of fusion methods

    return available_methods()


@dataclass
class MergeConfig:
    """One merge; each field's ``help`` is also its ``lora-retriever-merge`` flag's help."""

    adapters: list[str] = field(metadata={"help": "PEFT adapter directories to merge"})
    out: str = field(metadata={"help": "output adapter directory (new or empty, unless --overwrite)"})
    weights: list[float] | None = field(
        default=None, metadata={"help": "one weight per adapter (default 1/k)"}
    )
    method: str = field(default="cat", metadata={"help": "fusion method", "choices": _fusion_methods})
    svd_rank: int | None = field(default=None, metadata={"help": "svd: rank to keep (default: exact)"})
    density: float | None = field(default=None, metadata={"help": "ties/dare: fraction of entries kept"})
    seed: int | None = field(default=None, metadata={"help": "dare: seed of the random drop"})
    base_model_name_or_path: str | None = field(
        default=None, metadata={"help": "recorded in adapter_config.json"}
    )
    overwrite: bool = field(default=False, metadata={"help": "replace a non-empty --out (never an input)"})

    def __post_init__(self) -> None:
        if not self.adapters:
            raise ValueError("adapters is empty; pass at least one adapter directory (--adapters DIR ...)")
        if not self.out:
            raise ValueError("out is empty; pass the output adapter directory (--out DIR)")
        if self.method not in _fusion_methods():
            raise ValueError(f"method must be one of {_fusion_methods()}, got {self.method!r}")

    def options(self) -> dict[str, Any]:
        """The method options that were set (``svd_rank``, ``density``, ``seed``)."""
        return {k: getattr(self, k) for k in ("svd_rank", "density", "seed") if getattr(self, k) is not None}


def check_merge_output(out: str | Path, adapters: list[str], *, overwrite: bool) -> Path:
    """Check that writing ``out`` destroys nothing: not an input (nor a folder holding one), and new or empty
    unless ``overwrite``.

    Returns:
        ``out`` as an absolute path.

    Raises:
        ValueError: ``out`` is one of the inputs or contains one (even with ``overwrite``).
        FileExistsError: ``out`` is a non-empty folder and ``overwrite`` is False.
        NotADirectoryError: ``out`` is a file.
    """
    target = Path(out).expanduser().resolve()
    for adapter in adapters:
        source = Path(adapter).expanduser().resolve()
        if target == source or target in source.parents:
            raise ValueError(
                f"--out {str(out)!r} is {'the input' if target == source else 'a folder holding the input'} "
                f"{str(adapter)!r}; merging into it would destroy that adapter. Pass a new directory as --out."
            )
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"--out {str(out)!r} is a file; pass a directory for the merged adapter")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(
            f"--out {str(out)!r} is not empty; pass a new directory, or --overwrite to replace its contents"
        )
    return target


def merge_adapters(config: MergeConfig) -> dict[str, Any]:
    """Fuse ``config.adapters`` and write the result to ``config.out``.

    Returns:
        A summary: ``out``, ``method``, ``sources``, ``weights``, ``max_rank`` (and ``max_truncation_error``).

    Raises:
        ValueError / FileExistsError / NotADirectoryError: see ``check_merge_output``; bad weights or options,
            unreadable adapters (``AdapterLoadError``).
        PermissionError: the folder of ``out`` is not writable.
    """
    from lora_retriever.fusion import fuse

    target = check_merge_output(config.out, config.adapters, overwrite=config.overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(target)
    tmp.mkdir()  # a normal folder's mode (mkdtemp would make it 0700)
    try:
        fused = fuse([Path(a) for a in config.adapters], config.weights, config.method, **config.options())
        fused.save(tmp, base_model_name_or_path=config.base_model_name_or_path)
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("merged %d adapters (%s) into %s", len(config.adapters), config.method, target)
    summary: dict[str, Any] = {
        "out": str(config.out),
        "method": config.method,
        "sources": fused.sources,
        "weights": fused.weights,
        "max_rank": max(fused.ranks.values()),
    }
    if fused.truncation_error:
        summary["max_truncation_error"] = max(fused.truncation_error.values())
    return summary


def main(argv: list[str] | None = None) -> int:
    """``python -m lora_retriever.merge``: the ``lora-retriever-merge`` command."""
    from lora_retriever.cli.merge import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
