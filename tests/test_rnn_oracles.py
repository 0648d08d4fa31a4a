"""The recurrent oracles against each other, against finite differences, against torch's
fused modules and against the defining properties of truncated BPTT.

gradchain's RNN is tested against these oracles, so they must be right first.
"""

from __future__ import annotations

import itertools
import math
import zlib
from dataclasses import dataclass

import numpy as np
import oracles as O
import pytest
from checks import assert_close
from conftest import needs_torch

RTOL = 1e-12


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def assert_results_close(a, b, rtol=RTOL):
    assert list(a["grads"]) == list(b["grads"])
    for name in a["grads"]:
        assert_close(a["grads"][name], b["grads"][name], rtol, name)
    assert_close(a["state_grads"], b["state_grads"], rtol, "state_grads")
    assert (a["cell_grads"] is None) == (b["cell_grads"] is None)
    if a["cell_grads"] is not None:
        assert_close(a["cell_grads"], b["cell_grads"], rtol, "cell_grads")
    assert_close(a["h_n"], b["h_n"], rtol, "h_n")
    assert (a["c_n"] is None) == (b["c_n"] is None)
    if a["c_n"] is not None:
        assert_close(a["c_n"], b["c_n"], rtol, "c_n")
    if math.isnan(b["loss"]):
        assert math.isnan(a["loss"])
    else:
        assert abs(a["loss"] - b["loss"]) <= rtol * abs(b["loss"]), (a["loss"], b["loss"])


TRUNCATIONS = (
    ("full", None),
    ("detach", "1"),
    ("detach", "mid"),
    ("detach", "ge_T"),
    ("window", "1"),
    ("window", "mid"),
    ("window", "ge_T"),
)


@dataclass(frozen=True)
class RnnCase:
    """A random small recurrent chain, its data and its loss/truncation arguments."""

    cell: str
    loss: str
    mode: str  # "full", "detach" or "window"
    k: str | None  # "1", "mid" (1 < k < T), "ge_T" (k >= T) or None
    seed: int

    @property
    def id(self) -> str:
        k = "" if self.k is None else f"-k{self.k}"
        return f"{self.cell}-{self.loss}-{self.mode}{k}"

    def draw(self):
        rng = np.random.default_rng(self.seed)
        T = int(rng.integers(3, 8))
        B = int(rng.integers(1, 4))
        n_in = int(rng.integers(1, 5))
        H = int(rng.integers(1, 6))
        L = int(rng.integers(1, 4))
        bias = bool(rng.random() < 0.6)
        if self.loss == "cross_entropy":
            out = int(rng.integers(2, 5))
        elif self.loss == "mse":
            out = int(rng.integers(1, 4)) if rng.random() < 0.6 else None
        else:
            out = int(rng.integers(1, 4)) if rng.random() < 0.3 else None  # unused readout
        sd = O.random_rnn_state_dict(
            self.cell,
            n_in,
            H,
            L,
            output_size=out,
            bias=bias,
            gain=float(rng.uniform(0.6, 1.2)),
            bias_std=0.3,
            seed=int(rng.integers(2**31)),
        )
        x = rng.normal(size=(T, B, n_in))
        kw = {"loss": self.loss}
        if rng.random() < 0.5:
            kw["h0"] = rng.normal(size=(L, B, H)) * 0.5
        if self.cell == "lstm" and rng.random() < 0.5:
            kw["c0"] = rng.normal(size=(L, B, H))
        every_step = bool(rng.random() < 0.5)
        lead = (T,) if every_step else ()
        width = out if out is not None else H
        if self.loss == "mse":
            kw["target"] = rng.normal(size=(*lead, B, width))
        elif self.loss == "cross_entropy":
            kw["target"] = rng.integers(0, out, size=(*lead, B))
        elif self.loss == "grad":
            kw["target"] = rng.normal(size=(*lead, B, H))
        if self.mode != "full":
            k = {"1": 1, "mid": int(rng.integers(2, T)), "ge_T": T + int(rng.integers(0, 3))}[
                self.k
            ]
            kw.update(truncate=k, truncate_mode=self.mode)
        return sd, x, kw


CASES = [
    RnnCase(cell, loss, mode, k, seed=zlib.crc32(f"{cell}-{loss}-{mode}-{k}".encode()))
    for cell, loss, (mode, k) in itertools.product(O.RNN_CELLS, O.RNN_LOSSES, TRUNCATIONS)
]


