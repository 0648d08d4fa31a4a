"""Result objects returned by the chains, and the vocabulary they share.

Every report of a backward pass (:class:`ChainReport` from :class:`~gradchain.Chain`,
:class:`BackwardReport` from :class:`~gradchain.MLP`, :class:`RecurrentReport` from
:class:`~gradchain.RNN`) uses the same names for the same quantities:

* ``param_names``: the parameters, in ``named_parameters()`` order, under torch's names;
* ``log10_param_grad_norms`` / ``param_grad_norms``: ``{name: ||dL/dp||}`` (Frobenius
  norm), exact in log10 and as floats; ``log10_clipped_param_grad_norms`` /
  ``clipped_param_grad_norms`` after clipping; ``param_grads`` the arrays
  (``return_grads=True``);
* ``activation_names`` / ``log10_activation_grad_norms`` / ``activation_grad_norms``: the
  gradient ``||dL/dh||`` of the values passed between layers, at the named boundaries
  (chains); ``state_grad_norms`` the same for the states of a recurrent chain, by step;
* ``loss``, ``log10_loss``, ``norm_type``, ``total_norm``, ``max_norm``, ``clip_coef``,
  ``clipped_total_norm`` (and ``log10_`` forms);
* ``table()``, ``to_dict()`` (accepted by ``json.dumps``), a one-line ``repr`` and a short
  ``_repr_html_`` for notebooks.

Every ``log10_`` value is exact where the float is 0 or inf (``-inf``: exactly zero). The
arrays a report holds are read-only (the report is immutable; ``np.array(a)`` copies);
the float forms are computed on access and are new arrays.
"""

from __future__ import annotations

import html
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, fields
from functools import cached_property
from typing import Any, ClassVar

import numpy as np

__all__ = ["BackwardReport", "ChainReport", "RecurrentReport"]


def _pow10(a: Any) -> Any:
    with np.errstate(over="ignore", under="ignore"):
        return np.power(10.0, a)


def _float(log10: float) -> float:
    return float(_pow10(np.float64(log10)))


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return [_jsonable(x) for x in v.tolist()] if v.ndim else _jsonable(v.item())
    if isinstance(v, (list, tuple)) or (isinstance(v, Sequence) and not isinstance(v, str)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, (np.floating, np.integer, np.bool_)):
        return _jsonable(v.item())
    return v


def _fmt(x: float) -> str:
    return f"{x:.6g}"


def _deprecated(old: str, new: str) -> None:
    warnings.warn(
        f"{old} is deprecated and will be removed; use {new} (the same values)",
        DeprecationWarning,
        stacklevel=3,
    )


