"""Seeded training tasks: data sets for :func:`gradchain.train` and sequence batches.

Two kinds of object come from here:

* :class:`Dataset`: examples to train on, with a loss and an optional validation split.
  :func:`teacher_student` (regression on a random teacher network) and
  :func:`classification` (Gaussian classes with a known Bayes error rate) make one;
  ``Dataset(x, y)`` wraps your own arrays (NumPy arrays or torch tensors).
* :class:`Task`: one batch of a long-range memory task for recurrent chains
  (:func:`adding_problem`, :func:`copy_task`), whose inputs and targets can be passed
  straight to :meth:`gradchain.RNN.backward`; :meth:`Task.to_dataset` (or
  :func:`as_dataset`) makes it a :class:`Dataset` to train on::

    import gradchain as gc
    from gradchain import tasks

    task = tasks.adding_problem(T=200, batch=32, seed=0)
    rnn = gc.RNN("lstm", task.input_size, 128, output_size=task.output_size)
    rep = rnn.backward(task.x, loss=task.loss, target=task.target)

The same arguments always give the same arrays (NumPy's ``default_rng(seed)``); float32
data are the float64 ones rounded.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _core
from . import _validate as v
from .mlp import MLP

__all__ = [
    "Dataset",
    "Task",
    "adding_problem",
    "as_dataset",
    "batch_order",
    "classification",
    "copy_task",
    "teacher_student",
]

DATASET_LOSSES: tuple[str, ...] = ("mse", "cross_entropy")


@dataclass(frozen=True, eq=False, repr=False)
class Task:
    """A batch of a sequence task: inputs, targets and the loss that scores them.

    Attributes
    ----------
    x : numpy.ndarray
        Inputs, shape ``(T, batch, input_size)`` (time first, like ``torch.nn.RNN``).
    target : numpy.ndarray
        Targets in the form ``RNN.backward(..., loss=loss, target=target)`` expects:
        ``(batch, output_size)`` floats for a last-step ``"mse"`` loss, ``(T, batch)``
        int64 class indices for a per-step ``"cross_entropy"`` loss.
    loss : str
        The loss to pass to ``RNN.backward``: ``"mse"`` or ``"cross_entropy"``.
    input_size : int
        ``x.shape[-1]``; the ``input_size`` of the :class:`gradchain.RNN` to build.
    output_size : int
        The ``output_size`` (readout width) of the :class:`gradchain.RNN` to build.
    name : str
        ``"adding"`` or ``"copy"``.

    Examples
    --------
    >>> import gradchain as gc
    >>> from gradchain import tasks
    >>> task = tasks.copy_task(T=50, batch=4, seed=1)
    >>> task.x.shape, task.target.shape
    ((70, 4, 10), (70, 4))
    >>> rnn = gc.RNN("lstm", task.input_size, 128, output_size=task.output_size)
    >>> rep = rnn.backward(task.x, loss=task.loss, target=task.target)
    """

    x: np.ndarray
    target: np.ndarray
    loss: str
    input_size: int
    output_size: int
    name: str

    @property
    def T(self) -> int:
        """Number of time steps, ``x.shape[0]``."""
        return int(self.x.shape[0])

    @property
    def batch(self) -> int:
        """Number of sequences, ``x.shape[1]``."""
        return int(self.x.shape[1])

    def __repr__(self) -> str:
        return (
            f"Task(name={self.name!r}, T={self.T}, batch={self.batch}, loss={self.loss!r}, "
            f"input_size={self.input_size}, output_size={self.output_size}, "
            f"dtype={self.x.dtype.name!r})"
        )

    def to_dataset(self, validation: Any = 0.0, seed: Any = 0) -> Dataset:
        """The task's sequences as a :class:`Dataset` to train on.

        Parameters
        ----------
        validation : float or int
            Fraction in [0, 1) of the sequences, or their number, held out for
            validation (see :class:`Dataset`).
        seed : int
            Seed of the train/validation split.

        Returns
        -------
        Dataset
            ``batch_axis=1`` (time first), ``every_step`` True for a per-step target
            (the copy task) and False for a last-step one (the adding problem),
            ``out_features = output_size``, the task's loss and name.

        Examples
        --------
        >>> from gradchain import tasks
        >>> data = tasks.adding_problem(T=20, batch=100, seed=0).to_dataset(validation=0.2)
        >>> data.x.shape, data.y.shape, data.x_val.shape, data.batch_axis, data.every_step
        ((20, 80, 2), (80, 1), (20, 20, 2), 1, False)
        """
        return Dataset(
            self.x,
            self.target,
            self.loss,
            validation=validation,
            seed=seed,
            name=self.name,
            batch_axis=1,
            every_step=self.target.ndim == (2 if self.loss == "cross_entropy" else 3),
            out_features=self.output_size,
        )


def adding_problem(T: Any, batch: Any = 32, *, seed: Any = 0, dtype: Any = "float64") -> Task:
    """The adding problem (Hochreiter & Schmidhuber, 1997).

    In the form used by Le, Jaitly & Hinton (2015) and Arjovsky, Shah & Bengio (2016):
    every input step carries a value drawn uniformly from [0, 1) (channel 0) and a marker
    (channel 1) that is 1 at exactly two steps, one drawn uniformly from the first half
    ``[0, T // 2)`` and one from the second half ``[T // 2, T)``, and 0 elsewhere.  The
    target is the sum of the two marked values, to be read out after the last step.
    Predicting 1 (the mean) gives an MSE of about 1/6, the baseline a trained network has
    to beat.

    Parameters
    ----------
    T : int
        Sequence length, at least 2.
    batch : int
        Number of sequences.
    seed : int
        Seed of ``numpy.random.default_rng``; the same seed gives the same task.
    dtype : {"float64", "float32"}
        Precision of ``x`` and ``target``.

    Returns
    -------
    Task
        ``x`` of shape ``(T, batch, 2)``, ``target`` of shape ``(batch, 1)`` (the loss is
        taken at the last step only), ``loss="mse"``, ``input_size=2``,
        ``output_size=1``, ``name="adding"``.

    Raises
    ------
    TypeError
        If `T`, `batch` or `seed` is not an integer.
    ValueError
        If `T` < 2, `batch` < 1, `seed` is negative or `dtype` is not float32/float64.

    Examples
    --------
    >>> from gradchain import tasks
    >>> task = tasks.adding_problem(T=100, batch=8, seed=0)
    >>> task.x.shape, task.target.shape, task.loss
    ((100, 8, 2), (8, 1), 'mse')
    >>> bool((task.x[..., 1].sum(axis=0) == 2).all())
    True
    """
    T = v.positive_int("T", T)
    if T < 2:
        raise ValueError(f"T must be at least 2 (one marker in each half); got {T}")
    batch = v.positive_int("batch", batch)
    rng = np.random.default_rng(v.seed(seed))
    dt = v.dtype(dtype)
    # the draws in float64, their copy in dt, the markers, and x
    _core.check_memory(float(T * batch * (8 + 4 * dt.itemsize)), "the adding problem's arrays")

    values = rng.random((T, batch)).astype(dt)
    half = T // 2
    cols = np.arange(batch)
    first = rng.integers(0, half, size=batch)
    second = rng.integers(half, T, size=batch)
    markers = np.zeros((T, batch), dtype=dt)
    markers[first, cols] = 1
    markers[second, cols] = 1
    x = np.ascontiguousarray(np.stack([values, markers], axis=-1))
    target = (values[first, cols] + values[second, cols])[:, None].astype(dt)
    return Task(x=x, target=target, loss="mse", input_size=2, output_size=1, name="adding")


def copy_task(
    T: Any,
    batch: Any = 32,
    *,
    n_symbols: Any = 8,
    length: Any = 10,
    seed: Any = 0,
    dtype: Any = "float64",
) -> Task:
    """The copy memory task (Arjovsky, Shah & Bengio, 2016).

    Each sequence shows `length` symbols drawn uniformly from ``1..n_symbols``, then
    ``T - 1`` blanks (0), then the delimiter ``n_symbols + 1``, then `length` more blanks,
    during which the network must reproduce the symbols in order.  Inputs are one-hot over
    the ``n_symbols + 2`` tokens; the target is the blank class 0 at every step except the
    last `length`, which hold the symbols.  Always predicting blank, then uniformly
    guessing, gives the baseline cross entropy ``length * log(n_symbols) / (T + 2 * length)``.

    Parameters
    ----------
    T : int
        Delay: the delimiter comes ``T + length - 1`` steps after the first symbol; at
        least 1.  The sequences have ``T + 2 * length`` steps.
    batch : int
        Number of sequences.
    n_symbols : int
        Alphabet size (the original task uses 8).
    length : int
        Number of symbols to memorise (the original task uses 10).
    seed : int
        Seed of ``numpy.random.default_rng``; the same seed gives the same task.
    dtype : {"float64", "float32"}
        Precision of ``x`` (the target is always int64).

    Returns
    -------
    Task
        ``x`` of shape ``(T + 2 * length, batch, n_symbols + 2)``, ``target`` int64 of
        shape ``(T + 2 * length, batch)`` (a loss term at every step),
        ``loss="cross_entropy"``, ``input_size=n_symbols + 2``,
        ``output_size=n_symbols + 1`` (blank and the symbols; the delimiter is never a
        target), ``name="copy"``.

    Raises
    ------
    TypeError
        If `T`, `batch`, `n_symbols`, `length` or `seed` is not an integer.
    ValueError
        If one of them is out of range or `dtype` is not float32/float64.

    Examples
    --------
    >>> from gradchain import tasks
    >>> task = tasks.copy_task(T=20, batch=2, n_symbols=4, length=3, seed=0)
    >>> task.x.shape, task.target.shape, task.loss
    ((26, 2, 6), (26, 2), 'cross_entropy')
    >>> bool((task.target[-3:] == task.x[:3].argmax(axis=-1)).all())
    True
    """
    T = v.positive_int("T", T)
    batch = v.positive_int("batch", batch)
    n_symbols = v.positive_int("n_symbols", n_symbols)
    length = v.positive_int("length", length)
    rng = np.random.default_rng(v.seed(seed))
    dt = v.dtype(dtype)

    steps = T + 2 * length
    # tokens, target (int64) and the one-hot x
    _core.check_memory(
        float(steps * batch * (16 + (n_symbols + 2) * dt.itemsize)), "the copy task's arrays"
    )
    symbols = rng.integers(1, n_symbols + 1, size=(length, batch), dtype=np.int64)
    tokens = np.zeros((steps, batch), dtype=np.int64)
    tokens[:length] = symbols
    tokens[length + T - 1] = n_symbols + 1  # the delimiter
    x = np.eye(n_symbols + 2, dtype=dt)[tokens]
    target = np.zeros((steps, batch), dtype=np.int64)
    target[-length:] = symbols
    return Task(
        x=x,
        target=target,
        loss="cross_entropy",
        input_size=n_symbols + 2,
        output_size=n_symbols + 1,
        name="copy",
    )


# --------------------------------------------------------------------------------------
# data sets to train on
# --------------------------------------------------------------------------------------
def _inputs(x: Any) -> np.ndarray:
    """x as a float32/float64 array (integers become float64)."""
    arr = v.as_array("x", x)
    kind = arr.dtype.kind
    if kind in "iu":
        return np.asarray(arr, dtype=np.float64)
    if arr.dtype not in (np.float32, np.float64):
        raise TypeError(
            f"x must hold float32 or float64 numbers (integers are taken as float64); "
            f"got dtype {arr.dtype}"
        )
    return arr


def _count(name: str, value: Any, total: int) -> int:
    """The number of examples a `validation` fraction or count stands for."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{name} must be a fraction in [0, 1) or a number of examples; got {value!r}"
        )
    if isinstance(value, numbers.Integral):
        k = int(value)
        if not 0 <= k < total:
            raise ValueError(
                f"{name} as a number of examples must be in [0, {total - 1}] (the data hold "
                f"{total}); got {k}"
            )
        return k
    f = float(value)
    if not 0.0 <= f < 1.0:
        raise ValueError(f"{name} must be a fraction in [0, 1) or a number of examples; got {f}")
    k = round(f * total)
    if f > 0 and k == 0:
        raise ValueError(
            f"{name}={f} of {total} examples leaves no example for validation; "
            "give a larger fraction or a count"
        )
    if k >= total:
        raise ValueError(f"{name}={f} of {total} examples leaves no example to train on")
    return k


