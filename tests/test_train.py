"""gradchain.train: trajectories against a torch loop, histories, divergence, callbacks,
Ctrl-C, reproducibility and bad input."""

from __future__ import annotations

import json
import math
import sys
import types

import gradchain as gc
import numpy as np
import oracles
import pytest
from checks import assert_close, run_python, ticks_while
from conftest import gc_block

RTOL = 1e-9  # float64 parity after 50 steps
STEPS = 50


# The optimizers compared with torch.optim: (gradchain's, torch's) built from the same
# arguments. Adding an optimizer is one entry.
OPTIMIZERS = {
    "sgd": ("SGD", {"lr": 0.05}),
    "sgd-momentum-dampening": ("SGD", {"lr": 0.05, "momentum": 0.9, "dampening": 0.1}),
    "sgd-nesterov-wd": (
        "SGD",
        {"lr": 0.05, "momentum": 0.8, "nesterov": True, "weight_decay": 1e-2},
    ),
    "sgd-maximize": ("SGD", {"lr": 0.01, "weight_decay": 1e-3, "maximize": True}),
    "adam": ("Adam", {"lr": 1e-2}),
    "adam-amsgrad-l2": ("Adam", {"lr": 1e-2, "betas": (0.8, 0.99), "weight_decay": 1e-2, "amsgrad": True}),
    "adamw": ("AdamW", {"lr": 1e-2, "weight_decay": 0.1}),
    "rmsprop-centered-momentum": ("RMSprop", {"lr": 1e-3, "alpha": 0.9, "momentum": 0.5, "centered": True}),
    "rmsprop-wd": ("RMSprop", {"lr": 1e-3, "weight_decay": 1e-2}),
    "adagrad": ("Adagrad", {"lr": 0.05, "lr_decay": 1e-3, "initial_accumulator_value": 0.1}),
}  # fmt: skip


def optimizers(key, params):
    import torch

    name, kw = OPTIMIZERS[key]
    return getattr(gc.optim, name)(**kw), getattr(torch.optim, name)(params, **kw, foreach=False)


def assert_history(h, ref, what):
    """The recorded rows (every step) against the torch loop's per-step values."""
    assert_close(h.loss, ref["loss"], RTOL, f"{what}: loss")
    assert_close(h.lr, ref["lr"], RTOL, f"{what}: lr")
    assert_close(h.total_norm, ref["total_norm"], RTOL, f"{what}: total_norm")
    assert_close(h.clipped_total_norm, ref["clipped_total_norm"], RTOL, f"{what}: clipped")
    assert_close(h.param_grad_norms, ref["param_grad_norms"], RTOL, f"{what}: grad norms")
    assert_close(h.param_norms, ref["param_norms"], RTOL, f"{what}: param norms")
    # ||delta W|| / ||W|| rounds at the level of W: an update at the last bits of W differs
    a, e = h.update_ratios, ref["update_ratios"]
    assert np.array_equal(np.isinf(a), np.isinf(e)), f"{what}: infinite update ratios"
    np.testing.assert_allclose(a[np.isfinite(e)], e[np.isfinite(e)], rtol=1e-7, atol=1e-14,
                               err_msg=f"{what}: update ratios")  # fmt: skip


def assert_params(net, model, what):
    sd = net.state_dict()
    for k, t in model.state_dict().items():
        if k.startswith("readout") or k in sd:
            assert_close(sd[k], t.detach().numpy(), RTOL, f"{what}: {k}")


# ---------------------------------------------------------------------------------------
# chains of rows: an MLP and a chain of blocks against a torch nn.Sequential


def mlp_case(activation="tanh", seed=0, n=96, out=3):
    torch = pytest.importorskip("torch")
    net = gc.MLP(width=[6, 16, 16, out], activation=activation, init="xavier_normal",
                 bias_std=0.1, seed=seed)  # fmt: skip
    mods = []
    for a, b in zip(net.widths[:-1], net.widths[1:]):
        mods += [
            torch.nn.Linear(a, b, dtype=torch.float64),
            {"tanh": torch.nn.Tanh(), "relu": torch.nn.ReLU()}[activation],
        ]
    model = torch.nn.Sequential(*mods)
    model.load_state_dict({k: torch.as_tensor(a) for k, a in net.state_dict().items()})
    rng = np.random.default_rng(seed + 1)
    x = rng.standard_normal((n, 6))
    y = np.tanh(x @ rng.standard_normal((6, out)))
    return net, model, x, y


def torch_rows_loop(model, x, y, loss, order, opt, **kw):
    import torch
    import torch.nn.functional as F

    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    fn = F.cross_entropy if loss == "cross_entropy" else F.mse_loss
    params = list(model.parameters())
    return oracles.torch_train_loop(lambda i: fn(model(xt[i]), yt[i]), params, order, opt, **kw)


@pytest.mark.parametrize("key", sorted(OPTIMIZERS))
def test_mlp_matches_torch(key):
    net, model, x, y = mlp_case()
    opt, topt = optimizers(key, list(model.parameters()))
    h = gc.train(net, (x, y), optimizer=opt, steps=STEPS, batch_size=16, seed=3)
    ref = torch_rows_loop(model, x, y, "mse", gc.tasks.batch_order(96, 16, STEPS, 3), topt)
    assert h.stopped == "completed" and h.steps_run == STEPS
    assert_history(h, ref, key)
    assert_params(net, model, key)


