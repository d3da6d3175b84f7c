"""Command-line flags built from a config dataclass: each flag's help, default and choices live on its field.

A field describes its flag through ``field(metadata=...)``, as PEFT's ``LoraConfig`` does::

    top_k: int = field(default=3, metadata={"help": "adapters retrieved per input"})
    merge_method: str = field(default="mixture", metadata={"help": "...", "choices": MERGE_METHODS})

Metadata keys (all optional):

* ``help``: the flag's help text; the default is appended (``(default: 3)``) unless it is ``None``/``False``.
* ``choices``: a sequence, or a zero-argument callable returning one (a registry such as
  ``lora_retriever.fusion.available_methods``), called when the parser is built.
* ``flag``: the flag's name when it differs from the field's (``pools`` -> ``--pool``).
* ``action``: ``"append"`` for a repeatable flag of a list field (default for lists: ``nargs="+"``).
* ``metavar``, ``group`` (the title of an argument group), ``cli`` (``False``: no flag for this field).

The flag's type comes from the field's annotation: ``str``, ``int``, ``float``, ``X | None``, ``list[X]``, and
``bool`` (``--flag`` sets ``True``; a field whose default is ``True`` gets ``--flag`` / ``--no_flag``).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

__all__ = ["add_config_arguments", "command_parser", "config_from_args", "config_kwargs"]

_ArgumentTarget = argparse.ArgumentParser | argparse._ArgumentGroup


def add_config_arguments(
    parser: argparse.ArgumentParser,
    config_cls: type,
    *,
    only: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    rename: Mapping[str, str] | None = None,
) -> list[str]:
    """Add one ``--flag`` per field of the dataclass ``config_cls`` to ``parser``.

    Args:
        parser: the parser (argument groups named by the fields' ``group`` metadata are created on it).
        config_cls: a dataclass whose fields carry ``metadata={"help": ...}``.
        only: add only these fields (in this order); default: every field with a flag.
        exclude: fields left out (set by the entry point itself, e.g. ``progress`` from ``--quiet``).
        rename: field name -> flag name, overriding the field's ``flag`` metadata (when one config's fields
            are offered under another tool's flag names).

    Returns:
        The names of the fields that got a flag (their values are ``args.<field name>``).
    """
    rename = dict(rename or {})
    hints = typing.get_type_hints(config_cls)
    by_name = {f.name: f for f in dataclasses.fields(config_cls)}
    names = list(only) if only is not None else [n for n, f in by_name.items() if f.metadata.get("cli", True)]
    unknown = sorted(set(names) - set(by_name))
    if unknown:
        raise ValueError(f"{config_cls.__name__} has no field(s) {unknown}")
    groups: dict[str, _ArgumentTarget] = {}
    added = []
    for name in names:
        if name in exclude:
            continue
        f = by_name[name]
        title = f.metadata.get("group")
        target = parser if title is None else groups.setdefault(title, parser.add_argument_group(title))
        flag = rename.get(name, f.metadata.get("flag", name))
        kwargs = _argument_kwargs(f, hints[name])
        if flag != name and "metavar" not in kwargs and "choices" not in kwargs and "type" in kwargs:
            kwargs["metavar"] = flag.upper()
        target.add_argument(f"--{flag}", dest=name, **kwargs)
        added.append(name)
    return added


def command_parser(description: str | None, *config_classes: type) -> argparse.ArgumentParser:
    """An entry point's parser: its module docstring as the description, one flag per field of each config,
    then the common flags (``--verbose``, ``--quiet``, ``--debug``, ``--threads``)."""
    from lora_retriever.cli.errors import add_common_flags

    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for config_cls in config_classes:
        add_config_arguments(parser, config_cls)
    add_common_flags(parser)
    return parser


def config_kwargs(config_cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The parsed values of ``config_cls``'s fields found in ``args`` (by field name)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls) if hasattr(args, f.name)}


def config_from_args(config_cls: type, args: argparse.Namespace, **extra: Any) -> Any:
    """``config_cls(**parsed fields, **extra)``; the config's own validation runs (``ValueError`` on bad input)."""
    return config_cls(**{**config_kwargs(config_cls, args), **extra})


def _argument_kwargs(f: dataclasses.Field, hint: Any) -> dict[str, Any]:
    meta = f.metadata
    hint, optional = _strip_optional(hint)
    default = _default(f)
    kwargs: dict[str, Any] = {}
    if "choices" in meta:
        choices = meta["choices"]
        kwargs["choices"] = list(choices() if callable(choices) else choices)
    if "metavar" in meta:
        kwargs["metavar"] = meta["metavar"]
    if hint is bool:
        if default is True:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["action"] = "store_true"
        kwargs["default"] = bool(default)
    elif typing.get_origin(hint) in (list, Sequence, tuple):
        (item,) = typing.get_args(hint)[:1] or (str,)
        kwargs["type"] = _scalar_type(item, f.name)
        if meta.get("action") == "append":
            kwargs["action"] = "append"
        else:
            kwargs["nargs"] = "+"
        kwargs["default"] = None if default is dataclasses.MISSING else default
    else:
        kwargs["type"] = _scalar_type(hint, f.name)
        if default is not dataclasses.MISSING:
            kwargs["default"] = default
    if default is dataclasses.MISSING:
        kwargs["required"] = True
        kwargs.pop("default", None)
    kwargs["help"] = _help(meta.get("help", ""), default, optional)
    return kwargs


def _strip_optional(hint: Any) -> tuple[Any, bool]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return hint, False


def _scalar_type(hint: Any, name: str) -> Callable[[str], Any]:
    if hint in (str, int, float):
        return hint
    raise TypeError(f"field {name!r}: no command-line type for {hint!r}; mark it metadata={{'cli': False}}")


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _help(text: str, default: Any, optional: bool) -> str:
    text = text.replace("%", "%%")  # argparse %-formats help strings
    if default is dataclasses.MISSING or default is None or default is False or default == []:
        return text
    shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
    return f"{text} (default: {shown})".strip()
