"""Turn the config dataclasses into an argparse parser, and parsed flags back into a config.

Launchers own ``sys.argv``; this module only builds the parser and merges
defaults < ``--config`` YAML < flags. Any invalid option exits with code 2 and names the flag.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from resnet18_dist.config import (
    ConfigError,
    TrainConfig,
    base_type,
    flag,
    option_fields,
    read_yaml,
)


def build_parser(description: str, prog: str | None = None) -> argparse.ArgumentParser:
    # argument_default=SUPPRESS: only flags the user gave land in the namespace, so they can
    # override the YAML file without the parser's defaults overriding it too.
    parser = argparse.ArgumentParser(
        prog=prog, description=description, argument_default=argparse.SUPPRESS
    )
    parser.add_argument(
        "--config",
        metavar="FILE.yaml",
        help="YAML file with sections data/model/optim/run (as written to a run's config.yaml); "
        "flags given on the command line override it.",
    )
    groups: dict[str, argparse._ArgumentGroup] = {}
    for section, f in option_fields():
        group = groups.setdefault(section, parser.add_argument_group(f"{section} options"))
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        kind = base_type(f.type)
        help_text = f"{f.metadata['help']} (default: {default})".replace("%", "%%")
        dest = f"{section}.{f.name}"
        if kind is bool:
            group.add_argument(
                flag(f.name), action=argparse.BooleanOptionalAction, dest=dest, help=help_text
            )
            continue
        choices = f.metadata.get("choices")
        group.add_argument(
            flag(f.name),
            type=kind,
            choices=choices,
            metavar=None if choices else f.name.upper(),
            dest=dest,
            help=help_text,
        )
    return parser


def config_from_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> TrainConfig:
    """Parse argv into a validated TrainConfig; exit 2 with the offending flag on error."""
    return config_from_namespace(parser, parser.parse_args(argv))


def config_from_namespace(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> TrainConfig:
    given: dict[str, Any] = vars(ns)
    try:
        raw: dict[str, Any] = read_yaml(given["config"]) if "config" in given else {}
        for key, value in given.items():
            if "." in key:
                section, name = key.split(".", 1)
                if not isinstance(raw.get(section), dict):
                    raw[section] = {}
                raw[section][name] = value
        return TrainConfig.from_dict(raw)
    except ConfigError as exc:
        parser.error(str(exc))  # prints usage + message, exits with code 2
    raise AssertionError("unreachable")


def options_markdown() -> str:
    """The README's options table, generated from the dataclasses (a test keeps them equal)."""
    rows = ["| option | default | meaning |", "|---|---|---|"]
    for _, f in option_fields():
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        shown = "—" if default is None else ('`""`' if default == "" else f"`{default}`")
        rows.append(f"| `{flag(f.name)}` | {shown} | {f.metadata['help'].replace('|', '/')} |")
    return "\n".join(rows)
