"""Plain-YAML configs mapped onto dataclasses, with `key=value` overrides from the command line.

Every stage declares its settings as one dataclass (nested dataclasses for groups such as
`frames`), then calls `parse_config(Config)`:

    python eval.py --config configs/eval.yaml frames.num=16 model=/ckpt/qwen

Values are parsed as YAML (`16` is an int, `true` a bool, `[1, 2]` a list, `null` None).
An unknown key or a value of the wrong type stops the stage before any work, with a
message that names the key and where it came from. The resolved config is written next to
the stage's outputs with `save_config`, so every result says exactly how it was made.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key is unknown, has the wrong type, or holds a value the stage cannot use."""


def require(condition: bool, key: str, message: str) -> None:
    """Stage-level validation helper: `require(cfg.frames.num > 0, "frames.num", "must be > 0")`."""
    if not condition:
        raise ConfigError(f"{key}: {message}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against the annotation `tp`, converting only where it is lossless (int -> float)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key, source)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({source})")
    if origin is Literal:
        if value not in get_args(tp):
            allowed = ", ".join(repr(a) for a in get_args(tp))
            raise ConfigError(f"{key}: {value!r} is not one of {allowed} ({source})")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r} ({source})")
        (item_tp, *_) = get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r} ({source})")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r} ({source})")
        return _build(tp, value, key + ".", source)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r} ({source})")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r} ({source})")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads `1e-3` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r} ({source})")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            # YAML reads `model=123` as an int; a path or name given that way is still meant as text.
            if isinstance(value, int | float) and not isinstance(value, bool):
                return str(value)
            raise ConfigError(f"{key}: expected a string, got {value!r} ({source})")
        return value
    raise ConfigError(f"{key}: unsupported annotation {_type_name(tp)}")


def _build(cls: type[T], values: dict, prefix: str, source: str) -> T:
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in values:
        if name not in fields:
            known = ", ".join(sorted(prefix + f for f in fields))
            raise ConfigError(f"unknown key '{prefix}{name}' ({source}); known keys: {known}")
    kwargs = {}
    for name, value in values.items():
        kwargs[name] = _coerce(value, hints[name], prefix + name, source)
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field without a default
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {e} ({source})") from e


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for p in parents:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: '{p}' is not a group of keys")
        node = child
    node[leaf] = value


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def load_config(cls: type[T], path: str | Path | None = None, overrides: typing.Sequence[str] = (),
                validate: bool = True) -> T:
    """Defaults of `cls` <- YAML file <- `key=value` overrides; raises ConfigError naming the key.
    `validate=False` skips the stage's own checks (paths that exist, ranges), e.g. to lint configs."""
    values: dict = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of keys, got {type(loaded).__name__}")
        values = loaded
        source = str(path)
    cfg = _build(cls, values, "", source)
    if overrides:
        tree = to_dict(cfg)
        patch: dict = {}
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override '{item}' is not key=value")
            key, raw = item.split("=", 1)
            try:
                value = yaml.safe_load(raw) if raw != "" else ""
            except yaml.YAMLError:
                value = raw
            # Checked one by one first, so an error names the key as typed on the command line.
            _check_override(cls, key.strip(), value)
            _set_dotted(patch, key.strip(), value)
        cfg = _build(cls, _merge(tree, patch), "", "command line")
    check = getattr(cfg, "validate", None)
    if validate and callable(check):
        check()
    return cfg


def _check_override(cls: type, dotted: str, value: Any) -> None:
    """Walk `a.b.c` through the dataclass fields so an error names the key exactly as typed."""
    node: Any = cls
    parts = dotted.split(".")
    for depth, name in enumerate(parts):
        prefix = ".".join(parts[:depth])
        if not dataclasses.is_dataclass(node):
            raise ConfigError(f"unknown key '{dotted}' (command line): '{prefix}' is not a group of keys")
        hints = get_type_hints(node)
        if name not in hints or name not in {f.name for f in dataclasses.fields(node)}:
            known = ", ".join(sorted((prefix + "." if prefix else "") + f.name for f in dataclasses.fields(node)))
            raise ConfigError(f"unknown key '{dotted}' (command line); known keys: {known}")
        node = hints[name]
    _coerce(value, node, dotted, "command line")


def parse_config(cls: type[T], argv: typing.Sequence[str] | None = None) -> T:
    """Command-line entry: `--config FILE` then any number of `key=value`; exits 2 on a bad config."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(f"usage: {Path(sys.argv[0]).name} [--config FILE] [key=value ...]\n\nkeys (defaults):")
        print(yaml.safe_dump(to_dict(cls()) if _all_defaults(cls) else {}, sort_keys=False))
        sys.exit(0)
    path = None
    if argv and argv[0] == "--config":
        if len(argv) < 2:
            sys.exit("config error: --config needs a file")
        path, argv = argv[1], argv[2:]
    elif argv and argv[0].startswith("--config="):
        path, argv = argv[0].split("=", 1)[1], argv[1:]
    try:
        return load_config(cls, path, argv)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)


def _all_defaults(cls: type) -> bool:
    return all(
        f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        for f in dataclasses.fields(cls)
    )


def save_config(cfg: Any, out_dir: str | Path, name: str = "config.yaml") -> Path:
    """Write the resolved config next to a stage's outputs."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path
