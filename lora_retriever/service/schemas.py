"""Request bodies of the HTTP API (pydantic: the HTTP boundary only), OpenAI-compatible where OpenAI has them.

Extension fields (sent by the ``openai`` client through ``extra_body``): ``adapters`` (an explicit mixture,
``[{"name": ..., "weight": ...}]``) and ``top_k`` (adapters retrieved for ``model="auto"``). Fields OpenAI
defines that would change the output but aren't supported here (``n > 1``, ``logprobs``, penalties, tools,
``logit_bias``, ``echo``, ``best_of``) are refused with a 400 naming them, never silently ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

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


class _Lenient(BaseModel):
    # OpenAI clients send fields we don't use (user, metadata, store, ...): accept and ignore those.
    model_config = ConfigDict(extra="allow")


class AdapterWeight(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    weight: float = 1.0


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

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
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
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

    @model_validator(mode="after")
    def _check_stop(self) -> _Generation:
        stops = self.stop_list()
        if len(stops) > MAX_STOP or any(not s for s in stops):
            raise ValueError(f"stop takes up to {MAX_STOP} non-empty strings")
        return self

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

    @model_validator(mode="after")
    def _check_chat(self) -> ChatCompletionRequest:
        if self.logprobs:
            raise ValueError("logprobs is not supported")
        return self


class CompletionRequest(_Generation):
    prompt: str | list[str] = Field(max_length=MAX_TEXT)
    echo: bool = Field(default=False)
    logprobs: int | None = Field(default=None, le=0)
    best_of: int | None = Field(default=None, ge=1, le=1)
    suffix: str | None = Field(default=None, max_length=0)

    @model_validator(mode="after")
    def _check_completion(self) -> CompletionRequest:
        if self.echo:
            raise ValueError("echo is not supported")
        if isinstance(self.prompt, list) and not 1 <= len(self.prompt) <= 16:
            raise ValueError("prompt takes 1..16 strings")
        return self

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class RetrieveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: str | list[str] = Field(max_length=MAX_TEXT)
    top_k: int | None = Field(default=None, ge=1)
    weight_mode: str | None = None  # one of lora_retriever.retriever.WEIGHT_MODES

    @model_validator(mode="after")
    def _known_weight_mode(self) -> RetrieveRequest:
        from lora_retriever.retriever import WEIGHT_MODES

        if self.weight_mode is not None and self.weight_mode not in WEIGHT_MODES:
            raise ValueError(f"weight_mode must be one of {list(WEIGHT_MODES)}, got {self.weight_mode!r}")
        return self

    def texts(self) -> list[str]:
        texts = [self.input] if isinstance(self.input, str) else list(self.input)
        if not 1 <= len(texts) <= 256 or any(not t.strip() for t in texts):
            raise ValueError("input takes 1..256 non-empty strings")
        return texts


class RegisterAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

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


class MergeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100)
    adapters: list[AdapterWeight] = Field(min_length=1, max_length=64)
    method: str = "cat"
    svd_rank: int | None = Field(default=None, ge=1)
    density: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None
    description: str = Field(default="", max_length=2000)

    def adapter_pairs(self) -> list[tuple[str, float]]:
        return [(a.name, a.weight) for a in self.adapters]

    def options(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("svd_rank", "density", "seed") if getattr(self, k) is not None}


class TrainRequest(BaseModel):
    """A training job: the adapter is written under the data directory and registered when it finishes."""

    model_config = ConfigDict(extra="forbid")

    adapter_name: str = Field(min_length=1, max_length=100)
    dataset_path: str = Field(min_length=1, max_length=4096, description="a training file on the server")
    max_steps: int = Field(default=50, ge=1, le=100_000)
    lora_r: int = Field(default=8, ge=1, le=256)
    lora_alpha: float = Field(default=16.0, gt=0)
    learning_rate: float = Field(default=2e-3, gt=0, le=1.0)
    batch_size: int = Field(default=8, ge=1, le=256)
    max_length: int = Field(default=256, ge=8, le=8192)
    target_modules: list[str] = Field(default_factory=lambda: ["all-linear"], min_length=1, max_length=32)
    save_steps: int = Field(default=10, ge=0)
    seed: int = 42
    description: str = Field(default="", max_length=2000)


class EvaluateRequest(BaseModel):
    """An evaluation job: ``pipeline.run_inference`` on a server-side JSONL test file over the served pools."""

    model_config = ConfigDict(extra="forbid")

    test_data: str = Field(min_length=1, max_length=4096)
    merge_method: str = "mixture"
    top_k: int = Field(default=3, ge=1, le=64)
    num_samples: int | None = Field(default=None, ge=1)
    max_new_tokens: int = Field(default=32, ge=1, le=2048)
    batch_size: int = Field(default=8, ge=1, le=256)
