"""What went wrong in a training run, and the evidence for it.

:func:`diagnose` reads a training history (:class:`gradchain.History`, or any object with
the same attributes) and names what happened, as a :class:`Diagnosis`:

* ``"diverged"``: the loss, a gradient or a weight became non-finite (NaN or inf);
* ``"exploding"``: gradient norms growing geometrically over the steps, loss spikes,
  clipping at work on most steps, or input-side layers receiving gradients many decades
  above the output-side ones;
* ``"vanishing"``: input-side layers receiving gradients many decades below the
  output-side ones (with their update ratios and weight changes as evidence);
* ``"stuck"``: the loss no longer improving (ReduceLROnPlateau's rule) while the updates
  are tiny, or (given a baseline loss) ending where ignoring the inputs would;
* ``"healthy"``: none of these.

Every rule compares a measured score with a threshold the caller can change; the
diagnosis lists the scores, the thresholds and one sentence with numbers per finding.

Only these attributes of the history are read: ``steps``, ``loss``, ``log10_loss``,
``log10_total_norm``, ``log10_clipped_total_norm``, ``log10_clip_coef``, ``lr``,
``param_names``, ``log10_param_grad_norms``, ``log10_param_norms``,
``log10_update_ratios`` (each ``(R, P)``), ``val_loss``, ``nonfinite``, ``stopped`` and
``record_every``.
"""

from __future__ import annotations

import html
import math
import numbers
import re
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from .report import _jsonable, _pow10

__all__ = ["KINDS", "Diagnosis", "diagnose"]

KINDS: tuple[str, ...] = ("healthy", "vanishing", "exploding", "stuck", "diverged")

_SPIKE_WINDOW = 10  # recorded points whose median a loss spike is measured against


@dataclass(frozen=True, eq=False, repr=False)
class Diagnosis:
    """What happened in a training run, with the evidence behind it.

    Attributes
    ----------
    kind : str
        One of :data:`KINDS`: ``"healthy"``, ``"vanishing"``, ``"exploding"``,
        ``"stuck"`` or ``"diverged"`` (the first that applies of diverged, exploding,
        vanishing, exploding by clipping alone, stuck).
    summary : str
        One sentence saying what happened.
    evidence : list of str
        One sentence per observation, with its numbers, findings first.
    step : int or None
        The first optimizer step (1-based) at which the finding showed; None for a
        healthy run.
    layer : str or None
        The parameter (or block) most concerned, by its name in ``param_names``; None
        when no single one is.
    scores : dict of str to float
        The measured quantities the rules compare with the thresholds (NaN where a
        quantity could not be measured): ``layer_gap`` (decades by which the input-side
        weights' gradient norms lie below the output-side ones; negative: above),
        ``update_gap`` (the same for the update ratios), ``input_weight_change`` (relative
        change of the input-side weight norms over the run), ``growth`` (decades the
        total gradient norm rose from the first to the last quarter of the run),
        ``growth_rate`` (that rise per 100 steps), ``spikes`` (number of loss spikes),
        ``clip_fraction`` (fraction of recorded steps clipped), ``plateau`` (recorded
        points since the loss last improved), ``update_ratio`` (median update ratio
        over the last `patience` points), ``loss_decades`` (decades the loss fell from
        the first to the last tenth of the run), ``baseline_ratio`` (the loss over the
        last `patience` points as a fraction of `baseline`).
    thresholds : dict of str to float
        The thresholds used, defaults included (`patience` resolved to a number).
    also : tuple of str
        Other kinds that apply too, e.g. ``("stuck",)`` for a vanishing run that stopped
        improving, ``("exploding",)`` for a run that exploded, then diverged.

    Examples
    --------
    >>> from gradchain.diagnose import Diagnosis
    >>> d = Diagnosis("stuck", "The loss stopped improving.", ["..."], 120, None,
    ...               {"plateau": 80.0}, {"patience": 10.0})
    >>> d
    Diagnosis(kind='stuck', step=120, layer=None, also=())
    >>> d.to_dict()["scores"]
    {'plateau': 80.0}
    """

    kind: str
    summary: str
    evidence: list[str]
    step: int | None
    layer: str | None
    scores: dict[str, float]
    thresholds: dict[str, float]
    also: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """A dictionary of plain Python values that ``json.dumps`` accepts (NaN scores
        become None, infinite ones the strings ``"inf"``/``"-inf"``).

        Examples
        --------
        >>> import json
        >>> from gradchain.diagnose import Diagnosis
        >>> d = Diagnosis("healthy", "Nothing wrong.", [], None, None,
        ...               {"layer_gap": float("nan")}, {"layer_gap": 3.0})
        >>> json.dumps(d.to_dict()["scores"])
        '{"layer_gap": null}'
        """
        return {f.name: _jsonable(getattr(self, f.name)) for f in fields(self)}

    def __repr__(self) -> str:
        return (
            f"Diagnosis(kind={self.kind!r}, step={self.step}, layer={self.layer!r}, "
            f"also={self.also!r})"
        )

    def __str__(self) -> str:
        lines = [f"{self.kind}: {self.summary}"]
        lines += [f"  - {e}" for e in self.evidence]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        esc = html.escape
        rows = [("kind", self.kind), ("summary", self.summary)]
        if self.also:
            rows.append(("also", ", ".join(self.also)))
        if self.step is not None:
            rows.append(("step", str(self.step)))
        if self.layer is not None:
            rows.append(("layer", self.layer))
        rows += [("evidence" if i == 0 else "", e) for i, e in enumerate(self.evidence)]
        body = "".join(
            f"<tr><th style='text-align:left'>{esc(k)}</th><td style='text-align:left'>"
            f"{esc(x)}</td></tr>"
            for k, x in rows
        )
        return f"<div><b>Diagnosis</b><table><tbody>{body}</tbody></table></div>"


