"""The blocks a :class:`~gradchain.Chain` is made of.

A block is a small immutable description of one layer: its kind and its arguments, checked
when it is made. The chain infers the widths of the blocks that take their neighbours'
width (:class:`Activation`, :class:`Scale`), checks that widths match, and builds the
compiled chain from each block's :meth:`~Block.to_spec`. Parameters live in the chain, not
in the blocks, so one block object may stand for many layers
(``[gc.Residual([...]) for _ in range(48)]`` or ``[block] * 48`` alike).

Adding a kind of block takes one class here (its arguments, its parameters and its spec)
and one entry in the compiled core's factory of blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from . import _core
from . import _validate as v

__all__ = [
    "ACTIVATIONS",
    "Activation",
    "BatchNorm",
    "Block",
    "LayerNorm",
    "Linear",
    "RMSNorm",
    "Residual",
    "Scale",
]

ACTIVATIONS: tuple[str, ...] = tuple(_core.activation_names())

# (name, shape, is_buffer) of one parameter or buffer, in torch's state_dict() order.
ParamInfo = tuple[str, tuple[int, ...], bool]


def _prefix(value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise TypeError(
            f"prefix must be a string (a torch module path such as 'encoder.0') or None; got {value!r}"
        )
    return value




def _eps(value: Any) -> float:
    e = v.finite_float("eps", value)
    if e <= 0:
        raise ValueError(f"eps must be a positive finite number; got {value!r}")
    return e


def _features(name: str, value: Any) -> int:
    """An int, or (as torch's normalized_shape) a sequence holding one int."""
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        if len(value) != 1:
            raise ValueError(
                f"{name} must be an integer or a sequence of one integer (the last dimension); "
                f"got {list(value)!r}: gradchain normalises over one dimension"
            )
        value = value[0]
    return v.positive_int(name, value)


class Block:
    """Base of every block: immutable, comparable, with a repr that rebuilds it.

    Every block takes the keyword ``prefix``: the name its parameters carry in
    ``state_dict()`` and the reports (``prefix + ".weight"``), and the name of its output in
    ``activation_names`` when it is a top-level block. By default the chain names blocks
    as ``torch.nn.Sequential`` does: ``"3"`` for the fourth top-level block, ``"3.block.1"``
    for the second block of a residual's body and ``"3.shortcut"`` for its shortcut.
    """

    __slots__ = ("_prefix",)
    kind: ClassVar[str] = ""
    _prefix: str | None

    def __init__(self, prefix: str | None = None) -> None:
        object.__setattr__(self, "_prefix", _prefix(prefix))

    # -- what subclasses say ------------------------------------------------------------
    def _args(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """(positional arguments, keyword arguments that differ from their defaults)."""
        raise NotImplementedError

    @property
    def in_features(self) -> int | None:
        """The width this block takes, or None when it takes its neighbours' width."""
        return None

    def _out(self, width: int) -> int:
        """The output width for an input of `width` (already checked against in_features)."""
        return width

    def _spec(self, width: int) -> dict[str, Any]:
        raise NotImplementedError

    def _param_infos(self, width: int) -> list[ParamInfo]:
        """This block's own parameters and buffers for an input of `width`."""
        return []

    # -- common -------------------------------------------------------------------------
    @property
    def prefix(self) -> str | None:
        """The explicit name of this block's parameters, or None (named by position)."""
        return self._prefix

    @property
    def out_features(self) -> int | None:
        """The width this block gives, or None when it gives its input's width."""
        n = self.in_features
        return None if n is None else self._out(n)

    def to_spec(self, width: int | None = None) -> dict[str, Any]:
        """The dictionary the compiled core builds this block from.

        Parameters
        ----------
        width : int, optional
            The input width; needed only by blocks that take their neighbours' width
            (:class:`Activation`, :class:`Scale`, a :class:`Residual` of those).
        """
        n = self.in_features
        if width is None:
            if n is None:
                raise ValueError(f"{self!r} takes its neighbours' width: pass width= to to_spec")
            width = n
        else:
            width = v.positive_int("width", width)
            if n is not None and n != width:
                raise ValueError(f"{self!r} takes width {n}; got width={width}")
        spec = self._spec(width)
        if self._prefix is not None:
            spec["name"] = self._prefix
        return spec

    def __repr__(self) -> str:
        return self._text(prefixes=True)

    def _text(self, prefixes: bool) -> str:
        """The repr, or without the prefixes (for tables that show names apart)."""
        pos, kw = self._args()
        if prefixes and self._prefix is not None:
            kw = {**kw, "prefix": self._prefix}
        parts = [_text(a, prefixes) for a in pos] + [
            f"{k}={_text(a, prefixes)}" for k, a in kw.items()
        ]
        return f"{type(self).__name__}({', '.join(parts)})"

    def _key(self) -> tuple[Any, ...]:
        pos, kw = self._args()
        return (type(self), pos, tuple(kw.items()), self._prefix)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Block) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} blocks are immutable; make a new one")

    def __reduce__(self) -> tuple[Any, ...]:
        pos, kw = self._args()
        if self._prefix is not None:
            kw = {**kw, "prefix": self._prefix}
        return (_rebuild, (type(self), pos, kw))