class Dataset:
    """Examples to train on: inputs, targets, the loss that scores them and an optional
    validation split.

    Parameters
    ----------
    x : array_like
        Inputs: ``(n, in_features)`` for an MLP or a chain of blocks (``batch_axis=0``),
        ``(T, n, in_features)`` for a recurrent chain (``batch_axis=1``, time first).
        NumPy arrays or torch tensors; float32 and float64 keep their dtype, integers
        become float64. Finite.
    y : array_like
        Targets. ``"mse"``: floats ``(n, out_features)`` (``(n,)`` is taken as
        ``(n, 1)``), for a sequence ``(n, out_features)`` read after the last step or
        ``(T, n, out_features)`` at every step; converted to the dtype of `x`.
        ``"cross_entropy"``: integer class labels ``(n,)``, for a sequence ``(n,)`` after
        the last step or ``(T, n)`` at every step; stored as int64.
    loss : {"mse", "cross_entropy"}, optional
        By default ``"cross_entropy"`` for integer targets and ``"mse"`` for float ones.
    validation : float or int
        A fraction in [0, 1) of the examples, or their number, held out for validation
        (0: none). The held-out examples are drawn with ``default_rng(seed)``; both parts
        keep the order the examples had in `x`.
    seed : int
        Seed of the split.
    name : str, optional
        A label for reprs and reports (``"dataset"`` by default).
    batch_axis : {0, 1}
        The axis of `x` that runs over examples: 0 for MLP data, 1 for sequences.
    every_step : bool, optional
        For sequences: whether `y` holds a target at every step; inferred from the
        number of dimensions of `y` when not given.
    out_features : int, optional
        ``"mse"``: must equal ``y.shape[-1]`` when given. ``"cross_entropy"``: the number
        of classes, at least ``y.max() + 1`` (the default), so that a sample in which the
        last class does not occur still fixes the read-out's width.

    Attributes
    ----------
    x, y : numpy.ndarray
        The training examples (read-only copies).
    x_val, y_val : numpy.ndarray or None
        The validation examples; None without a validation split.
    loss : str
        ``"mse"`` or ``"cross_entropy"``.
    n, n_val : int
        Number of training and of validation examples.
    in_features, out_features : int
        Width of the inputs and of the output the loss expects (the number of classes
        for ``"cross_entropy"``).
    batch_axis : int
        Axis of `x` (and `x_val`) that runs over examples.
    y_batch_axis : int
        Axis of `y` that runs over examples: 1 for a per-step sequence target, else 0.
    every_step : bool
        Whether a sequence has a target at every step (False for ``batch_axis=0``).
    dtype : numpy.dtype
        float32 or float64, the dtype of `x`.
    name : str
        The label.
    teacher : gradchain.MLP or None
        The network that made the targets (:func:`teacher_student`), else None.
    baseline_loss : float
        The loss of the best prediction that ignores the inputs, on the training
        examples: for ``"mse"`` the variance of the targets (predicting their mean), for
        ``"cross_entropy"`` the entropy of the label frequencies (predicting them); with
        a target at every step, the mean over the steps of each step's value. A network
        that does not get clearly below it has learned nothing from its inputs (pass it
        to :func:`gradchain.diagnose.diagnose` as ``baseline``).
    bayes_error : float or None
        The lowest error rate any classifier can reach on the task's distribution
        (:func:`classification`), else None.
    class_means : numpy.ndarray or None
        The class means of :func:`classification` (the Bayes classifier picks the
        nearest), else None.

    Raises
    ------
    TypeError
        If `x` or `y` is not an array of real numbers, or an argument has the wrong type.
    ValueError
        If `x` or `y` is empty, non-finite, has the wrong number of dimensions or a length
        that does not match; if `loss` does not fit the targets (an integer `y` with
        ``loss="mse"``, a float `y` with ``"cross_entropy"``); negative labels; a bad
        `validation`, `batch_axis` or `out_features`. Messages name the argument.

    Examples
    --------
    >>> import numpy as np
    >>> from gradchain import tasks
    >>> rng = np.random.default_rng(0)
    >>> x, labels = rng.standard_normal((100, 5)), rng.integers(0, 3, 100)
    >>> data = tasks.Dataset(x, labels, validation=0.2, seed=1)
    >>> data
    Dataset(name='dataset', n=80, n_val=20, in_features=5, out_features=3, loss='cross_entropy', dtype='float64')
    >>> data.x.shape, data.y.dtype, data.x_val.shape
    ((80, 5), dtype('int64'), (20, 5))
    >>> tasks.Dataset(x, x.sum(axis=1)).y.shape  # a float target: mse, one output
    (100, 1)
    """

    x: np.ndarray
    y: np.ndarray
    x_val: np.ndarray | None
    y_val: np.ndarray | None
    loss: str
    n: int
    n_val: int
    in_features: int
    out_features: int
    batch_axis: int
    every_step: bool
    dtype: np.dtype
    name: str
    teacher: MLP | None
    baseline_loss: float
    bayes_error: float | None
    class_means: np.ndarray | None

    def __init__(
        self,
        x: Any,
        y: Any,
        loss: str | None = None,
        *,
        validation: Any = 0.0,
        seed: Any = 0,
        name: str | None = None,
        batch_axis: Any = 0,
        every_step: bool | None = None,
        out_features: Any = None,
    ) -> None:
        rng = np.random.default_rng(v.seed(seed))
        self._setup(x, y, loss, validation, rng, name, batch_axis, every_step, out_features)

    def _setup(
        self,
        x: Any,
        y: Any,
        loss: str | None,
        validation: Any,
        rng: np.random.Generator,
        name: str | None,
        batch_axis: Any,
        every_step: bool | None,
        out_features: Any,
    ) -> None:
        axis = v.int_in("batch_axis", batch_axis, 0, 1, "0 (MLP data) or 1 (sequences)")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a string or None; got {name!r}")
        xa = _inputs(x)
        want_x = ("(n, in_features)", "(T, n, in_features)")[axis]
        if xa.ndim != 2 + axis:
            raise ValueError(
                f"x must have {2 + axis} dimensions {want_x} for batch_axis={axis}; "
                f"got shape {xa.shape}"
            )
        if xa.size == 0:
            raise ValueError(f"x must not be empty; got shape {xa.shape}")
        total = int(xa.shape[axis])
        ya = v.as_array("y", y)
        kind = ya.dtype.kind
        if kind not in "iuf" or ya.dtype == np.float16:
            raise TypeError(
                f"y must hold float32/float64 targets or integer class labels; got dtype {ya.dtype}"
            )
        loss = loss if loss is not None else ("cross_entropy" if kind in "iu" else "mse")
        v.choice("loss", loss, DATASET_LOSSES)
        if loss == "mse" and kind in "iu":
            raise ValueError(
                f"loss='mse' needs float targets, but y holds integers (dtype {ya.dtype}): "
                "pass loss='cross_entropy' for class labels, or y as floats for regression"
            )
        if loss == "cross_entropy" and kind == "f":
            raise ValueError(
                f"loss='cross_entropy' needs integer class labels in y; got dtype {ya.dtype} "
                "(convert with y.astype(int), or pass loss='mse' for regression)"
            )
        y_axis, ya, steps = self._target_layout(ya, loss, axis, every_step)
        if ya.shape[y_axis] != total:
            raise ValueError(
                f"y has {ya.shape[y_axis]} examples (shape {ya.shape}, axis {y_axis}) but x has "
                f"{total} (shape {xa.shape}, axis {axis}); they must match"
            )
        if steps and ya.shape[0] != xa.shape[0]:
            raise ValueError(
                f"y has a target at each of {ya.shape[0]} steps but x has {xa.shape[0]} steps"
            )
        if ya.size == 0:
            raise ValueError(f"y must not be empty; got shape {ya.shape}")
        dt = xa.dtype
        if not np.isfinite(xa).all():
            bad = tuple(int(i) for i in np.argwhere(~np.isfinite(xa))[0])
            raise ValueError(f"x contains {xa[bad]} at index {bad}; inputs must be finite")
        if loss == "mse":
            with np.errstate(over="ignore"):
                yc = np.asarray(ya, dtype=dt)
            if not np.isfinite(yc).all():
                bad = tuple(int(i) for i in np.argwhere(~np.isfinite(yc))[0])
                raise ValueError(
                    f"y contains {ya[bad]} at index {bad} (as {dt.name}: {yc[bad]}); "
                    "targets must be finite"
                )
            width = int(yc.shape[-1])
            if out_features is not None:
                of = v.positive_int("out_features", out_features)
                if of != width:
                    raise ValueError(
                        f"out_features={of} does not match y, whose last axis has {width} targets"
                    )
        else:
            yc = np.asarray(ya, dtype=np.int64)
            if int(yc.min()) < 0:
                bad = tuple(int(i) for i in np.argwhere(yc < 0)[0])
                raise ValueError(
                    f"y must hold class labels >= 0; got {int(yc[bad])} at index {bad}"
                )
            top = int(yc.max())
            width = top + 1
            if out_features is not None:
                width = v.positive_int("out_features", out_features)
                if width <= top:
                    raise ValueError(
                        f"out_features must exceed the largest label in y ({top}); got {width}"
                    )
        n_val = _count("validation", validation, total)
        _core.check_memory(float(xa.nbytes + yc.nbytes), "the dataset's copies of x and y")
        x_val: np.ndarray | None = None
        y_val: np.ndarray | None = None
        if n_val:
            perm = rng.permutation(total)
            val_idx, train_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
            x_tr = np.ascontiguousarray(np.take(xa, train_idx, axis=axis))
            y_tr = np.ascontiguousarray(np.take(yc, train_idx, axis=y_axis))
            x_val = np.ascontiguousarray(np.take(xa, val_idx, axis=axis))
            y_val = np.ascontiguousarray(np.take(yc, val_idx, axis=y_axis))
        else:  # copies: they are made read-only, the caller's arrays must stay as they were
            x_tr, y_tr = np.array(xa, order="C"), np.array(yc, order="C")
        v.readonly(x_tr, y_tr, x_val, y_val)
        self.x, self.y, self.x_val, self.y_val = x_tr, y_tr, x_val, y_val
        self.loss = loss
        self.n, self.n_val = total - n_val, n_val
        self.in_features = int(xa.shape[-1])
        self.out_features = width
        self.batch_axis = axis
        self.every_step = steps
        self.dtype = dt
        self.name = "dataset" if name is None else name
        self.baseline_loss = _baseline_loss(y_tr, loss, steps)
        self.teacher = None
        self.bayes_error = None
        self.class_means = None

    @staticmethod
    def _target_layout(
        ya: np.ndarray, loss: str, axis: int, every_step: bool | None
    ) -> tuple[int, np.ndarray, bool]:
        """(the axis of y over examples, y with a target axis for mse, every_step)."""
        if every_step is not None:
            every_step = v.flag("every_step", every_step)
        mse = loss == "mse"
        if axis == 0:
            if every_step:
                raise ValueError("every_step=True is for sequences (batch_axis=1)")
            if mse and ya.ndim == 1:
                ya = ya[:, None]
            want = "(n, out_features) or (n,)" if mse else "(n,) class labels"
            if ya.ndim != (2 if mse else 1):
                raise ValueError(f"y must have shape {want} for loss={loss!r}; got {ya.shape}")
            return 0, ya, False
        last, each = (2, 3) if mse else (1, 2)
        if every_step is None:
            every_step = ya.ndim == each
        if mse and not every_step and ya.ndim == 1:
            ya = ya[:, None]
        if ya.ndim != (each if every_step else last):
            if mse:
                want = "(T, n, out_features)" if every_step else "(n, out_features) or (n,)"
            else:
                want = "(T, n)" if every_step else "(n,)"
            when = "every step" if every_step else "the last step"
            raise ValueError(
                f"y must have shape {want} for loss={loss!r} with a target at {when}; "
                f"got {ya.shape}"
            )
        return (1 if every_step else 0), ya, every_step

    @property
    def y_batch_axis(self) -> int:
        """The axis of `y` over examples: 1 for a per-step sequence target, else 0."""
        return 1 if self.every_step else 0

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        seq = f", T={self.x.shape[0]}, every_step={self.every_step}" if self.batch_axis else ""
        return (
            f"Dataset(name={self.name!r}, n={self.n}, n_val={self.n_val}, "
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"loss={self.loss!r}{seq}, dtype={self.dtype.name!r})"
        )


