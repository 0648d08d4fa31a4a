"""gradchain.Chain and its blocks against torch autograd and an independent NumPy
reference, on randomly drawn chains of every block kind; the block objects, the report
vocabulary, state_dict round trips, modes, pickling and errors; gc.MLP as a builder of
chains."""

from __future__ import annotations

import json
import math
import pickle

import gradchain as gc
import numpy as np
import oracles as O
import pytest
from checks import assert_close, assert_log10, assert_scalar
from conftest import (
    HAS_NORMS,
    NORM_KINDS,
    ChainCase,
    block_kinds,
    needs_norms,
    needs_torch,
    out_width,
    random_state,
    torch,
)

RTOL = 1e-10


def _cases(n, seed0, norms):
    return [ChainCase(seed0 + i, norms) for i in range(n)]


BASIC = _cases(24, 1000, norms=False)
WITH_NORMS = _cases(36, 5000, norms=True)
CASES = [pytest.param(c, id=c.id) for c in BASIC] + [
    pytest.param(c, id=c.id, marks=needs_norms)
    if c.kinds & set(NORM_KINDS)
    else pytest.param(c, id=c.id)
    for c in WITH_NORMS
]


def test_cases_cover_every_kind_and_loss():
    kinds = set().union(*(c.kinds for c in BASIC + WITH_NORMS))
    assert kinds == {"linear", "activation", "scale", "residual", *NORM_KINDS}
    assert {c.loss for c in WITH_NORMS} == {"probe", "mse", "cross_entropy", "grad_output"}
    bn = [c for c in WITH_NORMS if "batch_norm" in c.kinds]
    assert {c.train for c in bn} == {True, False}
    nested = [
        c
        for c in BASIC
        if any(d["kind"] == "residual" and "residual" in block_kinds(d["body"]) for d in c.descs)
    ]
    assert nested, "some residual body holds a residual"


# --------------------------------------------------------------------------------------
# parity
# --------------------------------------------------------------------------------------
CANCELLED = 1e-9  # relative to the largest gradient: zero in exact arithmetic


def _close_or_cancelled(a, e, rtol, scale, what):
    """A gradient that is zero in exact arithmetic (a bias before a train-mode BatchNorm,
    whose mean the norm removes) is rounding noise in both: compare it absolutely."""
    if np.linalg.norm(e) <= CANCELLED * scale:
        assert np.linalg.norm(a) <= CANCELLED * scale, f"{what}: {np.linalg.norm(a)} should be ~0"
    else:
        assert_close(a, e, rtol, what)


def check_report(rep, ref, net, case, rtol, grads=True):
    names = net.param_names
    assert rep.param_names == names and list(rep.log10_param_grad_norms) == list(names)
    unclipped = getattr(ref, "grads_unclipped", ref.grads)
    expected = np.array([np.linalg.norm(unclipped[n]) for n in names])
    scale = expected.max(initial=0.0)
    real = expected > CANCELLED * scale
    got = np.array([rep.log10_param_grad_norms[n] for n in names])
    assert_log10(got[real], expected[real], rtol, "log10_param_grad_norms")
    assert np.all(got[~real] <= math.log10(CANCELLED * scale) if scale > 0 else True), (
        "cancelled gradients"
    )
    np.testing.assert_allclose(
        np.array([rep.param_grad_norms[n] for n in names])[real], expected[real], rtol=rtol, atol=0
    )
    an = np.array([np.linalg.norm(d) for d in ref.dh])
    assert_log10(rep.log10_activation_grad_norms, an, rtol, "log10_activation_grad_norms")
    assert rep.activation_names == net.activation_names and len(rep.activation_names) == len(ref.dh)
    assert_close(rep.output, ref.output, rtol, "output")
    assert_scalar(rep.loss, ref.loss, rtol, "loss")
    total = O.pnorm([unclipped[n] for n in names], case.norm_type) if names else 0.0
    if total > 0:
        assert_scalar(rep.total_norm, total, rtol, "total_norm")
    if grads:
        gscale = max((np.linalg.norm(g) for g in ref.grads.values()), default=0.0)
        for n in names:
            _close_or_cancelled(
                rep.param_grads[n], ref.grads[n], rtol, gscale, f"param_grads[{n!r}]"
            )
        for i, (a, e) in enumerate(zip(rep.activation_grads, ref.dh)):
            assert_close(a, e, rtol, f"activation_grads[{i}]")
    # the buffers the pass leaves behind (BatchNorm's running statistics)
    after = net.state_dict()
    for k, e in ref.state.items():
        if k.endswith("num_batches_tracked"):
            assert (
                after[k].dtype == np.int64 and after[k].shape == () and int(after[k]) == int(e)
            ), k
        elif "running" in k:
            assert_close(after[k], e, rtol, k)