@pytest.mark.parametrize(
    "clip",
    [{"max_norm": 0.5}, {"max_norm": 0.3, "norm_type": 1.0}, {"max_norm": 0.05, "norm_type": "inf"},
     {"clip_value": 0.02}, {"max_weight_norm": 0.9}, {"max_norm": 0.5, "max_weight_norm": 1.2}],
    ids=["norm2", "norm1", "norminf", "value", "maxnorm", "norm2+maxnorm"],
)  # fmt: skip
def test_mlp_clipping_matches_torch(clip):
    net, model, x, y = mlp_case("relu", seed=4)
    opt, topt = optimizers("sgd-momentum-dampening", list(model.parameters()))
    h = gc.train(net, (x, y), optimizer=opt, steps=STEPS, batch_size=16, seed=1, **clip)
    kw = dict(clip)
    if kw.get("norm_type") == "inf":
        kw["norm_type"] = math.inf
    ref = torch_rows_loop(model, x, y, "mse", gc.tasks.batch_order(96, 16, STEPS, 1), topt, **kw)
    assert_history(h, ref, str(clip))
    assert_params(net, model, str(clip))
    if "max_norm" in clip:
        assert (h.clip_coef < 1).any() and np.all(h.clip_coef <= 1)
        coef = np.minimum(1.0, clip["max_norm"] / (h.total_norm + 1e-6))
        assert_close(h.clip_coef, coef, 1e-12, "clip_coef")
    if "max_weight_norm" in clip:
        for _, w in net.named_parameters():
            if w.ndim == 2:
                assert np.linalg.norm(w, axis=1).max() <= clip["max_weight_norm"] * (1 + 1e-12)


def block_descs():
    lin = lambda a, b, bias=True: {"kind": "linear", "in": a, "out": b, "bias": bias}
    act = lambda name: {"kind": "activation", "name": name, "negative_slope": 0.01, "alpha": 1.0}
    bn = {
        "kind": "batch_norm",
        "n": 12,
        "eps": 1e-5,
        "momentum": 0.1,
        "affine": True,
        "track": True,
    }
    ln = {"kind": "layer_norm", "n": 12, "eps": 1e-5, "affine": True, "bias": True}
    res = {"kind": "residual", "scale": 0.7, "shortcut": None,
           "body": [dict(ln), lin(12, 20), act("gelu"), lin(20, 12)]}  # fmt: skip
    res2 = {"kind": "residual", "scale": 1.0, "shortcut": lin(12, 8, False),
            "body": [dict(bn), act("relu"), lin(12, 8)]}  # fmt: skip
    return [lin(5, 12), dict(bn), act("tanh"), res, res2, act("tanh"), lin(8, 4)]


@pytest.mark.parametrize("key", ["sgd-momentum-dampening", "sgd-nesterov-wd"])
def test_chain_of_blocks_with_batchnorm_matches_torch(key):
    torch = pytest.importorskip("torch")
    descs = block_descs()
    net = gc.Chain([gc_block(d) for d in descs], init="he_normal", bias_std=0.05, seed=2)
    model = oracles.torch_chain(descs, net.state_dict(), train=True)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((80, 5))
    y = rng.integers(0, 4, 80)
    opt, topt = optimizers(key, list(model.parameters()))
    h = gc.train(net, (x, y), optimizer=opt, steps=STEPS, batch_size=10, seed=7, max_norm=1.0,
                 record_activation_grads=True)  # fmt: skip
    ref = torch_rows_loop(model, x, y, "cross_entropy", gc.tasks.batch_order(80, 10, STEPS, 7),
                          topt, max_norm=1.0)  # fmt: skip
    assert h.param_names == tuple(n for n, _ in model.named_parameters())
    assert_history(h, ref, key)
    sd = net.state_dict()  # running statistics and num_batches_tracked too
    for k, t in model.state_dict().items():
        assert_close(sd[k], t.detach().numpy(), RTOL, k)
    assert int(sd["1.num_batches_tracked"]) == STEPS
    assert h.activation_names == net.activation_names
    assert h.log10_activation_grad_norms.shape == (STEPS, len(descs) + 1)
    # the last step's boundary norms are those of a backward pass on the same batch
    del torch


def test_chain_from_torch_keeps_torch_parameter_order():
    """A model whose modules are registered in another order than its forward calls them:
    the history and the optimizer follow named_parameters()."""
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.out = nn.Linear(8, 2, dtype=torch.float64)
            self.inp = nn.Linear(3, 8, dtype=torch.float64)

        def forward(self, x):
            return self.out(torch.tanh(self.inp(x)))

    torch.manual_seed(0)
    model = Net()
    net = gc.Chain.from_torch(model)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((40, 3)), rng.standard_normal((40, 2))
    opt, topt = optimizers("sgd-momentum-dampening", list(model.parameters()))
    h = gc.train(net, (x, y), optimizer=opt, steps=20, batch_size=8)
    ref = torch_rows_loop(model, x, y, "mse", gc.tasks.batch_order(40, 8, 20, 0), topt)
    assert h.param_names == ("out.weight", "out.bias", "inp.weight", "inp.bias")
    assert_history(h, ref, "from_torch")
    assert_params(net, model, "from_torch")


