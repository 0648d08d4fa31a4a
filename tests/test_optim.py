"""gc.optim and gc.optim.lr_scheduler against torch.optim: update equations, state, defaults,
schedules, state_dict round trips, hand-computed steps and bad input."""

from __future__ import annotations

import inspect
import itertools
import math
import pickle
import zlib

import gradchain as gc
import numpy as np
import oracles
import pytest
from gradchain import _core
from gradchain.optim import lr_scheduler

STEPS = 50
CLASSES = {
    "sgd": gc.optim.SGD,
    "adam": gc.optim.Adam,
    "adamw": gc.optim.AdamW,
    "rmsprop": gc.optim.RMSprop,
    "adagrad": gc.optim.Adagrad,
}
TORCH_NAMES = oracles.TORCH_OPTIMIZERS


def _torch():
    return pytest.importorskip("torch")


# --------------------------------------------------------------------------------------
# Every optimizer and combination of options, with randomly drawn hyperparameters


def _option_grid() -> list[tuple[str, dict]]:
    cases = []
    for momentum, dampening, nesterov, wd, maximize in itertools.product(
        (0.0, 0.9), (0.0, 0.3), (False, True), (0.0, 0.05), (False, True)
    ):
        if nesterov and (momentum == 0 or dampening != 0):
            continue
        cases.append(
            (
                "sgd",
                {
                    "momentum": momentum,
                    "dampening": dampening,
                    "nesterov": nesterov,
                    "weight_decay": wd,
                    "maximize": maximize,
                },
            )
        )
    for kind in ("adam", "adamw"):
        for amsgrad, wd, maximize in itertools.product((False, True), (0.0, 0.1), (False, True)):
            cases.append((kind, {"amsgrad": amsgrad, "weight_decay": wd, "maximize": maximize}))
    for momentum, centered, wd, maximize in itertools.product(
        (0.0, 0.8), (False, True), (0.0, 0.05), (False, True)
    ):
        cases.append(
            (
                "rmsprop",
                {
                    "momentum": momentum,
                    "centered": centered,
                    "weight_decay": wd,
                    "maximize": maximize,
                },
            )
        )
    for lr_decay, iav, wd, maximize in itertools.product(
        (0.0, 0.05), (0.0, 0.2), (0.0, 0.05), (False, True)
    ):
        cases.append(
            (
                "adagrad",
                {
                    "lr_decay": lr_decay,
                    "initial_accumulator_value": iav,
                    "weight_decay": wd,
                    "maximize": maximize,
                },
            )
        )
    return cases


CASES = _option_grid()


def _case_id(case: tuple[str, dict]) -> str:
    kind, opts = case
    on = [k if v is True else f"{k}={v}" for k, v in opts.items() if v not in (0.0, False)]
    return "-".join([kind, *on]) or kind


def _draw(kind: str, opts: dict, rng: np.random.Generator) -> dict:
    """The case's options plus randomly drawn continuous hyperparameters (scaled so that
    every option visibly changes the trajectory)."""
    hyper = dict(opts)
    hyper["lr"] = float(10 ** rng.uniform(-3, -1))
    if kind in ("adam", "adamw"):
        hyper["betas"] = (float(rng.uniform(0.5, 0.95)), float(rng.uniform(0.9, 0.9999)))
        hyper["eps"] = float(10 ** rng.uniform(-10, -6))
    if kind == "rmsprop":
        hyper["alpha"] = float(rng.uniform(0.8, 0.999))
        hyper["eps"] = float(10 ** rng.uniform(-10, -6))
    if kind == "adagrad":
        hyper["eps"] = float(10 ** rng.uniform(-12, -8))
    for key in ("momentum", "weight_decay", "dampening", "lr_decay", "initial_accumulator_value"):
        if hyper.get(key):
            hyper[key] = float(hyper[key] * rng.uniform(0.5, 1.0))
    return hyper


def _problem(rng: np.random.Generator, dtype, steps: int = STEPS):
    """Parameters of random shapes (vectors longer and shorter than a SIMD register, a
    matrix, a 3-d array) and `steps` random gradients of varied scale for each."""
    shapes = [
        (int(rng.integers(1, 6)),),
        (int(rng.integers(9, 40)),),
        (int(rng.integers(2, 8)), int(rng.integers(2, 8))),
        (2, int(rng.integers(1, 4)), 3),
    ]
    params = [rng.standard_normal(s).astype(dtype) for s in shapes]
    scales = 10 ** rng.uniform(-2, 1, size=len(shapes))
    grads = [
        [(s * rng.standard_normal(p.shape)).astype(dtype) for p, s in zip(params, scales)]
        for _ in range(steps)
    ]
    return params, grads


def _assert_close(actual, expected, rtol, what):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, what
    assert actual.dtype == expected.dtype, what
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=0, err_msg=what)


def _compare(opt, params, tparams, topt, rtol):
    for i, (p, q) in enumerate(zip(params, tparams)):
        _assert_close(p, q, rtol, f"parameter {i}")
    ours = opt.state_dict()["state"]
    theirs = topt.state_dict()["state"]
    assert sorted(ours) == sorted(theirs)
    for i, entry in theirs.items():
        assert list(ours[i]) == list(entry), f"state names and order of parameter {i}"
        for name, value in entry.items():
            if name == "step":
                assert ours[i]["step"] == float(value)
            else:
                _assert_close(ours[i][name], value.numpy(), rtol, f"state[{i}][{name!r}]")


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_matches_torch_float64(case):
    _torch()
    kind, opts = case
    rng = np.random.default_rng(zlib.crc32(_case_id(case).encode()))
    hyper = _draw(kind, opts, rng)
    params, grads = _problem(rng, np.float64)
    tparams, topt = oracles.torch_optimizer_run(kind, hyper, params, grads)
    opt = CLASSES[kind](**hyper)
    for gs in grads:
        opt.step_arrays(params, gs)
    _compare(opt, params, tparams, topt, rtol=1e-12)


