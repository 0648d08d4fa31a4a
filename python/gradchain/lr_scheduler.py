"""Learning-rate schedules with the arithmetic of ``torch.optim.lr_scheduler``.

:class:`StepLR`, :class:`ExponentialLR`, :class:`CosineAnnealingLR`, :class:`LinearLR` and
:class:`ReduceLROnPlateau` take torch's arguments except the optimizer: a schedule starts
from the learning rate of the optimizer it is used with, and is stepped once after every
optimizer step (:class:`ReduceLROnPlateau` with that step's training loss), as in the usual
torch loop::

    for batch in batches:
        optimizer.step()
        scheduler.step()        # scheduler.step(loss) for ReduceLROnPlateau

The rates are computed in the core with torch's recursive formulas in torch's order of
operations, so they equal torch's to the last bit (cosine annealing past ``T_max`` rises
again, as torch's does). This module is also ``gradchain.optim.lr_scheduler``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from . import _core
from . import _validate as _v

__all__ = [
    "CosineAnnealingLR",
    "ExponentialLR",
    "LRScheduler",
    "LinearLR",
    "ReduceLROnPlateau",
    "StepLR",
]


def _positive_real(name: str, value: Any) -> float:
    x = _v.real(name, value)
    if not (math.isfinite(x) and x > 0):
        raise ValueError(f"{name} must be a finite number > 0; got {x!r}")
    return x


def _real_in(name: str, value: Any, lo: float, hi: float, accepted: str) -> float:
    x = _v.real(name, value)
    if not lo <= x <= hi:
        raise ValueError(f"{name} must be {accepted}; got {x!r}")
    return x


def _at_least_zero(name: str, value: Any) -> float:
    x = _v.real(name, value)
    if not (math.isfinite(x) and x >= 0):
        raise ValueError(f"{name} must be a finite number >= 0; got {x!r}")
    return x


class LRScheduler:
    """The common face of gradchain's schedules (use a subclass).

    Attributes
    ----------
    kind : str
        The core's name of the schedule: ``"step"``, ``"exponential"``, ``"cosine"``,
        ``"linear"`` or ``"plateau"``.
    """

    kind: ClassVar[str] = ""
    _ARGS: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **args: Any) -> None:
        self._args = self._validated(args)
        self._core: _core.LRSchedule | None = None

    @classmethod
    def _validated(cls, args: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def _core_spec(self) -> dict[str, Any]:
        """The keyword dict of the core's ScheduleSpec."""
        return {"kind": self.kind, **self._args}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={self._args[k]!r}" for k in self._ARGS)
        return f"{type(self).__name__}({args})"

    def _core_for(self, base_lr: float) -> _core.LRSchedule:
        """The core schedule starting from the optimizer's learning rate `base_lr`: created
        on first use, then the same object, so that a second training run continues the
        schedule. A different `base_lr` is a ValueError."""
        lr = _v.real("lr", base_lr)
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be a finite number > 0; got {lr!r}")
        if self._core is None:
            self._core = _core.LRSchedule(self._core_spec(), lr)
        elif self._core.base_lr != lr:
            raise ValueError(
                f"this {type(self).__name__} runs a schedule from lr={self._core.base_lr!r}; "
                f"it cannot continue with an optimizer whose lr is {lr!r} (make a new one)"
            )
        return self._core

    def get_last_lr(self) -> list[float]:
        """``[lr]``: the learning rate of the coming optimizer step, as torch's
        ``get_last_lr()`` (an empty list before the schedule has been used)."""
        return [] if self._core is None else [self._core.lr()]

    def lrs(self, lr: float, steps: int, losses: Any = None) -> np.ndarray:
        """The learning rate of each of `steps` optimizer steps, from a fresh start.

        This schedule's own state is neither used nor changed.

        Parameters
        ----------
        lr : float
            The optimizer's learning rate, finite and > 0.
        steps : int
            The number of steps, >= 0.
        losses : array_like, optional
            The loss of each step, shape ``(steps,)``: what :class:`ReduceLROnPlateau`
            reads (the other schedules ignore it). Without it every step counts as one
            without improvement.

        Returns
        -------
        numpy.ndarray
            float64, shape ``(steps,)``: the rate used by step 1, 2, ...

        Examples
        --------
        >>> from gradchain.optim.lr_scheduler import StepLR
        >>> StepLR(step_size=2, gamma=0.5).lrs(0.1, 5)
        array([0.1  , 0.1  , 0.05 , 0.05 , 0.025])
        """
        n = _v.int_in("steps", steps, 0, None, "an integer >= 0")
        base = _v.real("lr", lr)
        if not (math.isfinite(base) and base > 0):
            raise ValueError(f"lr must be a finite number > 0; got {base!r}")
        loss = None
        if losses is not None:
            loss = np.asarray(losses, dtype=np.float64)
            if loss.shape != (n,):
                raise ValueError(f"losses must have shape ({n},); got {loss.shape}")
        return _core.LRSchedule(self._core_spec(), base).lrs(n, loss)

    # --- state_dict ------------------------------------------------------------------
    def _torch_args(self) -> dict[str, Any]:
        return {k: self._args[k] for k in self._ARGS}

    def state_dict(self) -> dict[str, Any]:
        """The state in the layout of torch's ``scheduler.state_dict()``: the arguments,
        ``base_lrs``, ``last_epoch`` (steps taken), ``_step_count`` and ``_last_lr`` (the
        rate of the coming step); empty lists before the schedule has been used. A torch
        scheduler of the same kind that loads it (its optimizer's ``lr`` set to
        ``_last_lr[0]``) continues with the same rates."""
        out = self._torch_args()
        if self._core is None:
            out.update(base_lrs=[], last_epoch=0, _step_count=1, _last_lr=[])
        else:
            s = self._core.state()
            out.update(
                base_lrs=[self._core.base_lr],
                last_epoch=int(s["last_epoch"]),
                _step_count=int(s["last_epoch"]) + 1,
                _last_lr=[float(s["lr"])],
            )
        out.update(_is_initial=False, _get_lr_called_within_step=False)
        return out

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a state saved by :meth:`state_dict` or by a torch scheduler of the same kind.

        The arguments saved replace this schedule's; the progress (``last_epoch``,
        ``_last_lr``, and for plateau ``best``, ``num_bad_epochs``, ``cooldown_counter``)
        is restored when ``base_lrs`` or ``_last_lr`` is given.

        Raises
        ------
        TypeError
            If `state_dict` is not a mapping.
        ValueError
            If an argument or a count is out of range.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping; got {type(state_dict).__name__}")
        args = dict(self._args)
        args.update(self._args_from(state_dict))
        args = self._validated(args)
        core = None
        last = list(state_dict.get("_last_lr") or [])
        base = list(state_dict.get("base_lrs") or []) or last
        if base:
            core = _core.LRSchedule({"kind": self.kind, **args}, float(base[0]))
            state = core.state()
            state["last_epoch"] = _v.int_in(
                "last_epoch", state_dict.get("last_epoch", 0), 0, None, "an integer >= 0"
            )
            if last:
                state["lr"] = float(last[0])
            for key in ("best", "num_bad_epochs", "cooldown_counter"):
                if key in state_dict:
                    state[key] = state_dict[key]
            core.set_state(state)
        self._args, self._core = args, core

    def _args_from(self, state_dict: Mapping[str, Any]) -> dict[str, Any]:
        return {k: state_dict[k] for k in self._ARGS if k in state_dict}