def test_second_call_continues_with_the_optimizer_state():
    net, model, x, y = mlp_case(seed=1)
    opt, topt = optimizers("sgd-nesterov-wd", list(model.parameters()))
    h1 = gc.train(net, (x, y), optimizer=opt, steps=20, batch_size=12, seed=1)
    h2 = gc.train(net, (x, y), optimizer=opt, steps=15, batch_size=12, seed=2)
    order = np.concatenate(
        [gc.tasks.batch_order(96, 12, 20, 1), gc.tasks.batch_order(96, 12, 15, 2)]
    )
    ref = torch_rows_loop(model, x, y, "mse", order, topt)
    assert_close(np.concatenate([h1.loss, h2.loss]), ref["loss"], RTOL, "loss")
    assert_params(net, model, "two calls")
    with pytest.raises(ValueError, match="float64"):
        gc.train(gc.MLP(width=[6, 16, 16, 3], dtype="float32"), (x.astype("float32"), y.astype("float32")),
                 optimizer=opt, steps=1)  # fmt: skip


# ---------------------------------------------------------------------------------------
# recurrent chains with truncated backpropagation through time


def rnn_case(cell, layers, loss, every, T=12, n=48, seed=0):
    torch = pytest.importorskip("torch")
    out = 3
    rnn = gc.RNN(cell, 2, 6, layers, output_size=out, seed=seed)
    mod = {"tanh": torch.nn.RNN, "relu": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[
        cell
    ]
    kw = {"nonlinearity": cell} if cell in ("tanh", "relu") else {}
    model = mod(2, 6, layers, dtype=torch.float64, **kw)
    readout = torch.nn.Linear(6, out, dtype=torch.float64)
    sd = rnn.state_dict()
    model.load_state_dict(
        {k: torch.as_tensor(a) for k, a in sd.items() if not k.startswith("readout")}
    )
    readout.load_state_dict(
        {k[8:]: torch.as_tensor(a) for k, a in sd.items() if k.startswith("readout")}
    )
    rng = np.random.default_rng(seed + 10)
    x = rng.standard_normal((T, n, 2))
    if loss == "cross_entropy":
        y = rng.integers(0, out, (T, n) if every else (n,))
    else:
        y = rng.standard_normal((T, n, out) if every else (n, out))
    data = types.SimpleNamespace(x=x, y=y, loss=loss, batch_axis=1)
    return rnn, model, readout, data


RNN_CASES = [
    ("tanh", 1, "mse", False, 4, "detach"),
    ("relu", 2, "cross_entropy", True, 5, "detach"),
    ("lstm", 2, "mse", False, 5, "detach"),
    ("lstm", 1, "mse", False, 5, "window"),
    ("gru", 2, "cross_entropy", True, 3, "detach"),
    ("gru", 1, "mse", False, 4, "window"),
    ("lstm", 1, "cross_entropy", True, None, "detach"),
]


@pytest.mark.parametrize("cell,layers,loss,every,k,mode", RNN_CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}-{'every' if c[3] else 'last'}-{c[5]}{c[4]}" for c in RNN_CASES])  # fmt: skip
def test_rnn_matches_torch(cell, layers, loss, every, k, mode):
    torch = pytest.importorskip("torch")
    rnn, model, readout, data = rnn_case(cell, layers, loss, every)
    params = list(model.parameters()) + list(readout.parameters())
    opt, topt = optimizers("sgd-momentum-dampening", params)
    h = gc.train(rnn, data, optimizer=opt, steps=STEPS, batch_size=8, truncate=k,
                 truncate_mode=mode, max_norm=2.0, seed=4)  # fmt: skip
    xt, yt = torch.as_tensor(data.x), torch.as_tensor(data.y)

    def step_loss(i):
        return oracles.torch_sequence_loss(model, readout, xt[:, i], yt[:, i] if every else yt[i],
                                           loss, k, mode)  # fmt: skip

    ref = oracles.torch_train_loop(step_loss, params, gc.tasks.batch_order(48, 8, STEPS, 4), topt,
                                   max_norm=2.0)  # fmt: skip
    assert h.param_names == rnn.param_names
    assert_history(h, ref, cell)
    assert_params(rnn, model, cell)
    sd = rnn.state_dict()
    assert_close(sd["readout.weight"], readout.weight.detach().numpy(), RTOL, "readout")


def test_rnn_on_the_adding_problem_with_clipping_by_value():
    torch = pytest.importorskip("torch")
    task = gc.tasks.adding_problem(20, batch=64, seed=0)
    rnn = gc.RNN("lstm", 2, 8, output_size=1, seed=1)
    model = torch.nn.LSTM(2, 8, dtype=torch.float64)
    readout = torch.nn.Linear(8, 1, dtype=torch.float64)
    sd = rnn.state_dict()
    model.load_state_dict(
        {k: torch.as_tensor(a) for k, a in sd.items() if not k.startswith("readout")}
    )
    readout.load_state_dict(
        {k[8:]: torch.as_tensor(a) for k, a in sd.items() if k.startswith("readout")}
    )
    params = list(model.parameters()) + list(readout.parameters())
    opt, topt = optimizers("sgd-momentum-dampening", params)
    h = gc.train(rnn, task, optimizer=opt, steps=30, batch_size=16, truncate=10, clip_value=0.05)
    xt, yt = torch.as_tensor(task.x), torch.as_tensor(task.target)
    ref = oracles.torch_train_loop(
        lambda i: oracles.torch_sequence_loss(model, readout, xt[:, i], yt[i], "mse", 10),
        params, gc.tasks.batch_order(64, 16, 30, 0), topt, clip_value=0.05,
    )  # fmt: skip
    assert_history(h, ref, "adding")
    assert (h.clip_coef < 1).any()
    assert_close(h.clip_coef, h.clipped_total_norm / h.total_norm, 1e-12, "value clip coef")


# ---------------------------------------------------------------------------------------
# histories


def small_run(**kw):
    net = gc.MLP(width=[4, 8, 8, 2], activation="tanh", seed=0)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((64, 4)), rng.standard_normal((64, 2))
    args = {"optimizer": gc.optim.SGD(lr=0.1), "steps": 10, "batch_size": 8, **kw}
    return net, x, y, gc.train(net, (x, y), **args)


def test_history_shapes_thinning_and_last_step():
    _, _, _, h = small_run(steps=10, record_every=3, record_activation_grads=True)
    assert h.steps.tolist() == [3, 6, 9, 10]
    assert h.steps.dtype == np.int64 and len(h) == 4 and h.steps_run == 10
    P = 6
    for name in ("param_grad_norms", "param_norms", "update_ratios"):
        assert getattr(h, name).shape == (4, P)
        assert getattr(h, f"log10_{name}").shape == (4, P)
    for name in ("loss", "log10_loss", "total_norm", "clipped_total_norm", "clip_coef", "lr"):
        assert getattr(h, name).shape == (4,)
    assert h.activation_names == ("input", "1", "3", "5")  # the MLP's layer outputs
    assert h.log10_activation_grad_norms.shape == (4, 4)
    assert h.val_loss is None and h.nonfinite is None and h.stopped == "completed"
    assert h.param_names == ("0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias")
    assert h.record_every == 3 and h.batch_size == 8 and h.seed == 0
    assert h.optimizer == repr(gc.optim.SGD(lr=0.1))
    with pytest.raises(ValueError, match="read-only"):
        h.log10_param_grad_norms[0, 0] = 1.0
    with pytest.raises(ValueError, match="read-only"):
        h.loss[0] = 1.0
    assert "steps_run=10" in repr(h) and "\n" not in repr(h)
    assert "<table>" in h._repr_html_()


def test_history_log10_and_floats_agree():
    _, _, _, h = small_run(max_norm=0.1, record_activation_grads=True)
    for name in ("total_norm", "clipped_total_norm", "clip_coef", "param_grad_norms",
                 "param_norms", "update_ratios", "activation_grad_norms"):  # fmt: skip
        lg, f = getattr(h, f"log10_{name}"), getattr(h, name)
        assert np.array_equal(np.isinf(lg), np.isinf(f) | (f == 0)), name  # 0 -> -inf, inf -> inf
        ok = np.isfinite(lg)
        np.testing.assert_allclose(np.log10(f[ok]), lg[ok], rtol=0, atol=1e-13, err_msg=name)
    assert_close(np.log10(h.loss), h.log10_loss, 1e-13, "loss")
    assert_close(h.clipped_total_norm, h.total_norm * h.clip_coef, 1e-13, "clipped")
    assert (h.clip_coef < 1).all()


def test_update_ratios_and_param_norms_against_numpy():
    net = gc.MLP(width=[4, 8, 2], activation="tanh", bias_std=0.2, seed=0)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((32, 4)), rng.standard_normal((32, 2))
    opt = gc.optim.SGD(lr=0.3, momentum=0.5)
    for _ in range(3):
        before = [np.array(w) for _, w in net.named_parameters()]
        h = gc.train(net, (x, y), optimizer=opt, steps=1, batch_size=8)
        after = [np.array(w) for _, w in net.named_parameters()]
        ratio = [np.linalg.norm(a - b) / np.linalg.norm(b) for a, b in zip(after, before)]
        assert_close(h.update_ratios[0], ratio, 1e-13, "update ratios")
        assert_close(h.param_norms[0], [np.linalg.norm(a) for a in after], 1e-14, "norms")


def test_zero_weights_give_infinite_ratio_and_unchanged_ones_zero():
    net = gc.MLP(width=[3, 4, 2], activation="relu", seed=0)  # zero biases
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((16, 3)), rng.standard_normal((16, 2))
    h = gc.train(net, (x, y), optimizer=gc.optim.SGD(lr=0.1), steps=1, batch_size=16)
    assert np.isposinf(h.log10_update_ratios[0, 1])  # the bias moved off zero
    # a target the chain already meets: zero gradients, no update
    h = gc.train(net, (x, net.forward(x)), optimizer=gc.optim.SGD(lr=0.1), steps=1, batch_size=16)
    assert np.isneginf(h.log10_update_ratios[0]).all()


def test_history_to_dict_pandas_xarray_and_diagnose(monkeypatch):
    _, _, _, h = small_run(record_activation_grads=True)
    d = h.to_dict()
    json.dumps(d)
    assert d["steps"] == list(range(1, 11)) and d["stopped"] == "completed"
    assert len(d["update_ratios"]) == 10 and len(d["update_ratios"][0]) == 6
    try:
        import pandas  # noqa: F401
    except ImportError:  # optional: only the message when it is missing is checked below
        pass
    else:
        df = h.to_pandas()
        assert list(df.index) == list(range(1, 11)) and df.index.name == "step"
        assert np.array_equal(df["loss"].to_numpy(), h.loss)
        assert np.array_equal(
            df["log10_param_grad_norms[2.weight]"].to_numpy(), h.log10_param_grad_norms[:, 2]
        )
    monkeypatch.setitem(sys.modules, "pandas", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "xarray", None)
    with pytest.raises(ImportError, match="pip install pandas"):
        h.to_pandas()
    with pytest.raises(ImportError, match="pip install xarray"):
        h.to_xarray()
    monkeypatch.undo()
    try:
        import xarray  # noqa: F401
    except ImportError:
        pass
    else:
        ds = h.to_xarray()
        assert ds["log10_param_grad_norms"].shape == (10, 6)
    assert h.diagnose().kind in ("healthy", "vanishing", "exploding", "stuck", "diverged")


def test_validation_loss_every_recorded_row():
    net = gc.Chain(
        [gc.Linear(4, 8), gc.BatchNorm(8), gc.Activation("tanh"), gc.Linear(8, 2)], seed=0
    )
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((64, 4)), rng.standard_normal((64, 2))
    xv, yv = rng.standard_normal((1500, 4)), rng.standard_normal((1500, 2))  # two chunks
    data = types.SimpleNamespace(x=x, y=y, loss="mse", x_val=xv, y_val=yv)
    h = gc.train(net, data, optimizer=gc.optim.SGD(lr=0.05), steps=7, batch_size=8, record_every=2)
    assert h.val_loss.shape == (4,) and np.isfinite(h.val_loss).all()
    # eval mode, the weights after the row's step; the running statistics were not touched
    state = net.state_dict()
    expect = net.backward(xv, yv, train=False).loss
    assert_close(h.val_loss[-1], expect, 1e-13, "val_loss")
    assert int(state["1.num_batches_tracked"]) == 7


# ---------------------------------------------------------------------------------------
# divergence, callbacks, interruption


def exploding_run(lr=1e3, **kw):
    net = gc.MLP(depth=6, width=16, activation="relu", init="he_normal", bias_std=0.1, seed=0)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((64, 16)), rng.standard_normal((64, 16))
    before = net.state_dict()
    h = gc.train(
        net, (x, y), optimizer=gc.optim.SGD(lr=lr, momentum=0.9), steps=200, batch_size=16, **kw
    )
    return net, before, h


def test_divergence_is_reported():
    net, _, h = exploding_run()
    assert h.stopped == "diverged"
    nf = h.nonfinite
    assert nf["what"] in ("loss", "gradient", "weight") and nf["step"] == h.steps_run == h.steps[-1]
    assert isinstance(nf["where"], str) and nf["where"] and nf["message"]
    if nf["what"] != "loss":
        assert h.param_names[nf["index"]] == nf["where"]
    assert h.steps_run < 200
    assert np.isfinite(h.loss[:-1]).all()
    # the chain keeps the (finite) weights of the last step run
    assert all(np.isfinite(w).all() for _, w in net.named_parameters())
    last = h.log10_param_norms[-2] if nf["what"] == "weight" else h.log10_param_norms[-1]
    assert_close(
        [np.log10(np.linalg.norm(w)) for _, w in net.named_parameters()], last, 1e-13, "kept"
    )


def test_nonfinite_gradient_and_weight():
    # a loss beyond the float range whose gradient overflows
    _, _, h = exploding_run(lr=1e6)
    assert h.stopped == "diverged" and h.nonfinite["what"] == "gradient"
    assert h.nonfinite["where"] == h.param_names[h.nonfinite["index"]]
    assert np.isnan(h.update_ratios[-1]).all()
    # an update that overflows float32: the chain keeps the weights from before the step
    net = gc.MLP(width=[4, 8, 2], activation="tanh", dtype="float32", seed=0)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((32, 4)).astype("float32"), np.full((32, 2), 100.0, "float32")
    before = net.state_dict()
    h = gc.train(net, (x, y), optimizer=gc.optim.SGD(lr=3e38), steps=5, batch_size=8)
    assert h.stopped == "diverged" and h.steps_run == 1
    assert h.nonfinite == {
        "step": 1, "what": "weight", "where": "0.weight", "index": 0,
        "message": "the update of step 1 made 0.weight non-finite (the weights of step 0 are kept)",
    }  # fmt: skip
    assert np.isposinf(h.log10_param_norms[0, 0]) and np.isfinite(h.loss).all()
    for k, a in net.state_dict().items():
        assert np.array_equal(a, before[k]), k


def test_error_if_nonfinite_raises_with_the_history():
    _, _, h = exploding_run()
    with pytest.raises(gc.NonFiniteError, match="diverged at step") as info:
        exploding_run(error_if_nonfinite=True)
    assert info.value.history.nonfinite == h.nonfinite
    assert info.value.index == h.nonfinite["step"]


def test_chain_nonfinite_error_counts_as_diverged():
    # a forward pass that overflows: the chain's own NonFiniteError
    net = gc.MLP(depth=200, width=8, activation="linear", gain=1e3, bias_std=1.0, seed=4)
    x = np.random.default_rng(0).normal(size=(8, 8))
    h = gc.train(net, (x, np.zeros((8, 8))), optimizer=gc.optim.SGD(lr=0.1), steps=5, batch_size=4)
    assert h.stopped == "diverged" and h.steps_run == 1 and len(h) == 1
    assert h.nonfinite["what"] == "loss" and h.nonfinite["where"].startswith("block")
    assert np.isnan(h.loss[0]) and np.isnan(h.update_ratios[0]).all()


def test_callback_stops_the_run_and_sees_the_history():
    seen = []

    def cb(step, hist):
        seen.append((step, len(hist), hist.steps[-1]))
        return step >= 6

    _, _, _, h = small_run(steps=20, record_every=2, callback=cb)
    assert seen == [(2, 1, 2), (4, 2, 4), (6, 3, 6)]
    assert h.stopped == "callback" and h.steps_run == 6 and h.steps.tolist() == [2, 4, 6]


def test_callback_exception_carries_the_history():
    def cb(step, hist):
        if step == 3:
            raise RuntimeError("enough")

    with pytest.raises(RuntimeError, match="enough") as info:
        small_run(callback=cb)
    assert info.value.history.steps.tolist() == [1, 2, 3]
    with pytest.raises(TypeError, match="callback"):
        small_run(callback=3)


def test_ctrl_c_stops_with_the_history():
    code = """
        import os, signal, threading, time
        import numpy as np, gradchain as gc
        net = gc.MLP(depth=20, width=64, activation="tanh", seed=0)
        x = np.random.default_rng(0).standard_normal((512, 64))
        threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
        t0 = time.perf_counter()
        try:
            gc.train(net, (x, np.tanh(x)), optimizer=gc.optim.SGD(lr=0.01), steps=10**9,
                     record_every=10**6, batch_size=64)
            print("not interrupted")
        except KeyboardInterrupt as exc:
            h = exc.history
            print("interrupted", time.perf_counter() - t0, h.stopped, h.steps_run, len(h),
                  h.steps[-1] == h.steps_run)
        print("after", np.isfinite(net.backward(x[:2]).log10_total_norm))
    """
    out = run_python(code).split()
    assert out[0] == "interrupted", out
    assert float(out[1]) < 0.3 + 1.5
    assert out[2] == "interrupted" and int(out[3]) > 0 and out[4] == "1" and out[5] == "True"
    assert out[-2:] == ["after", "True"]


def test_reproducible_for_any_thread_count():
    code = """
        import hashlib, numpy as np, gradchain as gc
        def digest(*arrays):
            return hashlib.sha256(b"".join(np.ascontiguousarray(a).tobytes() for a in arrays)).hexdigest()[:16]
        rng = np.random.default_rng(0)
        x = rng.standard_normal((256, 64)); y = np.tanh(x[:, :8])
        net = gc.MLP(width=[64, 256, 256, 8], activation="gelu", norm="batch", seed=1)
        h = gc.train(net, (x, y), optimizer=gc.optim.SGD(lr=0.05, momentum=0.9), steps=20,
                     batch_size=64, max_norm=1.0, record_activation_grads=True)
        print(digest(*[w for _, w in net.named_parameters()]), digest(h.log10_param_grad_norms,
              h.loss, h.log10_update_ratios, h.log10_activation_grad_norms))
        # every optimizer, and the max-norm constraint (the parameters' updates run on two
        # threads where there are enough of them)
        for opt, extra in ((gc.optim.AdamW(lr=1e-2, amsgrad=True, weight_decay=0.1), {}),
                           (gc.optim.RMSprop(lr=1e-3, centered=True, momentum=0.5), {}),
                           (gc.optim.Adagrad(lr=0.1, lr_decay=0.01), {"max_weight_norm": 1.5})):
            net = gc.MLP(width=[64, 128, 128, 8], activation="tanh", seed=2)
            h = gc.train(net, (x, y), optimizer=opt, steps=6, batch_size=32, **extra)
            print(digest(*[w for _, w in net.named_parameters()]), digest(h.log10_update_ratios))
        task = gc.tasks.adding_problem(40, batch=128, seed=0)
        rnn = gc.RNN("lstm", 2, 64, output_size=1, seed=0)
        h = gc.train(rnn, task, optimizer=gc.optim.SGD(lr=0.1), steps=5, batch_size=64, truncate=15)
        print(digest(*[w for _, w in rnn.named_parameters()]), digest(h.log10_param_grad_norms, h.loss))
    """
    one = run_python(code, env={"OMP_NUM_THREADS": "1"})
    two = run_python(code, env={"OMP_NUM_THREADS": "2"})
    assert one.splitlines() == two.splitlines() and len(one.splitlines()) == 5


# ---------------------------------------------------------------------------------------
# the sampler


def test_batch_order_is_a_permutation_per_epoch():
    order = gc.tasks.batch_order(10, 3, 9, seed=5)
    assert order.shape == (9, 3) and order.dtype == np.int64
    for e in range(3):  # 3 batches per epoch, the 10th example dropped
        epoch = order[3 * e : 3 * e + 3].ravel()
        assert len(set(epoch.tolist())) == 9
    assert not np.array_equal(order[:3], order[3:6])
    assert np.array_equal(order, gc.tasks.batch_order(10, 3, 9, seed=5))
    assert not np.array_equal(order, gc.tasks.batch_order(10, 3, 9, seed=6))
    plain = gc.tasks.batch_order(10, 3, 4, shuffle=False)
    assert plain.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [0, 1, 2]]
    counts = np.bincount(gc.tasks.batch_order(7, 7, 2000, seed=1)[:, 0], minlength=7)
    assert counts.min() > 200  # every example leads an epoch about 1/7 of the time


