"""LoRA adapters on disk: read/write state dicts, pair ``lora_A``/``lora_B`` keys, read the scaling.

Key namings understood by ``parse_lora_ab_key`` (the module path may carry PEFT's ``base_model.model.``
prefix, which is stripped so module names are relative to the base model):

===========================================================  ==============================================
``<module>.lora_A.weight`` / ``<module>.lora_B.weight``      PEFT ``save_pretrained``, LLaMA-Factory, ms-swift
``<module>.lora_A.<adapter>.weight``                         in-memory PEFT / ms-swift (``.default.``)
``<module>.lora_a.weight`` / ``<module>.lora_b.weight``      torchtune
``<module>.lora_down.weight`` / ``<module>.lora_up.weight``  kohya-ss style (``down`` = A, ``up`` = B)
``<module>.lora.down.weight`` / ``<module>.lora.up.weight``  diffusers attention processors
===========================================================  ==============================================

Everything else (``lora_embedding_A``, DoRA ``lora_magnitude_vector``, ``lora_B.bias``, ``modules_to_save``,
kohya ``<module>.alpha``) is not an A/B pair; it is kept and written back unchanged.

Shapes follow ``nn.Linear``: ``lora_A`` is ``[r, in_features]``, ``lora_B`` is ``[out_features, r]``, and the
adapter adds ``s · B A x`` with the scaling ``s = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA,
Kalajdzievski 2023), ``r`` and ``lora_alpha`` per module from ``rank_pattern`` / ``alpha_pattern``.

Edited adapters are written with PEFT's canonical keys (``base_model.model.<module>.lora_A.weight``): PEFT
inserts the adapter name itself when loading, so a key that already holds one (``.default.``) would not load.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "CONFIG_NAME",
    "SAFETENSORS_NAME",
    "LoraAdapter",
    "LoraPair",
    "load_adapter_config",
    "load_lora_adapter",
    "load_lora_state_dict",
    "lora_scaling",
    "pair_lora_weights",
    "parse_lora_ab_key",
    "peft_lora_key",
    "save_lora_state_dict",
]

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."

Part = Literal["A", "B"]

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


@dataclass(frozen=True)
class _LoraKey:
    module: str
    part: Part
    adapter: str | None


def _match_lora_key(key: str) -> _LoraKey | None:
    match = _LORA_KEY.match(key)
    if match is None:
        return None
    module = match["module"]
    if module.startswith(PEFT_PREFIX):
        module = module[len(PEFT_PREFIX) :]
    adapter = match["adapter"]
    if adapter == "weight":  # "<module>.lora_A.weight.weight" is not a LoRA key
        return None
    return _LoraKey(module, _PART_NAMES[match["part"]], adapter)


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
    """PEFT's on-disk key: ``base_model.model.<module>.lora_<part>.weight``."""
    if part not in ("A", "B"):
        raise ValueError(f"part must be 'A' or 'B', got {part!r}.")
    return f"{PEFT_PREFIX}{module}.lora_{part}.weight"


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

    @property
    def in_features(self) -> int:
        return int(self.lora_A.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.lora_B.shape[0])


