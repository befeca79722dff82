"""Options declared once on a dataclass, derived everywhere else.

A configuration dataclass (`ExtractSpec`) marks each field with `option(...)`: its help, its
flat name, its allowed values and whether the service accepts it. From that one declaration
come the command-line flags (`add_arguments`), the flat JSON form (`to_flat` / `from_flat`,
used by spec files, the job queue and the service), the checks (`check_values`) and, in the
service, the request model. Adding an option means adding one field.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any, TypeVar, Union

from .errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class Option:
    help: str
    name: str | None = None  # flat name (JSON key; flag --name) when it differs from the attribute
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    pattern: str | None = None  # values must match (full match)
    submit: bool = True  # the extraction service accepts it from clients
    required_to_submit: bool = False
    flag: bool = True  # has its own command-line flag (False: set another way, e.g. `-S`)
    default_text: str | None = None  # what a None default means, for help texts
    parse: Callable[[str], Any] | None = None  # command-line parser for the value
    metavar: str | None = None


def option(default: Any = MISSING, *, default_factory: Any = MISSING, **settings: Any) -> Any:
    """A dataclass field carrying its `Option`."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"option": Option(**settings)})


def nested(default_factory: Callable[[], Any]) -> Any:
    """A dataclass field holding another options dataclass whose options are flattened into this one's."""
    return dataclasses.field(default_factory=default_factory, metadata={"nested": True})


@dataclass(frozen=True)
class OptionField:
    name: str  # flat name
    path: tuple[str, ...]  # attribute path from the top dataclass
    hint: Any  # the value type, Optional stripped
    optional: bool
    default: Any
    option: Option

    @property
    def flag(self) -> str:
        if self.hint is bool and self.default is True:
            return "--no-" + self.name.replace("_", "-")
        return "--" + self.name.replace("_", "-")

    def default_help(self) -> str:
        if self.option.default_text is not None:
            return f"default: {self.option.default_text}"
        if self.hint is bool:
            return ""
        return f"default: {self.default}" if self.default is not None else ""


def option_fields(cls: type) -> list[OptionField]:
    """Every option of a dataclass, nested ones flattened, in declaration order."""
    return list(_walk(cls, ()))


def _walk(cls: type, prefix: tuple[str, ...]) -> Iterator[OptionField]:
    hints = typing.get_type_hints(cls)
    for item in dataclasses.fields(cls):
        if item.metadata.get("nested"):
            yield from _walk(hints[item.name], (*prefix, item.name))
            continue
        settings: Option | None = item.metadata.get("option")
        if settings is None:
            continue
        hint, optional = _strip_optional(hints[item.name])
        default = item.default if item.default is not MISSING else (
            item.default_factory() if item.default_factory is not MISSING else None)
        yield OptionField(settings.name or item.name, (*prefix, item.name), hint, optional, default, settings)


def _strip_optional(hint: Any) -> tuple[Any, bool]:
    if typing.get_origin(hint) in (Union, types.UnionType):
        args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        return (args[0] if len(args) == 1 else hint), len(args) < len(typing.get_args(hint))
    return hint, False


def to_flat(config: Any) -> dict[str, Any]:
    """The flat JSON form: {flat name: value} for every option."""
    result = {}
    for item in option_fields(type(config)):
        value = config
        for attribute in item.path:
            value = getattr(value, attribute)
        result[item.name] = value
    return result


def from_flat(cls: type[T], values: dict[str, Any], where: str = "options") -> T:
    """Build `cls` from its flat form; None means the default; unknown names are refused."""
    by_name = {item.name: item for item in option_fields(cls)}
    unknown = sorted(set(values) - set(by_name))
    if unknown:
        raise ConfigError(f"{where}: unknown option(s) {', '.join(unknown)}; known: {', '.join(by_name)}")
    tree: dict[str, Any] = {}
    for name, value in values.items():
        if value is None:
            continue
        item = by_name[name]
        if not fits_type(value, item.hint):
            raise ConfigError(f"{where}: {name} = {value!r} is not a valid {type_name(item.hint)}")
        node = tree
        for attribute in item.path[:-1]:
            node = node.setdefault(attribute, {})
        node[item.path[-1]] = value
    return _build(cls, tree)


