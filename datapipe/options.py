"""How every command takes its settings: one frozen dataclass per command, one field per
flag, each field carrying its help text (`setting`), and the click options generated from
the fields (`option`), so that a default or a help text is written once. `datapipe`,
`trainer` and `tools` all build their options this way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import click


def setting(default: Any = dataclasses.MISSING, help: str = "") -> Any:
    """A dataclass field with the help text its CLI option shows."""
    return dataclasses.field(default=default, metadata={"help": help})


def option(config: type, name: str, *decls: str, **kw: Any) -> Callable:
    """The click option of field `name` of `config`: its help, its default. `decls` name the
    flag (default `--field-name`); `kw` goes to click (type, is_flag, ...)."""
    f = {f.name: f for f in dataclasses.fields(config)}[name]
    if f.default is not dataclasses.MISSING and "default" not in kw and not kw.get("required"):
        kw["default"] = f.default
    kw.setdefault("show_default", kw.get("default") is not None and kw.get("default") is not False)
    flags = decls or (f"--{name.replace('_', '-')}",)
    return click.option(*flags, name, help=f.metadata["help"], **kw)