class _Report:
    """What every report shares: parameter-norm dictionaries, the total norm and clipping,
    ``to_dict``, the one-line ``repr`` and the notebook table."""

    loss: float
    log10_loss: float
    param_names: Sequence[str]
    _log10_param: np.ndarray
    norm_type: float
    log10_total_norm: float
    max_norm: float | None
    log10_clip_coef: float
    _param_grads: list[np.ndarray] | None

    # Float forms and other derived values that to_dict() includes besides the fields.
    _DERIVED: ClassVar[tuple[str, ...]] = (
        "log10_param_grad_norms",
        "param_grad_norms",
        "total_norm",
        "clip_coef",
        "clipped_total_norm",
    )
    _GRADS: ClassVar[tuple[str, ...]] = ("param_grads",)

    # -- parameters -------------------------------------------------------------------
    @cached_property
    def log10_param_grad_norms(self) -> dict[str, float]:
        """``{name: log10 ||dL/dp||}`` for every parameter (before clipping)."""
        return dict(zip(self.param_names, self._log10_param.tolist()))

    @property
    def param_grad_norms(self) -> dict[str, float]:
        """``{name: ||dL/dp||}`` as floats (0 or inf outside the float range)."""
        return dict(zip(self.param_names, _pow10(self._log10_param).tolist()))

    @property
    def log10_clipped_param_grad_norms(self) -> dict[str, float]:
        """log10 of every parameter's gradient norm after clipping."""
        return dict(zip(self.param_names, (self._log10_param + self.log10_clip_coef).tolist()))

    @property
    def clipped_param_grad_norms(self) -> dict[str, float]:
        """Every parameter's gradient norm after clipping, as floats."""
        return dict(
            zip(self.param_names, _pow10(self._log10_param + self.log10_clip_coef).tolist())
        )

    @cached_property
    def param_grads(self) -> dict[str, np.ndarray] | None:
        """``{name: dL/dp}`` (after clipping) with ``return_grads=True``; else None."""
        g = self._param_grads
        return None if g is None else dict(zip(self.param_names, g))

    # -- total norm and clipping --------------------------------------------------------
    @property
    def total_norm(self) -> float:
        """Total norm of all parameter gradients before clipping, as a float."""
        return _float(self.log10_total_norm)

    @property
    def clip_coef(self) -> float:
        """The factor the gradients were multiplied by (1.0 without clipping)."""
        return _float(self.log10_clip_coef)

    @property
    def log10_clipped_total_norm(self) -> float:
        """log10 of the total norm after clipping."""
        return self.log10_total_norm + self.log10_clip_coef

    @property
    def clipped_total_norm(self) -> float:
        """Total norm after clipping, as a float."""
        return _float(self.log10_clipped_total_norm)

    # -- presentation -------------------------------------------------------------------
    def to_dict(self, *, grads: bool = False) -> dict[str, Any]:
        """A dictionary of plain Python values that ``json.dumps`` accepts.

        Non-finite floats become the strings ``"inf"``/``"-inf"`` (NaN becomes None).
        Full gradient arrays are included only with ``grads=True``.
        """
        out: dict[str, Any] = {}
        for f in fields(self):  # type: ignore[arg-type]
            if f.name.startswith("_") or (f.name.endswith("grads") and not grads):
                continue
            out[f.name] = _jsonable(getattr(self, f.name))
        for name in self._DERIVED:
            out[name] = _jsonable(getattr(self, name))
        if grads:
            for name in self._GRADS:
                out[name] = _jsonable(getattr(self, name))
        return out

    def _summary(self) -> list[tuple[str, str]]:
        """(name, value) pairs of the one-line repr and the notebook header."""
        items = [("loss", _fmt(self.loss)), ("log10_total_norm", _fmt(self.log10_total_norm))]
        if self.max_norm is not None:
            items.append(("clip_coef", _fmt(self.clip_coef)))
        return items

    def _html_table(self) -> tuple[list[str], list[list[str]]]:
        """Column names and rows of the notebook table."""
        return ["parameter", "log10 |dL/dp|"], [
            [n, _fmt(x)] for n, x in zip(self.param_names, self._log10_param.tolist())
        ]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={x}' for k, x in self._summary())})"

    def _repr_html_(self) -> str:
        cols, rows = self._html_table()
        if len(rows) > 16:  # a summary, not a dump: the first and last rows
            rows = [*rows[:8], ["..."] * len(cols), *rows[-7:]]
        esc = html.escape
        head = "".join(f"<th>{esc(c)}</th>" for c in cols)
        body = "".join(
            "<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in r) + "</tr>" for r in rows
        )
        summary = ", ".join(f"{esc(k)}={esc(x)}" for k, x in self._summary())
        return (
            f"<div><b>{esc(type(self).__name__)}</b> {summary}"
            f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"
        )


