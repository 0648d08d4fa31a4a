"""gradchain.tasks: the adding problem and the copy memory task, the data sets to train on
(teacher-student regression, Gaussian classification with a known Bayes rate, user arrays)."""

from __future__ import annotations

import dataclasses
import doctest
import math

import numpy as np
import pytest
from gradchain import tasks
from gradchain.tasks import Dataset


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
    assert set(tasks.__all__) == {
        "Dataset",
        "Task",
        "adding_problem",
        "as_dataset",
        "batch_order",
        "classification",
        "copy_task",
        "teacher_student",
    }
    for fn in (
        tasks.adding_problem,
        tasks.copy_task,
        tasks.teacher_student,
        tasks.classification,
        tasks.as_dataset,
        tasks.batch_order,
        tasks.Dataset,
    ):
        for section in (
            "Parameters",
            "Returns" if fn is not tasks.Dataset else "Attributes",
            "Raises",
            "Examples",
        ):
            assert section in fn.__doc__, (fn.__name__, section)
    assert "Attributes" in tasks.Task.__doc__
    assert "Examples" in tasks.Task.to_dataset.__doc__
    assert tasks.__doc__


@pytest.mark.parametrize(
    "fn",
    [
        tasks.adding_problem,
        tasks.copy_task,
        tasks.teacher_student,
        tasks.classification,
        tasks.as_dataset,
        tasks.batch_order,
        tasks.Dataset,
        tasks.Task.to_dataset,
    ],
)
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


# --------------------------------------------------------------------------------------
# teacher-student regression
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize(
    ("n", "width", "depth", "out"), [(1, 1, 1, None), (50, 6, 3, 2), (9, 4, 2, None)]
)
def test_teacher_student_shapes_and_dtypes(n, width, depth, out, dtype):
    data = tasks.teacher_student(n, width, depth, out_features=out, seed=2, dtype=dtype)
    out = width if out is None else out
    assert isinstance(data, tasks.Dataset)
    assert data.x.shape == (n, width) and data.y.shape == (n, out)
    assert data.x.dtype == data.y.dtype == np.dtype(dtype) == data.dtype
    assert (data.n, data.n_val, data.in_features, data.out_features) == (n, 0, width, out)
    assert (data.loss, data.name, data.batch_axis, data.every_step) == (
        "mse",
        "teacher_student",
        0,
        False,
    )
    assert data.x_val is None and data.y_val is None and data.bayes_error is None
    assert data.teacher.depth == depth and tuple(data.teacher.widths) == (width,) * depth + (out,)


def test_teacher_is_the_documented_mlp_and_reproduces_the_targets(gc):
    data = tasks.teacher_student(200, 8, 3, out_features=2, activation="relu", seed=7)
    twin = gc.MLP(depth=3, width=[8, 8, 8, 2], activation="relu", seed=7)
    for (name, a), (_, b) in zip(data.teacher.named_parameters(), twin.named_parameters()):
        np.testing.assert_array_equal(a, b, err_msg=name)
    np.testing.assert_array_equal(data.teacher.forward(data.x), data.y)
    assert data.teacher.activation == "relu" and data.teacher.dtype == np.float64


def test_teacher_student_float32_is_float64_rounded_and_targets_follow_the_rounded_inputs():
    a = tasks.teacher_student(64, 5, seed=3)
    b = tasks.teacher_student(64, 5, seed=3, dtype="float32")
    np.testing.assert_array_equal(b.x, a.x.astype(np.float32))
    want = b.teacher.forward(b.x.astype(np.float64)).astype(np.float32)
    np.testing.assert_array_equal(b.y, want)


def test_teacher_student_noise_has_the_given_scale_and_is_the_best_loss():
    clean = tasks.teacher_student(20_000, 4, 2, out_features=1, seed=5)
    noisy = tasks.teacher_student(20_000, 4, 2, out_features=1, seed=5, noise=0.3)
    np.testing.assert_array_equal(clean.x, noisy.x)
    louder = tasks.teacher_student(20_000, 4, 2, out_features=1, seed=5, noise=0.6)
    np.testing.assert_allclose(louder.y - clean.y, 2 * (noisy.y - clean.y), rtol=1e-12, atol=1e-15)
    resid = noisy.y - noisy.teacher.forward(noisy.x)  # the teacher's own mse: noise ** 2
    assert abs(resid.mean()) < 5 * 0.3 / math.sqrt(20_000)
    assert abs(np.mean(resid**2) - 0.09) < 5 * 0.09 * math.sqrt(2 / 20_000)