F32_CASES = [c for c in CASES if sum(v not in (0.0, False) for v in c[1].values()) >= 3]


@pytest.mark.parametrize("case", F32_CASES, ids=[_case_id(c) for c in F32_CASES])
def test_matches_torch_float32(case):
    """float32 in float32 as torch: the same operations, each rounded to float32; torch's
    sqrt is not always correctly rounded, and 50 steps carry such roundings on."""
    _torch()
    kind, opts = case
    rng = np.random.default_rng(zlib.crc32(_case_id(case).encode()))
    hyper = _draw(kind, opts, rng)
    params, grads = _problem(rng, np.float32)
    tparams, topt = oracles.torch_optimizer_run(kind, hyper, params, grads)
    opt = CLASSES[kind](**hyper)
    for gs in grads:
        opt.step_arrays(params, gs)
    _compare(opt, params, tparams, topt, rtol=2e-4)
    for i, p in enumerate(params):
        np.testing.assert_allclose(p, tparams[i], rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("kind", list(CLASSES))
def test_a_schedule_rate_per_step_matches_torch(kind):
    """The core takes each step's rate from the caller (a schedule), torch from its group."""
    _torch()
    rng = np.random.default_rng(7)
    hyper = _draw(kind, {}, rng)
    params, grads = _problem(rng, np.float64, steps=20)
    lrs = hyper["lr"] * np.cos(np.linspace(0, 1.5, 20)) ** 2
    tparams, _ = oracles.torch_optimizer_run(kind, hyper, params, grads, lrs=lrs)
    opt = CLASSES[kind](**hyper)
    for gs, lr in zip(grads, lrs):
        opt.step_arrays(params, gs, lr=float(lr))
    for p, q in zip(params, tparams):
        np.testing.assert_allclose(p, q, rtol=1e-12, atol=0)


def test_the_core_object_steps_like_the_python_one():
    """_core_for gives the object a training loop drives: the same numbers, the same state."""
    rng = np.random.default_rng(3)
    params, grads = _problem(rng, np.float64, steps=5)
    a = gc.optim.Adam(lr=0.01, amsgrad=True)
    b = gc.optim.Adam(lr=0.01, amsgrad=True)
    pa = [p.copy() for p in params]
    core = b._core_for("float64", len(params), [p.shape for p in params])
    assert isinstance(core, _core.Optimizer64)
    assert b._core_for(np.float64, len(params)) is core
    for gs in grads:
        a.step_arrays(pa, gs)
        core.step(params, gs, 0.01)
    for p, q in zip(pa, params):
        np.testing.assert_array_equal(p, q)
    sa, sb = a.state_dict(), b.state_dict()
    for i in sa["state"]:
        for k in sa["state"][i]:
            np.testing.assert_array_equal(sa["state"][i][k], sb["state"][i][k])
    assert core.spec["kind"] == "adam" and core.spec["amsgrad"] is True


# --------------------------------------------------------------------------------------
# Hand-computed first steps (closed forms written out)


def _run(opt, p0, gs):
    p = np.array(p0, dtype=np.float64)
    out = []
    for g in gs:
        opt.step_arrays([p], [np.array(g, dtype=np.float64)])
        out.append(p.copy())
    return out


def test_sgd_by_hand():
    lr, mu, damp, wd = 0.1, 0.9, 0.5, 0.1
    p = _run(
        gc.optim.SGD(lr=lr, momentum=mu, dampening=damp, weight_decay=wd),
        [1.0],
        [[2.0], [-1.0], [0.5]],
    )
    d1 = 2.0 + wd * 1.0  # 2.1; the buffer starts as the first gradient, undampened
    b1 = d1
    p1 = 1.0 - lr * b1  # 0.79
    d2 = -1.0 + wd * p1  # -0.921
    b2 = mu * b1 + (1 - damp) * d2  # 1.4295
    p2 = p1 - lr * b2  # 0.64705
    d3 = 0.5 + wd * p2
    b3 = mu * b2 + (1 - damp) * d3
    p3 = p2 - lr * b3
    np.testing.assert_allclose([p[0][0], p[1][0], p[2][0]], [p1, p2, p3], rtol=1e-15)
    np.testing.assert_allclose([p1, p2], [0.79, 0.64705], rtol=1e-14)

    q = _run(gc.optim.SGD(lr=lr, momentum=mu, nesterov=True, maximize=True), [1.0], [[2.0], [-1.0]])
    b1 = -2.0
    q1 = 1.0 - lr * (-2.0 + mu * b1)  # 1.38
    b2 = mu * b1 + 1.0
    q2 = q1 - lr * (1.0 + mu * b2)
    np.testing.assert_allclose([q[0][0], q[1][0]], [q1, q2], rtol=1e-15)
    np.testing.assert_allclose(q1, 1.38, rtol=1e-15)


def test_adam_by_hand():
    lr, b1, b2, eps = 0.1, 0.9, 0.999, 1e-8
    opt = gc.optim.Adam(lr=lr, amsgrad=True)
    p = _run(opt, [1.0], [[3.0], [-0.5], [0.01]])
    # step 1: the bias corrections make m_hat = g, v_hat = g**2: a step of lr * sign(g)
    m1, v1 = (1 - b1) * 3.0, (1 - b2) * 9.0
    p1 = 1.0 - lr / (1 - b1) * m1 / (math.sqrt(v1) / math.sqrt(1 - b2) + eps)
    np.testing.assert_allclose(p[0][0], 0.9, rtol=1e-8)
    m2, v2 = b1 * m1 + (1 - b1) * -0.5, b2 * v1 + (1 - b2) * 0.25
    p2 = p1 - lr / (1 - b1**2) * m2 / (math.sqrt(v2) / math.sqrt(1 - b2**2) + eps)
    # step 3: v falls below its maximum; amsgrad divides by the maximum (of raw v)
    m3, v3 = b1 * m2 + (1 - b1) * 0.01, b2 * v2 + (1 - b2) * 1e-4
    vmax = max(v1, v2, v3)
    assert vmax == v2
    p3 = p2 - lr / (1 - b1**3) * m3 / (math.sqrt(vmax) / math.sqrt(1 - b2**3) + eps)
    np.testing.assert_allclose([x[0] for x in p], [p1, p2, p3], rtol=1e-14)
    st = opt.state_dict()["state"][0]
    np.testing.assert_allclose(
        [st["exp_avg"][0], st["exp_avg_sq"][0], st["max_exp_avg_sq"][0], st["step"]],
        [m3, v3, vmax, 3.0],
        rtol=1e-14,
    )


def test_adam_and_adamw_weight_decay_by_hand():
    lr, wd, b1, b2, eps = 0.01, 0.5, 0.9, 0.999, 1e-8
    # Adam: L2 in the gradient, g = 2 + 0.5 * 1 = 2.5; the first step is still lr * sign(g)
    (pa,) = _run(gc.optim.Adam(lr=lr, weight_decay=wd), [1.0], [[2.0]])
    g = 2.0 + wd * 1.0
    expect = 1.0 - lr / (1 - b1) * ((1 - b1) * g) / (
        math.sqrt((1 - b2) * g * g) / math.sqrt(1 - b2) + eps
    )
    np.testing.assert_allclose(pa[0], expect, rtol=1e-15)
    # AdamW: p * (1 - lr wd) first, then the Adam step on the raw gradient
    pw = _run(gc.optim.AdamW(lr=lr, weight_decay=wd), [1.0], [[2.0], [1.0]])
    w1 = 1.0 * (1 - lr * wd) - lr / (1 - b1) * ((1 - b1) * 2.0) / (
        math.sqrt((1 - b2) * 4.0) / math.sqrt(1 - b2) + eps
    )
    m2, v2 = b1 * (1 - b1) * 2.0 + (1 - b1) * 1.0, b2 * (1 - b2) * 4.0 + (1 - b2) * 1.0
    w2 = w1 * (1 - lr * wd) - lr / (1 - b1**2) * m2 / (math.sqrt(v2) / math.sqrt(1 - b2**2) + eps)
    np.testing.assert_allclose([pw[0][0], pw[1][0]], [w1, w2], rtol=1e-14)
    np.testing.assert_allclose(w1, 1.0 * 0.995 - 0.01, rtol=1e-8)


def test_rmsprop_by_hand():
    lr, alpha, eps = 0.01, 0.99, 1e-8
    p = _run(gc.optim.RMSprop(lr=lr), [1.0], [[2.0], [-1.0]])
    v1 = (1 - alpha) * 4.0
    p1 = 1.0 - lr * 2.0 / (math.sqrt(v1) + eps)  # sqrt(0.01 g^2) = 0.1 |g|: a step of 10 lr
    v2 = alpha * v1 + (1 - alpha) * 1.0
    p2 = p1 - lr * -1.0 / (math.sqrt(v2) + eps)
    np.testing.assert_allclose([p[0][0], p[1][0]], [p1, p2], rtol=1e-15)
    np.testing.assert_allclose(p1, 0.9, rtol=1e-8)

    mu = 0.5
    opt = gc.optim.RMSprop(lr=lr, momentum=mu, centered=True)
    q = _run(opt, [1.0], [[2.0], [-1.0]])
    a1 = (1 - alpha) * 2.0
    d1 = math.sqrt(v1 - a1 * a1) + eps  # 2 sqrt(0.0099)
    buf1 = 2.0 / d1
    q1 = 1.0 - lr * buf1
    a2 = alpha * a1 + (1 - alpha) * -1.0
    d2 = math.sqrt(v2 - a2 * a2) + eps
    buf2 = mu * buf1 + -1.0 / d2
    q2 = q1 - lr * buf2
    np.testing.assert_allclose([q[0][0], q[1][0]], [q1, q2], rtol=1e-14)
    st = opt.state_dict()["state"][0]
    assert list(st) == ["step", "square_avg", "momentum_buffer", "grad_avg"]
    np.testing.assert_allclose(
        [st["square_avg"][0], st["momentum_buffer"][0], st["grad_avg"][0]],
        [v2, buf2, a2],
        rtol=1e-14,
    )


def test_adagrad_by_hand():
    lr, decay, iav, eps = 0.1, 0.5, 0.25, 1e-10
    opt = gc.optim.Adagrad(lr=lr, lr_decay=decay, initial_accumulator_value=iav)
    p = _run(opt, [1.0], [[2.0], [-1.0], [3.0]])
    s1 = iav + 4.0
    p1 = 1.0 - lr * 2.0 / (math.sqrt(s1) + eps)
    s2 = s1 + 1.0
    p2 = p1 - lr / (1 + 1 * decay) * -1.0 / (math.sqrt(s2) + eps)
    s3 = s2 + 9.0
    p3 = p2 - lr / (1 + 2 * decay) * 3.0 / (math.sqrt(s3) + eps)
    np.testing.assert_allclose([x[0] for x in p], [p1, p2, p3], rtol=1e-15)
    np.testing.assert_allclose(p1, 1.0 - 0.2 / math.sqrt(4.25), rtol=1e-9)  # eps: 5e-12
    assert opt.state_dict()["state"][0]["sum"][0] == s3 == 14.25


# --------------------------------------------------------------------------------------
# Defaults, attributes, repr


@pytest.mark.parametrize("kind", list(CLASSES))
def test_defaults_and_signature_are_torchs(kind):
    torch = _torch()
    tcls = getattr(torch.optim, TORCH_NAMES[kind])
    ours, theirs = inspect.signature(CLASSES[kind]), inspect.signature(tcls)
    for name, param in ours.parameters.items():
        assert name in theirs.parameters
        assert param.default == theirs.parameters[name].default, name
        assert param.kind == theirs.parameters[name].kind or name == "maximize", name
    topt = tcls([torch.nn.Parameter(torch.zeros(1))])
    opt = CLASSES[kind]()
    assert list(opt.defaults) == list(topt.defaults)
    assert opt.defaults == topt.defaults
    assert opt.kind == kind
    assert opt._core_spec()["kind"] == kind


def test_repr_shows_every_hyperparameter():
    assert repr(gc.optim.Adam(lr=0.01, betas=(0.8, 0.99), amsgrad=True)) == (
        "Adam(lr=0.01, betas=(0.8, 0.99), eps=1e-08, weight_decay=0.0, amsgrad=True, maximize=False)"
    )
    assert repr(gc.optim.SGD(lr=0.1, momentum=0.9)) == (
        "SGD(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False)"
    )
    assert "centered=True" in repr(gc.optim.RMSprop(centered=True))
    assert "lr_decay=0.5" in repr(gc.optim.Adagrad(lr_decay=0.5))
    assert repr(lr_scheduler.CosineAnnealingLR(10, eta_min=0.01)) == (
        "CosineAnnealingLR(T_max=10, eta_min=0.01)"
    )
    assert "threshold_mode='abs'" in repr(lr_scheduler.ReduceLROnPlateau(threshold_mode="abs"))


def test_lr_scheduler_namespace():
    from gradchain.optim.lr_scheduler import StepLR

    assert gc.optim.lr_scheduler is gc.lr_scheduler
    assert StepLR is gc.optim.lr_scheduler.StepLR
    assert "optim" in gc.__all__


# --------------------------------------------------------------------------------------
# state_dict: torch's layout, round trips through torch and through gradchain

ROUND_TRIP = [
    ("sgd", {"lr": 0.05, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01}),
    ("sgd", {"lr": 0.05}),
    ("adam", {"lr": 0.01, "amsgrad": True, "weight_decay": 0.01}),
    ("adamw", {"lr": 0.01, "betas": (0.8, 0.99)}),
    ("rmsprop", {"lr": 0.01, "momentum": 0.5, "centered": True}),
    ("adagrad", {"lr": 0.1, "lr_decay": 0.01, "initial_accumulator_value": 0.1}),
]


@pytest.mark.parametrize("case", ROUND_TRIP, ids=[_case_id(c) for c in ROUND_TRIP])
def test_state_dict_continues_in_torch_and_back(case):
    torch = _torch()
    kind, hyper = case
    rng = np.random.default_rng(11)
    params, grads = _problem(rng, np.float64, steps=40)
    opt = CLASSES[kind](**hyper)
    for gs in grads[:20]:
        opt.step_arrays(params, gs)
    sd = opt.state_dict()
    assert [list(g) for g in sd["param_groups"]] == [[*opt.defaults, "params"]]
    assert sd["param_groups"][0]["params"] == [0, 1, 2, 3]
    for entry in sd["state"].values():
        assert all(isinstance(v, (float, np.ndarray)) for v in entry.values())
        assert ("step" in entry) == (kind != "sgd")
    if kind == "sgd" and "momentum" not in hyper:
        assert sd["state"] == {}  # torch keeps nothing for plain SGD
    # gradchain -> torch: load and continue; identical to gradchain continuing
    start = [p.copy() for p in params]
    tparams, topt = oracles.torch_optimizer_run(kind, hyper, start, grads[20:], state_dict=sd)
    for gs in grads[20:]:
        opt.step_arrays(params, gs)
    _compare(opt, params, tparams, topt, rtol=1e-12)
    # torch -> gradchain: torch's state_dict, tensors and all, continues in a new optimizer
    tsd = topt.state_dict()
    assert isinstance(tsd["state"].get(0, {}).get("step", torch.zeros(())), torch.Tensor)
    fresh = CLASSES[kind](**hyper)
    fresh.load_state_dict(tsd)
    more = oracles.torch_optimizer_run(kind, hyper, params, grads[:5], state_dict=opt.state_dict())
    mine = [p.copy() for p in params]
    for gs in grads[:5]:
        fresh.step_arrays(mine, gs)
    _compare(fresh, mine, *more, rtol=1e-12)


@pytest.mark.parametrize("kind", list(CLASSES))
def test_state_dict_round_trip_in_gradchain_is_exact(kind):
    rng = np.random.default_rng(5)
    params, grads = _problem(rng, np.float32, steps=10)
    hyper = {"momentum": 0.9} if kind in ("sgd", "rmsprop") else {}
    a = CLASSES[kind](**hyper)
    for gs in grads[:5]:
        a.step_arrays(params, gs)
    b = CLASSES[kind](**hyper)
    b.load_state_dict(a.state_dict())  # before b knows its dtype: kept until the first step
    c = pickle.loads(pickle.dumps(a))
    pb = [p.copy() for p in params]
    pc = [p.copy() for p in params]
    for gs in grads[5:]:
        a.step_arrays(params, gs)
        b.step_arrays(pb, gs)
        c.step_arrays(pc, gs)
    for p, q, r in zip(params, pb, pc):
        np.testing.assert_array_equal(p, q)
        np.testing.assert_array_equal(p, r)
    for entry in a.state_dict()["state"].values():
        assert all(v.dtype == np.float32 for k, v in entry.items() if k != "step")
    assert repr(c) == repr(a)


def test_load_state_dict_takes_the_saved_hyperparameters():
    a = gc.optim.Adam(lr=0.5, betas=(0.5, 0.6), amsgrad=True)
    w = np.ones(3)
    a.step_arrays([w], [np.ones(3)])
    b = gc.optim.Adam()
    b.load_state_dict(a.state_dict())
    assert b.defaults == a.defaults and b.lr == 0.5
    with pytest.raises(ValueError, match=r"AdamW.*decoupled_weight_decay"):
        gc.optim.Adam().load_state_dict(gc.optim.AdamW().state_dict())


def test_state_dict_reshapes_buffers_like_their_parameters():
    opt = gc.optim.Adam()
    ps = [np.ones((2, 3)), np.ones(4, dtype=np.float64)]
    opt.step_arrays(ps, [np.ones((2, 3)), np.ones(4)])
    st = opt.state_dict()["state"]
    assert st[0]["exp_avg"].shape == (2, 3) and st[1]["exp_avg_sq"].shape == (4,)
    st[0]["exp_avg"][:] = 7  # a copy
    assert opt.state_dict()["state"][0]["exp_avg"][0, 0] != 7


def test_strided_and_fortran_parameters_are_updated_in_place():
    rng = np.random.default_rng(2)
    base = rng.standard_normal((6, 8))
    g = rng.standard_normal((6, 8))
    ref = base.copy()
    gc.optim.SGD(lr=0.1, momentum=0.9).step_arrays([ref], [g])
    f = np.asfortranarray(base.copy())
    gc.optim.SGD(lr=0.1, momentum=0.9).step_arrays([f], [g])
    np.testing.assert_array_equal(f, ref)
    big = np.zeros((6, 16))
    big[:, ::2] = base
    view = big[:, ::2]
    gc.optim.SGD(lr=0.1, momentum=0.9).step_arrays([view], [g])
    np.testing.assert_array_equal(big[:, ::2], ref)
    assert (big[:, 1::2] == 0).all()


# --------------------------------------------------------------------------------------
# Learning-rate schedules against torch.optim.lr_scheduler

SCHEDULES = [
    ("StepLR", {"step_size": 7, "gamma": 0.5}),
    ("StepLR", {"step_size": 1, "gamma": 0.97}),
    ("ExponentialLR", {"gamma": 0.95}),
    ("ExponentialLR", {"gamma": 1.02}),
    ("CosineAnnealingLR", {"T_max": 30, "eta_min": 0.001}),  # past T_max: rising again
    ("CosineAnnealingLR", {"T_max": 1}),
    ("CosineAnnealingLR", {"T_max": 100}),
    ("LinearLR", {}),
    ("LinearLR", {"start_factor": 0.01, "end_factor": 1.0, "total_iters": 40}),
    ("LinearLR", {"start_factor": 1.0, "end_factor": 0.0, "total_iters": 60}),
    ("LinearLR", {"start_factor": 0.5, "total_iters": 0}),
]


def _plateau_losses() -> np.ndarray:
    """Improving, then flat (reductions every patience + 1 steps with cooldown in between),
    then noisy, with a spike and a NaN."""
    rng = np.random.default_rng(4)
    return np.concatenate(
        [
            np.linspace(2.0, 1.0, 15),
            np.full(35, 1.0),
            1.0 + 0.02 * rng.standard_normal(45),
            [50.0, np.nan, 0.5, 0.5, 0.5],
        ]
    )


PLATEAUS = [
    {"factor": 0.5, "patience": 3, "cooldown": 2, "min_lr": 0.004},
    {"mode": "max", "factor": 0.3, "patience": 2, "threshold": 0.01, "threshold_mode": "abs"},
    {
        "factor": 0.5,
        "patience": 0,
        "threshold": 0.001,
        "threshold_mode": "abs",
        "cooldown": 4,
        "eps": 0.01,
    },
    {},
]


@pytest.mark.parametrize(
    "sched",
    SCHEDULES,
    ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in a.items())}" for n, a in SCHEDULES],
)
def test_schedule_matches_torch(sched):
    _torch()
    name, args = sched
    want, _ = oracles.torch_schedule_lrs(name, args, 0.1, 100)
    ours = getattr(lr_scheduler, name)(**args)
    np.testing.assert_array_equal(ours.lrs(0.1, 100), want)
    core = ours._core_for(0.1)  # what a training loop drives
    got = []
    for _ in range(100):
        got.append(core.lr())
        core.step(0.0)
    np.testing.assert_array_equal(got, want)
    assert ours.get_last_lr() == [core.lr()]


