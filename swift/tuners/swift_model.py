"""``Swift.from_pretrained``: load a pool of PEFT-format LoRA adapters into one model.

``SwiftModel`` wraps a transformers model; every linear layer that some adapter targets is replaced by a
``LoraLinear`` holding all of that layer's adapters. Outside ``lora_mixture_context`` the model applies its
active adapters like PEFT does (the first adapter loaded becomes active; ``set_active_adapters(None)`` or
``disable_adapters()`` give the base model).
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from swift.tuners.lora_layers import LoraLinear, LoraRouting, lora_mixture_context
from swift.tuners.peft_format import (
    AdapterLoadError,
    LoraAdapterConfig,
    base_weight_matches,
    peft_base_weight_key,
    read_adapter_dir,
    target_module_matches,
)
from swift.utils import get_logger

logger = get_logger(__name__)

__all__ = ["Swift", "SwiftModel"]

# Sub-modules that hold vision towers / projectors in the architectures we support (Qwen2-VL: visual;
# LLaVA / InternVL: vision_tower, multi_modal_projector; original InternVL2: vision_model, mlp1).
VISION_MODULE_NAMES = ("visual", "vision_tower", "vision_model", "multi_modal_projector", "mlp1")

# Linear layers that a block calls on one input tensor (attention q/k/v, the MLP's gate/up in Llama, Qwen2,
# Mistral and the CLIP/SigLIP-style vision towers): linked as siblings, so a mixture projects that input
# through their LoRA-A rows in one GEMM. A naming guess only decides speed: LoraLinear checks per call that
# the input is the very same tensor, and runs each layer alone where it isn't.
SIBLING_NAMES = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))

# Module-name prefixes of adapters trained on transformers 4 VLM layouts -> transformers 5 layouts.
LEGACY_PREFIXES = (
    ("model.layers.", "model.language_model.layers."),
    ("visual.", "model.visual."),
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head", "lm_head"),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
)


class SwiftModel(nn.Module):
    """A model with a pool of LoRA adapters in its linear layers.

    Attributes:
        base_model: the wrapped transformers model (its linear layers replaced in place where targeted).
        adapter_configs: ``{adapter_name: LoraAdapterConfig}`` in load order.
    """

    def __init__(self, model: nn.Module, *, lora_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.base_model = model
        self.lora_dtype = lora_dtype
        self.adapter_configs: dict[str, LoraAdapterConfig] = {}
        self.adapter_dirs: dict[str, str] = {}
        self._active: tuple[str, ...] = ()

    # -- delegation -------------------------------------------------------------------------------------

    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.base_model.generate(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # -- adapters ---------------------------------------------------------------------------------------

    @property
    def adapter_names(self) -> list[str]:
        return list(self.adapter_configs)

    @property
    def active_adapters(self) -> tuple[str, ...]:
        return self._active

    def lora_layers(self) -> Iterator[tuple[str, LoraLinear]]:
        for name, module in self.base_model.named_modules():
            if isinstance(module, LoraLinear):
                yield name, module

    def load_adapter(self, adapter_dir: str | Path, adapter_name: str = "default") -> None:
        """Load one PEFT-format LoRA directory as ``adapter_name``; all checks run before anything changes.

        A ``base_layer.weight`` PEFT saved with the adapter (for a targeted ``lm_head``) must equal the model's
        own weight of that module; it is checked, never loaded.

        Raises:
            ValueError: bad or duplicate ``adapter_name``.
            FileNotFoundError / NotADirectoryError / AdapterLoadError: see ``read_adapter_dir``; also a key
                that maps to no module, a module that isn't linear, a shape that doesn't fit, a module the
                config targets but the weights lack, or a saved base weight that differs from the model's.
        """
        self._check_new_name(adapter_name)
        adapter = read_adapter_dir(adapter_dir)
        config = adapter.config
        self._warn_on_base_mismatch(config, adapter_dir)
        placed = self._place({m: (p.lora_A, p.lora_B) for m, p in adapter.pairs.items()}, adapter_dir)
        self._check_base_weights(adapter.base_weights, adapter_dir)
        self._check_complete(config, placed, adapter_dir)
        weights = {
            name: (lora_A, lora_B, config.scaling(name, lora_A.shape[0]))
            for name, (lora_A, lora_B) in placed.items()
        }
        self._install(adapter_name, weights, config, str(adapter_dir))

    def add_adapter_weights(
        self,
        adapter_name: str,
        weights: Mapping[str, tuple[torch.Tensor, torch.Tensor, float]],
        config: LoraAdapterConfig | None = None,
    ) -> None:
        """Add an adapter from memory: ``{module_name: (lora_A [r, in], lora_B [out, r], scaling)}``.

        Used for adapters built on the fly (e.g. fused adapters). Same checks as ``load_adapter``.
        """
        self._check_new_name(adapter_name)
        placed = self._place({n: (a, b) for n, (a, b, _) in weights.items()}, f"adapter {adapter_name!r}")
        self._install(adapter_name, {n: (*placed[n], weights[n][2]) for n in placed}, config, "<memory>")

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter from every layer (not allowed inside a mixture context)."""
        if adapter_name not in self.adapter_configs:
            raise ValueError(f"unknown adapter {adapter_name!r}; loaded adapters: {self.adapter_names}.")
        for _, layer in self.lora_layers():
            if adapter_name in layer.slots:
                layer.remove_adapter(adapter_name)
        del self.adapter_configs[adapter_name]
        del self.adapter_dirs[adapter_name]
        self._active = tuple(a for a in self._active if a != adapter_name)

    def release_workspace(self) -> None:
        """Free the gathered-row buffers that mixture contexts leave to the next one (``LoraLinear._buffer``)."""
        for _, layer in self.lora_layers():
            layer.release_workspace()

    def _check_new_name(self, adapter_name: str) -> None:
        if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
            raise ValueError(f"adapter_name must be a non-empty string without dots, got {adapter_name!r}.")
        if adapter_name in self.adapter_configs:
            raise ValueError(
                f"an adapter named {adapter_name!r} is already loaded (from {self.adapter_dirs[adapter_name]}); "
                "choose another adapter_name."
            )

    def _install(
        self,
        adapter_name: str,
        weights: Mapping[str, tuple[torch.Tensor, torch.Tensor, float]],
        config: LoraAdapterConfig | None,
        source: str,
    ) -> None:
        for module_name, (lora_A, lora_B, scaling) in weights.items():
            layer = self._lora_layer(module_name)
            device = layer.base_layer.weight.device
            layer.add_adapter(
                adapter_name,
                lora_A.to(device, self.lora_dtype),
                lora_B.to(device, self.lora_dtype),
                scaling=scaling,
                dropout=config.lora_dropout if config is not None else 0.0,
            )
        self.adapter_configs[adapter_name] = config or LoraAdapterConfig()
        self.adapter_dirs[adapter_name] = source
        if not self._active:
            self.set_active_adapters(adapter_name)
        logger.info("loaded adapter %r (%d modules) from %s", adapter_name, len(weights), source)

    def _named_linear_candidates(self) -> dict[str, nn.Module]:
        """Linear-like modules by name; a LoraLinear stands for its wrapped base layer."""
        modules = {}
        for name, module in self.base_model.named_modules():
            if name.endswith(".base_layer") and isinstance(
                self.base_model.get_submodule(name[: -len(".base_layer")]), LoraLinear
            ):
                continue
            modules[name] = module
        return modules

    def _place(
        self, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], adapter_dir: str | Path
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        modules = self._named_linear_candidates()
        placed = {}
        for key_name, (lora_A, lora_B) in pairs.items():
            name = _resolve_name(key_name, modules)
            if name is None:
                close = difflib.get_close_matches(key_name, list(modules), n=1)
                hint = f" (closest module: {close[0]!r})" if close else ""
                raise AdapterLoadError(
                    f"{adapter_dir}: key base_model.model.{key_name}.lora_A.weight maps to no module of "
                    f"{type(self.base_model).__name__}{hint}; the adapter was trained on another architecture."
                )
            module = modules[name]
            linear = module.base_layer if isinstance(module, LoraLinear) else module
            if not isinstance(linear, nn.Linear):
                raise AdapterLoadError(
                    f"{adapter_dir}: {name} is a {type(linear).__name__}; only nn.Linear layers take LoRA here."
                )
            if lora_A.shape[1] != linear.in_features or lora_B.shape[0] != linear.out_features:
                raise AdapterLoadError(
                    f"{adapter_dir}: shape mismatch at {name}: lora_A {tuple(lora_A.shape)}, lora_B "
                    f"{tuple(lora_B.shape)}, but the layer is Linear({linear.in_features} -> "
                    f"{linear.out_features}). The adapter belongs to a model of another size."
                )
            placed[name] = (lora_A, lora_B)
        return placed

    def _check_base_weights(self, base_weights: Mapping[str, torch.Tensor], adapter_dir: str | Path) -> None:
        modules = self._named_linear_candidates()
        for key_name, saved in base_weights.items():
            key = peft_base_weight_key(key_name)
            name = _resolve_name(key_name, modules)
            if name is None:
                raise AdapterLoadError(
                    f"{adapter_dir}: key {key} maps to no module of {type(self.base_model).__name__}; the "
                    "adapter was trained on another architecture."
                )
            module = modules[name]
            own = getattr(module.base_layer if isinstance(module, LoraLinear) else module, "weight", None)
            if not isinstance(own, torch.Tensor) or not base_weight_matches(saved, own):
                own_shape = tuple(own.shape) if isinstance(own, torch.Tensor) else "no weight"
                shapes = f"{tuple(saved.shape)} vs the model's {own_shape}"
                raise AdapterLoadError(
                    f"{adapter_dir}: the adapter carries a different base weight for {name} ({key}, {shapes}) "
                    "than the model it is loaded into: it was trained on another base model, or with a resized "
                    "vocabulary (resize_token_embeddings). Load it into the model it was trained with, resized "
                    "the same way."
                )

    def _check_complete(
        self, config: LoraAdapterConfig, placed: Mapping[str, object], adapter_dir: str | Path
    ) -> None:
        output = (
            self.base_model.get_output_embeddings()
            if hasattr(self.base_model, "get_output_embeddings")
            else None
        )
        for name, module in self._named_linear_candidates().items():
            linear = module.base_layer if isinstance(module, LoraLinear) else module
            if not isinstance(linear, nn.Linear) or name in placed:
                continue
            if target_module_matches(config, name, is_output_layer=linear is output or module is output):
                raise AdapterLoadError(
                    f"{adapter_dir}: missing key base_model.model.{name}.lora_A.weight: target_modules="
                    f"{config.target_modules!r} covers {name} but the weights have no entry for it, so the "
                    "adapter would silently do nothing there."
                )

    def _lora_layer(self, name: str) -> LoraLinear:
        module = self.base_model.get_submodule(name)
        if isinstance(module, LoraLinear):
            return module
        layer = LoraLinear(module, name, lora_dtype=self.lora_dtype)
        layer.train(module.training)  # a new layer follows the model's mode: no dropout in an eval model
        layer.requires_row_index = any(part in VISION_MODULE_NAMES for part in name.split("."))
        parent_name, _, child = name.rpartition(".")
        parent = self.base_model.get_submodule(parent_name) if parent_name else self.base_model
        setattr(parent, child, layer)
        _link_siblings(parent)
        return layer

    def _warn_on_base_mismatch(self, config: LoraAdapterConfig, adapter_dir: str | Path) -> None:
        trained_on = config.base_model_name_or_path
        model_config = getattr(self.base_model, "config", None)
        loaded = getattr(model_config, "name_or_path", None) or getattr(model_config, "_name_or_path", None)
        if trained_on and loaded and _model_name(trained_on) != _model_name(loaded):
            logger.warning(
                "adapter %s was trained on %r but the loaded model is %r; its outputs may be meaningless.",
                adapter_dir,
                trained_on,
                loaded,
            )

    # -- activation -------------------------------------------------------------------------------------

    def set_active_adapters(self, adapter_names: str | Sequence[str] | None) -> None:
        """Adapters applied outside a mixture context (summed, each with its own scaling); None = base."""
        names = (
            ()
            if adapter_names is None
            else (adapter_names,)
            if isinstance(adapter_names, str)
            else tuple(adapter_names)
        )
        for name in names:
            if name not in self.adapter_configs:
                raise ValueError(f"unknown adapter {name!r}; loaded adapters: {self.adapter_names}.")
        self._active = names
        for _, layer in self.lora_layers():
            layer.active_adapters = names

    @contextlib.contextmanager
    def disable_adapters(self) -> Iterator[None]:
        """Run the base model (outside mixture contexts) for the duration of the block."""
        layers = [layer for _, layer in self.lora_layers()]
        previous = [layer.disable_adapters for layer in layers]
        for layer in layers:
            layer.disable_adapters = True
        try:
            yield
        finally:
            for layer, flag in zip(layers, previous):
                layer.disable_adapters = flag

    def mixture(
        self,
        lora_mapping: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | LoraRouting,
        adapter_names: Sequence[str] | None = None,
        *,
        row_index: Mapping[str, torch.Tensor] | None = None,
        kernel: str = "auto",
    ) -> contextlib.AbstractContextManager[LoraRouting]:
        """``lora_mixture_context`` after checking that every routed adapter is loaded in this model."""
        names = lora_mapping.adapter_names if isinstance(lora_mapping, LoraRouting) else adapter_names
        unknown = [n for n in names or () if n not in self.adapter_configs]
        if unknown:
            raise ValueError(
                f"routing names adapters that are not loaded: {unknown}; loaded: {self.adapter_names}."
            )
        return lora_mixture_context(lora_mapping, adapter_names, row_index=row_index, kernel=kernel)


