"""Recurrent chains: vanilla RNN, LSTM and GRU unrolled over time."""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from . import _core
from . import _validate as v
from .report import RecurrentReport

__all__ = ["CELLS", "RNN", "RNN_INITS", "RNN_LOSSES", "TRUNCATE_MODES"]

CELLS: tuple[str, ...] = tuple(_core.cell_names())
RNN_INITS: tuple[str, ...] = tuple(_core.recurrent_init_names())
RNN_LOSSES: tuple[str, ...] = ("probe", "mse", "cross_entropy")
TRUNCATE_MODES: tuple[str, ...] = ("detach", "window")

_GATES = {"tanh": 1, "relu": 1, "lstm": 4, "gru": 3}
_KEY = re.compile(r"^(weight_ih|weight_hh|bias_ih|bias_hh)_l(\d+)$")


def _weight_reach(init: str, input_size: int, hidden: int, num_layers: int) -> tuple[float, float]:
    """The largest ``|weight_ih|`` per unit of gain and ``|weight_hh|`` per unit of
    recurrent_gain that `init` can draw: the scale at the smallest fan times the largest
    draw (uniform draws lie in [-1, 1), normal ones within ``NORMAL_DRAW_MAX``)."""
    fan = min(input_size, hidden) if num_layers > 1 else input_size
    nd = v.NORMAL_DRAW_MAX
    xavier_u = math.sqrt(6.0 / (hidden + fan)), math.sqrt(3.0 / hidden)
    return {
        "default": (1.0 / math.sqrt(hidden), 1.0 / math.sqrt(hidden)),
        "xavier_uniform": xavier_u,
        "xavier_normal": (math.sqrt(2.0 / (hidden + fan)) * nd, nd / math.sqrt(hidden)),
        "orthogonal": (xavier_u[0], 1.0 + 1e-12),  # entries of an orthonormal matrix, rounded
        "normal": (nd / math.sqrt(fan), nd / math.sqrt(hidden)),
    }[init]


def _optional_positive_int(name: str, value: Any) -> int:
    return 0 if value is None else v.positive_int(name, value)


