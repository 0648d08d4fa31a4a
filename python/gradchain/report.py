"""Result objects returned by the chains."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

__all__ = ["BackwardReport", "RecurrentReport"]


def _pow10(a: Any) -> Any:
    with np.errstate(over="ignore", under="ignore"):
        return np.power(10.0, a)


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return [_jsonable(x) for x in v.tolist()] if v.ndim else _jsonable(v.item())
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, (np.floating, np.integer)):
        return _jsonable(v.item())
    return v


class _TotalNorm:
    """Float views of the total norm and clipping, shared by the reports."""

    log10_total_norm: float
    log10_clip_coef: float

    @property
    def total_norm(self) -> float:
        """Total norm of all parameter gradients before clipping, as a float."""
        return float(_pow10(np.float64(self.log10_total_norm)))

    @property
    def clip_coef(self) -> float:
        """The factor the gradients were multiplied by (1.0 without clipping)."""
        return float(_pow10(np.float64(self.log10_clip_coef)))

    @property
    def log10_clipped_total_norm(self) -> float:
        """log10 of the total norm after clipping."""
        return self.log10_total_norm + self.log10_clip_coef

    @property
    def clipped_total_norm(self) -> float:
        """Total norm after clipping, as a float."""
        return float(_pow10(np.float64(self.log10_clipped_total_norm)))


@dataclass(frozen=True, eq=False)
class BackwardReport(_TotalNorm):
    """Per-layer gradient norms of one backward pass through an :class:`~gradchain.MLP`.

    Every norm comes in two forms: the plain float (which is 0 or inf where the true
    value is outside the float range) and its ``log10_`` twin, which stays finite and
    accurate at any depth; ``-inf`` in a log10 array means a gradient that is exactly zero.

    Attributes
    ----------
    loss, log10_loss : float
        The loss value (NaN when the upstream gradient was given directly).
    log10_weight_grad_norms : ndarray, shape (depth,)
        log10 of the Frobenius norm of dL/dW_l, l = 1..depth.
    log10_bias_grad_norms : ndarray, shape (depth,)
        log10 of the Euclidean norm of dL/db_l.
    log10_activation_grad_norms : ndarray, shape (depth + 1,)
        log10 of ||dL/dh_l|| over the whole batch, l = 0 (the input) .. depth.
    norm_type : float
        Order of the total norm (2, inf or p > 0).
    log10_total_norm : float
        log10 of the total norm over all weight and bias gradients, before clipping.
    max_norm : float or None
        The clipping threshold, when clipping was asked for.
    log10_clip_coef : float
        log10 of the coefficient the gradients were multiplied by (0 without clipping).
    output : ndarray, shape (batch, widths[-1])
        The chain's output h_L (0 or inf where a log-scale forward pass left the float range).
    output_log2_scale : int
        Binary exponent the forward pass carried in log space: h_L = output_mantissa * 2**scale.
    weight_grads, bias_grads, activation_grads : list of ndarray or None
        Full gradients when ``return_grads=True`` (after clipping, when clipping was asked for).
    """

    loss: float
    log10_loss: float
    log10_weight_grad_norms: np.ndarray
    log10_bias_grad_norms: np.ndarray
    log10_activation_grad_norms: np.ndarray
    norm_type: float
    log10_total_norm: float
    max_norm: float | None
    log10_clip_coef: float
    output: np.ndarray
    output_log2_scale: int
    weight_grads: list[np.ndarray] | None = field(default=None, repr=False)
    bias_grads: list[np.ndarray] | None = field(default=None, repr=False)
    activation_grads: list[np.ndarray] | None = field(default=None, repr=False)

    @classmethod
    def _from_core(cls, d: dict[str, Any]) -> BackwardReport:
        for key in ("log10_weight_grad_norms", "log10_bias_grad_norms", "log10_activation_grad_norms", "output"):
            d[key].setflags(write=False)
        return cls(
            loss=float(d["loss"]),
            log10_loss=float(d["log10_loss"]),
            log10_weight_grad_norms=d["log10_weight_grad_norms"],
            log10_bias_grad_norms=d["log10_bias_grad_norms"],
            log10_activation_grad_norms=d["log10_activation_grad_norms"],
            norm_type=float(d["norm_type"]),
            log10_total_norm=float(d["log10_total_norm"]),
            max_norm=float(d["max_norm"]) if d["clipped"] else None,
            log10_clip_coef=float(d["log10_clip_coef"]),
            output=d["output"],
            output_log2_scale=int(d["output_log2_scale"]),
            weight_grads=d.get("weight_grads"),
            bias_grads=d.get("bias_grads"),
            activation_grads=d.get("activation_grads"),
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
    def activation_grad_norms(self) -> np.ndarray:
        """||dL/dh_l|| as floats, shape (depth + 1,)."""
        return _pow10(self.log10_activation_grad_norms)

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
    def to_dict(self, *, grads: bool = False) -> dict[str, Any]:
        """A dictionary of plain Python values that ``json.dumps`` accepts.

        Non-finite floats become the strings ``"inf"``/``"-inf"`` (NaN becomes None).
        Full gradient arrays are included only with ``grads=True``.
        """
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name.endswith("_grads") and not grads:
                continue
            out[f.name] = _jsonable(getattr(self, f.name))
        for name in ("weight_grad_norms", "bias_grad_norms", "activation_grad_norms", "total_norm", "clip_coef"):
            out[name] = _jsonable(getattr(self, name))
        return out

    def table(self, every: int | None = None) -> str:
        """A per-layer text table of log10 gradient norms (every `every`-th layer)."""
        L = self.depth
        step = every or max(1, L // 20)
        rows = [f"{'layer':>7}  {'log10|dL/dW_l|':>15}  {'log10|dL/db_l|':>15}  {'log10|dL/dh_l|':>15}"]
        layers = sorted(set(range(1, L + 1, step)) | {L})
        for l in layers:
            rows.append(
                f"{l:>7}  {self.log10_weight_grad_norms[l - 1]:>15.4f}  "
                f"{self.log10_bias_grad_norms[l - 1]:>15.4f}  "
                f"{self.log10_activation_grad_norms[l]:>15.4f}"
            )
        return "\n".join(rows)

    def __str__(self) -> str:
        return (
            f"BackwardReport(depth={self.depth}, loss={self.loss:.6g}, "
            f"log10_total_norm={self.log10_total_norm:.6g})\n{self.table()}"
        )


@dataclass(frozen=True, eq=False)
class RecurrentReport(_TotalNorm):
    """Per-timestep gradient norms of one backward pass through an :class:`~gradchain.RNN`.

    As in :class:`BackwardReport`, every norm has a ``log10_`` form that stays finite and
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
    log10_weight_grad_norms : dict of str to float
        log10 of the norm of every parameter's gradient, by ``state_dict`` name
        (Frobenius for matrices, Euclidean for vectors).
    norm_type, log10_total_norm, max_norm, log10_clip_coef
        Total norm over all parameters and clipping, as in :class:`BackwardReport`.
    truncate : int or None
        The truncation window, and ``truncate_mode`` ("none", "detach" or "window").
    h_n, c_n : ndarray
        Final states, shape (num_layers, batch, hidden_size); c_n is None except for LSTM.
    grads : dict of str to ndarray, or None
        Full parameter gradients (after clipping) with ``return_grads=True``.
    state_grads, cell_grads : ndarray or None
        Full state gradients, shape (num_layers, steps + 1, batch, hidden_size).
    """

    cell: str
    loss: float
    log10_loss: float
    log10_layer_state_grad_norms: np.ndarray
    log10_layer_cell_grad_norms: np.ndarray | None
    log10_weight_grad_norms: dict[str, float]
    norm_type: float
    log10_total_norm: float
    max_norm: float | None
    log10_clip_coef: float
    truncate: int | None
    truncate_mode: str
    h_n: np.ndarray = field(repr=False)
    c_n: np.ndarray | None = field(default=None, repr=False)
    grads: dict[str, np.ndarray] | None = field(default=None, repr=False)
    state_grads: np.ndarray | None = field(default=None, repr=False)
    cell_grads: np.ndarray | None = field(default=None, repr=False)

    @classmethod
    def _from_core(
        cls, d: dict[str, Any], cell: str, names: tuple[str, ...], truncate: int | None, mode: str
    ) -> RecurrentReport:
        for key in ("log10_state_grad_norms", "log10_cell_grad_norms", "h_n", "c_n"):
            if key in d:
                d[key].setflags(write=False)
        lp = d["log10_param_grad_norms"]
        grads = dict(zip(names, d["param_grads"])) if "param_grads" in d else None
        return cls(
            cell=cell,
            loss=float(d["loss"]),
            log10_loss=float(d["log10_loss"]),
            log10_layer_state_grad_norms=d["log10_state_grad_norms"],
            log10_layer_cell_grad_norms=d.get("log10_cell_grad_norms"),
            log10_weight_grad_norms={n: float(x) for n, x in zip(names, lp)},
            norm_type=float(d["norm_type"]),
            log10_total_norm=float(d["log10_total_norm"]),
            max_norm=float(d["max_norm"]) if d["clipped"] else None,
            log10_clip_coef=float(d["log10_clip_coef"]),
            truncate=None if mode == "none" else truncate,
            truncate_mode=mode,
            h_n=d["h_n"],
            c_n=d.get("c_n"),
            grads=grads,
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

    @property
    def weight_grad_norms(self) -> dict[str, float]:
        """Every parameter's gradient norm as a float, by ``state_dict`` name."""
        return {k: float(_pow10(np.float64(x))) for k, x in self.log10_weight_grad_norms.items()}

    # -- presentation -----------------------------------------------------------------------
    def to_dict(self, *, grads: bool = False) -> dict[str, Any]:
        """A dictionary of plain Python values that ``json.dumps`` accepts.

        Non-finite floats become ``"inf"``/``"-inf"`` (NaN becomes None); full gradient
        arrays are included only with ``grads=True``.
        """
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name.endswith("grads") and not grads:
                continue
            val = getattr(self, f.name)
            if isinstance(val, dict):
                val = {k: _jsonable(x) for k, x in val.items()}
            out[f.name] = _jsonable(val)
        for name in ("state_grad_norms", "cell_grad_norms", "weight_grad_norms", "total_norm", "clip_coef"):
            val = getattr(self, name)
            out[name] = {k: _jsonable(x) for k, x in val.items()} if isinstance(val, dict) else _jsonable(val)
        return out

    def table(self, every: int | None = None) -> str:
        """A per-timestep text table of log10 gradient norms (every `every`-th step)."""
        T = self.steps
        step = every or max(1, T // 20)
        cell = self.log10_cell_grad_norms
        head = f"{'t':>8}  {'log10|dL/dh_t|':>15}" + (f"  {'log10|dL/dc_t|':>15}" if cell is not None else "")
        rows = [head]
        for t in sorted(set(range(0, T + 1, step)) | {T}):
            row = f"{t:>8}  {self.log10_state_grad_norms[t]:>15.4f}"
            if cell is not None:
                row += f"  {cell[t]:>15.4f}"
            rows.append(row)
        return "\n".join(rows)

    def __str__(self) -> str:
        return (
            f"RecurrentReport(cell={self.cell!r}, steps={self.steps}, layers={self.num_layers}, "
            f"loss={self.loss:.6g}, log10_total_norm={self.log10_total_norm:.6g})\n{self.table()}"
        )
