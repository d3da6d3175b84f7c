"""``ServiceConfig`` validation, the ``lora-retriever-serve`` command's checks before any model loads, and the one
configuration: defaults < ``--config`` file (TOML / YAML) < ``LORA_RETRIEVER_*`` variables < flags."""

from __future__ import annotations

import json

import pytest

from lora_retriever.cli.args import config_kwargs
from lora_retriever.cli.serve import build_parser, main
from lora_retriever.service.auth import new_key
from lora_retriever.service.config import DEMO_POOL, ServiceConfig
from lora_retriever.service.settings import CONFIG_ENV, load_config, settings_model


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


# ------------------------------------------------------------------------- one configuration (settings.py)


def from_command_line(*argv: str) -> ServiceConfig:
    """What ``lora-retriever-serve argv`` would serve (its ``_serve`` builds the config exactly so)."""
    args = build_parser().parse_args(list(argv))
    return load_config(ServiceConfig, cli=config_kwargs(ServiceConfig, args), config_file=args.config)


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No LORA_RETRIEVER_* settings from the caller's environment; HOME is a temporary folder."""
    import os

    for name in list(os.environ):
        if name.upper().startswith("LORA_RETRIEVER_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return monkeypatch


def test_the_settings_model_mirrors_the_dataclass():
    import dataclasses

    model = settings_model(ServiceConfig)
    fields = {f.name: f for f in dataclasses.fields(ServiceConfig)}
    assert list(model.model_fields) == list(fields)
    defaults = ServiceConfig()
    for name, info in model.model_fields.items():
        assert info.get_default(call_default_factory=True) == getattr(defaults, name), name
        assert info.description == fields[name].metadata["help"], name


def test_precedence_flags_over_env_over_file_over_defaults(clean_env, tmp_path):
    toml = tmp_path / "service.toml"
    toml.write_text('port = 8101\nmax_batch_size = 5\ntop_k = 2\npools = ["from_file.json"]\n')
    assert from_command_line().port == 8000  # defaults
    config = from_command_line("--config", str(toml))
    assert (config.port, config.max_batch_size, config.top_k, config.pools) == (
        8101,
        5,
        2,
        ["from_file.json"],
    )
    clean_env.setenv("LORA_RETRIEVER_PORT", "8102")
    clean_env.setenv("LORA_RETRIEVER_POOLS", "a.json, b.json")
    config = from_command_line("--config", str(toml))
    assert (config.port, config.max_batch_size, config.pools) == (8102, 5, ["a.json", "b.json"])
    config = from_command_line("--config", str(toml), "--port", "8103", "--pool", "c.json")
    assert (config.port, config.max_batch_size, config.top_k, config.pools) == (8103, 5, 2, ["c.json"])
    # A flag given with its default value still wins over the environment.
    assert from_command_line("--config", str(toml), "--port", "8000").port == 8000
    # $LORA_RETRIEVER_CONFIG names the file when --config is not given.
    clean_env.setenv(CONFIG_ENV, str(toml))
    assert from_command_line().top_k == 2


def test_yaml_file_toml_table_json_lists_and_home_expansion(clean_env, tmp_path):
    yaml_file = tmp_path / "service.yaml"
    yaml_file.write_text("data_dir: ~/svc\nallow_no_auth: true\nhost: 0.0.0.0\nmax_wait_ms: 2.5\n")
    config = from_command_line("--config", str(yaml_file))
    assert config.data_dir == str(tmp_path / "home" / "svc") and config.host == "0.0.0.0"
    assert config.max_wait_ms == 2.5 and config.allow_no_auth is True
    table = tmp_path / "project.toml"
    table.write_text("[tool]\nx = 1\n\n[lora_retriever]\nport = 8104\n")
    assert from_command_line("--config", str(table)).port == 8104
    clean_env.setenv("LORA_RETRIEVER_PINNED", '["capitals", "sums"]')
    clean_env.setenv("LORA_RETRIEVER_MODEL_PATH", "~/models/smol")
    clean_env.setenv("LORA_RETRIEVER_CACHE", "/not/a/service/setting")  # another tool's variable: ignored
    config = from_command_line("--api_keys_file", "~/keys.txt")
    assert config.pinned == ["capitals", "sums"] and config.model_path == str(
        tmp_path / "home" / "models" / "smol"
    )
    assert config.api_keys_file == str(tmp_path / "home" / "keys.txt")
    assert config.served_model_name() == "smol"


def test_api_keys_from_the_environment(clean_env):
    entries = [new_key("read")[1], new_key("admin", "ops")[1]]
    clean_env.setenv("LORA_RETRIEVER_API_KEYS", ",".join(entries))
    config = from_command_line("--host", "0.0.0.0")
    assert config.api_keys == entries


@pytest.mark.parametrize(
    ("source", "needle"),
    [
        (
            {"env": {"LORA_RETRIEVER_PORT": "eighty"}},
            "setting port ($LORA_RETRIEVER_PORT): Input should be a valid integer",
        ),
        ({"file": 'port = "eighty"\n'}, "setting port (port in "),
        ({"file": "prot = 8000\n"}, "unknown setting 'prot' in "),
        ({"file": "port = \n"}, "is not readable TOML"),
        ({"env": {"LORA_RETRIEVER_MAX_BATCH_SIZE": "0"}}, "max_batch_size must be a positive integer, got 0"),
        ({"env": {"LORA_RETRIEVER_API_KEYS": "admin:1234"}}, "api_keys[0]: API key entry"),
        ({"env": {"LORA_RETRIEVER_HOST": "0.0.0.0"}}, "is not a loopback address and no API keys"),
        ({"argv": ["--config", "missing.toml"]}, "--config missing.toml does not exist"),
        ({"file": "port = 1\n", "suffix": ".ini"}, "must end in .toml, .yaml or .yml"),
    ],
)
def test_bad_settings_fail_at_start_up_naming_the_setting(clean_env, tmp_path, capsys, source, needle):
    for name, value in source.get("env", {}).items():
        clean_env.setenv(name, value)
    argv = list(source.get("argv", []))
    if "file" in source:
        path = tmp_path / f"service{source.get('suffix', '.toml')}"
        path.write_text(source["file"])
        argv += ["--config", str(path)]
    clean_env.chdir(tmp_path)
    assert main([*argv, "--data_dir", str(tmp_path / "svc")]) == 2  # before any model loads
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err, err


def test_flags_still_show_their_defaults_in_help():
    actions = {a.dest: a for a in build_parser()._actions}
    assert actions["port"].help.endswith("(default: 8000)") and actions["max_batch_size"].help.endswith(
        "(default: 16)"
    )
    assert actions["config"].help and "LORA_RETRIEVER_" in actions["config"].help


def test_the_ray_deployment_resolves_settings_like_the_embedded_server(clean_env, tmp_path):
    from lora_retriever.service import ray_app

    toml = tmp_path / "service.toml"
    toml.write_text("port = 8101\ntop_k = 2\nmax_wait_ms = 4.0\n")
    clean_env.setenv("LORA_RETRIEVER_PORT", "8102")
    argv = ["--config", str(toml), "--max_batch_size", "5", "--num_replicas", "3"]
    service, layout = ray_app.configs_from_args(ray_app.build_parser().parse_args(argv))
    assert service == from_command_line(*argv[:4])  # the same resolution as `lora-retriever serve`
    assert (service.port, service.top_k, service.max_wait_ms, service.max_batch_size) == (8102, 2, 4.0, 5)
    assert layout.num_replicas == 3
    # The `serve run` / `serve deploy` builder: its args win over the environment, which still applies.
    clean_env.setenv("LORA_RETRIEVER_TOP_K", "4")
    clean_env.setattr(ray_app, "application", lambda service, layout: (service, layout))  # no Ray needed
    service, layout = ray_app.build_app({"port": 8105, "num_replicas": 2})
    assert (service.port, service.top_k, layout.num_replicas) == (8105, 4, 2)