def test_cases_cover_the_options():
    seen = set()
    for case in CASES:
        sd, _, kw = case.draw()
        L = sum(n.startswith("weight_ih_l") for n in sd)
        seen.add((case.cell, "bias", "bias_ih_l0" in sd))
        seen.add((case.cell, "multilayer", L > 1))
        seen.add((case.cell, "h0", "h0" in kw))
        seen.add(
            (
                case.loss,
                "every_step",
                np.ndim(kw.get("target")) == (2 if case.loss == "cross_entropy" else 3),
            )
        )
        seen.add((case.loss, "readout", "readout.weight" in sd))
    for cell in O.RNN_CELLS:
        for what in ("bias", "multilayer", "h0"):
            assert {(cell, what, True), (cell, what, False)} <= seen, (cell, what)
    for loss in ("mse", "cross_entropy", "grad"):
        assert {(loss, "every_step", True), (loss, "every_step", False)} <= seen, loss
    assert {("mse", "readout", True), ("mse", "readout", False)} <= seen


# --------------------------------------------------------------------------------------
# NumPy reference == torch autograd
# --------------------------------------------------------------------------------------
@needs_torch
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_numpy_and_torch_oracles_agree(case):
    sd, x, kw = case.draw()
    a = O.numpy_rnn_backward(case.cell, sd, x, **kw)
    b = O.torch_rnn_backward(case.cell, sd, x, **kw)
    T, B = x.shape[:2]
    L = sum(n.startswith("weight_ih_l") for n in sd)
    H = sd["weight_hh_l0"].shape[1]
    assert a["state_grads"].shape == (L, T + 1, B, H)
    assert list(a["grads"]) == list(sd)
    assert (a["cell_grads"] is not None) == (case.cell == "lstm")
    assert_results_close(a, b)


@needs_torch
@pytest.mark.parametrize("cell", O.RNN_CELLS)
@pytest.mark.parametrize("loss", O.RNN_LOSSES)
def test_fused_torch_module_matches_the_unrolled_cells(cell, loss):
    rng = np.random.default_rng(zlib.crc32(f"module-{cell}-{loss}".encode()))
    T, B, n_in, H, L = 6, 3, 4, 5, 3
    out = 3 if loss in ("mse", "cross_entropy") else None
    bias = loss != "mse"  # one bias-free configuration per cell
    sd = O.random_rnn_state_dict(
        cell, n_in, H, L, output_size=out, bias=bias, seed=int(rng.integers(2**31))
    )
    x = rng.normal(size=(T, B, n_in))
    kw = {"h0": rng.normal(size=(L, B, H)) * 0.5}
    if cell == "lstm":
        kw["c0"] = rng.normal(size=(L, B, H))
    target = {
        "probe": None,
        "mse": rng.normal(size=(T, B, out or H)),
        "cross_entropy": rng.integers(0, out or 1, size=(B,)),
        "grad": rng.normal(size=(T, B, H)),
    }[loss]
    m = O.torch_module_backward(cell, sd, x, loss=loss, target=target, **kw)
    u = O.torch_rnn_backward(cell, sd, x, loss=loss, target=target, **kw)
    n = O.numpy_rnn_backward(cell, sd, x, loss=loss, target=target, **kw)
    assert list(m["grads"]) == list(sd)
    for name in sd:
        assert_close(m["grads"][name], u["grads"][name], RTOL, name)
    assert_close(m["h0_grad"], u["state_grads"][:, 0], RTOL, "h0_grad")
    if cell == "lstm":
        assert_close(m["c0_grad"], u["cell_grads"][:, 0], RTOL, "c0_grad")
    assert_close(m["h_n"], n["h_n"], RTOL, "h_n")
    fwd = O.numpy_rnn_forward(cell, sd, x, loss=loss, target=target, **kw)
    assert_close(m["output"], fwd["output"], RTOL, "output")
    assert_close(fwd["h_n"], n["h_n"], 0, "forward h_n")
    if cell == "lstm":
        assert_close(m["c_n"], n["c_n"], RTOL, "c_n")
    if not math.isnan(n["loss"]):
        assert abs(m["loss"] - n["loss"]) <= RTOL * abs(n["loss"])
    # the module's output is h_1..h_T of the top layer; the loss's own gradient there
    # is the top state gradient minus what arrives through the recurrence
    assert m["output_grads"].shape == (T, B, H)
    if loss == "grad":
        assert_close(m["output_grads"], target, RTOL, "output_grads")
    if loss == "probe":
        expected = np.zeros((T, B, H))
        expected[-1] = n["h_n"][-1]
        assert_close(m["output_grads"], expected, RTOL, "output_grads")


