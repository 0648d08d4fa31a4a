"""The command line (gradchain.cli): every subcommand's table and JSON against the Python
API's values for the same options, --plot, --help and --version, and bad input."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import gradchain as gc
import numpy as np
import pytest
from gradchain import cli
from gradchain.cli import main


def run(capsys, *argv):
    """``gradchain argv`` in this process: (exit status, stdout, stderr)."""
    try:
        status = main(list(argv))
    except SystemExit as exc:  # argparse exits itself for usage errors, --help, --version
        status = exc.code
    out, err = capsys.readouterr()
    return status, out, err


def run_json(capsys, *argv):
    status, out, err = run(capsys, *argv, "--json")
    assert status == 0, err
    return json.loads(out)


def plain(d):
    """What ``--json`` prints for a result's to_dict()."""
    return json.loads(json.dumps(d))


def rows(text, columns):
    """The numeric rows of a table: lines whose first token is an integer."""
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == columns and parts[0].lstrip("-").isdigit():
            out.append([float(p) for p in parts])
    return np.array(out)


def normal_inputs(seed, *shape):
    return np.random.default_rng(seed).standard_normal(shape)


# -- entry points ---------------------------------------------------------------------------


def test_version_and_python_dash_m():
    exe = shutil.which("gradchain", path=os.path.dirname(sys.executable))
    if exe is None:
        pytest.skip("the gradchain console script is not installed next to this python")
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == f"gradchain {gc.__version__}"
    demo = subprocess.run([sys.executable, "-m", "gradchain", "demo", "--depth", "30", "--rows", "5"],
                          capture_output=True, text=True, check=True, timeout=60).stdout  # fmt: skip
    table = rows(demo, 3)
    assert table[0, 0] == 1 and table[-1, 0] == 30
    assert table[0, 1] < table[-1, 1] - 10  # the sigmoid chain's gradient vanishes


def test_no_command_is_the_demo(capsys):
    assert run(capsys)[1] == run(capsys, "demo")[1]


def test_help_documents_every_option_with_its_default(capsys):
    parser = cli._parser()
    commands = parser._subparsers._group_actions[0].choices
    assert set(commands) == {"demo", "run", "rnn", "jacobian", "theory", "sweep", "train"}
    for name, sub in commands.items():
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings} has no help"
        status, out, _ = run(capsys, name, "--help")
        assert status == 0 and "--json" in out and "--seed" in out
        # an option with a value to show shows it
        for action in sub._actions:
            if action.default not in (None, False, argparse.SUPPRESS) and action.nargs != 0:
                assert "default" in sub.formatter_class("x")._get_help_string(action)
    assert "(default: 60)" in run(capsys, "demo", "--help")[1]
    top = run(capsys, "--help")[1]
    examples = re.findall(r"^  gradchain (.+)$", top, flags=re.MULTILINE)
    assert {e.split()[0] for e in examples} == set(commands)
    for e in examples:
        assert parser.parse_args(shlex.split(e)).func


# -- each subcommand against the API ----------------------------------------------------


def test_demo_table_and_json_are_the_two_chains_reports(capsys):
    argv = ("demo", "--depth", "12", "--width", "8", "--batch", "3", "--rows", "4", "--seed", "5")
    _, out, _ = run(capsys, *argv)
    x = normal_inputs(5, 3, 8)
    reps = {k: net.backward(x) for k, net in cli.demo_chains(12, 8, 5).items()}
    table = rows(out, 3)
    layers = table[:, 0].astype(int)
    assert list(layers) == [1, 4, 7, 10, 12]
    for col, rep in enumerate(reps.values(), 1):
        np.testing.assert_allclose(
            table[:, col], rep.log10_weight_grad_norms[layers - 1], atol=5e-4
        )
    d = run_json(capsys, *argv)
    assert (d["depth"], d["width"], d["batch"], d["seed"]) == (12, 8, 3, 5)
    assert d["reports"] == {k: plain(r.to_dict()) for k, r in reps.items()}


def test_demo_with_every_relu_gradient_zero(capsys):
    """A width-4 relu chain whose gradients all vanish exactly: no "10^+nan"; the ratio says
    both norms are 0."""
    _, out, _ = run(capsys, "demo", "--depth", "100", "--width", "4", "--batch", "4")
    assert "nan" not in out
    assert "relu / he_normal: |dL/dW_1| / |dL/dW_100| = undefined: both are exactly 0" in out


