"""Subject-chunked tensors: the decomposition's passes over ``A`` one chunk at a time.

A :class:`ChunkedTensor` of shape ``(n, c, v)`` is a sequence of subject chunks, chunk
``k`` holding subjects ``rows[k][0]:rows[k][1]`` as an array of shape ``(n_k, c, v)``.
Every pass of :func:`~brainage_xai.decomposition.fit_constrained_tucker` over such a
tensor reads one chunk at a time, so its memory is one chunk plus the factors, whatever
``n``. The chunks come from an in-memory array (:meth:`ChunkedTensor.from_array`), a
directory store (:meth:`ChunkedTensor.from_store`) or a ``dask.array`` chunked along
the subjects (:meth:`ChunkedTensor.from_dask`); with a dask array each pass is one dask
graph (one task per chunk, sums reduced by a tree), so it runs wherever dask runs, e.g.
on a ``distributed`` cluster when a ``Client`` is active.

Store format
------------
A store is a directory::

    meta.json          {"format": "brainage-xai-chunked", "version": 1,
                        "shape": [n, c, v], "dtype": "float32",
                        "chunks": [[0, 100], [100, 200], ...],   # subject row ranges
                        "complete": [true, false, ...]}          # one flag per chunk
    chunk-00000.npy    chunk 0, an .npy array of shape (rows, c, v) in ``dtype``
    chunk-00001.npy    ...

The row ranges are contiguous, start at 0 and end at ``n``. A chunk file is written
under a temporary name with ``numpy.lib.format.open_memmap``, flushed, renamed into
place, and only then flagged complete in ``meta.json`` (itself replaced atomically), so
a writer that is interrupted leaves complete chunks that are whole and incomplete ones
that are rewritten on the next run (:class:`StoreWriter`). Readers open each chunk with
``numpy.load(mmap_mode='r')`` for the time of one pass step and need every chunk
complete.
"""

from __future__ import annotations

import json
import operator
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

FORMAT = "brainage-xai-chunked"
VERSION = 1
META = "meta.json"


def chunk_name(k: int) -> str:
    """File name of chunk ``k`` in a store."""
    return f"chunk-{k:05d}.npy"


def row_ranges(n: int, chunk: int) -> list[tuple[int, int]]:
    """Contiguous ranges of at most ``chunk`` subjects covering ``0..n``."""
    if not isinstance(chunk, int | np.integer) or chunk < 1:
        raise ValueError(f"'chunk' must be an integer >= 1; got {chunk!r}")
    return [(lo, min(lo + int(chunk), n)) for lo in range(0, n, int(chunk))]


class Rows:
    """An argument of a pass that is cut by subject rows: each chunk gets its own rows."""

    __slots__ = ("array",)

    def __init__(self, array):
        self.array = array


def _cut(args, lo, hi):
    return tuple(a.array[lo:hi] if isinstance(a, Rows) else a for a in args)


def _add(a, b):
    """Sum of two results of a chunk function (tuples of arrays or ``None``)."""
    if a is None:
        return b
    if b is None:
        return a
    return tuple(x + y for x, y in zip(a, b))


def _split(result):
    return result if isinstance(result, tuple) and len(result) == 2 else (result, None)


