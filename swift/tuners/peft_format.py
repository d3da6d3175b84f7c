"""Reading PEFT-format LoRA adapter directories, strictly.

A PEFT LoRA directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or the legacy
``adapter_model.bin``) whose keys look like ``base_model.model.<module>.lora_A.weight``. Adapters written by
PEFT, ms-swift, LLaMA-Factory and our own ``train.py`` all use it. Everything that could turn into a silently
wrong or silently zero adapter is an error here, naming the file, the key and the fix.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from swift.tuners.lora_layers import lora_scaling

__all__ = ["AdapterLoadError", "LoraAdapterConfig", "read_adapter_dir", "target_module_matches"]

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"

_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$"
)


class AdapterLoadError(ValueError):
    """An adapter directory that cannot be loaded exactly as written."""


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
        lora_dropout: dropout on the adapter input (training only).
        base_model_name_or_path: the model the adapter was trained on.
        raw: the whole JSON, unknown fields included.
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
    def from_dict(cls, data: dict[str, Any], source: str = "adapter_config.json") -> LoraAdapterConfig:
        """Validate a PEFT config dict; features we can't compute exactly are errors.

        Raises:
            AdapterLoadError: not a LoRA config, or uses DoRA, biases, fan_in_fan_out or modules_to_save.
        """
        peft_type = str(data.get("peft_type", "")).upper()
        if peft_type != "LORA":
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
        r = int(data.get("r", 8))
        if r <= 0:
            raise AdapterLoadError(f"{source}: r must be a positive integer, got {data.get('r')!r}.")
        return cls(
            r=r,
            lora_alpha=float(data.get("lora_alpha", r)),
            use_rslora=bool(data.get("use_rslora", False)),
            target_modules=_list_or_str(data.get("target_modules")),
            exclude_modules=_list_or_str(data.get("exclude_modules")),
            layers_to_transform=_int_list(data.get("layers_to_transform")),
            layers_pattern=_list_or_str(data.get("layers_pattern")),
            rank_pattern=dict(data.get("rank_pattern") or {}),
            alpha_pattern=dict(data.get("alpha_pattern") or {}),
            lora_dropout=float(data.get("lora_dropout", 0.0) or 0.0),
            base_model_name_or_path=data.get("base_model_name_or_path"),
            raw=dict(data),
        )

    def expected_rank(self, module_name: str) -> int:
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


def _pattern_key(patterns: dict[str, Any], module_name: str) -> str | None:
    """PEFT's rule: a pattern matches a module name that ends with it (as regex) at a dot boundary."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None


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


def read_adapter_dir(
    adapter_dir: str | Path,
) -> tuple[LoraAdapterConfig, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Read and validate a PEFT LoRA directory.

    Returns:
        The config and ``{module_name: (lora_A [r, in], lora_B [out, r])}`` with module names relative to
        the base model (PEFT's ``base_model.model.`` prefix removed).

    Raises:
        FileNotFoundError: the path is missing, or has no weights file.
        NotADirectoryError: the path is a file.
        AdapterLoadError: no/invalid ``adapter_config.json``, an unexpected key, an A without its B (or the
            reverse), inconsistent ranks, or non-floating weights.
    """
    path = Path(adapter_dir).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"adapter directory {str(path)!r} does not exist; check the path.")
    if not path.is_dir():
        raise NotADirectoryError(
            f"adapter path {str(path)!r} is a file; pass the directory holding adapter_config.json."
        )
    config_path = path / CONFIG_NAME
    if not config_path.is_file():
        raise AdapterLoadError(
            f"{path} has no {CONFIG_NAME}; a PEFT adapter directory needs it (save with PeftModel.save_pretrained)."
        )
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise AdapterLoadError(f"{config_path} is not valid JSON: {err}") from err
    if not isinstance(raw, dict):
        raise AdapterLoadError(f"{config_path} must hold a JSON object, got {type(raw).__name__}.")
    config = LoraAdapterConfig.from_dict(raw, source=str(config_path))
    state = _read_weights(path)
    return config, _pair_weights(state, path, config)


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    st_path, bin_path = path / SAFETENSORS_NAME, path / BIN_NAME
    if st_path.is_file():
        from safetensors.torch import load_file

        return load_file(str(st_path), device="cpu")
    if bin_path.is_file():
        # weights_only: a pickled .bin must not run code on load.
        state = torch.load(str(bin_path), map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise AdapterLoadError(f"{bin_path} does not hold a state dict.")
        return state
    raise FileNotFoundError(
        f"{path} has no weights file: expected {SAFETENSORS_NAME} (or legacy {BIN_NAME})."
    )


def _pair_weights(
    state: dict[str, torch.Tensor], path: Path, config: LoraAdapterConfig
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = _KEY.match(key)
        if match is None:
            raise AdapterLoadError(
                f"{path}: unexpected key {key!r}. Only lora_A/lora_B weights of linear layers are supported "
                "(no embeddings, biases, DoRA magnitudes or modules_to_save)."
            )
        if not tensor.is_floating_point():
            raise AdapterLoadError(
                f"{path}: {key} has dtype {tensor.dtype}; LoRA weights must be floating point."
            )
        halves.setdefault(match["module"], {})[match["ab"]] = tensor
    if not halves:
        raise AdapterLoadError(f"{path}: the weights file holds no LoRA weights.")
    pairs = {}
    for module, ab in sorted(halves.items()):
        if len(ab) != 2:
            missing, present = ("A", "B") if "B" in ab else ("B", "A")
            raise AdapterLoadError(
                f"{path}: missing key base_model.model.{module}.lora_{missing}.weight (its lora_{present} is "
                "present); the weights file is incomplete."
            )
        lora_A, lora_B = ab["A"], ab["B"]
        if lora_A.dim() != 2 or lora_B.dim() != 2 or lora_A.shape[0] != lora_B.shape[1]:
            raise AdapterLoadError(
                f"{path}: {module} has lora_A {tuple(lora_A.shape)} and lora_B {tuple(lora_B.shape)}; expected "
                "[r, in_features] and [out_features, r] with the same r."
            )
        expected = config.expected_rank(module)
        if lora_A.shape[0] != expected:
            raise AdapterLoadError(
                f"{path}: {module} has rank {lora_A.shape[0]} but adapter_config.json says r={expected} for it "
                "(r / rank_pattern); the scaling would be wrong."
            )
        pairs[module] = (lora_A, lora_B)
    return pairs