def test_run_takes_every_mlp_option(capsys):
    argv = ["run", "--depth", "9", "--width", "6", "--batch", "5", "--activation", "relu",
            "--init", "normal", "--sigma-w", "1.7", "--bias-std", "0.3", "--norm", "layer",
            "--norm-position", "post", "--residual", "--residual-scale", "0.5",
            "--max-norm", "0.5", "--norm-type", "inf", "--seed", "3", "--every", "2"]  # fmt: skip
    net = gc.MLP(9, 6, activation="relu", init="normal", sigma_w=1.7, bias_std=0.3, norm="layer",
                 norm_position="post", residual=True, residual_scale=0.5, seed=3)  # fmt: skip
    rep = net.backward(normal_inputs(3, 5, 6), max_norm=0.5, norm_type="inf")
    assert rep.clip_coef < 1  # the clipping is exercised
    status, out, _ = run(capsys, *argv)
    assert status == 0 and out.startswith(repr(net))
    table = rows(out, 4)
    layers = table[:, 0].astype(int)
    assert list(layers) == [1, 3, 5, 7, 9]
    np.testing.assert_allclose(table[:, 1], rep.log10_weight_grad_norms[layers - 1], atol=5e-5)
    np.testing.assert_allclose(table[:, 3], rep.log10_activation_grad_norms[layers], atol=5e-5)
    assert run_json(capsys, *argv) == plain(rep.to_dict())


def test_threads_caps_the_core_and_leaves_the_results_alone(capsys, monkeypatch):
    argv = ["run", "--depth", "30", "--width", "64", "--batch", "16"]
    seen = []
    real = gc.MLP.backward
    monkeypatch.setattr(gc.MLP, "backward",
                        lambda self, *a, **k: (seen.append(gc._core.max_threads()), real(self, *a, **k))[1])  # fmt: skip
    before = gc._core.max_threads()
    default = run_json(capsys, *argv)
    assert run_json(capsys, *argv, "--threads", "1") == default
    assert seen == [before, 1] and gc._core.max_threads() == before


def test_run_float32_leaky_relu(capsys):
    d = run_json(capsys, "run", "--depth", "4", "--width", "5", "--batch", "2", "--dtype",
                 "float32", "--activation", "leaky_relu", "--negative-slope", "0.2",
                 "--init", "orthogonal", "--gain", "1.5")  # fmt: skip
    net = gc.MLP(4, 5, activation="leaky_relu", negative_slope=0.2, init="orthogonal", gain=1.5,
                 dtype="float32")  # fmt: skip
    assert d == plain(net.backward(normal_inputs(0, 2, 5)).to_dict())


@pytest.mark.parametrize("task", ["none", "adding", "copy"])
def test_rnn_with_and_without_a_task(capsys, task):
    argv = ["rnn", "--cell", "lstm", "--hidden", "5", "--layers", "2", "--T", "7", "--batch", "3",
            "--task", task, "--truncate", "3", "--truncate-mode", "window", "--max-norm", "0.1",
            "--init", "orthogonal", "--recurrent-gain", "1.2", "--forget-bias", "1.0",
            "--seed", "2"]  # fmt: skip
    if task == "none":
        argv += ["--input-size", "4"]
        x, target, loss, sizes = normal_inputs(2, 7, 3, 4), None, None, (4, None)
    else:
        t = cli.rnn_task(task, 7, 3, 2)
        x, target, loss, sizes = t.x, t.target, t.loss, (t.input_size, t.output_size)
    net = gc.RNN("lstm", sizes[0], 5, 2, output_size=sizes[1], init="orthogonal",
                 recurrent_gain=1.2, forget_bias=1.0, seed=2)  # fmt: skip
    rep = net.backward(x, target, loss=loss, truncate=3, truncate_mode="window", max_norm=0.1)
    status, out, _ = run(capsys, *argv)
    assert status == 0 and out.startswith(repr(net))
    table = rows(out, 3)
    steps = table[:, 0].astype(int)
    assert steps[-1] == rep.steps
    np.testing.assert_allclose(table[:, 1], rep.log10_state_grad_norms[steps], atol=5e-5)
    np.testing.assert_allclose(table[:, 2], rep.log10_cell_grad_norms[steps], atol=5e-5)
    assert run_json(capsys, *argv) == plain(rep.to_dict())


