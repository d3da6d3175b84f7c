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
    "RegisterAdapterRequest",
    "RetrieveRequest",
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
    weight_mode: Literal["uniform", "softmax", "similarity"] | None = None

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
