"""API keys: hashed at rest, ``read`` vs ``admin`` scopes on every route of a real uvicorn server (401 / 403 in
OpenAI's error shape), the ``openai`` client's ``api_key``, ``/whoami``, keys files, the key command, and the
refusal to serve a non-loopback host without keys."""

from __future__ import annotations

import hashlib

import httpx
import pytest

from lora_retriever.cli.serve import main
from lora_retriever.service.auth import KeyRing, hash_key, new_key, parse_entry
from lora_retriever.service.config import ServiceConfig, is_loopback

CHAT = {
    "model": "capitals",
    "messages": [{"role": "user", "content": "What is the capital of Peru?"}],
    "max_tokens": 1,
}
#: (method, path, body) -> the status a key that passes the scope check gets (the request itself is then
#: refused or served for its own reasons: nothing here changes the served pool).
READ_ROUTES = [
    ("GET", "/v1/models", None, 200),
    ("GET", "/adapters", None, 200),
    ("POST", "/retrieve", {"input": "What is the capital of Peru?", "top_k": 1}, 200),
    ("POST", "/v1/chat/completions", CHAT, 200),
    ("POST", "/v1/completions", {"model": "capitals", "prompt": "Lima is", "max_tokens": 1}, 200),
    ("GET", "/jobs", None, 404),  # this server runs no jobs
    ("GET", "/jobs/abc", None, 404),
    ("GET", "/metrics", None, 200),
    ("GET", "/whoami", None, 200),
]
ADMIN_ROUTES = [
    ("POST", "/adapters", {"name": "x", "path": "relative/dir", "samples": ["a"]}, 400),
    ("POST", "/adapters/archive?name=x&samples=a", b"not an archive", 400),
    ("DELETE", "/adapters/no_such_adapter", None, 404),
    ("POST", "/merge", {"name": "m", "adapters": [{"name": "nope", "weight": 1}]}, 404),
    ("POST", "/train", {"adapter_name": "t", "dataset_path": "relative.jsonl"}, 400),
    ("POST", "/evaluate", {"test_data": "relative.jsonl"}, 400),
    ("POST", "/jobs/abc/cancel", None, 404),
    ("POST", "/jobs/abc/resume", None, 404),
]


@pytest.fixture(scope="module")
def keys():
    read_key, read_entry = new_key("read", "reader")
    admin_key, admin_entry = new_key("admin")
    return {"read": read_key, "admin": admin_key, "entries": [read_entry, admin_entry]}


@pytest.fixture(scope="module")
def secured(engine, server, keys):
    """A second server on the session engine, with a read and an admin key."""
    from lora_retriever.service.server import ServerThread

    ring = KeyRing.from_entries(keys["entries"], "test")
    with ServerThread(engine, manage_engine=False, api_keys=ring) as running:
        with httpx.Client(base_url=running.url, timeout=900) as client:
            yield client


def send(client: httpx.Client, method: str, path: str, body, key: str | None):
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    if isinstance(body, bytes):
        return client.request(method, path, content=body, headers=headers)
    return client.request(method, path, json=body, headers=headers)


def check_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["param"] == "authorization" and error["message"], error
    assert response.headers["www-authenticate"].startswith("Bearer")


def test_keys_are_stored_as_their_sha256_only():
    key, entry = new_key("admin", "ops")
    scope, digest, label = entry.split(":")
    assert (scope, label) == ("admin", "ops") and key.startswith("lrk_") and len(key) == 4 + 43
    assert digest == hashlib.sha256(key.encode()).hexdigest() == hash_key(key)
    assert key[4:] not in entry
    parsed = parse_entry(entry, "here")
    assert parsed.digest == bytes.fromhex(digest) and parsed.label == "ops"
    assert KeyRing([parsed]).find(key) == parsed and KeyRing([parsed]).find(key + "x") is None
    assert new_key("read")[0] != new_key("read")[0]


@pytest.mark.parametrize(
    ("entry", "needle"),
    [
        ("admin:" + "0" * 63, "SCOPE:SHA256"),
        ("admin:" + "G" * 64, "SCOPE:SHA256"),
        ("root:" + "0" * 64, "unknown scope 'root'"),
        ("lrk_abcdefghijklmnopqrstuvwxyz", "SCOPE:SHA256"),  # a key pasted where its entry belongs
    ],
)
def test_bad_entries_are_refused_naming_the_setting(entry, needle):
    with pytest.raises(ValueError, match=needle) as err:
        ServiceConfig(api_keys=[entry])
    assert "api_keys[0]" in str(err.value)
    assert "abcdefghijklmnopqrstuvwxyz" not in str(err.value)  # a pasted key is not echoed back


