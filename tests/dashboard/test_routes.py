"""The dashboard's JSON routes over HTTP (no browser): what they compute against independent references (numpy's
PCA via the covariance eigenvectors, the API's own /retrieve, the training-data reader), their scopes, and their
4xx answers naming the field."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from lora_retriever.service.dashboard.routes import key_map


def test_key_map_is_the_pca_of_the_keys():
    rng = np.random.default_rng(0)
    keys = rng.normal(size=(30, 12)) @ np.diag(np.linspace(3, 0.1, 12))
    coords, explained = key_map(keys)
    centred = keys - keys.mean(axis=0)
    eigenvalues, eigenvectors = np.linalg.eigh(np.cov(centred, rowvar=False))
    order = np.argsort(eigenvalues)[::-1]
    reference = centred @ eigenvectors[:, order[:2]]
    for axis in range(2):  # a principal axis is defined up to its sign
        sign = np.sign(reference[:, axis] @ coords[:, axis])
        np.testing.assert_allclose(coords[:, axis], sign * reference[:, axis], atol=1e-9)
    np.testing.assert_allclose(explained, eigenvalues[order[:2]] / eigenvalues.sum(), rtol=1e-9)
    assert key_map(keys[:1])[0].tolist() == [[0.0, 0.0]]


@pytest.fixture(scope="module")
def admin_http(dash_server, keys):
    with httpx.Client(
        base_url=dash_server.url, timeout=900, headers={"Authorization": f"Bearer {keys['admin']}"}
    ) as c:
        yield c


def test_scopes_and_the_open_routes(dash_server, keys):
    with httpx.Client(base_url=dash_server.url, timeout=60) as anonymous:
        assert anonymous.get("/ui/api/auth").json() == {"auth": True}
        assert anonymous.get("/", follow_redirects=False).headers["location"] == "/ui/"
        assert anonymous.get("/ui/").status_code == 200 and "js/main.js" in anonymous.get("/ui/").text
        assert anonymous.get("/ui/js/chart.js").status_code == 200
        assert anonymous.get("/ui/api/pool").status_code == 401
        reader = {"Authorization": f"Bearer {keys['read']}"}
        assert anonymous.get("/ui/api/pool", headers=reader).status_code == 200
        refused = anonymous.post("/ui/api/datasets?name=x.jsonl", content=b"{}", headers=reader)
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "insufficient_scope"
        assert anonymous.post("/ui/api/protocol", json={}, headers=reader).status_code == 403


def test_pool_rows_carry_the_adapter_configs_and_the_map(admin_http, service_pool):
    view = admin_http.get("/ui/api/pool").json()
    rows = {a["name"]: a for a in view["adapters"]}
    assert {"capitals", "arithmetic", "sentiment"} <= set(rows)
    for entry in json.loads(service_pool.read_text()):
        config = json.loads((service_pool.parent / entry["lora_path"] / "adapter_config.json").read_text())
        row = rows[entry["lora_name"]]
        assert row["r"] == config["r"] and row["lora_alpha"] == config["lora_alpha"]
        assert row["target_modules"] == ["q_proj", "v_proj"]
        assert row["base_model"] == config["base_model_name_or_path"]
    assert len(view["map"]["explained"]) == 2 and sum(view["map"]["explained"]) <= 1 + 1e-9


def test_similarities_agree_with_the_apis_retrieve(admin_http):
    text = "What is the capital of Kenya?"
    mine = admin_http.post("/ui/api/similarities", json={"input": text, "top_k": 2}).json()
    api = admin_http.post("/retrieve", json={"input": text, "top_k": 2}).json()["results"][0]["adapters"]
    assert mine["retrieved"] == api
    sims = {s["name"]: s["similarity"] for s in mine["similarities"]}
    assert [s["similarity"] for s in mine["similarities"]] == sorted(sims.values(), reverse=True)
    for adapter in api:
        # both sides are rounded to 6 decimals (each off by <= 5e-7) from fp32 scores computed in different
        # batches, whose last bits may differ: one unit of the 6th decimal apart is the same score
        assert sims[adapter["name"]] == pytest.approx(adapter["similarity"], abs=1.5e-6)
    bad = admin_http.post("/ui/api/similarities", json={"input": text, "top_k": 99})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "top_k"
    image = admin_http.post(
        "/ui/api/similarities", json={"input": text, "image": "data:image/png;base64,AAAA"}
    )
    assert image.status_code == 400 and image.json()["error"]["param"] == "image"


def test_fusion_answers_with_the_retrieved_adapters_and_unloads_the_fused_one(admin_http, dash_engine):
    before = set(dash_engine.model.adapter_configs)
    done = admin_http.post(
        "/ui/api/fusion",
        json={"input": "What is 12 + 30?", "top_k": 2, "fusion_method": "cat", "max_tokens": 3},
    )
    assert done.status_code == 200, done.text
    body = done.json()
    retrieved = admin_http.post("/retrieve", json={"input": "What is 12 + 30?", "top_k": 2}).json()
    assert body["adapters"] == retrieved["results"][0]["adapters"]
    assert isinstance(body["answer"], str) and body["answer"]
    assert not any(n.startswith("fused-") for n in dash_engine.model.adapter_configs)
    assert set(dash_engine.model.adapter_configs) - before <= {a["name"] for a in body["adapters"]}
    bad = admin_http.post("/ui/api/fusion", json={"input": "hi", "fusion_method": "magic"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "fusion_method"


def test_dataset_upload_is_validated_and_listed(admin_http):
    good = "".join(json.dumps({"input": f"{i} + 1", "output": str(i + 1)}) + "\n" for i in range(4))
    saved = admin_http.post("/ui/api/datasets?name=adds.jsonl", content=good.encode())
    assert saved.status_code == 201, saved.text
    assert saved.json()["dataset"]["records"] == 4
    listed = {d["name"]: d for d in admin_http.get("/ui/api/datasets").json()["datasets"]}
    assert listed["adds.jsonl"]["bytes"] == len(good) and listed["adds.jsonl"]["path"].endswith(
        "datasets/adds.jsonl"
    )
    again = admin_http.post("/ui/api/datasets?name=adds.jsonl", content=good.encode())
    assert again.status_code == 409 and again.json()["error"]["param"] == "name"
    bad = admin_http.post("/ui/api/datasets?name=bad.jsonl", content=b'{"input": "x"}\n')
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "file"
    assert "output" in bad.json()["error"]["message"] and "bad.jsonl" in bad.json()["error"]["message"]
    escape = admin_http.post("/ui/api/datasets?name=../x.jsonl", content=good.encode())
    assert escape.status_code == 400 and escape.json()["error"]["param"] == "name"
    names = {d["name"] for d in admin_http.get("/ui/api/datasets").json()["datasets"]}
    assert "bad.jsonl" not in names and not any(n.startswith(".upload") for n in names)


def test_protocol_requests_are_checked_before_queueing(admin_http, tmp_path):
    other = tmp_path / "other.jsonl"
    other.write_text(
        json.dumps({"id": "1", "query": "Translate 'cat'", "response": "chat", "task": "french"}) + "\n"
    )
    cases = [
        ({"methods": ["magic"]}, "methods"),
        ({"test_data": str(tmp_path / "missing.jsonl")}, "test_data"),
        ({"test_data": str(other)}, "test_data"),
        ({"test_data": str(other), "num_samples": 0}, "num_samples"),
    ]
    for body, param in cases:
        response = admin_http.post("/ui/api/protocol", json=body)
        assert response.status_code == 400, (body, response.text)
        assert response.json()["error"]["param"] == param, body
    assert (
        "french"
        in admin_http.post("/ui/api/protocol", json={"test_data": str(other)}).json()["error"]["message"]
    )


def test_training_takes_the_forms_qlora_setting(admin_http, tmp_path):
    data = tmp_path / "adds.jsonl"
    data.write_text(json.dumps({"input": "1 + 1", "output": "2"}) + "\n")
    body = {"adapter_name": "q_adds", "dataset_path": str(data), "quantization": "fp3"}
    refused = admin_http.post("/train", json=body)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "quantization"
    assert "nf4" in refused.json()["error"]["message"]
