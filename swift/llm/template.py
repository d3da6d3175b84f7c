"""Chat templates: a query (with optional images) -> model inputs; generated ids -> answer text.

``get_template(model_type, tokenizer_or_processor)`` returns a ``Template`` for one of ``swift.llm.MODEL_TYPES``:

* text models (SmolLM2, Llama, Qwen2, any causal LM): the tokenizer's own chat template (ChatML for
  SmolLM2 / Qwen2). A tokenizer without one falls back to ``"User: ...\\nAssistant:"`` with a logged warning.
* VLMs (Qwen2-VL, Qwen2.5-VL, InternVL, LLaVA): the processor's chat template renders one image content
  part per image (the model's own placeholder, e.g. ``<|vision_start|><|image_pad|><|vision_end|>`` or
  ``<IMG_CONTEXT>``) and the processor expands each placeholder to the image's tokens.

Queries mark image positions with ``<image>`` tags (``"compare <image> and <image>"``). A query with images
but no tag gets its images before the text; any other mismatch between tags and images is an error.

Batches are LEFT-padded (``encode_batch``) so that generation continues every row from its last token.
``encode_example`` builds a training example whose ``labels`` are ``-100`` on the prompt (loss only on the
answer tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from swift.llm.model import MODEL_TYPES
from swift.utils import get_logger

logger = get_logger(__name__)

__all__ = [
    "IMAGE_TAG",
    "IGNORE_INDEX",
    "TEMPLATES",
    "ChatTemplate",
    "Template",
    "VisionChatTemplate",
    "get_template",
    "register_template",
]

IMAGE_TAG = "<image>"
IGNORE_INDEX = -100  # label value ignored by torch.nn.CrossEntropyLoss (and HF models' loss)

ImageInput = Any  # a PIL.Image.Image (or anything the processor's image processor accepts)
QueryImages = Sequence[ImageInput] | ImageInput | None


class Template:
    """Turns queries into model inputs and generated ids into text (base class; see the subclasses).

    Args:
        model_type: the ``swift.llm`` model type this template serves.
        tokenizer: the text tokenizer (for VLMs, the processor's tokenizer).
        system: optional system prompt put before every query.
    """

    is_multimodal: bool = False

    def __init__(self, model_type: str, tokenizer: Any, *, system: str | None = None) -> None:
        self.model_type = model_type
        self.tokenizer = tokenizer
        self.system = system
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ValueError(
                    f"the {model_type} tokenizer has neither a pad_token nor an eos_token; set "
                    "tokenizer.pad_token before building a template (batches need padding)."
                )
            logger.warning("tokenizer has no pad_token; padding with eos_token %r", tokenizer.eos_token)
            tokenizer.pad_token = tokenizer.eos_token

    # -- public API -------------------------------------------------------------------------------------

    def encode_batch(
        self, queries: Sequence[str], images: Sequence[QueryImages] | None = None
    ) -> dict[str, torch.Tensor]:
        """Encode a batch of queries for generation, left-padded.

        Args:
            queries: ``batch`` query strings, ``<image>`` tags marking image positions.
            images: optional, one entry per query: a list of images (or one image, or ``None``).

        Returns:
            ``input_ids`` and ``attention_mask`` ``[batch, T]`` (padding on the left), plus for VLMs what the
            processor produces (e.g. ``pixel_values``, ``image_grid_thw``, ``mm_token_type_ids``).

        Raises:
            ValueError: empty or non-string queries, ``len(images) != len(queries)``, or a query whose
                ``<image>`` tags don't match its images.
        """
        queries = _check_queries(queries)
        per_query = _per_query_images(images, len(queries))
        prompts = [self._prompt(query, imgs) for query, imgs in zip(queries, per_query)]
        return self._tokenize(
            prompts, [img for imgs in per_query for img in imgs], self._uses_chat_template()
        )

    def encode_example(
        self, query: str, response: str, images: QueryImages = None
    ) -> dict[str, torch.Tensor]:
        """Encode one training example: the prompt, then the response with its end-of-turn tokens.

        The prompt and the response are tokenized separately and concatenated, so the model trains on exactly
        the prompt tokens ``encode_batch`` produces at inference time.

        Returns:
            ``input_ids``, ``attention_mask`` and ``labels``, each ``[T]`` (``labels`` is ``-100`` on every
            prompt token and equals ``input_ids`` on the response), plus the processor's image tensors for VLMs
            (token-aligned ones such as ``mm_token_type_ids`` extended to ``[T]``).

        Raises:
            ValueError: bad query / images (see ``encode_batch``), an empty response, or a chat template whose
                rendering of the answered conversation doesn't start with the rendered prompt.
        """
        (query,) = _check_queries([query])
        if not isinstance(response, str) or not response.strip():
            raise ValueError(f"response must be a non-empty string, got {response!r}.")
        (imgs,) = _per_query_images([images], 1)
        prompt = self._prompt(query, imgs)
        full = self._prompt(query, imgs, response=response)
        if not full.startswith(prompt):
            raise ValueError(
                f"the {self.model_type} chat template renders the answered conversation differently from the "
                f"generation prompt (prompt {prompt[-40:]!r} is not a prefix); cannot tell prompt from answer "
                "tokens. Pass a tokenizer/processor whose chat template appends the answer after the prompt."
            )
        encoded = self._tokenize([prompt], imgs, self._uses_chat_template())
        answer_ids = self.tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"]
        answer = torch.tensor(answer_ids, dtype=torch.long)
        prompt_len = encoded["input_ids"].shape[1]
        example: dict[str, torch.Tensor] = {}
        for key, value in encoded.items():
            if value.dim() == 2 and value.shape == (1, prompt_len) and not value.is_floating_point():
                fill = torch.ones_like(answer) if key == "attention_mask" else torch.zeros_like(answer)
                example[key] = torch.cat([value[0], answer if key == "input_ids" else fill])
            else:
                example[key] = value
        example["labels"] = torch.cat([torch.full((prompt_len,), IGNORE_INDEX, dtype=torch.long), answer])
        return example

    def decode(self, token_ids: Sequence[int] | torch.Tensor) -> str:
        """Generated ids ``[T]`` -> text, special tokens (padding, end of turn) removed, whitespace stripped."""
        if isinstance(token_ids, torch.Tensor):
            token_ids = token_ids.tolist()
        return self.tokenizer.decode(token_ids, skip_special_tokens=True).strip()

    # -- to specialise ----------------------------------------------------------------------------------

    def _uses_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def _prompt(self, query: str, images: list[ImageInput], response: str | None = None) -> str:
        raise NotImplementedError

    def _tokenize(self, prompts: list[str], images: list[ImageInput], chat: bool) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model_type={self.model_type!r}, chat_template={self._uses_chat_template()})"


class ChatTemplate(Template):
    """Text-only models: the tokenizer's chat template (or the plain ``User:/Assistant:`` fallback)."""

    def __init__(self, model_type: str, tokenizer: Any, *, system: str | None = None) -> None:
        super().__init__(model_type, tokenizer, system=system)
        if not self._uses_chat_template():
            logger.warning(
                "the %s tokenizer has no chat template; using the plain 'User: ...\\nAssistant:' format, which "
                "an instruction-tuned model may not follow.",
                model_type,
            )

    def _prompt(self, query: str, images: list[ImageInput], response: str | None = None) -> str:
        segments = _split_query(query, len(images))
        if images:
            raise ValueError(
                f"model_type {self.model_type!r} is a text-only model but the query came with {len(images)} "
                f"image(s); use a VLM model_type ({', '.join(_vlm_types())}) for images."
            )
        text = segments[0]
        if not self._uses_chat_template():
            prompt = (f"System: {self.system}\n" if self.system else "") + f"User: {text}\nAssistant:"
            return prompt if response is None else f"{prompt} {response}{self.tokenizer.eos_token or ''}"
        messages = [{"role": "system", "content": self.system}] if self.system else []
        messages.append({"role": "user", "content": text})
        if response is not None:
            messages.append({"role": "assistant", "content": response})
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=response is None
        )

    def _tokenize(self, prompts: list[str], images: list[ImageInput], chat: bool) -> dict[str, torch.Tensor]:
        # A rendered chat template already holds its special tokens (BOS included where the model wants one).
        encoded = self.tokenizer(
            prompts, padding=True, padding_side="left", return_tensors="pt", add_special_tokens=not chat
        )
        return {key: value for key, value in encoded.items() if key in ("input_ids", "attention_mask")}


