"""Build the small VLM once per recipe and cache it: ``build_vlm(recipe) -> $LORA_RETRIEVER_CACHE/vlm/<hash>/``.

The folder is an ordinary Hugging Face LLaVA directory (``config.json``, ``model.safetensors``, tokenizer,
processor, chat template) plus ``build.json``: the recipe, its hash, the held-out accuracy per image domain,
the build time of each stage and the CPU it was measured on. A folder whose ``build.json`` carries the
recipe's hash is reused (nothing is loaded: well under a second); another recipe gets another folder.

Atomic: everything is written into a temporary folder beside the target, which is renamed into place only
when complete, so an interrupted build leaves no folder that looks finished; two concurrent builds of one
recipe both succeed and the first rename wins.

Stages (times in ``build.json``): compose (``compose.compose_llava``), vision pre-training
(``pretrain.pretrain_vision``), alignment through the frozen LM (``train.align_vision``), held-out
evaluation (``train.heldout_accuracy``), save.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from lora_retriever.vlm.recipe import BUILD_VERSION, VlmRecipe
from swift.utils import cache_dir, cpu_summary, get_logger
from swift.utils.files import replace_dir

logger = get_logger(__name__)

__all__ = ["BUILD_INFO", "build_vlm", "read_build_info", "resolve_recipe", "vlm_dir"]

BUILD_INFO = "build.json"
CACHE_SUBDIR = "vlm"


def resolve_recipe(recipe: VlmRecipe | None = None) -> VlmRecipe:
    """``recipe`` (default ``VlmRecipe()``) with ``image_size`` taken from the multimodal suite when unset."""
    from lora_retriever.tasks.multimodal import IMAGE_SIZE

    return (recipe or VlmRecipe()).resolved(IMAGE_SIZE)


def vlm_dir(recipe: VlmRecipe | None = None, *, cache_root: str | Path | None = None) -> Path:
    """The cache folder of ``recipe``'s VLM (built or not): ``<cache_root or $LORA_RETRIEVER_CACHE/vlm>/<hash>``."""
    resolved = resolve_recipe(recipe)
    root = Path(cache_root).expanduser() if cache_root is not None else cache_dir(CACHE_SUBDIR)
    return root / resolved.recipe_hash()


def read_build_info(path: str | Path) -> dict[str, Any]:
    """The ``build.json`` of a built VLM folder.

    Raises:
        FileNotFoundError: ``path`` has no ``build.json`` (not a folder ``build_vlm`` finished).
    """
    info_path = Path(path) / BUILD_INFO
    if not info_path.is_file():
        raise FileNotFoundError(
            f"{path} has no {BUILD_INFO}; it is not a finished VLM build. Run `python -m lora_retriever.vlm build`."
        )
    return json.loads(info_path.read_text(encoding="utf-8"))


def build_vlm(
    recipe: VlmRecipe | None = None,
    *,
    cache_root: str | Path | None = None,
    rebuild: bool = False,
    progress: bool = True,
) -> Path:
    """The VLM of ``recipe``: reused from the cache when built before, else built, evaluated and cached.

    Args:
        recipe: the build recipe (default ``VlmRecipe()``; ``image_size=None`` takes the suite's ``IMAGE_SIZE``).
        cache_root: folder holding one sub-folder per recipe hash (default ``$LORA_RETRIEVER_CACHE/vlm``).
        rebuild: build again even if the folder exists (it is replaced once the new build is complete).
        progress: progress bars with the loss.

    Returns:
        The folder, loadable with ``swift.llm.get_model_tokenizer("llava", folder)``.

    Raises:
        NotADirectoryError / PermissionError: the cache folder can't be written.
    """
    from swift.utils.files import ensure_writable_dir

    resolved = resolve_recipe(recipe)
    recipe_hash = resolved.recipe_hash()
    target = vlm_dir(resolved, cache_root=cache_root)
    if not rebuild and _is_built(target, recipe_hash):
        logger.info("reusing the VLM built for recipe %s at %s", recipe_hash, target)
        return target
    ensure_writable_dir(target.parent, argument="cache folder")
    logger.info(
        "building the VLM for recipe %s (%s) into %s", recipe_hash, json.dumps(resolved.to_dict()), target
    )
    tmp = Path(tempfile.mkdtemp(prefix=f".{recipe_hash}-", suffix=".building", dir=target.parent))
    try:
        info = _build_into(tmp, resolved, recipe_hash, progress=progress)
        if rebuild and target.exists():
            replace_dir(tmp, target)
        else:
            try:
                os.rename(tmp, target)
            except OSError:
                if not _is_built(target, recipe_hash):  # not a concurrent build that finished first
                    raise
                logger.info("another build of recipe %s finished first; keeping it", recipe_hash)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info(
        "built %s in %.0f s: held-out accuracy %s",
        target,
        info["seconds"]["total"],
        json.dumps(info["heldout"]["per_domain"]),
    )
    return target