def _link_siblings(parent: nn.Module) -> None:
    """Set ``siblings`` on the LoraLinear children of ``parent`` named in one group of ``SIBLING_NAMES``."""
    for names in SIBLING_NAMES:
        members = tuple(m for n in names if isinstance(m := getattr(parent, n, None), LoraLinear))
        for member in members:
            member.siblings = members if len(members) > 1 else ()


def _model_name(name_or_path: str) -> str:
    """'HuggingFaceTB/SmolLM2-135M-Instruct' and '.../SmolLM2-135M-Instruct-fp32' (our cache) name one model."""
    name = Path(str(name_or_path)).name.lower()
    return name.removesuffix("-fp32")


def _resolve_name(key_name: str, modules: Mapping[str, nn.Module]) -> str | None:
    if key_name in modules:
        return key_name
    for old, new in LEGACY_PREFIXES:
        if key_name.startswith(old) and (candidate := new + key_name[len(old) :]) in modules:
            return candidate
    return None


class Swift:
    """Entry points familiar to Swift users."""

    @staticmethod
    def from_pretrained(
        model: nn.Module,
        adapter_dir: str | Path,
        adapter_name: str = "default",
        *,
        lora_dtype: torch.dtype = torch.float32,
    ) -> SwiftModel:
        """Load a PEFT-format LoRA adapter into ``model``; call again on the result to build a pool.

        Args:
            model: a transformers model, or a ``SwiftModel`` returned by an earlier call.
            adapter_dir: directory with ``adapter_config.json`` and ``adapter_model.safetensors``.
            adapter_name: the name routing refers to; must be unique within the model.
            lora_dtype: dtype of the adapter weights and the LoRA accumulation (fp32 default).

        Returns:
            The ``SwiftModel`` (the same object when ``model`` already is one).
        """
        if type(model).__name__ == "PeftModel" or hasattr(model, "peft_config"):
            raise ValueError(
                "model is already a PEFT model; pass the plain base model to Swift.from_pretrained."
            )
        swift_model = model if isinstance(model, SwiftModel) else SwiftModel(model, lora_dtype=lora_dtype)
        swift_model.load_adapter(adapter_dir, adapter_name)
        return swift_model
