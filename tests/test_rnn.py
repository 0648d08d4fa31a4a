"""gradchain.RNN against the recurrent oracles (NumPy reference, torch autograd, torch's
fused modules, log-space renormalisation) and closed forms far outside the float range."""

from __future__ import annotations

import json
import math
import os
import pickle
import subprocess
import sys
import textwrap
import zlib
from dataclasses import dataclass

import numpy as np
import oracles as O
import pytest
from checks import assert_close, assert_log10, assert_scalar, run_python, ticks_while
from conftest import needs_torch, torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

RTOL = 1e-10
CELLS = ("tanh", "relu", "lstm", "gru")
GATES = {"tanh": 1, "relu": 1, "lstm": 4, "gru": 3}
LOSS_KINDS = ("probe", "mse_last", "mse_every", "ce_last", "ce_every", "grad_last", "grad_every")


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def _log10(x: float) -> float:
    return math.log10(x) if x > 0 else -math.inf


def slice_norms(a):
    """Frobenius norms over (batch, hidden) of a (layers, steps + 1, batch, hidden) array."""
    return np.sqrt(np.sum(np.asarray(a, dtype=np.float64) ** 2, axis=(2, 3)))


# --------------------------------------------------------------------------------------
# seeded random configurations
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RnnConfig:
    cell: str
    num_layers: int
    input_size: int
    hidden_size: int
    steps: int
    batch: int
    bias: bool
    output_size: int | None
    loss: str  # one of LOSS_KINDS
    h0: bool
    c0: bool
    truncate: int | None
    truncate_mode: str  # "none", "detach" or "window"
    max_norm: float | None
    norm_type: float
    source: str  # an RNN_INITS name, or "state_dict" (random arrays through from_state_dict)
    seed: int

    @property
    def id(self) -> str:
        ro = f"ro{self.output_size}" if self.output_size else "noro"
        states = ("-h0" if self.h0 else "") + ("-c0" if self.c0 else "")
        trunc = "full" if self.truncate is None else f"{self.truncate_mode}{self.truncate}"
        clip = "" if self.max_norm is None else f"-clip{self.max_norm:g}@{self.norm_type:g}"
        return (
            f"{self.cell}-L{self.num_layers}-in{self.input_size}-H{self.hidden_size}"
            f"-T{self.steps}-B{self.batch}-{'bias' if self.bias else 'nobias'}-{ro}"
            f"-{self.loss}{states}-{trunc}{clip}-{self.source}-s{self.seed % 1000}"
        )

    @property
    def n_out(self) -> int:
        return self.output_size or self.hidden_size

    def make_rnn(self, gc, dtype="float64"):
        if self.source == "state_dict":
            sd = O.random_rnn_state_dict(
                self.cell, self.input_size, self.hidden_size, self.num_layers,
                output_size=self.output_size, bias=self.bias,
                gain=0.6 + 0.6 * (self.seed % 97) / 97, bias_std=0.3, seed=self.seed,
            )  # fmt: skip
            return gc.RNN.from_state_dict(sd, self.cell, dtype=dtype)
        return gc.RNN(
            self.cell, self.input_size, self.hidden_size, self.num_layers,
            output_size=self.output_size, bias=self.bias, init=self.source, dtype=dtype,
            seed=self.seed,
        )  # fmt: skip

    def make_data(self):
        """x, the keyword arguments of RNN.backward and those of the oracles."""
        rng = np.random.default_rng(50_000 + self.seed)
        T, B, L, H = self.steps, self.batch, self.num_layers, self.hidden_size
        x = rng.normal(size=(T, B, self.input_size))
        gkw: dict = {}
        okw: dict = {}
        if self.h0:
            gkw["h0"] = okw["h0"] = rng.normal(size=(L, B, H)) * 0.5
        if self.c0:
            gkw["c0"] = okw["c0"] = rng.normal(size=(L, B, H))
        lead = (T,) if self.loss.endswith("every") else ()
        if self.loss == "probe":
            gkw["loss"] = okw["loss"] = "probe"
        elif self.loss.startswith("mse"):
            tgt = rng.normal(size=(*lead, B, self.n_out))
            gkw.update(loss="mse", target=tgt)
            okw.update(loss="mse", target=tgt)
        elif self.loss.startswith("ce"):
            tgt = rng.integers(0, self.n_out, size=(*lead, B)).astype(np.int64)
            gkw.update(loss="cross_entropy", target=tgt)
            okw.update(loss="cross_entropy", target=tgt)
        else:  # upstream gradients: the oracles call that loss "grad"
            g = rng.normal(size=(*lead, B, H))
            gkw["grad_output"] = g
            okw.update(loss="grad", target=g)
        if self.truncate is not None:
            gkw.update(truncate=self.truncate, truncate_mode=self.truncate_mode)
            okw.update(truncate=self.truncate, truncate_mode=self.truncate_mode)
        if self.max_norm is not None:
            gkw.update(max_norm=self.max_norm, norm_type=self.norm_type)
        return x, gkw, okw


def draw_configs(n: int = 40, seed: int = 20250101) -> list[RnnConfig]:
    """Every cell x every loss kind (the first 28), then random ones; all sizes small."""
    rng = np.random.default_rng(seed)
    pairs = [(c, lo) for c in CELLS for lo in LOSS_KINDS]
    rng.shuffle(pairs)
    while len(pairs) < n:
        pairs.append((CELLS[rng.integers(4)], LOSS_KINDS[rng.integers(len(LOSS_KINDS))]))
    modes = ["none", "detach", "window"] * (n // 3 + 1)
    rng.shuffle(modes)
    sources = (
        ["state_dict"] * 5 + ["default", "xavier_uniform", "xavier_normal", "orthogonal", "normal"]
    ) * (n // 10 + 1)
    rng.shuffle(sources)
    out = []
    for k, (cell, loss) in enumerate(pairs):
        T = int(rng.integers(1, 13))
        H = int(rng.integers(1, 8))
        if loss.startswith("ce") and k % 6:
            # a few single-class (zero-gradient) cases stay
            out_size = int(rng.integers(2, 6)) if rng.random() < 0.6 else None
            H = max(H, 2) if out_size is None else H
        elif loss.startswith("mse") or rng.random() < 0.3:
            out_size = int(rng.integers(1, 6)) if rng.random() < 0.6 else None
        else:
            out_size = None
        mode = modes[k]
        clip = rng.random() < 0.4
        out.append(
            RnnConfig(
                cell=cell,
                num_layers=int(rng.integers(1, 4)),
                input_size=int(rng.integers(1, 8)),
                hidden_size=H,
                steps=T,
                batch=int(rng.integers(1, 5)),
                bias=bool(rng.random() < 0.7),
                output_size=out_size,
                loss=loss,
                h0=bool(rng.random() < 0.5),
                c0=cell == "lstm" and bool(rng.random() < 0.5),
                truncate=None if mode == "none" else int(rng.integers(1, T + 2)),
                truncate_mode=mode,
                max_norm=float(rng.choice([0.0, 0.01, 0.1, 1.0, 100.0])) if clip else None,
                norm_type=float(rng.choice([2.0, math.inf, 1.5])) if clip else 2.0,
                source=str(sources[k]),
                seed=int(rng.integers(0, 2**31)),
            )
        )
    return out


CONFIGS = draw_configs()


def _ids(configs):
    return [c.id for c in configs]


def check_report(rep, ref, rnn, cfg_max_norm=None, norm_type=2.0, clipped=None, total=None):
    """`rep` (return_grads=True) against an oracle result with unclipped gradients.

    `clipped` / `total`: the clipped gradients and total norm by torch's
    clip_grad_norm_; computed here as min(1, max_norm / (total + 1e-6)) otherwise."""
    names = list(rnn.param_names)
    assert list(rep.param_grads) == names == list(ref["grads"])
    assert list(rep.log10_param_grad_norms) == names
    raw = [ref["grads"][n] for n in names]
    # norms are those before clipping
    for n, g in zip(names, raw):
        assert_log10(rep.log10_param_grad_norms[n], np.linalg.norm(g), what=f"log10 |d {n}|")
    if total is None:
        total = O.pnorm(raw, norm_type)
    assert rep.norm_type == norm_type
    assert_log10(rep.log10_total_norm, total, what="log10_total_norm")
    assert_scalar(rep.total_norm, total, what="total_norm")
    if cfg_max_norm is None:
        assert rep.max_norm is None and rep.log10_clip_coef == 0.0
        expected = raw
    else:
        assert rep.max_norm == cfg_max_norm
        coef = min(1.0, cfg_max_norm / (total + 1e-6))
        assert_scalar(rep.clip_coef, coef, what="clip_coef")
        expected = [coef * g for g in raw] if clipped is None else clipped
    for n, a, e in zip(names, rep.param_grads.values(), expected):
        assert_close(a, e, what=f"grads[{n!r}]")
    # state and cell gradients, whole arrays and per-(layer, step) norms
    assert_close(rep.state_grads, ref["state_grads"], what="state_grads")
    assert_log10(
        rep.log10_layer_state_grad_norms, slice_norms(ref["state_grads"]), what="log10 |dL/dh_t|"
    )
    if ref["cell_grads"] is None:
        assert rep.cell_grads is None and rep.log10_layer_cell_grad_norms is None
    else:
        assert_close(rep.cell_grads, ref["cell_grads"], what="cell_grads")
        assert_log10(
            rep.log10_layer_cell_grad_norms, slice_norms(ref["cell_grads"]), what="log10 |dL/dc_t|"
        )
    assert_scalar(rep.loss, ref["loss"], what="loss")
    if not math.isnan(ref["loss"]) and ref["loss"] > 0:
        assert abs(rep.log10_loss - math.log10(ref["loss"])) <= RTOL, "log10_loss"
    assert_close(rep.h_n, ref["h_n"], what="h_n")
    if ref["c_n"] is None:
        assert rep.c_n is None
    else:
        assert_close(rep.c_n, ref["c_n"], what="c_n")


def test_configs_cover_everything():
    seen = {(c.cell, c.loss) for c in CONFIGS}
    assert seen == {(c, lo) for c in CELLS for lo in LOSS_KINDS}
    for attr, values in (
        ("num_layers", {1, 2, 3}),
        ("bias", {True, False}),
        ("h0", {True, False}),
        ("truncate_mode", {"none", "detach", "window"}),
    ):
        assert {getattr(c, attr) for c in CONFIGS} == values, attr
    assert {c.norm_type for c in CONFIGS if c.max_norm is not None} == {2.0, math.inf, 1.5}
    assert any(c.c0 for c in CONFIGS)
    assert any(c.output_size for c in CONFIGS) and any(not c.output_size for c in CONFIGS)
    ks = [(c.truncate, c.steps) for c in CONFIGS if c.truncate is not None]
    assert (
        any(k == 1 for k, _ in ks) and any(k > t for k, t in ks) and any(1 < k < t for k, t in ks)
    )
    assert {c.source for c in CONFIGS} >= {"state_dict", "default", "orthogonal"}


# --------------------------------------------------------------------------------------
# 1. float64 parity on the random configurations
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", CONFIGS, ids=_ids(CONFIGS))
def test_parity_numpy(gc, cfg):
    rnn = cfg.make_rnn(gc)
    x, gkw, okw = cfg.make_data()
    rep = rnn.backward(x, return_grads=True, **gkw)
    ref = O.numpy_rnn_backward(cfg.cell, rnn.state_dict(), x, **okw)
    check_report(rep, ref, rnn, cfg.max_norm, cfg.norm_type)
    T = cfg.steps
    assert rep.log10_layer_state_grad_norms.shape == (cfg.num_layers, T + 1)
    assert rep.state_grads.shape == (cfg.num_layers, T + 1, cfg.batch, cfg.hidden_size)
    assert rep.truncate == cfg.truncate
    assert rep.truncate_mode == cfg.truncate_mode


@needs_torch
@pytest.mark.parametrize("cfg", CONFIGS, ids=_ids(CONFIGS))
def test_parity_torch(gc, cfg):
    rnn = cfg.make_rnn(gc)
    x, gkw, okw = cfg.make_data()
    rep = rnn.backward(x, return_grads=True, **gkw)
    ref = O.torch_rnn_backward(cfg.cell, rnn.state_dict(), x, **okw)
    clipped = total = None
    if cfg.max_norm is not None:
        params = [torch.tensor(ref["grads"][n]) for n in rnn.param_names]
        for p in params:
            p.grad = p.detach().clone()
        total = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_norm, cfg.norm_type))
        clipped = [p.grad.numpy() for p in params]
    check_report(rep, ref, rnn, cfg.max_norm, cfg.norm_type, clipped=clipped, total=total)


def test_without_return_grads_the_arrays_are_absent(gc):
    cfg = CONFIGS[0]
    rnn = cfg.make_rnn(gc)
    x, gkw, _ = cfg.make_data()
    a = rnn.backward(x, **gkw)
    b = rnn.backward(x, return_grads=True, **gkw)
    assert a.param_grads is None and a.state_grads is None and a.cell_grads is None
    np.testing.assert_array_equal(a.log10_layer_state_grad_norms, b.log10_layer_state_grad_norms)
    assert a.log10_param_grad_norms == b.log10_param_grad_norms


def test_default_loss_follows_the_target(gc, rng):
    rnn = gc.RNN("gru", 3, 4, output_size=3, seed=1)
    x = rng.normal(size=(5, 2, 3))
    sd = rnn.state_dict()
    a = rnn.backward(x)
    assert_scalar(a.loss, O.numpy_rnn_forward("gru", sd, x, loss="probe")["loss"], what="probe")
    tgt = rng.normal(size=(2, 3))
    b = rnn.backward(x, tgt)
    assert_scalar(b.loss, O.numpy_rnn_forward("gru", sd, x, loss="mse", target=tgt)["loss"])
    lab = np.array([0, 2])
    c = rnn.backward(x, lab)
    assert_scalar(
        c.loss, O.numpy_rnn_forward("gru", sd, x, loss="cross_entropy", target=lab)["loss"]
    )
    d = rnn.backward(x, grad_output=rng.normal(size=(2, 4)))
    assert math.isnan(d.loss) and math.isnan(d.log10_loss)