@pytest.mark.parametrize(
    "args", PLATEAUS, ids=lambda a: "-".join(f"{k}={v}" for k, v in a.items()) or "defaults"
)
def test_plateau_matches_torch(args):
    _torch()
    losses = _plateau_losses()
    want, _ = oracles.torch_schedule_lrs("ReduceLROnPlateau", args, 0.1, len(losses), losses)
    sched = lr_scheduler.ReduceLROnPlateau(**args)
    np.testing.assert_array_equal(sched.lrs(0.1, len(losses), losses), want)
    core = sched._core_for(0.1)
    got = []
    for loss in losses:
        got.append(core.lr())
        core.step(float(loss))
    np.testing.assert_array_equal(got, want)


def test_plateau_script_reduces_and_cools_down():
    losses = _plateau_losses()
    with_cooldown = lr_scheduler.ReduceLROnPlateau(factor=0.5, patience=3, cooldown=2).lrs(
        0.1, 100, losses
    )
    without = lr_scheduler.ReduceLROnPlateau(factor=0.5, patience=3).lrs(0.1, 100, losses)
    drops = np.flatnonzero(np.diff(with_cooldown) < 0)
    assert len(drops) >= 4
    assert (np.diff(drops)[:3] == 3 + 1 + 2).all()  # patience + 1 bad steps, then 2 of cooldown
    assert (np.diff(np.flatnonzero(np.diff(without) < 0))[:3] == 4).all()
    floor = lr_scheduler.ReduceLROnPlateau(factor=0.5, patience=3, min_lr=0.02).lrs(
        0.1, 100, losses
    )
    assert floor.min() == 0.02


