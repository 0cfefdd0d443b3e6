"""Tests of the constrained Tucker decomposition (paper eq. 2) on small seeded tensors."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from sklearn.base import clone
from tensorly.decomposition import non_negative_parafac_hals

from brainage_xai import decomposition as dec
from brainage_xai.decomposition import (
    ConstrainedTucker,
    ConstrainedTuckerResult,
    fit_constrained_tucker,
    relative_error,
)
from brainage_xai.decomposition._testing import factor_match_score, make_planted

SHAPE = (24, 10, 40)


@pytest.fixture(scope="module")
def planted_full():
    """Rank-4 model with a generic channel factor (R2 >= R1 regime)."""
    return make_planted(SHAPE, (4, 6), noise=0.02, random_state=1)


@pytest.fixture(scope="module")
def planted_reduced():
    """Rank-4 model whose channel factor has rank 2 (PARALIND-like, R2 < R1)."""
    return make_planted(SHAPE, (4, 2), noise=0.02, density=0.3, random_state=2)


def _np(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _W(res):
    return _np(res.factors[1]) @ _np(res.faces).T


CASES = [
    pytest.param("nonneg", (4, 6), 0.0, id="nonneg-full"),
    pytest.param("nonneg", (4, 2), 0.0, id="nonneg-reduced"),
    pytest.param("paper", (4, 6), 0.0, id="paper-full"),
    pytest.param("paper", (4, 2), 0.0, id="paper-reduced"),
    pytest.param("nonneg", (4, 2), 0.5, id="nonneg-reduced-l1"),
    pytest.param("paper", (4, 4), 0.5, id="paper-full-l1"),
]


@pytest.mark.parametrize(("constraints", "rank", "l1"), CASES)
def test_constraints_hold_exactly_and_objective_never_increases(
    planted_reduced, constraints, rank, l1
):
    A, _ = planted_reduced
    res = fit_constrained_tucker(A, rank, constraints=constraints, l1=l1, tol=1e-9,
                                 n_iter_max=300)
    R1, R2 = rank
    core = res.core
    U1, U2, U3 = res.factors
    assert core.shape == (R1, R2, R1)
    assert (U1.shape, U2.shape, U3.shape) == ((SHAPE[0], R1), (SHAPE[1], R2), (SHAPE[2], R1))
    off = np.ones((R1, R2, R1), dtype=bool)
    off[np.arange(R1), :, np.arange(R1)] = False
    assert np.all(core[off] == 0.0)  # exactly, not approximately
    assert np.all(core >= 0) and np.all(U3 >= 0)
    np.testing.assert_array_equal(res.faces, core[np.arange(R1), :, np.arange(R1)])
    if constraints == "nonneg":
        assert np.all(U1 >= 0) and np.all(U2 >= 0)
    # the scale sits in the core: factor columns have unit norm (or are empty)
    for F in res.factors:
        norms = np.linalg.norm(F, axis=0)
        assert np.all((np.abs(norms - 1) < 1e-10) | (norms == 0))
    errs = np.asarray(res.errors)
    assert 1 <= len(errs) <= res.n_iter  # rejected extrapolations are not listed
    assert np.all(np.diff(errs) <= 1e-12 * errs[:-1])
    # the reported error is that of the returned model
    dense = np.linalg.norm(A - res.reconstruct()) / np.linalg.norm(A)
    assert res.rel_error == pytest.approx(dense, rel=1e-8)
    assert relative_error(A, res) == pytest.approx(dense, rel=1e-8)
    assert res.rel_error < 0.2


def test_full_rank_recovers_planted_model(planted_full):
    A, truth = planted_full
    res = fit_constrained_tucker(A, (4, 6), tol=1e-9)
    fms, _ = factor_match_score([truth["U1"], truth["W"], truth["U3"]],
                                [res.factors[0], _W(res), res.factors[2]])
    assert fms >= 0.95
    # the extra channel columns carry nothing (R2 >= R1: U2 = W padded)
    assert np.all(res.factors[1][:, 4:] == 0) and np.all(res.faces[:, 4:] == 0)


def test_reduced_rank_recovers_planted_model(planted_reduced):
    A, truth = planted_reduced
    res = fit_constrained_tucker(A, (4, 2), tol=1e-9)
    fms, _ = factor_match_score([truth["U1"], truth["W"], truth["U3"]],
                                [res.factors[0], _W(res), res.factors[2]])
    assert fms >= 0.95
    assert res.n_iter_init > 0  # started from the rank-R1 CP fit
    # the channel factor spans the planted rank-2 subspace
    Q, _ = np.linalg.qr(res.factors[1])
    T = truth["U2"] / np.linalg.norm(truth["U2"], axis=0)
    assert np.linalg.norm(T - Q @ (Q.T @ T)) < 0.05


def test_sparse_spatial_maps_are_recovered(planted_full):
    A, truth = planted_full
    res = fit_constrained_tucker(A, (4, 6), l1=0.2, tol=1e-9)
    _, perm = factor_match_score([truth["U1"], truth["W"], truth["U3"]],
                                 [res.factors[0], _W(res), res.factors[2]])
    U3 = res.factors[2][:, perm]
    support = truth["U3"] > 0
    # the l1 penalty zeroes voxels outside the planted regions, and keeps the regions
    assert np.mean(U3[~support] == 0) > 0.9
    strong = truth["U3"] > 0.25 * truth["U3"].max(axis=0)
    assert np.all(U3[strong] > 0)
    plain = fit_constrained_tucker(A, (4, 6), tol=1e-9)
    assert np.mean(res.factors[2] == 0) > np.mean(plain.factors[2] == 0)


def test_transform_recovers_held_out_loadings():
    A, truth = make_planted((40, 10, 40), (4, 6), noise=0.01, random_state=3)
    train, held = A[:30], A[30:]
    for constraints in ("nonneg", "paper"):
        res = fit_constrained_tucker(train, (4, 6), constraints=constraints, tol=1e-9)
        _, perm = factor_match_score([truth["U1"][:30], truth["W"], truth["U3"]],
                                     [res.factors[0], _W(res), res.factors[2]])
        U1_new = res.transform(held)[:, perm]
        for r in range(4):
            corr = np.corrcoef(U1_new[:, r], truth["U1"][30:, r])[0, 1]
            assert corr > 0.99
        # the refitted loadings explain the held-out subjects as well as training
        err_new = res.error_on(held, res.transform(held))
        dense = res.core
        Ahat = np.einsum("ai,ijk,bj,ck->abc", res.transform(held), dense, res.factors[1],
                         res.factors[2])
        assert err_new == pytest.approx(np.linalg.norm(held - Ahat) / np.linalg.norm(held),
                                        rel=1e-8)
        assert err_new < 2 * res.rel_error
        # transform of the training subjects gives back (close to) their loadings
        np.testing.assert_allclose(res.transform(train), res.factors[0], atol=1e-3)


def test_transform_is_non_negative_least_squares(rng):
    A, _ = make_planted(SHAPE, (3, 5), noise=0.05, random_state=4)
    res = fit_constrained_tucker(A, (3, 5))
    new = np.abs(rng.standard_normal((5, SHAPE[1], SHAPE[2])))  # not from the model
    U1 = res.transform(new)
    assert np.all(U1 >= 0)
    # KKT conditions of min ||new - G x1 U1 x2 U2 x3 U3||: gradient >= 0, = 0 where U1 > 0
    W = _W(res)
    U3 = res.factors[2]
    M = np.einsum("abc,br,cr->ar", new, W, U3)
    H = (W.T @ W) * (U3.T @ U3)
    grad = U1 @ H - M
    scale = np.abs(M).max()
    assert np.all(grad >= -1e-6 * scale)
    assert np.all(np.abs(grad[U1 > 0]) <= 1e-6 * scale)


@pytest.mark.parametrize("rank", [(3, 3), (3, 5)])
def test_full_rank_matches_tensorly_non_negative_parafac(rank):
    A, _ = make_planted(SHAPE, (3, 5), noise=0.1, random_state=5)
    ours = fit_constrained_tucker(A, rank, tol=1e-10, n_iter_max=3000)
    cp, _ = non_negative_parafac_hals(A, rank=rank[0], n_iter_max=3000, tol=1e-12,
                                      random_state=0, return_errors=True)
    rec = np.einsum("r,ar,br,cr->abc", cp.weights, *cp.factors)
    theirs = np.linalg.norm(A - rec) / np.linalg.norm(A)
    assert abs(ours.rel_error - theirs) <= 0.01 * theirs


def test_paper_constraints_fit_at_least_as_well_as_nonneg(planted_reduced):
    A, _ = planted_reduced
    for rank in [(4, 2), (3, 5)]:
        nn = fit_constrained_tucker(A, rank)
        paper = fit_constrained_tucker(A, rank, constraints="paper")
        assert paper.rel_error <= nn.rel_error * (1 + 1e-9)


def test_paper_constraints_accept_signed_data(rng):
    A, _ = make_planted(SHAPE, (3, 5), noise=0.05, random_state=6)
    A = A - 0.1 * A.mean()
    assert A.min() < 0
    res = fit_constrained_tucker(A, (3, 5), constraints="paper")
    assert np.all(res.factors[2] >= 0) and np.all(res.faces >= 0)
    assert res.rel_error < 0.3


def test_torch_backend_matches_numpy(planted_reduced):
    A, _ = planted_reduced
    ref = fit_constrained_tucker(A, (4, 2), tol=1e-8)
    At = torch.from_numpy(A.copy())
    res = fit_constrained_tucker(At, (4, 2), tol=1e-8)
    assert isinstance(res.core, torch.Tensor)
    assert all(isinstance(f, torch.Tensor) and f.dtype == torch.float64 for f in res.factors)
    assert res.rel_error == pytest.approx(ref.rel_error, rel=1e-6)
    for f_t, f_n in zip(res.factors, ref.factors):
        np.testing.assert_allclose(f_t.numpy(), f_n, atol=1e-5)
    U1_new = res.transform(At[:5])
    assert isinstance(U1_new, torch.Tensor)
    np.testing.assert_allclose(U1_new.numpy(), ref.transform(A[:5]), atol=1e-5)
    assert res.error_on(At) == pytest.approx(ref.rel_error, rel=1e-6)
    assert res.reconstruct().shape == A.shape


def test_numpy_and_torch_fits_side_by_side_in_threads(planted_reduced):
    # The array namespace is taken from each input, with no global backend: fits on
    # numpy and torch inputs running at once in threads (as the sweeps run them) give
    # what they give alone.
    from concurrent.futures import ThreadPoolExecutor

    A, _ = planted_reduced
    inputs = [A, torch.from_numpy(A.copy()), A.astype(np.float32), torch.from_numpy(A.astype(np.float32))]
    alone = [fit_constrained_tucker(X, (4, 2), n_iter_max=30) for X in inputs]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda X: fit_constrained_tucker(X, (4, 2), n_iter_max=30), inputs * 2))
    for X, a, b in zip(inputs * 2, alone * 2, together):
        assert type(b.factors[2]) is type(X) and b.factors[2].dtype == X.dtype
        for fa, fb in zip(a.factors, b.factors):
            np.testing.assert_array_equal(_np(fa), _np(fb))


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_float32_stays_float32(planted_full, backend):
    A, _ = planted_full
    ref = fit_constrained_tucker(A, (4, 6))
    A32 = A.astype(np.float32)
    X = torch.from_numpy(A32) if backend == "torch" else A32
    res = fit_constrained_tucker(X, (4, 6))
    for F in [res.core, *res.factors]:
        assert (F.dtype == torch.float32) if backend == "torch" else (F.dtype == np.float32)
    assert res.rel_error == pytest.approx(ref.rel_error, rel=1e-3, abs=1e-4)
    dense = np.linalg.norm(A - _np(res.reconstruct()).astype(np.float64)) / np.linalg.norm(A)
    assert res.rel_error == pytest.approx(dense, rel=1e-3, abs=1e-4)


def test_same_seed_same_result(planted_reduced):
    A, _ = planted_reduced
    for init in ("svd", "random"):
        a = fit_constrained_tucker(A, (4, 2), init=init, random_state=7)
        b = fit_constrained_tucker(A, (4, 2), init=init, random_state=7)
        for x, y in zip([a.core, *a.factors], [b.core, *b.factors]):
            np.testing.assert_array_equal(x, y)
        assert a.errors == b.errors
    c = fit_constrained_tucker(A, (4, 2), init="random", random_state=8, n_iter_max=2)
    d = fit_constrained_tucker(A, (4, 2), init="random", random_state=7, n_iter_max=2)
    assert not np.array_equal(c.factors[2], d.factors[2])


@pytest.mark.parametrize(
    ("rank", "expected"),
    [(3, (3, 3)), ((3, 5), (3, 5)), ([3, 5, 3], (3, 5)), (np.array([2, 4]), (2, 4))],
)
def test_accepted_rank_forms(planted_full, rank, expected):
    A, _ = planted_full
    res = fit_constrained_tucker(A, rank, n_iter_max=3)
    assert res.rank == expected
    R1, R2 = expected
    assert res.core.shape == (R1, R2, R1)
    assert [f.shape[1] for f in res.factors] == [R1, R2, R1]


@pytest.mark.parametrize(
    ("mutate", "kwargs", "match"),
    [
        (lambda A: -A, {}, "non-negative A; its smallest entry"),
        (lambda A: _put(A, np.nan), {}, "contains 1 NaN"),
        (lambda A: _put(A, np.inf), {}, "must be finite"),
        (lambda A: _put(A, np.nan), {"constraints": "paper"}, "contains 1 NaN"),
        (lambda A: A[0], {}, "3-way array .* got 2 dimension"),
        (lambda A: A[..., None], {}, "got 4 dimension"),
        (lambda A: A[:, :, :0], {}, "must not be empty"),
        (lambda A: A.astype(np.float16), {}, "float32 or float64"),
        (lambda A: np.zeros_like(A), {}, "all zeros"),
        (lambda A: A, {"rank": (25, 3)}, "R1=25 is larger than the number of subjects n=24"),
        (lambda A: A, {"rank": (3, 11)}, "R2=11 is larger than the number of channels c=10"),
        (lambda A: A[:, :, :5], {"rank": (6, 3)}, "R1=6 is larger than the number of voxels"),
        (lambda A: A, {"rank": (0, 3)}, "ranks must be >= 1"),
        (lambda A: A, {"rank": (3, 4, 5)}, r"\[R1, R2, R1\]"),
        (lambda A: A, {"rank": (3, 4, 5, 6)}, "rank must be"),
        (lambda A: A, {"rank": (2.5, 3)}, "integers"),
        (lambda A: A, {"constraints": "positive"}, r"'constraints' must be one of \['nonneg', 'paper'\]"),
        (lambda A: A, {"init": "nndsvd"}, "'init' must be one of"),
        (lambda A: A, {"init": 3}, "'init' must be"),
        (lambda A: A, {"l1": -1.0}, "'l1' must be"),
        (lambda A: A, {"n_iter_max": 0}, "'n_iter_max'"),
        (lambda A: A, {"tol": -1}, "'tol'"),
    ],
)
def test_bad_input_gives_clear_error(planted_full, mutate, kwargs, match):
    A, _ = planted_full
    kwargs = {"rank": (3, 3), **kwargs}
    with pytest.raises(ValueError, match=match):
        fit_constrained_tucker(mutate(A.copy()), **kwargs)


def _put(A, value):
    A = A.copy()
    A[1, 2, 3] = value
    return A


def test_bad_input_torch(planted_full):
    A, _ = planted_full
    X = torch.from_numpy(A.copy())
    X[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fit_constrained_tucker(X, (3, 3))
    with pytest.raises(ValueError, match="non-negative"):
        fit_constrained_tucker(-torch.from_numpy(A), (3, 3))


def test_transform_and_error_check_shapes(planted_full):
    A, _ = planted_full
    res = fit_constrained_tucker(A, (3, 3), n_iter_max=5)
    with pytest.raises(ValueError, match=r"shape \(n_subjects, 10, 40\)"):
        res.transform(A[:, :5])
    with pytest.raises(ValueError, match=r"U1 must have shape \(4, 3\)"):
        res.error_on(A[:4])


def test_warm_start_continues_and_adapts_ranks(planted_full):
    A, _ = planted_full
    base = fit_constrained_tucker(A, (4, 6), tol=1e-8)
    assert base.converged
    again = fit_constrained_tucker(A, (4, 6), tol=1e-8, init=base)
    assert again.n_iter <= 3 and again.n_iter_init == 0
    assert again.rel_error <= base.rel_error * (1 + 1e-9)
    for rank in [(4, 2), (3, 6), (5, 6), (5, 3), (2, 1)]:
        res = fit_constrained_tucker(A, rank, init=base)
        assert res.core.shape == (rank[0], rank[1], rank[0])
        assert np.all(np.diff(res.errors) <= 1e-12 * np.asarray(res.errors[:-1]))
        cold = fit_constrained_tucker(A, rank)
        assert res.rel_error <= cold.rel_error * 1.05
    # from a fitted estimator, and onto a subset of subjects (U1 is refitted)
    est = ConstrainedTucker(rank=(4, 6)).fit(A)
    sub = fit_constrained_tucker(A[:15], (4, 6), init=est)
    assert sub.factors[0].shape == (15, 4) and sub.n_iter_init == 0
    assert sub.rel_error <= fit_constrained_tucker(A[:15], (4, 6)).rel_error * 1.01
    with pytest.raises(ValueError, match="init result has factors"):
        fit_constrained_tucker(A[:, :5], (3, 3), init=base)


def test_warm_start_reduced_ranks_down_the_grid(planted_reduced):
    """The sweep's path: R2 decreasing at fixed R1, each cell from the previous one."""
    A, _ = planted_reduced
    prev = fit_constrained_tucker(A, (4, 4))
    for R2 in (3, 2, 1):
        res = fit_constrained_tucker(A, (4, R2), init=prev)
        cold = fit_constrained_tucker(A, (4, R2))
        assert res.rel_error <= cold.rel_error * 1.05
        prev = res


