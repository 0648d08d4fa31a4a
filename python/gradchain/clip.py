"""Gradient clipping for NumPy arrays with the semantics of ``torch.nn.utils``.

:func:`clip_grad_norm_`, :func:`clip_grad_value_` and :func:`get_total_norm` behave
like their PyTorch namesakes, but take the gradient arrays themselves (one
``numpy.ndarray`` or an iterable of them, float32 and/or float64, any shape and
memory layout) and modify them in place.

Differences from PyTorch, all deliberate:

* Norms are accumulated in double precision, float32 arrays included, and computed
  with scaling: the total is ``inf`` only if the true norm exceeds the largest double.
  PyTorch sums ``|x|**p`` directly in the array's precision, so e.g. two entries of
  ``1e200`` (or of ``1e20`` in float32) give an infinite norm there and the
  gradients get zeroed.
* ``max_norm`` and ``clip_value`` must be non-negative (PyTorch silently accepts
  negative values and flips the gradients' signs).
* The inf-norm of an empty (size 0) array is 0 (PyTorch raises).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Union

import numpy as np

from . import _core
from . import _validate as _v

__all__ = ["clip_coefficient", "clip_grad_norm_", "clip_grad_value_", "get_total_norm"]

Grads = Union[np.ndarray, Iterable[np.ndarray]]


def _arrays(grads: object, *, writable: bool) -> list[np.ndarray]:
    if isinstance(grads, np.ndarray):
        arrays = [grads]
    else:
        if isinstance(grads, (str, bytes)):
            it = None
        else:
            try:
                it = iter(grads)  # type: ignore[call-overload]
            except TypeError:
                it = None
        if it is None:
            raise TypeError(
                "grads must be a numpy.ndarray or an iterable of numpy.ndarray, "
                f"got {type(grads).__name__}"
            )
        arrays = list(it)
    for i, a in enumerate(arrays):
        name = "grads" if isinstance(grads, np.ndarray) else f"grads[{i}]"
        if not isinstance(a, np.ndarray):
            raise TypeError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
        if a.dtype.kind != "f" or a.dtype.itemsize not in (4, 8):
            raise TypeError(f"{name} has dtype {a.dtype}; gradients must be float32 or float64")
        if writable and not a.flags.writeable:
            raise ValueError(f"{name} is read-only; gradients are modified in place")
    return arrays


def _contiguous(arrays: list[np.ndarray]) -> tuple[list[np.ndarray], list[tuple]]:
    """Arrays the core can use directly, plus (original, copy) pairs to copy back."""
    work: list[np.ndarray] = []
    copies: list[tuple[np.ndarray, np.ndarray]] = []
    for a in arrays:
        if a.dtype.isnative and a.flags.c_contiguous:
            work.append(a)
        elif a.dtype.isnative and a.flags.f_contiguous:
            work.append(a.T)  # same memory, C order; the ops are elementwise
        else:
            c = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("="))
            work.append(c)
            copies.append((a, c))
    return work, copies


def get_total_norm(
    grads: Grads, norm_type: float | str = 2.0, error_if_nonfinite: bool = False
) -> float:
    """Norm of all gradients taken together, as if concatenated into one vector.

    The p-norm of each array is computed, then the p-norm of those norms, as
    ``torch.nn.utils.get_total_norm`` does. Accumulation is in double precision and
    scaled, so huge or tiny entries neither overflow nor underflow.

    Parameters
    ----------
    grads : numpy.ndarray or iterable of numpy.ndarray
        float32 and/or float64 arrays of any shape; read-only arrays are fine.
    norm_type : float or 'inf', default 2.0
        The order p > 0 of the norm; ``inf`` gives the largest absolute value.
    error_if_nonfinite : bool, default False
        Raise if the total norm is NaN or infinite.

    Returns
    -------
    float
        The total norm; 0.0 for an empty iterable. NaN if any entry is NaN, else
        ``inf`` if any entry is infinite.

    Raises
    ------
    TypeError
        If ``grads`` is not an array or an iterable of arrays, or an array's dtype is
        not float32 or float64.
    ValueError
        If ``norm_type`` is not a number > 0 or inf.
    gradchain.errors.NonFiniteError
        If ``error_if_nonfinite`` is true and the total norm is NaN or infinite.

    Examples
    --------
    >>> import numpy as np
    >>> from gradchain.clip import get_total_norm
    >>> get_total_norm([np.array([3.0]), np.array([4.0], dtype=np.float32)])
    5.0
    >>> get_total_norm(np.array([1.0, -2.0]), norm_type="inf")
    2.0
    >>> get_total_norm(np.array([1e200, 1e200]))  # torch: inf
    1.414213562373095e+200
    """
    arrays = _arrays(grads, writable=False)
    p = _v.norm_type(norm_type)
    work, _ = _contiguous(arrays)  # copies of strided arrays are only read
    return _core.clip_total_norm(work, p, _v.flag("error_if_nonfinite", error_if_nonfinite))


def clip_grad_norm_(
    grads: Grads,
    max_norm: float,
    norm_type: float | str = 2.0,
    error_if_nonfinite: bool = False,
) -> float:
    """Scale gradients in place so that their total norm is at most ``max_norm``.

    Computes ``total = get_total_norm(grads, norm_type)`` and multiplies every array
    by ``clip_coefficient(total, max_norm)``, i.e. ``min(1, max_norm / (total +
    1e-6))``, as ``torch.nn.utils.clip_grad_norm_`` does. Each array is multiplied in
    its own precision (the coefficient is rounded to float32 for float32 arrays). An
    infinite total gives coefficient 0, which turns infinite entries into NaN; a NaN
    total turns every entry into NaN -- exactly as in PyTorch.

    Parameters
    ----------
    grads : numpy.ndarray or iterable of numpy.ndarray
        Writable float32 and/or float64 arrays of any shape and memory layout; modified
        in place. Arrays should not overlap in memory.
    max_norm : float
        The largest allowed total norm, >= 0 (``inf`` disables clipping).
    norm_type : float or 'inf', default 2.0
        The order p > 0 of the norm; ``inf`` gives the largest absolute value.
    error_if_nonfinite : bool, default False
        Raise, leaving the arrays unchanged, if the total norm is NaN or infinite.

    Returns
    -------
    float
        The total norm before clipping (0.0 for an empty iterable).

    Raises
    ------
    TypeError
        If ``grads`` is not an array or an iterable of arrays, an array's dtype is not
        float32 or float64, or ``max_norm`` is not a real number.
    ValueError
        If an array is read-only, ``max_norm`` is negative or NaN, or ``norm_type`` is
        not a number > 0 or inf.
    gradchain.errors.NonFiniteError
        If ``error_if_nonfinite`` is true and the total norm is NaN or infinite.

    Examples
    --------
    >>> import numpy as np
    >>> from gradchain.clip import clip_grad_norm_
    >>> g = [np.array([3.0, 0.0]), np.array([[4.0]])]
    >>> clip_grad_norm_(g, max_norm=1.0)
    5.0
    >>> g[0], g[1]
    (array([0.59999988, 0.        ]), array([[0.79999984]]))
    """
    arrays = _arrays(grads, writable=True)
    mx = _v.non_negative("max_norm", max_norm)
    p = _v.norm_type(norm_type)
    work, copies = _contiguous(arrays)
    total = _core.clip_grad_norm(work, mx, p, _v.flag("error_if_nonfinite", error_if_nonfinite))
    for dst, src in copies:
        np.copyto(dst, src)
    return total


def clip_grad_value_(grads: Grads, clip_value: float) -> None:
    """Clamp gradients in place to ``[-clip_value, clip_value]``.

    As ``torch.nn.utils.clip_grad_value_``; NaN entries stay NaN.

    Parameters
    ----------
    grads : numpy.ndarray or iterable of numpy.ndarray
        Writable float32 and/or float64 arrays of any shape and memory layout; modified
        in place.
    clip_value : float
        The bound, >= 0 (``inf`` leaves the arrays unchanged).

    Raises
    ------
    TypeError
        If ``grads`` is not an array or an iterable of arrays, an array's dtype is not
        float32 or float64, or ``clip_value`` is not a real number.
    ValueError
        If an array is read-only, or ``clip_value`` is negative or NaN.

    Examples
    --------
    >>> import numpy as np
    >>> from gradchain.clip import clip_grad_value_
    >>> g = np.array([-3.0, 0.5, 2.0, np.nan])
    >>> clip_grad_value_(g, 1.0)
    >>> g
    array([-1. ,  0.5,  1. ,  nan])
    """
    arrays = _arrays(grads, writable=True)
    v = _v.non_negative("clip_value", clip_value)
    work, copies = _contiguous(arrays)
    _core.clip_grad_value(work, v)
    for dst, src in copies:
        np.copyto(dst, src)


def clip_coefficient(total_norm: float, max_norm: float) -> float:
    """The factor :func:`clip_grad_norm_` multiplies the gradients by.

    ``min(1, max_norm / (total_norm + 1e-6))``, computed as PyTorch does: a NaN total
    gives NaN and an infinite total gives 0 (NaN if ``max_norm`` is also infinite).

    Parameters
    ----------
    total_norm : float
        A total gradient norm: >= 0, inf or NaN.
    max_norm : float
        The largest allowed total norm, >= 0.

    Returns
    -------
    float
        The clipping coefficient, in [0, 1] or NaN.

    Raises
    ------
    TypeError
        If either argument is not a real number.
    ValueError
        If ``total_norm`` is negative, or ``max_norm`` is negative or NaN.

    Examples
    --------
    >>> from gradchain.clip import clip_coefficient
    >>> clip_coefficient(4.0, 1.0)
    0.24999993750001562
    >>> clip_coefficient(0.5, 1.0)
    1.0
    """
    total = _v.real("total_norm", total_norm)
    if total < 0:
        raise ValueError(f"total_norm must be non-negative (or inf, or NaN), got {total_norm!r}")
    return _core.clip_coefficient(total, _v.non_negative("max_norm", max_norm))
