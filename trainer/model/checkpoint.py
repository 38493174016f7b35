"""Every world-model file this project reads or writes (docs/tdmpc2.md#checkpoints).

The official format is `{"model": state_dict}`. This module owns:
  * reading official files (new API, or old API converted as the official `load()` does),
    with float16/bfloat16 tensors cast to float32, and what a file is when it is not one
    (`torch_load`);
  * refusing the paper's quantized files (docs/distillation.md#quantization) unless allowed;
  * the model size and the dataset dims of a state_dict, from its shapes;
  * writing our model in the new-API format, atomically (`datapipe.location.atomic_file`);
  * the world model inside our training checkpoints and our quantized files (which
    `trainer.training.runstate` and `trainer.model.quantize` write);
  * `load_any`, a runnable model from any of these, and `export` = official file of it.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from datapipe.location import atomic_file, only_writer_of_file
from trainer.errors import BusyError, TrainError
from trainer.model.presets import PRESETS, ModelConfig
from trainer.model.world import WorldModel

# Old API: the Q ensemble is a flat list of 10 tensors; index n -> layer n // 4, field n % 4.
_OLD_Q_FIELDS = ("weight", "bias", "ln.weight", "ln.bias")
_Q_PREFIXES = ("_Qs.params", "_detach_Qs_params", "_target_Qs_params")
# Entries the official conversion copies from the freshly built model (old files lack them).
_COPIED_FROM_MODEL = (
    "_action_masks",
    "log_std_min",
    "log_std_dif",
    *(f"{p}.{k}" for p in _Q_PREFIXES for k in ("__batch_size", "__device")),
)
_SHOW = 8  # how many offending keys an error message lists


class CheckpointError(TrainError, ValueError):
    """A checkpoint file cannot be used as a TD-MPC2 world model."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No file at the checkpoint path."""


class QuantizedCheckpointError(CheckpointError):
    """A checkpoint holds quantized tensors and quantized files were not allowed.

    What the paper's quantized files hold: docs/distillation.md#quantization.
    """


def read_checkpoint(path: str | os.PathLike, allow_quantized: bool = False) -> dict[str, Any]:
    """The state_dict stored in `path`, on CPU, float tensors as float32, keys as stored.

    Accepts `{"model": state_dict}` or a bare state_dict. Quantized tensors raise
    `QuantizedCheckpointError` unless `allow_quantized`, in which case they are dequantized.
    """
    raw = torch_load(path)
    if hasattr(raw, "keys") and {"obs", "action", "reward"} <= set(raw.keys()):
        raise _data_chunk_error(path)  # a dict or a TensorDict (torch loads those too)
    state = raw.get("model", raw) if isinstance(raw, dict) else None
    if not isinstance(state, dict) or not any(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path} is not a {{'model': state_dict}} world-model checkpoint")
    quantized = {k: v for k, v in state.items() if isinstance(v, Tensor) and v.is_quantized}
    if quantized and not allow_quantized:
        raise QuantizedCheckpointError(_describe_quantized(path, quantized, len(state)))
    out: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, Tensor):
            if value.is_quantized:
                value = value.dequantize()
            if value.is_floating_point():
                value = value.float()
        out[key] = value
    return out


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default container since torch 1.6
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a"  # pickle protocol 2, then torch's legacy magic number