def test_keys_file_with_comments(tmp_path, keys):
    path = tmp_path / "keys.txt"
    path.write_text(f"# the ops team\n{keys['entries'][0]}  # reader\n\n{keys['entries'][1]}\n")
    ring = KeyRing.from_config(ServiceConfig(api_keys_file=str(path), data_dir=str(tmp_path)))
    assert [k.scope for k in ring.keys] == ["read", "admin"] and ring.find(keys["admin"]).scope == "admin"
    path.write_text("# nothing yet\n")
    with pytest.raises(ValueError, match="holds no key entries"):
        KeyRing.from_file(path)
    path.write_text(f"{keys['entries'][0]}\nadmin:nothex\n")
    with pytest.raises(ValueError, match=r"keys.txt:2"):
        KeyRing.from_file(path)


def test_no_keys_on_a_public_host_is_refused_unless_allowed():
    for host in ("127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"):
        assert is_loopback(host), host
        ServiceConfig(host=host)
    for host in ("0.0.0.0", "::", "192.168.1.4", "example.org"):
        assert not is_loopback(host), host
        with pytest.raises(ValueError, match="not a loopback address and no API keys"):
            ServiceConfig(host=host)
    ServiceConfig(host="0.0.0.0", allow_no_auth=True)
    ServiceConfig(host="0.0.0.0", api_keys=[new_key("admin")[1]])


def test_new_key_command_prints_a_key_and_its_entry(capsys):
    assert main(["--new_key", "read:dashboard"]) == 0
    key, entry = capsys.readouterr().out.splitlines()
    assert entry == f"read:{hash_key(key)}:dashboard"
    assert main(["--new_key", "owner"]) == 2
    assert "unknown scope 'owner'" in capsys.readouterr().err


def test_a_missing_keys_file_stops_the_command_before_the_model_loads(tmp_path, capsys):
    argv = ["--api_keys_file", str(tmp_path / "keys.txt"), "--model_path", str(tmp_path / "no_model")]
    assert main([*argv, "--model_type", "llama", "--data_dir", str(tmp_path / "svc")]) == 2
    err = capsys.readouterr().err
    assert "api_keys_file" in err and "keys.txt" in err and "no_model" not in err


@pytest.mark.parametrize(("method", "path", "body", "served"), READ_ROUTES + ADMIN_ROUTES)
def test_every_route_needs_a_key(secured, keys, method, path, body, served):
    check_error(send(secured, method, path, body, None), 401, "missing_api_key")
    check_error(send(secured, method, path, body, "lrk_" + "x" * 43), 401, "invalid_api_key")
    basic = secured.request(method, path, headers={"Authorization": f"Basic {keys['admin']}"})
    check_error(basic, 401, "missing_api_key")


@pytest.mark.parametrize(("method", "path", "body", "served"), READ_ROUTES)
def test_read_routes_serve_a_read_key(secured, keys, method, path, body, served):
    response = send(secured, method, path, body, keys["read"])
    assert response.status_code == served, response.text


@pytest.mark.parametrize(("method", "path", "body", "served"), ADMIN_ROUTES)
def test_admin_routes_refuse_a_read_key_and_serve_an_admin_key(secured, keys, method, path, body, served):
    refused = send(secured, method, path, body, keys["read"])
    check_error(refused, 403, "insufficient_scope")
    assert (
        refused.json()["error"]["type"] == "permission_error"
        and "'admin'" in refused.json()["error"]["message"]
    )
    response = send(secured, method, path, body, keys["admin"])
    assert response.status_code == served, response.text
    assert response.json()["error"]["param"] != "authorization"


def test_health_is_open_and_whoami_reports_the_scope(secured, http, keys):
    assert secured.get("/health").json()["status"] == "ok"
    as_reader = secured.get("/whoami", headers={"Authorization": f"Bearer {keys['read']}"}).json()
    assert as_reader == {"auth": True, "scope": "read", "label": "reader"}
    as_admin = secured.get("/whoami", headers={"Authorization": f"Bearer  {keys['admin']}"}).json()
    assert as_admin == {"auth": True, "scope": "admin", "label": None}
    # The server without keys: open, and says so (a dashboard signs in without a key).
    assert http.get("/whoami").json() == {"auth": False, "scope": "admin", "label": None}


def test_the_openai_client_sends_its_api_key(secured, keys):
    import openai

    url = str(secured.base_url).rstrip("/") + "/v1"
    client = openai.OpenAI(base_url=url, api_key=keys["read"], timeout=900, max_retries=0)
    answer = client.chat.completions.create(**CHAT)
    assert answer.choices[0].message.content is not None and answer.usage.completion_tokens == 1
    assert "capitals" in [m.id for m in client.models.list().data]
    wrong = openai.OpenAI(base_url=url, api_key="lrk_not_a_key", timeout=900, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        wrong.chat.completions.create(**CHAT)
    assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