# --------------------------------------------------------------------------------------
# NumPy reference == finite differences of its own loss
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("cell", O.RNN_CELLS)
@pytest.mark.parametrize("loss", ["probe", "mse", "cross_entropy"])
def test_numpy_oracle_matches_finite_differences(cell, loss):
    rng = np.random.default_rng(zlib.crc32(f"fd-{cell}-{loss}".encode()))
    T, B, n_in, H, L = 4, 2, 2, 2, 2
    out = None if loss == "probe" else 2
    sd = O.random_rnn_state_dict(cell, n_in, H, L, output_size=out, seed=int(rng.integers(2**31)))
    x = rng.normal(size=(T, B, n_in))
    h0 = rng.normal(size=(L, B, H)) * 0.5
    c0 = rng.normal(size=(L, B, H)) if cell == "lstm" else None
    target = {
        "probe": None,
        "mse": rng.normal(size=(T, B, 2)),
        "cross_entropy": rng.integers(0, 2, size=(T, B)),
    }[loss]
    ref = O.numpy_rnn_backward(cell, sd, x, h0=h0, c0=c0, loss=loss, target=target)

    def f(sd=sd, h0=h0, c0=c0):
        return O.numpy_rnn_forward(cell, sd, x, h0=h0, c0=c0, loss=loss, target=target)["loss"]

    def fd(arr, call):
        g = np.zeros_like(arr)
        eps = 1e-6
        for i in np.ndindex(arr.shape):
            old = arr[i]
            arr[i] = old + eps
            up = call()
            arr[i] = old - eps
            down = call()
            arr[i] = old
            g[i] = (up - down) / (2 * eps)
        return g

    for name in sd:
        p = {k: v.copy() for k, v in sd.items()}
        assert_close(ref["grads"][name], fd(p[name], lambda p=p: f(sd=p)), 1e-6, name)
    h = h0.copy()
    assert_close(ref["state_grads"][:, 0], fd(h, lambda: f(h0=h)), 1e-6, "dL/dh0")
    if cell == "lstm":
        c = c0.copy()
        assert_close(ref["cell_grads"][:, 0], fd(c, lambda: f(c0=c)), 1e-6, "dL/dc0")


# --------------------------------------------------------------------------------------
# truncation: the definitions checked by their consequences
# --------------------------------------------------------------------------------------
def _small(cell, tag, T=7, B=2, n_in=3, H=4, L=2, out=None):
    rng = np.random.default_rng(zlib.crc32(f"{tag}-{cell}".encode()))
    sd = O.random_rnn_state_dict(cell, n_in, H, L, output_size=out, seed=int(rng.integers(2**31)))
    x = rng.normal(size=(T, B, n_in))
    h0 = rng.normal(size=(L, B, H)) * 0.5
    c0 = rng.normal(size=(L, B, H)) if cell == "lstm" else None
    return rng, sd, x, h0, c0


def _states_at(cell, sd, x, h0, c0, s):
    """The forward states of all layers at time s (s = 0: the initial ones)."""
    if s == 0:
        return h0, c0
    r = O.numpy_rnn_backward(cell, sd, x[:s], h0=h0, c0=c0)
    return r["h_n"], r["c_n"]


@pytest.mark.parametrize("cell", O.RNN_CELLS)
@pytest.mark.parametrize("mode", O.TRUNCATE_MODES)
def test_truncation_at_or_beyond_T_is_full_bptt(cell, mode):
    rng, sd, x, h0, c0 = _small(cell, f"geT-{mode}", out=2)
    target = rng.normal(size=(7, 2, 2))
    full = O.numpy_rnn_backward(cell, sd, x, h0=h0, c0=c0, loss="mse", target=target)
    for k in (7, 8, 100):
        tr = O.numpy_rnn_backward(
            cell, sd, x, h0=h0, c0=c0, loss="mse", target=target, truncate=k, truncate_mode=mode
        )
        assert_results_close(tr, full)


