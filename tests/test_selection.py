"""Rank and sparsity selection: scree, rank sweep, λ sweep, final linear model."""

from __future__ import annotations

import json
import sys

import joblib
import numpy as np
import pandas as pd
import pytest

from brainage_xai.errors import UsageError
from brainage_xai.model.network import head_from_torch
from brainage_xai.selection import (
    SelectionFiles,
    Splits,
    choose_lambda,
    choose_ranks,
    compute_scree,
    fit_final,
    fit_linear_model,
    roi_coefficients,
    roi_contributions,
    run_lambda_sweep,
    run_rank_sweep,
    run_selection,
    scree_drop,
)
from brainage_xai.selection import rank_sweep as rank_sweep_mod
from brainage_xai.utils.io import read_tsv


def files(group, cache=None) -> SelectionFiles:
    """Where run_selection writes, named as the group level names them."""
    from brainage_xai.bids.derivatives import GroupOutputs

    out = GroupOutputs(group, cache or group / "work")
    return SelectionFiles(scree=out.scree, rank_sweep=out.rank_sweep, lambda_sweep=out.lambda_sweep,
                          selection=out.selection, decomposition=out.decomposition,
                          decomposition_json=out.decomposition_json, loadings=out.loadings,
                          rank_sweep_cache=None if cache is None else out.rank_sweep_cache)

# Small but not tiny: uneven sizes catch transposed modes.
N_TRAIN, N_VAL, N_TEST, C, V = 48, 20, 20, 21, 64


def planted(rng, rank=7, n=N_TRAIN + N_VAL + N_TEST, c=C, v=V, noise=0.05):
    """A non-negative rank-``rank`` CP tensor with sparse spatial factors and 5% noise.

    The noise is multiplicative and zero-mean, so entries stay >= 0 without adding a
    constant (which would be one more component).
    """
    U1 = rng.random((n, rank)) + 0.2
    W = rng.random((c, rank))
    U3 = rng.random((v, rank)) * (rng.random((v, rank)) < 0.35)
    U3[rng.integers(0, v, rank), np.arange(rank)] += 1.0  # no empty component
    X = np.einsum("ir,jr,kr->ijk", U1, W, U3)
    A = X * (1 + noise * rng.uniform(-1, 1, X.shape))
    return A, U1, W, U3


def splits(A):
    return A[:N_TRAIN], A[N_TRAIN : N_TRAIN + N_VAL], A[N_TRAIN + N_VAL :]


@pytest.fixture(scope="module")
def cohort():
    rng = np.random.default_rng(7)
    A, U1, W, U3 = planted(rng)
    # Age depends on three of the seven components: the linear model must find them.
    gamma = np.array([30.0, 0, -20.0, 0, 25.0, 0, 0])
    y = 40 + (U1 - U1.mean(0)) @ gamma + rng.normal(0, 0.5, U1.shape[0])
    return A, y


@pytest.fixture(scope="module")
def sweep_small(cohort, tmp_path_factory):
    A, y = cohort
    A_tr, A_va, _ = splits(A)
    out = tmp_path_factory.mktemp("sweep") / "rank_sweep.tsv"
    table = run_rank_sweep(A_tr, A_va, range(2, 10), out_tsv=out, quiet=True,
                           y_train=y[:N_TRAIN], y_val=y[N_TRAIN : N_TRAIN + N_VAL])
    return table, out


# --------------------------------------------------------------------------- scree
def test_scree_matches_svd_of_unfoldings(rng):
    A = rng.random((7, 8, 9))
    scree = compute_scree(A, max_rank=20)
    for mode in range(3):
        unfolding = np.moveaxis(A, mode, 0).reshape(A.shape[mode], -1)
        expected = np.linalg.svd(unfolding, compute_uv=False)
        got = scree.loc[scree["mode"] == mode + 1].sort_values("index")
        assert got["index"].tolist() == list(range(1, A.shape[mode] + 1))
        np.testing.assert_allclose(got["singular_value"], expected, rtol=1e-8)
        # All singular values kept: the shares add up to the whole norm.
        assert got["cumulative_explained"].iloc[-1] == pytest.approx(1.0)


def test_scree_randomised_svd_for_a_large_unfolding(rng):
    # Both sides of the voxel unfolding (610 x 640) are long: the randomised path. Real
    # activations have a decaying spectrum, as this low-rank-plus-noise tensor has.
    A, *_ = planted(rng, rank=5, n=4, c=160, v=610)
    scree = compute_scree(A, max_rank=4, random_state=0)
    exact = np.linalg.svd(np.moveaxis(A, 2, 0).reshape(610, -1), compute_uv=False)[:4]
    got = scree.loc[scree["mode"] == 3, "singular_value"].to_numpy()
    np.testing.assert_allclose(got, exact, rtol=1e-6)