def _baseline_loss(y: np.ndarray, loss: str, every_step: bool) -> float:
    """The loss of the best input-free prediction (per step when every_step)."""
    axis = 1 if every_step else 0
    if loss == "mse":
        y64 = y.astype(np.float64)
        return float(np.mean((y64 - y64.mean(axis=axis, keepdims=True)) ** 2))
    labels = y if every_step else y[None, :]
    total = 0.0
    for row in labels:  # one step at a time
        p = np.bincount(row) / row.size
        p = p[p > 0]
        total -= float(np.sum(p * np.log(p)))
    return total / labels.shape[0]


def as_dataset(obj: Any) -> Dataset:
    """A :class:`Dataset` for `obj`: a Dataset as it is, a :class:`Task` by
    :meth:`Task.to_dataset` (no validation split).

    Parameters
    ----------
    obj : Dataset or Task
        What to train on.

    Returns
    -------
    Dataset

    Raises
    ------
    TypeError
        If `obj` is neither (arrays are wrapped with ``Dataset(x, y)``).

    Examples
    --------
    >>> from gradchain import tasks
    >>> tasks.as_dataset(tasks.copy_task(T=5, batch=3, n_symbols=4, length=2))
    Dataset(name='copy', n=3, n_val=0, in_features=6, out_features=5, loss='cross_entropy', T=9, every_step=True, dtype='float64')
    """
    if isinstance(obj, Dataset):
        return obj
    if isinstance(obj, Task):
        return obj.to_dataset()
    raise TypeError(
        f"data must be a gradchain.tasks.Dataset or Task; got {type(obj).__name__} "
        "(wrap arrays as gc.tasks.Dataset(x, y, loss=...))"
    )