def test_jacobian_of_an_mlp_norms_and_spectrum(capsys):
    argv = ["jacobian", "--depth", "6", "--width", "5", "--batch", "2", "--activation", "tanh",
            "--init", "normal", "--sigma-w", "1.3", "--spectrum", "--k", "3", "--interval", "2",
            "--seed", "4"]  # fmt: skip
    net = gc.MLP(6, 5, init="normal", sigma_w=1.3, seed=4)
    x = normal_inputs(4, 2, 5)
    norms = gc.jacobian_norms(net, x)
    spec = gc.jacobian_spectrum(net, x, k=3, interval=2, seed=4)
    d = run_json(capsys, *argv)
    assert d == {"norms": plain(norms.to_dict()), "spectrum": plain(spec.to_dict())}
    _, out, _ = run(capsys, *argv)
    table = rows(out, 5)[:6]  # the norms' rows; the spectrum's follow
    np.testing.assert_allclose(table[:, 1], norms.log10_frobenius.mean(axis=0), atol=5e-5)
    np.testing.assert_allclose(table[:, 3], norms.log10_spectral.mean(axis=0), atol=5e-5)
    lam = spec.lyapunov_exponents_mean
    assert f"max {lam[0]:.5g}, min {lam[-1]:.5g}" in out


def test_jacobian_of_an_rnn_without_spectral_norms(capsys):
    argv = ["jacobian", "--target", "rnn", "--cell", "gru", "--hidden", "4", "--T", "5",
            "--input-size", "3", "--batch", "2", "--no-spectral"]  # fmt: skip
    net = gc.RNN("gru", 3, 4)
    norms = gc.jacobian_norms(net, normal_inputs(0, 5, 2, 3), spectral=False)
    assert run_json(capsys, *argv) == {"norms": plain(norms.to_dict())}
    table = rows(run(capsys, *argv)[1], 3)
    np.testing.assert_allclose(table[:, 1], norms.log10_frobenius.mean(axis=0), atol=5e-5)


def test_theory_table_and_json(capsys):
    argv = ["theory", "--depth", "8", "--width", "32", "--activation", "relu", "--sigma-w", "1.3",
            "--batch", "4", "--no-spectrum", "--every", "2", "--seed", "1"]  # fmt: skip
    net = gc.MLP(8, 32, activation="relu", init="normal", sigma_w=1.3, seed=1)
    cmp = gc.compare_theory(net, batch=4, seed=1, spectrum=False)
    assert cmp.chi_1 == pytest.approx(1.3**2 / 2, rel=1e-12)
    d = run_json(capsys, *argv)
    assert d == plain(cmp.to_dict())
    _, out, _ = run(capsys, *argv)
    assert "chi_1" in out
    table = rows(out, 4)
    assert list(table[:, 0]) == [0, 2, 4, 6, 8]
    np.testing.assert_allclose(table[:, 1], np.asarray(cmp.measured)[::2], atol=5e-5)
    np.testing.assert_allclose(table[:, 2], np.asarray(cmp.predicted)[::2], atol=5e-5)


def test_theory_of_an_rnn(capsys):
    argv = ["theory", "--target", "rnn", "--cell", "relu", "--hidden", "16", "--T", "12",
            "--input-size", "3", "--recurrent-gain", "1.1", "--batch", "3", "--no-spectrum"]  # fmt: skip
    net = gc.RNN("relu", 3, 16, init="normal", recurrent_gain=1.1)
    cmp = gc.compare_theory(net, batch=3, steps=12, spectrum=False)
    assert run_json(capsys, *argv) == plain(cmp.to_dict())
    table = rows(run(capsys, *argv)[1], 4)
    np.testing.assert_allclose(
        table[:, 1], np.asarray(cmp.measured)[table[:, 0].astype(int)], atol=5e-5
    )


def test_theory_of_norm_and_residual_layers(capsys):
    d = run_json(capsys, "theory", "--depth", "6", "--width", "32", "--activation", "relu",
                 "--sigma-w", "1.4", "--norm", "layer", "--norm-position", "post", "--residual",
                 "--residual-scale", "0.5", "--batch", "4")  # fmt: skip
    assert (d["kind"], d["branch"], d["scale"], d["sigma_w"]) == (
        "post_norm",
        "act_linear",
        0.5,
        1.4,
    )
    assert len(d["measured"]) == 7 and d["chi_1"] is None
    _, out, _ = run(capsys, "theory", "--depth", "6", "--width", "32", "--norm", "batch",
                    "--norm-position", "post", "--batch", "8")  # fmt: skip
    assert "batchnorm_grad_norms" in out and "no spectrum" in out


def _same_history(cli_hist, hist):
    assert cli_hist == plain(hist.to_dict())


