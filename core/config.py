"""Configuration: one dataclass per entry point, filled from a YAML file, then `--key value` overrides.

Unknown keys (in the YAML or on the command line) and values of the wrong type are errors that name
the file and the key. The resolved config is saved beside every run (`save_config`).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

from core.errors import InputError
from core.io import atomic_write_text
from core.provenance import write_provenance

T = TypeVar("T")
CLI = "command line"
# The keys a nested mapping option (a model spec) may hold: key -> the schema of its value (a mapping option
# itself) or None (any value). A callable builds the schema when it is first needed (from a library's config class).
KeySchema = typing.Mapping[str, Any]


def nested_keys(schema: KeySchema | typing.Callable[[], KeySchema]) -> dict[str, Any]:
    """Field metadata declaring the keys a mapping option may hold, so that a typo inside it (`model.pretrianed`) is
    an error naming the file and the key path, not a silently different model: `field(..., metadata=nested_keys(S))`."""
    return {"keys": schema}


def check_nested_keys(value: Any, schema: KeySchema | typing.Callable[[], KeySchema], source: str, path: str) -> None:
    """Refuse any key of `value` (a mapping, or a JSON object given as text) that `schema` does not list."""
    schema = schema() if callable(schema) else schema
    if isinstance(value, str) and value.lstrip().startswith("{"):
        value = yaml.safe_load(value)
    if not isinstance(value, typing.Mapping):
        return
    for key, item in value.items():
        if key not in schema:
            raise InputError(source, f"{path}.{key}", f"unknown key; known keys here: {', '.join(sorted(schema))}")
        if schema[key] is not None:
            check_nested_keys(item, schema[key], source, f"{path}.{key}")


def dataclass_keys(cls: type) -> dict[str, None]:
    """The schema of a flat config class (a dataclass): its field names, any value."""
    return {f.name: None for f in dataclasses.fields(cls)}


def signature_keys(fn: typing.Callable, *extra: str) -> dict[str, None]:
    """The schema of the keyword arguments `fn` takes (a diffusers model's constructor, say), plus `extra` keys."""
    import inspect

    names = [n for n, p in inspect.signature(fn).parameters.items() if n != "self" and p.kind is not p.VAR_KEYWORD]
    return {n: None for n in [*names, *extra]}


def hf_config_keys(config_cls: type, *extra: str) -> dict[str, None]:
    """The schema of a Hugging Face config class: every attribute its default instance serialises, plus `extra`."""
    return {n: None for n in [*config_cls().to_dict(), *extra]}


def parse_config(cls: type[T], argv: Sequence[str] | None = None) -> T:
    """Build `cls` from `--config file.yaml` (optional) and `--key value` overrides in `argv`."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(help_text(cls))
        raise SystemExit(0)
    config_path, overrides = _split_argv(cls, argv)
    values: dict[str, Any] = {}
    if config_path is not None:
        values.update(_read_yaml(cls, config_path))
    hints = typing.get_type_hints(cls)
    for key, raw in overrides.items():
        # A str setting takes the command-line text as it is: `--summary ""` is the empty string, not YAML null.
        literal = isinstance(raw, str) and _base_type(hints.get(key)) is str
        values[key] = _coerce(cls, key, raw if literal or not isinstance(raw, str) else yaml.safe_load(raw), CLI)
    return build_config(cls, values, source=str(config_path) if config_path else CLI)


def build_config(cls: type[T], values: dict[str, Any], source: str = CLI) -> T:
    """Instantiate `cls` from a mapping, checking keys and types."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            raise InputError(source, key, f"unknown key for {cls.__name__}; known keys: {', '.join(sorted(known))}")
    missing = [
        f.name for f in known.values()
        if f.name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise InputError(source, missing[0], "required key has no value (set it in the YAML or with --key value)")
    coerced = {k: _coerce(cls, k, v, source) for k, v in values.items()}
    for key, value in coerced.items():
        if "keys" in known[key].metadata:
            check_nested_keys(value, known[key].metadata["keys"], source, key)
    return cls(**coerced)


def save_config(cfg: Any, path: str | Path) -> None:
    """The resolved config as YAML, and beside it what the run was made with (core.provenance)."""
    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    write_provenance(Path(path).parent)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()}


def load_saved_config(cls: type[T], path: str | Path) -> T:
    return build_config(cls, _read_yaml(cls, Path(path)), source=str(path))


def help_text(cls: type) -> str:
    """Every option with its type, default and the comment its dataclass field carries (the one-line `# ...` after
    it, or the comment lines just above it)."""
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    lines = [f"{cls.__name__} options (--config FILE.yaml, then --key value):"]
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)")
        line = f"  --{f.name} {_type_name(hints[f.name])} = {default!r}"
        lines.append(f"{line}  # {comments[f.name]}" if f.name in comments else line)
    return "\n".join(lines)


