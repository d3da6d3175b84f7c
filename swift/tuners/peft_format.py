"""The PEFT LoRA adapter format: the one reader and the one writer of adapter directories.

A PEFT LoRA directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or the legacy
``adapter_model.bin``, read only through ``torch.load(weights_only=True)``). Swift loading, fusion and spectral
editing all read adapters through ``read_adapter_dir`` and write them through ``write_adapter_dir``.

Key dialects understood by ``parse_lora_ab_key`` (PEFT's ``base_model.model.`` prefix is stripped, so module
names are relative to the base model):

===========================================================  ==============================================
``<module>.lora_A.weight`` / ``<module>.lora_B.weight``      PEFT ``save_pretrained``, LLaMA-Factory, ms-swift
``<module>.lora_A.<adapter>.weight``                         in-memory PEFT / ms-swift (``.default.``)
``<module>.lora_a.weight`` / ``<module>.lora_b.weight``      torchtune
``<module>.lora_down.weight`` / ``<module>.lora_up.weight``  kohya-ss style (``down`` = A, ``up`` = B)
``<module>.lora.down.weight`` / ``<module>.lora.up.weight``  diffusers attention processors
===========================================================  ==============================================

``<module>.base_layer.weight`` is the full base weight PEFT saves for a targeted ``lm_head`` /
``embed_tokens`` (``save_embedding_layers="auto"``); the reader keeps it aside in ``LoraAdapter.base_weights``
and a loader compares it with the model's own (``base_weight_matches``).

Shapes follow ``nn.Linear``: ``lora_A`` is ``[r, in_features]``, ``lora_B`` is ``[out_features, r]``, and the
adapter adds ``s · B A x`` with ``s = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA, Kalajdzievski
2023), ``r`` and ``lora_alpha`` per module from ``rank_pattern`` / ``alpha_pattern`` (PEFT's matching rule).
Anything that would make an adapter silently wrong (a corrupt file, NaN/inf weights, an A without its B, a
rank the config contradicts) is an ``AdapterLoadError`` naming the file, the key and the fix.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from swift.utils import get_logger
from swift.utils.files import atomic_write_together, fsync_dir, temp_name

logger = get_logger(__name__)

__all__ = [
    "BIN_NAME",
    "CONFIG_NAME",
    "PEFT_PREFIX",
    "SAFETENSORS_NAME",
    "AdapterLoadError",
    "LoraAdapter",
    "LoraAdapterConfig",
    "LoraPair",
    "base_weight_matches",
    "lora_scaling",
    "pair_lora_weights",
    "parse_lora_ab_key",
    "peft_base_weight_key",
    "peft_lora_key",
    "read_adapter_config",
    "read_adapter_dir",
    "read_state_dict",
    "target_module_matches",
    "write_adapter_dir",
]

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."

Part = Literal["A", "B"]


class AdapterLoadError(ValueError):
    """An adapter directory that cannot be loaded exactly as written."""


# ----------------------------------------------------------------------------------------------------------
# Scaling and the config
# ----------------------------------------------------------------------------------------------------------


def lora_scaling(lora_alpha: float, r: int, use_rslora: bool) -> float:
    """``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA (Kalajdzievski 2023, Sec. 3)."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def _pattern_key(patterns: Mapping[str, Any], module_name: str) -> str | None:
    """PEFT's ``get_pattern_key``: a pattern (a regex) matches a module name ending with it at a dot boundary."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None


@dataclass
class LoraAdapterConfig:
    """The parts of a PEFT ``LoraConfig`` that decide what the adapter computes.

    Attributes:
        r: default rank (per-module ranks come from the weights; ``rank_pattern`` is checked against them).
        lora_alpha: default alpha; ``alpha_pattern`` overrides it per module.
        use_rslora: scaling ``alpha / sqrt(r)`` instead of ``alpha / r``.
        target_modules: names (suffix match), a regex (full match) or ``"all-linear"``.
        exclude_modules: names or a regex never targeted.
        layers_to_transform / layers_pattern: PEFT's layer filter.
        rank_pattern / alpha_pattern: per-module ``r`` / ``lora_alpha`` (regex keys, PEFT's suffix rule).
        lora_dropout: dropout on the adapter input (training only).
        base_model_name_or_path: the model the adapter was trained on.
        raw: the whole JSON, unknown fields included (what ``to_dict`` returns).
    """

    r: int = 8
    lora_alpha: float = 8.0
    use_rslora: bool = False
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    lora_dropout: float = 0.0
    base_model_name_or_path: str | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = CONFIG_NAME) -> LoraAdapterConfig:
        """Parse and validate a PEFT config dict (``lora_alpha`` defaults to 8, PEFT's default).

        Raises:
            AdapterLoadError: ``peft_type`` present and not LoRA, a non-positive ``r``, a non-finite
                ``lora_alpha``, or a field of the wrong type.
        """
        peft_type = data.get("peft_type")
        if peft_type is not None and str(peft_type).upper() != "LORA":
            raise AdapterLoadError(
                f"{source}: peft_type is {peft_type!r}; only LoRA adapters (peft_type 'LORA') are supported."
            )
        try:
            r = int(data.get("r", 8))
            lora_alpha = float(data.get("lora_alpha", 8))
            config = cls(
                r=r,
                lora_alpha=lora_alpha,
                use_rslora=bool(data.get("use_rslora", False)),
                target_modules=_list_or_str(data.get("target_modules")),
                exclude_modules=_list_or_str(data.get("exclude_modules")),
                layers_to_transform=_int_list(data.get("layers_to_transform")),
                layers_pattern=_list_or_str(data.get("layers_pattern")),
                rank_pattern={str(k): int(v) for k, v in (data.get("rank_pattern") or {}).items()},
                alpha_pattern={str(k): float(v) for k, v in (data.get("alpha_pattern") or {}).items()},
                lora_dropout=float(data.get("lora_dropout", 0.0) or 0.0),
                base_model_name_or_path=data.get("base_model_name_or_path"),
                raw=dict(data),
            )
        except (TypeError, ValueError, AttributeError) as err:
            raise AdapterLoadError(
                f"{source}: a field has the wrong type ({err}); r / rank_pattern values must be integers, "
                "lora_alpha / alpha_pattern values numbers. Fix the config."
            ) from err
        if r <= 0:
            raise AdapterLoadError(f"{source}: r must be a positive integer, got {data.get('r')!r}.")
        if not math.isfinite(lora_alpha):
            raise AdapterLoadError(f"{source}: lora_alpha must be a finite number, got {lora_alpha!r}.")
        return config

    def to_dict(self) -> dict[str, Any]:
        """The JSON dict: ``raw`` when read from a file, else the fields in PEFT's names."""
        if self.raw:
            return dict(self.raw)
        data = {k: v for k, v in self.__dict__.items() if k != "raw"}
        return {"peft_type": "LORA", **data}

    def check_mixture_supported(self, source: str = CONFIG_NAME) -> None:
        """Refuse what the mixture layers can't compute exactly (docs/decisions.md #1).

        Raises:
            AdapterLoadError: no ``peft_type``, DoRA, biases, ``fan_in_fan_out`` or ``modules_to_save``.
        """
        data = self.raw
        if str(data.get("peft_type", "")).upper() != "LORA":
            raise AdapterLoadError(
                f"{source}: peft_type is {data.get('peft_type')!r}; only LoRA adapters (peft_type 'LORA') can be "
                "loaded into the mixture layers."
            )
        unsupported = {
            "use_dora": (bool(data.get("use_dora")), "DoRA adapters"),
            "bias": (data.get("bias", "none") not in ("none", None), f"bias={data.get('bias')!r}"),
            "lora_bias": (bool(data.get("lora_bias")), "lora_bias=True"),
            "fan_in_fan_out": (bool(data.get("fan_in_fan_out")), "fan_in_fan_out (Conv1D) adapters"),
            "modules_to_save": (
                bool(data.get("modules_to_save")),
                f"modules_to_save={data.get('modules_to_save')}",
            ),
        }
        for key, (bad, what) in unsupported.items():
            if bad:
                raise AdapterLoadError(
                    f"{source}: {what} ({key}) are not supported by the mixture layers; merge or retrain the "
                    "adapter as a plain LoRA (no DoRA, bias='none', no modules_to_save)."
                )

    def expected_rank(self, module_name: str) -> int:
        """``r`` for one module: its ``rank_pattern`` entry, else ``r``."""
        key = _pattern_key(self.rank_pattern, module_name)
        return int(self.rank_pattern[key]) if key is not None else self.r

    def scaling(self, module_name: str, r: int) -> float:
        """``s`` for one module: alpha (``alpha_pattern`` aware) over ``r`` (or ``sqrt(r)`` with rsLoRA)."""
        key = _pattern_key(self.alpha_pattern, module_name)
        alpha = float(self.alpha_pattern[key]) if key is not None else self.lora_alpha
        return lora_scaling(alpha, r, self.use_rslora)


def _list_or_str(value: Any) -> list[str] | str | None:
    if value is None or isinstance(value, str):
        return value
    return list(value)


def _int_list(value: Any) -> list[int] | None:
    if value is None:
        return None
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]


def target_module_matches(config: LoraAdapterConfig, module_name: str, is_output_layer: bool) -> bool:
    """Whether PEFT would put this adapter on ``module_name`` (a linear layer) given the config."""
    excl = config.exclude_modules
    if excl:
        if isinstance(excl, str) and re.fullmatch(excl, module_name):
            return False
        if not isinstance(excl, str) and (
            module_name in excl or any(module_name.endswith("." + e) for e in excl)
        ):
            return False
    targets = config.target_modules
    if targets is None:
        return False
    if isinstance(targets, str):
        if targets == "all-linear":
            return not is_output_layer
        return re.fullmatch(targets, module_name) is not None
    found = module_name in targets or any(module_name.endswith("." + t) for t in targets)
    if found and config.layers_to_transform:
        patterns = config.layers_pattern
        patterns = [patterns] if isinstance(patterns, str) else (patterns or [])
        match = None
        if not patterns:
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module_name)
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", module_name)
            if match:
                break
        found = match is not None and int(match.group("idx")) in config.layers_to_transform
    return found


