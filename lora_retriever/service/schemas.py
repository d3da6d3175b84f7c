"""Request bodies of the HTTP API (pydantic: the HTTP boundary only), OpenAI-compatible where OpenAI has them.

Extension fields (sent by the ``openai`` client through ``extra_body``): ``adapters`` (an explicit mixture,
``[{"name": ..., "weight": ...}]``) and ``top_k`` (adapters retrieved for ``model="auto"``). Fields OpenAI
defines that would change the output but aren't supported here (``n > 1``, ``logprobs``, penalties, tools,
``logit_bias``, ``echo``, ``best_of``) are refused with a 400 naming them, never silently ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "AdapterWeight",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "EvaluateRequest",
    "MergeRequest",
    "RegisterAdapterRequest",
    "RetrieveRequest",
    "TrainRequest",
]

MAX_TEXT = 100_000  # characters of one message / prompt
MAX_MESSAGES = 256
MAX_STOP = 4
#: Below this, temperature means greedy decoding (as in vLLM): dividing logits by 1e-300 overflows to inf.
MIN_TEMPERATURE = 1e-5


class _Strict(BaseModel):
    # Unknown fields are refused (a typo must not be ignored); NaN and infinities too (JSON parsers accept them).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class _Lenient(BaseModel):
    # OpenAI clients send fields we don't use (user, metadata, store, ...): accept and ignore those.
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


class AdapterWeight(_Strict):
    name: str = Field(min_length=1, max_length=200)
    weight: float = 1.0


class ContentPart(_Lenient):
    type: str
    text: str | None = None


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] = Field(max_length=MAX_TEXT)

    def text(self) -> str:
        """The message's text (content parts joined); image parts are refused by the caller first."""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text or "" for part in self.content if part.type == "text")


class _Generation(_Lenient):
    model: str = Field(min_length=1, max_length=300)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(
        default=0.0,
        ge=0.0,
        le=2.0,
        description=f"0 (or below {MIN_TEMPERATURE:g}, where logits / temperature overflow): greedy; else sampling",
    )
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=1)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    presence_penalty: float = Field(default=0.0, ge=0.0, le=0.0)
    frequency_penalty: float = Field(default=0.0, ge=0.0, le=0.0)
    logit_bias: dict[str, float] | None = Field(default=None, max_length=0)
    adapters: list[AdapterWeight] | None = Field(default=None, max_length=64)
    top_k: int | None = Field(default=None, ge=1)

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOP or any(not s for s in stops):
            raise ValueError(f"stop takes up to {MAX_STOP} non-empty strings")
        return stop

    def sampling_temperature(self) -> float:
        """The temperature decoding uses: 0 (greedy) below ``MIN_TEMPERATURE``."""
        return self.temperature if self.temperature >= MIN_TEMPERATURE else 0.0

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def adapter_pairs(self) -> list[tuple[str, float]] | None:
        return None if self.adapters is None else [(a.name, a.weight) for a in self.adapters]


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = Field(default=False)
    tools: list[Any] | None = Field(default=None, max_length=0)

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, logprobs: bool) -> bool:
        if logprobs:
            raise ValueError("logprobs is not supported")
        return logprobs


class CompletionRequest(_Generation):
    prompt: str | list[str] = Field(max_length=MAX_TEXT)
    echo: bool = Field(default=False)
    logprobs: int | None = Field(default=None, le=0)
    best_of: int | None = Field(default=None, ge=1, le=1)
    suffix: str | None = Field(default=None, max_length=0)

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, echo: bool) -> bool:
        if echo:
            raise ValueError("echo is not supported")
        return echo

    @field_validator("prompt")
    @classmethod
    def _prompt_count(cls, prompt: str | list[str]) -> str | list[str]:
        if isinstance(prompt, list) and not 1 <= len(prompt) <= 16:
            raise ValueError("prompt takes 1..16 strings")
        return prompt

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class RetrieveRequest(_Strict):
    input: str | list[str] = Field(max_length=MAX_TEXT)
    top_k: int | None = Field(default=None, ge=1)
    weight_mode: str | None = None  # one of lora_retriever.retriever.WEIGHT_MODES

    @field_validator("weight_mode")
    @classmethod
    def _known_weight_mode(cls, weight_mode: str | None) -> str | None:
        from lora_retriever.retriever import WEIGHT_MODES

        if weight_mode is not None and weight_mode not in WEIGHT_MODES:
            raise ValueError(f"weight_mode must be one of {list(WEIGHT_MODES)}, got {weight_mode!r}")
        return weight_mode

    def texts(self) -> list[str]:
        texts = [self.input] if isinstance(self.input, str) else list(self.input)
        if not 1 <= len(texts) <= 256 or any(not t.strip() for t in texts):
            raise ValueError("input takes 1..256 non-empty strings")
        return texts


class RegisterAdapterRequest(_Strict):
    name: str = Field(min_length=1, max_length=100)
    path: str = Field(min_length=1, max_length=4096, description="a PEFT adapter directory on the server")
    samples: list[str] | None = Field(
        default=None, max_length=1000, description="texts its retrieval key embeds"
    )
    samples_path: str | None = Field(
        default=None, max_length=4096, description="or a samples file on the server"
    )
    description: str = Field(default="", max_length=2000)
    pin: bool = False


class MergeRequest(_Strict):
    name: str = Field(min_length=1, max_length=100)
    adapters: list[AdapterWeight] = Field(min_length=1, max_length=64)
    method: str = "cat"
    svd_rank: int | None = Field(default=None, ge=1)
    density: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    description: str = Field(default="", max_length=2000)

    def adapter_pairs(self) -> list[tuple[str, float]]:
        return [(a.name, a.weight) for a in self.adapters]

    def options(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("svd_rank", "density", "seed") if getattr(self, k) is not None}


class TrainRequest(_Strict):
    """A training job: the adapter is written under the data directory and registered when it finishes."""

    adapter_name: str = Field(min_length=1, max_length=100)
    dataset_path: str = Field(min_length=1, max_length=4096, description="a training file on the server")
    max_steps: int = Field(default=50, ge=1, le=100_000)
    lora_r: int = Field(default=8, ge=1, le=256)
    lora_alpha: float = Field(default=16.0, gt=0)
    learning_rate: float = Field(default=2e-3, gt=0, le=1.0)
    batch_size: int = Field(default=8, ge=1, le=256)
    max_length: int = Field(default=256, ge=8, le=8192)
    target_modules: list[str] = Field(default_factory=lambda: ["all-linear"], min_length=1, max_length=32)
    quantization: str = Field(default="none", description="QLoRA: the base model in nf4 or int8, or none")
    save_steps: int = Field(default=10, ge=0)
    seed: int = Field(default=42, ge=0, le=2**32 - 1)  # numpy's seed range
    description: str = Field(default="", max_length=2000)

    @field_validator("quantization")
    @classmethod
    def _known_quantization(cls, quantization: str) -> str:
        from lora_retriever.training.config import QUANTIZATIONS

        if quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {list(QUANTIZATIONS)}, got {quantization!r}")
        return quantization


class EvaluateRequest(_Strict):
    """An evaluation job: ``pipeline.run_inference`` on a server-side JSONL test file over the served pools."""

    test_data: str = Field(min_length=1, max_length=4096)
    merge_method: str = "mixture"
    top_k: int = Field(default=3, ge=1, le=64)
    num_samples: int | None = Field(default=None, ge=1)
    max_new_tokens: int = Field(default=32, ge=1, le=2048)
    batch_size: int = Field(default=8, ge=1, le=256)