def _dataset(
    x: np.ndarray,
    y: np.ndarray,
    loss: str,
    validation: Any,
    rng: np.random.Generator,
    name: str,
    out_features: int,
) -> Dataset:
    """A Dataset of generated data, split with the generator that made them (so that the
    held-out examples do not depend on the same draws as the values)."""
    ds = Dataset.__new__(Dataset)
    ds._setup(x, y, loss, validation, rng, name, 0, None, out_features)
    return ds


def teacher_student(
    n: Any,
    width: Any,
    depth: Any = 3,
    *,
    out_features: Any = None,
    activation: str = "tanh",
    noise: Any = 0.0,
    seed: Any = 0,
    dtype: Any = "float64",
    validation: Any = 0.0,
) -> Dataset:
    """Regression on the outputs of a random teacher network.

    The teacher is ``gc.MLP(depth=depth, width=[width] * depth + [out_features],
    activation=activation, seed=seed)`` in float64: Xavier-normal weights, zero biases,
    the activation after every layer (the output layer too), as every :class:`MLP`. The
    inputs are standard normal, ``x ~ N(0, I)``, and the targets are the teacher's
    outputs plus Gaussian noise of standard deviation `noise`. A student MLP of the
    teacher's shape can represent it exactly, so the lowest expected ``"mse"`` loss is
    ``noise ** 2``.

    Parameters
    ----------
    n : int
        Number of examples (before the validation split).
    width : int
        Input width and the teacher's hidden width.
    depth : int
        The teacher's number of layers.
    out_features : int, optional
        Number of outputs (`width` by default).
    activation : str
        The teacher's activation, one of :data:`gradchain.ACTIVATIONS`.
    noise : float
        Standard deviation of the noise added to the targets (>= 0).
    seed : int
        Seed of the inputs, the noise and the split (``numpy.random.default_rng(seed)``)
        and of the teacher's weights.
    dtype : {"float64", "float32"}
        Precision of ``x`` and ``y``: float32 data are the float64 ones rounded, the
        targets computed from the rounded inputs.
    validation : float or int
        Fraction or number of examples held out (see :class:`Dataset`).

    Returns
    -------
    Dataset
        ``x`` of shape ``(n, width)``, ``y`` of shape ``(n, out_features)``,
        ``loss="mse"``, ``name="teacher_student"``, ``teacher`` the teacher network.

    Raises
    ------
    TypeError, ValueError
        For a bad argument, naming it (the teacher's arguments are checked by
        :class:`MLP`).

    Examples
    --------
    >>> import numpy as np
    >>> from gradchain import tasks
    >>> data = tasks.teacher_student(n=256, width=8, depth=2, out_features=1, seed=0)
    >>> data.x.shape, data.y.shape, data.loss
    ((256, 8), (256, 1), 'mse')
    >>> bool(np.array_equal(data.teacher.forward(data.x), data.y))  # noise=0
    True
    """
    n = v.positive_int("n", n)
    width = v.positive_int("width", width)
    depth = v.positive_int("depth", depth)
    out = width if out_features is None else v.positive_int("out_features", out_features)
    noise = v.finite_float("noise", noise, minimum=0.0)
    s = v.seed(seed)
    dt = v.dtype(dtype)
    _core.check_memory(float(n * (width + 2 * out) * 8 * (2 + depth)), "the teacher-student data")
    teacher = MLP(depth=depth, width=[width] * depth + [out], activation=activation, seed=s)
    rng = np.random.default_rng(s)
    x = rng.standard_normal((n, width)).astype(dt)
    # drawn for every noise level, so that the levels share inputs, draws and split
    eps = rng.standard_normal((n, out))
    y = teacher.forward(x.astype(np.float64))
    if noise > 0:
        y = y + noise * eps
    ds = _dataset(x, y.astype(dt), "mse", validation, rng, "teacher_student", out)
    ds.teacher = teacher
    return ds


