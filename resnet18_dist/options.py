"""Options as validated dataclasses: one declaration is a flag, a YAML key, a docs row and a rule.

Every command (train, prepare, export, predict, compare, sweep, serve) declares its options as an
``Options`` dataclass; :mod:`resnet18_dist.cli` turns any of them into an argparse parser, YAML
is read into them with :meth:`Options.from_dict`, and ``__post_init__`` validates every field from
its metadata (choices, bounds, required) before the class's own cross-field ``validate``. An
``Options`` whose fields are themselves ``Options`` has sections (``TrainConfig``: data, model,
optim, distill, run, cluster, device, logging), which are also the sections of its YAML file.

Errors are :class:`ConfigError` and name the flag (``--lr: must be > 0 (got -1.0)``).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import types
import typing
from dataclasses import MISSING, field
from pathlib import Path
from typing import Any, ClassVar

import yaml


class ConfigError(ValueError):
    """An invalid option. ``option`` is the flag name (``--lr``) so messages can point at it."""

    def __init__(self, option: str, message: str) -> None:
        self.option = option
        self.message = message
        super().__init__(f"{option}: {message}")

    def __reduce__(self) -> tuple[Any, ...]:
        # Ray sends a worker's exception to the driver pickled; the default reduce would call
        # ConfigError(full_text) and fail on the missing argument, losing the message.
        return (type(self), (self.option, self.message))


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def opt(
    default: Any = None,
    help: str = "",
    *,
    choices: tuple[Any, ...] | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    required: bool = False,
    positional: bool = False,
    nargs: str | None = None,
    const: Any = None,
    metavar: str | None = None,
    cli: bool = True,
    path: bool | tuple[str, ...] = False,
) -> Any:
    """A dataclass field with its CLI metadata and validation rules.

    ``ge``/``gt``/``le``/``lt`` bound a number (or every element of a tuple); ``required``
    refuses None; ``positional`` makes it a positional argument (with ``nargs``); ``nargs='?'``
    with ``const`` lets a flag stand alone (``--resume``); ``cli=False`` keeps an option out of
    the parser (set by code or YAML only). ``path`` marks a local path (a tuple: words that are
    not paths, such as ``torchvision``): the command line makes it absolute once, before any
    Ray worker or trial (each in its own working directory) sees it.
    """
    meta: dict[str, Any] = {"help": help}
    for key, value in (
        ("choices", choices),
        ("ge", ge),
        ("gt", gt),
        ("le", le),
        ("lt", lt),
        ("nargs", nargs),
        ("const", const),
        ("metavar", metavar),
    ):
        if value is not None:
            meta[key] = value
    meta["required"] = required
    meta["positional"] = positional
    meta["cli"] = cli
    if path:
        meta["path"] = path if isinstance(path, tuple) else ()
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


# ------------------------------------------------------------------------------ field types
@dataclasses.dataclass(frozen=True)
class FieldType:
    """What a field holds: a scalar kind, optionally optional, optionally a tuple/list of it."""

    kind: type  # int, float, str or bool (the element type for sequences)
    optional: bool = False
    sequence: type | None = None  # tuple or list
    length: int | None = None  # fixed tuple length, or None for any


def _field_type(annotation: Any) -> FieldType:
    optional = False
    origin = typing.get_origin(annotation)
    if isinstance(annotation, types.UnionType) or origin is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        annotation = args[0]
        origin = typing.get_origin(annotation)
    if origin in (tuple, list):
        args = typing.get_args(annotation)
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return FieldType(args[0], optional, tuple, None)
        if origin is tuple:
            return FieldType(args[0], optional, tuple, len(args))
        return FieldType(args[0], optional, list, None)
    return FieldType(annotation, optional)


@functools.cache
def field_types(cls: type) -> dict[str, FieldType | type]:
    """Each field's FieldType, or the Options class of a section (``typing.get_type_hints``
    resolves the annotations that ``from __future__ import annotations`` leaves as text)."""
    hints = typing.get_type_hints(cls)
    out: dict[str, FieldType | type] = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if isinstance(hint, type) and issubclass(hint, Options):
            out[f.name] = hint
        else:
            out[f.name] = _field_type(hint)
    return out


TRUE_WORDS = ("true", "yes", "on", "1")
FALSE_WORDS = ("false", "no", "off", "0")


def _coerce_scalar(value: Any, kind: type, option: str, choices: tuple | None) -> Any:
    # YAML reads an unquoted on/off/yes/no as a boolean; an on/off option takes it back.
    if kind is str and isinstance(value, bool) and choices:
        word = "on" if value else "off"
        if word in choices:
            return word
    if isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool)):
        return value
    if kind is bool:
        if isinstance(value, str) and value.lower() in TRUE_WORDS + FALSE_WORDS:
            return value.lower() in TRUE_WORDS
        raise ConfigError(option, f"expected true or false (got {value!r})")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind in (int, float) and isinstance(value, str):
        try:
            return kind(value.strip())
        except ValueError:
            pass
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(option, f"expected {kind.__name__} (got {value!r})")


def coerce(value: Any, ftype: FieldType, option: str, choices: tuple | None = None) -> Any:
    """A YAML or command-line value as the field's type (PyYAML reads `1e-3` as a string)."""
    if value is None:
        return None
    if ftype.sequence is None:
        return _coerce_scalar(value, ftype.kind, option, choices)
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        items = [items]
    items = [i.strip() if isinstance(i, str) else i for i in items]
    if items == [""]:
        items = []
    if ftype.length is not None and len(items) != ftype.length:
        example = ",".join(["X"] * ftype.length)
        raise ConfigError(option, f"expected {ftype.length} values like {example} (got {value!r})")
    return ftype.sequence(_coerce_scalar(i, ftype.kind, option, None) for i in items)


