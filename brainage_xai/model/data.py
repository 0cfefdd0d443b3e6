"""Preprocessed maps as network inputs: loading, grid checks, standardisation."""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError, MissingInputError


def load_maps(paths: Sequence[Path]) -> tuple[np.ndarray, np.ndarray]:
    """Stack 3D maps that share one grid into ``(n, 1, *grid)`` float32.

    Returns
    -------
    maps : numpy.ndarray
    affine : numpy.ndarray
        The common 4 x 4 affine.
    """
    import nibabel as nib

    if not paths:
        raise MissingInputError("no preprocessed maps to load")
    unreadable = (OSError, EOFError, ValueError, zlib.error, nib.filebasedimages.ImageFileError)
    try:
        first = nib.load(str(paths[0]))
    except unreadable as exc:
        raise DataError(f"{paths[0]} cannot be read ({type(exc).__name__}); run the participant "
                        "level for this subject again") from exc
    shape, affine = first.shape[:3], first.affine
    out = np.empty((len(paths), 1, *shape), dtype=np.float32)
    for i, path in enumerate(paths):
        try:
            img = first if i == 0 else nib.load(str(path))
            check_grid(img.shape, img.affine, shape, affine, what=str(path))
            data = np.asarray(img.dataobj, dtype=np.float32).reshape(img.shape[:3])
        except unreadable as exc:
            raise DataError(f"{path} cannot be read ({type(exc).__name__}: {' '.join(str(exc).split())}); "
                            "run the participant level for this subject again") from exc
        if not np.isfinite(data).all():
            raise DataError(f"{path} contains NaN or infinite values; preprocessed maps must be finite")
        out[i, 0] = data
    return out, affine


def check_grid(shape, affine, expected_shape, expected_affine, what: str = "map") -> None:
    """Raise :class:`DataError` unless a map is on the expected grid."""
    if len(shape) != 3 and not (len(shape) == 4 and shape[3] == 1):
        raise DataError(f"{what} has shape {tuple(shape)}; expected a 3D map")
    shape = tuple(int(s) for s in shape[:3])
    expected_shape = tuple(int(s) for s in expected_shape)
    if shape != expected_shape or not np.allclose(affine, expected_affine, atol=1e-3):
        raise DataError(
            f"{what} is on grid {shape} with voxel size {_voxel(affine)} mm and origin "
            f"{_origin(affine)}; the model expects grid {expected_shape} with voxel size "
            f"{_voxel(expected_affine)} mm and origin {_origin(expected_affine)}"
        )


def _voxel(affine) -> list:
    return [round(float(v), 3) for v in np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))]


def _origin(affine) -> list:
    return [round(float(v), 2) for v in np.asarray(affine)[:3, 3]]


def input_normalisation(maps: np.ndarray) -> dict:
    """Global mean and standard deviation of (training) maps."""
    mean = float(maps.mean(dtype=np.float64))
    std = float(maps.std(dtype=np.float64))
    return {"input_mean": mean, "input_std": std if std > 0 else 1.0}


def standardise_inputs(maps: np.ndarray, normalisation: dict) -> torch.Tensor:
    """Maps standardised with the model's input normalisation, as a CPU tensor."""
    x = (maps - np.float32(normalisation["input_mean"])) / np.float32(normalisation["input_std"])
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def files_sha256(paths: Sequence[Path]) -> str:
    """One digest of the contents of ``paths`` (in order): identifies a set of inputs."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).name.encode())
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
