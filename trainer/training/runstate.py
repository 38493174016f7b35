"""Training checkpoints: the self-describing file a run resumes from.

A training checkpoint (`<out>/checkpoint.pt`, written atomically) is one torch file holding a
dict of plain values and tensors, readable with `torch.load(..., weights_only=True)`:

    format        "mt30-trainer-ckpt"
    version       FORMAT_VERSION below
    step          updates done
    config        the resolved TrainConfig, as a dict
    model_config  the student's ModelConfig, as a dict
    agent         TDMPC2Agent.state_dict(): model, both optimisers, running scale, leftover grad
                  (the same on every rank of a data-parallel run)
    loader        SliceLoader.state_dict(): where the data stream is (of rank 0)
    rng           torch CPU (and CUDA) generator states, numpy's and python's (of rank 0)
    world_size    number of ranks that trained (1 without torchrun)
    other_ranks   [{"loader": ..., "rng": ...}] of ranks 1 .. world_size-1, for an exact resume
    global_batch_size   batch_size x world_size
    store         identity of the store: location (path or URL), format version, sha256 of
                  meta.json, sources
    teacher       identity of the teacher file (path, sha256, size) or None
    torch_version the torch that wrote it

Every world-model file format, this one's model included (`load_any`, `export`), is read
by `trainer.model.checkpoint`; this module writes and reads the rest of a training checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datapipe.format import META_FILE
from datapipe.location import atomic_file
from datapipe.source import file_sha256
from datapipe.store import Store
from trainer.errors import ResumeError
from trainer.model.checkpoint import (
    TRAINING_FORMAT,
    is_training_checkpoint,
    save_atomic,
)

FORMAT = TRAINING_FORMAT
FORMAT_VERSION = 1
CHECKPOINT_FILE = "checkpoint.pt"


def store_identity(store: Store) -> dict[str, Any]:
    """What makes a store's data what it is: its meta.json (which lists every source file's
    sha256) and format version. The location (a local path or a URL) is recorded, but a
    moved or copied store is the same store."""
    return {
        "path": store.url,
        "format_version": store.meta.format_version,
        "meta_sha256": hashlib.sha256(store.read_bytes(META_FILE)).hexdigest(),
        "sources": [{"name": s.name, "sha256": s.sha256} for s in store.meta.sources],
    }


def teacher_identity(path: str | os.PathLike, size: int | None = None) -> dict[str, Any]:
    """Path, sha256 and model size (None: not known yet) of a teacher file."""
    return {"path": str(Path(path).resolve()), "sha256": file_sha256(path), "size": size}


# -- RNG states --------------------------------------------------------------------------------


def rng_state(device: torch.device) -> dict[str, Any]:
    """The generator states an update draws from (torch, and on a CUDA run the run's own
    GPU: a resume may see fewer GPUs, e.g. one per rank), plus numpy's and python's for
    completeness; the loader keeps its own seeded stream."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if device.type == "cuda" and cuda is not None:
        if isinstance(cuda, (list, tuple)):  # written before: every visible GPU's state
            index = device.index if device.index is not None else torch.cuda.current_device()
            cuda = cuda[min(index, len(cuda) - 1)]
        torch.cuda.set_rng_state(cuda, device)
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


# -- files -------------------------------------------------------------------------------------


def write_training_checkpoint(path: str | os.PathLike, **parts: Any) -> Path:
    """Write a training checkpoint (the fields listed in the module docstring) atomically."""
    save_atomic(
        {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "torch_version": str(torch.__version__),
            **parts,
        },
        path,
    )
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """A run folder's JSON file (config.json, summary.json, best.json, experiment.json),
    indented, written through `atomic_file`."""
    with atomic_file(path) as f:
        f.write((json.dumps(obj, indent=2, default=str) + "\n").encode())


def read_training_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A training checkpoint, on CPU; ResumeError if `path` is not one this code reads."""
    path = Path(path)
    if not path.is_file():
        raise ResumeError(f"{path}: no training checkpoint there")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [repr(e)]
        reason = next((line for line in lines if "error:" in line.lower()), lines[0])
        raise ResumeError(
            f"{path} cannot be read as a training checkpoint ({reason}); it was not written "
            f"by this trainer or is damaged. Move it away, or start a new run in another --out"
        ) from e
    if not is_training_checkpoint(obj):
        raise ResumeError(
            f"{path} is not a training checkpoint (no format={FORMAT!r}); official world-model "
            f"files start a run with --init instead"
        )
    if obj["version"] != FORMAT_VERSION:
        raise ResumeError(
            f"{path}: training checkpoint version {obj['version']}, this trainer reads "
            f"version {FORMAT_VERSION}; export its weights with `trainer export` and start a "
            f"new run from them with --init"
        )
    obj.setdefault("world_size", 1)  # written before data-parallel training: one process
    obj.setdefault("other_ranks", [])
    return obj
