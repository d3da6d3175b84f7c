"""Composers: from per-sample retrieved adapters to generated answers.

* ``MixtureComposer`` (LoraRetriever, Zhao et al. 2024, Sec. 3.3 "mixture"): every sample of a batch runs
  with its own weighted sum of its own adapters inside each LoRA layer (``lora_mixture_context``).
* ``FusionComposer`` (Sec. 3.3 "fusion"): each sample's adapters are merged into one adapter (methods in
  ``lora_retriever.fusion``); samples with the same adapter set and weights share one fused adapter, kept in
  an LRU cache and loaded next to the pool, so a batch with several fused adapters still runs in one
  ``generate`` (one-hot routing over the fused adapters).

Both turn their selections into one ``LoraRouting`` and make one ``swift.llm.inference`` call (the one
batching level). A composer works on one ``SwiftModel`` for its whole life: a plain model is wrapped once,
when the composer is built; to share one model (and the adapters loaded into it) between composers, pass
the first composer's ``.model`` to the next. Adapters are loaded from the pool once, on first use, and kept.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from lora_retriever.pool import AdapterPool
from lora_retriever.retriever import RetrievedAdapter
from lora_retriever.selection import routing_from_selections
from swift.llm.infer import Answers
from swift.tuners import LoraLinear, LoraRouting, SwiftModel
from swift.utils import get_logger

logger = get_logger(__name__)

__all__ = ["Composer", "FusionComposer", "MixtureComposer"]

Selection = Sequence[RetrievedAdapter]


class Composer:
    """Shared machinery: one ``SwiftModel`` with its pool of adapters, the template and generation settings.

    Args:
        model: a ``SwiftModel`` (shared with whoever else holds it), or a plain transformers model, which is
            wrapped in a new ``SwiftModel`` here, once (``composer.model``); the model's targeted linear layers
            are replaced in place as adapters load.
        template: the model's ``swift.llm`` template.
        pool: the adapter pool the selections refer to.
        batch_size: queries per ``generate`` call.
        generation_config: passed to ``swift.llm.inference``.
        progress: show a progress bar over batches.

    Raises:
        ValueError: ``model`` already holds LoRA layers of another ``SwiftModel`` (pass that ``SwiftModel``).
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
        if not isinstance(model, SwiftModel):
            if any(isinstance(m, LoraLinear) for m in model.modules()):
                raise ValueError(
                    f"{type(model).__name__} already holds LoRA layers of a SwiftModel; pass that SwiftModel "
                    "(e.g. other_composer.model) to share it, not the model inside it."
                )
            model = SwiftModel(model)
        self.model: SwiftModel = model
        self.template = template
        self.pool = pool
        self.batch_size = batch_size
        self.generation_config = generation_config
        self.progress = progress

    def ensure_loaded(self, names: Sequence[str]) -> None:
        """Load the named pool adapters that aren't loaded into ``self.model`` yet."""
        for name in names:
            if name not in self.model.adapter_configs:
                self.model.load_adapter(self.pool[name].lora_path, adapter_name=name)
                self.model.set_active_adapters(None)  # outside a routing context: the base model

    def generate(
        self,
        queries: Sequence[str],
        selections: Sequence[Selection],
        images: Sequence[Any] | None = None,
        *,
        on_error: str = "raise",
    ) -> Answers:
        """One answer per query; ``selections[i]`` are query i's adapters with weights (may be empty).

        ``on_error="isolate"``: a query that fails gets ``""`` and its error in ``Answers.errors``.

        Raises:
            ValueError: not one selection per query, or a selected adapter that is not in the pool.
        """
        if len(selections) != len(queries):
            raise ValueError(f"{len(selections)} selections for {len(queries)} queries; give one per query")
        try:
            return self._run(queries, images, self.route(selections), on_error)
        finally:
            self.after_call()

    def route(self, selections: Sequence[Selection]) -> LoraRouting:
        """The routing over adapters loaded in ``self.model`` that realises ``selections`` (loads what's needed)."""
        raise NotImplementedError

    def after_call(self) -> None:
        """Housekeeping once a ``generate`` call has finished (or failed)."""

    def _run(self, queries, images, routing: LoraRouting, on_error: str) -> Answers:
        from swift.llm import inference

        if not routing.used_names():  # no sample uses an adapter: the base model
            with self.model.disable_adapters():
                return inference(
                    self.model,
                    self.template,
                    list(queries),
                    images,
                    batch_size=self.batch_size,
                    generation_config=self.generation_config,
                    on_error=on_error,
                    progress=self.progress,
                )
        return inference(
            self.model,
            self.template,
            list(queries),
            images,
            routing=routing,
            batch_size=self.batch_size,
            generation_config=self.generation_config,
            on_error=on_error,
            progress=self.progress,
        )


class MixtureComposer(Composer):
    """Per-sample weighted mixture of each sample's retrieved adapters, in one batched ``generate``."""

    def route(self, selections: Sequence[Selection]) -> LoraRouting:
        routing = routing_from_selections(selections, self.pool.names)
        self.ensure_loaded(routing.adapter_names)
        return routing


class FusionComposer(Composer):
    """Merge each sample's adapters into one (``lora_retriever.fusion``) and generate with it.

    Args:
        method: a fusion method of the registry (``lora_retriever.fusion.available_methods()``; ``linear``
            is the paper's).
        cache_size: fused adapters kept loaded between calls (least recently used evicted first; one call
            keeps every fused adapter it uses loaded until it ends).
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

    def route(self, selections: Sequence[Selection]) -> LoraRouting:
        """Each sample routes, with weight 1, to the fused adapter of its selection (built or cached)."""
        keys = [self.selection_key(sel) for sel in selections]
        fused_names = {key: self._get(key, sel)[0] for key, sel in zip(keys, selections) if key}
        one_hot = [[RetrievedAdapter(fused_names[key], 1.0, float("nan"))] if key else [] for key in keys]
        return routing_from_selections(one_hot, [name for name, _ in self._fused.values()])

    def after_call(self) -> None:
        """Unload least recently used fused adapters beyond ``cache_size`` (a call keeps all it uses)."""
        while len(self._fused) > self.cache_size:
            _, (name, _) = self._fused.popitem(last=False)
            self.model.delete_adapter(name)

    def _get(self, key: tuple, selection: Selection) -> tuple[str, Any]:
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
        self.model.add_adapter_weights(name, {m: (a, b, 1.0) for m, (a, b) in fused.modules.items()})
        self.model.set_active_adapters(None)
        self._fused[key] = (name, fused)
        return self._fused[key]