# --------------------------------------------------------------------------------------
# reading the history
# --------------------------------------------------------------------------------------
_MATRICES = ("log10_param_grad_norms", "log10_param_norms", "log10_update_ratios")
_VECTORS = (
    "loss",
    "log10_loss",
    "log10_total_norm",
    "log10_clipped_total_norm",
    "log10_clip_coef",
    "lr",
)


@dataclass
class _Run:
    """The history's arrays, checked: R rows, P parameters."""

    steps: np.ndarray
    loss: np.ndarray
    log10_loss: np.ndarray
    log10_total_norm: np.ndarray
    log10_clip_coef: np.ndarray
    lr: np.ndarray
    names: list[str]
    grads: np.ndarray
    norms: np.ndarray
    updates: np.ndarray
    val_loss: np.ndarray | None
    nonfinite: dict[str, Any] | None
    stopped: str
    record_every: int

    def head(self, rows: int) -> _Run:
        """The first `rows` rows."""
        cut = {
            k: getattr(self, k)[:rows]
            for k in (
                "steps",
                "loss",
                "log10_loss",
                "log10_total_norm",
                "log10_clip_coef",
                "lr",
                "grads",
            )
        }
        cut.update(norms=self.norms[:rows], updates=self.updates[:rows])
        val = None if self.val_loss is None else self.val_loss[:rows]
        return _Run(
            names=self.names,
            val_loss=val,
            nonfinite=self.nonfinite,
            stopped=self.stopped,
            record_every=self.record_every,
            **cut,
        )


def _attr(history: Any, name: str) -> Any:
    if not hasattr(history, name):
        raise TypeError(
            f"history must be a gradchain History (or have its attributes); it has no {name!r}"
        )
    return getattr(history, name)


def _read(history: Any) -> _Run:
    names = [str(n) for n in _attr(history, "param_names")]
    steps = np.asarray(_attr(history, "steps"), dtype=np.int64).reshape(-1)
    R, P = steps.shape[0], len(names)
    vec = {}
    for k in _VECTORS:
        a = np.asarray(_attr(history, k), dtype=np.float64)
        if a.shape != (R,):
            raise ValueError(
                f"history.{k} must have shape ({R},) like history.steps; got {a.shape}"
            )
        vec[k] = a
    mats = {}
    for k in _MATRICES:
        a = np.asarray(_attr(history, k), dtype=np.float64)
        if R and P == 0 and a.size == 0:
            a = a.reshape(R, 0)
        if a.shape != (R, P):
            raise ValueError(
                f"history.{k} must have shape ({R}, {P}) (recorded steps, parameters); "
                f"got {a.shape}"
            )
        mats[k] = a
    val = _attr(history, "val_loss")
    val_loss = None if val is None else np.asarray(val, dtype=np.float64).reshape(-1)
    if val_loss is not None and val_loss.shape != (R,):
        raise ValueError(
            f"history.val_loss must have shape ({R},) or be None; got {val_loss.shape}"
        )
    nonfinite = _attr(history, "nonfinite")
    if nonfinite is not None and not isinstance(nonfinite, dict):
        raise TypeError(f"history.nonfinite must be None or a dict; got {type(nonfinite).__name__}")
    every = _attr(history, "record_every")
    return _Run(
        steps=steps,
        loss=vec["loss"],
        log10_loss=vec["log10_loss"],
        log10_total_norm=vec["log10_total_norm"],
        log10_clip_coef=vec["log10_clip_coef"],
        lr=vec["lr"],
        names=names,
        grads=mats["log10_param_grad_norms"],
        norms=mats["log10_param_norms"],
        updates=mats["log10_update_ratios"],
        val_loss=val_loss,
        nonfinite=nonfinite,
        stopped=str(_attr(history, "stopped")),
        record_every=int(every) if isinstance(every, numbers.Integral) else 1,
    )


_RNN_WEIGHT = re.compile(r"(.*?)weight_(?:ih|hh)_l(\d+)(_reverse)?$")