def torch_load(path: str | os.PathLike, mmap: bool = False) -> Any:
    """What torch.save wrote to `path` (weights only, on CPU), or a CheckpointError that
    says what the file is instead: missing, not a torch file, an MT30 data chunk, a file
    with objects other than tensors, or a damaged one. `mmap` maps a zip-format file
    instead of reading it (legacy files are read)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"checkpoint {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(4)
    if head not in (_ZIP_MAGIC, _LEGACY_MAGIC):
        raise CheckpointError(
            f"{path} is not a torch.save file (it starts with {head!r}); give a world-model "
            f"checkpoint, e.g. an official TD-MPC2 file or one `trainer export` wrote"
        )
    try:
        with warnings.catch_warnings():
            # Loading qint8 tensors goes through deprecated torch internals; nothing to act on.
            warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
            warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor")
            mmap = mmap and head == _ZIP_MAGIC
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        if "tensordict" in str(err).lower():
            raise _data_chunk_error(path) from err
        raise CheckpointError(
            f"{path} holds objects other than tensors and plain containers, so it was not "
            f"loaded (weights_only). Official files hold only {{'model': state_dict}}. ({err})"
        ) from err
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(
            f"{path} is a damaged or truncated torch file ({err}); copy or download it again"
        ) from err


def _data_chunk_error(path: Path) -> CheckpointError:
    return CheckpointError(
        f"{path} is an MT30 data chunk (episodes of obs, action, reward, task), not a model "
        f"checkpoint: build a store from it with `datapipe build --src`, and give a "
        f"world-model file here"
    )


def _describe_quantized(path: Path, quantized: dict[str, Tensor], n_entries: int) -> str:
    scales = set()
    for t in quantized.values():
        if t.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            scales.add(float(t.q_scale()))
        else:
            scales.update(float(s) for s in t.q_per_channel_scales().unique())
    values = torch.cat([t.dequantize().flatten() for t in quantized.values()])
    zero_fraction = float((values == 0).float().mean())
    dtypes = sorted({str(t.dtype) for t in quantized.values()})
    keys = list(quantized)
    shown = ", ".join(keys[:_SHOW]) + (
        f", ... ({len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
    )
    scale_text = ", ".join(repr(s) for s in sorted(scales)[:_SHOW])
    verdict = (
        "At scale 1.0 every weight of magnitude below 0.5 rounds to 0, so the network these "
        "tensors describe is destroyed: the file is unusable as a model (docs/distillation.md#quantization)."
        if scales == {1.0}
        else "Check that the quantization scales are calibrated before trusting this file."
    )
    return (
        f"{path} is a quantized checkpoint: {len(keys)} of {n_entries} entries are {'/'.join(dtypes)} "
        f"({shown}). Quantization scale: {scale_text}. {zero_fraction:.1%} of the quantized values "
        f"are exactly 0. {verdict} Use the float16/float32 checkpoint instead; to load it anyway "
        f"(dequantized, for inspection) pass --allow-quantized (allow_quantized=True in Python)."
    )


def _rename_old_q_keys(state: dict[str, Any]) -> dict[str, Any]:
    """Old-API Q keys renamed to the new layout, online Q duplicated as `_detach_Qs_params`.

    New-API dicts (they contain `_detach_Qs_params.0.weight`) are returned unchanged.
    """
    if "_detach_Qs_params.0.weight" in state:
        return dict(state)
    if "_Qs.params.0" not in state:
        raise CheckpointError(
            "state_dict has neither new-API (`_detach_Qs_params.0.weight`) nor old-API "
            "(`_Qs.params.0`) Q-ensemble keys; it is not a TD-MPC2 world model"
        )
    out: dict[str, Any] = {}
    for key, value in state.items():
        for old, new_prefixes in (
            ("_Qs.params.", ("_Qs.params", "_detach_Qs_params")),
            ("_target_Qs.params.", ("_target_Qs_params",)),
        ):
            if key.startswith(old):
                index = key[len(old) :]
                if not index.isdigit():
                    raise CheckpointError(f"old-API Q key {key!r} does not end in an index")
                n = int(index)
                for prefix in new_prefixes:
                    out[f"{prefix}.{n // 4}.{_OLD_Q_FIELDS[n % 4]}"] = value
                break
        else:
            out[key] = value
    return out


def convert_to_new_api(state: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """docs/tdmpc2.md#old-api: an old- or new-API state_dict in the new layout of `reference`.

    `reference` is the state_dict of a freshly built model; old-API files get their
    `__batch_size`/`__device`, `log_std_*` and `_action_masks` entries from it.
    """
    if "_detach_Qs_params.0.weight" in state:
        return dict(state)
    out = _rename_old_q_keys(state)
    for key in _COPIED_FROM_MODEL:
        if key in reference:
            out[key] = reference[key]
    return out


def load_model_state(model: WorldModel, state: dict[str, Any]) -> None:
    """Load an official (old- or new-API) state_dict into `model`: key sets checked, strict."""
    reference = model.state_dict()
    converted = convert_to_new_api(state, reference)
    problems = _mismatches(_shapes(converted), _shapes(reference))
    if problems:
        raise CheckpointError(
            f"state_dict does not fit this {model.cfg.model_size}M model: " + _join(problems)
        )
    model.load_state_dict(converted, strict=True)


def detect_model_size(state: dict[str, Any], **dims: Any) -> int:
    """The preset size whose shapes the state_dict matches; `dims` go to ModelConfig.for_size."""
    report = _fit_report(state, dims)
    fits = [size for size, problems in report.items() if not problems]
    if len(fits) == 1:
        return fits[0]
    if fits:
        raise CheckpointError(
            f"state_dict fits several model sizes {fits}; give the size (--teacher-size or "
            f"--model-size; size= in Python)"
        )
    closest = min(report, key=lambda size: len(report[size]))
    counts = ", ".join(f"{size}M: {len(problems)}" for size, problems in report.items())
    raise CheckpointError(
        f"state_dict matches no model size (mismatched keys per size: {counts}). Closest is "
        f"{closest}M: {_join(report[closest])}. If the dataset is not mt30, pass its obs_dim, "
        f"action_dim and action_dims."
    )


def load_checkpoint(
    path: str | os.PathLike,
    size: int | None = None,
    device: str | torch.device = "cpu",
    allow_quantized: bool = False,
    **dims: Any,
) -> WorldModel:
    """A WorldModel (eval mode, float32, on `device`) holding the weights of an official file.

    The size is detected from the shapes unless given. `dims` (obs_dim, action_dim,
    action_dims, n_tasks, episode_lengths) go to `ModelConfig.for_size`; they default to mt30.
    """
    state = read_checkpoint(path, allow_quantized=allow_quantized)
    return model_from_state(state, path, size, **dims).to(device)


def model_from_state(
    state: dict[str, Any], path: str | os.PathLike, size: int | None = None, **dims: Any
) -> WorldModel:
    """`load_checkpoint` of a state_dict already read from `path` (named in errors)."""
    if size is None:
        size = detect_model_size(state, **dims)
    else:
        report = _fit_report(state, dims)
        if report.get(size):
            fits = ", ".join(f"{s}M" for s, problems in report.items() if not problems)
            raise CheckpointError(
                f"{path} does not fit a {size}M model: {_join(report[size])}. "
                f"It fits: {fits or 'no preset size'}."
            )
    model = WorldModel(ModelConfig.for_size(size, **dims))
    load_model_state(model, state)
    return model.eval()


def save_official(model: WorldModel, path: str | os.PathLike) -> None:
    """Write `{"model": model.state_dict()}` (official new-API format), atomically."""
    save_atomic({"model": model.state_dict()}, path)


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to `path` through `atomic_file`: a reader finds the old file or the new. A
    failed write (a full disk) raises its OSError: torch's zip writer, closing after the
    failed write, would otherwise replace it with a RuntimeError of its own."""
    with atomic_file(path) as f:
        try:
            torch.save(obj, f)
        except RuntimeError as e:
            if not isinstance(e.__context__, OSError):
                raise
            raise e.__context__ from None


