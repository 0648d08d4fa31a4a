"""Optimizers with the update equations, defaults and state of ``torch.optim``.

:class:`SGD`, :class:`Adam`, :class:`AdamW`, :class:`RMSprop` and :class:`Adagrad` take
torch's arguments (by the same names, with the same defaults) except ``params``: gradchain
applies an optimizer to the parameters of the chain it trains, or to NumPy arrays given to
:meth:`Optimizer.step_arrays`. The update runs in the core, in the parameters' precision,
with torch's single-tensor arithmetic (``foreach=False``) in torch's order of operations:
float64 results agree with torch to the last bit or two per step (torch's ``sqrt`` is not
always correctly rounded).

The state (Adam's ``exp_avg`` and ``exp_avg_sq``, SGD's ``momentum_buffer``, ...) lives
with the optimizer object, so a second training run continues where the first stopped;
:meth:`Optimizer.state_dict` and :meth:`Optimizer.load_state_dict` use torch's layout, with
NumPy arrays in place of tensors, and accept a torch optimizer's ``state_dict()``.

Learning-rate schedules are in :mod:`gradchain.optim.lr_scheduler`.

Where gradchain is stricter than torch: a learning rate must be finite and > 0 (torch
accepts 0), every hyperparameter must be finite, and an optimizer has one parameter group.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from . import _core, lr_scheduler
from . import _validate as _v

__all__ = ["SGD", "Adagrad", "Adam", "AdamW", "Optimizer", "RMSprop", "lr_scheduler"]

# `from gradchain.optim.lr_scheduler import StepLR` works as with torch.optim.
sys.modules[__name__ + ".lr_scheduler"] = lr_scheduler

_CORE: dict[str, type[_core._Optimizer]] = {
    "float64": _core.Optimizer64,
    "float32": _core.Optimizer32,
}


def _lr(value: Any) -> float:
    x = _v.real("lr", value)
    if not (math.isfinite(x) and x > 0):
        raise ValueError(f"lr must be a finite number > 0; got {x!r}")
    return x


def _at_least_zero(name: str, value: Any) -> float:
    x = _v.real(name, value)
    if not (math.isfinite(x) and x >= 0):
        raise ValueError(f"{name} must be a finite number >= 0; got {x!r}")
    return x


def _finite(name: str, value: Any) -> float:
    x = _v.real(name, value)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be a finite number; got {x!r}")
    return x


def _betas(value: Any) -> tuple[float, float]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise TypeError(f"betas must be a pair of numbers in [0, 1); got {value!r}")
    out = []
    for i, b in enumerate(value):
        x = _v.real(f"betas[{i}]", _scalar(b))
        if not 0.0 <= x < 1.0:
            raise ValueError(f"betas[{i}] must be in [0, 1); got {x!r}")
        out.append(x)
    return out[0], out[1]


def _scalar(value: Any) -> Any:
    """A one-element torch tensor or NumPy array as a Python number (torch allows tensor
    learning rates and betas); anything else unchanged."""
    if hasattr(value, "detach") and hasattr(value, "item"):
        return value.item()
    if isinstance(value, np.ndarray) and value.size == 1:
        return value.item()
    return value


def _as_numpy(name: str, value: Any) -> np.ndarray:
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        value = value.detach().cpu().numpy()
    arr = np.asarray(value)
    if arr.dtype.kind not in "fiu" or arr.dtype == np.bool_:
        raise TypeError(f"{name} must hold real numbers; got dtype {arr.dtype}")
    return arr


class Optimizer:
    """The common face of gradchain's optimizers (use a subclass: :class:`SGD`, :class:`Adam`,
    :class:`AdamW`, :class:`RMSprop`, :class:`Adagrad`).

    Attributes
    ----------
    kind : str
        ``"sgd"``, ``"adam"``, ``"adamw"``, ``"rmsprop"`` or ``"adagrad"``.
    defaults : dict
        The hyperparameters by torch's names, in torch's order, with torch's implementation
        flags (``foreach``, ``differentiable``, ...) at torch's defaults, as
        ``torch.optim.<Optimizer>(...).defaults``.
    """

    kind: ClassVar[str] = ""
    # The constructor's arguments, in the signature's order (the repr lists them so).
    _ARGS: ClassVar[tuple[str, ...]] = ()
    # The keys of torch's `defaults`, in torch's order, with the values of the flags
    # gradchain does not use.
    _TORCH_KEYS: ClassVar[tuple[str, ...]] = ()
    _TORCH_FLAGS: ClassVar[dict[str, Any]] = {}

    def __init__(self, **hyper: Any) -> None:
        self._hyper = self._validated(hyper)
        self._core: _core._Optimizer | None = None
        self._dtype: str | None = None
        self._n_params: int | None = None
        # Each parameter's shape where known (the core sees flat arrays).
        self._shapes: list[tuple[int, ...] | None] | None = None
        # A state loaded before the first step: [(step, {name: array})] per parameter.
        self._pending: list[tuple[float, dict[str, np.ndarray]]] | None = None

    # --- hyperparameters -------------------------------------------------------------
    @classmethod
    def _validated(cls, hyper: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    @property
    def lr(self) -> float:
        """The learning rate (the base rate when a schedule is used)."""
        return float(self._hyper["lr"])

    @property
    def defaults(self) -> dict[str, Any]:
        """A new dict of the hyperparameters, as torch's ``optimizer.defaults``."""
        out = {}
        for key in self._TORCH_KEYS:
            out[key] = self._hyper[key] if key in self._hyper else self._TORCH_FLAGS[key]
        return out

    def _core_spec(self) -> dict[str, Any]:
        """The keyword dict of the core's OptimizerSpec."""
        return _spec(self.kind, self._hyper)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={self._hyper[k]!r}" for k in self._ARGS)
        return f"{type(self).__name__}({args})"

    # --- the core object -------------------------------------------------------------
    def _core_for(
        self, dtype: Any, n_params: int, shapes: Sequence[Sequence[int] | None] | None = None
    ) -> _core._Optimizer:
        """The core optimizer for `n_params` parameters of `dtype`: created on first use,
        then the same object, so that its state carries over from one run to the next.
        `shapes` (one per parameter) lets :meth:`state_dict` give buffers their
        parameter's shape. A different dtype or number of parameters is a ValueError."""
        dt = _v.dtype(dtype).name
        n = _v.int_in("n_params", n_params, 0, None, "an integer >= 0")
        shp: list[tuple[int, ...] | None] | None = None
        if shapes is not None:
            shp = [None if s is None else tuple(int(d) for d in s) for s in shapes]
        if shp is not None and len(shp) != n:
            raise ValueError(f"shapes must have one shape per parameter ({n}); got {len(shp)}")
        if self._core is not None:
            if dt != self._dtype:
                raise ValueError(
                    f"this optimizer holds {self._dtype} state and cannot update {dt} "
                    f"parameters; make a new {type(self).__name__} for them"
                )
            if n != self._n_params:
                raise ValueError(
                    f"this optimizer holds the state of {self._n_params} parameters and cannot "
                    f"update {n}; make a new {type(self).__name__} for them"
                )
            if shp is not None:
                self._check_shapes(shp)
                self._shapes = shp
            return self._core
        pending = self._pending or []
        if len(pending) > n:
            raise ValueError(
                f"the loaded optimizer state holds {len(pending)} parameters; got {n} to update"
            )
        if shp is not None:
            self._check_shapes(shp)
        else:
            shp = [_shape_of(bufs) for _, bufs in pending] + [None] * (n - len(pending))
        core = _CORE[dt](self._core_spec())
        core.set_state([(step, dict(bufs)) for step, bufs in pending])
        self._core, self._dtype, self._n_params, self._shapes = core, dt, n, shp
        self._pending = None
        return core

    def _check_shapes(self, shapes: Sequence[tuple[int, ...] | None]) -> None:
        for i, (_, bufs) in enumerate(self._state_list()):
            shape = shapes[i]
            for name, buf in bufs.items():
                if shape is not None and buf.size != math.prod(shape):
                    raise ValueError(
                        f"parameter {i} has shape {shape} but its optimizer state "
                        f"'{name}' has {buf.size} numbers"
                    )

    def _state_list(self) -> list[tuple[float, dict[str, np.ndarray]]]:
        if self._core is not None:
            return [(float(step), dict(bufs)) for step, bufs in self._core.state()]
        return list(self._pending or [])

    # --- state_dict ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The state in the layout of torch's ``optimizer.state_dict()``.

        Returns
        -------
        dict
            ``{"state": {i: {"step": float, <buffer>: ndarray, ...}}, "param_groups":
            [{<hyperparameters>, "params": [0, ..., n-1]}]}``. Buffers are copies with
            their parameter's shape when it is known (flat otherwise), in the parameters'
            dtype; SGD keeps no ``step``, and no entry at all without momentum, as torch.
            A parameter not stepped yet has no entry.
        """
        state: dict[int, dict[str, Any]] = {}
        for i, (step, bufs) in enumerate(self._state_list()):
            if not bufs:
                continue
            entry: dict[str, Any] = {} if self.kind == "sgd" else {"step": float(step)}
            shape = self._shapes[i] if self._shapes is not None else None
            for name, buf in bufs.items():
                entry[name] = np.array(buf).reshape(buf.shape if shape is None else shape)
            state[i] = entry
        n = self._n_params if self._n_params is not None else len(self._state_list())
        group = dict(self.defaults)
        group["params"] = list(range(n))
        return {"state": state, "param_groups": [group]}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a state saved by :meth:`state_dict` or by a torch optimizer of the same kind.

        As torch does, the hyperparameters of the saved parameter group replace this
        optimizer's (those gradchain does not use, such as ``foreach``, are ignored).
        Tensors become NumPy arrays, in the parameters' dtype once it is known.

        Parameters
        ----------
        state_dict : dict
            ``{"state": {...}, "param_groups": [{...}]}`` with one parameter group.

        Raises
        ------
        TypeError
            If `state_dict` is not such a mapping, or a buffer does not hold numbers.
        ValueError
            If it has more than one parameter group, a hyperparameter is out of range, the
            number of parameters differs from the one this optimizer updates, or a
            parameter's state lacks a buffer these hyperparameters need (e.g.
            ``max_exp_avg_sq`` with ``amsgrad=True``) or has one they do not keep.
        """
        if not isinstance(state_dict, Mapping) or not {"state", "param_groups"} <= set(state_dict):
            raise TypeError(
                "state_dict must be a mapping with keys 'state' and 'param_groups', as "
                f"optimizer.state_dict() returns; got {type(state_dict).__name__}"
            )
        groups = state_dict["param_groups"]
        if not isinstance(groups, Sequence) or len(groups) != 1:
            count = len(groups) if isinstance(groups, Sequence) else groups
            raise ValueError(
                f"state_dict['param_groups'] must hold one parameter group (gradchain "
                f"optimizers have one); got {count}"
            )
        group = groups[0]
        decoupled = group.get("decoupled_weight_decay")
        adam = self.kind in ("adam", "adamw")
        if adam and decoupled is not None and bool(decoupled) != (self.kind == "adamw"):
            other = "AdamW" if decoupled else "Adam"
            raise ValueError(
                f"state_dict is {other}'s (decoupled_weight_decay={bool(decoupled)}); "
                f"load it into gradchain.optim.{other}"
            )
        hyper = dict(self._hyper)
        for key in self._ARGS:
            if key in group:
                hyper[key] = _scalar(group[key])
        hyper = self._validated(hyper)
        ids = list(group.get("params", []))
        n = len(ids)
        if self._n_params is not None and n != self._n_params:
            raise ValueError(
                f"state_dict holds {n} parameters; this optimizer updates {self._n_params}"
            )
        saved = state_dict["state"]
        if not isinstance(saved, Mapping):
            raise TypeError(f"state_dict['state'] must be a mapping; got {type(saved).__name__}")
        position = {pid: i for i, pid in enumerate(ids)}
        items: list[tuple[float, dict[str, np.ndarray]]] = [(0.0, {}) for _ in range(n)]
        for pid, entry in saved.items():
            if pid not in position:
                raise ValueError(f"state_dict['state'] has parameter {pid!r}, not in params {ids}")
            i = position[pid]
            step = 0.0
            bufs: dict[str, np.ndarray] = {}
            for name, value in entry.items():
                if name == "step":
                    step = _v.real(f"state[{pid}]['step']", _scalar(value))
                elif value is not None:
                    bufs[name] = _as_numpy(f"state[{pid}][{name!r}]", value)
            items[i] = (step, bufs)
        if self._shapes is not None:
            for i, (_, bufs) in enumerate(items):
                shape = self._shapes[i]
                for name, buf in bufs.items():
                    if shape is not None and buf.size != math.prod(shape):
                        raise ValueError(
                            f"state of parameter {ids[i]!r}: '{name}' has {buf.size} numbers "
                            f"but the parameter has shape {shape}"
                        )
        # The core checks the buffers against the hyperparameters, before anything changes.
        dt = self._dtype or "float64"
        core = _CORE[dt](_spec(self.kind, hyper))
        core.set_state([(step, bufs) for step, bufs in items])
        self._hyper = hyper
        if self._core is not None:
            self._core = core
        else:
            self._pending = [
                (step, {k: np.array(b, dtype=np.float64) for k, b in bufs.items()})
                for step, bufs in items
            ]

    # --- use without a chain ---------------------------------------------------------
    def step_arrays(
        self, params: Sequence[np.ndarray], grads: Sequence[Any], *, lr: float | None = None
    ) -> None:
        """One optimizer step on NumPy arrays, in place.

        Parameter ``i`` is the i-th array of `params` on every call (its state is kept under
        that index), as a torch optimizer's i-th parameter.

        Parameters
        ----------
        params : sequence of numpy.ndarray
            Writable float32 or float64 arrays, all of one dtype (the optimizer keeps to it).
        grads : sequence of array_like
            The gradients, one per parameter, of the same shapes (converted to the
            parameters' dtype).
        lr : float, optional
            The learning rate of this step (e.g. a schedule's; may be 0); default: the
            optimizer's ``lr``.

        Raises
        ------
        TypeError
            If a parameter is not a float32/float64 ndarray, or the dtypes differ.
        ValueError
            If the lists differ in length, a gradient's shape differs from its parameter's,
            a parameter is read-only, or the dtype or number of parameters differs from
            the previous call's.

        Examples
        --------
        >>> import numpy as np
        >>> import gradchain as gc
        >>> opt = gc.optim.SGD(lr=0.1, momentum=0.9)
        >>> w = np.array([1.0, -2.0])
        >>> opt.step_arrays([w], [np.array([0.5, 0.5])])
        >>> w
        array([ 0.95, -2.05])
        >>> opt.step_arrays([w], [np.array([0.5, 0.5])])
        >>> w  # the momentum buffer is now 0.9 * 0.5 + 0.5
        array([ 0.855, -2.145])
        """
        if isinstance(params, np.ndarray) or not isinstance(params, Sequence):
            raise TypeError(f"params must be a list of numpy.ndarray; got {type(params).__name__}")
        if isinstance(grads, np.ndarray) or not isinstance(grads, Sequence):
            raise TypeError(f"grads must be a list of arrays; got {type(grads).__name__}")
        if len(params) != len(grads):
            raise ValueError(
                f"params and grads must have the same length; got {len(params)} and {len(grads)}"
            )
        dtype = None
        for i, p in enumerate(params):
            if not isinstance(p, np.ndarray):
                raise TypeError(f"params[{i}] must be a numpy.ndarray; got {type(p).__name__}")
            if p.dtype.kind != "f" or p.dtype.itemsize not in (4, 8):
                raise TypeError(
                    f"params[{i}] has dtype {p.dtype}; parameters must be float32 or float64"
                )
            if dtype is None:
                dtype = p.dtype.newbyteorder("=")
            elif p.dtype.newbyteorder("=") != dtype:
                raise TypeError(
                    f"params[{i}] has dtype {p.dtype} but params[0] has {params[0].dtype}; "
                    "the parameters must share one dtype"
                )
            if not p.flags.writeable:
                raise ValueError(f"params[{i}] is read-only; parameters are updated in place")
        step_lr = self.lr if lr is None else _at_least_zero("lr", lr)
        if dtype is None:
            return
        work: list[np.ndarray] = []
        copies: list[tuple[np.ndarray, np.ndarray]] = []
        for p in params:
            if p.dtype.isnative and p.flags.c_contiguous:
                work.append(p)
            else:
                c = np.ascontiguousarray(p, dtype=dtype)
                work.append(c)
                copies.append((p, c))
        gs = []
        for i, (g, p) in enumerate(zip(grads, params)):
            arr = _as_numpy(f"grads[{i}]", g)
            if arr.shape != p.shape:
                raise ValueError(f"grads[{i}] has shape {arr.shape} but params[{i}] has {p.shape}")
            gs.append(np.ascontiguousarray(arr, dtype=dtype))
        core = self._core_for(dtype, len(params), [p.shape for p in params])
        core.step(work, gs, step_lr)
        for dst, src in copies:
            np.copyto(dst, src)

    # --- pickling --------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        return {
            "hyper": self._hyper,
            "dtype": self._dtype,
            "n_params": self._n_params,
            "shapes": self._shapes,
            "state": self._state_list(),
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._hyper = state["hyper"]
        self._core, self._dtype, self._n_params = None, None, None
        self._shapes = state["shapes"]
        self._pending = state["state"]
        if state["dtype"] is not None:
            self._core_for(state["dtype"], state["n_params"], self._shapes)


