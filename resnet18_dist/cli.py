"""Any ``Options`` dataclass as an argparse parser; parsed flags (over an optional YAML file) back
into a validated instance; and the options tables of docs/options.md.

Commands own ``sys.argv``; this module builds parsers and merges defaults < ``--config`` YAML <
flags. Any invalid option exits with code 2 and names the flag.
"""

from __future__ import annotations

import argparse
from typing import Any, TypeVar

from resnet18_dist.options import (
    ConfigError,
    FieldType,
    Options,
    absolute_path,
    bounds_text,
    default_of,
    flag,
    read_yaml,
)

O = TypeVar("O", bound=Options)  # noqa: E741


_LAST_PARSER: list[argparse.ArgumentParser] = []


def command_parser() -> argparse.ArgumentParser | None:
    """The parser the running command built last: the console entry reports a ConfigError the
    command raises through it (usage line, ``PROG: error: --flag: ...``, exit code 2)."""
    return _LAST_PARSER[-1] if _LAST_PARSER else None


def build_parser(
    cls: type[Options],
    description: str,
    prog: str | None = None,
    *,
    config_file: bool = True,
    epilog: str | None = None,
) -> argparse.ArgumentParser:
    """Flags for every option of ``cls`` (grouped by section), plus ``--config FILE.yaml``."""
    # argument_default=SUPPRESS: only flags the user gave land in the namespace, so they can
    # override the YAML file without the parser's defaults overriding it too.
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=epilog,
        argument_default=argparse.SUPPRESS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        # `--num-worker 2` must be an error, not a run of `--num-workers 2`.
        allow_abbrev=False,
    )
    _LAST_PARSER[:] = [parser]
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    if config_file:
        layout = "with sections " + "/".join(cls.sections()) if cls.sections() else "of options"
        parser.add_argument(
            "--config",
            metavar="FILE.yaml",
            help=f"YAML file {layout} (as a run writes to its config.yaml); flags given on the "
            "command line override it.",
        )
    groups: dict[str | None, Any] = {}
    seen: set[str] = set()
    for section, f, ftype in cls.option_fields():
        if not f.metadata.get("cli", True):
            continue
        if f.name in seen:  # sections share one flag namespace
            raise ValueError(f"option {f.name} is declared twice in {cls.__name__}")
        seen.add(f.name)
        group = groups.get(section)
        if group is None:
            group = parser.add_argument_group(f"{section} options") if section else parser
            groups[section] = group
        _add_argument(group, section, f, ftype)
    return parser


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("resnet18-dist")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def _help(f: Any, ftype: FieldType) -> str:
    default = default_of(f)
    shown = ",".join(map(str, default)) if isinstance(default, (tuple, list)) else default
    bounds = bounds_text(f)
    text = f.metadata["help"] + (f" ({bounds})" if bounds else "")
    if f.metadata.get("required"):
        text += " (required)"
    # Defaults that say nothing (none, an empty string or list, off) are left out of --help.
    elif not (shown is None or shown == "" or shown is False or f.metadata.get("positional")):
        text += f" (default: {shown})"
    return text.replace("%", "%%")


def _add_argument(group: Any, section: str | None, f: Any, ftype: FieldType) -> None:
    dest = f"{section}.{f.name}" if section else f.name
    meta = f.metadata
    help_text = _help(f, ftype)
    if meta.get("positional"):
        group.add_argument(dest, nargs=meta.get("nargs"), metavar=f.name.upper(), help=help_text)
        return
    if ftype.kind is bool and ftype.sequence is None:
        group.add_argument(
            flag(f.name), action=argparse.BooleanOptionalAction, dest=dest, help=help_text
        )
        return
    choices = meta.get("choices") if ftype.sequence is None else None
    metavar = meta.get("metavar")
    if metavar is None and choices is None:
        metavar = f.name.upper() if ftype.sequence is None else "A,B,..."
    kwargs: dict[str, Any] = {"dest": dest, "help": help_text, "metavar": metavar}
    if choices is not None:
        # Shown as {a,b,c}; the value is checked (with a message naming the flag) on coercion.
        kwargs["choices"] = [str(c) for c in choices]
        kwargs["metavar"] = None
    if meta.get("nargs") == "?":
        kwargs["nargs"] = "?"
        kwargs["const"] = meta.get("const")
    group.add_argument(flag(f.name), **kwargs)


def merged_dict(cls: type[Options], ns: argparse.Namespace) -> dict[str, Any]:
    """defaults < YAML (``--config``) < flags, as a nested dict for ``cls.from_dict``."""
    given: dict[str, Any] = vars(ns)
    raw: dict[str, Any] = read_yaml(given["config"]) if given.get("config") else {}
    sectioned = bool(cls.sections())
    for key, value in given.items():
        if key == "config":
            continue
        if sectioned and "." in key:
            section, name = key.split(".", 1)
            if not isinstance(raw.get(section), dict):
                raw[section] = {}
            raw[section][name] = value
        elif not sectioned:
            raw[key] = value
    return absolute_paths(cls, raw)


def absolute_paths(cls: type[Options], raw: dict[str, Any]) -> dict[str, Any]:
    """Every path option of ``raw`` (flags or ``--config`` YAML) made absolute against this
    process's working directory: Ray Train runs each worker, and Tune each trial, in a
    directory of its own, where a relative path would name another place."""
    for section, f, _ in cls.option_fields():
        keywords = f.metadata.get("path")
        if keywords is None:
            continue
        if section and not isinstance(raw.get(section), dict):
            raw[section] = {}
        where = raw[section] if section else raw
        # A relative default (`--output-dir runs`) is resolved too, and so recorded absolute.
        value = where.get(f.name, default_of(f))
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            where[f.name] = type(value)(absolute_path(v, keywords) for v in value)
        elif isinstance(value, str):
            where[f.name] = absolute_path(value, keywords)
    return raw


def parse_options(
    cls: type[O], parser: argparse.ArgumentParser, argv: list[str] | None = None
) -> O:
    """Parse argv into a validated ``cls``; exit 2 naming the flag on any error."""
    try:
        return cls.from_dict(merged_dict(cls, parser.parse_args(argv)))
    except ConfigError as exc:
        parser.error(str(exc))  # prints usage + message, exits with code 2
    raise AssertionError("unreachable")


def options_markdown(cls: type[Options]) -> str:
    """An options table of docs/options.md generated from ``cls`` (a test keeps the page equal
    to it)."""
    rows = ["| option | default | meaning |", "|---|---|---|"]
    for _, f, _ftype in cls.option_fields():
        if not f.metadata.get("cli", True):
            continue
        name = f.name.upper() if f.metadata.get("positional") else f"`{flag(f.name)}`"
        default = default_of(f)
        if f.metadata.get("required") or f.metadata.get("positional"):
            shown = "required"
        elif default is None:
            shown = "—"
        elif isinstance(default, (tuple, list)):
            shown = f"`{','.join(map(str, default))}`"
        else:
            shown = '`""`' if default == "" else f"`{default}`"
        bounds = bounds_text(f)
        meaning = f.metadata["help"] + (f" ({bounds})" if bounds else "")
        rows.append(f"| {name} | {shown} | {meaning.replace('|', '/')} |")
    return "\n".join(rows)
