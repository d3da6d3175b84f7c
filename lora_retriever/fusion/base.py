"""Fusion of LoRA adapters into one PEFT adapter: data types, the method base class, the registry and ``fuse``.

A source adapter ``j`` contributes ``ΔW_j = s_j · B_j A_j`` at each linear layer it targets (``A_j`` is
``[r_j, in]``, ``B_j`` is ``[out, r_j]``, ``s_j = lora_alpha / r_j`` or ``lora_alpha / sqrt(r_j)`` with rsLoRA).
A fusion method turns the weighted set ``{(w_j, s_j, A_j, B_j)}`` present at one layer into one pair
``(A, B)`` whose scaling is folded in, so the saved adapter has ``lora_alpha == r`` (scaling 1) at every module
and never uses rsLoRA. Modules are the union over the sources; an adapter absent at a module contributes
nothing there.

Methods live one per file (``cat``, ``linear``, ``svd``, ``ties``, ``dare``) behind ``FusionMethod`` and
register themselves with ``register_fusion_method``; ``fuse`` is the entry point.
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch

from swift.tuners.peft_format import (
    LoraAdapterConfig,
    base_weight_matches,
    peft_base_weight_key,
    peft_lora_key,
    read_adapter_dir,
    write_adapter_dir,
)
from swift.utils import get_logger

logger = get_logger(__name__)

__all__ = [
    "FUSION_METHODS",
    "FusedAdapter",
    "FusedModule",
    "FusionMethod",
    "LoraModuleWeights",
    "LoraWeights",
    "WeightedModule",
    "available_methods",
    "fuse",
    "get_fusion_method",
    "register_fusion_method",
]

META_NAME = "fusion_meta.json"


# ----------------------------------------------------------------------------------------------------------
# Source adapters.
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraModuleWeights:
    """One adapter at one linear layer: ``ΔW = scaling · lora_B @ lora_A``.

    Attributes:
        lora_A: ``[r, in_features]``.
        lora_B: ``[out_features, r]``.
        scaling: ``s`` (alpha / r, or alpha / sqrt(r) with rsLoRA, alpha_pattern aware).

    Raises:
        ValueError: if the factors are not 2-D with a shared rank, or ``scaling`` is not finite.
    """

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float

    def __post_init__(self) -> None:
        a, b = self.lora_A, self.lora_B
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or a.shape[0] == 0:
            raise ValueError(
                f"lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} must be [r, in] and [out, r] with the "
                "same r >= 1."
            )
        if not math.isfinite(float(self.scaling)):
            raise ValueError(f"scaling must be a finite number, got {self.scaling!r}.")

    @property
    def r(self) -> int:
        return self.lora_A.shape[0]

    @property
    def base_shape(self) -> tuple[int, int]:
        """``(out_features, in_features)`` of the base layer this adapter sits on."""
        return self.lora_B.shape[0], self.lora_A.shape[1]

    def delta(self) -> torch.Tensor:
        """Dense ``ΔW = s · B A`` ``[out, in]``."""
        return self.scaling * (self.lora_B @ self.lora_A)


@dataclass
class LoraWeights:
    """A source adapter: its factors and scaling per module, plus where it came from.

    Attributes:
        name: a label for metadata and messages (the directory name by default).
        modules: ``{module_name: LoraModuleWeights}`` with names relative to the base model.
        config: the adapter's PEFT config, when read from a directory.
        source: the directory it was read from, if any.
        base_weights: ``{module_name: weight}`` PEFT saved with the adapter for a targeted ``lm_head``; carried
            into the fused adapter so that loaders can check it against their model.
    """

    name: str
    modules: dict[str, LoraModuleWeights]
    config: LoraAdapterConfig | None = None
    source: str | None = None
    base_weights: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def from_dir(cls, adapter_dir: str | Path, name: str | None = None) -> LoraWeights:
        """Read a PEFT LoRA directory (strictly, see ``swift.tuners.peft_format.read_adapter_dir``).

        Raises:
            FileNotFoundError / NotADirectoryError / AdapterLoadError: see ``read_adapter_dir``.
        """
        adapter = read_adapter_dir(adapter_dir)
        modules = {
            module: LoraModuleWeights(pair.lora_A, pair.lora_B, adapter.scaling(module))
            for module, pair in adapter.pairs.items()
        }
        name = name or Path(adapter_dir).name
        return cls(name, modules, adapter.config, str(adapter_dir), dict(adapter.base_weights))


class WeightedModule(NamedTuple):
    """What a method sees of one source at one module: its fusion weight ``w_j`` and its factors."""

    weight: float
    lora: LoraModuleWeights
    source: str


class FusedModule(NamedTuple):
    """A method's result at one module (scaling 1): ``lora_A`` ``[k, in]``, ``lora_B`` ``[out, k]``.

    ``truncation_error`` is ``‖ΔW − B A‖_F / ‖ΔW‖_F`` where a method truncates an exact sum, else None.
    """

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    truncation_error: float | None = None


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """At least float32 (bf16/fp16 sources are fused in fp32; fp64 stays fp64)."""
    return torch.promote_types(t.dtype, torch.float32)


# ----------------------------------------------------------------------------------------------------------
# The fused adapter.
# ----------------------------------------------------------------------------------------------------------


@dataclass
class FusedAdapter:
    """One adapter fused from several, with scaling 1 at every module.

    Attributes:
        method: the fusion method's registry name.
        modules: ``{module_name: (lora_A [r_m, in], lora_B [out, r_m])}``; ``ΔW_m = lora_B @ lora_A``.
        sources: the source adapters' names, in ``weights`` order.
        source_dirs: their directories (None for in-memory sources).
        weights: the fusion weights ``w_j``.
        options: the method's options, defaults filled in.
        truncation_error: ``{module_name: relative Frobenius error}`` for methods that truncate (``svd``).
        base_model_name_or_path: written to ``adapter_config.json`` unless ``save`` overrides it.
        task_type: PEFT task type shared by the sources (None if they disagree or have none).
        base_weights: the sources' saved base weights (``lm_head``), written back as PEFT does.
    """

    method: str
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    sources: list[str]
    source_dirs: list[str | None]
    weights: list[float]
    options: dict[str, Any] = field(default_factory=dict)
    truncation_error: dict[str, float] = field(default_factory=dict)
    base_model_name_or_path: str | None = None
    task_type: str | None = None
    base_weights: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def ranks(self) -> dict[str, int]:
        """``{module_name: r_m}``."""
        return {module: lora_A.shape[0] for module, (lora_A, _) in self.modules.items()}

    def delta(self, module_name: str) -> torch.Tensor:
        """Dense ``ΔW = lora_B @ lora_A`` ``[out, in]`` at one module (scaling is 1).

        Raises:
            KeyError: the fused adapter has no such module.
        """
        if module_name not in self.modules:
            raise KeyError(f"the fused adapter has no module {module_name!r}; modules: {list(self.modules)}.")
        lora_A, lora_B = self.modules[module_name]
        return lora_B @ lora_A

    def peft_config(self, base_model_name_or_path: str | None = None) -> dict[str, Any]:
        """The ``adapter_config.json`` dict: scaling 1 everywhere via ``lora_alpha == r`` per module.

        The most common rank becomes ``r``; other modules get ``rank_pattern`` / ``alpha_pattern`` entries keyed
        by their full module name (PEFT matches pattern keys as a regex against the module name's suffix).
        """
        ranks = self.ranks
        default_r = Counter(ranks.values()).most_common(1)[0][0] if ranks else 1
        exceptions = {module: r for module, r in ranks.items() if r != default_r}
        return {
            "peft_type": "LORA",
            "task_type": self.task_type,
            "base_model_name_or_path": base_model_name_or_path or self.base_model_name_or_path,
            "r": default_r,
            "lora_alpha": default_r,
            "rank_pattern": dict(exceptions),
            "alpha_pattern": dict(exceptions),
            "use_rslora": False,
            "target_modules": sorted(ranks),
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": False,
            "use_dora": False,
            "modules_to_save": None,
            "init_lora_weights": True,
            "inference_mode": True,
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        """PEFT key names: ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` (+ base weights)."""
        state = {}
        for module, (lora_A, lora_B) in self.modules.items():
            state[peft_lora_key(module, "A")] = lora_A.detach().contiguous().cpu()
            state[peft_lora_key(module, "B")] = lora_B.detach().contiguous().cpu()
        for module, weight in self.base_weights.items():
            state[peft_base_weight_key(module)] = weight.detach().contiguous().cpu()
        return state

    def metadata(self) -> dict[str, Any]:
        """The ``fusion_meta.json`` dict: method, options, sources, weights, per-module rank and error."""
        meta: dict[str, Any] = {
            "method": self.method,
            "options": dict(self.options),
            "sources": [{"name": n, "path": p} for n, p in zip(self.sources, self.source_dirs)],
            "weights": list(self.weights),
            "ranks": self.ranks,
        }
        if self.truncation_error:
            meta["truncation_error"] = dict(self.truncation_error)
            meta["max_truncation_error"] = max(self.truncation_error.values())
        return meta

    def save(self, out_dir: str | Path, base_model_name_or_path: str | None = None) -> Path:
        """Write a PEFT adapter directory loadable by ``PeftModel.from_pretrained`` and ``Swift.from_pretrained``.

        Writes ``adapter_config.json``, ``adapter_model.safetensors`` and ``fusion_meta.json`` atomically
        (``swift.tuners.peft_format.write_adapter_dir``; existing files of those names are replaced, like
        ``PeftModel.save_pretrained`` does).

        Returns:
            The directory.

        Raises:
            NotADirectoryError: ``out_dir`` exists and is a file.
        """
        meta = json.dumps(self.metadata(), indent=2) + "\n"
        path = write_adapter_dir(
            out_dir,
            self.state_dict(),
            self.peft_config(base_model_name_or_path),
            extra_files={META_NAME: meta},
        )
        logger.info("saved %s-fused adapter (%d modules) to %s", self.method, len(self.modules), path)
        return path


# ----------------------------------------------------------------------------------------------------------
# Methods and their registry.
# ----------------------------------------------------------------------------------------------------------


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()  # an option default meaning "the caller must pass it"


class FusionMethod(ABC):
    """A way of fusing the weighted sources present at one module into one ``(A, B)`` with scaling 1.

    Subclasses set ``name`` and ``option_defaults`` (every accepted option; a default of ``REQUIRED`` makes
    it mandatory) and implement ``check_options`` (value validation) and ``fuse_module``.
    """

    name: ClassVar[str]
    option_defaults: ClassVar[Mapping[str, Any]] = {}

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.option_defaults))
        if unknown:
            accepted = sorted(self.option_defaults) or "none"
            raise ValueError(f"method {self.name!r} got unknown option(s) {unknown}; it accepts: {accepted}.")
        merged = {**self.option_defaults, **options}
        missing = sorted(k for k, v in merged.items() if v is REQUIRED)
        if missing:
            raise ValueError(
                f"method {self.name!r} needs option(s) {missing}; e.g. fuse(..., method={self.name!r}, "
                f"{missing[0]}=...)."
            )
        self.options: dict[str, Any] = self.check_options(merged)

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """Validate option values; return them (possibly normalised).

        Raises:
            ValueError: an option value is out of range or of the wrong type.
        """
        return options

    @abstractmethod
    def fuse_module(self, module_name: str, parts: Sequence[WeightedModule]) -> FusedModule:
        """Fuse the sources present at ``module_name`` (at least one; all with the same base shape)."""


FUSION_METHODS: dict[str, type[FusionMethod]] = {}


def register_fusion_method(cls: type[FusionMethod]) -> type[FusionMethod]:
    """Class decorator: make ``cls`` available to ``fuse`` under ``cls.name``.

    Raises:
        ValueError: another class is registered under the same name.
    """
    existing = FUSION_METHODS.get(cls.name)
    if existing is not None and existing is not cls:
        raise ValueError(f"fusion method {cls.name!r} is already registered by {existing.__qualname__}.")
    FUSION_METHODS[cls.name] = cls
    return cls


def available_methods() -> list[str]:
    """Registered method names, sorted."""
    return sorted(FUSION_METHODS)


def get_fusion_method(method: str, **options: Any) -> FusionMethod:
    """Instantiate a registered method with validated options.

    Raises:
        ValueError: unknown method (the message lists the choices) or bad options.
    """
    cls = FUSION_METHODS.get(method) if isinstance(method, str) else None
    if cls is None:
        raise ValueError(f"unknown fusion method {method!r}; choose one of {available_methods()}.")
    return cls(**options)


# ----------------------------------------------------------------------------------------------------------
# Option validators shared by the methods.
# ----------------------------------------------------------------------------------------------------------


def check_density(density: Any) -> float:
    """``density`` is the fraction of entries kept: a number in (0, 1].

    Raises:
        ValueError: not a real number, or outside (0, 1].
    """
    if isinstance(density, bool) or not isinstance(density, int | float) or not 0.0 < float(density) <= 1.0:
        raise ValueError(
            f"density must be a number in (0, 1] (the fraction of entries kept), got {density!r}."
        )
    return float(density)


def check_choice(option: str, value: Any, choices: Sequence[str]) -> str:
    """Raises ValueError unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{option} must be one of {list(choices)}, got {value!r}.")
    return value


# ----------------------------------------------------------------------------------------------------------
# The entry point.
# ----------------------------------------------------------------------------------------------------------


def fuse(
    adapters: Sequence[LoraWeights | str | Path],
    weights: Sequence[float] | None = None,
    method: str = "cat",
    **options: Any,
) -> FusedAdapter:
    """Fuse LoRA adapters into one adapter with scaling 1 per module.

    Args:
        adapters: source adapters: ``LoraWeights`` or PEFT adapter directories.
        weights: one fusion weight ``w_j`` per adapter (may be negative); default uniform ``1 / k``, the
            LoraRetriever paper's choice (Zhao et al. 2024, Sec. 3.3).
        method: one of ``available_methods()``: ``cat`` (exact, rank Σ r_j), ``linear`` (the paper's
            parameter averaging), ``svd`` (exact sum, optionally truncated), ``ties``, ``dare_linear``,
            ``dare_ties``.
        **options: method options: ``svd_rank`` (svd); ``weight_split`` (linear); ``density``,
            ``majority_sign_method`` (ties, dare_ties); ``density``, ``seed`` (dare_*).

    Returns:
        The ``FusedAdapter`` (call ``.save(dir)`` for a PEFT adapter directory).

    Raises:
        ValueError: empty ``adapters``; unknown method; bad options; ``weights`` not one finite number per
            adapter; two adapters with different base shapes at the same module.
        FileNotFoundError / AdapterLoadError: an adapter directory can't be read.
    """
    if isinstance(adapters, str | Path | LoraWeights) or len(adapters) == 0:
        raise ValueError(
            f"adapters must be a non-empty list of adapter directories or LoraWeights, got {adapters!r}."
        )
    fusion = get_fusion_method(method, **options)
    weights = _check_weights(weights, len(adapters))
    sources = [a if isinstance(a, LoraWeights) else LoraWeights.from_dir(a) for a in adapters]

    module_names: dict[str, None] = {}  # union over sources, in first-seen order
    for source in sources:
        module_names.update(dict.fromkeys(source.modules))
    modules, errors = {}, {}
    for module in module_names:
        parts = [
            WeightedModule(w, source.modules[module], source.name)
            for w, source in zip(weights, sources)
            if module in source.modules
        ]
        _check_base_shapes(module, parts)
        fused = fusion.fuse_module(module, parts)
        modules[module] = (fused.lora_A, fused.lora_B)
        if fused.truncation_error is not None:
            errors[module] = fused.truncation_error

    result = FusedAdapter(
        method=fusion.name,
        modules=modules,
        sources=[s.name for s in sources],
        source_dirs=[s.source for s in sources],
        weights=weights,
        options=dict(fusion.options),
        truncation_error=errors,
        base_model_name_or_path=_common(sources, "base_model_name_or_path"),
        task_type=_common(sources, "task_type"),
        base_weights=_common_base_weights(sources),
    )
    logger.info(
        "fused %d adapters with %r: %d modules, total rank %d%s",
        len(sources),
        fusion.name,
        len(modules),
        sum(result.ranks.values()),
        f", max truncation error {max(errors.values()):.3g}" if errors else "",
    )
    return result


def _check_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    if isinstance(weights, torch.Tensor):
        weights = weights.detach().flatten().tolist()
    if isinstance(weights, str) or not isinstance(weights, Sequence):
        raise ValueError(f"weights must be a sequence of {n} numbers, got {weights!r}.")
    if len(weights) != n:
        raise ValueError(
            f"weights has {len(weights)} entries ({list(weights)!r}) but there are {n} adapters; pass one "
            "weight per adapter."
        )
    out = []
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(float(w)):
            raise ValueError(f"weights must be finite numbers, got {w!r} in {list(weights)!r}.")
        out.append(float(w))
    return out


def _check_base_shapes(module: str, parts: Sequence[WeightedModule]) -> None:
    first = parts[0]
    for part in parts[1:]:
        if part.lora.base_shape != first.lora.base_shape:
            raise ValueError(
                f"adapters {first.source!r} and {part.source!r} have different base shapes at module "
                f"{module!r}: [out, in] = {list(first.lora.base_shape)} vs {list(part.lora.base_shape)}; they "
                "were trained on different base models and can't be fused."
            )


def _common_base_weights(sources: Sequence[LoraWeights]) -> dict[str, torch.Tensor]:
    """The base weights the sources saved (``lm_head``); they must agree where two sources hold one."""
    common: dict[str, tuple[str, torch.Tensor]] = {}
    for source in sources:
        for module, weight in source.base_weights.items():
            if module not in common:
                common[module] = (source.name, weight)
            elif not base_weight_matches(weight, common[module][1]):
                raise ValueError(
                    f"adapters {common[module][0]!r} and {source.name!r} carry different base weights for "
                    f"{module!r}; they were trained on different base models (or vocabularies) and can't be fused."
                )
    return {module: weight for module, (_, weight) in common.items()}


def _common(sources: Sequence[LoraWeights], key: str) -> str | None:
    values = {(s.config.raw.get(key) if s.config is not None else None) for s in sources}
    values.discard(None)
    if len(values) == 1:
        return values.pop()
    if len(values) > 1:
        logger.warning(
            "source adapters disagree on %s (%s); leaving it unset.", key, sorted(map(str, values))
        )
    return None