def test_teacher_student_seeds():
    a, b = tasks.teacher_student(30, 4, seed=11), tasks.teacher_student(30, 4, seed=11)
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.y, b.y)
    c = tasks.teacher_student(30, 4, seed=12)
    assert not np.array_equal(a.x, c.x) and not np.array_equal(a.y, c.y)
    np.testing.assert_array_equal(
        tasks.teacher_student(30, 4).x, tasks.teacher_student(30, 4, seed=0).x
    )


def test_teacher_student_validation_split():
    full = tasks.teacher_student(100, 3, seed=4)
    split = tasks.teacher_student(100, 3, seed=4, validation=0.25)
    noisy = tasks.teacher_student(100, 3, seed=4, validation=0.25, noise=0.5)
    np.testing.assert_array_equal(split.x_val, noisy.x_val)  # the split ignores the noise level
    assert (split.n, split.n_val) == (75, 25)
    assert split.x_val.shape == (25, 3) and split.y_val.shape == (25, 3)
    both = np.concatenate([split.x, split.x_val])
    assert sorted(map(tuple, both)) == sorted(map(tuple, full.x))  # a partition of the same data
    np.testing.assert_array_equal(split.teacher.forward(split.x_val), split.y_val)


@pytest.mark.parametrize(
    ("kwargs", "exc", "name"),
    [
        ({"n": 0}, ValueError, "n"),
        ({"n": 2.0}, TypeError, "n"),
        ({"width": 0}, ValueError, "width"),
        ({"depth": 0}, ValueError, "depth"),
        ({"out_features": 0}, ValueError, "out_features"),
        ({"noise": -0.1}, ValueError, "noise"),
        ({"noise": float("nan")}, ValueError, "noise"),
        ({"seed": -1}, ValueError, "seed"),
        ({"dtype": "int32"}, ValueError, "dtype"),
        ({"activation": "swish"}, ValueError, "activation"),
        ({"validation": 1.0}, ValueError, "validation"),
        ({"validation": "0.1"}, TypeError, "validation"),
    ],
)
def test_teacher_student_bad_arguments(kwargs, exc, name):
    args = {"n": 10, "width": 3, **kwargs}
    with pytest.raises(exc, match=rf"^{name}\b"):
        tasks.teacher_student(**args)


# --------------------------------------------------------------------------------------
# classification with a known Bayes rate
# --------------------------------------------------------------------------------------
def _bayes_classifier_errors(data):
    """The nearest-mean (Bayes) classifier's mistakes on the training examples."""
    d2 = ((data.x[:, None, :].astype(np.float64) - data.class_means[None]) ** 2).sum(axis=-1)
    return d2.argmin(axis=1) != data.y


@pytest.mark.parametrize(
    ("classes", "features", "separation"), [(2, 3, 3.0), (2, 1, 1.0), (3, 2, 2.0), (5, 6, 3.5)]
)
def test_bayes_rate_matches_monte_carlo(classes, features, separation):
    n = 200_000
    data = tasks.classification(n, features, classes, separation=separation, seed=classes)
    p = data.bayes_error
    se = math.sqrt(p * (1 - p) / n)
    assert abs(_bayes_classifier_errors(data).mean() - p) < 4 * se


@pytest.mark.parametrize("separation", [0.1, 1.0, 3.0, 6.0, 12.0, 25.0])
def test_two_class_bayes_rate_is_phi_of_minus_half_the_distance(separation):
    data = tasks.classification(10, 2, separation=separation)
    assert data.bayes_error == 0.5 * math.erfc(separation / 2 / math.sqrt(2))
    # the integral used for more classes agrees with the closed form, also far in the tail
    assert tasks._simplex_miss(2, separation) == pytest.approx(data.bayes_error, rel=1e-11)


