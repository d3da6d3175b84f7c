"""One configuration: defaults < a TOML or YAML file (``--config``) < ``LORA_RETRIEVER_*`` variables < flags.

``ServiceConfig`` (a dataclass whose fields make the flags, their help and defaults: ``lora_retriever.cli.args``)
stays the one schema. ``settings_model`` derives from it a pydantic-settings model with the same names, types
and defaults; ``load_config`` reads the file and the environment through it (types validated, errors naming the
setting and where its value came from), lays the flags given on the command line over them, and builds the
dataclass, whose own checks (ranges, paths, ``~`` expansion, keys) run last.

* file keys and variable names are the field names: ``port = 8001`` / ``LORA_RETRIEVER_PORT=8001``,
  ``pools = ["a.json"]`` / ``LORA_RETRIEVER_POOLS=a.json,b.json`` (a list: commas or a JSON array);
* a ``.toml`` file is read whole (or its ``[lora_retriever]`` table if it has one), a ``.yaml``/``.yml`` file
  is a mapping; paths in it are relative to the working directory, as on the command line;
* ``LORA_RETRIEVER_CONFIG`` names the file when ``--config`` is not given.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

__all__ = ["CONFIG_ENV", "ENV_PREFIX", "add_settings_flags", "load_config", "settings_model"]

ENV_PREFIX = "LORA_RETRIEVER_"
CONFIG_ENV = ENV_PREFIX + "CONFIG"
TOML_TABLE = "lora_retriever"


def add_settings_flags(parser: argparse.ArgumentParser, config_cls: type) -> None:
    """Add ``--config FILE``, and make the flags of ``config_cls``'s fields default to "not given" (their
    defaults still show in ``--help``), so ``load_config`` can tell a flag from a default."""
    fields = {f.name for f in dataclasses.fields(config_cls)}
    for action in parser._actions:
        if action.dest in fields:
            action.default = argparse.SUPPRESS
    parser.add_argument(
        "--config",
        metavar="FILE",
        help=f"a TOML or YAML file of settings (keys: the flags' field names, e.g. port = 8001, pools = [...]); "
        f"flags override {ENV_PREFIX}<FIELD> variables, which override the file (default: ${CONFIG_ENV})",
    )


@functools.cache
def settings_model(config_cls: type) -> type:
    """The pydantic-settings model of a config dataclass: one field per dataclass field (type, default, help),
    read from ``LORA_RETRIEVER_<FIELD>``; unknown keys are refused."""
    from pydantic import Field, create_model, field_validator
    from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

    hints = typing.get_type_hints(config_cls)
    definitions: dict[str, Any] = {}
    lists = []
    for f in dataclasses.fields(config_cls):
        hint = hints[f.name]
        if typing.get_origin(hint) is list:
            hint = Annotated[hint, NoDecode]  # parsed by _split below: commas or a JSON array
            lists.append(f.name)
        if f.default is not dataclasses.MISSING:
            spec = Field(default=f.default, description=f.metadata.get("help"))
        elif f.default_factory is not dataclasses.MISSING:
            spec = Field(default_factory=f.default_factory, description=f.metadata.get("help"))
        else:
            spec = Field(description=f.metadata.get("help"))
        definitions[f.name] = (hint, spec)

    def split(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        if value.strip().startswith("["):
            return json.loads(value)
        return [part.strip() for part in value.split(",") if part.strip()]

    validators = {"_split": field_validator(*lists, mode="before")(split)} if lists else {}

    class Base(BaseSettings):
        model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", case_sensitive=False)

    return create_model(
        f"{config_cls.__name__}Settings", __base__=Base, __validators__=validators, **definitions
    )


def load_config(
    config_cls: type,
    *,
    cli: Mapping[str, Any] | None = None,
    config_file: str | Path | None = None,
) -> Any:
    """``config_cls`` from its defaults, ``config_file`` (or ``$LORA_RETRIEVER_CONFIG``), the environment and
    ``cli`` (field name -> value, only the flags given), in increasing precedence.

    Raises:
        FileNotFoundError: ``config_file`` does not exist.
        ValueError: a setting of the wrong type, an unknown key in the file, an unreadable file, or what the
            dataclass's own validation refuses; the message names the setting and its source.
    """
    from pydantic import ValidationError
    from pydantic_settings import BaseSettings

    cli = dict(cli or {})
    config_file = config_file or os.environ.get(CONFIG_ENV) or None
    path = None if config_file is None else _check_file(config_file)
    base = settings_model(config_cls)

    class Loader(base):  # type: ignore[misc, valid-type]
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings,
            env_settings,
            dotenv_settings,
            file_secret_settings,
        ):
            return (
                init_settings,
                env_settings,
                *([] if path is None else [_file_source(settings_cls, path)]),
            )

    try:
        settings = Loader(**cli)
    except ValidationError as err:
        raise ValueError(_describe(err, cli, path, config_cls)) from None
    return config_cls(**settings.model_dump(exclude_unset=True))


def _check_file(config_file: str | Path) -> Path:
    path = Path(config_file).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--config {path} does not exist (or is not a file); check the path")
    if path.suffix.lower() not in (".toml", ".yaml", ".yml"):
        raise ValueError(f"--config {path}: the file must end in .toml, .yaml or .yml, got {path.suffix!r}")
    return path


def _file_source(settings_cls: type, path: Path) -> Any:
    """The pydantic-settings source of ``path`` (read now, so a malformed file fails with its name)."""
    from pydantic_settings import TomlConfigSettingsSource, YamlConfigSettingsSource

    try:
        if path.suffix.lower() == ".toml":
            source = TomlConfigSettingsSource(settings_cls, toml_file=path)
            if isinstance(source.toml_data.get(TOML_TABLE), dict):
                source = TomlConfigSettingsSource(
                    settings_cls, toml_file=path, toml_table_header=(TOML_TABLE,)
                )
            data = source.toml_data
        else:
            source = YamlConfigSettingsSource(settings_cls, yaml_file=path)
            data = source.yaml_data
    except ImportError as err:
        raise ImportError(f"--config {path}: reading YAML needs PyYAML (pip install pyyaml): {err}") from err
    except Exception as err:  # tomllib.TOMLDecodeError, yaml.YAMLError, ...: one message naming the file
        raise ValueError(f"--config {path} is not readable {path.suffix[1:].upper()}: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"--config {path} must hold a mapping of settings, got {type(data).__name__}")
    return source


def _describe(err: Any, cli: Mapping[str, Any], path: Path | None, config_cls: type) -> str:
    """One line per invalid setting: its name, where its value came from, what is wrong with it."""
    flags = {f.name: f.metadata.get("flag", f.name) for f in dataclasses.fields(config_cls)}
    environ = {k.upper(): k for k in os.environ}
    lines = []
    for error in err.errors():
        name = str(error["loc"][0]) if error["loc"] else "?"
        if error["type"] == "extra_forbidden":
            lines.append(f"unknown setting {name!r} in {path}; settings: {sorted(flags)}")
            continue
        variable = ENV_PREFIX + name.upper()
        if name in cli:
            source = f"--{flags.get(name, name)}"
        elif variable in environ:
            source = f"${environ[variable]}"
        else:
            source = f"{name} in {path}"
        lines.append(f"setting {name} ({source}): {error['msg']}, got {error.get('input')!r}")
    return "\n".join(lines)