def _normal_tail(z: np.ndarray) -> np.ndarray:
    """P(Z > z) for a standard normal Z, accurate far into the tail."""
    return np.array([0.5 * math.erfc(t / math.sqrt(2.0)) for t in np.ravel(z)]).reshape(np.shape(z))


def _simplex_miss(classes: int, separation: float) -> float:
    """The integral form of the simplex Bayes error (any number of classes >= 2)."""
    u = np.linspace(-40.0, 40.0, 16001)
    tail = _normal_tail(separation / math.sqrt(2.0) + u)  # 1 - Phi
    with np.errstate(divide="ignore"):  # log1p(-1) = -inf far left, where miss is 1
        miss = -np.expm1((classes - 1) * np.log1p(-tail))  # 1 - Phi ** (k - 1), tiny kept
    density = np.exp(-0.5 * u * u) / math.sqrt(2.0 * math.pi)
    return float(np.sum(density * miss) * (u[1] - u[0]))


def _simplex_bayes_error(classes: int, separation: float) -> float:
    """Bayes error rate of `classes` equally likely classes ``N(mu_k, I)`` whose means are
    the vertices of a regular simplex with edge `separation`.

    Two classes: ``Phi(-d / 2)``. More: the Bayes classifier picks the nearest mean, and
    given class k the margins to the other classes, scaled to unit variance, are
    equicorrelated normals (correlation 1/2) that must all stay above ``-d / 2``; writing
    each as ``(u + v_j) / sqrt(2)`` with independent standard normals gives
    ``1 - error = E_u[Phi(d / sqrt(2) + u) ** (k - 1)]``, ``u ~ N(0, 1)``. The integral is
    taken by the trapezoidal rule on a fine grid, exponentially accurate for this smooth,
    fast-decaying integrand.
    """
    if classes == 2:
        return 0.5 * math.erfc(separation / (2.0 * math.sqrt(2.0)))
    return _simplex_miss(classes, separation)


