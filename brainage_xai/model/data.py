"""Preprocessed maps as network inputs: loading, grid checks, standardisation."""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError, MissingInputError

_UNREADABLE = (OSError, EOFError, ValueError, zlib.error)


def _unreadable():
    import nibabel as nib

    return (*_UNREADABLE, nib.filebasedimages.ImageFileError)


def _grid_of(path: Path) -> tuple[tuple[int, ...], np.ndarray]:
    import nibabel as nib

    try:
        img = nib.load(str(path))
    except _unreadable() as exc:
        raise DataError(f"{path} cannot be read ({type(exc).__name__}); run the participant "
                        "level for this subject again") from exc
    return img.shape[:3], img.affine


def read_map(path: Path, shape, affine) -> np.ndarray:
    """One preprocessed map as ``(*grid)`` float32, checked to be on the grid and finite."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
        check_grid(img.shape, img.affine, shape, affine, what=str(path))
        data = np.asarray(img.dataobj, dtype=np.float32).reshape(img.shape[:3])
    except _unreadable() as exc:
        raise DataError(f"{path} cannot be read ({type(exc).__name__}: {' '.join(str(exc).split())}); "
                        "run the participant level for this subject again") from exc
    if not np.isfinite(data).all():
        raise DataError(f"{path} contains NaN or infinite values; preprocessed maps must be finite")
    return data


def load_maps(paths: Sequence[Path]) -> tuple[np.ndarray, np.ndarray]:
    """Stack 3D maps that share one grid into ``(n, 1, *grid)`` float32 (the whole cohort
    in memory; :class:`MapDataset` reads them one at a time instead).

    Returns
    -------
    maps : numpy.ndarray
    affine : numpy.ndarray
        The common 4 x 4 affine.
    """
    if not paths:
        raise MissingInputError("no preprocessed maps to load")
    shape, affine = _grid_of(paths[0])
    out = np.empty((len(paths), 1, *shape), dtype=np.float32)
    for i, path in enumerate(paths):
        out[i, 0] = read_map(path, shape, affine)
    return out, affine


class MapDataset(torch.utils.data.Dataset):
    """Preprocessed maps on disk as network inputs, one subject per item, read when asked.

    An item is the map ``(1, *grid)`` float32, standardised with ``normalisation`` when it
    is given (exactly as :func:`standardise_inputs` does for the whole array), so that
    training and the network passes hold a batch, not the cohort. It is also what
    :func:`batches` hands to a :class:`torch.utils.data.DataLoader` with ``workers``
    processes reading ahead.

    Parameters
    ----------
    paths : sequence of path-like
        One map per subject, all on one grid (checked as each is read).
    normalisation : dict, optional
        ``input_mean`` and ``input_std`` (:func:`input_normalisation`).
    workers : int
        Loader processes that read the next batches while the network runs (0: read in
        this process).
    """

    def __init__(self, paths: Sequence[Path], normalisation: dict | None = None, *, workers: int = 0,
                 grid: tuple | None = None):
        if not len(paths):
            raise MissingInputError("no preprocessed maps to load")
        self.paths = [Path(p) for p in paths]
        self.normalisation = normalisation
        self.workers = int(workers)
        self.shape, self.affine = grid if grid is not None else _grid_of(self.paths[0])

    def __len__(self) -> int:
        return len(self.paths)

    def raw(self, i: int) -> np.ndarray:
        """Subject ``i``'s map as stored, ``(*grid)`` float32."""
        return read_map(self.paths[int(i)], self.shape, self.affine)

    def __getitem__(self, i: int) -> torch.Tensor:
        x = self.raw(i)[None]
        if self.normalisation is not None:
            return standardise_inputs(x, self.normalisation)
        return torch.from_numpy(x)

    def subset(self, rows) -> MapDataset:
        """The maps of ``rows`` (in that order), with the same settings."""
        return MapDataset([self.paths[int(r)] for r in rows], self.normalisation,
                          workers=self.workers, grid=(self.shape, self.affine))

    def stack(self, rows=None) -> torch.Tensor:
        """The maps of ``rows`` (all by default) stacked, ``(n, 1, *grid)``: the rows of
        :func:`standardise_inputs` of the whole cohort, holding only these."""
        rows = range(len(self)) if rows is None else rows
        out = torch.empty((len(rows), 1, *self.shape), dtype=torch.float32)
        for k, i in enumerate(rows):
            out[k] = self[i]
        return out

    def mean(self) -> np.ndarray:
        """The mean map ``(*grid)`` float32, read one map at a time: ``mean(axis=0)`` of the
        stacked maps to the bit (NumPy adds the rows in turn in float32)."""
        total = self[0].numpy()[0].copy()
        for i in range(1, len(self)):
            np.add(total, self[i].numpy()[0], out=total)
        np.true_divide(total, np.intp(len(self)), out=total, casting="unsafe")
        return total

    def standardised(self, normalisation: dict) -> MapDataset:
        """The same maps, standardised with ``normalisation``."""
        return MapDataset(self.paths, normalisation, workers=self.workers, grid=(self.shape, self.affine))


