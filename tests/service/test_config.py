"""``ServiceConfig`` validation and the ``lora-retriever-serve`` command's checks before any model loads."""

from __future__ import annotations

import json

import pytest

from lora_retriever.cli.serve import main
from lora_retriever.service.config import DEMO_POOL, ServiceConfig


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"port": 70000}, "port"),
        ({"max_wait_ms": -1.0}, "max_wait_ms"),
        ({"default_max_tokens": 600}, "default_max_tokens"),
        ({"weight_mode": "loud"}, "weight_mode"),
        ({"model_type": "auto"}, "model_type"),
        ({"adapter_memory_mb": 0.0}, "adapter_memory_mb"),
        ({"data_dir": ""}, "data_dir"),
    ],
)
def test_config_rejects_bad_settings_naming_them(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        ServiceConfig(**kwargs)


def test_defaults_serve_the_demo_pool_on_loopback(tmp_path):
    config = ServiceConfig(data_dir=str(tmp_path))
    assert config.host == "127.0.0.1" and config.port == 8000
    assert config.pool_configs[0].as_posix().endswith(DEMO_POOL)
    assert config.registry_config == tmp_path / "pool.json"
    assert config.served_model_name() == "smollm2-135m-instruct"


def test_command_stops_before_loading_the_model(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no data/demo here: the demo pool is not built
    assert main(["--data_dir", str(tmp_path / "svc")]) == 2
    err = capsys.readouterr().err
    assert "make demo" in err and DEMO_POOL in err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"lora_name": "x", "lora_path": "missing"}]))
    assert main(["--pool", str(bad), "--data_dir", str(tmp_path / "svc")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["--pool", str(bad), "--max_batch_size", "0"]) == 2
    assert "max_batch_size" in capsys.readouterr().err
