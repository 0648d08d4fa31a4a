"""Seeded long-range memory tasks for recurrent chains.

Each generator returns a :class:`Task` whose inputs and targets can be passed straight to
:meth:`gradchain.RNN.backward`::

    import gradchain as gc
    from gradchain import tasks

    task = tasks.adding_problem(T=200, batch=32, seed=0)
    rnn = gc.RNN("lstm", task.input_size, 128, output_size=task.output_size)
    rep = rnn.backward(task.x, loss=task.loss, target=task.target)

The same arguments always give the same arrays (NumPy's ``default_rng(seed)``); float32
tasks are the float64 ones rounded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _core
from . import _validate as v

__all__ = ["Task", "adding_problem", "batch_order", "copy_task"]


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