class StepLR(LRScheduler):
    """Multiply the learning rate by `gamma` every `step_size` steps, as
    ``torch.optim.lr_scheduler.StepLR``.

    Parameters
    ----------
    step_size : int
        Period of the decay, in optimizer steps (>= 1).
    gamma : float, default 0.1
        Multiplicative factor, finite and > 0.

    Examples
    --------
    >>> from gradchain.optim.lr_scheduler import StepLR
    >>> StepLR(step_size=30)
    StepLR(step_size=30, gamma=0.1)
    """

    kind = "step"
    _ARGS = ("step_size", "gamma")

    def __init__(self, step_size: int, gamma: float = 0.1) -> None:
        super().__init__(step_size=step_size, gamma=gamma)

    @classmethod
    def _validated(cls, a: dict[str, Any]) -> dict[str, Any]:
        return {
            "step_size": _v.int_in("step_size", a["step_size"], 1, None, "an integer >= 1"),
            "gamma": _positive_real("gamma", a["gamma"]),
        }


class ExponentialLR(LRScheduler):
    """Multiply the learning rate by `gamma` after every step, as
    ``torch.optim.lr_scheduler.ExponentialLR``.

    Parameters
    ----------
    gamma : float
        Multiplicative factor, finite and > 0.

    Examples
    --------
    >>> from gradchain.optim.lr_scheduler import ExponentialLR
    >>> ExponentialLR(gamma=0.5).lrs(1.0, 4)
    array([1.   , 0.5  , 0.25 , 0.125])
    """

    kind = "exponential"
    _ARGS = ("gamma",)

    def __init__(self, gamma: float) -> None:
        super().__init__(gamma=gamma)

    @classmethod
    def _validated(cls, a: dict[str, Any]) -> dict[str, Any]:
        return {"gamma": _positive_real("gamma", a["gamma"])}


