"""`--device`: the choices and the one rule for `auto` (the trainer's commands take their
other settings as `datapipe.options` describes)."""

from __future__ import annotations

import torch

from trainer.errors import TrainConfigError

DEVICES = ("auto", "cpu", "cuda")


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