def test_the_run_uses_the_batch_order():
    net = gc.MLP(width=[3, 5, 2], activation="tanh", seed=0)
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((20, 3)), rng.standard_normal((20, 2))
    for shuffle in (False, True):  # lr = 1e-300: the weights stay as they are, to rounding
        h = gc.train(net, (x, y), optimizer=gc.optim.SGD(lr=1e-300), steps=6, batch_size=6, seed=9,
                     shuffle=shuffle)  # fmt: skip
        order = gc.tasks.batch_order(20, 6, 6, seed=9, shuffle=shuffle)
        losses = [net.backward(x[i], y[i]).loss for i in order]
        assert_close(h.loss, losses, 1e-14, "losses on the sampled batches")


# ---------------------------------------------------------------------------------------
# bad input


def test_bad_input_names_the_argument():
    net = gc.MLP(width=[4, 8, 2], seed=0)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((32, 4)), rng.standard_normal((32, 2))
    sgd = gc.optim.SGD(lr=0.1)

    def run(net=net, data=(x, y), **kw):
        args = {"optimizer": sgd, "steps": 2, "batch_size": 8, **kw}
        return gc.train(net, data, **args)

    with pytest.raises(ValueError, match="batch_size=40 is larger than the 32"):
        run(batch_size=40)
    with pytest.raises(ValueError, match=r"data\.x must have shape"):
        run(data=(x[:, :3], y))
    with pytest.raises(ValueError, match=r"data.y for loss='mse' must have shape \(32, 2\)"):
        run(data=(x, y[:, :1]))
    with pytest.raises(TypeError, match="float targets"):
        run(data=(x, np.ones((32, 2), dtype=np.int64)), loss="mse")
    with pytest.raises(TypeError, match="integer class labels"):
        run(data=(x, y[:, 0]), loss="cross_entropy")
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        run(data=(x, np.full(32, 5)))
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        run(steps=0)
    with pytest.raises(TypeError, match="steps must be a positive integer"):
        run(steps=2.5)
    with pytest.raises(ValueError, match="record_every must be a positive integer"):
        run(record_every=0)
    with pytest.raises(ValueError, match="max_norm or clip_value, not both"):
        run(max_norm=1.0, clip_value=0.1)
    with pytest.raises(ValueError, match="max_norm must be a non-negative"):
        run(max_norm=-1.0)
    with pytest.raises(ValueError, match="max_weight_norm must be a finite"):
        run(max_weight_norm=math.inf)
    with pytest.raises(ValueError, match="norm_type"):
        run(norm_type=0)
    with pytest.raises(ValueError, match=r"truncate applies to gc\.RNN"):
        run(truncate=5)
    with pytest.raises(ValueError, match="loss must be one of"):
        run(loss="probe")
    with pytest.raises(TypeError, match="optimizer must be a gradchain optimizer"):
        run(optimizer="sgd")
    with pytest.raises(TypeError, match="scheduler must be"):
        run(scheduler=0.1)
    with pytest.raises(TypeError, match=r"net must be a gc\.MLP"):
        run(net="mlp")
    with pytest.raises(TypeError, match="data must be"):
        run(data=x)
    with pytest.raises(ValueError, match="contains NaN"):
        run(data=(np.full((32, 4), np.nan), y))
    with pytest.raises(ValueError, match=r"x_val and data\.y_val"):
        run(data=types.SimpleNamespace(x=x, y=y, loss="mse", x_val=x, y_val=None))
    with pytest.raises(TypeError, match="seed"):
        run(seed=-0.5)
    with pytest.raises(ValueError, match="at least 2"):
        run(net=gc.MLP(width=[4, 8, 2], norm="batch", seed=0), batch_size=1)
    with pytest.raises(ValueError, match="nesterov"):
        gc.optim.SGD(lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="lr must be a finite number"):
        gc.optim.SGD(lr=-1.0)
    rnn = gc.RNN("gru", 4, 6, output_size=2, seed=0)
    seqs = rng.standard_normal((5, 32, 4))
    with pytest.raises(ValueError, match="batch_axis must be 1"):
        run(net=rnn, data=types.SimpleNamespace(x=seqs, y=y, loss="mse", batch_axis=0))
    with pytest.raises(ValueError, match="truncate must be a positive integer"):
        run(net=rnn, data=(seqs, y), truncate=0, optimizer=gc.optim.SGD())
    with pytest.raises(ValueError, match="truncate_mode must be one of"):
        run(net=rnn, data=(seqs, y), truncate=2, truncate_mode="cut", optimizer=gc.optim.SGD())
    with pytest.raises(ValueError, match=r"must have shape \(32, 2\) or \(5, 32, 2\)"):
        run(net=rnn, data=(seqs, y[:, :1]), optimizer=gc.optim.SGD())


