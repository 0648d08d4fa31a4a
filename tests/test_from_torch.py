"""gradchain.Chain.from_torch: torch models read as chains of blocks, their names and
shapes round-tripping through state_dict, and gradchain's gradients against torch
autograd on the same model, in float64 at 1e-10 (randomly generated models, residual
modules read with torch.fx, nesting, pre and post norm, train and eval BatchNorm)."""

from __future__ import annotations

import gradchain as gc
import numpy as np
import oracles as O
import pytest
from checks import assert_close, assert_log10, assert_scalar, run_python
from conftest import NORM_KINDS, ChainCase, needs_norms, needs_torch, random_state, torch

pytestmark = needs_torch
RTOL = 1e-10
CANCELLED = 1e-9  # relative to the largest gradient: zero in exact arithmetic

if torch is not None:
    nn = torch.nn
    F = torch.nn.functional


def compare(net, model, x, loss="probe", target=None, grad_output=None, rtol=RTOL, max_norm=None):
    """gradchain's report against torch autograd on the same model and input."""
    kw = {"target": target} if target is not None else {}
    if grad_output is not None:
        kw = {"grad_output": grad_output}
    rep = net.backward(
        x, loss=None if loss == "grad_output" else loss, return_grads=True, max_norm=max_norm, **kw
    )
    ref = (
        O.torch_chain_backward(model, x, loss, max_norm=max_norm, **kw)
        if isinstance(model, nn.Sequential)
        else None
    )
    if ref is None:  # a model that is not a Sequential: its input and output only
        ref = _whole_model_backward(model, x, loss, **kw)
    names = [n for n, _ in model.named_parameters()]
    assert list(net.param_names) == names
    unclipped = ref.grads_unclipped
    norms = np.array([np.linalg.norm(unclipped[n]) for n in names])
    scale = norms.max(initial=0.0)
    real = norms > CANCELLED * scale
    got = np.array([rep.log10_param_grad_norms[n] for n in names])
    assert_log10(got[real], norms[real], rtol, "log10_param_grad_norms")
    for n in names:
        g = ref.grads[n]
        if np.linalg.norm(g) > CANCELLED * scale:
            assert_close(rep.param_grads[n], g, rtol, n)
        else:
            assert np.linalg.norm(rep.param_grads[n]) <= CANCELLED * scale, n
    assert_close(rep.output, ref.output, rtol, "output")
    assert_scalar(rep.loss, ref.loss, rtol, "loss")
    if ref.dh is not None:
        # torch's top-level children against the chain's boundaries: a child that became
        # several blocks (a Sequential, a plain module) ends at its last block
        names = ["input", *(n for n, _ in model.named_children())]
        ours = list(rep.activation_names)
        at = [
            max(i for i, a in enumerate(ours) if a == c or a.startswith(c + "."))
            if c != "input"
            else 0
            for c in names
        ]
        assert_log10(
            rep.log10_activation_grad_norms[at], [np.linalg.norm(d) for d in ref.dh], rtol, "dh"
        )
    else:
        assert_close(rep.activation_grads[0], ref.dx, rtol, "dL/dx")
    if max_norm is not None:
        assert_scalar(rep.total_norm, ref.total_norm, rtol, "total norm")
    return rep, ref


def _whole_model_backward(model, x, loss, target=None, grad_output=None):
    from types import SimpleNamespace

    for p in model.parameters():
        p.grad = None
    xt = torch.tensor(x, requires_grad=True)
    out = model(xt)
    if loss == "probe":
        lv = 0.5 * out.pow(2).sum()
    elif loss == "mse":
        lv = F.mse_loss(out, torch.tensor(target))
    elif loss == "cross_entropy":
        lv = F.cross_entropy(out, torch.tensor(target))
    else:
        lv = None
        out.backward(torch.tensor(grad_output))
    if lv is not None:
        lv.backward()
    grads = {n: p.grad.numpy().copy() for n, p in model.named_parameters()}
    return SimpleNamespace(
        grads=grads, grads_unclipped=grads, output=out.detach().numpy(), loss=float("nan") if lv is None else float(lv.detach()),
        dh=None, dx=xt.grad.numpy(), total_norm=None,
    )  # fmt: skip