class VisionChatTemplate(Template):
    """VLMs: the processor's chat template with one image content part per image; the processor expands them.

    Args:
        model_type: the ``swift.llm`` model type.
        processor: the model's processor (tokenizer + image processor), as returned by ``get_model_tokenizer``.
        system: optional system prompt.
    """

    is_multimodal = True

    def __init__(self, model_type: str, processor: Any, *, system: str | None = None) -> None:
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is None or getattr(processor, "image_processor", None) is None:
            raise ValueError(
                f"model_type {model_type!r} is a VLM: pass the processor returned by get_model_tokenizer (with a "
                f"tokenizer and an image processor), not a {type(processor).__name__}."
            )
        self.processor = processor
        self.image_token: str | None = getattr(processor, "image_token", None)
        super().__init__(model_type, tokenizer, system=system)
        if not self._uses_chat_template():
            if self.image_token is None:
                raise ValueError(
                    f"the {model_type} processor has no chat template and no image_token; cannot place images. "
                    "Save the processor with its chat_template."
                )
            logger.warning(
                "the %s processor has no chat template; using the plain 'User: ...\\nAssistant:' format with %r "
                "image placeholders, which the model may not follow.",
                model_type,
                self.image_token,
            )

    def _uses_chat_template(self) -> bool:
        return bool(
            getattr(self.processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None)
        )

    def _prompt(self, query: str, images: list[ImageInput], response: str | None = None) -> str:
        segments = _split_query(query, len(images))
        if self.image_token and self.image_token != IMAGE_TAG:
            for segment in segments:
                if self.image_token in segment:
                    raise ValueError(
                        f"the query contains the model's image placeholder {self.image_token!r} as text; mark image "
                        f"positions with {IMAGE_TAG!r} tags and pass the images."
                    )
        if not self._uses_chat_template():
            text = self.image_token.join(segments)
            prompt = (f"System: {self.system}\n" if self.system else "") + f"User: {text}\nAssistant:"
            return prompt if response is None else f"{prompt} {response}{self.tokenizer.eos_token or ''}"
        # Tags split the text into len(images) + 1 segments; an image goes between consecutive segments.
        content: list[dict[str, str]] = []
        for index, segment in enumerate(segments):
            if index > 0:
                content.append({"type": "image"})
            if segment:
                content.append({"type": "text", "text": segment})
        messages = (
            [{"role": "system", "content": [{"type": "text", "text": self.system}]}] if self.system else []
        )
        messages.append({"role": "user", "content": content})
        if response is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": response}]})
        renderer = self.processor if getattr(self.processor, "chat_template", None) else self.tokenizer
        return renderer.apply_chat_template(messages, tokenize=False, add_generation_prompt=response is None)

    def _tokenize(self, prompts: list[str], images: list[ImageInput], chat: bool) -> dict[str, torch.Tensor]:
        encoded = self.processor(
            text=prompts,
            images=images or None,
            padding=True,
            padding_side="left",
            return_tensors="pt",
            add_special_tokens=not chat,
        )
        return {key: value for key, value in encoded.items() if isinstance(value, torch.Tensor)}