def test_train_an_mlp_with_every_optimizer_option(capsys):
    argv = ["train", "--task", "classification", "--classes", "3", "--examples", "64",
            "--depth", "3", "--width", "6", "--activation", "relu", "--init", "he_normal",
            "--optimizer", "sgd", "--lr", "0.05", "--momentum", "0.9", "--weight-decay", "1e-4",
            "--steps", "12", "--batch-size", "16", "--max-norm", "0.5", "--record-every", "3",
            "--seed", "7"]  # fmt: skip
    data = gc.tasks.classification(64, 6, 3, seed=8)
    net = gc.MLP(width=[6, 6, 6, 3], activation="relu", init="he_normal", seed=7)
    hist = gc.train(net, data, optimizer=gc.optim.SGD(lr=0.05, momentum=0.9, weight_decay=1e-4),
                    steps=12, batch_size=16, max_norm=0.5, record_every=3, seed=7)  # fmt: skip
    d = run_json(capsys, *argv)
    _same_history(d["history"], hist)
    assert d["diagnosis"] == plain(hist.diagnose().to_dict())
    _, out, _ = run(capsys, *argv)
    table = rows(out, 4)
    np.testing.assert_array_equal(table[:, 0], hist.steps)
    np.testing.assert_allclose(table[:, 1], hist.loss, rtol=1e-5)
    np.testing.assert_allclose(table[:, 2], hist.log10_total_norm, atol=5e-4)
    assert f"diagnosis: {hist.diagnose()}" in out


def test_train_teacher_student_with_adam_and_value_clipping(capsys):
    argv = ["train", "--examples", "64", "--depth", "2", "--width", "4", "--optimizer", "adamw",
            "--lr", "0.01", "--clip-value", "0.1", "--steps", "5", "--batch-size", "8",
            "--noise", "0.1"]  # fmt: skip
    data = gc.tasks.teacher_student(64, 4, noise=0.1, seed=1)
    net = gc.MLP(width=[4, 4, 4])
    hist = gc.train(net, data, optimizer=gc.optim.AdamW(lr=0.01), steps=5, batch_size=8,
                    clip_value=0.1)  # fmt: skip
    _same_history(run_json(capsys, *argv)["history"], hist)


@pytest.mark.parametrize("task", ["adding", "copy"])
def test_train_an_rnn_on_a_sequence_task(capsys, task):
    argv = ["train", "--task", task, "--cell", "gru", "--hidden", "4", "--T", "4", "--examples",
            "16", "--optimizer", "rmsprop", "--steps", "3", "--batch-size", "8", "--truncate",
            "2", "--spectral-radius", "0.9"]  # fmt: skip
    data = cli.rnn_task(task, 4, 16, 1)
    net = gc.RNN("gru", data.input_size, 4, output_size=data.output_size, spectral_radius=0.9)
    hist = gc.train(net, data, optimizer=gc.optim.RMSprop(), steps=3, batch_size=8, truncate=2)
    _same_history(run_json(capsys, *argv)["history"], hist)


def _same_grid(cli_grid, grid):
    """A sweep's --json against the API's to_dict(), but for the time it took."""
    d = plain(grid.to_dict())
    for g in (cli_grid, d):
        g["attrs"].pop("elapsed")
    assert cli_grid == d


def test_sweep_linspace_and_list_dims_and_typed_fixed_values(capsys):
    argv = ["sweep", "--dim", "sigma_w=0.5:2.5:3", "--dim", "bias_std=0,0.5", "--fixed", "depth=6",
            "--fixed", "width=8", "--fixed", "init=normal", "--fixed", "residual=false",
            "--fixed", "norm=none", "--seeds", "2", "--batch", "4", "--seed", "3"]  # fmt: skip
    grid = gc.sweep(gc.MLP, dims={"sigma_w": [0.5, 1.5, 2.5], "bias_std": [0, 0.5]},
                    fixed={"depth": 6, "width": 8, "init": "normal", "residual": False, "norm": None},
                    seeds=2, batch=4, seed=3)  # fmt: skip
    d = run_json(capsys, *argv)
    _same_grid(d, grid)
    assert (
        d["fixed"]["depth"] == 6 and d["fixed"]["residual"] is False and d["fixed"]["norm"] is None
    )
    status, out, _ = run(capsys, *argv)
    assert status == 0 and out.startswith(repr(grid).split(", elapsed")[0][:40])
    head = out.splitlines()[1].split()
    assert head == ["sigma_w", "bias_std", *grid.values]
    independent = gc.sweep(gc.MLP, dims={"sigma_w": [0.5, 1.5, 2.5], "bias_std": [0, 0.5]},
                           fixed={"depth": 6, "width": 8, "init": "normal", "residual": False,
                                  "norm": None}, seeds=2, batch=4, seed=3, draws="independent")  # fmt: skip
    _same_grid(run_json(capsys, *argv, "--draws", "independent"), independent)
    body = np.array([[float(x) for x in line.split()] for line in out.splitlines()[2:]])
    assert body.shape == (6, 6)
    np.testing.assert_allclose(body[:, :2], [[a, b] for a in (0.5, 1.5, 2.5) for b in (0, 0.5)])
    np.testing.assert_allclose(body[:, 2], grid.mean("growth").ravel(), rtol=1e-5)
    np.testing.assert_allclose(body[:, 5], grid.mean("log10_last").ravel(), rtol=1e-5)