@needs_torch
@pytest.mark.parametrize(
    "case", [c for c in WITH_NORMS if c.kinds & set(NORM_KINDS)], ids=lambda c: c.id
)
def test_oracles_agree(case):
    """The NumPy reference against torch on the chains with norm layers (so that a
    failure of gradchain's norm blocks below is theirs)."""
    model = O.torch_chain(case.descs, train=case.train)
    sd = random_state({k: v.numpy() for k, v in model.state_dict().items()}, case.seed)
    model = O.torch_chain(case.descs, sd, train=case.train)
    x, kw = case.data(out_width(case.descs, case.n0))
    t = O.torch_chain_backward(model, x, case.loss, **kw)
    n = O.numpy_chain_backward(case.descs, sd, x, case.loss, train=case.train, **kw)
    assert_scalar(n.loss, t.loss, 1e-12, "loss")
    assert_close(n.output, t.output, 1e-12, "output")
    scale = max(np.linalg.norm(g) for g in t.grads.values())
    for k in t.grads:
        _close_or_cancelled(n.grads[k], t.grads[k], 1e-11, scale, k)
    for i, (a, b) in enumerate(zip(n.dh, t.dh)):
        assert_close(a, b, 1e-11, f"dh[{i}]")
    for k in t.state:
        assert_close(n.state[k], t.state[k], 1e-12, k)


@needs_torch
@pytest.mark.parametrize("case", CASES)
def test_chain_matches_torch(case):
    net = case.chain()
    x, kw = case.data(net.out_features)
    model = O.torch_chain(case.descs, net.state_dict(), train=case.train)
    rep = net.backward(x, loss=case.loss if case.loss != "grad_output" else None, return_grads=True,
                       max_norm=case.max_norm, norm_type=case.norm_type, **kw)  # fmt: skip
    ref = O.torch_chain_backward(
        model, x, case.loss, max_norm=case.max_norm, norm_type=case.norm_type, **kw
    )
    check_report(rep, ref, net, case, RTOL)
    assert rep.train == case.train
    if case.max_norm is not None:
        assert_scalar(rep.total_norm, ref.total_norm, RTOL, "clip_grad_norm_'s total")
        assert rep.clip_coef == pytest.approx(
            min(1.0, case.max_norm / (ref.total_norm + 1e-6)), rel=1e-12
        )


@pytest.mark.parametrize("case", CASES)
def test_chain_matches_numpy(case):
    net = case.chain()
    x, kw = case.data(net.out_features)
    sd = net.state_dict()
    rep = net.backward(
        x, loss=case.loss if case.loss != "grad_output" else None, norm_type=case.norm_type, **kw
    )
    ref = O.numpy_chain_backward(case.descs, sd, x, case.loss, train=case.train, **kw)
    check_report(rep, ref, net, case, RTOL, grads=False)
    assert rep.param_grads is None and rep.activation_grads is None


@needs_torch
@pytest.mark.parametrize("case", CASES[::3])
def test_chain_float32_matches_torch_float32(case):
    net = case.chain("float32")
    x, kw = case.data(net.out_features)
    x = x.astype(np.float32)
    kw = {k: (a.astype(np.float32) if a.dtype.kind == "f" else a) for k, a in kw.items()}
    model = O.torch_chain(case.descs, net.state_dict(), dtype="float32", train=case.train)
    rep = net.backward(
        x, loss=case.loss if case.loss != "grad_output" else None, return_grads=True, **kw
    )
    ref = O.torch_chain_backward(model, x, case.loss, **kw)
    assert rep.output.dtype == np.float32 and all(
        g.dtype == np.float32 for g in rep.param_grads.values()
    )
    scale = max(np.abs(ref.output).max(), 1e-30)
    np.testing.assert_allclose(rep.output, ref.output, rtol=1e-3, atol=1e-4 * scale)
    for n in net.param_names:
        e = np.linalg.norm(ref.grads[n])
        assert abs(rep.param_grad_norms[n] - e) <= 2e-3 * e + 1e-5 * max(1.0, rep.total_norm), n


def test_backward_is_deterministic_and_forward_agrees():
    case = BASIC[3]
    net = case.chain()
    x, kw = case.data(net.out_features)
    a = net.backward(
        x, loss=case.loss if case.loss != "grad_output" else None, return_grads=True, **kw
    )
    b = net.backward(
        x, loss=case.loss if case.loss != "grad_output" else None, return_grads=True, **kw
    )
    assert a.log10_param_grad_norms == b.log10_param_grad_norms
    np.testing.assert_array_equal(a.output, net.forward(x))
    out = net.forward(x)
    out[0, 0] = 1.0  # a new array, the caller's
    assert out.flags.writeable


@pytest.mark.parametrize("depth,width,batch", [(6, 40, 8), (12, 64, 16)])
def test_two_threads_match_numpy(depth, width, batch):
    """Big enough that the core splits the batch across two threads and pipelines the
    parameter gradients."""
    rng = np.random.default_rng(depth)
    blocks = [gc.Linear(width, width)]
    for _ in range(depth):
        blocks.append(
            gc.Residual([gc.Activation("tanh"), gc.Linear(width, width), gc.Scale(0.5)], scale=0.7)
        )
    net = gc.Chain(blocks, seed=1, bias_std=0.1)
    x = rng.normal(size=(batch, width))
    descs = [{"kind": "linear", "in": width, "out": width, "bias": True}] + [
        {
            "kind": "residual", "scale": 0.7, "shortcut": None,
            "body": [{"kind": "activation", "name": "tanh"}, {"kind": "linear", "in": width, "out": width, "bias": True},
                     {"kind": "scale", "value": 0.5}],
        }
        for _ in range(depth)
    ]  # fmt: skip
    rep = net.backward(x, return_grads=True)
    ref = O.numpy_chain_backward(descs, net.state_dict(), x)
    for n in net.param_names:
        assert_close(rep.param_grads[n], ref.grads[n], RTOL, n)
    assert_log10(rep.log10_activation_grad_norms, [np.linalg.norm(d) for d in ref.dh], RTOL, "dh")