class RNN:
    """A stack of recurrent cells unrolled over time, with PyTorch's parameter layout.

    ``tanh`` and ``relu`` are ``torch.nn.RNN`` (``h' = phi(W_ih x + b_ih + W_hh h + b_hh)``),
    ``lstm`` is ``torch.nn.LSTM`` (gates i, f, g, o) and ``gru`` is ``torch.nn.GRU`` (gates
    r, z, n, with ``n = tanh(W_in x + b_in + r * (W_hn h + b_hn))``). Parameters are named
    and shaped as in those modules' ``state_dict``, so they round-trip with PyTorch.

    Parameters
    ----------
    cell : str
        One of :data:`CELLS`: ``tanh``, ``relu``, ``lstm``, ``gru``.
    input_size, hidden_size : int
        Features of the input and of the hidden state.
    num_layers : int
        Stacked layers; layer k > 0 takes layer k-1's states as input.
    output_size : int, optional
        Adds a linear read-out ``y_t = h_t W^T + b`` on the top layer (``readout.weight``,
        ``readout.bias``; PyTorch's ``nn.Linear`` initialisation), used by the ``mse`` and
        ``cross_entropy`` losses.
    bias : bool
        Whether the cells have biases (``bias_ih``/``bias_hh``).
    init : str
        One of :data:`RNN_INITS`:

        - ``default``: PyTorch's U(-1/sqrt(hidden), 1/sqrt(hidden)) for every parameter;
        - ``xavier_uniform``, ``xavier_normal``: per gate block (each ``hidden x in``
          block is one layer's matrix), zero biases;
        - ``orthogonal``: every gate block of ``weight_hh`` a Haar-random orthogonal
          matrix, ``weight_ih`` Xavier-uniform per gate block, zero biases;
        - ``normal``: ``weight_hh`` entries N(0, recurrent_gain**2 / hidden) and
          ``weight_ih`` entries N(0, gain**2 / in), zero biases (the mean-field setting).
    gain : float
        Multiplies ``weight_ih``.
    recurrent_gain : float
        Multiplies ``weight_hh``.
    spectral_radius : float, optional
        Rescales every gate block of ``weight_hh`` to this spectral radius (largest
        eigenvalue modulus) after initialisation. Not together with ``recurrent_gain``.
        Each block's eigenvalues come from one LAPACK call (``geev``, some ``10 *
        hidden_size**3`` flops: a fraction of a second at 600, seconds from about 1500
        on), which Ctrl-C cannot interrupt: it takes effect when the block is done.
    forget_bias : float, optional
        LSTM only: sets the forget-gate block of ``bias_ih`` to this value and that of
        ``bias_hh`` to 0, so the forget gate starts at sigmoid(forget_bias).
    batch_first : bool
        As in torch: inputs, every-step targets and upstream gradients, and the output of
        :meth:`forward` are ``(batch, steps, ...)`` instead of ``(steps, batch, ...)``.
        Initial and final states stay ``(num_layers, batch, hidden_size)``, and the
        reports are indexed by step as always.
    dtype : {"float64", "float32"}
        Precision of parameters and arithmetic (norms are accumulated in double).
    seed : int
        Every parameter follows from it; float32 parameters are the float64 ones rounded.

    Raises
    ------
    ValueError
        Among bad names and values: a ``gain``, ``recurrent_gain``, ``spectral_radius``
        or ``forget_bias`` with which a parameter could exceed the dtype's largest value;
        the message gives the largest value accepted.

    Examples
    --------
    >>> import numpy as np, gradchain as gc
    >>> rnn = gc.RNN("lstm", input_size=8, hidden_size=32, init="orthogonal", seed=0)
    >>> rep = rnn.backward(np.ones((100, 4, 8)))
    >>> rep.state_grad_norms.shape
    (101,)
    """

    _config: dict[str, Any]
    _dtype: np.dtype

    def __init__(
        self,
        cell: str = "tanh",
        input_size: int = 1,
        hidden_size: int = 64,
        num_layers: int = 1,
        *,
        output_size: int | None = None,
        bias: bool = True,
        init: str = "default",
        gain: float = 1.0,
        recurrent_gain: float = 1.0,
        spectral_radius: float | None = None,
        forget_bias: float | None = None,
        batch_first: bool = False,
        dtype: Any = "float64",
        seed: int = 0,
    ) -> None:
        shape = self._shape(cell, input_size, hidden_size, num_layers, output_size, bias)
        self._batch_first = v.flag("batch_first", batch_first)
        v.choice("init", init, RNN_INITS)
        self._dtype = v.dtype(dtype)
        gain = v.finite_float("gain", gain)
        recurrent_gain = v.finite_float("recurrent_gain", recurrent_gain)
        sr = 0.0
        if spectral_radius is not None:
            sr = v.finite_float("spectral_radius", spectral_radius)
            if sr <= 0:
                raise ValueError(
                    f"spectral_radius must be a positive number; got {spectral_radius!r}"
                )
            if recurrent_gain != 1.0:
                raise ValueError("give recurrent_gain or spectral_radius, not both")
        fb = None
        if forget_bias is not None:
            if cell != "lstm" or not bias:
                raise ValueError(
                    f"forget_bias applies to cell='lstm' with bias=True; got cell={cell!r}, bias={bias}"
                )
            fb = v.finite_float("forget_bias", forget_bias)
            v.representable("forget_bias", fb, self._dtype)
        dt = self._dtype
        ih, hh = _weight_reach(init, shape["input_size"], shape["hidden_size"], shape["num_layers"])
        v.representable("gain", gain, dt, ih, "the entries of weight_ih")
        v.representable("recurrent_gain", recurrent_gain, dt, hh, "the entries of weight_hh")
        v.representable("spectral_radius", sr, dt)
        self._config = dict(shape)
        self._config.update(
            init=init,
            gain=gain,
            recurrent_gain=recurrent_gain,
            spectral_radius=spectral_radius,
            forget_bias=fb,
            seed=v.seed(seed),
        )
        cls = _core.RecurrentChain64 if self._dtype == np.float64 else _core.RecurrentChain32
        self._chain = cls(
            shape["cell"], shape["input_size"], shape["hidden_size"], shape["num_layers"],
            shape["output_size"] or 0, shape["bias"], init, gain, recurrent_gain, sr, fb, self._config["seed"],
        )  # fmt: skip
        if sr:
            # weight_hh's entries have no bound relative to its spectral radius: check them.
            for i, name in enumerate(self._chain.param_names):
                if name.startswith("weight_hh") and not np.isfinite(self._chain.param(i)).all():
                    top = float(np.finfo(self._dtype).max)
                    raise ValueError(
                        f"spectral_radius={sr!r} scales an entry of {name} beyond the largest "
                        f"{self._dtype.name} value {top:.8g}; lower it"
                    )

    @staticmethod
    def _shape(
        cell: Any, input_size: Any, hidden_size: Any, num_layers: Any, output_size: Any, bias: Any
    ) -> dict[str, Any]:
        v.choice("cell", cell, CELLS)
        if not isinstance(bias, (bool, np.bool_)):
            raise TypeError(f"bias must be a bool; got {bias!r}")
        return {
            "cell": cell,
            "input_size": v.positive_int("input_size", input_size),
            "hidden_size": v.positive_int("hidden_size", hidden_size),
            "num_layers": v.positive_int("num_layers", num_layers),
            "output_size": _optional_positive_int("output_size", output_size) or None,
            "bias": v.flag("bias", bias),
        }

    # -- construction from arrays ------------------------------------------------------
    @classmethod
    def from_state_dict(
        cls,
        state_dict: Mapping[str, Any],
        cell: str,
        *,
        batch_first: bool = False,
        dtype: Any = None,
    ) -> RNN:
        """An RNN with the parameters of a ``state_dict`` (NumPy arrays or torch tensors).

        Accepts the ``state_dict()`` of ``torch.nn.RNN`` / ``LSTM`` / ``GRU`` (uni-
        directional, without ``proj_size``) or of :meth:`state_dict`, optionally with
        ``readout.weight`` / ``readout.bias``. Sizes and the number of layers are read from
        the shapes; `cell` says which cell the weights belong to (``tanh`` or ``relu`` for
        ``torch.nn.RNN``), `batch_first` the layout of inputs (as the torch module's). `dtype`
        defaults to float32 when every array is float32, else float64; float16 and bfloat16
        are refused.
        """
        v.choice("cell", cell, CELLS)
        if not isinstance(state_dict, Mapping):
            raise TypeError(
                f"state_dict must be a mapping of names to arrays; got {type(state_dict).__name__}"
            )
        arrays = {str(k): v.as_array(f"state_dict[{k!r}]", a) for k, a in state_dict.items()}
        layers: set[int] = set()
        unknown = []
        for k in arrays:
            m = _KEY.match(k)
            if m:
                layers.add(int(m.group(2)))
            elif k not in ("readout.weight", "readout.bias"):
                unknown.append(k)
        if unknown:
            hint = (
                " (bidirectional and proj_size modules are not supported)"
                if any("reverse" in k or "weight_hr" in k for k in unknown)
                else ""
            )
            raise ValueError(
                f"state_dict has keys gradchain does not know: {sorted(unknown)}{hint}"
            )
        if not layers or sorted(layers) != list(range(len(layers))):
            raise ValueError(
                f"state_dict must hold weight_ih_l0, weight_hh_l0, ... for layers 0..n-1; got keys {sorted(arrays)}"
            )
        w0 = arrays.get("weight_ih_l0")
        if w0 is None or w0.ndim != 2:
            raise ValueError(
                "state_dict['weight_ih_l0'] must be a 2-d array (gates * hidden_size, input_size)"
            )
        g = _GATES[cell]
        if w0.shape[0] % g or w0.shape[0] == 0:
            raise ValueError(
                f"weight_ih_l0 has {w0.shape[0]} rows, not a positive multiple of {g} gates for cell={cell!r}"
            )
        bias = "bias_ih_l0" in arrays
        out = arrays.get("readout.weight")
        shape = cls._shape(
            cell,
            int(w0.shape[1]),
            w0.shape[0] // g,
            len(layers),
            None if out is None else _readout_rows(out),
            bias,
        )
        if dtype is None:
            dtype = (
                np.float32 if all(a.dtype == np.float32 for a in arrays.values()) else np.float64
            )
        dt = v.dtype(dtype)
        names, shapes = _param_layout(shape)
        missing = [n for n in names if n not in arrays]
        extra = [k for k in arrays if k not in names]
        if missing or extra:
            raise ValueError(
                f"state_dict does not match a {cell} chain of this shape: missing {missing}, unexpected {extra}"
            )
        params = [
            v.param_array(f"state_dict[{n!r}]", arrays[n], dt, s) for n, s in zip(names, shapes)
        ]
        self = cls.__new__(cls)
        self._batch_first = v.flag("batch_first", batch_first)
        self._dtype = dt
        self._config = dict(shape)
        self._config.update(
            init=None,
            gain=None,
            recurrent_gain=None,
            spectral_radius=None,
            forget_bias=None,
            seed=None,
        )
        core = _core.RecurrentChain64 if dt == np.float64 else _core.RecurrentChain32
        self._chain = core.from_params(
            shape["cell"], shape["input_size"], shape["hidden_size"], shape["num_layers"],
            shape["output_size"] or 0, shape["bias"], params,
        )  # fmt: skip
        return self

    # -- properties ---------------------------------------------------------------------
    @property
    def cell(self) -> str:
        """The cell: ``tanh``, ``relu``, ``lstm`` or ``gru``."""
        return str(self._config["cell"])

    @property
    def input_size(self) -> int:
        """Features of the input."""
        return int(self._config["input_size"])

    @property
    def hidden_size(self) -> int:
        """Features of the hidden state."""
        return int(self._config["hidden_size"])

    @property
    def num_layers(self) -> int:
        """Number of stacked layers."""
        return int(self._config["num_layers"])

    @property
    def output_size(self) -> int | None:
        """Outputs of the read-out, or None without one."""
        o = self._config["output_size"]
        return None if o is None else int(o)

    @property
    def bias(self) -> bool:
        """Whether the cells have biases."""
        return bool(self._config["bias"])

    @property
    def dtype(self) -> np.dtype:
        """float64 or float32."""
        return self._dtype

    @property
    def param_names(self) -> tuple[str, ...]:
        """Parameter names in ``state_dict`` order."""
        return tuple(self._chain.param_names)

    @property
    def batch_first(self) -> bool:
        """Whether sequences are ``(batch, steps, ...)``."""
        return self._batch_first

    def named_parameters(self) -> list[tuple[str, np.ndarray]]:
        """``(name, array)`` for every parameter in ``state_dict`` order, as torch's
        ``named_parameters()``: read-only views of the chain's parameters."""
        out = []
        for i, n in enumerate(self._chain.param_names):
            a = self._chain.param(i)
            a.setflags(write=False)
            out.append((n, a))
        return out

    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of the parameters, named and shaped as PyTorch's ``state_dict``.

        ``torch.nn.LSTM(...).load_state_dict({k: torch.from_numpy(a) for k, a in
        sd.items() if not k.startswith("readout.")})`` loads them into PyTorch.
        """
        return {n: np.array(self._chain.param(i)) for i, n in enumerate(self._chain.param_names)}

    def __repr__(self) -> str:
        """Every constructor argument (an RNN made from a state_dict shows no initializer)."""
        c = self._config
        args = [
            repr(c["cell"]), f"input_size={c['input_size']}", f"hidden_size={c['hidden_size']}",
            f"num_layers={c['num_layers']}", f"output_size={c['output_size']}", f"bias={c['bias']}",
        ]  # fmt: skip
        if c["init"] is not None:
            args += [
                f"{k}={c[k]!r}"
                for k in ("init", "gain", "recurrent_gain", "spectral_radius", "forget_bias")
            ]
        args += [f"batch_first={self._batch_first}", f"dtype={self._dtype.name!r}"]
        if c["seed"] is not None:
            args.append(f"seed={c['seed']!r}")
        return f"RNN({', '.join(args)})"

    def __getstate__(self) -> dict[str, Any]:
        return {
            "config": dict(self._config),
            "dtype": self._dtype.name,
            "batch_first": self._batch_first,
            "state_dict": self.state_dict(),
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        other = RNN.from_state_dict(
            state["state_dict"], state["config"]["cell"], dtype=state["dtype"]
        )
        self._dtype = other._dtype
        self._chain = other._chain
        self._config = dict(state["config"])
        self._batch_first = bool(state.get("batch_first", False))

    # -- computation --------------------------------------------------------------------
    def _layout(self, what: str) -> str:
        return f"(batch, steps, {what})" if self._batch_first else f"(steps, batch, {what})"

    def _time_first(self, a: np.ndarray) -> np.ndarray:
        """A sequence array in the chain's (steps, batch, ...) order."""
        return np.ascontiguousarray(a.swapaxes(0, 1)) if self._batch_first else a

    def _as_given(self, a: np.ndarray) -> np.ndarray:
        """A (steps, batch, ...) array in the layout the RNN takes (batch_first or not)."""
        return a.swapaxes(0, 1) if self._batch_first else a

    def _x(self, x: Any) -> np.ndarray:
        """x checked (in the RNN's layout) and returned as (steps, batch, input_size)."""
        arr = x if isinstance(x, np.ndarray) else v.as_array("x", x)
        if getattr(arr, "ndim", 3) != 3:
            one = "x[None, :, :]" if self._batch_first else "x[:, None, :]"
            raise ValueError(
                f"x must have shape {self._layout(str(self.input_size))} (for one sequence use {one}); "
                f"got shape {getattr(arr, 'shape', None)}"
            )
        if self._batch_first:
            if arr.shape[2] != self.input_size:
                raise ValueError(
                    f"x must have shape {self._layout(str(self.input_size))}; got {arr.shape}"
                )
            arr = np.swapaxes(arr, 0, 1)
        return v.float_array("x", arr, self._dtype, (None, None, self.input_size))

    def _state(self, name: str, value: Any, batch: int) -> np.ndarray | None:
        if value is None:
            return None
        if name == "c0" and self.cell != "lstm":
            raise ValueError(f"c0 is the LSTM's initial cell state; cell={self.cell!r} has none")
        return v.float_array(
            name, v.as_array(name, value), self._dtype, (self.num_layers, batch, self.hidden_size)
        )

    def backward(
        self,
        x: Any,
        target: Any = None,
        *,
        loss: str | None = None,
        grad_output: Any = None,
        h0: Any = None,
        c0: Any = None,
        truncate: int | None = None,
        truncate_mode: str = "detach",
        return_grads: bool = False,
        max_norm: float | None = None,
        norm_type: float | str = 2.0,
    ) -> RecurrentReport:
        """Forward pass over every timestep and exact backpropagation through time.

        Returns per-timestep state-gradient norms ``||dL/dh_t||`` (t = 0..steps) for every
        layer, ``||dL/dc_t||`` for the LSTM, and per-parameter gradient norms, all exact
        in log space where float64 would give 0 or inf.

        Parameters
        ----------
        x : array_like, shape (steps, batch, input_size)
            Inputs (finite), time first as in PyTorch; ``(batch, steps, input_size)``
            with ``batch_first``. Every per-step array below (targets, upstream
            gradients) follows the same layout.
        target : array_like, optional
            The loss's target. Its shape says which steps carry a loss term:
            ``mse``: ``(batch, n)`` for the last step, ``(steps, batch, n)`` for every step;
            ``cross_entropy``: integer labels ``(batch,)`` or ``(steps, batch)`` in
            ``[0, n)``. ``n`` is ``output_size`` with a read-out, else ``hidden_size``.
        loss : {"probe", "mse", "cross_entropy"}, optional
            ``probe`` (default without target): ``0.5 * ||h_T||**2`` of the top layer,
            summed over the batch; ``cross_entropy`` is the default for integer targets.
            ``mse`` (default with a float target): as
            ``torch.nn.functional.mse_loss`` (mean over every element of every step with
            a term). ``cross_entropy``: as ``torch.nn.functional.cross_entropy`` over all
            (step, example) rows. Both apply to the read-out ``y_t`` when the chain has
            one, else to ``h_t``.
        grad_output : array_like, optional
            Upstream gradients dL/dh_t given directly for the top layer: ``(steps,
            batch, hidden_size)`` for t = 1..steps, or ``(batch, hidden_size)`` for h_T
            only. Replaces the loss (then ``loss`` is NaN).
        h0, c0 : array_like, optional
            Initial states, shape ``(num_layers, batch, hidden_size)``; zero by default.
        truncate : int, optional
            Truncated backpropagation through time with window ``k``:

            - ``truncate_mode="detach"``: the carried states (h, and c for the LSTM) of
              every layer are detached after every k steps (t = k, 2k, ... < steps), as
              ``h = h.detach()`` in a step-by-step training loop. Parameter gradients are
              those of the whole loss through that graph. The state gradient reported
              at h_t is all gradient that arrives there (from the loss at t, the layer
              above at t and step t + 1); at a boundary, the part from step t + 1 goes
              no further back.
            - ``truncate_mode="window"``: each timestep's loss term sends gradient back
              through at most k steps. For every step t with a loss term, the states of
              all layers at ``max(0, t - k)`` are taken as constants and the term's
              gradient is carried through steps ``max(0, t - k) + 1 .. t`` only;
              parameter and state gradients are the sums over all such t. It costs
              about k times a full backward pass when every step has a term.
        truncate_mode : {"detach", "window"}
        return_grads : bool
            Also return the full arrays: ``grads`` (by name, after clipping),
            ``state_grads`` and ``cell_grads`` of shape ``(num_layers, steps + 1,
            batch, hidden_size)`` (0 or inf where a value is outside the float range).
        max_norm : float, optional
            Clip as ``torch.nn.utils.clip_grad_norm_(parameters, max_norm, norm_type)``
            over the parameters in ``state_dict`` order; the report has the norms before
            and the coefficient.
        norm_type : float or 'inf'
            Order of the total norm.

        Returns
        -------
        RecurrentReport

        Raises
        ------
        ValueError, TypeError
            Bad shapes, dtypes, names or non-finite inputs.
        MemoryError
            When the pass needs more memory than the machine has
            (see :meth:`backward_memory`).
        NonFiniteError
            When a state or pre-activation of the forward pass leaves the float range
            (``err.index`` is the timestep), or the read-out's outputs or the loss
            gradient do (``err.where == "loss"``). Weights, inputs and gradients far from 1
            are fine: their scales are carried as powers of two.
        """
        dt = self._dtype
        x = self._x(x)
        steps, batch = x.shape[0], x.shape[1]
        h0a = self._state("h0", h0, batch)
        c0a = self._state("c0", c0, batch)
        p = v.norm_type(norm_type)
        mn = -1.0 if max_norm is None else v.non_negative("max_norm", max_norm)
        if not isinstance(return_grads, (bool, np.bool_)):
            raise TypeError(f"return_grads must be a bool; got {return_grads!r}")
        if truncate is None:
            mode, k = "none", 0
        else:
            if (
                isinstance(truncate, bool)
                or not isinstance(truncate, numbers.Integral)
                or truncate <= 0
            ):
                raise ValueError(
                    f"truncate must be a positive integer (the window k) or None; got {truncate!r}"
                )
            v.choice("truncate_mode", truncate_mode, TRUNCATE_MODES)
            mode, k = truncate_mode, int(min(int(truncate), 2**31 - 1))
        n_out = self.output_size or self.hidden_size
        every = False
        if grad_output is not None:
            if target is not None or not (
                loss is None or (isinstance(loss, str) and loss == "grad_output")
            ):
                raise ValueError(
                    "grad_output replaces the loss: pass neither target nor loss with it"
                )
            name = "grad_output"
            arr = v.as_array("grad_output", grad_output)
            every = arr.ndim == 3
            shape = (
                self._seq_shape(steps, batch, self.hidden_size)
                if every
                else (batch, self.hidden_size)
            )
            go = v.float_array("grad_output", arr, dt, shape)
            tgt: np.ndarray | None = self._time_first(go) if every else go
        else:
            if loss is None:
                loss = v.default_loss(target)
            v.choice("loss", loss, RNN_LOSSES)
            name = loss
            if name == "probe":
                if target is not None:
                    raise ValueError("loss='probe' takes no target")
                tgt = None
            elif target is None:
                raise ValueError(f"loss={name!r} needs a target")
            elif name == "mse":
                arr = v.as_array("target", target)
                every = arr.ndim == 3
                shape = self._seq_shape(steps, batch, n_out) if every else (batch, n_out)
                tgt = v.float_array("target", arr, dt, shape)
                if every:
                    tgt = self._time_first(tgt)
            else:
                tgt, every = self._labels(target, steps, batch, n_out)
        d = self._chain.run(x, h0a, c0a, name, tgt, every, mode, k, mn, p, bool(return_grads))
        return RecurrentReport._from_core(d, self.cell, self.param_names, truncate, mode)

    def _seq_shape(self, steps: int, batch: int, n: int | None = None) -> tuple[int, ...]:
        """The shape of a per-step array in the RNN's layout."""
        s = (batch, steps) if self._batch_first else (steps, batch)
        return s if n is None else (*s, n)

    def _labels(self, target: Any, steps: int, batch: int, n: int) -> tuple[np.ndarray, bool]:
        arr = v.as_array("target", target)
        if arr.dtype.kind not in "iu":
            raise TypeError(
                f"target for loss='cross_entropy' must be integer class labels; got dtype {arr.dtype}"
            )
        every = self._seq_shape(steps, batch)
        if arr.shape not in ((batch,), every):
            raise ValueError(
                f"target for loss='cross_entropy' must have shape ({batch},) (last step) or "
                f"{every} (every step); got {arr.shape}"
            )
        if arr.size and (arr.min() < 0 or arr.max() >= n):
            raise ValueError(
                f"target labels must lie in [0, {n}); got values in [{arr.min()}, {arr.max()}]"
            )
        labels = np.ascontiguousarray(arr, dtype=np.int64)
        return (self._time_first(labels) if arr.ndim == 2 else labels), arr.ndim == 2

    def backward_memory(
        self,
        steps: int,
        batch: int,
        *,
        return_grads: bool = False,
        truncate: int | None = None,
        truncate_mode: str = "detach",
        every_step: bool = False,
    ) -> int:
        """Bytes a :meth:`backward` pass over `steps` timesteps allocates at most (besides
        parameters): everything it holds at its peak, the result included.

        The forward pass keeps, per layer and step, the state (and the LSTM's cell and
        its tanh) and the gates; the backward pass overwrites the gates with their
        gradients. That is about ``num_layers * steps * batch * hidden_size`` numbers
        times 2 (vanilla), 7 (LSTM) or 5 (GRU); window truncation keeps about as much
        again. The figure includes the copies that a layer's parameter gradients need
        when its states leave the float range (one layer's gates and inputs); a pass
        without them takes that much less.
        """
        t = v.positive_int("steps", steps)
        b = v.positive_int("batch", batch)
        mode, k = "none", 0
        if truncate is not None:
            k = v.positive_int("truncate", truncate)
            mode = v.choice("truncate_mode", truncate_mode, TRUNCATE_MODES)
        return int(
            self._chain.run_bytes(
                t,
                b,
                v.flag("return_grads", return_grads),
                mode,
                k,
                v.flag("every_step", every_step),
                False,
            )
        )

    def forward(
        self, x: Any, h0: Any = None, c0: Any = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Run the chain over `x`; as ``torch.nn.RNN/LSTM/GRU``'s forward.

        Returns
        -------
        output : ndarray, shape (steps, batch, hidden_size)
            The top layer's states h_1..h_T (``(batch, steps, hidden_size)`` with
            ``batch_first``).
        h_n : ndarray, shape (num_layers, batch, hidden_size)
            Every layer's final state.
        c_n : ndarray or None
            The LSTM's final cell states (None for other cells).

        The arrays are new, the caller's to keep and change.
        """
        x = self._x(x)
        batch = x.shape[1]
        out, h_n, c_n = self._chain.forward(
            x, self._state("h0", h0, batch), self._state("c0", c0, batch)
        )
        return (np.ascontiguousarray(self._as_given(out)) if self._batch_first else out), h_n, c_n


def _param_layout(shape: dict[str, Any]) -> tuple[list[str], list[tuple[int, ...]]]:
    g = _GATES[shape["cell"]] * shape["hidden_size"]
    names: list[str] = []
    shapes: list[tuple[int, ...]] = []
    for layer in range(shape["num_layers"]):
        ins = shape["input_size"] if layer == 0 else shape["hidden_size"]
        names += [f"weight_ih_l{layer}", f"weight_hh_l{layer}"]
        shapes += [(g, ins), (g, shape["hidden_size"])]
        if shape["bias"]:
            names += [f"bias_ih_l{layer}", f"bias_hh_l{layer}"]
            shapes += [(g,), (g,)]
    if shape["output_size"]:
        names += ["readout.weight", "readout.bias"]
        shapes += [(shape["output_size"], shape["hidden_size"]), (shape["output_size"],)]
    return names, shapes


def _readout_rows(out: Any) -> int:
    """The read-out's output size, from the shape of ``state_dict['readout.weight']``."""
    if not isinstance(out, np.ndarray) or out.ndim != 2 or out.shape[0] < 1:
        got = f"shape {out.shape}" if isinstance(out, np.ndarray) else type(out).__name__
        raise ValueError(
            "state_dict['readout.weight'] must be a 2-d array (output_size, hidden_size); "
            f"got {got}"
        )
    return int(out.shape[0])
