"""The model to train: the base model (fp32, or 4-bit NF4 / int8 through bitsandbytes) with PEFT LoRA layers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from swift.utils import get_logger

logger = get_logger(__name__)

__all__ = ["add_lora", "load_base_model"]

# Never quantised: the output head (tied to the embeddings in small models) and VLM vision towers /
# projectors. bitsandbytes matches these by prefix of the full module name.
_SKIP_QUANTIZATION = ["lm_head", "model.visual", "model.vision_tower", "model.multi_modal_projector"]


def load_base_model(
    model_type: str,
    model_path: str | None,
    *,
    quantization: str = "none",
    device: str = "cpu",
) -> tuple[nn.Module, Any]:
    """Load the base model and its tokenizer (text models) or processor (VLMs) through ``swift.llm``.

    Args:
        model_type: a ``swift.llm`` model type or ``"auto"``.
        model_path: local model directory (``None`` only for the packaged default model).
        quantization: ``"none"`` (fp32), ``"nf4"`` (4-bit NF4, fp32 compute: QLoRA) or ``"int8"``.
        device: where to put an fp32 model (bitsandbytes places quantised models itself).

    Returns:
        ``(model, tokenizer_or_processor)``; ``model.model_type`` is the resolved ``swift.llm`` type.

    Raises:
        ValueError: unknown ``model_type`` / ``quantization``, or quantising a remote-code checkpoint.
        ImportError: quantization without bitsandbytes installed.
    """
    from swift.llm import get_model_tokenizer

    if quantization == "none":
        return get_model_tokenizer(model_type, model_path, dtype=torch.float32, device=device)
    if quantization not in ("nf4", "int8"):
        raise ValueError(f"quantization must be 'none', 'nf4' or 'int8', got {quantization!r}.")
    return _load_quantized(model_type, model_path, quantization)


def _load_quantized(model_type: str, model_path: str | None, quantization: str) -> tuple[nn.Module, Any]:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise ImportError(
            f"--quantization {quantization} needs bitsandbytes: pip install 'bitsandbytes>=0.45' "
            "(or pip install -e '.[train]')."
        ) from err
    import transformers

    from swift.llm.model import DEFAULT_MODEL_TYPE, MODEL_TYPES, smollm2_hf_dir

    path = smollm2_hf_dir() if model_path is None and model_type == DEFAULT_MODEL_TYPE else None
    if path is None:
        if model_path is None:
            raise ValueError(f"model_type {model_type!r} needs --model_path (a local model directory).")
        path = Path(model_path).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model_path {str(path)!r} is not a model directory (no config.json).")
    hf_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type == "auto":
        model_type = next(
            (
                t
                for t, info in MODEL_TYPES.items()
                if t != DEFAULT_MODEL_TYPE and hf_type in info.hf_model_types
            ),
            None,
        )
        if model_type is None:
            raise ValueError(f"{path}: config.json model_type {hf_type!r} is not supported by swift.llm.")
    info = MODEL_TYPES.get(model_type)
    if info is None:
        raise ValueError(f"unknown model_type {model_type!r}; choose one of {sorted(MODEL_TYPES)} or 'auto'.")
    if info.hf_model_types and hf_type not in info.hf_model_types:
        raise ValueError(
            f"{path} holds a {hf_type!r} model but model_type {model_type!r} expects {list(info.hf_model_types)}."
        )
    if info.needs_remote_code:
        raise ValueError(
            f"model_type {model_type!r} runs the checkpoint's own code, which bitsandbytes quantisation doesn't "
            "support here; use --quantization none or the '-hf' conversion (model_type internvl)."
        )
    if quantization == "nf4":
        bnb_config = transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.float32,  # this CPU has no bf16 units (FACTS.md)
            llm_int8_skip_modules=_SKIP_QUANTIZATION,
        )
    else:
        bnb_config = transformers.BitsAndBytesConfig(
            load_in_8bit=True, llm_int8_skip_modules=_SKIP_QUANTIZATION
        )
    model_cls = getattr(transformers, info.model_class)
    model = model_cls.from_pretrained(str(path), quantization_config=bnb_config, dtype=torch.float32)
    if info.is_multimodal:
        processor = transformers.AutoProcessor.from_pretrained(str(path))
        tokenizer = processor.tokenizer
    else:
        processor = tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.model_type = model_type
    logger.info("loaded %s from %s with %s quantization", model_type, path, quantization)
    return model, processor


def language_model_linears(model: nn.Module) -> list[str]:
    """Full names of the language model's linear layers: not a VLM's vision tower or projector (the module
    names of ``swift.tuners.swift_model.VISION_MODULE_NAMES``), not the output head."""
    from swift.tuners.swift_model import VISION_MODULE_NAMES

    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or module is output:
            continue
        if any(part in VISION_MODULE_NAMES for part in name.split(".")):
            continue
        names.append(name)
    return names


def add_lora(
    model: nn.Module,
    *,
    r: int,
    lora_alpha: float,
    lora_dropout: float,
    target_modules: list[str],
    quantized: bool,
    gradient_checkpointing: bool = False,
) -> nn.Module:
    """Wrap ``model`` in a PEFT LoRA model (adapter name ``"default"``); only the LoRA weights train.

    For a quantised base, ``peft.prepare_model_for_kbit_training`` first casts the non-quantised weights to
    fp32 and makes the embeddings' outputs require grad (so gradients reach the adapters).

    Raises:
        ValueError: ``target_modules`` matches no linear layer of the model.
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    targets: str | list[str] = "all-linear" if target_modules == ["all-linear"] else list(target_modules)
    if target_modules == ["all-linear-lm"]:
        targets = language_model_linears(model)
    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as err:
        raise ValueError(
            f"target_modules {target_modules} matched no layer of {type(model).__name__} ({err}); pass linear "
            "module names such as q_proj v_proj, or all-linear."
        ) from err