def test_bayes_rate_of_more_classes_against_an_independent_integral():
    # P(correct) = P(nearest mean is the own one), here by Gauss-Hermite over the same u
    from numpy.polynomial.hermite_e import hermegauss

    u, w = hermegauss(120)
    for k, d in [(3, 1.0), (4, 2.5), (10, 3.0)]:
        phi = np.array([0.5 * math.erfc(-(d / math.sqrt(2) + t) / math.sqrt(2)) for t in u])
        correct = float(w @ phi ** (k - 1)) / math.sqrt(2 * math.pi)
        got = tasks.classification(5, k, k, separation=d).bayes_error
        assert got == pytest.approx(1 - correct, rel=1e-9, abs=1e-13)
    # more classes at the same spacing are harder; a larger spacing is easier
    rates = [tasks.classification(5, 9, k, separation=2.0).bayes_error for k in (2, 3, 5, 10)]
    assert rates == sorted(rates)
    assert (
        tasks.classification(5, 3, 3, separation=4.0).bayes_error
        < tasks.classification(5, 3, 3, separation=2.0).bayes_error
    )


@pytest.mark.parametrize(("classes", "features"), [(2, 1), (3, 2), (4, 7)])
def test_class_means_form_a_centred_simplex_in_the_first_features(classes, features):
    data = tasks.classification(8, features, classes, separation=2.5)
    m = data.class_means
    assert m.shape == (classes, features)
    dist = np.linalg.norm(m[:, None] - m[None], axis=-1)
    np.testing.assert_allclose(dist[~np.eye(classes, dtype=bool)], 2.5, rtol=1e-12)
    np.testing.assert_allclose(m.sum(axis=0), 0, atol=1e-12)
    np.testing.assert_array_equal(m[:, classes - 1 :], 0)


def test_classification_shapes_dtypes_labels_and_priors():
    data = tasks.classification(30_000, 5, 3, seed=1, dtype="float32", validation=0.1)
    assert data.x.shape == (27_000, 5) and data.x.dtype == np.float32
    assert data.y.shape == (27_000,) and data.y.dtype == np.int64
    assert data.x_val.shape == (3_000, 5) and data.y_val.dtype == np.int64
    assert (data.loss, data.out_features, data.name) == ("cross_entropy", 3, "classification")
    counts = np.bincount(np.concatenate([data.y, data.y_val]), minlength=3)
    assert np.all(np.abs(counts - 10_000) < 5 * math.sqrt(10_000))
    # given its class, an input is N(mean, I)
    for c in range(3):
        z = data.x[data.y == c] - data.class_means[c]
        assert np.all(np.abs(z.mean(axis=0)) < 0.05) and np.all(np.abs(z.std(axis=0) - 1) < 0.03)


def test_classification_seeds_and_float32_rounding():
    a = tasks.classification(50, 3, seed=9)
    b = tasks.classification(50, 3, seed=9, dtype="float32")
    np.testing.assert_array_equal(b.x, a.x.astype(np.float32))
    np.testing.assert_array_equal(a.y, b.y)
    c = tasks.classification(50, 3, seed=10)
    assert not np.array_equal(a.x, c.x)


@pytest.mark.parametrize(
    ("kwargs", "exc", "name"),
    [
        ({"classes": 1}, ValueError, "classes"),
        ({"classes": 2.0}, TypeError, "classes"),
        ({"features": 2, "classes": 4}, ValueError, "features"),
        ({"separation": 0.0}, ValueError, "separation"),
        ({"separation": float("inf")}, ValueError, "separation"),
        ({"separation": "3"}, TypeError, "separation"),
        ({"n": -5}, ValueError, "n"),
        ({"dtype": "float16"}, ValueError, "dtype"),
        ({"validation": -0.1}, ValueError, "validation"),
    ],
)
def test_classification_bad_arguments(kwargs, exc, name):
    args = {"n": 10, "features": 3, **kwargs}
    with pytest.raises(exc, match=rf"^{name}\b"):
        tasks.classification(**args)


# --------------------------------------------------------------------------------------
# Dataset of user arrays
# --------------------------------------------------------------------------------------
def test_dataset_default_loss_follows_the_target_dtype():
    x = np.arange(12.0).reshape(6, 2)
    labels = Dataset(x, np.array([0, 1, 2, 0, 1, 4]))
    assert (
        labels.loss == "cross_entropy" and labels.out_features == 5 and labels.y.dtype == np.int64
    )
    floats = Dataset(x, x[:, 0])
    assert floats.loss == "mse" and floats.y.shape == (6, 1) and floats.out_features == 1
    wide = Dataset(x, np.ones((6, 3), dtype=np.float32))
    assert wide.out_features == 3 and wide.y.dtype == np.float64  # the dtype of x
    assert (wide.n, wide.n_val, wide.in_features, wide.name) == (6, 0, 2, "dataset")
    assert wide.x_val is None and wide.y_val is None and wide.teacher is None
    assert len(wide) == 6 and wide.batch_axis == 0 and wide.y_batch_axis == 0