def _fit_report(state: dict[str, Any], dims: dict[str, Any]) -> dict[int, list[str]]:
    """Size -> list of shape/key problems of `state` against that preset (empty: it fits)."""
    shapes = _shapes(_rename_old_q_keys(state))
    return {
        size: _mismatches(shapes, _expected_shapes(ModelConfig.for_size(size, **dims)))
        for size in PRESETS
    }


@functools.cache
def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return _shapes(WorldModel(cfg).state_dict())


def _shapes(state: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items() if isinstance(v, Tensor)}


def _mismatches(
    found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]
) -> list[str]:
    """Differences between two key -> shape maps, ignoring entries copied from the model."""
    problems = []
    for key, shape in expected.items():
        if key not in found:
            if key not in _COPIED_FROM_MODEL:
                problems.append(f"missing {key} {shape}")
        elif found[key] != shape:
            problems.append(f"{key}: file {found[key]} vs model {shape}")
    problems += [f"unexpected {key} {found[key]}" for key in found if key not in expected]
    return problems


def _join(problems: list[str]) -> str:
    more = f"; ... ({len(problems) - _SHOW} more)" if len(problems) > _SHOW else ""
    return "; ".join(problems[:_SHOW]) + more


# -- every kind of world-model file: dims, our formats, load_any, export ------------------------

