"""gradchain.diagnose: the textbook cases told apart on synthetic histories, edge cases,
thresholds and the Diagnosis record."""

from __future__ import annotations

import doctest
import json
import math
from types import SimpleNamespace

import numpy as np
import oracles
import pytest
from conftest import needs_torch
from gradchain import Diagnosis
from gradchain import diagnose as diagnose_module
from gradchain.diagnose import KINDS, diagnose

# The History attributes diagnose() may read (the contract between the parts).
CONTRACT = (
    "steps",
    "loss",
    "log10_loss",
    "log10_total_norm",
    "log10_clipped_total_norm",
    "log10_clip_coef",
    "lr",
    "param_names",
    "log10_param_grad_norms",
    "log10_param_norms",
    "log10_update_ratios",
    "val_loss",
    "nonfinite",
    "stopped",
    "record_every",
)


class StrictHistory:
    """A history that refuses to be read beyond the contract's attributes."""

    def __init__(self, **attrs):
        assert set(attrs) == set(CONTRACT), set(attrs) ^ set(CONTRACT)
        self.__dict__["_attrs"] = attrs

    def __getattr__(self, name):
        if name in self._attrs:
            return self._attrs[name]
        raise AssertionError(f"diagnose read history.{name}, which is not in the contract")


def mlp_names(layers: int) -> list[str]:
    """An MLP's parameter names: Linear layers at the even block indices."""
    return [f"{2 * i}.{k}" for i in range(layers) for k in ("weight", "bias")]


