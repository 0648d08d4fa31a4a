"""Deep fully connected chains: a builder of :class:`~gradchain.Chain` for the common shapes."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from . import _core
from . import _validate as v
from .blocks import ACTIVATIONS, Activation, BatchNorm, Block, LayerNorm, Linear, Residual, RMSNorm
from .chain import INITS, LOSSES, Chain, _entries, _Entry, _store_weights
from .errors import NonFiniteError
from .report import BackwardReport

__all__ = ["ACTIVATIONS", "INITS", "LOSSES", "MLP", "NORMS", "NORM_POSITIONS"]

NORMS: tuple[str, ...] = ("layer", "batch", "rms")
NORM_POSITIONS: tuple[str, ...] = ("pre", "post")
_NORM_BLOCKS = {"layer": LayerNorm, "batch": BatchNorm, "rms": RMSNorm}
# Activations with phi(a x) = a phi(x) for a > 0: with zero biases the pass carries its scale.
_HOMOGENEOUS = ("linear", "relu", "leaky_relu")


def _check_uniform_chain(depth: int, width: int, dtype: np.dtype) -> None:
    """MemoryError before a list of ``depth + 1`` widths is built for a chain that cannot be
    stored: its weights and biases, and per layer the Python list's pointer and the core's
    blocks (the core checks again as it builds)."""
    nbytes = depth * (width * width + width) * dtype.itemsize + 600 * (depth + 1)
    _core.check_memory(float(nbytes), "storing the chain's weights")


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


def _widths(depth: Any, width: Any) -> list[int]:
    if isinstance(width, (str, bytes)) or not (isinstance(width, (numbers.Integral, Sequence))):
        raise TypeError(f"width must be a positive integer or a sequence of them; got {width!r}")
    if isinstance(width, Sequence):
        widths = [v.positive_int(f"width[{i}]", w) for i, w in enumerate(width)]
        if len(widths) < 2:
            raise ValueError(
                f"width as a sequence must list (in, hidden..., out), at least 2 entries; got {list(width)}"
            )
        if depth is not None and v.positive_int("depth", depth) != len(widths) - 1:
            raise ValueError(
                f"depth={depth} does not match width, which lists {len(widths) - 1} layers"
            )
        return widths
    if depth is None:
        raise TypeError("depth is required when width is a single integer")
    d = v.positive_int("depth", depth)
    w = v.positive_int("width", width)
    return [w] * (d + 1)


def _layer(
    n_in: int, n_out: int, act: Activation, shape: dict[str, Any]
) -> tuple[list[Block], Linear]:
    """The top-level blocks of one layer, and its Linear."""
    lin = Linear(n_in, n_out)
    norm = shape["norm"]
    pre = shape["norm_position"] == "pre"
    if not shape["residual"]:
        if norm is None:
            return [lin, act], lin
        cls = _NORM_BLOCKS[norm]
        return ([cls(n_in), lin, act] if pre else [lin, cls(n_out), act]), lin
    body: list[Block] = [act, lin]
    if norm is not None and pre:
        body = [_NORM_BLOCKS[norm](n_in), *body]
    res = Residual(body, scale=shape["residual_scale"], shortcut=n_in != n_out)
    if norm is not None and not pre:
        return [res, _NORM_BLOCKS[norm](n_out)], lin
    return [res], lin


def _position(blocks: Sequence[Block], width: int, target: Linear) -> int:
    """Index of `target`'s weight among the trainable parameters of `blocks`."""
    entries: list[_Entry] = []
    for b in blocks:
        if b is target:
            return sum(not e.buffer for e in entries)
        if isinstance(b, Residual):
            for c in b.blocks:
                if c is target:
                    return sum(not e.buffer for e in entries)
                _entries(c, width, "", 0, entries)
                width = c._out(width)
            continue
        _entries(b, width, "", 0, entries)
        width = b._out(width)
    raise AssertionError("the layer's Linear is not among its blocks")  # pragma: no cover