# --------------------------------------------------------------------------------------
# 2. the two-thread path (batch split in two)
# --------------------------------------------------------------------------------------
THREADED = [(cell, trunc) for cell in CELLS for trunc in (None, ("window", 7), ("detach", 16))]


@pytest.mark.parametrize(
    "cell,trunc",
    THREADED,
    ids=[f"{c}-{'full' if t is None else f'{t[0]}{t[1]}'}" for c, t in THREADED],
)
def test_two_thread_path_numpy(gc, cell, trunc):
    T, B, H, L, n_in, out = 200, 6, 16, 2, 5, 3
    assert B >= 2 and T * B * GATES[cell] * H * H >= 65536
    seed = zlib.crc32(f"threaded-{cell}-{trunc}".encode())
    rng = np.random.default_rng(seed)
    sd = O.random_rnn_state_dict(cell, n_in, H, L, output_size=out, gain=0.9, seed=seed)
    rnn = gc.RNN.from_state_dict(sd, cell)
    x = rng.normal(size=(T, B, n_in))
    tgt = rng.normal(size=(T, B, out))
    h0 = rng.normal(size=(L, B, H)) * 0.5
    kw = {} if trunc is None else {"truncate": trunc[1], "truncate_mode": trunc[0]}
    rep = rnn.backward(x, tgt, loss="mse", h0=h0, return_grads=True, **kw)
    ref = O.numpy_rnn_backward(cell, sd, x, h0=h0, loss="mse", target=tgt, **kw)
    check_report(rep, ref, rnn)


BIG = {"tanh": 1024, "relu": 1024, "lstm": 512, "gru": 600}


@pytest.mark.parametrize("cell", CELLS)
def test_batch_of_one_with_large_products_numpy(gc, cell):
    """A batch of one whose products reach 2^20 multiply-adds per step: each product's
    columns are split in two fixed halves (the path a batch split cannot take)."""
    H, T, L, n_in, out = BIG[cell], 3, 2, 5, 3
    assert GATES[cell] * H * H >= 2**20
    seed = zlib.crc32(f"big-{cell}".encode())
    rng = np.random.default_rng(seed)
    sd = O.random_rnn_state_dict(cell, n_in, H, L, output_size=out, gain=0.9, seed=seed)
    rnn = gc.RNN.from_state_dict(sd, cell)
    x = rng.normal(size=(T, 1, n_in))
    tgt = rng.normal(size=(T, 1, out))
    h0 = rng.normal(size=(L, 1, H)) * 0.5
    rep = rnn.backward(x, tgt, loss="mse", h0=h0, return_grads=True)
    ref = O.numpy_rnn_backward(cell, sd, x, h0=h0, loss="mse", target=tgt)
    check_report(rep, ref, rnn)


# --------------------------------------------------------------------------------------
# 3. torch.nn.RNN / LSTM / GRU modules
# --------------------------------------------------------------------------------------
def _torch_module(cell, n_in, H, L, bias=True, dtype=None):
    kw = {"bias": bias, "dtype": dtype or torch.float64}
    if cell in ("tanh", "relu"):
        return torch.nn.RNN(n_in, H, L, nonlinearity=cell, **kw)
    if cell == "lstm":
        return torch.nn.LSTM(n_in, H, L, **kw)
    return torch.nn.GRU(n_in, H, L, **kw)


def _module_forward(mod, cell, x, h0, c0):
    with torch.no_grad():
        xt = torch.from_numpy(np.asarray(x))
        if cell == "lstm":
            out, (h_n, c_n) = mod(xt, (torch.from_numpy(h0), torch.from_numpy(c0)))
            return out.numpy(), h_n.numpy(), c_n.numpy()
        out, h_n = mod(xt, torch.from_numpy(h0))
        return out.numpy(), h_n.numpy(), None


@needs_torch
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_gradchain_parameters_in_torch_modules(gc, cell, bias, rng):
    T, B, n_in, H, L, out = 7, 3, 4, 5, 2, 3
    rnn = gc.RNN(cell, n_in, H, L, output_size=out, bias=bias, init="orthogonal", seed=5)
    sd = rnn.state_dict()
    mod = _torch_module(cell, n_in, H, L, bias)
    mod.load_state_dict(
        {k: torch.from_numpy(a) for k, a in sd.items() if not k.startswith("readout.")}, strict=True
    )
    x = rng.normal(size=(T, B, n_in))
    h0 = rng.normal(size=(L, B, H)) * 0.5
    c0 = rng.normal(size=(L, B, H)) if cell == "lstm" else None
    kw = {"c0": c0} if cell == "lstm" else {}
    # forward of the loaded module == gradchain's forward
    o_t, h_t, c_t = _module_forward(mod, cell, x, h0, c0 if c0 is not None else None)
    o_g, h_g, c_g = rnn.forward(x, h0=h0, **kw)
    assert_close(o_g, o_t, what="output")
    assert_close(h_g, h_t, what="h_n")
    if cell == "lstm":
        assert_close(c_g, c_t, what="c_n")
    # full BPTT through the fused module: same parameter gradients, every-step mse
    tgt = rng.normal(size=(T, B, out))
    ref = O.torch_module_backward(cell, sd, x, h0=h0, loss="mse", target=tgt, **kw)
    rep = rnn.backward(x, tgt, loss="mse", h0=h0, return_grads=True, **kw)
    assert list(rep.param_grads) == list(ref["grads"])
    for n in rep.param_grads:
        assert_close(rep.param_grads[n], ref["grads"][n], what=n)
        assert_log10(rep.log10_param_grad_norms[n], np.linalg.norm(ref["grads"][n]), what=n)
    assert_scalar(rep.loss, ref["loss"], what="loss")
    assert_close(rep.state_grads[:, 0], ref["h0_grad"], what="dL/dh0")
    if cell == "lstm":
        assert_close(rep.cell_grads[:, 0], ref["c0_grad"], what="dL/dc0")


@needs_torch
@pytest.mark.parametrize("cell", CELLS)
def test_from_torch_module_state_dict(gc, cell, rng):
    T, B, n_in, H, L = 6, 2, 3, 4, 3
    torch.manual_seed(zlib.crc32(cell.encode()))
    mod = _torch_module(cell, n_in, H, L)
    tsd = mod.state_dict()
    rnn = gc.RNN.from_state_dict(tsd, cell)  # tensors as given
    assert rnn.dtype == np.float64
    assert (rnn.cell, rnn.input_size, rnn.hidden_size, rnn.num_layers) == (cell, n_in, H, L)
    assert rnn.output_size is None and rnn.bias
    assert list(rnn.param_names) == list(tsd)
    for k, a in rnn.state_dict().items():
        np.testing.assert_array_equal(a, tsd[k].numpy())
    x = rng.normal(size=(T, B, n_in))
    h0 = rng.normal(size=(L, B, H))
    c0 = rng.normal(size=(L, B, H)) if cell == "lstm" else None
    kw = {"c0": c0} if cell == "lstm" else {}
    o_t, h_t, c_t = _module_forward(mod, cell, x, h0, c0)
    o_g, h_g, c_g = rnn.forward(x, h0=h0, **kw)
    assert_close(o_g, o_t, what="output")
    assert_close(h_g, h_t, what="h_n")
    if cell == "lstm":
        assert_close(c_g, c_t, what="c_n")
    else:
        assert c_g is None
    # backward's final states are the same as forward's
    rep = rnn.backward(x, h0=h0, **kw)
    assert_close(rep.h_n, h_t, what="backward h_n")
    if cell == "lstm":
        assert_close(rep.c_n, c_t, what="backward c_n")
    # and the gradients through the fused module
    ref = O.torch_module_backward(cell, tsd, x, h0=h0, loss="probe", **kw)
    rep = rnn.backward(x, h0=h0, return_grads=True, **kw)
    for n in rep.param_grads:
        assert_close(rep.param_grads[n], ref["grads"][n], what=n)


@needs_torch
@pytest.mark.parametrize("cell", CELLS)
def test_float32_torch_state_dict_gives_a_float32_rnn(gc, cell, rng):
    torch.manual_seed(3)
    mod = _torch_module(cell, 3, 5, 2, dtype=torch.float32)
    rnn = gc.RNN.from_state_dict(mod.state_dict(), cell)
    assert rnn.dtype == np.float32
    sd = rnn.state_dict()
    assert all(a.dtype == np.float32 for a in sd.values())
    for k, a in sd.items():
        np.testing.assert_array_equal(a, mod.state_dict()[k].numpy())
    x = rng.normal(size=(4, 2, 3)).astype(np.float32)
    h0 = rng.normal(size=(2, 2, 5)).astype(np.float32)
    c0 = rng.normal(size=(2, 2, 5)).astype(np.float32) if cell == "lstm" else None
    out, h_n, c_n = rnn.forward(x, h0=h0, c0=c0)
    assert out.dtype == np.float32
    o_t, h_t, c_t = _module_forward(mod, cell, x, h0, c0)
    np.testing.assert_allclose(out, o_t, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(h_n, h_t, rtol=1e-5, atol=1e-6)
    if cell == "lstm":
        np.testing.assert_allclose(c_n, c_t, rtol=1e-5, atol=1e-6)
    # an explicit dtype wins; a mixture is float64
    assert gc.RNN.from_state_dict(mod.state_dict(), cell, dtype="float64").dtype == np.float64
    mixed = {k: (v.double() if k == "weight_ih_l0" else v) for k, v in mod.state_dict().items()}
    assert gc.RNN.from_state_dict(mixed, cell).dtype == np.float64


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_state_dict_round_trip(gc, cell, dtype):
    rnn = gc.RNN(cell, 3, 4, 2, output_size=2, init="xavier_normal", dtype=dtype, seed=11)
    sd = rnn.state_dict()
    again = gc.RNN.from_state_dict(sd, cell)
    assert again.dtype == rnn.dtype
    sd2 = again.state_dict()
    assert list(sd2) == list(sd) == list(rnn.param_names)
    for k in sd:
        assert sd2[k].dtype == sd[k].dtype and sd2[k].shape == sd[k].shape
        np.testing.assert_array_equal(sd2[k], sd[k])
    assert (again.input_size, again.hidden_size, again.num_layers, again.output_size) == (
        3,
        4,
        2,
        2,
    )
    # state_dict returns copies
    sd["weight_hh_l0"][...] = 0
    assert np.any(rnn.state_dict()["weight_hh_l0"] != 0)


# --------------------------------------------------------------------------------------
# 4. float32
# --------------------------------------------------------------------------------------
F32 = [
    ("tanh", "probe"), ("relu", "mse"), ("lstm", "cross_entropy"), ("gru", "mse"),
    ("lstm", "probe"), ("gru", "cross_entropy"),
]  # fmt: skip


@pytest.mark.parametrize("cell,loss", F32, ids=[f"{c}-{lo}" for c, lo in F32])
def test_float32_against_float64_oracle(gc, cell, loss, rng):
    T, B, n_in, H, L, out = 20, 3, 4, 8, 2, 4
    rnn = gc.RNN(cell, n_in, H, L, output_size=out, init="orthogonal", dtype="float32", seed=2)
    rnn64 = gc.RNN(cell, n_in, H, L, output_size=out, init="orthogonal", seed=2)
    for k, a in rnn.state_dict().items():
        np.testing.assert_array_equal(a, rnn64.state_dict()[k].astype(np.float32))
    x = rng.normal(size=(T, B, n_in)).astype(np.float32)
    kw = {}
    if loss == "mse":
        kw["target"] = rng.normal(size=(T, B, out)).astype(np.float32)
    elif loss == "cross_entropy":
        kw["target"] = rng.integers(0, out, size=(T, B))
    rep = rnn.backward(x, loss=loss, return_grads=True, **kw)
    ref = O.numpy_rnn_backward(cell, rnn.state_dict(), x, loss=loss, **kw)
    assert rep.param_grads["weight_hh_l0"].dtype == np.float32
    tol = 1e-4 / math.log(10)
    with np.errstate(divide="ignore"):
        np.testing.assert_allclose(
            rep.log10_layer_state_grad_norms, np.log10(slice_norms(ref["state_grads"])), atol=tol
        )
        if cell == "lstm":
            np.testing.assert_allclose(
                rep.log10_layer_cell_grad_norms, np.log10(slice_norms(ref["cell_grads"])), atol=tol
            )
    for n in rnn.param_names:
        g = ref["grads"][n]
        expected = _log10(float(np.linalg.norm(g)))
        if expected == -math.inf:  # e.g. the read-out under the probe loss
            assert rep.log10_param_grad_norms[n] == -math.inf, n
        else:
            assert abs(rep.log10_param_grad_norms[n] - expected) <= tol, n
        assert np.linalg.norm(rep.param_grads[n] - g) <= 1e-4 * np.linalg.norm(g), n
    assert abs(rep.log10_total_norm - math.log10(O.pnorm(list(ref["grads"].values())))) <= tol
    assert abs(rep.loss - ref["loss"]) <= 1e-4 * abs(ref["loss"])


# --------------------------------------------------------------------------------------
# 5. log space: closed forms and the renormalised oracle far outside the float range
# --------------------------------------------------------------------------------------
def test_vanishing_closed_form_over_100k_steps(gc):
    """relu, W_hh = c P (P a permutation), b_hh = 1: the states stay positive, so
    dL/dh_{t-1} = c P^T dL/dh_t and ||dL/dh_t|| = ||h_T|| c^(T - t) exactly."""
    H, T, c = 64, 100_000, 0.99
    P = np.eye(H)[np.random.default_rng(0).permutation(H)]
    sd = {
        "weight_ih_l0": np.zeros((H, 1)),
        "weight_hh_l0": c * P,
        "bias_ih_l0": np.zeros(H),
        "bias_hh_l0": np.ones(H),
    }
    rnn = gc.RNN.from_state_dict(sd, "relu")
    rep = rnn.backward(np.zeros((T, 1, 1)))
    h_T = rep.h_n[0]
    assert np.all(h_T > 0)
    log_hT = math.log10(float(np.linalg.norm(h_T)))
    expected = log_hT + (T - np.arange(T + 1)) * math.log10(c)
    got = rep.log10_state_grad_norms
    assert got.shape == (T + 1,)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-8)
    assert got[0] < -430 and math.isfinite(got[0])
    assert rep.state_grad_norms[0] == 0.0
    assert rep.state_grad_norms[-1] == pytest.approx(10**log_hT, rel=1e-12)
    # dL/db_hh = sum_t dL/dh_t (relu' = 1) = h_T (1 - c^T) / (1 - c)
    expect_b = log_hT + math.log10((1 - c**T) / (1 - c))
    assert abs(rep.log10_param_grad_norms["bias_hh_l0"] - expect_b) <= 1e-8
    assert rep.log10_param_grad_norms["weight_ih_l0"] == -math.inf  # x = 0: exactly zero


