"""Model loading, chat templates and batched inference."""

from swift.llm.infer import Answers, inference
from swift.llm.model import DEFAULT_MODEL_TYPE, MODEL_TYPES, get_model_tokenizer
from swift.llm.template import Template, get_template
from swift.llm.vision import vision_row_index

__all__ = [
    "Answers",
    "DEFAULT_MODEL_TYPE",
    "MODEL_TYPES",
    "Template",
    "get_model_tokenizer",
    "get_template",
    "inference",
    "vision_row_index",
]
