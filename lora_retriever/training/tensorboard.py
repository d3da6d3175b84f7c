"""TensorBoard event files of a training run (``<output_dir>/tensorboard``), so ``tensorboard --logdir`` works.

The trainer writes ``train/loss``, ``train/learning_rate`` and ``train/grad_norm`` every optimizer step and
``eval/loss`` / ``eval/perplexity`` before and after training (steps 0 and last); the service's dashboard reads
the same files back (``read_scalars``) to draw its curves. Writing needs the ``tensorboard`` package (the
``[train]`` extra); without it training goes on and says once that no event files are written.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from swift.utils import get_logger

logger = get_logger(__name__)

__all__ = ["TENSORBOARD_DIR", "ScalarWriter", "read_scalars"]

#: The event files' folder inside a training run's ``output_dir``.
TENSORBOARD_DIR = "tensorboard"
_INSTALL = "pip install tensorboard (or the [train] extra)"


class ScalarWriter:
    """Scalars of one run into TensorBoard event files under ``folder``, flushed at every ``add`` (a reader sees
    a live run). ``purge_step``: the first step a resumed run writes again; TensorBoard's reader drops the older
    events from that step on, so the curve has no doubled segment."""

    def __init__(self, folder: str | Path, *, purge_step: int | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            logger.warning("tensorboard is not installed: no event files for this run (%s)", _INSTALL)
            self._writer = None
            return
        self._writer = SummaryWriter(log_dir=str(folder), purge_step=purge_step or None)

    def add(self, step: int, scalars: dict[str, float | None]) -> None:
        """Write each finite value of ``scalars`` (``tag -> value``) at ``step``."""
        if self._writer is None:
            return
        for tag, value in scalars.items():
            if value is not None and math.isfinite(value):
                self._writer.add_scalar(tag, value, step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def read_scalars(folder: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in the event files under ``folder``: ``tag -> [(step, value), ...]`` by step (``{}``
    when there are none yet).

    Raises:
        ImportError: the ``tensorboard`` package is missing.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError as err:
        raise ImportError(f"reading TensorBoard event files needs tensorboard: {_INSTALL}") from err
    accumulator: Any = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {
        tag: sorted((int(e.step), float(e.value)) for e in accumulator.Scalars(tag))
        for tag in accumulator.Tags()["scalars"]
    }