class CosineAnnealingLR(LRScheduler):
    """Cosine annealing from the optimizer's rate down to `eta_min` over `T_max` steps, as
    ``torch.optim.lr_scheduler.CosineAnnealingLR``.

    The rate follows torch's recursive formula
    ``lr_t = eta_min + (lr_{t-1} - eta_min) (1 + cos(pi t / T_max)) / (1 + cos(pi (t-1) / T_max))``,
    which tracks ``eta_min + (lr - eta_min) (1 + cos(pi t / T_max)) / 2``; past ``T_max``
    it rises again, as torch's does (a period of ``2 T_max``).

    Parameters
    ----------
    T_max : int
        Steps from the start to the minimum (>= 1).
    eta_min : float, default 0.0
        The minimum rate, finite and >= 0.

    Examples
    --------
    >>> from gradchain.optim.lr_scheduler import CosineAnnealingLR
    >>> CosineAnnealingLR(T_max=2).lrs(1.0, 5).round(12)
    array([1. , 0.5, 0. , 0.5, 1. ])
    """

    kind = "cosine"
    _ARGS = ("T_max", "eta_min")

    def __init__(self, T_max: int, eta_min: float = 0.0) -> None:
        super().__init__(T_max=T_max, eta_min=eta_min)

    @classmethod
    def _validated(cls, a: dict[str, Any]) -> dict[str, Any]:
        return {
            "T_max": _v.int_in("T_max", a["T_max"], 1, None, "an integer >= 1"),
            "eta_min": _at_least_zero("eta_min", a["eta_min"]),
        }


class LinearLR(LRScheduler):
    """A linear change of the rate's factor from `start_factor` to `end_factor` over
    `total_iters` steps (a linear warm-up with the defaults), as
    ``torch.optim.lr_scheduler.LinearLR``.

    Parameters
    ----------
    start_factor : float, default 1/3
        The factor of the first step, in (0, 1].
    end_factor : float, default 1.0
        The factor from step ``total_iters + 1`` on, in [0, 1].
    total_iters : int, default 5
        The number of steps over which the factor changes (>= 0).

    Examples
    --------
    >>> from gradchain.optim.lr_scheduler import LinearLR
    >>> LinearLR(start_factor=0.25, total_iters=3).lrs(1.0, 5)
    array([0.25, 0.5 , 0.75, 1.  , 1.  ])
    """

    kind = "linear"
    _ARGS = ("start_factor", "end_factor", "total_iters")

    def __init__(
        self, start_factor: float = 1.0 / 3, end_factor: float = 1.0, total_iters: int = 5
    ) -> None:
        super().__init__(start_factor=start_factor, end_factor=end_factor, total_iters=total_iters)

    @classmethod
    def _validated(cls, a: dict[str, Any]) -> dict[str, Any]:
        start = _v.real("start_factor", a["start_factor"])
        if not 0.0 < start <= 1.0:
            raise ValueError(f"start_factor must be in (0, 1]; got {start!r}")
        return {
            "start_factor": start,
            "end_factor": _real_in("end_factor", a["end_factor"], 0.0, 1.0, "in [0, 1]"),
            "total_iters": _v.int_in("total_iters", a["total_iters"], 0, None, "an integer >= 0"),
        }


