"""Streamed decomposition: chunked tensors, the directory store, dask, pass counts."""

from __future__ import annotations

import json
import tracemalloc

import dask.array as da
import numpy as np
import pytest
from distributed import Client, LocalCluster

from brainage_xai.decomposition import _solver, fit_constrained_tucker
from brainage_xai.decomposition._testing import factor_match_score, make_planted
from brainage_xai.decomposition.chunked import (
    ChunkedTensor,
    StoreWriter,
    chunk_name,
    read_meta,
    store_to_dask,
)

SHAPE = (45, 6, 120)


@pytest.fixture(scope="module")
def planted():
    A, truth = make_planted(SHAPE, (4, 2), noise=0.03, density=0.3, random_state=4)
    return A, truth


def _write_store(path, A, chunk, stop_after=None):
    """Write ``A`` chunk by chunk; ``stop_after`` chunks in, the writer dies."""
    w = StoreWriter(path, A.shape, dtype=A.dtype, chunk=chunk)
    for i, k in enumerate(w.missing):
        if stop_after is not None and i == stop_after:
            raise KeyboardInterrupt
        lo, hi = w.rows[k]
        w.write(k, A[lo:hi])
    return w


def _min_corr(a, b):
    return min(abs(np.corrcoef(a[:, j], b[:, j])[0, 1]) for j in range(a.shape[1]))


def test_store_round_trip_and_format(tmp_path, planted):
    A = planted[0].astype(np.float32)
    _write_store(tmp_path / "s", A, chunk=10)
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    assert meta["shape"] == list(A.shape) and meta["dtype"] == "float32"
    assert meta["chunks"] == [[0, 10], [10, 20], [20, 30], [30, 40], [40, 45]]
    assert meta["complete"] == [True] * 5
    # each chunk is a plain .npy file, readable memory-mapped without this package
    block = np.load(tmp_path / "s" / chunk_name(4), mmap_mode="r")
    assert isinstance(block, np.memmap) and block.shape == (5, 6, 120)
    T = ChunkedTensor.from_store(tmp_path / "s")
    assert (T.shape, T.dtype, T.n_chunks) == (A.shape, np.float32, 5)
    np.testing.assert_array_equal(T.to_numpy(), A)
    # the fit takes the store's path too
    by_path = fit_constrained_tucker(str(tmp_path / "s"), 3, n_iter_max=3)
    by_tensor = fit_constrained_tucker(T, 3, n_iter_max=3)
    np.testing.assert_array_equal(by_path.factors[2], by_tensor.factors[2])


def test_interrupted_store_resumes_and_equals_the_uninterrupted_one(tmp_path, planted):
    A = planted[0].astype(np.float32)
    _write_store(tmp_path / "whole", A, chunk=8)
    with pytest.raises(KeyboardInterrupt):
        _write_store(tmp_path / "cut", A, chunk=8, stop_after=3)
    # a chunk half written when the writer died: only its temporary file exists
    (tmp_path / "cut" / f".{chunk_name(3)}.tmp-1").write_bytes(b"\x93NUMPY partial")
    meta = read_meta(tmp_path / "cut")
    assert meta["complete"] == [True, True, True, False, False, False]
    with pytest.raises(ValueError, match="incomplete: 3 of 6 chunks"):
        ChunkedTensor.from_store(tmp_path / "cut")
    written = (tmp_path / "cut" / chunk_name(0)).stat().st_mtime_ns
    w = StoreWriter(tmp_path / "cut", A.shape, dtype=np.float32, chunk=8)
    assert w.missing == [3, 4, 5]
    _write_store(tmp_path / "cut", A, chunk=8)
    assert (tmp_path / "cut" / chunk_name(0)).stat().st_mtime_ns == written  # not rewritten
    assert not list((tmp_path / "cut").glob(".*tmp*"))  # the dead writer's file is gone
    for k in range(6):
        assert (tmp_path / "cut" / chunk_name(k)).read_bytes() == \
            (tmp_path / "whole" / chunk_name(k)).read_bytes()
    assert read_meta(tmp_path / "cut") == read_meta(tmp_path / "whole")
    np.testing.assert_array_equal(ChunkedTensor.from_store(tmp_path / "cut").to_numpy(), A)


def test_store_refuses_another_shape(tmp_path, planted):
    A = planted[0].astype(np.float32)
    _write_store(tmp_path / "s", A, chunk=10)
    with pytest.raises(ValueError, match="holds shape"):
        StoreWriter(tmp_path / "s", A.shape, dtype=np.float32, chunk=9)
    with pytest.raises(ValueError, match="chunk 0 must have shape"):
        StoreWriter(tmp_path / "s", A.shape, dtype=np.float32, chunk=10).write(0, A[:3])
    with pytest.raises(FileNotFoundError, match="not a chunked store"):
        ChunkedTensor.from_store(tmp_path)


@pytest.mark.parametrize(("constraints", "rank", "l1"), [
    ("nonneg", (4, 4), 0.0), ("nonneg", (4, 2), 0.0), ("paper", (4, 2), 0.2),
])
def test_streamed_fit_agrees_with_in_memory_fit(tmp_path, planted, constraints, rank, l1):
    A = planted[0].astype(np.float32)
    _write_store(tmp_path / "s", A, chunk=7)
    T = ChunkedTensor.from_store(tmp_path / "s")
    kw = dict(constraints=constraints, l1=l1, tol=1e-8, n_iter_max=300)
    mem = fit_constrained_tucker(A, rank, **kw)
    streamed = fit_constrained_tucker(T, rank, **kw)
    assert abs(streamed.rel_error - mem.rel_error) < 1e-4
    for a, b in zip(mem.factors, streamed.factors):
        assert _min_corr(a, b) > 0.999
    # held-out subjects: transform and error from a store equal the in-memory ones
    U1 = streamed.transform(T)
    np.testing.assert_allclose(U1, streamed.transform(A), rtol=1e-4, atol=1e-6)
    assert abs(streamed.error_on(T, U1) - streamed.error_on(A, U1)) < 1e-5


