"""Gradients of a loss w.r.t. the singular values of LoRA updates, from forward/backward hooks.

Write a module's LoRA update as ``ΔW = s · U diag(σ) Vᵀ`` (``U [out, k]``, ``V [in, k]``, scaling ``s``). For
tokens ``t`` with module input ``x_t`` and output ``y_t = W x_t + ΔW x_t (+ bias)``,

    ∂L/∂σ_k = s · Σ_t ⟨∂L/∂y_t, u_k⟩ ⟨x_t, v_k⟩

(the seed's step 3 "Calibrate", ``g_σ``). The sum runs over every position, prompt and padding included:
the loss itself masks them (labels ``-100``), and a prompt token's activation still reaches the answer
tokens through attention, so its term is part of the exact gradient; padding terms are zero because nothing
attends to padding. Only ``x`` and ``∂L/∂y`` are needed, so the hooks work on a PEFT ``lora.Linear`` (eval
mode: its dropout is then the identity), on a merged model, or on any module that computes ``y = W′x``.

The forward hook stores ``p = x V`` (``[tokens, k]``, fp32); a tensor hook on the output computes
``q = (∂L/∂y) U`` and adds ``s · Σ_t q_t ⊙ p_t`` to a float64 accumulator. Nothing of size ``out × in`` is
formed. When no parameter upstream requires grad (a frozen model), a module's output has no autograd graph;
the forward hook then returns a copy that requires grad. That is exact: with no graph upstream there is
nothing to cut, and everything downstream is differentiated through as usual.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

__all__ = [
    "IGNORE_INDEX",
    "HookContext",
    "ModuleSpec",
    "SigmaHookError",
    "compute_sigma_gradients",
    "count_target_tokens",
    "masked_lm_loss_sum",
    "register_sigma_hooks",
    "resolve_module",
]

IGNORE_INDEX = -100


class SigmaHookError(RuntimeError):
    """A hooked module did not run, or never received a gradient: its ``g_σ`` would silently be zero."""


@dataclass
class ModuleSpec:
    """One module to probe: its singular vectors and LoRA scaling.

    Attributes:
        name: module path relative to the base model (``model.layers.0.self_attn.q_proj``); a PEFT model's
            ``base_model.model.`` prefix is found automatically.
        U: ``[out, k]`` left singular vectors of ``B A``.
        V: ``[in, k]`` right singular vectors.
        scaling: the LoRA scaling ``s`` (``lora_alpha / r`` or ``/ sqrt(r)``).
    """

    name: str
    U: torch.Tensor
    V: torch.Tensor
    scaling: float

    def __post_init__(self) -> None:
        if self.U.dim() != 2 or self.V.dim() != 2 or self.U.shape[1] != self.V.shape[1]:
            raise ValueError(
                f"ModuleSpec {self.name!r}: expected U [out, k] and V [in, k] with the same k, got "
                f"{tuple(self.U.shape)} and {tuple(self.V.shape)}."
            )

    @property
    def rank(self) -> int:
        return int(self.U.shape[1])


@dataclass
class _ModuleState:
    spec: ModuleSpec
    U: torch.Tensor  # fp32 on the module's device
    V: torch.Tensor
    g_sigma: torch.Tensor  # float64 [k]
    forward_calls: int = 0
    backward_calls: int = 0
    tokens: int = 0


@dataclass
class HookContext:
    """Live hooks and their accumulators; a context manager that removes the hooks on exit.

    ``g_sigma()`` returns ``{name: ∂L/∂σ [k]}`` summed over every backward pass since registration (or
    ``reset()``), and raises ``SigmaHookError`` for a module that never ran or never got a gradient.
    """

    modules: dict[str, _ModuleState] = field(default_factory=dict)
    handles: list[Any] = field(default_factory=list)

    def __enter__(self) -> HookContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        """Detach every hook from the model (accumulators are kept)."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def reset(self) -> None:
        """Zero the accumulators and counters."""
        for state in self.modules.values():
            state.g_sigma.zero_()
            state.forward_calls = state.backward_calls = state.tokens = 0

    def counts(self) -> dict[str, dict[str, int]]:
        """``{name: {"forward_calls", "backward_calls", "tokens"}}``."""
        return {
            name: {"forward_calls": s.forward_calls, "backward_calls": s.backward_calls, "tokens": s.tokens}
            for name, s in self.modules.items()
        }

    def check(self) -> None:
        """Raise ``SigmaHookError`` naming every module that never ran forward or never received a gradient."""
        not_run = [name for name, s in self.modules.items() if s.forward_calls == 0]
        no_grad = [name for name, s in self.modules.items() if s.forward_calls > 0 and s.backward_calls == 0]
        if not_run:
            raise SigmaHookError(
                f"hooked module(s) {not_run} never ran in a forward pass with gradients enabled; they are not on "
                "the model's forward path (check the names) or the forward ran under torch.no_grad()."
            )
        if no_grad:
            raise SigmaHookError(
                f"hooked module(s) {no_grad} never received a gradient: backward() was not called, or their "
                "output does not reach the loss. Their g_sigma would be silently zero."
            )

    def g_sigma(self, *, check: bool = True) -> dict[str, torch.Tensor]:
        """``{name: g_σ [k]}`` (float64, CPU) accumulated so far; see ``check``."""
        if check:
            self.check()
        return {name: s.g_sigma.detach().to("cpu").clone() for name, s in self.modules.items()}

    def _forward_hook(self, name: str, args: tuple, kwargs: dict, output: Any) -> Any:
        if not torch.is_grad_enabled():
            return None  # e.g. generation under no_grad: nothing to differentiate
        state = self.modules[name]
        x = args[0] if args else kwargs.get("x", kwargs.get("input"))
        if not isinstance(x, torch.Tensor) or not isinstance(output, torch.Tensor):
            raise SigmaHookError(
                f"module {name!r} must take and return a tensor (a linear layer); got input "
                f"{type(x).__name__}, output {type(output).__name__}."
            )
        if x.shape[-1] != state.V.shape[0] or output.shape[-1] != state.U.shape[0]:
            raise SigmaHookError(
                f"module {name!r} maps {x.shape[-1]} -> {output.shape[-1]} features but its spec has "
                f"V {tuple(state.V.shape)} and U {tuple(state.U.shape)}; the spec belongs to another module."
            )
        p = x.detach().reshape(-1, x.shape[-1]).to(torch.float32) @ state.V  # [tokens, k]
        replaced = None
        if not output.requires_grad:
            # No graph upstream (frozen model): a leaf copy that requires grad cuts nothing. The clone makes it a
            # non-leaf, so in-place ops downstream stay legal.
            output = replaced = output.detach().requires_grad_(True).clone()
        state.forward_calls += 1
        state.tokens += p.shape[0]
        output.register_hook(lambda grad, _p=p, _state=state: self._accumulate(_state, grad, _p))
        return replaced

    @staticmethod
    def _accumulate(state: _ModuleState, grad: torch.Tensor, p: torch.Tensor) -> None:
        q = grad.detach().reshape(-1, grad.shape[-1]).to(torch.float32) @ state.U  # [tokens, k]
        state.g_sigma += state.spec.scaling * (q * p).sum(dim=0).to(torch.float64)
        state.backward_calls += 1


