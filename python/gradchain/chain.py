"""Chains of blocks: any sequence of Linear, activation, normalisation, scale and
residual blocks, run by the compiled core."""

from __future__ import annotations

import html
import math
import numbers
import operator
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from . import _core
from . import _validate as v
from .blocks import Block, Residual, _first_width, _widths
from .report import ChainReport

__all__ = ["INITS", "LOSSES", "Chain"]

INITS: tuple[str, ...] = tuple(_core.init_names())
LOSSES: tuple[str, ...] = ("probe", "mse", "cross_entropy")

# The compiled chain for each dtype: the one place that chooses it.
_CORE = {np.dtype(np.float64): _core.Chain64, np.dtype(np.float32): _core.Chain32}


_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_CHECKPOINT_ACCEPTED = (
    "None, 'auto', 'sqrt', a segment length (a positive int) or a memory budget such as '2GB' "
    "or '512MiB'"
)


def _budget(value: str) -> float | None:
    """Bytes of a budget written '2GB', '1.5GiB', '512MB' (None if it is not one)."""
    t = value.strip().lower().replace(" ", "")
    for unit in sorted(_UNITS, key=len, reverse=True):
        if t.endswith(unit):
            try:
                n = float(t[: -len(unit)])
            except ValueError:
                return None
            return n * _UNITS[unit] if math.isfinite(n) and n > 0 else None
    return None


def _store_weights(value: Any, nbytes: float, largest: float, overhead: float = 0.0) -> bool:
    """Whether to keep the weights (`nbytes` in all, `largest` for one block, `overhead`
    what the chain takes besides them): ``"auto"`` keeps them unless they would not fit in
    the memory available while the chain without them would (drawing them then saves it;
    otherwise storing raises the clearer error)."""
    if isinstance(value, str) and value == "auto":
        avail = float(_core.memory_limit()[0])
        return nbytes <= avail or largest > 0.25 * avail or overhead > 0.5 * avail
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"store_weights must be True, False or 'auto'; got {value!r}")
    return bool(value)


class IncompatibleKeys(NamedTuple):
    """What :meth:`Chain.load_state_dict` did not match (as torch's ``_IncompatibleKeys``)."""

    missing_keys: list[str]
    unexpected_keys: list[str]


class _Entry(NamedTuple):
    name: str
    shape: tuple[int, ...]
    buffer: bool
    top: int  # the top-level block (1-based) it belongs to


def _entries(block: Block, width: int, prefix: str, top: int, out: list[_Entry]) -> None:
    """Parameters and buffers of `block` (taking `width`) under `prefix`, in torch's
    ``state_dict()`` order; the same names the compiled chain gives them."""
    if isinstance(block, Residual):
        ws = _widths(block.blocks, width, "body block ")
        sep = f"{prefix}." if prefix else ""
        for j, (b, w) in enumerate(zip(block.blocks, ws)):
            _entries(b, w, b.prefix if b.prefix is not None else f"{sep}block.{j}", top, out)
        sc = block._shortcut_block(width, ws[-1])
        if sc is not None:
            _entries(sc, width, sc.prefix if sc.prefix is not None else f"{sep}shortcut", top, out)
        return
    for suffix, shape, buffer in block._param_infos(width):
        out.append(_Entry(f"{prefix}.{suffix}" if prefix else suffix, shape, buffer, top))


class _CoreNames(Sequence[str]):
    """The parameters' names, read from the core one at a time when asked for: a pass over
    a chain of a million layers does not build a million strings it may never show."""

    def __init__(self, core: Any, n: int) -> None:
        self._core, self._n = core, n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return tuple(self._core.param_name(k) for k in range(*i.indices(self._n)))
        k = operator.index(i)
        if not -self._n <= k < self._n:
            raise IndexError("parameter index out of range")
        return self._core.param_name(k % self._n)

    def __iter__(self) -> Iterator[str]:
        return (self._core.param_name(k) for k in range(self._n))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and tuple(self) == tuple(other)

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __reduce__(self) -> Any:
        return (tuple, (tuple(self),))


class _Layout(NamedTuple):
    names: list[str]  # in the core's order: parameters, then buffers
    shapes: list[tuple[int, ...]]
    position: dict[str, int]  # name -> index in the core's list
    param_names: tuple[str, ...]  # named_parameters() order
    torch_order: list[str]  # state_dict() order
    param_perm: Any  # core index of each of param_names (None: the same order)


def _named(block: Block) -> bool:
    """Whether a block or anything inside it has an explicit prefix."""
    if block.prefix is not None:
        return True
    if isinstance(block, Residual):
        sc = block.shortcut
        return any(_named(b) for b in block.blocks) or (
            isinstance(sc, Block) and sc.prefix is not None
        )
    return False