def _rebuild(cls: type[Block], pos: tuple[Any, ...], kw: dict[str, Any]) -> Block:
    return cls(*pos, **kw)


def _text(a: Any, prefixes: bool) -> str:
    if isinstance(a, Block):
        return a._text(prefixes)
    if isinstance(a, (list, tuple)) and a and all(isinstance(b, Block) for b in a):
        return "[" + ", ".join(b._text(prefixes) for b in a) + "]"
    return repr(a)


def _set(obj: Block, **fields: Any) -> None:
    for k, val in fields.items():
        object.__setattr__(obj, k, val)


class Linear(Block):
    """``y = x W^T + b``, as ``torch.nn.Linear``: ``W`` has shape ``(out_features, in_features)``.

    Parameters
    ----------
    in_features, out_features : int
        Input and output widths.
    bias : bool
        Whether ``b`` exists (parameter ``bias``, shape ``(out_features,)``).
    prefix : str, optional
        See :class:`Block`.

    The chain's initializer draws ``W`` (and ``b`` from ``bias_std``); the k-th Linear of a
    chain, counting depth-first through residual bodies and then their shortcuts, draws
    the weights of layer k of a :class:`~gradchain.MLP` with the same initializer and seed.
    """

    __slots__ = ("_bias", "_in", "_out_features")
    kind = "linear"
    _in: int
    _out_features: int
    _bias: bool

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, *, prefix: str | None = None
    ) -> None:
        super().__init__(prefix)
        _set(
            self,
            _in=v.positive_int("in_features", in_features),
            _out_features=v.positive_int("out_features", out_features),
            _bias=v.flag("bias", bias),
        )

    @property
    def in_features(self) -> int:
        return self._in

    @property
    def out_features(self) -> int:
        return self._out_features

    @property
    def bias(self) -> bool:
        """Whether the layer has a bias."""
        return self._bias

    def _args(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (self._in, self._out_features), ({} if self._bias else {"bias": False})

    def _out(self, width: int) -> int:
        return self._out_features

    def _spec(self, width: int) -> dict[str, Any]:
        return {
            "kind": "linear",
            "in_features": self._in,
            "out_features": self._out_features,
            "bias": self._bias,
        }

    def _param_infos(self, width: int) -> list[ParamInfo]:
        out: list[ParamInfo] = [("weight", (self._out_features, self._in), False)]
        if self._bias:
            out.append(("bias", (self._out_features,), False))
        return out


class Activation(Block):
    """An elementwise activation ``y = phi(x)``; it takes its neighbours' width.

    Parameters
    ----------
    name : str
        One of :data:`ACTIVATIONS`: ``linear`` (the identity), ``sigmoid``, ``tanh``,
        ``relu``, ``leaky_relu``, ``elu``, ``gelu`` (exact erf form), ``gelu_tanh``
        (PyTorch's ``approximate='tanh'``), ``silu``, ``softplus`` (beta 1, threshold 20).
    negative_slope : float
        ``leaky_relu``'s slope for negative inputs.
    alpha : float
        ``elu``'s alpha (> 0).
    prefix : str, optional
        See :class:`Block`.
    """

    __slots__ = ("_alpha", "_name", "_slope")
    kind = "activation"
    _name: str
    _slope: float
    _alpha: float

    def __init__(
        self,
        name: str,
        negative_slope: float = 0.01,
        alpha: float = 1.0,
        *,
        prefix: str | None = None,
    ) -> None:
        super().__init__(prefix)
        v.choice("name", name, ACTIVATIONS)
        a = v.finite_float("alpha", alpha)
        if a <= 0:
            raise ValueError(f"alpha must be a positive finite number; got {alpha!r}")
        _set(self, _name=name, _slope=v.finite_float("negative_slope", negative_slope), _alpha=a)

    @property
    def name(self) -> str:
        """The activation's name."""
        return self._name

    @property
    def negative_slope(self) -> float:
        """``leaky_relu``'s slope."""
        return self._slope

    @property
    def alpha(self) -> float:
        """``elu``'s alpha."""
        return self._alpha

    def _args(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        kw: dict[str, Any] = {}
        if self._slope != 0.01:
            kw["negative_slope"] = self._slope
        if self._alpha != 1.0:
            kw["alpha"] = self._alpha
        return (self._name,), kw

    def _spec(self, width: int) -> dict[str, Any]:
        return {
            "kind": "activation",
            "width": width,
            "activation": self._name,
            "negative_slope": self._slope,
            "alpha": self._alpha,
        }


class Scale(Block):
    """``y = value * x``: a constant multiplier; it takes its neighbours' width.

    Parameters
    ----------
    value : float
        The factor (finite).
    prefix : str, optional
        See :class:`Block`.
    """

    __slots__ = ("_value",)
    kind = "scale"
    _value: float

    def __init__(self, value: float, *, prefix: str | None = None) -> None:
        super().__init__(prefix)
        _set(self, _value=v.finite_float("value", value))

    @property
    def value(self) -> float:
        """The factor."""
        return self._value

    def _args(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (self._value,), {}

    def _spec(self, width: int) -> dict[str, Any]:
        return {"kind": "scale", "width": width, "value": self._value}


class LayerNorm(Block):
    """``torch.nn.LayerNorm`` over the features of each example.

    ``y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias`` with the biased variance,
    per example.

    Parameters
    ----------
    normalized_shape : int or sequence of one int
        The width (torch's ``normalized_shape`` with one dimension).
    eps : float
        Added to the variance (> 0).
    elementwise_affine : bool
        Whether ``weight`` (ones at first) exists, and ``bias`` with it.
    bias : bool
        Whether ``bias`` (zeros at first) exists when ``elementwise_affine``.
    prefix : str, optional
        See :class:`Block`.
    """

    __slots__ = ("_affine", "_bias", "_eps", "_n")
    kind = "layer_norm"
    _n: int
    _eps: float
    _affine: bool
    _bias: bool

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        *,
        prefix: str | None = None,
    ) -> None:
        super().__init__(prefix)
        _set(
            self,
            _n=_features("normalized_shape", normalized_shape),
            _eps=_eps(eps),
            _affine=v.flag("elementwise_affine", elementwise_affine),
            _bias=v.flag("bias", bias),
        )

    @property
    def in_features(self) -> int:
        return self._n

    @property
    def eps(self) -> float:
        """The variance floor."""
        return self._eps

    @property
    def elementwise_affine(self) -> bool:
        """Whether the block has a weight (and a bias)."""
        return self._affine

    @property
    def bias(self) -> bool:
        """Whether the block has a bias (when elementwise_affine)."""
        return self._bias

    def _args(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        kw: dict[str, Any] = {}
        if self._eps != 1e-5:
            kw["eps"] = self._eps
        if not self._affine:
            kw["elementwise_affine"] = False
        if not self._bias:
            kw["bias"] = False
        return (self._n,), kw

    def _spec(self, width: int) -> dict[str, Any]:
        return {
            "kind": "layer_norm",
            "width": self._n,
            "eps": self._eps,
            "elementwise_affine": self._affine,
            "bias": self._bias,
        }

    def _param_infos(self, width: int) -> list[ParamInfo]:
        if not self._affine:
            return []
        out: list[ParamInfo] = [("weight", (self._n,), False)]
        if self._bias:
            out.append(("bias", (self._n,), False))
        return out


class RMSNorm(Block):
    """``torch.nn.RMSNorm``: ``y = x / sqrt(mean(x**2) + eps) * weight``, per example.

    Parameters
    ----------
    normalized_shape : int or sequence of one int
        The width.
    eps : float or None
        Added to the mean square; None (torch's default) means the machine epsilon of the
        chain's dtype (``torch.finfo(dtype).eps``).
    elementwise_affine : bool
        Whether ``weight`` (ones at first) exists.
    prefix : str, optional
        See :class:`Block`.
    """

    __slots__ = ("_affine", "_eps", "_n")
    kind = "rms_norm"
    _n: int
    _eps: float | None
    _affine: bool

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float | None = None,
        elementwise_affine: bool = True,
        *,
        prefix: str | None = None,
    ) -> None:
        super().__init__(prefix)
        _set(
            self,
            _n=_features("normalized_shape", normalized_shape),
            _eps=None if eps is None else _eps(eps),
            _affine=v.flag("elementwise_affine", elementwise_affine),
        )

    @property
    def in_features(self) -> int:
        return self._n

    @property
    def eps(self) -> float | None:
        """The floor of the mean square (None: the dtype's machine epsilon)."""
        return self._eps

    @property
    def elementwise_affine(self) -> bool:
        """Whether the block has a weight."""
        return self._affine

    def _args(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        kw: dict[str, Any] = {}
        if self._eps is not None:
            kw["eps"] = self._eps
        if not self._affine:
            kw["elementwise_affine"] = False
        return (self._n,), kw

    def _spec(self, width: int) -> dict[str, Any]:
        return {
            "kind": "rms_norm",
            "width": self._n,
            "eps": self._eps,
            "elementwise_affine": self._affine,
        }

    def _param_infos(self, width: int) -> list[ParamInfo]:
        return [("weight", (self._n,), False)] if self._affine else []


class BatchNorm(Block):
    """``torch.nn.BatchNorm1d`` on ``(batch, num_features)`` inputs.

    In train mode (see :meth:`Chain.train <gradchain.Chain.train>`) each feature is
    normalised with the batch's mean and biased variance, and the running statistics are
    updated with the unbiased variance, as torch does; the block then couples the examples
    of a batch (a batch of 1 is an error, as in torch). In eval mode the running statistics
    are used.

    Parameters
    ----------
    num_features : int
        The width.
    eps : float
        Added to the variance (> 0).
    momentum : float or None
        Weight of the new batch in the running statistics; None: a cumulative average
        (torch's ``momentum=None``).
    affine : bool
        Whether ``weight`` (ones) and ``bias`` (zeros) exist.
    track_running_stats : bool
        Whether the buffers ``running_mean``, ``running_var`` and ``num_batches_tracked``
        exist; without them batch statistics are used in eval mode too.
    prefix : str, optional
        See :class:`Block`.
    """

    __slots__ = ("_affine", "_eps", "_momentum", "_n", "_track")
    kind = "batch_norm"
    _n: int
    _eps: float
    _momentum: float | None
    _affine: bool
    _track: bool

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        *,
        prefix: str | None = None,
    ) -> None:
        super().__init__(prefix)
        mom = None
        if momentum is not None:
            mom = v.finite_float("momentum", momentum)
            if not 0.0 <= mom <= 1.0:
                raise ValueError(
                    f"momentum must be a number in [0, 1] or None (a cumulative average); got {momentum!r}"
                )
        _set(
            self,
            _n=v.positive_int("num_features", num_features),
            _eps=_eps(eps),
            _momentum=mom,
            _affine=v.flag("affine", affine),
            _track=v.flag("track_running_stats", track_running_stats),
        )

    @property
    def in_features(self) -> int:
        return self._n

    @property
    def eps(self) -> float:
        """The variance floor."""
        return self._eps

    @property
    def momentum(self) -> float | None:
        """The running statistics' momentum (None: cumulative)."""
        return self._momentum

    @property
    def affine(self) -> bool:
        """Whether the block has a weight and a bias."""
        return self._affine

    @property
    def track_running_stats(self) -> bool:
        """Whether the block keeps running statistics."""
        return self._track

    def _args(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        kw: dict[str, Any] = {}
        if self._eps != 1e-5:
            kw["eps"] = self._eps
        if self._momentum != 0.1:
            kw["momentum"] = self._momentum
        if not self._affine:
            kw["affine"] = False
        if not self._track:
            kw["track_running_stats"] = False
        return (self._n,), kw

    def _spec(self, width: int) -> dict[str, Any]:
        return {
            "kind": "batch_norm",
            "width": self._n,
            "eps": self._eps,
            "momentum": self._momentum,
            "affine": self._affine,
            "track_running_stats": self._track,
        }

    def _param_infos(self, width: int) -> list[ParamInfo]:
        out: list[ParamInfo] = []
        if self._affine:
            out += [("weight", (self._n,), False), ("bias", (self._n,), False)]
        if self._track:
            out += [
                ("running_mean", (self._n,), True),
                ("running_var", (self._n,), True),
                ("num_batches_tracked", (), True),
            ]
        return out


class Residual(Block):
    """``y = s(x) + scale * f(x)``: a residual connection around the blocks ``f``.

    Parameters
    ----------
    blocks : sequence of Block
        The body ``f``, run in order (any blocks, residual ones included).
    scale : float
        Multiplies the body's output (``x + 0.1 * f(x)``; finite).
    shortcut : bool or Linear
        ``s``: False for the identity (the body must keep the width), True for a
        ``Linear(in, out, bias=False)`` projection (the chain draws its weights), or a
        :class:`Linear` mapping the body's input width to its output width.
    prefix : str, optional
        See :class:`Block`. The body's blocks are named ``prefix + ".block.j"`` and the
        shortcut ``prefix + ".shortcut"`` unless they have prefixes of their own.
    """

    __slots__ = ("_blocks", "_scale", "_shortcut")
    kind = "residual"
    _blocks: tuple[Block, ...]
    _scale: float
    _shortcut: bool | Linear

    def __init__(
        self,
        blocks: Sequence[Block],
        scale: float = 1.0,
        shortcut: bool | Linear = False,
        *,
        prefix: str | None = None,
    ) -> None:
        super().__init__(prefix)
        if (
            isinstance(blocks, Block)
            or not isinstance(blocks, Sequence)
            or isinstance(blocks, (str, bytes))
        ):
            raise TypeError(
                f"blocks must be a list of gradchain blocks; got {type(blocks).__name__}"
            )
        if len(blocks) == 0:
            raise ValueError("blocks must hold at least one block (the body f of x + scale * f(x))")
        for j, b in enumerate(blocks):
            if not isinstance(b, Block):
                raise TypeError(
                    f"blocks[{j}] must be a gradchain block (gc.Linear, gc.Activation, ...); got {b!r}"
                )
        if not (isinstance(shortcut, (bool, Linear))):
            raise TypeError(
                f"shortcut must be False (identity), True (a Linear projection) or a gc.Linear; got {shortcut!r}"
            )
        _set(self, _blocks=tuple(blocks), _scale=v.finite_float("scale", scale), _shortcut=shortcut)

    @property
    def blocks(self) -> tuple[Block, ...]:
        """The body."""
        return self._blocks

    @property
    def scale(self) -> float:
        """The body's factor."""
        return self._scale

    @property
    def shortcut(self) -> bool | Linear:
        """False (identity), True (a bias-free Linear projection) or the Linear."""
        return self._shortcut

    @property
    def in_features(self) -> int | None:
        n = _first_width(self._blocks)
        if n is None and isinstance(self._shortcut, Linear):
            n = self._shortcut.in_features
        return n

    def _out(self, width: int) -> int:
        return _widths(self._blocks, width, "body block ")[-1]

    def _args(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        kw: dict[str, Any] = {}
        if self._scale != 1.0:
            kw["scale"] = self._scale
        if self._shortcut is not False:
            kw["shortcut"] = self._shortcut
        return (list(self._blocks),), kw

    def _key(self) -> tuple[Any, ...]:
        return (Residual, self._blocks, self._scale, self._shortcut, self._prefix)

    def _shortcut_block(self, width: int, out: int) -> Linear | None:
        """The shortcut as a block, checked against the body's widths."""
        sc = self._shortcut
        if sc is False:
            if out != width:
                raise ValueError(
                    f"{self!r}: the body maps width {width} to {out}; x + f(x) needs equal widths, "
                    "or shortcut=True (a Linear projection) or shortcut=gc.Linear(in, out)"
                )
            return None
        if sc is True:
            return Linear(width, out, bias=False)
        assert isinstance(sc, Linear)
        if sc.in_features != width or sc.out_features != out:
            raise ValueError(
                f"shortcut {sc!r} must map the body's input width {width} to its output width {out}"
            )
        return sc

    def _spec(self, width: int) -> dict[str, Any]:
        widths = _widths(self._blocks, width, "body block ")
        sc = self._shortcut_block(width, widths[-1])
        return {
            "kind": "residual",
            "body": [b.to_spec(w) for b, w in zip(self._blocks, widths)],
            "scale": self._scale,
            "shortcut": None if sc is None else sc.to_spec(width),
        }


def _first_width(blocks: Sequence[Block]) -> int | None:
    """The input width of a sequence of blocks: that of the first block that states one
    (the blocks before it keep the width)."""
    for b in blocks:
        n = b.in_features
        if n is not None:
            return n
    return None


def _widths(blocks: Sequence[Block], width: int, what: str = "block ") -> list[int]:
    """The input width of every block, then the output width; ValueError naming both
    blocks and both widths where they do not match."""
    out = [width]
    cur = width
    for j, b in enumerate(blocks):
        n = b.in_features
        if n is not None and n != cur:
            before = (
                f"{what}{j - 1} ({blocks[j - 1]!r}) gives width {cur}"
                if j
                else f"the input has width {cur}"
            )
            raise ValueError(
                f"widths do not match: {what}{j} ({b!r}) takes width {n}, but {before}"
            )
        cur = b._out(cur)
        out.append(cur)
    return out
