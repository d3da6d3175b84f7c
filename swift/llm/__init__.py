"""Model loading, chat templates and batched inference."""

from swift.llm.model import DEFAULT_MODEL_TYPE, MODEL_TYPES, get_model_tokenizer

__all__ = ["DEFAULT_MODEL_TYPE", "MODEL_TYPES", "get_model_tokenizer"]
