"""Training writes TensorBoard event files (``<output_dir>/tensorboard``) that say what ``metrics.json`` says.

The event files are read back with TensorBoard's own loader (``EventFileLoader``, raw events), independently of
``lora_retriever.training.tensorboard.read_scalars``, which is checked against it. Tiny random Llama (hidden 64).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from lora_retriever.training import TrainConfig, train
from lora_retriever.training.tensorboard import TENSORBOARD_DIR, read_scalars
from lora_retriever.training.trainer import linear_schedule
from tests.test_train import llama_dir, memo_json, tiny_config  # noqa: F401  (fixtures shared with test_train)

pytest.importorskip("tensorboard", reason="tensorboard is in the [train] extra")


def config(llama_dir: Path, dataset: Path, out: Path, **overrides) -> TrainConfig:  # noqa: F811
    settings = dict(max_steps=6, batch_size=2, eval_split=0.25, warmup_ratio=0.34)
    return tiny_config(llama_dir, dataset, out, **{**settings, **overrides})


def raw_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar event of every event file, in file order (no purge, no dedup): what is on disk."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                number = value.simple_value if value.HasField("simple_value") else None
                if number is None:  # torch writes scalars as tensors in newer versions
                    from tensorboard.util import tensor_util

                    number = float(tensor_util.make_ndarray(value.tensor))
                out.setdefault(value.tag, []).append((event.step, number))
    return out


def test_training_writes_loss_learning_rate_and_eval_curves(llama_dir, memo_json, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    metrics = train(config(llama_dir, memo_json, out))
    folder = out / TENSORBOARD_DIR
    raw = raw_scalars(folder)

    losses = raw["train/loss"]
    assert [s for s, _ in losses] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in losses] == pytest.approx(metrics["train_losses"], rel=1e-6)
    factor = linear_schedule(math.ceil(0.34 * 6), 6)
    lrs = [v for _, v in raw["train/learning_rate"]]
    assert lrs == pytest.approx([1e-2 * factor(s) for s in range(6)], rel=1e-6)
    assert len(raw["train/grad_norm"]) == 6 and all(v > 0 for _, v in raw["train/grad_norm"])
    assert raw["eval/loss"] == [
        (0, pytest.approx(metrics["eval_loss_before"], rel=1e-6)),
        (6, pytest.approx(metrics["eval_loss_after"], rel=1e-6)),
    ]
    assert [v for _, v in raw["eval/perplexity"]] == pytest.approx(
        [metrics["eval_perplexity_before"], metrics["eval_perplexity_after"]], rel=1e-5
    )
    # The dashboard's reader returns the same series.
    read = read_scalars(folder)
    assert set(read) == set(raw)
    for tag, points in raw.items():
        assert read[tag] == [(s, pytest.approx(v, rel=1e-6)) for s, v in points]


class _Crash(Exception):
    pass


def test_a_resumed_run_continues_its_curve_without_doubled_steps(llama_dir, memo_json, tmp_path):  # noqa: F811
    full = train(config(llama_dir, memo_json, tmp_path / "full", save_steps=3))

    def crash_after_step_4(step: int, loss: float) -> None:
        if step == 4:
            raise _Crash("simulated crash after step 4 (its checkpoint is step 3)")

    part = tmp_path / "part"
    with pytest.raises(_Crash):
        train(config(llama_dir, memo_json, part, save_steps=3), on_step=crash_after_step_4)
    assert [s for s, _ in read_scalars(part / TENSORBOARD_DIR)["train/loss"]] == [1, 2, 3, 4]
    train(config(llama_dir, memo_json, part, save_steps=3, resume_from="auto"))
    # On disk step 4 appears twice (before the crash and after the resume) ...
    assert [s for s, _ in raw_scalars(part / TENSORBOARD_DIR)["train/loss"]].count(4) == 2
    # ... and the reader (TensorBoard's purge of a restarted session) keeps one curve equal to the full run's.
    resumed = read_scalars(part / TENSORBOARD_DIR)["train/loss"]
    assert [s for s, _ in resumed] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in resumed] == pytest.approx(full["train_losses"], abs=1e-6)
