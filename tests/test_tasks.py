"""gradchain.tasks: the adding problem and the copy memory task."""

from __future__ import annotations

import dataclasses
import doctest

import numpy as np
import pytest
from gradchain import tasks


# --------------------------------------------------------------------------------------
# adding problem
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float64", "float32", np.float32])
@pytest.mark.parametrize(("T", "batch"), [(2, 1), (3, 5), (10, 32), (101, 7)])
def test_adding_shapes_and_dtypes(T, batch, dtype):
    task = tasks.adding_problem(T, batch, seed=3, dtype=dtype)
    dt = np.dtype(dtype)
    assert isinstance(task, tasks.Task)
    assert task.x.shape == (T, batch, 2) and task.x.dtype == dt
    assert task.target.shape == (batch, 1) and task.target.dtype == dt
    assert task.x.flags.c_contiguous
    assert (task.loss, task.input_size, task.output_size, task.name) == ("mse", 2, 1, "adding")
    assert (task.T, task.batch) == (T, batch)


def test_adding_default_batch():
    assert tasks.adding_problem(5).x.shape == (5, 32, 2)


@pytest.mark.parametrize("T", [2, 3, 4, 9, 50])
def test_adding_one_marker_in_each_half_and_target_is_their_sum(T):
    task = tasks.adding_problem(T, 64, seed=T)
    values, markers = task.x[..., 0], task.x[..., 1]
    assert set(np.unique(markers)) <= {0.0, 1.0}
    np.testing.assert_array_equal(markers[: T // 2].sum(axis=0), 1)
    np.testing.assert_array_equal(markers[T // 2 :].sum(axis=0), 1)
    assert np.all((values >= 0) & (values < 1))
    np.testing.assert_array_equal(task.target[:, 0], (values * markers).sum(axis=0))


def test_adding_markers_and_values_are_uniform():
    T, n = 10, 20_000
    task = tasks.adding_problem(T, n, seed=0)
    pos = task.x[..., 1].argmax(axis=0)  # the first marker
    last = T - 1 - task.x[::-1, :, 1].argmax(axis=0)  # the second marker
    for counts, lo in ((np.bincount(pos, minlength=T), 0), (np.bincount(last, minlength=T), 5)):
        band = counts[lo : lo + 5]
        assert counts.sum() == n and band.sum() == n
        assert np.all(np.abs(band - n / 5) < 5 * np.sqrt(n / 5))  # 5 sigma
    assert abs(task.x[..., 0].mean() - 0.5) < 0.01
    assert abs(task.target.mean() - 1.0) < 0.02


def test_adding_float32_is_float64_rounded():
    a = tasks.adding_problem(20, 4, seed=9)
    b = tasks.adding_problem(20, 4, seed=9, dtype="float32")
    np.testing.assert_array_equal(b.x, a.x.astype(np.float32))
    marked = (b.x[..., 0] * b.x[..., 1]).sum(axis=0, dtype=np.float32)
    np.testing.assert_array_equal(b.target[:, 0], marked)


# --------------------------------------------------------------------------------------
# copy task
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize(
    ("T", "batch", "n_symbols", "length"), [(1, 1, 1, 1), (5, 3, 4, 2), (100, 8, 8, 10)]
)
def test_copy_shapes_and_dtypes(T, batch, n_symbols, length, dtype):
    task = tasks.copy_task(T, batch, n_symbols=n_symbols, length=length, seed=1, dtype=dtype)
    steps = T + 2 * length
    assert task.x.shape == (steps, batch, n_symbols + 2)
    assert task.x.dtype == np.dtype(dtype) and task.x.flags.c_contiguous
    assert task.target.shape == (steps, batch) and task.target.dtype == np.int64
    assert task.loss == "cross_entropy" and task.name == "copy"
    assert (task.input_size, task.output_size) == (n_symbols + 2, n_symbols + 1)
    assert (task.T, task.batch) == (steps, batch)


def test_copy_defaults_are_the_original_task():
    task = tasks.copy_task(100)
    assert task.x.shape == (120, 32, 10)
    assert (task.input_size, task.output_size) == (10, 9)


@pytest.mark.parametrize(("T", "n_symbols", "length"), [(1, 3, 4), (7, 8, 10), (30, 2, 1)])
def test_copy_layout_one_hot_and_targets(T, n_symbols, length):
    task = tasks.copy_task(T, 16, n_symbols=n_symbols, length=length, seed=T)
    x, target = task.x, task.target
    assert set(np.unique(x)) <= {0.0, 1.0}
    np.testing.assert_array_equal(x.sum(axis=-1), 1)  # one-hot
    tokens = x.argmax(axis=-1)
    symbols = tokens[:length]
    assert np.all((symbols >= 1) & (symbols <= n_symbols))
    np.testing.assert_array_equal(tokens[length : length + T - 1], 0)
    np.testing.assert_array_equal(tokens[length + T - 1], n_symbols + 1)  # delimiter
    np.testing.assert_array_equal(tokens[length + T :], 0)
    np.testing.assert_array_equal(target[: T + length], 0)
    np.testing.assert_array_equal(target[T + length :], symbols)
    assert target.max() < task.output_size and tokens.max() < task.input_size


def test_copy_symbols_cover_the_alphabet_uniformly():
    n = 4
    task = tasks.copy_task(3, 5000, n_symbols=n, length=4, seed=0)
    counts = np.bincount(task.target[-4:].ravel(), minlength=n + 1)
    assert counts[0] == 0
    expected = 4 * 5000 / n
    assert np.all(np.abs(counts[1:] - expected) < 5 * np.sqrt(expected))


def test_copy_float32_is_float64_rounded():
    a = tasks.copy_task(6, 3, seed=5)
    b = tasks.copy_task(6, 3, seed=5, dtype="float32")
    np.testing.assert_array_equal(b.x, a.x.astype(np.float32))
    np.testing.assert_array_equal(b.target, a.target)


# --------------------------------------------------------------------------------------
# seeds
# --------------------------------------------------------------------------------------
GENERATORS = [
    pytest.param(lambda **kw: tasks.adding_problem(40, 6, **kw), id="adding"),
    pytest.param(lambda **kw: tasks.copy_task(12, 6, **kw), id="copy"),
]


@pytest.mark.parametrize("make", GENERATORS)
def test_same_seed_same_task(make):
    for seed in (0, 1, 2**63 + 5):
        a, b = make(seed=seed), make(seed=seed)
        np.testing.assert_array_equal(a.x, b.x)
        np.testing.assert_array_equal(a.target, b.target)
        assert a.x is not b.x


@pytest.mark.parametrize("make", GENERATORS)
def test_different_seeds_differ(make):
    tasks_by_seed = [make(seed=s) for s in range(5)]
    for i, a in enumerate(tasks_by_seed):
        for b in tasks_by_seed[i + 1 :]:
            assert not np.array_equal(a.x, b.x)
            assert not np.array_equal(a.target, b.target)


def test_default_seed_is_zero():
    np.testing.assert_array_equal(
        tasks.adding_problem(8, 2).x, tasks.adding_problem(8, 2, seed=0).x
    )
    np.testing.assert_array_equal(tasks.copy_task(8, 2).x, tasks.copy_task(8, 2, seed=0).x)


# --------------------------------------------------------------------------------------
# argument checking
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "exc", "name"),
    [
        ({"T": 1}, ValueError, "T"),
        ({"T": 0}, ValueError, "T"),
        ({"T": -3}, ValueError, "T"),
        ({"T": 2.0}, TypeError, "T"),
        ({"T": True}, TypeError, "T"),
        ({"T": "10"}, TypeError, "T"),
        ({"T": 10, "batch": 0}, ValueError, "batch"),
        ({"T": 10, "batch": 1.5}, TypeError, "batch"),
        ({"T": 10, "seed": -1}, ValueError, "seed"),
        ({"T": 10, "seed": 2**64}, ValueError, "seed"),
        ({"T": 10, "seed": 0.5}, TypeError, "seed"),
        ({"T": 10, "dtype": "int32"}, ValueError, "dtype"),
        ({"T": 10, "dtype": "float16"}, ValueError, "dtype"),
        ({"T": 10, "dtype": "f"}, None, None),  # 'f' is float32: accepted
    ],
)
def test_adding_bad_arguments(kwargs, exc, name):
    if exc is None:
        assert tasks.adding_problem(**kwargs).x.dtype == np.float32
        return
    with pytest.raises(exc, match=rf"^{name} "):
        tasks.adding_problem(**kwargs)


def test_adding_T_message_explains_the_minimum():
    with pytest.raises(ValueError, match="T must be at least 2"):
        tasks.adding_problem(1)


def test_dtype_message_lists_accepted_values():
    with pytest.raises(ValueError, match="'float32', 'float64'"):
        tasks.copy_task(5, dtype="int64")


@pytest.mark.parametrize(
    ("kwargs", "exc", "name"),
    [
        ({"T": 0}, ValueError, "T"),
        ({"T": 3.0}, TypeError, "T"),
        ({"T": 5, "batch": -1}, ValueError, "batch"),
        ({"T": 5, "n_symbols": 0}, ValueError, "n_symbols"),
        ({"T": 5, "n_symbols": None}, TypeError, "n_symbols"),
        ({"T": 5, "length": 0}, ValueError, "length"),
        ({"T": 5, "length": "3"}, TypeError, "length"),
        ({"T": 5, "seed": -2}, ValueError, "seed"),
        ({"T": 5, "dtype": np.int8}, ValueError, "dtype"),
    ],
)
def test_copy_bad_arguments(kwargs, exc, name):
    with pytest.raises(exc, match=rf"^{name} "):
        tasks.copy_task(**kwargs)


def test_keyword_only_arguments():
    with pytest.raises(TypeError):
        tasks.adding_problem(10, 4, 1)  # seed is keyword-only
    with pytest.raises(TypeError):
        tasks.copy_task(10, 4, 8)  # n_symbols is keyword-only


# --------------------------------------------------------------------------------------
# the Task record
# --------------------------------------------------------------------------------------
def test_task_is_frozen_and_repr_is_short():
    task = tasks.copy_task(1000, 64)
    with pytest.raises(dataclasses.FrozenInstanceError):
        task.loss = "mse"  # type: ignore[misc]
    r = repr(task)
    assert r.startswith("Task(name='copy', T=1020, batch=64, loss='cross_entropy'")
    assert len(r) < 200


def test_public_names_have_numpy_docstrings():
    assert set(tasks.__all__) == {"Task", "adding_problem", "batch_order", "copy_task"}
    for fn in (tasks.adding_problem, tasks.copy_task, tasks.batch_order):
        for section in ("Parameters", "Returns", "Raises", "Examples"):
            assert section in fn.__doc__, (fn.__name__, section)
    assert "Attributes" in tasks.Task.__doc__
    assert tasks.__doc__


@pytest.mark.parametrize("fn", [tasks.adding_problem, tasks.copy_task, tasks.batch_order])
def test_docstring_examples_run(fn):
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in finder.find(fn, fn.__name__, globs={}):
        runner.run(test)
    assert runner.failures == 0 and runner.tries > 0


@pytest.mark.parametrize(
    "make",
    [lambda: tasks.adding_problem(30, 4, seed=2), lambda: tasks.copy_task(9, 3, length=3, seed=2)],
    ids=["adding", "copy"],
)
def test_tasks_drive_rnn_backward(gc, make):
    if not hasattr(gc, "RNN"):
        pytest.skip("gradchain.RNN is not available in this build")
    task = make()
    rnn = gc.RNN("lstm", task.input_size, 8, output_size=task.output_size, seed=0)
    rep = rnn.backward(task.x, loss=task.loss, target=task.target)
    assert np.isfinite(rep.loss) and rep.loss > 0
    assert rep.log10_state_grad_norms.shape == (task.T + 1,)