# ----------------------------------------------------------------------------------------------------------
# Keys
# ----------------------------------------------------------------------------------------------------------

_PART_NAMES: dict[str, Part] = {
    "lora_A": "A",
    "lora_B": "B",
    "lora_a": "A",
    "lora_b": "B",
    "lora_down": "A",
    "lora_up": "B",
    "lora.down": "A",
    "lora.up": "B",
}
# ``module`` is greedy but must be followed by one of the part names, so ``x.lora_A.default.weight`` parses as
# module ``x``, part ``lora_A``, adapter ``default``.
_LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_a|lora_b|lora_down|lora_up|lora\.down|lora\.up)"
    r"(?:\.(?P<adapter>[^.]+))?\.weight$"
)
_BASE_KEY = re.compile(r"^(?P<module>.+)\.base_layer\.weight$")


@dataclass(frozen=True)
class _LoraKey:
    module: str
    part: Part
    adapter: str | None


def _strip_prefix(module: str) -> str:
    return module[len(PEFT_PREFIX) :] if module.startswith(PEFT_PREFIX) else module


def _match_lora_key(key: str) -> _LoraKey | None:
    match = _LORA_KEY.match(key)
    if match is None or match["adapter"] == "weight":  # "<module>.lora_A.weight.weight" is no LoRA key
        return None
    return _LoraKey(_strip_prefix(match["module"]), _PART_NAMES[match["part"]], match["adapter"])