def _is_built(folder: Path, recipe_hash: str) -> bool:
    info_path = folder / BUILD_INFO
    if not info_path.is_file():
        return False
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return info.get("recipe_hash") == recipe_hash and (folder / "config.json").is_file()


def _build_into(folder: Path, recipe: VlmRecipe, recipe_hash: str, *, progress: bool) -> dict[str, Any]:
    """Compose, train, evaluate and save the VLM of ``recipe`` into ``folder``; returns ``build.json``'s data."""
    from lora_retriever.vlm.compose import compose_llava
    from lora_retriever.vlm.data import caption_data
    from lora_retriever.vlm.pretrain import pretrain_vision
    from lora_retriever.vlm.train import align_vision, encode_examples, heldout_accuracy
    from swift.llm import get_template
    from swift.llm.model import SMOLLM2_HUB_ID, smollm2_hf_dir

    seconds: dict[str, float] = {}
    started = clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = round(now - clock, 1)
        clock = now

    model, processor = compose_llava(recipe, smollm2_hf_dir())
    train_data = caption_data("train", recipe.train_examples, recipe.seed, recipe.weights())
    heldout = caption_data("heldout", recipe.heldout_examples, recipe.seed)
    lap("compose")
    pretrain = pretrain_vision(model, processor, train_data, recipe, heldout=heldout, progress=progress)
    lap("pretrain")
    template = get_template("llava", processor)
    examples = encode_examples(
        template, train_data.examples[: recipe.steps * recipe.batch_size], progress=progress
    )
    losses = align_vision(
        model, examples, recipe, pad_token_id=processor.tokenizer.pad_token_id, progress=progress
    )
    lap("align")
    accuracy = (
        heldout_accuracy(model, processor, heldout.examples, heldout.domains, progress=progress)
        if heldout.examples
        else {"accuracy": None, "per_domain": {}, "counts": {}, "examples": []}
    )
    lap("evaluate")
    model.config.name_or_path = str(folder.parent / recipe_hash)
    model.save_pretrained(str(folder))
    processor.save_pretrained(str(folder))
    lap("save")
    seconds["total"] = round(time.perf_counter() - started, 1)
    info = {
        "recipe": recipe.to_dict(),
        "recipe_hash": recipe_hash,
        "build_version": BUILD_VERSION,
        "language_model": SMOLLM2_HUB_ID,
        "image_tokens": recipe.image_tokens,
        "heldout": accuracy,
        "pretrain": pretrain,
        "align_loss_first": losses[0],
        "align_loss_last10": sum(losses[-10:]) / len(losses[-10:]),
        "seconds": seconds,
        "cpu": cpu_summary(),
        "torch_threads": torch.get_num_threads(),
        "versions": _versions(),
        "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    (folder / BUILD_INFO).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return info


def _versions() -> dict[str, str]:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}
