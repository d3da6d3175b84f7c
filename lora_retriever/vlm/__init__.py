"""The small real VLM, built here: ``python -m lora_retriever.vlm build`` (or ``build_vlm(VlmRecipe())``).

The native ``LlavaForConditionalGeneration``: the packaged SmolLM2-135M-Instruct as its language model
(weights unchanged, frozen), a small vision transformer (SigLIP or CLIP config) and LLaVA's projector, trained
here on questions about the multimodal suite's images and cached as an ordinary Hugging Face directory in
``$LORA_RETRIEVER_CACHE/vlm/<recipe hash>/`` that ``swift.llm.get_model_tokenizer("llava", path)`` loads.

* ``recipe``: ``VlmRecipe``, every setting that decides the weights, and its hash;
* ``compose``: the untrained model and its processor from the cached SmolLM2;
* ``data``: the caption triples of every image domain;
* ``pretrain``: stage 1, the vision tower pre-trained with a throw-away answer classifier;
* ``train``: stage 2, tower and projector trained through the frozen LM; the held-out accuracy;
* ``build``: the cached, atomic build.

Names are imported on first use, so ``--help`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "VlmRecipe": "lora_retriever.vlm.recipe",
    "build_vlm": "lora_retriever.vlm.build",
    "compose_llava": "lora_retriever.vlm.compose",
    "read_build_info": "lora_retriever.vlm.build",
    "vlm_dir": "lora_retriever.vlm.build",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lora_retriever.vlm' has no attribute {name!r}")
