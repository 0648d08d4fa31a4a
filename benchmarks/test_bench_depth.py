"""A million layers: gradchain.MLP.backward with weights drawn for each pass and activation
checkpointing, its time and the peak resident set of the process that ran it.

Run with ``pytest benchmarks/test_bench_depth.py`` (see benchmarks/README.md). The depth is
``GRADCHAIN_BENCH_DEPTH`` (default 1,000,000); each depth runs in a fresh child process so
that its peak resident set is its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("gradchain")

DEPTH = int(os.environ.get("GRADCHAIN_BENCH_DEPTH", "1000000"))
WIDTH, BATCH = 64, 32

CHILD = textwrap.dedent(
    """
    import json, resource, sys, time
    import numpy as np, gradchain as gc
    depth, width, batch = map(int, sys.argv[1:4])
    x = np.random.default_rng(1).standard_normal((batch, width))
    t0 = time.perf_counter()
    net = gc.MLP(depth=depth, width=width, activation="tanh", seed=0, store_weights=False)
    t1 = time.perf_counter()
    rep = net.backward(x, checkpoint="sqrt")
    t2 = time.perf_counter()
    print(json.dumps({
        "build_s": t1 - t0,
        "backward_s": t2 - t1,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "backward_memory": net.backward_memory(batch, checkpoint="sqrt"),
        "finite": bool(np.isfinite(rep.log10_weight_grad_norms).all()),
        "layers": int(rep.log10_weight_grad_norms.shape[0]),
    }))
    """
)


def test_million_layers(benchmark):
    """One pass per round (a pass is long); pytest-benchmark times the child's whole run,
    the child reports the backward pass alone and its peak resident set."""
    benchmark.group = f"d{DEPTH}-w{WIDTH}-b{BATCH}-tanh-f64-drawn-sqrt"
    results = []

    def run():
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(DEPTH), str(WIDTH), str(BATCH)],
            capture_output=True,
            text=True,
            check=True,
        )
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))

    benchmark.pedantic(run, rounds=1, iterations=1)
    r = results[-1]
    benchmark.extra_info.update(r)
    assert r["finite"] and r["layers"] == DEPTH
    print(
        f"\ndepth {DEPTH}: backward {r['backward_s']:.1f} s, build {r['build_s']:.1f} s, "
        f"peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB "
        f"(backward_memory {r['backward_memory'] / 2**30:.3f} GiB)"
    )