def test_exploding_closed_form_beyond_float_range(gc, rng):
    """relu, W_hh = 1.5 I, positive h0 = 1e-300 u, x = 0, no bias: h_T ~ 1e228 stays finite,
    and ||dL/dh_t|| = ||g|| 1.5^(T - t) reaches ~1e528 at t = 0."""
    H, T, B, a = 6, 3000, 2, 1.5
    sd = {"weight_ih_l0": rng.normal(size=(H, 1)), "weight_hh_l0": a * np.eye(H)}
    rnn = gc.RNN.from_state_dict(sd, "relu")
    u = rng.uniform(0.5, 1.0, size=(1, B, H))
    h0 = 1e-300 * u
    g = rng.normal(size=(B, H))
    rep = rnn.backward(np.zeros((T, B, 1)), grad_output=g, h0=h0)
    assert np.all(np.isfinite(rep.h_n)) and rep.h_n.max() > 1e220
    log_g = math.log10(float(np.linalg.norm(g)))
    expected = log_g + (T - np.arange(T + 1)) * math.log10(a)
    got = rep.log10_state_grad_norms
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-8)
    assert got[0] > 520
    assert rep.state_grad_norms[0] == math.inf
    # dL/dW_hh = sum_t (1.5^(T-t) g)(1.5^(t-1) h0)^T = T 1.5^(T-1) g h0^T (summed over the batch)
    M = sum(np.outer(g[b], u[0, b]) for b in range(B))
    expect_w = math.log10(T) + (T - 1) * math.log10(a) - 300 + math.log10(np.linalg.norm(M))
    assert abs(rep.log10_param_grad_norms["weight_hh_l0"] - expect_w) <= 1e-8
    assert rep.log10_param_grad_norms["weight_ih_l0"] == -math.inf
    assert abs(rep.log10_total_norm - expect_w) <= 1e-8  # the only nonzero gradient


def _vanishing_chain(cell, L, T=3000, B=2, n_in=3, H=8):
    seed = zlib.crc32(f"vanish-{cell}".encode())
    rng = np.random.default_rng(seed)
    sd = O.random_rnn_state_dict(cell, n_in, H, L, gain=0.5, bias_std=0.3, seed=seed)
    if cell == "lstm":  # a small forget gate: the cell gradient decays quickly
        sd[f"bias_ih_l{L - 1}"][H : 2 * H] = -2.0
    x = rng.normal(size=(T, B, n_in))
    h0 = rng.normal(size=(L, B, H)) * 0.5
    c0 = rng.normal(size=(L, B, H)) if cell == "lstm" else None
    return sd, x, h0, c0, rng.normal(size=(B, H))


@pytest.mark.parametrize("cell", ["tanh", "lstm"])
def test_vanishing_chain_against_renormalised_oracle(gc, cell):
    sd, x, h0, c0, g = _vanishing_chain(cell, 1)
    rnn = gc.RNN.from_state_dict(sd, cell)
    rep = rnn.backward(x, h0=h0, c0=c0)
    ref = O.renormalised_rnn_log10_state_norms(cell, sd, x, h0=h0, c0=c0)
    got = rep.log10_state_grad_norms
    assert ref[0] < -400 and math.isfinite(ref[0])  # far below float64's range
    assert rep.state_grad_norms[0] == 0.0
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-9)
    if cell == "lstm":
        ref_c = O.renormalised_rnn_log10_cell_norms(cell, sd, x, h0=h0, c0=c0)
        assert ref_c[0] < -400
        np.testing.assert_allclose(rep.log10_cell_grad_norms, ref_c, rtol=0, atol=1e-9)
    # a last-step upstream gradient instead of the probe
    rep = rnn.backward(x, h0=h0, c0=c0, grad_output=g)
    ref = O.renormalised_rnn_log10_state_norms(cell, sd, x, h0=h0, c0=c0, grad_output=g)
    np.testing.assert_allclose(rep.log10_state_grad_norms, ref, rtol=0, atol=1e-9)


@pytest.mark.parametrize("cell", ["tanh", "lstm"])
def test_vanishing_two_layer_chain_top_layer(gc, cell):
    """With a last-step loss the top layer's state gradients do not depend on the layer
    below: they equal those of a one-layer chain fed the bottom layer's outputs. (The
    renormalised oracle shares one scale between the layers, so it cannot follow a top
    layer that vanishes faster than the bottom one; this splits the chain instead.)"""
    sd, x, h0, c0, _ = _vanishing_chain(cell, 2)
    rep = gc.RNN.from_state_dict(sd, cell).backward(x, h0=h0, c0=c0)
    top = {k.replace("_l1", "_l0"): v for k, v in sd.items() if k.endswith("_l1")}
    bottom = {k: v for k, v in sd.items() if k.endswith("_l0")}
    y, _, _ = gc.RNN.from_state_dict(bottom, cell).forward(
        x, h0=h0[:1], c0=None if c0 is None else c0[:1]
    )
    kw = {"h0": h0[1:], "c0": None if c0 is None else c0[1:]}
    one = gc.RNN.from_state_dict(top, cell).backward(y, **kw)
    ref = O.renormalised_rnn_log10_state_norms(cell, top, y, **kw)
    assert ref[0] < -400
    np.testing.assert_allclose(one.log10_state_grad_norms, ref, rtol=0, atol=1e-9)
    np.testing.assert_allclose(rep.log10_state_grad_norms, ref, rtol=0, atol=1e-9)
    assert np.all(np.isfinite(rep.log10_layer_state_grad_norms))
    if cell == "lstm":
        ref_c = O.renormalised_rnn_log10_cell_norms(cell, top, y, **kw)
        np.testing.assert_allclose(rep.log10_cell_grad_norms, ref_c, rtol=0, atol=1e-9)


def test_exploding_weight_hh_gradient_in_float32(gc):
    """relu, W_hh = 1.5, W_ih = 1, x = 1e-20, T = 300: dL/dh_t reaches 1.5^299 ~ 1e53,
    beyond float32 (h_T ~ 1e33 stays finite). dL/dW_hh ~ 2.7e35 is a float32."""
    sd = {"weight_ih_l0": np.ones((1, 1)), "weight_hh_l0": np.array([[1.5]])}
    T = 300
    x = np.full((T, 1, 1), np.float32(1e-20))
    g = np.ones((1, 1))
    rnn = gc.RNN.from_state_dict(sd, "relu", dtype="float32")
    rep = rnn.backward(x, grad_output=g, return_grads=True)
    ref = O.numpy_rnn_backward("relu", rnn.state_dict(), x, loss="grad", target=g)
    np.testing.assert_allclose(
        rep.log10_state_grad_norms, np.log10(slice_norms(ref["state_grads"])[0]), atol=1e-5
    )
    for n in ("weight_ih_l0", "weight_hh_l0"):
        e = ref["grads"][n]
        assert abs(rep.log10_param_grad_norms[n] - math.log10(np.linalg.norm(e))) <= 1e-5, (
            n, rep.log10_param_grad_norms[n], math.log10(np.linalg.norm(e)),
        )  # fmt: skip
        np.testing.assert_allclose(rep.param_grads[n], e, rtol=1e-4, err_msg=n)


def test_clipping_in_the_exploding_regime(gc):
    """relu, W_hh = 1.5, h0 = 1, x = 0, T = 1200: dL/dW_hh = T 1.5^(T-1) ~ 1.6e214 is a
    float; clipping to max_norm = 1 must leave a gradient of norm ~1."""
    sd = {"weight_ih_l0": np.zeros((1, 1)), "weight_hh_l0": np.array([[1.5]])}
    T = 1200
    rnn = gc.RNN.from_state_dict(sd, "relu")
    kw = {"grad_output": np.ones((1, 1)), "h0": np.ones((1, 1, 1)), "return_grads": True}
    expected = math.log10(T) + (T - 1) * math.log10(1.5)
    rep = rnn.backward(np.zeros((T, 1, 1)), **kw)
    assert rep.param_grads["weight_hh_l0"][0, 0] == pytest.approx(10**expected, rel=1e-10)
    assert abs(rep.log10_param_grad_norms["weight_hh_l0"] - expected) <= 1e-9
    assert abs(rep.log10_total_norm - expected) <= 1e-9
    rep = rnn.backward(np.zeros((T, 1, 1)), max_norm=1.0, **kw)
    assert abs(rep.log10_clip_coef + expected) <= 1e-9
    assert rep.param_grads["weight_hh_l0"][0, 0] == pytest.approx(1.0, rel=1e-6)


# --------------------------------------------------------------------------------------
# exact at every magnitude: gradients, states, weights and losses far from 1, against
# torch float64 autograd wherever it can hold the values, else closed forms
# --------------------------------------------------------------------------------------
def assert_log10_values(actual, expected, atol=1e-9, what=""):
    """log10 norms against log10 norms: the same -inf (exact zeros), else within atol."""
    a = np.atleast_1d(np.asarray(actual, dtype=np.float64))
    e = np.atleast_1d(np.asarray(expected, dtype=np.float64))
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    assert np.array_equal(np.isneginf(a), np.isneginf(e)), (what, a, e)
    fin = ~np.isneginf(e)
    np.testing.assert_allclose(a[fin], e[fin], rtol=0, atol=atol, err_msg=what)


def check_torch_norms(rep, ref, atol=1e-9, params=True, states=True):
    """Every log10 norm of a report against torch_rnn_backward's arrays, taken at a scale
    that cannot overflow (torch's own float norms may)."""
    if params:
        for n, g in ref["grads"].items():
            assert_log10_values(rep.log10_param_grad_norms[n], O.log10_norm(g), atol, n)
    if states:
        assert_log10_values(
            rep.log10_layer_state_grad_norms,
            O.log10_norm(ref["state_grads"], axis=(2, 3)),
            atol,
            "log10 |dL/dh_t|",
        )
        if ref["cell_grads"] is not None:
            assert_log10_values(
                rep.log10_layer_cell_grad_norms,
                O.log10_norm(ref["cell_grads"], axis=(2, 3)),
                atol,
                "log10 |dL/dc_t|",
            )


def _decaying_lstm(gc, T):
    rnn = gc.RNN("lstm", 3, 8, bias=False, init="normal", seed=0)
    x = np.zeros((T, 2, 3))
    x[0] = np.random.default_rng(0).standard_normal((2, 3))
    return rnn, x


@needs_torch
@pytest.mark.parametrize("T", [200, 300, 400])
def test_lstm_parameter_norms_while_the_states_decay(gc, T):
    """Zero inputs after the first step: the states decay to ~1e-40 (T = 200), ~1e-60
    (300, the edge of the band) and ~1e-80 (400, beyond it) while the state gradients grow
    back towards the loss; each step's weight_hh term is about equally large, at very
    different gradient exponents."""
    rnn, x = _decaying_lstm(gc, T)
    rep = rnn.backward(x, return_grads=True)
    ref = O.torch_rnn_backward("lstm", rnn.state_dict(), x)
    assert rep.h_n.max() < 10.0 ** (-0.19 * T + 2)
    check_torch_norms(rep, ref)
    for n, g in ref["grads"].items():
        assert_close(rep.param_grads[n], g, what=n)


@needs_torch
@pytest.mark.parametrize("scale", [3.7e-60, 1e-100], ids=["in-band", "below-band"])
def test_tanh_hidden_one_with_tiny_inputs(gc, scale):
    rng = np.random.default_rng(7)
    sd = {"weight_ih_l0": np.array([[1.3]]), "weight_hh_l0": np.array([[0.8]])}
    x = scale * (1.0 + 0.5 * rng.random((3, 1, 1)))
    rnn = gc.RNN.from_state_dict(sd, "tanh")
    rep = rnn.backward(x, return_grads=True)
    ref = O.torch_rnn_backward("tanh", sd, x)
    check_torch_norms(rep, ref)
    for n, g in ref["grads"].items():
        assert_close(rep.param_grads[n], g, what=n)


@needs_torch
@pytest.mark.parametrize("cell", CELLS)
def test_huge_recurrent_weights_against_torch(gc, cell):
    """weight_hh = 1e100 I (every gate block): products with it leave the float range
    unless the weight's scale is carried as an exponent; torch float64 still holds every
    value of this chain."""
    G = GATES[cell]
    sd = {
        "weight_ih_l0": np.tile(np.eye(2), (G, 1)),
        "weight_hh_l0": 1e100 * np.tile(np.eye(2), (G, 1)),
    }
    x = np.ones((2, 1, 2))
    rnn = gc.RNN.from_state_dict(sd, cell)
    rep = rnn.backward(x, return_grads=True)
    ref = O.torch_rnn_backward(cell, sd, x)
    check_torch_norms(rep, ref)
    if cell == "relu":  # dW_hh = (1 + w) 1 1^T: 10^100.30
        assert abs(rep.log10_param_grad_norms["weight_hh_l0"] - math.log10(2e100)) < 1e-12


