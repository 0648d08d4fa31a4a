"""Training a chain in the compiled core: :func:`train` returns a :class:`History`."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import numpy as np

from . import _core, tasks
from . import _validate as v
from ._progress import progress_bar
from .chain import Chain
from .errors import NonFiniteError
from .history import History
from .mlp import MLP
from .rnn import RNN, TRUNCATE_MODES
from .tasks import batch_order

__all__ = ["History", "batch_order", "train"]

TRAIN_LOSSES: tuple[str, ...] = ("mse", "cross_entropy")


class _Data:
    """The arrays of a dataset as the core takes them."""

    def __init__(self, x: Any, y: Any, loss: Any, batch_axis: Any, x_val: Any, y_val: Any) -> None:
        self.x, self.y, self.loss, self.batch_axis = x, y, loss, batch_axis
        self.x_val, self.y_val = x_val, y_val


def _as_data(data: Any) -> _Data:
    """A Task, a Dataset, an object with their attributes or a tuple ``(x, y)``, as the
    arrays the core takes."""
    if isinstance(data, tuple):
        if len(data) != 2:
            raise ValueError(f"data as a tuple must be (x, y); got {len(data)} items")
        x, y = data
        return _Data(x, y, None, None, None, None)
    if isinstance(data, (tasks.Task, tasks.Dataset)):
        ds = tasks.as_dataset(data)
        return _Data(ds.x, ds.y, ds.loss, ds.batch_axis, ds.x_val, ds.y_val)
    if all(hasattr(data, a) for a in ("x", "y", "loss")):  # a data set of one's own
        return _Data(
            data.x,
            data.y,
            data.loss,
            getattr(data, "batch_axis", None),
            getattr(data, "x_val", None),
            getattr(data, "y_val", None),
        )
    raise TypeError(
        "data must be a gradchain task or dataset (gc.tasks.adding_problem(...), "
        "gc.tasks.Dataset(x, y, ...)), an object with x, y and loss (and optionally "
        f"batch_axis, x_val, y_val) or a tuple (x, y); got {type(data).__name__}"
    )


def _targets(
    name: str, y: Any, loss: str, n: int, n_out: int, seq_len: int | None, dt: np.dtype
) -> tuple[np.ndarray, bool]:
    """Targets checked against the loss and the chain: (array, a term at every step)."""
    arr = np.asarray(v.as_array(name, y))
    every = seq_len is not None and arr.ndim == (2 if loss == "cross_entropy" else 3)
    lead: tuple[int, ...] = (seq_len, n) if every and seq_len is not None else (n,)
    if loss == "cross_entropy":
        if arr.dtype.kind not in "iu":
            raise TypeError(
                f"{name} for loss='cross_entropy' must hold integer class labels; got dtype {arr.dtype}"
            )
        if arr.shape != lead:
            alt = f" or {(seq_len, n)} (a label at every step)" if seq_len is not None else ""
            raise ValueError(
                f"{name} for loss='cross_entropy' must have shape {lead}{alt}; got {arr.shape}"
            )
        if arr.size and (arr.min() < 0 or arr.max() >= n_out):
            raise ValueError(
                f"{name} labels must lie in [0, {n_out}) (the chain's outputs); got values in "
                f"[{arr.min()}, {arr.max()}]"
            )
        return np.ascontiguousarray(arr, dtype=np.int64), every
    if arr.dtype.kind != "f":
        raise TypeError(
            f"{name} for loss='mse' must hold float targets; got dtype {arr.dtype} (integer class "
            "labels go with loss='cross_entropy')"
        )
    shape = (*lead, n_out)
    if arr.shape != shape:
        alt = f" or {(seq_len, n, n_out)} (a target at every step)" if seq_len is not None else ""
        raise ValueError(
            f"{name} for loss='mse' must have shape {shape}{alt} to fit the chain's "
            f"{n_out} outputs; got {arr.shape}"
        )
    return v.float_array(name, arr, dt, shape), every


def _optional(name: str, value: Any, check: Callable[[str, Any], float]) -> float:
    """-1 for None (the core's "off"), else the checked value."""
    return -1.0 if value is None else check(name, value)


def _finite_non_negative(name: str, value: Any) -> float:
    f = v.non_negative(name, value)
    if math.isinf(f):
        raise ValueError(f"{name} must be a finite number >= 0; got {value!r}")
    return f


def _steps(name: str, value: Any) -> int:
    return v.positive_int(name, value, maximum=2**62)


def train(
    net: Any,
    data: Any,
    *,
    optimizer: Any,
    steps: int,
    batch_size: int = 32,
    max_norm: float | None = None,
    norm_type: float | str = 2.0,
    clip_value: float | None = None,
    max_weight_norm: float | None = None,
    scheduler: Any = None,
    record_every: int = 1,
    record_activation_grads: bool = False,
    callback: Callable[[int, History], Any] | None = None,
    progress: bool = False,
    seed: int = 0,
    truncate: int | None = None,
    truncate_mode: str = "detach",
    loss: str | None = None,
    train_mode: bool = True,
    error_if_nonfinite: bool = False,
    shuffle: bool = True,
) -> History:
    """Train a chain in place with mini-batch gradient descent; the whole loop runs in the
    compiled core, and the history of every recorded step comes back.

    Each step draws a batch, runs the forward and backward pass (train mode:
    BatchNorm uses batch statistics and updates its running ones, as torch does), clips,
    updates every parameter with `optimizer` at the scheduler's learning rate, applies the
    max-norm constraint and steps the scheduler with the step's loss. It computes what
    the same loop in PyTorch computes (``torch.optim``, ``clip_grad_norm_``,
    ``clip_grad_value_``, ``torch.renorm``) to rounding.

    Parameters
    ----------
    net : MLP, Chain or RNN
        Trained in place: it keeps its trained weights (and BatchNorm buffers).
    data : task, dataset or tuple
        A :class:`gradchain.tasks.Task` (sequences, ``(T, N, in)``), a dataset (any object
        with ``x``, ``y``, ``loss`` and optionally ``batch_axis``, ``x_val``, ``y_val``), or
        a tuple ``(x, y)``. Chains take rows ``x`` of shape ``(N, in_features)``; an RNN takes
        sequences ``(T, N, input_size)`` (time first whatever its ``batch_first``). Targets:
        ``mse``: floats ``(N, out)``, or ``(T, N, out)`` for a term at every step;
        ``cross_entropy``: integer labels ``(N,)`` or ``(T, N)``. With ``x_val`` and
        ``y_val`` the validation loss is recorded with every row (eval mode, no update).
    optimizer : gradchain optimizer
        ``gc.optim.SGD(...)`` and the like. It keeps its state, so a second call continues
        the first.
    steps : int
        Optimizer steps to run.
    batch_size : int
        Examples per step, at most N. Each epoch is a permutation of the N examples drawn
        from `seed` (see :func:`gradchain.tasks.batch_order`); batches follow in order and
        the last partial batch is dropped.
    max_norm : float, optional
        Clip the gradients as ``torch.nn.utils.clip_grad_norm_(params, max_norm,
        norm_type)``: every gradient times ``min(1, max_norm / (total_norm + 1e-6))``.
    norm_type : float or 'inf'
        Order of the total norm (recorded with or without clipping).
    clip_value : float, optional
        Clip every gradient entry to ``[-clip_value, clip_value]``
        (``torch.nn.utils.clip_grad_value_``). Not together with `max_norm`.
    max_weight_norm : float, optional
        After each update, every row of every weight matrix (each unit's incoming weights)
        whose 2-norm exceeds c is scaled by ``c / (norm + 1e-7)``, as
        ``w.copy_(torch.renorm(w, 2, 0, c))``. 1-d parameters (biases, norm layers) are
        left alone.
    scheduler : gradchain scheduler, optional
        The learning rate of each step (``gc.optim.lr_scheduler``); stepped after each
        optimizer step with that step's training loss. Default: the optimizer's ``lr``.
    record_every : int
        Record every this many steps (and always the last step run).
    record_activation_grads : bool
        Also record ``||dL/dh||`` at every boundary (an RNN: every layer's state at every
        timestep).
    callback : callable, optional
        ``callback(step, history)`` after every recorded row, with the history so far.
        Returning True stops the run (``stopped="callback"``). An exception it raises
        stops the run and is re-raised with the history as its ``history`` attribute.
    progress : bool
        Show a tqdm progress bar of the steps, advanced at every recorded row
        (``pip install gradchain[progress]``).
    seed : int
        Seeds the sampler; the run is reproducible for any thread count.
    truncate : int, optional
        RNN only: truncated backpropagation through time with window k (see
        :meth:`gradchain.RNN.backward`); one optimizer step per batch of whole sequences.
    truncate_mode : {"detach", "window"}
    loss : {"mse", "cross_entropy"}, optional
        Default: the data's.
    train_mode : bool
        Train mode (BatchNorm with batch statistics) or eval mode for the training passes.
    error_if_nonfinite : bool
        Raise :class:`~gradchain.NonFiniteError` when the run diverges (with the history as
        its ``history`` attribute) instead of returning the history.
    shuffle : bool
        Draw each epoch's permutation (True) or take the examples in order.

    Returns
    -------
    History
        ``stopped`` says how the run ended. A run that diverges (a NaN or infinite loss,
        gradient or weight) stops at that step with ``stopped="diverged"`` and
        ``nonfinite`` naming the step, what and where; the chain keeps the weights of the
        last finite update.

    Raises
    ------
    ValueError, TypeError
        Arguments that do not fit (each message names the argument): a batch larger than
        the data, shapes the chain does not take, integer targets for ``mse``, both
        `max_norm` and `clip_value`, ...
    MemoryError
        When the history or a pass would need more memory than is available.
    KeyboardInterrupt
        On Ctrl-C, within about a second; the exception's ``history`` attribute holds the
        history so far (``stopped="interrupted"``) and the chain keeps the weights of the
        last step run.

    Examples
    --------
    >>> import numpy as np, gradchain as gc
    >>> net = gc.MLP(depth=4, width=[8, 32, 32, 32, 1], activation="tanh", seed=0)
    >>> x = np.random.default_rng(0).standard_normal((256, 8))
    >>> y = np.sin(x.sum(axis=1, keepdims=True))
    >>> hist = gc.train(net, (x, y), optimizer=gc.optim.SGD(lr=0.1), steps=100)
    >>> hist.log10_param_grad_norms.shape
    (100, 8)
    """
    # -- the chain ------------------------------------------------------------------------
    activation_columns = None
    if isinstance(net, MLP):
        chain: Any = net._net
        activation_columns = net._layer_ends
    elif isinstance(net, Chain):
        chain = net
    elif isinstance(net, RNN):
        chain = None
    else:
        raise TypeError(f"net must be a gc.MLP, gc.Chain or gc.RNN; got {type(net).__name__}")
    recurrent = chain is None
    dt = net.dtype
    if recurrent:
        core, order = net._chain, []
        param_names = tuple(net.param_names)
        n_in, n_out = net.input_size, net.output_size or net.hidden_size
    else:
        core = chain._core
        param_names = tuple(chain.param_names)
        perm = chain._layout().param_perm if getattr(chain, "_key_order", None) else None
        order = [] if perm is None else [int(i) for i in perm]
        n_in, n_out = chain.in_features, chain.out_features

    # -- the data -------------------------------------------------------------------------
    d = _as_data(data)
    axis = 1 if recurrent else 0
    if d.batch_axis is not None and d.batch_axis != axis:
        what = (
            "an RNN trains on sequences (T, N, input_size)"
            if recurrent
            else "a chain trains on rows (N, in_features)"
        )
        raise ValueError(f"data.batch_axis must be {axis}: {what}; got {d.batch_axis!r}")
    x_shape: tuple[int | None, ...] = (None, None, n_in) if recurrent else (None, n_in)
    x = v.float_array("data.x", v.as_array("data.x", d.x), dt, x_shape)
    n = x.shape[axis]
    seq_len = x.shape[0] if recurrent else None
    loss_name = loss if loss is not None else d.loss
    if loss_name is None:
        loss_name = v.default_loss(d.y)
    v.choice("loss", loss_name, TRAIN_LOSSES)
    y, every = _targets("data.y", d.y, loss_name, n, n_out, seq_len, dt)
    x_val = y_val = None
    if d.x_val is not None or d.y_val is not None:
        if d.x_val is None or d.y_val is None:
            raise ValueError("data.x_val and data.y_val must be given together")
        x_val = v.float_array(
            "data.x_val",
            v.as_array("data.x_val", d.x_val),
            dt,
            (seq_len, None, n_in) if recurrent else (None, n_in),
        )
        y_val, every_val = _targets(
            "data.y_val", d.y_val, loss_name, x_val.shape[axis], n_out, seq_len, dt
        )
        if every_val != every:
            raise ValueError(
                "data.y_val must have a target at every step where data.y has one, and only there"
            )

    # -- the options ----------------------------------------------------------------------
    n_steps = _steps("steps", steps)
    b = v.positive_int("batch_size", batch_size)
    if b > n:
        raise ValueError(f"batch_size={b} is larger than the {n} training examples in data")
    every_k = _steps("record_every", record_every)
    if max_norm is not None and clip_value is not None:
        raise ValueError("give max_norm or clip_value, not both")
    mn = _optional("max_norm", max_norm, v.non_negative)
    cv = _optional("clip_value", clip_value, v.non_negative)
    mw = _optional("max_weight_norm", max_weight_norm, _finite_non_negative)
    p = v.norm_type(norm_type)
    sd = v.seed(seed)
    flags = {
        "record_activation_grads": v.flag("record_activation_grads", record_activation_grads),
        "train_mode": v.flag("train_mode", train_mode),
        "error_if_nonfinite": v.flag("error_if_nonfinite", error_if_nonfinite),
        "shuffle": v.flag("shuffle", shuffle),
    }
    if truncate is None:
        mode, window = "none", 0
    else:
        if not recurrent:
            raise ValueError(
                "truncate applies to gc.RNN only (truncated backpropagation through time)"
            )
        if (
            isinstance(truncate, bool)
            or not isinstance(truncate, numbers.Integral)
            or truncate <= 0
        ):
            raise ValueError(
                f"truncate must be a positive integer (the window k) or None; got {truncate!r}"
            )
        mode = v.choice("truncate_mode", truncate_mode, TRUNCATE_MODES)
        window = int(min(int(truncate), 2**31 - 1))
    if not recurrent and flags["train_mode"] and b < 2 and core.couples_batch(True):
        raise ValueError(
            "batch_size must be at least 2 for a chain with BatchNorm in train mode (batch statistics)"
        )
    if callback is not None and not callable(callback):
        raise TypeError(
            f"callback must be a callable callback(step, history) or None; got {callback!r}"
        )
    if not hasattr(optimizer, "_core_for"):
        raise TypeError(
            f"optimizer must be a gradchain optimizer (gc.optim.SGD(...), ...); got {type(optimizer).__name__}"
        )
    if scheduler is not None and not hasattr(scheduler, "_core_for"):
        raise TypeError(
            f"scheduler must be a gradchain scheduler (gc.optim.lr_scheduler) or None; got {type(scheduler).__name__}"
        )
    shapes = [np.shape(a) for _, a in net.named_parameters()]
    opt_core = optimizer._core_for(dt, len(param_names), shapes)
    sched_core = None if scheduler is None else scheduler._core_for(float(optimizer.defaults["lr"]))

    if recurrent:
        activation_names: tuple[str, ...] = tuple(
            f"l{layer}.h{t}"
            for layer in range(net.num_layers)
            for t in range(int(seq_len or 0) + 1)
        )
    elif isinstance(net, MLP):
        activation_names = net._activation_names
    else:
        activation_names = chain.activation_names
    meta = {
        "param_names": param_names,
        "activation_names": activation_names,
        "activation_columns": activation_columns,
        "record_every": every_k,
        "optimizer": repr(optimizer),
        "batch_size": b,
        "seed": sd,
        "norm_type": p,
        "max_norm": None if max_norm is None else mn,
        "clip_value": None if clip_value is None else cv,
    }

    hook = None
    bar = progress_bar(n_steps, "train", "step") if v.flag("progress", progress) else None
    if callback is not None or bar is not None:
        user = callback

        def hook(step: int, partial: dict[str, Any]) -> bool:
            if bar is not None:
                bar.update(min(int(step), n_steps) - bar.n)
            return user is not None and bool(user(int(step), History._from_core(partial, meta)))

    try:
        d_out = _core.train(
            core, order, x, y, x_val, y_val, loss_name, recurrent, every, opt_core, sched_core,
            n_steps, b, sd, flags["shuffle"], mn, p, cv, mw, every_k,
            flags["record_activation_grads"], flags["train_mode"], mode, window, hook,
        )  # fmt: skip
    finally:
        _trained(net)
        if bar is not None:
            bar.close()
    exc = d_out["exception"]
    if isinstance(exc, KeyboardInterrupt):
        d_out["stopped"] = "interrupted"
    hist = History._from_core(d_out, meta)
    if exc is not None:
        exc.history = hist
        raise exc
    if flags["error_if_nonfinite"] and hist.nonfinite is not None:
        nf = hist.nonfinite
        err = NonFiniteError(
            f"training diverged at step {nf['step']}: {nf['message']}", nf["what"], nf["step"]
        )
        err.history = hist  # type: ignore[attr-defined]
        raise err
    return hist


def _trained(net: Any) -> None:
    """After a run: the chain's weights no longer come from its initializer."""
    if isinstance(net, MLP):
        net._net._loaded = True
        net._zero_bias = all(not np.asarray(b).any() for b in net.biases)
    elif isinstance(net, Chain):
        net._loaded = True
