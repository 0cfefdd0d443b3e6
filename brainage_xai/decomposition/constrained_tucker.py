"""Constrained non-negative Tucker decomposition with diagonal core faces (paper eq. 2).

``A ~ G x1 U1 x2 U2 x3 U3`` with ``G`` of shape ``(R1, R2, R1)``, ``G[i, j, k] = 0``
for ``i != k``, ``G[i, j, i] >= 0`` and ``U3 >= 0``. With ``D[r, j] = G[r, j, r]`` the
model is the rank-``R1`` CP model ``sum_r U1[:, r] o W[:, r] o U3[:, r]`` with
``W = U2 D.T``, whose mode-2 factor has rank at most ``R2``. The solver works on that
form: HALS on MTTKRPs, two passes over the tensor per iteration, errors from Gram
identities. ``docs/decomposition.md`` describes the model and the solver.
"""

from __future__ import annotations

import logging
import math
import numbers

import numpy as np
from array_api_compat import is_torch_array

from . import _solver
from ._backend import TINY, Backend, to_numpy
from ._passes import Passes, check_stats
from .chunked import ChunkedTensor, as_chunked

logger = logging.getLogger(__name__)

CONSTRAINTS = ("nonneg", "paper")

_PARAMS_DOC = """
    rank : int or sequence of int
        ``(R1, R2)``; also accepted: ``[R1, R2, R1]`` (Tucker style) and a single
        ``R`` meaning ``(R, R)``. ``R1`` is the number of components (RoIs), ``R2``
        the rank of the channel factor.
    constraints : {'nonneg', 'paper'}, default='nonneg'
        ``'nonneg'``: every factor and the core are non-negative (as TensorLy's
        non-negative Tucker the paper built on). ``'paper'``: exactly eq. 2 of the
        paper, ``U3 >= 0`` and the core faces ``>= 0``, ``U1`` and ``U2`` free.
    l1 : float, default=0.0
        Weight of the l1 penalty on ``U3``. The objective is
        ``1/2 ||A - Ahat||_F^2 + l1 * ||U3 diag(s)||_1`` with unit-norm columns of
        ``U1`` and ``W`` and ``s`` the component scales, i.e. the penalty acts on the
        spatial maps at their size in the data (it cannot be dodged by rescaling).
        ``l1`` is in the units of ``A``'s entries.
    n_iter_max : int, default=500
        Maximum number of outer iterations (each is two passes over ``A``). A fresh
        start with ``R2 < R1``, ``l1 > 0`` or ``'paper'`` first runs a non-negative
        rank-``R1`` CP warm-up, which may use as many again.
    tol : float, default=1e-6
        Stop when the objective decreases by less than ``tol`` times its value.
    init : {'svd', 'sketch', 'random'} or ConstrainedTuckerResult or fitted ConstrainedTucker
        ``'svd'``: leading singular vectors of the unfoldings (randomised, made
        non-negative; about 22 passes over ``A``); ``'sketch'``: the channel and
        spatial factors' singular vectors in three passes, the loadings from the
        first update; ``'random'``: uniform factors; a previous result: warm start,
        ranks may differ (the strongest components are kept, new ones start
        random; the channel factor is refactorised to rank ``R2``). A warm start
        whose subjects differ from ``A``'s keeps ``U2``, ``U3`` and the core only.
    random_state : int, numpy.random.Generator or None, default=0
        Seed of the initialisation; the same seed gives the same result.
    verbose : bool, default=False
        Log the objective at every iteration (``logging`` at INFO level).
    callback : callable or None, default=None
        Called as ``callback(iteration, rel_objective)`` after every iteration of
        every phase (``rel_objective`` as in ``errors``); returning ``True`` ends
        the current phase. For progress bars and benchmarks.
"""


def _fill_doc(func):
    func.__doc__ = func.__doc__.replace("    %(params)s\n", _PARAMS_DOC.lstrip("\n"))
    return func


