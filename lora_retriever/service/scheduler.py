"""Dynamic batching: concurrent generation requests, each with its own adapters and weights, decoded together.

``Scheduler`` owns one thread that takes queued ``GenerationRequest``s, coalesces up to ``max_batch_size`` of
them (waiting at most ``max_wait_ms`` after the first for others to arrive), and runs them as ONE mixture
batch: one ``generate`` call inside ``SwiftModel.mixture`` with a ``LoraRouting`` row per request
(``routing_from_selections``), so every row gets its own weighted sum of its own adapters at prefill and at
every decode step (LoraRetriever, Sec. 3.3). Prompts are left-padded, as ``swift.llm.inference`` pads them.

Each row is streamed back separately as it decodes: a per-row ``StoppingCriteria`` (``_BatchProgress``) sees
every new token, turns it into text deltas for that request's asyncio queue, and marks the row finished on
end-of-turn, on its own ``max_tokens``, on a stop string, or when its client went away; ``generate`` stops
when every row is finished. Requests that sample (``temperature > 0``) share a batch only with requests of
the same sampling settings; a request with a ``seed`` runs alone (seeded), so its output is reproducible.

Errors stay with their request: an adapter that fails to load fails only the requests that use it, and if a
batch's ``generate`` fails, the requests that have not streamed anything yet are retried one by one.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lora_retriever.retriever import RetrievedAdapter
from lora_retriever.selection import routing_from_selections
from lora_retriever.service.metrics import ServiceMetrics
from swift.utils import get_logger

logger = get_logger(__name__)

__all__ = ["Completion", "GenerationRequest", "RequestHandle", "Scheduler", "TextDelta"]


@dataclass(frozen=True)
class TextDelta:
    """New text of one request (streamed as it decodes)."""

    text: str


@dataclass(frozen=True)
class Completion:
    """The end of one request: its whole text, why it stopped, token counts and batching facts."""

    text: str
    finish_reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    completion_tokens: int
    batch_size: int
    queue_seconds: float


@dataclass
class GenerationRequest:
    """One prompt to continue, with its mixture and sampling settings.

    Attributes:
        prompt_ids: the prompt's token ids (chat template already applied for chat requests).
        adapters: the adapters this request composes, with weights (empty: the base model).
        max_tokens: new tokens at most.
        temperature: 0 = greedy; > 0 samples.
        top_p: nucleus sampling (with ``temperature > 0``).
        stop: strings that end the answer (not included in it).
        seed: seeds the sampling; the request then runs in a batch of its own.
    """

    prompt_ids: list[int]
    adapters: list[RetrievedAdapter]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    _handle: RequestHandle | None = field(default=None, repr=False)

    def batch_key(self) -> tuple:
        """Requests with equal keys may share a batch (one GenerationConfig serves them all)."""
        if self.seed is not None:
            return ("seeded", id(self))
        if self.temperature == 0:
            return ("greedy",)
        return ("sample", self.temperature, self.top_p)


class RequestHandle:
    """The client side of one queued request: an asyncio stream of ``TextDelta`` then one ``Completion``
    (or an exception), fed from the scheduler thread."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop):
        self.request = request
        self.loop = loop
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.cancelled = threading.Event()
        self.enqueued = time.perf_counter()
        self.started = False  # set by the scheduler once a token was streamed
        self.finished = False

    def cancel(self) -> None:
        """The client went away: its row stops at the next decode step."""
        self.cancelled.set()

    # scheduler side --------------------------------------------------------------------------------------

    def _put(self, item: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the client is gone
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def send(self, delta: str) -> None:
        self.started = True
        self._put(TextDelta(delta))

    def finish(self, completion: Completion) -> None:
        self.finished = True
        self._put(completion)

    def fail(self, error: BaseException) -> None:
        self.finished = True
        self._put(error)

    # client side ----------------------------------------------------------------------------------------

    async def events(self) -> AsyncIterator[TextDelta | Completion]:
        """Deltas as they decode, then the ``Completion``; raises the request's error if it failed."""
        while True:
            item = await self.queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if isinstance(item, Completion):
                return

    async def result(self) -> Completion:
        async for item in self.events():
            if isinstance(item, Completion):
                return item
        raise RuntimeError("the request ended without a result")  # unreachable: events() ends on a Completion


class _Row:
    """One request's progress inside a running batch: its tokens, the text sent, when it is done."""

    def __init__(
        self, handle: RequestHandle, tokenizer: Any, eos_ids: set[int], batch_size: int, started: float
    ):
        self.handle = handle
        self.request = handle.request
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.batch_size = batch_size
        self.queue_seconds = started - handle.enqueued
        self.tokens: list[int] = []
        self.sent = ""  # text streamed so far
        self.done = False
        # A stop string may arrive split over tokens: hold back as many characters as could start one.
        self.hold = max((len(s) for s in self.request.stop), default=1) - 1

    def step(self, token: int) -> None:
        if self.handle.cancelled.is_set():
            return self._end("cancelled", self.sent)
        if token in self.eos_ids:
            return self._end("stop", self._text())
        self.tokens.append(token)
        text = self._text()
        for stop in self.request.stop:
            at = text.find(stop)
            if at >= 0:
                return self._end("stop", text[:at])
        if len(self.tokens) >= self.request.max_tokens:
            return self._end("length", text)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its next token
            return None
        ready = text[: len(text) - self.hold] if self.hold else text
        if len(ready) > len(self.sent) and ready.startswith(self.sent):
            self.handle.send(ready[len(self.sent) :])
            self.sent = ready
        return None

    def _text(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True)

    def _end(self, reason: str, text: str) -> None:
        self.done = True
        if reason != "cancelled" and len(text) > len(self.sent) and text.startswith(self.sent):
            self.handle.send(text[len(self.sent) :])
        self.handle.finish(
            Completion(
                text=text,
                finish_reason=reason,
                prompt_tokens=len(self.request.prompt_ids),
                completion_tokens=len(self.tokens),
                batch_size=self.batch_size,
                queue_seconds=self.queue_seconds,
            )
        )


class _BatchProgress:
    """A ``StoppingCriteria``: after every decode step, feed each unfinished row its new token; returns the
    per-row ``[batch]`` bool tensor of finished rows (``generate`` pads them and stops when all are)."""

    def __init__(self, rows: Sequence[_Row]):
        self.rows = rows

    def __call__(self, input_ids: torch.Tensor, scores: Any = None, **kwargs: Any) -> torch.Tensor:
        tokens = input_ids[:, -1].tolist()
        for row, token in zip(self.rows, tokens):
            if not row.done:
                row.step(token)
        return torch.tensor([row.done for row in self.rows], dtype=torch.bool, device=input_ids.device)

    def finish_all(self) -> None:
        """Rows still open when ``generate`` returned (its own limits) end with what they have."""
        for row in self.rows:
            if not row.done:
                row._end("length", row._text())


class Scheduler:
    """The batching loop (one thread) over an ``Engine``'s model.

    Args:
        run_batch: called on the scheduler thread with a list of ``RequestHandle``s to decode together.
        max_batch_size: requests per batch at most.
        max_wait_ms: a batch closes once this long has passed without a new request arriving (each arrival,
            queued or still being prepared, keeps the window open another ``max_wait_ms``).
        max_prepare_wait_ms: the window never stays open longer than this from the batch's first request; up to
            it, a batch also waits for requests the server has already received but is still preparing
            (``preparing()``: parsing, tokenizing, retrieving), so a burst of clients that trickles in over more
            than ``max_wait_ms`` lands in one batch instead of trailing into the next.
        metrics: queue depth is exported here.
    """

    def __init__(
        self,
        run_batch: Callable[[list[RequestHandle]], None],
        *,
        max_batch_size: int,
        max_wait_ms: float,
        max_prepare_wait_ms: float = 0.0,
        metrics: ServiceMetrics,
    ):
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.max_prepare_wait = max(max_prepare_wait_ms, max_wait_ms) / 1000.0
        self.metrics = metrics
        self._preparing = 0
        self._last_arrival = 0.0  # perf_counter of the latest submit() or preparing() entry
        self._pending: deque[RequestHandle] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="lora-retriever-scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the running batch; queued requests fail with a clear error."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        while self._pending:
            self._pending.popleft().fail(RuntimeError("the server is shutting down; retry later"))

    @property
    def depth(self) -> int:
        return len(self._pending)

    @contextlib.contextmanager
    def preparing(self) -> Iterator[None]:
        """Mark one received request as being prepared until it is submitted (or refused)."""
        with self._cond:
            self._preparing += 1
            self._last_arrival = time.perf_counter()
            self._cond.notify_all()
        try:
            yield
        finally:
            with self._cond:
                self._preparing -= 1
                self._cond.notify_all()

    def submit(self, handle: RequestHandle) -> None:
        with self._cond:
            if self._stopping:
                raise RuntimeError("the server is shutting down; retry later")
            self._pending.append(handle)
            self._last_arrival = time.perf_counter()
            self.metrics.queue_depth.set(len(self._pending))
            self._cond.notify_all()

    def requeue(self, handles: Sequence[RequestHandle]) -> None:
        """Put ``handles`` back at the front of the queue, in order (they run in the next batch)."""
        with self._cond:
            self._pending.extendleft(reversed(list(handles)))
            self.metrics.queue_depth.set(len(self._pending))
            self._cond.notify_all()

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self.run_batch(batch)
            except BaseException as err:  # never let the loop die: fail what is still open
                logger.exception("batch of %d request(s) failed", len(batch))
                for handle in batch:
                    if not handle.finished:
                        handle.fail(err)

    def _next_batch(self) -> list[RequestHandle] | None:
        """Block for the first request, then gather compatible ones until full or the window closes.

        The window closes ``max_wait`` after the latest arrival, or ``max_prepare_wait`` after the first request,
        whichever comes first; while a received request is still being prepared it stays open to the latter.
        """
        with self._cond:
            while not self._pending and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            first = self._pending.popleft()
            batch = [first]
            key = first.request.batch_key()
            start = time.perf_counter()
            last_call = start + self.max_prepare_wait
            while len(batch) < self.max_batch_size:
                batch.extend(self._take_compatible(key, self.max_batch_size - len(batch)))
                now = time.perf_counter()
                # A burst keeps the window open: max_wait after the latest arrival (never before max_wait after
                # the first), longer for requests already received and still being prepared; never past last_call.
                quiet_until = max(start, self._last_arrival) + self.max_wait
                until = last_call if self._preparing else min(quiet_until, last_call)
                if len(batch) >= self.max_batch_size or now >= until or self._stopping:
                    break
                self._cond.wait(until - now)
            self.metrics.queue_depth.set(len(self._pending))
            return batch

    def _take_compatible(self, key: tuple, limit: int) -> list[RequestHandle]:
        taken, kept = [], deque()
        while self._pending:
            handle = self._pending.popleft()
            if len(taken) < limit and handle.request.batch_key() == key:
                taken.append(handle)
            else:
                kept.append(handle)
        self._pending = kept
        return taken


def decode_batch(
    model: Any,
    tokenizer: Any,
    handles: Sequence[RequestHandle],
    adapter_order: Sequence[str],
    metrics: ServiceMetrics,
) -> None:
    """Run ``handles`` as one mixture batch on ``model`` (a ``SwiftModel`` whose adapters are loaded).

    Args:
        adapter_order: a global order of adapter names (the pool's), so that a request's adapters keep the
            same relative order in every batch it could be part of.

    Raises:
        whatever ``generate`` raises (the caller isolates it).
    """
    from transformers import GenerationConfig, StoppingCriteriaList

    requests = [h.request for h in handles]
    started = time.perf_counter()
    eos = model.generation_config.eos_token_id if getattr(model, "generation_config", None) else None
    eos_ids = {eos} if isinstance(eos, int) else set(eos or ())
    if tokenizer.eos_token_id is not None:
        eos_ids.add(tokenizer.eos_token_id)
    rows = [_Row(h, tokenizer, eos_ids, len(handles), started) for h in handles]
    for row in rows:
        metrics.queue_wait.observe(row.queue_seconds)
    metrics.batch_size.observe(len(handles))
    used = {a.name for r in requests for a in r.adapters}
    order = [n for n in adapter_order if n in used] + sorted(used - set(adapter_order))
    routing = routing_from_selections([r.adapters for r in requests], order)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos_ids), 0)
    width = max(len(r.prompt_ids) for r in requests)
    input_ids = torch.full((len(requests), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(requests), width), dtype=torch.long)
    for i, r in enumerate(requests):  # left padding: every row continues from its last prompt token
        input_ids[i, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids, dtype=torch.long)
        attention_mask[i, width - len(r.prompt_ids) :] = 1
    first = requests[0]
    sample = first.temperature > 0
    config = GenerationConfig(
        max_new_tokens=max(r.max_tokens for r in requests),
        do_sample=sample,
        temperature=first.temperature if sample else None,
        top_p=first.top_p if sample else None,
        top_k=None,
        pad_token_id=pad,
        eos_token_id=sorted(eos_ids) or None,
    )
    progress = _BatchProgress(rows)
    device = next(model.parameters()).device
    with torch.inference_mode(), model.mixture(routing):
        if first.seed is not None:
            torch.manual_seed(first.seed)
        model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            generation_config=config,
            stopping_criteria=StoppingCriteriaList([progress]),
        )
    progress.finish_all()
    seconds = time.perf_counter() - started
    new_tokens = sum(len(row.tokens) for row in rows)
    metrics.batch_seconds.observe(seconds)
    metrics.generated_tokens.inc(new_tokens)
    metrics.prompt_tokens.inc(sum(len(r.prompt_ids) for r in requests))
    if seconds > 0:
        metrics.tokens_per_second.set(new_tokens / seconds)