def _shape_of(bufs: dict[str, np.ndarray]) -> tuple[int, ...] | None:
    """The shape of a parameter's state buffers (None without any)."""
    for buf in bufs.values():
        return tuple(buf.shape)
    return None


def _spec(kind: str, hyper: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = {"kind": kind}
    for key, value in hyper.items():
        if key == "betas":
            spec["beta1"], spec["beta2"] = value
        else:
            spec[key] = value
    return spec


class SGD(Optimizer):
    """Stochastic gradient descent, optionally with momentum, as ``torch.optim.SGD``.

    Per step, with ``g`` the gradient (negated if `maximize`)::

        g = g + weight_decay * p
        b = g                                    (first step)
        b = momentum * b + (1 - dampening) * g   (later steps)
        g = g + momentum * b   if nesterov else   g = b        (when momentum != 0)
        p = p - lr * g

    Parameters
    ----------
    lr : float, default 1e-3
        Learning rate, finite and > 0.
    momentum : float, default 0
        Momentum factor, >= 0.
    dampening : float, default 0
        Dampening for momentum (finite).
    weight_decay : float, default 0
        L2 penalty added to the gradient, >= 0.
    nesterov : bool, default False
        Nesterov momentum; needs ``momentum > 0`` and ``dampening == 0``.
    maximize : bool, default False
        Maximize the objective instead of minimizing it.

    Examples
    --------
    >>> import gradchain as gc
    >>> gc.optim.SGD(lr=0.1, momentum=0.9, nesterov=True)
    SGD(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=True, maximize=False)
    """

    kind = "sgd"
    _ARGS = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")
    _TORCH_KEYS = (*_ARGS, "foreach", "differentiable", "fused")
    _TORCH_FLAGS: ClassVar[dict[str, Any]] = {
        "foreach": None,
        "differentiable": False,
        "fused": None,
    }

    def __init__(
        self,
        lr: float = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
    ) -> None:
        super().__init__(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
        )

    @classmethod
    def _validated(cls, h: dict[str, Any]) -> dict[str, Any]:
        out = {
            "lr": _lr(h["lr"]),
            "momentum": _at_least_zero("momentum", h["momentum"]),
            "dampening": _finite("dampening", h["dampening"]),
            "weight_decay": _at_least_zero("weight_decay", h["weight_decay"]),
            "nesterov": _v.flag("nesterov", h["nesterov"]),
            "maximize": _v.flag("maximize", h["maximize"]),
        }
        if out["nesterov"] and (out["momentum"] <= 0 or out["dampening"] != 0):
            raise ValueError(
                "nesterov=True needs momentum > 0 and dampening == 0; got "
                f"momentum={out['momentum']!r}, dampening={out['dampening']!r}"
            )
        return out


class Adam(Optimizer):
    """Adam, as ``torch.optim.Adam``: L2 weight decay added to the gradient.

    Per step ``t``, with ``g`` the gradient (negated if `maximize`)::

        g = g + weight_decay * p
        m = beta1 * m + (1 - beta1) * g            (exp_avg)
        v = beta2 * v + (1 - beta2) * g**2         (exp_avg_sq)
        vmax = max(vmax, v)                        (max_exp_avg_sq, amsgrad only)
        p = p - lr / (1 - beta1**t) * m / (sqrt(v or vmax) / sqrt(1 - beta2**t) + eps)

    so `eps` is added after the bias correction, and AMSGrad takes its maximum on the raw
    second moment, as torch does.

    Parameters
    ----------
    lr : float, default 1e-3
        Learning rate, finite and > 0.
    betas : (float, float), default (0.9, 0.999)
        Decay rates of the first and second moments, each in [0, 1).
    eps : float, default 1e-8
        Added to the denominator, >= 0.
    weight_decay : float, default 0
        L2 penalty added to the gradient, >= 0 (for decoupled decay use :class:`AdamW`).
    amsgrad : bool, default False
        Use the maximum of the second moments so far.
    maximize : bool, default False
        Maximize the objective instead of minimizing it.

    Examples
    --------
    >>> import numpy as np
    >>> import gradchain as gc
    >>> opt = gc.optim.Adam(lr=0.1)
    >>> w = np.array([1.0, 1.0])
    >>> opt.step_arrays([w], [np.array([3.0, -0.5])])   # the first step moves by lr * sign(g)
    >>> w
    array([0.9, 1.1])
    >>> sorted(opt.state_dict()["state"][0])
    ['exp_avg', 'exp_avg_sq', 'step']
    """

    kind = "adam"
    _ARGS = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize")
    _TORCH_KEYS = (
        *_ARGS,
        "foreach",
        "capturable",
        "differentiable",
        "fused",
        "decoupled_weight_decay",
    )
    _TORCH_FLAGS: ClassVar[dict[str, Any]] = {
        "foreach": None,
        "capturable": False,
        "differentiable": False,
        "fused": None,
        "decoupled_weight_decay": False,
    }

    def __init__(
        self,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
    ) -> None:
        super().__init__(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
        )

    @classmethod
    def _validated(cls, h: dict[str, Any]) -> dict[str, Any]:
        return {
            "lr": _lr(h["lr"]),
            "betas": _betas(h["betas"]),
            "eps": _at_least_zero("eps", h["eps"]),
            "weight_decay": _at_least_zero("weight_decay", h["weight_decay"]),
            "amsgrad": _v.flag("amsgrad", h["amsgrad"]),
            "maximize": _v.flag("maximize", h["maximize"]),
        }


class AdamW(Adam):
    """AdamW, as ``torch.optim.AdamW``: Adam with decoupled weight decay.

    Each step first shrinks the parameters, ``p = p * (1 - lr * weight_decay)``, then takes
    :class:`Adam`'s step without weight decay in the gradient.

    Parameters
    ----------
    lr : float, default 1e-3
        Learning rate, finite and > 0.
    betas : (float, float), default (0.9, 0.999)
        Decay rates of the first and second moments, each in [0, 1).
    eps : float, default 1e-8
        Added to the denominator, >= 0.
    weight_decay : float, default 1e-2
        Decoupled weight decay coefficient, >= 0.
    amsgrad : bool, default False
        Use the maximum of the second moments so far.
    maximize : bool, default False
        Maximize the objective instead of minimizing it.

    Examples
    --------
    >>> import gradchain as gc
    >>> gc.optim.AdamW(lr=3e-4)
    AdamW(lr=0.0003, betas=(0.9, 0.999), eps=1e-08, weight_decay=0.01, amsgrad=False, maximize=False)
    """

    kind = "adamw"
    _TORCH_FLAGS: ClassVar[dict[str, Any]] = {**Adam._TORCH_FLAGS, "decoupled_weight_decay": True}

    def __init__(
        self,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
    ) -> None:
        super().__init__(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
        )


class RMSprop(Optimizer):
    """RMSprop, as ``torch.optim.RMSprop``.

    Per step, with ``g`` the gradient (negated if `maximize`)::

        g = g + weight_decay * p
        v = alpha * v + (1 - alpha) * g**2          (square_avg)
        a = alpha * a + (1 - alpha) * g             (grad_avg, centered only)
        d = sqrt(v - a**2 if centered else v) + eps
        b = momentum * b + g / d; p = p - lr * b    (momentum_buffer, momentum > 0)
        p = p - lr * g / d                          (momentum == 0)

    Parameters
    ----------
    lr : float, default 1e-2
        Learning rate, finite and > 0.
    alpha : float, default 0.99
        Smoothing constant, >= 0.
    eps : float, default 1e-8
        Added to the denominator, >= 0.
    weight_decay : float, default 0
        L2 penalty added to the gradient, >= 0.
    momentum : float, default 0
        Momentum factor, >= 0.
    centered : bool, default False
        Normalize by the estimated variance of the gradient instead of its second moment.
    maximize : bool, default False
        Maximize the objective instead of minimizing it.

    Examples
    --------
    >>> import gradchain as gc
    >>> gc.optim.RMSprop(momentum=0.9, centered=True)
    RMSprop(lr=0.01, alpha=0.99, eps=1e-08, weight_decay=0.0, momentum=0.9, centered=True, maximize=False)
    """

    kind = "rmsprop"
    _ARGS = ("lr", "alpha", "eps", "weight_decay", "momentum", "centered", "maximize")
    _TORCH_KEYS = (
        "lr",
        "momentum",
        "alpha",
        "eps",
        "centered",
        "weight_decay",
        "capturable",
        "foreach",
        "maximize",
        "differentiable",
    )
    _TORCH_FLAGS: ClassVar[dict[str, Any]] = {
        "capturable": False,
        "foreach": None,
        "differentiable": False,
    }

    def __init__(
        self,
        lr: float = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum: float = 0,
        centered: bool = False,
        *,
        maximize: bool = False,
    ) -> None:
        super().__init__(
            lr=lr,
            alpha=alpha,
            eps=eps,
            weight_decay=weight_decay,
            momentum=momentum,
            centered=centered,
            maximize=maximize,
        )

    @classmethod
    def _validated(cls, h: dict[str, Any]) -> dict[str, Any]:
        return {
            "lr": _lr(h["lr"]),
            "alpha": _at_least_zero("alpha", h["alpha"]),
            "eps": _at_least_zero("eps", h["eps"]),
            "weight_decay": _at_least_zero("weight_decay", h["weight_decay"]),
            "momentum": _at_least_zero("momentum", h["momentum"]),
            "centered": _v.flag("centered", h["centered"]),
            "maximize": _v.flag("maximize", h["maximize"]),
        }


class Adagrad(Optimizer):
    """Adagrad, as ``torch.optim.Adagrad`` (dense gradients).

    Per step ``t``, with ``g`` the gradient (negated if `maximize`)::

        g = g + weight_decay * p
        s = s + g**2                  (sum, starting at initial_accumulator_value)
        p = p - lr / (1 + (t - 1) * lr_decay) * g / (sqrt(s) + eps)

    Parameters
    ----------
    lr : float, default 1e-2
        Learning rate, finite and > 0.
    lr_decay : float, default 0
        Learning-rate decay, >= 0.
    weight_decay : float, default 0
        L2 penalty added to the gradient, >= 0.
    initial_accumulator_value : float, default 0
        The starting value of the sum of squared gradients, >= 0.
    eps : float, default 1e-10
        Added to the denominator, >= 0.
    maximize : bool, default False
        Maximize the objective instead of minimizing it.

    Examples
    --------
    >>> import gradchain as gc
    >>> gc.optim.Adagrad(lr=0.1, lr_decay=1e-3)
    Adagrad(lr=0.1, lr_decay=0.001, weight_decay=0.0, initial_accumulator_value=0.0, eps=1e-10, maximize=False)
    """

    kind = "adagrad"
    _ARGS = ("lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps", "maximize")
    _TORCH_KEYS = (
        "lr",
        "lr_decay",
        "eps",
        "weight_decay",
        "initial_accumulator_value",
        "foreach",
        "maximize",
        "differentiable",
        "fused",
    )
    _TORCH_FLAGS: ClassVar[dict[str, Any]] = {
        "foreach": None,
        "differentiable": False,
        "fused": None,
    }

    def __init__(
        self,
        lr: float = 1e-2,
        lr_decay: float = 0,
        weight_decay: float = 0,
        initial_accumulator_value: float = 0,
        eps: float = 1e-10,
        *,
        maximize: bool = False,
    ) -> None:
        super().__init__(
            lr=lr,
            lr_decay=lr_decay,
            weight_decay=weight_decay,
            initial_accumulator_value=initial_accumulator_value,
            eps=eps,
            maximize=maximize,
        )

    @classmethod
    def _validated(cls, h: dict[str, Any]) -> dict[str, Any]:
        return {
            "lr": _lr(h["lr"]),
            "lr_decay": _at_least_zero("lr_decay", h["lr_decay"]),
            "weight_decay": _at_least_zero("weight_decay", h["weight_decay"]),
            "initial_accumulator_value": _at_least_zero(
                "initial_accumulator_value", h["initial_accumulator_value"]
            ),
            "eps": _at_least_zero("eps", h["eps"]),
            "maximize": _v.flag("maximize", h["maximize"]),
        }