@needs_torch
def test_gradient_arriving_after_the_carried_one_vanished(gc):
    """tanh, W_hh = -1.3e81: the saturated states stop the carried gradient exactly, while
    W_hh's exponent would still be added every step; the gradient arriving at step 1 must
    not be scaled into underflow by it."""
    sd = {"weight_ih_l0": np.array([[0.12573]]), "weight_hh_l0": np.array([[-1.32105e81]])}
    x = np.array([0.12573, -0.1321, 0.64042, 0.1049, -0.53567]).reshape(5, 1, 1)
    g = np.array([0.3616, 1.304, 0.94708, -0.70374, -1.26542]).reshape(5, 1, 1)
    rep = gc.RNN.from_state_dict(sd, "tanh").backward(x, grad_output=g)
    ref = O.torch_rnn_backward("tanh", sd, x, loss="grad", target=g)
    check_torch_norms(rep, ref)
    assert rep.log10_state_grad_norms[0] > 80


@needs_torch
def test_lstm_state_and_cell_gradients_far_apart(gc):
    """Saturated gates (i = 0, f = o = 1 exactly) stop dL/dh at step 2 while dL/dc ~ 1e200
    flows on; the gradient 1e-150 arriving at h_1 is 1e-350 times dL/dc_1, beyond a shared
    exponent's reach but within torch float64's."""
    H = 1
    sd = {
        "weight_ih_l0": np.full((4 * H, 1), 1e-3),
        "weight_hh_l0": np.full((4 * H, H), 1e-3),
        "bias_ih_l0": np.array([-1000.0, 100.0, 0.3, 100.0]),
        "bias_hh_l0": np.zeros(4 * H),
    }
    x = np.ones((2, 1, 1))
    g = np.array([1e-150, 1e200]).reshape(2, 1, 1)
    c0 = np.full((1, 1, H), 0.5)
    rep = gc.RNN.from_state_dict(sd, "lstm").backward(x, grad_output=g, c0=c0)
    ref = O.torch_rnn_backward("lstm", sd, x, loss="grad", target=g, c0=c0)
    check_torch_norms(rep, ref)
    assert abs(rep.log10_state_grad_norms[1] + 150) < 1e-12
    assert rep.log10_cell_grad_norms[1] > 199


# (dtype, largest input or state, largest upstream gradient, smallest gradient, smallest
# input or state). Beyond the band: the largest of each at 1e200 (float32: 1e30). Inside it:
# the inputs and states, while the gradients span 1e320 (float32: 1e40), more than one
# exponent can hold at full precision.
SMALL_ROWS = {
    "f64-beyond-band": ("float64", 1e200, 1e200, 1e-25, 1e-25),
    "f64-inside-band": ("float64", 1e50, 1e200, 1e-120, 1e-60),
    "f32-beyond-band": ("float32", 1e30, 1e30, 0.25, 0.25),
    "f32-inside-band": ("float32", 1e6, 1e30, 1e-10, 1e-6),
}


@needs_torch
@pytest.mark.parametrize("case", list(SMALL_ROWS))
@pytest.mark.parametrize("layout", ["batch", "time"])
@pytest.mark.parametrize("weight", ["weight_ih_l0", "weight_hh_l0"])
@pytest.mark.parametrize("cell", CELLS)
def test_weight_gradient_left_to_rows_small_in_both_factors(gc, cell, weight, layout, case):
    """dW = sum over rows of D^T M, with M = x (weight_ih) or h_{t-1} (weight_hh) and D the
    gradient at the cell's pre-activations, over three rows: the examples of one step
    ("batch") or the steps of one example ("time"). M = (big, 0, small) and D = (0, gbig,
    gsmall): each factor's largest entry lies where the other is 0, so only the row small in
    both contributes, though each factor brought into the float range by its own largest
    entry left that product below the subnormals (a zero gradient, torch: gsmall * small).
    Steps whose states or inputs lie beyond the band were already multiplied each at its own
    scale ("time"); the rows of one step, and steps inside the band, shared one. weight_hh =
    0, and the LSTM's forget gate and the GRU's update gate are shut (bias -1000), so that
    each step's D and h depend on its own input and gradient alone."""
    dtype, big, gbig, gsmall, small = SMALL_ROWS[case]
    G = GATES[cell]
    b_ih = np.zeros(G)
    if cell in ("lstm", "gru"):
        b_ih[1] = -1000.0
    h0 = np.zeros(3)
    if weight == "weight_ih_l0":
        x = np.array([big, 0.0, small])
        if cell == "relu":  # a bias of 1 opens relu at x = 0; with -big, h_1 = 0 does not
            b_ih[0] = 1.0  # meet gbig in weight_hh's gradient (1e400 in torch)
            x[0] = -big
    elif layout == "batch":
        x, h0 = np.full(3, small), np.array([big, 0.0, small])
    else:  # h_0 = big, h_1 = f(0) = 0, h_2 = f(small)
        x, h0 = np.array([0.0, small, small]), np.array([big, 0.0, 0.0])
    sd = {
        "weight_ih_l0": np.ones((G, 1)),
        "weight_hh_l0": np.zeros((G, 1)),
        "bias_ih_l0": b_ih,
        "bias_hh_l0": np.zeros(G),
    }
    sd = {k: v.astype(dtype) for k, v in sd.items()}
    shape = (1, 3, 1) if layout == "batch" else (3, 1, 1)
    x = x.astype(dtype).reshape(shape)
    g = np.array([0.0, gbig, gsmall], dtype).reshape(shape)
    h0 = (h0 if layout == "batch" else h0[:1]).astype(dtype).reshape(1, -1, 1)
    rep = gc.RNN.from_state_dict(sd, cell).backward(x, grad_output=g, h0=h0)
    ref = O.torch_rnn_backward(cell, sd, x, loss="grad", target=g, h0=h0)
    assert O.log10_norm(ref["grads"][weight]) < math.log10(gsmall) + 1
    check_torch_norms(rep, ref, atol=1e-9 if dtype == "float64" else 1e-5)


@needs_torch
@pytest.mark.parametrize("layout", ["batch", "time"])
@pytest.mark.parametrize("cell", CELLS)
def test_readout_weight_gradient_left_to_rows_small_in_both_factors(gc, cell, layout):
    """The read-out's dW = sum over rows of dL/dy^T h, the mse loss of y = h against targets
    y_1 (dL/dy = 0 where h ~ 1), -1e250 (where h = 0) and 0 (where h ~ 1e-60): only the
    third row contributes, (2/3) h^2 ~ 1e-120, 1e-370 below the largest gradient."""
    G = GATES[cell]
    b_ih = np.zeros(G)
    if cell in ("lstm", "gru"):
        b_ih[1] = -1000.0  # the forget / update gate shut: no step depends on another
    sd = {
        "weight_ih_l0": np.ones((G, 1)),
        "weight_hh_l0": np.zeros((G, 1)),
        "bias_ih_l0": b_ih,
        "bias_hh_l0": np.zeros(G),
        "readout.weight": np.ones((1, 1)),
        "readout.bias": np.zeros(1),
    }
    shape = (1, 3, 1) if layout == "batch" else (3, 1, 1)
    x = np.array([5.0, 0.0, 1e-60]).reshape(shape)
    rnn = gc.RNN.from_state_dict(sd, cell)
    target = rnn.forward(x)[0].copy()
    target.reshape(-1)[1:] = [-1e250, 0.0]
    rep = rnn.backward(x, target, loss="mse")
    ref = O.torch_rnn_backward(cell, sd, x, loss="mse", target=target)
    assert -125 < O.log10_norm(ref["grads"]["readout.weight"]) < -115
    check_torch_norms(rep, ref)


def test_huge_recurrent_weights_beyond_torch(gc):
    """relu, weight_hh = w I with w = 1e150, weight_ih = I, x = 1, T = 3: the states are
    h_1 = 1, h_2 = 1 + w, h_3 = 1 + w h_2 (~1e300); the gradients ~1e750 exist only in log
    space. Closed forms in exact rational arithmetic."""
    from fractions import Fraction

    w = 1e150
    sd = {"weight_ih_l0": np.eye(2), "weight_hh_l0": w * np.eye(2)}
    rnn = gc.RNN.from_state_dict(sd, "relu")
    rep = rnn.backward(np.ones((3, 1, 2)))
    W = Fraction(w)
    h = [Fraction(0), Fraction(1)]
    for _ in range(2):
        h.append(Fraction(float(1 + W * h[-1])))  # the float states of the forward pass
    lg = [math.log10(v) if v else -math.inf for v in h]

    def log10(v):
        return math.log10(v.numerator) - math.log10(v.denominator)

    hb = math.log10(2) / 2  # two equal units
    assert abs(rep.log10_loss - 2 * lg[3]) < 1e-12
    assert rep.loss == math.inf
    expect_states = [hb + lg[3] + (3 - t) * 150.0 for t in range(4)]
    assert_log10_values(rep.log10_state_grad_norms, expect_states, 1e-9, "states")
    # both units alike: every entry of dW_hh is sum_t w^(3-t) h_3 h_{t-1}, of dW_ih
    # sum_t w^(3-t) h_3 (x = 1)
    d_hh = sum(W ** (3 - t) * h[3] * h[t - 1] for t in range(1, 4))
    d_ih = sum(W ** (3 - t) * h[3] for t in range(1, 4))
    assert abs(rep.log10_param_grad_norms["weight_hh_l0"] - (math.log10(2) + log10(d_hh))) < 1e-9
    assert abs(rep.log10_param_grad_norms["weight_ih_l0"] - (math.log10(2) + log10(d_ih))) < 1e-9
    assert np.all(np.isfinite(rep.log10_state_grad_norms))
    # one step more and the states themselves overflow: an error naming step and layer
    with pytest.raises(gc.NonFiniteError, match="timestep 4 of layer 0") as err:
        rnn.backward(np.ones((4, 1, 2)))
    assert err.value.index == 4


FAR_WEIGHTS = [(w, s) for w in ("ih", "hh") for s in (1e-250, 1e250)] + [
    ("readout", 1e-150),
    ("readout", 1e150),
]


@needs_torch
@pytest.mark.parametrize("which,scale", FAR_WEIGHTS, ids=[f"{w}-{s:g}" for w, s in FAR_WEIGHTS])
def test_weights_far_out_of_the_band_against_torch(gc, which, scale):
    """One weight scaled far from 1 (layer 1's weight_ih or weight_hh of a relu chain, whose
    states follow it, or the read-out with the target), where torch float64 still holds every
    value; products of the raw weight with the carried gradients would leave the range."""
    cell = "lstm" if which == "readout" else "relu"
    sd = O.random_rnn_state_dict(cell, 2, 3, 2, output_size=2, bias=which == "readout", seed=11)
    rng = np.random.default_rng(11)
    x = np.abs(rng.normal(size=(2, 2, 2)))
    kw = {"grad_output": rng.normal(size=(2, 2, 3))}
    if which == "ih":
        sd["weight_ih_l1"] = np.abs(sd["weight_ih_l1"]) * scale
    elif which == "hh":  # one step from a nonzero h0: dL/dh_0 ~ scale, not scale^2
        sd["weight_hh_l1"] = np.abs(sd["weight_hh_l1"]) * scale
        x = x[:1]
        kw = {"grad_output": kw["grad_output"][:1], "h0": np.abs(rng.normal(size=(2, 2, 3)))}
    else:
        sd["readout.weight"] = sd["readout.weight"] * scale
        kw = {"loss": "mse", "target": scale * rng.normal(size=(2, 2, 2))}
    if which != "readout":
        sd["weight_ih_l0"] = np.abs(sd["weight_ih_l0"])  # positive states: relu passes all
    rnn = gc.RNN.from_state_dict(sd, cell)
    rep = rnn.backward(x, **kw)
    okw = dict(kw)
    if "grad_output" in okw:
        okw.update(loss="grad", target=okw.pop("grad_output"))
    ref = O.torch_rnn_backward(cell, sd, x, **okw)
    h0 = kw.get("h0")
    lo, hi, finite = O.magnitude_range(
        O.numpy_rnn_intermediates(cell, sd, x, h0=h0)
        + list(ref["grads"].values())
        + [ref["state_grads"]]
    )
    assert finite and lo > 1e-305 and hi < 1e305
    check_torch_norms(rep, ref, atol=1e-8)
    if which == "readout":
        assert abs(rep.log10_loss - math.log10(ref["loss"])) < 1e-12


def _forward_top(rnn, x):
    out, _, _ = rnn.forward(x)
    return out


@needs_torch
@pytest.mark.parametrize("every", [False, True], ids=["last", "every"])
@pytest.mark.parametrize("readout", [False, True], ids=["on-h", "readout"])
def test_mse_loss_of_a_huge_target(gc, every, readout):
    """A target of 1e200: the squared errors (1e400) exist only in log space, the
    gradients (~1e200) in float64."""
    sd = O.random_rnn_state_dict("gru", 3, 4, 1, output_size=3 if readout else None, seed=5)
    rnn = gc.RNN.from_state_dict(sd, "gru")
    rng = np.random.default_rng(5)
    x = rng.normal(size=(5, 2, 3))
    n = 3 if readout else 4
    target = 1e200 * rng.normal(size=((5,) if every else ()) + (2, n))
    rep = rnn.backward(x, target, loss="mse")
    ref = O.torch_rnn_backward("gru", sd, x, loss="mse", target=target)
    out = _forward_top(rnn, x)
    y = out if not readout else out @ sd["readout.weight"].T + sd["readout.bias"]
    d = (y if every else y[-1]) - target
    expected = 2 * O.log10_norm(d) - math.log10(d.size)
    assert ref["loss"] == math.inf and rep.loss == math.inf
    assert abs(rep.log10_loss - expected) < 1e-12
    check_torch_norms(rep, ref)


@needs_torch
@pytest.mark.parametrize("loss", ["probe", "mse_last", "mse_every"])
def test_loss_of_tiny_states(gc, loss):
    """States of ~1e-200: the loss (~1e-400) exists only in log space; float64 says 0."""
    rnn = gc.RNN("tanh", 3, 4, bias=False, seed=0)
    x = np.full((4, 2, 3), 1e-200) * np.arange(1, 4)
    out = _forward_top(rnn, x)
    if loss == "probe":
        rep = rnn.backward(x)
        expected = math.log10(0.5) + 2 * O.log10_norm(out[-1])
        kw = {}
    else:
        every = loss == "mse_every"
        target = np.zeros(out.shape if every else out.shape[1:])
        rep = rnn.backward(x, target, loss="mse")
        expected = 2 * O.log10_norm(out if every else out[-1]) - math.log10(target.size)
        kw = {"loss": "mse", "target": target}
    assert rep.loss == 0.0 and -410 < expected < -390
    assert abs(rep.log10_loss - expected) < 1e-12
    ref = O.torch_rnn_backward("tanh", rnn.state_dict(), x, **kw)
    check_torch_norms(rep, ref, params=False)  # parameter gradients ~1e-400: beyond torch