class ChunkedTensor:
    """A 3-way tensor ``(n, c, v)`` held as chunks of subjects.

    Build one with :meth:`from_array`, :meth:`from_store` or :meth:`from_dask`.

    Attributes
    ----------
    shape : tuple of int
    dtype : numpy.dtype
    rows : list of (int, int)
        Subject range of each chunk.
    passes : int
        Number of passes made over the tensor so far (each reads every chunk once).
    """

    ndim = 3

    def __init__(self, shape, dtype, rows, load: Callable[[int], object], *, dask_blocks=None,
                 source: str = "array"):
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.rows = [(int(a), int(b)) for a, b in rows]
        self._load = load
        self._dask_blocks = dask_blocks
        self.source = source
        self.passes = 0
        _check_rows(self.rows, self.shape[0])

    # ------------------------------------------------------------------ builders
    @classmethod
    def from_array(cls, A, chunk: int) -> ChunkedTensor:
        """Chunks of ``chunk`` subjects of an in-memory array (views, no copy)."""
        A = np.asarray(A)
        if A.ndim != 3:
            raise ValueError(f"A must be a 3-way array; got shape {A.shape}")
        rows = row_ranges(A.shape[0], chunk)
        return cls(A.shape, A.dtype, rows, lambda k: A[rows[k][0]:rows[k][1]], source="array")

    @classmethod
    def from_store(cls, path) -> ChunkedTensor:
        """A directory store (see the module docstring); every chunk must be complete."""
        path = Path(path)
        meta = read_meta(path)
        missing = [k for k, done in enumerate(meta["complete"]) if not done]
        if missing:
            raise ValueError(
                f"store {path} is incomplete: {len(missing)} of {len(meta['complete'])} "
                f"chunks are not written (first: {chunk_name(missing[0])})"
            )
        shape, dtype, rows = tuple(meta["shape"]), np.dtype(meta["dtype"]), meta["chunks"]

        def load(k):
            arr = np.load(path / chunk_name(k), mmap_mode="r", allow_pickle=False)
            want = (rows[k][1] - rows[k][0], *shape[1:])
            if arr.shape != want or arr.dtype != dtype:
                raise ValueError(
                    f"{chunk_name(k)} in {path} has shape {arr.shape} and dtype {arr.dtype}, "
                    f"expected {want} and {dtype}"
                )
            return arr

        return cls(shape, dtype, rows, load, source="store")

    @classmethod
    def from_dask(cls, A) -> ChunkedTensor:
        """A ``dask.array`` of shape ``(n, c, v)``; rechunked whole along channels and voxels."""
        if A.ndim != 3:
            raise ValueError(f"A must be a 3-way array; got shape {A.shape}")
        A = A.rechunk({1: -1, 2: -1})
        blocks = A.to_delayed()[:, 0, 0].tolist()
        bounds = np.concatenate([[0], np.cumsum(A.chunks[0])]).astype(int)
        rows = list(zip(bounds[:-1], bounds[1:]))
        return cls(A.shape, A.dtype, rows, lambda k: np.asarray(blocks[k].compute()),
                   dask_blocks=blocks, source="dask")

    # ------------------------------------------------------------------ access
    def __len__(self):
        return self.shape[0]

    def __repr__(self):
        return (f"ChunkedTensor(shape={self.shape}, dtype={self.dtype}, chunks={len(self.rows)}, "
                f"source={self.source!r})")

    @property
    def n_chunks(self) -> int:
        return len(self.rows)

    def chunk(self, k: int) -> np.ndarray:
        """Chunk ``k`` as an array (memory-mapped for a store)."""
        return self._load(k)

    def to_numpy(self) -> np.ndarray:
        """The whole tensor in memory (small tensors and tests only)."""
        out = np.empty(self.shape, self.dtype)
        for k, (lo, hi) in enumerate(self.rows):
            out[lo:hi] = self._load(k)
        return out

    def stream(self, func, *args):
        """One pass: ``func(chunk, *args)`` on every chunk.

        ``func`` returns ``(rows_part, sums)``: ``rows_part`` (an array whose first axis
        is the chunk's subjects, or ``None``) is concatenated over the chunks, ``sums``
        (a tuple of arrays, or ``None``) is added up. Arguments wrapped in :class:`Rows`
        are cut to each chunk's subjects. Returns ``(rows, sums)``.
        """
        self.passes += 1
        if self._dask_blocks is not None:
            return self._stream_dask(func, args)
        parts, total = [], None
        for k, (lo, hi) in enumerate(self.rows):
            block = self._load(k)
            part, sums = _split(func(block, *_cut(args, lo, hi)))
            del block  # unmaps a store's chunk before the next one is read
            if part is not None:
                parts.append(part)
            total = _add(total, sums)
        return (np.concatenate(parts, axis=0) if parts else None), total

    def _stream_dask(self, func, args):
        import dask

        # One graph key per shared argument: sent once to each worker, not once per task.
        shared = tuple(a if isinstance(a, Rows) else dask.delayed(a) for a in args)
        out = []
        for blk, (lo, hi) in zip(self._dask_blocks, self.rows):
            call = _cut(shared, lo, hi)
            out.append(dask.delayed(_split)(dask.delayed(func)(blk, *call)))
        parts = [dask.delayed(operator.getitem)(o, 0) for o in out]
        sums = [dask.delayed(operator.getitem)(o, 1) for o in out]
        while len(sums) > 1:  # tree reduction: no task holds more than two partial sums
            sums = [dask.delayed(_add)(*sums[i:i + 2]) if i + 1 < len(sums) else sums[i]
                    for i in range(0, len(sums), 2)]
        parts, (total,) = dask.compute(parts, sums)
        parts = [p for p in parts if p is not None]
        return (np.concatenate(parts, axis=0) if parts else None), total


def _check_rows(rows, n):
    if not rows or rows[0][0] != 0 or rows[-1][1] != n or any(
        a >= b for a, b in rows
    ) or any(rows[i][1] != rows[i + 1][0] for i in range(len(rows) - 1)):
        raise ValueError(f"chunk row ranges must be contiguous, non-empty and cover 0..{n}; got {rows}")