def _check_value(f: dataclasses.Field, value: Any, ftype: FieldType) -> None:
    option = flag(f.name)
    meta = f.metadata
    if value is None:
        if meta.get("required"):
            raise ConfigError(option, "is required")
        if not ftype.optional:
            raise ConfigError(option, "must be given")
        return
    values = list(value) if ftype.sequence is not None else [value]
    choices = meta.get("choices")
    for v in values:
        wrong_kind = not isinstance(v, ftype.kind) or (
            ftype.kind is not bool and isinstance(v, bool)
        )
        if wrong_kind and not (ftype.kind is float and isinstance(v, int)):
            raise ConfigError(option, f"expected {ftype.kind.__name__} (got {v!r})")
        if choices is not None and v not in choices:
            raise ConfigError(option, f"must be one of {', '.join(map(str, choices))} (got {v!r})")
        for key, test, words in (
            ("ge", lambda a, b: a >= b, ">="),
            ("gt", lambda a, b: a > b, ">"),
            ("le", lambda a, b: a <= b, "<="),
            ("lt", lambda a, b: a < b, "<"),
        ):
            if key in meta and not test(v, meta[key]):
                raise ConfigError(option, f"must be {words} {meta[key]:g} (got {v})")


def bounds_text(f: dataclasses.Field) -> str:
    """The field's bounds as text for help (``>= 1``, ``in [0, 1)``)."""
    m = f.metadata
    lo = ("[", m["ge"]) if "ge" in m else ("(", m["gt"]) if "gt" in m else None
    hi = ("]", m["le"]) if "le" in m else (")", m["lt"]) if "lt" in m else None
    if lo and hi:
        return f"in {lo[0]}{lo[1]:g}, {hi[1]:g}{hi[0]}"
    if lo:
        return f"{'>=' if lo[0] == '[' else '>'} {lo[1]:g}"
    if hi:
        return f"{'<=' if hi[0] == ']' else '<'} {hi[1]:g}"
    return ""


# ------------------------------------------------------------------------------ the base class
class Options:
    """Base of every option dataclass (decorate subclasses with ``@dataclass``).

    ``__post_init__`` checks every field against its metadata, then calls ``validate`` for the
    rules that involve several fields. Neither looks at the file system: options are validated
    again wherever they are read (a Ray worker, a sweep's trial), where a path given on the
    driver's machine may not exist; a launcher checks paths once
    (``launching/preflight.check_paths``).
    """

    yaml_sections: ClassVar[bool] = True  # how `--config` files of a sectioned class look

    def __post_init__(self) -> None:
        types_ = field_types(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            ftype = types_[f.name]
            if isinstance(ftype, FieldType):
                _check_value(f, getattr(self, f.name), ftype)
        self.validate()

    def validate(self) -> None:
        """Cross-field rules; raise ConfigError naming the flag."""

    # -- structure
    @classmethod
    def sections(cls) -> dict[str, type[Options]]:
        return {k: v for k, v in field_types(cls).items() if isinstance(v, type)}

    @classmethod
    def option_fields(cls) -> list[tuple[str | None, dataclasses.Field, FieldType]]:
        """(section or None, field, type) for every option, in declaration order."""
        out: list[tuple[str | None, dataclasses.Field, FieldType]] = []
        types_ = field_types(cls)
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            t = types_[f.name]
            if isinstance(t, type):
                out += [(f.name, g, gt) for _, g, gt in t.option_fields()]
            else:
                out.append((None, f, t))
        return out

    # -- dict / YAML
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "--config") -> Any:
        """Build from a (nested) mapping such as YAML; unknown sections or keys are errors."""
        if not isinstance(raw, dict):
            raise ConfigError(where, f"expected a mapping, got {type(raw).__name__}")
        types_ = field_types(cls)
        known = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = set(raw) - set(known)
        if unknown:
            kind = "section(s)" if cls.sections() else "option(s)"
            raise ConfigError(where, f"unknown {kind} {sorted(unknown)}; expected {sorted(known)}")
        values: dict[str, Any] = {}
        for name, value in raw.items():
            t = types_[name]
            if isinstance(t, type):
                values[name] = t.from_dict(value or {}, where)
            else:
                values[name] = coerce(value, t, flag(name), known[name].metadata.get("choices"))
        return cls(**values)

    def dump_yaml(self, path: str | os.PathLike[str]) -> None:
        from resnet18_dist.atomic import atomic_write_text

        atomic_write_text(Path(path), yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load_yaml(cls, path: str | os.PathLike[str]) -> Any:
        return cls.from_dict(read_yaml(path))


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError("--config", f"{p} does not exist")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError("--config", f"{p} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError("--config", f"{p} must hold a mapping")
    return raw


def absolute_path(value: str, keywords: tuple[str, ...] = ()) -> str:
    """A local path option as an absolute path; keywords, URIs (``s3://``) and consts kept."""
    if not isinstance(value, str) or not value or value in keywords or "://" in value:
        return value
    return os.path.abspath(os.path.expanduser(value))


def default_of(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def check(cond: bool, name: str, message: str) -> None:
    """A cross-field rule in ``validate``: raise naming ``--name`` unless ``cond``."""
    if not cond:
        raise ConfigError(flag(name), message)