@needs_torch
@pytest.mark.parametrize("scale", [1e300, 1e-300])
def test_grad_output_far_from_one(gc, scale):
    sd = O.random_rnn_state_dict("lstm", 2, 3, 2, seed=3)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(5, 2, 2))
    g = scale * rng.normal(size=(5, 2, 3))
    rep = gc.RNN.from_state_dict(sd, "lstm").backward(x, grad_output=g)
    ref = O.torch_rnn_backward("lstm", sd, x, loss="grad", target=g)
    check_torch_norms(rep, ref)
    assert math.isnan(rep.loss) and math.isnan(rep.log10_loss)


@needs_torch
def test_cross_entropy_of_logits_far_beyond_range(gc):
    """A read-out scaled by 1e300: logits ~1e300, a loss ~1e299 that torch holds, and
    softmax gradients that are exactly one-hot differences."""
    sd = O.random_rnn_state_dict("gru", 3, 4, 1, output_size=3, seed=2)
    sd["readout.weight"] = sd["readout.weight"] * 1e300
    rng = np.random.default_rng(2)
    x = rng.normal(size=(4, 3, 3))
    labels = np.array([[0, 1, 2], [2, 1, 0], [1, 1, 1], [0, 2, 1]])
    rnn = gc.RNN.from_state_dict(sd, "gru")
    for target in (labels, labels[-1]):
        rep = rnn.backward(x, target, loss="cross_entropy")
        ref = O.torch_rnn_backward("gru", sd, x, loss="cross_entropy", target=target)
        assert 250 < math.log10(ref["loss"]) < 301
        assert abs(rep.log10_loss - math.log10(ref["loss"])) < 1e-12
        assert rep.loss == pytest.approx(ref["loss"], rel=1e-12)
        check_torch_norms(rep, ref)


def test_cross_entropy_of_confident_predictions(gc):
    """Margins of thousands: the loss log1p(sum_j exp(y_j - y_label)) ~ e^-2000 and its
    gradient exist only in log space (float64's softmax says exactly 0). Closed forms from
    the logits, in log space."""
    sd = O.random_rnn_state_dict("gru", 3, 4, 1, output_size=3, seed=4)
    sd["readout.weight"] = sd["readout.weight"] * 1e4
    sd["readout.bias"] = np.zeros(3)
    rnn = gc.RNN.from_state_dict(sd, "gru")
    x = np.random.default_rng(4).normal(size=(5, 3, 3))
    h = _forward_top(rnn, x)[-1]
    y = h @ sd["readout.weight"].T
    labels = np.argmax(y, axis=1)
    rep = rnn.backward(x, labels, loss="cross_entropy")
    B = len(labels)
    rows = np.arange(B)
    is_label = np.arange(3)[None, :] == labels[:, None]
    other = np.where(is_label, -np.inf, y - y[rows, labels][:, None])
    # ell_r = log1p(e^z_r), z_r = logsumexp over the other classes (all z_r << -700 here)
    z = np.log(np.sum(np.exp(other - other.max(axis=1, keepdims=True)), axis=1)) + other.max(axis=1)
    assert np.all(z < -700)
    ln10 = math.log(10)
    expected = O.log10_sum_pow10(z / ln10) - math.log10(B)
    assert rep.loss == 0.0
    assert abs(rep.log10_loss - expected) < 1e-9
    # dL/dy = (p - onehot) / B with p_j = e^(y_j - lse) ~ e^z: scaled by e^c, exactly
    c = -float(z.max())
    lse = y[rows, labels] + np.exp(z)  # log1p(e^z) = e^z here
    p = np.exp(np.where(is_label, -np.inf, y - lse[:, None] + c))
    p[rows, labels] = -np.exp(z + c)
    dh = (p / B) @ sd["readout.weight"]
    expect_T = O.log10_norm(dh) - c / ln10
    assert abs(rep.log10_state_grad_norms[-1] - expect_T) < 1e-9
    assert (
        abs(rep.log10_param_grad_norms["readout.bias"] - (O.log10_norm(p.sum(0) / B) - c / ln10))
        < 1e-9
    )


def _magnitude_case(data, dtype):
    """A small chain with every weight group, the inputs and the loss's target scaled by
    powers of ten drawn independently; the range is float64's (+-150 decades, so that two
    factors still multiply) or float32's."""
    k = 150 if dtype == "float64" else 30
    mag = st.integers(-k, k)
    cell = data.draw(st.sampled_from(CELLS), "cell")
    n_in, H = data.draw(st.integers(1, 3), "n_in"), data.draw(st.integers(1, 4), "H")
    T, B = data.draw(st.integers(1, 6), "T"), data.draw(st.integers(1, 3), "B")
    L = data.draw(st.integers(1, 2), "L")
    loss = data.draw(st.sampled_from(["probe", "mse", "cross_entropy", "grad"]), "loss")
    readout = loss == "cross_entropy" or (loss == "mse" and data.draw(st.booleans(), "readout"))
    bias = data.draw(st.booleans(), "bias")
    seed = data.draw(st.integers(0, 2**32 - 1), "seed")
    sd = O.random_rnn_state_dict(
        cell, n_in, H, L, output_size=3 if readout else None, bias=bias, seed=seed
    )
    for name in ("weight_ih", "weight_hh"):
        s = 10.0 ** data.draw(mag, name)
        for l in range(L):
            sd[f"{name}_l{l}"] = sd[f"{name}_l{l}"] * s
    if readout:
        sd["readout.weight"] = sd["readout.weight"] * 10.0 ** data.draw(mag, "readout")
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(T, B, n_in)) * 10.0 ** data.draw(mag, "x")
    every = data.draw(st.booleans(), "every step")
    lead = (T,) if every else ()
    n_out = 3 if readout else H
    kw = {"loss": loss}
    if loss in ("mse", "grad"):
        kw["target"] = rng.normal(size=(*lead, B, n_out)) * 10.0 ** data.draw(mag, "target")
    elif loss == "cross_entropy":
        kw["target"] = rng.integers(0, n_out, size=(*lead, B))
    if dtype == "float32":
        sd = {n: v.astype(np.float32).astype(np.float64) for n, v in sd.items()}
        x = x.astype(np.float32).astype(np.float64)
    return cell, sd, x, kw


def _gc_kwargs(kw):
    if kw["loss"] == "grad":
        return {"grad_output": kw["target"]}
    return dict(kw)


def _forward_values(cell, sd, x, kw):
    """The oracle's forward intermediates, plus the mse loss's differences."""
    values = O.numpy_rnn_intermediates(cell, sd, x)
    if kw["loss"] == "mse":
        with np.errstate(all="ignore"):
            out = O.numpy_rnn_forward(cell, sd, x)["output"]
            if "readout.weight" in sd:
                out = out @ sd["readout.weight"].T + sd["readout.bias"]
            tgt = kw["target"]
            values.append((out if tgt.ndim == 3 else out[-1]) - tgt)
    return values


def _squashing_ill_conditioned(cell, sd, x):
    """Whether a tanh or sigmoid runs so close to +-1 that its derivative, taken from the
    rounded output (1 - y^2, y (1 - y)), is off by a large factor in torch or here: a tanh
    with 7 < |z| < 25 or a sigmoid with 13 < z < 40 (beyond those it is exactly +-1 in both)."""
    tanh_args, sigmoid_args = O.numpy_rnn_squashed(cell, sd, x)
    for z in tanh_args:
        a = np.abs(z)
        if np.any((a > 7) & (a < 25)):
            return True
    return any(np.any((z > 13) & (z < 40)) for z in sigmoid_args)


def _softmax_saturates(cell, sd, x, kw):
    """Whether a cross-entropy row's largest probability rounds to within 1e-6 of 1: then
    torch's p - 1 cancels (and its loss rounds towards 0), so it is no reference."""
    if kw["loss"] != "cross_entropy":
        return False
    out = O.numpy_rnn_forward(cell, sd, x)["output"]
    y = out @ sd["readout.weight"].T + sd["readout.bias"]
    y = y if kw["target"].ndim == 2 else y[-1:]
    rest = np.sort(y, axis=-1)[..., :-1] - np.max(y, axis=-1, keepdims=True)
    return bool(np.min(np.sum(np.exp(rest), axis=-1)) < 1e-6)


def _assert_no_nan_or_inf(rep, kw):
    logs = [rep.log10_layer_state_grad_norms, [rep.log10_total_norm]]
    logs += [[v] for v in rep.log10_param_grad_norms.values()]
    if rep.log10_layer_cell_grad_norms is not None:
        logs.append(rep.log10_layer_cell_grad_norms)
    if kw["loss"] != "grad":
        logs.append([rep.log10_loss])
    for a in logs:
        a = np.asarray(a, dtype=np.float64)
        assert not np.any(np.isnan(a)) and not np.any(a == math.inf), a


@needs_torch
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_magnitudes_against_torch(gc, data):
    """Weights, inputs and targets from 1e-150 to 1e150: no NaN or +inf in any log10 result,
    an error only where the forward pass itself leaves the float range, and torch float64's
    norms wherever torch's own values all lie in [1e-290, 1e290]."""
    cell, sd, x, kw = _magnitude_case(data, "float64")
    lo, hi, finite = O.magnitude_range(_forward_values(cell, sd, x, kw))
    rnn = gc.RNN.from_state_dict(sd, cell)
    try:
        rep = rnn.backward(x, **_gc_kwargs(kw))
    except gc.NonFiniteError:
        assert not finite, "an error though every forward value is a float64"
        return
    _assert_no_nan_or_inf(rep, kw)
    if not (finite and lo >= 1e-290 and hi <= 1e290):
        return
    if _softmax_saturates(cell, sd, x, kw) or _squashing_ill_conditioned(cell, sd, x):
        return
    ref = O.torch_rnn_backward(cell, sd, x, **kw)
    grads = [ref["state_grads"], *ref["grads"].values()]
    if ref["cell_grads"] is not None:
        grads.append(ref["cell_grads"])
    glo, ghi, gfinite = O.magnitude_range(grads)
    if not (gfinite and glo >= 1e-290 and ghi <= 1e290):
        return
    got, exp = _log10_norms(rep), _oracle_log10_norms(ref)
    # Exact zeros in torch are either structural (gradchain's are -inf too) or values that
    # underflowed in its float64, which then also took their share from the sums they fed:
    # then torch holds no reference values.
    if np.any(np.isneginf(exp) & ~np.isneginf(got)):
        return
    # Where the NumPy oracle, summing in another order, differs from torch, cancellation
    # has used up float64's digits (a bias gradient summing 1e10-sized terms to 1): no
    # reference either.
    with np.errstate(all="ignore"):  # its gradient at the input is not wanted and may overflow
        alt = _oracle_log10_norms(O.numpy_rnn_backward(cell, sd, x, **kw))
    if not np.array_equal(np.isneginf(alt), np.isneginf(exp)):
        return
    fin = ~np.isneginf(exp)
    if np.any(np.abs(alt[fin] - exp[fin]) > 1e-10):
        return
    assert np.array_equal(np.isneginf(got), np.isneginf(exp)), (got, exp)
    np.testing.assert_allclose(got[fin], exp[fin], rtol=0, atol=1e-8)
    if kw["loss"] != "grad" and 1e-290 <= ref["loss"] <= 1e290:
        assert abs(rep.log10_loss - math.log10(ref["loss"])) <= 1e-8


def _log10_norms(rep):
    out = [list(rep.log10_param_grad_norms.values()), rep.log10_layer_state_grad_norms]
    if rep.log10_layer_cell_grad_norms is not None:
        out.append(rep.log10_layer_cell_grad_norms)
    return np.concatenate([np.ravel(a) for a in out])


def _oracle_log10_norms(ref):
    out = [[O.log10_norm(g) for g in ref["grads"].values()]]
    out.append(O.log10_norm(ref["state_grads"], axis=(2, 3)))
    if ref["cell_grads"] is not None:
        out.append(O.log10_norm(ref["cell_grads"], axis=(2, 3)))
    return np.concatenate([np.ravel(a) for a in out])


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_magnitudes_in_float32(gc, data):
    """The same in float32 (weights, inputs and targets from 1e-30 to 1e30): no NaN or +inf
    in any log10 result, and an error only where the forward pass reaches float32's range."""
    cell, sd, x, kw = _magnitude_case(data, "float32")
    _, hi, finite = O.magnitude_range(_forward_values(cell, sd, x, kw))
    rnn = gc.RNN.from_state_dict(sd, cell, dtype="float32")
    try:
        rep = rnn.backward(x.astype(np.float32), **_gc_kwargs(kw))
    except gc.NonFiniteError:
        assert not finite or hi > 1e37, "an error though every forward value is a float32"
        return
    _assert_no_nan_or_inf(rep, kw)


