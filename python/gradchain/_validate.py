"""Argument checking shared by the public classes: messages name the argument."""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

DTYPES = {"float32": np.float32, "float64": np.float64}


def dtype(value: Any) -> np.dtype:
    """Return float32/float64 for a dtype given by name or NumPy type."""
    try:
        dt = np.dtype(value)
    except TypeError:
        dt = None
    if dt is None or dt.name not in DTYPES:
        raise ValueError(f"dtype must be one of 'float32', 'float64'; got {value!r}")
    return dt


INT32_MAX = 2**31 - 1  # BLAS dimensions are 32-bit


def positive_int(name: str, value: Any, maximum: int = INT32_MAX) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive integer; got {value!r}")
    value = int(value)
    if value <= 0:
        raise ValueError(f"{name} must be a positive integer; got {value}")
    if value > maximum:
        raise ValueError(f"{name} must be at most {maximum}; got {value}")
    return int(value)


def int_in(name: str, value: Any, lo: int, hi: int | None, accepted: str) -> int:
    """An integer in [lo, hi] (hi None: no upper bound); `accepted` completes "name must be"."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {accepted}; got {value!r}")
    i = int(value)
    if i < lo or (hi is not None and i > hi):
        raise ValueError(f"{name} must be {accepted}; got {i}")
    return i


def readonly(*arrays: np.ndarray | None) -> None:
    """Marks result arrays read-only (None entries are skipped)."""
    for a in arrays:
        if a is not None:
            a.setflags(write=False)


def finite_float(name: str, value: Any, *, minimum: float | None = None) -> float:
    v = real(name, value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite; got {v}")
    if minimum is not None and v < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {v}")
    return v


def flag(name: str, value: Any) -> bool:
    """True or False (NumPy's bool too); anything else is a TypeError naming `name`."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False; got {value!r}")
    return bool(value)


def real(name: str, value: Any) -> float:
    """Any real number (inf and NaN included); bools are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def non_negative(name: str, value: Any) -> float:
    """A real number >= 0 (inf allowed, NaN not)."""
    f = real(name, value)
    if math.isnan(f) or f < 0:
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    return f


def choice(name: str, value: Any, allowed: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in allowed:
        listed = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"{name} must be one of {listed}; got {value!r}")
    return value


def seed(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"seed must be a non-negative integer below 2**64; got {value!r}")
    value = int(value)
    if not 0 <= value < 2**64:
        raise ValueError(f"seed must be a non-negative integer below 2**64; got {value}")
    return int(value)


def float_array(name: str, value: Any, dt: np.dtype, shape: tuple[int | None, ...]) -> np.ndarray:
    """A C-contiguous array of dtype `dt` and the given shape (None: any), all finite."""
    if isinstance(value, np.ndarray):
        arr = value
    else:
        try:
            arr = np.asarray(value)
        except Exception as exc:  # ragged lists and the like
            raise TypeError(
                f"{name} must be an array of real numbers; got {type(value).__name__}"
            ) from exc
    if arr.dtype.kind not in "fiu" or arr.dtype == np.bool_:
        raise TypeError(f"{name} must hold real numbers (float or int); got dtype {arr.dtype}")
    want = "(" + ", ".join("any" if s is None else str(s) for s in shape) + ")"
    if arr.ndim != len(shape) or any(s is not None and s != a for s, a in zip(shape, arr.shape)):
        raise ValueError(f"{name} must have shape {want}; got {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} must not be empty; got shape {arr.shape}")
    with np.errstate(over="ignore"):  # a finite value beyond float32 is reported below
        out = np.ascontiguousarray(arr, dtype=dt)
    if not np.isfinite(out).all():
        bad = tuple(int(i) for i in np.argwhere(~np.isfinite(out))[0])
        given = arr[bad].item()
        if math.isfinite(given):
            top = float(np.finfo(dt).max)
            raise ValueError(
                f"{name} has {given!r} at index {bad}, beyond the largest {dt.name} value {top:.8g}"
            )
        where = "inf" if np.isinf(out[bad]) else "NaN"
        raise ValueError(f"{name} contains {where} at index {bad}; inputs must be finite")
    return out


# The initializers' normal draws (Box-Muller from 53-bit uniforms, cpp/src/init.cpp) lie
# within sqrt(2 ln 2**53) of 0: the most a scale is multiplied by.
NORMAL_DRAW_MAX = math.sqrt(106.0 * math.log(2.0))


def representable(
    name: str, value: float, dt: np.dtype, reach: float = 1.0, becomes: str = ""
) -> float:
    """Refuses a parameter whose value, times `reach` (the largest factor by which it
    enters a stored number of dtype `dt`: a weight, a bias, a slope), exceeds the largest
    finite number of `dt`. `becomes` names what it reaches (e.g. "the weights")."""
    top = float(np.finfo(dt).max)
    if abs(value) * reach <= top:
        return value
    how = f", as {becomes} reach {reach:.6g} times it" if reach != 1.0 else ""
    raise ValueError(
        f"{name} must be at most {top / reach:.6g} in magnitude for dtype {dt.name} "
        f"(whose largest value is {top:.8g}{how}); got {value!r}"
    )


ACCEPTED_NORM_TYPES = "a number p > 0 (e.g. 2.0, 1.0, 0.5) or inf (float('inf') or 'inf')"


def norm_type(value: Any) -> float:
    """The order of a norm: a real p > 0, or inf (also given as the string 'inf')."""
    if isinstance(value, str) and value == "inf":
        return math.inf
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        p = float(value)
        if p > 0:
            return p
    raise ValueError(f"norm_type must be {ACCEPTED_NORM_TYPES}, got {value!r}")


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().split()[0]
    except (OSError, IndexError):
        return None
    return int(text) if text.isdigit() else None


def available_memory_bytes() -> int:
    """Bytes this process can still allocate without swapping: the kernel's MemAvailable,
    lowered to what a cgroup limit leaves; the physical memory when neither is known."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    for limit, usage in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        (
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "/sys/fs/cgroup/memory/memory.usage_in_bytes",
        ),
    ):
        lim, use = _read_int(limit), _read_int(usage)
        if lim is not None and use is not None:  # "max" (no limit) reads as None
            left = max(lim - use, 0)
            avail = left if avail is None else min(avail, left)
            break
    if avail is None:
        try:
            avail = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            return 0
    return int(avail)