# ----------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------

TEMPLATES: dict[str, type[Template]] = {}


def _vlm_types() -> list[str]:
    return [t for t, info in MODEL_TYPES.items() if info.is_multimodal and not info.needs_remote_code]


def register_template(model_type: str, template_cls: type[Template]) -> None:
    """Register the ``Template`` subclass used for ``model_type`` (replaces an earlier registration)."""
    if not (isinstance(template_cls, type) and issubclass(template_cls, Template)):
        raise ValueError(f"template_cls must be a Template subclass, got {template_cls!r}.")
    TEMPLATES[model_type] = template_cls


# One template per model type of swift.llm.MODEL_TYPES, but not the remote-code checkpoints (internvl2): they
# ship no processor (their own code tiles images); use the "-hf" conversion with model_type "internvl".
for _info in MODEL_TYPES.values():
    if not _info.needs_remote_code:
        register_template(_info.model_type, VisionChatTemplate if _info.is_multimodal else ChatTemplate)


def get_template(model_type: str, tokenizer_or_processor: Any, *, system: str | None = None) -> Template:
    """The template for ``model_type`` around a tokenizer (text models) or a processor (VLMs).

    Args:
        model_type: a ``swift.llm`` model type (``model.model_type`` after ``get_model_tokenizer``).
        tokenizer_or_processor: the second value ``get_model_tokenizer`` returns. A processor passed for a text
            model is used through its ``tokenizer``.
        system: optional system prompt.

    Raises:
        ValueError: unknown ``model_type``, or a VLM type with a plain tokenizer.
    """
    template_cls = TEMPLATES.get(model_type)
    if template_cls is None:
        raise ValueError(f"no template for model_type {model_type!r}; registered: {sorted(TEMPLATES)}.")
    if template_cls.is_multimodal:
        return template_cls(model_type, tokenizer_or_processor, system=system)
    tokenizer = getattr(tokenizer_or_processor, "tokenizer", tokenizer_or_processor)
    return template_cls(model_type, tokenizer, system=system)