# --------------------------------------------------------------------------------------
# 6. Pascanu, Mikolov & Bengio (2013): ||dL/dh_t|| <= ||dL/dh_T|| sigma_max(W_hh)^(T - t)
# --------------------------------------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    H=st.integers(1, 12),
    B=st.integers(1, 3),
    T=st.integers(1, 2000),
    gain=st.floats(0.5, 3.0),
    x_scale=st.sampled_from([0.0, 0.3, 1.0, 5.0]),
)
@example(seed=1, H=8, B=2, T=2000, gain=0.5, x_scale=1.0)  # beyond float64's range
@example(seed=2, H=5, B=1, T=2000, gain=3.0, x_scale=0.0)
def test_pascanu_bound(gc, seed, H, B, T, gain, x_scale):
    rng = np.random.default_rng(seed)
    n_in = 3
    W = rng.normal(size=(H, H)) * gain / math.sqrt(H)
    sd = {
        "weight_ih_l0": rng.normal(size=(H, n_in)),
        "weight_hh_l0": W,
        "bias_ih_l0": rng.normal(size=H) * 0.3,
        "bias_hh_l0": rng.normal(size=H) * 0.3,
    }
    rnn = gc.RNN.from_state_dict(sd, "tanh")
    x = rng.normal(size=(T, B, n_in)) * x_scale
    g = rng.normal(size=(B, H))
    rep = rnn.backward(x, grad_output=g)
    log_dh = rep.log10_state_grad_norms
    assert abs(log_dh[T] - math.log10(np.linalg.norm(g))) <= 1e-12
    sigma = float(np.linalg.norm(W, 2))
    bound = log_dh[T] + (T - np.arange(T + 1)) * math.log10(sigma) + 1e-9
    bad = np.flatnonzero(log_dh > bound)
    assert bad.size == 0, (bad[:5], log_dh[bad[:5]], bound[bad[:5]])
    if (seed, H, B, T, gain, x_scale) == (1, 8, 2, 2000, 0.5, 1.0):  # the first example
        assert log_dh[0] < -330


# --------------------------------------------------------------------------------------
# 7. bad input
# --------------------------------------------------------------------------------------
@pytest.fixture
def small(gc):
    return gc.RNN("tanh", 3, 4, 2, seed=1)


X = np.zeros((5, 2, 3))


def _raises(exc, fn, *words):
    with pytest.raises(exc) as info:
        fn()
    msg = str(info.value)
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"
    return msg


def test_bad_x(small):
    _raises(ValueError, lambda: small.backward(np.zeros((5, 3))), "x must have shape", "(5, 3)")
    _raises(ValueError, lambda: small.backward(np.zeros((5, 2, 3, 1))), "x must have shape")
    _raises(ValueError, lambda: small.forward(np.zeros((5, 3))), "x must have shape")
    _raises(ValueError, lambda: small.backward(np.zeros((5, 2, 4))), "x", "3", "(5, 2, 4)")
    bad = X.copy()
    bad[1, 1, 2] = np.nan
    _raises(ValueError, lambda: small.backward(bad), "x", "NaN", "(1, 1, 2)")
    bad[1, 1, 2] = np.inf
    _raises(ValueError, lambda: small.backward(bad), "x", "inf")
    _raises(TypeError, lambda: small.backward(np.zeros((5, 2, 3), dtype=bool)), "x")


def test_bad_cell_and_constructor_arguments(gc):
    _raises(ValueError, lambda: gc.RNN("lstmx", 3, 4), "cell", "'tanh'", "'gru'")
    _raises(ValueError, lambda: gc.RNN.from_state_dict({}, "conv"), "cell", "'lstm'")
    _raises(TypeError, lambda: gc.RNN("tanh", 3, 4.0), "hidden_size")
    _raises(TypeError, lambda: gc.RNN("tanh", 3, 4.5), "hidden_size")
    _raises(ValueError, lambda: gc.RNN("tanh", 3, 0), "hidden_size")
    _raises(ValueError, lambda: gc.RNN("tanh", 0, 4), "input_size")
    _raises(ValueError, lambda: gc.RNN("tanh", 3, 4, num_layers=0), "num_layers")
    _raises(
        ValueError, lambda: gc.RNN("tanh", 3, 4, dtype="float16"), "dtype", "float32", "float64"
    )
    _raises(ValueError, lambda: gc.RNN("tanh", 3, 4, dtype="int32"), "dtype")
    _raises(ValueError, lambda: gc.RNN("tanh", 3, 4, init="he"), "init", "'orthogonal'")
    _raises(
        ValueError,
        lambda: gc.RNN("tanh", 3, 4, spectral_radius=0.9, recurrent_gain=2.0),
        "spectral_radius", "recurrent_gain",
    )  # fmt: skip
    _raises(ValueError, lambda: gc.RNN("tanh", 3, 4, spectral_radius=-1.0), "spectral_radius")
    _raises(ValueError, lambda: gc.RNN("gru", 3, 4, forget_bias=1.0), "forget_bias", "lstm")
    _raises(ValueError, lambda: gc.RNN("lstm", 3, 4, bias=False, forget_bias=1.0), "forget_bias")
    _raises(TypeError, lambda: gc.RNN("tanh", 3, 4, bias=1), "bias")
    _raises(ValueError, lambda: gc.RNN("tanh", 3, 4, gain=math.nan), "gain")
    _raises(TypeError, lambda: gc.RNN("tanh", 3, 4, seed=1.5), "seed")


FLOAT32_MAX = "3.4028235e+38"


def test_float32_parameters_beyond_float32_are_refused(gc):
    """A parameter that makes a float32 parameter overflow is refused when the chain is
    built, naming it, its value and float32's largest value."""
    for cell, kwargs, name in [
        ("tanh", {"recurrent_gain": 1e150}, "recurrent_gain"),
        ("tanh", {"gain": 1e39, "init": "normal"}, "gain"),
        ("gru", {"recurrent_gain": -1e39, "init": "orthogonal"}, "recurrent_gain"),
        ("relu", {"spectral_radius": 1e39}, "spectral_radius"),
        ("lstm", {"forget_bias": -1e39}, "forget_bias"),
    ]:
        msg = _raises(ValueError, lambda c=cell, kw=kwargs: gc.RNN(c, 3, 4, dtype="float32", **kw),
                      f"{name} must be at most", FLOAT32_MAX, f"got {kwargs[name]!r}")  # fmt: skip
        assert msg.startswith(name), msg
    # Rescaled to spectral radius 3e38, this weight_hh has an entry of 4.5e38.
    w = gc.RNN("tanh", 1, 2, spectral_radius=1.0, seed=0).state_dict()["weight_hh_l0"]
    assert np.abs(w).max() > 1.5
    _raises(ValueError, lambda: gc.RNN("tanh", 1, 2, spectral_radius=3e38, dtype="float32", seed=0),
            "spectral_radius=3e+38", "weight_hh_l0", FLOAT32_MAX)  # fmt: skip
    sd = gc.RNN("tanh", 2, 3, seed=0).state_dict()
    sd["weight_hh_l0"][1, 1] = 1e39
    _raises(ValueError, lambda: gc.RNN.from_state_dict(sd, "tanh", dtype="float32"),
            "state_dict['weight_hh_l0'] has 1e+39 at index (1, 1)", FLOAT32_MAX)  # fmt: skip
    net = gc.RNN("tanh", 2, 3, dtype="float32")
    x = np.full((4, 1, 2), -1e39)
    _raises(ValueError, lambda: net.backward(x), "x has -1e+39", FLOAT32_MAX)


@pytest.mark.parametrize("k", [0, -1, True, 1.5])
def test_bad_truncate(small, k):
    _raises(ValueError, lambda: small.backward(X, truncate=k), "truncate", repr(k))


def test_bad_truncate_mode(small):
    _raises(
        ValueError, lambda: small.backward(X, truncate=2, truncate_mode="sliding"),
        "truncate_mode", "'detach'", "'window'", "'sliding'",
    )  # fmt: skip


def test_bad_state_dict(gc, small):
    sd = small.state_dict()
    sd["weight_hh_l0"] = np.zeros((4, 5))
    _raises(ValueError, lambda: gc.RNN.from_state_dict(sd, "tanh"), "weight_hh_l0", "(4, 4)")
    sd = small.state_dict()
    sd["bias_ih_l1"] = np.zeros(5)
    _raises(ValueError, lambda: gc.RNN.from_state_dict(sd, "tanh"), "bias_ih_l1")
    sd = small.state_dict()
    del sd["bias_hh_l1"]
    _raises(ValueError, lambda: gc.RNN.from_state_dict(sd, "tanh"), "missing", "bias_hh_l1")
    sd = small.state_dict()
    sd["foo"] = np.zeros(3)
    _raises(ValueError, lambda: gc.RNN.from_state_dict(sd, "tanh"), "foo")
    sd = small.state_dict()
    sd["weight_ih_l0_reverse"] = sd["weight_ih_l0"]
    _raises(
        ValueError,
        lambda: gc.RNN.from_state_dict(sd, "tanh"),
        "weight_ih_l0_reverse",
        "bidirectional",
    )
    sd = small.state_dict()
    del sd["weight_ih_l0"], sd["weight_hh_l0"], sd["bias_ih_l0"], sd["bias_hh_l0"]
    _raises(ValueError, lambda: gc.RNN.from_state_dict(sd, "tanh"), "weight_ih_l0")
    sd = small.state_dict()
    sd["weight_hh_l0"] = np.full((4, 4), np.nan)
    _raises(ValueError, lambda: gc.RNN.from_state_dict(sd, "tanh"), "weight_hh_l0", "NaN")
    # 4 rows are not a multiple of the GRU's 3 gates
    _raises(
        ValueError, lambda: gc.RNN.from_state_dict(small.state_dict(), "gru"), "weight_ih_l0", "3"
    )
    _raises(TypeError, lambda: gc.RNN.from_state_dict([1, 2], "tanh"), "state_dict")


def test_bad_targets(small, gc):
    _raises(ValueError, lambda: small.backward(X, np.zeros((2, 5)), loss="mse"), "target", "(2, 4)")
    _raises(
        ValueError,
        lambda: small.backward(X, np.zeros((4, 2, 4)), loss="mse"),
        "target",
        "(5, 2, 4)",
    )
    _raises(ValueError, lambda: small.backward(X, np.array([0, 4])), "labels", "[0, 4)")
    _raises(ValueError, lambda: small.backward(X, np.array([0, -1])), "labels", "[0, 4)")
    _raises(
        TypeError, lambda: small.backward(X, np.array([0.0, 1.0]), loss="cross_entropy"),
        "cross_entropy", "integer",
    )  # fmt: skip
    _raises(ValueError, lambda: small.backward(X, np.array([0, 1, 2])), "target", "(2,)", "(5, 2)")
    ro = gc.RNN("gru", 3, 4, output_size=2, seed=0)
    _raises(ValueError, lambda: ro.backward(X, np.array([0, 2])), "[0, 2)")  # classes = output_size
    _raises(ValueError, lambda: small.backward(X, loss="mse"), "target")
    _raises(ValueError, lambda: small.backward(X, loss="hinge"), "loss", "'probe'", "'mse'")
    _raises(
        ValueError, lambda: small.backward(X, np.zeros((2, 4)), loss="probe"), "probe", "target"
    )
    t = np.zeros((2, 4))
    t[0, 0] = np.nan
    _raises(ValueError, lambda: small.backward(X, t, loss="mse"), "target", "NaN")


def test_bad_grad_output(small):
    g = np.zeros((2, 4))
    _raises(ValueError, lambda: small.backward(X, grad_output=g, loss="mse"), "grad_output", "loss")
    _raises(ValueError, lambda: small.backward(X, g, grad_output=g), "grad_output", "target")
    _raises(
        ValueError, lambda: small.backward(X, grad_output=np.zeros((2, 5))), "grad_output", "(2, 4)"
    )
    _raises(ValueError, lambda: small.backward(X, grad_output=np.zeros((4, 2, 4))), "grad_output")


def test_bad_initial_states(small, gc):
    _raises(ValueError, lambda: small.backward(X, c0=np.zeros((2, 2, 4))), "c0", "'tanh'")
    _raises(ValueError, lambda: small.forward(X, c0=np.zeros((2, 2, 4))), "c0")
    _raises(ValueError, lambda: small.backward(X, h0=np.zeros((1, 2, 4))), "h0", "(2, 2, 4)")
    _raises(ValueError, lambda: small.forward(X, h0=np.zeros((2, 3, 4))), "h0", "(2, 2, 4)")
    lstm = gc.RNN("lstm", 3, 4, seed=0)
    _raises(ValueError, lambda: lstm.backward(X, c0=np.zeros((1, 2, 5))), "c0", "(1, 2, 4)")


def test_bad_clipping_and_flags(small):
    _raises(ValueError, lambda: small.backward(X, max_norm=-1.0), "max_norm")
    _raises(ValueError, lambda: small.backward(X, max_norm=math.nan), "max_norm")
    _raises(ValueError, lambda: small.backward(X, norm_type=0), "norm_type", "inf")
    _raises(ValueError, lambda: small.backward(X, norm_type="two"), "norm_type")
    _raises(TypeError, lambda: small.backward(X, return_grads=1), "return_grads")
    _raises(ValueError, lambda: small.backward_memory(0, 1), "steps")
    _raises(
        ValueError,
        lambda: small.backward_memory(3, 1, truncate=2, truncate_mode="x"),
        "truncate_mode",
    )


# --------------------------------------------------------------------------------------
# 8. initialisers
# --------------------------------------------------------------------------------------
def _blocks(w, cell):
    return np.split(w, GATES[cell], axis=0)


def test_default_init_is_pytorchs_uniform(gc):
    H = 256
    rnn = gc.RNN("lstm", 64, H, 2, output_size=10, seed=4)
    bound = 1 / math.sqrt(H)
    for k, a in rnn.state_dict().items():
        assert np.all(np.abs(a) <= bound), k  # readout: nn.Linear's, 1/sqrt(fan_in = H) too
        if a.size < 10_000:
            continue
        n = a.size
        std = bound / math.sqrt(3)
        assert abs(a.mean()) < 5 * std / math.sqrt(n), k
        assert abs(a.std() / std - 1) < 5 * math.sqrt(0.8 / n) + 1e-3, k  # var of U^2 is 0.8 var^2
        assert np.abs(a).max() > 0.99 * bound, k
    for k in ("bias_ih_l0", "bias_hh_l1"):
        a = rnn.state_dict()[k]
        assert np.abs(a).max() <= bound and a.std() > 0.8 * bound / math.sqrt(3)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("gain", [1.0, 0.7])