def pair_lora_weights(
    state: dict[str, torch.Tensor], *, adapter_name: str | None = None, source: str = "the state dict"
) -> dict[str, LoraPair]:
    """Group a state dict's LoRA keys into ``{module: LoraPair}`` (sorted by module name).

    Args:
        state: keys in any naming ``parse_lora_ab_key`` understands.
        adapter_name: with keys holding several adapters (``.lora_A.<adapter>.weight``), the one to take.
        source: what ``state`` came from, for error messages.

    Raises:
        ValueError: no A/B pair at all, an A without its B (or the reverse), several adapters in one file
            without ``adapter_name``, non-2-D factors (conv LoRA), or ``lora_A [r, in]`` and ``lora_B [out, r]``
            whose ``r`` differ.
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
            raise ValueError(
                f"{source}: module {parsed.module!r} has two lora_{parsed.part} weights ({slot[parsed.part][0]!r} "
                f"and {key!r}); the file holds several adapters {sorted(str(a) for a in adapters)}. Pass "
                "adapter_name (--adapter_name) to pick one."
            )
        slot[parsed.part] = (key, tensor)
    if not halves:
        sample = list(state)[:5]
        raise ValueError(
            f"{source} holds no LoRA A/B weight pairs (expected keys like "
            f"'base_model.model.<module>.lora_A.weight'); its first keys are {sample}. Pass a LoRA adapter."
        )
    pairs: dict[str, LoraPair] = {}
    for module, parts in sorted(halves.items()):
        if len(parts) != 2:
            (present,) = parts
            missing = "B" if present == "A" else "A"
            raise ValueError(
                f"{source}: {parts[present][0]!r} has no matching lora_{missing} weight for module {module!r}; "
                "the adapter file is incomplete or mixes namings."
            )
        (key_a, lora_a), (key_b, lora_b) = parts["A"], parts["B"]
        if lora_a.dim() != 2 or lora_b.dim() != 2:
            raise ValueError(
                f"{source}: module {module!r} has lora_A {tuple(lora_a.shape)} and lora_B {tuple(lora_b.shape)}; "
                "only linear LoRA (2-D factors) can be edited."
            )
        if lora_a.shape[0] != lora_b.shape[1]:
            raise ValueError(
                f"{source}: module {module!r} has mismatched shapes lora_A {tuple(lora_a.shape)} (expected "
                f"[r, in_features]) and lora_B {tuple(lora_b.shape)} (expected [out_features, r]); the ranks "
                f"{lora_a.shape[0]} and {lora_b.shape[1]} differ."
            )
        if not (lora_a.is_floating_point() and lora_b.is_floating_point()):
            raise ValueError(
                f"{source}: module {module!r} has non-floating LoRA weights ({lora_a.dtype}, {lora_b.dtype}); "
                "quantised factors are not supported."
            )
        pairs[module] = LoraPair(module, lora_a, lora_b, key_a, key_b)
    return pairs


# ----------------------------------------------------------------------------------------------------------
# Scaling
# ----------------------------------------------------------------------------------------------------------


def _pattern_key(patterns: dict[str, Any], module: str) -> str | None:
    # PEFT's get_pattern_key: a pattern (a regex) matches a module name that ends with it at a dot boundary.
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def lora_scaling(adapter_config: dict[str, Any], module: str, r: int) -> float:
    """The scaling ``s`` PEFT applies to ``module``: ``lora_alpha / r`` or, with rsLoRA, ``lora_alpha / sqrt(r)``.

    ``r`` and ``lora_alpha`` come from ``rank_pattern`` / ``alpha_pattern`` when a pattern matches the module
    (PEFT's rule), else from ``r`` / ``lora_alpha`` (``lora_alpha`` defaults to 8, PEFT's default).

    Args:
        adapter_config: the parsed ``adapter_config.json``.
        module: module name relative to the base model.
        r: the rank of the module's weights (``lora_A.shape[0]``).

    Raises:
        ValueError: ``r`` differs from the config's rank for this module (the scaling would be wrong), or a
            non-positive ``r`` / non-finite ``lora_alpha``.
    """
    if r <= 0:
        raise ValueError(f"module {module!r}: r must be positive, got {r}.")
    rank_pattern = adapter_config.get("rank_pattern") or {}
    alpha_pattern = adapter_config.get("alpha_pattern") or {}
    rank_key = _pattern_key(rank_pattern, module)
    expected = int(rank_pattern[rank_key]) if rank_key is not None else adapter_config.get("r")
    if expected is not None and int(expected) != r:
        raise ValueError(
            f"module {module!r} has rank {r} in the weights but adapter_config.json says r={expected} for it "
            "(r / rank_pattern); fix the config or the weights."
        )
    alpha_key = _pattern_key(alpha_pattern, module)
    alpha = (
        float(alpha_pattern[alpha_key])
        if alpha_key is not None
        else float(adapter_config.get("lora_alpha", 8))
    )
    if not math.isfinite(alpha):
        raise ValueError(f"module {module!r}: lora_alpha must be finite, got {alpha!r}.")
    return alpha / math.sqrt(r) if adapter_config.get("use_rslora") else alpha / r


# ----------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------


def _weights_file(path: Path) -> Path:
    if path.is_file():
        return path
    if not path.exists():
        raise FileNotFoundError(f"LoRA path {str(path)!r} does not exist; pass an adapter directory or file.")
    for name in (SAFETENSORS_NAME, BIN_NAME):
        if (path / name).is_file():
            return path / name
    candidates = sorted(path.glob("*.safetensors"))
    if len(candidates) == 1:
        return candidates[0]
    raise FileNotFoundError(
        f"{path} has no {SAFETENSORS_NAME} (or legacy {BIN_NAME}); found {[c.name for c in candidates]}. Pass "
        "the weights file itself."
    )


def load_lora_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a LoRA state dict from an adapter directory or a ``.safetensors`` / ``.bin`` file (to CPU).

    Raises:
        FileNotFoundError: the path, or the directory's weights file, doesn't exist.
        ValueError: a ``.bin`` that doesn't hold a dict of tensors.
    """
    weights = _weights_file(Path(path).expanduser())
    if weights.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(weights), device="cpu")
    # weights_only: a pickled file must not run code when loaded.
    state = torch.load(str(weights), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{weights} does not hold a state dict of tensors.")
    return state


def load_adapter_config(path: str | Path) -> dict[str, Any]:
    """The ``adapter_config.json`` of an adapter directory (or the one next to a weights file), or ``{}``.

    Raises:
        ValueError: the file isn't a JSON object.
    """
    path = Path(path).expanduser()
    config_path = (path if path.is_dir() else path.parent) / CONFIG_NAME
    if not config_path.is_file():
        return {}
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} must hold a JSON object, got {type(config).__name__}.")
    return config