def test_history_memory_is_checked_before_the_run(monkeypatch):
    monkeypatch.setenv("GRADCHAIN_MEMORY_LIMIT", str(10**8))
    net = gc.MLP(width=[4, 8, 2], seed=0)
    x, y = np.ones((32, 4)), np.ones((32, 2))
    with pytest.raises(MemoryError, match=r"training run .* bytes"):
        gc.train(net, (x, y), optimizer=gc.optim.SGD(), steps=10**7, batch_size=8)


# ---------------------------------------------------------------------------------------
# schedules, the GIL, float32, recurrent boundaries


SCHEDULES = {
    "step": ("StepLR", {"step_size": 7, "gamma": 0.5}),
    "exponential": ("ExponentialLR", {"gamma": 0.9}),
    "cosine": ("CosineAnnealingLR", {"T_max": 12, "eta_min": 1e-3}),
    "linear-warmup": ("LinearLR", {"start_factor": 0.1, "end_factor": 1.0, "total_iters": 8}),
    "plateau": ("ReduceLROnPlateau", {"factor": 0.5, "patience": 2, "threshold": 0.05}),
}


@pytest.mark.parametrize("key", sorted(SCHEDULES))
def test_scheduler_sets_the_learning_rate(key):
    torch = pytest.importorskip("torch")
    net, model, x, y = mlp_case(seed=2)
    opt, topt = optimizers("sgd-momentum-dampening", list(model.parameters()))
    name, kw = SCHEDULES[key]
    sched = getattr(gc.optim.lr_scheduler, name)(**kw)
    tsched = getattr(torch.optim.lr_scheduler, name)(topt, **kw)
    h = gc.train(net, (x, y), optimizer=opt, steps=20, batch_size=16, scheduler=sched)
    ref = torch_rows_loop(model, x, y, "mse", gc.tasks.batch_order(96, 16, 20, 0), topt,
                          scheduler=tsched)  # fmt: skip
    assert_history(h, ref, f"scheduler {key}")
    assert_params(net, model, f"scheduler {key}")
    assert len(set(np.round(h.lr, 12).tolist())) > 1, "the schedule never changed the rate"