def test_dim_values():
    assert cli._dim("sigma_w=0.5:2.5:3") == ("sigma_w", [0.5, 1.5, 2.5])
    assert cli._dim("depth=10:50:5") == ("depth", [10, 20, 30, 40, 50])
    assert cli._dim("x=0:1:3") == ("x", [0.0, 0.5, 1.0])
    assert cli._dim("x=1.0:3.0:3") == ("x", [1.0, 2.0, 3.0])
    assert cli._dim("a=tanh,relu,1,2.5,true,none") == ("a", ["tanh", "relu", 1, 2.5, True, None])
    assert cli._fixed("norm=None") == ("norm", None) and cli._fixed("w=1e-3") == ("w", 1e-3)
    depths = [type(d) for d in cli._dim("depth=1:3:3")[1]]
    assert depths == [int] * 3


def test_sweep_of_an_rnn_with_text_dims_serial_and_saved(capsys, tmp_path):
    out_file = tmp_path / "grid.npz"
    argv = ["sweep", "--target", "rnn", "--dim", "cell=tanh,gru", "--fixed", "hidden_size=4",
            "--fixed", "steps=5", "--measure", "backward", "--executor", "serial", "--out",
            str(out_file)]  # fmt: skip
    grid = gc.sweep(gc.RNN, dims={"cell": ["tanh", "gru"]}, fixed={"hidden_size": 4, "steps": 5},
                    measure="backward")  # fmt: skip
    status, out, err = run(capsys, *argv)
    assert status == 0 and f"saved the grid to {out_file}" in err
    saved = gc.SweepResult.load(out_file)
    for k, a in grid.values.items():
        np.testing.assert_array_equal(saved.values[k], a)
    body = [line.split() for line in out.splitlines()[2:]]
    assert [b[0] for b in body] == ["tanh", "gru"]
    np.testing.assert_allclose([float(b[1]) for b in body], grid.mean("loss"), rtol=1e-5)


def test_sweep_names_each_points_diagnosis(capsys):
    argv = ["sweep", "--dim", "depth=2,25", "--fixed", "width=6", "--fixed", "activation=sigmoid",
            "--fixed", "steps=12", "--measure", "train"]  # fmt: skip
    grid = gc.sweep(gc.MLP, dims={"depth": [2, 25]}, measure="train",
                    fixed={"width": 6, "activation": "sigmoid", "steps": 12})  # fmt: skip
    kinds = [grid.attrs["diagnosis_kinds"][int(c)] for c in grid.values["diagnosis_code"][:, 0]]
    assert kinds[1] == "vanishing"
    out = run(capsys, *argv)[1]
    assert [line.split()[-1] for line in out.splitlines()[2:]] == kinds


def test_sweep_trains_an_rnn_on_a_task_with_an_optimizer(capsys):
    argv = ["sweep", "--target", "rnn", "--measure", "train", "--task", "adding", "--T", "5",
            "--examples", "32", "--dim", "cell=tanh,gru", "--fixed", "hidden_size=4",
            "--fixed", "steps=6", "--batch", "8", "--optimizer", "adam", "--lr", "0.01"]  # fmt: skip
    data = cli.rnn_task("adding", 5, 32, 1)
    grid = gc.sweep(gc.RNN, dims={"cell": ["tanh", "gru"]}, measure="train", batch=8,
                    fixed={"hidden_size": 4, "steps": 6, "input_size": 2, "output_size": 1},
                    measure_kwargs={"data": data, "optimizer": gc.optim.Adam(lr=0.01)})  # fmt: skip
    assert not grid.errors
    _same_grid(run_json(capsys, *argv), grid)