def resolve_module(model: nn.Module, name: str, modules: dict[str, nn.Module] | None = None) -> nn.Module:
    """``model``'s submodule ``name``, also under a PEFT wrapper's ``base_model.model.`` prefix.

    Args:
        model: the model.
        name: module path relative to the base model.
        modules: ``dict(model.named_modules())`` when resolving many names (built once by the caller).

    Raises:
        ValueError: no such module (names a few similar ones).
    """
    modules = dict(model.named_modules()) if modules is None else modules
    for candidate in (name, f"base_model.model.{name}"):
        if candidate in modules:
            return modules[candidate]
    leaf = name.rsplit(".", 1)[-1]
    similar = [n for n in modules if n.endswith("." + leaf)][:5]
    raise ValueError(
        f"module {name!r} is not in the model (nor under 'base_model.model.'); modules ending in {leaf!r}: "
        f"{similar}. Pass module names relative to the base model."
    )


def register_sigma_hooks(model: nn.Module, specs: Sequence[ModuleSpec]) -> HookContext:
    """Register the ``g_σ`` hooks on each spec's module; use the result as a context manager.

    Run forward passes with gradients enabled and ``loss.backward()`` inside the context; read the result with
    ``ctx.g_sigma()``. The model should be in eval mode: in training mode the LoRA branch sees a dropped-out
    ``x`` that the hook doesn't (a warning is logged).

    Args:
        model: a PEFT model or a plain transformers model (hooks only need each module's input and output).
        specs: the modules, each with ``U``, ``V`` and the scaling.

    Raises:
        ValueError: empty or duplicate specs, unknown module names, or ``U``/``V`` sizes that don't match the
            module's ``out_features``/``in_features``.
    """
    if not specs:
        raise ValueError("specs is empty; pass at least one ModuleSpec.")
    if model.training and any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules()):
        logger.warning(
            "register_sigma_hooks: the model is in training mode with dropout; g_sigma will be noisy and "
            "inexact (the LoRA branch sees dropped-out inputs). Call model.eval() first."
        )
    context = HookContext()
    table = dict(model.named_modules())
    try:
        for spec in specs:
            if spec.name in context.modules:
                raise ValueError(f"module {spec.name!r} appears twice in specs.")
            module = resolve_module(model, spec.name, table)
            in_f, out_f = getattr(module, "in_features", None), getattr(module, "out_features", None)
            if (in_f is not None and in_f != spec.V.shape[0]) or (
                out_f is not None and out_f != spec.U.shape[0]
            ):
                raise ValueError(
                    f"module {spec.name!r} is {in_f} -> {out_f} but its spec has V {tuple(spec.V.shape)} and "
                    f"U {tuple(spec.U.shape)}; expected V [in, k] and U [out, k]."
                )
            device = _module_device(module)
            k = spec.rank
            context.modules[spec.name] = _ModuleState(
                spec=spec,
                U=spec.U.detach().to(device=device, dtype=torch.float32),
                V=spec.V.detach().to(device=device, dtype=torch.float32),
                g_sigma=torch.zeros(k, dtype=torch.float64, device=device),
            )
            hook = _bind(context, spec.name)
            context.handles.append(module.register_forward_hook(hook, with_kwargs=True))
    except Exception:
        context.remove()
        raise
    return context