def test_orthogonal_init(gc, cell, gain):
    H, n_in = 16, 5
    rnn = gc.RNN(cell, n_in, H, 2, init="orthogonal", recurrent_gain=gain, gain=1.3, seed=8)
    sd = rnn.state_dict()
    for layer in (0, 1):
        blocks = _blocks(sd[f"weight_hh_l{layer}"], cell)
        for b in blocks:
            np.testing.assert_allclose(b @ b.T, gain**2 * np.eye(H), rtol=0, atol=1e-12)
        if len(blocks) > 1:
            assert not np.allclose(blocks[0], blocks[1])
        fan_in = n_in if layer == 0 else H
        bound = 1.3 * math.sqrt(6 / (fan_in + H))
        assert np.all(np.abs(sd[f"weight_ih_l{layer}"]) <= bound)
        np.testing.assert_array_equal(sd[f"bias_ih_l{layer}"], 0)
        np.testing.assert_array_equal(sd[f"bias_hh_l{layer}"], 0)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("init", ["default", "normal", "orthogonal", "xavier_uniform"])
def test_spectral_radius(gc, cell, init):
    rnn = gc.RNN(cell, 3, 12, 2, init=init, spectral_radius=0.85, seed=21)
    sd = rnn.state_dict()
    for layer in (0, 1):
        for b in _blocks(sd[f"weight_hh_l{layer}"], cell):
            rho = float(np.max(np.abs(np.linalg.eigvals(b))))
            assert abs(rho - 0.85) <= 1e-10 * 0.85, rho


def test_forget_bias(gc):
    H = 6
    plain = gc.RNN("lstm", 3, H, 2, seed=3).state_dict()
    sd = gc.RNN("lstm", 3, H, 2, forget_bias=1.5, seed=3).state_dict()
    for layer in (0, 1):
        bih, bhh = sd[f"bias_ih_l{layer}"], sd[f"bias_hh_l{layer}"]
        np.testing.assert_array_equal(bih[H : 2 * H], 1.5)
        np.testing.assert_array_equal(bhh[H : 2 * H], 0.0)
        for lo, hi in ((0, H), (2 * H, 4 * H)):  # the other gates keep their draw
            np.testing.assert_array_equal(bih[lo:hi], plain[f"bias_ih_l{layer}"][lo:hi])
            np.testing.assert_array_equal(bhh[lo:hi], plain[f"bias_hh_l{layer}"][lo:hi])
    ortho = gc.RNN("lstm", 3, H, init="orthogonal", forget_bias=-1.0, seed=3).state_dict()
    expected = np.zeros(4 * H)
    expected[H : 2 * H] = -1.0
    np.testing.assert_array_equal(ortho["bias_ih_l0"], expected)
    np.testing.assert_array_equal(ortho["bias_hh_l0"], 0.0)


def test_normal_init(gc):
    H, n_in = 256, 64
    rnn = gc.RNN("gru", n_in, H, init="normal", gain=0.8, recurrent_gain=1.7, seed=6)
    sd = rnn.state_dict()
    whh, wih = sd["weight_hh_l0"], sd["weight_ih_l0"]
    assert abs(whh.std() / (1.7 / math.sqrt(H)) - 1) < 0.01
    assert abs(wih.std() / (0.8 / math.sqrt(n_in)) - 1) < 0.01
    assert abs(whh.mean()) < 5 * whh.std() / math.sqrt(whh.size)
    np.testing.assert_array_equal(sd["bias_ih_l0"], 0)
    np.testing.assert_array_equal(sd["bias_hh_l0"], 0)


@pytest.mark.parametrize("cell", ["tanh", "lstm"])
def test_xavier_inits_are_per_gate_block(gc, cell):
    H, n_in, g, rg = 40, 10, 1.2, 0.9
    u = gc.RNN(
        cell, n_in, H, 2, init="xavier_uniform", gain=g, recurrent_gain=rg, seed=1
    ).state_dict()
    n = gc.RNN(
        cell, n_in, H, 2, init="xavier_normal", gain=g, recurrent_gain=rg, seed=1
    ).state_dict()
    for layer in (0, 1):
        fan_in = n_in if layer == 0 else H
        for name, scale, fan in (("weight_ih", g, fan_in), ("weight_hh", rg, H)):
            bound = scale * math.sqrt(6 / (fan + H))
            std = scale * math.sqrt(2 / (fan + H))
            for b in _blocks(u[f"{name}_l{layer}"], cell):
                assert np.all(np.abs(b) <= bound) and np.abs(b).max() > 0.85 * bound, name
            blocks = _blocks(n[f"{name}_l{layer}"], cell)
            s = np.concatenate([b.ravel() for b in blocks]).std()
            assert abs(s / std - 1) < 0.1, (name, s, std)
        np.testing.assert_array_equal(u[f"bias_ih_l{layer}"], 0)
        np.testing.assert_array_equal(n[f"bias_hh_l{layer}"], 0)


@pytest.mark.parametrize(
    "init", ["default", "xavier_uniform", "xavier_normal", "orthogonal", "normal"]
)
def test_seeds_and_float32(gc, init):
    kw = {"output_size": 3, "init": init}
    a = gc.RNN("lstm", 4, 7, 2, seed=12, **kw).state_dict()
    b = gc.RNN("lstm", 4, 7, 2, seed=12, **kw).state_dict()
    c = gc.RNN("lstm", 4, 7, 2, seed=13, **kw).state_dict()
    f = gc.RNN("lstm", 4, 7, 2, seed=12, dtype="float32", **kw).state_dict()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
        assert f[k].dtype == np.float32
        np.testing.assert_array_equal(f[k], a[k].astype(np.float32))
        if np.any(a[k]):
            assert not np.array_equal(a[k], c[k]), k
    assert np.any(a["weight_hh_l0"] != c["weight_hh_l0"])


# --------------------------------------------------------------------------------------
# 9. forward()
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("cell", CELLS)
def test_forward_numpy(gc, cell, rng):
    T, B, n_in, H, L = 9, 3, 4, 5, 3
    rnn = gc.RNN(cell, n_in, H, L, output_size=2, seed=9)
    x = rng.normal(size=(T, B, n_in))
    h0 = rng.normal(size=(L, B, H))
    c0 = rng.normal(size=(L, B, H)) if cell == "lstm" else None
    out, h_n, c_n = rnn.forward(x, h0=h0, c0=c0)
    ref = O.numpy_rnn_forward(cell, rnn.state_dict(), x, h0=h0, c0=c0)
    assert out.shape == (T, B, H) and h_n.shape == (L, B, H)
    assert_close(out, ref["output"], what="output")
    assert_close(h_n, ref["h_n"], what="h_n")
    if cell == "lstm":
        assert_close(c_n, ref["c_n"], what="c_n")
    else:
        assert c_n is None
    # zero initial states by default
    out0, _, _ = rnn.forward(x)
    assert_close(out0, O.numpy_rnn_forward(cell, rnn.state_dict(), x)["output"], what="h0 = 0")


@needs_torch
@pytest.mark.parametrize("cell", CELLS)
def test_forward_torch(gc, cell, rng):
    T, B, n_in, H, L = 8, 2, 3, 6, 2
    rnn = gc.RNN(cell, n_in, H, L, init="xavier_uniform", seed=10)
    mod = _torch_module(cell, n_in, H, L)
    mod.load_state_dict({k: torch.from_numpy(a) for k, a in rnn.state_dict().items()})
    x = rng.normal(size=(T, B, n_in))
    h0 = rng.normal(size=(L, B, H))
    c0 = rng.normal(size=(L, B, H)) if cell == "lstm" else None
    o_t, h_t, c_t = _module_forward(mod, cell, x, h0, c0)
    o, h, c = rnn.forward(x, h0, c0)
    assert_close(o, o_t, what="output")
    assert_close(h, h_t, what="h_n")
    if cell == "lstm":
        assert_close(c, c_t, what="c_n")


@needs_torch
@pytest.mark.parametrize("cell", CELLS)
def test_batch_first_as_torch(gc, cell, rng):
    """batch_first=True takes (batch, steps, input) as the torch module does, and gives the
    same report as the time-first chain on the transposed arrays."""
    B, T, n_in, H, L = 3, 6, 4, 5, 2
    rnn = gc.RNN(cell, n_in, H, L, output_size=3, batch_first=True, init="xavier_uniform", seed=2)
    assert rnn.batch_first and "batch_first=True" in repr(rnn)
    mod = _torch_module(cell, n_in, H, L)
    mod.batch_first = True
    mod.load_state_dict(
        {
            k: torch.from_numpy(a)
            for k, a in rnn.state_dict().items()
            if not k.startswith("readout.")
        }
    )
    x = rng.normal(size=(B, T, n_in))
    h0 = rng.normal(size=(L, B, H))
    c0 = rng.normal(size=(L, B, H)) if cell == "lstm" else None
    o_t, h_t, _ = _module_forward(mod, cell, x, h0, c0)
    o, h, _ = rnn.forward(x, h0, c0)
    assert o.shape == (B, T, H) and o.flags.writeable
    assert_close(o, o_t, what="output")
    assert_close(h, h_t, what="h_n")
    tf = gc.RNN.from_state_dict(rnn.state_dict(), cell)
    for tgt in (
        rng.normal(size=(B, T, 3)),
        rng.integers(0, 3, size=(B, T)),
        rng.integers(0, 3, size=B),
    ):
        a = rnn.backward(x, tgt, h0=h0, c0=c0, return_grads=True)
        b = tf.backward(
            x.swapaxes(0, 1),
            tgt.swapaxes(0, 1) if tgt.ndim > 1 else tgt,
            h0=h0,
            c0=c0,
            return_grads=True,
        )
        assert a.log10_param_grad_norms == b.log10_param_grad_norms and a.loss == b.loss
        np.testing.assert_array_equal(a.state_grads, b.state_grads)
    g = rng.normal(size=(B, T, H))
    a = rnn.backward(x, grad_output=g)
    b = tf.backward(x.swapaxes(0, 1), grad_output=g.swapaxes(0, 1))
    np.testing.assert_array_equal(a.log10_layer_state_grad_norms, b.log10_layer_state_grad_norms)
    with pytest.raises(ValueError, match=r"x must have shape \(batch, steps, 4\)"):
        rnn.backward(np.ones((T, B, 3)))
    with pytest.raises(ValueError, match=r"target must have shape \(3, 6, 3\)"):
        rnn.backward(x, rng.normal(size=(T, B, 3)))
    with pytest.raises(ValueError, match=r"\(3,\) \(last step\) or \(3, 6\) \(every step\)"):
        rnn.backward(x, rng.integers(0, 3, size=(T, B)))
    sd = gc.RNN.from_state_dict(rnn.state_dict(), cell, batch_first=True)
    assert sd.batch_first and np.array_equal(sd.forward(x)[0], rnn.forward(x)[0])
    with pytest.raises(TypeError, match="batch_first must be True or False"):
        gc.RNN(cell, 2, 3, batch_first="yes")


def test_batch_first_jacobians_and_theory(gc, rng):
    """The Jacobian tools and compare_theory read a batch_first RNN's x in its layout."""
    rnn = gc.RNN("tanh", 3, 8, init="normal", recurrent_gain=1.2, seed=1, batch_first=True)
    tf = gc.RNN.from_state_dict(rnn.state_dict(), "tanh")
    x = rng.normal(size=(2, 20, 3))
    a, b = gc.jacobian_norms(rnn, x), gc.jacobian_norms(tf, x.swapaxes(0, 1))
    np.testing.assert_array_equal(a.log10_spectral, b.log10_spectral)
    a, b = gc.compare_theory(rnn, x, k=4), gc.compare_theory(tf, x.swapaxes(0, 1), k=4)
    np.testing.assert_array_equal(a.measured, b.measured)
    np.testing.assert_array_equal(a.measured_exponents, b.measured_exponents)
    drawn = gc.compare_theory(rnn, steps=30, spectrum=False)  # the input drawn inside
    assert drawn.measured.shape == (31,)


def test_rnn_names_repr_and_state_dict(gc):
    rnn = gc.RNN("gru", 3, 4, 2, output_size=2, init="orthogonal", recurrent_gain=0.9, seed=5)
    assert [n for n, _ in rnn.named_parameters()] == list(rnn.param_names) == list(rnn.state_dict())
    for (_, view), copy in zip(rnn.named_parameters(), rnn.state_dict().values()):
        np.testing.assert_array_equal(view, copy)
        assert not view.flags.writeable
    assert repr(rnn) == (
        "RNN('gru', input_size=3, hidden_size=4, num_layers=2, output_size=2, bias=True, init='orthogonal', "
        "gain=1.0, recurrent_gain=0.9, spectral_radius=None, forget_bias=None, batch_first=False, "
        "dtype='float64', seed=5)"
    )
    again = eval(repr(rnn), vars(gc))  # our own repr
    for k, a in rnn.state_dict().items():
        np.testing.assert_array_equal(again.state_dict()[k], a)
    loaded = gc.RNN.from_state_dict(rnn.state_dict(), "gru")
    assert "init=" not in repr(loaded) and "seed" not in repr(loaded)
    with pytest.raises(TypeError, match=r"float16.*float32 and float64"):
        gc.RNN.from_state_dict(
            {k: a.astype(np.float16) for k, a in rnn.state_dict().items()}, "gru"
        )


def test_rnn_report_old_names_warn(gc):
    """param_grad_norms, log10_param_grad_norms and param_grads were weight_grad_norms,
    log10_weight_grad_norms and grads; the old names still answer, with a warning."""
    rnn = gc.RNN("tanh", 2, 3, seed=0)
    rep = rnn.backward(np.ones((4, 2, 2)), return_grads=True)
    for old, new in (
        ("weight_grad_norms", "param_grad_norms"),
        ("log10_weight_grad_norms", "log10_param_grad_norms"),
        ("grads", "param_grads"),
    ):
        with pytest.warns(DeprecationWarning, match=f"{old} is deprecated.*use {new}"):
            value = getattr(rep, old)
        assert list(value) == list(getattr(rep, new)) == list(rnn.param_names)
    assert "\n" not in repr(rep) and repr(rep).startswith("RecurrentReport(cell='tanh'")
    assert "<table>" in rep._repr_html_()
    x = np.ones((4, 2, 2))
    assert (
        rnn.backward(x, np.array([0, 2])).loss
        == rnn.backward(x, np.array([0, 2]), loss="cross_entropy").loss
    )