def test_dataset_keeps_float32_and_takes_integer_inputs_as_float64():
    x32 = np.ones((4, 3), dtype=np.float32)
    d = Dataset(x32, np.ones(4))
    assert d.x.dtype == d.y.dtype == np.float32 == d.dtype
    assert Dataset(np.ones((4, 3), dtype=np.int32), np.ones(4)).x.dtype == np.float64


def test_dataset_copies_and_is_read_only():
    x, y = np.zeros((5, 2)), np.zeros(5)
    d = Dataset(x, y)
    assert not np.shares_memory(d.x, x) and x.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        d.x[0, 0] = 1.0


def test_dataset_accepts_torch_tensors():
    torch = pytest.importorskip("torch")
    d = Dataset(torch.ones(8, 3, dtype=torch.float32), torch.arange(8) % 2)
    assert d.x.dtype == np.float32 and d.loss == "cross_entropy" and d.y.dtype == np.int64
    assert Dataset(torch.ones(8, 3, requires_grad=True), torch.ones(8, 1)).loss == "mse"


def test_dataset_out_features_for_classes_absent_from_the_sample():
    d = Dataset(np.zeros((3, 2)), [0, 1, 1], out_features=4)
    assert d.out_features == 4
    with pytest.raises(ValueError, match=r"^out_features must exceed the largest label in y \(2\)"):
        Dataset(np.zeros((3, 2)), [0, 2, 1], out_features=2)
    with pytest.raises(ValueError, match=r"^out_features=2 does not match y"):
        Dataset(np.zeros((3, 2)), np.zeros((3, 3)), out_features=2)


@pytest.mark.parametrize(
    ("validation", "n_val"), [(0.0, 0), (0.2, 20), (0.333, 33), (1, 1), (99, 99)]
)
def test_dataset_split_sizes(validation, n_val):
    d = Dataset(np.arange(100.0)[:, None], np.arange(100.0), validation=validation, seed=3)
    assert (d.n, d.n_val) == (100 - n_val, n_val)
    if n_val:
        assert d.x_val.shape == (n_val, 1) and d.y_val.shape == (n_val, 1)


def test_dataset_split_is_a_seeded_order_keeping_partition():
    x = np.arange(50.0)[:, None]
    y = np.arange(50) % 4
    a = Dataset(x, y, validation=10, seed=1)
    b = Dataset(x, y, validation=10, seed=1)
    c = Dataset(x, y, validation=10, seed=2)
    np.testing.assert_array_equal(a.x_val, b.x_val)
    assert not np.array_equal(a.x_val, c.x_val)
    both = np.concatenate([a.x[:, 0], a.x_val[:, 0]])
    np.testing.assert_array_equal(np.sort(both), x[:, 0])
    assert np.all(np.diff(a.x[:, 0]) > 0) and np.all(np.diff(a.x_val[:, 0]) > 0)
    np.testing.assert_array_equal(a.y, a.x[:, 0].astype(int) % 4)  # pairs stay together
    np.testing.assert_array_equal(a.y_val, a.x_val[:, 0].astype(int) % 4)
    perm = np.random.default_rng(1).permutation(50)
    np.testing.assert_array_equal(a.x_val[:, 0], np.sort(perm[:10]))


def test_dataset_of_sequences():
    x = np.random.default_rng(0).random((7, 20, 3))
    last = Dataset(x, np.ones((20, 2)), batch_axis=1, validation=5)
    assert (last.every_step, last.y_batch_axis, last.n, last.n_val) == (False, 0, 15, 5)
    assert last.x.shape == (7, 15, 3) and last.x_val.shape == (7, 5, 3) and last.y.shape == (15, 2)
    each = Dataset(x, np.zeros((7, 20), dtype=np.int64), batch_axis=1, validation=5, seed=4)
    assert (each.every_step, each.y_batch_axis, each.loss) == (True, 1, "cross_entropy")
    assert each.y.shape == (7, 15) and each.y_val.shape == (7, 5)
    # the split takes the same sequences from x and y
    marked = Dataset(
        x,
        np.broadcast_to(np.arange(20.0)[None, :, None], (7, 20, 1)),
        batch_axis=1,
        validation=5,
        seed=4,
    )
    assert marked.every_step and marked.y.shape == (7, 15, 1)
    np.testing.assert_array_equal(marked.x, x[:, marked.y[0, :, 0].astype(int)])
    assert Dataset(x, np.zeros(20, dtype=np.int64), batch_axis=1).every_step is False
    assert Dataset(x, np.zeros(20), batch_axis=1).y.shape == (20, 1)
    assert "T=7, every_step=False" in repr(last)


