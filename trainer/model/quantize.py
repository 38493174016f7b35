"""Post-training quantization of world models and our quantized files. (Reading them back is
`trainer.model.checkpoint.load_any`; what quantization changed, and the `trainer quantize`
command, are `trainer.evaluation.quantized`.)

This module owns the payload of a quantized file (`trainer.model.checkpoint.QUANTIZED_FORMAT`):
self-describing (dtype, scheme, model config, source file and its sha256), and the schemes:
  * fp16 / bf16: every float tensor cast. The file keeps the official `{"model": state_dict}`
    entry, so official loaders read it too (as float32); `load_any` runs it in that dtype
    where the device supports it;
  * int8: symmetric per-output-channel weight quantization of every Linear layer (the Q
    ensemble's stacked members included): scale_c = max|W_c| / 127, q = round(W / scale_c).
    Scales come from the weights, one per output row (per member for the ensemble); biases,
    LayerNorms and the task embedding stay float32. Weight-only: `load_any` dequantizes into
    a float32 model, so inference runs in float32 on weights carrying exactly the int8
    rounding error (there is no int8 kernel on this path; the gain is file size).

The paper's quantization (docs/distillation.md#quantization) rounds every weight with scale
1.0, which zeroes almost all of them; nothing here uses a fixed scale.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from datapipe.source import file_sha256
from trainer.model.checkpoint import (
    DETACH_PREFIX,
    QUANTIZED_DTYPES,
    QUANTIZED_FORMAT,
    QUANTIZED_VERSION,
    save_atomic,
)
from trainer.model.presets import ModelConfig
from trainer.model.world import WorldModel

INT8_SCHEME = "int8 symmetric per-output-channel weights of every Linear, scale = max|W_c|/127"


# -- int8 per-channel scheme -------------------------------------------------------------------


def quantize_per_channel(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(int8 q, float32 scale) with weight ~ q * scale[..., None]; one scale per output row
    (the last axis is the input axis; leading axes, e.g. ensemble members, keep their own)."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=-1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row stays 0
    q = torch.round(w / scale[..., None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def linear_weight_keys(model: WorldModel) -> list[str]:
    """state_dict keys of every Linear weight: the plain modules and the Q ensembles' members."""
    keys = [f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    template = model._Qs._template
    for name in model._Qs.params.tensors():
        owner, _, leaf = name.rpartition(".")
        if leaf == "weight" and isinstance(template.get_submodule(owner), nn.Linear):
            keys += [f"_Qs.params.{name}", f"_target_Qs_params.{name}"]
    return keys


# -- writing ------------------------------------------------------------------------------------


def _config_dict(cfg: ModelConfig) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def quantize_model(model: WorldModel, dtype: str) -> dict[str, Any]:
    """The file payload of `model` quantized to `dtype` (fp16 | bf16 | int8)."""
    if dtype not in QUANTIZED_DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(QUANTIZED_DTYPES)}")
    state = model.state_dict()
    payload: dict[str, Any] = {
        "format": QUANTIZED_FORMAT,
        "format_version": QUANTIZED_VERSION,
        "dtype": dtype,
        "model_config": _config_dict(model.cfg),
    }
    if dtype in ("fp16", "bf16"):
        cast: dict[str, Any] = {}
        for key, value in state.items():
            if isinstance(value, Tensor) and value.is_floating_point():
                if key.startswith(DETACH_PREFIX):  # same tensor object: stored once by torch.save
                    value = cast["_Qs.params." + key[len(DETACH_PREFIX) :]]
                else:
                    value = value.detach().to(QUANTIZED_DTYPES[dtype]).clone()
            cast[key] = value
        payload["scheme"] = f"cast of every float tensor to {QUANTIZED_DTYPES[dtype]}"
        payload["model"] = cast
        return payload
    linear = set(linear_weight_keys(model))
    weights, scales, others = {}, {}, {}
    for key, value in state.items():
        if not isinstance(value, Tensor) or key.startswith(DETACH_PREFIX):
            continue
        if key in linear:
            weights[key], scales[key] = quantize_per_channel(value)
        else:  # biases, LayerNorms, embedding, masks (float32) and the int64 log_std buffers
            others[key] = value.detach().float().clone() if value.is_floating_point() else value
    payload |= {"scheme": INT8_SCHEME, "int8": weights, "scales": scales, "other": others}
    return payload


def save_quantized(
    model: WorldModel, dtype: str, out: str | os.PathLike, source: str | os.PathLike | None = None
) -> Path:
    """Quantize `model` to `dtype` and write it to `out` atomically; `source` (the file the
    model came from) is recorded with its sha256."""
    payload = quantize_model(model, dtype)
    if source is not None:
        payload["source"] = {"path": str(source), "sha256": file_sha256(source)}
    save_atomic(payload, out)
    return Path(out)