# --------------------------------------------------------------------------- checks
def _as_array(A, name):
    A = as_chunked(A)
    if isinstance(A, ChunkedTensor):
        if A.dtype not in (np.float32, np.float64):
            raise ValueError(f"{name} must be float32 or float64; got {A.dtype}")
        if min(A.shape) == 0:
            raise ValueError(f"{name} must not be empty; got shape {A.shape}")
        return A
    if not (is_torch_array(A) or isinstance(A, np.ndarray)):
        try:
            A = np.asarray(A)
        except Exception as exc:  # noqa: BLE001 - report the type we could not read
            raise ValueError(
                f"{name} must be a numpy array or a torch tensor; got {type(A).__name__}"
            ) from exc
    if A.ndim != 3:
        raise ValueError(
            f"{name} must be a 3-way array (subjects x channels x voxels); "
            f"got {A.ndim} dimension(s) with shape {tuple(A.shape)}"
        )
    if min(A.shape) == 0:
        raise ValueError(f"{name} must not be empty; got shape {tuple(A.shape)}")
    if is_torch_array(A):
        import torch

        if A.dtype not in (torch.float32, torch.float64):
            if A.dtype.is_floating_point or A.dtype.is_complex:
                raise ValueError(f"{name} must be float32 or float64; got {A.dtype}")
            A = A.to(torch.float64)
        if A.requires_grad:
            A = A.detach()
    else:
        if A.dtype not in (np.float32, np.float64):
            if not (np.issubdtype(A.dtype, np.integer) or A.dtype == np.bool_):
                raise ValueError(f"{name} must be float32 or float64; got {A.dtype}")
            A = A.astype(np.float64)
    return A


def _check_finite_and_sign(bk, A, name, nonneg):
    """Squared norm of ``A``, after checking it is finite (and non-negative)."""
    xp = bk.xp
    if isinstance(A, ChunkedTensor):
        return check_stats(Passes(bk, A, A.shape).stats(), name, nonneg)
    normA2 = bk.sq_norm(A)
    if not math.isfinite(normA2):
        n_nan = int(bk.item(xp.sum(xp.isnan(A))))
        if n_nan:
            raise ValueError(f"{name} must be finite; it contains {n_nan} NaN value(s)")
        raise ValueError(
            f"{name} must be finite; it contains Inf or values too large to square in {A.dtype}"
        )
    if nonneg:
        amin = bk.item(A.min())
        if amin < 0:
            raise ValueError(
                f"constraints='nonneg' needs a non-negative {name}; its smallest entry is "
                f"{amin:g} (use constraints='paper' for signed data)"
            )
    return normA2


def _check_rank(rank, shape):
    if isinstance(rank, numbers.Integral):
        ranks = (int(rank), int(rank))
    else:
        try:
            ranks = tuple(rank)
        except TypeError:
            raise ValueError(
                f"rank must be an int or a pair (R1, R2); got {type(rank).__name__}"
            ) from None
        if not all(isinstance(r, numbers.Integral) for r in ranks):
            raise ValueError(f"rank must contain integers; got {rank!r}")
        ranks = tuple(int(r) for r in ranks)
        if len(ranks) == 3:
            if ranks[2] != ranks[0]:
                raise ValueError(
                    "a 3-element rank must be [R1, R2, R1] (the core has square faces); "
                    f"got {list(ranks)}"
                )
            ranks = ranks[:2]
        if len(ranks) != 2:
            raise ValueError(f"rank must be (R1, R2) or [R1, R2, R1]; got {rank!r}")
    R1, R2 = ranks
    if R1 < 1 or R2 < 1:
        raise ValueError(f"ranks must be >= 1; got (R1, R2) = ({R1}, {R2})")
    n, c, v = shape
    if R1 > n:
        raise ValueError(f"rank R1={R1} is larger than the number of subjects n={n} (mode 1)")
    if R2 > c:
        raise ValueError(f"rank R2={R2} is larger than the number of channels c={c} (mode 2)")
    if R1 > v:
        raise ValueError(f"rank R1={R1} is larger than the number of voxels v={v} (mode 3)")
    return R1, R2


def _check_params(constraints, l1, n_iter_max, tol):
    if constraints not in CONSTRAINTS:
        raise ValueError(
            f"'constraints' must be one of {list(CONSTRAINTS)}. {constraints!r} was provided."
        )
    if not isinstance(l1, numbers.Real) or not math.isfinite(l1) or l1 < 0:
        raise ValueError(f"'l1' must be a finite number >= 0; got {l1!r}")
    if not isinstance(n_iter_max, numbers.Integral) or n_iter_max < 1:
        raise ValueError(f"'n_iter_max' must be an integer >= 1; got {n_iter_max!r}")
    if not isinstance(tol, numbers.Real) or not tol >= 0:
        raise ValueError(f"'tol' must be a number >= 0; got {tol!r}")