# --------------------------------------------------------------------------------------
# the blocks
# --------------------------------------------------------------------------------------
BLOCKS = [
    gc.Linear(3, 4),
    gc.Linear(3, 4, bias=False),
    gc.Linear(2, 2, prefix="encoder.fc"),
    gc.Activation("tanh"),
    gc.Activation("leaky_relu", negative_slope=0.2),
    gc.Activation("elu", alpha=0.5),
    gc.Scale(-0.25),
    gc.LayerNorm(5),
    gc.LayerNorm([5], eps=1e-3, elementwise_affine=False, bias=False),
    gc.RMSNorm(6),
    gc.RMSNorm(6, eps=1e-6, elementwise_affine=False),
    gc.BatchNorm(7),
    gc.BatchNorm(7, eps=1e-3, momentum=None, affine=False, track_running_stats=False),
    gc.Residual([gc.Linear(4, 4), gc.Activation("relu")]),
    gc.Residual([gc.LayerNorm(4), gc.Linear(4, 8)], scale=0.1, shortcut=True),
    gc.Residual([gc.Linear(4, 8)], shortcut=gc.Linear(4, 8, bias=False), prefix="res"),
    gc.Residual([gc.Residual([gc.Activation("gelu")], scale=2.0)]),
]


@pytest.mark.parametrize("block", BLOCKS, ids=repr)
def test_block_repr_rebuilds_it_and_blocks_are_immutable(block):
    again = eval(repr(block), vars(gc))
    assert again == block and hash(again) == hash(block) and repr(again) == repr(block)
    assert pickle.loads(pickle.dumps(block)) == block
    with pytest.raises(AttributeError, match="immutable"):
        block.foo = 1  # type: ignore[attr-defined]


def test_block_specs_and_widths():
    assert gc.Linear(3, 4).to_spec() == {
        "kind": "linear",
        "in_features": 3,
        "out_features": 4,
        "bias": True,
    }
    assert gc.Activation("gelu").to_spec(7) == {
        "kind": "activation", "width": 7, "activation": "gelu", "negative_slope": 0.01, "alpha": 1.0,
    }  # fmt: skip
    assert gc.Linear(2, 2, prefix="a.b").to_spec()["name"] == "a.b"
    assert gc.Activation("tanh").in_features is None and gc.Scale(2.0).out_features is None
    assert gc.Residual([gc.Activation("relu"), gc.Linear(3, 5)], shortcut=True).in_features == 3
    assert gc.Residual([gc.Activation("relu"), gc.Linear(3, 5)], shortcut=True).out_features == 5
    with pytest.raises(ValueError, match="neighbours' width"):
        gc.Activation("tanh").to_spec()
    with pytest.raises(ValueError, match="takes width 3; got width=4"):
        gc.Linear(3, 4).to_spec(4)
    rspec = gc.Residual([gc.Activation("relu"), gc.Linear(3, 5)], 0.5, shortcut=True).to_spec()
    assert rspec["shortcut"] == {
        "kind": "linear",
        "in_features": 3,
        "out_features": 5,
        "bias": False,
    }
    assert rspec["body"][0]["width"] == 3 and rspec["scale"] == 0.5


BAD_BLOCKS = [
    (lambda: gc.Linear(0, 3), ValueError, "in_features"),
    (lambda: gc.Linear(3, 2.5), TypeError, "out_features"),
    (lambda: gc.Linear(3, 3, bias=1), TypeError, "bias must be True or False"),
    (lambda: gc.Activation("swish"), ValueError, "name must be one of .*'tanh'"),
    (lambda: gc.Activation("elu", alpha=0.0), ValueError, "alpha"),
    (lambda: gc.Activation("leaky_relu", negative_slope=math.nan), ValueError, "negative_slope"),
    (lambda: gc.Scale(math.inf), ValueError, "value must be finite"),
    (lambda: gc.LayerNorm([3, 4]), ValueError, "normalized_shape .* one dimension"),
    (lambda: gc.LayerNorm(4, eps=0.0), ValueError, "eps must be a positive"),
    (lambda: gc.RMSNorm(4, eps=-1.0), ValueError, "eps"),
    (
        lambda: gc.BatchNorm(4, momentum=1.5),
        ValueError,
        r"momentum must be a number in \[0, 1\] or None",
    ),
    (lambda: gc.BatchNorm(0), ValueError, "num_features"),
    (lambda: gc.Residual([]), ValueError, "at least one block"),
    (lambda: gc.Residual(gc.Linear(2, 2)), TypeError, "list of gradchain blocks"),
    (
        lambda: gc.Residual([gc.Linear(2, 2), "relu"]),
        TypeError,
        r"blocks\[1\] must be a gradchain block",
    ),
    (lambda: gc.Residual([gc.Linear(2, 2)], shortcut="proj"), TypeError, "shortcut must be False"),
    (lambda: gc.Residual([gc.Linear(2, 2)], scale=math.nan), ValueError, "scale must be finite"),
    (lambda: gc.Linear(2, 2, prefix=3), TypeError, "prefix must be a string"),
]