def test_callback_sees_every_iteration_and_can_stop(planted_full):
    A, _ = planted_full
    seen = []
    res = fit_constrained_tucker(A, (3, 3), tol=0, n_iter_max=50,
                                 callback=lambda it, e: seen.append((it, e)) or it == 4)
    assert res.n_iter == 5 and [s[0] for s in seen] == list(range(5))
    assert [s[1] for s in seen] == pytest.approx(res.errors)


def test_estimator_forwards_every_argument(monkeypatch, planted_full):
    A, _ = planted_full
    func_params = inspect.signature(fit_constrained_tucker).parameters
    est_params = inspect.signature(ConstrainedTucker.__init__).parameters
    assert set(func_params) - {"A"} == set(est_params) - {"self"}
    for name in set(func_params) - {"A", "rank"}:
        assert est_params[name].default == func_params[name].default, name

    values = {"rank": (3, 2), "constraints": "paper", "l1": 0.25, "n_iter_max": 7,
              "tol": 1e-3, "init": "random", "random_state": 11, "verbose": True,
              "callback": print}
    assert set(values) == set(est_params) - {"self"}
    seen = {}
    real = fit_constrained_tucker

    def spy(X, rank, **kwargs):
        seen.update(kwargs, rank=rank)
        return real(X, rank, **{**kwargs, "callback": None, "verbose": False})

    monkeypatch.setattr(dec.estimator._ct, "fit_constrained_tucker", spy)
    est = ConstrainedTucker(**values).fit(A)
    assert seen == values
    assert isinstance(est.result_, ConstrainedTuckerResult)
    assert est.core_.shape == (3, 2, 3) and len(est.factors_) == 3
    assert est.errors_ == est.result_.errors and est.n_iter_ == est.result_.n_iter
    assert est.get_params() == values
    assert clone(est).get_params() == values