@pytest.mark.parametrize("cell", O.RNN_CELLS)
@pytest.mark.parametrize("every_step", [False, True])
def test_detach_and_window_coincide_for_k_1(cell, every_step):
    rng, sd, x, h0, c0 = _small(cell, f"k1-{every_step}", out=3)
    target = rng.integers(0, 3, size=(7, 2) if every_step else (2,))
    kw = {"h0": h0, "c0": c0, "loss": "cross_entropy", "target": target, "truncate": 1}
    a = O.numpy_rnn_backward(cell, sd, x, truncate_mode="detach", **kw)
    b = O.numpy_rnn_backward(cell, sd, x, truncate_mode="window", **kw)
    assert_results_close(a, b)


@pytest.mark.parametrize("cell", O.RNN_CELLS)
@pytest.mark.parametrize("k", [1, 3, 5])
def test_window_with_a_last_step_loss_is_bptt_over_the_last_k_steps(cell, k):
    rng, sd, x, h0, c0 = _small(cell, f"win-last-{k}", out=2)
    T = x.shape[0]
    target = rng.normal(size=(2, 2))
    win = O.numpy_rnn_backward(
        cell, sd, x, h0=h0, c0=c0, loss="mse", target=target, truncate=k, truncate_mode="window"
    )
    hs, cs = _states_at(cell, sd, x, h0, c0, T - k)
    tail = O.numpy_rnn_backward(cell, sd, x[T - k :], h0=hs, c0=cs, loss="mse", target=target)
    for name in sd:
        assert_close(win["grads"][name], tail["grads"][name], 1e-13, name)
    assert_close(win["state_grads"][:, T - k :], tail["state_grads"], 1e-13, "state_grads")
    assert not np.any(win["state_grads"][:, : T - k])
    if cell == "lstm":
        assert_close(win["cell_grads"][:, T - k :], tail["cell_grads"], 1e-13, "cell_grads")
        assert not np.any(win["cell_grads"][:, : T - k])


@pytest.mark.parametrize("cell", O.RNN_CELLS)
@pytest.mark.parametrize(("T", "k"), [(7, 1), (7, 2), (7, 3), (6, 3), (7, 6)])
def test_detach_is_bptt_within_segments(cell, T, k):
    """Detaching after steps k, 2k, ... splits the chain into independent segments; the
    state gradient at a boundary is the segment end's plus the next segment's start."""
    rng, sd, x, h0, c0 = _small(cell, f"seg-{T}-{k}", T=T)
    g = rng.normal(size=(T, 2, 4))
    det = O.numpy_rnn_backward(
        cell, sd, x, h0=h0, c0=c0, loss="grad", target=g, truncate=k, truncate_mode="detach"
    )
    grads = {n: np.zeros_like(v) for n, v in sd.items()}
    sg = np.zeros_like(det["state_grads"])
    cg = np.zeros_like(sg)
    for s in range(0, T, k):
        e = min(s + k, T)
        hs, cs = _states_at(cell, sd, x, h0, c0, s)
        seg = O.numpy_rnn_backward(cell, sd, x[s:e], h0=hs, c0=cs, loss="grad", target=g[s:e])
        for n in grads:
            grads[n] += seg["grads"][n]
        sg[:, s : e + 1] += seg["state_grads"]
        if cell == "lstm":
            cg[:, s : e + 1] += seg["cell_grads"]
    for n in sd:
        assert_close(det["grads"][n], grads[n], 1e-13, n)
    assert_close(det["state_grads"], sg, 1e-13, "state_grads")
    if cell == "lstm":
        assert_close(det["cell_grads"], cg, 1e-13, "cell_grads")


def test_oracles_reject_bad_arguments():
    sd = O.random_rnn_state_dict("gru", 2, 3)
    x = np.zeros((4, 1, 2))
    with pytest.raises(ValueError, match="unknown cell"):
        O.numpy_rnn_backward("elman", sd, x)
    with pytest.raises(ValueError, match="do not fit 'lstm'"):
        O.numpy_rnn_backward("lstm", sd, x)
    with pytest.raises(ValueError, match="truncate_mode"):
        O.numpy_rnn_backward("gru", sd, x, truncate=2, truncate_mode="cut")
    with pytest.raises(ValueError, match="truncate"):
        O.numpy_rnn_backward("gru", sd, x, truncate=0)
    with pytest.raises(ValueError, match="loss"):
        O.numpy_rnn_backward("gru", sd, x, loss="hinge")