# --------------------------------------------------------------------------- result
class ConstrainedTuckerResult:
    """A fitted constrained Tucker model.

    Attributes
    ----------
    core : array, shape (R1, R2, R1)
        Exactly zero off the diagonal faces, non-negative on them; it carries the
        scale (the factors have unit-norm columns).
    factors : list of 3 arrays
        ``[U1 (n, R1), U2 (c, R2), U3 (v, R1)]``, same array type, dtype and device
        as the input. Components are ordered by decreasing size.
    faces : array, shape (R1, R2)
        ``D[r, j] = core[r, j, r]``.
    rel_error : float
        ``||A - Ahat||_F / ||A||_F`` on the fitted tensor.
    errors : list of float
        Objective per iteration as ``sqrt(2 F) / ||A||_F`` (the relative error when
        ``l1 == 0``); it never increases.
    n_iter : int
        Iterations of the constrained fit; ``n_iter_init`` those of the
        non-negative rank-``R1`` CP warm-up that a fresh start (``init='svd'`` or
        ``'random'``) runs first when ``R2 < R1``, ``l1 > 0`` or
        ``constraints='paper'``; 0 otherwise.
    converged : bool
        Whether the stopping rule on ``tol`` was met before ``n_iter_max``.
    n_passes : int or None
        Passes over ``A`` the fit made (the start, every iteration, the input check).
    rank, constraints, l1 : the settings of the fit.
    """

    def __init__(self, core, factors, faces, rel_error, errors, n_iter, n_iter_init,
                 converged, rank, constraints, l1, n_passes=None):
        self.core = core
        self.factors = list(factors)
        self.faces = faces
        self.rel_error = float(rel_error)
        self.errors = [float(e) for e in errors]
        self.n_iter = int(n_iter)
        self.n_iter_init = int(n_iter_init)
        self.converged = bool(converged)
        self.rank = tuple(rank)
        self.constraints = constraints
        self.l1 = float(l1)
        self.n_passes = n_passes

    def __repr__(self):
        U1, U2, U3 = self.factors
        return (
            f"ConstrainedTuckerResult(rank={self.rank}, constraints={self.constraints!r}, "
            f"l1={self.l1:g}, shape=({U1.shape[0]}, {U2.shape[0]}, {U3.shape[0]}), "
            f"rel_error={self.rel_error:.4g}, n_iter={self.n_iter})"
        )

    # ---- helpers on the structured form
    def _on(self, bk):
        """``W = U2 D.T`` and ``U3`` on the backend of ``bk``."""
        U2 = bk.asarray(self.factors[1])
        U3 = bk.asarray(self.factors[2])
        W = U2 @ bk.asarray(self.faces).T
        return W, U3

    def _check_new(self, A, name):
        A = _as_array(A, name)
        _, c, v = (f.shape[0] for f in self.factors)
        if tuple(A.shape[1:]) != (c, v):
            raise ValueError(
                f"{name} must have shape (n_subjects, {c}, {v}) to match the fitted "
                f"factors; got {tuple(A.shape)}"
            )
        bk = Backend(np.empty(0, A.dtype) if isinstance(A, ChunkedTensor) else A)
        return A, bk

    def _mode1(self, A, bk):
        W, U3 = self._on(bk)
        n, c, v = A.shape
        if isinstance(A, ChunkedTensor):
            T = Passes(bk, A, A.shape).mode3(U3)
        else:
            T = (A.reshape(n * c, v) @ U3).reshape(n, c, U3.shape[1])
        M1 = bk.xp.sum(T * W[None, :, :], axis=1)
        H1 = (W.T @ W) * (U3.T @ U3)
        return M1, H1

    def transform(self, A_new, n_iter_max=500, tol=1e-10):
        """Loadings of new subjects with the core, ``U2`` and ``U3`` fixed.

        Solves ``min ||A_new - G x1 U1 x2 U2 x3 U3||`` over ``U1`` (non-negative if
        ``constraints='nonneg'``; exact least squares otherwise): one pass over
        ``A_new``, then a small non-negative least-squares problem by HALS.

        Parameters
        ----------
        A_new : array, shape (m, c, v)
            Activations of new subjects, numpy or torch.
        n_iter_max : int, default=500
            Maximum HALS sweeps for the non-negative case.
        tol : float, default=1e-10
            Stop the sweeps when no entry changes by more than ``tol`` times the
            largest entry.

        Returns
        -------
        U1_new : array, shape (m, R1)
            In the scale of ``factors[0]`` (unit-norm columns on the training set).
        """
        A_new, bk = self._check_new(A_new, "A_new")
        xp = bk.xp
        _check_finite_and_sign(bk, A_new, "A_new", nonneg=False)
        M1, H1 = self._mode1(A_new, bk)
        U1 = M1 @ bk.pinvh(H1)
        if self.constraints != "nonneg" or bk.item(U1.min()) >= 0:
            return U1  # the unconstrained solution is feasible, hence optimal
        U1 = xp.clip(U1, min=0)
        for _ in range(0, n_iter_max, 10):
            U1_new = _solver.hals(bk, U1, M1, H1, 10)
            change = bk.item(xp.abs(U1_new - U1).max())
            scale = bk.item(xp.abs(U1_new).max())
            U1 = U1_new
            if change <= tol * max(scale, TINY):
                break
        return U1

    def error_on(self, A, U1=None):
        """Relative error ``||A - Ahat|| / ||A||`` from Gram identities.

        Parameters
        ----------
        A : array, shape (m, c, v)
        U1 : array, shape (m, R1), optional
            Loadings of ``A``'s subjects, e.g. ``transform(A)`` for held-out
            subjects; default ``factors[0]`` (then ``A`` must be the fitted tensor's
            subjects).

        Returns
        -------
        float
        """
        A, bk = self._check_new(A, "A")
        xp = bk.xp
        U1 = bk.asarray(self.factors[0] if U1 is None else U1)
        if tuple(U1.shape) != (A.shape[0], self.rank[0]):
            raise ValueError(
                f"U1 must have shape ({A.shape[0]}, {self.rank[0]}) for this A; "
                f"got {tuple(U1.shape)}"
            )
        normA2 = _check_finite_and_sign(bk, A, "A", nonneg=False)
        if normA2 == 0:
            raise ValueError("A is all zeros: the relative error is undefined")
        M1, H1 = self._mode1(A, bk)
        fit = normA2 - 2.0 * bk.item(xp.sum(M1 * U1)) + bk.item(xp.sum(H1 * (U1.T @ U1)))
        return math.sqrt(max(fit, 0.0) / normA2)

    def reconstruct(self):
        """Dense ``G x1 U1 x2 U2 x3 U3`` (small tensors only: it is ``n x c x v``)."""
        U1, U2, U3 = self.factors
        W = U2 @ self.faces.T
        return (U1[:, None, :] * W[None, :, :]) @ U3.T

    def to_numpy(self):
        """A copy of this result with numpy arrays (for saving)."""
        conv = to_numpy
        return ConstrainedTuckerResult(
            conv(self.core), [conv(f) for f in self.factors], conv(self.faces),
            self.rel_error, self.errors, self.n_iter, self.n_iter_init, self.converged,
            self.rank, self.constraints, self.l1, self.n_passes,
        )


