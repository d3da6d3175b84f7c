"""Composers: from per-sample retrieved adapters to generated answers.

* ``MixtureComposer`` (LoraRetriever, Zhao et al. 2024, Sec. 3.3 "mixture"): every sample of a batch runs
  with its own weighted sum of its own adapters inside each LoRA layer (``lora_mixture_context``).
* ``FusionComposer`` (Sec. 3.3 "fusion"): each sample's adapters are merged into one adapter (methods in
  ``lora_retriever.fusion``); samples with the same adapter set and weights share one fused adapter, kept in
  an LRU cache and loaded next to the pool, so a batch with several fused adapters still runs in one
  ``generate`` (one-hot routing over the fused adapters).

Adapters are loaded from the pool once, on first use, and kept.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lora_retriever.pool import AdapterPool
from lora_retriever.retriever import RetrievedAdapter
from swift.tuners import Swift, SwiftModel
from swift.utils import get_logger

logger = get_logger(__name__)

__all__ = ["Composer", "FusionComposer", "MixtureComposer", "routing_matrix"]

Selection = Sequence[RetrievedAdapter]


def routing_matrix(selections: Sequence[Selection], order: Sequence[str]) -> tuple[torch.Tensor, list[str]]:
    """The paper's ``[batch, p]`` weight matrix over the union of the selected adapters.

    Columns follow ``order`` (the pool order), so the same selections always give the same matrix. A sample
    with no selection gets an all-zero row (the base model).

    Raises:
        ValueError: a selected adapter is not in ``order``.
    """
    position = {name: i for i, name in enumerate(order)}
    used = sorted({a.name for sel in selections for a in sel}, key=lambda n: position.get(n, -1))
    unknown = [n for n in used if n not in position]
    if unknown:
        raise ValueError(f"selected adapters {unknown} are not in the pool")
    column = {name: j for j, name in enumerate(used)}
    mapping = torch.zeros(len(selections), len(used))
    for i, sel in enumerate(selections):
        for adapter in sel:
            mapping[i, column[adapter.name]] += adapter.weight
    return mapping, used


class Composer:
    """Shared machinery: the model with its pool of adapters, the template and generation settings.

    Args:
        model: a transformers model or a ``SwiftModel``.
        template: the model's ``swift.llm`` template.
        pool: the adapter pool the selections refer to.
        batch_size: queries per ``generate`` call.
        generation_config: passed to ``swift.llm.inference``.
    """

    def __init__(
        self,
        model: nn.Module,
        template: Any,
        pool: AdapterPool,
        *,
        batch_size: int = 8,
        generation_config: Any = None,
        progress: bool = True,
    ):
        self.model = model
        self.template = template
        self.pool = pool
        self.batch_size = batch_size
        self.generation_config = generation_config
        self.progress = progress

    def ensure_loaded(self, names: Sequence[str]) -> SwiftModel:
        """Load the named pool adapters that aren't loaded yet; returns the ``SwiftModel``."""
        for name in names:
            loaded = self.model.adapter_names if isinstance(self.model, SwiftModel) else []
            if name not in loaded:
                self.model = Swift.from_pretrained(self.model, self.pool[name].lora_path, adapter_name=name)
                self.model.set_active_adapters(None)  # outside a routing context: the base model
        if not isinstance(self.model, SwiftModel):
            self.model = SwiftModel(self.model)
        return self.model

    def generate(
        self, queries: Sequence[str], selections: Sequence[Selection], images: Sequence[Any] | None = None
    ) -> list[str]:
        raise NotImplementedError

    def _run(self, queries, images, mapping: torch.Tensor, names: list[str]) -> list[str]:
        from swift.llm import inference

        if not names:  # no sample uses an adapter: the base model
            disabled = self.model.disable_adapters() if isinstance(self.model, SwiftModel) else nullcontext()
            with disabled:
                return inference(
                    self.model,
                    self.template,
                    list(queries),
                    images,
                    batch_size=self.batch_size,
                    generation_config=self.generation_config,
                    progress=self.progress,
                )
        return inference(
            self.model,
            self.template,
            list(queries),
            images,
            lora_mapping=mapping,
            adapter_names=names,
            batch_size=self.batch_size,
            generation_config=self.generation_config,
            progress=self.progress,
        )