def parse_lora_ab_key(key: str) -> tuple[str, Part] | None:
    """Split a state-dict key into ``(module, "A" | "B")``, or ``None`` if it isn't a LoRA A/B weight.

    Examples:
        ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` ->
        ``("model.layers.0.self_attn.q_proj", "A")``; ``...q_proj.lora_B.default.weight`` -> ``(..., "B")``;
        ``...q_proj.lora_up.weight`` -> ``(..., "B")``; ``...lora_embedding_A`` or ``...lora_B.bias`` -> ``None``.
    """
    parsed = _match_lora_key(key)
    return None if parsed is None else (parsed.module, parsed.part)


def peft_lora_key(module: str, part: Part) -> str:
    """PEFT's on-disk key: ``base_model.model.<module>.lora_<part>.weight``.

    PEFT inserts the adapter name itself when loading, so a key that already holds one would not load.
    """
    if part not in ("A", "B"):
        raise ValueError(f"part must be 'A' or 'B', got {part!r}.")
    return f"{PEFT_PREFIX}{module}.lora_{part}.weight"


def peft_base_weight_key(module: str) -> str:
    """PEFT's key for a saved base weight (``save_embedding_layers``): ``base_model.model.<module>.base_layer.weight``."""
    return f"{PEFT_PREFIX}{module}.base_layer.weight"