def test_estimator_fit_transform(planted_full):
    A, _ = planted_full
    est = ConstrainedTucker(rank=(4, 6))
    with pytest.raises(Exception, match="not fitted"):
        est.transform(A)
    U1 = est.fit_transform(A)
    np.testing.assert_array_equal(U1, est.factors_[0])
    np.testing.assert_allclose(est.transform(A[:6]), U1[:6], atol=1e-3)
    assert est.error_on(A) == pytest.approx(est.rel_error_, rel=1e-8)


def test_result_to_numpy_and_repr(planted_full):
    A, _ = planted_full
    res = fit_constrained_tucker(torch.from_numpy(A), (3, 3), n_iter_max=5)
    host = res.to_numpy()
    assert isinstance(host.core, np.ndarray) and isinstance(host.factors[0], np.ndarray)
    np.testing.assert_array_equal(host.faces, res.faces.numpy())
    assert "rank=(3, 3)" in repr(res)


def test_warm_start_across_constraint_sets(planted_full):
    A, _ = planted_full
    paper = fit_constrained_tucker(A, (4, 6), constraints="paper")
    nn = fit_constrained_tucker(A, (4, 6), init=paper)
    assert np.all(nn.factors[0] >= 0) and np.all(nn.factors[1] >= 0)
    back = fit_constrained_tucker(A, (4, 6), constraints="paper", init=nn)
    assert back.rel_error <= nn.rel_error * (1 + 1e-9)