# --------------------------------------------------------------------------------------
# the renormalised reference
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("cell", O.RNN_CELLS)
@pytest.mark.parametrize("L", [1, 2])
def test_renormalised_matches_plain_backward_on_short_chains(cell, L):
    rng, sd, x, h0, c0 = _small(cell, f"renorm-{L}", T=12, L=L)
    for g in (None, rng.normal(size=(2, 4))):
        loss = {"loss": "probe"} if g is None else {"loss": "grad", "target": g}
        ref = O.numpy_rnn_backward(cell, sd, x, h0=h0, c0=c0, **loss)
        got = O.renormalised_rnn_log10_state_norms(cell, sd, x, h0=h0, c0=c0, grad_output=g)
        want = np.log10(np.linalg.norm(ref["state_grads"][-1], axis=(1, 2)))
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-13)
        if cell == "lstm":
            got = O.renormalised_rnn_log10_cell_norms(cell, sd, x, h0=h0, c0=c0, grad_output=g)
            want = np.log10(np.linalg.norm(ref["cell_grads"][-1], axis=(1, 2)))
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-13)


def test_renormalised_is_exact_for_a_geometrically_vanishing_chain():
    """relu, W_ih = I, W_hh = I / 2, zero biases, constant positive input: every unit stays
    active, so dL/dh_t = 2^{t - T} h_T exactly; at T = 2000 that is ~1e-602."""
    H, T = 3, 2000
    sd = {"weight_ih_l0": np.eye(H), "weight_hh_l0": 0.5 * np.eye(H)}
    x = np.broadcast_to(np.array([1.0, 2.0, 3.0]), (T, 2, H))
    got = O.renormalised_rnn_log10_state_norms("relu", sd, x)
    h_T = np.array([[2.0, 4.0, 6.0]] * 2) * (1.0 - 0.5**T)
    want = (np.arange(T + 1) - T) * math.log10(2.0) + math.log10(np.linalg.norm(h_T))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)
    with np.errstate(all="ignore"):
        plain = O.numpy_rnn_backward("relu", sd, x)["state_grads"][-1]
    assert not np.any(plain[0])  # float64 underflows to zero


def test_renormalised_is_exact_for_a_geometrically_exploding_chain():
    """tanh at its fixed point 0 with W_hh = 2 I: dL/dh_t = 2^{T - t} g exactly (~1e602)."""
    H, T = 4, 2000
    sd = {"weight_ih_l0": np.ones((H, 1)), "weight_hh_l0": 2.0 * np.eye(H)}
    x = np.zeros((T, 2, 1))
    g = np.arange(1.0, 2 * H + 1).reshape(2, H)
    got = O.renormalised_rnn_log10_state_norms("tanh", sd, x, grad_output=g)
    want = (T - np.arange(T + 1)) * math.log10(2.0) + math.log10(np.linalg.norm(g))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)
    with np.errstate(all="ignore"):
        plain = O.numpy_rnn_backward("tanh", sd, x, loss="grad", target=g)["state_grads"][-1]
    assert not np.any(np.isfinite(plain[0]))  # float64 overflows


@pytest.mark.parametrize("cell", O.RNN_CELLS)
def test_renormalised_matches_plain_where_floats_still_work(cell):
    """Long vanishing chains: equal to the plain float64 backward while its norms are far
    from the float range's ends (np.linalg.norm squares the entries), finite beyond."""
    T = 2000
    sd = O.random_rnn_state_dict(cell, 3, 8, gain=0.5, bias_std=0.1, seed=1)
    x = np.random.default_rng(2).normal(size=(T, 2, 3))
    got = O.renormalised_rnn_log10_state_norms(cell, sd, x)
    with np.errstate(all="ignore"):
        n = np.linalg.norm(O.numpy_rnn_backward(cell, sd, x)["state_grads"][-1], axis=(1, 2))
    assert np.all(np.isfinite(got))
    assert got[0] < -330  # below float64's range
    ok = n > 1e-140
    assert ok.sum() > 100
    np.testing.assert_allclose(got[ok], np.log10(n[ok]), rtol=0, atol=1e-11)