def test_the_gil_is_released_during_a_run():
    net = gc.MLP(depth=10, width=64, activation="tanh", seed=0)
    x = np.random.default_rng(0).standard_normal((256, 64))
    ticks = ticks_while(
        lambda: gc.train(net, (x, np.tanh(x)), optimizer=gc.optim.SGD(lr=0.01), steps=300)
    )
    assert ticks > 20


def test_float32_runs_close_to_float64():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((64, 5)), rng.standard_normal((64, 3))
    hists = []
    for dt in ("float64", "float32"):
        net = gc.MLP(width=[5, 16, 3], activation="tanh", dtype=dt, seed=0)
        hists.append(gc.train(net, (x.astype(dt), y.astype(dt)), optimizer=gc.optim.SGD(lr=0.1),
                              steps=10, batch_size=16, max_norm=0.5, max_weight_norm=1.0))  # fmt: skip
    np.testing.assert_allclose(hists[1].loss, hists[0].loss, rtol=1e-4)
    np.testing.assert_allclose(hists[1].param_grad_norms, hists[0].param_grad_norms, rtol=1e-3)


def test_rnn_records_every_state_gradient():
    rnn = gc.RNN("gru", 2, 5, num_layers=2, output_size=1, seed=0)
    task = gc.tasks.adding_problem(6, batch=16, seed=0)
    h = gc.train(rnn, task, optimizer=gc.optim.SGD(lr=0.1), steps=3, batch_size=8,
                 record_activation_grads=True)  # fmt: skip
    assert h.activation_names[:2] == ("l0.h0", "l0.h1") and h.activation_names[-1] == "l1.h6"
    assert h.log10_activation_grad_norms.shape == (3, 14)
    assert np.isfinite(h.log10_activation_grad_norms).all()