def classification(
    n: Any,
    features: Any,
    classes: Any = 2,
    *,
    separation: Any = 3.0,
    seed: Any = 0,
    dtype: Any = "float64",
    validation: Any = 0.0,
) -> Dataset:
    """Gaussian classes with a known Bayes error rate.

    Each example's class is drawn uniformly from ``0..classes-1`` (equal priors) and its
    inputs from ``N(mu_class, I)``. The means are the vertices of a regular simplex with
    every pair `separation` apart, centred on 0 and lying in the span of the first
    ``classes - 1`` features (the other features are pure noise). The best possible
    classifier (nearest mean) errs with probability :attr:`Dataset.bayes_error`:
    ``Phi(-separation / 2)`` for two classes, and for more the integral of
    ``1 - E_u[Phi(separation / sqrt(2) + u) ** (classes - 1)]`` over a standard normal
    ``u`` (the margins to the other classes are equicorrelated normals), computed by
    numerical integration to about 1e-12.

    Parameters
    ----------
    n : int
        Number of examples (before the validation split).
    features : int
        Input width, at least ``classes - 1``.
    classes : int
        Number of classes, at least 2.
    separation : float
        Distance between any two class means, in units of the noise's standard deviation
        (> 0, finite). The default 3 gives a Bayes error of 6.7% for two classes.
    seed : int
        Seed of ``numpy.random.default_rng`` (labels, inputs, split).
    dtype : {"float64", "float32"}
        Precision of ``x`` (labels are int64).
    validation : float or int
        Fraction or number of examples held out (see :class:`Dataset`).

    Returns
    -------
    Dataset
        ``x`` of shape ``(n, features)``, ``y`` int64 labels of shape ``(n,)``,
        ``loss="cross_entropy"``, ``out_features=classes``, ``name="classification"``,
        ``bayes_error`` the Bayes rate, ``class_means`` the means ``(classes, features)``.

    Raises
    ------
    TypeError, ValueError
        For a bad argument, naming it.

    Examples
    --------
    >>> from gradchain import tasks
    >>> data = tasks.classification(n=1000, features=4, classes=2, separation=2.0, seed=0)
    >>> data.x.shape, data.y.dtype, round(data.bayes_error, 4)
    ((1000, 4), dtype('int64'), 0.1587)
    """
    n = v.positive_int("n", n)
    features = v.positive_int("features", features)
    k = v.positive_int("classes", classes)
    if k < 2:
        raise ValueError(f"classes must be at least 2; got {k}")
    if features < k - 1:
        raise ValueError(
            f"features must be at least classes - 1 = {k - 1} (the span of the class means); "
            f"got {features}"
        )
    d = v.finite_float("separation", separation)
    if d <= 0:
        raise ValueError(f"separation must be a positive number; got {d}")
    rng = np.random.default_rng(v.seed(seed))
    dt = v.dtype(dtype)
    _core.check_memory(float(n * (features * (8 + dt.itemsize) + 16)), "the classification data")
    # Scaled unit vectors e_k * d / sqrt(2) are pairwise d apart; centred, they span k - 1
    # dimensions, written in an orthonormal basis of that span.
    corners = (np.eye(k) - 1.0 / k) * (d / math.sqrt(2.0))
    basis = np.linalg.svd(corners)[2][: k - 1]  # rows: the span's orthonormal basis
    means = np.zeros((k, features))
    means[:, : k - 1] = corners @ basis.T
    y = rng.integers(0, k, size=n, dtype=np.int64)
    x = (means[y] + rng.standard_normal((n, features))).astype(dt)
    ds = _dataset(x, y, "cross_entropy", validation, rng, "classification", k)
    ds.bayes_error = _simplex_bayes_error(k, d)
    ds.class_means = means
    return ds


