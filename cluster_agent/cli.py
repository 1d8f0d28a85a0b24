"""The command line, generated from the Settings model so flags, env vars, defaults and help never drift apart."""

from __future__ import annotations

import argparse
import textwrap
from typing import Any, Literal, get_args, get_origin

from pydantic import ValidationError

from . import __version__
from .errors import ConfigError
from .settings import Settings, env_name, flag_name

__all__ = ["build_parser", "describe_validation_error", "load_settings"]

USAGE = """\
%(prog)s [SETTINGS...]                 run the agent against a control plane
%(prog)s run-job JOB.json [SETTINGS...]  run one job spec on the local engine and print its completion"""


def _is_bool(annotation: Any) -> bool:
    return annotation is bool or bool in get_args(annotation)


def _choices(annotation: Any) -> list[str]:
    """The allowed values of a Literal setting (also inside Optional), for --help."""
    if get_origin(annotation) is Literal:
        return [str(value) for value in get_args(annotation)]
    for arg in get_args(annotation):
        if get_origin(arg) is Literal:
            return [str(value) for value in get_args(arg)]
    return []


class _HelpFormatter(argparse.HelpFormatter):
    """Wraps help without breaking paths and flags at their hyphens."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False, break_long_words=False)


def build_parser(prog: str = "main.py") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        usage=USAGE,
        description="Radix cluster agent: long-polls a Radix control plane and runs its jobs in Docker containers.",
        epilog="Every setting can also come from its environment variable; the command line wins.",
        argument_default=argparse.SUPPRESS,
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"radix-cluster-agent {__version__}")
    group = parser.add_argument_group("settings (flag / environment variable / default)")
    for name, info in Settings.model_fields.items():
        default = info.default
        shown = "none" if default is None else default
        choices = _choices(info.annotation)
        one_of = f"one of: {', '.join(choices)}; " if choices else ""
        help_text = f"{info.description} [{one_of}env {env_name(name)}; default: {shown}]"
        if _is_bool(info.annotation):
            group.add_argument(flag_name(name), dest=name, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            group.add_argument(flag_name(name), dest=name, metavar=name.split("_")[-1].upper(), help=help_text)
    return parser


def load_settings(cli_values: dict[str, Any]) -> Settings:
    """Settings from env vars overlaid with the command line; ConfigError names the setting and the fix."""
    # A field whose env var is an alias must be given under that alias, or the env var would win over the CLI.
    values = {}
    for name, value in cli_values.items():
        alias = Settings.model_fields[name].validation_alias
        values[alias if isinstance(alias, str) else name] = value
    try:
        return Settings(**values)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc)) from None


# pydantic's ByteSize: decimal units are powers of 1000, binary ones of 1024 (pydantic docs, "ByteSize").
BYTE_SIZE_FORMS = "a whole number of bytes, or a number and a unit: KB, MB, GB, TB (1000s) or KiB, MiB, GiB, TiB (1024s), as in 500MB or 100GiB"


def describe_validation_error(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        loc = [str(part) for part in error.get("loc", ())]
        field = next((p for p in loc if p in Settings.model_fields), None)
        if field is None:
            field = next((f for f in Settings.model_fields if env_name(f).lower() in [p.lower() for p in loc]), None)
        message = error.get("msg", "invalid value").removeprefix("Value error, ")
        if error.get("type") in ("byte_size", "byte_size_unit"):
            message += f" (give {BYTE_SIZE_FORMS})"
        if field:
            lines.append(f"{flag_name(field)} / {env_name(field)}: {message}")
        else:
            lines.append(message)
    return "; ".join(lines)