def test_scree_makes_no_tensor_sized_temporary(rng):
    # Voxels and subjects x channels both long: the randomised path for mode 3, as on
    # any real layer. Neither the unfolding nor the norm may copy the tensor.
    import tracemalloc

    import sklearn.utils.extmath  # noqa: F401  (imported here, not counted below)

    # Large enough that _gram's fixed 32 MB float64 chunks are small beside it.
    # Low rank plus noise, as activations are (a flat spectrum defeats any randomised SVD).
    U1, W, U3 = (rng.random((k, 5), dtype=np.float32) for k in (120, 8, 40_000))
    A = np.einsum("ir,jr,kr->ijk", U1, W, U3)
    A += rng.random(A.shape, dtype=np.float32) * 0.05
    tracemalloc.start()
    try:
        scree = compute_scree(A, max_rank=10, random_state=0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 0.5 * A.nbytes, f"peak {peak / A.nbytes:.2f} x the tensor"
    flat = A.reshape(-1, A.shape[2]).astype(np.float64)  # the mode-3 unfolding, transposed
    exact = np.sqrt(np.linalg.eigvalsh(flat @ flat.T)[::-1][:10])
    # The five planted components exactly; the noise floor behind them is approximate.
    got = scree.loc[scree["mode"] == 3].sort_values("index")
    np.testing.assert_allclose(got["singular_value"][:5], exact[:5], rtol=1e-4)
    total = np.sum(np.square(A, dtype=np.float64))
    np.testing.assert_allclose(got["explained"][:5], exact[:5] ** 2 / total, rtol=1e-4)


def test_scree_drop_at_planted_rank(cohort):
    A, _ = cohort
    scree = compute_scree(splits(A)[0])
    assert scree_drop(scree, 1) == 7
    assert scree_drop(scree, 3) == 7
    assert scree_drop(scree, 1, candidates=[2, 3, 4]) in (2, 3, 4)


def test_scree_rejects_bad_input():
    with pytest.raises(ValueError, match="3-way"):
        compute_scree(np.ones((3, 4)))
    bad = np.ones((3, 4, 5))
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        compute_scree(bad)


# --------------------------------------------------------------------------- rank sweep
def test_rank_sweep_table_and_structure(sweep_small):
    table, out = sweep_small
    assert list(table.columns) == rank_sweep_mod.SWEEP_COLUMNS
    assert len(table) == 8 * 8
    assert table.attrs == {"n_fitted": 8 * 9 // 2, "n_resumed": 0}
    # R2 >= R1 cells share the R1 optimum: same numbers as the fitted diagonal, no refit.
    for R1, rows in table.groupby("R1"):
        diag = rows.loc[rows["R2"] == R1].iloc[0]
        upper = rows.loc[rows["R2"] > R1]
        assert bool(diag["fitted"]) and bool(diag["shared_optimum"])
        assert upper["shared_optimum"].all() and not upper["fitted"].any()
        assert (upper["val_error"] == diag["val_error"]).all()
        assert (upper["seconds"] == 0).all()
        lower = rows.loc[rows["R2"] < R1]
        assert lower["fitted"].all() and not lower["shared_optimum"].any()
    assert table["train_error"].between(0, 1).all() and table["val_error"].between(0, 1).all()
    # The table on disk is the same, with a sidecar describing the columns.
    on_disk = read_tsv(out)
    pd.testing.assert_frame_equal(on_disk, table, check_dtype=False)
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert "shared_optimum" in sidecar and "DataFingerprint" in sidecar


def test_rank_choice_finds_planted_rank(sweep_small, cohort):
    table, _ = sweep_small
    scree = compute_scree(splits(cohort[0])[0])
    choice = choose_ranks(table, scree)
    assert choice["R1"] in (6, 7, 8)
    assert 2 <= choice["R2"] <= choice["R1"]
    assert "R1 =" in choice["rule"]
    assert choice["numbers"]["R1_candidates"]["scree drop, mode 1"] == 7
    # Fewer RoIs fit the validation subjects clearly worse than the planted rank.
    curve = choice["numbers"]["val_error_by_R1"]
    assert curve[5] > 1.5 * curve[7]


def test_rank_sweep_resumes_after_interruption(cohort, tmp_path, monkeypatch):
    A, _ = cohort
    A_tr, A_va, _ = splits(A)
    out = tmp_path / "group" / "rank_sweep.tsv"
    grid = range(2, 6)  # 10 cells to fit
    real = rank_sweep_mod._fit_cell
    calls = []

    def dying(*args, **kwargs):
        if len(calls) == 4:
            raise KeyboardInterrupt  # the job is killed during the fifth fit
        calls.append(args[2:4])
        return real(*args, **kwargs)

    monkeypatch.setattr(rank_sweep_mod, "_fit_cell", dying)
    with pytest.raises(KeyboardInterrupt):
        run_rank_sweep(A_tr, A_va, grid, out_tsv=out, quiet=True, cache_dir=tmp_path / "work")
    first = read_tsv(out)
    finished = first.loc[first["fitted"]]
    assert len(finished) == 4
    assert set(zip(finished["R1"], finished["R2"])) == set(calls)

    refits = []

    def counting(*args, **kwargs):
        refits.append(args[2:4])
        return real(*args, **kwargs)

    monkeypatch.setattr(rank_sweep_mod, "_fit_cell", counting)
    table = run_rank_sweep(A_tr, A_va, grid, out_tsv=out, quiet=True, cache_dir=tmp_path / "work")
    assert len(refits) == 10 - 4
    assert not set(refits) & set(calls)
    assert table.attrs == {"n_fitted": 6, "n_resumed": 4}
    # Finished cells are read back untouched (their timings included).
    again = table.set_index(["R1", "R2"]).loc[list(calls)]
    np.testing.assert_array_equal(again["seconds"], finished.set_index(["R1", "R2"]).loc[list(calls), "seconds"])

    # A third run fits nothing; other data invalidates the table.
    refits.clear()
    assert run_rank_sweep(A_tr, A_va, grid, out_tsv=out, quiet=True).attrs["n_fitted"] == 0
    assert refits == []
    run_rank_sweep(A_tr * 2, A_va * 2, grid, out_tsv=out, quiet=True)
    assert len(refits) == 10
    # So do other settings (here the other constraint set).
    refits.clear()
    run_rank_sweep(A_tr * 2, A_va * 2, grid, out_tsv=out, quiet=True, constraints="paper")
    assert len(refits) == 10


def test_rank_sweep_fits_its_chains_in_waves(cohort, monkeypatch):
    # sweep_chains describes what run_rank_sweep does (benchmarks/bench_sweep_schedule.py
    # simulates other schedules from it): wave k fits the k-th cell of every chain, each
    # cell after the first warm-started from the one before it in its chain.
    A, _ = cohort
    A_tr, A_va, _ = splits(A)
    grid = range(2, 6)
    chains = rank_sweep_mod.sweep_chains(grid)
    assert chains == {2: [2], 3: [3, 2], 4: [4, 3, 2], 5: [5, 4, 3, 2]}
    real = rank_sweep_mod._fit_cell
    calls = []

    def recording(A_train, A_val, R1, R2, init, *args, **kwargs):
        calls.append((R1, R2, init))
        row, res = real(A_train, A_val, R1, R2, init, *args, **kwargs)
        return row, res

    monkeypatch.setattr(rank_sweep_mod, "_fit_cell", recording)
    run_rank_sweep(A_tr, A_va, grid, quiet=True, n_jobs=1)
    waves = [[(R1, c[k]) for R1, c in chains.items() if k < len(c)] for k in range(4)]
    assert [(R1, R2) for R1, R2, _ in calls] == [cell for wave in waves for cell in wave]
    for R1, R2, init in calls:
        assert (isinstance(init, str) and init == "svd") == (R2 == R1)  # the first of a chain from the SVD, the rest warm


def test_rank_sweep_with_targets_records_validation_mae(cohort, tmp_path):
    from brainage_xai.decomposition import fit_constrained_tucker
    from brainage_xai.selection.linear_model import predict, regression_metrics

    A, y = cohort
    A_tr, A_va, _ = splits(A)
    y_tr, y_va = y[:N_TRAIN], y[N_TRAIN : N_TRAIN + N_VAL]
    out = tmp_path / "rank_sweep.tsv"
    plain = run_rank_sweep(A_tr, A_va, [2, 7], out_tsv=out, quiet=True)
    assert plain["val_mae"].isna().all()
    # A table fitted without targets is not resumed as if it had them.
    table = run_rank_sweep(A_tr, A_va, [2, 7], out_tsv=out, quiet=True, y_train=y_tr, y_val=y_va)
    assert table.attrs["n_fitted"] == 3 and table["val_mae"].notna().all()
    # The cell (7, 7) starts from the SVD: the same fit and linear model by hand.
    res = fit_constrained_tucker(A_tr, rank=(7, 7), init="svd", l1=0.0, n_iter_max=100,
                                 tol=1e-4, random_state=0, constraints="nonneg")
    model = fit_linear_model(res.factors[0], res, y_tr)
    expected = regression_metrics(y_va, predict(model, res.transform(A_va), res))["mae"]
    got = table.loc[(table["R1"] == 7) & (table["R2"] == 7), "val_mae"].item()
    assert got == pytest.approx(expected, rel=1e-6)
    # Age depends on three of the seven planted components: two do not carry it.
    assert got < 0.2 * table.loc[(table["R1"] == 2) & (table["R2"] == 2), "val_mae"].item()
    assert read_tsv(out)["val_mae"].tolist() == pytest.approx(table["val_mae"].tolist())
    with pytest.raises(ValueError, match="both y_train and y_val"):
        run_rank_sweep(A_tr, A_va, [2], quiet=True, y_train=y_tr)
    with pytest.raises(ValueError, match="one row per subject"):
        run_rank_sweep(A_tr, A_va, [2], quiet=True, y_train=y_tr, y_val=y_tr)


def _sweep_table(val_mae=None):
    """A hand-made sweep: a clear knee at R1 = 6; along R2 at R1 = 6, 4 and 6 within 1%."""
    rows = []
    by_r1 = {2: 0.9, 3: 0.75, 4: 0.6, 5: 0.5, 6: 0.4, 7: 0.398, 8: 0.397}
    along = {2: 0.9, 3: 0.6, 4: 0.401, 5: 0.4005, 6: 0.4}
    for R1, e in by_r1.items():
        for R2 in range(2, 9):
            err = along[R2] if (R1 == 6 and R2 < 6) else (e if R2 >= R1 else e + 0.05 * (R1 - R2))
            mae = np.nan if val_mae is None else val_mae.get((R1, min(R2, R1)), 9.0)
            rows.append({"R1": R1, "R2": R2, "train_error": err, "val_error": err,
                         "val_mae": mae, "n_iter": 1, "seconds": 0.0,
                         "shared_optimum": R2 >= R1, "fitted": R2 <= R1})
    return pd.DataFrame(rows, columns=rank_sweep_mod.SWEEP_COLUMNS)


def test_r2_among_equal_candidates_is_chosen_by_validation_mae():
    plain = choose_ranks(_sweep_table())
    assert (plain["R1"], plain["R2"]) == (6, 4)
    cands = plain["numbers"]["R2_candidates"]
    assert cands["knee of the validation error"] == 4 and cands["R2 = R1 (constraint inactive)"] == 6
    # The linear model on R2 = 6 predicts the validation subjects better: R2 = 6.
    better = choose_ranks(_sweep_table({(6, 4): 5.0, (6, 6): 3.0}))
    assert (better["R1"], better["R2"]) == (6, 6)
    assert "smallest validation MAE" in better["rule"]
    assert better["numbers"]["val_mae_by_R2_at_R1"][6] == 3.0
    # Equal MAE: the smaller R2. R2 = 3 is not within 1%, however well it predicts.
    assert choose_ranks(_sweep_table({(6, 4): 3.0, (6, 6): 3.0}))["R2"] == 4
    assert choose_ranks(_sweep_table({(6, 3): 1.0, (6, 4): 5.0, (6, 6): 3.0}))["R2"] == 6
    # Every R2 up to R1 within 1% competes, not only those a rule names: R2 = 5 is no
    # knee, scree drop or R1, but reconstructs as well and predicts best.
    among = choose_ranks(_sweep_table({(6, 4): 5.0, (6, 5): 2.0, (6, 6): 3.0}))
    assert 5 not in among["numbers"]["R2_candidates"].values()
    assert (among["R1"], among["R2"]) == (6, 5)
    assert "R2 = 5: smallest validation MAE" in among["rule"]


def test_r1_is_raised_until_the_linear_model_predicts_about_as_well_as_the_best():
    from brainage_xai.selection.rank_choice import PREDICTION_TOLERANCE

    assert PREDICTION_TOLERANCE == 0.10
    # The knee is R1 = 6, but its RoIs' linear model is three times worse than R1 = 8's:
    # raised to 8, and R2 is then chosen at R1 = 8.
    raised = choose_ranks(_sweep_table({(6, 6): 3.0, (7, 7): 2.9, (8, 8): 1.0}))
    assert (raised["R1"], raised["R2"]) == (8, 8)
    assert "R1 = 8: raised from 6 (knee of the validation error)" in raised["rule"]
    numbers = raised["numbers"]
    assert numbers["R1_by_reconstruction"] == 6 and numbers["R1_by_prediction"] == 8
    assert numbers["val_mae_by_R1"][8] == 1.0 and numbers["val_mae_by_R1"][2] == 9.0
    # The smallest R1 within 10% of the best MAE, not the best itself.
    assert choose_ranks(_sweep_table({(6, 6): 3.0, (7, 7): 1.05, (8, 8): 1.0}))["R1"] == 7
    # Never lowered: a smaller R1 that predicts as well leaves the knee's R1.
    kept = choose_ranks(_sweep_table({(4, 4): 1.0, (6, 6): 1.05}))
    assert kept["R1"] == 6 and "raised" not in kept["rule"] and kept["numbers"]["R1_by_prediction"] == 4
    # Without the linear model's MAE (a sweep run without targets) nothing is raised.
    plain = choose_ranks(_sweep_table())
    assert plain["R1"] == 6 and plain["numbers"]["R1_by_prediction"] is None


def test_rank_sweep_parallel_equals_serial(cohort):
    A, _ = cohort
    A_tr, A_va, _ = splits(A)
    serial = run_rank_sweep(A_tr, A_va, [2, 3, 5], quiet=True, n_jobs=1)
    parallel = run_rank_sweep(A_tr, A_va, [2, 3, 5], quiet=True, n_jobs=2)
    # Workers run BLAS with fewer threads (another summation order): equal up to rounding
    # that the iterations carry along.
    cols = ["R1", "R2", "train_error", "val_error"]
    pd.testing.assert_frame_equal(serial[cols], parallel[cols], check_exact=False, rtol=1e-3)
    # The sweep runs through whatever joblib backend is configured (as the Dask one is).
    for backend in ("threading", "multiprocessing"):  # the latter returns whole waves
        with joblib.parallel_config(backend=backend):
            other = run_rank_sweep(A_tr, A_va, [2, 3, 5], quiet=True, n_jobs=2)
        pd.testing.assert_frame_equal(serial[cols], other[cols], check_exact=False, rtol=1e-3)


def test_dask_scheduler_without_dask_is_a_clear_error(cohort, monkeypatch):
    A, _ = cohort
    A_tr, A_va, _ = splits(A)
    # A None entry in sys.modules makes the import fail as if dask were not installed.
    monkeypatch.setitem(sys.modules, "dask", None)
    monkeypatch.setitem(sys.modules, "dask.distributed", None)
    with pytest.raises(UsageError, match="dask-scheduler tcp://h:8786 needs the optional packages dask"):
        run_rank_sweep(A_tr, A_va, [2, 3], dask_scheduler="tcp://h:8786", quiet=True)
    y = np.arange(len(A_tr) + len(A_va), dtype=float)
    with pytest.raises(UsageError, match="needs the optional packages dask"):
        run_lambda_sweep(A_tr, A_va, y[: len(A_tr)], y[len(A_tr) :], (2, 2), [0.0, 0.1],
                         dask_scheduler="tcp://h:8786", quiet=True)


def test_rank_grid_checked(cohort):
    A, _ = cohort
    A_tr, A_va, _ = splits(A)
    with pytest.raises(UsageError, match="needs at least that many channels"):
        run_rank_sweep(A_tr, A_va, [2, C + 1], quiet=True)
    with pytest.raises(UsageError, match=">= 1"):
        run_rank_sweep(A_tr, A_va, [0, 2], quiet=True)


# --------------------------------------------------------------------------- λ and linear model
@pytest.fixture(scope="module")
def lambda_table(cohort, tmp_path_factory):
    A, y = cohort
    A_tr, A_va, _ = splits(A)
    out = tmp_path_factory.mktemp("lam") / "lambda_sweep.tsv"
    table = run_lambda_sweep(
        A_tr, A_va, y[:N_TRAIN], y[N_TRAIN : N_TRAIN + N_VAL], (7, 7), lambda_grid=None,
        out_tsv=out, quiet=True,
    )
    return table, out


def test_lambda_choice_minimises_validation_mae(lambda_table):
    table, out = lambda_table
    assert table["lambda"].is_monotonic_increasing and table["lambda"].iloc[0] == 0
    assert len(table) == 9  # 0 and the default 8-value log grid
    choice = choose_lambda(table)
    assert choice["lambda"] == table.loc[table["val_mae"].idxmin(), "lambda"]
    assert choice["numbers"]["val_mae"] == table["val_mae"].min()
    # The penalty does what it says: the largest λ zeroes more of U3 than none.
    assert table["sparsity"].iloc[-1] > table["sparsity"].iloc[0]
    # The planted age effect is linear in the loadings: the model recovers it well.
    assert table["val_mae"].min() < 2.0
    assert len(read_tsv(out)) == 9


def test_lambda_that_leaves_no_roi_is_not_chosen(lambda_table):
    table, _ = lambda_table
    empty = table.copy()
    empty.loc[empty.index[-1], ["val_mae", "n_active_rois"]] = [empty["val_mae"].min() / 2, 0]
    assert choose_lambda(empty)["lambda"] == choose_lambda(table)["lambda"]
    # only empty fits: the choice is still made (the report then says what it means)
    everything_empty = table.assign(n_active_rois=0)
    assert choose_lambda(everything_empty)["lambda"] == choose_lambda(table)["lambda"]


def test_lambda_sweep_resumes_and_given_grid(lambda_table, cohort, monkeypatch):
    table, out = lambda_table
    A, y = cohort
    A_tr, A_va, _ = splits(A)
    from brainage_xai.selection import lambda_sweep as lam_mod

    def no_fit(*args, **kwargs):
        raise AssertionError("a finished λ was refitted")

    monkeypatch.setattr(lam_mod, "_fit_lambda", no_fit)
    monkeypatch.setattr(lam_mod, "fit_constrained_tucker", no_fit, raising=False)
    import brainage_xai.decomposition as dec

    monkeypatch.setattr(dec, "fit_constrained_tucker", no_fit)
    again = run_lambda_sweep(
        A_tr, A_va, y[:N_TRAIN], y[N_TRAIN : N_TRAIN + N_VAL], (7, 7),
        lambda_grid=table["lambda"].tolist(), out_tsv=out, quiet=True,
    )
    assert again.attrs["n_fitted"] == 0 and again.attrs["n_resumed"] == 9
    np.testing.assert_allclose(again["val_mae"], table["val_mae"])


def test_deviation_tensor_is_exact_and_non_negative(rng):
    from brainage_xai.selection import deviation_head, deviation_tensor

    A = rng.random((6, 4, 9)).astype(np.float32)
    centre = A[:4].mean(axis=0)
    D = deviation_tensor(A, centre)
    assert D.shape == (6, 8, 9) and D.dtype == np.float32 and D.flags.c_contiguous
    assert D.min() >= 0 and not (D[:, :4] * D[:, 4:]).any()  # one part is zero at each entry
    np.testing.assert_allclose(centre + D[:, :4] - D[:, 4:], A, atol=1e-6)
    weights = rng.normal(size=(4, 2))
    head = deviation_head(lambda avg: avg @ weights, centre.mean(axis=1))
    np.testing.assert_allclose(head(D.mean(axis=2)), A.mean(axis=2) @ weights, atol=1e-5)
    with pytest.raises(ValueError, match="centre"):
        deviation_tensor(A, centre[:, :3])


def test_channel_scaled_deviations_stay_exact(rng):
    from brainage_xai.selection import channel_scale, deviation_head, deviation_tensor

    # Channels of very different size, one dead (constant zero, as after a ReLU).
    A = (rng.random((6, 4, 9)) * np.array([1.0, 100.0, 0.01, 0.0])[None, :, None]).astype(np.float32)
    scale = channel_scale(A[:4])
    np.testing.assert_allclose(scale[:3], A[:4, :3].std(axis=(0, 2)), rtol=1e-5)
    assert scale[3] == 1.0  # a dead channel is left as it is, not divided by zero
    centre = A[:4].mean(axis=0)
    D = deviation_tensor(A, centre, scale)
    assert D.min() >= 0 and np.isfinite(D).all() and not D[:, [3, 7]].any()
    # A channel 10^4 times larger than another no longer outweighs it 10^8 to 1.
    energy = (D[:4, :4] ** 2 + D[:4, 4:] ** 2).sum(axis=(0, 2))[:3]
    assert energy.max() / energy.min() < 10
    np.testing.assert_allclose(centre + scale[:, None] * (D[:, :4] - D[:, 4:]), A, rtol=1e-5, atol=1e-5)
    weights = rng.normal(size=(4, 2))
    head = deviation_head(lambda avg: avg @ weights, centre.mean(axis=1), scale)
    np.testing.assert_allclose(head(D.mean(axis=2)), A.mean(axis=2) @ weights, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="positive"):
        deviation_tensor(A, centre, -scale)


def test_deviation_splits_use_the_training_split_only(rng, tmp_path):
    from brainage_xai.selection import channel_scale, deviation_splits, deviation_tensor

    # Memory-mapped, as the group level's activation tensor is; splits interleaved.
    path = tmp_path / "A.npy"
    np.save(path, rng.random((9, 3, 11)).astype(np.float32))
    A = np.load(path, mmap_mode="r")
    rows = {"train": np.array([0, 2, 4, 6, 8]), "val": np.array([1, 5]), "test": np.array([3, 7])}
    tensors, centre, scale = deviation_splits(A, rows)
    train = np.asarray(A[rows["train"]])
    np.testing.assert_allclose(centre, train.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(scale, channel_scale(train))
    assert list(tensors) == ["train", "val", "test"]
    for split, r in rows.items():
        np.testing.assert_array_equal(tensors[split], deviation_tensor(np.asarray(A[r]), centre, scale))
    # The group level's memory estimate counts what these tensors take.
    from brainage_xai.selection import decomposed_nbytes

    assert decomposed_nbytes(A.shape, "deviations") == sum(t.nbytes for t in tensors.values())
    assert decomposed_nbytes(A.shape, "activations") == A.nbytes
    with pytest.raises(ValueError, match="tensor must be one of"):
        decomposed_nbytes(A.shape, "deviation")


def test_linear_model_is_a_model_on_roi_loadings(cohort):
    from brainage_xai.decomposition import fit_constrained_tucker

    A, y = cohort
    A_tr = splits(A)[0]
    res = fit_constrained_tucker(A_tr, (7, 7), random_state=0)
    U1 = np.asarray(res.factors[0])
    model = fit_linear_model(U1, res, y[:N_TRAIN])
    gamma = roi_coefficients(model, res)
    assert gamma.shape == (7, 1)
    # prediction = intercept + sum over RoIs of loading x coefficient.
    contrib = roi_contributions(U1, gamma)
    from brainage_xai.selection._decomp import voxel_average

    pred = model.predict(voxel_average(U1, res))
    np.testing.assert_allclose(pred[:, 0], model.intercept_[0] + contrib.sum(axis=1)[:, 0], rtol=1e-8)
    # The voxel average of the reconstruction is close to that of the data itself.
    err = np.linalg.norm(voxel_average(U1, res) - A_tr.mean(axis=2)) / np.linalg.norm(A_tr.mean(axis=2))
    assert err < 0.05


def test_fit_final_metrics(cohort):
    A, y = cohort
    A_tr, A_va, A_te = splits(A)
    y_tr, y_va, y_te = y[:N_TRAIN], y[N_TRAIN : N_TRAIN + N_VAL], y[N_TRAIN + N_VAL :]
    # A "network head" that predicts age from the channel averages: fitted by least
    # squares on all subjects, it plays the trained network's linear head.
    X = A.mean(axis=2)
    coef, *_ = np.linalg.lstsq(np.c_[X, np.ones(len(X))], y, rcond=None)

    def head(avg):
        return np.c_[avg, np.ones(len(avg))] @ coef

    final = fit_final(Splits(A_tr, A_va, A_te), Splits(y_tr, y_va, y_te), (7, 7), 0.0, head)
    # The same head as the torch layer a trained network ends with.
    import torch

    layer = torch.nn.Linear(C, 1).double()
    with torch.no_grad():
        layer.weight.copy_(torch.as_tensor(coef[None, :C]))
        layer.bias.copy_(torch.as_tensor(coef[C:]))
    np.testing.assert_allclose(head_from_torch(layer)(A_te.mean(2))[:, 0], head(A_te.mean(2)))
    test = final.metrics["test"]
    assert set(test) == {
        "network", "linear_model_on_decomposition", "network_head_on_reconstruction", "mean_predictor",
    }
    assert test["network"]["mae"] == pytest.approx(np.mean(np.abs(head(A_te.mean(2)) - y_te)))
    mean_mae = np.mean(np.abs(y_tr.mean() - y_te))
    assert test["mean_predictor"]["mae"] == pytest.approx(mean_mae)
    # The decomposition carries the prediction: far better than the mean, near the network.
    assert test["linear_model_on_decomposition"]["mae"] < 0.3 * mean_mae
    assert test["network_head_on_reconstruction"]["mae"] < 0.3 * mean_mae
    assert final.loadings["test"].shape == (N_TEST, 7) and (final.loadings["test"] >= 0).all()
    assert final.errors["test"] < 0.1


# --------------------------------------------------------------------------- the stage
def test_run_selection_with_given_ranks_and_lambda(cohort, tmp_path, monkeypatch):
    from brainage_xai.selection import workflow

    def forbidden(*args, **kwargs):
        raise AssertionError("a sweep ran although ranks and λ were given")

    monkeypatch.setattr(workflow, "run_rank_sweep", forbidden)
    monkeypatch.setattr(workflow, "run_lambda_sweep", forbidden)
    A, y = cohort
    A_tr, A_va, A_te = splits(A)
    ids = {s: [f"sub-{s}{i:02d}" for i in range(len(a))] for s, a in zip(("train", "val", "test"), (A_tr, A_va, A_te))}
    group = tmp_path / "group"
    out = run_selection(
        Splits(A_tr, A_va, A_te), Splits(y[:N_TRAIN], y[N_TRAIN : N_TRAIN + N_VAL], y[N_TRAIN + N_VAL :]),
        files(group), ranks=(6, 4), l1=0.0, participant_ids=ids, target_names=["age"], quiet=True,
    )
    assert out["rank_sweep"] is None and out["lambda_sweep"] is None
    sel = json.loads((group / "selection.json").read_text())
    assert sel["ranks"]["R1"] == 6 and sel["ranks"]["R2"] == 4 and "given" in sel["ranks"]["rule"]
    assert sel["lambda"]["lambda"] == 0.0 and "given" in sel["lambda"]["rule"]
    assert not (group / "rank_sweep.tsv").exists() and not (group / "lambda_sweep.tsv").exists()
    with np.load(group / "decomposition.npz") as z:
        assert z["core"].shape == (6, 4, 6) and z["U3"].shape == (V, 6)
    loadings = read_tsv(group / "loadings.tsv")
    assert loadings.columns.tolist() == ["participant_id", "split"] + [f"RoI {r}" for r in range(1, 7)] + ["predicted_age"]
    assert loadings["participant_id"].tolist()[:2] == ["sub-train00", "sub-train01"]
    decomposition = json.loads((group / "decomposition.json").read_text())
    assert decomposition["rank"] == [6, 4]
    assert "linear_model_on_decomposition" in decomposition["metrics"]["test"]
    assert not (group / "metrics.json").exists()  # the group level owns metrics.json
    assert (group / "scree.tsv").exists() and not (group / "figures").exists()  # the stage draws


def test_run_selection_end_to_end(cohort, sweep_small, tmp_path):
    A, y = cohort
    A_tr, A_va, A_te = splits(A)
    group = tmp_path / "group"
    # A group run that died after the rank sweep: the stage resumes from its table.
    group.mkdir()
    for suffix in (".tsv", ".json"):
        src = sweep_small[1].with_suffix(suffix)
        (group / src.name).write_bytes(src.read_bytes())
    out = run_selection(
        Splits(A_tr, A_va, A_te), Splits(y[:N_TRAIN], y[N_TRAIN : N_TRAIN + N_VAL], y[N_TRAIN + N_VAL :]),
        files(group, tmp_path / "work"), rank_grid=range(2, 10), lambda_grid=[0.0, 1e-2, 1e-1], quiet=True,
    )
    assert out["ranks"]["R1"] in (6, 7, 8)
    assert out["rank_sweep"].attrs == {"n_fitted": 0, "n_resumed": 36}
    for name in (
        "scree.tsv", "scree.json", "rank_sweep.tsv", "rank_sweep.json", "lambda_sweep.tsv",
        "selection.json", "decomposition.npz", "decomposition.json", "loadings.tsv",
    ):
        assert (group / name).stat().st_size > 0, name
    lam = read_tsv(group / "lambda_sweep.tsv")
    sel = json.loads((group / "selection.json").read_text())
    assert sel["lambda"]["lambda"] == lam.loc[lam["val_mae"].idxmin(), "lambda"]
    assert not list(group.glob(".*"))  # no temporary files left behind


def test_run_selection_torch_float32_two_targets(cohort, tmp_path):
    import torch

    A, y = cohort
    A_tr, A_va, A_te = (torch.as_tensor(a, dtype=torch.float32) for a in splits(A))
    Y = np.c_[y, 100 - 0.5 * y]  # a second target, e.g. a cognitive score
    group = tmp_path / "group"
    out = run_selection(
        Splits(A_tr, A_va, A_te), Splits(Y[:N_TRAIN], Y[N_TRAIN : N_TRAIN + N_VAL], Y[N_TRAIN + N_VAL :]),
        files(group), ranks=(7, 7), lambda_grid=[0.0, 0.05], target_names=["age", "score"], quiet=True,
    )
    final = out["final"]
    assert final.roi_coefficients.shape == (7, 2)
    assert read_tsv(group / "loadings.tsv").columns[-2:].tolist() == ["predicted_age", "predicted_score"]
    # Two targets that are linear in each other: the second prediction follows the first.
    pred = final.predictions["test"]["linear_model_on_decomposition"]
    np.testing.assert_allclose(pred[:, 1], 100 - 0.5 * pred[:, 0], atol=1e-6)
    assert len(out["lambda_sweep"]) == 2


def test_run_selection_on_a_torch_device_gives_the_hosts_choice(cohort, tmp_path, caplog):
    # --device cuda puts the three tensors on the GPU and runs the sweeps and the final
    # fit there (torch). The same path on torch's CPU device: the same choice and RoIs as
    # the host's numpy path, and the sweep tables resume across the two (same fingerprint).
    import logging

    A, y = cohort
    A_tr, A_va, A_te = splits(A.astype(np.float32))
    ys = Splits(y[:N_TRAIN], y[N_TRAIN : N_TRAIN + N_VAL], y[N_TRAIN + N_VAL :])
    A3 = Splits(A_tr, A_va, A_te)
    kw = dict(rank_grid=range(5, 9), lambda_grid=[0.0, 1e-2, 1e-1], quiet=True, n_jobs=2)
    host = run_selection(A3, ys, files(tmp_path / "host"), **kw)
    with caplog.at_level(logging.INFO, logger="brainage_xai.selection"):
        dev = run_selection(A3, ys, files(tmp_path / "dev"), device="cpu", **kw)
    assert "sweeps and final fit on cpu, one fit at a time" in caplog.text
    assert (dev["ranks"]["R1"], dev["ranks"]["R2"]) == (host["ranks"]["R1"], host["ranks"]["R2"])
    assert dev["lambda"]["lambda"] == host["lambda"]["lambda"]
    # torch and numpy round differently, and the sweep's fits stop at a loose tolerance:
    # the cells R2 >= R1 (one optimum, the CP fit's) agree closely; the cells R2 < R1 are
    # local minima that land within several per cent of each other (up to 6 % seen on one CPU).
    cols = ["R1", "R2", "train_error", "val_error"]
    for rule, rtol in ((lambda t: t["R2"] >= t["R1"], 2e-3), (lambda t: t["R2"] < t["R1"], 0.1)):
        a, b = host["rank_sweep"], dev["rank_sweep"]
        pd.testing.assert_frame_equal(a.loc[rule(a), cols], b.loc[rule(b), cols],
                                      check_exact=False, rtol=rtol)
    U3 = [np.load(tmp_path / d / "decomposition.npz")["U3"] for d in ("host", "dev")]
    r = [np.corrcoef(U3[0][:, k], U3[1][:, k])[0, 1] for k in range(U3[0].shape[1])]
    assert min(r) > 0.999, r
    # the loadings: to a fraction of their scale (the final fit stops at a finite tolerance; on some
    # CPUs single loadings differ by 0.2 % of the largest)
    a, b = host["final"].loadings["test"], dev["final"].loadings["test"]
    np.testing.assert_allclose(a, b, rtol=0, atol=5e-3 * np.abs(a).max())
    assert min(np.corrcoef(a[:, k], b[:, k])[0, 1] for k in range(a.shape[1])) > 0.999
    # Resume: the host's tables are this run's (same data, same fingerprint on either side).
    for name in ("rank_sweep.tsv", "rank_sweep.json", "lambda_sweep.tsv", "lambda_sweep.json"):
        (tmp_path / "resume" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "resume" / name).write_bytes((tmp_path / "host" / name).read_bytes())
    again = run_selection(A3, ys, files(tmp_path / "resume"), device="cpu", **kw)
    assert again["rank_sweep"].attrs == {"n_fitted": 0, "n_resumed": 10}  # the cells R2 <= R1
    assert again["lambda_sweep"].attrs["n_fitted"] == 0


def test_torch_tensors_are_checked_and_hashed_as_numpy_arrays(cohort):
    import torch

    from brainage_xai.selection.lambda_sweep import lambda_scale
    from brainage_xai.selection.rank_sweep import tensor_fingerprint
    from brainage_xai.selection.scree import _check_tensor

    A, _ = cohort
    A = A[:N_TRAIN].astype(np.float32)
    T = torch.from_numpy(A.copy())
    assert _check_tensor(T) is T  # stays a tensor, where it is
    assert tensor_fingerprint(T, np.arange(3.0)) == tensor_fingerprint(A, np.arange(3.0))
    assert tensor_fingerprint(T[:, :, :-1]) != tensor_fingerprint(A)
    bad = T.clone()
    bad[3, 2, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        _check_tensor(bad, "A_train")
    with pytest.raises(ValueError, match="3-way"):
        _check_tensor(T[0], "A_train")
    res = fit_final(Splits(A, A[:5], A[5:10]), Splits(np.arange(N_TRAIN), np.arange(5), np.arange(5)),
                    (4, 4), 0.0).result
    assert lambda_scale(T, res) == pytest.approx(lambda_scale(A, res), rel=1e-5)


def test_selection_stays_on_the_host_when_the_gpu_is_full(cohort, monkeypatch, caplog):
    # A GPU without room for the tensors (or a Dask cluster): the sweeps run as on the CPU.
    import logging

    import torch

    from brainage_xai.selection.workflow import _to_device

    A, _ = cohort
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**20, 2**30))
    with caplog.at_level(logging.WARNING, logger="brainage_xai.selection"):
        arrays, moved = _to_device(splits(A), "cuda")
    assert not moved and all(isinstance(a, np.ndarray) for a in arrays)
    assert "do not fit in the free memory of cuda" in caplog.text
    arrays, moved = _to_device(splits(A), "cpu", dask_scheduler="tcp://localhost:8786")
    assert not moved and all(isinstance(a, np.ndarray) for a in arrays)


def test_relevance_weighted_deviations(rng, tmp_path):
    # --tensor relevance: the scaled deviations times ((g * s) ** 0.5 / mean), g the
    # training subjects' output gradient. Where the network ignores an activation
    # (g = 0) the tensor is zero, however much that activation varies.
    from brainage_xai.selection import (
        RELEVANCE_POWER,
        channel_scale,
        decomposed_nbytes,
        deviation_splits,
        deviation_tensor,
        relevance_weight,
    )

    assert RELEVANCE_POWER == 0.5
    path = tmp_path / "A.npy"
    np.save(path, (rng.random((9, 3, 11)) * np.array([1.0, 10.0, 0.1])[None, :, None]).astype(np.float32))
    A = np.load(path, mmap_mode="r")
    rows = {"train": np.array([0, 2, 4, 6, 8]), "val": np.array([1, 5]), "test": np.array([3, 7])}
    g = rng.random((3, 11))
    g[:, :4] = 0.0  # voxels the prediction does not depend on
    train = np.asarray(A[rows["train"]])
    scale = channel_scale(train)
    w = relevance_weight(g, scale)
    expected = np.sqrt(g * scale[:, None])
    np.testing.assert_allclose(w, expected / expected.mean(), rtol=1e-5)
    assert w.dtype == np.float32 and w.mean() == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_allclose(relevance_weight(g, scale, power=1.0), g * scale[:, None] / (g * scale[:, None]).mean(), rtol=1e-5)
    tensors, centre, scale2 = deviation_splits(A, rows, gradient_rms=g)
    np.testing.assert_allclose(scale2, scale)
    plain, _, _ = deviation_splits(A, rows)
    for split, r in rows.items():
        np.testing.assert_array_equal(tensors[split], deviation_tensor(np.asarray(A[r]), centre, scale, w))
        # Each part is the plain (channel-scaled) deviation times the weight.
        np.testing.assert_allclose(tensors[split], plain[split] * np.concatenate([w, w])[None], rtol=1e-5, atol=1e-7)
        assert not tensors[split][:, :, :4].any() and plain[split][:, :, :4].any()
    assert decomposed_nbytes(A.shape, "relevance") == sum(t.nbytes for t in tensors.values())
    with pytest.raises(ValueError, match="zero gradient"):
        relevance_weight(np.zeros((3, 11)), scale)
    with pytest.raises(ValueError, match="gradient_rms must be"):
        relevance_weight(g[:, :5].ravel(), scale)
    with pytest.raises(ValueError, match="weight must be"):
        deviation_tensor(train, centre, scale, w[:, :5])