# --------------------------------------------------------------------------------------
# 10. the report
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("cell", CELLS)
def test_report(gc, cell, rng):
    T, B, L = 30, 2, 2
    rnn = gc.RNN(cell, 3, 4, L, output_size=2, seed=0)
    x = rng.normal(size=(T, B, 3))
    tgt = rng.normal(size=(T, B, 2))
    for kw in (
        {},
        {"return_grads": True, "max_norm": 0.01, "truncate": 5, "truncate_mode": "window"},
    ):
        rep = rnn.backward(x, tgt, **kw)
        assert isinstance(rep, gc.RecurrentReport)
        assert rep.cell == cell and rep.steps == T and rep.num_layers == L
        d = rep.to_dict()
        json.dumps(d)
        assert "param_grads" not in d and "state_grads" not in d
        full = rep.to_dict(grads=True)
        assert json.loads(json.dumps(full))["cell"] == cell
        if kw:
            assert set(full["param_grads"]) == set(rnn.param_names)
            assert np.array_equal(np.asarray(full["state_grads"]), rep.state_grads)
        assert isinstance(str(rep), str) and "log10|dL/dh_t|" in str(rep)
        table = rep.table(every=7)
        assert "log10|dL/dh_t|" in table
        assert ("log10|dL/dc_t|" in table) == (cell == "lstm")
        assert len(table.splitlines()) == 1 + len(set(range(0, T + 1, 7)) | {T})
        assert list(rep.param_grad_norms) == list(rnn.state_dict()) == list(rnn.param_names)
        assert list(rep.log10_param_grad_norms) == list(rnn.param_names)
        for k, v in rep.param_grad_norms.items():
            assert v == pytest.approx(10 ** rep.log10_param_grad_norms[k], rel=1e-14)
        assert rep.state_grad_norms.shape == (T + 1,)
        assert rep.log10_state_grad_norms.shape == (T + 1,)
        assert rep.log10_layer_state_grad_norms.shape == (L, T + 1)
        assert rep.layer_state_grad_norms.shape == (L, T + 1)
        np.testing.assert_array_equal(
            rep.log10_state_grad_norms, rep.log10_layer_state_grad_norms[-1]
        )
        np.testing.assert_allclose(
            rep.layer_state_grad_norms, 10.0**rep.log10_layer_state_grad_norms, rtol=1e-14
        )
        assert rep.total_norm == pytest.approx(10**rep.log10_total_norm, rel=1e-14)
        if cell == "lstm":
            assert rep.log10_layer_cell_grad_norms.shape == (L, T + 1)
            assert rep.cell_grad_norms.shape == (T + 1,)
            assert rep.layer_cell_grad_norms.shape == (L, T + 1)
            assert rep.c_n.shape == (L, B, 4)
        else:
            assert rep.log10_layer_cell_grad_norms is None and rep.log10_cell_grad_norms is None
            assert rep.cell_grad_norms is None and rep.layer_cell_grad_norms is None
            assert rep.c_n is None
        assert rep.h_n.shape == (L, B, 4)
        with pytest.raises(ValueError):
            rep.log10_layer_state_grad_norms[0, 0] = 1.0  # read-only
    assert rep.max_norm == 0.01 and rep.log10_clip_coef < 0
    assert rep.log10_clipped_total_norm == pytest.approx(rep.log10_total_norm + rep.log10_clip_coef)
    assert rep.truncate == 5 and rep.truncate_mode == "window"


def test_report_floats_outside_the_range(gc):
    """state_grad_norms is 10**log10: 0 below the float range, inf above; -inf exact zeros."""
    H = 4
    sd = {"weight_ih_l0": np.zeros((H, 1)), "weight_hh_l0": 0.5 * np.eye(H)}
    rnn = gc.RNN.from_state_dict(sd, "relu")
    rep = rnn.backward(
        np.zeros((2000, 1, 1)), h0=np.ones((1, 1, H)) * 1e300, grad_output=np.ones((1, H))
    )
    lg = rep.log10_state_grad_norms
    assert lg[0] < -400 and math.isfinite(lg[0])
    f = rep.state_grad_norms
    assert np.all(f[lg < -400] == 0.0)
    ok = lg > -300
    np.testing.assert_allclose(f[ok], 10.0 ** lg[ok], rtol=1e-14)
    d = rep.to_dict()
    json.dumps(d)
    assert d["log10_param_grad_norms"]["weight_ih_l0"] == "-inf"
    assert d["param_grad_norms"]["weight_ih_l0"] == 0.0


# --------------------------------------------------------------------------------------
# 11. pickling and memory
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_pickle_round_trip(gc, dtype, rng):
    rnn = gc.RNN("lstm", 3, 5, 2, output_size=2, init="orthogonal", dtype=dtype, seed=4)
    again = pickle.loads(pickle.dumps(rnn))
    assert repr(again) == repr(rnn) and again.dtype == rnn.dtype
    for k, a in rnn.state_dict().items():
        np.testing.assert_array_equal(again.state_dict()[k], a)
    x = rng.normal(size=(11, 3, 3))
    tgt = rng.integers(0, 2, size=(11, 3))
    a = rnn.backward(x, tgt, return_grads=True, truncate=3)
    b = again.backward(x, tgt, return_grads=True, truncate=3)
    np.testing.assert_array_equal(a.log10_layer_state_grad_norms, b.log10_layer_state_grad_norms)
    np.testing.assert_array_equal(a.state_grads, b.state_grads)
    for k in a.param_grads:
        np.testing.assert_array_equal(a.param_grads[k], b.param_grads[k])
    assert a.loss == b.loss


@pytest.mark.parametrize("cell", CELLS)
def test_backward_memory_is_linear_in_steps(gc, cell):
    rnn = gc.RNN(cell, 3, 16, 2, output_size=4, seed=0)
    for kw in (
        {},
        {"return_grads": True},
        {"truncate": 8, "truncate_mode": "window", "every_step": True},
    ):
        m = [rnn.backward_memory(t, 5, **kw) for t in (100, 200, 300, 400)]
        assert all(isinstance(v, int) and v > 0 for v in m)
        assert m[1] - m[0] == m[2] - m[1] == m[3] - m[2] > 0, m
    # about num_layers * steps * batch * hidden numbers, times 2 / 7 / 5
    per = {"tanh": 2, "relu": 2, "lstm": 7, "gru": 5}[cell]
    slope = (rnn.backward_memory(2000, 5) - rnn.backward_memory(1000, 5)) / 1000
    assert 0.5 * per * 2 * 5 * 16 * 8 <= slope <= 3 * per * 2 * 5 * 16 * 8
    assert rnn.backward_memory(100, 5, return_grads=True) > rnn.backward_memory(100, 5)


def test_memory_too_big(gc):
    rnn = gc.RNN("lstm", 1, 1024, seed=0)
    phys = gc._core.physical_memory_bytes()
    big = rnn.backward_memory(10**9, 10**3)
    assert big > max(phys, 2**40)
    # a request above physical memory with a small input: (steps, batch, 1)
    per = rnn.backward_memory(2000, 1) - rnn.backward_memory(1000, 1)
    steps = int(1.5 * phys * 1000 / per) + 1
    assert rnn.backward_memory(steps, 1) > phys
    x = np.zeros((steps, 1, 1))
    with pytest.raises(MemoryError) as info:
        rnn.backward(x)
    assert "bytes" in str(info.value)
    with pytest.raises(MemoryError):
        rnn.backward(x, return_grads=True)


# --------------------------------------------------------------------------------------
# 12. run time: the GIL, Ctrl-C, thread count
# --------------------------------------------------------------------------------------
def test_backward_releases_the_gil(gc):
    rnn = gc.RNN("tanh", 8, 64, seed=0)
    x = np.ones((4000, 32, 8))

    def work():
        rnn.backward(x)
        rnn.backward(x, truncate=50, truncate_mode="detach")

    n = ticks_while(work)
    assert n >= 10, n


def test_ctrl_c_stops_a_long_recurrent_backward_promptly():
    code = """
        import os, signal, threading, time
        import numpy as np, gradchain as gc
        rnn = gc.RNN("lstm", 8, 256, seed=0)
        x = np.ones((4000, 4, 8))
        t0 = time.perf_counter(); rnn.backward(x[:250]); short = time.perf_counter() - t0
        threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
        t0 = time.perf_counter()
        try:
            rnn.backward(x)
            print("not interrupted")
        except KeyboardInterrupt:
            print("interrupted", time.perf_counter() - t0, short * 16)
        print("after", np.isfinite(rnn.backward(x[:5]).log10_total_norm))
    """
    out = run_python(code).split()
    assert out[0] == "interrupted", out
    elapsed, full = float(out[1]), float(out[2])
    assert elapsed < min(0.3 + 1.5, 0.6 * full), (elapsed, full)
    assert out[-2:] == ["after", "True"]


_THREAD_CODE = """
    import sys
    import numpy as np, gradchain as gc
    rng = np.random.default_rng(0)
    out = {}
    # (T, B, H, truncation): a batch split in two halves; window and detach truncation; an
    # unsplit batch of one whose products are large enough to split their columns.
    big = {"tanh": 1024, "relu": 1024, "lstm": 512, "gru": 600}
    for dtype in ("float64", "float32"):
        for cell in ("tanh", "relu", "lstm", "gru"):
            for T, B, H, mode in ((120, 6, 16, "none"), (60, 5, 8, "window"),
                                  (60, 7, 8, "detach"), (3, 1, big[cell], "none")):
                rnn = gc.RNN(cell, 5, H, 2, output_size=3, dtype=dtype, seed=1)
                x = rng.normal(size=(T, B, 5))
                tgt = rng.normal(size=(T, B, 3))
                kw = {} if mode == "none" else {"truncate": 9, "truncate_mode": mode}
                rep = rnn.backward(x, tgt, return_grads=True, **kw)
                key = f"{dtype}-{cell}-{mode}-B{B}"
                out[key + "-state"] = rep.state_grads
                if rep.cell_grads is not None:
                    out[key + "-cell"] = rep.cell_grads
                out[key + "-norms"] = rep.log10_layer_state_grad_norms
                out[key + "-scalars"] = np.array([rep.log10_total_norm, rep.loss, rep.log10_loss])
                for k, g in rep.param_grads.items():
                    out[f"{key}-{k}"] = g
                    out[f"{key}-log10-{k}"] = np.array([rep.log10_param_grad_norms[k]])
                out[key + "-forward"] = rnn.forward(x)[0]
    out["threads"] = np.array([gc._core.max_threads()])
    np.savez(sys.argv[1], **out)
"""


def test_results_do_not_depend_on_the_thread_count(tmp_path):
    """Bit for bit: the batch is split by the problem's size, not by the thread count, and
    every sum runs in the same order on one thread or two."""
    code = textwrap.dedent(_THREAD_CODE)
    files = {}
    for name, env in (("one", {"OMP_NUM_THREADS": "1"}), ("two", {"OMP_NUM_THREADS": "2"})):
        full_env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
        full_env.update(env)
        path = tmp_path / f"{name}.npz"
        subprocess.run(
            [sys.executable, "-c", code, str(path)], env=full_env, check=True, timeout=300
        )
        files[name] = np.load(path)
    one, two = files["one"], files["two"]
    assert sorted(one.files) == sorted(two.files)
    assert one["threads"][0] == 1 and two["threads"][0] == 2
    for k in one.files:
        if k != "threads":
            assert np.array_equal(one[k], two[k], equal_nan=True), k


# --------------------------------------------------------------------------------------
# 13. the tasks
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("cell", CELLS)
def test_adding_problem(gc, cell):
    task = gc.tasks.adding_problem(T=60, batch=4, seed=cell.__len__())
    rnn = gc.RNN(cell, task.input_size, 12, output_size=task.output_size, seed=0)
    rep = rnn.backward(task.x, loss=task.loss, target=task.target, return_grads=True)
    assert rep.state_grad_norms.shape == (task.T + 1,)
    assert np.all(np.isfinite(rep.log10_state_grad_norms))
    assert all(math.isfinite(v) for v in rep.log10_param_grad_norms.values())
    assert math.isfinite(rep.loss) and rep.loss > 0
    ref = O.numpy_rnn_backward(cell, rnn.state_dict(), task.x, loss=task.loss, target=task.target)
    check_report(rep, ref, rnn)


@pytest.mark.parametrize("cell", CELLS)
def test_copy_task(gc, cell):
    task = gc.tasks.copy_task(T=15, batch=3, n_symbols=4, length=3, seed=2)
    rnn = gc.RNN(cell, task.input_size, 10, 2, output_size=task.output_size, seed=1)
    rep = rnn.backward(task.x, loss=task.loss, target=task.target, return_grads=True)
    assert rep.log10_layer_state_grad_norms.shape == (2, task.T + 1)
    assert np.all(np.isfinite(rep.log10_state_grad_norms))
    assert math.isfinite(rep.loss) and rep.loss > 0
    ref = O.numpy_rnn_backward(cell, rnn.state_dict(), task.x, loss=task.loss, target=task.target)
    check_report(rep, ref, rnn)


def test_float32_task(gc):
    task = gc.tasks.adding_problem(T=40, batch=3, seed=0, dtype="float32")
    rnn = gc.RNN("lstm", task.input_size, 8, output_size=1, dtype="float32", seed=0)
    rep = rnn.backward(
        task.x, loss=task.loss, target=task.target, truncate=10, truncate_mode="window"
    )
    assert rep.state_grad_norms.shape == (41,)
    ref = O.numpy_rnn_backward(
        "lstm",
        rnn.state_dict(),
        task.x,
        loss="mse",
        target=task.target,
        truncate=10,
        truncate_mode="window",
    )
    with np.errstate(divide="ignore"):
        exp = np.log10(slice_norms(ref["state_grads"]))
    np.testing.assert_allclose(rep.log10_layer_state_grad_norms, exp, atol=1e-4)