@pytest.mark.parametrize(
    ("x", "y", "kwargs", "exc", "match"),
    [
        (np.zeros((4, 2)), np.zeros((5, 1)), {}, ValueError, r"^y has 5 examples .* but x has 4"),
        (np.zeros((0, 2)), np.zeros((0, 1)), {}, ValueError, r"^x must not be empty"),
        (np.zeros((3, 0)), np.zeros((3, 1)), {}, ValueError, r"^x must not be empty"),
        (np.zeros((3, 2)), np.zeros((3, 0)), {}, ValueError, r"^y must not be empty"),
        (np.zeros(4), np.zeros(4), {}, ValueError, r"^x must have 2 dimensions"),
        (np.zeros((4, 2, 1)), np.zeros(4), {}, ValueError, r"^x must have 2 dimensions"),
        (
            np.zeros((4, 2)),
            np.zeros((4, 2)),
            {"batch_axis": 1},
            ValueError,
            r"^x must have 3 dimensions",
        ),
        (
            np.zeros((4, 2)),
            np.zeros((4, 1, 1)),
            {},
            ValueError,
            r"^y must have shape \(n, out_features\)",
        ),
        (
            np.zeros((4, 2)),
            np.zeros((4, 2), dtype=int),
            {},
            ValueError,
            r"^y must have shape \(n,\) class",
        ),
        (
            np.array([[0.0], [np.nan]]),
            np.zeros(2),
            {},
            ValueError,
            r"^x contains nan at index \(1, 0\)",
        ),
        (np.zeros((2, 1)), [1.0, np.inf], {}, ValueError, r"^y contains inf at index \(1, 0\)"),
        (
            np.zeros((2, 1)),
            [1.0, 1e300],
            {"x": None},
            ValueError,
            r"^y contains 1e\+300 .* float32",
        ),
        (
            np.zeros((2, 1)),
            [0, 1],
            {"loss": "mse"},
            ValueError,
            r"^loss='mse' needs float targets, but y holds integers",
        ),
        (
            np.zeros((2, 1)),
            [0.0, 1.0],
            {"loss": "cross_entropy"},
            ValueError,
            r"^loss='cross_entropy' needs integer class labels in y",
        ),
        (
            np.zeros((2, 1)),
            [0.0, 1.0],
            {"loss": "l1"},
            ValueError,
            r"^loss must be one of 'mse', 'cross_entropy'",
        ),
        (
            np.zeros((2, 1)),
            [0, -1],
            {},
            ValueError,
            r"^y must hold class labels >= 0; got -1 at index \(1,\)",
        ),
        (
            np.zeros((2, 1)),
            [True, False],
            {},
            TypeError,
            r"^y must hold float32/float64 targets or integer",
        ),
        (
            np.zeros((2, 1), dtype=np.float16),
            [0.0, 1.0],
            {},
            TypeError,
            r"^x must hold float32 or float64",
        ),
        (
            np.zeros((2, 1), dtype=complex),
            [0.0, 1.0],
            {},
            TypeError,
            r"^x must hold float32 or float64",
        ),
        (
            np.zeros((2, 1)),
            [0.0, 1.0],
            {"validation": 1.5},
            ValueError,
            r"^validation must be a fraction in \[0, 1\)",
        ),
        (
            np.zeros((2, 1)),
            [0.0, 1.0],
            {"validation": 2},
            ValueError,
            r"^validation as a number of examples must be in \[0, 1\]",
        ),
        (
            np.zeros((2, 1)),
            [0.0, 1.0],
            {"validation": 0.1},
            ValueError,
            r"^validation=0.1 of 2 examples leaves no example for validation",
        ),
        (
            np.zeros((2, 1)),
            [0.0, 1.0],
            {"validation": 0.9},
            ValueError,
            r"^validation=0.9 of 2 examples leaves no example to train on",
        ),
        (np.zeros((2, 1)), [0.0, 1.0], {"validation": True}, TypeError, r"^validation must be"),
        (
            np.zeros((2, 1)),
            [0.0, 1.0],
            {"batch_axis": 2},
            ValueError,
            r"^batch_axis must be 0 \(MLP data\) or 1",
        ),
        (
            np.zeros((2, 1)),
            [0.0, 1.0],
            {"every_step": True},
            ValueError,
            r"^every_step=True is for sequences",
        ),
        (
            np.zeros((2, 1)),
            [0.0, 1.0],
            {"every_step": 1},
            TypeError,
            r"^every_step must be True or False",
        ),
        (np.zeros((2, 1)), [0.0, 1.0], {"seed": -1}, ValueError, r"^seed "),
        (np.zeros((2, 1)), [0.0, 1.0], {"name": 3}, TypeError, r"^name must be a string"),
        (
            np.zeros((3, 2, 1)),
            np.zeros((3, 2), dtype=int),
            {"batch_axis": 1, "every_step": False},
            ValueError,
            r"^y must have shape \(n,\) for loss='cross_entropy' with a target at the last step",
        ),
        (
            np.zeros((3, 2, 1)),
            np.zeros((4, 2), dtype=int),
            {"batch_axis": 1},
            ValueError,
            r"^y has a target at each of 4 steps but x has 3",
        ),
        (
            np.zeros((3, 2, 1)),
            np.zeros((3, 5), dtype=int),
            {"batch_axis": 1},
            ValueError,
            r"^y has 5 examples",
        ),
        ([[1, 2], [3]], [0, 1], {}, TypeError, r"^x must be an array"),
    ],
)
def test_dataset_errors_name_the_argument(x, y, kwargs, exc, match):
    if kwargs.pop("x", 0) is None:
        x = x.astype(np.float32)
    with pytest.raises(exc, match=match):
        Dataset(x, y, **kwargs)