def relative_error(A, res, U1=None):
    """``||A - Ahat|| / ||A||`` for a fitted result, without a dense reconstruction.

    Shorthand for ``res.error_on(A, U1)``; with held-out subjects pass
    ``U1=res.transform(A)``.
    """
    return res.error_on(A, U1)


# --------------------------------------------------------------------------- fitting
def _from_result(bk, prev, shape, R1, R2, nonneg, rng):
    """Warm-start state from an earlier result; ranks may differ."""
    xp = bk.xp
    if hasattr(prev, "result_"):
        prev = prev.result_
    n, c, v = shape
    U1p, U2p, U3p = (bk.asarray(f) for f in prev.factors)
    if U2p.shape[0] != c or U3p.shape[0] != v:
        raise ValueError(
            f"init result has factors for (n, {U2p.shape[0]}, {U3p.shape[0]}); "
            f"A has shape {shape}"
        )
    W = U2p @ bk.asarray(prev.faces).T
    nw = xp.linalg.vector_norm(W, axis=0)
    g = bk.to_numpy(nw * xp.linalg.vector_norm(U3p, axis=0))
    order = np.argsort(-g, kind="stable")[:R1]
    keep = order[g[order] > 0] if np.any(g[order] > 0) else order
    W = bk.take(W / xp.clip(nw, min=TINY)[None, :], keep)
    U3 = bk.take(U3p * nw[None, :], keep)
    U1 = bk.take(U1p, keep) if U1p.shape[0] == n else None
    n_new = R1 - len(keep)
    if n_new > 0:
        # New components start small and random; HALS grows them where the residual is.
        small = 0.1 * float(np.median(g[keep])) if len(keep) else 1.0
        W = _solver._pad_random(bk, W, R1, rng)
        U3 = _cat(bk, U3, bk.asarray(_unit(rng.random((v, n_new))) * small))
        if U1 is not None:
            U1 = _solver._pad_random(bk, U1, R1, rng)
    if nonneg:  # e.g. from a 'paper' fit: start from the nearest feasible point
        W = xp.clip(W, min=0)
        U1 = xp.clip(U1, min=0) if U1 is not None else None
        U2p = xp.clip(U2p, min=0)
    st = _solver.State(U1, W, U3)
    if R2 < R1:
        D_prev = bk.to_numpy(prev.faces)
        energy = np.linalg.norm(D_prev, axis=0)
        cols = np.argsort(-energy, kind="stable")
        cols = cols[energy[cols] > 0]
        hint = bk.take(U2p, cols[:R2]) if len(cols) else None
        st = _solver.reduce_mode2(bk, st, R2, nonneg, hint=hint)
    return st