@pytest.mark.parametrize("make,exc,match", BAD_BLOCKS, ids=[str(i) for i in range(len(BAD_BLOCKS))])
def test_bad_block_arguments(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


# --------------------------------------------------------------------------------------
# building chains
# --------------------------------------------------------------------------------------
def test_widths_are_inferred_and_checked():
    net = gc.Chain(
        [
            gc.Activation("tanh"),
            gc.Scale(2.0),
            gc.Linear(4, 6),
            gc.Activation("relu"),
            gc.Linear(6, 2),
        ]
    )
    assert net.widths == (4, 4, 4, 6, 6, 2) and net.in_features == 4 and net.out_features == 2
    with pytest.raises(
        ValueError,
        match=r"block 2 \(LayerNorm\(5\)\) takes width 5, but block 1 \(Activation\('relu'\)\) gives width 6",
    ):
        gc.Chain([gc.Linear(3, 6), gc.Activation("relu"), gc.LayerNorm(5)])
    with pytest.raises(
        ValueError,
        match=r"body block 1 \(Linear\(4, 2\)\) takes width 4, but body block 0 \(Linear\(3, 3\)\) gives width 3",
    ):
        gc.Chain([gc.Linear(3, 3), gc.Residual([gc.Linear(3, 3), gc.Linear(4, 2)])])
    with pytest.raises(
        ValueError, match=r"maps width 3 to 2; x \+ f\(x\) needs equal widths, or shortcut=True"
    ):
        gc.Chain([gc.Linear(3, 3), gc.Residual([gc.Linear(3, 2)])])
    with pytest.raises(
        ValueError,
        match=r"shortcut Linear.* must map the body's input width 3 to its output width 2",
    ):
        gc.Chain([gc.Linear(3, 3), gc.Residual([gc.Linear(3, 2)], shortcut=gc.Linear(3, 3))])
    with pytest.raises(ValueError, match="input width cannot be inferred"):
        gc.Chain([gc.Activation("tanh")])
    with pytest.raises(ValueError, match="at least one block"):
        gc.Chain([])
    with pytest.raises(TypeError, match=r"blocks\[1\]"):
        gc.Chain([gc.Linear(2, 2), torch.nn.ReLU() if torch else "relu"])
    with pytest.raises(ValueError, match=r"both be named '0\.weight'"):
        gc.Chain([gc.Linear(2, 2), gc.Linear(2, 2, prefix="0")])
    with pytest.raises(ValueError, match="init must be one of"):
        gc.Chain([gc.Linear(2, 2)], init="kaiming")
    with pytest.raises(ValueError, match="dtype"):
        gc.Chain([gc.Linear(2, 2)], dtype="float16")
    with pytest.raises(MemoryError, match="bytes"):
        gc.Chain([gc.Linear(10**6, 10**6)] * 3)


def test_names_follow_torch_sequential():
    net = gc.Chain([
        gc.Linear(3, 4),
        gc.Activation("relu"),
        gc.Residual([gc.Linear(4, 4), gc.Activation("tanh"), gc.Linear(4, 5)], shortcut=True),
        gc.Residual([gc.Linear(5, 5, prefix="mlp.fc")], prefix="blk"),
        gc.Linear(5, 2, bias=False, prefix="head"),
    ])  # fmt: skip
    assert net.param_names == (
        "0.weight", "0.bias", "2.block.0.weight", "2.block.0.bias", "2.block.2.weight",
        "2.block.2.bias", "2.shortcut.weight", "mlp.fc.weight", "mlp.fc.bias", "head.weight",
    )  # fmt: skip
    assert net.activation_names == ("input", "0", "1", "2", "blk", "head")
    assert [n for n, _ in net.named_parameters()] == list(net.param_names)
    assert [a.shape for a in net.parameters()] == [
        (4, 3),
        (4,),
        (4, 4),
        (4,),
        (5, 4),
        (5,),
        (5, 4),
        (5, 5),
        (5,),
        (2, 5),
    ]


def test_initialisation_is_the_mlp_s_layer_by_layer():
    """The k-th Linear draws layer k's weights: an MLP's blocks give the MLP's weights."""
    mlp = gc.MLP(width=[5, 7, 7, 3], activation="relu", init="orthogonal", bias_std=0.3, seed=9)
    net = gc.Chain(mlp.blocks, init="orthogonal", bias_std=0.3, seed=9)
    for (n, a), (m, b) in zip(mlp.named_parameters(), net.named_parameters()):
        assert n == m
        np.testing.assert_array_equal(a, b)
    x = np.random.default_rng(0).normal(size=(4, 5))
    np.testing.assert_array_equal(net.backward(x).output, mlp.backward(x).output)
    # a residual's Linears count in order too, body before shortcut
    res = gc.Chain(
        [
            gc.Linear(5, 7),
            gc.Residual([gc.Linear(7, 7)], shortcut=gc.Linear(7, 7)),
            gc.Linear(7, 3),
        ],
        seed=9,
    )
    ref = gc.MLP(width=[5, 7, 7, 7, 3], seed=9)
    for a, b in zip([p for n, p in res.named_parameters() if n.endswith("weight")], ref.weights):
        np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------------------
# state_dict, modes, pickling, repr
# --------------------------------------------------------------------------------------
def test_state_dict_round_trip_and_errors():
    net = gc.Chain([gc.Linear(3, 4), gc.Activation("tanh"), gc.Linear(4, 2)], seed=1)
    sd = net.state_dict()
    assert list(sd) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    sd["0.weight"][0, 0] = 123.0  # copies: the chain is unchanged
    assert net.state_dict()["0.weight"][0, 0] != 123.0
    other = gc.Chain([gc.Linear(3, 4), gc.Activation("tanh"), gc.Linear(4, 2)], seed=2)
    assert other.load_state_dict(sd) == ([], [])
    for k, a in other.state_dict().items():
        np.testing.assert_array_equal(a, sd[k])
    x = np.ones((2, 3))
    assert other.forward(x)[0, 0] != net.forward(x)[0, 0]
    with pytest.raises(ValueError, match=r"missing keys \['2.bias'\], unexpected keys \['extra'\]"):
        other.load_state_dict(
            {**{k: a for k, a in sd.items() if k != "2.bias"}, "extra": np.ones(2)}
        )
    keys = other.load_state_dict({"0.bias": np.zeros(4), "extra": np.ones(1)}, strict=False)
    assert keys.missing_keys == ["0.weight", "2.weight", "2.bias"] and keys.unexpected_keys == [
        "extra"
    ]
    np.testing.assert_array_equal(other.state_dict()["0.bias"], np.zeros(4))
    with pytest.raises(ValueError, match=r"state_dict\['0.weight'\] must have shape \(4, 3\)"):
        other.load_state_dict({**sd, "0.weight": np.ones((3, 4))})
    with pytest.raises(ValueError, match=r"state_dict\['0.bias'\] contains NaN"):
        other.load_state_dict({**sd, "0.bias": np.full(4, np.nan)})
    with pytest.raises(TypeError, match=r"float16.*float32 and float64"):
        other.load_state_dict({**sd, "0.bias": np.zeros(4, np.float16)})
    with pytest.raises(TypeError, match="state_dict must be a mapping"):
        other.load_state_dict([("0.bias", np.zeros(4))])
    views = net.parameters()
    with pytest.raises(ValueError):
        views[0][0, 0] = 1.0  # read-only


@needs_norms
def test_batch_norm_buffers_and_modes():
    net = gc.Chain(
        [gc.Linear(3, 4), gc.BatchNorm(4, momentum=None), gc.Activation("relu"), gc.Linear(4, 2)],
        seed=0,
    )
    sd = net.state_dict()
    assert list(sd) == [
        "0.weight",
        "0.bias",
        "1.weight",
        "1.bias",
        "1.running_mean",
        "1.running_var",
        "1.num_batches_tracked",
        "3.weight",
        "3.bias",
    ]
    assert sd["1.num_batches_tracked"].dtype == np.int64 and sd["1.num_batches_tracked"].shape == ()
    assert net.param_names == ("0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias")
    x = np.random.default_rng(0).normal(size=(5, 3))
    assert net.training and net.backward(x).train
    assert int(net.state_dict()["1.num_batches_tracked"]) == 1
    net.forward(x)  # a train-mode forward pass updates the running statistics, as torch's
    assert int(net.state_dict()["1.num_batches_tracked"]) == 2
    assert net.eval() is net and not net.training and repr(net).endswith(".eval()")
    before = net.state_dict()
    rep = net.backward(x)
    assert not rep.train
    for k, a in net.state_dict().items():
        np.testing.assert_array_equal(a, before[k])  # eval mode leaves them alone
    assert net.backward(x, train=True).train and int(net.state_dict()["1.num_batches_tracked"]) == 3
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        net.backward(x[:1], train=True)
    net.backward(x[:1])  # eval mode: a batch of one is fine
    with pytest.raises(TypeError, match="train must be None"):
        net.backward(x, train="yes")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_pickle_and_repr_rebuild_the_chain(dtype):
    blocks = [
        gc.Linear(4, 8),
        *[gc.Residual([gc.Activation("gelu"), gc.Linear(8, 8)], scale=0.3)] * 4,
        gc.Linear(8, 3),
    ]
    net = gc.Chain(blocks, init="he_normal", gain=0.8, bias_std=0.1, seed=5, dtype=dtype)
    text = repr(net)
    assert text.startswith(
        "Chain([Linear(4, 8), *[Residual([Activation('gelu'), Linear(8, 8)], scale=0.3)] * 4, Linear(8, 3)]"
    )
    assert (
        "init='he_normal', gain=0.8, sigma_w=1.0, bias_std=0.1, seed=5" in text and "\n" not in text
    )
    again = eval(text, vars(gc))
    clone = pickle.loads(pickle.dumps(net))
    x = np.random.default_rng(1).normal(size=(3, 4)).astype(dtype)
    r = net.backward(x)
    for other in (again, clone):
        assert repr(other) == text
        np.testing.assert_array_equal(other.backward(x).output, r.output)
    net.load_state_dict(net.state_dict())
    assert "init=" not in repr(net)  # loaded parameters: no initializer to show
    assert "init=" not in repr(pickle.loads(pickle.dumps(net)))
    d = net.describe()
    assert "1..4" in d and "Residual([Activation('gelu'), Linear(8, 8)], scale=0.3) x 4" in d
    assert f"{4 * 8 + 8 + 4 * (8 * 8 + 8) + 8 * 3 + 3:,} parameters" in d
    assert "<table>" in net._repr_html_()


def test_report_vocabulary():
    net = gc.Chain(
        [
            gc.Linear(3, 5),
            gc.Activation("tanh"),
            gc.Residual([gc.Linear(5, 5)], scale=0.5),
            gc.Linear(5, 4),
        ],
        seed=0,
    )
    x = np.random.default_rng(0).normal(size=(6, 3))
    rep = net.backward(x, np.arange(6) % 4, max_norm=0.1, return_grads=True)
    assert isinstance(rep, gc.ChainReport)
    # integer target: cross_entropy by default, as for every chain
    ce = net.backward(x, np.arange(6) % 4, loss="cross_entropy")
    assert rep.loss == ce.loss
    assert rep.activation_names == ("input", "0", "1", "2", "3")
    assert rep.log10_activation_grad_norms.shape == (5,) and rep.activation_grad_norms.shape == (5,)
    assert set(rep.param_grad_norms) == set(net.param_names)
    for k, x10 in rep.log10_param_grad_norms.items():
        assert rep.param_grad_norms[k] == pytest.approx(10**x10, rel=1e-13)
        assert rep.clipped_param_grad_norms[k] == pytest.approx(10**x10 * rep.clip_coef, rel=1e-12)
        assert rep.log10_clipped_param_grad_norms[k] == pytest.approx(
            x10 + rep.log10_clip_coef, abs=1e-12
        )
        assert np.linalg.norm(rep.param_grads[k]) == pytest.approx(
            rep.clipped_param_grad_norms[k], rel=1e-12
        )
    assert rep.clipped_total_norm == pytest.approx(0.1, rel=1e-5) and rep.max_norm == 0.1
    d = rep.to_dict()
    back = json.loads(json.dumps(d))
    assert back["activation_names"] == list(rep.activation_names) and "param_grads" not in back
    assert set(back["log10_param_grad_norms"]) == set(net.param_names)
    full = json.loads(json.dumps(rep.to_dict(grads=True)))
    assert np.array_equal(np.asarray(full["param_grads"]["0.weight"]), rep.param_grads["0.weight"])
    assert "\n" not in repr(rep) and repr(rep).startswith("ChainReport(loss=")
    assert "boundary" in str(rep) and len(rep.table().splitlines()) == 6
    assert rep._repr_html_().count("<tr>") <= 18
    again = pickle.loads(pickle.dumps(rep))
    assert (
        again.log10_param_grad_norms == rep.log10_param_grad_norms
        and again.activation_names == rep.activation_names
    )
    np.testing.assert_array_equal(
        again.param_grads["2.block.0.weight"], rep.param_grads["2.block.0.weight"]
    )
    with pytest.raises(ValueError):
        rep.log10_activation_grad_norms[0] = 0.0  # read-only
    with pytest.raises(AttributeError):
        rep.loss = 0.0  # immutable


def test_bad_backward_arguments():
    net = gc.Chain([gc.Linear(3, 4), gc.Activation("relu"), gc.Linear(4, 2)])
    x = np.ones((2, 3))
    with pytest.raises(ValueError, match=r"x must have shape \(any, 3\)"):
        net.backward(np.ones((2, 4)))
    with pytest.raises(ValueError, match="loss must be one of 'probe', 'mse', 'cross_entropy'"):
        net.backward(x, np.ones((2, 2)), loss="hinge")
    with pytest.raises(ValueError, match=r"target labels must lie in \[0, 2\)"):
        net.backward(x, np.array([0, 2]))
    with pytest.raises(ValueError, match="grad_output replaces the loss"):
        net.backward(x, np.ones((2, 2)), grad_output=np.ones((2, 2)))
    with pytest.raises(TypeError, match="return_grads must be True or False"):
        net.backward(x, return_grads=1)
    with pytest.raises(ValueError, match="norm_type"):
        net.backward(x, norm_type=-1)
    with pytest.raises(ValueError, match="batch must be a positive integer"):
        net.backward_memory(0)


def test_nonfinite_error_names_the_block():
    """Huge weights are carried in log space through Linear and tanh; elu's output needs
    its true scale once a Linear with a bias has to add to it."""
    net = gc.Chain(
        [gc.Linear(4, 4), gc.Activation("tanh"), *[gc.Linear(4, 4), gc.Activation("elu")] * 3],
        bias_std=0.1,
    )
    big = {"2.weight", "4.weight"}
    net.load_state_dict(
        {k: (np.full(a.shape, 1e200) if k in big else a) for k, a in net.state_dict().items()}
    )
    with pytest.raises(
        gc.NonFiniteError, match=r"overflowed to inf in block 4 \(Linear\(4, 4\), '4'\)"
    ) as err:
        net.backward(np.ones((2, 4)))
    assert err.value.where == "forward" and err.value.index == 5


def test_backward_memory_grows_with_the_batch_and_the_grads():
    net = gc.Chain([gc.Linear(30, 50), gc.Activation("gelu"), gc.Linear(50, 10)])
    a, b = net.backward_memory(8), net.backward_memory(16)
    assert b > a > 0
    extra = net.backward_memory(8, return_grads=True) - a
    params = (30 * 50 + 50 + 50 * 10 + 10) * 8
    assert extra == params + 8 * (30 + 50 + 50 + 10) * 8  # every gradient the pass returns


@needs_torch
def test_tensors_are_accepted_and_half_precision_refused():
    net = gc.Chain([gc.Linear(3, 2)], seed=0)
    x = np.random.default_rng(0).normal(size=(4, 3))
    a = net.backward(torch.tensor(x), torch.tensor([0, 1, 1, 0]))
    b = net.backward(x, np.array([0, 1, 1, 0]))
    assert a.log10_param_grad_norms == b.log10_param_grad_norms and a.loss == b.loss
    for dt in (torch.bfloat16, torch.float16):
        with pytest.raises(TypeError, match=r"x is a tensor of dtype .*float32 and float64"):
            net.backward(torch.tensor(x, dtype=dt))


# --------------------------------------------------------------------------------------
# gc.MLP: a builder of chains
# --------------------------------------------------------------------------------------
MLP_SHAPES = [
    ({}, ["Linear(4, 6)", "Activation('relu')"]),
    (
        {"norm": "layer", "norm_position": "pre"},
        ["LayerNorm(4)", "Linear(4, 6)", "Activation('relu')"],
    ),
    (
        {"norm": "batch", "norm_position": "post"},
        ["Linear(4, 6)", "BatchNorm(6)", "Activation('relu')"],
    ),
    (
        {"residual": True, "residual_scale": 0.5},
        ["Residual([Activation('relu'), Linear(4, 6)], scale=0.5, shortcut=True)"],
    ),
    (
        {"norm": "rms", "residual": True},
        ["Residual([RMSNorm(4), Activation('relu'), Linear(4, 6)], shortcut=True)"],
    ),
    (
        {"norm": "layer", "norm_position": "post", "residual": True},
        ["Residual([Activation('relu'), Linear(4, 6)], shortcut=True)", "LayerNorm(6)"],
    ),
]


@pytest.mark.parametrize(
    "kw,first",
    [pytest.param(k, f, marks=needs_norms if "norm" in k else ()) for k, f in MLP_SHAPES],
    ids=[repr(k) for k, _ in MLP_SHAPES],
)
def test_mlp_shapes_are_the_documented_blocks(kw, first):
    net = gc.MLP(width=[4, 6, 6, 3], activation="relu", seed=2, **kw)
    k = len(first)
    assert [repr(b) for b in net.blocks[:k]] == first
    assert len(net.blocks) == 3 * k
    assert "Linear(6, 6)" in " ".join(repr(b) for b in net.blocks[k : 2 * k])
    again = eval(repr(net), vars(gc))
    assert repr(again) == repr(net)
    for (n, a), (m, b) in zip(net.named_parameters(), again.named_parameters()):
        assert n == m
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kw", [k for k, _ in MLP_SHAPES], ids=[repr(k) for k, _ in MLP_SHAPES])
def test_mlp_options_match_the_chain_of_its_blocks(kw):
    if kw.get("norm") and not HAS_NORMS:
        pytest.skip("this build's core has no norm blocks")
    net = gc.MLP(width=[4, 6, 6, 3], activation="tanh", bias_std=0.2, seed=2, **kw)
    chain = gc.Chain(net.blocks, bias_std=0.2, seed=2)
    x = np.random.default_rng(3).normal(size=(5, 4))
    a = net.backward(x, return_grads=True)
    b = chain.backward(x, return_grads=True)
    assert a.log10_param_grad_norms == b.log10_param_grad_norms
    ends = [0, *np.cumsum([len(net.blocks) // 3] * 3)]
    np.testing.assert_array_equal(
        a.log10_activation_grad_norms, b.log10_activation_grad_norms[ends]
    )
    assert a.activation_names == tuple(b.activation_names[i] for i in ends)
    names = [
        n
        for n in net.param_names
        if n.endswith("weight") and np.ndim(net.state_dict()[n]) == 2 and "shortcut" not in n
    ]
    np.testing.assert_array_equal(
        a.log10_weight_grad_norms, [b.log10_param_grad_norms[n] for n in names]
    )
    np.testing.assert_array_equal(
        a.log10_bias_grad_norms,
        [b.log10_param_grad_norms[n.replace("weight", "bias")] for n in names],
    )
    for w, n in zip(a.weight_grads, names):
        np.testing.assert_array_equal(w, b.param_grads[n])
    for w, n in zip(net.weights, names):
        np.testing.assert_array_equal(w, chain.state_dict()[n])


@needs_norms
def test_mlp_pre_norm_residual_at_depth():
    """The issue's one-liner: a pre-norm residual stack whose branches are scaled by
    depth**-0.5 keeps its gradient norms within a small factor over 200 layers."""
    net = gc.MLP(
        depth=200,
        width=64,
        activation="relu",
        norm="layer",
        norm_position="pre",
        residual=True,
        residual_scale=200**-0.5,
        seed=0,
    )
    rep = net.backward(np.random.default_rng(0).normal(size=(8, 64)))
    la = rep.log10_activation_grad_norms
    assert la.shape == (201,) and np.all(np.isfinite(la)) and np.ptp(la) < 1.5
    plain = gc.MLP(depth=200, width=64, activation="relu", init="xavier_normal", seed=0)
    assert (
        np.ptp(
            plain.backward(
                np.random.default_rng(0).normal(size=(8, 64))
            ).log10_activation_grad_norms
        )
        > 5
    )


def test_mlp_repr_state_dict_and_from_state_dict():
    net = gc.MLP(
        depth=3,
        width=5,
        activation="elu",
        alpha=0.7,
        init="normal",
        sigma_w=1.3,
        bias_std=0.1,
        seed=4,
    )
    assert repr(net) == (
        "MLP(depth=3, width=5, activation='elu', init='normal', gain=1.0, sigma_w=1.3, bias_std=0.1, "
        "negative_slope=0.01, alpha=0.7, norm=None, norm_position='pre', residual=False, residual_scale=1.0, "
        "dtype='float64', seed=4)"
    )
    sd = net.state_dict()
    assert list(sd) == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
    again = gc.MLP.from_state_dict(sd, activation="elu", alpha=0.7)
    assert again.widths == net.widths and "init" not in repr(again)
    x = np.random.default_rng(0).normal(size=(2, 5))
    np.testing.assert_array_equal(again.forward(x), net.forward(x))
    with pytest.raises(ValueError, match="missing keys"):
        gc.MLP.from_state_dict({k: a for k, a in sd.items() if k != "2.bias"}, activation="elu")
    res = gc.MLP(depth=2, width=[3, 5, 4], residual=True, activation="relu", seed=1)
    again = gc.MLP.from_state_dict(res.state_dict(), residual=True, activation="relu")
    np.testing.assert_array_equal(again.forward(np.ones((1, 3))), res.forward(np.ones((1, 3))))


def test_mlp_from_weights_points_models_and_state_dicts_to_from_torch():
    net = gc.MLP(depth=2, width=3)
    with pytest.raises(TypeError, match=r"state_dict.*gc\.Chain\.from_torch"):
        gc.MLP.from_weights(net.state_dict())
    if torch is not None:
        with pytest.raises(TypeError, match=r"model \(Sequential\).*gc\.Chain\.from_torch"):
            gc.MLP.from_weights(torch.nn.Sequential(torch.nn.Linear(3, 3)))


def test_mlp_integer_targets_default_to_cross_entropy():
    net = gc.MLP(depth=2, width=[4, 5, 3], seed=0)
    x = np.ones((3, 4))
    a = net.backward(x, np.array([0, 2, 1]))
    b = net.backward(x, np.array([0, 2, 1]), loss="cross_entropy")
    assert a.loss == b.loss
    assert (
        net.backward(x, np.zeros((3, 3))).loss == net.backward(x, np.zeros((3, 3)), loss="mse").loss
    )


def test_mlp_report_has_the_chain_vocabulary():
    net = gc.MLP(depth=3, width=4, seed=0)
    rep = net.backward(np.ones((2, 4)), return_grads=True)
    assert isinstance(rep, gc.ChainReport) and rep.activation_names == ("input", "1", "3", "5")
    assert list(rep.param_grad_norms) == [
        "0.weight",
        "0.bias",
        "2.weight",
        "2.bias",
        "4.weight",
        "4.bias",
    ]
    np.testing.assert_array_equal(
        rep.log10_weight_grad_norms,
        [rep.log10_param_grad_norms[f"{2 * i}.weight"] for i in range(3)],
    )
    assert len(rep.activation_grads) == 4
    assert "\n" not in repr(rep) and repr(rep).startswith("BackwardReport(depth=3, loss=")
    assert "<table>" in rep._repr_html_()


def test_mlp_nonfinite_error_names_the_layer():
    w = [np.full((2, 2), 1.0), np.full((2, 2), 1e200), np.full((2, 2), 1e200)]
    net = gc.MLP.from_weights(w, activation="linear", negative_slope=0.01)
    net2 = gc.MLP.from_weights(w, [np.ones(2)] * 3, activation="tanh")
    net2.backward(np.ones((1, 2)))  # tanh saturates: finite
    with pytest.raises(gc.NonFiniteError, match="layer 3 of 3") as err:
        gc.MLP.from_weights(w, [np.ones(2)] * 3, activation="linear").backward(np.ones((1, 2)))
    assert err.value.index == 3
    assert (
        net.log_scale_forward
        and not gc.MLP.from_weights(w, [np.ones(2)] * 3, activation="relu").log_scale_forward
    )


@pytest.mark.parametrize("dtype,scale,bias_std", [("float32", 1e20, 1e-40), ("float64", 1e100, 1e-310)])
@pytest.mark.parametrize("act", ["tanh", "sigmoid", "elu", "gelu", "gelu_tanh", "silu", "softplus"])
def test_activation_derivative_at_a_carried_scale(act, dtype, scale, bias_std):
    """Values far from 1 are carried at a power-of-two scale; an activation's derivative
    must then be taken from its own input (or output) at the true scale, also where the
    input decides it (elu at -1e19 has slope 0, not the slope at elu's output, -1)."""
    net = gc.MLP(width=[3, 3, 2], activation=act, init="he_uniform", gain=0.5, sigma_w=2.0,
                 bias_std=bias_std, dtype=dtype, seed=43)  # fmt: skip
    x = (scale * (-1.0) ** np.arange(6).reshape(2, 3)).astype(dtype)
    go = (np.random.default_rng(5).standard_normal((2, 2)) * 3.0).astype(dtype)
    rep = net.backward(x, grad_output=go)
    ws = [np.array(w) for w in net.weights]
    ref = O.numpy_backward(ws, [np.array(b) for b in net.biases], x, act, loss="grad_output",
                           grad_output=go)  # fmt: skip
    tol = 1e-5 if dtype == "float32" else 1e-12
    for l in range(2):
        assert_log10(rep.log10_bias_grad_norms[l], np.linalg.norm(ref.db[l]), rtol=tol)
    for l in range(3):
        assert_log10(rep.log10_activation_grad_norms[l], np.linalg.norm(ref.dh[l]), rtol=tol)