def test_streamed_fit_reads_one_chunk_at_a_time(tmp_path, rng):
    A = rng.random((200, 4, 5000), dtype=np.float32)
    _write_store(tmp_path / "s", A, chunk=10)
    T = ChunkedTensor.from_store(tmp_path / "s")
    del A
    tracemalloc.start()
    try:
        res = fit_constrained_tucker(T, (3, 3), init="sketch", n_iter_max=3)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    nbytes = 200 * 4 * 5000 * 4
    assert res.factors[2].shape == (5000, 3)
    assert peak < 0.25 * nbytes, f"peak {peak / nbytes:.2f} x the tensor"


def test_passes_are_counted(planted):
    A = planted[0]
    T = ChunkedTensor.from_array(A, 10)
    res = fit_constrained_tucker(T, (4, 4), n_iter_max=5, tol=0)
    # one pass checks the input, the SVD start costs 22, each iteration two
    assert res.n_passes == T.passes == 1 + 22 + 2 * 5
    res = fit_constrained_tucker(T, (4, 4), init="sketch", n_iter_max=5, tol=0)
    # the sketch start's first pass also checks the input: 1 + SKETCH_POWER_ITER in all
    assert res.n_passes == 1 + _solver.SKETCH_POWER_ITER + 2 * 5
    mem = fit_constrained_tucker(A, (4, 4), init="sketch", n_iter_max=5, tol=0)
    assert mem.n_passes == 1 + 1 + _solver.SKETCH_POWER_ITER + 2 * 5


def test_sketch_start_is_the_svd_whatever_the_seed(rng):
    # As test_svd_init_is_the_svd_whatever_the_seed, for the three-pass start.
    from brainage_xai.decomposition._backend import Backend
    from brainage_xai.decomposition._passes import Passes

    n, c, v, R = 60, 4, 3000, 4
    s = 0.8 ** np.arange(30)
    A = np.einsum("r,ar,br,cr->abc", s, rng.random((n, 30)), rng.random((c, 30)), rng.random((v, 30)))
    A = (A + 0.01 * rng.random(A.shape)).astype(np.float32)
    exact = np.abs(np.linalg.svd(A.reshape(n * c, v).astype(np.float64), full_matrices=False)[2][:R].T)
    bk = Backend(A)
    for seed in (0, 1, 2):
        st, _ = _solver.sketch_init(bk, Passes(bk, ChunkedTensor.from_array(A, 16), A.shape), A.shape,
                                    R, np.random.default_rng(seed))
        cos = np.abs(np.sum(st.U3 * exact, axis=0)) / np.linalg.norm(st.U3, axis=0)
        assert cos.min() > 0.9999
        assert st.U1 is None and np.all(st.W >= 0)


def test_sketch_start_fits_as_well_as_the_svd_start(planted):
    A, truth = planted
    for rank in ((4, 4), (4, 2)):
        svd = fit_constrained_tucker(A, rank, tol=1e-8, n_iter_max=500)
        sketch = fit_constrained_tucker(A, rank, init="sketch", tol=1e-8, n_iter_max=500)
        assert sketch.rel_error <= svd.rel_error * (1 + 1e-3)
        W = sketch.factors[1] @ sketch.faces.T
        score, _ = factor_match_score([truth["U1"], truth["W"], truth["U3"]],
                                      [sketch.factors[0], W, sketch.factors[2]])
        assert score > 0.98


def test_bad_chunked_input_gives_clear_error(planted):
    A = planted[0].copy()
    A[30, 2, 7] = np.nan
    with pytest.raises(ValueError, match="1 NaN value"):
        fit_constrained_tucker(ChunkedTensor.from_array(A, 10), 3, init="sketch")
    A = planted[0] - 0.5
    with pytest.raises(ValueError, match="non-negative A; its smallest entry"):
        fit_constrained_tucker(ChunkedTensor.from_array(A, 10), 3)
    with pytest.raises(ValueError, match="all zeros"):
        fit_constrained_tucker(ChunkedTensor.from_array(np.zeros((10, 3, 8)), 4), 2, init="sketch")
    with pytest.raises(ValueError, match="'chunk' must be an integer"):
        ChunkedTensor.from_array(A, 0)


def test_dask_array_fit_on_a_local_cluster_agrees_with_the_local_fit(tmp_path, planted):
    A = planted[0]
    _write_store(tmp_path / "s", A, chunk=15)
    kw = dict(init="sketch", tol=1e-8, n_iter_max=20)
    local = fit_constrained_tucker(ChunkedTensor.from_store(tmp_path / "s"), (4, 4), **kw)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster, Client(cluster):
        darr = store_to_dask(tmp_path / "s")  # the workers read the store's chunks
        remote = fit_constrained_tucker(darr, (4, 4), **kw)
        from_array = fit_constrained_tucker(da.from_array(A, chunks=(15, -1, -1)), (4, 4), **kw)
    for res in (remote, from_array):
        assert res.n_passes == local.n_passes
        assert abs(res.rel_error - local.rel_error) < 1e-10
        for a, b in zip(local.factors, res.factors):
            np.testing.assert_allclose(a, b, atol=1e-8)
