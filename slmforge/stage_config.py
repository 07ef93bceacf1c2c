"""One typed config per stage: a plain dataclass whose fields (type, default, help) are the only place a
setting is defined. The recipe YAML is read into it (validated by pydantic, errors naming file:line and the
field) and the stage's CLI options are made from it, so a default cannot differ between the two.

    @dataclass
    class FinetuneConfig:
        lr: float | None = setting(None, "Peak learning rate (default: 2e-5 full, 1e-3 LoRA).")

    @app.command()
    @options_from(FinetuneConfig)
    def finetune(cfg: FinetuneConfig, model: Path = ..., ...) -> None: ...   # gets --lr, ... from the config
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import re
import types
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin, get_type_hints

import yaml
from pydantic import ConfigDict, TypeAdapter, ValidationError

from slmforge.errors import SlmforgeError

STRICT = ConfigDict(extra="forbid")  # unknown fields are errors; set on every config dataclass


def setting(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = None,
            aliases: tuple[str, ...] = ()) -> Any:
    """A config field with its help text (the CLI's --help and the docs read it) and any other CLI flags
    it answers to (aliases=("--steps",))."""
    meta = {"help": help, "aliases": aliases}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# ---------------------------------------------------------------------------------------------------------
# YAML with line numbers


class LineMap(dict):
    """A YAML mapping that remembers its own line and the line of each key."""

    line: int = 1
    lines: dict


class _LineLoader(yaml.SafeLoader):
    pass


def _construct_map(loader: _LineLoader, node: yaml.MappingNode) -> LineMap:
    m = LineMap(loader.construct_mapping(node, deep=True))
    m.line = node.start_mark.line + 1
    m.lines = {k.value: k.start_mark.line + 1 for k, _ in node.value if isinstance(k, yaml.ScalarNode)}
    return m


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_map)
# YAML 1.1 reads `lr: 1e-3` as a string (its floats need a dot); configs are full of such numbers.
_LineLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
                                  list("-+0123456789"))


MAX_YAML_VALUES = 100_000  # a config has hundreds; more can only come from aliases multiplying each other


def check_yaml_size(value: Any, where: str | Path) -> None:
    """Refuse a YAML value with more than MAX_YAML_VALUES values once its aliases are expanded: a "billion
    laughs" file (nine aliases of nine aliases of ...) is a few lines, but json.dumps, pydantic or any walk
    over it would run for hours. Counted without recursion, and stopping at the limit, so this is quick."""
    stack, n = [value], 0
    while stack:
        v = stack.pop()
        n += 1
        if n > MAX_YAML_VALUES:
            raise SlmforgeError(f"{where}: more than {MAX_YAML_VALUES:,} values once its YAML aliases (*name) "
                                f"are expanded; a config is not that large")
        if isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)


def read_yaml(path: str | Path) -> Any:
    """A YAML file whose mappings know their lines; bad YAML or bytes are one error naming file:line."""
    path = Path(path)
    try:
        value = yaml.load(path.read_text(encoding="utf-8"), Loader=_LineLoader)
    except UnicodeDecodeError as e:
        raise SlmforgeError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        reason = str(getattr(e, "problem", None) or e).splitlines()[0]  # (a ReaderError adds a line of position)
        raise SlmforgeError(f"{path}{line}: invalid YAML ({reason})") from None
    except RecursionError:  # PyYAML composes and constructs recursively: a few hundred levels overflow it
        raise SlmforgeError(f"{path}: invalid YAML (nested too deeply)") from None
    check_yaml_size(value, path)
    return value


def read_config_file(path: str | Path, what: str, fields: str) -> dict:
    """A config file's top-level mapping (an empty file is {}): a missing file, bad YAML or anything but a
    mapping is one error naming the file (`what` names the config, `fields` lists its sections)."""
    path = Path(path)
    if not path.is_file():
        raise SlmforgeError(f"{path}: no such {what} file")
    raw = read_yaml(path)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SlmforgeError(f"{path}:1: {'an' if what[0] in 'aeiou' else 'a'} {what} is a mapping ({fields})")
    return raw


def yaml_value(text: str) -> Any:
    """A value written as YAML on a command line (`--set lr=1e-3`), read as read_yaml reads files."""
    try:
        return yaml.load(text, Loader=_LineLoader)
    except yaml.YAMLError as e:
        raise SlmforgeError(f"{text!r}: not a YAML value ({getattr(e, 'problem', None) or e})") from None


def line_of(raw: Any, loc: tuple) -> int:
    """The line of the deepest mapping key on the path `loc` (pydantic's error location) in `raw`."""
    line, node = getattr(raw, "line", 1), raw
    for key in loc:
        if isinstance(node, LineMap) and key in node:
            line, node = node.lines.get(key, node.line), node[key]
        elif isinstance(node, list) and isinstance(key, int) and key < len(node):
            node = node[key]
            line = getattr(node, "line", line)
        else:
            break
    return line


def set_fields(raw: dict, values: dict[str, Any], where: str | Path = "config") -> None:
    """Set dotted fields ("pretrain.max_minutes") in a mapping read by read_yaml, making the mappings on the
    way; a value of None removes the field (back to its default). Checked afterwards by build()."""
    for dotted, value in values.items():
        *parents, key = dotted.split(".")
        node = raw
        for name in parents:
            if not isinstance(node.get(name), dict):
                if node.get(name) is not None:
                    raise SlmforgeError(f"{where}: cannot set {dotted}: {name} is not a mapping")
                child = LineMap()
                child.line, child.lines = getattr(node, "line", 1), {}
                node[name] = child
            node = node[name]
        if value is None:
            node.pop(key, None)
        else:
            node[key] = value


# ---------------------------------------------------------------------------------------------------------
# Validation


def find_nan(value) -> tuple | None:
    """The place (keys and indexes) of a NaN float inside a JSON/YAML value, or None. NaN passes every
    type check (it is a float) and every range check written `if x <= 0: raise` (all comparisons are false),
    so build() looks for it explicitly. Infinity is left to each setting's own range check."""
    stack = [((), value)]
    while stack:
        loc, v = stack.pop()
        if isinstance(v, float) and v != v:
            return loc
        if isinstance(v, dict):  # (reversed: the first NaN in the file is the one reported)
            stack.extend(reversed([((*loc, k), x) for k, x in v.items()]))
        elif isinstance(v, (list, tuple)):
            stack.extend(reversed([((*loc, i), x) for i, x in enumerate(v)]))
    return None


@functools.cache
def _adapter(cls: type) -> TypeAdapter:
    return TypeAdapter(cls)


def _message(err: dict) -> str:
    kind, got = err["type"], err.get("input")
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        return "unknown field"
    if kind == "missing":
        return "missing field"
    return f"{err['msg'][0].lower()}{err['msg'][1:]}, got {json.dumps(got) if _jsonable(got) else type(got).__name__}"


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def build(cls: type, raw: Any, where: str | Path = "config") -> Any:
    """cls from a mapping (as read by read_yaml), every field type-checked strictly (a quoted "2" is not
    an integer, true is not a number); unknown fields are errors. One SlmforgeError naming file:line and the
    dotted field; __post_init__ checks of the dataclasses run too and are reported with the file."""
    nan = find_nan(raw)
    if nan is not None:  # a float, so no type check stops it, and `x <= 0` is false for it
        field = ".".join(str(k) if isinstance(k, str) else f"[{k}]" for k in nan).replace(".[", "[")
        raise SlmforgeError(f"{where}:{line_of(raw, nan)}: field '{field}': NaN is not a number a setting "
                            f"can have")
    try:
        text = json.dumps(raw)
    except (TypeError, ValueError) as e:  # YAML dates and the like
        raise SlmforgeError(f"{where}: {e}") from None
    try:
        return _adapter(cls).validate_json(text, strict=True)
    except ValidationError as e:
        err = e.errors()[0]
        loc = tuple(err["loc"])
        if err["type"] == "missing" and loc:  # the field is missing from its parent mapping
            line = line_of(raw, loc[:-1])
        else:
            line = line_of(raw, loc)
        field = ".".join(str(k) if isinstance(k, str) else f"[{k}]" for k in loc).replace(".[", "[")
        if err["type"] == "value_error":  # raised by a __post_init__ check
            msg = str(err.get("ctx", {}).get("error", err["msg"]))
            raise SlmforgeError(f"{where}:{line}: {msg}") from None
        raise SlmforgeError(f"{where}:{line}: field '{field}': {_message(err)}") from None
    except SlmforgeError as e:  # a __post_init__ check
        raise SlmforgeError(f"{where}: {e}") from None


# ---------------------------------------------------------------------------------------------------------
# CLI options from a config


def _cli_type(hint: Any) -> Any:
    """The type typer parses: lists of strings are taken comma-separated (--lora-targets q_proj,v_proj)."""
    args = [a for a in get_args(hint) if a is not type(None)]
    if get_origin(hint) in (Union, types.UnionType) and len(args) == 1:
        inner = _cli_type(args[0])
        return inner if inner is str else inner | None
    if get_origin(hint) is list:
        return str
    return hint


def _from_cli(value: Any, hint: Any) -> Any:
    args = [a for a in get_args(hint) if a is not type(None)]
    if get_origin(hint) in (Union, types.UnionType) and len(args) == 1:
        return None if value is None else _from_cli(value, args[0])
    if get_origin(hint) is list and isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


def options_from(cls: type, exclude: tuple[str, ...] = (), name: str = "cfg") -> Any:
    """Decorate a typer command `fn(cfg, **its own options)`: every field of cls becomes a --option with the
    field's default and help, and fn receives the built config as `name`. Fields in `exclude` keep their
    default. Decorators for two configs stack (`name="kd"` on one of them) when their fields differ."""
    hints = get_type_hints(cls)
    cfg_fields = [f for f in dataclasses.fields(cls) if f.init and f.name not in exclude]

    def decorate(fn):
        own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.name != name]
        clash = {p.name for p in own} & {f.name for f in cfg_fields}
        if clash:
            raise TypeError(f"options_from({cls.__name__}): {sorted(clash)} are options already")
        params = list(own)
        for f in cfg_fields:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if isinstance(default, list):
                default = ",".join(map(str, default))
            import typer

            flag = f"--{f.name.replace('_', '-')}"
            if hints[f.name] is bool:  # both ways: a default of True must be able to go off (--no-progress)
                flag = f"{flag}/--no-{flag[2:]}"
            flags = (flag, *f.metadata.get("aliases", ()))
            option = typer.Option(*flags, help=f.metadata.get("help", ""))
            params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                            annotation=Annotated[_cli_type(hints[f.name]), option]))

        @functools.wraps(fn)
        def command(**kwargs):
            values = {f.name: _from_cli(kwargs.pop(f.name), hints[f.name]) for f in cfg_fields}
            return fn(**{name: cls(**values)}, **kwargs)

        command.__signature__ = inspect.Signature(params)
        command.__annotations__ = {}
        del command.__wrapped__  # typer must read the new signature, not fn's
        return command

    return decorate
