"""Deep fully connected chains."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import _core
from . import _validate as v
from .report import BackwardReport

__all__ = ["ACTIVATIONS", "INITS", "LOSSES", "MLP"]

ACTIVATIONS: tuple[str, ...] = tuple(_core.activation_names())
INITS: tuple[str, ...] = tuple(_core.init_names())
LOSSES: tuple[str, ...] = ("probe", "mse", "cross_entropy")


def _check_uniform_chain(depth: int, width: int, dtype: np.dtype) -> None:
    """MemoryError before a list of ``depth + 1`` widths is built for a chain that cannot be
    stored: its weights and biases, and per layer the Python list's pointer and the core's
    width and offsets (the core checks the exact figure again)."""
    nbytes = depth * (width * width + width) * dtype.itemsize + 32 * (depth + 1)
    _core.check_memory(float(nbytes), "storing the chain's weights")


def _widths(depth: Any, width: Any) -> list[int]:
    if isinstance(width, (str, bytes)) or not (isinstance(width, (numbers.Integral, Sequence))):
        raise TypeError(f"width must be a positive integer or a sequence of them; got {width!r}")
    if isinstance(width, Sequence):
        widths = [v.positive_int(f"width[{i}]", w) for i, w in enumerate(width)]
        if len(widths) < 2:
            raise ValueError(f"width as a sequence must list (in, hidden..., out), at least 2 entries; got {list(width)}")
        if depth is not None and v.positive_int("depth", depth) != len(widths) - 1:
            raise ValueError(f"depth={depth} does not match width, which lists {len(widths) - 1} layers")
        return widths
    if depth is None:
        raise TypeError("depth is required when width is a single integer")
    d = v.positive_int("depth", depth)
    w = v.positive_int("width", width)
    return [w] * (d + 1)


def _weight_reach(init: str, widths: Sequence[int]) -> float:
    """The largest ``|W_ij|`` that `init` can draw over these layers per unit of gain (of
    ``gain * sigma_w`` for ``normal``): its scale at the smallest fans times the largest
    draw (uniform draws lie in [-1, 1), normal ones within ``NORMAL_DRAW_MAX``)."""
    fan_in = min(widths[:-1])
    fan_sum = min(a + b for a, b in zip(widths[:-1], widths[1:]))
    nd = v.NORMAL_DRAW_MAX
    return {
        "xavier_normal": math.sqrt(2.0 / fan_sum) * nd,
        "xavier_uniform": math.sqrt(6.0 / fan_sum),
        "he_normal": math.sqrt(2.0 / fan_in) * nd,
        "he_uniform": math.sqrt(6.0 / fan_in),
        "lecun_normal": nd / math.sqrt(fan_in),
        "orthogonal": 1.0 + 1e-12,  # entries of an orthonormal matrix, rounded
        "normal": nd / math.sqrt(fan_in),
    }[init]


def _activation_parameters(config: dict[str, Any], dt: np.dtype) -> None:
    """The activation computes with negative_slope and alpha in the chain's dtype."""
    for name in ("negative_slope", "alpha"):
        v.representable(name, config[name], dt)


def _as_array(a: Any) -> np.ndarray:
    """NumPy view of an array-like; tensors (anything with ``detach``) are detached first,
    so ``layer.weight`` of a torch module can be passed as it is."""
    if hasattr(a, "detach") and hasattr(a, "cpu"):
        a = a.detach().cpu().numpy()
    return np.asarray(a)