def _unit(x):
    return x / np.linalg.norm(x, axis=0, keepdims=True)


def _cat(bk, a, b):
    return bk.xp.concat([a, b], axis=1)


def _finalise(bk, st, shape, R1, R2, reduced):
    """Unit-norm factors sorted by component size, scale into the core faces."""
    xp = bk.xp
    c = shape[1]
    n1 = xp.linalg.vector_norm(st.U1, axis=0)
    n3 = xp.linalg.vector_norm(st.U3, axis=0)
    U1 = st.U1 / xp.clip(n1, min=TINY)[None, :]
    U3 = st.U3 / xp.clip(n3, min=TINY)[None, :]
    if reduced:
        n2 = xp.linalg.vector_norm(st.U2, axis=0)
        U2 = st.U2 / xp.clip(n2, min=TINY)[None, :]
        D = st.D * (n1 * n3)[:, None] * n2[None, :]
    else:
        nw = xp.linalg.vector_norm(st.W, axis=0)
        U2 = st.W / xp.clip(nw, min=TINY)[None, :]
        D = bk.diag_matrix(n1 * nw * n3)
    size = bk.to_numpy(xp.linalg.vector_norm(U2 @ D.T, axis=0))
    order = np.argsort(-size, kind="stable")
    U1, U3, D = bk.take(U1, order), bk.take(U3, order), bk.take(D, order, axis=0)
    if reduced:
        jorder = np.argsort(-bk.to_numpy(xp.linalg.vector_norm(D, axis=0)), kind="stable")
        U2, D = bk.take(U2, jorder), bk.take(D, jorder)
    else:
        U2 = bk.take(U2, order)
        D = bk.take(D, order)
        if R2 > R1:
            U2 = _cat(bk, U2, bk.zeros((c, R2 - R1)))
            D = _cat(bk, D, bk.zeros((R1, R2 - R1)))
    core = D[:, :, None] * bk.eye(R1)[:, None, :]
    return core, [U1, U2, U3], D


