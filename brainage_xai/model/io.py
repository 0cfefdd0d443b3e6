"""Model weights on disk: safetensors plus JSON metadata, never a pickle.

``model.safetensors`` holds the weights and, in its header, the same metadata as the
human-readable ``model.json`` beside it (architecture, input grid, normalisation,
targets, training curve, metrics, seed, versions). The header copy makes the weights file
self-contained, so ``--model`` may name the ``.safetensors`` file alone or the folder
that holds it.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path

import numpy as np

from ..errors import DataError, MissingInputError
from ..utils.io import _json_default, atomic_path, write_json
from .network import PreActResNet3d, build_network

WEIGHTS_NAME = "model.safetensors"
METADATA_KEY = "brainage_xai"


def versions() -> dict:
    """Versions of the software that produced a model."""
    import torch

    from .._version import __version__

    return {
        "brainage_xai": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def weights_path(path: str | os.PathLike) -> Path:
    """The ``.safetensors`` file that ``path`` (a file or a folder) refers to."""
    path = Path(path)
    return path / WEIGHTS_NAME if path.is_dir() else path


def state_tensors(state: dict) -> dict:
    """A state dict as contiguous CPU tensors (what safetensors stores)."""
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def save_model(path: str | os.PathLike, model: PreActResNet3d, metadata: dict) -> Path:
    """Write ``model`` to ``path`` (``.safetensors``) and ``metadata`` beside it as JSON.

    Parameters
    ----------
    path : path-like
        The weights file; the JSON goes to the same name with ``.json``.
    model : PreActResNet3d
    metadata : dict
        JSON-serialisable; ``architecture`` and ``versions`` are filled in.

    Returns
    -------
    Path
        The weights file.
    """
    from safetensors.torch import save_file

    path = Path(path)
    meta = {**metadata, "architecture": model.architecture(), "versions": versions()}
    text = json.dumps(meta, default=_json_default)
    with atomic_path(path) as tmp:
        save_file(state_tensors(model.state_dict()), str(tmp), metadata={METADATA_KEY: text})
    write_json(path.with_suffix(".json"), json.loads(text))
    return path


def read_metadata(path: str | os.PathLike) -> dict:
    """The metadata stored in a weights file's header."""
    from safetensors import safe_open

    path = weights_path(path)
    if not path.is_file():
        raise MissingInputError(f"model weights {path} not found (expected a .safetensors file)")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise DataError(f"{path} is not a readable safetensors file: {exc}") from exc
    if METADATA_KEY not in header:
        raise DataError(f"{path} holds no brainage-xai metadata; it was not written by brainage-xai")
    return json.loads(header[METADATA_KEY])


def load_model(path: str | os.PathLike, device: str = "cpu") -> tuple[PreActResNet3d, dict]:
    """Rebuild a network from its weights file (or the folder holding ``model.safetensors``).

    Returns
    -------
    model : PreActResNet3d
        In evaluation mode, on ``device``.
    metadata : dict
    """
    from safetensors.torch import load_file

    path = weights_path(path)
    meta = read_metadata(path)
    try:
        model = build_network(meta["architecture"])
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{path} has an unusable architecture description: {exc}") from exc
    state = load_file(str(path), device="cpu")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise DataError(f"weights in {path} do not fit their architecture: {exc}") from exc
    return model.to(device).eval(), meta


def model_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a weights file: identifies the model that produced an output."""
    digest = hashlib.sha256()
    with open(weights_path(path), "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
