"""Shared fixtures and the ratio table printed at the end of ``pytest benchmarks/``."""

from __future__ import annotations

import importlib.util
import math
import os

import peers
import pytest


@pytest.fixture(scope="session")
def torch_peer():
    """A PyTorch worker process (peers.TorchProcess), shared by the torch benchmarks.

    PyTorch is imported only in the worker (never next to gradchain, see TorchProcess),
    with its intra-op threads set to the cores this process may use (2 on the reference
    machine: torch.set_num_threads(2)). Skips when torch is not installed.
    """
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed")
    with peers.TorchProcess() as worker:
        yield worker


@pytest.fixture(scope="session")
def jax_peer():
    """A JAX worker process (peers.JaxProcess), shared by the JAX benchmarks: JAX is
    imported only there, never next to gradchain or PyTorch. Skips when jax is not
    installed (it is optional, as torch is)."""
    if importlib.util.find_spec("jax") is None:
        pytest.skip("jax is not installed")
    with peers.JaxProcess() as worker:
        yield worker


def pytest_collection_modifyitems(session, config, items):
    """PyTorch entries, then JAX entries, last (stable, so the files' order stays
    otherwise): each worker process starts with the first of its entries and stays up, and
    gradchain and the NumPy peers are timed before either exists."""

    def rank(item):
        names = getattr(item, "fixturenames", ())
        return 2 if "jax_peer" in names else 1 if "torch_peer" in names else 0

    items.sort(key=rank)


# --------------------------------------------------------------------------- ratios

_load_at_start = None


def pytest_sessionstart(session):
    global _load_at_start
    _load_at_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def _entries(config):
    bs = getattr(config, "_benchmarksession", None)
    if bs is None:
        return []
    out = []
    for b in bs.benchmarks:
        info = b.extra_info or {}
        if "impl" not in info or not b or b.has_error:
            continue
        out.append((b.group, info["impl"], b.stats, info))
    return out


def compute_ratios(config):
    """Rows: one per (group, peer) plus one per GEMM floor, medians in seconds."""
    rows = []
    groups = {}
    for group, impl, stats, info in _entries(config):
        groups.setdefault(group, {})[impl] = (stats, info)
    for group, impls in groups.items():
        gc_entry = impls.get("gradchain")
        gc_med = gc_entry[0].median if gc_entry else math.nan
        for impl, (stats, info) in impls.items():
            if impl == "gradchain":
                continue
            if impl == "gemm-floor":
                floor = info["floor_s"]
                ratio = gc_med / floor
                target = info.get("target_ratio")
                rows.append({
                    "group": group, "peer": "gemm-floor", "peer_s": floor, "gradchain_s": gc_med,
                    "kind": "gradchain/floor", "ratio": ratio, "target": target,
                    "met": None if target is None or math.isnan(ratio) else ratio <= target,
                    "note": f"{info['pass_flop'] / 1e9:.3g} GFLOP of products at the "
                            f"{info['gemm_gflops']:.0f} GFLOP/s of a large GEMM",
                })
            elif "max_ratio" in info:  # another way to run gradchain: its overhead
                ratio = stats.median / gc_med
                target = info["max_ratio"]
                rows.append({
                    "group": group, "peer": impl, "peer_s": stats.median, "gradchain_s": gc_med,
                    "kind": "overhead", "ratio": ratio, "target": target,
                    "met": None if math.isnan(ratio) else ratio <= target,
                    "note": info.get("note", ""),
                })
            else:
                ratio = stats.median / gc_med
                target = info.get("target_speedup")
                rows.append({
                    "group": group, "peer": impl, "peer_s": stats.median, "gradchain_s": gc_med,
                    "kind": "speedup", "ratio": ratio, "target": target,
                    "met": None if target is None or math.isnan(ratio) else ratio >= target,
                    "note": info.get("note", ""),
                })
    return rows


def _fmt_ms(s):
    return f"{'-':>10}" if math.isnan(s) else f"{1e3 * s:10.2f}"


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's own tables
def pytest_terminal_summary(terminalreporter, config):
    rows = compute_ratios(config)
    if not rows:
        return
    tr = terminalreporter
    tr.write_sep("-", "gradchain ratios (medians; speedup = peer / gradchain, "
                      "floor ratio = gradchain / floor)")
    if _load_at_start is not None:
        busy = ""
        if _load_at_start > 0.5 * peers.available_cores():
            busy = "  (machine busy or just used: check the timings)"
        tr.write_line(f"cores {peers.available_cores()}, 1-min load average at start "
                      f"{_load_at_start:.2f}{busy}")
    tr.write_line(f"{'group':<26} {'vs':<11} {'peer ms':>10} {'gradchain ms':>12} "
                  f"{'ratio':>10} {'target':>8}  met")
    for r in rows:
        if math.isnan(r["ratio"]):  # no gradchain entry in the group
            ratio = "-"
            target = f">={r['target']:g}x" if r["target"] is not None else "-"
        elif r["kind"] == "speedup":
            ratio = f"{r['ratio']:9.1f}x"
            target = f">={r['target']:g}x" if r["target"] is not None else "-"
        else:
            ratio = f"{r['ratio']:10.2f}"
            target = f"<={r['target']:g}" if r["target"] is not None else "-"
        met = {True: "yes", False: "NO", None: "-"}[r["met"]]
        tr.write_line(f"{r['group']:<26} {r['peer']:<11} {_fmt_ms(r['peer_s'])} "
                      f"{_fmt_ms(r['gradchain_s']):>12} {ratio:>10} {target:>8}  {met}"
                      + (f"   [{r['note']}]" if r["note"] else ""))


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """With --benchmark-json, store the ratio table in the JSON file too."""
    output_json["gradchain_ratios"] = compute_ratios(config)
