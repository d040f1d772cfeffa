"""How `--help` names values: RECIPE and [PROMPT] in the usage line, a placeholder only where a value is taken.

typer 0.29 changed its rendering: every flag shows a type (`--dry-run <bool>`), every value a type in angle
brackets, and a required argument comes out as `{recipe}`. This command class names each parameter the classic
way (an upper-case metavar, nothing after a flag) on any typer version, so the help stays as the README shows it.
"""

from __future__ import annotations

import click
from typer.core import TyperCommand, TyperGroup


class _PlainParams:
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for param in self.params:
            _plain(param)

    def get_params(self, ctx: click.Context):
        params = super().get_params(ctx)  # with those added late: --help, typer's completion options
        for param in params:
            _plain(param)
        return params


class PlainHelpGroup(_PlainParams, TyperGroup):
    """The root: its flags (--version, completion) without a type placeholder."""


class PlainHelpCommand(_PlainParams, TyperCommand):

    def collect_usage_pieces(self, ctx: click.Context) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if _is_argument(param):
                name = param.metavar or param.name.upper()
                if param.nargs != 1 and not name.endswith("..."):
                    name += "..."
                pieces.append(name if param.required else f"[{name}]")
            else:
                pieces.extend(param.get_usage_pieces(ctx))
        return pieces


def _is_argument(param) -> bool:
    return getattr(param, "param_type_name", None) == "argument"  # typer's own classes are not click's subclasses


def _plain(param) -> None:
    if _is_argument(param):
        param.metavar = param.metavar or param.name.upper()
        if hasattr(param, "display_type_rich"):
            param.display_type_rich = lambda ctx: None  # the name says what it is; no "<str>" beside it
    elif param.metavar is None:
        param.metavar = "" if getattr(param, "is_flag", False) else param.name.upper()  # a flag takes no value