@dataclass
class LoraAdapter:
    """An adapter as read from disk: its config, its full state dict and its A/B pairs.

    Attributes:
        path: where it was read from.
        config: ``adapter_config.json`` (``{}`` when absent).
        state: every tensor of the weights file (non-LoRA entries are written back unchanged).
        pairs: ``{module: LoraPair}``, module names relative to the base model.
    """

    path: Path
    config: dict[str, Any]
    state: dict[str, torch.Tensor]
    pairs: dict[str, LoraPair] = field(default_factory=dict)

    def scaling(self, module: str) -> float:
        """``s`` for ``module`` (see ``lora_scaling``); kohya ``<module>.alpha`` tensors override ``lora_alpha``."""
        pair = self.pairs[module]
        prefix = pair.key_A.rsplit(".lora", 1)[0]
        alpha = self.state.get(f"{prefix}.alpha")
        if alpha is not None and alpha.numel() == 1:
            return float(alpha) / pair.r
        return lora_scaling(self.config, module, pair.r)


def load_lora_adapter(path: str | Path, *, adapter_name: str | None = None) -> LoraAdapter:
    """Read an adapter directory (or weights file): config, state dict, paired factors.

    Raises:
        FileNotFoundError: see ``load_lora_state_dict``.
        ValueError: see ``pair_lora_weights`` / ``load_adapter_config``; a config that isn't LoRA, or DoRA
            (its output is renormalised per column, so ``s·U diag(σ) Vᵀ`` is not what it adds).
    """
    path = Path(path).expanduser()
    config = load_adapter_config(path)
    peft_type = config.get("peft_type")
    if peft_type is not None and str(peft_type).upper() != "LORA":
        raise ValueError(
            f"{path}: peft_type is {peft_type!r}; only LoRA adapters (peft_type 'LORA') can be edited."
        )
    if config.get("use_dora"):
        raise ValueError(
            f"{path}: use_dora=True; DoRA rescales each output column by a learned magnitude, so editing the "
            "singular values of B·A is not what the adapter adds. Use a plain LoRA adapter."
        )
    state = load_lora_state_dict(path)
    pairs = pair_lora_weights(state, adapter_name=adapter_name, source=str(path))
    return LoraAdapter(path=path, config=config, state=state, pairs=pairs)


def save_lora_state_dict(
    state: dict[str, torch.Tensor],
    out_dir: str | Path,
    *,
    adapter_config: dict[str, Any] | None = None,
) -> Path:
    """Write ``adapter_model.safetensors`` (and ``adapter_config.json`` if given) to ``out_dir``.

    Tensors are made contiguous and unshared (safetensors refuses shared storage). Returns the weights path.
    """
    from safetensors.torch import save_file

    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    tensors = {key: value.detach().to("cpu").contiguous().clone() for key, value in state.items()}
    weights = out / SAFETENSORS_NAME
    save_file(tensors, str(weights), metadata={"format": "pt"})
    if adapter_config is not None:
        (out / CONFIG_NAME).write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
    logger.info("wrote %d tensors to %s", len(tensors), weights)
    return weights
