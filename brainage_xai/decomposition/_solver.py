"""Building blocks of the structured solver: HALS column updates, the rank-deficient
mode-2 step, the two-pass outer iteration and the initialisations.

Internal representation (see ``docs/decomposition.md``)::

    A ~ sum_r U1[:, r] o W[:, r] o U3[:, r],      W = U2 @ D.T   (only when R2 < R1)

with the component scale kept in ``U3`` between iterations. The objective is

    F = 1/2 ||A - Ahat||^2 + l1 * sum_r ||U1[:, r]||_2 ||W[:, r]||_2 ||U3[:, r]||_1,

which equals ``1/2 ||A - Ahat||^2 + l1 ||U3||_1`` whenever the columns of ``U1`` and
``W`` have unit norm. Writing the penalty scale-invariantly makes the normalisation a
no-op for ``F`` (so ``F`` never increases) and keeps the l1 penalty meaningful: without
it the penalty could be driven to zero by moving scale out of ``U3``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ._backend import TINY, Backend
from ._passes import Passes

#: Inner HALS sweeps per factor update. Cheap next to the two passes over the
#: tensor, and they make each outer iteration worth much more (Gillis & Glineur 2012).
SWEEPS_U1 = 5
SWEEPS_W = 5
SWEEPS_U3 = 5
#: Alternations between U2 and D inside one mode-2 step of the reduced model.
MODE2_ROUNDS = 2
#: Monotone FISTA steps for D per alternation.
FISTA_STEPS = 15


@dataclass
class State:
    """Factors of the structured model; ``U2``/``D`` are set only when ``R2 < R1``."""

    U1: object
    W: object
    U3: object
    U2: object = None
    D: object = None


# --------------------------------------------------------------------------- updates
def hals(bk: Backend, U, M, H, sweeps, nonneg=True, shrink=None, group=None):
    """Exact column-by-column minimisation of a quadratic in ``U``.

    Minimises ``1/2 tr(U H U.T) - tr(U.T M) + sum_r shrink_r ||u_r||_1
    + sum_r group_r ||u_r||_2`` over the columns of ``U`` in turn, each column at its
    exact minimiser given the others (so the objective never increases).
    ``shrink`` (an l1 weight, only with ``nonneg``) is soft-thresholding,
    ``group`` a column-norm penalty, i.e. group soft-thresholding.
    """
    xp = bk.xp
    U = xp.asarray(U, copy=True)
    R = U.shape[1]
    dg = xp.linalg.diagonal(H)
    # A column whose Gram diagonal vanishes (another factor of its component is
    # zero) carries no information: it is kept as is rather than zeroed, so that the
    # component can come back when the other factors move.
    alive = dg > 1e-20 * bk.at_least(dg.max(), TINY)
    dg = bk.at_least(dg, TINY)
    for _ in range(sweeps):
        for r in range(R):
            num = M[:, r] - U @ H[:, r] + U[:, r] * H[r, r]
            if shrink is not None:
                num = num - shrink[r]
            if nonneg:
                num = bk.at_least(num, 0)
            if group is not None:
                nrm = xp.sqrt(xp.sum(num * num))
                num = num * bk.at_least(1.0 - group[r] / bk.at_least(nrm, TINY), 0)
            U[:, r] = xp.where(alive[r], num / dg[r], U[:, r])
    return U


def update_factor(bk, U, M, H, nonneg, group, sweeps):
    """Update a factor that enters the fit through ``1/2 tr(U H U.T) - tr(U.T M)``.

    Unconstrained and unpenalised factors get the exact least-squares solution;
    the others get HALS sweeps. ``U=None`` starts from the clipped least-squares
    solution.
    """
    if U is None or (not nonneg and group is None):
        U_ls = M @ bk.pinvh(H)
        if not nonneg and group is None:
            return U_ls
        U = bk.at_least(U_ls, 0) if nonneg else U_ls
    return hals(bk, U, M, H, sweeps, nonneg=nonneg, group=group)


def nn_sylvester(bk, D, H, P, B, steps):
    """Monotone FISTA for ``min_{D >= 0} 1/2 tr(D.T H D P) - <D, B>``.

    The objective is evaluated at every candidate and the better point kept
    (Beck & Teboulle's MFISTA), so the result is never worse than ``D``. Only small
    ``R1 x R2`` products; no host synchronisation.
    """
    xp = bk.xp
    L = bk.at_least(xp.linalg.eigvalsh(H)[-1] * xp.linalg.eigvalsh(P)[-1], TINY)

    def f(X):
        return 0.5 * xp.sum(X * (H @ X @ P)) - xp.sum(X * B)

    x = D
    fx = f(x)
    y = x
    t = 1.0
    for _ in range(steps):
        z = bk.at_least(y - (H @ y @ P - B) / L, 0)
        fz = f(z)
        better = fz <= fx
        x_new = xp.where(better, z, x)
        fx = xp.where(better, fz, fx)
        t_new = 0.5 * (1.0 + (1.0 + 4.0 * t * t) ** 0.5)
        y = x_new + (t / t_new) * (z - x_new) + ((t - 1.0) / t_new) * (x_new - x)
        x, t = x_new, t_new
    return x


def mode2_reduced(bk, U2, D, M2, H2, nonneg, rounds=MODE2_ROUNDS, steps=FISTA_STEPS):
    """Decrease ``1/2 tr(W H2 W.T) - tr(W.T M2)`` over ``W = U2 D.T`` with ``D >= 0``.

    Alternates an exact update of ``U2`` (HALS if non-negative, least squares if
    free) and monotone FISTA on ``D``; columns of ``U2`` are rebalanced to unit norm
    in between (the product is unchanged).
    """
    xp = bk.xp
    for _ in range(rounds):
        Q = D.T @ H2 @ D
        N = M2 @ D
        if nonneg:
            U2 = hals(bk, U2, N, Q, SWEEPS_W)
        else:
            U2 = N @ bk.pinvh(Q)
        s = xp.linalg.vector_norm(U2, axis=0)
        U2 = U2 / xp.clip(s, min=TINY)
        D = D * s[None, :]
        D = nn_sylvester(bk, D, H2, U2.T @ U2, M2.T @ U2, steps)
    return U2, D


def iterate(bk, passes: Passes, shape, st: State, reduced, nonneg, lam, normA2):
    """One outer iteration: two passes over the tensor.

    Pass 1 contracts mode 3 once (``T = A x3 U3``), which serves the mode-1 and
    mode-2 MTTKRPs; pass 2 is the mode-3 MTTKRP. The fit comes from Gram
    identities, never from a dense reconstruction. ``st.U1`` may be ``None`` (a
    start that gives ``W`` and ``U3`` only): the first update is then least squares.

    Returns the new state, the objective ``F`` and the data term
    ``||A - Ahat||^2`` (backend scalars).
    """
    xp = bk.xp
    U1, W, U3, U2, D = st.U1, st.W, st.U3, st.U2, st.D

    # pass 1
    T = passes.mode3(U3)
    G3 = U3.T @ U3
    l1_3 = xp.sum(xp.abs(U3), axis=0) if lam > 0 else None
    M1 = xp.sum(T * W[None, :, :], axis=1)
    H1 = (W.T @ W) * G3
    g1 = lam * xp.linalg.vector_norm(W, axis=0) * l1_3 if lam > 0 else None
    U1 = update_factor(bk, U1, M1, H1, nonneg, g1, SWEEPS_U1)

    M2 = xp.sum(T * U1[:, None, :], axis=0)
    del T
    H2 = (U1.T @ U1) * G3
    if not reduced:
        g2 = lam * xp.linalg.vector_norm(U1, axis=0) * l1_3 if lam > 0 else None
        W = update_factor(bk, W, M2, H2, nonneg, g2, SWEEPS_W)
    else:
        if lam > 0:
            # Majorise the column-norm penalty by a quadratic that touches it at the
            # current W (AM-GM): the mode-2 problem stays a plain quadratic.
            beta = lam * xp.linalg.vector_norm(U1, axis=0) * l1_3 / xp.clip(xp.linalg.vector_norm(W, axis=0), min=TINY)
            H2 = H2 + bk.diag_matrix(beta)
        U2, D = mode2_reduced(bk, U2, D, M2, H2, nonneg)
        W = U2 @ D.T

    # Unit columns for U1 and W, scale into U3: F is invariant (see module docstring).
    n1 = xp.linalg.vector_norm(U1, axis=0)
    nw = xp.linalg.vector_norm(W, axis=0)
    U1 = U1 / xp.clip(n1, min=TINY)
    W = W / xp.clip(nw, min=TINY)
    if reduced:
        D = D / xp.clip(nw, min=TINY)[:, None]
    U3 = U3 * (n1 * nw)[None, :]

    # pass 2
    M3 = passes.mttkrp3(U1, W)
    H3 = (U1.T @ U1) * (W.T @ W)
    shrink = lam * xp.linalg.vector_norm(U1, axis=0) * xp.linalg.vector_norm(W, axis=0) if lam > 0 else None
    U3 = hals(bk, U3, M3, H3, SWEEPS_U3, nonneg=True, shrink=shrink)

    # float64 accumulation: the identity subtracts numbers close to ||A||^2
    data = normA2 - 2.0 * xp.sum(M3 * U3, dtype=xp.float64) + xp.sum(H3 * (U3.T @ U3), dtype=xp.float64)
    F = 0.5 * data
    if lam > 0:
        F = F + lam * xp.sum(xp.linalg.vector_norm(U1, axis=0) * xp.linalg.vector_norm(W, axis=0) * xp.sum(xp.abs(U3), axis=0), dtype=xp.float64)
    return State(U1, W, U3, U2, D), F, data


def _extrapolate(bk, X: State, P: State, beta, reduced, nonneg):
    """``X + beta (X - P)`` factor by factor, projected onto the constraints."""

    def step(x, p, clip):
        y = x + beta * (x - p)
        return bk.xp.clip(y, min=0) if clip else y

    U1 = step(X.U1, P.U1, nonneg)
    U3 = step(X.U3, P.U3, True)
    if reduced:
        U2 = step(X.U2, P.U2, nonneg)
        D = step(X.D, P.D, True)
        return State(U1, U2 @ D.T, U3, U2, D)
    return State(U1, step(X.W, P.W, nonneg), U3)


#: Extrapolation schedule (Ang, Cohen, Gillis & Hien 2021, "HER"): start, growth
#: on success, growth of the cap, shrink on failure.
BETA0, BETA_GROW, BETA_CAP_GROW, BETA_SHRINK = 0.5, 1.05, 1.01, 1.5


def run(bk, passes, shape, st, *, reduced, nonneg, lam, normA2, n_iter_max, tol, log=None,
        accelerate=True):
    """Outer iterations until the relative decrease of ``F`` falls below ``tol``.

    With ``accelerate``, each iteration starts from an extrapolation of the last two
    accepted iterates; an iteration that does not decrease ``F`` is rejected (the
    next one restarts from the last accepted iterate, with a smaller step), so the
    accepted objective values never increase. Returns the final state, the accepted
    objective values, the final data term, whether the stopping rule was met and the
    number of iterations computed (accepted or not).
    """
    objs = []
    X, F_X, data_X, P = st, math.inf, None, None
    Y, extrapolated = st, False
    beta, beta_cap = BETA0, 1.0
    converged = False
    floor = 1e-28 * normA2
    it = 0
    while it < n_iter_max:
        Z, F, data = iterate(bk, passes, shape, Y, reduced, nonneg, lam, normA2)
        F = bk.item(F)
        it += 1
        if extrapolated and not F <= F_X:
            beta_cap, beta = beta, beta / BETA_SHRINK
            Y, extrapolated = X, False
            continue
        if extrapolated:
            beta, beta_cap = min(beta_cap, beta * BETA_GROW), min(1.0, beta_cap * BETA_CAP_GROW)
        decrease, F_X_old = F_X - F, F_X
        P, X, F_X, data_X = X, Z, F, data
        objs.append(F)
        if log is not None and log(len(objs) - 1, F):
            break
        if F <= floor or (len(objs) > 1 and decrease <= tol * F_X_old):
            converged = True
            break
        if accelerate and P is not st:
            Y, extrapolated = _extrapolate(bk, X, P, beta, reduced, nonneg), True
        else:
            Y, extrapolated = X, False
    return X, objs, bk.item(data_X), converged, it


# --------------------------------------------------------------------------- init
def _nonneg_columns(bk, X):
    """A non-negative start from singular vectors: sign-fix each column, take |x|."""
    Xn = bk.to_numpy(X)
    signs = np.where(np.sum(Xn, axis=0) < 0, -1.0, 1.0)
    return bk.xp.abs(X * bk.asarray(signs)[None, :])


def _range_svd(bk, apply, apply_t, Y, k, power_iter, gram=None):
    """Leading left singular vectors of an operator from a first sample ``Y``.

    ``apply(X)`` multiplies the unfolding by ``X``, ``apply_t(Q)`` its transpose;
    randomised subspace iteration (Halko et al. 2011), then the exact SVD of the
    small projected problem. ``gram``, the unfolding times its transpose when that is
    small, replaces ``apply(apply_t(.))``: ``Z = apply_t(Q)`` is then never formed,
    which matters when it is as large as the tensor (few channels: mode 2).
    """
    xp = bk.xp
    for _ in range(power_iter):
        Q = xp.linalg.qr(Y, mode="reduced")[0]
        Y = gram @ Q if gram is not None else apply(apply_t(Q))
    Q = xp.linalg.qr(Y, mode="reduced")[0]
    if gram is not None:
        ZtZ = Q.T @ (gram @ Q)  # = Z^T Z for Z = A^T Q
    else:
        Z = apply_t(Q).reshape(-1, Q.shape[1])
        ZtZ = Z.T @ Z
        del Z
    _, V = xp.linalg.eigh(ZtZ)
    V = bk.take(V, np.arange(V.shape[1] - 1, V.shape[1] - 1 - min(k, V.shape[1]), -1))
    return Q @ V


#: Subspace iterations of the randomised SVD start (scikit-learn's ``randomized_svd``
#: uses 4 for so few components). Without them the start depended on the random seed:
#: on a demo network's block1 deviations, seeds 0-3 gave final fits whose RoIs' median
#: correlation with the planted regions ranged over 0.10-0.21 and whose linear model
#: ranged over 10-22 years; with 3 or 4 iterations every seed gave the same fit, at the
#: lowest training error of them all (docs/decomposition.md).
SVD_POWER_ITER = 4


def svd_init(bk, A, A2, shape, R1, nonneg, rng, power_iter=None, oversample=10):
    """Leading singular vectors of the three unfoldings, made non-negative.

    Randomised range finder whose test matrices are Khatri-Rao products of small
    Gaussian matrices, so that the first product is an MTTKRP and nothing of size
    ``c v``, ``n v`` or ``n c`` is drawn on the host, refined by ``power_iter``
    subspace iterations (Halko et al. 2011; default :data:`SVD_POWER_ITER`, read at
    call time) so that the result is the SVD's, not the seed's. Like TensorLy's ``'svd'`` init for non-negative CP, each vector is
    sign-fixed and replaced by its absolute value (``U3`` always; ``U1``, ``W`` with
    ``nonneg``). ``A`` is the tensor or its :class:`Passes`; ``A2`` is not used (the
    passes reshape ``A`` themselves) and stays for callers that pass it.
    """
    n, c, v = shape
    if power_iter is None:
        power_iter = SVD_POWER_ITER
    ops = A if isinstance(A, Passes) else Passes(bk, A, shape)

    def gauss(*dims):
        return bk.asarray(rng.standard_normal(dims))

    # mode 1: A_(1) = A.reshape(n, c v)
    k = min(R1 + oversample, n, c * v)
    U1 = _range_svd(bk, ops.a1, ops.t1, ops.mttkrp1(gauss(c, k), gauss(v, k)), R1, power_iter)

    # mode 2: A_(2) is c x nv; products through batched matmuls over subjects
    k = min(R1 + oversample, c, n * v)
    Oa, Ov = gauss(n, k), gauss(v, k)
    Y = ops.mttkrp2(Oa, Ov)
    # A_(2) A_(2)^T (c x c), subject by subject: A_(2)^T Q would be n v x k, as large as A.
    G2 = ops.gram2()
    W = _range_svd(bk, None, None, Y, R1, power_iter, gram=G2)

    # mode 3: A_(3) = A2.T  (v x nc)
    k = min(R1 + oversample, v, n * c)
    Om = (gauss(n, k)[:, None, :] * gauss(c, k)[None, :, :]).reshape(n * c, k)
    U3 = _range_svd(bk, ops.t3, ops.a3, ops.t3(Om), R1, power_iter)
    del Om

    fix = _nonneg_columns if nonneg else _sign_fix
    return State(
        _pad_random(bk, fix(bk, U1), R1, rng),
        _pad_random(bk, fix(bk, W), R1, rng),
        _pad_random(bk, _nonneg_columns(bk, U3), R1, rng),
    )


#: Subspace iterations of the sketch start, one pass over the tensor each.
SKETCH_POWER_ITER = 2


def sketch_init(bk, passes: Passes, shape, R1, rng, power_iter=None, oversample=10,
                check=None):
    """A start in ``1 + power_iter`` passes: ``W`` and ``U3`` from the SVD, ``U1`` left out.

    The first pass gives the channels' Gram matrix ``A_(2) A_(2)^T`` (``c x c``, so
    ``W`` is its leading eigenvectors, exactly) and a Khatri-Rao sketch of the mode-3
    unfolding. Each subspace iteration of mode 3 is one pass, because with subject
    chunks ``A_(3) A_(3)^T Q = sum_k A2_k^T (A2_k Q)`` needs each chunk once; the
    last pass also gives ``Q^T A_(3) A_(3)^T Q`` for a Rayleigh-Ritz step, and its
    product moves the Ritz vectors by one more iteration. ``U1`` is not estimated:
    the first update of the fit solves for it by least squares from ``W`` and
    ``U3``, which the SVD start's ``U1`` (ten passes of its own) only seeds.
    Columns are sign-fixed and made non-negative as in :func:`svd_init`.

    With ``check``, the first pass also gives ``(||A||^2, min, NaN count)`` and
    ``check`` is called on it before anything else is computed. Returns the state and
    what ``check`` returned (``None`` without it).
    """
    xp = bk.xp
    n, c, v = shape
    if power_iter is None:
        power_iter = SKETCH_POWER_ITER
    if power_iter < 1:
        raise ValueError(f"the sketch start needs power_iter >= 1; got {power_iter}")
    k = min(R1 + oversample, v, n * c)
    Oa = bk.asarray(rng.standard_normal((n, k)))
    Oc = bk.asarray(rng.standard_normal((c, k)))
    G2, Y, stats = passes.sketch(Oa, Oc, stats=check is not None)
    checked = check(stats) if check is not None else None
    _, V2 = xp.linalg.eigh(G2)
    W = bk.take(V2, np.arange(c - 1, c - 1 - min(R1, c), -1))
    for _ in range(power_iter):
        Q = xp.linalg.qr(Y, mode="reduced")[0]
        Y, B = passes.power3(Q)
    _, V = xp.linalg.eigh(B)
    V = bk.take(V, np.arange(V.shape[1] - 1, V.shape[1] - 1 - min(R1, V.shape[1]), -1))
    U3 = Y @ V
    U3 = U3 / xp.clip(xp.linalg.vector_norm(U3, axis=0), min=TINY)[None, :]
    st = State(None, _pad_random(bk, _nonneg_columns(bk, W), R1, rng),
               _pad_random(bk, _nonneg_columns(bk, U3), R1, rng))
    return st, checked


def _sign_fix(bk, X):
    Xn = bk.to_numpy(X)
    signs = np.where(np.sum(Xn, axis=0) < 0, -1.0, 1.0)
    return X * bk.asarray(signs)[None, :]


def _pad_random(bk, X, R, rng):
    """Append uniform random unit columns up to ``R`` columns."""
    if X.shape[1] >= R:
        return X
    extra = rng.random((X.shape[0], R - X.shape[1]))
    extra /= np.linalg.norm(extra, axis=0, keepdims=True)
    return bk.xp.concat([X, bk.asarray(extra)], axis=1)


def random_init(bk, shape, R1, rng):
    """Uniform random factors; the first ``U1`` update fixes the scale."""
    n, c, v = shape
    return State(
        bk.asarray(rng.random((n, R1))),
        bk.asarray(rng.random((c, R1))),
        bk.asarray(rng.random((v, R1))),
    )


def reduce_mode2(bk, st: State, R2, nonneg, hint=None, rounds=20):
    """Rank-``R2`` factorisation ``W ~ U2 D.T`` (``D >= 0``) of a rank-``R1`` CP fit.

    Starts from the ``R2`` most important columns of ``W`` (or of ``hint``, an
    earlier ``U2``, padded with the worst-explained columns of ``W``), sets ``D`` by
    clipped least squares and refines by weighted alternating least squares, the
    weights being the component energies, so that strong components are kept best.
    """
    xp = bk.xp
    W, U3 = st.W, st.U3
    g = xp.linalg.vector_norm(U3, axis=0) * xp.linalg.vector_norm(W, axis=0)
    gn = bk.to_numpy(g)
    order = np.argsort(-gn, kind="stable")
    if hint is None or hint.shape[1] == 0:
        U2 = bk.take(W, order[:R2])
    else:
        U2 = hint
        if U2.shape[1] > R2:
            U2 = bk.take(U2, np.arange(R2))
        while U2.shape[1] < R2:
            D = xp.clip(W.T @ U2 @ bk.pinvh(U2.T @ U2), min=0)
            res = bk.to_numpy(xp.linalg.vector_norm(W - U2 @ D.T, axis=0) * g)
            worst = int(np.argmax(res))
            U2 = xp.concat([U2, W[:, worst : worst + 1]], axis=1)
    if nonneg:
        U2 = xp.clip(U2, min=0)
    U2 = U2 / xp.clip(xp.linalg.vector_norm(U2, axis=0), min=TINY)
    D = xp.clip(W.T @ U2 @ bk.pinvh(U2.T @ U2), min=0)
    Hw = bk.diag_matrix(g * g)
    U2, D = mode2_reduced(bk, U2, D, W @ Hw, Hw, nonneg, rounds=rounds)
    Wr = U2 @ D.T
    nw = xp.clip(xp.linalg.vector_norm(Wr, axis=0), min=TINY)
    # Unit columns of W again, norms into U3: the model itself is unchanged.
    return State(st.U1, Wr / nw[None, :], U3 * nw[None, :], U2, D / nw[:, None])