TRAINING_FORMAT = (
    "mt30-trainer-ckpt"  # our training checkpoints (trainer.training.runstate writes them)
)
QUANTIZED_FORMAT = "tdmpc2-ptq"  # our quantized files (trainer.model.quantize writes them)
QUANTIZED_VERSION = 1
QUANTIZED_DTYPES: dict[str, torch.dtype] = {
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "int8": torch.int8,
}
DETACH_PREFIX = "_detach_Qs_params."  # new-API keys that duplicate `_Qs.params.` (rebuilt on load)


def is_training_checkpoint(obj: Any) -> bool:
    """Whether a loaded object is one of our training checkpoints."""
    return isinstance(obj, dict) and obj.get("format") == TRAINING_FORMAT


def official_dims(state: dict[str, Any]) -> dict[str, Any]:
    """Dataset dims an official state_dict was built for, read from its shapes
    (docs/tdmpc2.md#new-api): n_tasks, obs_dim, action_dim and, where `_action_masks` is
    stored (new API), action_dims. A dim that cannot be read is left out; the size check then
    reports the layout problem."""
    dims: dict[str, Any] = {}
    emb, enc, pi = (
        state.get(k) for k in ("_task_emb.weight", "_encoder.state.0.weight", "_pi.2.weight")
    )
    if emb is not None and emb.ndim == 2:
        dims["n_tasks"] = int(emb.shape[0])
        if enc is not None and enc.ndim == 2:
            dims["obs_dim"] = int(enc.shape[1] - emb.shape[1])
    if pi is not None and pi.ndim == 2:
        dims["action_dim"] = int(pi.shape[0] // 2)
    masks = state.get("_action_masks")
    if masks is not None and masks.ndim == 2:
        dims["action_dims"] = tuple(int(n) for n in masks.sum(1).round().long())
    return dims


def model_dims(state: dict[str, Any], path: str | os.PathLike) -> dict[str, Any]:
    """`ModelConfig.for_size` dims for an official state_dict, from its shapes.

    Old-API files store no action masks: they are taken as mt30's when the file has 30
    tasks, and refused otherwise (the per-task action dims cannot be known).
    """
    dims = official_dims(state)
    if "action_dims" not in dims:
        if dims.get("n_tasks", 30) != 30:
            raise CheckpointError(
                f"{path}: an old-API file for {dims['n_tasks']} tasks stores no action masks, "
                f"so its per-task action dims are unknown; load it with "
                f"load_checkpoint(path, action_dims=...) and save it with save_official"
            )
        dims.pop("n_tasks", None)  # ModelConfig.for_size then uses the mt30 action dims
    return dims


def model_config_from_dict(d: dict[str, Any]) -> ModelConfig:
    """The ModelConfig a checkpoint recorded (lists back to tuples)."""
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names}
    )


def dequantize_per_channel(q: Tensor, scale: Tensor) -> Tensor:
    """float32 weight from `quantize_per_channel`'s output."""
    return q.float() * scale[..., None]


def read_meta(path: str | os.PathLike) -> dict[str, Any] | None:
    """The descriptive entries of a quantized file (no tensors), or None for other files."""
    raw = _peek(Path(path))
    if not (isinstance(raw, dict) and raw.get("format") == QUANTIZED_FORMAT):
        return None
    return {k: v for k, v in raw.items() if k not in ("model", "int8", "scales", "other")}


def _peek(path: Path) -> Any:
    return torch_load(path, mmap=True)