def field_comments(cls: type) -> dict[str, str]:
    """Field name → its comment in the source of `cls` and its dataclass bases (a subclass's comment wins)."""
    import inspect
    import re

    found: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):  # defined where no source is kept (an interactive session)
            continue
        above: list[str] = []
        for text in source[1:]:
            stripped = text.strip()
            if stripped.startswith("#"):
                above.append(stripped.lstrip("# ").rstrip())
                continue
            field = re.match(r"\s+(\w+)\s*:[^=]*(?:=.*?)?(?:#\s*(.*))?$", text)
            if field and not stripped.startswith(("def ", "@")):
                comment = field.group(2) or " ".join(above)
                if comment:
                    found[field.group(1)] = comment.strip()
            above = []
    return found


def _split_argv(cls: type, argv: list[str]) -> tuple[Path | None, dict[str, Any]]:
    hints = typing.get_type_hints(cls)
    config_path, overrides, i = None, {}, 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--"):
            raise InputError(CLI, token, "expected --key value")
        key, _, inline = token[2:].partition("=")
        key = key.replace("-", "_")
        if inline:
            value, i = inline, i + 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value, i = argv[i + 1], i + 2
        elif _base_type(hints.get(key)) is bool:
            value, i = True, i + 1
        else:
            raise InputError(CLI, key, "option needs a value")
        if key == "config":
            config_path = Path(value)
        else:
            if key not in hints:
                known = ", ".join(sorted(f.name for f in dataclasses.fields(cls)))
                raise InputError(CLI, key, f"unknown option for {cls.__name__}; known options: {known}")
            overrides[key] = value
    return config_path, overrides


def _read_yaml(cls: type, path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise InputError(path, None, "config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise InputError(path, None, f"not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise InputError(path, None, "a config file must be a mapping of key: value")
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            raise InputError(path, key, f"unknown key for {cls.__name__}; known keys: {', '.join(sorted(known))}")
    return {k: _coerce(cls, k, v, str(path)) for k, v in data.items()}


def _base_type(tp: Any) -> Any:
    """Strip Optional[...] / `X | None` to X."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def _coerce(cls: type, key: str, value: Any, source: str) -> Any:
    tp = typing.get_type_hints(cls)[key]
    optional = type(None) in typing.get_args(tp)
    if value is None:
        if optional:
            return None
        raise InputError(source, key, f"must be a {_type_name(tp)}, got null")
    base = _base_type(tp)
    origin = typing.get_origin(base) or base
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            raise TypeError
        if base is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError
            return value
        if base is float:
            if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
                value = float(value)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError
            return float(value)
        if base in (str, Path):
            return base(value) if isinstance(value, (str, int, float, Path)) else _raise()
        if origin in (list, tuple):
            if isinstance(value, str):
                value = [v for v in value.split(",") if v]
            if not isinstance(value, (list, tuple)):
                raise TypeError
            (item,) = typing.get_args(base)[:1] or (Any,)
            if item in (int, float, str):
                value = [item(v) for v in value]
            return list(value)
        if origin is dict:
            if not isinstance(value, dict):
                raise TypeError
            return dict(value)
        return value
    except (TypeError, ValueError):
        raise InputError(source, key, f"must be a {_type_name(tp)}, got {value!r}") from None


def _raise() -> Any:
    raise TypeError


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
