"""Consensus RoIs across networks and resamples, on tensors with planted components."""

import numpy as np
import pytest

from brainage_xai.decomposition.fixed import fit_fixed_spatial, project
from brainage_xai.explain.consensus import (
    ROBUST_STABILITY,
    Fit,
    consensus_decomposition,
    linear_model,
    match_components,
    resamples,
)
from brainage_xai.selection import Splits

N, C, V = (40, 12, 12), 6, 90  # subjects per split, channels, voxels
SHARED = 4


def _blobs(rng, k, v=V, width=6):
    U = np.zeros((v, k))
    for q in range(k):
        start = q * (v // (k + 1))
        U[start:start + width, q] = rng.uniform(0.5, 1.0, width)
    return U


@pytest.fixture(scope="module")
def planted():
    """Three "networks" of the same 64 subjects: four shared spatial components with
    network-specific channel profiles; the third network has a fifth component of its own."""
    rng = np.random.default_rng(0)
    U3 = _blobs(rng, SHARED + 1)
    n = sum(N)
    age = rng.uniform(10, 80, n)
    U1 = np.column_stack([age / 80, 1 - age / 80, rng.uniform(0, 1, n), rng.uniform(0, 1, n),
                          rng.uniform(0, 1, n)])
    nets = []
    for k in range(3):
        q = SHARED + (k == 2)
        W = rng.uniform(0.2, 1.0, (C, q))
        A = np.einsum("iq,cq,vq->icv", U1[:, :q], W, U3[:, :q])
        A *= 1 + 0.03 * rng.standard_normal(A.shape)
        nets.append(np.clip(A, 0, None).astype(np.float32))
    cuts = np.cumsum(N)[:-1]

    def tensors(k):
        return Splits(*np.split(nets[k], cuts))

    return {"tensors": tensors, "U3": U3, "age": Splits(*np.split(age, cuts)), "U1": U1}


def _best(U, truth):
    c = np.corrcoef(np.column_stack([U, truth]).T)[: U.shape[1], U.shape[1]:]
    return c.max(axis=0), c.argmax(axis=0)


def test_consensus_recovers_shared_components_and_rejects_one_networks_own(planted):
    result = consensus_decomposition(planted["tensors"], 3, (5, 5), n_resamples=3, random_state=0)
    cons = result.consensus
    assert cons.n_fits == 9 and cons.n_networks == 3
    best, which = _best(cons.U3, planted["U3"])
    shared = which[:SHARED]
    assert (best[:SHARED] > 0.95).all(), best
    np.testing.assert_allclose(cons.stability[shared], 1.0)
    assert all(cons.networks[q] == [0, 1, 2] for q in shared)
    # the component only the third network has: in at most its own three fits
    extra = planted["U3"][:, SHARED]
    own = [q for q in range(cons.U3.shape[1]) if np.corrcoef(cons.U3[:, q], extra)[0, 1] > 0.9]
    assert len(own) == 1  # found, and said to be one network's
    assert all(cons.stability[q] <= 3 / 9 + 1e-9 for q in own)
    assert all(cons.stability[q] < ROBUST_STABILITY for q in own)
    table = cons.table()
    assert list(table["name"][:SHARED]) == ["RoI 1", "RoI 2", "RoI 3", "RoI 4"]
    assert table["robust"][:SHARED].all() and (table["networks_with_roi"][:SHARED] == 3).all()
    # every fit's component is listed with the RoI it matched (one-to-one per fit)
    m = cons.matches
    assert len(m) == 9 * 5
    matched = m[m["roi"] != "n/a"]
    assert not matched.duplicated(["network", "resample", "roi"]).any()
    assert (matched["correlation"] >= 0.5).all()


def test_consensus_loadings_carry_the_planted_loadings(planted):
    result = consensus_decomposition(planted["tensors"], 3, (5, 5), n_resamples=2, random_state=0)
    U1 = np.concatenate([result.loadings.train, result.loadings.val, result.loadings.test])
    best, which = _best(result.consensus.U3, planted["U3"][:, :SHARED])
    for j in range(SHARED):  # the loadings of the RoI on planted component j follow its U1
        assert np.corrcoef(U1[:, which[j]], planted["U1"][:, j])[0, 1] > 0.95
    assert result.errors["train"] < 0.1 and result.errors["test"] < 0.1
    assert (result.fixed.W >= 0).all() and (U1 >= 0).all()
    assert [len(ch) for ch in result.channels] == [C, C, C]
    model, pred = linear_model(result.loadings, planted["age"])
    assert np.mean(np.abs(pred.test - planted["age"].test)) < 2.0  # age is planted linearly


def test_a_component_in_one_fit_only_is_no_roi():
    rng = np.random.default_rng(1)
    U = _blobs(rng, 3)
    fits = [Fit(k, 0, U[:, :2] + 0.01 * rng.random((V, 2))) for k in range(3)]
    fits[0] = Fit(0, 0, np.column_stack([fits[0].U3, U[:, 2]]))
    cons = match_components(fits)
    assert cons.U3.shape[1] == 2 and np.allclose(cons.stability, 1.0)
    assert (cons.matches.loc[cons.matches["component"] == 3, "roi"] == "n/a").all()


def test_resamples_start_with_all_subjects_and_are_seeded():
    first, *rest = resamples(20, 4, seed=3)
    assert list(first) == list(range(20)) and len(rest) == 3
    assert all(len(r) == 20 and r.max() < 20 for r in rest)
    assert [list(r) for r in resamples(20, 4, seed=3)[1:]] == [list(r) for r in rest]


def test_fixed_spatial_fit_reproduces_a_planted_model(rng):
    U1, W, U3 = rng.random((50, 3)), rng.random((7, 3)), _blobs(rng, 3)
    A = np.einsum("iq,cq,vq->icv", U1, W, U3)
    fit = fit_fixed_spatial(project(A, U3), U3, norms2=float((A ** 2).sum()))
    assert fit.rel_error < 1e-4
    np.testing.assert_allclose(fit.transform(project(A[:4], U3)), fit.U1[:4], rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="expected"):
        project(A, U3[:-1])