def _bind(context: HookContext, name: str):
    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        return context._forward_hook(name, args, kwargs, output)

    return hook


def _module_device(module: nn.Module) -> torch.device:
    for tensor in list(module.parameters()) + list(module.buffers()):
        return tensor.device
    return torch.device("cpu")


def masked_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over positions whose label is not ``-100``.

    Args:
        logits: ``[batch, T, vocab]``.
        labels: ``[batch, T]``; ``labels[:, t]`` is the target of ``logits[:, t - 1]`` (HF convention).

    Returns:
        A scalar (fp32): ``Σ_{t: label ≠ -100} -log softmax(logits[:, t-1])[labels[:, t]]``.
    """
    shifted = logits[:, :-1].reshape(-1, logits.shape[-1]).to(torch.float32)
    targets = labels[:, 1:].reshape(-1)
    return nn.functional.cross_entropy(shifted, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def count_target_tokens(batches: Sequence[dict[str, torch.Tensor]]) -> int:
    """Number of (shifted) positions that carry a label, over all batches."""
    return int(sum(int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) for batch in batches))


def compute_sigma_gradients(
    model: nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    specs: Sequence[ModuleSpec],
    *,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """``g_σ`` of every spec for the mean answer-token loss over all calibration batches.

    The loss is ``L = Σ_batches Σ_{labelled tokens} CE / N`` with ``N`` the number of labelled tokens in all
    batches, so the result does not depend on how the data is batched. Runs in eval mode with gradients on and
    every parameter's ``requires_grad`` temporarily off (no weight gradients are computed or stored); both are
    restored afterwards.

    Args:
        model: a causal LM (PEFT-wrapped or not) returning ``.logits``.
        batches: non-empty list of ``{"input_ids", "attention_mask", "labels"}`` ``[batch, T]`` (labels ``-100``
            on prompt and padding).
        specs: see ``register_sigma_hooks``.
        progress: tqdm bar over batches.

    Returns:
        ``{spec.name: g_σ [k]}`` float64 on CPU.

    Raises:
        ValueError: no batches, a batch missing a key, or no labelled token at all.
        SigmaHookError: a hooked module never ran or never received a gradient.
    """
    batches = list(batches)
    if not batches:
        raise ValueError("batches is empty; pass at least one calibration batch.")
    for index, batch in enumerate(batches):
        missing = {"input_ids", "labels"} - set(batch)
        if missing:
            raise ValueError(f"calibration batch {index} lacks {sorted(missing)}; got keys {sorted(batch)}.")
    total = count_target_tokens(batches)
    if total == 0:
        raise ValueError(
            "the calibration batches have no labelled token (every label is -100): nothing to take a loss on. "
            "Check that the responses survive --max_length truncation."
        )
    device = _module_device(model)
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for param, _ in flags:
        param.requires_grad_(False)
    try:
        with register_sigma_hooks(model, specs) as context, torch.enable_grad():
            for batch in tqdm(batches, desc="calibration", unit="batch", disable=not progress):
                inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask") if k in batch}
                logits = model(**inputs, use_cache=False).logits
                loss = masked_lm_loss_sum(logits, batch["labels"].to(device)) / total
                if not loss.requires_grad:
                    context.check()  # names the modules that never ran
                    raise SigmaHookError(
                        "the loss does not depend on any hooked module; nothing to differentiate."
                    )
                loss.backward()
            return context.g_sigma()
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)
        model.train(was_training)
