"""Parameter sweeps: one measurement over the cartesian product of named dimensions.

Every point of a sweep is a chain built from its configuration and a seed, measured, and
reduced to a few named float64 values; only configurations, seeds and those values travel
between processes, never weights. Points run on the core's own threads by default (one
core per point, the GIL released), or on any ``concurrent.futures.Executor`` or
``dask.distributed.Client``, with the same values bit for bit.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import json
import math
import numbers
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import _core
from . import _validate as v
from ._progress import progress_bar
from .mlp import MLP
from .rnn import RNN

__all__ = ["MEASURES", "SweepResult", "sweep"]

MEASURES: tuple[str, ...] = ("growth", "backward", "spectrum", "train")

_GROWTH = ("growth", "growth_stderr", "log10_first", "log10_last")
_VALUES: dict[str, tuple[str, ...]] = {
    "growth": _GROWTH,
    "backward": (
        "loss",
        "total_norm",
        "log10_total_norm",
        "log10_first_weight_grad_norm",
        "log10_last_weight_grad_norm",
        "log10_ratio",
        *_GROWTH,
    ),
    "spectrum": ("max_lyapunov", "min_lyapunov", "log10_condition"),
    "train": ("final_loss", "min_loss", "diagnosis_code", "log10_final_total_norm"),
}
# The arguments each measurement takes (besides the chain and the random generator); a
# dimension or `measure_kwargs` may set any of them.
_MEASURE_ARGS: dict[str, tuple[str, ...]] = {
    "growth": ("batch", "steps", "loss"),
    "backward": ("batch", "steps", "loss", "max_norm", "norm_type"),
    "spectrum": ("batch", "steps", "k", "interval"),
    "train": ("batch", "steps", "optimizer", "data", "n", "max_norm", "clip_value", "loss"),
}
_DEFAULT_BATCH = {"growth": 32, "backward": 32, "spectrum": 1, "train": 32}
_ON_ERROR = ("record", "raise")
_DRAWS = ("common", "independent")
# The arguments of gc.MLP that only change the drawn values: a worker redraws them into
# the chain it already holds.
_REDRAWN = ("gain", "sigma_w", "bias_std", "seed")


# ---------------------------------------------------------------------------------------
# The measurements (run inside the workers)
# ---------------------------------------------------------------------------------------
def _slope(y: np.ndarray) -> tuple[float, float]:
    """Least-squares slope of y against its index and the slope's standard error, over
    the finite entries (NaN with fewer than three)."""
    x = np.arange(y.size, dtype=np.float64)
    ok = np.isfinite(y)
    if ok.sum() < 3:
        return math.nan, math.nan
    x, y = x[ok], y[ok]
    xc = x - x.mean()
    sxx = float(xc @ xc)
    b = float(xc @ (y - y.mean())) / sxx
    resid = y - y.mean() - b * xc
    se = math.sqrt(float(resid @ resid) / (x.size - 2) / sxx)
    return b, se


def _growth_values(log10_norms: np.ndarray) -> dict[str, float]:
    """`log10_norms` run from the input to the output; the gradient travels the other way,
    so its per-layer growth is the slope taken from the output back."""
    g, se = _slope(np.asarray(log10_norms, dtype=np.float64)[::-1])
    return {
        "growth": g,
        "growth_stderr": se,
        "log10_first": float(log10_norms[0]),
        "log10_last": float(log10_norms[-1]),
    }


def _inputs(net: Any, rng: np.random.Generator, batch: int, steps: int) -> np.ndarray:
    if isinstance(net, RNN):
        return rng.standard_normal((steps, batch, net.input_size))
    width = net.widths[0] if isinstance(net, MLP) else net.in_features
    return rng.standard_normal((batch, width))


def _measure_growth(
    net: Any, rng: np.random.Generator, *, batch: int, steps: int = 100, loss: str = "probe"
) -> dict[str, float]:
    x = _inputs(net, rng, batch, steps)
    if isinstance(net, RNN):
        return _growth_values(net.backward(x, loss=loss).log10_state_grad_norms)
    if loss != "probe":
        raise ValueError(
            f"measure 'growth' of a chain takes loss='probe' (targets are the "
            f"'backward' measurement's); got {loss!r}"
        )
    # Only the boundary norms are needed: the pass skips the parameter gradients.
    core = net._net if isinstance(net, MLP) else net
    d, _ = core._run(x, None, "probe", None, False, None, 2.0, None, param_grads=False)
    lb = d["log10_boundary_grad_norms"]
    return _growth_values(lb[net._layer_ends] if isinstance(net, MLP) else lb)


def _targets(net: Any, rng: np.random.Generator, x: np.ndarray, loss: str) -> Any:
    """Random targets for a supervised loss: standard normal outputs or uniform labels."""
    if loss == "probe":
        return None
    if isinstance(net, RNN):
        out = net.output_size or net.hidden_size
        shape: tuple[int, ...] = (x.shape[1],)
    else:
        out = net.widths[-1] if isinstance(net, MLP) else net.out_features
        shape = (x.shape[0],)
    if loss == "cross_entropy":
        return rng.integers(0, out, size=shape)
    return rng.standard_normal((*shape, out))


def _measure_backward(
    net: Any,
    rng: np.random.Generator,
    *,
    batch: int,
    steps: int = 100,
    loss: str = "probe",
    max_norm: float | None = None,
    norm_type: float | str = 2.0,
) -> dict[str, float]:
    x = _inputs(net, rng, batch, steps)
    rep = net.backward(
        x, _targets(net, rng, x, loss), loss=loss, max_norm=max_norm, norm_type=norm_type
    )
    if isinstance(net, RNN):
        names = [k for k in rep.param_names if "weight" in k]
        growth = _growth_values(rep.log10_state_grad_norms)
    elif isinstance(net, MLP):
        names = []
        growth = _growth_values(rep.log10_activation_grad_norms)
    else:
        names = [k for k in rep.param_names if k.endswith("weight")]
        growth = _growth_values(rep.log10_activation_grad_norms)
    if isinstance(net, MLP):
        lw = rep.log10_weight_grad_norms
        first, last = float(lw[0]), float(lw[-1])
    elif names:
        lp = rep.log10_param_grad_norms
        first, last = float(lp[names[0]]), float(lp[names[-1]])
    else:
        first = last = math.nan
    return {
        "loss": float(rep.loss),
        "total_norm": float(rep.total_norm),
        "log10_total_norm": float(rep.log10_total_norm),
        "log10_first_weight_grad_norm": first,
        "log10_last_weight_grad_norm": last,
        "log10_ratio": first - last,
        **growth,
    }


def _measure_spectrum(
    net: Any,
    rng: np.random.Generator,
    *,
    batch: int,
    steps: int = 100,
    k: int | None = None,
    interval: int = 1,
) -> dict[str, float]:
    from .jacobian import jacobian_spectrum

    spec = jacobian_spectrum(net, _inputs(net, rng, batch, steps), k=k, interval=interval, seed=0)
    lam = np.asarray(spec.lyapunov_exponents_mean, dtype=np.float64)
    lsv = np.asarray(spec.log10_singular_values, dtype=np.float64)
    last = lsv.reshape(-1, lsv.shape[-1])[-lsv.shape[-2] :] if lsv.ndim == 3 else lsv[-1:]
    cond = np.max(last, axis=-1) - np.min(last, axis=-1)
    return {
        "max_lyapunov": float(np.max(lam)),
        "min_lyapunov": float(np.min(lam)),
        "log10_condition": float(np.mean(cond)),
    }


def _measure_train(
    net: Any,
    rng: np.random.Generator,
    *,
    batch: int,
    steps: int = 100,
    optimizer: Any = None,
    data: Any = None,
    n: int = 256,
    max_norm: float | None = None,
    clip_value: float | None = None,
    loss: str | None = None,
) -> dict[str, float]:
    from . import optim, tasks
    from .diagnose import KINDS
    from .train import train

    seed = int(rng.integers(0, 2**63))
    if data is None:
        if isinstance(net, RNN):
            raise ValueError(
                "measure 'train' of an RNN needs data: measure_kwargs=dict(data=...) (a task, "
                "a dataset, an (x, y) tuple or a function of a numpy Generator returning one)"
            )
        widths = net.widths
        data = tasks.teacher_student(
            n, widths[0], out_features=widths[-1], seed=seed % 2**32, activation="tanh"
        )
    elif callable(data) and not hasattr(data, "x"):
        data = data(rng)
    # An optimizer keeps state from call to call: every point starts from a fresh copy.
    opt = optim.SGD(lr=0.01) if optimizer is None else copy.deepcopy(optimizer)
    hist = train(
        net,
        data,
        optimizer=opt,
        steps=steps,
        batch_size=batch,
        max_norm=max_norm,
        clip_value=clip_value,
        loss=loss,
        seed=seed,
    )
    losses = np.asarray(hist.loss, dtype=np.float64)
    return {
        "final_loss": float(losses[-1]),
        "min_loss": float(np.nanmin(losses)) if np.isfinite(losses).any() else math.nan,
        "diagnosis_code": float(KINDS.index(hist.diagnose().kind)),
        "log10_final_total_norm": float(np.asarray(hist.log10_total_norm)[-1]),
    }


_MEASURES: dict[str, Callable[..., dict[str, float]]] = {
    "growth": _measure_growth,
    "backward": _measure_backward,
    "spectrum": _measure_spectrum,
    "train": _measure_train,
}


# ---------------------------------------------------------------------------------------
# One point: what travels to a worker, and what comes back
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Plan:
    """What every point of a sweep shares (pickled once per task, a few hundred bytes)."""

    target: Any
    measure: Any  # a name of _MEASURES or the user's callable
    fixed_build: dict[str, Any]
    fixed_measure: dict[str, Any]
    takes_seed: bool
    root_seed: int
    common: bool  # draws="common": the seed label alone picks the draws
    reuse: bool  # keep one chain per thread between points, redrawn or rescaled
    release: bool  # drop it at the end of each task (an executor's workers outlive a sweep)
    token: str


@dataclass(frozen=True)
class _Task:
    index: int  # flat index into the grid
    point: int  # flat index of the point without the seed axis
    seed_label: int
    build: dict[str, Any]
    measure: dict[str, Any]


# The chain each worker thread keeps between the points of a sweep, by thread id: a dict
# (not thread-local storage) so that _release can drop them all from any thread, as
# dask's Client.run does on each worker once the sweep is over.
_held: dict[int, tuple[tuple[str, str], MLP]] = {}


def _cached_chain(plan: _Plan, build: dict[str, Any]) -> Any:
    """An MLP of this point's shape with this point's parameters: the thread's previous
    chain redrawn when its shape matches (only rescaled when the seed is the same too),
    else a new one (which the thread then keeps)."""
    shape = {k: x for k, x in build.items() if k not in _REDRAWN}
    key = (plan.token, repr(sorted(shape.items())))
    me = threading.get_ident()
    held = _held.get(me)
    if held is not None and held[0] == key:
        net = held[1]
        defaults = _signature_defaults(MLP)
        net._reinit(**{k: build.get(k, defaults[k]) for k in _REDRAWN})
        return net
    _held.pop(me, None)  # free the old chain before building the new one
    net = MLP(**build)
    _held[me] = (key, net)
    return net


def _release() -> None:
    """Drops the chains the threads of this process keep between points."""
    _held.clear()


def _point_seeds(plan: _Plan, task: _Task) -> tuple[int, np.random.Generator]:
    """(the chain's seed, the generator of its inputs), from the root's child
    ``spawn_key=(seed_label,)`` with common draws, else ``(point, seed_label)``."""
    key = (task.seed_label,) if plan.common else (task.point, task.seed_label)
    ss = np.random.SeedSequence(plan.root_seed, spawn_key=key)
    chain_seed = int(ss.generate_state(1, np.uint64)[0])
    return chain_seed, np.random.default_rng(ss.spawn(1)[0])


def _evaluate(plan: _Plan, task: _Task) -> tuple[int, dict[str, float] | None, str | None]:
    """Runs one point on the calling thread with the core on one thread: (index, values,
    error). Pure: the result depends on the plan and the task only."""
    old = _core.set_thread_limit(1)
    try:
        chain_seed, rng = _point_seeds(plan, task)
        build = {**plan.fixed_build, **task.build}
        if plan.takes_seed:
            build["seed"] = chain_seed
        kw = {**plan.fixed_measure, **task.measure}
        if plan.reuse:
            net = _cached_chain(plan, build)
        else:
            net = plan.target(**build)
        if isinstance(plan.measure, str):
            out: Any = _MEASURES[plan.measure](net, rng, **kw)
        else:
            out = plan.measure(net, rng, **kw)
        return task.index, _as_values(out), None
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001 - recorded at its point, as documented
        return task.index, None, f"{type(exc).__name__}: {exc}"
    finally:
        _core.set_thread_limit(old)


def _evaluate_many(plan: _Plan, tasks: Sequence[_Task]) -> list[tuple[int, Any, Any]]:
    """A chunk of points in one task (fewer round trips through an executor)."""
    try:
        return [_evaluate(plan, t) for t in tasks]
    finally:
        if plan.release:
            _held.pop(threading.get_ident(), None)


def _as_values(out: Any) -> dict[str, float]:
    if isinstance(out, Mapping):
        return {str(k): float(x) for k, x in out.items()}
    if isinstance(out, numbers.Real):
        return {"value": float(out)}
    raise TypeError(
        f"a measurement must return a dict of floats or a float; got {type(out).__name__}"
    )


# ---------------------------------------------------------------------------------------
# Checking the request
# ---------------------------------------------------------------------------------------
def _signature_defaults(target: Any) -> dict[str, Any]:
    sig = inspect.signature(target)
    return {
        k: p.default
        for k, p in sig.parameters.items()
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and k != "self"
    }


def _accepts_any(fn: Any) -> bool:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return True
    return any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())


def _measure_params(measure: Any) -> tuple[str, ...]:
    if isinstance(measure, str):
        return _MEASURE_ARGS[measure]
    try:
        params = list(inspect.signature(measure).parameters.values())
    except (TypeError, ValueError):
        return ()
    return tuple(p.name for p in params[2:] if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))


def _coords(name: str, values: Any) -> np.ndarray:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise TypeError(f"dims[{name!r}] must be a sequence or 1-D array of values; got {values!r}")
    arr = np.asarray(values)
    if arr.ndim != 1:
        arr = np.empty(len(values), dtype=object)
        arr[:] = list(values)
    if arr.size == 0:
        raise ValueError(f"dims[{name!r}] is empty: a sweep needs at least one value per dimension")
    return arr


def _item(a: np.ndarray, i: int) -> Any:
    x = a[i]
    return x.item() if isinstance(x, np.generic) else x


def _check_executor(executor: Any) -> str:
    if executor is None:
        return "threads"
    if isinstance(executor, Executor):
        return "executor"
    cls = type(executor)
    if cls.__module__.split(".")[0] == "distributed" and hasattr(executor, "map"):
        return "dask"
    raise TypeError(
        "executor must be None (the core's own threads), a concurrent.futures.Executor or a "
        f"dask.distributed.Client; got {cls.__module__}.{cls.__qualname__}"
    )


def _local_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not on Linux
        return max(1, os.cpu_count() or 1)


def _point_bytes(
    target: Any, build: dict[str, Any], kw: dict[str, Any], units: bool = False
) -> float:
    """Memory one point of an MLP or RNN sweep takes: its parameters (and the unit draws
    a reused MLP keeps, in double) and its pass (the boundaries it keeps, a few times over
    for the backward pass and the scratch); 0 where it is not known in advance (the core
    still checks as it allocates)."""
    try:
        dt = np.dtype(build.get("dtype", "float64")).itemsize
        batch = int(kw.get("batch", 32))
        if target is MLP:
            width, depth = build.get("width", 64), build.get("depth")
            widths = (
                [int(width)] * (int(depth) + 1) if depth is not None else [int(w) for w in width]
            )
            params = sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))
            return float(dt * (params + 3 * batch * sum(widths)) + (8 * params if units else 0))
        if target is RNN:
            gates = {"tanh": 1, "relu": 1, "lstm": 4, "gru": 3}[build.get("cell", "tanh")]
            h, i = int(build.get("hidden_size", 64)), int(build.get("input_size", 1))
            layers = int(build.get("num_layers", 1))
            params = gates * h * (i + h + 2) + (layers - 1) * gates * h * (2 * h + 2)
            steps = int(kw.get("steps", 100))
            return float(dt * (params + 3 * steps * batch * gates * h * layers))
    except (TypeError, ValueError, KeyError):
        return 0.0
    return 0.0


# ---------------------------------------------------------------------------------------
# Running the tasks
# ---------------------------------------------------------------------------------------
def _guided_chunks(tasks: list[_Task], workers: int) -> list[list[_Task]]:
    """The tasks in chunks of decreasing size, each a quarter of what is left per worker:
    few round trips through an executor or a scheduler (a few dozen for a thousand
    points), and chunks of one point at the end, so that the workers finish together."""
    out, i = [], 0
    while i < len(tasks):
        size = max(1, (len(tasks) - i) // (4 * workers))
        out.append(tasks[i : i + size])
        i += size
    return out


def _progress_bar(total: int, enabled: bool) -> Any:
    return progress_bar(total, "sweep", "point") if enabled else None


def _drain(futures: list[Any], done: Callable[[list[Any]], bool]) -> None:
    """Hand each finished task's results to `done` until it says stop; cancel the rest."""
    try:
        for f in as_completed(futures):
            if done(f.result()):
                break
    finally:
        for f in futures:
            f.cancel()


def _run_threads(
    plan: _Plan, tasks: list[_Task], workers: int, done: Callable[[list[Any]], bool]
) -> None:
    # Runs of neighbouring points on one thread: its chain changes one argument at a time
    # (an MLP then rescales, or keeps, its weights).
    with ThreadPoolExecutor(workers, thread_name_prefix="gradchain-sweep") as ex:
        _drain([ex.submit(_evaluate_many, plan, c) for c in _guided_chunks(tasks, workers)], done)
    _release()


def _run_executor(
    plan: _Plan, tasks: list[_Task], ex: Executor, done: Callable[[list[Any]], bool]
) -> None:
    workers = getattr(ex, "_max_workers", None) or _local_workers()
    _drain([ex.submit(_evaluate_many, plan, c) for c in _guided_chunks(tasks, int(workers))], done)


def _run_dask(
    plan: _Plan, tasks: list[_Task], client: Any, done: Callable[[list[Any]], bool]
) -> None:
    from distributed import as_completed as dask_completed

    workers = max(1, sum(client.nthreads().values()))
    chunks = _guided_chunks(tasks, workers)
    [plan_future] = client.scatter([plan], broadcast=True, hash=False)
    keys = [f"gradchain-sweep-{plan.token}-{i}" for i in range(len(chunks))]
    futures = client.map(_evaluate_many, [plan_future] * len(chunks), chunks, key=keys)
    try:
        for f in dask_completed(futures):
            if done(f.result()):
                break
    finally:
        client.cancel([*futures, plan_future])
        if plan.reuse:
            client.run(_release)


# ---------------------------------------------------------------------------------------
# The result
# ---------------------------------------------------------------------------------------
def _json_value(x: Any) -> Any:
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return {"float": repr(x)}
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if isinstance(x, (list, tuple)):
        return [_json_value(y) for y in x]
    if isinstance(x, Mapping):
        return {str(k): _json_value(y) for k, y in x.items()}
    if isinstance(x, type) or callable(x):
        return f"{getattr(x, '__module__', '?')}.{getattr(x, '__qualname__', repr(x))}"
    return repr(x)


def _from_json(x: Any) -> Any:
    if isinstance(x, dict) and set(x) == {"float"}:
        return float(x["float"])
    if isinstance(x, list):
        return [_from_json(y) for y in x]
    if isinstance(x, dict):
        return {k: _from_json(y) for k, y in x.items()}
    return x


@dataclass(eq=False)
class SweepResult:
    """The values a :func:`sweep` measured at every point of its grid.

    Attributes
    ----------
    dims : dict of str to ndarray
        The coordinates of every dimension, in grid order: the dimensions asked for, then
        ``"seed"`` (the seed labels: ``0 .. seeds - 1`` or the ones given).
    fixed : dict
        The arguments every point shared (constructor and measurement arguments).
    measure : str
        The measurement's name, or the ``__qualname__`` of the function measured.
    values : dict of str to ndarray
        Every measured value, float64, of shape ``tuple(len(c) for c in dims.values())``;
        NaN where the point failed.
    errors : dict of tuple to str
        ``"ExceptionType: message"`` of every point that failed, by its index into the grid.
    attrs : dict
        Further facts: ``target``, ``seed`` (the root seed), ``elapsed`` (seconds),
        ``executor``, and ``diagnosis_kinds`` for ``measure="train"``.
    """

    dims: dict[str, np.ndarray]
    fixed: dict[str, Any]
    measure: str
    values: dict[str, np.ndarray]
    errors: dict[tuple[int, ...], str] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)

    # -- shape -------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        """``tuple(len(c) for c in dims.values())``."""
        return tuple(len(c) for c in self.dims.values())

    @property
    def size(self) -> int:
        """Number of grid points (seeds included)."""
        return int(np.prod(self.shape))

    def _var(self, var: str) -> np.ndarray:
        if var not in self.values:
            listed = ", ".join(repr(k) for k in self.values)
            raise KeyError(f"no value {var!r} in this sweep; it has {listed}")
        return self.values[var]

    def mean(self, var: str) -> np.ndarray:
        """`var` averaged over the seeds (NaN-ignoring; NaN where every seed failed)."""
        a = self._var(var)
        axis = list(self.dims).index("seed")
        ok = np.isfinite(a)
        n = ok.sum(axis=axis)
        s = np.where(ok, a, 0.0).sum(axis=axis)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(n > 0, s / np.maximum(n, 1), np.nan)

    def stderr(self, var: str) -> np.ndarray:
        """Standard error of :meth:`mean` over the seeds (``std(ddof=1) / sqrt(n)``; NaN
        with fewer than two finite seeds)."""
        a = self._var(var)
        axis = list(self.dims).index("seed")
        ok = np.isfinite(a)
        n = ok.sum(axis=axis)
        m = np.expand_dims(self.mean(var), axis)
        d = np.where(ok, a - m, 0.0)
        ss = (d * d).sum(axis=axis)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(n > 1, np.sqrt(ss / np.maximum(n - 1, 1) / np.maximum(n, 1)), np.nan)

    # -- conversions ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain values that ``json.dumps`` accepts (non-finite floats as
        ``{"float": "nan"}``, arrays as nested lists)."""
        return {
            "dims": {k: _json_value(c.tolist()) for k, c in self.dims.items()},
            "fixed": _json_value(self.fixed),
            "measure": self.measure,
            "values": {k: _json_value(a.tolist()) for k, a in self.values.items()},
            "errors": [[list(i), e] for i, e in sorted(self.errors.items())],
            "attrs": _json_value(self.attrs),
        }

    @property
    def data(self) -> Any:
        """An ``xarray.Dataset`` (:meth:`to_xarray`) when xarray is installed, else
        :meth:`to_dict`."""
        try:
            import xarray  # noqa: F401
        except ImportError:
            return self.to_dict()
        return self.to_xarray()

    def to_xarray(self) -> Any:
        """An ``xarray.Dataset``: the dims as coordinates, one data variable per value,
        ``fixed`` and ``attrs`` among its attrs (as JSON text where not plain)."""
        try:
            import xarray as xr
        except ImportError:
            raise ImportError(
                "to_xarray needs xarray: pip install 'gradchain[sweep]' (or xarray)"
            ) from None
        names = list(self.dims)
        attrs = {"measure": self.measure, "fixed": json.dumps(_json_value(self.fixed))}
        attrs.update({k: json.dumps(_json_value(x)) for k, x in self.attrs.items()})
        return xr.Dataset(
            {k: (names, a) for k, a in self.values.items()},
            coords={k: c for k, c in self.dims.items()},
            attrs=attrs,
        )

    def to_pandas(self) -> Any:
        """A long ``pandas.DataFrame``: one row per grid point, a column per dimension and
        per value, and ``error`` (None where the point ran)."""
        try:
            import pandas as pd
        except ImportError:
            raise ImportError(
                "to_pandas needs pandas: pip install 'gradchain[sweep]' (or pandas)"
            ) from None
        grids = np.meshgrid(*self.dims.values(), indexing="ij")
        cols: dict[str, Any] = {k: g.ravel() for k, g in zip(self.dims, grids)}
        cols.update({k: a.ravel() for k, a in self.values.items()})
        errs = [self.errors.get(i) for i in np.ndindex(*self.shape)]
        cols["error"] = errs
        return pd.DataFrame(cols)

    # -- saving ----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes the result to one ``.npz`` file (arrays exactly, the rest as JSON
        metadata); :meth:`load` reads it back equal."""
        meta = {
            "dims": list(self.dims),
            "fixed": _json_value(self.fixed),
            "measure": self.measure,
            "values": list(self.values),
            "errors": [[list(i), e] for i, e in sorted(self.errors.items())],
            "attrs": _json_value(self.attrs),
            "format": 1,
        }
        arrays = {f"dim_{i}": c for i, c in enumerate(self.dims.values())}
        arrays.update({f"value_{i}": a for i, a in enumerate(self.values.values())})
        for k, a in arrays.items():
            if a.dtype == object:
                raise ValueError(
                    f"cannot save a sweep whose coordinates are Python objects ({k}); "
                    "use numbers or strings as dimension values"
                )
        with open(path, "wb") as f:
            np.savez(f, meta=np.array(json.dumps(meta)), **arrays)  # type: ignore[arg-type]

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SweepResult:
        """Reads a result written by :meth:`save`."""
        with np.load(Path(path), allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            dims = {k: z[f"dim_{i}"] for i, k in enumerate(meta["dims"])}
            values = {k: z[f"value_{i}"] for i, k in enumerate(meta["values"])}
        return cls(
            dims=dims,
            fixed=_from_json(meta["fixed"]),
            measure=meta["measure"],
            values=values,
            errors={tuple(i): e for i, e in meta["errors"]},
            attrs=_from_json(meta["attrs"]),
        )

    # -- theory ------------------------------------------------------------------------------
    def theory(self) -> dict[str, np.ndarray]:
        """Mean-field ``chi_1`` over the sweep's (sigma_w, bias_std) dims, and
        ``log10_chi_1_half`` (``0.5 * log10(chi_1)``: the per-layer log10 growth of gradient
        norms that ``growth`` estimates), each of shape ``(len(sigma_w), len(bias_std))``.

        Raises
        ------
        ValueError
            When the sweep is not of ``gc.MLP`` with ``init="normal"`` and a sigma_w and
            bias_std (dims or fixed) and an activation the theory knows.
        """
        from . import theory as th

        if self.attrs.get("target") != "gradchain.mlp.MLP":
            raise ValueError(
                f"theory() needs a sweep of gc.MLP; this one is of {self.attrs.get('target')}"
            )
        if self.fixed.get("init") != "normal":
            raise ValueError(
                "theory() needs init='normal' among the fixed arguments (W ~ N(0, sigma_w**2 / n)); "
                f"got init={self.fixed.get('init')!r}"
            )
        extra = [k for k in self.dims if k not in ("sigma_w", "bias_std", "seed")]
        if extra:
            raise ValueError(
                f"theory() needs dims among sigma_w and bias_std only; got also {extra}"
            )
        act = self.fixed.get("activation", "tanh")
        sw = self.dims.get("sigma_w", np.array([self.fixed.get("sigma_w", 1.0)]))
        sb = self.dims.get("bias_std", np.array([self.fixed.get("bias_std", 0.0)]))
        kw = {k: self.fixed[k] for k in ("negative_slope", "alpha") if k in self.fixed}
        c1 = np.asarray(th.chi_1(act, sw[:, None], sb[None, :], **kw), dtype=np.float64)
        with np.errstate(divide="ignore"):
            return {"chi_1": c1, "log10_chi_1_half": 0.5 * np.log10(c1)}

    # -- display -----------------------------------------------------------------------------
    def __repr__(self) -> str:
        shape = " x ".join(f"{k}={len(c)}" for k, c in self.dims.items())
        failed = f", {len(self.errors)} failed" if self.errors else ""
        return f"SweepResult(measure={self.measure!r}, {shape}, values={list(self.values)}{failed})"

    def _repr_html_(self) -> str:
        import html

        rows = [
            f"<tr><th>{html.escape(k)}</th><td>{len(c)}</td><td>{html.escape(_span(c))}</td></tr>"
            for k, c in self.dims.items()
        ]
        vals = "".join(
            f"<tr><th>{html.escape(k)}</th><td colspan=2>{html.escape(_span(a.ravel()))}</td></tr>"
            for k, a in self.values.items()
        )
        return (
            f"<table><caption>SweepResult: {html.escape(self.measure)}, "
            f"{self.size} points, {len(self.errors)} failed</caption>"
            "<tr><th>dim</th><th>size</th><th>values</th></tr>" + "".join(rows) + vals + "</table>"
        )


def _span(a: np.ndarray) -> str:
    if a.dtype.kind in "fiu":
        f = a[np.isfinite(a)] if a.dtype.kind == "f" else a
        if f.size == 0:
            return "all NaN"
        return f"{np.min(f):.4g} .. {np.max(f):.4g}"
    return ", ".join(str(x) for x in a[:6]) + (" ..." if a.size > 6 else "")


# ---------------------------------------------------------------------------------------
# gc.sweep
# ---------------------------------------------------------------------------------------
def sweep(
    target: Any,
    dims: Mapping[str, Any],
    *,
    fixed: Mapping[str, Any] | None = None,
    measure: str | Callable[..., Any] = "growth",
    seeds: int | Sequence[int] = 1,
    executor: Any = None,
    batch: int | None = None,
    seed: int = 0,
    draws: str = "common",
    progress: bool = False,
    on_error: str = "record",
    measure_kwargs: Mapping[str, Any] | None = None,
    workers: int | None = None,
) -> SweepResult:
    """Measure a chain at every point of a grid of its arguments.

    Parameters
    ----------
    target : gc.MLP, gc.RNN or callable
        What to build at each point: ``target(**point)`` with the point's dims, the
        `fixed` arguments and ``seed=`` (when it takes one). Any picklable function that
        returns an MLP, a Chain or an RNN will do (a process pool or a cluster pickles it).
    dims : dict of str to sequence
        The grid: the cartesian product of these values, in this order. A name may be any
        argument of `target`, any argument of the measurement (``batch``, ``loss``,
        ``steps``...) or ``"seed"`` (then the seed labels; not together with `seeds`).
    fixed : dict, optional
        Arguments every point shares (of `target` or of the measurement).
    measure : str or callable
        ``"growth"``: ``growth``, the least-squares slope of log10 ``||dL/dh_l||`` against
        the layer (or time step) ``l`` (log10 of the per-layer factor; < 0 vanishing, > 0
        exploding), ``growth_stderr`` its standard error, ``log10_first``, ``log10_last``
        (the norms at the input and at the output). The probe loss, standard normal
        inputs.
        ``"backward"``: ``loss``, ``total_norm``, ``log10_total_norm``,
        ``log10_first_weight_grad_norm``, ``log10_last_weight_grad_norm``, ``log10_ratio``
        (first minus last), and the growth values (random targets for ``mse`` and
        ``cross_entropy``).
        ``"spectrum"``: ``max_lyapunov``, ``min_lyapunov`` (natural log per layer, the
        mean over the batch of :func:`jacobian_spectrum`'s exponents), ``log10_condition``
        (of the whole product).
        ``"train"``: ``final_loss``, ``min_loss``, ``diagnosis_code`` (an index into
        ``attrs["diagnosis_kinds"]``), ``log10_final_total_norm``; ``steps`` optimizer
        steps (100) with ``optimizer`` (``gc.optim.SGD(lr=0.01)``, copied per point) on
        ``data`` (a teacher-student regression of ``n=256`` examples by default).
        A callable ``f(chain, rng, **kwargs)`` returning a dict of floats (or a float,
        named ``"value"``); ``rng`` is the point's ``numpy.random.Generator``.
    seeds : int or sequence of int
        Seeds per point: ``n`` for the labels ``0 .. n-1``, or the labels themselves.
    executor : None, concurrent.futures.Executor or dask.distributed.Client
        None runs the points on threads of this process, one core each (the core
        releases the GIL); an executor or a Client runs them there. The values are the
        same whatever runs them.
    batch : int, optional
        Examples per pass (default 32; 1 for ``"spectrum"``).
    seed : int
        The root of every point's seeds: seed label ``s`` uses the child
        ``SeedSequence(seed, spawn_key=(s,))`` of ``numpy.random.SeedSequence(seed)``
        (``spawn_key=(p, s)`` at point ``p`` with ``draws="independent"``), which gives
        the chain's seed and the point's generator (its inputs).
    draws : {"common", "independent"}
        ``"common"``: the points of one seed label share their random draws (common
        random numbers, as a loop passing ``seed=s`` to every chain would): two points
        differ by their arguments only, which keeps a phase diagram's boundary sharp, and
        an MLP redrawn with another ``sigma_w``, ``gain`` or ``bias_std`` from the same
        seed only rescales the draws it keeps (the same weights, bit for bit).
        ``"independent"``: every point draws its own.
    progress : bool
        Show a tqdm progress bar (``pip install gradchain[progress]``).
    on_error : {"record", "raise"}
        ``"record"``: a point that fails gets NaN values and its error in ``errors``, and
        the sweep carries on; ``"raise"``: the first failure stops the sweep with a
        RuntimeError naming the point.
    measure_kwargs : dict, optional
        Further arguments of the measurement (as `fixed`, for measurement arguments).
    workers : int, optional
        Threads for ``executor=None`` (default: the cores this process may use).

    Returns
    -------
    SweepResult

    Raises
    ------
    ValueError
        An unknown dimension name (the message lists the valid ones), an empty
        dimension, a bad measurement name, `on_error` or seed.
    TypeError
        An `executor` that is neither an Executor nor a dask Client.
    MemoryError
        A grid whose points, as many at once as run concurrently, need more memory than
        the machine has (the message states the bytes).

    Examples
    --------
    >>> import numpy as np, gradchain as gc
    >>> grid = gc.sweep(gc.MLP, dims={"sigma_w": [0.5, 1.0, 2.0]},
    ...                 fixed=dict(depth=20, width=16, init="normal"), seeds=2)
    >>> grid.values["growth"].shape
    (3, 2)
    """
    started = time.perf_counter()
    kind = _check_executor(executor)
    if not isinstance(dims, Mapping):
        raise TypeError(f"dims must be a dict of names to values; got {type(dims).__name__}")
    if not dims:
        raise ValueError(
            "dims is empty: a sweep needs at least one dimension, e.g. dims={'sigma_w': [1.0, 2.0]}"
        )
    fixed = dict(fixed or {})
    mkw = dict(measure_kwargs or {})
    if isinstance(measure, str):
        v.choice("measure", measure, MEASURES)
        measure_name = measure
    elif callable(measure):
        measure_name = getattr(measure, "__qualname__", repr(measure))
    else:
        raise TypeError(
            f"measure must be one of {', '.join(map(repr, MEASURES))} or a callable; got {measure!r}"
        )
    v.choice("on_error", on_error, _ON_ERROR)
    v.choice("draws", draws, _DRAWS)
    root = v.seed(seed)
    progress = v.flag("progress", progress)
    if not callable(target):
        raise TypeError(
            f"target must be gc.MLP, gc.RNN or a callable returning a chain; got {target!r}"
        )

    # Which names go to the constructor and which to the measurement.
    build_params = _signature_defaults(target)
    build_any = _accepts_any(target)
    m_params = _measure_params(measure)
    m_any = not isinstance(measure, str) and _accepts_any(measure)
    takes_seed = "seed" in build_params or build_any
    valid = sorted({*build_params, *m_params, "seed"})

    def place(name: str) -> str:
        if name == "seed":
            return "seed"
        if name in build_params:
            return "build"
        if name in m_params:
            return "measure"
        if build_any:
            return "build"
        if m_any:
            return "measure"
        raise ValueError(
            f"unknown dimension or argument {name!r} for {_target_name(target)} with measure "
            f"{measure_name!r}; valid names: {', '.join(valid)}"
        )

    coords: dict[str, np.ndarray] = {}
    for name, values in dims.items():
        if not isinstance(name, str):
            raise TypeError(f"dimension names must be strings; got {name!r}")
        place(name)
        coords[name] = _coords(name, values)
    for name in [*fixed, *mkw]:
        if place(name) == "seed":
            raise ValueError(
                "seed is set per point from the sweep's `seed` (the root) and `seeds`; "
                "pass seed= or seeds= to gc.sweep instead"
            )
    if "seed" in coords:
        if not (isinstance(seeds, numbers.Integral) and seeds == 1):
            raise ValueError("give the seed labels either as dims['seed'] or as seeds=, not both")
        labels = coords.pop("seed")
    elif isinstance(seeds, numbers.Integral) and not isinstance(seeds, bool):
        labels = np.arange(v.positive_int("seeds", seeds), dtype=np.int64)
    elif isinstance(seeds, Sequence) and not isinstance(seeds, str):
        labels = _coords("seed", list(seeds))
    else:
        raise TypeError(f"seeds must be a positive integer or a sequence of them; got {seeds!r}")
    labels = np.asarray([v.seed(_item(labels, i)) for i in range(len(labels))], dtype=np.uint64)
    if len(set(labels.tolist())) != len(labels):
        raise ValueError(f"seed labels must be distinct; got {labels.tolist()}")
    labels = labels.astype(np.int64) if labels.max() < 2**63 else labels
    coords["seed"] = labels

    fixed_build = {k: x for k, x in fixed.items() if place(k) == "build"}
    fixed_measure = {k: x for k, x in fixed.items() if place(k) == "measure"}
    fixed_measure.update(mkw)
    if isinstance(measure, str):
        fixed_measure.setdefault("batch", _DEFAULT_BATCH[measure] if batch is None else batch)
    elif batch is not None and "batch" in m_params:
        fixed_measure.setdefault("batch", batch)
    if isinstance(measure, str) and measure == "train" and "optimizer" in fixed_measure:
        fixed_measure["optimizer"] = copy.deepcopy(fixed_measure["optimizer"])

    names = [k for k in coords if k != "seed"]
    shape = tuple(len(c) for c in coords.values())
    n_points = math.prod(shape[:-1])
    n_total = n_points * shape[-1]

    by_seed: list[list[_Task]] = [[] for _ in range(shape[-1])]
    for flat, idx in enumerate(itertools.product(*(range(len(coords[k])) for k in names))):
        b: dict[str, Any] = {}
        m: dict[str, Any] = {}
        for k, i in zip(names, idx):
            (b if place(k) == "build" else m)[k] = _item(coords[k], i)
        for s, label in enumerate(labels.tolist()):
            by_seed[s].append(_Task(flat * shape[-1] + s, flat, int(label), b, m))
    # With common draws the points of one seed run one after another, so that a worker's
    # chain keeps its draws from point to point.
    order = zip(*by_seed) if draws == "independent" else by_seed
    tasks = [t for ts in order for t in ts]

    # Memory: the points that run at once, and the results.
    if kind == "threads":
        n_workers = v.positive_int("workers", workers) if workers is not None else _local_workers()
        concurrent = min(n_workers, n_total)
    else:
        if workers is not None:
            raise ValueError("workers= is for executor=None; an executor has its own workers")
        n_workers = int(getattr(executor, "_max_workers", 0) or 0) if kind == "executor" else 0
        concurrent = min(n_workers, n_total) if n_workers else 1
    reuse = (
        target is MLP
        and isinstance(measure, str)
        and measure in ("growth", "backward", "spectrum")
        and fixed_build.get("norm") != "batch"
        and "norm" not in names
        and fixed_build.get("init", "xavier_normal") is not None
    )
    per_point = max(
        (
            _point_bytes(target, {**fixed_build, **t.build}, {**fixed_measure, **t.measure}, reuse)
            for t in by_seed[0]
        ),
        default=0.0,
    )
    results_bytes = 8.0 * n_total * 12
    need = per_point * (concurrent if kind != "dask" else 1) + results_bytes
    avail = v.available_memory_bytes()
    if avail and need > avail:
        raise MemoryError(
            f"this sweep of {n_total} points needs {need:.0f} bytes ({need / 2**30:.3g} GiB): "
            f"{concurrent if kind != 'dask' else 1} points at once of {per_point:.0f} bytes each "
            f"and {results_bytes:.0f} bytes of results, more than the {avail / 2**30:.3g} GiB "
            "of memory available"
        )

    plan = _Plan(
        target=target,
        measure=measure,
        fixed_build=fixed_build,
        fixed_measure=fixed_measure,
        takes_seed=takes_seed,
        root_seed=root,
        common=draws == "common",
        reuse=reuse,
        release=kind == "executor",
        token=uuid.uuid4().hex,
    )

    out: dict[int, dict[str, float]] = {}
    errors: dict[int, str] = {}
    bar = _progress_bar(n_total, progress)

    def done(results: list[Any]) -> bool:
        for index, vals, err in results:
            if err is not None:
                errors[index] = err
            else:
                out[index] = vals
        if bar is not None:
            bar.update(len(results))
        return on_error == "raise" and bool(errors)

    try:
        if kind == "threads":
            _run_threads(plan, tasks, min(n_workers, n_total), done)
        elif kind == "executor":
            _run_executor(plan, tasks, executor, done)
        else:
            _run_dask(plan, tasks, executor, done)
    finally:
        if bar is not None:
            bar.close()

    def grid_index(flat: int) -> tuple[int, ...]:
        return tuple(int(i) for i in np.unravel_index(flat, shape))

    if on_error == "raise" and errors:
        first = min(errors)
        idx = grid_index(first)
        where = ", ".join(f"{k}={_item(c, i)!r}" for (k, c), i in zip(coords.items(), idx))
        raise RuntimeError(f"the sweep's point {idx} ({where}) failed: {errors[first]}")

    keys: list[str] = list(_VALUES[measure]) if isinstance(measure, str) else []
    for vals in out.values():
        for k in vals:
            if k not in keys:
                keys.append(k)
    values = {k: np.full(shape, np.nan) for k in keys}
    for index, vals in out.items():
        at = np.unravel_index(index, shape)
        for k, x in vals.items():
            values[k][at] = x
    attrs: dict[str, Any] = {
        "target": _target_name(target),
        "seed": root,
        "executor": kind,
        "elapsed": time.perf_counter() - started,
    }
    if isinstance(measure, str) and measure == "train":
        from .diagnose import KINDS

        attrs["diagnosis_kinds"] = list(KINDS)
    return SweepResult(
        dims=coords,
        fixed={
            **fixed,
            **mkw,
            **(
                {"batch": fixed_measure["batch"]}
                if "batch" in fixed_measure and "batch" not in names
                else {}
            ),
        },
        measure=measure_name,
        values=values,
        errors={grid_index(i): e for i, e in sorted(errors.items())},
        attrs=attrs,
    )


def _target_name(target: Any) -> str:
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', repr(target))}"
