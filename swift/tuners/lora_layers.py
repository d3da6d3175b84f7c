"""Per-sample weighted multi-adapter LoRA layers (the mixture path).

Inside ``lora_mixture_context(lora_mapping, adapter_names)`` every ``LoraLinear`` computes, for each
sample ``i`` of the batch (LoraRetriever, Zhao et al. 2024, Sec. 3.3 "mixture of LoRAs"):

    y_i = W x_i + sum_j w_ij * s_j * B_j A_j x_i

where ``w_ij`` is the routing weight of adapter ``j`` for sample ``i`` and ``s_j`` the adapter's scaling
(``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA).

Storage. Each layer keeps all of its adapters in two row banks: ``lora_A_bank[rows, in]`` holds the rows of
every ``A_j`` one after another, ``lora_B_bank[rows, out]`` the matching columns of ``B_j`` (``B_j`` transposed).
Row 0 is all zeros and pads ragged gathers. An adapter is a range of rows (its "slot"); a forward reads only
the rows of the adapters the batch uses, so its cost depends on the batch and k, not on the pool size N.

Kernels (chosen per layer at its first call in a context, see ``_choose_kernel``;
``lora_mixture_context(..., kernel="union"|"gather")`` forces one, and ``mixture_kernels()`` tells which one each
layer ran):

* ``union``: the union U of rank rows used by the batch, one GEMM ``x @ A_U^T`` and one ``@ B_U``, with a
  per-sample coefficient matrix ``C[sample, row]`` (zero where a sample doesn't use a row). Best when the
  batch shares adapters.
* ``gather``: per sample, gather its own ``L`` rows (``[batch, L, in]``) and use two ``bmm``. Best when samples
  use different adapters (FLOPs ~ batch * T * L instead of batch * T * |U|).

A layer gathers its rows once per context (decode steps pay no gather), with the coefficients folded into B
wherever a row of B serves one coefficient, and adds the second GEMM straight into the base layer's output
(``addmm_`` / ``baddbmm_``). Sibling layers that the model calls on one input (q/k/v, gate/up: ``siblings``)
keep their A rows side by side and project that input with one GEMM. See docs/decisions.md §16.

Routing lives in a ``contextvars.ContextVar``: threads and asyncio tasks each see their own routing.
Outside a context a layer applies its active adapters (PEFT-style), or nothing.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = [
    "MIXTURE_KERNELS",
    "LoraLinear",
    "LoraRouting",
    "current_routing",
    "lora_mixture_context",
    "mixture_kernels",
]

# ----------------------------------------------------------------------------------------------------------
# Routing: which adapters, with which weights, for every sample of the batch.
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraRouting:
    """Sparse per-sample routing over named adapters.

    Attributes:
        adapter_names: the adapters the indices refer to.
        indices: ``[batch, k]`` long tensor of positions in ``adapter_names``; ``-1`` marks an empty slot.
        weights: ``[batch, k]`` float32 tensor; the weight of each slot (ignored where the index is -1).
    """

    adapter_names: tuple[str, ...]
    indices: torch.Tensor
    weights: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.indices.shape[0]

    @classmethod
    def from_dense(cls, lora_mapping: torch.Tensor, adapter_names: Sequence[str]) -> LoraRouting:
        """Build from the paper's dense ``[batch, len(adapter_names)]`` weight matrix (0 = unused).

        Raises:
            ValueError: if the mapping is not 2-D, its width differs from ``len(adapter_names)``, or it
                holds NaN/inf.
        """
        names = _check_names(adapter_names)
        mapping = torch.as_tensor(lora_mapping)
        if mapping.dim() != 2 or mapping.shape[1] != len(names):
            raise ValueError(
                f"lora_mapping must have shape [batch, len(adapter_names)] = [batch, {len(names)}], got "
                f"{tuple(mapping.shape)}. Pass one column per adapter name (0 = adapter unused)."
            )
        mapping = mapping.detach().to("cpu", torch.float32)
        _check_finite(mapping, "lora_mapping")
        k = max(int((mapping != 0).sum(dim=1).max().item()) if mapping.numel() else 0, 1)
        weights, order = torch.sort(mapping.abs(), dim=1, descending=True, stable=True)
        order = order[:, :k]
        weights = torch.gather(mapping, 1, order)
        indices = torch.where(weights != 0, order, torch.full_like(order, -1))
        return cls(names, indices.contiguous(), weights.contiguous())

    @classmethod
    def from_sparse(
        cls, indices: torch.Tensor, weights: torch.Tensor, adapter_names: Sequence[str]
    ) -> LoraRouting:
        """Build from per-sample ``indices`` ``[batch, k]`` (``-1`` = empty) and ``weights`` ``[batch, k]``.

        Raises:
            ValueError: on shape mismatch, an index outside ``[-1, len(adapter_names))`` or NaN/inf weights.
        """
        names = _check_names(adapter_names)
        idx = torch.as_tensor(indices).detach().to("cpu")
        w = torch.as_tensor(weights).detach().to("cpu", torch.float32)
        if idx.dim() != 2 or idx.shape != w.shape:
            raise ValueError(
                f"sparse routing needs indices and weights of the same shape [batch, k]; got indices "
                f"{tuple(idx.shape)} and weights {tuple(w.shape)}."
            )
        if idx.dtype.is_floating_point or idx.dtype == torch.bool:
            raise ValueError(f"routing indices must be integers, got dtype {idx.dtype}.")
        idx = idx.long()
        bad = (idx < -1) | (idx >= len(names))
        if bad.any():
            value = int(idx[bad][0])
            raise ValueError(
                f"routing index {value} is out of range for {len(names)} adapter names; use 0..{len(names) - 1}, "
                "or -1 for an empty slot."
            )
        _check_finite(w, "routing weights")
        w = torch.where(idx >= 0, w, torch.zeros_like(w))
        return cls(names, idx.contiguous(), w.contiguous())

    def to_dense(self) -> torch.Tensor:
        """The ``[batch, len(adapter_names)]`` weight matrix (repeated indices add up)."""
        dense = torch.zeros(self.batch_size, len(self.adapter_names))
        valid = self.indices >= 0
        rows = torch.arange(self.batch_size).unsqueeze(1).expand_as(self.indices)
        dense.index_put_((rows[valid], self.indices[valid]), self.weights[valid], accumulate=True)
        return dense

    def rows(self, start: int, stop: int) -> LoraRouting:
        """The routing of samples ``start:stop`` (same adapter names; already validated, so not re-checked)."""
        return LoraRouting(self.adapter_names, self.indices[start:stop], self.weights[start:stop])

    def used_names(self) -> list[str]:
        """Names of the adapters with a non-zero weight somewhere in the batch, in column order."""
        used = torch.unique(self.indices[(self.indices >= 0) & (self.weights != 0)])
        return [self.adapter_names[i] for i in used.tolist()]


def _check_names(adapter_names: Sequence[str]) -> tuple[str, ...]:
    if isinstance(adapter_names, str):
        raise ValueError(f"adapter_names must be a sequence of names, got the string {adapter_names!r}.")
    names = tuple(adapter_names)
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"adapter_names has duplicates: {dupes}. Give each column a distinct adapter.")
    return names


def _check_finite(t: torch.Tensor, what: str) -> None:
    if not torch.isfinite(t).all():
        raise ValueError(f"{what} contains NaN or inf; routing weights must be finite numbers.")


# ----------------------------------------------------------------------------------------------------------
# The context: routing + per-layer plans, private to the current thread / task.
# ----------------------------------------------------------------------------------------------------------


# Calls with at most this many activation rows (tokens x samples) compute the LoRA terms in float32 when the
# banks are bf16/fp16 (rows upcast once per context): oneDNN's reduced-precision GEMMs cost ~30 us a call at
# any small size on an Intel Xeon with AMX, fp32 ones 2-5 us; from ~32 rows on, bf16 with AMX is faster.
FP32_MAX_ROWS = 16
REDUCED_DTYPES = (torch.bfloat16, torch.float16)

# Buffers per layer and purpose that a finished context leaves for the next one (see LoraLinear._buffer).
MAX_SPARE_BUFFERS = 2

# "auto" picks per layer (``_choose_kernel``); "union" / "gather" force that kernel wherever it applies.
MIXTURE_KERNELS = ("auto", "union", "gather")


@dataclass
class _MixtureState:
    routing: LoraRouting
    row_index: dict[str, torch.Tensor]
    kernel: str = "auto"  # one of MIXTURE_KERNELS
    # Routing as a dense [batch, n_used] matrix over the adapters it actually uses.
    used_names: list[str] = field(init=False)
    used_weights: torch.Tensor = field(init=False)
    plans: dict[tuple, _LayoutPlan] = field(default_factory=dict)  # shared by layers with one layout
    layers: dict[int, _LayerCache] = field(default_factory=dict)  # per layer (by id): plan + gathered rows
    groups: dict[tuple[int, bool], _SiblingGroup | None] = field(
        default_factory=dict
    )  # (first sibling, phase)
    borrowed: list[tuple[list, torch.Tensor]] = field(default_factory=list)  # workspace to give back at exit
    kernels: dict[str, str] = field(default_factory=dict)  # module name -> kernel its last call ran

    def __post_init__(self) -> None:
        dense = self.routing.to_dense()
        used = (dense != 0).any(dim=0).nonzero().flatten()
        self.used_names = [self.routing.adapter_names[i] for i in used.tolist()]
        self.used_weights = dense[:, used].contiguous()


_MIXTURE: ContextVar[_MixtureState | None] = ContextVar("lora_mixture", default=None)


@contextlib.contextmanager
def lora_mixture_context(
    lora_mapping: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | LoraRouting,
    adapter_names: Sequence[str] | None = None,
    *,
    row_index: Mapping[str, torch.Tensor] | None = None,
    kernel: str = "auto",
) -> Iterator[LoraRouting]:
    """Route every LoRA layer per sample for the duration of the block (prefill and every decode step).

    Args:
        lora_mapping: either the dense ``[batch, len(adapter_names)]`` weight tensor (0 = unused), a sparse
            ``(indices, weights)`` pair of ``[batch, k]`` tensors (index ``-1`` = empty slot), or a
            ``LoraRouting``.
        adapter_names: the adapter names the columns / indices refer to (not needed for a ``LoraRouting``).
        row_index: for activations whose leading dimension is not the batch (e.g. a vision tower that sees
            all images' patches as rows), a map from a module-name prefix to a long tensor giving the sample
            of every leading row. The longest matching prefix wins. ``swift.llm`` builds it for VLMs.
        kernel: ``"auto"`` (default: each layer picks at its first call, by the measured threshold
            ``GATHER_MIN_UNION_RATIO``), ``"union"`` or ``"gather"`` to force one (benchmarks, exactness tests).
            Both compute the same sum; ``"gather"`` applies only where an activation's leading dimension is
            the batch, so layers under ``row_index`` (vision towers) run ``"union"`` either way.
            ``mixture_kernels()`` reports what each layer ran.

    Yields:
        The ``LoraRouting`` in force.

    Every layer checks that the adapters named exist in it or in some layer of the model; an adapter that
    targets other modules simply contributes nothing here. Contexts nest: the innermost one wins.

    Raises:
        ValueError: a malformed routing, ``row_index`` naming samples outside the batch, or an unknown
            ``kernel``.
    """
    if kernel not in MIXTURE_KERNELS:
        raise ValueError(
            f"kernel must be one of {MIXTURE_KERNELS}, got {kernel!r}; use 'auto' unless measuring."
        )
    routing = _as_routing(lora_mapping, adapter_names)
    rows = {}
    for prefix, index in (row_index or {}).items():
        index = torch.as_tensor(index).detach().to("cpu").long().flatten()
        if index.numel() and (index.min() < 0 or index.max() >= routing.batch_size):
            raise ValueError(
                f"row_index[{prefix!r}] refers to samples outside 0..{routing.batch_size - 1}; every row must "
                "name the sample (batch position) it belongs to."
            )
        rows[prefix] = index
    state = _MixtureState(routing, rows, kernel)
    token = _MIXTURE.set(state)
    try:
        yield routing
    finally:
        _MIXTURE.reset(token)
        for spares, buffer in state.borrowed:  # the next context's gathers reuse these pages
            if len(spares) < MAX_SPARE_BUFFERS:
                spares.append(buffer)


def current_routing() -> LoraRouting | None:
    """The routing of the innermost active ``lora_mixture_context`` in this thread/task, or ``None``."""
    state = _MIXTURE.get()
    return None if state is None else state.routing


def mixture_kernels() -> dict[str, str]:
    """Kernel (``"union"`` / ``"gather"``) each layer's latest call ran in the innermost active context.

    Keyed by the layer's ``module_name``; empty outside a context or before any layer ran in it. A copy: it
    doesn't change as the model keeps running.
    """
    state = _MIXTURE.get()
    return {} if state is None else dict(state.kernels)


def _as_routing(
    lora_mapping: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | LoraRouting,
    adapter_names: Sequence[str] | None,
) -> LoraRouting:
    if isinstance(lora_mapping, LoraRouting):
        if adapter_names is not None and tuple(adapter_names) != lora_mapping.adapter_names:
            raise ValueError("adapter_names differs from the names inside the LoraRouting; pass only one.")
        return lora_mapping
    if adapter_names is None:
        raise ValueError("adapter_names is required with a tensor lora_mapping: one name per column/index.")
    if isinstance(lora_mapping, tuple | list) and len(lora_mapping) == 2:
        return LoraRouting.from_sparse(lora_mapping[0], lora_mapping[1], adapter_names)
    return LoraRouting.from_dense(lora_mapping, adapter_names)


# ----------------------------------------------------------------------------------------------------------
# Plans: the index work that depends only on (routing, a layer's slot layout), shared across layers.
# ----------------------------------------------------------------------------------------------------------


@dataclass
class _LayoutPlan:
    union_rows: torch.Tensor  # [R_U] rows of the bank used by the batch
    union_coef: torch.Tensor  # [batch, R_U] w_ij * s_j for each sample and union row
    max_rows: int  # L: most rank rows used by one sample
    uniform: bool  # every sample has the same coefficients (batch 1, or one routing for all)
    gather_rows: torch.Tensor | None = None  # [batch, L] rows per sample (0 = zero pad), built lazily
    gather_coef: torch.Tensor | None = None  # [batch, L]

    def build_gather(self) -> None:
        """Per-sample row lists, padded to ``max_rows`` with the zero row 0."""
        batch = self.union_coef.shape[0]
        rows = torch.zeros(batch, self.max_rows, dtype=torch.long)
        coef = torch.zeros(batch, self.max_rows, dtype=self.union_coef.dtype)
        for i in range(batch):
            nz = (self.union_coef[i] != 0).nonzero().flatten()
            rows[i, : nz.numel()] = self.union_rows[nz]
            coef[i, : nz.numel()] = self.union_coef[i, nz]
        self.gather_rows, self.gather_coef = rows, coef


def _make_plan(layout: tuple[tuple[int, int, int, float], ...], used_weights: torch.Tensor) -> _LayoutPlan:
    """``layout`` lists (used column, first row, rank, scaling) for the used adapters present in a layer."""
    starts = [torch.arange(start, start + r) for _, start, r, _ in layout]
    union_rows = torch.cat(starts) if starts else torch.zeros(0, dtype=torch.long)
    columns = torch.tensor([col for col, _, _, _ in layout], dtype=torch.long)
    ranks = torch.tensor([r for _, _, r, _ in layout], dtype=torch.long)
    scalings = torch.tensor([s for _, _, _, s in layout], dtype=torch.float32)
    scaled = used_weights[:, columns] * scalings  # [batch, present adapters]
    union_coef = scaled.repeat_interleave(ranks, dim=1).contiguous()  # [batch, R_U]
    per_sample = ((union_coef != 0).sum(dim=1)).max().item() if union_coef.numel() else 0
    uniform = bool((union_coef == union_coef[:1]).all())
    return _LayoutPlan(union_rows, union_coef, int(per_sample), uniform)


@dataclass
class _LayerCache:
    """What one layer keeps for the life of a context, built by its first call.

    The routing coefficients ``w_ij * s_j`` are folded into the gathered B rows wherever one row of B serves
    one coefficient (every gather row; the union rows when all samples share their coefficients), so a call
    runs two GEMMs and nothing else: ``hidden = x @ A^T``, then ``result += hidden @ B`` in place.
    """

    plan: _LayoutPlan | None
    lead: int  # leading dimension of the activations it was built for
    one_token_numel: int  # lead x in_features: an activation this size has one token per row (decode)
    one_token: bool = False  # the phase it was built for: decode (one token per row) or prefill
    kernel: str | None = None  # "union" / "gather"; None: no adapter of the batch lives in this layer
    gather: bool = False  # kernel == "gather"
    base: nn.Linear | None = (
        None  # the base layer if exactly nn.Linear: called as F.linear when it has no hooks
    )
    base_params: tuple = ()  # its (weight, bias) for this context
    fp32_max_numel: int = 0  # activations this small compute in fp32 (reduced-precision banks only)
    a_t: torch.Tensor | None = None  # gather: [batch, in, L]; union: [in, R_U] (views of the gathered A rows)
    b: torch.Tensor | None = None  # gather: [batch, L, out] scaled; union: [R_U, out], scaled when uniform
    coef: torch.Tensor | None = None  # union with per-sample coefficients: [lead, 1, R_U]; else None
    samples: torch.Tensor | None = None  # [lead] sample of every leading row; None: the rows are the samples
    group: _SiblingGroup | None = None  # the siblings whose A rows are projected together with this layer's
    offset: int = 0  # this layer's first column in the group's projection
    width: int = 0  # its columns there (L or R_U)
    fp32: tuple | None = None  # (a_t, b, coef) in float32 for small calls on reduced-precision banks

    def operands(self, fp32: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(a_t, b, coef)`` in the banks' dtype, or (``fp32``) float32 copies made at the first need."""
        if not fp32:
            return self.a_t, self.b, self.coef
        if self.fp32 is None:
            group = self.group
            a_t = (
                self.a_t.float()
                if group is None
                else group.operands(True)[0].narrow(-1, self.offset, self.width)
            )
            self.fp32 = (a_t, self.b.float(), None if self.coef is None else self.coef.float())
        return self.fp32


@dataclass
class _SiblingGroup:
    """Sibling layers (same kernel, same rows -> samples map) whose A rows are gathered side by side.

    The first member called with an input projects it for all members (one GEMM instead of one per member) and
    keeps the result; a member called with the very same tensor (identity, and version where tracked) reads
    its columns. If an input serves only the member that projected it, the siblings don't share inputs in this
    model (e.g. cross-attention): the group stops projecting for the others and each member runs alone.
    """

    kernel: str
    a_t: torch.Tensor  # gather: [batch, in, sum L]; union: [in, sum R_U]
    coef: torch.Tensor | None  # union with per-sample coefficients: [lead, 1, sum R_U]
    shared: bool = True
    x: torch.Tensor | None = None  # the input of the last projection
    version: int | None = None  # its version counter (None for inference tensors, which have none)
    hidden: torch.Tensor | None = None  # its projection: gather [batch, T, sum L]; union [lead * T, sum R_U]
    uses: int = 0  # members that read ``hidden`` so far
    fp32: tuple | None = None  # (a_t, coef) in float32, see _LayerCache.operands

    def operands(self, fp32: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not fp32:
            return self.a_t, self.coef
        if self.fp32 is None:
            self.fp32 = (self.a_t.float(), None if self.coef is None else self.coef.float())
        return self.fp32

    def hidden_for(self, x: torch.Tensor, xl: torch.Tensor, lead: int, fp32: bool) -> torch.Tensor | None:
        """The group's projection of ``x`` (``xl``: ``x`` in the compute dtype), or None once not shared."""
        if x is self.x and (self.version is None or self.version == x._version):
            self.uses += 1
            return self.hidden
        if self.uses == 1:  # the previous input served its own member only: inputs aren't shared here
            self.shared, self.x, self.hidden = False, None, None
            return None
        a_t, coef = self.operands(fp32) if fp32 else (self.a_t, self.coef)
        self.hidden = _project(xl, a_t, coef, lead, self.kernel)
        self.x, self.version, self.uses = x, None if x.is_inference() else x._version, 1
        return self.hidden


def _project(
    x: torch.Tensor, a_t: torch.Tensor, coef: torch.Tensor | None, lead: int, kernel: str
) -> torch.Tensor:
    """The LoRA-A step: gather ``[batch, T, L]`` (bmm), union ``[lead * T, R_U]`` (mm, times ``coef``)."""
    in_features = a_t.shape[-2]
    if kernel == "gather":
        return torch.bmm(x.reshape(lead, -1, in_features), a_t)
    hidden = torch.mm(x.reshape(-1, in_features), a_t)
    if coef is not None:  # samples weigh the union rows differently
        rows = hidden.shape[-1]
        hidden = (hidden.view(lead, -1, rows) * coef).view(-1, rows)
    return hidden


# Kernel selection (measured; see docs/decisions.md §17). With several tokens per sample (prefill), per-sample
# gather + bmm does R_U / L times fewer FLOPs than the union GEMM and wins once the batch's union of rows is
# twice one sample's rows. With one token per sample (decode) the rows read per step decide: the union reads
# each used row once, the gather batch x L rows, so the union wins until the batch's adapters are mostly
# distinct (R_U >= 0.6 batch x L). Read-only tuned defaults: to force a kernel, pass ``kernel=`` to the context.
GATHER_MIN_UNION_RATIO = 2.0
GATHER_MIN_DISTINCT_SHARE = 0.6


def _choose_kernel(plan: _LayoutPlan, per_sample_rows: bool, requested: str, one_token: bool) -> str:
    """``requested`` ("auto" / "union" / "gather") -> the kernel a layer runs in this context and phase."""
    if not per_sample_rows:
        return "union"  # rows are not samples (vision tower under row_index): only the union kernel applies
    if requested != "auto":
        return requested
    rows = plan.union_rows.numel()
    if rows < GATHER_MIN_UNION_RATIO * plan.max_rows:
        return "union"
    if one_token and rows < GATHER_MIN_DISTINCT_SHARE * plan.union_coef.shape[0] * plan.max_rows:
        return "union"
    return "gather"


def _gather_siblings(
    layers: Sequence[LoraLinear], caches: Sequence[_LayerCache], state: _MixtureState
) -> _SiblingGroup | None:
    """Gather the rows of sibling layers; those that run alike share one A matrix (a ``_SiblingGroup``).

    Members must run the same kernel on the same rows -> samples map; the others (and layers no adapter of the
    batch reaches) are gathered alone. Union coefficients are folded into B only if every member can fold.
    """
    runs = [(layer, cache) for layer, cache in zip(layers, caches) if cache.kernel is not None]
    first = runs[0][1] if runs else None
    members = [
        (layer, cache)
        for layer, cache in runs
        if cache.kernel == first.kernel and cache.samples is first.samples
    ]
    grouped = {id(cache) for _, cache in members} if len(members) > 1 else set()
    fold = first is None or first.kernel == "gather" or all(cache.plan.uniform for _, cache in members)
    for layer, cache in runs:
        grouped_here = id(cache) in grouped
        layer._gather(cache, state, fold=fold or not grouped_here, group=grouped_here)
    if len(members) < 2:
        return None
    owner = members[0][0]  # the group's rows live in its first member's workspace
    width = sum(cache.width for _, cache in members)
    if first.kernel == "gather":  # [batch, sum L, in] row-major, read transposed like a single layer's rows
        rows = [cache.a_t.mT for _, cache in members]
        shape = (rows[0].shape[0], width, owner.in_features)
        a_t = torch.cat(rows, dim=1, out=owner._buffer(state, "group", shape)).mT
    else:  # [in, sum R_U] row-major
        shape = (owner.in_features, width)
        a_t = torch.cat([cache.a_t for _, cache in members], dim=-1, out=owner._buffer(state, "group", shape))
    coef = None if fold else torch.cat([cache.coef for _, cache in members], dim=-1)
    group = _SiblingGroup(first.kernel, a_t, coef)
    offset = 0
    for _, cache in members:
        cache.group, cache.offset = group, offset
        cache.a_t = a_t.narrow(-1, offset, cache.width)  # views: no second copy of the rows
        if coef is not None:
            cache.coef = coef.narrow(-1, offset, cache.width)
        offset += cache.width
    return group


# ----------------------------------------------------------------------------------------------------------
# The layer.
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterSlot:
    """Where one adapter lives in a layer's banks, and its scaling ``s``."""

    start: int
    r: int
    scaling: float
    dropout: float


class LoraLinear(nn.Module):
    """An ``nn.Linear`` with a pool of LoRA adapters, per-sample mixture routing and PEFT-style activation.

    Args:
        base_layer: the frozen linear layer.
        module_name: the layer's name inside the model (used for row maps and error messages).
        lora_dtype: dtype of the adapter banks and of the LoRA accumulation (fp32 by default).
    """

    def __init__(self, base_layer: nn.Linear, module_name: str, *, lora_dtype: torch.dtype = torch.float32):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"LoraLinear wraps nn.Linear; {module_name} is {type(base_layer).__name__}.")
        self.base_layer = base_layer
        self.module_name = module_name
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.lora_dtype = lora_dtype
        self.slots: dict[str, AdapterSlot] = {}
        self.active_adapters: tuple[str, ...] = ()
        self.disable_adapters = False
        # Vision-tower layers see images (or patches) as rows, never the text batch: under a mixture they
        # need an explicit row_index (set by SwiftModel for known vision towers).
        self.requires_row_index = False
        # Layers the model calls on the very same input tensor (q/k/v, gate/up; set by SwiftModel): under a
        # mixture their LoRA-A projections run as one GEMM whenever the input is indeed the same tensor.
        self.siblings: tuple[LoraLinear, ...] = ()
        self._spares: dict[str, list[torch.Tensor]] = {}  # workspace of finished contexts, see _buffer
        self._rows_used = 1  # row 0 is the zero pad row
        device = base_layer.weight.device
        self.register_buffer(
            "lora_A_bank", torch.zeros(1, self.in_features, dtype=lora_dtype, device=device), persistent=False
        )
        self.register_buffer(
            "lora_B_bank",
            torch.zeros(1, self.out_features, dtype=lora_dtype, device=device),
            persistent=False,
        )

    # -- adapters -----------------------------------------------------------------------------------------

    def add_adapter(
        self,
        adapter_name: str,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        scaling: float,
        dropout: float = 0.0,
    ) -> None:
        """Append one adapter: ``lora_A`` ``[r, in]``, ``lora_B`` ``[out, r]`` (PEFT's layouts)."""
        if adapter_name in self.slots:
            raise ValueError(f"{self.module_name} already holds an adapter named {adapter_name!r}.")
        r = lora_A.shape[0]
        if lora_A.shape != (r, self.in_features) or lora_B.shape != (self.out_features, r):
            raise ValueError(
                f"{self.module_name}: adapter {adapter_name!r} has lora_A {tuple(lora_A.shape)} and lora_B "
                f"{tuple(lora_B.shape)}; this layer needs [r, {self.in_features}] and [{self.out_features}, r]."
            )
        self._reserve(r)
        start = self._rows_used
        with torch.no_grad():
            self.lora_A_bank[start : start + r].copy_(lora_A)
            self.lora_B_bank[start : start + r].copy_(lora_B.t())
        self._rows_used += r
        self.slots[adapter_name] = AdapterSlot(start, r, float(scaling), float(dropout))

    def _reserve(self, extra_rows: int) -> None:
        """Grow the banks geometrically, so loading N adapters costs O(N) copies overall."""
        needed = self._rows_used + extra_rows
        capacity = self.lora_A_bank.shape[0]
        if needed <= capacity:
            return
        new_capacity = max(needed, 2 * capacity)
        for name in ("lora_A_bank", "lora_B_bank"):
            old = getattr(self, name)
            new = torch.zeros(new_capacity, old.shape[1], dtype=old.dtype, device=old.device)
            new[: self._rows_used] = old[: self._rows_used]
            setattr(self, name, new)

    def remove_adapter(self, adapter_name: str) -> None:
        """Drop one adapter and compact the banks (later slots move up).

        Raises:
            RuntimeError: called inside a ``lora_mixture_context`` (its plans index the banks).
        """
        if _MIXTURE.get() is not None:
            raise RuntimeError(
                "cannot remove adapters inside a lora_mixture_context; leave the context first."
            )
        slot = self.slots.pop(adapter_name)
        end = slot.start + slot.r
        with torch.no_grad():
            for bank in (self.lora_A_bank, self.lora_B_bank):
                bank[slot.start : self._rows_used - slot.r] = bank[end : self._rows_used].clone()
                bank[self._rows_used - slot.r : self._rows_used] = 0
        self._rows_used -= slot.r
        self.slots = {
            name: AdapterSlot(s.start - slot.r, s.r, s.scaling, s.dropout) if s.start > slot.start else s
            for name, s in self.slots.items()
        }
        self.active_adapters = tuple(a for a in self.active_adapters if a != adapter_name)

    def lora_weights(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of one adapter's ``(lora_A [r, in], lora_B [out, r])``."""
        slot = self.slots[adapter_name]
        rows = slice(slot.start, slot.start + slot.r)
        return self.lora_A_bank[rows], self.lora_B_bank[rows].t()

    # -- forward ------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        state = _MIXTURE.get()
        if state is None:
            return self._forward_outside_mixture(x, *args, **kwargs)
        cache = state.layers.get(id(self))
        if (
            cache is None
            or cache.lead != x.shape[0]
            or cache.one_token != (x.numel() == cache.one_token_numel)
        ):
            cache = self._prepare(
                x, state, cache
            )  # first call in this context or phase: plan and gather once
        if cache.kernel is None:
            return self.base_layer(x, *args, **kwargs)  # no adapter of the batch lives in this layer
        base = cache.base
        if base is not None and not (args or kwargs or _has_hooks(base)):
            # what nn.Linear's call would do, minus a module call's overhead (~5 us: 210 layers per decode step)
            result = nn.functional.linear(x, *cache.base_params)
        else:
            result = self.base_layer(x, *args, **kwargs)
        return self._add_mixture(x, result, cache)

    def _forward_outside_mixture(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """PEFT's behaviour: the base layer plus the active adapters (none when disabled)."""
        result = self.base_layer(x, *args, **kwargs)
        if not self.active_adapters or self.disable_adapters:
            return result
        delta = self._active_delta(x)
        if delta is None:
            return result
        if delta.dtype == result.dtype and not torch.is_grad_enabled():
            return result.add_(delta)  # inference: no second output-sized allocation
        return result + delta.to(result.dtype)

    def _active_delta(self, x: torch.Tensor) -> torch.Tensor | None:
        """PEFT-style: the sum of the active adapters, each with its scaling (dropout in training only)."""
        xl = x.to(self.lora_dtype)
        delta = None
        for name in self.active_adapters:
            slot = self.slots.get(name)
            if slot is None:
                continue
            lora_A, lora_B = self.lora_weights(name)
            xa = nn.functional.dropout(xl, slot.dropout, self.training) if slot.dropout else xl
            term = (xa @ lora_A.t()) @ lora_B.t() * slot.scaling
            delta = term if delta is None else delta + term
        return delta

    def _add_mixture(self, x: torch.Tensor, result: torch.Tensor, cache: _LayerCache) -> torch.Tensor:
        """``result + sum_j w_ij s_j B_j A_j x_i``; in place (one GEMM into the output) when no grad is needed."""
        lead, out, gather = cache.lead, self.out_features, cache.gather
        # bf16/fp16 GEMMs cost ~30 us a call however small (oneDNN), fp32 ones 2-5 us: few rows compute in fp32
        fp32 = cache.fp32_max_numel > 0 and x.numel() <= cache.fp32_max_numel
        dtype = torch.float32 if fp32 else self.lora_dtype
        a_t, b, coef = cache.operands(fp32) if fp32 else (cache.a_t, cache.b, cache.coef)
        xl = x if x.dtype == dtype else x.to(dtype)
        group = cache.group
        hidden = group.hidden_for(x, xl, lead, fp32) if group is not None and group.shared else None
        if hidden is None:
            hidden = _project(xl, a_t, coef, lead, cache.kernel)
        else:
            hidden = hidden.narrow(-1, cache.offset, cache.width)  # this layer's columns of the group's
        if not torch.is_grad_enabled() and result.is_contiguous():
            if result.dtype == dtype:
                if gather:
                    result.view(lead, -1, out).baddbmm_(hidden, b)
                else:
                    result.view(-1, out).addmm_(hidden, b)
                return result
            delta = torch.bmm(hidden, b) if gather else torch.mm(hidden, b)
            return result.add_(delta.view(result.shape))  # one rounding into the output's dtype
        delta = torch.bmm(hidden, b) if gather else torch.mm(hidden, b)
        return result + delta.view(result.shape).to(result.dtype)

    def _prepare(self, x: torch.Tensor, state: _MixtureState, previous: _LayerCache | None) -> _LayerCache:
        """This layer's first call in a context (or phase): plan, kernel and gathered rows, kept for later calls.

        A context runs a prefill (several tokens per sample) and then decode steps (one token): a phase change
        keeps the rows gathered so far when the kernel stays the same. The first of a set of siblings prepares
        them all and gathers their A rows side by side.
        """
        lead = x.shape[0]
        one_token = x.numel() == lead * self.in_features
        if previous is not None and previous.lead == lead and previous.kernel is not None:
            kernel = _choose_kernel(previous.plan, previous.samples is None, state.kernel, one_token)
            if kernel == previous.kernel:
                previous.one_token = one_token
                return previous
        key = (id(self.siblings[0]), one_token) if self.siblings else None
        if key is not None and key not in state.groups:
            caches = [layer._plan_call(x, state) for layer in self.siblings]
            state.groups[key] = _gather_siblings(self.siblings, caches, state)
            return state.layers[id(self)]
        cache = self._plan_call(x, state)
        if cache.kernel is not None:
            self._gather(cache, state)
        return cache

    def _plan_call(self, x: torch.Tensor, state: _MixtureState) -> _LayerCache:
        """Plan, rows -> samples map and kernel for activations like ``x``; registered in the state."""
        plan = self._plan(state)
        lead = x.shape[0]
        cache = _LayerCache(plan, lead=lead, one_token_numel=lead * self.in_features)
        cache.one_token = x.numel() == cache.one_token_numel
        if plan is not None:
            cache.samples = self._row_samples(x, state)  # [lead] sample of every leading row, or None
            cache.kernel = _choose_kernel(plan, cache.samples is None, state.kernel, cache.one_token)
            cache.gather = cache.kernel == "gather"
            if type(self.base_layer) is nn.Linear:
                cache.base = self.base_layer
                cache.base_params = (self.base_layer.weight, self.base_layer.bias)
            if self.lora_dtype in REDUCED_DTYPES:
                cache.fp32_max_numel = FP32_MAX_ROWS * self.in_features
            state.kernels[self.module_name] = cache.kernel
        state.layers[id(self)] = cache
        return cache

    def _gather(
        self, cache: _LayerCache, state: _MixtureState, *, fold: bool = True, group: bool = False
    ) -> None:
        """Copy the rows ``cache.plan`` names out of the banks; coefficients folded into B where possible.

        ``fold=False`` (union kernel only): leave per-sample coefficients to ``cache.coef`` even when uniform.
        ``group``: the rows will be copied again, side by side with the siblings' (``_gather_siblings``).
        """
        plan, device, dtype = cache.plan, self.lora_A_bank.device, self.lora_dtype
        if cache.kernel == "gather":
            if plan.gather_rows is None:
                plan.build_gather()
            rows = plan.gather_rows.to(device)
            batch, width = rows.shape
            flat = rows.flatten()
            # index_select copies whole rows (several times faster than advanced indexing); the A rows stay
            # row-major and bmm reads them transposed: measured faster at decode, on par at prefill, and no copy.
            a = self._buffer(state, "a", (batch * width, self.in_features))
            cache.a_t = torch.index_select(self.lora_A_bank, 0, flat, out=a).view(batch, width, -1).mT
            b = self._buffer(state, "b", (batch * width, self.out_features))
            b = torch.index_select(self.lora_B_bank, 0, flat, out=b).view(batch, width, -1)
            cache.b = b.mul_(plan.gather_coef.to(device, dtype).unsqueeze(-1))  # [batch, L, out]
        else:
            rows = plan.union_rows.to(device)
            a = torch.index_select(self.lora_A_bank, 0, rows).t()  # [in, R_U]
            # a few rows: row-major [in, R_U] is faster for T > 1 (unless copied next to the siblings' anyway)
            cache.a_t = a if group else self._buffer(state, "a", a.shape).copy_(a)
            b = self._buffer(state, "b", (rows.numel(), self.out_features))
            cache.b = torch.index_select(self.lora_B_bank, 0, rows, out=b)  # [R_U, out]
            coef = plan.union_coef.to(device, dtype)
            if plan.uniform and fold:
                cache.b.mul_(coef[0].unsqueeze(-1))
            else:
                samples = cache.samples
                cache.coef = (coef if samples is None else coef[samples]).unsqueeze(1)  # [lead, 1, R_U]
        cache.width = cache.a_t.shape[-1]

    def _buffer(self, state: _MixtureState, purpose: str, shape: Sequence[int]) -> torch.Tensor:
        """An uninitialised ``shape`` tensor for the rows this context gathers (``purpose``: "a", "b", "group").

        Gathered rows can be hundreds of MB per context (batch x k x r rows per layer); fresh allocations of that
        size come from the OS page by page (54k page faults, ~100 ms per prefill of SmolLM2 at batch 8, k=3), so
        a context gives its buffers back to the layer at exit and the next one reuses them
        (``MAX_SPARE_BUFFERS`` per purpose; ``release_workspace()`` frees them). With grad enabled, autograd may
        keep the rows past the context: those are never reused.
        """
        numel = math.prod(shape)
        if torch.is_grad_enabled():
            return torch.empty(shape, dtype=self.lora_dtype, device=self.lora_A_bank.device)
        spares = self._spares.setdefault(purpose, [])
        try:
            buffer = spares.pop()  # atomic: contexts in other threads never get the same buffer
        except IndexError:
            buffer = None
        if (
            buffer is None
            or buffer.numel() < numel
            or buffer.dtype != self.lora_dtype
            # a buffer made under torch.inference_mode() can't be written outside it (and vice versa)
            or buffer.is_inference() != torch.is_inference_mode_enabled()
        ):
            buffer = torch.empty(numel, dtype=self.lora_dtype, device=self.lora_A_bank.device)
        state.borrowed.append((spares, buffer))
        return buffer[:numel].view(shape)

    def release_workspace(self) -> None:
        """Free the buffers kept from earlier mixture contexts (they are reallocated on demand)."""
        self._spares = {}

    def _plan(self, state: _MixtureState) -> _LayoutPlan | None:
        """The index plan for this layer; layers with the same slot layout share one."""
        layout = tuple(
            (col, slot.start, slot.r, slot.scaling)
            for col, name in enumerate(state.used_names)
            if (slot := self.slots.get(name)) is not None
        )
        if not layout:
            return None
        plan = state.plans.get(layout)
        if plan is None:
            plan = state.plans[layout] = _make_plan(layout, state.used_weights)
        return plan

    def _row_samples(self, x: torch.Tensor, state: _MixtureState) -> torch.Tensor | None:
        """Sample index of every leading row of ``x``; ``None`` when the leading dim is the batch itself."""
        batch = state.routing.batch_size
        lead = x.shape[0]
        prefix = _longest_prefix(self.module_name, state.row_index)
        if prefix is not None:
            samples = state.row_index[prefix]
            if samples.numel() != lead:
                raise ValueError(
                    f"row_index[{prefix!r}] has {samples.numel()} rows but {self.module_name} received an "
                    f"activation with leading dimension {lead} (shape {tuple(x.shape)})."
                )
            return samples.to(x.device)
        if self.requires_row_index:
            raise ValueError(
                f"{self.module_name} is part of a vision tower: its rows are images or patches, not samples. "
                "Pass row_index={prefix: sample_of_each_row} to lora_mixture_context (swift.llm.inference and "
                "swift.llm.vision_row_index build it from the processor outputs)."
            )
        if x.dim() >= 3 and lead == batch:
            return None
        if x.dim() >= 3 and batch > 0 and lead % batch == 0:
            # generate(num_beams=n / num_return_sequences=n) repeats every sample n times in a row.
            return torch.arange(batch, device=x.device).repeat_interleave(lead // batch)
        if x.dim() == 2 and lead == batch:
            return None
        raise ValueError(
            f"{self.module_name} received an activation of shape {tuple(x.shape)} under a mixture routing for "
            f"{batch} samples: its leading dimension doesn't match the batch. Pass row_index={{prefix: "
            "sample_of_each_row}} to lora_mixture_context (swift.llm does this for vision towers)."
        )

    def extra_repr(self) -> str:
        return f"module_name={self.module_name!r}, adapters={list(self.slots)}, active={list(self.active_adapters)}"


# torch's global module hooks (``register_module_forward_hook`` & co., dicts torch mutates in place): a base
# layer called as F.linear must not skip them. If a torch release renames them, only local hooks are checked.
_GLOBAL_FORWARD_PRE, _GLOBAL_FORWARD, _GLOBAL_BACKWARD_PRE, _GLOBAL_BACKWARD = (
    getattr(nn.modules.module, name, {})
    for name in (
        "_global_forward_pre_hooks",
        "_global_forward_hooks",
        "_global_backward_pre_hooks",
        "_global_backward_hooks",
    )
)


def _has_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` would run any hook (its own or a global one), as ``nn.Module.__call__`` checks."""
    return bool(
        module._forward_pre_hooks
        or module._forward_hooks
        or module._backward_pre_hooks
        or module._backward_hooks
        or _GLOBAL_FORWARD_PRE
        or _GLOBAL_FORWARD
        or _GLOBAL_BACKWARD_PRE
        or _GLOBAL_BACKWARD
    )


def _longest_prefix(name: str, prefixes: Mapping[str, torch.Tensor]) -> str | None:
    best = None
    for prefix in prefixes:
        if (name == prefix or name.startswith(prefix + ".")) and (best is None or len(prefix) > len(best)):
            best = prefix
    return best