# ----------------------------------------------------------------------------------------------------------
# Pairing
# ----------------------------------------------------------------------------------------------------------


@dataclass
class LoraPair:
    """One module's LoRA factors: ``ΔW = s · lora_B @ lora_A`` with ``lora_A [r, in]``, ``lora_B [out, r]``."""

    module: str
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    key_A: str
    key_B: str

    @property
    def r(self) -> int:
        return int(self.lora_A.shape[0])


def pair_lora_weights(
    state: Mapping[str, torch.Tensor], *, adapter_name: str | None = None, source: str = "the state dict"
) -> dict[str, LoraPair]:
    """Group a state dict's LoRA keys into ``{module: LoraPair}`` (sorted by module name).

    Args:
        state: keys in any dialect ``parse_lora_ab_key`` understands; other keys are ignored here.
        adapter_name: with keys holding several adapters (``.lora_A.<adapter>.weight``), the one to take.
        source: what ``state`` came from, for error messages.

    Raises:
        AdapterLoadError: no A/B pair at all, an A without its B (or the reverse), several adapters in one
            file without ``adapter_name``, non-2-D factors (conv LoRA), ``lora_A [r, in]`` and ``lora_B [out, r]``
            whose ``r`` differ, or non-floating factors.
    """
    halves: dict[str, dict[Part, tuple[str, torch.Tensor]]] = {}
    adapters: set[str | None] = set()
    for key, tensor in state.items():
        parsed = _match_lora_key(key)
        if parsed is None:
            continue
        adapters.add(parsed.adapter)
        if adapter_name is not None and parsed.adapter not in (adapter_name, None):
            continue
        slot = halves.setdefault(parsed.module, {})
        if parsed.part in slot:
            raise AdapterLoadError(
                f"{source}: module {parsed.module!r} has two lora_{parsed.part} weights ({slot[parsed.part][0]!r} "
                f"and {key!r}); the file holds several adapters {sorted(str(a) for a in adapters)}. Pass "
                "adapter_name (--adapter_name) to pick one."
            )
        slot[parsed.part] = (key, tensor)
    if not halves:
        raise AdapterLoadError(
            f"{source} holds no LoRA A/B weight pairs (expected keys like "
            f"'base_model.model.<module>.lora_A.weight'); its first keys are {list(state)[:5]}. Pass a LoRA adapter."
        )
    pairs: dict[str, LoraPair] = {}
    for module, parts in sorted(halves.items()):
        if len(parts) != 2:
            (present,) = parts
            missing: Part = "B" if present == "A" else "A"
            raise AdapterLoadError(
                f"{source}: missing key {peft_lora_key(module, missing)}: {parts[present][0]!r} has no matching "
                f"lora_{missing} weight for module {module!r}; the weights file is incomplete or mixes namings."
            )
        (key_a, lora_a), (key_b, lora_b) = parts["A"], parts["B"]
        if lora_a.dim() != 2 or lora_b.dim() != 2:
            raise AdapterLoadError(
                f"{source}: module {module!r} has lora_A {tuple(lora_a.shape)} and lora_B {tuple(lora_b.shape)}; "
                "only linear LoRA (2-D factors) is supported."
            )
        if lora_a.shape[0] != lora_b.shape[1]:
            raise AdapterLoadError(
                f"{source}: module {module!r} has mismatched shapes lora_A {tuple(lora_a.shape)} (expected "
                f"[r, in_features]) and lora_B {tuple(lora_b.shape)} (expected [out_features, r]); the ranks "
                f"{lora_a.shape[0]} and {lora_b.shape[1]} differ."
            )
        if not (lora_a.is_floating_point() and lora_b.is_floating_point()):
            raise AdapterLoadError(
                f"{source}: module {module!r} has non-floating LoRA weights ({lora_a.dtype}, {lora_b.dtype}); "
                "quantised factors are not supported."
            )
        pairs[module] = LoraPair(module, lora_a, lora_b, key_a, key_b)
    return pairs