@pytest.mark.parametrize("name,args", [*SCHEDULES[::2], ("ReduceLROnPlateau", PLATEAUS[0])])
def test_schedule_state_dict_continues_in_torch_and_back(name, args):
    _torch()
    losses = _plateau_losses()
    ours = getattr(lr_scheduler, name)(**args)
    core = ours._core_for(0.1)
    for loss in losses[:37]:
        core.step(float(loss))
    sd = ours.state_dict()
    want = ours.lrs(0.1, 100, losses)[37:]
    got, tsched = oracles.torch_schedule_lrs(name, args, 0.1, 63, losses[37:], state_dict=sd)
    np.testing.assert_array_equal(got, want)
    back = getattr(lr_scheduler, name)(**args)
    back.load_state_dict(tsched.state_dict())
    again = getattr(lr_scheduler, name)(**args)
    again.load_state_dict(sd)
    core2 = again._core_for(0.1)
    rest = []
    for loss in losses[37:]:
        rest.append(core2.lr())
        core2.step(float(loss))
    np.testing.assert_array_equal(rest, want)
    assert back.get_last_lr() == [core2.lr()]


# --------------------------------------------------------------------------------------
# Bad input: errors naming the argument and the accepted values

BAD_OPTIMIZERS = [
    (gc.optim.SGD, {"lr": 0.0}, ValueError, r"lr must be a finite number > 0; got 0\.0"),
    (gc.optim.SGD, {"lr": -1e-3}, ValueError, r"lr must be a finite number > 0"),
    (gc.optim.Adam, {"lr": float("nan")}, ValueError, r"lr must be a finite number > 0; got nan"),
    (gc.optim.Adam, {"lr": float("inf")}, ValueError, r"lr must be a finite number > 0; got inf"),
    (gc.optim.Adam, {"lr": "0.1"}, TypeError, r"lr must be a real number"),
    (
        gc.optim.Adam,
        {"betas": (1.0, 0.999)},
        ValueError,
        r"betas\[0\] must be in \[0, 1\); got 1\.0",
    ),
    (gc.optim.AdamW, {"betas": (0.9, -0.1)}, ValueError, r"betas\[1\] must be in \[0, 1\)"),
    (gc.optim.Adam, {"betas": 0.9}, TypeError, r"betas must be a pair of numbers in \[0, 1\)"),
    (gc.optim.Adam, {"betas": (0.9, 0.99, 0.999)}, TypeError, r"betas must be a pair"),
    (
        gc.optim.SGD,
        {"nesterov": True},
        ValueError,
        r"nesterov=True needs momentum > 0 and dampening == 0",
    ),
    (
        gc.optim.SGD,
        {"nesterov": True, "momentum": 0.9, "dampening": 0.1},
        ValueError,
        r"dampening == 0; got momentum=0\.9, dampening=0\.1",
    ),
    (gc.optim.SGD, {"momentum": -0.1}, ValueError, r"momentum must be a finite number >= 0"),
    (
        gc.optim.SGD,
        {"weight_decay": -1e-4},
        ValueError,
        r"weight_decay must be a finite number >= 0",
    ),
    (gc.optim.SGD, {"dampening": float("nan")}, ValueError, r"dampening must be a finite number"),
    (
        gc.optim.AdamW,
        {"weight_decay": -0.01},
        ValueError,
        r"weight_decay must be a finite number >= 0",
    ),
    (gc.optim.Adam, {"eps": -1e-8}, ValueError, r"eps must be a finite number >= 0"),
    (gc.optim.Adam, {"amsgrad": 1}, TypeError, r"amsgrad must be True or False"),
    (gc.optim.Adam, {"maximize": "yes"}, TypeError, r"maximize must be True or False"),
    (gc.optim.RMSprop, {"alpha": -0.5}, ValueError, r"alpha must be a finite number >= 0"),
    (
        gc.optim.RMSprop,
        {"momentum": float("inf")},
        ValueError,
        r"momentum must be a finite number >= 0",
    ),
    (gc.optim.RMSprop, {"centered": None}, TypeError, r"centered must be True or False"),
    (gc.optim.Adagrad, {"lr_decay": -1.0}, ValueError, r"lr_decay must be a finite number >= 0"),
    (
        gc.optim.Adagrad,
        {"initial_accumulator_value": -0.1},
        ValueError,
        r"initial_accumulator_value must be",
    ),
    (gc.optim.Adagrad, {"eps": float("nan")}, ValueError, r"eps must be a finite number >= 0"),
]


