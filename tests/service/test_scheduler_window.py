"""The batching window on its own (no model): a burst that trickles in stays one batch, a quiet gap closes the
window, and a steady stream cannot hold a batch open past ``max_prepare_wait_ms``."""

from __future__ import annotations

import asyncio
import threading
import time

from lora_retriever.service.metrics import ServiceMetrics
from lora_retriever.service.scheduler import GenerationRequest, RequestHandle, Scheduler


def _handle(loop, token=1):
    return RequestHandle(GenerationRequest(prompt_ids=[token], adapters=[], max_tokens=1), loop)


def _run(arrival_gaps_s, *, max_wait_ms, max_prepare_wait_ms, max_batch_size=64, batch_cost_s=0.0):
    """Submit one request after each gap; return the batch sizes the scheduler formed."""
    sizes, done = [], threading.Event()
    total = len(arrival_gaps_s)

    def run_batch(batch):
        sizes.append(len(batch))
        time.sleep(batch_cost_s)
        if sum(sizes) == total:
            done.set()

    scheduler = Scheduler(
        run_batch,
        max_batch_size=max_batch_size,
        max_wait_ms=max_wait_ms,
        max_prepare_wait_ms=max_prepare_wait_ms,
        metrics=ServiceMetrics(),
    )
    scheduler.start()
    loop = asyncio.new_event_loop()
    try:
        for gap in arrival_gaps_s:
            time.sleep(gap)
            scheduler.submit(_handle(loop))
        assert done.wait(10), sizes
    finally:
        scheduler.stop()
        loop.close()
    return sizes


def test_a_burst_arriving_over_more_than_max_wait_is_one_batch():
    # 12 requests 10 ms apart span 110 ms, over twice max_wait: each arrival keeps the window open (a sleep
    # may overshoot by up to 40 ms on a loaded machine before the burst would split).
    assert _run([0.0] + [0.01] * 11, max_wait_ms=50, max_prepare_wait_ms=2000) == [12]


def test_a_quiet_gap_longer_than_max_wait_closes_the_batch():
    assert _run([0.0, 0.01, 0.01, 0.6, 0.01], max_wait_ms=50, max_prepare_wait_ms=2000) == [3, 2]


def test_a_steady_stream_cannot_hold_a_batch_open_past_max_prepare_wait():
    # 40 requests 10 ms apart (0.4 s) against a 100 ms cap: the first batch closes at ~100 ms, well before the end.
    sizes = _run([0.0] + [0.01] * 39, max_wait_ms=30, max_prepare_wait_ms=100)
    assert sum(sizes) == 40 and len(sizes) >= 3, sizes
    assert sizes[0] <= 20, sizes


def test_preparing_requests_hold_the_window_until_submitted():
    sizes, done = [], threading.Event()
    scheduler = Scheduler(
        lambda batch: (sizes.append(len(batch)), done.set()),
        max_batch_size=8,
        max_wait_ms=10,
        max_prepare_wait_ms=2000,
        metrics=ServiceMetrics(),
    )
    scheduler.start()
    loop = asyncio.new_event_loop()
    try:
        with scheduler.preparing():  # received, still being tokenized: 200 ms, twenty times max_wait
            scheduler.submit(_handle(loop))
            time.sleep(0.2)
            scheduler.submit(_handle(loop, 2))
        assert done.wait(5)
    finally:
        scheduler.stop()
        loop.close()
    assert sizes == [2]