def runtime_dtype(dtype: torch.dtype, device: torch.device | str) -> torch.dtype:
    """`dtype` if the device runs the model's ops (Linear, LayerNorm, Mish, softmax) in it,
    else float32."""
    try:
        x = torch.randn(4, 8, device=device, dtype=dtype)
        layer = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Mish()).to(device, dtype)
        torch.softmax(layer(x), -1)
    except (RuntimeError, TypeError):
        return torch.float32
    return dtype


def load_any(
    path: str | os.PathLike,
    allow_quantized: bool = False,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> WorldModel:
    """A runnable WorldModel (eval mode) from any world-model file we know.

    * Official `{"model": state_dict}` files, old or new API, fp32 or fp16, any size: dims
      are read from the shapes (`model_dims`); the model runs in float32,
      as the official loader does.
    * Our training checkpoints (`trainer.training.runstate`): the world model they hold, float32.
    * Our quantized files: fp16/bf16 run in that dtype where the device supports it
      (`runtime_dtype`), int8 is dequantized into float32.
    * The paper's qint8 files (scale 1.0, docs/distillation.md#quantization) raise
      `QuantizedCheckpointError` with what is wrong, unless `allow_quantized` (then they load dequantized, for inspection only).
    `dtype` forces the compute dtype.
    """
    path = Path(path)
    raw = _peek(path)
    if isinstance(raw, dict) and raw.get("format") == QUANTIZED_FORMAT:
        model = _load_ours(raw, path)
        if dtype is None:
            dtype = QUANTIZED_DTYPES[raw["dtype"]] if raw["dtype"] != "int8" else torch.float32
    elif is_training_checkpoint(raw):
        model = WorldModel(model_config_from_dict(raw["model_config"]))
        model.load_state_dict(raw["agent"]["model"])
    else:
        del raw
        state = read_checkpoint(path, allow_quantized=allow_quantized)
        dims = model_dims(state, path)
        model = WorldModel(ModelConfig.for_size(detect_model_size(state, **dims), **dims))
        load_model_state(model, state)
    dtype = dtype or torch.float32
    return model.to(device, runtime_dtype(dtype, device)).eval()


def _load_ours(raw: dict[str, Any], path: Path) -> WorldModel:
    if raw.get("format_version") != QUANTIZED_VERSION or raw.get("dtype") not in QUANTIZED_DTYPES:
        raise CheckpointError(
            f"{path}: quantized file of format version {raw.get('format_version')} and dtype "
            f"{raw.get('dtype')!r}; this code reads version {QUANTIZED_VERSION} with dtype in "
            f"{', '.join(QUANTIZED_DTYPES)}. Re-run `trainer quantize` on the source checkpoint."
        )
    model = WorldModel(model_config_from_dict(raw["model_config"]))
    state = model.state_dict()
    if raw["dtype"] == "int8":
        loaded = dict(raw["other"])
        loaded |= {k: dequantize_per_channel(q, raw["scales"][k]) for k, q in raw["int8"].items()}
    else:
        loaded = {k: v.float() for k, v in raw["model"].items() if isinstance(v, Tensor)}
    missing = [
        k for k, v in state.items() if isinstance(v, Tensor) and not k.startswith(DETACH_PREFIX)
    ]
    missing = [k for k in missing if k not in loaded]
    if missing:
        raise CheckpointError(f"{path}: quantized file lacks {', '.join(missing[:8])}")
    for key in state:
        if key.startswith(DETACH_PREFIX) and isinstance(state[key], Tensor):
            loaded[key] = loaded["_Qs.params." + key[len(DETACH_PREFIX) :]]
    model.load_state_dict(state | loaded, strict=True)
    return model


def export(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Write the world model in `src` (any file `load_any` reads) as an official new-API file
    `{"model": state_dict}`, float32; it loads with `load_checkpoint` and the official code."""
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise CheckpointError(f"export would overwrite its source {src}; choose another --out")
    with only_writer_of_file(dst, "another `trainer export`", BusyError):
        save_official(load_any(src).float(), dst)
    return dst