def test_keyboard_interrupt_in_a_callback_is_an_interrupted_run():
    def cb(step, hist):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as info:
        small_run(callback=cb)
    assert info.value.history.stopped == "interrupted" and info.value.history.steps_run == 2


def test_rnn_validation_loss():
    rnn = gc.RNN("lstm", 2, 4, output_size=1, seed=0)
    task = gc.tasks.adding_problem(8, batch=40, seed=0)
    val = gc.tasks.adding_problem(8, batch=30, seed=1)
    data = types.SimpleNamespace(x=task.x, y=task.target, loss="mse", batch_axis=1,
                                 x_val=val.x, y_val=val.target)  # fmt: skip
    h = gc.train(rnn, data, optimizer=gc.optim.SGD(lr=0.1), steps=4, batch_size=8, truncate=3)
    assert h.val_loss.shape == (4,)
    assert_close(h.val_loss[-1], rnn.backward(val.x, val.target).loss, 1e-13, "val_loss")


def test_bound_optimizer_steps_arrays_in_place():
    core = gc.optim.SGD(lr=0.1, momentum=0.9)._core_for(np.float64, 1)
    p, g = np.array([1.0, -2.0]), np.array([0.5, 0.25])
    core.step([p], [g], 0.1)  # the buffer starts as the gradient
    core.step([p], [g], 0.1)  # then 0.9 * buffer + gradient
    assert_close(p, np.array([1.0, -2.0]) - 0.1 * g - 0.1 * 1.9 * g, 1e-15, "sgd")
    ((step, buffers),) = core.state()
    assert step == 2.0 and set(buffers) == {"momentum_buffer"}
    assert_close(buffers["momentum_buffer"], 1.9 * g, 1e-15, "buffer")
    core.set_state([(0.0, {})])
    assert core.state()[0][0] == 0.0


def test_progress_bar_counts_the_steps(capsys):
    pytest.importorskip("tqdm")
    net = gc.MLP(depth=3, width=4, seed=0)
    data = gc.tasks.teacher_student(64, 4, out_features=4)
    plain = gc.train(net.to_chain(), data, optimizer=gc.optim.SGD(lr=0.01), steps=7)
    shown = gc.train(net.to_chain(), data, optimizer=gc.optim.SGD(lr=0.01), steps=7, progress=True)
    assert "7/7" in capsys.readouterr().err
    np.testing.assert_array_equal(shown.loss, plain.loss)
    with pytest.raises(TypeError, match="progress must be True or False"):
        gc.train(net, data, optimizer=gc.optim.SGD(lr=0.01), steps=1, progress="yes")