@dataclass(frozen=True, eq=False, repr=False)
class ChainReport(_Report):
    """Gradient norms of one backward pass through a :class:`~gradchain.Chain`.

    Every norm comes in two forms: the plain float (0 or inf where the true value is
    outside the float range) and its ``log10_`` twin, which stays finite and accurate at
    any depth; ``-inf`` in a log10 value means a gradient that is exactly zero.

    Attributes
    ----------
    loss, log10_loss : float
        The loss value (NaN when the upstream gradient was given directly).
    param_names : tuple of str
        Every parameter's name, as ``torch.nn.Module.named_parameters()`` gives it.
    log10_param_grad_norms, param_grad_norms : dict of str to float
        ``||dL/dp||`` (Frobenius) for every parameter, by name, before clipping.
    activation_names : tuple of str
        The boundaries between top-level blocks: ``"input"``, then the name of each
        top-level block whose output it is (``"0"``, ``"1"``, ... by default).
    log10_activation_grad_norms : ndarray, shape (len(activation_names),)
        log10 ``||dL/dh||`` over the whole batch at each boundary (and
        ``activation_grad_norms``).
    norm_type : float
        Order of the total norm (2, inf or p > 0).
    log10_total_norm : float
        log10 of the total norm over all parameter gradients, before clipping.
    max_norm : float or None
        The clipping threshold, when clipping was asked for.
    log10_clip_coef : float
        log10 of the factor the gradients were multiplied by (0 without clipping).
    output : ndarray, shape (batch, out_features)
        The chain's output at its true scale, ``output_mantissa * 2**output_log2_scale``
        rounded once to the chain's dtype: inf (or 0, or subnormal) exactly where the
        value lies beyond the float range, which only a pass that carries its scale to the
        output can reach (a plain float pass raises :class:`~gradchain.NonFiniteError`
        instead of overflowing).
    output_mantissa : ndarray, shape (batch, out_features)
        The output as the forward pass holds it, largest entry inside the float range:
        nothing of it is lost where ``output`` is inf or 0. The loss, ``dL/dh`` at the
        output and every log10 norm are computed from it.
    output_log2_scale : int
        The binary exponent carried to the output: 0 unless its largest entry lies beyond
        about 2**±204 (2**±25 in float32), where the mantissa is scaled back into that band.
    train : bool
        Whether the pass ran in train mode (BatchNorm with batch statistics).
    param_grads : dict of str to ndarray, or None
        Every parameter's gradient (after clipping), with ``return_grads=True``.
    activation_grads : list of ndarray, or None
        dL/dh at every boundary, shape (batch, width), with ``return_grads=True``.
    """

    loss: float
    log10_loss: float
    param_names: Sequence[str]
    _log10_param: np.ndarray
    activation_names: tuple[str, ...]
    log10_activation_grad_norms: np.ndarray
    norm_type: float
    log10_total_norm: float
    max_norm: float | None
    log10_clip_coef: float
    output: np.ndarray
    output_mantissa: np.ndarray
    output_log2_scale: int
    train: bool
    _param_grads: list[np.ndarray] | None
    activation_grads: list[np.ndarray] | None
    # The top-level block (1-based boundary index) each parameter belongs to.
    _param_block: np.ndarray

    _DERIVED: ClassVar[tuple[str, ...]] = (*_Report._DERIVED, "activation_grad_norms")

    @classmethod
    def _fields_from_core(
        cls,
        d: dict[str, Any],
        param_names: Sequence[str],
        param_block: np.ndarray,
        activation_names: tuple[str, ...],
        train: bool,
    ) -> dict[str, Any]:
        lp = d["log10_param_grad_norms"]
        lb = d["log10_boundary_grad_norms"]
        _readonly(lp, lb, d["output"], d["output_mantissa"])
        grads = d.get("param_grads")
        acts = d.get("boundary_grads")
        return {
            "loss": float(d["loss"]),
            "log10_loss": float(d["log10_loss"]),
            "param_names": param_names,
            "_log10_param": lp,
            "activation_names": activation_names,
            "log10_activation_grad_norms": lb,
            "norm_type": float(d["norm_type"]),
            "log10_total_norm": float(d["log10_total_norm"]),
            "max_norm": float(d["max_norm"]) if d["clipped"] else None,
            "log10_clip_coef": float(d["log10_clip_coef"]),
            "output": d["output"],
            "output_mantissa": d["output_mantissa"],
            "output_log2_scale": int(d["output_log2_scale"]),
            "train": bool(train),
            "_param_grads": grads,
            "activation_grads": acts,
            "_param_block": param_block,
        }

    @property
    def activation_grad_norms(self) -> np.ndarray:
        """``||dL/dh||`` at every boundary as floats (0 or inf outside the float range)."""
        return _pow10(self.log10_activation_grad_norms)

    def _block_log10_norms(self) -> np.ndarray:
        """log10 of the 2-norm over each top-level block's parameter gradients, per
        boundary (NaN for the input and for blocks without parameters)."""
        out = np.full(len(self.activation_names), np.nan)
        lp, blk = self._log10_param, self._param_block
        if lp.size == 0:
            return out
        # Parameters come block by block, so each block's are one run of equal indices.
        starts = np.flatnonzero(np.r_[True, blk[1:] != blk[:-1]])
        counts = np.diff(np.r_[starts, lp.size])
        top = np.maximum.reduceat(lp, starts)  # -inf: every gradient of the block is zero
        shift = np.repeat(np.where(np.isfinite(top), top, 0.0), counts)
        with np.errstate(divide="ignore"):
            s = np.add.reduceat(_pow10(2.0 * (lp - shift)), starts)
            out[blk[starts]] = np.where(np.isfinite(top), top + 0.5 * np.log10(s), top)
        return out

    def table(self, every: int | None = None) -> str:
        """A text table, one row per boundary (every `every`-th): its name, log10
        ``||dL/dh||`` there, and log10 of the norm over the parameter gradients of the block
        that produced it."""
        n = len(self.activation_names)
        step = every or max(1, n // 20)
        width = max(8, *(len(s) for s in self.activation_names))
        blocks = self._block_log10_norms()
        rows = [f"{'boundary':>{width}}  {'log10|dL/dh|':>13}  {'log10|dL/dθ|':>13}"]
        for i in sorted(set(range(0, n, step)) | {n - 1}):
            p = "" if math.isnan(blocks[i]) else f"{blocks[i]:.4f}"
            rows.append(
                f"{self.activation_names[i]:>{width}}  {self.log10_activation_grad_norms[i]:>13.4f}  {p:>13}"
            )
        return "\n".join(rows)

    def _summary(self) -> list[tuple[str, str]]:
        return [
            *super()._summary(),
            ("params", str(len(self.param_names))),
            ("boundaries", str(len(self.activation_names))),
            ("train", str(self.train)),
        ]

    def _html_table(self) -> tuple[list[str], list[list[str]]]:
        blocks = self._block_log10_norms()
        rows = [
            [name, _fmt(a), "" if math.isnan(p) else _fmt(p)]
            for name, a, p in zip(
                self.activation_names, self.log10_activation_grad_norms.tolist(), blocks.tolist()
            )
        ]
        return ["boundary", "log10 |dL/dh|", "log10 |dL/dθ| of its block"], rows

    def __str__(self) -> str:
        return f"{self!r}\n{self.table()}"


@dataclass(frozen=True, eq=False, repr=False)
class BackwardReport(ChainReport):
    """Per-layer gradient norms of one backward pass through an :class:`~gradchain.MLP`.

    A :class:`ChainReport` of the MLP's chain (``param_grad_norms`` by name, ...), whose
    boundaries are the layer outputs: ``activation_names`` are ``"input"`` and the names
    of the blocks that end each layer, so ``activation_grad_norms[l]`` is ``||dL/dh_l||``,
    l = 0 (the input) .. depth. Besides, per layer:

    Attributes
    ----------
    log10_weight_grad_norms : ndarray, shape (depth,)
        log10 of the Frobenius norm of dL/dW_l (the Linear of layer l), l = 1..depth.
    log10_bias_grad_norms : ndarray, shape (depth,)
        log10 of the Euclidean norm of dL/db_l.
    weight_grads, bias_grads : list of ndarray or None
        Full gradients when ``return_grads=True`` (after clipping, when clipping was
        asked for); ``activation_grads`` then holds dL/dh_l, l = 0..depth.
    """

    log10_weight_grad_norms: np.ndarray
    log10_bias_grad_norms: np.ndarray
    weight_grads: list[np.ndarray] | None
    bias_grads: list[np.ndarray] | None

    _DERIVED: ClassVar[tuple[str, ...]] = (
        *ChainReport._DERIVED,
        "weight_grad_norms",
        "bias_grad_norms",
    )

    @classmethod
    def _from_core(
        cls,
        d: dict[str, Any],
        param_names: Sequence[str],
        param_block: np.ndarray,
        layer_ends: np.ndarray,
        activation_names: tuple[str, ...],
        weight_index: np.ndarray,
        bias_index: np.ndarray,
        train: bool,
    ) -> BackwardReport:
        kw = cls._fields_from_core(d, param_names, param_block, activation_names, train)
        lp = kw["_log10_param"]
        lw, lb = lp[weight_index], lp[bias_index]
        la = kw["log10_activation_grad_norms"][layer_ends]
        _readonly(lw, lb, la)
        kw["log10_activation_grad_norms"] = la
        pg, ag = kw["_param_grads"], kw["activation_grads"]
        wg = bg = None
        if pg is not None:
            wg = [pg[i] for i in weight_index.tolist()]
            bg = [pg[i] for i in bias_index.tolist()]
            kw["activation_grads"] = [ag[i] for i in layer_ends.tolist()]
        return cls(
            **kw,
            log10_weight_grad_norms=lw,
            log10_bias_grad_norms=lb,
            weight_grads=wg,
            bias_grads=bg,
        )

    # -- plain floats -----------------------------------------------------------------
    @property
    def depth(self) -> int:
        """Number of layers."""
        return int(self.log10_weight_grad_norms.shape[0])

    @property
    def weight_grad_norms(self) -> np.ndarray:
        """||dL/dW_l||_F as floats (0 or inf outside the float range), shape (depth,)."""
        return _pow10(self.log10_weight_grad_norms)

    @property
    def bias_grad_norms(self) -> np.ndarray:
        """||dL/db_l|| as floats, shape (depth,)."""
        return _pow10(self.log10_bias_grad_norms)

    @property
    def log10_clipped_weight_grad_norms(self) -> np.ndarray:
        """log10 of ||dL/dW_l|| after clipping."""
        return self.log10_weight_grad_norms + self.log10_clip_coef

    @property
    def clipped_weight_grad_norms(self) -> np.ndarray:
        """||dL/dW_l|| after clipping, as floats."""
        return _pow10(self.log10_clipped_weight_grad_norms)

    @property
    def log10_clipped_bias_grad_norms(self) -> np.ndarray:
        """log10 of ||dL/db_l|| after clipping."""
        return self.log10_bias_grad_norms + self.log10_clip_coef

    @property
    def clipped_bias_grad_norms(self) -> np.ndarray:
        """||dL/db_l|| after clipping, as floats."""
        return _pow10(self.log10_clipped_bias_grad_norms)

    # -- presentation -------------------------------------------------------------------
    def table(self, every: int | None = None) -> str:
        """A per-layer text table of log10 gradient norms (every `every`-th layer)."""
        L = self.depth
        step = every or max(1, L // 20)
        rows = [
            f"{'layer':>7}  {'log10|dL/dW_l|':>15}  {'log10|dL/db_l|':>15}  {'log10|dL/dh_l|':>15}"
        ]
        for l in sorted(set(range(1, L + 1, step)) | {L}):
            rows.append(
                f"{l:>7}  {self.log10_weight_grad_norms[l - 1]:>15.4f}  "
                f"{self.log10_bias_grad_norms[l - 1]:>15.4f}  "
                f"{self.log10_activation_grad_norms[l]:>15.4f}"
            )
        return "\n".join(rows)

    def _summary(self) -> list[tuple[str, str]]:
        return [("depth", str(self.depth)), *_Report._summary(self)]

    def _html_table(self) -> tuple[list[str], list[list[str]]]:
        la = self.log10_activation_grad_norms.tolist()
        rows = [["0 (input)", "", "", _fmt(la[0])]]
        for l, (w, b) in enumerate(
            zip(self.log10_weight_grad_norms.tolist(), self.log10_bias_grad_norms.tolist()), 1
        ):
            rows.append([str(l), _fmt(w), _fmt(b), _fmt(la[l])])
        return ["layer", "log10 |dL/dW_l|", "log10 |dL/db_l|", "log10 |dL/dh_l|"], rows


@dataclass(frozen=True, eq=False, repr=False)
class RecurrentReport(_Report):
    """Per-timestep gradient norms of one backward pass through an :class:`~gradchain.RNN`.

    As in :class:`ChainReport`, every norm has a ``log10_`` form that stays finite and
    accurate over any number of steps (``-inf``: exactly zero) and a float form that is 0
    or inf outside the float range. Norms of states are Frobenius norms over
    ``(batch, hidden_size)``.

    Attributes
    ----------
    cell : str
        The chain's cell.
    loss, log10_loss : float
        The loss (NaN when the upstream gradient was given directly). ``log10_loss`` is
        summed in log space and exact at any magnitude; ``loss`` is 0 or inf only where
        the true loss lies outside the double range.
    log10_layer_state_grad_norms : ndarray, shape (num_layers, steps + 1)
        log10 ||dL/dh_t|| for every layer, t = 0 (the initial state) .. steps.
    log10_layer_cell_grad_norms : ndarray or None
        The same for the LSTM's cell states c_t (None for other cells).
    param_names : tuple of str
        The parameters in ``state_dict`` order.
    log10_param_grad_norms, param_grad_norms : dict of str to float
        Every parameter's gradient norm by ``state_dict`` name (Frobenius for matrices,
        Euclidean for vectors), before clipping.
    norm_type, log10_total_norm, max_norm, log10_clip_coef
        Total norm over all parameters and clipping, as in :class:`ChainReport`.
    truncate : int or None
        The truncation window, and ``truncate_mode`` ("none", "detach" or "window").
    h_n, c_n : ndarray
        Final states, shape (num_layers, batch, hidden_size); c_n is None except for LSTM.
    param_grads : dict of str to ndarray, or None
        Full parameter gradients (after clipping) with ``return_grads=True``.
    state_grads, cell_grads : ndarray or None
        Full state gradients, shape (num_layers, steps + 1, batch, hidden_size).
    """

    cell: str
    loss: float
    log10_loss: float
    log10_layer_state_grad_norms: np.ndarray
    log10_layer_cell_grad_norms: np.ndarray | None
    param_names: Sequence[str]
    _log10_param: np.ndarray
    norm_type: float
    log10_total_norm: float
    max_norm: float | None
    log10_clip_coef: float
    truncate: int | None
    truncate_mode: str
    h_n: np.ndarray
    c_n: np.ndarray | None
    _param_grads: list[np.ndarray] | None
    state_grads: np.ndarray | None
    cell_grads: np.ndarray | None

    _DERIVED: ClassVar[tuple[str, ...]] = (*_Report._DERIVED, "state_grad_norms", "cell_grad_norms")

    @classmethod
    def _from_core(
        cls, d: dict[str, Any], cell: str, names: tuple[str, ...], truncate: int | None, mode: str
    ) -> RecurrentReport:
        _readonly(
            d["log10_state_grad_norms"],
            d.get("log10_cell_grad_norms"),
            d["h_n"],
            d.get("c_n"),
            d["log10_param_grad_norms"],
        )
        return cls(
            cell=cell,
            loss=float(d["loss"]),
            log10_loss=float(d["log10_loss"]),
            log10_layer_state_grad_norms=d["log10_state_grad_norms"],
            log10_layer_cell_grad_norms=d.get("log10_cell_grad_norms"),
            param_names=names,
            _log10_param=d["log10_param_grad_norms"],
            norm_type=float(d["norm_type"]),
            log10_total_norm=float(d["log10_total_norm"]),
            max_norm=float(d["max_norm"]) if d["clipped"] else None,
            log10_clip_coef=float(d["log10_clip_coef"]),
            truncate=None if mode == "none" else truncate,
            truncate_mode=mode,
            h_n=d["h_n"],
            c_n=d.get("c_n"),
            _param_grads=d.get("param_grads"),
            state_grads=d.get("state_grads"),
            cell_grads=d.get("cell_grads"),
        )

    # -- shapes ---------------------------------------------------------------------------
    @property
    def steps(self) -> int:
        """Number of timesteps T."""
        return int(self.log10_layer_state_grad_norms.shape[1]) - 1

    @property
    def num_layers(self) -> int:
        """Number of stacked layers."""
        return int(self.log10_layer_state_grad_norms.shape[0])

    # -- the top layer, and floats --------------------------------------------------------
    @property
    def log10_state_grad_norms(self) -> np.ndarray:
        """log10 ||dL/dh_t|| of the top layer, t = 0..steps, shape (steps + 1,)."""
        return self.log10_layer_state_grad_norms[-1]

    @property
    def state_grad_norms(self) -> np.ndarray:
        """||dL/dh_t|| of the top layer as floats, shape (steps + 1,)."""
        return _pow10(self.log10_state_grad_norms)

    @property
    def layer_state_grad_norms(self) -> np.ndarray:
        """||dL/dh_t|| of every layer as floats, shape (num_layers, steps + 1)."""
        return _pow10(self.log10_layer_state_grad_norms)

    @property
    def log10_cell_grad_norms(self) -> np.ndarray | None:
        """log10 ||dL/dc_t|| of the top layer (LSTM), shape (steps + 1,); else None."""
        a = self.log10_layer_cell_grad_norms
        return None if a is None else a[-1]

    @property
    def cell_grad_norms(self) -> np.ndarray | None:
        """||dL/dc_t|| of the top layer as floats (LSTM); else None."""
        a = self.log10_cell_grad_norms
        return None if a is None else _pow10(a)

    @property
    def layer_cell_grad_norms(self) -> np.ndarray | None:
        """||dL/dc_t|| of every layer as floats (LSTM); else None."""
        a = self.log10_layer_cell_grad_norms
        return None if a is None else _pow10(a)

    # -- names used before param_* --------------------------------------------------------
    @property
    def log10_weight_grad_norms(self) -> dict[str, float]:
        """Deprecated: :attr:`log10_param_grad_norms` (it covers biases too)."""
        _deprecated("RecurrentReport.log10_weight_grad_norms", "log10_param_grad_norms")
        return self.log10_param_grad_norms

    @property
    def weight_grad_norms(self) -> dict[str, float]:
        """Deprecated: :attr:`param_grad_norms`."""
        _deprecated("RecurrentReport.weight_grad_norms", "param_grad_norms")
        return self.param_grad_norms

    @property
    def grads(self) -> dict[str, np.ndarray] | None:
        """Deprecated: :attr:`param_grads`."""
        _deprecated("RecurrentReport.grads", "param_grads")
        return self.param_grads

    # -- presentation -----------------------------------------------------------------------
    def table(self, every: int | None = None) -> str:
        """A per-timestep text table of log10 gradient norms (every `every`-th step)."""
        T = self.steps
        step = every or max(1, T // 20)
        cell = self.log10_cell_grad_norms
        head = f"{'t':>8}  {'log10|dL/dh_t|':>15}" + (
            f"  {'log10|dL/dc_t|':>15}" if cell is not None else ""
        )
        rows = [head]
        for t in sorted(set(range(0, T + 1, step)) | {T}):
            row = f"{t:>8}  {self.log10_state_grad_norms[t]:>15.4f}"
            if cell is not None:
                row += f"  {cell[t]:>15.4f}"
            rows.append(row)
        return "\n".join(rows)

    def _summary(self) -> list[tuple[str, str]]:
        return [
            ("cell", repr(self.cell)),
            ("steps", str(self.steps)),
            ("layers", str(self.num_layers)),
            *super()._summary(),
        ]

    def _html_table(self) -> tuple[list[str], list[list[str]]]:
        cell = self.log10_cell_grad_norms
        cols = ["t", "log10 |dL/dh_t|"] + (["log10 |dL/dc_t|"] if cell is not None else [])
        rows = []
        for t, h in enumerate(self.log10_state_grad_norms.tolist()):
            rows.append([str(t), _fmt(h)] + ([_fmt(float(cell[t]))] if cell is not None else []))
        return cols, rows

    def __str__(self) -> str:
        return f"{self!r}\n{self.table()}"


def _readonly(*arrays: np.ndarray | None) -> None:
    for a in arrays:
        if a is not None:
            a.setflags(write=False)
