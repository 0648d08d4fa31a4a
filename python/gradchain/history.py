"""The record of a training run (:func:`gradchain.train`): per-step losses and norms."""

from __future__ import annotations

import html
import importlib
from dataclasses import dataclass, fields
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from .report import _fmt, _jsonable, _pow10, _readonly

if TYPE_CHECKING:
    from .diagnose import Diagnosis

__all__ = ["History"]

STOPPED: tuple[str, ...] = ("completed", "callback", "interrupted", "diverged")


@dataclass(frozen=True, eq=False, repr=False)
class History:
    """What a :func:`gradchain.train` run recorded, one row per recorded step.

    Rows are every ``record_every``-th optimizer step and always the last step run; ``R``
    rows, ``P`` trainable parameters in the chain's ``named_parameters()`` order (for an
    RNN: layer 0, layer 1, ..., then the read-out). Every ``log10_`` array is exact where
    its float twin is 0 or inf (``-inf``: exactly zero); the float forms are ``10**log10``
    computed on first access. NaN marks what a step did not get to (the values after the
    point where a diverged step stopped, the validation loss of an interrupted last step).
    All arrays are read-only.

    Attributes
    ----------
    steps : ndarray of int64, shape (R,)
        The 1-based optimizer step each row records.
    loss, log10_loss : ndarray, shape (R,)
        The training loss of that step's batch, before its update.
    total_norm, log10_total_norm : ndarray, shape (R,)
        The total gradient norm (of order ``norm_type``) over all parameters, before
        clipping.
    clipped_total_norm, log10_clipped_total_norm : ndarray, shape (R,)
        The same after clipping (equal to the total where nothing was clipped).
    clip_coef, log10_clip_coef : ndarray, shape (R,)
        ``clip_grad_norm_``'s factor (1 where no clipping happened); with ``clip_value``
        the ratio of the clipped total norm to the total norm.
    lr : ndarray, shape (R,)
        The learning rate of the step.
    param_names : tuple of str, length P
    param_grad_norms, log10_param_grad_norms : ndarray, shape (R, P)
        Frobenius norm of each parameter's gradient, before clipping.
    param_norms, log10_param_norms : ndarray, shape (R, P)
        ``||W||`` after the update (and max-norm).
    update_ratios, log10_update_ratios : ndarray, shape (R, P)
        ``||W_after - W_before|| / ||W_before||`` (0 for no change, inf from a zero
        weight).
    activation_names : tuple of str or None
    activation_grad_norms, log10_activation_grad_norms : ndarray, shape (R, A), or None
        With ``record_activation_grads=True``: ``||dL/dh||`` at the chain's top-level
        boundaries (an MLP's layer outputs; an RNN's states ``l<layer>.h<t>``).
    val_loss : ndarray, shape (R,), or None
        The loss on the validation split (eval mode, no update), when the data has one.
    nonfinite : dict or None
        The first step whose loss, gradient or weight was NaN or infinite: ``{"step",
        "what"`` ("loss", "gradient" or "weight"), ``"where"`` (the parameter, block or
        timestep), ``"index"`` (the parameter's index or -1), ``"message"}``.
    stopped : str
        ``"completed"``, ``"callback"``, ``"interrupted"`` (Ctrl-C) or ``"diverged"``.
    record_every, steps_run, batch_size, seed : int
    optimizer : str
        The optimizer's repr.
    norm_type : float
    max_norm, clip_value : float or None
        The clipping asked for.
    """

    steps: np.ndarray
    loss: np.ndarray
    log10_loss: np.ndarray
    log10_total_norm: np.ndarray
    log10_clipped_total_norm: np.ndarray
    log10_clip_coef: np.ndarray
    lr: np.ndarray
    param_names: tuple[str, ...]
    log10_param_grad_norms: np.ndarray
    log10_param_norms: np.ndarray
    log10_update_ratios: np.ndarray
    activation_names: tuple[str, ...] | None
    log10_activation_grad_norms: np.ndarray | None
    val_loss: np.ndarray | None
    nonfinite: dict[str, Any] | None
    stopped: str
    record_every: int
    steps_run: int
    optimizer: str
    batch_size: int
    seed: int
    norm_type: float
    max_norm: float | None
    clip_value: float | None

    _DERIVED: ClassVar[tuple[str, ...]] = (
        "total_norm",
        "clipped_total_norm",
        "clip_coef",
        "param_grad_norms",
        "param_norms",
        "update_ratios",
        "activation_grad_norms",
    )

    @classmethod
    def _from_core(cls, d: dict[str, Any], meta: dict[str, Any]) -> History:
        """A history from the core's arrays (views, marked read-only) and the run's
        settings; ``meta["activation_columns"]`` selects boundaries (an MLP's layers)."""
        acts = d["log10_activation_grad_norms"]
        cols = meta.get("activation_columns")
        if acts is not None and cols is not None:
            acts = acts[:, cols]
        arrays = [d[k] for k in ("steps", "loss", "log10_loss", "log10_total_norm",
                                 "log10_clipped_total_norm", "log10_clip_coef", "lr",
                                 "log10_param_grad_norms", "log10_param_norms",
                                 "log10_update_ratios", "val_loss")]  # fmt: skip
        _readonly(*arrays, acts)
        nf = d["nonfinite"]
        return cls(
            steps=d["steps"],
            loss=d["loss"],
            log10_loss=d["log10_loss"],
            log10_total_norm=d["log10_total_norm"],
            log10_clipped_total_norm=d["log10_clipped_total_norm"],
            log10_clip_coef=d["log10_clip_coef"],
            lr=d["lr"],
            param_names=meta["param_names"],
            log10_param_grad_norms=d["log10_param_grad_norms"],
            log10_param_norms=d["log10_param_norms"],
            log10_update_ratios=d["log10_update_ratios"],
            activation_names=meta["activation_names"] if acts is not None else None,
            log10_activation_grad_norms=acts,
            val_loss=d["val_loss"],
            nonfinite=None if nf is None else dict(nf),
            stopped=str(d["stopped"]),
            record_every=meta["record_every"],
            steps_run=int(d["steps_run"]),
            optimizer=meta["optimizer"],
            batch_size=meta["batch_size"],
            seed=meta["seed"],
            norm_type=meta["norm_type"],
            max_norm=meta["max_norm"],
            clip_value=meta["clip_value"],
        )

    # -- float forms ----------------------------------------------------------------------
    @staticmethod
    def _floats(log10: np.ndarray) -> np.ndarray:
        a = np.asarray(_pow10(log10))
        a.setflags(write=False)
        return a

    @cached_property
    def total_norm(self) -> np.ndarray:
        """The total gradient norm before clipping, as floats."""
        return self._floats(self.log10_total_norm)

    @cached_property
    def clipped_total_norm(self) -> np.ndarray:
        """The total gradient norm after clipping, as floats."""
        return self._floats(self.log10_clipped_total_norm)

    @cached_property
    def clip_coef(self) -> np.ndarray:
        """The clipping factor of each row (1.0 where nothing was clipped)."""
        return self._floats(self.log10_clip_coef)

    @cached_property
    def param_grad_norms(self) -> np.ndarray:
        """Each parameter's gradient norm, shape (R, P), as floats."""
        return self._floats(self.log10_param_grad_norms)

    @cached_property
    def param_norms(self) -> np.ndarray:
        """Each parameter's norm after the update, shape (R, P), as floats."""
        return self._floats(self.log10_param_norms)

    @cached_property
    def update_ratios(self) -> np.ndarray:
        """``||delta W|| / ||W||`` of each update, shape (R, P), as floats."""
        return self._floats(self.log10_update_ratios)

    @cached_property
    def activation_grad_norms(self) -> np.ndarray | None:
        """``||dL/dh||`` at the recorded boundaries, shape (R, A), or None."""
        a = self.log10_activation_grad_norms
        return None if a is None else self._floats(a)

    # -- conversions ----------------------------------------------------------------------
    def __len__(self) -> int:
        """The number of recorded rows."""
        return int(self.steps.shape[0])

    def to_dict(self) -> dict[str, Any]:
        """Every attribute (float forms included) as plain Python values that
        ``json.dumps`` accepts: non-finite floats become ``"inf"``/``"-inf"``, NaN None."""
        out = {f.name: _jsonable(getattr(self, f.name)) for f in fields(self)}
        for name in self._DERIVED:
            out[name] = _jsonable(getattr(self, name))
        return out

    def _columns(self) -> dict[str, np.ndarray]:
        cols: dict[str, np.ndarray] = {}
        for name in ("loss", "log10_loss", "total_norm", "log10_total_norm", "clipped_total_norm",
                     "log10_clipped_total_norm", "clip_coef", "log10_clip_coef", "lr"):  # fmt: skip
            cols[name] = getattr(self, name)
        if self.val_loss is not None:
            cols["val_loss"] = self.val_loss
        per = [("log10_param_grad_norms", self.param_names), ("log10_param_norms", self.param_names),
               ("log10_update_ratios", self.param_names)]  # fmt: skip
        if self.activation_names is not None:
            per.append(("log10_activation_grad_norms", self.activation_names))
        for quantity, names in per:
            arr = getattr(self, quantity)
            for j, n in enumerate(names):
                cols[f"{quantity}[{n}]"] = arr[:, j]
        return cols

    def to_pandas(self) -> Any:
        """A ``pandas.DataFrame`` indexed by ``step``: the per-step columns (``loss``,
        ``log10_loss``, ``total_norm``, ..., ``lr``, ``val_loss``) and one column per
        parameter (or boundary) and quantity, ``"log10_param_grad_norms[0.weight]"``.

        Needs pandas (``pip install pandas``)."""
        try:
            pd = importlib.import_module("pandas")
        except ImportError:
            raise ImportError("History.to_pandas() needs pandas: pip install pandas") from None
        return pd.DataFrame(self._columns(), index=pd.Index(self.steps, name="step"))

    def to_xarray(self) -> Any:
        """An ``xarray.Dataset`` with dimensions ``step``, ``param`` (and ``activation``):
        every array of the history, log10 and float forms.

        Needs xarray (``pip install xarray``)."""
        try:
            xr = importlib.import_module("xarray")
        except ImportError:
            raise ImportError("History.to_xarray() needs xarray: pip install xarray") from None
        data: dict[str, Any] = {}
        for name in ("loss", "log10_loss", "total_norm", "log10_total_norm", "clipped_total_norm",
                     "log10_clipped_total_norm", "clip_coef", "log10_clip_coef", "lr"):  # fmt: skip
            data[name] = ("step", getattr(self, name))
        if self.val_loss is not None:
            data["val_loss"] = ("step", self.val_loss)
        for name in ("param_grad_norms", "param_norms", "update_ratios"):
            data[name] = (("step", "param"), getattr(self, name))
            data[f"log10_{name}"] = (("step", "param"), getattr(self, f"log10_{name}"))
        coords: dict[str, Any] = {"step": self.steps, "param": list(self.param_names)}
        if self.activation_names is not None:
            data["activation_grad_norms"] = (("step", "activation"), self.activation_grad_norms)
            data["log10_activation_grad_norms"] = (
                ("step", "activation"),
                self.log10_activation_grad_norms,
            )
            coords["activation"] = list(self.activation_names)
        attrs = {k: _jsonable(getattr(self, k)) for k in ("stopped", "steps_run", "record_every",
                                                          "optimizer", "batch_size", "seed")}  # fmt: skip
        return xr.Dataset(data, coords=coords, attrs=attrs)

    def diagnose(self, **thresholds: Any) -> Diagnosis:
        """What happened in this run: a :class:`gradchain.Diagnosis` naming ``healthy``,
        ``vanishing``, ``exploding``, ``stuck`` or ``diverged`` with the evidence behind it
        (:func:`gradchain.diagnose.diagnose`; its thresholds are keyword arguments)."""
        from .diagnose import diagnose

        return diagnose(self, **thresholds)

    # -- presentation ---------------------------------------------------------------------
    def _summary(self) -> list[tuple[str, str]]:
        items = [("steps_run", str(self.steps_run)), ("stopped", repr(self.stopped)),
                 ("rows", str(len(self)))]  # fmt: skip
        if len(self):
            items.append(("loss", f"{_fmt(self.loss[0])} -> {_fmt(self.loss[-1])}"))
            if self.val_loss is not None:
                items.append(("val_loss", _fmt(self.val_loss[-1])))
        if self.nonfinite is not None:
            items.append(
                ("nonfinite", f"{self.nonfinite['what']} at step {self.nonfinite['step']}")
            )
        items.append(("optimizer", self.optimizer))
        return items

    def __repr__(self) -> str:
        return f"History({', '.join(f'{k}={x}' for k, x in self._summary())})"

    def _repr_html_(self) -> str:
        esc = html.escape
        cols = ["step", "loss", "log10 total norm", "clip coef", "lr"]
        if self.val_loss is not None:
            cols.append("val loss")
        idx = list(range(len(self)))
        if len(idx) > 12:  # a summary, not a dump: the first and last rows
            idx = [*idx[:6], -1, *idx[-5:]]
        rows = []
        for i in idx:
            if i < 0:
                rows.append(["..."] * len(cols))
                continue
            r = [str(int(self.steps[i])), _fmt(self.loss[i]), _fmt(self.log10_total_norm[i]),
                 _fmt(self.clip_coef[i]), _fmt(self.lr[i])]  # fmt: skip
            if self.val_loss is not None:
                r.append(_fmt(self.val_loss[i]))
            rows.append(r)
        head = "".join(f"<th>{esc(c)}</th>" for c in cols)
        body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows)
        summary = ", ".join(f"{esc(k)}={esc(x)}" for k, x in self._summary())
        return (
            f"<div><b>History</b> {summary}"
            f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"
        )