def _weight_layers(names: Sequence[str]) -> list[list[int]]:
    """The weight parameters grouped by layer, input side first: each weight is a layer of
    its own, except a recurrent layer's ``weight_ih_lK`` and ``weight_hh_lK`` (and their
    ``_reverse`` twins), which form layer K together. Biases and the like are left out."""
    layers: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        last = name.rsplit(".", 1)[-1]
        if not last.startswith("weight"):
            continue
        m = _RNN_WEIGHT.match(name)
        key = f"{m.group(1)}l{m.group(2)}" if m else name
        layers.setdefault(key, []).append(i)
    return list(layers.values())


def _weights(names: Sequence[str]) -> list[int]:
    """The weight parameters' indices; every parameter's when none is named a weight."""
    return [i for g in _weight_layers(names) for i in g] or list(range(len(names)))


def _sides(names: Sequence[str]) -> tuple[list[int], list[int]] | None:
    """(input-side, output-side) weight parameter indices: the first and the last third of
    the weight layers (at least one each); None with fewer than two weight layers."""
    layers = _weight_layers(names)
    if len(layers) < 2:
        return None
    k = max(1, len(layers) // 3)
    return [i for g in layers[:k] for i in g], [i for g in layers[-k:] for i in g]


def _median_rows(a: np.ndarray) -> np.ndarray:
    """Median over each row (NaN for an empty row), -inf entries kept."""
    if a.shape[1] == 0:
        return np.full(a.shape[0], np.nan)
    return np.median(a, axis=1)


def _gap(a: np.ndarray, lo: list[int], hi: list[int]) -> np.ndarray:
    """Per row: median log10 of the `hi` columns minus that of the `lo` columns (inf when
    only the `lo` side is exactly zero, NaN when both are)."""
    with np.errstate(invalid="ignore"):
        return _median_rows(a[:, hi]) - _median_rows(a[:, lo])


def _median(a: np.ndarray) -> float:
    a = a[~np.isnan(a)]
    return float(np.median(a)) if a.size else math.nan


def _fmt(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}g}"


def _steps_text(run: _Run) -> str:
    n = int(run.steps[-1]) if run.steps.size else 0
    every = f", recorded every {run.record_every}" if run.record_every > 1 else ""
    return f"{n} steps{every}"


# --------------------------------------------------------------------------------------
# the rules
# --------------------------------------------------------------------------------------
@dataclass
class _Finding:
    kind: str
    strength: int  # order among the findings of one kind, and clipping-only exploding last
    step: int | None
    layer: str | None
    text: str
    what: str = ""


def _first_nonfinite(run: _Run) -> tuple[int, int | None, str, str | None]:
    """(rows before the first non-finite row, its step, what, where); rows = R if none."""
    R = run.steps.shape[0]
    bad_loss = ~np.isfinite(run.loss)
    bad_grad = np.isnan(run.log10_total_norm) | (run.log10_total_norm == np.inf)
    if run.grads.shape[1]:
        bad_grad |= (np.isnan(run.grads) | (run.grads == np.inf)).any(axis=1)
    bad_weight = (
        (np.isnan(run.norms) | (run.norms == np.inf)).any(axis=1)
        if run.norms.shape[1]
        else np.zeros(R, dtype=bool)
    )
    rows = [int(np.argmax(b)) if b.any() else R for b in (bad_loss, bad_grad, bad_weight)]
    first = min(rows)
    if first == R:
        return R, None, "", None
    what = ("loss", "gradient", "weight")[rows.index(first)]  # the order of a step's work
    where = None
    if what != "loss":
        mat = run.grads if what == "gradient" else run.norms
        row = mat[first]
        bad = np.isnan(row) | (row == np.inf)
        where = run.names[int(np.argmax(bad))] if bad.any() else None
    return first, int(run.steps[first]), what, where


def _where(what: str, where: str | None) -> str:
    """Where a non-finite value arose, as a phrase: a non-finite loss names the block or
    timestep whose forward pass broke down, a gradient or weight its parameter."""
    if not where:
        return ""
    return f" in the forward pass through {where}" if what == "loss" else f" in {where}"


def _diverged(run: _Run) -> tuple[int, _Finding | None]:
    """Rows to analyse (before any non-finite one) and the divergence finding, if any."""
    rows, step, what, where = _first_nonfinite(run)
    nf = run.nonfinite
    if nf is not None:
        step = int(nf.get("step", step if step is not None else -1))
        what = str(nf.get("what", what or "loss"))
        where = nf.get("where", where)
        where = None if where in (None, "", "loss") else str(where)
        rows = min(rows, int(np.searchsorted(run.steps, step)))
    elif step is None and run.stopped == "diverged" and run.steps.size:
        step, what = int(run.steps[-1]), ""
    if step is None:
        return rows, None
    if what == "":  # only the run's own account: stopped as diverged
        text = f"the run stopped as diverged at step {step}"
        return rows, _Finding("diverged", 0, step, None, text, "the run")
    text = f"the {what} became non-finite (NaN or inf){_where(what, where)} at step {step}"
    text += (
        "; the loss came first" if what == "loss" else f"; the {what} came first (before the loss)"
    )
    if rows:
        last = int(run.steps[rows - 1])
        text += (
            f"; the last finite loss was {_fmt(float(run.loss[rows - 1]))} at step {last}, "
            f"at a learning rate of {_fmt(float(run.lr[rows - 1]))}"
        )
    return rows, _Finding("diverged", 0, step, where, text, what)


