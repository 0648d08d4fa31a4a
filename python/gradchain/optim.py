"""Optimizers with torch.optim's update equations, defaults and argument names, applied by
:func:`gradchain.train` to the parameters of the chain it trains (SGD; the other
optimizers follow)."""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from . import _core

__all__ = ["SGD"]

_CORE = {np.dtype(np.float64): _core.Optimizer64, np.dtype(np.float32): _core.Optimizer32}


def _number(name: str, value: Any, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {value!r}")
    f = float(value)
    if not math.isfinite(f) or f < minimum:
        raise ValueError(f"{name} must be a finite number >= {minimum:g}; got {value!r}")
    return f


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False; got {value!r}")
    return bool(value)


class SGD:
    """Stochastic gradient descent as ``torch.optim.SGD`` (its single-tensor code path).

    With ``g`` the gradient: ``g += weight_decay * p``; with momentum ``b = g`` on the
    first step, then ``b = momentum * b + (1 - dampening) * g``; ``g = g + momentum * b``
    (nesterov) or ``g = b``; ``p -= lr * g`` (``+=`` with ``maximize``).

    Parameters
    ----------
    lr : float
        Learning rate (>= 0).
    momentum, dampening, weight_decay : float
        As in torch (>= 0; dampening any finite number).
    nesterov : bool
        Nesterov momentum (needs momentum > 0 and dampening 0).
    maximize : bool
        Ascend the loss instead.

    The optimizer keeps its state (the momentum buffers) between :func:`gradchain.train`
    calls, so a second call continues the first; it belongs to one chain (its parameter
    count and dtype are fixed by the first call).
    """

    kind = "sgd"

    def __init__(
        self,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
    ) -> None:
        self.defaults: dict[str, Any] = {
            "lr": _number("lr", lr),
            "momentum": _number("momentum", momentum),
            "dampening": _number("dampening", dampening, -math.inf),
            "weight_decay": _number("weight_decay", weight_decay),
            "nesterov": _flag("nesterov", nesterov),
            "maximize": _flag("maximize", maximize),
        }
        _core.Optimizer64(self._core_spec())  # the core's checks (nesterov and momentum, ...)
        self._core: Any = None
        self._dtype: np.dtype | None = None
        self._n_params: int | None = None

    @property
    def lr(self) -> float:
        """The base learning rate."""
        return float(self.defaults["lr"])

    def _core_spec(self) -> dict[str, Any]:
        """The keyword dict of the core's OptimizerSpec."""
        return {"kind": self.kind, **self.defaults}

    def _core_for(self, dtype: Any, n_params: int) -> Any:
        """The core optimizer for a chain of `n_params` parameters of `dtype`, created on
        first use and kept (its state carries over to the next run)."""
        dt = np.dtype(dtype)
        if self._core is None:
            self._core = _CORE[dt](self._core_spec())
            self._dtype, self._n_params = dt, int(n_params)
        elif dt != self._dtype:
            raise ValueError(
                f"optimizer was used with {self._dtype} parameters; it cannot train {dt.name} "
                "ones (make a new optimizer)"
            )
        elif int(n_params) != self._n_params:
            raise ValueError(
                f"optimizer was used with a chain of {self._n_params} parameters; this one has "
                f"{n_params} (make a new optimizer for each chain)"
            )
        return self._core

    def __repr__(self) -> str:
        args = [f"lr={self.defaults['lr']!r}"]
        default = {
            "momentum": 0.0,
            "dampening": 0.0,
            "weight_decay": 0.0,
            "nesterov": False,
            "maximize": False,
        }
        args += [f"{k}={self.defaults[k]!r}" for k, d in default.items() if self.defaults[k] != d]
        return f"SGD({', '.join(args)})"