@pytest.mark.parametrize(
    "cls,kwargs,exc,match",
    BAD_OPTIMIZERS,
    ids=[f"{c.__name__}-{k}" for c, k, _, _ in BAD_OPTIMIZERS],
)
def test_bad_hyperparameters(cls, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        cls(**kwargs)


def test_the_core_refuses_what_python_refuses():
    with pytest.raises(ValueError, match=r"lr must be a finite number > 0; got 0"):
        _core.Optimizer64({"kind": "adam", "lr": 0.0})
    with pytest.raises(ValueError, match=r"betas\[1\] must be in \[0, 1\)"):
        _core.Optimizer32({"kind": "adam", "beta2": 1.0})
    with pytest.raises(ValueError, match=r"nesterov=True needs momentum > 0"):
        _core.Optimizer64({"kind": "sgd", "nesterov": True})
    with pytest.raises(ValueError, match=r"optimizer must be one of 'sgd', 'adam'"):
        _core.Optimizer64({"kind": "lbfgs"})
    with pytest.raises(ValueError, match=r"unknown optimizer argument 'betas'"):
        _core.Optimizer64({"kind": "adam", "betas": (0.9, 0.99)})
    core = _core.Optimizer64({"kind": "sgd", "lr": 0.1})
    with pytest.raises(ValueError, match=r"lr must be a finite number >= 0; got -1"):
        core.step([np.ones(2)], [np.ones(2)], -1.0)
    with pytest.raises(ValueError, match=r"T_max must be an integer >= 1; got 0"):
        _core.LRSchedule({"kind": "cosine", "T_max": 0}, 0.1)
    with pytest.raises(ValueError, match=r"lr must be a finite number > 0"):
        _core.LRSchedule({"kind": "step"}, 0.0)
    with pytest.raises(ValueError, match=r"mode must be one of 'min', 'max'; got 'avg'"):
        _core.LRSchedule({"kind": "plateau", "mode": "avg"}, 0.1)


def test_bad_arrays():
    opt = gc.optim.Adam()
    w = np.ones(3)
    with pytest.raises(
        ValueError, match=r"params and grads must have the same length; got 1 and 2"
    ):
        opt.step_arrays([w], [np.ones(3), np.ones(3)])
    with pytest.raises(ValueError, match=r"grads\[0\] has shape \(4,\) but params\[0\] has \(3,\)"):
        opt.step_arrays([w], [np.ones(4)])
    with pytest.raises(
        TypeError, match=r"params\[0\] has dtype int64; parameters must be float32 or float64"
    ):
        opt.step_arrays([np.ones(3, dtype=np.int64)], [np.ones(3)])
    with pytest.raises(
        TypeError, match=r"params\[1\] has dtype float32 but params\[0\] has float64"
    ):
        opt.step_arrays([w, np.ones(2, dtype=np.float32)], [np.ones(3), np.ones(2)])
    ro = np.ones(3)
    ro.setflags(write=False)
    with pytest.raises(ValueError, match=r"params\[0\] is read-only"):
        opt.step_arrays([ro], [np.ones(3)])
    with pytest.raises(TypeError, match=r"params must be a list of numpy.ndarray"):
        opt.step_arrays(w, [np.ones(3)])
    with pytest.raises(ValueError, match=r"lr must be a finite number >= 0; got -0\.1"):
        opt.step_arrays([w], [np.ones(3)], lr=-0.1)
    opt.step_arrays([w], [np.ones(3)])
    with pytest.raises(ValueError, match=r"holds float64 state and cannot update float32"):
        opt.step_arrays([np.ones(3, dtype=np.float32)], [np.ones(3)])
    with pytest.raises(ValueError, match=r"holds the state of 1 parameters and cannot update 2"):
        opt.step_arrays([w, w.copy()], [np.ones(3), np.ones(3)])
    with pytest.raises(ValueError, match=r"parameter 0 has shape \(4,\) but its optimizer state"):
        opt.step_arrays([np.ones(4)], [np.ones(4)])
    with pytest.raises(ValueError, match=r"holds float64 state and cannot update float32"):
        opt._core_for("float32", 1)
    with pytest.raises(ValueError, match=r"dtype must be one of 'float32', 'float64'"):
        opt._core_for("int8", 1)
    core = opt._core_for("float64", 1)
    with pytest.raises(
        ValueError, match=r"params\[0\] has 5 numbers but its optimizer state has 3"
    ):
        core.step([np.ones(5)], [np.ones(5)], 0.1)
    with pytest.raises(TypeError, match=r"params\[0\] must have dtype float64"):
        core.step([np.ones(3, dtype=np.float32)], [np.ones(3)], 0.1)


def test_bad_state_dicts():
    saved = gc.optim.Adam()
    saved.step_arrays([np.ones(3)], [np.ones(3)])
    sd = saved.state_dict()
    with pytest.raises(ValueError, match=r"lacks the buffer 'max_exp_avg_sq'"):
        gc.optim.Adam().load_state_dict(
            {**sd, "param_groups": [{**sd["param_groups"][0], "amsgrad": True}]}
        )
    extra = {
        "state": {0: {**sd["state"][0], "momentum_buffer": np.ones(3)}},
        "param_groups": sd["param_groups"],
    }
    with pytest.raises(
        ValueError, match=r"has a buffer 'momentum_buffer' that this optimizer does not keep"
    ):
        gc.optim.Adam().load_state_dict(extra)
    stepless = {"state": {0: {"step": 3.0}}, "param_groups": sd["param_groups"]}
    with pytest.raises(ValueError, match=r"state of parameter 0 has step 3 but no buffers"):
        gc.optim.Adam().load_state_dict(stepless)
    with pytest.raises(ValueError, match=r"must hold one parameter group"):
        gc.optim.Adam().load_state_dict({"state": {}, "param_groups": [sd["param_groups"][0]] * 2})
    with pytest.raises(TypeError, match=r"mapping with keys 'state' and 'param_groups'"):
        gc.optim.Adam().load_state_dict([1, 2])
    with pytest.raises(ValueError, match=r"betas\[0\] must be in \[0, 1\)"):
        gc.optim.Adam().load_state_dict(
            {**sd, "param_groups": [{**sd["param_groups"][0], "betas": (1.5, 0.9)}]}
        )
    uneven = {
        "state": {0: {**sd["state"][0], "exp_avg": np.ones(2)}},
        "param_groups": sd["param_groups"],
    }
    with pytest.raises(ValueError, match=r"buffers must all have one size"):
        gc.optim.Adam().load_state_dict(uneven)
    with pytest.raises(
        ValueError, match=r"state_dict holds 2 parameters; this optimizer updates 1"
    ):
        saved.load_state_dict(
            {"state": {}, "param_groups": [{**sd["param_groups"][0], "params": [0, 1]}]}
        )
    before = saved.state_dict()
    with pytest.raises(ValueError):
        saved.load_state_dict(uneven)
    np.testing.assert_array_equal(
        saved.state_dict()["state"][0]["exp_avg"], before["state"][0]["exp_avg"]
    )


BAD_SCHEDULES = [
    (
        lr_scheduler.StepLR,
        {"step_size": 0},
        ValueError,
        r"step_size must be an integer >= 1; got 0",
    ),
    (lr_scheduler.StepLR, {"step_size": 2.5}, TypeError, r"step_size must be an integer >= 1"),
    (
        lr_scheduler.StepLR,
        {"step_size": 3, "gamma": 0.0},
        ValueError,
        r"gamma must be a finite number > 0",
    ),
    (
        lr_scheduler.ExponentialLR,
        {"gamma": float("inf")},
        ValueError,
        r"gamma must be a finite number > 0",
    ),
    (lr_scheduler.CosineAnnealingLR, {"T_max": 0}, ValueError, r"T_max must be an integer >= 1"),
    (
        lr_scheduler.CosineAnnealingLR,
        {"T_max": 5, "eta_min": -1.0},
        ValueError,
        r"eta_min must be a finite number >= 0",
    ),
    (
        lr_scheduler.LinearLR,
        {"start_factor": 0.0},
        ValueError,
        r"start_factor must be in \(0, 1\]; got 0\.0",
    ),
    (
        lr_scheduler.LinearLR,
        {"start_factor": 1.5},
        ValueError,
        r"start_factor must be in \(0, 1\]",
    ),
    (
        lr_scheduler.LinearLR,
        {"end_factor": 1.1},
        ValueError,
        r"end_factor must be in \[0, 1\]; got 1\.1",
    ),
    (
        lr_scheduler.LinearLR,
        {"total_iters": -1},
        ValueError,
        r"total_iters must be an integer >= 0",
    ),
    (
        lr_scheduler.ReduceLROnPlateau,
        {"mode": "avg"},
        ValueError,
        r"mode must be one of 'min', 'max'; got 'avg'",
    ),
    (
        lr_scheduler.ReduceLROnPlateau,
        {"factor": 1.0},
        ValueError,
        r"factor must be in \[0, 1\); got 1\.0",
    ),
    (
        lr_scheduler.ReduceLROnPlateau,
        {"patience": -1},
        ValueError,
        r"patience must be an integer >= 0",
    ),
    (
        lr_scheduler.ReduceLROnPlateau,
        {"threshold_mode": "relative"},
        ValueError,
        r"threshold_mode must be one of 'rel', 'abs'",
    ),
    (
        lr_scheduler.ReduceLROnPlateau,
        {"cooldown": 1.0},
        TypeError,
        r"cooldown must be an integer >= 0",
    ),
    (
        lr_scheduler.ReduceLROnPlateau,
        {"min_lr": -1e-6},
        ValueError,
        r"min_lr must be a finite number >= 0",
    ),
    (
        lr_scheduler.ReduceLROnPlateau,
        {"eps": float("nan")},
        ValueError,
        r"eps must be a finite number >= 0",
    ),
]


@pytest.mark.parametrize(
    "cls,kwargs,exc,match", BAD_SCHEDULES, ids=[f"{c.__name__}-{k}" for c, k, _, _ in BAD_SCHEDULES]
)
def test_bad_schedules(cls, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        cls(**kwargs)


def test_bad_schedule_use():
    sched = lr_scheduler.StepLR(step_size=3)
    with pytest.raises(ValueError, match=r"lr must be a finite number > 0; got 0\.0"):
        sched.lrs(0.0, 10)
    with pytest.raises(ValueError, match=r"steps must be an integer >= 0"):
        sched.lrs(0.1, -1)
    with pytest.raises(ValueError, match=r"losses must have shape \(3,\); got \(2,\)"):
        lr_scheduler.ReduceLROnPlateau().lrs(0.1, 3, [1.0, 2.0])
    sched._core_for(0.1)
    with pytest.raises(
        ValueError, match=r"runs a schedule from lr=0\.1; it cannot continue .* lr is 0\.2"
    ):
        sched._core_for(0.2)
    with pytest.raises(ValueError, match=r"last_epoch must be an integer >= 0"):
        lr_scheduler.StepLR(3).load_state_dict(
            {"base_lrs": [0.1], "last_epoch": -2, "_last_lr": [0.1]}
        )