def assert_round_trip(net, model):
    """The chain's state_dict loads into the model and restores it exactly."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sd = net.state_dict()
    assert list(sd) == list(before), "state_dict keys in torch's order"
    for k, t in before.items():
        assert sd[k].shape == tuple(t.shape), k
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model.load_state_dict({k: torch.as_tensor(v) for k, v in sd.items()})
    for k, t in model.state_dict().items():
        assert torch.equal(t, before[k]), k
        assert t.dtype == before[k].dtype, k


# --------------------------------------------------------------------------------------
# randomly generated models (the chains of test_chain.py, as torch modules)
# --------------------------------------------------------------------------------------
MODELS = [ChainCase(9000 + i, norms=i % 3 != 0) for i in range(45)]
PARAMS = [
    pytest.param(c, id=c.id, marks=needs_norms)
    if c.kinds & set(NORM_KINDS)
    else pytest.param(c, id=c.id)
    for c in MODELS
]


def _model(case, dtype="float64"):
    model = O.torch_chain(case.descs, dtype=dtype)
    sd = random_state({k: v.numpy() for k, v in model.state_dict().items()}, case.seed)
    return O.torch_chain(case.descs, sd, dtype=dtype, train=case.train)


@pytest.mark.parametrize("case", PARAMS)
def test_random_models_match_torch(case):
    model = _model(case)
    net = gc.Chain.from_torch(model)
    assert net.training == case.train and net.dtype == np.float64
    assert_round_trip(net, model)
    x, kw = case.data(net.out_features)
    compare(net, model, x, case.loss, max_norm=case.max_norm, **kw)
    # the running statistics both passes leave behind
    after = net.state_dict()
    for k, t in model.state_dict().items():
        if "running" in k:
            assert_close(after[k], t.numpy(), RTOL, k)
        elif k.endswith("num_batches_tracked"):
            assert after[k] == t.item() and after[k].dtype == np.int64, k


@pytest.mark.parametrize("case", PARAMS[::4])
def test_random_float32_models(case):
    model = _model(case, "float32")
    net = gc.Chain.from_torch(model)
    assert net.dtype == np.float32
    x, kw = case.data(net.out_features)
    x = x.astype(np.float32)
    kw = {k: (a.astype(np.float32) if a.dtype.kind == "f" else a) for k, a in kw.items()}
    rep = net.backward(
        x, loss=None if case.loss == "grad_output" else case.loss, return_grads=True, **kw
    )
    ref = O.torch_chain_backward(model, x, case.loss, **kw)
    np.testing.assert_allclose(
        rep.output, ref.output, rtol=1e-3, atol=1e-4 * max(1.0, np.abs(ref.output).max())
    )
    for n, g in ref.grads.items():
        e = np.linalg.norm(g)
        assert abs(rep.param_grad_norms[n] - e) <= 2e-3 * e + 1e-5 * max(1.0, rep.total_norm), n


# --------------------------------------------------------------------------------------
# modules of one's own, read with torch.fx
# --------------------------------------------------------------------------------------
def _zoo():
    class Plain(nn.Module):  # x + f(x)
        def __init__(self, n):
            super().__init__()
            self.fc1, self.act, self.fc2 = (
                nn.Linear(n, 2 * n),
                nn.GELU(approximate="tanh"),
                nn.Linear(2 * n, n),
            )

        def forward(self, x):
            return x + self.fc2(self.act(self.fc1(x)))

    class Scaled(nn.Module):  # f(x) * a + x
        def __init__(self, n, a):
            super().__init__()
            self.f = nn.Sequential(nn.Linear(n, n), nn.Tanh())
            self.a = a

        def forward(self, x):
            return self.f(x) * self.a + x

    class Divided(nn.Module):  # x + f(x) / a, functional activations
        def __init__(self, n):
            super().__init__()
            self.lin = nn.Linear(n, n)

        def forward(self, x):
            return x + F.leaky_relu(self.lin(torch.tanh(x)), 0.2) / 3.0

    class Projected(nn.Module):  # proj(x) + a * f(x)
        def __init__(self, n, m):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(n, m), nn.SiLU(), nn.Linear(m, m))
            self.proj = nn.Linear(n, m, bias=False)

        def forward(self, x):
            return self.proj(x) + 0.5 * self.body(x)

    class Nested(nn.Module):  # a residual module inside a residual module
        def __init__(self, n):
            super().__init__()
            self.inner = Scaled(n, 0.25)
            self.out = nn.Linear(n, n)

        def forward(self, x):
            return x + self.out(self.inner(x).relu())

    class Inline(nn.Module):  # two residual joins in one forward
        def __init__(self, n):
            super().__init__()
            self.a, self.b = nn.Linear(n, n), nn.Linear(n, n)

        def forward(self, x):
            h = x + self.a(x)
            return h + F.elu(self.b(h), 0.5)

    class Stem(nn.Module):  # a plain chain of its own
        def __init__(self, n, m):
            super().__init__()
            self.fc, self.act = nn.Linear(n, m), nn.Softplus()

        def forward(self, x):
            return self.act(self.fc(x))

    return Plain, Scaled, Divided, Projected, Nested, Inline, Stem


@pytest.mark.parametrize("loss", ["probe", "mse", "cross_entropy", "grad_output"])
def test_modules_of_ones_own(loss):
    Plain, Scaled, Divided, Projected, Nested, Inline, Stem = _zoo()
    torch.manual_seed(0)
    model = nn.Sequential(
        Stem(5, 6), Plain(6), nn.Sequential(Scaled(6, 0.7), Divided(6)), Projected(6, 4), Nested(4), Inline(4),
        nn.Dropout(0.0), nn.Identity(), nn.Linear(4, 3),
    ).double()  # fmt: skip
    net = gc.Chain.from_torch(model)
    assert net.activation_names == (
        "input",
        "0.fc",
        "0.act",
        "1",
        "2.0",
        "2.1",
        "3",
        "4",
        "5.add",
        "5.add_1",
        "6",
        "7",
        "8",
    )
    kinds = [type(b).__name__ for b in net.blocks]
    assert kinds == [
        "Linear",
        "Activation",
        "Residual",
        "Residual",
        "Residual",
        "Residual",
        "Residual",
        "Residual",
        "Residual",
        "Activation",
        "Activation",
        "Linear",
    ]
    assert net.blocks[5].shortcut.prefix == "3.proj" and net.blocks[5].scale == 0.5
    assert net.blocks[4].scale == pytest.approx(1 / 3)
    assert_round_trip(net, model)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, 5))
    kw = {
        "mse": {"target": rng.normal(size=(6, 3))},
        "cross_entropy": {"target": rng.integers(0, 3, 6)},
        "grad_output": {"grad_output": rng.normal(size=(6, 3))},
    }.get(loss, {})
    compare(net, model, x, loss, **kw)


def test_a_residual_module_as_the_whole_model():
    Plain = _zoo()[0]
    torch.manual_seed(1)
    model = Plain(4).double()
    net = gc.Chain.from_torch(model)
    assert net.param_names == ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")
    assert net.activation_names == ("input", "output")
    assert_round_trip(net, model)
    compare(net, model, np.random.default_rng(0).normal(size=(3, 4)))
    lin = nn.Linear(3, 2).double()
    one = gc.Chain.from_torch(lin)
    assert one.param_names == ("weight", "bias") and list(one.state_dict()) == ["weight", "bias"]
    compare(one, lin, np.ones((2, 3)))


@needs_norms
@pytest.mark.parametrize("position", ["pre", "post"])
@pytest.mark.parametrize("norm", ["layer", "rms", "batch"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_pre_and_post_norm_blocks(position, norm, mode):
    """Transformer-style blocks written the usual way: pre-norm ``x + f(norm(x))``,
    post-norm ``norm(x + f(x))``."""
    make = {"layer": nn.LayerNorm, "rms": nn.RMSNorm, "batch": nn.BatchNorm1d}[norm]

    class Block(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.norm = make(n)
            self.mlp = nn.Sequential(nn.Linear(n, 3 * n), nn.ReLU(), nn.Linear(3 * n, n))

        def forward(self, x):
            if position == "pre":
                return x + self.mlp(self.norm(x)) * 0.5
            return self.norm(x + 0.5 * self.mlp(x))

    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Linear(4, 6), *[Block(6) for _ in range(3)], make(6), nn.Linear(6, 2)
    ).double()
    model.load_state_dict(
        {
            k: torch.as_tensor(v)
            for k, v in random_state(
                {k: v.numpy() for k, v in model.state_dict().items()}, 3
            ).items()
        }
    )
    model.train(mode == "train")
    net = gc.Chain.from_torch(model)
    assert net.training == (mode == "train")
    kind = {"layer": "LayerNorm", "rms": "RMSNorm", "batch": "BatchNorm"}[norm]
    if position == "post":  # norm(x + f(x)): the residual, then the norm
        assert [type(b).__name__ for b in net.blocks[1:3]] == ["Residual", kind]
    else:  # x + f(norm(x)): the norm opens the residual's body
        assert type(net.blocks[1].blocks[0]).__name__ == kind
    assert_round_trip(net, model)
    x = np.random.default_rng(4).normal(size=(5, 4))
    compare(net, model, x, "cross_entropy", target=np.array([0, 1, 1, 0, 1]))


# --------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------
def _errors():
    class Square(nn.Module):
        def forward(self, x):
            return x * x

    class Cat(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            return torch.cat([x, self.lin(x)], dim=1)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            return self.lin(self.lin(x))

    class Both(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(nn.Linear(3, 3), nn.Tanh())
            self.b = nn.Sequential(nn.Linear(3, 3), nn.ReLU())

        def forward(self, x):
            return self.a(x) + self.b(x)

    class Learned(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.alpha = nn.Parameter(torch.ones(()))

        def forward(self, x):
            return x + self.alpha * self.lin(x)

    class Branchy(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.spare = nn.Linear(3, 3), nn.Linear(3, 3)

        def forward(self, x):
            return self.lin(x)

    tied = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    tied[1].weight = tied[0].weight
    mixed = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Linear(3, 3), nn.BatchNorm1d(3))
    mixed[1].eval()
    return [
        ("conv", nn.Sequential(nn.Linear(3, 3), nn.Conv1d(3, 3, 1)), ValueError, r"torch.nn.modules.conv.Conv1d at '1' is not supported; gradchain reads nn.Sequential, nn.Linear"),
        ("square", nn.Sequential(nn.Linear(3, 3), Square()), ValueError, r"Square at '1': node 'mul' \(call_function mul\) is not supported: only a tensor times a number; gradchain reads calls of submodules"),
        ("cat", Cat(), ValueError, r"node 'cat' \(call_function cat\) is not supported"),
        ("twice", Twice(), ValueError, r"module at 'lin' is called twice: shared parameters"),
        ("both", Both(), ValueError, r"both sides of the addition 'add' compute something"),
        ("learned", Learned(), ValueError, r"node 'alpha' \(get_attr alpha\) is not supported: parameters and buffers must belong"),
        ("branchy", Branchy(), ValueError, r"torch.fx could not trace its forward"),
        ("unused", Unused(), ValueError, r"forward does not use: \['spare.weight', 'spare.bias'\]"),
        ("tied", tied, ValueError, r"parameters '0.weight' and '1.weight' are one tensor"),
        ("dropout", nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.1)), ValueError, r"Dropout at '1' is in train mode with p=0.1"),
        ("softplus", nn.Sequential(nn.Linear(3, 3), nn.Softplus(beta=2)), ValueError, r"Softplus at '1' has beta=2"),
        ("layernorm2d", nn.Sequential(nn.Linear(3, 6), nn.LayerNorm([2, 3])), ValueError, r"LayerNorm at '1' normalises over \(2, 3\)"),
        ("mixed modes", mixed, ValueError, r"BatchNorm layers are in different modes \(train: \['3'\]\)"),
        ("bf16", nn.Sequential(nn.Linear(3, 3)).to(torch.bfloat16), TypeError, r"bfloat16 parameters; gradchain accepts float32 and float64"),
        ("half", nn.Sequential(nn.Linear(3, 3)).half(), TypeError, r"float16 parameters; gradchain accepts float32 and float64"),
        ("mixed dtypes", nn.Sequential(nn.Linear(3, 3).double(), nn.Linear(3, 3)), TypeError, r"mixes float32 and float64"),
        ("not a module", [nn.Linear(3, 3)], TypeError, r"model must be a torch.nn.Module"),
        ("nothing", nn.Sequential(), ValueError, r"computes nothing"),
    ]  # fmt: skip


ERRORS = _errors() if torch is not None else []


@pytest.mark.parametrize("model,exc,match", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_unsupported_models_are_clear_errors(model, exc, match):
    with pytest.raises(exc, match=match):
        gc.Chain.from_torch(model)


def test_dropout_in_eval_mode_and_explicit_dtype():
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.ReLU(), nn.Linear(4, 2)).eval()
    net = gc.Chain.from_torch(model)
    assert not net.training and net.dtype == np.float32
    net64 = gc.Chain.from_torch(model, dtype="float64")
    x = np.random.default_rng(0).normal(size=(2, 3))
    np.testing.assert_allclose(
        net64.forward(x), model.double()(torch.tensor(x)).detach().numpy(), rtol=1e-6
    )
    assert "Dropout" not in repr(net) and "Activation('linear', prefix='1')" in repr(net)


def test_reprs_of_imported_chains_rebuild_the_structure():
    Projected = _zoo()[3]
    model = nn.Sequential(nn.Linear(3, 5), Projected(5, 4)).double()
    net = gc.Chain.from_torch(model)
    again = eval(repr(net), vars(gc))  # our own repr
    assert again.blocks == net.blocks and again.param_names == net.param_names
    assert "init=" not in repr(net)


def test_torch_is_not_imported_by_gradchain():
    out = run_python("""
        import sys, numpy as np, gradchain as gc
        net = gc.Chain([gc.Linear(3, 2)])
        net.backward(np.ones((2, 3)))
        gc.MLP(depth=2, width=3).backward(np.ones((1, 3)))
        print("torch" in sys.modules)
    """)  # fmt: skip
    assert out.strip() == "False"


def test_models_cover_residuals_norms_and_modes():
    kinds = set().union(*(c.kinds for c in MODELS))
    assert {"residual", "scale", *NORM_KINDS} <= kinds
    assert {c.train for c in MODELS if "batch_norm" in c.kinds} == {True, False}
    assert {c.loss for c in MODELS} == {"probe", "mse", "cross_entropy", "grad_output"}
