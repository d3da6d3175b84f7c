"""Jobs: training and evaluation in worker processes, persisted in SQLite, surviving a server restart.

``JobStore`` keeps every job in ``<data_dir>/jobs.sqlite`` (id, kind, state, parameters, progress, metrics,
error, log path, timestamps). ``JobRunner`` runs queued jobs, ``max_workers`` at a time, each in a fresh
``spawn`` process (serving never waits on training: the model the server holds is not touched) with one torch
thread, its console output in ``<data_dir>/jobs/<id>/job.log``. The child reports progress by rewriting
``progress.json`` (atomically) and its result in ``result.json``; the runner polls them into the store.

States: ``queued`` -> ``running`` -> ``succeeded`` | ``failed`` | ``cancelled``. A job that was ``running``
when the server died is marked ``failed`` at the next start, with its log kept; a training job is resumable
from its last checkpoint (``POST /jobs/{id}/resume`` queues a new job with ``resume_from``).

Job kinds (``JOB_KINDS``): ``train`` (``lora_retriever.training.train``; the adapter is written under
``<data_dir>/adapters/<name>`` and registered, with its key, in the service's pool config only when training
finished — the one pool writer makes that atomic) and ``evaluate`` (``pipeline.run_inference`` on a test file
over the served pools; its predictions and metrics under the job's folder).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lora_retriever.service.errors import ServiceError
from swift.utils import get_logger
from swift.utils.files import atomic_write

logger = get_logger(__name__)

__all__ = ["JOB_KINDS", "JOB_STATES", "JobRunner", "JobStore"]

JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
FINAL_STATES = ("succeeded", "failed", "cancelled")
LOG_TAIL_BYTES = 4000
POLL_SECONDS = 0.5
_COLUMNS = (
    "id",
    "kind",
    "state",
    "params",
    "progress",
    "metrics",
    "error",
    "log_path",
    "created",
    "started",
    "finished",
)


class JobStore:
    """The jobs of one data directory, in SQLite (one connection per call: safe from any thread)."""

    def __init__(self, data_dir: str | Path):
        self.root = Path(data_dir).expanduser().absolute()
        self.jobs_dir = self.root / "jobs"
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.root / "jobs.sqlite"
        with self._connect() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, kind TEXT NOT NULL, state TEXT NOT NULL, "
                "params TEXT NOT NULL, progress TEXT, metrics TEXT, error TEXT, log_path TEXT, created REAL, "
                "started REAL, finished REAL)"
            )

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30)
        db.row_factory = sqlite3.Row
        return db

    def create(self, kind: str, params: dict[str, Any]) -> dict[str, Any]:
        job_id = uuid.uuid4().hex[:12]
        log = self.jobs_dir / job_id / "job.log"
        with self._connect() as db:
            db.execute(
                "INSERT INTO jobs (id, kind, state, params, log_path, created) VALUES (?, ?, 'queued', ?, ?, ?)",
                (job_id, kind, json.dumps(params), str(log), time.time()),
            )
        return self.get(job_id)

    def update(self, job_id: str, **fields: Any) -> None:
        unknown = set(fields) - set(_COLUMNS)
        if unknown:
            raise ValueError(f"unknown job field(s) {sorted(unknown)}")
        values = [json.dumps(v) if k in ("params", "progress", "metrics") else v for k, v in fields.items()]
        with self._connect() as db:
            db.execute(
                f"UPDATE jobs SET {', '.join(f'{k} = ?' for k in fields)} WHERE id = ?", (*values, job_id)
            )

    def get(self, job_id: str) -> dict[str, Any] | None:
        with self._connect() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else _job(row)

    def list(self, state: str | None = None) -> list[dict[str, Any]]:
        with self._connect() as db:
            if state is None:
                rows = db.execute("SELECT * FROM jobs ORDER BY created").fetchall()
            else:
                rows = db.execute("SELECT * FROM jobs WHERE state = ? ORDER BY created", (state,)).fetchall()
        return [_job(row) for row in rows]

    def mark_interrupted(self) -> list[str]:
        """Jobs left ``running`` by a server that died: ``failed``, with a note and their log kept."""
        ids = [job["id"] for job in self.list("running")]
        for job_id in ids:
            self.update(
                job_id,
                state="failed",
                error="the server stopped while this job was running; see its log (a training resumes from its "
                "last checkpoint with POST /jobs/{id}/resume)",
                finished=time.time(),
            )
        if ids:
            logger.warning(
                "marked %d job(s) that were running when the server stopped as failed: %s", len(ids), ids
            )
        return ids

    def job_dir(self, job_id: str) -> Path:
        return self.jobs_dir / job_id


def _job(row: sqlite3.Row) -> dict[str, Any]:
    job = {k: row[k] for k in _COLUMNS}
    for key in ("params", "progress", "metrics"):
        job[key] = json.loads(job[key]) if job[key] else None
    return job


def log_tail(path: str | Path, size: int = LOG_TAIL_BYTES) -> str:
    """The last ``size`` bytes of a log ("" if it doesn't exist yet)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - size))
            return f.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""


# -- the worker side -----------------------------------------------------------------------------------------


def _progress_writer(job_dir: Path) -> Callable[[dict[str, Any]], None]:
    def write(progress: dict[str, Any]) -> None:
        atomic_write(job_dir / "progress.json", json.dumps(progress))

    return write


def run_train(
    params: dict[str, Any], job_dir: Path, report: Callable[[dict[str, Any]], None]
) -> dict[str, Any]:
    from lora_retriever.training import TrainConfig, train

    config = TrainConfig.from_dict(params)
    total = config.max_steps

    def on_step(step: int, loss: float) -> None:
        report({"step": step, "total_steps": total, "loss": loss})

    return train(config, on_step=on_step)


def run_evaluate(
    params: dict[str, Any], job_dir: Path, report: Callable[[dict[str, Any]], None]
) -> dict[str, Any]:
    from lora_retriever.pipeline import InferenceConfig, run_inference

    report({"stage": "inference"})
    metrics = run_inference(InferenceConfig(**params, output_dir=str(job_dir / "evaluation")))
    return {"overall": metrics.get("overall"), "per_task": metrics.get("per_task"), "run": metrics.get("run")}


#: kind -> ``"module:function"`` a worker process runs as ``function(params, job_dir, report) -> metrics``
#: (``report(progress_dict)`` publishes progress). ``JobRunner(kinds=...)`` adds kinds.
JOB_KINDS: dict[str, str] = {
    "train": "lora_retriever.service.jobs:run_train",
    "evaluate": "lora_retriever.service.jobs:run_evaluate",
}


def _resolve(target: str) -> Callable[..., dict[str, Any]]:
    import importlib

    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _worker_main(target: str, params: dict[str, Any], job_dir: str, log: str) -> None:
    """Entry of a job process: output to the job's log, one torch thread, result to ``result.json``."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    import torch

    from lora_retriever.cli.errors import configure_logging

    configure_logging()
    torch.set_num_threads(1)
    folder = Path(job_dir)
    metrics = _resolve(target)(params, folder, _progress_writer(folder))
    atomic_write(folder / "result.json", json.dumps(metrics, default=str))


# -- requests -> job parameters (validated before anything is queued) ------------------------------------------


def training_params(engine: Any, body: Any) -> dict[str, Any]:
    """``TrainConfig`` fields of a ``POST /train``: the adapter goes to ``<data_dir>/adapters/<name>`` and is
    registered in the service's pool config when training finishes.

    Raises:
        ServiceError: a bad or taken name, a missing dataset, an output folder in use, invalid settings.
    """
    from lora_retriever.service.admin import check_new_name
    from lora_retriever.training import TrainConfig

    check_new_name(engine, body.adapter_name)
    dataset = Path(body.dataset_path).expanduser()
    if not dataset.is_absolute() or not dataset.is_file():
        raise ServiceError(
            f"dataset_path must be an existing file on the server, got {body.dataset_path!r}",
            param="dataset_path",
        )
    out = Path(engine.config.data_dir).expanduser().absolute() / "adapters" / body.adapter_name
    if out.exists() and any(out.iterdir()):
        raise ServiceError(
            f"{out} already holds files (an earlier training of {body.adapter_name!r}?); choose another name "
            "or resume that job",
            status=409,
            param="adapter_name",
        )
    params = {
        "dataset_path": str(dataset),
        "output_dir": str(out),
        "adapter_name": body.adapter_name,
        "model_type": engine.config.model_type,
        "model_path": engine.config.model_path,
        "max_steps": body.max_steps,
        "lora_r": body.lora_r,
        "lora_alpha": body.lora_alpha,
        "learning_rate": body.learning_rate,
        "batch_size": body.batch_size,
        "max_length": body.max_length,
        "target_modules": list(body.target_modules),
        "quantization": body.quantization,
        "save_steps": body.save_steps,
        "seed": body.seed,
        "register_pool": str(engine.config.registry_config),
        "description": body.description or None,
        "progress": False,
    }
    try:
        TrainConfig.from_dict(params)
    except (TypeError, ValueError) as err:
        raise ServiceError(f"invalid training settings: {err}", param="body") from err
    return params


def evaluation_params(engine: Any, body: Any) -> dict[str, Any]:
    """``InferenceConfig`` fields of a ``POST /evaluate`` over the served pools (output: the job's folder).

    Raises:
        ServiceError: a missing test file or invalid settings.
    """
    from lora_retriever.pipeline import InferenceConfig

    test = Path(body.test_data).expanduser()
    if not test.is_absolute() or not test.is_file():
        raise ServiceError(
            f"test_data must be an existing file on the server, got {body.test_data!r}", param="test_data"
        )
    params = {
        "test_data": str(test),
        "pools": [str(p) for p in engine.pool_sources()],
        "model_type": engine.config.model_type,
        "model_path": engine.config.model_path,
        "merge_method": body.merge_method,
        "top_k": body.top_k,
        "num_samples": body.num_samples,
        "max_new_tokens": body.max_new_tokens,
        "batch_size": body.batch_size,
        "progress": False,
    }
    try:
        InferenceConfig(**params, output_dir="(the job's folder)")
    except (TypeError, ValueError) as err:
        raise ServiceError(f"invalid evaluation settings: {err}", param="body") from err
    return params


def resume_params(job: dict[str, Any]) -> dict[str, Any]:
    """A failed or cancelled training job's parameters, resuming from its last checkpoint.

    Raises:
        ServiceError: not a training job, not stopped, or no checkpoint saved.
    """
    from lora_retriever.training.checkpoint import find_latest_checkpoint

    if job["kind"] != "train" or job["state"] not in ("failed", "cancelled"):
        raise ServiceError(
            f"job {job['id']} is a {job['state']} {job['kind']} job; only failed or cancelled trainings resume",
            status=409,
            param="job_id",
        )
    checkpoint = find_latest_checkpoint(job["params"]["output_dir"])
    if checkpoint is None:
        raise ServiceError(
            f"job {job['id']} saved no checkpoint in {job['params']['output_dir']}; start a new training",
            status=409,
            param="job_id",
        )
    return {**job["params"], "resume_from": str(checkpoint)}


# -- the runner ----------------------------------------------------------------------------------------------


class JobRunner:
    """Starts queued jobs in worker processes and follows them (a daemon thread).

    Args:
        store: the job store (jobs left running by a dead server are marked failed here).
        max_workers: jobs running at once.
        on_finished: called with the job after it succeeded (e.g. reload the served pool).
        kinds: more job kinds, ``{kind: "module:function"}`` (see ``JOB_KINDS``).
    """

    def __init__(
        self,
        store: JobStore,
        *,
        max_workers: int = 1,
        on_finished: Callable[[dict[str, Any]], None] | None = None,
        kinds: dict[str, str] | None = None,
    ):
        self.store = store
        self.kinds = {**JOB_KINDS, **(kinds or {})}
        self.max_workers = max_workers
        self.on_finished = on_finished
        self._context = multiprocessing.get_context("spawn")
        self._running: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lora-retriever-jobs", daemon=True)
        store.mark_interrupted()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop following jobs; running workers are terminated (their jobs are marked failed)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        with self._lock:
            for job_id, process in list(self._running.items()):
                process.terminate()
                process.join(5)
                self.store.update(job_id, state="failed", error="the server stopped", finished=time.time())
            self._running.clear()

    def submit(self, kind: str, params: dict[str, Any]) -> dict[str, Any]:
        if kind not in self.kinds:
            raise ValueError(f"unknown job kind {kind!r}; kinds: {sorted(self.kinds)}")
        return self.store.create(kind, params)

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel a queued or running job (a finished one is returned unchanged).

        Raises:
            KeyError: no such job.
        """
        with self._lock:
            job = self.store.get(job_id)
            if job is None:
                raise KeyError(job_id)
            if job["state"] in FINAL_STATES:
                return job
            process = self._running.pop(job_id, None)
            if process is not None:
                process.terminate()
                process.join(10)
            self.store.update(job_id, state="cancelled", finished=time.time())
        return self.store.get(job_id)

    def view(self, job_id: str) -> dict[str, Any] | None:
        """The job with its latest progress and the tail of its log."""
        job = self.store.get(job_id)
        if job is None:
            return None
        if job["state"] == "running":
            job["progress"] = _read_json(self.store.job_dir(job_id) / "progress.json") or job["progress"]
        job["log_tail"] = log_tail(job["log_path"])
        return job

    def _loop(self) -> None:
        while not self._stop.wait(POLL_SECONDS):
            try:
                self._poll()
            except Exception:  # keep following jobs whatever one of them does
                logger.exception("job runner poll failed")

    def _poll(self) -> None:
        with self._lock:
            for job_id, process in list(self._running.items()):
                if process.exitcode is None:
                    progress = _read_json(self.store.job_dir(job_id) / "progress.json")
                    if progress is not None:
                        self.store.update(job_id, progress=progress)
                    continue
                process.join()
                del self._running[job_id]
                self._finish(job_id, process.exitcode)
            queued = self.store.list("queued")
            for job in queued[: max(0, self.max_workers - len(self._running))]:
                if job["kind"] not in self.kinds:
                    self.store.update(
                        job["id"],
                        state="failed",
                        error=f"unknown job kind {job['kind']!r}",
                        finished=time.time(),
                    )
                    continue
                self._launch(job)

    def _launch(self, job: dict[str, Any]) -> None:
        folder = self.store.job_dir(job["id"])
        folder.mkdir(parents=True, exist_ok=True)
        process = self._context.Process(
            target=_worker_main,
            args=(self.kinds[job["kind"]], job["params"], str(folder), job["log_path"]),
            name=f"job-{job['id']}",
            daemon=True,
        )
        process.start()
        self._running[job["id"]] = process
        self.store.update(job["id"], state="running", started=time.time())
        logger.info("job %s (%s) started in process %d", job["id"], job["kind"], process.pid)

    def _finish(self, job_id: str, exitcode: int) -> None:
        folder = self.store.job_dir(job_id)
        result = _read_json(folder / "result.json")
        progress = _read_json(folder / "progress.json")
        if exitcode == 0 and result is not None:
            self.store.update(
                job_id, state="succeeded", metrics=result, progress=progress, finished=time.time()
            )
            job = self.store.get(job_id)
            if self.on_finished is not None:
                try:
                    self.on_finished(job)
                except Exception:
                    logger.exception("after job %s", job_id)
            return
        tail = log_tail(self.store.get(job_id)["log_path"], 600).strip().splitlines()
        self.store.update(
            job_id,
            state="failed",
            progress=progress,
            error=f"the worker exited with code {exitcode}: {tail[-1] if tail else 'no output'}",
            finished=time.time(),
        )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
