"""The textbook cases of vanishing and exploding gradients, trained for real with
gc.train and told apart by hist.diagnose(): each failure, and the cure that removes it.

Every run is seeded and small (float32, width 32, a few hundred steps, every 5th or 10th
step recorded), so the whole file takes seconds. The README's "The textbook cases" shows
the same runs with their printed diagnoses.
"""

from __future__ import annotations

import re

import gradchain as gc
import numpy as np
import pytest

DEPTH = 30


@pytest.fixture(scope="module")
def teacher():
    """Regression on a random tanh teacher: a net that ignores its inputs scores the
    target variance, data.baseline_loss."""
    return gc.tasks.teacher_student(n=2048, width=32, depth=3, seed=0, dtype="float32")


def mlp(**kw) -> gc.MLP:
    return gc.MLP(depth=DEPTH, width=32, dtype="float32", seed=0, **kw)


def fit(net, data, optimizer, *, steps=300, record_every=5, **kw) -> gc.History:
    return gc.train(net, data, optimizer=optimizer, steps=steps, batch_size=64,
                    record_every=record_every, **kw)  # fmt: skip


def first_step(evidence: str, pattern: str) -> int:
    m = re.search(pattern, evidence)
    assert m, evidence
    return int(m.group(1))


# ---------------------------------------------------------------------------------------
# vanishing: a deep sigmoid chain, and its cure


def test_deep_sigmoid_chain_vanishes_and_gets_stuck(teacher):
    hist = fit(mlp(activation="sigmoid", init="xavier_normal"), teacher, gc.optim.Adam(lr=1e-2))
    d = hist.diagnose(baseline=teacher.baseline_loss)
    assert (d.kind, d.also, d.layer) == ("vanishing", ("stuck",), "0.weight")
    # sigmoid' <= 1/4 per layer: the first layers' gradients lie many decades below the last
    assert d.scores["layer_gap"] > 8
    # Adam rescales small gradients, but not from 1e-13: the first layers' updates round
    # away in float32 and their weights never move
    assert d.scores["update_gap"] == np.inf and d.scores["input_weight_change"] == 0
    assert d.scores["baseline_ratio"] == pytest.approx(1.0, abs=0.05)
    # stuck without the baseline too: a plateau with tiny updates (ReduceLROnPlateau's rule)
    plain = hist.diagnose()
    assert (plain.kind, plain.also) == ("vanishing", ("stuck",))
    assert plain.scores["update_ratio"] < plain.thresholds["update_ratio"]


@pytest.mark.parametrize(
    "norm", [pytest.param(None, id="residual"), pytest.param("layer", id="pre-norm-residual")]
)
def test_relu_he_residual_chain_of_the_same_depth_is_healthy(teacher, norm):
    net = mlp(activation="relu", init="he_normal", residual=True, residual_scale=DEPTH**-0.5,
              norm=norm)  # fmt: skip
    d = fit(net, teacher, gc.optim.Adam(lr=1e-2)).diagnose(baseline=teacher.baseline_loss)
    assert (d.kind, d.also) == ("healthy", ())
    assert abs(d.scores["layer_gap"]) < 1  # every layer gets a gradient of the same size
    assert d.scores["baseline_ratio"] < 0.6  # it learned from its inputs
    assert d.scores["loss_decades"] > 0.5


# ---------------------------------------------------------------------------------------
# a too-large learning rate, and a smaller one


def test_too_large_learning_rate_explodes_then_diverges(teacher):
    net = mlp(activation="relu", init="he_normal", residual=True, residual_scale=DEPTH**-0.5)
    hist = fit(net, teacher, gc.optim.SGD(lr=10.0, momentum=0.9), record_every=1)
    assert hist.stopped == "diverged" and hist.nonfinite is not None
    d = hist.diagnose(baseline=teacher.baseline_loss)
    # the NaN is the finding; the explosion that led to it comes in `also`. Not stuck: the
    # network blew up before it could stall (one untrained step came before the blow-up)
    assert (d.kind, d.also) == ("diverged", ("exploding",))
    assert d.step == hist.nonfinite["step"] == hist.steps_run
    assert d.evidence[0].startswith(f"the {hist.nonfinite['what']} became non-finite")
    # what came first: the loss spiked and the gradient norm grew steps before the NaN
    spike = first_step("\n".join(d.evidence), r"the loss spiked \d+ time\(s\), first at step (\d+)")
    assert spike < d.step
    assert d.scores["growth"] > 3
    finite = hist.loss[np.isfinite(hist.loss)]
    assert finite[-1] > 1e3 * finite[0]