# ----------------------------------------------------------------------------------------------------------
# Input checks shared by the templates
# ----------------------------------------------------------------------------------------------------------


def _check_queries(queries: Sequence[str]) -> list[str]:
    if isinstance(queries, str):
        raise ValueError(
            f"queries must be a list of strings, got the string {queries[:40]!r}; wrap it in a list."
        )
    queries = list(queries)
    if not queries:
        raise ValueError("queries is empty; pass at least one query string.")
    for index, query in enumerate(queries):
        if not isinstance(query, str):
            raise ValueError(f"queries[{index}] must be a string, got {type(query).__name__}.")
    return queries


def _per_query_images(images: Sequence[QueryImages] | None, num_queries: int) -> list[list[ImageInput]]:
    """Normalise ``images`` to one (possibly empty) list per query."""
    if images is None:
        return [[] for _ in range(num_queries)]
    if isinstance(images, str) or not isinstance(images, Sequence):
        raise ValueError(
            f"images must be a list with one entry per query (a list of images, one image or None), got "
            f"{type(images).__name__}."
        )
    if len(images) != num_queries:
        raise ValueError(
            f"images has {len(images)} entries but there are {num_queries} queries; pass one entry per query "
            "(None for a query without images)."
        )
    per_query = []
    for entry in images:
        if entry is None:
            per_query.append([])
        elif isinstance(entry, list | tuple):
            per_query.append(list(entry))
        else:
            per_query.append([entry])
    return per_query


def _split_query(query: str, num_images: int) -> list[str]:
    """Split ``query`` at its ``<image>`` tags into ``num_images + 1`` text segments.

    A query with images but no tag gets its images first (segments ``["", ..., "", query]``).

    Raises:
        ValueError: the number of tags differs from ``num_images`` (and is not zero with images present).
    """
    tags = query.count(IMAGE_TAG)
    if tags == 0 and num_images > 0:
        return [""] * num_images + [query]
    if tags != num_images:
        raise ValueError(
            f"the query has {tags} {IMAGE_TAG} tag(s) but {num_images} image(s) were given for it: {query[:60]!r}. "
            f"Use one {IMAGE_TAG} tag per image (or no tags to put all images before the text)."
        )
    return query.split(IMAGE_TAG)
