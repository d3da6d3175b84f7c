"""``mount_dashboard``: the dashboard's static files at ``/ui/`` and the JSON routes its pages need beyond the API.

================================ ==========================================================================
``GET /``                        redirects to ``/ui/`` (a person who opens the server's address sees the pages)
``GET /ui/api/auth``             whether the server checks API keys (open: the pages ask it first)
``GET /ui/api/info``             what the pages offer: model, methods, fusion methods, limits, job kinds
``GET /ui/api/pool``             every adapter with its metadata (rank, targets, base model, task/category,
                                 source) and a 2-D PCA map of the retrieval keys
``POST /ui/api/similarities``    one input's similarity to every adapter and its top-k with weights
``POST /ui/api/fusion``          an answer from the top-k merged into one adapter (the paper's "fusion")
``GET/POST /ui/api/datasets``    training files in ``<data_dir>/datasets`` / upload one (admin)
``POST /ui/api/protocol``        queue the paper's protocol (``lora-retriever-eval``) as a job (admin)
``GET /ui/api/jobs/{id}/curves`` a training job's TensorBoard scalars (loss, learning rate, eval loss)
``GET /ui/api/jobs/{id}/protocol`` a protocol job's results (``results.json``, ``table.md``; ``.png``: plot)
================================ ==========================================================================

Retrieval and generation go through the engine (``Engine.resolve_adapters``, the retriever it holds, and the
library's ``FusionComposer``): nothing here re-implements them. The same scope dependencies guard these routes as
the API's (``read`` / ``admin``); the static files hold no data and are open.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.routing import APIRouter
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from lora_retriever.selection import SELECTION_METHODS
from lora_retriever.service.dashboard.protocol import KIND as PROTOCOL_KIND
from lora_retriever.service.dashboard.protocol import (
    ProtocolRequest,
    protocol_file,
    protocol_params,
    run_protocol,
)
from lora_retriever.service.errors import ServiceError
from swift.utils import get_logger

logger = get_logger(__name__)

__all__ = ["DASHBOARD_PATH", "mount_dashboard"]

DASHBOARD_PATH = "/ui"
API = f"{DASHBOARD_PATH}/api"
STATIC_DIR = Path(__file__).parent / "static"
#: The ways the Try page composes the retrieved adapters: ``lora_retriever.selection``'s methods that need
#: neither the input's own task (oracle) nor the whole pool (uniform_all).
COMPOSE_METHODS = tuple(m for m, picks in SELECTION_METHODS.items() if picks in ("none", "top1", "topk"))
DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}\.(json|jsonl)$")
MAX_TEXT = 100_000


class SimilarityRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: str = Field(min_length=1, max_length=MAX_TEXT)
    image: str | None = Field(default=None, description="an image as a data: URL (base64 PNG or JPEG)")
    top_k: int | None = Field(default=None, ge=1)
    weight_mode: str | None = None


class FusionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: str = Field(min_length=1, max_length=MAX_TEXT)
    fusion_method: str = "linear"
    top_k: int | None = Field(default=None, ge=1)
    max_tokens: int | None = Field(default=None, ge=1)


def mount_dashboard(
    app: FastAPI,
    engine: Any,
    jobs: Any | None,
    *,
    auth: bool = False,
    read: list[Any] | None = None,
    admin: list[Any] | None = None,
) -> None:
    """Serve the dashboard on ``app``: the JSON routes (guarded by the ``read`` / ``admin`` dependency lists the
    API's own routes use), the static pages at ``/ui/`` and a redirect from ``/``. ``auth``: whether the server
    checks API keys (the pages then ask for one first). Registers the ``protocol`` job kind with ``jobs``."""
    read, admin = list(read or []), list(admin or [])
    if jobs is not None:
        jobs.kinds.setdefault(PROTOCOL_KIND, f"{run_protocol.__module__}:{run_protocol.__name__}")
    router = APIRouter(prefix=API, tags=["dashboard"])

    def runner() -> Any:
        if jobs is None:
            raise ServiceError("this server runs no jobs (started without a job runner)", status=404)
        return jobs

    def job(job_id: str) -> dict[str, Any]:
        found = runner().store.get(job_id)
        if found is None:
            raise ServiceError(f"no job {job_id!r}", status=404, param="job_id")
        return found

    @router.get("/auth")
    async def auth_required():
        """Open: whether the pages must ask for an API key before anything else."""
        return {"auth": auth}

    @router.get("/info", dependencies=read)
    async def info():
        return dashboard_info(engine, jobs is not None)

    @router.get("/pool", dependencies=read)
    async def pool():
        return await run_in_threadpool(pool_view, engine)

    @router.post("/similarities", dependencies=read)
    async def similarities(body: SimilarityRequest):
        return await run_in_threadpool(
            input_similarities, engine, body.input, body.image, body.top_k, body.weight_mode
        )

    @router.post("/fusion", dependencies=read)
    async def fusion(body: FusionRequest):
        return await run_in_threadpool(fused_answer, engine, body)

    @router.get("/datasets", dependencies=read)
    async def datasets():
        return {"folder": str(datasets_dir(engine)), "datasets": list_datasets(engine)}

    @router.post("/datasets", status_code=201, dependencies=admin)
    async def upload_dataset(request: Request, name: str):
        data = await request.body()
        return {"dataset": await run_in_threadpool(save_dataset, engine, name, data)}

    @router.post("/protocol", status_code=202, dependencies=admin)
    async def protocol(body: ProtocolRequest):
        params = await run_in_threadpool(protocol_params, engine, body, _multimodal_pools_built())
        return runner().submit(PROTOCOL_KIND, params)

    @router.get("/jobs/{job_id}/curves", dependencies=read)
    async def curves(job_id: str):
        return await run_in_threadpool(training_curves, job(job_id))

    @router.get("/jobs/{job_id}/protocol", dependencies=read)
    async def protocol_result(job_id: str):
        found = job(job_id)
        folder = runner().store.job_dir(job_id)
        return {
            "results": json.loads(protocol_file(folder, found, "results.json").read_text()),
            "table": protocol_file(folder, found, "table.md").read_text(),
        }

    @router.get("/jobs/{job_id}/protocol.png", dependencies=read)
    async def protocol_plot(job_id: str):
        path = protocol_file(runner().store.job_dir(job_id), job(job_id), "results.png")
        return FileResponse(path, media_type="image/png")

    app.include_router(router)

    @app.get("/", include_in_schema=False)
    async def home():
        return RedirectResponse(f"{DASHBOARD_PATH}/")

    # After the routes: the mount matches every path under /ui that no route took.
    app.mount(DASHBOARD_PATH, StaticFiles(directory=STATIC_DIR, html=True), name="dashboard")


# -- what the pages read -------------------------------------------------------------------------------------


def _finite(x: float) -> float | None:
    """JSON has no NaN or infinity: a missing similarity (no key) is ``null``."""
    return round(float(x), 6) if math.isfinite(x) else None


def dashboard_info(engine: Any, has_jobs: bool) -> dict[str, Any]:
    from lora_retriever.cli.eval import PaperEvalConfig
    from lora_retriever.eval import METHODS
    from lora_retriever.fusion import available_methods
    from lora_retriever.retriever import WEIGHT_MODES
    from lora_retriever.service.engine import AUTO_MODEL
    from lora_retriever.service.schemas import TrainRequest
    from lora_retriever.training.config import QUANTIZATIONS

    config = engine.config
    retriever = engine.retriever
    images = retriever is not None and (
        retriever.image_scoring or getattr(retriever.embedder, "supports_images", False)
    )
    train_defaults = {
        name: f.get_default(call_default_factory=True) for name, f in TrainRequest.model_fields.items()
    }
    default_test = Path(PaperEvalConfig.__dataclass_fields__["test_data"].default).absolute()
    return {
        "model": engine.base_name,
        "auto_model": AUTO_MODEL,
        "adapters": len(engine.pool),
        "methods": list(COMPOSE_METHODS),
        "fusion_methods": available_methods(),
        "weight_modes": list(WEIGHT_MODES),
        "weight_mode": config.weight_mode,
        "top_k": config.top_k,
        "max_top_k": config.max_adapters_per_request,
        "default_max_tokens": config.default_max_tokens,
        "max_tokens_limit": config.max_tokens_limit,
        "images": {
            "supported": bool(images),
            "reason": None
            if images
            else "the served retriever scores no images (no image keys or no image embedder); queries are "
            "retrieved by their text",
        },
        "jobs": has_jobs,
        "train": {"defaults": train_defaults, "quantizations": list(QUANTIZATIONS)},
        "protocol": {
            "methods": list(METHODS),
            "suites": {"text": True, "multimodal": _multimodal_pools_built()},
            "default_test_data": str(default_test) if default_test.is_file() else None,
        },
    }


def _multimodal_pools_built() -> bool:
    from lora_retriever.demo_vlm import DemoVlmConfig

    work = Path(DemoVlmConfig.__dataclass_fields__["work_dir"].default)
    return (work / "pool" / "app.json").is_file() and (work / "pool" / "category.json").is_file()


def _adapter_summary(path: Path) -> dict[str, Any]:
    """Rank, alpha and target modules from an adapter's ``adapter_config.json`` (the one PEFT-format reader)."""
    from swift.tuners.peft_format import LoraAdapterConfig, read_adapter_config

    try:
        raw = read_adapter_config(path)
        if raw is None:
            return {"config_error": f"no adapter_config.json in {path}"}
        config = LoraAdapterConfig.from_dict(raw)
    except Exception as err:  # one unreadable adapter must not hide the whole pool
        return {"config_error": str(err)}
    targets = config.target_modules
    if isinstance(targets, list):
        targets = sorted({t.rsplit(".", 1)[-1] for t in targets})
    return {
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "use_rslora": config.use_rslora,
        "target_modules": targets,
        "adapter_base_model": config.base_model_name_or_path,
    }


def key_map(keys: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """2-D PCA coordinates of the retrieval keys and the share of variance each axis explains.

    Args:
        keys: ``[N, d]`` key vectors.

    Returns:
        ``[N, 2]`` coordinates (zeros on an axis the keys don't span) and two variance fractions. Each axis's
        sign is fixed (its largest loading positive) so the map doesn't flip between calls.
    """
    n = keys.shape[0]
    coords = np.zeros((n, 2))
    if n < 2:
        return coords, [0.0, 0.0]
    centred = keys.astype(np.float64) - keys.mean(axis=0, dtype=np.float64)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    axes = vt[:2]
    axes *= np.sign(axes[np.arange(len(axes)), np.abs(axes).argmax(axis=1)])[:, None]
    coords[:, : len(axes)] = centred @ axes.T
    variance = s**2
    explained = (variance[:2] / variance.sum()).tolist() if variance.sum() > 0 else [0.0] * len(axes)
    return coords, [float(x) for x in explained] + [0.0] * (2 - len(explained))


def pool_view(engine: Any) -> dict[str, Any]:
    """``GET /ui/api/pool``: the adapters (``Engine.list_adapters`` plus pool metadata) and the key map."""
    pool = engine.pool
    listed = {a["name"]: a for a in engine.list_adapters()}
    coords, explained = key_map(pool.keys()) if len(pool) else (np.zeros((0, 2)), [0.0, 0.0])
    adapters = []
    for entry, (x, y) in zip(pool, coords):
        fusion = entry.get("fusion")
        row = {
            **listed.get(entry.lora_name, {"name": entry.lora_name}),
            **_adapter_summary(entry.lora_path),
            "base_model": entry.base_model,
            "task": entry.get("task"),
            "category": entry.category or entry.get("lora_type"),
            "domain": entry.domain,
            "source": f"{fusion['method']} merge of {', '.join(fusion['sources'])}"
            if isinstance(fusion, dict) and "method" in fusion
            else (Path(entry.source).name if entry.source else None),
            "x": _finite(x),
            "y": _finite(y),
        }
        row["base_model"] = row["base_model"] or row.pop("adapter_base_model", None)
        row.pop("adapter_base_model", None)
        adapters.append(row)
    return {"adapters": adapters, "map": {"method": "pca", "explained": explained}}


def _decode_image(data_url: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    head, _, payload = data_url.partition(",")
    if not head.startswith("data:image/") or ";base64" not in head or not payload:
        raise ServiceError(
            "image must be a data: URL of a PNG or JPEG (data:image/png;base64,...)", param="image"
        )
    try:
        image = Image.open(io.BytesIO(base64.b64decode(payload, validate=True)))
        image.load()
    except (ValueError, UnidentifiedImageError, OSError) as err:
        raise ServiceError(f"image is not a readable picture ({err})", param="image") from err
    return image.convert("RGB")


def input_similarities(
    engine: Any, text: str, image: str | None, top_k: int | None, weight_mode: str | None
) -> dict[str, Any]:
    """``POST /ui/api/similarities``: one embedding pass; the similarity to every adapter and the top-k with
    weights (``LoraRetriever.similarities`` / ``retrieve_vectors``, as ``Engine.retrieve`` does)."""
    from lora_retriever.retriever import WEIGHT_MODES

    retriever = engine.retriever  # one reference: a hot change swaps it, never mutates it
    if retriever is None:
        raise ServiceError("the pool is empty: nothing to retrieve; register an adapter first", param="input")
    if not text.strip():
        raise ServiceError("input is blank; type a question", param="input")
    if weight_mode is not None and weight_mode not in WEIGHT_MODES:
        raise ServiceError(
            f"weight_mode must be one of {list(WEIGHT_MODES)}, got {weight_mode!r}", param="weight_mode"
        )
    k = engine.config.top_k if top_k is None else top_k
    n = len(retriever.pool)
    if not 1 <= k <= n:
        raise ServiceError(f"top_k must be in 1..{n} (the pool's size), got {k}", param="top_k")
    images = None
    if image:
        if not (retriever.image_scoring or getattr(retriever.embedder, "supports_images", False)):
            raise ServiceError(
                "this server's retriever scores no images (no image keys or no image embedder); send text only",
                param="image",
            )
        images = [[_decode_image(image)]]
    started = time.perf_counter()
    try:
        with engine.embed_lock:
            vectors = retriever.embed_queries([text], images)
    except ValueError as err:  # e.g. nothing left to embed once the <image> tags are removed
        raise ServiceError(f"input can't be embedded: {err}", param="input") from err
    sims = retriever.similarities(vectors)[0]
    top = retriever.retrieve_vectors(vectors, k, weight_mode=weight_mode)[0]
    order = np.argsort(-np.nan_to_num(sims, nan=-np.inf), kind="stable")
    names = retriever.pool.names
    return {
        "input": text,
        "retrieved": [
            {"name": a.name, "weight": _finite(a.weight), "similarity": _finite(a.similarity)} for a in top
        ],
        "similarities": [{"name": names[i], "similarity": _finite(sims[i])} for i in order],
        "milliseconds": round((time.perf_counter() - started) * 1000, 1),
    }


def fused_answer(engine: Any, body: FusionRequest) -> dict[str, Any]:
    """``POST /ui/api/fusion``: retrieve the top-k (``Engine.resolve_adapters`` with model ``"auto"``), merge them
    into one adapter with a fusion method (``FusionComposer``) and answer greedily. Runs under the engine's
    model lock (batches wait); the fused adapter is unloaded afterwards."""
    from transformers import GenerationConfig

    from lora_retriever.composition import FusionComposer
    from lora_retriever.fusion import available_methods
    from lora_retriever.service.engine import AUTO_MODEL
    from swift.llm import get_template

    if not body.input.strip():
        raise ServiceError("input is blank; type a question", param="input")
    if body.fusion_method not in available_methods():
        raise ServiceError(
            f"fusion_method must be one of {available_methods()}, got {body.fusion_method!r}",
            param="fusion_method",
        )
    max_tokens = body.max_tokens or engine.config.default_max_tokens
    if max_tokens > engine.config.max_tokens_limit:
        raise ServiceError(
            f"max_tokens {max_tokens} exceeds this server's limit of {engine.config.max_tokens_limit}",
            param="max_tokens",
        )
    try:
        adapters = engine.resolve_adapters(AUTO_MODEL, None, body.input, top_k=body.top_k)
    except ValueError as err:  # e.g. nothing left to embed once the <image> tags are removed
        raise ServiceError(f"input can't be embedded: {err}", param="input") from err
    engine.encode_chat([{"role": "user", "content": body.input}])  # the API's context-length check
    template = get_template(engine.config.model_type, engine.tokenizer)
    started = time.perf_counter()
    with engine.model_lock:
        composer = FusionComposer(
            engine.model,
            template,
            engine.pool,
            method=body.fusion_method,
            batch_size=1,
            generation_config=GenerationConfig(max_new_tokens=max_tokens, do_sample=False),
            progress=False,
        )
        try:
            answers = composer.generate([body.input], [adapters])
        finally:
            composer.cache_size = 0  # unload the fused adapter now: the engine's cache doesn't know it
            composer.after_call()
    return {
        "answer": answers[0],
        "method": "fusion",
        "fusion_method": body.fusion_method,
        "adapters": [
            {"name": a.name, "weight": _finite(a.weight), "similarity": _finite(a.similarity)}
            for a in adapters
        ],
        "seconds": round(time.perf_counter() - started, 3),
    }


# -- training data -------------------------------------------------------------------------------------------


def datasets_dir(engine: Any) -> Path:
    return Path(engine.config.data_dir).expanduser().absolute() / "datasets"


def list_datasets(engine: Any) -> list[dict[str, Any]]:
    folder = datasets_dir(engine)
    if not folder.is_dir():
        return []
    return [
        {"name": p.name, "path": str(p), "bytes": p.stat().st_size}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.suffix in (".json", ".jsonl")
    ]


def save_dataset(engine: Any, name: str, data: bytes) -> dict[str, Any]:
    """Validate an uploaded training file (``read_training_records``) and keep it in ``<data_dir>/datasets``.

    Raises:
        ServiceError: a bad name (400), a taken one (409), or a file that isn't training data (400, with the
            reader's message: the line and field at fault).
    """
    from lora_retriever.training.data import read_training_records
    from swift.utils.files import atomic_write

    if not DATASET_NAME.match(name):
        raise ServiceError(
            f"dataset name {name!r} must be letters, digits, '_', '-' or '.', ending in .json or .jsonl",
            param="name",
        )
    folder = datasets_dir(engine)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / name
    if target.exists():
        raise ServiceError(
            f"a dataset {name!r} exists already; choose another name", status=409, param="name"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ServiceError(f"the file is not UTF-8 text ({err})", param="file") from err
    staging = folder / f".upload-{time.monotonic_ns()}{target.suffix}"
    staging.write_text(text, encoding="utf-8")
    try:
        records = read_training_records(staging)
    except (OSError, ValueError) as err:
        raise ServiceError(
            str(err).replace(str(staging), name).replace(staging.name, name), param="file"
        ) from err
    finally:
        staging.unlink(missing_ok=True)
    atomic_write(target, text)
    return {"name": name, "path": str(target), "records": len(records), "bytes": len(data)}


# -- jobs ----------------------------------------------------------------------------------------------------


def training_curves(job: dict[str, Any]) -> dict[str, Any]:
    """A training job's scalars, read from the TensorBoard event files the trainer writes
    (``<output_dir>/tensorboard``): ``{"series": {tag: [[step, value], ...]}}``."""
    from lora_retriever.training.tensorboard import TENSORBOARD_DIR, read_scalars

    if job["kind"] != "train":
        return {"series": {}, "note": f"a {job['kind']} job has no training curves"}
    folder = Path(job["params"]["output_dir"]) / TENSORBOARD_DIR
    try:
        series = read_scalars(folder)
    except ImportError as err:
        raise ServiceError(str(err), status=501) from err
    return {"series": {tag: [[s, _finite(v)] for s, v in points] for tag, points in series.items()}}