def spans(n: int, batch_size: int) -> list[range]:
    """The rows ``0..n-1`` in consecutive batches of ``batch_size`` (the last may be short)."""
    return [range(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]


def batches(x, rows, device: torch.device | str = "cpu"):
    """Yield the inputs of each batch of ``rows`` (a sequence of index sequences): rows of
    an in-memory tensor, or read from a :class:`MapDataset` through a DataLoader (its
    ``workers``; pinned memory for a CUDA device). Both give the same tensors."""
    if isinstance(x, torch.Tensor):
        for idx in rows:
            yield x[idx.start : idx.stop] if isinstance(idx, range) else x[idx]
        return
    rows = [[int(i) for i in idx] for idx in rows]
    workers = min(x.workers, len(rows))
    loader = torch.utils.data.DataLoader(
        x, batch_sampler=rows, num_workers=workers, pin_memory=torch.device(device).type == "cuda",
        generator=torch.Generator(),  # the loader's seed draw leaves the global stream alone
    )
    yield from loader


def loader_workers(n_cpus: int | None, device: torch.device | str) -> int:
    """Loader processes for the network passes: on a GPU, up to 8 of the CPUs beside the
    one that drives it; on the CPU, where the network itself uses the cores, one for
    every four CPUs (none on fewer than four)."""
    import os

    cpus = n_cpus or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    if torch.device(device).type == "cuda":
        return max(0, min(8, cpus - 1))
    return cpus // 4


def dataset_normalisation(maps: MapDataset) -> dict:
    """:func:`input_normalisation` of the maps of ``maps``, read one at a time, to the bit.

    NumPy's ``mean(dtype=float64)`` of a float32 array sums its flat sequence in buffers
    of ``numpy.getbufsize()`` elements, each pairwise, added in turn; the ``std`` sums the
    squared deviations pairwise over the whole flat sequence. Both orders are followed
    here over the subjects' maps as if they were stacked, so that training from files
    starts from the same normalisation as training from the stacked array.
    """
    n, v = len(maps), int(np.prod(maps.shape))
    size = n * v
    buffer = np.getbufsize()
    total, carry = 0.0, np.empty(0, np.float32)
    for i in range(n):
        flat = np.concatenate([carry, maps.raw(i).reshape(-1)])
        full = flat.size - flat.size % buffer
        for chunk in flat[:full].reshape(-1, buffer):
            total = total + np.add.reduce(chunk.astype(np.float64))
        carry = flat[full:]
    if carry.size:
        total = total + np.add.reduce(carry.astype(np.float64))
    mean = total / size
    cached: dict[int, np.ndarray] = {}

    def squares(i: int) -> np.ndarray:
        if i not in cached:
            if len(cached) > 1:  # a block spans two subjects at most
                cached.clear()
            d = maps.raw(i).reshape(-1).astype(np.float64) - mean
            cached[i] = d * d
        return cached[i]

    def pairwise(start: int, count: int) -> float:
        # numpy's pairwise_sum: halves rounded down to a multiple of 8, down to the blocks
        # a single reduction sums the same way
        if count <= v:
            first, last = start // v, (start + count - 1) // v
            parts = [squares(i)[max(start - i * v, 0): min(start + count - i * v, v)]
                     for i in range(first, last + 1)]
            return np.add.reduce(parts[0] if len(parts) == 1 else np.concatenate(parts))
        half = count // 2
        half -= half % 8
        return pairwise(start, half) + pairwise(start + half, count - half)

    std = float(np.sqrt(pairwise(0, size) / size))
    return {"input_mean": float(mean), "input_std": std if std > 0 else 1.0}


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