def check_memory(nbytes: float, what: str) -> None:
    """MemoryError, stating the bytes, when `what` needs more than is available."""
    avail = available_memory_bytes()
    if avail and nbytes > avail:
        raise MemoryError(
            f"{what} needs {nbytes:.0f} bytes ({nbytes / 2**30:.3g} GiB), more than the "
            f"{avail / 2**30:.3g} GiB of memory available"
        )


_TENSOR_DTYPES = ("float32", "float64", "int64", "int32", "int16", "int8", "uint8")


def as_array(name: str, a: Any) -> Any:
    """A NumPy view of an array-like; torch tensors (anything with ``detach``) are detached
    first, so ``layer.weight`` or a batch of a torch model can be passed as it is. A tensor
    of another dtype (bfloat16, float16, complex) is a TypeError naming the accepted ones."""
    if hasattr(a, "detach") and hasattr(a, "cpu"):
        dt = str(getattr(a, "dtype", "")).replace("torch.", "")
        if dt not in _TENSOR_DTYPES:
            raise TypeError(
                f"{name} is a tensor of dtype {dt}; gradchain accepts float32 and float64 tensors "
                "(and integer class labels): convert it with .double() or .float()"
            )
        return a.detach().cpu().numpy()
    if isinstance(a, np.ndarray):
        return a
    try:
        return np.asarray(a)
    except (ValueError, TypeError) as exc:  # ragged nested lists and the like
        raise TypeError(
            f"{name} must be an array of real numbers (a NumPy array, a torch tensor or a "
            f"rectangular nested list); got a {type(a).__name__} NumPy cannot make one of: {exc}"
        ) from None


def param_array(name: str, a: Any, dt: np.dtype, shape: tuple[int | None, ...]) -> np.ndarray:
    """A parameter given from outside: float_array, refusing half precision (its values
    would be simulated in a precision the model does not use)."""
    arr = as_array(name, a)
    if isinstance(arr, np.ndarray) and arr.dtype == np.float16:
        raise TypeError(
            f"{name} has dtype float16; gradchain accepts float32 and float64 parameters"
        )
    return float_array(name, arr, dt, shape)


def default_loss(target: Any) -> str:
    """The loss a backward pass uses when none is named: ``probe`` without a target,
    ``cross_entropy`` for integer labels, ``mse`` otherwise (the same rule for every chain)."""
    if target is None:
        return "probe"
    kind = getattr(getattr(target, "dtype", None), "kind", None)
    if kind is None:
        dt = str(getattr(target, "dtype", ""))  # a torch tensor
        kind = (
            "i"
            if dt.startswith(("torch.int", "torch.uint"))
            else ("f" if dt else as_array("target", target).dtype.kind)
        )
    return "cross_entropy" if kind in "iu" else "mse"
