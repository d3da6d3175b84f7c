"""Training checkpoints: ``output_dir/checkpoint-<step>/`` with everything needed to resume exactly.

A checkpoint holds the adapter (PEFT format), the optimizer and scheduler state, the RNG states (Python,
NumPy, torch) and ``trainer_state.json`` (step, losses so far, the eval loss before training, the config).
It is written to a hidden temporary folder and renamed into place, so a crash mid-save never leaves a
half-written checkpoint for ``--resume_from auto`` to pick.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from swift.utils import get_logger

logger = get_logger(__name__)

__all__ = ["TrainerState", "find_latest_checkpoint", "list_checkpoints", "load_checkpoint", "save_checkpoint"]

STATE_NAME = "trainer_state.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class TrainerState:
    """Progress of a run, saved with each checkpoint.

    Attributes:
        step: optimizer steps done.
        train_losses: mean answer-token loss of each step, in order.
        eval_loss_before: eval loss of the base model (``None`` without an eval split).
        train_seconds: training time so far, summed over resumed runs.
        config: the ``TrainConfig`` as a dict.
        dataset_sha256: hash of the dataset file (a resume on changed data is warned about).
    """

    step: int = 0
    train_losses: list[float] = field(default_factory=list)
    eval_loss_before: float | None = None
    train_seconds: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)
    dataset_sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "train_losses": self.train_losses,
            "eval_loss_before": self.eval_loss_before,
            "train_seconds": self.train_seconds,
            "config": self.config,
            "dataset_sha256": self.dataset_sha256,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainerState:
        return cls(
            step=int(data["step"]),
            train_losses=[float(x) for x in data.get("train_losses", [])],
            eval_loss_before=data.get("eval_loss_before"),
            train_seconds=float(data.get("train_seconds", 0.0)),
            config=dict(data.get("config", {})),
            dataset_sha256=data.get("dataset_sha256"),
        )


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (with ``trainer_state.json``) in ``output_dir``, oldest step first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for child in output_dir.iterdir():
        match = _CHECKPOINT.match(child.name)
        if match and (child / STATE_NAME).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def find_latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The checkpoint with the highest step in ``output_dir``, or ``None``."""
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def save_checkpoint(
    output_dir: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: TrainerState,
    *,
    save_total_limit: int | None = None,
) -> Path:
    """Write ``output_dir/checkpoint-<state.step>/`` atomically; prune the oldest beyond ``save_total_limit``."""
    target = output_dir / f"checkpoint-{state.step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=output_dir))
    try:
        model.save_pretrained(str(tmp))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(_rng_state(), tmp / "rng_state.pt")
        (tmp / STATE_NAME).write_text(json.dumps(state.to_dict(), indent=2) + "\n")
        if target.exists():  # left by an earlier run we are overwriting
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("saved checkpoint %s", target)
    if save_total_limit is not None:
        for old in list_checkpoints(output_dir)[:-save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
            logger.info("removed old checkpoint %s (save_total_limit=%d)", old, save_total_limit)
    return target


def load_checkpoint(
    checkpoint: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> TrainerState:
    """Restore adapter weights, optimizer, scheduler and RNG states from ``checkpoint``; return its state.

    Call it after building the model, optimizer and scheduler exactly as the checkpointed run did.

    Raises:
        FileNotFoundError: ``checkpoint`` isn't a complete checkpoint folder.
        ValueError: the adapter weights don't fit the model (different ``lora_r`` or ``target_modules``).
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    checkpoint = Path(checkpoint)
    needed = [STATE_NAME, "adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pt"]
    missing = [name for name in needed if not (checkpoint / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{checkpoint} is not a complete training checkpoint (missing {missing}); pass a "
            "checkpoint-<step> folder written by train.py, or --resume_from auto."
        )
    weights = load_file(str(checkpoint / "adapter_model.safetensors"))
    try:
        result = set_peft_model_state_dict(model, weights)
    except RuntimeError as err:  # size mismatch
        raise ValueError(
            f"{checkpoint}: the adapter weights don't fit the model ({str(err).splitlines()[-1].strip()}); "
            "resume with the lora_r / target_modules it was trained with."
        ) from err
    missing_lora = [k for k in result.missing_keys if "lora_" in k]
    if missing_lora:
        raise ValueError(
            f"{checkpoint}: the adapter lacks {len(missing_lora)} LoRA weights of the model (e.g. {missing_lora[0]}); "
            "resume with the lora_r / target_modules it was trained with."
        )
    optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", weights_only=True))
    _set_rng_state(torch.load(checkpoint / "rng_state.pt", weights_only=True))
    return TrainerState.from_dict(json.loads((checkpoint / STATE_NAME).read_text()))


def _rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as tensors and plain values (loadable with ``weights_only=True``)."""
    version, mt_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": (version, torch.tensor(mt_state, dtype=torch.int64), gauss),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(int(x) for x in mt_state.tolist()), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