def base_weight_matches(saved: torch.Tensor, own: torch.Tensor) -> bool:
    """Whether a ``base_layer.weight`` saved in an adapter is the model's own weight.

    Same dtype: bit-equal. Different dtypes (e.g. a bf16 model, an fp32 adapter): equal within one rounding
    step of the coarser dtype (relative ``eps``), compared in float64.
    """
    if saved.shape != own.shape:
        return False
    own = own.detach().to("cpu")
    if saved.dtype == own.dtype:
        return torch.equal(saved, own)
    eps = max(torch.finfo(saved.dtype).eps, torch.finfo(own.dtype).eps)
    return torch.allclose(saved.double(), own.double(), rtol=eps, atol=0.0)


# ----------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------


@dataclass
class LoraAdapter:
    """An adapter as read from disk.

    Attributes:
        path: the directory (or weights file) it was read from.
        config: the parsed ``adapter_config.json`` (None when a lenient read found none).
        pairs: ``{module: LoraPair}``, module names relative to the base model.
        base_weights: ``{module: weight [out, in]}`` saved by PEFT for a targeted ``lm_head`` / ``embed_tokens``;
            a loader must check them against the model (``base_weight_matches``).
        state: every tensor of the weights file, keys as written (non-LoRA entries can be written back).
    """

    path: Path
    config: LoraAdapterConfig | None
    pairs: dict[str, LoraPair]
    base_weights: dict[str, torch.Tensor] = field(default_factory=dict)
    state: dict[str, torch.Tensor] = field(default_factory=dict)

    def scaling(self, module: str) -> float:
        """``s`` for ``module``; a kohya ``<module>.alpha`` tensor overrides ``lora_alpha``."""
        pair = self.pairs[module]
        prefix = pair.key_A.rsplit(".lora", 1)[0]
        alpha = self.state.get(f"{prefix}.alpha")
        if alpha is not None and alpha.numel() == 1:
            return lora_scaling(float(alpha), pair.r, use_rslora=False)
        return (self.config or LoraAdapterConfig()).scaling(module, pair.r)


def _find_weights_file(path: Path, *, any_safetensors: bool) -> Path:
    for name in (SAFETENSORS_NAME, BIN_NAME):
        if (path / name).is_file():
            return path / name
    candidates = sorted(path.glob("*.safetensors"))
    if any_safetensors and len(candidates) == 1:
        return candidates[0]
    raise FileNotFoundError(
        f"{path} has no weights file: expected {SAFETENSORS_NAME} (or legacy {BIN_NAME}); found "
        f"{[c.name for c in candidates]}. Save the adapter with PeftModel.save_pretrained."
    )


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read an adapter's tensors (to CPU) from its directory or a ``.safetensors`` / ``.bin`` file.

    Every floating tensor must be finite. A ``.bin`` is read with ``torch.load(weights_only=True)``: a pickle
    that would run code is refused, not executed.

    Raises:
        FileNotFoundError: the path, or the directory's weights file, doesn't exist.
        AdapterLoadError: the file is truncated or corrupt; a ``.bin`` holds something other than a dict of
            tensors; a tensor holds NaN or inf.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"adapter path {str(path)!r} does not exist; check the path.")
    weights = path if path.is_file() else _find_weights_file(path, any_safetensors=True)
    state = _load_safetensors(weights) if weights.suffix == ".safetensors" else _load_bin(weights)
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise AdapterLoadError(
                f"{weights}: tensor {key!r} holds {bad} NaN/inf value(s) of {tensor.numel()}; the adapter is "
                "broken (e.g. training diverged) and its outputs would be NaN. Retrain or re-export it."
            )
    return state