def history(
    grads,
    *,
    loss,
    names=None,
    steps=None,
    norms=None,
    updates=None,
    clip=None,
    lr=0.01,
    val_loss=None,
    nonfinite=None,
    stopped="completed",
    record_every=1,
):
    """A history from per-parameter log10 gradient norms (R, P) and the loss (R,); the
    total norm follows from the gradients, the rest has harmless defaults."""
    grads = np.asarray(grads, dtype=float)
    R, P = grads.shape
    names = mlp_names(P // 2) if names is None else names
    steps = np.arange(1, R + 1) * record_every if steps is None else np.asarray(steps)
    loss = np.asarray(loss, dtype=float)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        total = (
            0.5 * np.log10(np.sum(np.power(10.0, 2 * grads), axis=1)) if P else np.full(R, -np.inf)
        )
    log_clip = np.zeros(R) if clip is None else np.asarray(clip, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_loss = np.log10(loss)
    return StrictHistory(
        steps=steps,
        loss=loss,
        log10_loss=log_loss,
        log10_total_norm=total,
        log10_clipped_total_norm=total + log_clip,
        log10_clip_coef=log_clip,
        lr=np.full(R, lr),
        param_names=names,
        log10_param_grad_norms=grads,
        log10_param_norms=np.zeros((R, P)) if norms is None else np.asarray(norms, dtype=float),
        log10_update_ratios=np.full((R, P), -3.0)
        if updates is None
        else np.asarray(updates, dtype=float),
        val_loss=val_loss,
        nonfinite=nonfinite,
        stopped=stopped,
        record_every=record_every,
    )


RNG = np.random.default_rng(0)


def noisy(a, scale=0.05, seed=0):
    """`a` times log-normal batch noise (a mini-batch loss or norm)."""
    rng = np.random.default_rng(seed)
    return np.asarray(a) * np.power(10.0, scale * rng.standard_normal(np.shape(a)))


def decreasing_loss(R, start=1.0, decades=2.0, seed=0):
    return noisy(start * np.power(10.0, -decades * np.arange(R) / R), seed=seed)


# --------------------------------------------------------------------------------------
# the textbook cases
# --------------------------------------------------------------------------------------
def healthy_case(R=300, layers=6, seed=0):
    rng = np.random.default_rng(seed)
    grads = -1.0 + 0.1 * rng.standard_normal((R, 2 * layers))
    return history(grads, loss=decreasing_loss(R, seed=seed))


def vanishing_case(R=300, layers=9, decades_per_layer=1.0, stuck=True):
    """Gradients falling a decade per layer towards the input; tiny input-side updates and
    stagnant input-side weights; the loss flat after a short descent."""
    depth_from_out = np.repeat(np.arange(layers)[::-1], 2)  # weight and bias of each layer
    grads = -1.0 - decades_per_layer * depth_from_out + 0.05 * RNG.standard_normal((R, 2 * layers))
    updates = -3.0 - decades_per_layer * depth_from_out + np.zeros((R, 1))
    if stuck:
        updates = updates - 4.0
        loss = np.concatenate([np.linspace(0.5, 0.3, 20), np.full(R - 20, 0.3)])
    else:
        loss = decreasing_loss(R)
    return history(grads, loss=loss, updates=updates)


def exploding_case(R=200, rate=0.05, max_norm=1.0):
    """Gradient norms growing geometrically (rate decades per step), clipped at max_norm."""
    steps = np.arange(1, R + 1)
    grads = np.tile(-1.0 + rate * steps[:, None], (1, 8)) + 0.05 * RNG.standard_normal((R, 8))
    h = history(grads, loss=noisy(np.full(R, 0.7)))
    total = h.log10_total_norm
    clip = np.minimum(0.0, math.log10(max_norm) - total)
    return history(grads, loss=h.loss, clip=clip)


def diverged_case(R=60, at=40, what="gradient", where_index=2):
    """Finite for at-1 steps, then a non-finite gradient (or weight, or loss) at step `at`."""
    grads = np.full((R, 8), -1.0)
    norms = np.zeros((R, 8))
    loss = decreasing_loss(R)
    k = at - 1
    if what == "gradient":
        grads[k:, where_index] = np.nan
    elif what == "weight":
        norms[k:, where_index] = np.inf
    loss[k + (what != "loss") :] = np.nan
    names = mlp_names(4)
    where = "loss" if what == "loss" else names[where_index]
    nf = {"step": at, "what": what, "where": where, "index": -1 if what == "loss" else where_index}
    return history(grads[:at], loss=loss[:at], norms=norms[:at], nonfinite=nf, stopped="diverged")


def stuck_case(R=300, update=-8.0):
    grads = np.full((R, 8), -6.0) + 0.05 * RNG.standard_normal((R, 8))
    return history(grads, loss=np.full(R, 0.6931), updates=np.full((R, 8), update))


def test_healthy():
    d = diagnose(healthy_case())
    assert d.kind == "healthy" and d.also == () and d.step is None and d.layer is None
    assert d.summary.startswith("Training looks healthy")
    assert any("the loss went from" in e and "decades down" in e for e in d.evidence)
    assert any("balanced across layers" in e for e in d.evidence)
    assert abs(d.scores["layer_gap"]) < 0.5 and d.scores["loss_decades"] > 1.5


def test_vanishing_and_stuck():
    d = diagnose(vanishing_case())
    assert d.kind == "vanishing" and d.also == ("stuck",)
    assert d.layer == "0.weight" and d.step == 1
    # 9 weight layers: the first 3 against the last 3, a decade per layer apart
    assert d.scores["layer_gap"] == pytest.approx(6.0, abs=0.1)
    assert d.scores["update_gap"] == pytest.approx(6.0, abs=1e-9)
    assert d.scores["input_weight_change"] == 0.0
    text = "\n".join(d.evidence)
    assert "6 decades below the output-side ones" in text
    assert "3 input-side and 3 output-side weight parameter(s)" in text
    assert "input-side update ratios were 6 decades below" in text
    assert "changed by 0 (relative)" in text
    assert "the updates were tiny" in text
    assert d.summary == "Gradients vanished towards the input (0.weight is starved). Also: stuck."


def test_input_side_updates_exactly_zero_are_said_so():
    R, layers = 100, 9
    depth_from_out = np.repeat(np.arange(layers)[::-1], 2)
    grads = -1.0 - depth_from_out + np.zeros((R, 1))  # a decade per layer
    updates = -3.0 - depth_from_out + np.zeros((R, 1))
    updates[:, :6] = -np.inf  # the first three layers: too small to change a weight
    d = diagnose(history(grads, loss=decreasing_loss(R), updates=updates))
    assert d.kind == "vanishing" and d.scores["update_gap"] == math.inf
    assert "the input-side updates were exactly zero (median over the run)" in "\n".join(d.evidence)


def test_vanishing_while_still_learning_is_not_stuck():
    d = diagnose(vanishing_case(stuck=False))
    assert d.kind == "vanishing" and d.also == ()


def test_exploding_geometric_growth_and_clipping():
    d = diagnose(exploding_case())
    assert d.kind == "exploding"
    assert d.scores["growth_rate"] == pytest.approx(5.0, rel=0.05)  # 0.05 decades per step
    assert d.scores["clip_fraction"] > 0.9
    text = "\n".join(d.evidence)
    assert "decades per 100 steps" in text and "clipping was active on" in text
    assert d.layer in mlp_names(4)
    # the earliest sign: the first clipped step, where the norm (sqrt(8) * 10**(0.05 s - 1))
    # passed max_norm = 1
    assert d.step == 12
    growth_only = diagnose(exploding_case(max_norm=1e12))
    assert growth_only.kind == "exploding" and growth_only.scores["clip_fraction"] == 0
    # the first step at which the norm stood `growth` (a decade) above the first quarter's
    assert 35 < growth_only.step < 55


def test_exploding_by_clipping_alone_and_its_threshold():
    R = 100
    grads = np.full((R, 4), 0.5)  # a steady norm above max_norm=1: clipped on every step
    h = history(grads, loss=decreasing_loss(R), clip=np.full(R, -0.65))
    d = diagnose(h)
    assert d.kind == "exploding" and d.scores["clip_fraction"] == 1.0
    assert d.scores["growth"] == pytest.approx(0.0, abs=1e-12)
    some = history(grads, loss=decreasing_loss(R), clip=np.where(np.arange(R) < 40, -0.65, 0.0))
    assert diagnose(some).kind == "healthy"  # clipped on 40% of the steps
    assert diagnose(some, clip_fraction=0.3).kind == "exploding"


def test_clipping_alone_ranks_below_vanishing():
    h = vanishing_case()
    R = h.steps.size
    clipped = history(
        h.log10_param_grad_norms,
        loss=h.loss,
        updates=h.log10_update_ratios,
        clip=np.full(R, -0.5),
    )
    d = diagnose(clipped)
    assert d.kind == "vanishing" and d.also == ("stuck", "exploding")


def test_exploding_across_layers():
    R = 100
    layers = 6
    from_out = np.repeat(np.arange(layers)[::-1], 2)
    grads = -1.0 + 1.0 * from_out + np.zeros((R, 1))  # gradients grow towards the input
    d = diagnose(history(grads, loss=decreasing_loss(R)))
    assert d.kind == "exploding" and d.layer == "0.weight"
    assert d.scores["layer_gap"] == pytest.approx(-4.0)  # layers 0-1 against 4-5
    assert any("decades above the output-side ones" in e for e in d.evidence)


def test_loss_spike_is_exploding():
    R = 120
    loss = decreasing_loss(R, decades=1.0)
    loss[70] = 40.0  # far above its running median and above where it started
    d = diagnose(history(np.full((R, 4), -1.0), loss=loss))
    assert d.kind == "exploding" and d.step == 71 and d.scores["spikes"] == 1
    assert any("the loss spiked 1 time(s), first at step 71" in e for e in d.evidence)
    assert diagnose(history(np.full((R, 4), -1.0), loss=loss), spike_factor=1e4).kind == "healthy"


def test_stalling_is_judged_before_a_blow_up_or_divergence_only_on_more_than_patience_points():
    R = 200
    loss = decreasing_loss(R, start=0.15, decades=1.0)
    loss[1] = 50.0  # an overshoot at step 2, from which the run recovers
    h = history(np.full((R, 4), -1.0), loss=loss)
    # a single (untrained) point before the spike: above the baseline, but not stuck
    d = diagnose(h, baseline=1 / 6)
    assert d.kind == "exploding" and d.also == () and math.isnan(d.scores["baseline_ratio"])
    assert any("stalling is not judged on so few" in e for e in d.evidence)
    # a run at the baseline for 100 points, then a spike: stuck before it
    flat = noisy(np.full(R, 0.169), scale=0.02)
    flat[100] = 50.0
    d = diagnose(history(np.full((R, 4), -1.0), loss=flat), baseline=1 / 6)
    assert d.kind == "exploding" and d.also == ("stuck",) and d.step == 101
    # the same for a divergence: three recorded rows far above the baseline, then NaN
    nf = {"step": 20, "what": "loss", "where": "loss", "index": -1}
    rows = history(np.full((3, 4), -1.0), loss=[5.0, 4.0, 6.0], nonfinite=nf, record_every=5)
    d = diagnose(rows, baseline=1 / 6)
    assert (d.kind, d.also) == ("diverged", ())
    assert any("stalling is not judged on the 3 recorded step(s) before the divergence" in e
               for e in d.evidence)  # fmt: skip
    # and a completed run of as few rows is still judged
    done = history(np.full((3, 4), -1.0), loss=[5.0, 4.0, 6.0], record_every=5)
    assert diagnose(done, baseline=1 / 6).kind == "stuck"


def test_a_low_loss_jumping_back_below_its_start_is_no_spike():
    R = 120
    loss = decreasing_loss(R, decades=4.0)
    loss[100] = 0.05  # 100 times its running median, still below the starting loss
    assert diagnose(history(np.full((R, 4), -1.0), loss=loss)).kind == "healthy"


@pytest.mark.parametrize("what", ["gradient", "weight", "loss"])
def test_diverged_from_the_history_record(what):
    d = diagnose(diverged_case(what=what))
    assert d.kind == "diverged" and d.step == 40
    assert d.layer == (None if what == "loss" else "2.weight")
    first = d.evidence[0]
    assert f"the {what} became non-finite" in first and "at step 40" in first
    assert ("came first (before the loss)" in first) == (what != "loss")
    assert "the last finite loss was" in first and "at step 39" in first
    where = " of 2.weight" if what != "loss" else ""
    assert d.summary.startswith(
        f"Training diverged: the {what}{where} became non-finite at step 40"
    )


def test_a_forward_pass_that_broke_down_is_named():
    h = diverged_case(what="loss")
    nf = {"step": 40, "what": "loss", "where": "block '10'", "index": -1}
    d = diagnose(history(h.log10_param_grad_norms, loss=h.loss, nonfinite=nf))
    assert (d.kind, d.step, d.layer) == ("diverged", 40, "block '10'")
    assert d.summary == (
        "Training diverged: the loss became non-finite at step 40, in the forward pass "
        "through block '10'."
    )
    assert d.evidence[0].startswith(
        "the loss became non-finite (NaN or inf) in the forward pass through block '10' at step 40"
    )


def test_diverged_found_in_the_rows_when_the_record_is_missing():
    # NaN loss rows without history.nonfinite: the first non-finite row is the step
    R = 50
    loss = decreasing_loss(R)
    loss[30:] = np.nan
    d = diagnose(history(np.full((R, 4), -1.0), loss=loss))
    assert d.kind == "diverged" and d.step == 31 and d.layer is None
    # which came first within the rows: a weight at step 10 before the loss at step 12
    norms = np.zeros((R, 4))
    norms[9:, 2] = np.inf
    loss = decreasing_loss(R)
    loss[11:] = np.inf
    grads = np.full((R, 4), -1.0)
    grads[20:, 0] = np.nan
    d = diagnose(history(grads, loss=loss, norms=norms))
    assert (d.kind, d.step, d.layer) == ("diverged", 10, "2.weight")
    assert "the weight became non-finite (NaN or inf) in 2.weight at step 10" in d.evidence[0]


def test_same_step_loss_then_gradient_then_weight():
    R = 20
    grads = np.full((R, 4), -1.0)
    grads[5:, 1] = np.inf
    norms = np.zeros((R, 4))
    norms[5:, 3] = np.nan
    d = diagnose(history(grads, loss=decreasing_loss(R), norms=norms))
    assert (d.kind, d.step, d.layer) == ("diverged", 6, "0.bias")
    assert "the gradient came first" in d.evidence[0]


def test_explosion_then_divergence():
    h = exploding_case(R=80, rate=0.2)
    R = 80
    nf = {"step": R, "what": "loss", "where": "loss", "index": -1}
    loss = h.loss.copy()
    loss[-1] = np.inf
    g = history(h.log10_param_grad_norms, loss=loss, clip=h.log10_clip_coef, nonfinite=nf)
    d = diagnose(g)
    assert d.kind == "diverged" and d.also == ("exploding",) and d.step == R
    assert d.summary.endswith("Also: exploding.")


def test_diverged_before_anything_was_recorded():
    h = history(
        np.zeros((0, 4)),
        loss=np.zeros(0),
        nonfinite={"step": 1, "what": "loss", "where": "loss", "index": -1},
    )
    d = diagnose(h)
    assert (d.kind, d.step, d.layer) == ("diverged", 1, None)


def test_stopped_as_diverged_without_a_record():
    R = 30
    h = history(np.full((R, 4), -1.0), loss=decreasing_loss(R), stopped="diverged")
    d = diagnose(h)
    assert (d.kind, d.step) == ("diverged", 30) and d.summary == "Training diverged at step 30."


def test_stuck_and_the_update_ratio_threshold():
    d = diagnose(stuck_case())
    assert d.kind == "stuck" and d.also == () and d.layer is None
    assert d.scores["plateau"] == 299 and d.scores["update_ratio"] == pytest.approx(1e-8)
    assert d.step == 2  # the loss stopped improving after its first point
    assert any("the updates were tiny" in e and "1e-08" in e for e in d.evidence)
    assert diagnose(stuck_case(), update_ratio=1e-9).kind == "healthy"
    relaxed = diagnose(stuck_case(update=-3.0))
    assert relaxed.kind == "healthy"
    assert any("but the updates were not tiny" in e for e in relaxed.evidence)


def test_plateau_follows_reduce_lr_on_plateau():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    for trial in range(20):
        loss = np.abs(1.0 + 0.001 * np.cumsum(rng.standard_normal(40)))
        bad, _ = diagnose_module._plateau(loss, 1e-4)
        p = torch.nn.Parameter(torch.zeros(1))
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
            torch.optim.SGD([p], lr=1.0), patience=1000
        )
        for x in loss:
            sched.step(float(x))
        assert bad == sched.num_bad_epochs, trial


def test_patience_decides_the_plateau():
    R = 200
    loss = np.concatenate([decreasing_loss(150), np.full(50, 0.0)])
    loss[150:] = loss[149]
    h = history(np.full((R, 4), -1.0), loss=loss, updates=np.full((R, 4), -9.0))
    assert diagnose(h).kind == "stuck"  # patience 20 (a tenth of the run)
    assert diagnose(h).thresholds["patience"] == 20
    assert diagnose(h, patience=60).kind == "healthy"


def test_stuck_at_the_baseline():
    R = 200
    loss = noisy(np.full(R, 0.169), scale=0.1)  # the adding problem's variance baseline
    h = history(np.full((R, 4), -1.0), loss=loss)  # updates of 1e-3: not tiny
    assert diagnose(h).kind == "healthy"
    d = diagnose(h, baseline=1 / 6)
    assert d.kind == "stuck" and d.scores["baseline_ratio"] == pytest.approx(1.0, abs=0.05)
    assert "does no better than ignoring its inputs" in d.evidence[0]
    assert d.thresholds["baseline"] == 1 / 6 and d.thresholds["baseline_margin"] == 0.1
    solved = history(np.full((R, 4), -1.0), loss=decreasing_loss(R, start=0.2, decades=2))
    assert diagnose(solved, baseline=1 / 6).kind == "healthy"
    assert diagnose(h, baseline=0.2).kind == "healthy"  # 0.169 is below 0.9 * 0.2
    assert diagnose(h, baseline=0.2, baseline_margin=0.5).kind == "stuck"


def test_all_gradients_exactly_zero():
    R = 5
    d = diagnose(
        history(np.full((R, 4), -np.inf), loss=np.full(R, 0.5), updates=np.full((R, 4), -np.inf))
    )
    assert d.kind == "stuck" and d.step == 1
    assert "every gradient was exactly zero" in d.evidence[0]
    assert math.isnan(d.scores["layer_gap"])


def test_input_side_gradients_exactly_zero_is_vanishing():
    R = 30
    grads = np.full((R, 6), -1.0)
    grads[:, :2] = -np.inf  # layer 0: dead
    d = diagnose(history(grads, loss=decreasing_loss(R)))
    assert d.kind == "vanishing" and d.layer == "0.weight" and d.scores["layer_gap"] == math.inf
    assert "all of them exactly zero" in d.evidence[0]


def test_one_recorded_step():
    d = diagnose(history(np.full((1, 4), -1.0), loss=[0.7]))
    assert d.kind == "healthy"
    assert math.isnan(d.scores["growth"]) and d.scores["spikes"] == 0
    assert d.thresholds["patience"] == 10


def test_no_parameters_and_a_single_weight_layer():
    assert diagnose(history(np.zeros((5, 0)), loss=decreasing_loss(5), names=[])).kind == "healthy"
    d = diagnose(history(np.full((5, 2), -1.0), loss=decreasing_loss(5), names=["weight", "bias"]))
    assert d.kind == "healthy" and math.isnan(d.scores["layer_gap"])


def test_stopped_early_is_reported():
    h = history(
        np.full((40, 4), -1.0), loss=decreasing_loss(40), stopped="callback", record_every=5
    )
    d = diagnose(h)
    assert d.kind == "healthy"
    assert "the run stopped early (callback) after 200 steps, recorded every 5" in d.evidence
    assert d.scores["growth_rate"] == pytest.approx(0.0, abs=1e-12)


def test_record_every_scales_the_growth_rate():
    # the same rows recorded every 10 steps: ten times slower growth per step
    h = exploding_case(R=100, rate=0.05)
    slow = history(h.log10_param_grad_norms, loss=h.loss, record_every=10)
    assert diagnose(slow).scores["growth_rate"] == pytest.approx(
        diagnose(h).scores["growth_rate"] / 10, rel=1e-9
    )
    assert diagnose(slow).kind == "exploding"  # 0.5 decades per 100 steps
    assert diagnose(slow, growth_rate=1.0).kind == "healthy"


def test_validation_loss_is_reported():
    R = 50
    val = np.linspace(1.0, 0.5, R)
    val[30:] = 0.8
    d = diagnose(history(np.full((R, 4), -1.0), loss=decreasing_loss(R), val_loss=val))
    assert "the validation loss was 0.8 at the end, its best 0.704 at step 30" in d.evidence


def test_rnn_weights_are_grouped_by_layer():
    names = [
        "weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0",
        "weight_ih_l1", "weight_hh_l1", "bias_ih_l1", "bias_hh_l1",
        "weight_ih_l2", "weight_hh_l2", "bias_ih_l2", "bias_hh_l2",
        "readout.weight", "readout.bias",
    ]  # fmt: skip
    layers = diagnose_module._weight_layers(names)
    assert layers == [[0, 1], [4, 5], [8, 9], [12]]
    assert diagnose_module._sides(names) == ([0, 1], [12])
    R = 40
    grads = np.full((R, len(names)), -1.0)
    grads[:, [0, 1]] = -6.0  # layer 0 starved; biases ignored
    d = diagnose(history(grads, loss=decreasing_loss(R), names=names))
    assert d.kind == "vanishing" and d.layer in ("weight_ih_l0", "weight_hh_l0")
    bidir = ["weight_ih_l0", "weight_hh_l0", "weight_ih_l0_reverse", "weight_hh_l0_reverse",
             "weight_ih_l1", "weight_hh_l1"]  # fmt: skip
    assert diagnose_module._weight_layers(bidir) == [[0, 1, 2, 3], [4, 5]]


def test_layer_gap_threshold_changes_the_verdict():
    h = vanishing_case(decades_per_layer=0.4, stuck=False)  # 2.4 decades
    assert diagnose(h).kind == "healthy"
    assert diagnose(h, layer_gap=2.0).kind == "vanishing"


def test_growth_thresholds_change_the_verdict():
    h = exploding_case(rate=0.05, max_norm=1e9)  # no clipping
    assert diagnose(h).kind == "exploding"
    assert diagnose(h, growth=20.0).kind == "healthy"
    assert diagnose(h, growth_rate=10.0).kind == "healthy"


def test_thresholds_are_echoed_with_their_defaults():
    d = diagnose(healthy_case(R=300))
    assert d.thresholds == {
        "layer_gap": 3.0,
        "growth": 1.0,
        "growth_rate": 0.5,
        "spike_factor": 10.0,
        "clip_fraction": 0.5,
        "plateau_threshold": 1e-4,
        "update_ratio": 1e-5,
        "baseline_margin": 0.1,
        "patience": 30.0,
    }
    assert set(d.scores) == set(diagnose_module._SCORES)


@pytest.mark.parametrize(
    ("kwargs", "exc", "name"),
    [
        ({"layer_gap": 0}, ValueError, "layer_gap"),
        ({"layer_gap": -1.0}, ValueError, "layer_gap"),
        ({"layer_gap": float("nan")}, ValueError, "layer_gap"),
        ({"layer_gap": "3"}, TypeError, "layer_gap"),
        ({"growth": float("inf")}, ValueError, "growth"),
        ({"growth_rate": -0.1}, ValueError, "growth_rate"),
        ({"spike_factor": 1.0}, ValueError, "spike_factor"),
        ({"clip_fraction": 1.0}, ValueError, "clip_fraction"),
        ({"clip_fraction": True}, TypeError, "clip_fraction"),
        ({"patience": 0}, ValueError, "patience"),
        ({"patience": 2.5}, TypeError, "patience"),
        ({"plateau_threshold": -1e-4}, ValueError, "plateau_threshold"),
        ({"update_ratio": 0.0}, ValueError, "update_ratio"),
        ({"baseline": -1.0}, ValueError, "baseline"),
        ({"baseline": float("nan")}, ValueError, "baseline"),
        ({"baseline_margin": 1.5}, ValueError, "baseline_margin"),
    ],
)
def test_bad_thresholds_name_themselves(kwargs, exc, name):
    with pytest.raises(exc, match=rf"^{name} must be"):
        diagnose(healthy_case(R=20), **kwargs)


def test_bad_histories():
    with pytest.raises(TypeError, match=r"history must be a gradchain History .* no 'steps'"):
        diagnose(SimpleNamespace(param_names=[]))
    h = healthy_case(R=20)
    attrs = dict(h._attrs)
    attrs["loss"] = attrs["loss"][:-1]
    with pytest.raises(ValueError, match=r"^history.loss must have shape \(20,\)"):
        diagnose(StrictHistory(**attrs))
    attrs = dict(h._attrs)
    attrs["log10_update_ratios"] = attrs["log10_update_ratios"][:, :-1]
    with pytest.raises(
        ValueError, match=r"^history.log10_update_ratios must have shape \(20, 12\)"
    ):
        diagnose(StrictHistory(**attrs))
    empty = history(np.zeros((0, 4)), loss=np.zeros(0))
    with pytest.raises(ValueError, match="no recorded steps"):
        diagnose(empty)


# --------------------------------------------------------------------------------------
# the Diagnosis record
# --------------------------------------------------------------------------------------
def test_diagnosis_record():
    d = diagnose(vanishing_case())
    assert isinstance(d, Diagnosis) and d.kind in KINDS
    assert repr(d) == "Diagnosis(kind='vanishing', step=1, layer='0.weight', also=('stuck',))"
    assert "\n" not in repr(d)
    s = str(d)
    assert s.splitlines()[0] == f"vanishing: {d.summary}" and s.count("\n  - ") == len(d.evidence)
    out = json.loads(json.dumps(d.to_dict()))
    assert out["kind"] == "vanishing" and out["also"] == ["stuck"] and out["step"] == 1
    assert out["thresholds"]["layer_gap"] == 3.0 and out["scores"]["growth"] is not None
    page = d._repr_html_()
    assert page.startswith("<div><b>Diagnosis</b><table>") and "0.weight" in page
    assert page.count("<tr>") == 5 + len(d.evidence)  # kind, summary, also, step, layer
    with pytest.raises(AttributeError):
        d.kind = "healthy"  # type: ignore[misc]


def test_nan_and_inf_scores_survive_json():
    d = diagnose(history(np.full((1, 4), -np.inf), loss=[0.5]))
    text = json.dumps(d.to_dict())
    assert "NaN" not in text and "Infinity" not in text


def test_public_names_have_numpy_docstrings():
    for obj in (diagnose, Diagnosis, Diagnosis.to_dict):
        assert "Examples" in obj.__doc__
    for section in ("Parameters", "Returns", "Raises"):
        assert section in diagnose.__doc__
    assert "Attributes" in Diagnosis.__doc__ and diagnose_module.__doc__


@pytest.mark.parametrize("fn", [diagnose, Diagnosis, Diagnosis.to_dict])
def test_docstring_examples_run(fn):
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in finder.find(fn, fn.__name__, globs={}):
        runner.run(test)
    assert runner.failures == 0 and runner.tries > 0


def test_spikes_match_the_plain_definition():
    rng = np.random.default_rng(5)
    for trial in range(20):
        R = int(rng.integers(2, 60))
        loss = np.power(10.0, rng.standard_normal(R))
        loss[rng.integers(0, R, 3)] *= 1e3
        start = np.median(loss[:10])
        want = [
            i
            for i in range(1, R)
            if loss[i] > 10 * np.median(loss[max(0, i - 10) : i]) and loss[i] > start
        ]
        d = diagnose(history(np.full((R, 4), -1.0), loss=loss))
        assert d.scores["spikes"] == len(want), trial
        assert (d.kind == "exploding") == bool(want) or d.scores["growth"] >= 1, trial


# --------------------------------------------------------------------------------------
# real trajectories: small PyTorch runs recorded as a History would record them
# --------------------------------------------------------------------------------------
@oracles._torch_one_thread
def torch_history(depth, activation, *, steps=120, width=16, lr=0.1, seed=0):
    """SGD (momentum 0.9) on a teacher-student task, every step recorded."""
    import torch
    from gradchain import tasks

    data = tasks.teacher_student(512, width, 2, out_features=1, seed=seed)
    x, y = torch.tensor(data.x), torch.tensor(data.y)
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for i in range(depth):
        lin = torch.nn.Linear(width, 1 if i == depth - 1 else width, dtype=torch.float64)
        # every layer from `gen`: torch's global generator is seeded anew in every process
        torch.nn.init.xavier_normal_(lin.weight, generator=gen)
        torch.nn.init.zeros_(lin.bias)
        layers += [lin, activation()] if i < depth - 1 else [lin]
    net = torch.nn.Sequential(*layers)
    names, params = zip(*net.named_parameters())
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    rows = []
    for _ in range(steps):
        idx = torch.randperm(512, generator=gen)[:32]
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(net(x[idx]), y[idx])
        loss.backward()
        before = [p.detach().clone() for p in params]
        opt.step()
        with torch.no_grad():
            g = [float(p.grad.norm()) for p in params]
            w = [float(p.norm()) for p in params]
            u = [
                float((p - b).norm() / b.norm()) if b.norm() > 0 else 0.0
                for p, b in zip(params, before)
            ]
        rows.append((float(loss.detach()), g, w, u))
    with np.errstate(divide="ignore"):
        grads = np.log10([r[1] for r in rows])
        attrs = {
            "log10_param_norms": np.log10([r[2] for r in rows]),
            "log10_update_ratios": np.log10([r[3] for r in rows]),
        }
    h = history(grads, loss=[r[0] for r in rows], names=list(names), lr=lr)
    return StrictHistory(**{**h._attrs, **attrs})


@needs_torch
def test_real_deep_sigmoid_chain_vanishes_and_a_shallow_tanh_one_is_healthy():
    d = diagnose(torch_history(24, lambda: __import__("torch").nn.Sigmoid()))
    assert d.kind == "vanishing" and d.layer == "0.weight" and d.scores["layer_gap"] > 5
    h = diagnose(torch_history(3, lambda: __import__("torch").nn.Tanh()))
    assert h.kind == "healthy" and abs(h.scores["layer_gap"]) < 1.5
    assert h.scores["loss_decades"] > 0.3


@needs_torch
def test_real_run_with_a_too_large_learning_rate_explodes_then_diverges():
    d = diagnose(torch_history(6, lambda: __import__("torch").nn.ReLU(), lr=3.0, steps=200))
    assert d.kind == "diverged" and "exploding" in d.also