def test_sweep_failures_recorded_or_raised(capsys):
    argv = ["sweep", "--dim", "sigma_w=1,-2", "--fixed", "depth=3", "--fixed", "width=4",
            "--fixed", "init=normal"]  # fmt: skip
    status, out, err = run(capsys, *argv)
    assert status == 0 and out.splitlines()[-1].split()[1:] == ["nan"] * 4
    assert err == ("gradchain: 1 point(s) failed (NaN in the table), e.g. ValueError: sigma_w "
                   "must be >= 0.0; got -2.0\n")  # fmt: skip
    status, out, err = run(capsys, *argv, "--on-error", "raise")
    assert (status, out, err.count("\n")) == (1, "", 1)
    assert err.startswith("gradchain: error: ") and "(sigma_w=-2, seed=0) failed" in err


def test_sweep_executor_processes_starts_fresh_workers():
    args = cli._parser().parse_args(["sweep", "--executor", "processes", "--workers", "3"])
    executor, kw = cli._executor(args)
    try:
        assert kw == {} and executor._max_workers == 3
        assert executor._mp_context.get_start_method() in ("forkserver", "spawn")
    finally:
        executor.shutdown()
    args = cli._parser().parse_args(["sweep", "--workers", "3"])
    assert cli._executor(args) == (None, {"workers": 3})


# -- --plot --------------------------------------------------------------------------------

needs_plot = pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None
    or importlib.util.find_spec("gradchain.plot") is None,
    reason="needs matplotlib and gradchain.plot",
)


@needs_plot
@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--depth", "5", "--width", "4", "--batch", "2"],
        ["run", "--depth", "5", "--width", "4", "--batch", "2"],
        ["rnn", "--T", "5", "--hidden", "4", "--batch", "2", "--cell", "lstm"],
        ["jacobian", "--depth", "5", "--width", "4", "--batch", "2", "--spectrum"],
        ["theory", "--depth", "5", "--width", "16", "--batch", "2", "--no-spectrum"],
        ["train", "--examples", "32", "--depth", "2", "--width", "4", "--steps", "4", "--batch-size", "8"],
        ["sweep", "--dim", "sigma_w=1,2", "--dim", "bias_std=0,1", "--fixed", "depth=3", "--fixed", "width=4",
         "--fixed", "init=normal"],
    ],
    ids=lambda a: a[0],
)  # fmt: skip
def test_plot_writes_the_file(capsys, tmp_path, argv):
    path = tmp_path / "out.png"
    status, out, err = run(capsys, *argv, "--json", "--plot", str(path))
    assert status == 0, err
    json.loads(out)  # the note about the file goes to stderr
    assert f"wrote {path}" in err
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_plot
def test_plot_draws_the_values_printed(capsys, tmp_path, monkeypatch):
    """The figure --plot saves holds the report's exact log10 norms."""
    from matplotlib.figure import Figure

    saved = []
    real = Figure.savefig
    monkeypatch.setattr(
        Figure, "savefig", lambda fig, *a, **k: (saved.append(fig), real(fig, *a, **k))
    )
    path = tmp_path / "run.svg"
    argv = ["run", "--depth", "40", "--width", "4", "--batch", "2", "--activation", "sigmoid"]
    assert run(capsys, *argv, "--plot", str(path))[0] == 0
    assert path.read_text().lstrip().startswith("<?xml")
    (line,) = saved[0].axes[0].get_lines()
    rep = gc.MLP(40, 4, activation="sigmoid").backward(normal_inputs(0, 2, 4))
    np.testing.assert_array_equal(line.get_ydata(), rep.log10_activation_grad_norms)


def test_progress_without_tqdm_says_how_to_get_it(capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tqdm" else real(name, *a))  # fmt: skip
    for command in ("sweep", "train"):
        status, out, err = run(capsys, command, "--progress")
        assert (status, out) == (2, "")
        assert err == (
            "gradchain: error: --progress needs tqdm, an optional dependency: "
            f"pip install 'gradchain[progress]' (see gradchain {command} --help)\n"
        )


def test_plot_without_matplotlib_says_how_to_get_it(capsys, monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))  # fmt: skip
    status, out, err = run(capsys, "run", "--depth", "3", "--plot", str(tmp_path / "a.png"))
    assert status == 2 and out == ""
    assert err == (
        "gradchain: error: --plot needs matplotlib, an optional dependency: "
        "pip install 'gradchain[plot]' (see gradchain run --help)\n"
    )