def _growth(
    run: _Run, growth: float, growth_rate: float, scores: dict[str, float]
) -> _Finding | None:
    t = run.log10_total_norm
    ok = np.isfinite(t)
    if ok.sum() < 2:
        return None
    steps, t = run.steps[ok], t[ok]
    q = max(1, t.size // 4)
    early, late = float(np.median(t[:q])), float(np.median(t[-q:]))
    span = float(np.median(steps[-q:]) - np.median(steps[:q]))
    rise = late - early
    rate = 100.0 * rise / span if span > 0 else math.nan
    scores["growth"], scores["growth_rate"] = rise, rate
    if not (rise >= growth and rate >= growth_rate):
        return None
    first = int(steps[int(np.argmax(t > early + growth))])
    layer = None
    cols = _weights(run.names)
    if cols:
        g = run.grads[ok][:, cols]
        with np.errstate(invalid="ignore"):
            per = np.median(g[-q:], axis=0) - np.median(g[:q], axis=0)
        per = np.where(np.isnan(per), -np.inf, per)
        layer = run.names[cols[int(np.argmax(per))]]
    return _Finding(
        "exploding",
        1,
        first,
        layer,
        f"the total gradient norm grew {_fmt(rise)} decades (x{10 ** min(rise, 300):.3g}) from the "
        f"first to the last quarter of the run, {_fmt(rate)} decades per 100 steps "
        f"(thresholds: growth={growth}, growth_rate={growth_rate}); it grew most in {layer}",
    )


def _spikes(run: _Run, spike_factor: float, scores: dict[str, float]) -> _Finding | None:
    loss = run.loss
    R = loss.size
    if R < 2:
        scores["spikes"] = 0.0
        return None
    w = _SPIKE_WINDOW
    start = float(np.median(loss[: min(w, R)]))
    ref = np.empty(R - 1)  # ref[i - 1]: the median of the (up to) w points before point i
    for i in range(1, min(w, R)):
        ref[i - 1] = np.median(loss[:i])
    if R > w:
        ref[w - 1 :] = np.median(np.lib.stride_tricks.sliding_window_view(loss[:-1], w), axis=1)
    with np.errstate(invalid="ignore"):
        spike = (loss[1:] > spike_factor * ref) & (loss[1:] > start)
    hits = np.flatnonzero(spike) + 1
    scores["spikes"] = float(hits.size)
    if not hits.size:
        return None
    i = int(hits[0])
    ref_i = float(ref[i - 1])
    return _Finding(
        "exploding",
        2,
        int(run.steps[i]),
        None,
        f"the loss spiked {hits.size} time(s), first at step {int(run.steps[i])}: "
        f"{_fmt(float(loss[i]))}, {_fmt(float(loss[i]) / ref_i)} times the median of the "
        f"{min(i, w)} recorded points before (spike_factor={spike_factor})",
    )


def _clipping(run: _Run, clip_fraction: float, scores: dict[str, float]) -> _Finding | None:
    c = run.log10_clip_coef
    clipped = c < 0
    frac = float(clipped.mean()) if c.size else 0.0
    scores["clip_fraction"] = frac
    if not (frac > clip_fraction):
        return None
    coef = float(10 ** np.median(c[clipped]))
    return _Finding(
        "exploding",
        9,
        int(run.steps[int(np.argmax(clipped))]),
        None,
        f"clipping was active on {100 * frac:.3g}% of the recorded steps (more than "
        f"clip_fraction={clip_fraction}), scaling the gradients by a median factor of "
        f"{_fmt(coef)}",
    )


def _layers(
    run: _Run, layer_gap: float, scores: dict[str, float]
) -> tuple[_Finding | None, list[str]]:
    """The vanishing or exploding-across-layers finding, and supporting evidence."""
    sides = _sides(run.names)
    notes: list[str] = []
    if sides is None or run.steps.size == 0:
        return None, notes
    lo, hi = sides
    gaps = _gap(run.grads, lo, hi)
    gap = _median(gaps)
    ugap = _median(_gap(run.updates, lo, hi))
    scores["layer_gap"], scores["update_gap"] = gap, ugap
    norms = run.norms[:, lo]
    with np.errstate(invalid="ignore", over="ignore"):
        change = np.abs(np.power(10.0, norms[-1] - norms[0]) - 1.0)
    change_ok = change[~np.isnan(change)]
    scores["input_weight_change"] = float(np.median(change_ok)) if change_ok.size else math.nan
    n_in, n_out = len(lo), len(hi)
    side_text = f"{n_in} input-side and {n_out} output-side weight parameter(s)"
    if math.isnan(gap):
        return None, notes
    g = run.grads[:, lo]
    if gap >= layer_gap:
        with np.errstate(invalid="ignore"):
            med = np.median(g, axis=0)
        layer = run.names[lo[int(np.argmin(np.where(np.isnan(med), np.inf, med)))]]
        first = int(run.steps[int(np.argmax(np.nan_to_num(gaps, nan=-np.inf) >= layer_gap))])
        gap_txt = "all of them exactly zero" if gap == math.inf else f"{_fmt(gap)} decades below"
        text = (
            f"the input-side weights received gradients {gap_txt} the output-side ones "
            f"(median over the run, {side_text}; layer_gap={layer_gap}); weakest: {layer}"
        )
        if ugap == math.inf:
            notes.append(
                "the input-side updates were exactly zero (median over the run): too small to "
                "change a weight in the chain's precision"
            )
        elif not math.isnan(ugap):
            notes.append(
                f"the input-side update ratios were {_fmt(ugap)} decades below the output side's"
                if ugap >= 0
                else f"the input-side update ratios were {_fmt(-ugap)} decades above the "
                "output side's (an adaptive optimizer such as Adam rescales small gradients)"
            )
        if not math.isnan(scores["input_weight_change"]):
            notes.append(
                "the input-side weight norms changed by "
                f"{_fmt(scores['input_weight_change'])} (relative) over the run"
            )
        return _Finding("vanishing", 3, first, layer, text), notes
    if -gap >= layer_gap:
        with np.errstate(invalid="ignore"):
            med = np.median(g, axis=0)
        layer = run.names[lo[int(np.argmax(np.where(np.isnan(med), -np.inf, med)))]]
        first = int(run.steps[int(np.argmax(np.nan_to_num(-gaps, nan=-np.inf) >= layer_gap))])
        text = (
            f"the input-side weights received gradients {_fmt(-gap)} decades above the "
            f"output-side ones (median over the run, {side_text}; layer_gap={layer_gap}): "
            f"gradients grow from the output towards the input; largest: {layer}"
        )
        return _Finding("exploding", 3, first, layer, text), notes
    notes.append(
        f"gradients were balanced across layers: the input side {_fmt(abs(gap))} decades "
        f"{'below' if gap >= 0 else 'above'} the output side (layer_gap={layer_gap})"
    )
    return None, notes


def _plateau(loss: np.ndarray, threshold: float) -> tuple[int, int]:
    """ReduceLROnPlateau's count (mode "min", threshold_mode "rel"): (recorded points since
    the loss last improved on its best by more than the relative `threshold`, index of
    that best point)."""
    best, bad, at = math.inf, 0, 0
    for i, x in enumerate(loss.tolist()):
        if x < best * (1.0 - threshold):
            best, bad, at = x, 0, i
        else:
            bad += 1
    return bad, at


def _stuck(
    run: _Run,
    patience: int,
    th: dict[str, float],
    baseline: float | None,
    scores: dict[str, float],
) -> tuple[_Finding | None, list[str]]:
    notes: list[str] = []
    R = run.loss.size
    if R == 0:
        return None, notes
    if run.grads.size and bool(np.all(run.grads == -np.inf)):
        text = "every gradient was exactly zero at every recorded step: nothing could train"
        return _Finding("stuck", 4, int(run.steps[0]), None, text), notes
    bad, at = _plateau(run.loss, th["plateau_threshold"])
    scores["plateau"] = float(bad)
    weights = _weights(run.names)
    ur = _median(run.updates[-patience:, weights].ravel()) if weights else math.nan
    scores["update_ratio"] = _float(ur)
    level = float(np.median(run.loss[-patience:]))
    upd = (
        f"the median update ratio |dW|/|W| of the weights over the last {min(patience, R)} "
        f"recorded points was {_fmt(scores['update_ratio'])}"
    )
    if baseline is not None:
        ratio = level / baseline if baseline > 0 else math.inf
        scores["baseline_ratio"] = ratio
        near = f"{_fmt(level)} over the last {min(patience, R)} recorded points"
        if level >= (1.0 - th["baseline_margin"]) * baseline:
            text = (
                f"the loss ({near}) did not get below the baseline {_fmt(baseline)} by more "
                f"than baseline_margin={th['baseline_margin']} ({_fmt(ratio)} of it): the "
                "network does no better than ignoring its inputs"
            )
            arrived = run.loss <= (1.0 + th["baseline_margin"]) * baseline
            step = int(run.steps[int(np.argmax(arrived))])  # the first row if never
            return _Finding("stuck", 4, step, None, text + f"; {upd}"), notes
        notes.append(f"the loss ({near}) is {_fmt(ratio)} of the baseline {_fmt(baseline)}")
    if bad <= patience:
        if R > patience:
            notes.append(
                f"the loss was still improving: its best so far came {bad} recorded point(s) "
                f"before the end (patience={patience})"
            )
        return None, notes
    flat = (
        f"the loss has not improved by more than {th['plateau_threshold']:g} (relative) on "
        f"its best ({_fmt(float(run.loss[at]))} at step {int(run.steps[at])}) for {bad} "
        f"recorded points (patience={patience})"
    )
    if not (scores["update_ratio"] < th["update_ratio"]):
        notes.append(
            f"{flat}, but the updates were not tiny: {upd} (update_ratio={th['update_ratio']})"
        )
        return None, notes
    text = (
        f"{flat}, and the updates were tiny: {upd}, below update_ratio={th['update_ratio']}, "
        f"at a learning rate of {_fmt(float(run.lr[-1]))}"
    )
    return _Finding("stuck", 4, int(run.steps[min(at + 1, R - 1)]), None, text), notes


def _float(log10: float) -> float:
    return math.nan if math.isnan(log10) else float(_pow10(log10))


# --------------------------------------------------------------------------------------
# diagnose
# --------------------------------------------------------------------------------------
def _threshold(
    name: str, value: Any, lo: float, hi: float, accepted: str, lo_open: bool = True
) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {accepted}; got {value!r}")
    x = float(value)
    if not (x > lo if lo_open else x >= lo) or not x < hi or math.isnan(x):
        raise ValueError(f"{name} must be {accepted}; got {x!r}")
    return x


def diagnose(
    history: Any,
    *,
    layer_gap: float = 3.0,
    growth: float = 1.0,
    growth_rate: float = 0.5,
    spike_factor: float = 10.0,
    clip_fraction: float = 0.5,
    patience: int | None = None,
    plateau_threshold: float = 1e-4,
    update_ratio: float = 1e-5,
    baseline: float | None = None,
    baseline_margin: float = 0.1,
) -> Diagnosis:
    """Name what happened in a training run, with the evidence.

    The rules, applied to the recorded steps before anything became non-finite:

    * **diverged**: ``history.nonfinite`` is set, or the loss, a gradient norm or a weight
      norm is NaN or infinite in a recorded row (the earliest wins; within one step the
      loss comes before the gradient, the gradient before the weight). Takes precedence:
      what the finite steps before show goes into ``also``.
    * **exploding**, any of: the total gradient norm (before clipping) rose by at least
      `growth` decades from the first to the last quarter of the run (medians) at a rate
      of at least `growth_rate` decades per 100 steps; a loss spike, a loss above
      `spike_factor` times the median of the 10 recorded points before it and above the
      median of the first 10 (where the run started); the input-side weights' gradients
      at least `layer_gap` decades above the output-side ones; clipping (a clip
      coefficient below 1) on more than `clip_fraction` of the recorded steps.
    * **vanishing**: the input-side weights' gradient norms at least `layer_gap`
      decades below the output-side ones (median over the run of the difference of the
      two sides' medians). The input side is the first third of the weight layers, the
      output side the last third (at least one each): every parameter whose name ends in
      ``weight...`` is a layer, except that ``weight_ih_lK`` and ``weight_hh_lK`` of a
      recurrent layer K form one; biases are left out. The update ratios and the change
      of the input-side weight norms are reported as evidence.
    * **stuck**: the loss has not improved on its best by more than the relative
      `plateau_threshold` for more than `patience` recorded points (the rule of
      ``torch.optim.lr_scheduler.ReduceLROnPlateau``), and the median update ratio
      ``||dW|| / ||W||`` of the weights over the last `patience` points is below
      `update_ratio`; or, when a `baseline` loss is given (the loss of a predictor that
      ignores the inputs, :attr:`gradchain.tasks.Dataset.baseline_loss`), the median loss
      over the last `patience` points is not below it by more than the fraction
      `baseline_margin`; or every gradient was exactly zero.
    * **healthy**: none of these.

    Once the gradient norm has grown or the loss has spiked, vanishing and stuck are judged
    on the steps before that only (a blown-up network saturates and stalls as a
    consequence); stuck is judged on the steps before a blow-up or a divergence only if
    more than `patience` recorded points came before (the first points are the untrained
    network's loss, above any baseline). The kind is the first that applies of: diverged,
    exploding (by growth, spikes or layers), vanishing, exploding by clipping alone, stuck;
    the others that apply are listed in ``also``.

    Parameters
    ----------
    history : gradchain.History
        The run; any object with the attributes of :class:`gradchain.History` listed in
        the module's description will do.
    layer_gap : float
        Decades between the two sides' gradient norms that make vanishing (input side
        below) or exploding across layers (input side above). Default 3 (a factor 1000).
    growth : float
        Decades the total gradient norm must rise over the run to be exploding. Default 1.
    growth_rate : float
        Decades per 100 steps that rise must reach as well. Default 0.5.
    spike_factor : float
        How many times its running median a loss must jump to be a spike (> 1). Default 10.
    clip_fraction : float
        Fraction of recorded steps, in [0, 1), that must be clipped to be exploding.
        Default 0.5.
    patience : int, optional
        Recorded points without improvement that make a plateau. Default: a tenth of the
        recorded points, at least 10.
    plateau_threshold : float
        Relative improvement, in [0, 1), that counts as improving. Default 1e-4 (torch's).
    update_ratio : float
        Median update ratio below which the updates are tiny (> 0). Default 1e-5.
    baseline : float, optional
        The loss of the best prediction that ignores the inputs (the target variance for
        ``"mse"``, the label entropy for ``"cross_entropy"``; a :class:`~gradchain.tasks.Dataset`
        gives it as ``baseline_loss``). Without it the baseline rule is not applied.
    baseline_margin : float
        Fraction in [0, 1): a run whose loss ends above ``(1 - baseline_margin) *
        baseline`` is stuck. Default 0.1.

    Returns
    -------
    Diagnosis

    Raises
    ------
    TypeError
        If `history` lacks one of the attributes, or a threshold is not a number.
    ValueError
        If a threshold is out of range (the message names it and the accepted range),
        the history's arrays disagree in shape, or nothing was recorded.

    Examples
    --------
    >>> import numpy as np
    >>> from types import SimpleNamespace
    >>> from gradchain.diagnose import diagnose
    >>> R, steps = 50, np.arange(1, 51)
    >>> loss = 1.0 / steps
    >>> grads = np.tile([-1.0, -1.5], (R, 1))  # two weight layers, 0.5 decades apart
    >>> hist = SimpleNamespace(
    ...     steps=steps, loss=loss, log10_loss=np.log10(loss), lr=np.full(R, 0.1),
    ...     log10_total_norm=np.full(R, -0.9), log10_clipped_total_norm=np.full(R, -0.9),
    ...     log10_clip_coef=np.zeros(R), param_names=["0.weight", "2.weight"],
    ...     log10_param_grad_norms=grads, log10_param_norms=np.zeros((R, 2)),
    ...     log10_update_ratios=np.full((R, 2), -3.0), val_loss=None, nonfinite=None,
    ...     stopped="completed", record_every=1)
    >>> d = diagnose(hist)
    >>> d
    Diagnosis(kind='healthy', step=None, layer=None, also=())
    >>> diagnose(hist, layer_gap=0.4).kind  # a stricter threshold changes the verdict
    'exploding'
    """
    th = {
        "layer_gap": _threshold(
            "layer_gap", layer_gap, 0.0, math.inf, "a positive number of decades"
        ),
        "growth": _threshold("growth", growth, 0.0, math.inf, "a positive number of decades"),
        "growth_rate": _threshold(
            "growth_rate",
            growth_rate,
            0.0,
            math.inf,
            "a number of decades per 100 steps >= 0",
            False,
        ),
        "spike_factor": _threshold(
            "spike_factor", spike_factor, 1.0, math.inf, "a finite number > 1"
        ),
        "clip_fraction": _threshold(
            "clip_fraction", clip_fraction, 0.0, 1.0, "a fraction in [0, 1)", False
        ),
        "plateau_threshold": _threshold(
            "plateau_threshold", plateau_threshold, 0.0, 1.0, "a fraction in [0, 1)", False
        ),
        "update_ratio": _threshold(
            "update_ratio", update_ratio, 0.0, math.inf, "a positive number"
        ),
        "baseline_margin": _threshold(
            "baseline_margin", baseline_margin, 0.0, 1.0, "a fraction in [0, 1)", False
        ),
    }
    base = None
    if baseline is not None:
        base = _threshold("baseline", baseline, 0.0, math.inf, "a finite loss >= 0 or None", False)
        th["baseline"] = base
    if patience is not None and (
        isinstance(patience, bool) or not isinstance(patience, numbers.Integral)
    ):
        raise TypeError(f"patience must be a positive integer or None; got {patience!r}")
    if patience is not None and int(patience) < 1:
        raise ValueError(f"patience must be a positive integer or None; got {patience}")

    run = _read(history)
    R = run.steps.shape[0]
    if R == 0 and run.nonfinite is None:
        raise ValueError("history has no recorded steps: there is nothing to diagnose")
    pat = int(patience) if patience is not None else max(10, R // 10)
    th["patience"] = float(pat)
    scores: dict[str, float] = dict.fromkeys(_SCORES, math.nan)

    rows, div = _diverged(run)
    finite = run.head(rows)
    findings: list[_Finding] = [] if div is None else [div]
    notes: list[str] = []
    if rows:
        notes += _loss_notes(finite, scores)
        blowup = [
            f
            for f in (
                _growth(finite, th["growth"], th["growth_rate"], scores),
                _spikes(finite, th["spike_factor"], scores),
            )
            if f is not None
        ]
        findings += blowup
        clip = _clipping(finite, th["clip_fraction"], scores)
        if clip is not None:
            findings.append(clip)
        # vanishing and stuck: judged before any blow-up
        before = finite
        if blowup:
            start = min(f.step for f in blowup if f.step is not None)
            before = finite.head(int(np.searchsorted(finite.steps, start)))
        n = before.steps.size
        # Where a blow-up or a divergence cut the run short, a loss over its first `patience`
        # points is the untrained network's (above the baseline, not yet on a plateau) or
        # already the blow-up's: it says nothing about stalling.
        stall = n > pat or (not blowup and div is None)
        if blowup:
            notes.append(
                f"vanishing and stalling are judged on the {n} recorded step(s) before step "
                f"{start}, where the blow-up began"
                if stall
                else f"vanishing is judged on the {n} recorded step(s) before step {start}, "
                f"where the blow-up began; stalling is not judged on so few (it needs more "
                f"than patience={pat})"
            )
        elif not stall:
            notes.append(
                f"stalling is not judged on the {n} recorded step(s) before the divergence "
                f"(it needs more than patience={pat})"
            )
        f, more = _layers(before, th["layer_gap"], scores)
        notes += more
        if f is not None:
            findings.append(f)
        if stall:
            f, more = _stuck(before, pat, th, base, scores)
            notes += more
            if f is not None:
                findings.append(f)
    findings.sort(key=lambda f: f.strength)

    if not findings:
        kind, step, layer = "healthy", None, None
    else:
        kind = findings[0].kind
        same = [f for f in findings if f.kind == kind]
        steps = [f.step for f in same if f.step is not None]
        step = min(steps) if steps else None
        layer = next((f.layer for f in same if f.layer is not None), None)
    also = tuple(dict.fromkeys(f.kind for f in findings if f.kind != kind))
    if run.stopped not in ("completed", "diverged"):
        notes.append(f"the run stopped early ({run.stopped}) after {_steps_text(run)}")
    evidence = [f.text for f in findings] + notes
    return Diagnosis(kind, _summary(kind, findings, also), evidence, step, layer, scores, th, also)


_SCORES = (
    "layer_gap",
    "update_gap",
    "input_weight_change",
    "growth",
    "growth_rate",
    "spikes",
    "clip_fraction",
    "plateau",
    "update_ratio",
    "loss_decades",
    "baseline_ratio",
)


def _loss_notes(run: _Run, scores: dict[str, float]) -> list[str]:
    """How the loss went, in one sentence (and the validation loss, when recorded)."""
    lg = run.log10_loss  # exact where the float loss is 0 or inf
    k = max(1, lg.size // 10)
    first, last = float(np.median(lg[:k])), float(np.median(lg[-k:]))
    with np.errstate(invalid="ignore"):
        dec = first - last
    scores["loss_decades"] = dec
    change = "" if math.isnan(dec) else f", {_fmt(abs(dec))} decades {'down' if dec >= 0 else 'up'}"
    text = (
        f"the loss went from {_fmt(_float(first))} to {_fmt(_float(last))} (medians of the "
        f"first and last tenth{change}) over {_steps_text(run)}"
    )
    out = [text]
    if run.val_loss is not None and np.isfinite(run.val_loss).any():
        v = run.val_loss
        best = int(np.nanargmin(np.where(np.isfinite(v), v, np.nan)))
        out.append(
            f"the validation loss was {_fmt(float(v[-1]))} at the end, its best "
            f"{_fmt(float(v[best]))} at step {int(run.steps[best])}"
        )
    return out


def _summary(kind: str, findings: list[_Finding], also: tuple[str, ...]) -> str:
    top = findings[0] if findings else None
    if kind == "diverged" and top is not None:
        if top.what == "the run":
            text = f"Training diverged at step {top.step}."
        else:
            what = f"the {top.what}" + (f" of {top.layer}" if top.layer else "")
            text = f"Training diverged: {what} became non-finite at step {top.step}."
            if top.what == "loss" and top.layer:
                text = (
                    f"Training diverged: the loss became non-finite at step {top.step},"
                    f"{_where('loss', top.layer)}."
                )
    elif kind == "exploding":
        where = f" (most in {top.layer})" if top is not None and top.layer else ""
        text = f"Gradients exploded{where}."
    elif kind == "vanishing":
        where = f" ({top.layer} is starved)" if top is not None and top.layer else ""
        text = f"Gradients vanished towards the input{where}."
    elif kind == "stuck":
        text = "Training is stuck: the loss is not improving."
    else:
        text = "Training looks healthy: no divergence, explosion, vanishing or plateau found."
    if also:
        text += f" Also: {', '.join(also)}."
    return text