def _empty_inside(blocks: Sequence[Block]) -> bool:
    """Whether a block inside a residual has the prefix "" (named as the root)."""
    for b in blocks:
        if isinstance(b, Residual):
            sc = b.shortcut
            if any(c.prefix == "" for c in b.blocks) or (isinstance(sc, Block) and sc.prefix == ""):
                return True
            if _empty_inside(b.blocks):
                return True
    return False


def _runs(blocks: Sequence[Block]) -> list[tuple[int, int]]:
    """(start, length) of the runs of equal consecutive blocks."""
    out: list[tuple[int, int]] = []
    i = 0
    while i < len(blocks):
        j = i + 1
        while j < len(blocks) and (blocks[j] is blocks[i] or blocks[j] == blocks[i]):
            j += 1
        out.append((i, j - i))
        i = j
    return out


class Chain:
    """A chain of blocks: the layers of a network, run forward and backward in the compiled
    core with every gradient norm exact in log space.

    Parameters
    ----------
    blocks : sequence of Block
        The top-level blocks in order: :class:`~gradchain.Linear`,
        :class:`~gradchain.Activation`, :class:`~gradchain.LayerNorm`,
        :class:`~gradchain.RMSNorm`, :class:`~gradchain.BatchNorm`,
        :class:`~gradchain.Scale`, :class:`~gradchain.Residual`. Activations and scales
        take their neighbours' width; every other width must match (a ValueError names
        both blocks and widths).
    init : str
        One of :data:`INITS`, for every Linear's weights (see :class:`~gradchain.MLP`);
        the k-th Linear (depth-first through residual bodies, then their shortcuts) draws
        the weights that layer k of an MLP with the same arguments has. Norm layers start
        at weight 1 and bias 0, as in torch.
    gain, sigma_w, bias_std : float
        As in :class:`~gradchain.MLP`: ``gain`` multiplies every initializer's scale,
        ``sigma_w`` is the ``normal`` initializer's weight scale, Linear biases are
        N(0, bias_std**2).
    seed : int
        Every weight follows from it, the same for any thread count.
    dtype : {"float64", "float32"}
        Precision of parameters and arithmetic (norms are accumulated in double).
    store_weights : bool or "auto"
        False: the Linear weights and biases are not kept but drawn again from (seed,
        layer) whenever a pass needs them, twice per backward pass; every result is
        bit-identical to the stored chain's. Such a chain cannot be trained or loaded, its
        :meth:`parameters` are drawn anew on each access, and the Jacobian tools need a
        stored chain. ``"auto"`` (the default) keeps them unless they would not fit in the
        memory available (and one block's would).

    Notes
    -----
    Parameters are named as ``torch.nn.Sequential`` would name them: ``"0.weight"`` for
    the first block, ``"3.block.1.weight"`` inside a residual's body, ``"3.shortcut.weight"``
    for its shortcut, or under a block's own ``prefix``. A chain starts in train mode
    (:meth:`train`, :meth:`eval`), which only BatchNorm reads.

    Examples
    --------
    >>> import numpy as np, gradchain as gc
    >>> net = gc.Chain([gc.Linear(8, 16), gc.LayerNorm(16), gc.Activation("relu"),
    ...                 gc.Residual([gc.Linear(16, 16), gc.Activation("tanh")], scale=0.5),
    ...                 gc.Linear(16, 3)], seed=0)
    >>> rep = net.backward(np.ones((4, 8)), target=np.array([0, 1, 2, 0]))
    >>> rep.activation_names
    ('input', '0', '1', '2', '3', '4')
    >>> sorted(rep.param_grad_norms)[:3]
    ['0.bias', '0.weight', '1.bias']
    """

    _blocks: tuple[Block, ...]
    _config: dict[str, Any] | None

    def __init__(
        self,
        blocks: Sequence[Block],
        init: str = "xavier_normal",
        gain: float = 1.0,
        sigma_w: float = 1.0,
        bias_std: float = 0.0,
        seed: int = 0,
        dtype: Any = "float64",
        store_weights: bool | str = "auto",
    ) -> None:
        v.choice("init", init, INITS)
        g = v.finite_float("gain", gain)
        sw = v.finite_float("sigma_w", sigma_w, minimum=0.0)
        bs = v.finite_float("bias_std", bias_std, minimum=0.0)
        sd = v.seed(seed)
        self._build(blocks, v.dtype(dtype), store_weights)
        self._config = {"init": init, "gain": g, "sigma_w": sw, "bias_std": bs, "seed": sd}
        self._core.init(init, g, sw, bs, sd)

    def _build(self, blocks: Sequence[Block], dt: np.dtype, store_weights: Any = True) -> None:
        """Checks the blocks and their widths and builds the compiled chain (parameters at
        zero for Linear, at torch's defaults for the norms)."""
        if (
            isinstance(blocks, Block)
            or not isinstance(blocks, Sequence)
            or isinstance(blocks, (str, bytes))
        ):
            raise TypeError(
                f"blocks must be a list of gradchain blocks; got {type(blocks).__name__}"
            )
        if len(blocks) == 0:
            raise ValueError("blocks must hold at least one block")
        for i, b in enumerate(blocks):
            if not isinstance(b, Block):
                raise TypeError(
                    f"blocks[{i}] must be a gradchain block (gc.Linear, gc.Activation, ...); got {b!r}"
                )
        n0 = _first_width(blocks)
        if n0 is None:
            raise ValueError(
                "the chain's input width cannot be inferred: no block states a width (Activation "
                "and Scale take their neighbours'); start the chain with a Linear or a norm layer"
            )
        widths = _widths(blocks, n0)
        names = [b.prefix if b.prefix is not None else str(i) for i, b in enumerate(blocks)]
        # What each distinct (block, width) needs, worked out once: a deep chain repeats a
        # few blocks, and the core reads each spec without keeping it.
        seen: dict[tuple[int, int], tuple[dict[str, Any], int, int, float, bool]] = {}
        spec_list = []
        counts = []
        nbytes = 0.0
        largest = 0.0
        buffers = 0
        named = False
        for b, w in zip(blocks, widths):
            key = (id(b), w)
            t = seen.get(key)
            if t is None:
                rel: list[_Entry] = []
                _entries(b, w, "", 0, rel)
                n_train = sum(not e.buffer for e in rel)
                size = float(sum(math.prod(e.shape) for e in rel))
                t = seen[key] = (b.to_spec(w), n_train, len(rel) - n_train, size, _named(b))
            spec_list.append(t[0])
            counts.append(t[1])
            buffers += t[2]
            nbytes += t[3]
            largest = max(largest, t[3])
            named = named or t[4]
        nbytes *= dt.itemsize
        store = _store_weights(store_weights, nbytes, largest * dt.itemsize)
        avail = float(_core.physical_memory_bytes())
        if store and 0 < avail < nbytes:
            raise MemoryError(
                f"this chain's parameters need {nbytes:.0f} bytes ({nbytes / 2**30:.3g} GiB), more than "
                f"the {avail / 2**30:.3g} GiB of memory this machine has"
            )
        self._dtype = dt
        self._blocks = tuple(blocks)
        self._widths = tuple(widths)
        self._names = tuple(names)
        self._core = _CORE[dt](spec_list, store)
        self._training = True
        self._loaded = False
        if self._core.num_params != sum(counts):  # pragma: no cover - a core/Python mismatch
            raise RuntimeError(
                f"the compiled chain has {self._core.num_params} parameters; expected {sum(counts)}"
            )
        # The top-level block (1-based) of every parameter: they come block by block.
        self._param_block = np.repeat(np.arange(1, len(blocks) + 1, dtype=np.intp), counts)
        self._activation_names = ("input", *(n if n else "output" for n in names))
        # Names come from the core (fast for deep chains) unless a prefix is "" (the root of
        # a torch model, which the core would name by position) or buffers make torch's
        # state_dict order differ from the core's (parameters, then buffers).
        self._python_names = buffers > 0 or any(n == "" for n in names) or _empty_inside(blocks)
        self._layout_cache: _Layout | None = None
        if named:  # explicit prefixes may clash
            lay = self._layout()
            if len(lay.position) != len(lay.names):
                dup = next(n for n in lay.names if lay.names.count(n) > 1)
                raise ValueError(
                    f"two parameters would both be named {dup!r}: give the blocks distinct prefixes"
                )

    def _layout(self) -> _Layout:
        """Names, shapes and order of the parameters and buffers (worked out when first
        needed: a deep chain that only runs passes never builds a name)."""
        if self._layout_cache is None:
            if self._python_names:
                entries: list[_Entry] = []
                for i, (b, w, n) in enumerate(zip(self._blocks, self._widths, self._names)):
                    _entries(b, w, n, i + 1, entries)
                core = [e for e in entries if not e.buffer] + [e for e in entries if e.buffer]
                names = [e.name for e in core]
                shapes = [tuple(e.shape) for e in core]
                torch_order = [e.name for e in entries]
                # The blocks' own account of their parameters must be the core's (the core
                # names a block whose prefix is "" by its position, so names are compared
                # only without such blocks).
                theirs = self._core.parameters
                root = any(n == "" for n in self._names) or _empty_inside(self._blocks)
                mismatch = len(theirs) != len(core) or any(
                    tuple(p[1]) != e.shape or p[2] != e.buffer or (not root and p[0] != e.name)
                    for p, e in zip(theirs, core)
                )
                if mismatch:  # pragma: no cover - a core/Python disagreement
                    raise RuntimeError(
                        f"the compiled chain's parameters {[(p[0], tuple(p[1]), p[2]) for p in theirs][:8]} "
                        f"do not match the blocks' {[(e.name, e.shape, e.buffer) for e in core][:8]}"
                    )
            else:
                ps = self._core.parameters
                names = [p[0] for p in ps]
                shapes = [tuple(p[1]) for p in ps]
                torch_order = names
            n_params = int(self._core.num_params)
            param_names = tuple(names[:n_params])
            perm = None
            order = getattr(self, "_key_order", None)
            if order:
                rank = {k: i for i, k in enumerate(order)}
                torch_order = sorted(torch_order, key=lambda k: rank.get(k, len(rank)))
                ranked = sorted(range(n_params), key=lambda i: rank.get(names[i], len(rank)))
                if ranked != list(range(n_params)):
                    perm = np.asarray(ranked, dtype=np.intp)
                    param_names = tuple(names[i] for i in ranked)
            self._layout_cache = _Layout(
                names=names,
                shapes=shapes,
                position={k: i for i, k in enumerate(names)},
                param_names=param_names,
                torch_order=torch_order,
                param_perm=perm,
            )
        return self._layout_cache

    # -- construction from torch ----------------------------------------------------------
    @classmethod
    def from_torch(cls, model: Any, *, dtype: Any = None) -> Chain:
        """The chain of a PyTorch model, with its parameters, buffers and train/eval mode.

        Parameters
        ----------
        model : torch.nn.Module
            Made of ``nn.Sequential`` (nested), ``nn.Linear``, the activation modules
            (``nn.Tanh``, ``nn.ReLU``, ``nn.Sigmoid``, ``nn.LeakyReLU``, ``nn.ELU``,
            ``nn.GELU`` with ``approximate`` 'none' or 'tanh', ``nn.SiLU``, ``nn.Softplus``
            with beta 1 and threshold 20, ``nn.Identity``), ``nn.BatchNorm1d``,
            ``nn.LayerNorm`` and ``nn.RMSNorm`` over one dimension, ``nn.Dropout``
            (identity in eval mode, or with p = 0), and modules of your own whose
            ``forward`` is read with ``torch.fx``: a sequence of the above, or a residual
            ``x + f(x)``, ``x + a * f(x)``, ``f(x) * a + x``, ``x + f(x) / a`` or
            ``proj(x) + f(x)`` with a Linear ``proj`` and a number ``a``.
        dtype : {"float64", "float32"}, optional
            Defaults to the model's (float32 or float64; other dtypes are a TypeError).

        Returns
        -------
        Chain
            Its ``state_dict()`` has the model's keys and shapes, and its reports name
            parameters as ``model.named_parameters()`` does.

        Raises
        ------
        ValueError
            For a module or a ``forward`` operation gradchain does not support (naming it
            and the supported ones), a Dropout with p > 0 in train mode, or submodules in
            different train/eval modes.
        TypeError
            For parameters that are not float32 or float64.
        """
        from ._torch import blocks_of

        blocks, state, training, dt = blocks_of(model, dtype)
        self = cls.__new__(cls)
        self._build(blocks, dt)
        # torch lists a module's parameters in the order its submodules were registered,
        # which need not be the order its forward calls them in.
        self._key_order = list(state)
        self._layout_cache = None
        unused = [k for k in state if k not in self._layout().position]
        if unused:
            raise ValueError(
                f"the model has parameters or buffers its forward does not use: {unused}; "
                "gradchain reads the modules the forward calls"
            )
        self._config = None
        self.load_state_dict(state)
        self._training = training
        return self

    # -- description ----------------------------------------------------------------------
    @property
    def blocks(self) -> tuple[Block, ...]:
        """The top-level blocks."""
        return self._blocks

    @property
    def widths(self) -> tuple[int, ...]:
        """Widths at the top-level boundaries: the input, then each block's output."""
        return self._widths

    @property
    def in_features(self) -> int:
        """Width of the input."""
        return self._widths[0]

    @property
    def out_features(self) -> int:
        """Width of the output."""
        return self._widths[-1]

    @property
    def dtype(self) -> np.dtype:
        """float32 or float64."""
        return self._dtype

    @property
    def training(self) -> bool:
        """True in train mode (the default), False in eval mode."""
        return self._training

    @property
    def param_names(self) -> Sequence[str]:
        """Parameter names in ``named_parameters()`` order (buffers excluded)."""
        if (
            self._layout_cache is None
            and not self._python_names
            and not getattr(self, "_key_order", None)
        ):
            return _CoreNames(self._core, int(self._core.num_params))
        return self._layout().param_names

    @property
    def activation_names(self) -> tuple[str, ...]:
        """Names of the top-level boundaries: ``"input"`` and each top-level block's name."""
        return self._activation_names

    def train(self, mode: bool = True) -> Chain:
        """Sets train mode (BatchNorm uses batch statistics and updates its running ones);
        returns the chain, as ``torch.nn.Module.train``."""
        self._training = v.flag("mode", mode)
        return self

    def eval(self) -> Chain:
        """Sets eval mode (BatchNorm uses its running statistics); returns the chain."""
        return self.train(False)

    # -- parameters -------------------------------------------------------------------------
    def _view(self, name: str) -> np.ndarray:
        a = self._core.param(self._layout().position[name])
        a.setflags(write=False)
        return a

    def named_parameters(self) -> list[tuple[str, np.ndarray]]:
        """``(name, array)`` for every parameter, as ``torch.nn.Module.named_parameters()``.

        The arrays are read-only views of the chain's parameters (write them with
        :meth:`load_state_dict`, which refreshes what the chain derives from them).
        """
        return [(n, self._view(n)) for n in self.param_names]

    def parameters(self) -> list[np.ndarray]:
        """Read-only views of every parameter, in :meth:`named_parameters` order."""
        return [self._view(n) for n in self.param_names]

    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of every parameter and buffer under torch's names and shapes.

        BatchNorm's ``running_mean`` and ``running_var`` are included, and its
        ``num_batches_tracked`` as an int64 0-d array, so
        ``model.load_state_dict({k: torch.as_tensor(a) for k, a in chain.state_dict().items()})``
        loads them into the torch model the chain was made from.
        """
        lay = self._layout()
        out: dict[str, np.ndarray] = {}
        for name in lay.torch_order:
            a = np.array(self._core.param(lay.position[name]))
            if name.endswith("num_batches_tracked"):
                a = np.asarray(np.int64(np.rint(a).reshape(())))
            out[name] = a
        return out

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True
    ) -> IncompatibleKeys:
        """Copies parameters and buffers from a ``state_dict`` (NumPy arrays or tensors).

        Parameters
        ----------
        state_dict : mapping of str to array_like
            By the names of :meth:`state_dict`; shapes must match exactly. Values are
            rounded to the chain's dtype.
        strict : bool
            Whether every name of the chain must be given and no other (as torch).

        Returns
        -------
        IncompatibleKeys
            ``(missing_keys, unexpected_keys)``; both empty when ``strict``.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(
                f"state_dict must be a mapping of names to arrays; got {type(state_dict).__name__}"
            )
        if not isinstance(strict, (bool, np.bool_)):
            raise TypeError(f"strict must be True or False; got {strict!r}")
        lay = self._layout()
        keys = [str(k) for k in state_dict]
        missing = [n for n in lay.torch_order if n not in state_dict]
        unexpected = [k for k in keys if k not in lay.position]
        if strict and (missing or unexpected):
            raise ValueError(
                f"state_dict does not match the chain: missing keys {missing}, unexpected keys {unexpected}"
            )
        items = []
        for name in lay.torch_order:
            if name not in state_dict:
                continue
            i = lay.position[name]
            what = f"state_dict[{name!r}]"
            if name.endswith("num_batches_tracked"):
                a = np.asarray(v.as_array(what, state_dict[name]))
                if (
                    a.size != 1
                    or a.dtype.kind not in "iuf"
                    or not np.isfinite(a).all()
                    or a.reshape(()) < 0
                ):
                    raise ValueError(f"{what} must be a non-negative integer count; got {a!r}")
                arr = np.full(1, a.reshape(()), dtype=self._dtype)
            else:
                arr = v.param_array(what, state_dict[name], self._dtype, lay.shapes[i]).reshape(-1)
            items.append((i, arr))
        self._core.set_params(items)
        self._loaded = True
        return IncompatibleKeys(missing, unexpected)

    # -- computation ------------------------------------------------------------------------
    @property
    def store_weights(self) -> bool:
        """False when the Linear weights are drawn for each pass instead of kept."""
        return not self._core.draws_params

    def _require_stored(self, what: str) -> None:
        if self._core.draws_params:
            raise ValueError(
                f"{what} needs the weights stored: this chain draws them for each pass "
                "(store_weights=False); build it with store_weights=True"
            )

    def _checkpoint(self, checkpoint: Any, batch: int, return_grads: bool, per: int = 1) -> int:
        """The core's segment length in top-level blocks (0: none, -1: the least memory)
        for a ``checkpoint`` argument; `per` top-level blocks make one unit of a length."""
        if checkpoint is None:
            return 0
        if isinstance(checkpoint, (bool, np.bool_)) or not isinstance(
            checkpoint, (str, numbers.Integral)
        ):
            raise TypeError(f"checkpoint must be {_CHECKPOINT_ACCEPTED}; got {checkpoint!r}")
        if isinstance(checkpoint, numbers.Integral):
            if checkpoint < 1:
                raise ValueError(f"checkpoint must be {_CHECKPOINT_ACCEPTED}; got {checkpoint!r}")
            return int(min(int(checkpoint) * per, 2**31 - 1))
        if checkpoint == "sqrt":
            return -1
        if checkpoint == "auto" and not self._core.draws_params:
            return 0
        full = float(self._core.backward_bytes(batch, return_grads, 0))
        if checkpoint == "auto":
            return 0 if full <= 0.8 * float(_core.memory_limit()[0]) else -1
        budget = _budget(checkpoint)
        if budget is None:
            raise ValueError(f"checkpoint must be {_CHECKPOINT_ACCEPTED}; got {checkpoint!r}")
        if full <= budget:
            return 0
        least = float(self._core.backward_bytes(batch, return_grads, -1))
        if least > budget:
            raise MemoryError(
                f"a backward pass with batch {batch} needs {least:.0f} bytes even with "
                f"checkpointing (checkpoint='sqrt'), more than the budget {checkpoint!r}"
            )
        return -1

    def _x(self, x: Any) -> np.ndarray:
        return v.float_array("x", v.as_array("x", x), self._dtype, (None, self.in_features))

    def _mode(self, train: Any) -> bool:
        if train is None:
            return self._training
        if not isinstance(train, (bool, np.bool_)):
            raise TypeError(f"train must be None (the chain's mode), True or False; got {train!r}")
        return bool(train)

    def _run(
        self,
        x: Any,
        target: Any,
        loss: str | None,
        grad_output: Any,
        return_grads: Any,
        max_norm: Any,
        norm_type: Any,
        train: Any,
        checkpoint: Any = None,
        per: int = 1,
        param_grads: bool = True,
    ) -> tuple[dict[str, Any], bool]:
        """Checks the arguments and runs the core's pass: (its result, the mode). Without
        `param_grads` the pass skips the parameter gradients (their norms come back NaN),
        for callers that read the boundary norms only."""
        dt = self._dtype
        xa = self._x(x)
        batch = xa.shape[0]
        out_shape = (batch, self.out_features)
        p = v.norm_type(norm_type)
        mn = -1.0 if max_norm is None else v.non_negative("max_norm", max_norm)
        return_grads = v.flag("return_grads", return_grads)
        tr = self._mode(train)
        if grad_output is not None:
            if target is not None or not (
                loss is None or (isinstance(loss, str) and loss == "grad_output")
            ):
                raise ValueError(
                    "grad_output replaces the loss: pass neither target nor loss with it"
                )
            name = "grad_output"
            tgt: np.ndarray | None = v.float_array(
                "grad_output", v.as_array("grad_output", grad_output), dt, out_shape
            )
        else:
            name = loss if loss is not None else v.default_loss(target)
            v.choice("loss", name, LOSSES)
            if name == "probe":
                if target is not None:
                    raise ValueError("loss='probe' takes no target")
                tgt = None
            elif target is None:
                raise ValueError(f"loss={name!r} needs a target")
            elif name == "mse":
                tgt = v.float_array("target", v.as_array("target", target), dt, out_shape)
            else:
                tgt = _labels(target, batch, self.out_features)
        ck = self._checkpoint(checkpoint, batch, return_grads, per)
        d = self._core.backward(xa, name, tgt, bool(return_grads), mn, p, tr, bool(param_grads), ck)
        return d, tr

    def backward(
        self,
        x: Any,
        target: Any = None,
        *,
        loss: str | None = None,
        grad_output: Any = None,
        max_norm: float | None = None,
        norm_type: float | str = 2.0,
        return_grads: bool = False,
        train: bool | None = None,
        checkpoint: int | str | None = "auto",
    ) -> ChainReport:
        """Forward and backward pass; every parameter and boundary gradient norm, exact in
        log space.

        Parameters
        ----------
        x : array_like, shape (batch, in_features)
            Inputs (finite; NumPy arrays or float32/float64 tensors).
        target : array_like, optional
            ``mse``: an array shaped like the output; ``cross_entropy``: integer labels of
            shape (batch,) in ``[0, out_features)``.
        loss : {"probe", "mse", "cross_entropy"}, optional
            Without it: ``probe`` when there is no target, ``cross_entropy`` for integer
            targets and ``mse`` for float ones. ``probe`` is ``0.5 * ||output||**2``
            summed over the batch; ``mse`` is the mean over all elements, as
            ``torch.nn.functional.mse_loss``; ``cross_entropy`` is softmax cross-entropy,
            mean over the batch, as ``torch.nn.functional.cross_entropy``.
        grad_output : array_like, optional
            dL/d(output) given directly (shape of the output); no loss is computed then.
        max_norm : float, optional
            Clip as ``torch.nn.utils.clip_grad_norm_(chain.parameters(), max_norm,
            norm_type)`` would; the report has the norms before clipping and the factor.
        norm_type : float or 'inf'
            Order of the total norm: 2, ``inf`` or any p > 0.
        return_grads : bool
            Also return every parameter gradient (``param_grads``) and every boundary
            gradient (``activation_grads``).
        train : bool, optional
            Run in train (True) or eval (False) mode; default: the chain's mode. In train
            mode BatchNorm normalises with batch statistics and updates its running
            statistics, as a torch forward pass would.
        checkpoint : None, "auto", "sqrt", int or str
            Activation checkpointing: the forward pass keeps only the input of every
            segment of top-level blocks, and the backward pass recomputes each segment
            from it (one more forward pass in all). ``None``: every boundary is kept;
            ``"sqrt"``: segments of about ``sqrt(len(blocks))`` blocks, sized for the
            least memory; an int: segments of that many top-level blocks; a budget such
            as ``"2GB"`` or ``"512MiB"``: no checkpointing if the pass fits in it, else
            ``"sqrt"`` (a MemoryError if even that does not fit); ``"auto"``: none for a
            chain that keeps its weights; for one that draws them (``store_weights=False``),
            none if the pass fits in 80% of the memory available, else ``"sqrt"``. The results are bit-identical whatever the choice.

        Returns
        -------
        ChainReport

        Raises
        ------
        ValueError, TypeError
            Bad shapes, dtypes, names or non-finite inputs; a train-mode BatchNorm with a
            batch of 1.
        MemoryError
            When the pass would need more memory than the machine has.
        NonFiniteError
            When the forward pass overflows, produces NaN or underflows where its scale
            cannot be carried (naming the block; ``index`` is the 1-based top-level block).
        """
        d, tr = self._run(
            x, target, loss, grad_output, return_grads, max_norm, norm_type, train, checkpoint
        )
        block = self._param_block
        if getattr(self, "_key_order", None):
            lay = self._layout()
            if lay.param_perm is not None:  # the core's order into torch's
                d["log10_param_grad_norms"] = d["log10_param_grad_norms"][lay.param_perm]
                if "param_grads" in d:
                    d["param_grads"] = [d["param_grads"][i] for i in lay.param_perm]
                block = block[lay.param_perm]
        return ChainReport(
            **ChainReport._fields_from_core(d, self.param_names, block, self._activation_names, tr)
        )

    def forward(self, x: Any, *, train: bool | None = None) -> np.ndarray:
        """The output for inputs `x`, shape (batch, out_features): a new array.

        As a torch forward pass, one in train mode updates BatchNorm's running statistics.
        The output is 0 or inf where a pass carried in log space leaves the float range.
        """
        out, _ = self._core.forward(self._x(x), self._mode(train))
        return np.asarray(out)

    def backward_memory(
        self, batch: int, return_grads: bool = False, checkpoint: int | str | None = "auto"
    ) -> int:
        """Bytes a :meth:`backward` pass with this batch allocates (besides the parameters).

        Without checkpointing the pass keeps the boundaries the backward pass reads (each
        block's input or output), about ``batch * sum(widths)`` numbers; with it (see
        :meth:`backward`), one segment's boundaries and each segment's input. A chain
        built with ``store_weights=False`` adds one segment's drawn weights. With
        ``return_grads`` the pass also keeps every parameter gradient and the gradient at
        every top-level boundary.
        """
        b = v.positive_int("batch", batch)
        rg = v.flag("return_grads", return_grads)
        return int(self._core.backward_bytes(b, rg, self._checkpoint(checkpoint, b, rg)))

    # -- presentation -----------------------------------------------------------------------
    def _block_params(self) -> np.ndarray:
        """Number of parameter entries (buffers excluded) per top-level block."""
        lay = self._layout()
        sizes = [math.prod(sh) for sh in lay.shapes[: len(lay.param_names)]]
        counts = np.bincount(self._param_block, weights=sizes, minlength=len(self._blocks) + 1)
        return counts[1:].astype(np.int64)

    def _rows(self) -> list[tuple[str, str, str, str]]:
        """(names, block, widths, parameters) per run of equal consecutive blocks."""
        counts = self._block_params()
        rows = []
        for i, k in _runs(self._blocks):
            names = self._names[i] if k == 1 else f"{self._names[i]}..{self._names[i + k - 1]}"
            block = self._blocks[i]._text(prefixes=False) + (f" x {k}" if k > 1 else "")
            widths = f"{self._widths[i]} -> {self._widths[i + k]}"
            rows.append((names, block, widths, f"{int(counts[i : i + k].sum()):,}"))
        return rows

    def describe(self) -> str:
        """A text summary: every block (runs of equal blocks on one line) with its name,
        widths and parameter count, and the totals."""
        rows = [("name", "block", "widths", "parameters"), *self._rows()]
        cw = [max(len(r[c]) for r in rows) for c in range(3)]
        total = int(self._block_params().sum())
        mode = "train" if self._training else "eval"
        head = (
            f"Chain: {len(self._blocks)} blocks, {self.in_features} -> {self.out_features}, "
            f"{total:,} parameters in {len(self.param_names)} arrays, {self._dtype.name}, {mode} mode"
        )
        lines = [head]
        lines += [f"  {r[0]:<{cw[0]}}  {r[1]:<{cw[1]}}  {r[2]:<{cw[2]}}  {r[3]:>12}" for r in rows]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        rows = self._rows()
        if len(rows) > 20:
            rows = [*rows[:10], ("...", "...", "...", "..."), *rows[-9:]]
        esc = html.escape
        body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows)
        total = int(self._block_params().sum())
        return (
            f"<div><b>Chain</b> {len(self._blocks)} blocks, {self.in_features} &rarr; {self.out_features}, "
            f"{total:,} parameters, {self._dtype.name}, {'train' if self._training else 'eval'} mode"
            "<table><thead><tr><th>name</th><th>block</th><th>widths</th><th>parameters</th></tr></thead>"
            f"<tbody>{body}</tbody></table></div>"
        )

    def _blocks_repr(self) -> str:
        parts = []
        for i, k in _runs(self._blocks):
            parts.append(
                f"*[{self._blocks[i]!r}] * {k}"
                if k >= 3
                else ", ".join([repr(self._blocks[i])] * k)
            )
        return "[" + ", ".join(parts) + "]"

    def __repr__(self) -> str:
        """Every argument that rebuilds the chain (``gc.`` names); a chain whose parameters
        were loaded (``from_torch``, ``load_state_dict``) shows no initializer, and one in
        eval mode ends in ``.eval()``."""
        args = [self._blocks_repr()]
        if self._config is not None and not self._loaded:
            args += [
                f"{k}={self._config[k]!r}" for k in ("init", "gain", "sigma_w", "bias_std", "seed")
            ]
        args.append(f"dtype={self._dtype.name!r}")
        return f"Chain({', '.join(args)})" + ("" if self._training else ".eval()")

    # -- pickling (process pools, cluster executors) ------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        return {
            "blocks": list(self._blocks),
            "config": None if self._config is None else dict(self._config),
            "loaded": self._loaded,
            "dtype": self._dtype.name,
            "training": self._training,
            "state_dict": self.state_dict(),
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._build(state["blocks"], v.dtype(state["dtype"]))
        self._key_order = list(state["state_dict"])
        self._layout_cache = None
        self.load_state_dict(state["state_dict"])
        self._config = state["config"]
        self._loaded = state["loaded"]
        self._training = state["training"]


def _labels(target: Any, batch: int, n: int) -> np.ndarray:
    arr = np.asarray(v.as_array("target", target))
    if arr.dtype.kind not in "iu":
        raise TypeError(
            f"target for loss='cross_entropy' must be integer class labels; got dtype {arr.dtype}"
        )
    if arr.shape != (batch,):
        raise ValueError(
            f"target for loss='cross_entropy' must have shape ({batch},); got {arr.shape}"
        )
    if arr.size and (arr.min() < 0 or arr.max() >= n):
        raise ValueError(
            f"target labels must lie in [0, {n}); got values in [{arr.min()}, {arr.max()}]"
        )
    return np.ascontiguousarray(arr, dtype=np.int64)