# -- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, words",
    [
        # positive counts, numbers, seeds, choices
        (["demo", "--rows", "0"], "argument --rows: rows must be a positive integer; got '0'"),
        (["demo", "--batch", "-2"], "batch must be a positive integer; got '-2'"),
        (["demo", "--depth", "x"], "depth must be a positive integer; got 'x'"),
        (["demo", "--seed", "-1"], "argument --seed: seed must be a non-negative integer below 2**64"),
        (["run", "--gain", "big"], "argument --gain: gain must be a number (e.g. 0.5, 1e-3, inf); got 'big'"),
        (["run", "--norm-type", "two"], "argument --norm-type: norm_type must be a number p > 0 or 'inf'"),
        (["run", "--activation", "swish"], "argument --activation: invalid choice: 'swish' (choose from"),
        (["theory", "--norm", "group"], "argument --norm: invalid choice: 'group'"),
        (["theory", "--target", "rnn", "--cell", "gru", "--T", "3"], "compare_theory covers the vanilla cells 'tanh' and 'relu'"),
        (["theory", "--hidden", "4"], "--hidden applies to --target rnn only"),
        (["rnn", "--cell", "lstm2"], "argument --cell: invalid choice: 'lstm2'"),
        (["train", "--optimizer", "lbfgs"], "invalid choice: 'lbfgs' (choose from 'sgd', 'adam', 'adamw'"),
        (["demo", "--nonesuch"], "unrecognized arguments: --nonesuch"),
        (["run", "--threads", "0"], "argument --threads: threads must be a positive integer; got '0'"),
        (["sweep", "--threads", "2"], "unrecognized arguments: --threads 2"),
        (["bogus"], "invalid choice: 'bogus'"),
        # --plot and --out files
        (["run", "--plot", "out.txt"], "the plot file must end in one of .png, .pdf, .svg"),
        (["run", "--plot", "/nonexistent-folder/a.png"], "the plot file's folder does not exist"),
        (["jacobian", "--depth", "3", "--plot", "a.png"], "--plot draws the QR spectrum: add --spectrum"),
        # --dim and --fixed
        (["sweep", "--dim", "sigma_w"], "--dim takes NAME=VALUE; got 'sigma_w'"),
        (["sweep", "--dim", "sigma_w=1:x:3"], "--dim sigma_w=START:STOP:NUM takes two finite numbers"),
        (["sweep", "--dim", "sigma_w=1:2:0"], "and a count >= 1 (numpy.linspace); got '1:2:0'"),
        (["sweep", "--dim", "depth=1,,3"], "--dim depth=a,b,c has an empty value"),
        (["sweep", "--fixed", "depth"], "--fixed takes NAME=VALUE; got 'depth'"),
        (["sweep"], "sweep needs at least one --dim NAME=VALUES"),
        (["sweep", "--dim", "depth=2,3", "--dim", "depth=4"], "--dim depth is given twice"),
        (["sweep", "--dim", "depth=2,3", "--fixed", "depth=4"], "--dim and --fixed both set depth"),
        (["sweep", "--dim", "depth=2", "--executor", "serial", "--workers", "2"], "--workers applies to --executor threads or processes only"),
        (["sweep", "--dim", "depth=2", "--plot", "a.png"], "--plot draws a phase diagram: it needs exactly two --dim"),
        (["sweep", "--dim", "depth=2", "--out", "/nonexistent-folder/g.npz"], "--out: the folder does not exist"),
        (["sweep", "--dim", "depth=2", "--fixed", "width=4", "--out", "."], "--out could not write '.': Is a directory"),
        # options that do not go together
        (["run", "--sigma-w", "2"], "--sigma-w sets the scale of --init normal; got --init xavier_normal"),
        (["sweep", "--dim", "sigma_w=1,2"], "sigma_w sets the scale of init normal; add --fixed init=normal"),
        (["sweep", "--dim", "depth=1,2", "--lr", "0.1"], "--lr applies to --measure train only"),
        (["sweep", "--dim", "depth=1,2", "--measure", "train", "--task", "copy"], "--task applies to --target rnn only"),
        (["sweep", "--target", "rnn", "--dim", "cell=gru", "--measure", "train"],
         "--measure train of --target rnn needs --task adding or copy"),
        (["sweep", "--dim", "depth=1,2", "--var", "loss"], "--var must be one of growth, growth_stderr"),
        (["sweep", "--dim", "sigma=1,2"], "unknown dimension or argument 'sigma' for gradchain.mlp.MLP"),
        (["train", "--optimizer", "adam", "--momentum", "0.9"], "--momentum applies to --optimizer sgd or rmsprop; got adam"),
        (["train", "--task", "adding", "--depth", "3"], "--depth applies to the MLP tasks (teacher_student, classification) only"),
        (["train", "--cell", "gru"], "--cell applies to the sequence tasks (adding, copy) only"),
        (["train", "--classes", "3"], "--classes applies to --task classification only"),
        (["jacobian", "--hidden", "3"], "--hidden applies to --target rnn only"),
        (["jacobian", "--target", "rnn", "--width", "3"], "--width applies to --target mlp only"),
        (["rnn", "--task", "adding", "--input-size", "3"], "--input-size applies to --task none only"),
        # what the library refuses for the values given
        (["run", "--dtype", "float32", "--gain", "1e40"], "argument --gain: gain must be at most"),
        (["run", "--max-norm", "-1"], "max_norm must be a non-negative number"),
        (["run", "--depth", "2000", "--width", "1000000"], "bytes"),
        (["run", "--depth", "3", "--width", "4", "--activation", "linear", "--gain", "1e300",
          "--bias-std", "1"], "the forward pass"),
        (["theory", "--depth", "3", "--width", "4", "--sigma-w", "1e300"], "argument --sigma-w: sigma_w must be between 0 and 1e+150"),
        (["theory", "--depth", "3", "--width", "4", "--sigma-w", "nan"], "sigma_w must be finite"),
        (["theory", "--sigma-w", "-1"], "sigma_w"),
        (["theory", "--depth", "3", "--width", "4", "--norm", "rms", "--residual"],
         "compare_theory has no theory for this chain"),
        (["train", "--init", "default", "--steps", "1"], "argument --init: init must be one of 'xavier_normal'"),
        (["train", "--lr", "-1", "--steps", "1"], "argument --lr: lr must be a finite number > 0; got -1.0"),
        (["train", "--max-norm", "1", "--clip-value", "1", "--steps", "1"], "max_norm"),
        (["train", "--examples", "4", "--batch-size", "8", "--steps", "1"], "argument --batch-size: batch_size=8 is larger than the 4 training examples"),
        (["rnn", "--T", "3", "--hidden", "4", "--batch", "2", "--truncate", "2", "--truncate-mode",
          "detach", "--norm-type", "-1"], "norm_type"),
        (["rnn", "--cell", "tanh", "--forget-bias", "1", "--T", "2"], "argument --forget-bias: forget_bias applies to cell='lstm'"),
        (["jacobian", "--depth", "3", "--width", "4", "--spectrum", "--k", "9"], "argument --k: k must be"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_and_status_2(capsys, argv, words):
    """Bad options and what the library refuses for them: "gradchain: error: ..." on one
    line of stderr naming the option or argument, exit status 2, nothing on stdout, no
    traceback."""
    status, out, err = run(capsys, *argv)
    assert status == 2, err
    assert err.startswith("gradchain: error: ") and err.count("\n") == 1, err
    assert words in err, err
    assert out == ""


def test_readme_commands_parse_and_its_errors_are_printed_as_shown(capsys):
    """Every ``gradchain ...`` line of the README's Command line section parses, and each
    ``$ gradchain ...`` there prints the error shown under it."""
    readme = Path(__file__).resolve().parents[1] / "README.md"
    if not readme.is_file():
        pytest.skip("no source tree next to the tests")
    text = readme.read_text()
    section = text[text.index("## Command line") :]
    section = section[: section.index("\n## ", 1)]
    commands = set(re.findall(r"^gradchain (.+)$", section, flags=re.MULTILINE))
    commands |= set(re.findall(r"`gradchain ([a-z][^`]*)`", section))
    assert {c.split()[0] for c in commands} == set(
        cli._parser()._subparsers._group_actions[0].choices
    )
    parser = cli._parser()
    for line in commands:
        argv = shlex.split(line.split(">")[0])
        if "--plot" in argv:  # the file type checks its folder: the README writes to "."
            argv[argv.index("--plot") + 1] = "x.png"
        assert parser.parse_args(argv).func
    shown = re.findall(r"^\$ gradchain (.+)\n(gradchain: error: .+)$", section, flags=re.MULTILINE)
    assert len(shown) == 2
    for line, error in shown:
        status, out, err = run(capsys, *shlex.split(line))
        assert (status, out, err) == (2, "", error + "\n")
