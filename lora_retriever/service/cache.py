"""``AdapterCache``: which pool adapters are resident in the model, within a memory budget.

Pools can be larger than memory: only the adapters in use stay loaded in the ``SwiftModel``'s banks. When a
batch needs adapters that aren't resident, the least recently used ones that are neither pinned nor used by
the batch are evicted until the new ones fit both budgets (a number of adapters and bytes of LoRA weights).

Loads happen off the request path where possible: ``prefetch`` (called when a request is queued) reads and
validates the adapter's files in a background thread, so the scheduler only copies the weights into the model
when the batch starts. An adapter's first load goes through ``SwiftModel.load_adapter`` (every check against
the model); later reloads of an evicted adapter install the prefetched weights.

Thread safety: ``acquire``/``release``/``unload``/``register_loaded`` change the model and must be called with
the engine's model lock held (the scheduler thread and admin calls hold it); ``prefetch`` may be called from
anywhere.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from lora_retriever.service.metrics import ServiceMetrics
from swift.tuners import LoraAdapter, SwiftModel, read_adapter_dir
from swift.utils import get_logger

logger = get_logger(__name__)

__all__ = ["AdapterCache", "AdapterBudgetError"]


class AdapterBudgetError(ValueError):
    """A batch needs more adapters than the cache budget holds at once."""


class AdapterCache:
    """The resident adapters of ``model`` (LRU order, pins, byte accounting).

    Args:
        model: the ``SwiftModel`` the adapters load into.
        locate: adapter name -> its PEFT directory (raises ``KeyError`` for a name the pool doesn't hold).
        max_resident: adapters resident at most.
        max_bytes: bytes of resident LoRA weights at most.
        metrics: where hits, misses, evictions and load times are counted.
    """

    def __init__(
        self,
        model: SwiftModel,
        locate: Callable[[str], Path],
        *,
        max_resident: int,
        max_bytes: int,
        metrics: ServiceMetrics | None = None,
    ):
        self.model = model
        self.locate = locate
        self.max_resident = max_resident
        self.max_bytes = max_bytes
        self.metrics = metrics or ServiceMetrics()
        self._lru: OrderedDict[str, int] = OrderedDict()  # resident adapter -> bytes, least recent first
        self._pinned: set[str] = set()
        self._in_use: dict[str, int] = {}
        self._validated: set[str] = set()  # loaded once through load_adapter (all checks passed)
        self._staged: dict[str, Future[LoraAdapter]] = {}
        self._staged_lock = threading.Lock()
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapter-prefetch")
        self.load_seconds: list[float] = []

    # -- state --------------------------------------------------------------------------------------------

    @property
    def resident(self) -> list[str]:
        """Resident adapters, least recently used first."""
        return list(self._lru)

    @property
    def resident_bytes(self) -> int:
        return sum(self._lru.values())

    @property
    def pinned(self) -> set[str]:
        return set(self._pinned)

    def is_resident(self, name: str) -> bool:
        return name in self._lru

    def stats(self) -> dict[str, float | int]:
        """Residency, budget, hit rate and load latency (milliseconds) since start."""
        hits, misses = self.metrics.cache_hits.value(), self.metrics.cache_misses.value()
        loads = sorted(self.load_seconds)

        def quantile(q: float) -> float | None:
            return round(loads[min(len(loads) - 1, int(q * len(loads)))] * 1000, 3) if loads else None

        return {
            "resident": len(self._lru),
            "resident_mb": round(self.resident_bytes / 2**20, 3),
            "max_resident": self.max_resident,
            "max_mb": round(self.max_bytes / 2**20, 3),
            "pinned": len(self._pinned),
            "hits": int(hits),
            "misses": int(misses),
            "evictions": int(self.metrics.cache_evictions.value()),
            "hit_rate": round(hits / (hits + misses), 4) if hits + misses else None,
            "loads": len(loads),
            "load_ms_p50": quantile(0.5),
            "load_ms_p95": quantile(0.95),
        }

    # -- loading ------------------------------------------------------------------------------------------

    def prefetch(self, names: Iterable[str]) -> None:
        """Start reading the files of adapters that aren't resident (background thread; errors surface at
        ``acquire``). Only adapters loaded before (validated against the model) are staged."""
        for name in names:
            if name in self._lru or name not in self._validated:
                continue
            with self._staged_lock:
                if name in self._staged:
                    continue
                try:
                    path = self.locate(name)
                except KeyError:
                    continue
                self._staged[name] = self._reader.submit(read_adapter_dir, path)

    def acquire(self, names: Iterable[str]) -> None:
        """Make ``names`` resident and mark them in use until ``release`` (model lock held).

        Raises:
            KeyError: a name the pool doesn't hold.
            AdapterBudgetError: the names don't fit the budget even after evicting everything unpinned.
            AdapterLoadError / FileNotFoundError: an adapter fails to load.
        """
        names = list(dict.fromkeys(names))
        acquired = []
        try:
            for name in names:
                if name in self._lru:
                    self._lru.move_to_end(name)
                    self.metrics.cache_hits.inc()
                else:
                    self._make_room(keep=set(names))
                    self.metrics.cache_misses.inc()
                    self._load(name, keep=set(names))
                self._in_use[name] = self._in_use.get(name, 0) + 1
                acquired.append(name)
        except BaseException:
            self.release(acquired)
            raise
        finally:
            self._update_gauges()

    def release(self, names: Iterable[str]) -> None:
        """Undo one ``acquire(names)`` (each name counted once, as ``acquire`` counts it)."""
        for name in dict.fromkeys(names):
            count = self._in_use.get(name, 0) - 1
            if count > 0:
                self._in_use[name] = count
            else:
                self._in_use.pop(name, None)

    def pin(self, name: str) -> None:
        """Load ``name`` (if needed) and never evict it (model lock held)."""
        self.acquire([name])
        self.release([name])
        self._pinned.add(name)

    def resize(self, max_resident: int | None = None, max_bytes: int | None = None) -> None:
        """Change the budget and evict down to it now (model lock held).

        Raises:
            ValueError: a budget below 1.
            AdapterBudgetError: pinned / in-use adapters alone exceed the new budget (it is kept anyway).
        """
        for what, value in (("max_resident", max_resident), ("max_bytes", max_bytes)):
            if value is not None and value < 1:
                raise ValueError(f"{what} must be >= 1, got {value}")
        self.max_resident = self.max_resident if max_resident is None else max_resident
        self.max_bytes = self.max_bytes if max_bytes is None else max_bytes
        try:
            self._evict(keep=set())
        finally:
            self._update_gauges()

    def register_loaded(self, name: str, *, pinned: bool = False) -> None:
        """Account for an adapter the engine loaded itself (registration validates by loading)."""
        self._validated.add(name)
        self._lru[name] = self._adapter_bytes(name)
        if pinned:
            self._pinned.add(name)
        self._evict(keep={name})
        self._update_gauges()

    def unload(self, name: str) -> None:
        """Unload ``name`` and forget it (deleted from the pool); model lock held."""
        with self._staged_lock:
            self._staged.pop(name, None)
        self._pinned.discard(name)
        self._validated.discard(name)
        if name in self._lru:
            del self._lru[name]
            self.model.delete_adapter(name)
        self._update_gauges()

    def close(self) -> None:
        self._reader.shutdown(wait=False, cancel_futures=True)

    def _load(self, name: str, keep: set[str]) -> None:
        path = self.locate(name)
        with self._staged_lock:
            staged = self._staged.pop(name, None)
        start = time.perf_counter()
        if staged is not None and name in self._validated:
            adapter = staged.result()  # read off the request path (or finishes reading now)
            config = adapter.config
            weights = {
                module: (pair.lora_A, pair.lora_B, config.scaling(module, pair.lora_A.shape[0]))
                for module, pair in adapter.pairs.items()
            }
            self.model.add_adapter_weights(name, weights, config)
        else:
            self.model.load_adapter(path, name)
            self._validated.add(name)
        self.model.set_active_adapters(None)  # outside a routing context: the base model
        seconds = time.perf_counter() - start
        self.load_seconds.append(seconds)
        self.metrics.adapter_load.observe(seconds)
        self._lru[name] = self._adapter_bytes(name)
        logger.debug("loaded adapter %r in %.1f ms", name, seconds * 1000)
        try:
            self._evict(keep)
        except AdapterBudgetError:
            del self._lru[name]  # it doesn't fit: leave the model as it was
            self.model.delete_adapter(name)
            raise

    def _make_room(self, keep: set[str]) -> None:
        """Before loading one more adapter: evict down to ``max_resident - 1`` so the model never holds more than
        the count budget, even while loading; refuse if the adapters that fill it can't go. (The byte budget is
        enforced after the load, when the adapter's size in the model is known.)"""
        while len(self._lru) >= self.max_resident:
            victim = next(iter(self._evictable(keep)), None)
            if victim is None:
                raise self._budget_error()
            self._evict_one(victim)

    def _evictable(self, keep: set[str]) -> Iterable[str]:
        return (n for n in self._lru if n not in self._pinned and n not in self._in_use and n not in keep)

    def _budget_error(self) -> AdapterBudgetError:
        return AdapterBudgetError(
            f"the adapter cache holds {len(self._lru)} adapters ({self.resident_bytes / 2**20:.1f} MB) with a budget "
            f"of {self.max_resident} adapters / {self.max_bytes / 2**20:.1f} MB, and none can be evicted (pinned "
            "or in use); raise --max_resident_adapters / --adapter_memory_mb or use fewer adapters per request"
        )

    def _evict(self, keep: set[str]) -> None:
        """Evict least recently used adapters (not pinned, not in use, not in ``keep``) until within budget."""
        while len(self._lru) > self.max_resident or self.resident_bytes > self.max_bytes:
            victim = next(iter(self._evictable(keep)), None)
            if victim is None:
                raise self._budget_error()
            self._evict_one(victim)

    def _evict_one(self, victim: str) -> None:
        del self._lru[victim]
        self.model.delete_adapter(victim)
        self.metrics.cache_evictions.inc()
        logger.debug("evicted adapter %r", victim)

    def _adapter_bytes(self, name: str) -> int:
        total = 0
        for _, layer in self.model.lora_layers():
            slot = layer.slots.get(name)
            if slot is not None:
                total += slot.r * (layer.in_features + layer.out_features) * layer.lora_A_bank.element_size()
        return total

    def _update_gauges(self) -> None:
        self.metrics.adapters_resident.set(len(self._lru))
        self.metrics.adapter_bytes.set(self.resident_bytes)