def test_a_smaller_learning_rate_trains_the_same_chain(teacher):
    net = mlp(activation="relu", init="he_normal", residual=True, residual_scale=DEPTH**-0.5)
    hist = fit(net, teacher, gc.optim.SGD(lr=1.0, momentum=0.9))
    d = hist.diagnose(baseline=teacher.baseline_loss)
    assert (d.kind, d.also) == ("healthy", ())
    assert hist.stopped == "completed" and d.scores["spikes"] == 0
    assert d.scores["baseline_ratio"] < 0.5


# ---------------------------------------------------------------------------------------
# recurrent chains on the adding problem


@pytest.fixture(scope="module")
def adding20():
    return gc.tasks.adding_problem(20, batch=4096, seed=0, dtype="float32").to_dataset()


def tanh_rnn(seed=0) -> gc.RNN:
    """Recurrent weights N(0, 1/hidden): a spectral radius about 1, the edge of chaos,
    which SGD pushes the network over."""
    return gc.RNN("tanh", 2, 32, output_size=1, init="normal", dtype="float32", seed=seed)


def test_rnn_without_clipping_explodes(adding20):
    # The spectral radius of weight_hh creeps from 1.1 to 2.4 by step 370; then the gradient
    # bursts and the loss jumps off the cliff (Pascanu, Mikolov and Bengio 2013). Stuck is
    # judged on the 74 recorded steps before: the run had learned nothing.
    hist = fit(tanh_rnn(), adding20, gc.optim.SGD(lr=0.05, momentum=0.9), steps=1000)
    assert hist.stopped == "completed"
    d = hist.diagnose(baseline=adding20.baseline_loss)
    assert (d.kind, d.also) == ("exploding", ("stuck",))
    assert d.scores["spikes"] >= 1 and d.scores["clip_fraction"] == 0
    spike = first_step("\n".join(d.evidence), r"the loss spiked \d+ time\(s\), first at step (\d+)")
    assert d.step == spike
    assert d.scores["baseline_ratio"] > 1


def test_rnn_without_clipping_at_twice_the_rate_diverges(adding20):
    hist = fit(tanh_rnn(), adding20, gc.optim.SGD(lr=0.1, momentum=0.9), steps=1000)
    d = hist.diagnose(baseline=adding20.baseline_loss)
    assert (d.kind, d.also) == ("diverged", ("exploding",))
    assert d.step == hist.nonfinite["step"] and d.scores["growth"] > 3


def test_rnn_with_clipping_is_healthy(adding20):
    hist = fit(tanh_rnn(), adding20, gc.optim.SGD(lr=0.1, momentum=0.9), steps=1000,
               max_norm=1.0)  # fmt: skip
    d = hist.diagnose(baseline=adding20.baseline_loss)
    # Clipping caught the bursts (on a third of the steps) and the run learned the task,
    # to a fifth of the baseline.
    # diagnose() calls clipping on more than clip_fraction=0.5 of the steps "exploding"
    # (a gradient routinely above the cap); here it is below that, so the run is healthy.
    assert (d.kind, d.also) == ("healthy", ())
    assert 0.1 < d.scores["clip_fraction"] < 0.5
    assert d.scores["spikes"] == 0 and d.scores["growth"] < 1
    assert d.scores["baseline_ratio"] < 0.5
    assert hist.clip_coef.min() < 1.0  # it did clip


# ---------------------------------------------------------------------------------------
# long memory: a tanh RNN against an LSTM at T = 100


@pytest.fixture(scope="module")
def adding100():
    return gc.tasks.adding_problem(100, batch=4096, seed=0, dtype="float32").to_dataset()


@pytest.mark.parametrize("cell", ["tanh", "lstm"])
def test_tanh_rnn_stays_at_the_baseline_where_an_lstm_solves_the_adding_problem(adding100, cell):
    # The same optimizer, seed and budget for both; the LSTM's forget gate starts open
    # (sigmoid(2) = 0.88), so that the first marked value survives 50 to 100 steps.
    kw = {"forget_bias": 2.0} if cell == "lstm" else {}
    rnn = gc.RNN(cell, 2, 32, output_size=1, dtype="float32", seed=1, **kw)
    hist = fit(rnn, adding100, gc.optim.Adam(lr=2e-2), steps=1000, record_every=10, seed=1)
    d = hist.diagnose(baseline=adding100.baseline_loss)
    if cell == "tanh":
        # predicting the mean, 1, for every sequence: the variance baseline (about 1/6)
        assert (d.kind, d.also) == ("stuck", ())
        assert d.scores["baseline_ratio"] == pytest.approx(1.0, abs=0.1)
    else:
        assert (d.kind, d.also) == ("healthy", ())
        assert d.scores["baseline_ratio"] < 0.05
