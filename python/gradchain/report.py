"""Result objects returned by the chains."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

__all__ = ["BackwardReport"]


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


@dataclass(frozen=True, eq=False)
class BackwardReport:
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