def _load_safetensors(weights: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(weights), device="cpu")
    except (SafetensorError, OSError) as err:
        raise AdapterLoadError(
            f"{weights} is corrupt: not a valid safetensors file, or truncated ({err}). Copy or save the "
            "adapter again."
        ) from err


def _load_bin(weights: Path) -> dict[str, torch.Tensor]:
    import pickle

    try:
        # weights_only: a pickled .bin must not run code on load.
        state = torch.load(str(weights), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise AdapterLoadError(
            f"{weights} holds objects other than tensors, or is corrupt; torch.load(weights_only=True) refused "
            f"it ({str(err).splitlines()[0]}). Re-save the adapter as {SAFETENSORS_NAME}."
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise AdapterLoadError(
            f"{weights} is corrupt or truncated ({type(err).__name__}: {err}). Copy or save the adapter again."
        ) from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AdapterLoadError(f"{weights} does not hold a state dict of tensors.")
    return state


def read_adapter_config(path: str | Path) -> dict[str, Any] | None:
    """The raw ``adapter_config.json`` of an adapter directory (or the one beside a weights file), or None.

    Raises:
        AdapterLoadError: the file isn't valid JSON or doesn't hold an object.
    """
    path = Path(path).expanduser()
    config_path = (path if path.is_dir() else path.parent) / CONFIG_NAME
    if not config_path.is_file():
        return None
    try:
        raw = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterLoadError(f"{config_path} is not valid JSON: {err}") from err
    if not isinstance(raw, dict):
        raise AdapterLoadError(f"{config_path} must hold a JSON object, got {type(raw).__name__}.")
    return raw


def read_adapter_dir(
    adapter_dir: str | Path, *, adapter_name: str | None = None, strict: bool = True
) -> LoraAdapter:
    """Read and validate a LoRA adapter.

    Args:
        adapter_dir: the adapter directory (lenient reads also take a weights file).
        adapter_name: for files holding several adapters (``.lora_A.<name>.weight``), the one to take.
        strict: what loading into a model and fusion need: a directory with an ``adapter_config.json`` the
            mixture layers can compute exactly, and no tensor other than LoRA factors and PEFT's saved base
            weights. ``strict=False`` (spectral editing) accepts a missing config and keeps other tensors in
            ``state`` to write them back unchanged.

    Returns:
        The ``LoraAdapter``: config, paired factors, saved base weights, the whole state dict.

    Raises:
        FileNotFoundError: the path is missing, or has no weights file.
        NotADirectoryError: a strict read of a file.
        AdapterLoadError: no/invalid ``adapter_config.json`` (strict), a corrupt weights file, NaN/inf weights,
            an unexpected key (strict), an A without its B (or the reverse), inconsistent ranks, or
            non-floating factors.
    """
    path = Path(adapter_dir).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"adapter directory {str(path)!r} does not exist; check the path.")
    if strict and not path.is_dir():
        raise NotADirectoryError(
            f"adapter path {str(path)!r} is a file; pass the directory holding {CONFIG_NAME}."
        )
    raw = read_adapter_config(path)
    config_source = str((path if path.is_dir() else path.parent) / CONFIG_NAME)
    if raw is None and strict:
        raise AdapterLoadError(
            f"{path} has no {CONFIG_NAME}; a PEFT adapter directory needs it (save with PeftModel.save_pretrained)."
        )
    config = None if raw is None else LoraAdapterConfig.from_dict(raw, source=config_source)
    if strict:
        config.check_mixture_supported(config_source)
    if path.is_dir():
        state = read_state_dict(_find_weights_file(path, any_safetensors=not strict))
    else:
        state = read_state_dict(path)
    pairs = pair_lora_weights(state, adapter_name=adapter_name, source=str(path))
    base_weights = {
        _strip_prefix(match["module"]): tensor
        for key, tensor in state.items()
        if (match := _BASE_KEY.match(key)) is not None
    }
    if strict:
        paired = {key for pair in pairs.values() for key in (pair.key_A, pair.key_B)}
        for key in state:
            if key not in paired and _BASE_KEY.match(key) is None:
                raise AdapterLoadError(f"{path}: unexpected key {key!r}. {_why_unexpected(key)}")
    if config is not None:
        for module, pair in pairs.items():
            expected = config.expected_rank(module)
            if pair.r != expected:
                raise AdapterLoadError(
                    f"{path}: {module} has rank {pair.r} but adapter_config.json says r={expected} for it "
                    "(r / rank_pattern); the scaling would be wrong. Fix the config or the weights."
                )
    return LoraAdapter(path=path, config=config, pairs=pairs, base_weights=base_weights, state=state)


def _why_unexpected(key: str) -> str:
    if ".lora_embedding_" in key:
        return (
            "It is an embedding LoRA (target_modules includes an nn.Embedding such as embed_tokens), which the "
            "mixture layers don't support (docs/decisions.md #1); retrain without the embedding in "
            "target_modules."
        )
    return (
        "Only lora_A/lora_B weights of linear layers (and PEFT's saved base_layer.weight) are supported (no "
        "embeddings, biases, DoRA magnitudes or modules_to_save)."
    )


# ----------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------


def write_adapter_dir(
    out_dir: str | Path,
    state: Mapping[str, torch.Tensor],
    adapter_config: LoraAdapterConfig | Mapping[str, Any] | None = None,
    *,
    extra_files: Mapping[str, str] | None = None,
) -> Path:
    """Write ``adapter_model.safetensors`` (+ ``adapter_config.json`` if given, + ``extra_files``) atomically.

    A new ``out_dir`` is built under a temporary name beside it and renamed into place when complete; in an
    existing directory all files are first written under temporary names, then renamed over the old ones
    (other files are left alone, as ``PeftModel.save_pretrained`` does). A crash never leaves a half-written
    file, and a failure while writing changes none of them.
    Tensors are made contiguous and unshared (safetensors refuses shared storage).

    Args:
        out_dir: the adapter directory.
        state: the tensors, keys as they should be on disk (``peft_lora_key`` for PEFT's own).
        adapter_config: written as ``adapter_config.json`` (sorted keys, as PEFT does).
        extra_files: ``{file name: text}`` written beside them (e.g. metadata).

    Returns:
        ``out_dir``.

    Raises:
        NotADirectoryError: ``out_dir`` exists and is a file.
    """
    from safetensors.torch import save

    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"out_dir {str(out)!r} is a file; pass a directory to write the adapter to.")
    tensors = {key: value.detach().to("cpu").contiguous().clone() for key, value in state.items()}
    files: dict[str, str | bytes] = {SAFETENSORS_NAME: save(tensors, metadata={"format": "pt"})}
    files.update(extra_files or {})
    if adapter_config is not None:
        config = adapter_config.to_dict() if isinstance(adapter_config, LoraAdapterConfig) else adapter_config
        files[CONFIG_NAME] = json.dumps(dict(config), indent=2, sort_keys=True) + "\n"
    if out.is_dir():
        atomic_write_together({out / name: data for name, data in files.items()})
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_name(out)
        try:
            tmp.mkdir()
            atomic_write_together({tmp / name: data for name, data in files.items()})
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_dir(out.parent)
    logger.info("wrote %d tensors to %s", len(tensors), out / SAFETENSORS_NAME)
    return out
