"""Jacobians of a chain's layers and of their products.

The gradient that reaches layer ``l`` is the upstream gradient times a product of
Jacobians ``J_l = dh_l / dh_{l-1}``. For an :class:`~gradchain.MLP`,
``J_l = diag(phi'(z_l)) W_l`` with ``z_l = W_l h_{l-1} + b_l``, one matrix per example;
for an :class:`~gradchain.RNN`, ``J_t = ds_t / ds_{t-1}`` per time step and sequence.
:func:`jacobian_norms` reports how each ``J_l`` stretches (Frobenius and spectral norms);
:func:`jacobian_spectrum` how the directions of the cumulative product ``J_l ... J_1``
spread with depth, by QR re-orthonormalisation (Benettin et al. 1980): finite-depth
estimates of the log singular values and of the Lyapunov exponents.

Everything is computed in float64 (for a float32 chain, with its float32 weights and the
input rounded to float32 first), one example at a time, by the compiled core.

References
----------
.. [1] G. Benettin, L. Galgani, A. Giorgilli, J.-M. Strelcyn, "Lyapunov characteristic
   exponents for smooth dynamical systems and for Hamiltonian systems; a method for
   computing all of them", Meccanica 15, 9-20 and 21-30 (1980).
.. [2] K. Geist, U. Parlitz, W. Lauterborn, "Comparison of different methods for computing
   Lyapunov exponents", Prog. Theor. Phys. 83, 875-893 (1990).
.. [3] J. Pennington, S. S. Schoenholz, S. Ganguli, "Resurrecting the sigmoid in deep
   learning through dynamical isometry: theory and practice", NeurIPS 2017.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from . import _core
from . import _validate as v
from .chain import Chain
from .mlp import MLP
from .report import _jsonable, _pow10
from .rnn import RNN

__all__ = ["STARTS", "JacobianNorms", "JacobianSpectrum", "jacobian_norms", "jacobian_spectrum"]

STARTS: tuple[str, ...] = ("identity", "random")


# --------------------------------------------------------------------------- arguments


def _chain_and_x(net: Any, x: Any) -> tuple[Any, np.ndarray, bool, bool]:
    """The core chain, x in float64, the mode (train) and whether steps are MLP layers."""
    if isinstance(net, MLP):
        core, layers = net._jacobian_chain()
        train = net.training
    elif isinstance(net, Chain):
        core, layers, train = net._core, False, net.training
    else:
        raise TypeError(f"net must be a gradchain.MLP, Chain or RNN; got {type(net).__name__}")
    n0 = net.widths[0]
    arr = v.as_array("x", x)
    arr = arr if isinstance(arr, np.ndarray) else np.asarray(arr)
    if arr.ndim == 1:
        arr = arr[None, :]
    elif arr.ndim != 2:
        raise ValueError(f"x must have shape (batch, {n0}) or ({n0},); got {arr.shape}")
    if arr.shape[1] != n0:
        raise ValueError(f"x must have shape (batch, {n0}) or ({n0},); got {np.shape(x)}")
    # Rounded to the chain's dtype first, as backward does; float64 for the core.
    x64 = v.float_array("x", arr, net.dtype, (None, n0)).astype(np.float64, copy=False)
    return core, np.ascontiguousarray(x64), bool(train), layers


def _sequences(net: RNN, x: Any, h0: Any, c0: Any) -> tuple[Any, ...]:
    """The core's arguments for a recurrent chain: x (steps, batch, input_size) and the
    initial states, rounded to the chain's dtype as RNN.backward does, then float64."""
    xs = net._x(x)
    batch = xs.shape[1]
    h = net._state("h0", h0, batch)
    c = net._state("c0", c0, batch)

    def f64(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else np.ascontiguousarray(a, dtype=np.float64)

    return net._chain, f64(xs), f64(h), f64(c)


def _no_states(h0: Any, c0: Any) -> None:
    for name, value in (("h0", h0), ("c0", c0)):
        if value is not None:
            raise ValueError(f"{name} is the initial state of a gradchain.RNN; an MLP has none")


def _state_dim(net: RNN) -> int:
    return net.num_layers * net.hidden_size * (2 if net.cell == "lstm" else 1)


def _mean_std(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation over the batch (axis 0); -inf entries (zero norms) give
    a mean of -inf and a NaN spread."""
    with np.errstate(invalid="ignore"):
        return a.mean(axis=0), a.std(axis=0)


def _rows(n: int, every: int | None) -> list[int]:
    step = every or max(1, n // 20)
    return sorted(set(range(0, n, step)) | {n - 1})


# --------------------------------------------------------------------------- norms


@dataclass(frozen=True, eq=False)
class JacobianNorms:
    """Frobenius and spectral norms of every layer's Jacobian ``J_l``, per example.

    Norms are given as log10 values (``-inf``: ``J_l = 0``); the float properties are 0
    or inf outside the float range.

    Attributes
    ----------
    log10_frobenius : ndarray, shape (batch, depth)
        ``log10 ||J_l||_F`` for layers l = 1..depth (column ``l - 1``). Computed from the
        row norms of ``W_l``: ``||J_l||_F**2 = sum_i phi'(z_i)**2 ||W_l[i, :]||**2``.
    log10_spectral : ndarray or None, shape (batch, depth)
        ``log10 ||J_l||_2`` (the largest singular value); None with ``spectral=False``.
        Exact (LAPACK SVD of the dense ``J_l``) for layers whose larger dimension is at
        most ``exact_max_dim``; otherwise, or where the SVD does not converge, power
        iteration on ``J_l^T J_l``.
    spectral_iterations : ndarray of int32 or None, shape (batch, depth)
        Power iterations used (0 where the exact SVD was used).
    spectral_converged : ndarray of bool or None, shape (batch, depth)
        Whether power iteration met its tolerance (True for exact layers).
    tol, max_iter, exact_max_dim
        The power-iteration settings. Iteration stops when the estimate
        ``||J^T J v|| / ||J v||`` (a lower bound on ``||J||_2`` that rises with every
        iteration) moves by less than ``tol`` relative; with a small gap between the two
        largest singular values the remaining error can exceed ``tol``.
    """

    log10_frobenius: np.ndarray
    log10_spectral: np.ndarray | None
    spectral_iterations: np.ndarray | None = field(repr=False)
    spectral_converged: np.ndarray | None = field(repr=False)
    tol: float
    max_iter: int
    exact_max_dim: int

    @property
    def batch(self) -> int:
        """Number of examples."""
        return int(self.log10_frobenius.shape[0])

    @property
    def depth(self) -> int:
        """Number of layers."""
        return int(self.log10_frobenius.shape[1])

    @property
    def frobenius(self) -> np.ndarray:
        """``||J_l||_F`` as floats, shape (batch, depth)."""
        return _pow10(self.log10_frobenius)

    @property
    def spectral(self) -> np.ndarray | None:
        """``||J_l||_2`` as floats, shape (batch, depth); None without spectral norms."""
        return None if self.log10_spectral is None else _pow10(self.log10_spectral)

    @property
    def log10_frobenius_mean(self) -> np.ndarray:
        """Mean of ``log10 ||J_l||_F`` over the batch, shape (depth,)."""
        return _mean_std(self.log10_frobenius)[0]

    @property
    def log10_frobenius_std(self) -> np.ndarray:
        """Standard deviation of ``log10 ||J_l||_F`` over the batch, shape (depth,)."""
        return _mean_std(self.log10_frobenius)[1]

    @property
    def log10_spectral_mean(self) -> np.ndarray | None:
        """Mean of ``log10 ||J_l||_2`` over the batch, shape (depth,)."""
        return None if self.log10_spectral is None else _mean_std(self.log10_spectral)[0]

    @property
    def log10_spectral_std(self) -> np.ndarray | None:
        """Standard deviation of ``log10 ||J_l||_2`` over the batch, shape (depth,)."""
        return None if self.log10_spectral is None else _mean_std(self.log10_spectral)[1]

    @property
    def all_converged(self) -> bool:
        """True when every spectral norm is exact or met the tolerance."""
        return self.spectral_converged is None or bool(self.spectral_converged.all())

    def to_dict(self) -> dict[str, Any]:
        """A dictionary of plain Python values that ``json.dumps`` accepts.

        Non-finite floats become ``"inf"``/``"-inf"`` (NaN becomes None).
        """
        out = {f.name: _jsonable(getattr(self, f.name)) for f in fields(self)}
        for name in (
            "log10_frobenius_mean",
            "log10_frobenius_std",
            "log10_spectral_mean",
            "log10_spectral_std",
        ):
            out[name] = _jsonable(getattr(self, name))
        return out

    def table(self, every: int | None = None) -> str:
        """A per-layer text table of batch means and spreads (every `every`-th layer)."""
        head = f"{'layer':>7}  {'log10|J|_F mean':>15}  {'std':>8}"
        if self.log10_spectral is not None:
            head += f"  {'log10|J|_2 mean':>15}  {'std':>8}"
        rows = [head]
        fm, fs = _mean_std(self.log10_frobenius)
        spec = None if self.log10_spectral is None else _mean_std(self.log10_spectral)
        for i in _rows(self.depth, every):
            row = f"{i + 1:>7}  {fm[i]:>15.4f}  {fs[i]:>8.4f}"
            if spec is not None:
                row += f"  {spec[0][i]:>15.4f}  {spec[1][i]:>8.4f}"
            rows.append(row)
        return "\n".join(rows)

    def __str__(self) -> str:
        return f"JacobianNorms(batch={self.batch}, depth={self.depth})\n{self.table()}"


def jacobian_norms(
    net: MLP | RNN,
    x: Any,
    *,
    h0: Any = None,
    c0: Any = None,
    spectral: bool = True,
    tol: float = 1e-10,
    max_iter: int = 1000,
    exact_max_dim: int = 256,
) -> JacobianNorms:
    """Frobenius and spectral norms of every layer's (or time step's) Jacobian at every
    example.

    Parameters
    ----------
    net : MLP or RNN
        The chain. For an :class:`~gradchain.RNN` the steps are time steps and
        ``J_t = ds_t / ds_{t-1}``, where the state ``s_t`` stacks every layer's ``h_t``,
        each followed by the LSTM's ``c_t``: ``[h^0_t, c^0_t, h^1_t, c^1_t, ...]``, so
        ``J_t`` is ``num_layers * hidden_size`` wide (twice that for the LSTM). Layer
        ``l > 0`` reads ``h^{l-1}_t`` of the same step, so its rows include the chain rule
        through the layers below. The read-out plays no part.
    x : array_like
        Inputs (finite). MLP: shape (batch, widths[0]) or (widths[0],), a single example
        being a batch of one. RNN: shape (steps, batch, input_size), as for
        :meth:`RNN.backward`.
    h0, c0 : array_like, optional
        RNN only: initial states, shape (num_layers, batch, hidden_size); zeros by default.
    spectral : bool
        Also compute spectral norms (the Frobenius norm costs O(width) per layer and
        example; the spectral norm O(width**3) exactly or O(width**2) per power iteration).
    tol : float
        Relative tolerance of power iteration (> 0).
    max_iter : int
        Most power iterations per layer and example (>= 1).
    exact_max_dim : int
        Layers with ``max(in, out) <= exact_max_dim`` get the exact spectral norm from an
        SVD; larger ones power iteration (>= 0; 0 forces power iteration everywhere).

    Returns
    -------
    JacobianNorms

    Raises
    ------
    TypeError, ValueError
        Bad arguments, shapes or non-finite inputs.
    NonFiniteError
        When the forward pass (in float64) overflows or produces NaN, or an entry of a
        Jacobian (``phi'(z)`` times a weight) overflows.

    Examples
    --------
    >>> import numpy as np, gradchain as gc
    >>> net = gc.MLP(depth=20, width=16, activation="tanh", seed=0)
    >>> r = gc.jacobian_norms(net, np.ones((4, 16)))
    >>> r.log10_spectral.shape
    (4, 20)
    """
    spec = v.flag("spectral", spectral)
    t = v.finite_float("tol", tol)
    if t <= 0:
        raise ValueError(f"tol must be a positive finite number; got {t}")
    mi = v.int_in("max_iter", max_iter, 1, v.INT32_MAX, "a positive integer")
    emd = v.int_in("exact_max_dim", exact_max_dim, 0, v.INT32_MAX, "a non-negative integer")
    if isinstance(net, RNN):
        chain, xs, h, c = _sequences(net, x, h0, c0)
        d = _core.jacobian_norms(chain, xs, h, c, spec, t, mi, emd)
    else:
        _no_states(h0, c0)
        chain, x64, train, layers = _chain_and_x(net, x)
        d = _core.jacobian_norms(chain, x64, train, layers, spec, t, mi, emd)
    lf = d["log10_frobenius"]
    ls: np.ndarray | None = d["log10_spectral"] if spec else None
    its: np.ndarray | None = d["iterations"] if spec else None
    conv: np.ndarray | None = d["converged"] if spec else None
    v.readonly(lf, ls, its, conv)
    return JacobianNorms(
        log10_frobenius=lf,
        log10_spectral=ls,
        spectral_iterations=its,
        spectral_converged=conv,
        tol=t,
        max_iter=mi,
        exact_max_dim=emd,
    )


# --------------------------------------------------------------------------- spectrum


@dataclass(frozen=True, eq=False)
class JacobianSpectrum:
    r"""The QR spectrum of the cumulative Jacobian products ``M_l = J_l ... J_1``.

    With the start frame ``Q_0`` (n_0 x k, orthonormal: the first k columns of the
    identity, or a seeded random frame), the core keeps ``M_l Q_0 = Q_l R^{(l)}`` by one
    Householder QR per re-orthonormalisation and accumulates ``log|R_ii|``; no product is
    ever formed, so nothing overflows at any depth.

    **What the values are, exactly**: ``log_singular_values[b, t, i]`` is
    ``log|R^{(l)}_ii|`` (natural log) of the thin QR factorisation of ``M_l Q_0`` at depth
    ``l = depths[t]``, for example ``b``. Exact consequences (up to rounding):

    * ``sum_{i<j} log|R_ii|`` is the log of the j-dimensional volume that ``M_l`` gives the
      first j start directions: for ``k = n`` and square layers, ``log|det M_l|``
      (:attr:`log_volume`); for ``j = 1``, ``log ||M_l q_1||``, the growth of one vector.
    * Orthogonal ``J_l`` give zeros; constant upper-triangular ``J_l = U`` with identity
      start give ``l log|U_ii|``.

    **Where they are -inf**: once a layer up to ``l`` leaves only r rows of its vectors
    nonzero (units with ``phi'(z) = 0``, zero weight rows), directions ``r + 1..k`` are
    ``-inf``, and so is a direction whose vector is exactly zero. A rank deficiency that
    only exact arithmetic would show (a low-rank weight without zero rows) gives a finite
    value about 36 (``ln(1/eps)``) below ``log ||M_l||``.

    They are *not* the log singular values of ``M_l`` at finite depth: they converge to
    them (and ``/ l`` to the Lyapunov exponents) as depth grows, with an O(1) offset that
    depends on the start frame (Benettin et al. 1980; Geist, Parlitz & Lauterborn 1990).
    They come in QR order (the i-th direction after the first i - 1), which is descending
    once converged but not sorted here.

    Attributes
    ----------
    depths : ndarray of int32, shape (n_depths,)
        Layers after which a QR factorisation happened: ``interval, 2 interval, ...`` and
        the last layer.
    log_singular_values : ndarray, shape (batch, n_depths, k)
        The cumulative sums of ``log|R_ii|`` described above.
    k, interval, start, seed
        The settings.
    """

    depths: np.ndarray
    log_singular_values: np.ndarray = field(repr=False)
    k: int
    interval: int
    start: str
    seed: int

    @property
    def batch(self) -> int:
        """Number of examples."""
        return int(self.log_singular_values.shape[0])

    @property
    def depth(self) -> int:
        """The chain's depth (the last entry of :attr:`depths`)."""
        return int(self.depths[-1])

    @property
    def log10_singular_values(self) -> np.ndarray:
        """:attr:`log_singular_values` in log10, shape (batch, n_depths, k)."""
        return self.log_singular_values / math.log(10.0)

    @property
    def convergence(self) -> np.ndarray:
        """Running exponent estimates ``log|R_ii| / l`` at every depth l in :attr:`depths`,
        shape (batch, n_depths, k): their settling shows how far the exponents have
        converged."""
        return self.log_singular_values / self.depths[None, :, None]

    @property
    def lyapunov_exponents(self) -> np.ndarray:
        """Finite-depth Lyapunov exponents (natural log per layer) at the last depth,
        shape (batch, k), in QR order."""
        return self.log_singular_values[:, -1, :] / self.depth

    @property
    def lyapunov_exponents_mean(self) -> np.ndarray:
        """:attr:`lyapunov_exponents` averaged over the batch, shape (k,)."""
        return _mean_std(self.lyapunov_exponents)[0]

    @property
    def log_volume(self) -> np.ndarray:
        """``sum_i log|R_ii|`` at every depth, shape (batch, n_depths): the log of the
        k-dimensional volume growth (``log|det M_l|`` for k = n and square layers)."""
        with np.errstate(invalid="ignore"):
            return self.log_singular_values.sum(axis=-1)

    def exponents_at(self, depth: int) -> np.ndarray:
        """Exponent estimates ``log|R_ii| / depth`` at one of :attr:`depths`, shape (batch, k)."""
        d = v.int_in("depth", depth, 1, None, "one of the depths where a QR happened")
        hits = np.flatnonzero(self.depths == d)
        if hits.size == 0:
            shown = ", ".join(str(int(x)) for x in self.depths[:8]) + (
                ", ..." if self.depths.size > 8 else ""
            )
            raise ValueError(
                f"depth must be one of the depths where a QR happened ({shown}; "
                f"every interval={self.interval} layers and the last); got {d}"
            )
        return self.log_singular_values[:, int(hits[0]), :] / d

    def to_dict(self, *, values: bool = True) -> dict[str, Any]:
        """A dictionary of plain Python values that ``json.dumps`` accepts.

        Non-finite floats become ``"inf"``/``"-inf"`` (NaN becomes None); the full
        ``log_singular_values`` array is left out with ``values=False``.
        """
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "log_singular_values" and not values:
                continue
            out[f.name] = _jsonable(getattr(self, f.name))
        out["lyapunov_exponents"] = _jsonable(self.lyapunov_exponents)
        return out

    def table(self, every: int | None = None) -> str:
        """Batch means of the first and last direction's ``log|R_ii|`` and ``/ depth``."""
        k = self.k
        head = (
            f"{'depth':>7}  {'log|R_11|':>12}  {f'log|R_{k}{k}|':>12}  "
            f"{'per layer 1':>12}  {f'per layer {k}':>12}"
        )
        rows = [head]
        with np.errstate(invalid="ignore"):
            mean = self.log_singular_values.mean(axis=0)
        for t in _rows(len(self.depths), every):
            d = int(self.depths[t])
            rows.append(
                f"{d:>7}  {mean[t, 0]:>12.5g}  {mean[t, -1]:>12.5g}  "
                f"{mean[t, 0] / d:>12.5g}  {mean[t, -1] / d:>12.5g}"
            )
        return "\n".join(rows)

    def __str__(self) -> str:
        return (
            f"JacobianSpectrum(batch={self.batch}, depth={self.depth}, k={self.k}, "
            f"interval={self.interval}, start={self.start!r})\n{self.table()}"
        )


def jacobian_spectrum(
    net: MLP | Chain | RNN,
    x: Any,
    *,
    h0: Any = None,
    c0: Any = None,
    k: int | None = None,
    interval: int = 1,
    start: str = "identity",
    seed: int = 0,
) -> JacobianSpectrum:
    """QR spectrum of the cumulative Jacobian products ``J_l ... J_1`` at every depth.

    See :class:`JacobianSpectrum` for exactly what is returned. The cost is
    O(n**2 k) per layer and example (n the width): the reflectors of each QR are applied
    to the next layer's weight rows (4 n**2 k flops) and the n x k product is factored
    (2 n k**2), with no orthonormal matrix ever formed. Examples of a batch run on
    separate threads; a single example's layers are shared by two threads when each
    layer has about a million flops or more.

    Parameters
    ----------
    net : MLP or RNN
        The chain. For an :class:`~gradchain.RNN` the depths are time steps and the
        product is ``ds_t / ds_0 = J_t ... J_1``, with the stacked state ``s_t`` described
        in :func:`jacobian_norms`; the exponents are then per time step.
    x : array_like
        Inputs (finite). MLP: shape (batch, widths[0]) or (widths[0],). RNN: shape
        (steps, batch, input_size).
    h0, c0 : array_like, optional
        RNN only: initial states, shape (num_layers, batch, hidden_size); zeros by default.
    k : int, optional
        Number of directions, 1..min(widths) (for an RNN 1..the state size); default all
        of them.
    interval : int
        Re-orthonormalise every `interval` layers (and after the last). Between
        factorisations the k vectors are multiplied on (each rescaled by a power of two, so
        nothing overflows); a longer interval is cheaper, but the directions then lose
        accuracy as they align with the top one (keep ``interval * (lambda_1 - lambda_k)``
        well below ``36``, the log of 1/eps).
    start : {"identity", "random"}
        Start frame: the first k columns of the identity, or the Q factor of a Gaussian
        ``(widths[0], k)`` matrix drawn from `seed` (the same for every example).
    seed : int
        Seed of the random start.

    Returns
    -------
    JacobianSpectrum

    Raises
    ------
    TypeError, ValueError
        Bad arguments (k outside 1..min(widths), interval < 1, unknown start), shapes or
        non-finite inputs.
    NonFiniteError
        When the forward pass overflows or produces NaN, or the product between two
        factorisations does.

    Examples
    --------
    >>> import numpy as np, gradchain as gc
    >>> net = gc.MLP(depth=100, width=8, activation="linear", init="orthogonal", seed=0)
    >>> s = gc.jacobian_spectrum(net, np.ones(8))
    >>> bool(np.abs(s.log_singular_values).max() < 1e-12)
    True
    """
    if isinstance(net, RNN):
        kmax = _state_dim(net)
        accepted = f"None or an integer between 1 and the state size, {kmax}"
    elif isinstance(net, (MLP, Chain)):
        core, _, train, layers = _chain_and_x(net, np.zeros((1, net.widths[0])))
        xa = np.asarray(v.as_array("x", x))  # a ragged list: the TypeError names x
        batch = xa.shape[0] if xa.ndim == 2 else 1
        kmax = min(_core.jacobian_dims(core, batch, train, layers))
        what = "width" if layers else "state size"
        accepted = f"None or an integer between 1 and the smallest {what}, {kmax}"
    else:
        raise TypeError(f"net must be a gradchain.MLP, Chain or RNN; got {type(net).__name__}")
    kk = kmax if k is None else v.int_in("k", k, 1, kmax, accepted)
    iv = v.int_in("interval", interval, 1, v.INT32_MAX, "a positive integer")
    st = v.choice("start", start, STARTS)
    sd = v.seed(seed)
    if isinstance(net, RNN):
        chain, xs, h, c = _sequences(net, x, h0, c0)
        depths, S = _core.jacobian_spectrum(chain, xs, h, c, kk, iv, st, sd)
    else:
        _no_states(h0, c0)
        chain, x64, train, layers = _chain_and_x(net, x)
        depths, S = _core.jacobian_spectrum(chain, x64, train, layers, kk, iv, st, sd)
    v.readonly(depths, S)
    return JacobianSpectrum(
        depths=depths, log_singular_values=S, k=kk, interval=iv, start=st, seed=sd
    )
