"""Jobs: worker processes, SQLite persistence, progress, failure with log, cancel, restart, and the HTTP routes."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from lora_retriever.service.jobs import JobRunner, JobStore

KINDS = {
    "count": "tests.service.test_jobs:count_job",
    "crash": "tests.service.test_jobs:crash_job",
    "sleep": "tests.service.test_jobs:sleep_job",
}


# Job functions run in the worker processes (imported there by "module:function").
def count_job(params, job_dir: Path, report):
    for step in range(1, params["n"] + 1):
        report({"step": step, "total_steps": params["n"]})
        print(f"counted {step}", flush=True)
    (job_dir / "pid").write_text(str(os.getpid()))
    return {"total": params["n"], "parent_pid": params["parent_pid"]}


def crash_job(params, job_dir: Path, report):
    print("about to fail", flush=True)
    raise RuntimeError("this job fails on purpose")


def sleep_job(params, job_dir: Path, report):
    report({"stage": "sleeping"})
    (job_dir / "pid").write_text(str(os.getpid()))
    time.sleep(120)
    return {}


def wait_for(runner: JobRunner, job_id: str, states, timeout: float = 90.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = runner.view(job_id)
        if job["state"] in states:
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} still {runner.view(job_id)['state']} after {timeout} s")


@pytest.fixture
def runner(tmp_path):
    jobs = JobRunner(JobStore(tmp_path), max_workers=2, kinds=KINDS)
    jobs.start()
    yield jobs
    jobs.stop()


def test_jobs_run_in_worker_processes_with_progress_metrics_and_log(runner, tmp_path):
    job = runner.submit("count", {"n": 3, "parent_pid": os.getpid()})
    assert job["state"] == "queued" and job["kind"] == "count"
    done = wait_for(runner, job["id"], ("succeeded", "failed"))
    assert done["state"] == "succeeded", done
    assert done["metrics"] == {"total": 3, "parent_pid": os.getpid()}
    assert done["progress"] == {"step": 3, "total_steps": 3}
    assert "counted 3" in done["log_tail"]
    worker_pid = int((tmp_path / "jobs" / job["id"] / "pid").read_text())
    assert worker_pid != os.getpid()  # serving never runs the job itself
    # Persisted: a fresh store on the same folder reads it back.
    assert JobStore(tmp_path).get(job["id"])["metrics"]["total"] == 3


def test_a_failing_job_is_failed_with_its_log(runner):
    job = runner.submit("crash", {})
    done = wait_for(runner, job["id"], ("succeeded", "failed"))
    assert done["state"] == "failed" and "exited with code 1" in done["error"]
    assert "this job fails on purpose" in done["log_tail"] and "about to fail" in done["log_tail"]


def test_cancel_a_running_job_stops_its_process(runner, tmp_path):
    job = runner.submit("sleep", {})
    wait_for(runner, job["id"], ("running",))
    pid_file = tmp_path / "jobs" / job["id"] / "pid"
    deadline = time.monotonic() + 60
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    pid = int(pid_file.read_text())
    cancelled = runner.cancel(job["id"])
    assert cancelled["state"] == "cancelled"
    time.sleep(0.5)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert runner.cancel(job["id"])["state"] == "cancelled"  # idempotent
    with pytest.raises(KeyError):
        runner.cancel("nope")


def test_restart_marks_running_jobs_failed_and_keeps_their_log(tmp_path):
    store = JobStore(tmp_path)
    job = store.create("train", {"output_dir": str(tmp_path / "adapters" / "x")})
    Path(job["log_path"]).parent.mkdir(parents=True)
    Path(job["log_path"]).write_text("step 7 loss 0.5\n")
    store.update(job["id"], state="running", started=time.time())
    queued = store.create("count", {"n": 1, "parent_pid": 0})
    restarted = JobRunner(JobStore(tmp_path))  # the server starts again; it doesn't know "count" jobs
    failed = restarted.view(job["id"])
    assert failed["state"] == "failed" and "server stopped" in failed["error"]
    assert "step 7 loss 0.5" in failed["log_tail"]
    assert restarted.store.get(queued["id"])["state"] == "queued"
    restarted._poll()
    assert restarted.store.get(queued["id"])["state"] == "failed"  # unknown kind: failed, not retried forever


@pytest.fixture(scope="module")
def jobs_http(engine, server, tmp_path_factory):
    """A second server on the same engine, with a job runner."""
    import httpx

    from lora_retriever.service.server import ServerThread, make_job_runner

    runner = make_job_runner(engine)
    with ServerThread(engine, manage_engine=False, jobs=runner) as running:
        with httpx.Client(base_url=running.url, timeout=900) as client:
            yield client


def test_train_and_evaluate_requests_are_validated_before_queueing(jobs_http, tmp_path, engine):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"input": f"{i} + 1", "output": str(i + 1)}) + "\n" for i in range(8)))
    cases = [
        ({"adapter_name": "capitals", "dataset_path": str(data)}, 409, "name"),
        ({"adapter_name": "../x", "dataset_path": str(data)}, 400, "name"),
        ({"adapter_name": "adds", "dataset_path": "relative.jsonl"}, 400, "dataset_path"),
        ({"adapter_name": "adds", "dataset_path": str(data), "max_steps": 0}, 400, "max_steps"),
        ({"adapter_name": "adds", "dataset_path": str(data), "target_modules": []}, 400, "target_modules"),
    ]
    for body, status, param in cases:
        response = jobs_http.post("/train", json=body)
        assert response.status_code == status, (body, response.text)
        assert response.json()["error"]["param"] == param, body
    response = jobs_http.post("/evaluate", json={"test_data": str(tmp_path / "missing.jsonl")})
    assert response.status_code == 400 and response.json()["error"]["param"] == "test_data"
    response = jobs_http.post("/evaluate", json={"test_data": str(data), "merge_method": "magic"})
    assert response.status_code == 400
    assert jobs_http.get("/jobs").json() == {"jobs": []}
    assert jobs_http.get("/jobs/nope").status_code == 404
    assert jobs_http.post("/jobs/nope/cancel").status_code == 404


def test_train_job_is_queued_and_cancelled_over_http(jobs_http, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"input": f"{i} + 1", "output": str(i + 1)}) + "\n" for i in range(8)))
    job = jobs_http.post("/train", json={"adapter_name": "adds", "dataset_path": str(data), "max_steps": 2})
    assert job.status_code == 202, job.text
    job_id = job.json()["id"]
    assert job.json()["params"]["output_dir"].endswith("adapters/adds")
    assert [j["id"] for j in jobs_http.get("/jobs").json()["jobs"]] == [job_id]
    cancelled = jobs_http.post(f"/jobs/{job_id}/cancel").json()
    assert cancelled["state"] == "cancelled"
    resume = jobs_http.post(f"/jobs/{job_id}/resume")
    assert resume.status_code == 409 and "checkpoint" in resume.json()["error"]["message"]


def test_a_training_job_succeeds_and_its_adapter_is_registered_and_serves(jobs_http, tmp_path, engine):
    """End to end over HTTP: POST /train (the served SmolLM2, 3 steps) -> the worker process trains -> the job
    is ``succeeded`` with its progress and metrics -> the adapter is registered with a retrieval key, served by
    name and retrieved for its task. Runs last in this module (the tests above expect only their own jobs)."""
    data = tmp_path / "sums.jsonl"
    rows = [{"input": f"What is {i} + {i + 2}?", "output": str(2 * i + 2)} for i in range(20)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    body = {
        "adapter_name": "sums",
        "dataset_path": str(data),
        "max_steps": 3,
        "batch_size": 2,
        "max_length": 96,
        "lora_r": 4,
        "target_modules": ["q_proj", "v_proj"],
        "save_steps": 0,
        "description": "adds two numbers",
    }
    submitted = jobs_http.post("/train", json=body)
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["id"]
    deadline = time.monotonic() + 900
    job = submitted.json()
    while job["state"] in ("queued", "running") and time.monotonic() < deadline:
        time.sleep(1.0)
        job = jobs_http.get(f"/jobs/{job_id}").json()
    assert job["state"] == "succeeded", (job["state"], job.get("error"), job.get("log_tail"))
    try:
        assert job["progress"]["step"] == job["progress"]["total_steps"] == 3
        metrics = job["metrics"]
        assert (
            metrics["steps"] == 3 and len(metrics["train_losses"]) == 3 and metrics["adapter_name"] == "sums"
        )
        assert metrics["pool_entry"]["lora_name"] == "sums"
        out = Path(engine.config.data_dir).resolve() / "adapters" / "sums"
        assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
        adapters = {a["name"]: a for a in jobs_http.get("/adapters").json()["adapters"]}
        assert adapters["sums"]["registered"] and adapters["sums"]["description"] == "adds two numbers"
        answer = jobs_http.post(
            "/v1/chat/completions",
            json={
                "model": "sums",
                "messages": [{"role": "user", "content": "What is 5 + 7?"}],
                "max_tokens": 3,
            },
        )
        assert answer.status_code == 200, answer.text
        assert [a["name"] for a in answer.json()["adapters"]] == ["sums"]
        assert answer.json()["usage"]["completion_tokens"] >= 1
        found = jobs_http.post("/retrieve", json={"input": "What is 8 + 10?", "top_k": 4}).json()["results"][
            0
        ]
        assert "sums" in [a["name"] for a in found["adapters"]]
    finally:
        jobs_http.delete("/adapters/sums")
    assert "sums" not in engine.pool