def _build(cls: type[T], tree: dict[str, Any]) -> T:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in tree.items():
        kwargs[name] = _build(hints[name], value) if isinstance(value, dict) and dataclasses.is_dataclass(
            hints[name]) else value
    return cls(**kwargs)


def fits_type(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a (simple) type hint: str, int, float, bool, X | None, list[X], dict[...]."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(fits_type(value, option) for option in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is Any:
        return True
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(fits_type(element, item) for element in value)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, hint)


def type_name(hint: Any) -> str:
    if typing.get_origin(hint) is None and hasattr(hint, "__name__"):
        return hint.__name__
    return str(hint).replace("typing.", "").replace("NoneType", "None")


def check_values(config: Any) -> None:
    """Refuse values outside an option's choices, bounds or pattern, naming its flag."""
    flat = to_flat(config)
    for item in option_fields(type(config)):
        value = flat[item.name]
        if value is None:
            continue
        settings = item.option
        if settings.choices is not None and value not in settings.choices:
            raise ConfigError(f"{item.flag} {value!r} is not one of {', '.join(map(str, settings.choices))}")
        if settings.minimum is not None and value < settings.minimum:
            raise ConfigError(f"{item.flag} must be at least {settings.minimum:g}, got {value}")
        if settings.maximum is not None and value > settings.maximum:
            raise ConfigError(f"{item.flag} must be at most {settings.maximum:g}, got {value}")
        if settings.pattern is not None and not re.fullmatch(settings.pattern, str(value)):
            raise ConfigError(f"{item.flag} {value!r} must match {settings.pattern}")


def read_options_file(path: str | Path, what: str) -> dict[str, Any]:
    """The JSON object of options in a file (`what` names it in errors: "extraction spec", ...)."""
    try:
        values = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot read the {what} {path}: {error}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"the {what} {path} must be a JSON object of options")
    return values


def comma_list(text: str) -> list[str]:
    return [part for part in text.split(",") if part]


def add_arguments(parser: argparse.ArgumentParser, cls: type, submit_only: bool = False) -> None:
    """One flag per option (the submittable ones with `submit_only`). Flags left out are absent from the
    parsed namespace (argparse.SUPPRESS), so `given_values` returns only what was typed."""
    for item in option_fields(cls):
        settings = item.option
        if not settings.flag or (submit_only and not settings.submit):
            continue
        text = settings.help + (f" ({item.default_help()})" if item.default_help() else "")
        common: dict[str, Any] = {"dest": item.name, "default": argparse.SUPPRESS, "help": text}
        if item.hint is bool:
            parser.add_argument(item.flag, action="store_false" if item.default else "store_true", **common)
            continue
        if settings.parse is not None:
            convert: Callable[[str], Any] = settings.parse
        elif typing.get_origin(item.hint) is list:
            convert = comma_list
        else:
            convert = item.hint
        parser.add_argument(item.flag, type=convert, choices=settings.choices, metavar=settings.metavar,
                            required=submit_only and settings.required_to_submit, **common)


def given_values(args: argparse.Namespace, cls: type, submit_only: bool = False) -> dict[str, Any]:
    """The flat values of the options whose flags (those `add_arguments` made) were given on the command line."""
    return {item.name: getattr(args, item.name) for item in option_fields(cls)
            if item.option.flag and (item.option.submit or not submit_only) and hasattr(args, item.name)}


def parse_layers(text: str) -> list[int] | None:
    """'all' (None) or comma-separated hidden-state indices such as 0,6,-1."""
    if text.strip().lower() == "all":
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers takes 'all' or comma-separated integers, got {text!r}"
                                         ) from None