@_fill_doc
def fit_constrained_tucker(A, rank, *, constraints="nonneg", l1=0.0, n_iter_max=500,
                           tol=1e-6, init="svd", random_state=0, verbose=False,
                           callback=None):
    """Fit ``A ~ G x1 U1 x2 U2 x3 U3`` with diagonal core faces (paper eq. 2).

    The core ``G`` has shape ``(R1, R2, R1)``, is zero for ``i != k`` and
    non-negative on its faces ``G[i, :, i]``; ``U3 >= 0`` with an optional l1
    penalty. Solved as a rank-``R1`` CP model whose channel factor ``W = U2 D.T``
    has rank ``<= R2``: CP-style HALS on MTTKRPs (two passes over ``A`` per
    iteration), l1 by shrinkage, errors from Gram identities. For ``R2 >= R1`` the
    rank constraint is inactive (``U2 = W`` padded with zero columns, ``D``
    diagonal); for ``R2 < R1`` ``U2`` and ``D`` are updated by alternating
    (non-negative) least squares, starting from the rank-``R1`` CP fit.

    Parameters
    ----------
    A : numpy.ndarray, torch.Tensor, ChunkedTensor or dask.array, shape (n, c, v)
        Subjects x channels x voxels, float32 or float64, finite; non-negative for
        ``constraints='nonneg'``. Torch tensors stay on their device (CPU or CUDA);
        no dense temporaries of ``A``'s size are made (``A`` should be C-contiguous,
        else it is copied once). A :class:`~brainage_xai.decomposition.chunked.ChunkedTensor`
        (or a dask array, or the path of a chunked store) is streamed: every pass reads
        one subject chunk at a time, so memory is a chunk plus the factors.
    %(params)s

    Returns
    -------
    ConstrainedTuckerResult
        ``core``, ``factors``, ``rel_error``, ``errors``, ``n_iter``, ``transform``.

    Raises
    ------
    ValueError
        Wrong number of dimensions, NaN/Inf, negative entries with ``'nonneg'``,
        ranks larger than the tensor, unknown constraints or init.
    """
    A = _as_array(A, "A")
    _check_params(constraints, l1, n_iter_max, tol)
    shape = tuple(int(s) for s in A.shape)
    R1, R2 = _check_rank(rank, shape)
    nonneg = constraints == "nonneg"
    chunked = isinstance(A, ChunkedTensor)
    if not chunked:
        A = A.contiguous() if is_torch_array(A) else np.ascontiguousarray(A)
    bk = Backend(np.empty(0, A.dtype) if chunked else A)
    passes = Passes(bk, A, shape)
    rng = np.random.default_rng(random_state)
    sketch = isinstance(init, str) and init == "sketch"

    def check(stats=None):
        if chunked:
            normA2 = check_stats(stats, "A", nonneg)
        else:
            passes.count += 1
            normA2 = _check_finite_and_sign(bk, A, "A", nonneg)
        if normA2 == 0:
            raise ValueError("A is all zeros: there is nothing to decompose")
        return normA2

    if sketch and chunked:  # the start's first pass checks the input too
        st, normA2 = _solver.sketch_init(bk, passes, shape, R1, rng, check=check)
    else:
        normA2 = check(passes.stats() if chunked else None)
        if sketch:
            st, _ = _solver.sketch_init(bk, passes, shape, R1, rng)
    reduced = R2 < R1
    lam = float(l1)

    def log(it, F):
        rel = math.sqrt(max(2.0 * F, 0.0) / normA2)
        if verbose:
            logger.info("iteration %d: relative objective %.6g", it, rel)
        return bool(callback(it, rel)) if callback is not None else False

    common = dict(nonneg=nonneg, lam=lam, normA2=normA2, n_iter_max=n_iter_max, tol=tol, log=log)

    n_iter_init = 0
    if isinstance(init, str):
        if init == "svd":
            st = _solver.svd_init(bk, passes, None, shape, R1, True, rng)
        elif init == "random":
            st = _solver.random_init(bk, shape, R1, rng)
        elif not sketch:
            raise ValueError(
                "'init' must be one of ['svd', 'sketch', 'random'] or a previous result. "
                f"{init!r} was provided."
            )
        # A fresh start first fits the plain non-negative rank-R1 CP model when the
        # target is harder: with free signs from the start components die (U3 >= 0
        # clips them) or flip into directions D >= 0 cannot follow; the l1 penalty
        # kills components that start small; PARALIND-like models (R2 < R1) have
        # poor local minima from cold starts. The warm-up's solution is feasible for
        # the 'paper' constraints, so 'paper' does not fit worse than 'nonneg'.
        if reduced or not nonneg or lam > 0:
            warm = dict(common, nonneg=True, lam=0.0)
            st, objs0, _, _, it0 = _solver.run(bk, passes, shape, st, reduced=False, **warm)
            n_iter_init += it0
        if reduced:
            st = _solver.reduce_mode2(bk, st, R2, True)
    elif isinstance(init, ConstrainedTuckerResult) or isinstance(
        getattr(init, "result_", None), ConstrainedTuckerResult
    ):
        st = _from_result(bk, init, shape, R1, R2, nonneg, rng)
    else:
        raise ValueError(
            "'init' must be 'svd', 'random', a ConstrainedTuckerResult or a fitted "
            f"ConstrainedTucker; got {type(init).__name__}"
        )

    st, objs, data, converged, n_it = _solver.run(bk, passes, shape, st, reduced=reduced, **common)
    core, factors, faces = _finalise(bk, st, shape, R1, R2, reduced)
    rel = math.sqrt(max(data, 0.0) / normA2)
    errors = [math.sqrt(max(2.0 * F, 0.0) / normA2) for F in objs]
    return ConstrainedTuckerResult(core, factors, faces, rel, errors, n_it, n_iter_init,
                                   converged, (R1, R2), constraints, lam,
                                   n_passes=passes.count)
