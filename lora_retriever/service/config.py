"""``ServiceConfig``: the settings of ``lora-retriever-serve``; each field's ``help`` is its flag's help.

The embedded default serves the packaged SmolLM2-135M-Instruct with the demo pool (``data/demo/pool/pool.json``,
built by ``make demo``) on 127.0.0.1:8000, and keeps the adapters registered over HTTP in its own pool config
under ``data_dir``. ``check_startup`` validates everything that can be checked before the model loads.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from lora_retriever.embedders.config import DTYPES, EmbedderConfig
from lora_retriever.retriever import WEIGHT_MODES
from lora_retriever.service.auth import KeyRing
from swift.llm.model import DEFAULT_MODEL_TYPE, MODEL_TYPE_CHOICES

__all__ = ["DEMO_POOL", "REGISTRY_NAME", "ServiceConfig", "is_loopback"]

#: The pool the embedded default serves: the one ``make demo`` builds (``DemoSettings.work_dir`` + ``pool``).
DEMO_POOL = "data/demo/pool/pool.json"
#: The service's own pool config (adapters registered over HTTP), inside ``data_dir``.
REGISTRY_NAME = "pool.json"
_EMBEDDER_FIELDS = {f.name: f for f in fields(EmbedderConfig)}
#: Settings that are paths ("~" is expanded in them).
_PATH_FIELDS = ("model_path", "pools", "data_dir", "embedder_path", "api_keys_file")


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


@dataclass
class ServiceConfig:
    """Settings of the LoraRetriever service (``lora-retriever-serve`` / ``python -m lora_retriever.service``)."""

    host: str = field(default="127.0.0.1", metadata={"help": "address to bind (loopback by default)"})
    port: int = field(default=8000, metadata={"help": "TCP port (0: any free port)"})
    model_type: str = field(
        default=DEFAULT_MODEL_TYPE,
        metadata={
            "help": f"base model type ({DEFAULT_MODEL_TYPE} is packaged; the others need --model_path)",
            "choices": [t for t in MODEL_TYPE_CHOICES if t != "auto"],
        },
    )
    model_path: str | None = field(
        default=None, metadata={"help": "local model directory (not needed for the packaged default)"}
    )
    pools: list[str] = field(
        default_factory=list,
        metadata={
            "help": f"adapter pool config JSON served (repeatable; default: the demo pool {DEMO_POOL}, built by "
            "`make demo`)",
            "flag": "pool",
            "action": "append",
        },
    )
    data_dir: str = field(
        default="data/service",
        metadata={
            "help": f"the service's own files: {REGISTRY_NAME} (adapters registered over HTTP), keys/, "
            "adapters/ (trained and merged), jobs.sqlite and jobs/"
        },
    )
    max_batch_size: int = field(default=16, metadata={"help": "generation requests decoded together at most"})
    max_wait_ms: float = field(
        default=10.0,
        metadata={
            "help": "a forming batch closes once this long passes with no new request arriving; each arrival "
            "keeps it open this much longer (milliseconds)"
        },
    )
    max_prepare_wait_ms: float = field(
        default=500.0,
        metadata={
            "help": "the longest a batch stays open after its first request, however requests keep arriving; up "
            "to it, a batch also waits for requests already received and still being prepared (tokenized, "
            "retrieved), so a burst of clients shares one batch (milliseconds)"
        },
    )
    top_k: int = field(default=3, metadata={"help": 'adapters retrieved per input for model "auto"'})
    weight_mode: str = field(
        default="uniform",
        metadata={"help": 'weights of the retrieved adapters for model "auto"', "choices": WEIGHT_MODES},
    )
    default_max_tokens: int = field(default=64, metadata={"help": "max_tokens of a request that sets none"})
    max_tokens_limit: int = field(default=512, metadata={"help": "the largest max_tokens a request may ask"})
    max_adapters_per_request: int = field(
        default=8, metadata={"help": "adapters one request may mix (explicit mixtures and top_k)"}
    )
    max_total_weight: float = field(
        default=4.0, metadata={"help": "largest sum of |weight| an explicit mixture may have"}
    )
    max_resident_adapters: int = field(
        default=64, metadata={"help": "adapter cache: adapters kept loaded in the model at most"}
    )
    adapter_memory_mb: float = field(
        default=512.0, metadata={"help": "adapter cache: memory budget of the loaded adapters' weights (MB)"}
    )
    pinned: list[str] = field(
        default_factory=list,
        metadata={
            "help": "adapters loaded at start and never evicted (repeatable)",
            "flag": "pin",
            "action": "append",
        },
    )
    max_upload_mb: float = field(
        default=256.0, metadata={"help": "largest adapter archive POST /adapters/archive takes (MB)"}
    )
    max_body_mb: float = field(
        default=4.0,
        metadata={"help": "largest request body of every other route (MB); larger ones get a 413"},
    )
    api_keys: list[str] = field(
        default_factory=list,
        metadata={
            "help": "an accepted API key's entry SCOPE:SHA256[:LABEL], scope read or admin (--new_key SCOPE "
            "prints a key and its entry; repeatable). No keys: every route is open",
            "flag": "api_key",
            "action": "append",
            "metavar": "ENTRY",
        },
    )
    api_keys_file: str | None = field(
        default=None, metadata={"help": "a file of API key entries, one a line (# comments)"}
    )
    allow_no_auth: bool = field(
        default=False,
        metadata={
            "help": "serve without API keys on a host that is not loopback (anyone who reaches it is admin)"
        },
    )
    job_workers: int = field(default=1, metadata={"help": "training / evaluation jobs run at once"})
    embedder: str = field(
        default=_EMBEDDER_FIELDS["backend"].default, metadata=_EMBEDDER_FIELDS["backend"].metadata
    )
    embedder_path: str | None = field(default=None, metadata=_EMBEDDER_FIELDS["model_path"].metadata)
    device: str = field(default="cpu", metadata={"help": "torch device"})
    dtype: str = field(default="float32", metadata={"help": "model dtype (fp32 on CPU)", "choices": DTYPES})

    def __post_init__(self) -> None:
        if isinstance(self.pools, str):
            self.pools = [self.pools]
        for name in _PATH_FIELDS:  # "~" expands in every path, however it was given
            value = getattr(self, name)
            if isinstance(value, list):
                setattr(self, name, [os.path.expanduser(v) for v in value])
            elif value is not None:
                setattr(self, name, os.path.expanduser(value))
        for name in (
            "max_batch_size",
            "top_k",
            "default_max_tokens",
            "max_tokens_limit",
            "max_adapters_per_request",
            "max_resident_adapters",
            "job_workers",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}; pass --{name} N")
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port!r}; pass --port N")
        for name in ("max_wait_ms", "max_prepare_wait_ms"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}; pass --{name} MS")
        if not self.max_total_weight > 0:
            raise ValueError(f"max_total_weight must be > 0, got {self.max_total_weight!r}")
        if not self.max_upload_mb > 0:
            raise ValueError(f"max_upload_mb must be > 0, got {self.max_upload_mb!r}")
        if not self.max_body_mb > 0:
            raise ValueError(f"max_body_mb must be > 0, got {self.max_body_mb!r}")
        if not self.adapter_memory_mb > 0:
            raise ValueError(f"adapter_memory_mb must be > 0, got {self.adapter_memory_mb!r}")
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(
                f"default_max_tokens ({self.default_max_tokens}) exceeds max_tokens_limit ({self.max_tokens_limit}); "
                "raise --max_tokens_limit or lower --default_max_tokens"
            )
        if self.weight_mode not in WEIGHT_MODES:
            raise ValueError(f"weight_mode must be one of {WEIGHT_MODES}, got {self.weight_mode!r}")
        if self.model_type not in MODEL_TYPE_CHOICES or self.model_type == "auto":
            raise ValueError(
                f"model_type must be one of {list(MODEL_TYPE_CHOICES)[:-1]}, got {self.model_type!r}"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if not self.data_dir:
            raise ValueError("data_dir is empty; pass --data_dir DIR")
        self.embedder_config()  # validates the embedder settings
        KeyRing.from_entries(self.api_keys, "api_keys")  # the entries' form (the file is read at start-up)
        if not (self.api_keys or self.api_keys_file or self.allow_no_auth or is_loopback(self.host)):
            raise ValueError(
                f"host {self.host!r} is not a loopback address and no API keys are configured, so anyone who reaches "
                "it could train, register and delete adapters; give keys (--api_key ENTRY, --api_keys_file FILE or "
                "LORA_RETRIEVER_API_KEYS; --new_key admin prints one) or pass --allow_no_auth"
            )

    @property
    def pool_configs(self) -> list[Path]:
        """The pool configs served (the demo pool when none is given), absolute."""
        return [Path(p).expanduser().absolute() for p in (self.pools or [DEMO_POOL])]

    @property
    def registry_config(self) -> Path:
        """The service's own pool config, where ``POST /adapters`` registers."""
        return Path(self.data_dir).expanduser().absolute() / REGISTRY_NAME

    def embedder_config(self) -> EmbedderConfig:
        """The retrieval embedder's ``EmbedderConfig`` (validated)."""
        return EmbedderConfig(backend=self.embedder, model_path=self.embedder_path, device=self.device)

    def served_model_name(self) -> str:
        """The id clients pass as ``model`` for the base model: the model type, or the model folder's name."""
        return self.model_type if self.model_path is None else Path(self.model_path).expanduser().name