# --------------------------------------------------------------------------- store
def read_meta(path) -> dict:
    """``meta.json`` of a store, checked."""
    path = Path(path)
    try:
        meta = json.loads((path / META).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is not a chunked store: {META} is missing") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path / META} is not valid JSON: {exc}") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{path / META} is not a {FORMAT} store of version {VERSION}")
    shape = meta.get("shape")
    if not (isinstance(shape, list) and len(shape) == 3):
        raise ValueError(f"{path / META}: 'shape' must be [n, c, v]; got {shape!r}")
    if len(meta.get("complete", [])) != len(meta.get("chunks", [])):
        raise ValueError(f"{path / META}: one 'complete' flag per chunk is needed")
    _check_rows([tuple(r) for r in meta["chunks"]], shape[0])
    return meta


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1), encoding="utf-8")
    os.replace(tmp, path)


class StoreWriter:
    """Writes a store chunk by chunk; a writer reopened on the same path resumes.

    Parameters
    ----------
    path : path-like
        The store directory (created if needed).
    shape : (n, c, v)
    dtype : numpy dtype, default float32
    chunk : int
        Subjects per chunk.

    Reopening a store with other ``shape``, ``dtype`` or ``chunk`` is an error (the
    chunks written so far would not fit); reopening it removes the temporary files of a
    writer that died. One writer at a time per store. :attr:`missing` lists the chunks still to
    write; :meth:`write` writes one atomically and marks it complete.
    """

    def __init__(self, path, shape, dtype="float32", chunk: int = 100):
        self.path = Path(path)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        rows = row_ranges(self.shape[0], chunk)
        self.path.mkdir(parents=True, exist_ok=True)
        if (self.path / META).exists():
            meta = read_meta(self.path)
            same = (tuple(meta["shape"]) == self.shape and np.dtype(meta["dtype"]) == self.dtype
                    and [tuple(r) for r in meta["chunks"]] == rows)
            if not same:
                raise ValueError(
                    f"store {self.path} holds shape {tuple(meta['shape'])}, dtype {meta['dtype']} "
                    f"in {len(meta['chunks'])} chunks; asked for shape {self.shape}, dtype "
                    f"{self.dtype} in {len(rows)} chunks"
                )
            self.meta = meta
            for stale in self.path.glob(".chunk-*.npy.tmp-*"):  # left by a writer that died
                stale.unlink(missing_ok=True)
        else:
            self.meta = {"format": FORMAT, "version": VERSION, "shape": list(self.shape),
                         "dtype": self.dtype.name, "chunks": [list(r) for r in rows],
                         "complete": [False] * len(rows)}
            _write_json(self.path / META, self.meta)

    @property
    def rows(self) -> list[tuple[int, int]]:
        return [tuple(r) for r in self.meta["chunks"]]

    @property
    def missing(self) -> list[int]:
        """Chunks not yet written completely."""
        return [k for k, done in enumerate(self.meta["complete"]) if not done]

    def write(self, k: int, block) -> None:
        """Write chunk ``k`` (shape ``(rows, c, v)``) atomically and mark it complete."""
        lo, hi = self.rows[k]
        want = (hi - lo, *self.shape[1:])
        block = np.asarray(block)
        if block.shape != want:
            raise ValueError(f"chunk {k} must have shape {want}; got {block.shape}")
        final = self.path / chunk_name(k)
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=self.dtype, shape=want)
        out[...] = block
        out.flush()
        del out
        os.replace(tmp, final)
        self.meta["complete"][k] = True
        _write_json(self.path / META, self.meta)

    def tensor(self) -> ChunkedTensor:
        """The finished store as a :class:`ChunkedTensor`."""
        return ChunkedTensor.from_store(self.path)


def as_chunked(A, chunk: int | None = None):
    """``A`` as a :class:`ChunkedTensor` if it is a dask array or a store path, else ``A``."""
    if isinstance(A, ChunkedTensor):
        return A
    if isinstance(A, str | os.PathLike):
        return ChunkedTensor.from_store(A)
    if type(A).__module__.split(".")[0] == "dask":
        return ChunkedTensor.from_dask(A)
    if chunk is not None:
        return ChunkedTensor.from_array(A, chunk)
    return A




def store_to_dask(path):
    """A store as a ``dask.array`` with one block per chunk (each read by ``numpy.load``).

    For a fit on a Dask cluster whose workers see the store's directory.
    """
    import dask
    import dask.array as da

    path = Path(path)
    meta = read_meta(path)
    if not all(meta["complete"]):
        raise ValueError(f"store {path} is incomplete")
    _, c, v = meta["shape"]
    blocks = [da.from_delayed(dask.delayed(np.load)(str(path / chunk_name(k)), allow_pickle=False),
                              shape=(hi - lo, c, v), dtype=meta["dtype"])
              for k, (lo, hi) in enumerate(meta["chunks"])]
    return da.concatenate(blocks, axis=0)
