"""How the commands take their settings: one frozen dataclass per command, one field per
flag, each field carrying its help text (`setting`), and the click options generated from
the fields (`option`), so that a default or a help text is written once. Also the one rule
for `--device auto`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import click
import torch

from trainer.errors import TrainConfigError

DEVICES = ("auto", "cpu", "cuda")


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


def resolve_device(device: str) -> str:
    """cpu or cuda for a `--device` value: auto is cuda when torch sees one, else cpu; cuda
    without a CUDA device is refused, naming the fix."""
    if device not in DEVICES:
        raise TrainConfigError(f"--device must be one of {', '.join(DEVICES)} (got {device!r})")
    cuda = torch.cuda.is_available()
    if device == "cuda" and not cuda:
        raise TrainConfigError(
            "--device cuda, but torch sees no CUDA device (torch.cuda.is_available() is "
            "False); use --device cpu or auto, or install a CUDA build of torch"
        )
    return ("cuda" if cuda else "cpu") if device == "auto" else device