class ReduceLROnPlateau(LRScheduler):
    """Reduce the rate when the loss stops improving, as
    ``torch.optim.lr_scheduler.ReduceLROnPlateau`` stepped with each step's loss.

    A step improves on the best loss so far when its loss is below ``best * (1 -
    threshold)`` (mode ``"min"``, threshold_mode ``"rel"``; ``best - threshold`` with
    ``"abs"``; above ``best * (1 + threshold)`` or ``best + threshold`` in mode ``"max"``).
    After more than `patience` steps without improvement the rate becomes ``max(lr *
    factor, min_lr)`` (unless that changes it by `eps` or less), and the next `cooldown`
    steps count no bad steps.

    Parameters
    ----------
    mode : {"min", "max"}, default "min"
        Whether the monitored quantity should fall or rise.
    factor : float, default 0.1
        The factor of each reduction, in [0, 1).
    patience : int, default 10
        Steps without improvement tolerated before a reduction (>= 0).
    threshold : float, default 1e-4
        What counts as an improvement, finite and >= 0.
    threshold_mode : {"rel", "abs"}, default "rel"
        Whether `threshold` is relative to the best value or absolute.
    cooldown : int, default 0
        Steps after a reduction during which bad steps are not counted (>= 0).
    min_lr : float, default 0
        The lowest rate, finite and >= 0.
    eps : float, default 1e-8
        Reductions smaller than this are skipped, finite and >= 0.

    Examples
    --------
    >>> from gradchain.optim.lr_scheduler import ReduceLROnPlateau
    >>> sched = ReduceLROnPlateau(factor=0.5, patience=1)
    >>> sched.lrs(1.0, 6, losses=[3.0, 2.0, 2.0, 2.0, 2.0, 2.0])
    array([1. , 1. , 1. , 1. , 0.5, 0.5])
    """

    kind = "plateau"
    _ARGS = (
        "mode",
        "factor",
        "patience",
        "threshold",
        "threshold_mode",
        "cooldown",
        "min_lr",
        "eps",
    )

    def __init__(
        self,
        mode: str = "min",
        factor: float = 0.1,
        patience: int = 10,
        threshold: float = 1e-4,
        threshold_mode: str = "rel",
        cooldown: int = 0,
        min_lr: float = 0,
        eps: float = 1e-8,
    ) -> None:
        super().__init__(
            mode=mode,
            factor=factor,
            patience=patience,
            threshold=threshold,
            threshold_mode=threshold_mode,
            cooldown=cooldown,
            min_lr=min_lr,
            eps=eps,
        )

    @classmethod
    def _validated(cls, a: dict[str, Any]) -> dict[str, Any]:
        factor = _v.real("factor", a["factor"])
        if not 0.0 <= factor < 1.0:
            raise ValueError(f"factor must be in [0, 1); got {factor!r}")
        return {
            "mode": _v.choice("mode", a["mode"], ("min", "max")),
            "factor": factor,
            "patience": _v.int_in("patience", a["patience"], 0, None, "an integer >= 0"),
            "threshold": _at_least_zero("threshold", a["threshold"]),
            "threshold_mode": _v.choice("threshold_mode", a["threshold_mode"], ("rel", "abs")),
            "cooldown": _v.int_in("cooldown", a["cooldown"], 0, None, "an integer >= 0"),
            "min_lr": _at_least_zero("min_lr", a["min_lr"]),
            "eps": _at_least_zero("eps", a["eps"]),
        }

    def _torch_args(self) -> dict[str, Any]:
        return {
            "factor": self._args["factor"],
            "default_min_lr": self._args["min_lr"],
            "min_lrs": [self._args["min_lr"]],
            "patience": self._args["patience"],
            "cooldown": self._args["cooldown"],
            "eps": self._args["eps"],
            "mode_worse": math.inf if self._args["mode"] == "min" else -math.inf,
            "mode": self._args["mode"],
            "threshold": self._args["threshold"],
            "threshold_mode": self._args["threshold_mode"],
        }

    def state_dict(self) -> dict[str, Any]:
        """The state in the layout of torch's ``ReduceLROnPlateau.state_dict()``: the
        arguments (``min_lrs``, ``default_min_lr`` for `min_lr`), ``last_epoch``,
        ``_last_lr``, ``best``, ``num_bad_epochs``, ``cooldown_counter``, and ``base_lrs``
        (the rate the schedule started from; torch keeps none)."""
        out = self._torch_args()
        if self._core is None:
            worse = out["mode_worse"]
            out.update(last_epoch=0, _last_lr=[], base_lrs=[], best=worse)
            out.update(num_bad_epochs=0, cooldown_counter=0)
        else:
            s = self._core.state()
            out.update(
                last_epoch=int(s["last_epoch"]),
                _last_lr=[float(s["lr"])],
                base_lrs=[self._core.base_lr],
                best=float(s["best"]),
                num_bad_epochs=int(s["num_bad_epochs"]),
                cooldown_counter=int(s["cooldown_counter"]),
            )
        return out

    def _args_from(self, state_dict: Mapping[str, Any]) -> dict[str, Any]:
        args = super()._args_from(state_dict)
        min_lrs = state_dict.get("min_lrs")
        if isinstance(min_lrs, Sequence) and len(min_lrs) == 1:
            args["min_lr"] = min_lrs[0]
        elif "default_min_lr" in state_dict and state_dict["default_min_lr"] is not None:
            args["min_lr"] = state_dict["default_min_lr"]
        return args