def test_float32_error_is_accurate_at_low_noise():
    """The Gram-identity error subtracts near-equal numbers: float32 must not fool it."""
    A, _ = make_planted((60, 40, 300), (4, 6), noise=0.001, random_state=9)
    A32 = A.astype(np.float32)
    res = fit_constrained_tucker(A32, (4, 6))
    W = res.factors[1].astype(np.float64) @ res.faces.T.astype(np.float64)
    rec = np.einsum("ar,br,cr->abc", res.factors[0].astype(np.float64), W,
                    res.factors[2].astype(np.float64))
    A64 = A32.astype(np.float64)
    dense = np.linalg.norm(A64 - rec) / np.linalg.norm(A64)
    assert dense < 0.005  # it did not stop early on a rounding-level "convergence"
    assert abs(res.rel_error - dense) < 3e-4


def test_svd_init_makes_no_tensor_sized_temporary(rng):
    # Few channels (as at block1: 8 or 16): the mode-2 range finder's A_(2)^T Q was
    # n v x c, as large as A itself; the channel Gram matrix stands in for it now.
    import tracemalloc

    A = rng.random((120, 4, 20_000), dtype=np.float32)
    tracemalloc.start()
    try:
        res = fit_constrained_tucker(A, rank=(3, 2), init="svd", n_iter_max=3, random_state=0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert res.factors[2].shape == (20_000, 3)
    assert peak < 0.5 * A.nbytes, f"peak {peak / A.nbytes:.2f} x the tensor"


def test_svd_init_is_the_svd_whatever_the_seed(rng):
    # The start of every fit (init="svd"): the randomised range finder is refined by
    # subspace iterations, so that the spatial factor is the leading singular vectors of
    # the mode-3 unfolding for any seed. Without them (power_iter=0) it depends on the
    # seed, and so did the final RoIs (docs/decomposition.md).
    from brainage_xai.decomposition import _solver
    from brainage_xai.decomposition._backend import Backend

    n, c, v, R = 60, 4, 3000, 4
    s = 0.8 ** np.arange(30)  # a slowly decaying spectrum, as activations have
    A = np.einsum("r,ar,br,cr->abc", s, rng.random((n, 30)), rng.random((c, 30)), rng.random((v, 30)))
    A = (A + 0.01 * rng.random(A.shape)).astype(np.float32)
    A2 = A.reshape(n * c, v)
    exact = np.abs(np.linalg.svd(A2.astype(np.float64), full_matrices=False)[2][:R].T)
    bk = Backend(A)

    def cosines(seed, **kw):
        U3 = np.asarray(_solver.svd_init(bk, A, A2, A.shape, R, True, np.random.default_rng(seed), **kw).U3)
        return np.abs(np.sum(U3 * exact, axis=0)) / np.linalg.norm(U3, axis=0) / np.linalg.norm(exact, axis=0)

    assert _solver.SVD_POWER_ITER >= 3
    for seed in (0, 1, 2):
        assert cosines(seed).min() > 0.99999
    assert min(cosines(seed, power_iter=0).min() for seed in (0, 1, 2)) < 0.999
