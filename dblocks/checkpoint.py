"""Checkpoints as safetensors: tensors in the file, JSON metadata in its header. No pickle.

Writes are atomic (temporary file + fsync + rename), so a crash never leaves a torn checkpoint
and never destroys the previous one.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

_META_KEY = "dblocks"


def save_checkpoint(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={_META_KEY: json.dumps(meta)})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _open(path: str | os.PathLike):
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return safe_open(str(path), framework="pt")


def _meta(f) -> dict:
    return json.loads((f.metadata() or {}).get(_META_KEY, "{}"))


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    with _open(path) as f:
        return {k: f.get_tensor(k) for k in f.keys()}, _meta(f)


def load_meta(path: str | os.PathLike) -> dict:
    """A checkpoint's metadata alone: its header is read, none of its tensors."""
    with _open(path) as f:
        return _meta(f)