class MixtureComposer(Composer):
    """Per-sample weighted mixture of each sample's retrieved adapters, in one batched ``generate``."""

    def generate(
        self, queries: Sequence[str], selections: Sequence[Selection], images: Sequence[Any] | None = None
    ) -> list[str]:
        """One answer per query; ``selections[i]`` are query i's adapters with weights (may be empty)."""
        if len(selections) != len(queries):
            raise ValueError(f"{len(selections)} selections for {len(queries)} queries; give one per query")
        mapping, names = routing_matrix(selections, self.pool.names)
        self.ensure_loaded(names)
        return self._run(queries, images, mapping, names)


class FusionComposer(Composer):
    """Merge each sample's adapters into one (``lora_retriever.fusion``) and generate with it.

    Args:
        method: ``cat``, ``linear`` (the paper's), ``svd``, ``ties``, ``dare_linear``, ``dare_ties``.
        cache_size: fused adapters kept loaded (least recently used evicted first).
        fusion_options: passed to ``lora_retriever.fusion.fuse`` (e.g. ``svd_rank``, ``density``, ``seed``).
    """

    def __init__(
        self,
        model: nn.Module,
        template: Any,
        pool: AdapterPool,
        *,
        method: str = "linear",
        cache_size: int = 16,
        fusion_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ):
        super().__init__(model, template, pool, **kwargs)
        from lora_retriever.fusion import available_methods

        if method not in available_methods():
            raise ValueError(f"unknown fusion method {method!r}; choose one of {available_methods()}")
        if cache_size < 1:
            raise ValueError(f"cache_size must be >= 1, got {cache_size}")
        self.method = method
        self.cache_size = cache_size
        self.fusion_options = dict(fusion_options or {})
        self._fused: OrderedDict[tuple, tuple[str, Any]] = (
            OrderedDict()
        )  # key -> (adapter name, FusedAdapter)
        self._weights: dict[str, Any] = {}  # pool adapter name -> LoraWeights (read once)
        self._counter = 0

    @staticmethod
    def selection_key(selection: Selection) -> tuple:
        """Samples with the same adapters and weights share one fused adapter."""
        return tuple(sorted((a.name, round(a.weight, 6)) for a in selection))

    def fused_adapter(self, selection: Selection):
        """The ``FusedAdapter`` for one selection (built, or from the cache)."""
        return self._get(self.selection_key(selection), selection)[1]

    def save(self, selection: Selection, out_dir: str | Path) -> Path:
        """Write the fused adapter of ``selection`` as a PEFT adapter directory."""
        fused = self.fused_adapter(selection)
        base = getattr(getattr(self.model, "config", None), "name_or_path", None)
        return fused.save(out_dir, base_model_name_or_path=base)

    def generate(
        self, queries: Sequence[str], selections: Sequence[Selection], images: Sequence[Any] | None = None
    ) -> list[str]:
        if len(selections) != len(queries):
            raise ValueError(f"{len(selections)} selections for {len(queries)} queries; give one per query")
        answers: list[str] = []
        for start in range(0, len(queries), self.batch_size):
            batch = slice(start, start + self.batch_size)
            keys = [self.selection_key(sel) for sel in selections[batch]]
            names = []
            for key, sel in zip(keys, selections[batch]):
                names.append(self._get(key, sel, pinned=set(keys))[0] if key else None)
            used = sorted({n for n in names if n})
            mapping = torch.zeros(len(names), len(used))
            for i, name in enumerate(names):
                if name:
                    mapping[i, used.index(name)] = 1.0
            answers.extend(
                self._run(queries[batch], None if images is None else images[batch], mapping, used)
            )
        return answers

    def _get(self, key: tuple, selection: Selection, pinned: set | None = None) -> tuple[str, Any]:
        if key in self._fused:
            self._fused.move_to_end(key)
            return self._fused[key]
        from lora_retriever.fusion import LoraWeights, fuse

        for adapter in selection:
            if adapter.name not in self._weights:
                self._weights[adapter.name] = LoraWeights.from_dir(
                    self.pool[adapter.name].lora_path, name=adapter.name
                )
        fused = fuse(
            [self._weights[a.name] for a in selection],
            [a.weight for a in selection],
            self.method,
            **self.fusion_options,
        )
        self._counter += 1
        name = f"fused-{self.method}-{self._counter}"
        model = self.ensure_loaded([])
        model.add_adapter_weights(name, {m: (a, b, 1.0) for m, (a, b) in fused.modules.items()})
        model.set_active_adapters(None)
        self._fused[key] = (name, fused)
        self._evict(pinned or set())
        return self._fused[key]

    def _evict(self, pinned: set) -> None:
        for key in list(self._fused):
            if len(self._fused) <= self.cache_size:
                return
            if key not in pinned:
                name, _ = self._fused.pop(key)
                self.model.delete_adapter(name)