class MLP:
    """A deep fully connected chain, ``h_l = phi(h_{l-1} W_l^T + b_l)``, ``l = 1..depth``,
    and its common variants with normalisation and residual connections.

    An MLP is a :class:`Chain` of the blocks in :attr:`blocks`, built in one line. With the
    default options layer l is ``[Linear(n_{l-1}, n_l), Activation(activation)]``; with
    ``norm`` and ``residual`` (``N`` the norm layer, ``s`` the residual scale) it is:

    ==========  ========  =====================================  ============================
    residual    position  h_l =                                  blocks of layer l
    ==========  ========  =====================================  ============================
    False       pre       ``phi(W N(h) + b)``                    ``N, Linear, Activation``
    False       post      ``phi(N(W h + b))``                    ``Linear, N, Activation``
    True        (none)    ``h + s (W phi(h) + b)``               ``Residual([Activation, Linear], s)``
    True        pre       ``h + s (W phi(N(h)) + b)``            ``Residual([N, Activation, Linear], s)``
    True        post      ``N(h + s (W phi(h) + b))``            ``Residual([Activation, Linear], s), N``
    ==========  ========  =====================================  ============================

    with ``h = h_{l-1}``: the post-norm ``Linear -> norm -> activation`` of batch
    normalisation (Ioffe & Szegedy 2015), the pre-activation residual block (He et al.
    2016) and the pre-LN / post-LN placements of transformers (Xiong et al. 2020). A
    residual layer whose widths differ gets a ``Linear(n_{l-1}, n_l, bias=False)``
    shortcut instead of the identity.

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
    norm : {None, "layer", "batch", "rms"}
        A :class:`LayerNorm`, :class:`BatchNorm` or :class:`RMSNorm` in every layer
        (torch's default ``eps``; weight 1, bias 0 at first).
    norm_position : {"pre", "post"}
        Where the norm goes (see the table).
    residual : bool
        Residual layers ``h + s * f(h)`` (see the table).
    residual_scale : float
        ``s`` (e.g. ``depth ** -0.5``).
    dtype : {"float64", "float32"}
        Precision of weights and arithmetic (norms are accumulated in double).
    seed : int
        Every weight follows from it, the same for any thread count; float32 weights are
        the float64 ones rounded. Layer l's weights are those of the l-th Linear of
        ``gc.Chain(net.blocks, init, gain, sigma_w, bias_std, seed)``.
    store_weights : bool or "auto"
        False: no weight or bias is kept; each pass draws layer l's again from
        (seed, l) when it needs them (twice in a backward pass), with results
        bit-identical to a stored chain's. Memory then no longer grows with
        ``depth * width**2``. :attr:`weights` and :attr:`biases` draw them anew on each
        access; such an MLP cannot be trained, loaded or handed to the Jacobian tools.
        ``"auto"`` (the default) keeps them unless they would not fit in the memory
        available (while one layer's would). The orthogonal initializer's QR per layer (about
        ``(8/3) width**3`` flops) is then paid twice per pass as well.

    Raises
    ------
    ValueError
        Among bad names and values: a ``gain`` (``gain * sigma_w`` for ``normal``),
        ``bias_std``, ``negative_slope`` or ``alpha`` with which a weight, bias or
        activation constant could exceed the dtype's largest value; the message gives the
        largest value accepted.
    MemoryError
        A chain that cannot be stored, before anything is allocated.

    Examples
    --------
    >>> import numpy as np, gradchain as gc
    >>> net = gc.MLP(depth=50, width=16, activation="tanh", seed=0)
    >>> rep = net.backward(np.ones((4, 16)))
    >>> rep.log10_weight_grad_norms.shape
    (50,)
    >>> gc.MLP(depth=2, width=8, activation="relu", norm="layer", residual=True).blocks[0]
    Residual([LayerNorm(8), Activation('relu'), Linear(8, 8)])
    """

    _config: dict[str, Any]
    _dtype: np.dtype
    _net: Chain

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
        norm: str | None = None,
        norm_position: str = "pre",
        residual: bool = False,
        residual_scale: float = 1.0,
        dtype: Any = "float64",
        seed: int = 0,
        store_weights: bool | str = "auto",
    ) -> None:
        dt = v.dtype(dtype)
        if isinstance(width, numbers.Integral) and isinstance(depth, numbers.Integral):
            d, w = v.positive_int("depth", depth), v.positive_int("width", width)
            layer = float((w * w + w) * dt.itemsize)
            store = _store_weights(store_weights, d * layer, layer, 600.0 * (d + 1))
            if store:
                _check_uniform_chain(d, w, dt)
        widths = _widths(depth, width)
        if not (isinstance(width, numbers.Integral) and isinstance(depth, numbers.Integral)):
            sizes = [a * b + b for a, b in zip(widths[:-1], widths[1:])]
            store = _store_weights(
                store_weights, float(sum(sizes) * dt.itemsize), float(max(sizes) * dt.itemsize)
            )
        v.choice("init", init, INITS)
        config = self._shape_config(
            activation, negative_slope, alpha, norm, norm_position, residual, residual_scale
        )
        config.update(
            init=init,
            gain=v.finite_float("gain", gain),
            sigma_w=v.finite_float("sigma_w", sigma_w, minimum=0.0),
            bias_std=v.finite_float("bias_std", bias_std, minimum=0.0),
            seed=v.seed(seed),
        )
        reach = _weight_reach(init, widths)
        if init == "normal":
            gs = config["gain"] * config["sigma_w"]
            v.representable("gain * sigma_w", gs, dt, reach, "the weights")
        else:
            v.representable("gain", config["gain"], dt, reach, "the weights")
        v.representable("bias_std", config["bias_std"], dt, v.NORMAL_DRAW_MAX, "the biases")
        _activation_parameters(config, dt)
        self._setup(widths, config, dt, store)
        self._net._core.init(
            init, config["gain"], config["sigma_w"], config["bias_std"], config["seed"]
        )
        self._net._config = {k: config[k] for k in ("init", "gain", "sigma_w", "bias_std", "seed")}
        self._zero_bias = config["bias_std"] == 0.0

    def _reinit(self, *, gain: Any, sigma_w: Any, bias_std: Any, seed: Any) -> None:
        """Draws new parameters into this MLP as ``MLP(..., gain=, sigma_w=, bias_std=,
        seed=)`` of the same shape would, with the same checks: a sweep reuses one chain's
        memory from point to point instead of allocating (and page-faulting) it anew."""
        c = dict(self._config)
        if c["init"] is None or c["norm"] == "batch":
            raise AssertionError("only an initialised MLP without BatchNorm is redrawn")
        c.update(
            gain=v.finite_float("gain", gain),
            sigma_w=v.finite_float("sigma_w", sigma_w, minimum=0.0),
            bias_std=v.finite_float("bias_std", bias_std, minimum=0.0),
            seed=v.seed(seed),
        )
        dt, reach = self._dtype, _weight_reach(c["init"], list(self._widths))
        if c["init"] == "normal":
            v.representable("gain * sigma_w", c["gain"] * c["sigma_w"], dt, reach, "the weights")
        else:
            v.representable("gain", c["gain"], dt, reach, "the weights")
        v.representable("bias_std", c["bias_std"], dt, v.NORMAL_DRAW_MAX, "the biases")
        self._net._core.init(
            c["init"], c["gain"], c["sigma_w"], c["bias_std"], c["seed"], keep_units=True
        )
        self._config = c
        self._net._config = {k: c[k] for k in ("init", "gain", "sigma_w", "bias_std", "seed")}
        self._zero_bias = c["bias_std"] == 0.0
        self._net._training = True

    @staticmethod
    def _shape_config(
        activation: Any,
        negative_slope: Any,
        alpha: Any,
        norm: Any,
        norm_position: Any,
        residual: Any,
        residual_scale: Any,
    ) -> dict[str, Any]:
        v.choice("activation", activation, ACTIVATIONS)
        if norm is not None:
            v.choice("norm", norm, NORMS)
        v.choice("norm_position", norm_position, NORM_POSITIONS)
        if not isinstance(residual, (bool, np.bool_)):
            raise TypeError(f"residual must be True or False; got {residual!r}")
        a = v.finite_float("alpha", alpha)
        if a <= 0:
            raise ValueError(f"alpha must be > 0; got {alpha}")
        return {
            "activation": activation,
            "negative_slope": v.finite_float("negative_slope", negative_slope),
            "alpha": a,
            "norm": norm,
            "norm_position": norm_position,
            "residual": v.flag("residual", residual),
            "residual_scale": v.finite_float("residual_scale", residual_scale),
        }

    def _setup(
        self, widths: list[int], config: dict[str, Any], dt: np.dtype, store: bool = True
    ) -> None:
        """Builds the blocks and the chain (parameters not yet drawn or loaded)."""
        act = Activation(config["activation"], config["negative_slope"], config["alpha"])
        blocks: list[Block] = []
        per_layer: list[int] = []
        offsets: list[int] = []
        memo: dict[tuple[int, int], tuple[list[Block], Linear, int]] = {}
        for n_in, n_out in zip(widths[:-1], widths[1:]):
            if (n_in, n_out) not in memo:
                layer, lin = _layer(n_in, n_out, act, config)
                memo[n_in, n_out] = (layer, lin, _position(layer, n_in, lin))
            layer, _, pos = memo[n_in, n_out]
            blocks += layer
            per_layer.append(len(layer))
            offsets.append(pos)
        net = Chain.__new__(Chain)
        net._build(blocks, dt, store)
        self._net = net
        self._dtype = dt
        self._config = config
        self._widths = tuple(widths)
        self._layer_ends = np.concatenate([[0], np.cumsum(per_layer)]).astype(np.intp)
        # Trainable parameters per top-level block, to find each layer's Linear.
        counts = np.bincount(net._param_block, minlength=len(blocks) + 1)
        first = np.concatenate([[0], np.cumsum(counts)])[self._layer_ends[:-1] + 1]
        self._weight_index = (first + np.asarray(offsets, dtype=np.intp)).astype(np.intp)
        self._bias_index = self._weight_index + 1
        self._activation_names = tuple(
            np.asarray(net.activation_names, dtype=object)[self._layer_ends].tolist()
        )

    # -- construction from arrays ---------------------------------------------------------
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
        """A plain chain with the given weights, e.g. those of a ``torch.nn.Sequential`` of
        Linears and one activation.

        For a model with norm layers, residual connections, a last Linear without an
        activation or different activations, use :meth:`Chain.from_torch`.

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
        if isinstance(weights, Mapping) or (
            hasattr(weights, "state_dict") and hasattr(weights, "named_parameters")
        ):
            what = (
                "a state_dict"
                if isinstance(weights, Mapping)
                else f"a model ({type(weights).__name__})"
            )
            raise TypeError(
                f"weights is {what}; MLP.from_weights takes a list of weight arrays. For a PyTorch "
                "model use gc.Chain.from_torch(model), which keeps its norm layers, residual "
                "connections and activations as they are (and MLP.from_state_dict for an MLP's own)"
            )
        if (
            isinstance(weights, np.ndarray)
            or not isinstance(weights, Sequence)
            or len(weights) == 0
        ):
            raise TypeError("weights must be a non-empty sequence of 2-D arrays (out, in)")
        arrays = [v.as_array(f"weights[{i}]", w) for i, w in enumerate(weights)]
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
            ws.append(v.param_array(f"weights[{i}]", a, dt, (None, None)))
        widths = [ws[0].shape[1]] + [w.shape[0] for w in ws]
        if biases is None:
            biases = [None] * len(ws)
        if (
            isinstance(biases, np.ndarray)
            or not isinstance(biases, Sequence)
            or len(biases) != len(ws)
        ):
            raise ValueError(
                f"biases must be None or a sequence of {len(ws)} arrays (one per layer)"
            )
        bs = [
            np.zeros(widths[i + 1], dt)
            if b is None
            else v.param_array(f"biases[{i}]", b, dt, (widths[i + 1],))
            for i, b in enumerate(biases)
        ]
        config = cls._shape_config(activation, negative_slope, alpha, None, "pre", False, 1.0)
        config.update(init=None, gain=None, sigma_w=None, bias_std=None, seed=None)
        _activation_parameters(config, dt)
        # Two copies: the given arrays, and the chain's own.
        n = sum(w.size for w in ws) + sum(b.size for b in bs)
        _core.check_memory(float(2 * n * dt.itemsize), "copying the chain's weights")
        self = cls.__new__(cls)
        self._setup(widths, config, dt)
        items = [(int(i), w.reshape(-1)) for i, w in zip(self._weight_index, ws)]
        items += [(int(i), b) for i, b in zip(self._bias_index, bs)]
        self._net._core.set_params(items)
        self._net._loaded = True
        self._zero_bias = all(not b.any() for b in bs)
        return self

    @classmethod
    def from_state_dict(
        cls,
        state_dict: Mapping[str, Any],
        *,
        activation: str = "tanh",
        negative_slope: float = 0.01,
        alpha: float = 1.0,
        norm: str | None = None,
        norm_position: str = "pre",
        residual: bool = False,
        residual_scale: float = 1.0,
        dtype: Any = None,
    ) -> MLP:
        """An MLP with the parameters of a ``state_dict`` (NumPy arrays or tensors), e.g. that
        of :meth:`state_dict` or of the ``torch.nn.Sequential`` the MLP's blocks describe.

        The widths are read from the Linear weights; the options say which shape the
        parameters belong to (see :class:`MLP`). `dtype` defaults to float32 when every
        array is float32, else float64.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(
                f"state_dict must be a mapping of names to arrays; got {type(state_dict).__name__}"
            )
        config = cls._shape_config(
            activation, negative_slope, alpha, norm, norm_position, residual, residual_scale
        )
        arrays = {str(k): v.as_array(f"state_dict[{k!r}]", a) for k, a in state_dict.items()}
        # The Linear weights are the 2-D entries other than shortcuts, in layer order.
        mats = [(k, a) for k, a in arrays.items() if a.ndim == 2 and ".shortcut." not in k]
        try:
            mats.sort(key=lambda ka: int(ka[0].split(".", 1)[0]))
        except ValueError:
            raise ValueError(
                f"state_dict keys must start with the block index ('0.weight', ...); got {sorted(arrays)[:6]}"
            ) from None
        if not mats:
            raise ValueError(
                f"state_dict holds no Linear weight (a 2-D array); got keys {sorted(arrays)}"
            )
        widths = [int(mats[0][1].shape[1])] + [int(a.shape[0]) for _, a in mats]
        if dtype is None:
            dtype = (
                np.float32 if all(a.dtype == np.float32 for a in arrays.values()) else np.float64
            )
        config.update(init=None, gain=None, sigma_w=None, bias_std=None, seed=None)
        self = cls.__new__(cls)
        self._setup(widths, config, v.dtype(dtype))
        self._net.load_state_dict(arrays)
        self._zero_bias = all(not np.asarray(b).any() for b in self.biases)
        return self

    # -- description ------------------------------------------------------------------
    @property
    def depth(self) -> int:
        """Number of layers."""
        return len(self._widths) - 1

    @property
    def widths(self) -> tuple[int, ...]:
        """Layer widths ``(in, hidden..., out)``."""
        return self._widths

    @property
    def activation(self) -> str:
        """Name of the activation."""
        return str(self._config["activation"])

    @property
    def norm(self) -> str | None:
        """The norm layers' kind (None without)."""
        return self._config["norm"]

    @property
    def norm_position(self) -> str:
        """``pre`` or ``post``."""
        return str(self._config["norm_position"])

    @property
    def residual(self) -> bool:
        """Whether the layers are residual."""
        return bool(self._config["residual"])

    @property
    def residual_scale(self) -> float:
        """The residual branches' factor."""
        return float(self._config["residual_scale"])

    @property
    def dtype(self) -> np.dtype:
        """float32 or float64."""
        return self._dtype

    @property
    def blocks(self) -> tuple[Block, ...]:
        """The chain's top-level blocks: ``gc.Chain(net.blocks, ...)`` builds the same chain."""
        return self._net.blocks

    @property
    def param_names(self) -> Sequence[str]:
        """Parameter names in ``named_parameters()`` order (``"0.weight"``, ``"0.bias"``, ...)."""
        return self._net.param_names

    @property
    def training(self) -> bool:
        """True in train mode (the default; only BatchNorm reads it)."""
        return self._net.training

    @property
    def log_scale_forward(self) -> bool:
        """True when the forward pass carries its scale in log space (positively
        homogeneous activation and all biases zero): it then never overflows. The layers
        above the last nonzero bias carry it too, so an output beyond the float range is
        possible either way (``rep.output`` inf, ``rep.output_mantissa`` exact)."""
        return self.activation in _HOMOGENEOUS and self._zero_bias

    @property
    def store_weights(self) -> bool:
        """False when the weights are drawn for each pass instead of kept."""
        return self._net.store_weights

    @property
    def weights(self) -> list[np.ndarray]:
        """Read-only views of ``W_l`` (each layer's Linear), shape ``(out, in)``, l = 1..depth.

        With ``store_weights=False`` they are drawn anew on each access (read-only copies,
        the same values each time)."""
        return [self._view(i) for i in self._weight_index.tolist()]

    @property
    def biases(self) -> list[np.ndarray]:
        """Read-only views of ``b_l``, l = 1..depth."""
        return [self._view(i) for i in self._bias_index.tolist()]

    def _view(self, i: int) -> np.ndarray:
        a = self._net._core.param(i)
        a.setflags(write=False)
        return a

    def named_parameters(self) -> list[tuple[str, np.ndarray]]:
        """``(name, read-only view)`` of every parameter, as ``torch.nn.Module.named_parameters()``
        of the ``torch.nn.Sequential`` the blocks describe."""
        return self._net.named_parameters()

    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of every parameter (and BatchNorm buffer) under torch's names; see
        :meth:`Chain.state_dict`."""
        return self._net.state_dict()

    def to_chain(self) -> Chain:
        """A :class:`Chain` of the same blocks with a copy of the parameters (and mode)."""
        net = Chain.__new__(Chain)
        net._build(self._net.blocks, self._dtype)
        net.load_state_dict(self._net.state_dict())
        net._config = None if self._net._config is None else dict(self._net._config)
        net._loaded = self._net._loaded
        net._training = self._net.training
        return net

    def train(self, mode: bool = True) -> MLP:
        """Sets train mode (BatchNorm uses batch statistics); returns the MLP."""
        self._net.train(mode)
        return self

    def eval(self) -> MLP:
        """Sets eval mode (BatchNorm uses its running statistics); returns the MLP."""
        self._net.eval()
        return self

    def __repr__(self) -> str:
        """Every constructor argument (an MLP made from arrays shows no initializer)."""
        w = self._widths
        shape = f"depth={self.depth}, width={w[0]}" if len(set(w)) == 1 else f"width={list(w)}"
        c = self._config
        keys = ["activation"]
        if c["init"] is not None:
            keys += ["init", "gain", "sigma_w", "bias_std"]
        keys += ["negative_slope", "alpha", "norm", "norm_position", "residual", "residual_scale"]
        args = [shape, *(f"{k}={c[k]!r}" for k in keys), f"dtype={self._dtype.name!r}"]
        if c["seed"] is not None:
            args.append(f"seed={c['seed']!r}")
        return f"MLP({', '.join(args)})" + ("" if self.training else ".eval()")

    # -- pickling (process pools, cluster executors) ----------------------------------
    def __getstate__(self) -> dict[str, Any]:
        return {
            "config": dict(self._config),
            "dtype": self._dtype.name,
            "widths": list(self._widths),
            "training": self.training,
            "state_dict": self._net.state_dict(),
            "zero_bias": self._zero_bias,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._setup(list(state["widths"]), dict(state["config"]), v.dtype(state["dtype"]))
        self._net.load_state_dict(state["state_dict"])
        c = self._config
        self._net._config = (
            None
            if c["init"] is None
            else {k: c[k] for k in ("init", "gain", "sigma_w", "bias_std", "seed")}
        )
        self._net._loaded = c["init"] is None
        self._net._training = state["training"]
        self._zero_bias = state["zero_bias"]

    # -- computation ------------------------------------------------------------------
    def _layer_error(self, err: NonFiniteError) -> NonFiniteError:
        """The chain's error (index: a top-level block) restated for the layer it is in."""
        if err.index <= 0:
            return err
        layer = int(np.searchsorted(self._layer_ends, err.index))
        where = f"layer {layer} of {self.depth}"
        msg = str(err)
        msg = (
            msg.replace(" in block ", f" at {where}, in block ", 1)
            if " in block " in msg
            else f"{msg} ({where})"
        )
        return NonFiniteError(msg, err.where, layer)

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
        train: bool | None = None,
        checkpoint: int | str | None = "auto",
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
            Without it: ``probe`` when there is no target, ``cross_entropy`` for integer
            targets, ``mse`` for float ones. ``probe`` is ``0.5 * ||h_L||**2`` summed over
            the batch; ``mse`` is the mean over all elements, as
            ``torch.nn.functional.mse_loss``; ``cross_entropy`` is softmax cross-entropy,
            mean over the batch.
        grad_output : array_like, optional
            dL/dh_L given directly (shape of the output); then no loss is computed.
        return_grads : bool
            Also return the full gradient arrays ``weight_grads``, ``bias_grads``,
            ``activation_grads`` (and ``param_grads`` by name).
        max_norm : float, optional
            Clip the chain's gradients as ``torch.nn.utils.clip_grad_norm_(max_norm,
            norm_type)`` would over all parameters (``[W_1, b_1, W_2, b_2, ...]`` without
            norm layers); the report carries the norms before and after.
        norm_type : float or 'inf'
            Order of the total norm: 2, ``inf`` or any p > 0.
        train : bool, optional
            Train or eval mode for this pass (default: the MLP's; only BatchNorm reads it).
        checkpoint : None, "auto", "sqrt", int or str
            Activation checkpointing: the forward pass keeps only the input of every
            segment of layers and the backward pass recomputes each segment from it (one
            more forward pass in all), so memory grows as ``sqrt(depth)``. ``None``: every
            layer's output is kept; ``"sqrt"``: segments of about ``sqrt(depth)`` layers,
            sized for the least memory; an int: segments of that many layers; a budget
            such as ``"2GB"`` or ``"512MiB"``: no checkpointing if the pass fits in it, else
            ``"sqrt"`` (MemoryError if even that does not fit); ``"auto"``: none for a
            chain that keeps its weights; for one that draws them (``store_weights=False``),
            none if the pass fits in 80% of the memory available, else ``"sqrt"``. Every result is bit-identical whatever the choice.

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
            When the forward pass overflows or produces NaN (``index``: the layer).
        """
        try:
            d, tr = self._net._run(
                x,
                target,
                loss,
                grad_output,
                return_grads,
                max_norm,
                norm_type,
                train,
                checkpoint,
                self._blocks_per_layer,
            )
        except NonFiniteError as err:
            raise self._layer_error(err) from None
        net = self._net
        return BackwardReport._from_core(
            d,
            net.param_names,
            net._param_block,
            self._layer_ends,
            self._activation_names,
            self._weight_index,
            self._bias_index,
            tr,
        )

    def backward_memory(
        self, batch: int, return_grads: bool = False, checkpoint: int | str | None = "auto"
    ) -> int:
        """Bytes a :meth:`backward` pass with this batch size allocates (besides the weights).

        Without checkpointing the forward pass keeps every layer's output (and its
        pre-activation for ``elu``, ``gelu``, ``gelu_tanh``, ``silu``, ``softplus``): about
        ``batch * sum(widths)`` numbers. With two threads on small layers the pass also
        keeps every layer's gradient dL/dz_l (as much again) when that fits in half the
        machine's memory. With `checkpoint` (as in :meth:`backward`) all of this is kept
        for one segment of layers at a time, plus each segment's input; with
        ``store_weights=False``, one segment's weights drawn. With ``return_grads`` the
        pass keeps every parameter's gradient and the gradient at every block boundary
        (the layer outputs and the Linear outputs).
        """
        b = v.positive_int("batch", batch)
        rg = v.flag("return_grads", return_grads)
        ck = self._net._checkpoint(checkpoint, b, rg, self._blocks_per_layer)
        return int(self._net._core.backward_bytes(b, rg, ck))

    @property
    def _blocks_per_layer(self) -> int:
        """Top-level blocks per layer (the same in every layer)."""
        return max(1, (len(self._layer_ends) and int(self._layer_ends[1])))

    def forward(self, x: Any, *, train: bool | None = None) -> np.ndarray:
        """The output ``h_L`` for inputs `x`: a new array (0 or inf where a log-scale pass
        leaves the range).

        Runs the forward pass only; raises :class:`NonFiniteError` where it overflows.
        """
        try:
            return self._net.forward(x, train=train)
        except NonFiniteError as err:
            raise self._layer_error(err) from None

    # -- the Jacobian tools' view ---------------------------------------------------------
    def _jacobian_chain(self) -> tuple[Any, bool]:
        """The compiled chain the Jacobian tools take, and whether they see it layer by
        layer (a plain MLP: J_l = diag(phi'(z_l)) W_l) or block by block (norm or residual
        layers: each top-level block's Jacobian)."""
        plain = self._config["norm"] is None and not self._config["residual"]
        return self._net._core, plain
