"""User-facing errors: the CLI prints these as one line and exits non-zero, without a traceback."""


class SlmforgeError(Exception):
    """A problem with the user's input (a file, a flag, a config field), not a bug in slmforge."""


class ConfigError(SlmforgeError, ValueError):
    """A stage config's own check failed. A ValueError too, so that pydantic, validating a recipe, reports it
    at the config's place in the YAML file (stage_config.build)."""


class FieldError(SlmforgeError):
    """A config field with a bad value. `loc` is the field's path (keys and list indexes), so that a loader
    can put the file and line in front of the message."""

    def __init__(self, loc: tuple, msg: str):
        self.loc, self.msg = tuple(loc), msg
        super().__init__(f"{format_loc(self.loc)}: {msg}")


def format_loc(loc: tuple) -> str:
    """("stages", 0, "dedup", "threshold") -> "stages[0].dedup.threshold"."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out


def check_types(values: dict, hints: dict, loc: tuple = ()) -> None:
    """Check each value against its type hint as JSON/YAML data, strictly: "192" is not an integer and
    1 is not a boolean, but 1 is a number and a list is a tuple. Raises FieldError for the first bad one.

    pydantic does the checking; values are round-tripped through JSON because pydantic's strict mode for
    Python objects wants tuples as tuples and dataclasses as instances, while its JSON mode has exactly the
    rules a config file needs."""
    import json

    from pydantic import ValidationError

    for key, value in values.items():
        if key not in hints:
            continue
        try:
            _adapter(hints[key]).validate_json(json.dumps(value, default=str), strict=True)
        except ValidationError:
            raise FieldError((*loc, key), f"expected {describe_type(hints[key])}, got {_show(value)}") from None


def describe_type(tp) -> str:
    """int -> "an integer", float | None -> "a number or null", list[str] -> "a list of strings"."""
    import types
    import typing

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe_type(a) for a in args)
    if origin in (list, tuple):
        inner = [a for a in args if a is not Ellipsis]
        return f"a list of {_PLURAL.get(inner[0], 'values')}" if len(set(inner)) == 1 else "a list"
    return _WORDS.get(origin or tp, getattr(tp, "__name__", str(tp)))


_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a mapping",
          list: "a list", tuple: "a list", type(None): "null"}
_PLURAL = {int: "integers", float: "numbers", bool: "booleans", str: "strings", dict: "mappings"}


def _show(value) -> str:
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _adapter(tp):
    from pydantic import TypeAdapter

    if tp not in _ADAPTERS:
        _ADAPTERS[tp] = TypeAdapter(tp)
    return _ADAPTERS[tp]


_ADAPTERS: dict = {}
