"""Memory guards: every constructor and pass checks what it will allocate against the memory
available (cgroup limits included) and raises MemoryError naming the bytes before it
allocates; backward_memory says what a pass takes."""

from __future__ import annotations

import json
import re
import textwrap

import numpy as np
import pytest
from checks import run_python

GIB = 2**30


def needed_bytes(message: str) -> int:
    m = re.search(r"needs (\d+) bytes", message)
    assert m, message
    return int(m.group(1))


# --------------------------------------------------------------------------------------
# sizes far beyond the machine: refused at once, nothing allocated
# --------------------------------------------------------------------------------------
H = {"gru": 30000, "tanh": 40000, "lstm": 100000}
GATES = {"gru": 3, "tanh": 1, "lstm": 4}


def rnn_params(cell: str, hidden: int, inputs: int = 1) -> int:
    g = GATES[cell] * hidden
    return g * inputs + g * hidden + 2 * g


HUGE = {
    # a list of 10**9 widths alone would take 8 GB: checked before it is built
    "mlp-depth-1e9": ("gc.MLP(depth=10**9, width=64)", 10**9 * (64 * 64 + 64) * 8),
    "mlp-float32": ("gc.MLP(depth=3000, width=50000, dtype='float32')", 3000 * 50000**2 * 4),
    **{
        f"rnn-{cell}-{h}": (f"gc.RNN({cell!r}, 1, {h})", rnn_params(cell, h) * 8)
        for cell, h in H.items()
    },
    "rnn-lstm-largest-hidden": ("gc.RNN('lstm', 1, 2**29 - 1)", rnn_params("lstm", 2**29 - 1) * 8),
    "rnn-input": ("gc.RNN('tanh', 10**9, 64)", 64 * 10**9 * 8),
}


@pytest.fixture(scope="module")
def huge_results():
    """Every HUGE call in one child whose address space is capped at 2 GiB: a missing
    check then fails there instead of taking the machine's memory."""
    code = f"""
        import json, resource, time
        resource.setrlimit(resource.RLIMIT_AS, (2 * {GIB}, 2 * {GIB}))
        import gradchain as gc
        out = {{}}
        for name, call in {json.dumps({k: c for k, (c, _) in HUGE.items()})}.items():
            t0 = time.perf_counter()
            try:
                eval(call)
                out[name] = ("no error", "", 0.0)
            except BaseException as exc:
                out[name] = (type(exc).__name__, str(exc), time.perf_counter() - t0)
        print(json.dumps(out))
    """
    return json.loads(run_python(code, timeout=120))


@pytest.mark.parametrize("name", sorted(HUGE))
def test_huge_chains_raise_memory_error_with_the_bytes(huge_results, name):
    kind, message, seconds = huge_results[name]
    assert kind == "MemoryError", (kind, message)
    # at least the parameters themselves, at most a few times them (drawing buffers)
    params = HUGE[name][1]
    assert params <= needed_bytes(message) <= 3 * params, message
    assert "more than" in message and "GiB" in message
    assert seconds < 0.5, "refused before allocating"


def test_hidden_size_whose_products_overflow_is_a_value_error(gc):
    # 4 gates x 2**29 rows do not fit BLAS's 32-bit sizes (and overflowed int before)
    with pytest.raises(ValueError, match=r"hidden_size must be at most 536870911 .*lstm"):
        gc.RNN("lstm", 1, 2**29)
    with pytest.raises(ValueError, match=r"hidden_size must be at most 715827882 .*gru"):
        gc.RNN("gru", 1, 715827883)


# --------------------------------------------------------------------------------------
# a lowered limit: GRADCHAIN_MEMORY_LIMIT
# --------------------------------------------------------------------------------------
def test_limit_variable_lowers_the_limit_and_is_named(gc, monkeypatch):
    net = gc.MLP(depth=50, width=64, seed=0)
    need = net.backward_memory(1)
    monkeypatch.setenv("GRADCHAIN_MEMORY_LIMIT", str(need - 1))
    with pytest.raises(MemoryError, match="GRADCHAIN_MEMORY_LIMIT") as info:
        net.backward(np.ones((1, 64)))
    assert needed_bytes(str(info.value)) == need
    monkeypatch.setenv("GRADCHAIN_MEMORY_LIMIT", str(need))
    assert np.isfinite(net.backward(np.ones((1, 64))).log10_total_norm)
    monkeypatch.setenv("GRADCHAIN_MEMORY_LIMIT", "lots")
    with pytest.raises(ValueError, match="GRADCHAIN_MEMORY_LIMIT must be a number of bytes"):
        gc.MLP(depth=50, width=64, seed=0)