def batch_order(n: Any, batch_size: Any, steps: Any, seed: Any = 0, *, shuffle: Any = True) -> np.ndarray:
    """The example indices :func:`gradchain.train` uses, step by step.

    Each epoch is a permutation of ``range(n)`` drawn from ``seed`` (Philox, the epoch
    as its stream; a Fisher-Yates shuffle), or ``range(n)`` itself without shuffling;
    its batches follow in order, and the last partial batch is dropped. A loop elsewhere
    (PyTorch, say) that takes ``x[order[k]]`` at step k sees the batches gradchain saw.

    Parameters
    ----------
    n : int
        Number of training examples.
    batch_size : int
        Examples per step, at most `n`.
    steps : int
        Number of steps.
    seed : int
        The sampler's seed (``gc.train``'s `seed`).
    shuffle : bool
        ``gc.train``'s `shuffle`.

    Returns
    -------
    numpy.ndarray of int64, shape (steps, batch_size)

    Raises
    ------
    TypeError
        If `n`, `batch_size`, `steps` or `seed` is not an integer.
    ValueError
        If one of them is out of range, or `batch_size` exceeds `n`.

    Examples
    --------
    >>> from gradchain import tasks
    >>> order = tasks.batch_order(10, 4, 5, seed=0)
    >>> order.shape
    (5, 4)
    >>> len(set(order[:2].ravel().tolist()))  # an epoch: two batches of distinct examples
    8
    """
    n = v.positive_int("n", n, maximum=2**62)
    b = v.positive_int("batch_size", batch_size)
    if b > n:
        raise ValueError(f"batch_size={b} is larger than n={n}")
    k = v.positive_int("steps", steps, maximum=2**62)
    return _core.batch_order(n, b, k, v.seed(seed), v.flag("shuffle", shuffle))
