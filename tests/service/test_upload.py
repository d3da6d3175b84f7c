"""``POST /adapters/archive``: an uploaded PEFT directory (tar.gz / zip) registers; unsafe archives are refused
before anything is written, and nothing lands outside the data directory."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import pytest

from tests.service.factories import linear_names, write_random_adapter

SAMPLES = {"samples": ["What is the tallest mountain?", "Name a long river."]}


@pytest.fixture(scope="module")
def adapter_dir(engine, tmp_path_factory):
    model = engine.model.base_model
    return write_random_adapter(
        model, tmp_path_factory.mktemp("upload") / "geo", linear_names(model, ("v_proj",)), seed=7
    )


def tar_gz(files: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            archive.addfile(info)
    return buffer.getvalue()


def adapter_files(folder: Path, prefix: str = "") -> dict[str, bytes]:
    return {prefix + p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def upload(http, name: str, body: bytes, **params):
    return http.post("/adapters/archive", params={"name": name, **SAMPLES, **params}, content=body)


def test_upload_tar_gz_and_zip_register_and_serve(http, engine, adapter_dir):
    from lora_retriever.service.admin import delete_adapter

    response = upload(http, "geo_tar", tar_gz(adapter_files(adapter_dir, "geo/")))
    assert response.status_code == 201, response.text
    data_dir = Path(engine.config.data_dir).resolve()
    stored = (data_dir / response.json()["adapter"]["lora_path"]).resolve()  # stored relative to the config
    assert data_dir in stored.parents and (stored / "adapter_model.safetensors").is_file()
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as archive:
        for name, data in adapter_files(adapter_dir).items():
            archive.writestr(name, data)
    assert upload(http, "geo_zip", zipped.getvalue()).status_code == 201
    try:
        tar_answer = http.post(
            "/v1/chat/completions",
            json={
                "model": "geo_tar",
                "messages": [{"role": "user", "content": "Name a river."}],
                "max_tokens": 5,
            },
        ).json()
        zip_answer = http.post(
            "/v1/chat/completions",
            json={
                "model": "geo_zip",
                "messages": [{"role": "user", "content": "Name a river."}],
                "max_tokens": 5,
            },
        ).json()
        assert (
            tar_answer["choices"][0]["message"]["content"] == zip_answer["choices"][0]["message"]["content"]
        )
        assert upload(http, "geo_tar", tar_gz(adapter_files(adapter_dir))).status_code == 409
    finally:
        delete_adapter(engine, "geo_tar")
        delete_adapter(engine, "geo_zip")


@pytest.mark.parametrize(
    ("label", "make", "status"),
    [
        ("traversal", lambda files: tar_gz({"../evil/adapter_config.json": b"{}", **files}), 400),
        ("absolute", lambda files: tar_gz({"/tmp/evil.json": b"{}", **files}), 400),
        ("symlink", lambda files: tar_gz(files, links={"adapter_model.bin": "/etc/passwd"}), 400),
        ("not an archive", lambda files: b"just some bytes", 400),
        ("no config", lambda files: tar_gz({"weights.safetensors": files["adapter_model.safetensors"]}), 400),
        ("corrupt weights", lambda files: tar_gz({**files, "adapter_model.safetensors": b"nonsense"}), 400),
    ],
)
def test_unsafe_or_bad_archives_are_refused_and_leave_nothing(http, engine, adapter_dir, label, make, status):
    response = upload(http, "bad_upload", make(adapter_files(adapter_dir)))
    assert response.status_code == status, (label, response.text)
    assert response.json()["error"]["message"]
    assert not (Path(engine.config.data_dir) / "adapters" / "bad_upload").exists(), label
    assert not Path("/tmp/evil.json").exists() and "bad_upload" not in engine.pool


def test_upload_size_limit(http, engine):
    saved = engine.config.max_upload_mb
    engine.config.max_upload_mb = 0.001
    try:
        response = upload(http, "too_big", b"x" * 5000)
        assert response.status_code == 413 and "limit" in response.json()["error"]["message"]
    finally:
        engine.config.max_upload_mb = saved