class MLP:
    """A deep fully connected chain ``h_l = phi(h_{l-1} W_l^T + b_l)``, ``l = 1..depth``.

    Parameters
    ----------
    depth : int, optional
        Number of layers (required when `width` is an integer).
    width : int or sequence of int
        A uniform width, or the layer widths ``(in, hidden..., out)`` (``depth + 1`` entries).
    activation : str
        One of :data:`ACTIVATIONS`: ``linear``, ``sigmoid``, ``tanh``, ``relu``,
        ``leaky_relu``, ``elu``, ``gelu`` (exact erf form), ``gelu_tanh`` (tanh
        approximation), ``silu``, ``softplus`` (PyTorch's beta=1, threshold=20).
    init : str
        One of :data:`INITS`: ``xavier_normal``, ``xavier_uniform``, ``he_normal``,
        ``he_uniform``, ``lecun_normal``, ``orthogonal`` (Haar), ``normal`` (weight std
        ``sigma_w / sqrt(fan_in)``).
    gain : float
        Multiplies every initializer's scale.
    sigma_w : float
        Weight scale of the ``normal`` initializer.
    bias_std : float
        Biases are N(0, bias_std**2); zero when 0.
    negative_slope : float
        Slope of ``leaky_relu`` for negative inputs.
    alpha : float
        ``elu``'s alpha.
    dtype : {"float64", "float32"}
        Precision of weights and arithmetic (norms are accumulated in double).
    seed : int
        Every weight follows from it, the same for any thread count; float32 weights are
        the float64 ones rounded.

    Raises
    ------
    ValueError
        Among bad names and values: a ``gain`` (``gain * sigma_w`` for ``normal``),
        ``bias_std``, ``negative_slope`` or ``alpha`` with which a weight, bias or
        activation constant could exceed the dtype's largest value; the message gives the
        largest value accepted.

    Examples
    --------
    >>> import numpy as np, gradchain as gc
    >>> net = gc.MLP(depth=50, width=16, activation="tanh", seed=0)
    >>> rep = net.backward(np.ones((4, 16)))
    >>> rep.log10_weight_grad_norms.shape
    (50,)
    """

    _config: dict[str, Any]
    _dtype: np.dtype

    def __init__(
        self,
        depth: int | None = None,
        width: int | Sequence[int] = 64,
        *,
        activation: str = "tanh",
        init: str = "xavier_normal",
        gain: float = 1.0,
        sigma_w: float = 1.0,
        bias_std: float = 0.0,
        negative_slope: float = 0.01,
        alpha: float = 1.0,
        dtype: Any = "float64",
        seed: int = 0,
    ) -> None:
        self._dtype = v.dtype(dtype)
        if isinstance(width, numbers.Integral) and isinstance(depth, numbers.Integral):
            d, w = v.positive_int("depth", depth), v.positive_int("width", width)
            _check_uniform_chain(d, w, self._dtype)
        widths = _widths(depth, width)
        v.choice("activation", activation, ACTIVATIONS)
        v.choice("init", init, INITS)
        self._config = {
            "activation": activation,
            "init": init,
            "gain": v.finite_float("gain", gain),
            "sigma_w": v.finite_float("sigma_w", sigma_w, minimum=0.0),
            "bias_std": v.finite_float("bias_std", bias_std, minimum=0.0),
            "negative_slope": v.finite_float("negative_slope", negative_slope),
            "alpha": v.finite_float("alpha", alpha),
            "seed": v.seed(seed),
        }
        if self._config["alpha"] <= 0:
            raise ValueError(f"alpha must be > 0; got {alpha}")
        c = self._config
        reach = _weight_reach(init, widths)
        if init == "normal":
            gs = c["gain"] * c["sigma_w"]
            v.representable("gain * sigma_w", gs, self._dtype, reach, "the weights")
        else:
            v.representable("gain", c["gain"], self._dtype, reach, "the weights")
        v.representable("bias_std", c["bias_std"], self._dtype, v.NORMAL_DRAW_MAX, "the biases")
        _activation_parameters(c, self._dtype)
        cls = _core.MLPChain64 if self._dtype == np.float64 else _core.MLPChain32
        self._chain = cls(
            widths, c["activation"], c["negative_slope"], c["alpha"], c["init"],
            c["gain"], c["sigma_w"], c["bias_std"], c["seed"],
        )

    @classmethod
    def from_weights(
        cls,
        weights: Sequence[Any],
        biases: Sequence[Any] | None = None,
        *,
        activation: str = "tanh",
        negative_slope: float = 0.01,
        alpha: float = 1.0,
        dtype: Any = None,
    ) -> MLP:
        """A chain with the given weights, e.g. those of a ``torch.nn.Sequential`` of Linears.

        Parameters
        ----------
        weights : sequence of array_like
            ``W_l`` with shape ``(out, in)`` as ``torch.nn.Linear.weight`` (torch tensors
            are accepted as they are); consecutive layers must chain
            (``W_{l+1}.shape[1] == W_l.shape[0]``).
        biases : sequence of array_like or None
            ``b_l`` with shape ``(out,)``; entries may be None (zero), or None for all zero.
        activation, negative_slope, alpha
            As in :class:`MLP`.
        dtype : {"float64", "float32"}, optional
            Defaults to float32 when every weight is float32, else float64.
        """
        if isinstance(weights, np.ndarray) or not isinstance(weights, Sequence) or len(weights) == 0:
            raise TypeError("weights must be a non-empty sequence of 2-D arrays (out, in)")
        arrays = [_as_array(w) for w in weights]
        if dtype is None:
            dtype = np.float32 if all(a.dtype == np.float32 for a in arrays) else np.float64
        dt = v.dtype(dtype)
        ws: list[np.ndarray] = []
        for i, a in enumerate(arrays):
            if a.ndim != 2:
                raise ValueError(f"weights[{i}] must be 2-D (out, in); got shape {a.shape}")
            if ws and a.shape[1] != ws[-1].shape[0]:
                raise ValueError(
                    f"weights[{i}] has {a.shape[1]} inputs but weights[{i - 1}] has {ws[-1].shape[0]} outputs"
                )
            ws.append(v.float_array(f"weights[{i}]", a, dt, (None, None)))
        widths = [ws[0].shape[1]] + [w.shape[0] for w in ws]
        if biases is None:
            biases = [None] * len(ws)
        if isinstance(biases, np.ndarray) or not isinstance(biases, Sequence) or len(biases) != len(ws):
            raise ValueError(f"biases must be None or a sequence of {len(ws)} arrays (one per layer)")
        bs = [
            np.zeros(widths[i + 1], dt)
            if b is None
            else v.float_array(f"biases[{i}]", _as_array(b), dt, (widths[i + 1],))
            for i, b in enumerate(biases)
        ]
        v.choice("activation", activation, ACTIVATIONS)
        self = cls.__new__(cls)
        self._dtype = dt
        self._config = {
            "activation": activation,
            "init": None,
            "negative_slope": v.finite_float("negative_slope", negative_slope),
            "alpha": v.finite_float("alpha", alpha),
            "seed": None,
        }
        if self._config["alpha"] <= 0:
            raise ValueError(f"alpha must be > 0; got {alpha}")
        _activation_parameters(self._config, dt)
        core = _core.MLPChain64 if dt == np.float64 else _core.MLPChain32
        # Two copies: the concatenated arrays, and the chain's own.
        n = sum(w.size for w in ws) + sum(b.size for b in bs)
        _core.check_memory(float(2 * n * dt.itemsize), "copying the chain's weights")
        self._chain = core.from_arrays(
            widths, activation, self._config["negative_slope"], self._config["alpha"],
            np.concatenate([w.ravel() for w in ws]), np.concatenate(bs),
        )
        return self

    # -- description ------------------------------------------------------------------
    @property
    def depth(self) -> int:
        """Number of layers."""
        return int(self._chain.depth)

    @property
    def widths(self) -> tuple[int, ...]:
        """Layer widths ``(in, hidden..., out)``."""
        return tuple(self._chain.widths)

    @property
    def activation(self) -> str:
        """Name of the activation."""
        return str(self._chain.activation)

    @property
    def dtype(self) -> np.dtype:
        """float32 or float64."""
        return self._dtype

    @property
    def log_scale_forward(self) -> bool:
        """True when the forward pass carries its scale in log space (positively
        homogeneous activation and all biases zero): it then never overflows."""
        return bool(self._chain.log_scale_forward)

    @property
    def weights(self) -> list[np.ndarray]:
        """Read-only views of ``W_l``, shape ``(out, in)``, l = 1..depth."""
        return [self._view(self._chain.weight(l)) for l in range(1, self.depth + 1)]

    @property
    def biases(self) -> list[np.ndarray]:
        """Read-only views of ``b_l``, l = 1..depth."""
        return [self._view(self._chain.bias(l)) for l in range(1, self.depth + 1)]

    @staticmethod
    def _view(a: np.ndarray) -> np.ndarray:
        a.setflags(write=False)
        return a

    def __repr__(self) -> str:
        w = self.widths
        shape = f"depth={self.depth}, width={w[0]}" if len(set(w)) == 1 else f"width={list(w)}"
        extra = "".join(
            f", {k}={self._config[k]!r}" for k in ("init", "gain", "bias_std", "seed") if self._config.get(k) is not None
        )
        return f"MLP({shape}, activation={self.activation!r}{extra}, dtype={self._dtype.name!r})"

    # -- pickling (process pools, cluster executors) ----------------------------------
    def __getstate__(self) -> dict[str, Any]:
        return {
            "config": dict(self._config),
            "dtype": self._dtype.name,
            "widths": list(self.widths),
            "weights": np.concatenate([w.ravel() for w in self.weights]),
            "biases": np.concatenate([b.ravel() for b in self.biases]),
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._config = dict(state["config"])
        self._dtype = v.dtype(state["dtype"])
        core = _core.MLPChain64 if self._dtype == np.float64 else _core.MLPChain32
        self._chain = core.from_arrays(
            list(state["widths"]), self._config["activation"], self._config["negative_slope"],
            self._config["alpha"], state["weights"], state["biases"],
        )

    # -- computation ------------------------------------------------------------------
    def backward(
        self,
        x: Any,
        target: Any = None,
        *,
        loss: str | None = None,
        grad_output: Any = None,
        return_grads: bool = False,
        max_norm: float | None = None,
        norm_type: float | str = 2.0,
    ) -> BackwardReport:
        """Forward and backward pass; per-layer gradient norms, exact in log space.

        Parameters
        ----------
        x : array_like, shape (batch, widths[0])
            Inputs (finite).
        target : array_like, optional
            ``mse``: an array shaped like the output; ``cross_entropy``: integer labels,
            shape (batch,), in ``[0, widths[-1])``.
        loss : {"probe", "mse", "cross_entropy"}, optional
            ``probe`` (default without target) is ``0.5 * ||h_L||**2`` summed over the batch;
            ``mse`` (default with a target) is the mean over all elements, as
            ``torch.nn.functional.mse_loss``; ``cross_entropy`` is softmax cross-entropy,
            mean over the batch.
        grad_output : array_like, optional
            dL/dh_L given directly (shape of the output); then no loss is computed.
        return_grads : bool
            Also return the full gradient arrays ``weight_grads``, ``bias_grads``,
            ``activation_grads``.
        max_norm : float, optional
            Clip the chain's gradients as ``torch.nn.utils.clip_grad_norm_(max_norm,
            norm_type)`` would over ``[W_1, b_1, W_2, b_2, ...]``; the report carries the
            norms before and after.
        norm_type : float or 'inf'
            Order of the total norm: 2, ``inf`` or any p > 0.

        Returns
        -------
        BackwardReport

        Raises
        ------
        ValueError, TypeError
            Bad shapes, dtypes, names or non-finite inputs.
        MemoryError
            When the pass would need more memory than the machine has.
        NonFiniteError
            When the forward pass overflows or produces NaN (with the first layer).
        """
        dt = self._dtype
        x = v.float_array("x", x, dt, (None, self.widths[0]))
        batch = x.shape[0]
        out_shape = (batch, self.widths[-1])
        p = v.norm_type(norm_type)
        mn = -1.0 if max_norm is None else v.non_negative("max_norm", max_norm)
        if not isinstance(return_grads, (bool, np.bool_)):
            raise TypeError(f"return_grads must be a bool; got {return_grads!r}")

        if grad_output is not None:
            if target is not None or loss not in (None, "grad_output"):
                raise ValueError("grad_output replaces the loss: pass neither target nor loss with it")
            name, tgt = "grad_output", v.float_array("grad_output", grad_output, dt, out_shape)
        else:
            name = loss if loss is not None else ("probe" if target is None else "mse")
            v.choice("loss", name, LOSSES)
            if name == "probe":
                if target is not None:
                    raise ValueError("loss='probe' takes no target")
                tgt = None
            elif target is None:
                raise ValueError(f"loss={name!r} needs a target")
            elif name == "mse":
                tgt = v.float_array("target", target, dt, out_shape)
            else:
                tgt = self._labels(target, batch)
        d = self._chain.backward(x, name, tgt, bool(return_grads), mn, p)
        return BackwardReport._from_core(d)

    def _labels(self, target: Any, batch: int) -> np.ndarray:
        arr = np.asarray(target)
        if arr.dtype.kind not in "iu":
            raise TypeError(f"target for loss='cross_entropy' must be integer class labels; got dtype {arr.dtype}")
        if arr.shape != (batch,):
            raise ValueError(f"target for loss='cross_entropy' must have shape ({batch},); got {arr.shape}")
        n = self.widths[-1]
        if arr.size and (arr.min() < 0 or arr.max() >= n):
            raise ValueError(f"target labels must lie in [0, {n}); got values in [{arr.min()}, {arr.max()}]")
        return np.ascontiguousarray(arr, dtype=np.int64)

    def backward_memory(self, batch: int, return_grads: bool = False) -> int:
        """Bytes a :meth:`backward` pass with this batch size allocates at most (besides the
        weights): everything it holds at its peak, the result included.

        The forward pass keeps every layer's output (and its pre-activation for ``elu``,
        ``gelu``, ``gelu_tanh``, ``silu``, ``softplus``): about ``batch * sum(widths)``
        numbers; about 130 bytes per layer go to exponents, offsets and the per-layer
        norms. With two threads (OpenMP, a batch of two or more) the pass also keeps
        every dL/dz_l (as much again as the outputs) while that leaves half of the
        available memory free; otherwise it runs without them and needs that much less.
        """
        b = v.positive_int("batch", batch)
        return int(self._chain.backward_bytes(b, bool(return_grads)))

    def forward(self, x: Any) -> np.ndarray:
        """The output ``h_L`` for inputs `x` (0 or inf where a log-scale pass leaves the range).

        Runs the forward pass only; raises :class:`NonFiniteError` where it overflows.
        """
        x = v.float_array("x", x, self._dtype, (None, self.widths[0]))
        out, _ = self._chain.forward(x)
        out.setflags(write=False)
        return out