# --------------------------------------------------------------------------------------
# Task -> Dataset
# --------------------------------------------------------------------------------------
def test_adding_task_to_dataset():
    task = tasks.adding_problem(30, 50, seed=1)
    d = task.to_dataset(validation=10, seed=2)
    assert (d.batch_axis, d.every_step, d.y_batch_axis) == (1, False, 0)
    assert d.x.shape == (30, 40, 2) and d.y.shape == (40, 1) and d.x_val.shape == (30, 10, 2)
    assert (d.loss, d.name, d.in_features, d.out_features) == ("mse", "adding", 2, 1)
    # the targets stay with their sequences
    np.testing.assert_array_equal(d.y[:, 0], (d.x[..., 0] * d.x[..., 1]).sum(axis=0))
    np.testing.assert_array_equal(d.y_val[:, 0], (d.x_val[..., 0] * d.x_val[..., 1]).sum(axis=0))


def test_copy_task_to_dataset_and_as_dataset():
    task = tasks.copy_task(6, 9, n_symbols=3, length=2, seed=3)
    d = tasks.as_dataset(task)
    assert (d.batch_axis, d.every_step, d.y_batch_axis, d.n, d.n_val) == (1, True, 1, 9, 0)
    assert (d.in_features, d.out_features, d.loss, d.name) == (5, 4, "cross_entropy", "copy")
    np.testing.assert_array_equal(d.x, task.x)
    np.testing.assert_array_equal(d.y, task.target)
    assert not np.shares_memory(d.x, task.x)
    split = task.to_dataset(validation=0.34)
    assert split.y.shape == (10, 6) and split.y_val.shape == (10, 3)
    np.testing.assert_array_equal(split.y[-2:], split.x[:2].argmax(axis=-1))


def test_as_dataset_passes_a_dataset_through_and_refuses_arrays():
    d = tasks.classification(10, 2)
    assert tasks.as_dataset(d) is d
    with pytest.raises(
        TypeError, match=r"^data must be a gradchain.tasks.Dataset or Task; got tuple"
    ):
        tasks.as_dataset((np.zeros((2, 1)), np.zeros(2)))


def test_dataset_repr_is_one_short_line():
    r = repr(tasks.teacher_student(1000, 64, validation=0.1))
    assert r == (
        "Dataset(name='teacher_student', n=900, n_val=100, in_features=64, out_features=64, "
        "loss='mse', dtype='float64')"
    )