def test_a_kept_workspace_counts_as_available(gc, monkeypatch):
    """A chain reuses (or frees) the buffers of its last pass: a second pass needs only
    what they lack."""
    net = gc.MLP(depth=50, width=64, seed=0)
    net.backward(np.ones((4, 64)))
    monkeypatch.setenv("GRADCHAIN_MEMORY_LIMIT", str(net.backward_memory(1) // 2))
    net.backward(np.ones((1, 64)))
    with pytest.raises(MemoryError, match=r"besides the .* it holds already"):
        net.backward(np.ones((64, 64)))


def test_constructors_are_checked(gc, monkeypatch):
    monkeypatch.setenv("GRADCHAIN_MEMORY_LIMIT", "1000000")
    with pytest.raises(MemoryError, match="storing the chain's weights needs"):
        gc.MLP(depth=10, width=128, store_weights=True)
    # By default a chain whose weights would not fit draws them for each pass instead.
    assert not gc.MLP(depth=10, width=128).store_weights
    with pytest.raises(MemoryError, match="storing the chain's parameters needs"):
        gc.RNN("lstm", 8, 256)
    ws = [np.ones((300, 300))] * 3
    with pytest.raises(MemoryError, match="copying the chain's weights needs"):
        gc.MLP.from_weights(ws)
    sd = {"weight_ih_l0": np.ones((1024, 4)), "weight_hh_l0": np.ones((1024, 256))}
    with pytest.raises(MemoryError, match="copying the chain's parameters needs"):
        gc.RNN.from_state_dict(sd, "lstm")


def test_recurrent_run_is_checked(gc, monkeypatch):
    rnn = gc.RNN("gru", 4, 32, seed=0)
    x = np.ones((500, 3, 4))
    need = rnn.backward_memory(500, 3)
    monkeypatch.setenv("GRADCHAIN_MEMORY_LIMIT", str(need - 1))
    with pytest.raises(MemoryError, match="this run needs") as info:
        rnn.backward(x)
    assert needed_bytes(str(info.value)) == need
    monkeypatch.setenv("GRADCHAIN_MEMORY_LIMIT", str(need))
    rnn.backward(x)


@pytest.mark.parametrize("tool", ["jacobian_norms", "jacobian_spectrum"])
def test_jacobian_tools_are_checked_before_copying_the_weights(gc, monkeypatch, tool):
    """A float32 chain's Jacobians need its weights in float64: for depth 2000, width 1024
    that is 2000 * 1024 * 1025 * 8 = 16.8 GB on top of the chain's 8.4 GB, which used to
    get the process killed. The same at a scale that fits, under a lowered limit."""
    net = gc.MLP(depth=30, width=512, dtype="float32", seed=0)  # 31.5 MB
    copy = 30 * 512 * 513 * 8
    monkeypatch.setenv("GRADCHAIN_MEMORY_LIMIT", str(copy))
    with pytest.raises(MemoryError, match="GRADCHAIN_MEMORY_LIMIT") as info:
        getattr(gc, tool)(net, np.ones(512))
    assert needed_bytes(str(info.value)) > copy
    monkeypatch.delenv("GRADCHAIN_MEMORY_LIMIT")
    quick = {"spectral": False} if tool == "jacobian_norms" else {"k": 2}
    getattr(gc, tool)(net, np.ones(512), **quick)


def test_jacobian_norms_count_the_dense_matrix_of_far_underflowing_layers(gc, monkeypatch):
    """Power iteration on a layer whose weights and derivative lie far below the floats
    forms the layer's dense Jacobian (exactly rescaled): the check counts it."""
    net = gc.MLP(depth=2, width=300, seed=0)
    x = np.ones(300)

    def needed(**kw):
        monkeypatch.setenv("GRADCHAIN_MEMORY_LIMIT", "1")
        with pytest.raises(MemoryError, match="GRADCHAIN_MEMORY_LIMIT") as info:
            gc.jacobian_norms(net, x, **kw)
        monkeypatch.delenv("GRADCHAIN_MEMORY_LIMIT")
        return needed_bytes(str(info.value))

    # above exact_max_dim = 256: no SVD, power iteration
    assert needed(spectral=True) - needed(spectral=False) >= 300 * 300 * 8


def test_recurrent_jacobians_are_checked(gc, monkeypatch):
    rnn = gc.RNN("lstm", 2, 64, seed=0)
    xs = np.ones((400, 2, 2))
    states = 401 * 128 * 8  # one sequence's stored states
    monkeypatch.setenv("GRADCHAIN_MEMORY_LIMIT", str(states))
    for tool in (gc.jacobian_norms, gc.jacobian_spectrum):
        with pytest.raises(MemoryError, match="GRADCHAIN_MEMORY_LIMIT") as info:
            tool(rnn, xs)
        assert needed_bytes(str(info.value)) > states


def test_task_generators_are_checked(gc, monkeypatch):
    from gradchain import tasks

    monkeypatch.setenv("GRADCHAIN_MEMORY_LIMIT", "1000000")
    with pytest.raises(MemoryError, match="the adding problem's arrays needs"):
        tasks.adding_problem(T=10_000, batch=8)
    with pytest.raises(MemoryError, match="the copy task's arrays needs"):
        tasks.copy_task(T=10_000, batch=8)
    assert tasks.adding_problem(T=1000, batch=8).x.shape == (1000, 8, 2)


# --------------------------------------------------------------------------------------
# where the limit comes from: /proc/meminfo and the cgroup files
# --------------------------------------------------------------------------------------
def write(root, path, text):
    p = root / path.lstrip("/")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


MEMINFO = "MemTotal:       16384000 kB\nMemFree:  100 kB\nMemAvailable:    8192000 kB\n"


def test_limit_from_meminfo(gc, tmp_path):
    write(tmp_path, "/proc/meminfo", MEMINFO)
    limit, physical, source = gc._core.memory_limit(str(tmp_path))
    assert physical == 16384000 * 1024
    assert limit == 8192000 * 1024
    assert "MemAvailable" in source


def test_limit_from_cgroup_v2(gc, tmp_path):
    write(tmp_path, "/proc/meminfo", MEMINFO)
    write(tmp_path, "/proc/self/cgroup", "0::/user.slice/app.scope\n")
    group = "/sys/fs/cgroup/user.slice/app.scope"
    write(tmp_path, group + "/memory.max", f"{4 * GIB}\n")
    write(tmp_path, group + "/memory.current", f"{GIB}\n")
    write(tmp_path, group + "/memory.stat", f"anon 1234\ninactive_file {GIB // 4}\nactive_file 5\n")
    write(tmp_path, "/sys/fs/cgroup/user.slice/memory.max", "max\n")
    limit, _, source = gc._core.memory_limit(str(tmp_path))
    # the page cache that can be dropped does not count as used
    assert limit == 4 * GIB - (GIB - GIB // 4)
    assert "cgroup memory limit of 4 GiB" in source and "memory.max" in source
    # a tighter limit above the group wins
    write(tmp_path, "/sys/fs/cgroup/user.slice/memory.max", f"{GIB}\n")
    write(tmp_path, "/sys/fs/cgroup/user.slice/memory.current", f"{GIB // 2}\n")
    assert gc._core.memory_limit(str(tmp_path))[0] == GIB // 2


def test_limit_from_cgroup_v2_inside_a_container(gc, tmp_path):
    # the path in /proc/self/cgroup is the host's; the container sees its group at the mount
    write(tmp_path, "/proc/meminfo", MEMINFO)
    write(tmp_path, "/proc/self/cgroup", "0::/docker/0123abcd\n")
    write(tmp_path, "/sys/fs/cgroup/memory.max", f"{2 * GIB}\n")
    write(tmp_path, "/sys/fs/cgroup/memory.current", "0\n")
    assert gc._core.memory_limit(str(tmp_path))[0] == 2 * GIB


def test_limit_from_cgroup_v1(gc, tmp_path):
    write(tmp_path, "/proc/meminfo", MEMINFO)
    write(tmp_path, "/proc/self/cgroup", "5:cpu,cpuacct:/x\n4:memory:/batch/job7\n")
    group = "/sys/fs/cgroup/memory/batch/job7"
    write(tmp_path, group + "/memory.limit_in_bytes", "9223372036854771712\n")
    write(tmp_path, group + "/memory.usage_in_bytes", f"{GIB}\n")
    write(
        tmp_path,
        group + "/memory.stat",
        f"cache 1\nhierarchical_memory_limit {3 * GIB}\ntotal_inactive_file {GIB // 2}\n",
    )
    limit, _, source = gc._core.memory_limit(str(tmp_path))
    assert limit == 3 * GIB - GIB // 2
    assert "memory.limit_in_bytes" in source
    # no limit anywhere: MemAvailable decides
    write(tmp_path, group + "/memory.stat", "total_inactive_file 0\n")
    assert gc._core.memory_limit(str(tmp_path))[0] == 8192000 * 1024


def test_this_machine_has_a_limit(gc):
    limit, physical, source = gc._core.memory_limit()
    assert 0 < limit <= physical == gc._core.physical_memory_bytes()
    assert source


# --------------------------------------------------------------------------------------
# backward_memory against the memory a pass actually takes
# --------------------------------------------------------------------------------------
_MEASURE = """
    import re
    import numpy as np, gradchain as gc
    def status(key):
        text = open("/proc/self/status").read()
        return int(re.search(key + r":\\s+(\\d+) kB", text).group(1)) * 1024
    def grew(f):
        open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM to VmRSS
        before = status("VmRSS")
        f()
        return status("VmHWM") - before
    # first calls start threads and BLAS buffers: not the pass's memory
    gc.MLP(depth=3, width=4).backward(np.ones((8, 4)))
    gc.RNN("lstm", 3, 8).backward(np.ones((50, 4, 3)))
"""

# One configuration per process: a chain freed in the same process leaves its many small
# blocks in the allocator's free lists, where the next pass would find them.
_CASES = [
    (
        'net = gc.MLP(depth=200_000, width=4, activation="tanh", dtype="float64", seed=0)\n'
        'x = np.ones((8, 4))\nprint("mlp", net.backward_memory(8), grew(lambda: net.backward(x)))'
    ),
    (
        'net = gc.MLP(depth=200_000, width=4, activation="gelu", dtype="float32", seed=0)\n'
        'x = np.ones((8, 4))\nprint("mlp", net.backward_memory(8), grew(lambda: net.backward(x)))'
    ),
    (
        'net = gc.MLP(depth=200_000, width=4, activation="tanh", dtype="float64", seed=0)\n'
        'x = np.ones((1, 4))\nprint("mlp", net.backward_memory(1), grew(lambda: net.backward(x)))'
    ),
    (
        'rnn = gc.RNN("lstm", 3, 16, 2, seed=0)\nx = np.ones((10_000, 4, 3))\n'
        'print("rnn", rnn.backward_memory(10_000, 4), grew(lambda: rnn.backward(x)))'
    ),
    (
        'rnn = gc.RNN("gru", 3, 16, 2, seed=0)\nx = np.ones((10_000, 4, 3))\n'
        'print("rnn", rnn.backward_memory(10_000, 4, return_grads=True), '
        "grew(lambda: rnn.backward(x, return_grads=True)))"
    ),
]


@pytest.mark.parametrize("case", range(len(_CASES)))
def test_backward_memory_matches_the_measured_peak(case):
    """Growth of the peak resident set over one pass (depth 200,000: the per-layer
    bookkeeping, the two threads' dL/dz store and the result are all counted) against
    backward_memory; the recurrent figure is an upper bound (it includes the copies made
    when states leave the float range)."""
    code = textwrap.dedent(_MEASURE) + _CASES[case]
    try:
        # big blocks straight from and back to the system, so that one pass's freed memory
        # does not hide the next one's growth
        out = run_python(
            code,
            env={"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"},
            timeout=120,
        )
    except AssertionError as exc:
        if "clear_refs" in str(exc):
            pytest.skip("this kernel cannot reset the peak resident set")
        raise
    for line in out.splitlines():
        kind, said, grew = line.split()[0], int(line.split()[1]), int(line.split()[2])
        # the allocator's rounding and the interpreter's small objects: a few MB at most
        assert grew <= said + 4 * 2**20, line
        if kind == "mlp":
            assert said <= 1.05 * grew + 4 * 2**20, line
        else:
            assert said <= 2.0 * grew + 4 * 2**20, line
