"""Command line: ``gradchain demo | run | rnn | jacobian | theory | sweep | train``.

Every subcommand prints a text table by default, the result's ``to_dict()`` as JSON with
``--json``, and draws with :mod:`gradchain.plot` into ``--plot FILE`` where a plot exists.
Bad options end with one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from . import _core, optim, tasks
from . import _validate as v
from .compare import compare_theory
from .errors import NonFiniteError
from .jacobian import jacobian_norms, jacobian_spectrum
from .mlp import ACTIVATIONS, INITS, MLP, NORM_POSITIONS, NORMS
from .rnn import CELLS, RNN, RNN_INITS, TRUNCATE_MODES
from .sweep import _VALUES as SWEEP_VALUES
from .sweep import MEASURES, sweep
from .theory import ConvergenceError
from .train import train

__all__ = ["main"]

# What matplotlib's Agg backend writes without extra packages.
PLOT_FORMATS = ("png", "pdf", "svg", "eps", "ps", "jpg", "jpeg", "tif", "tiff")
OPTIMIZERS: dict[str, Any] = {
    "sgd": optim.SGD,
    "adam": optim.Adam,
    "adamw": optim.AdamW,
    "rmsprop": optim.RMSprop,
    "adagrad": optim.Adagrad,
}
TASKS = {"teacher_student": "mlp", "classification": "mlp", "adding": "rnn", "copy": "rnn"}
EXECUTORS = ("threads", "serial", "processes")


class UsageError(Exception):
    """Options that parse one by one but do not go together."""


# -- argument types: each names its option and what it accepts ---------------------------


def _count(name: str) -> Callable[[str], int]:
    """argparse type of a size: a positive integer."""

    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            n = 0
        if n <= 0:
            raise argparse.ArgumentTypeError(f"{name} must be a positive integer; got {text!r}")
        return n

    return parse


def _real(name: str) -> Callable[[str], float]:
    """argparse type of a number; its range is the library's to check (and to explain)."""

    def parse(text: str) -> float:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{name} must be a number (e.g. 0.5, 1e-3, inf); got {text!r}"
            ) from None

    return parse


def _norm_type(text: str) -> float | str:
    if text.strip().lower() == "inf":
        return "inf"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"norm_type must be a number p > 0 or 'inf'; got {text!r}"
        ) from None


def _seed(text: str) -> int:
    try:
        return v.seed(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"seed must be a non-negative integer below 2**64; got {text!r}"
        ) from None


def _plot_file(text: str) -> str:
    """argparse type of --plot: checked before any work, so a long run never ends in a
    bad file name."""
    path = Path(text)
    suffix = path.suffix.lower().lstrip(".")
    if suffix not in PLOT_FORMATS:
        raise argparse.ArgumentTypeError(
            f"the plot file must end in one of .{', .'.join(PLOT_FORMATS)}; got {text!r}"
        )
    parent = path.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"the plot file's folder does not exist: {str(parent)!r}")
    return text


def _value(text: str) -> Any:
    """A --dim or --fixed value: int, float, bool or None where it reads as one, else str."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _name_value(option: str, text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    name = name.strip()
    if not sep or not name.isidentifier() or not value:
        raise argparse.ArgumentTypeError(f"{option} takes NAME=VALUE; got {text!r}")
    return name, value


def _dim(text: str) -> tuple[str, list[Any]]:
    """``NAME=START:STOP:NUM`` (numpy.linspace; integers where the ends are integers and
    every value is one, as for ``depth=10:50:5``) or ``NAME=a,b,c``."""
    name, spec = _name_value("--dim", text)
    if ":" in spec:
        parts = spec.split(":")
        try:
            start, stop, num = float(parts[0]), float(parts[1]), int(parts[2])
            if len(parts) != 3 or num < 1 or not (math.isfinite(start) and math.isfinite(stop)):
                raise ValueError
        except (ValueError, IndexError):
            raise argparse.ArgumentTypeError(
                f"--dim {name}=START:STOP:NUM takes two finite numbers and a count >= 1 "
                f"(numpy.linspace); got {spec!r}"
            ) from None
        grid = np.linspace(start, stop, num)
        ends_int = all(isinstance(_value(p), int) for p in parts[:2])
        if ends_int and np.array_equal(grid, np.round(grid)):
            return name, [int(x) for x in grid]
        return name, grid.tolist()
    values = [_value(s) for s in spec.split(",")]
    if any(s == "" for s in spec.split(",")):
        raise argparse.ArgumentTypeError(f"--dim {name}=a,b,c has an empty value; got {spec!r}")
    return name, values


def _fixed(text: str) -> tuple[str, Any]:
    name, value = _name_value("--fixed", text)
    return name, _value(value)


# -- the parser ---------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """Bad options get the same one-line error as bad values (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"gradchain: error: {message} (see {self.prog} --help)\n")


class _Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown, except where there is none to show: a flag that is off, or an
    option whose help says what happens without it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.nargs == 0:
            return action.help
        return super()._get_help_string(action)


def _add_common(
    p: argparse.ArgumentParser, *, plot: str, seed: str = "seed of the weights and inputs"
) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--json", action="store_true", help="print the result's to_dict() as JSON")
    g.add_argument(
        "--plot",
        metavar="FILE.png",
        type=_plot_file,
        default=None,
        help=f"also draw {plot} into this file (.png, .pdf, .svg, ...; needs matplotlib)",
    )
    p.add_argument("--seed", type=_seed, default=0, help=seed)


def _add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads",
        metavar="N",
        type=_count("threads"),
        default=None,
        help="at most N threads of the core (default: OMP_NUM_THREADS, or one per core); "
        "the results do not depend on it",
    )


def _add_every(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--every",
        metavar="N",
        type=_count("every"),
        default=None,
        help="print every N-th row of the table (default: about 20 rows)",
    )


def _add_mlp(
    p: argparse.ArgumentParser,
    *,
    depth: int,
    width: int,
    activation: str = "tanh",
    init: str = "xavier_normal",
    title: str = "chain (gc.MLP)",
    alone: bool = True,
) -> None:
    """gc.MLP's options; with ``alone=False`` beside :func:`_add_rnn`'s, without the
    --init, --gain and --dtype of :func:`_add_shared`."""
    g = p.add_argument_group(title)
    g.add_argument("--depth", type=_count("depth"), default=depth, help="number of layers L")
    g.add_argument("--width", type=_count("width"), default=width, help="units in every layer")
    g.add_argument(
        "--activation", choices=ACTIVATIONS, default=activation, help="phi in h = phi(W h + b)"
    )
    if alone:
        g.add_argument("--init", choices=INITS, default=init, help="weight initializer")
        g.add_argument(
            "--gain", type=_real("gain"), default=1.0, help="multiplies the init's scale"
        )
    g.add_argument(
        "--sigma-w",
        type=_real("sigma_w"),
        default=1.0,
        help="--init normal: weights N(0, sigma_w^2 / fan_in)",
    )
    g.add_argument(
        "--bias-std", type=_real("bias_std"), default=0.0, help="biases N(0, bias_std^2)"
    )
    g.add_argument(
        "--negative-slope", type=_real("negative_slope"), default=0.01, help="leaky_relu's slope"
    )
    g.add_argument("--alpha", type=_real("alpha"), default=1.0, help="elu's alpha")
    g.add_argument(
        "--norm", choices=NORMS, default=None, help="a norm layer in every layer (default: none)"
    )
    g.add_argument(
        "--norm-position", choices=NORM_POSITIONS, default="pre", help="where --norm goes"
    )
    g.add_argument("--residual", action="store_true", help="residual layers h + s * f(h)")
    g.add_argument(
        "--residual-scale", type=_real("residual_scale"), default=1.0, help="s, with --residual"
    )
    if alone:
        g.add_argument(
            "--dtype", choices=("float64", "float32"), default="float64", help="precision"
        )


def _add_shared(
    p: argparse.ArgumentParser, mlp_init: str = "xavier_normal", rnn_init: str = "default"
) -> None:
    """--init, --gain and --dtype of a command that builds a gc.MLP or a gc.RNN."""
    g = p.add_argument_group("either chain")
    g.add_argument("--init", choices=(*INITS, "default"), default=None, help=(
        f"initializer (default: {mlp_init} for an MLP, {rnn_init} for an RNN, where "
        "default is PyTorch's; an RNN takes default, xavier_uniform, xavier_normal, "
        "orthogonal, normal)"))  # fmt: skip
    g.add_argument("--gain", type=_real("gain"), default=1.0, help=(
        "multiplies the init's scale (an RNN's weight_ih)"))  # fmt: skip
    g.add_argument("--dtype", choices=("float64", "float32"), default="float64", help="precision")


def _add_rnn(
    p: argparse.ArgumentParser,
    *,
    init: str = "default",
    title: str = "recurrent chain (gc.RNN)",
    T: int = 100,
    alone: bool = True,
    input_size: bool = True,
) -> None:
    """gc.RNN's options; with ``alone=False`` beside :func:`_add_mlp`'s, without the
    --init, --gain and --dtype of :func:`_add_shared`."""
    g = p.add_argument_group(title)
    g.add_argument("--cell", choices=CELLS, default="tanh", help="recurrent cell")
    g.add_argument("--hidden", type=_count("hidden"), default=64, help="hidden state size")
    g.add_argument("--layers", type=_count("layers"), default=1, help="stacked layers")
    if input_size:
        g.add_argument("--input-size", type=_count("input_size"), default=8, help=(
            "input features (without a task; a task sets its own)"))  # fmt: skip
    g.add_argument("--T", type=_count("T"), default=T, help="time steps (copy: the delay)")
    if alone:
        g.add_argument("--init", choices=RNN_INITS, default=init, help="initializer")
        g.add_argument("--gain", type=_real("gain"), default=1.0, help="multiplies weight_ih")
    g.add_argument(
        "--recurrent-gain", type=_real("recurrent_gain"), default=1.0, help="multiplies weight_hh"
    )
    g.add_argument(
        "--spectral-radius",
        type=_real("spectral_radius"),
        default=None,
        help="rescale weight_hh to this spectral radius (default: leave it)",
    )
    g.add_argument(
        "--forget-bias",
        type=_real("forget_bias"),
        default=None,
        help="lstm: the forget gate's bias (default: as initialised)",
    )
    if alone:
        g.add_argument(
            "--dtype", choices=("float64", "float32"), default="float64", help="precision"
        )


def _add_optimizer(g: Any, default: str | None) -> None:
    g.add_argument("--optimizer", choices=tuple(OPTIMIZERS), default=default, help=(
        "gc.optim class" if default else "gc.optim class (default: gc.sweep's, sgd at lr 0.01)"))  # fmt: skip
    g.add_argument("--lr", type=_real("lr"), default=None, help=(
        "learning rate (default: the optimizer's, 1e-3 for sgd, adam, adamw; 1e-2 for "
        "rmsprop, adagrad)"))  # fmt: skip
    g.add_argument("--momentum", type=_real("momentum"), default=None,
                   help="sgd, rmsprop: momentum (default: 0)")  # fmt: skip
    g.add_argument("--weight-decay", type=_real("weight_decay"), default=None,
                   help="L2 penalty (default: the optimizer's, 1e-2 for adamw, else 0)")  # fmt: skip


def _add_truncation(g: Any) -> None:
    g.add_argument(
        "--truncate",
        type=_count("truncate"),
        default=None,
        help="truncated backpropagation through time, window K (default: full)",
    )
    g.add_argument(
        "--truncate-mode", choices=TRUNCATE_MODES, default="detach", help="with --truncate"
    )


def _add_clipping(g: Any, *, value: bool = False) -> None:
    g.add_argument(
        "--max-norm",
        type=_real("max_norm"),
        default=None,
        help="clip the total gradient norm to this, as torch's clip_grad_norm_ (default: no)",
    )
    if value:
        g.add_argument(
            "--clip-value",
            type=_real("clip_value"),
            default=None,
            help="clip every gradient entry to [-v, v], as torch's clip_grad_value_ (default: no)",
        )
    g.add_argument("--norm-type", type=_norm_type, default=2.0, help="order of the total norm")


DESCRIPTIONS = {
    "demo": "Two MLPs on the same N(0, 1) inputs with the probe loss 0.5 ||h_L||^2: a sigmoid\n"
    "chain with Xavier weights, whose gradient vanishes towards the input, and a ReLU\n"
    "chain with He weights, whose gradient keeps its size.",
    "run": "gc.MLP(...).backward(x) on N(0, 1) inputs with the probe loss 0.5 ||h_L||^2:\n"
    "log10 of ||dL/dW_l||, ||dL/db_l|| and ||dL/dh_l|| at every layer, exact where the\n"
    "float norm would be 0 or inf.",
    "rnn": "gc.RNN(...).backward(x) through time: log10 ||dL/dh_t|| (and an LSTM's\n"
    "||dL/dc_t||) at every step. Without a task: N(0, 1) inputs and the probe loss\n"
    "0.5 ||h_T||^2; with --task adding or copy, the task's sequences and loss through a\n"
    "read-out.",
    "jacobian": "gc.jacobian_norms: the Frobenius and spectral norm of every layer's (or time\n"
    "step's) Jacobian at every example; with --spectrum, gc.jacobian_spectrum: the\n"
    "Lyapunov exponents of the product J_l ... J_1 from its QR decompositions.",
    "theory": "gc.compare_theory: one backward pass of a gc.MLP (or a tanh or relu gc.RNN)\n"
    "beside the mean-field prediction (chi_1, the depth scale, the per-layer slope and the\n"
    "spectrum).",
    "sweep": "gc.sweep: the --measure at every point of the grid spanned by the --dim options,\n"
    "with the other arguments from --fixed, for --seeds seeds each.",
    "train": "gc.train on a task with known answers, then History.diagnose(): whether the\n"
    "gradients vanished, exploded or the run diverged or got stuck. The data are drawn\n"
    "from --seed + 1 (a teacher_student student of the teacher's shape would otherwise\n"
    "start as the teacher).",
}

EPILOG = """\
examples:
  gradchain demo
  gradchain run --depth 200 --activation relu --init normal --sigma-w 1.5 --json
  gradchain rnn --cell lstm --T 200 --task adding --truncate 50
  gradchain jacobian --depth 50 --activation tanh --spectrum
  gradchain theory --activation relu --sigma-w 1.5 --depth 30 --width 128
  gradchain sweep --dim sigma_w=0.5:3:6 --dim bias_std=0,0.5 --fixed init=normal --seeds 3
  gradchain train --task classification --depth 20 --optimizer adam --lr 1e-3

The core's thread count follows OMP_NUM_THREADS (--threads N caps it); results do not
depend on it.
"""


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    p = _Parser(
        prog="gradchain",
        description="Vanishing and exploding gradients, measured exactly.",
        epilog=EPILOG,
        formatter_class=_Help,
    )
    p.add_argument("--version", action="version", version=f"gradchain {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", title="commands (default: demo)")

    def command(name: str, help: str, func: Callable[[argparse.Namespace], int]) -> Any:
        more = DESCRIPTIONS[name]
        c = sub.add_parser(name, help=help, description=f"{help}.\n\n{more}", formatter_class=_Help)
        c.set_defaults(func=func, _parser=c)
        if name != "sweep":  # a sweep's threads are its --workers
            _add_threads(c)
        return c

    d = command("demo", "per-layer gradient norms of a sigmoid chain beside a ReLU/He chain", _demo)
    d.add_argument("--depth", type=_count("depth"), default=60, help="number of layers")
    d.add_argument("--width", type=_count("width"), default=64, help="units in every layer")
    d.add_argument("--batch", type=_count("batch"), default=32, help="examples, N(0, 1) inputs")
    d.add_argument("--rows", type=_count("rows"), default=12, help="about how many layers to print")
    _add_common(d, plot="both chains' per-layer weight-gradient norms")

    r = command("run", "one gc.MLP: per-layer gradient norms of a backward pass", _run)
    _add_mlp(r, depth=100, width=64)
    r.add_argument("--batch", type=_count("batch"), default=32, help="examples, N(0, 1) inputs")
    _add_clipping(r.add_argument_group("clipping"))
    _add_every(r)
    _add_common(r, plot="the per-layer norms ||dL/dh_l||")

    n = command(
        "rnn", "one gc.RNN: per-timestep gradient norms of backpropagation through time", _rnn_cmd
    )
    _add_rnn(n)
    n.add_argument("--batch", type=_count("batch"), default=32, help="sequences")
    n.add_argument("--task", choices=("none", "adding", "copy"), default="none", help=(
        "none: N(0, 1) inputs and the probe loss 0.5 ||h_T||^2; adding, copy: "
        "gc.tasks.adding_problem / copy_task and their loss through a read-out"))  # fmt: skip
    g = n.add_argument_group("backpropagation")
    _add_truncation(g)
    _add_clipping(g)
    _add_every(n)
    _add_common(n, plot="the per-timestep norms ||dL/dh_t||")

    j = command(
        "jacobian", "per-layer (or per-step) Jacobian norms, and the QR spectrum", _jacobian
    )
    j.add_argument("--target", choices=("mlp", "rnn"), default="mlp", help="the chain")
    _add_shared(j)
    _add_mlp(j, depth=50, width=64, title="--target mlp (gc.MLP)", alone=False)
    _add_rnn(j, title="--target rnn (gc.RNN)", T=50, alone=False)
    j.add_argument("--batch", type=_count("batch"), default=4, help="examples, N(0, 1) inputs")
    g = j.add_argument_group("what to compute")
    g.add_argument("--no-spectral", action="store_true", help="skip the spectral norms")
    g.add_argument("--spectrum", action="store_true", help="also the QR spectrum of J_l ... J_1")
    g.add_argument(
        "--k", type=_count("k"), default=None, help="--spectrum: directions (default: all)"
    )
    g.add_argument(
        "--interval", type=_count("interval"), default=1, help="--spectrum: QR every N layers"
    )
    _add_every(j)
    _add_common(j, plot="the spectrum's convergence (with --spectrum)")

    t = command(
        "theory", "measured per-layer gradient norms beside the mean-field prediction", _theory
    )
    t.add_argument("--target", choices=("mlp", "rnn"), default="mlp", help="the chain")
    _add_shared(t, "normal", "normal")
    _add_mlp(t, depth=50, width=256, title="--target mlp (gc.MLP)", alone=False)
    _add_rnn(t, title="--target rnn (gc.RNN: tanh or relu, one layer)", T=100, alone=False)
    t.add_argument("--batch", type=_count("batch"), default=32, help="examples")
    t.add_argument("--no-spectrum", action="store_true", help="skip the QR spectrum")
    _add_every(t)
    _add_common(t, plot="measurement beside theory (gc.plot.theory)")

    s = command("sweep", "a measurement over a grid of chain parameters (gc.sweep)", _sweep)
    s.add_argument("--target", choices=("mlp", "rnn"), default="mlp", help="gc.MLP or gc.RNN")
    s.add_argument("--dim", type=_dim, action="append", default=None, metavar="NAME=VALUES",
                   help="a swept argument: NAME=START:STOP:NUM (numpy.linspace) or NAME=a,b,c; "
                   "repeat for more dims (at least one)")  # fmt: skip
    s.add_argument("--fixed", type=_fixed, action="append", default=None, metavar="NAME=VALUE",
                   help="an argument held fixed (int, float, true/false, none or text); repeat")  # fmt: skip
    s.add_argument("--measure", choices=MEASURES, default="growth", help="what each point measures")
    s.add_argument("--seeds", type=_count("seeds"), default=1, help="seeds per point")
    s.add_argument("--draws", choices=("common", "independent"), default="common", help=(
        "common: the points of one seed share their random draws; independent: every "
        "point draws its own"))  # fmt: skip
    s.add_argument("--batch", type=_count("batch"), default=None, help=(
        "examples per point (default: 32; 1 for --measure spectrum)"))  # fmt: skip
    s.add_argument("--executor", choices=EXECUTORS, default="threads", help=(
        "threads: --workers points at once in this process, one core each; serial: one "
        "point after another; processes: a pool of --workers processes"))  # fmt: skip
    s.add_argument("--workers", type=_count("workers"), default=None, help=(
        "points at once for --executor threads or processes (default: the cores "
        "this process may use)"))  # fmt: skip
    s.add_argument("--on-error", choices=("record", "raise"), default="record",
                   help="a failing point: record it (NaN) or stop")  # fmt: skip
    s.add_argument("--progress", action="store_true", help="show a progress bar on stderr")
    s.add_argument("--var", default=None, help=(
        "the value shown by --plot (default: the measure's first, e.g. growth)"))  # fmt: skip
    s.add_argument("--out", metavar="FILE", default=None, help="save the grid (SweepResult.save)")
    g = s.add_argument_group("--measure train (steps, max_norm, clip_value: --fixed)")
    _add_optimizer(g, None)
    g.add_argument("--task", choices=("adding", "copy"), default=None, help=(
        "--target rnn: the sequence task to train on (required there; an MLP trains on "
        "gc.sweep's teacher-student regression)"))  # fmt: skip
    g.add_argument("--T", type=_count("T"), default=20, help="--task: time steps (copy: the delay)")
    g.add_argument("--examples", type=_count("examples"), default=256, help="--task: sequences")
    _add_common(s, plot="the phase diagram of --var over the two swept dims",
                seed="the root of every point's seeds (numpy SeedSequence)")  # fmt: skip

    tr = command("train", "train a chain on a task and diagnose its gradients", _train)
    tr.add_argument("--task", choices=tuple(TASKS), default="teacher_student", help=(
        "teacher_student, classification: an MLP; adding, copy: an RNN"))  # fmt: skip
    tr.add_argument("--examples", type=_count("examples"), default=1024, help="training examples")
    tr.add_argument("--classes", type=_count("classes"), default=2, help="classification: classes")
    tr.add_argument(
        "--noise", type=_real("noise"), default=0.0, help="teacher_student: target noise"
    )
    _add_shared(tr)
    _add_mlp(tr, depth=10, width=32, title="MLP tasks (gc.MLP)", alone=False)
    _add_rnn(tr, title="sequence tasks (gc.RNN)", T=20, alone=False, input_size=False)
    o = tr.add_argument_group("optimizer")
    _add_optimizer(o, "sgd")
    o.add_argument("--steps", type=_count("steps"), default=200, help="optimizer steps")
    o.add_argument("--batch-size", type=_count("batch_size"), default=32, help="examples per step")
    o.add_argument("--record-every", type=_count("record_every"), default=1, help=(
        "record every N-th step"))  # fmt: skip
    _add_clipping(o, value=True)
    _add_truncation(o)
    tr.add_argument("--rows", type=_count("rows"), default=10, help="about how many steps to print")
    tr.add_argument("--progress", action="store_true", help="show a progress bar on stderr")
    _add_common(tr, plot="the run: loss, total norm, per-parameter norms")
    return p


# -- helpers ------------------------------------------------------------------------------


def _inputs(seed: int, *shape: int) -> np.ndarray:
    """Standard normal inputs, after checking that they fit in memory."""
    dims = " x ".join(map(str, shape))
    v.check_memory(8.0 * math.prod(shape), f"the inputs ({dims})")
    return np.random.default_rng(seed).standard_normal(shape)


def _given(args: argparse.Namespace, dest: str) -> bool:
    """Whether an option was set to something other than its default."""
    return bool(getattr(args, dest) != args._parser.get_default(dest))


def _only(args: argparse.Namespace, dests: Sequence[str], where: str) -> None:
    """Refuse options that would be silently ignored here."""
    for dest in dests:
        if _given(args, dest):
            raise UsageError(f"--{dest.replace('_', '-')} applies to {where} only")


_MLP_ONLY = ("depth", "width", "activation", "sigma_w", "bias_std", "negative_slope", "alpha",
             "norm", "norm_position", "residual", "residual_scale")  # fmt: skip
_RNN_ONLY = ("cell", "hidden", "layers", "T", "recurrent_gain", "spectral_radius",
             "forget_bias")  # fmt: skip


def _mlp(args: argparse.Namespace, widths: Any = None, init: str | None = None) -> MLP:
    init = init or getattr(args, "init", None) or "xavier_normal"
    if init != "normal" and _given(args, "sigma_w"):
        raise UsageError(
            f"--sigma-w sets the scale of --init normal; got --init {init} (use --init normal, "
            "or --gain to scale another initializer)"
        )
    return MLP(
        args.depth if widths is None else None,
        args.width if widths is None else widths,
        activation=args.activation,
        init=init,
        gain=args.gain,
        sigma_w=args.sigma_w,
        bias_std=args.bias_std,
        negative_slope=args.negative_slope,
        alpha=args.alpha,
        norm=args.norm,
        norm_position=args.norm_position,
        residual=args.residual,
        residual_scale=args.residual_scale,
        dtype=getattr(args, "dtype", "float64"),
        seed=args.seed,
    )


def _rnn(
    args: argparse.Namespace,
    input_size: int,
    output_size: int | None = None,
    init: str | None = None,
) -> RNN:
    return RNN(
        args.cell,
        input_size,
        args.hidden,
        args.layers,
        output_size=output_size,
        init=init or getattr(args, "init", None) or "default",
        gain=args.gain,
        recurrent_gain=args.recurrent_gain,
        spectral_radius=args.spectral_radius,
        forget_bias=args.forget_bias,
        dtype=getattr(args, "dtype", "float64"),
        seed=args.seed,
    )


def _print_json(obj: Any) -> None:
    print(json.dumps(obj))


def _check_extras(args: argparse.Namespace) -> None:
    """Before any work: --plot needs matplotlib, --progress tqdm."""
    if getattr(args, "plot", None) and importlib.util.find_spec("matplotlib") is None:
        raise UsageError(
            "--plot needs matplotlib, an optional dependency: pip install 'gradchain[plot]'"
        )
    if getattr(args, "progress", False) and importlib.util.find_spec("tqdm") is None:
        raise UsageError(
            "--progress needs tqdm, an optional dependency: pip install 'gradchain[progress]'"
        )


def _save_plot(args: argparse.Namespace, draw: Callable[[Any], Any]) -> None:
    """Draw with gc.plot into args.plot; the note goes to stderr so --json stays clean."""
    if not args.plot:
        return
    import matplotlib

    matplotlib.use("Agg")  # a file, never a window
    import matplotlib.pyplot as plt

    gplot = importlib.import_module("gradchain.plot")
    drawn = draw(gplot)
    fig = drawn if hasattr(drawn, "savefig") else drawn.figure
    try:
        fig.savefig(args.plot, dpi=150, bbox_inches="tight")
    except OSError as exc:
        raise UsageError(f"--plot could not write {args.plot!r}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)
    print(f"gradchain: wrote {args.plot}", file=sys.stderr)


def _ratio(a: float, b: float) -> str:
    """``10^(a - b)`` for the log10 norms a and b, in words where one is exactly zero."""
    if math.isfinite(a) and math.isfinite(b):
        return f"10^{a - b:+.1f}"
    if a == b:
        return "undefined: both are exactly 0"
    return "0 (the first is exactly 0)" if a < b else "inf (the last is exactly 0)"


# -- subcommands ----------------------------------------------------------------------------


def demo_chains(depth: int, width: int, seed: int) -> dict[str, MLP]:
    """The two chains of ``gradchain demo``."""
    return {
        "sigmoid / xavier_normal": MLP(depth, width, activation="sigmoid", init="xavier_normal", seed=seed),
        "relu / he_normal": MLP(depth, width, activation="relu", init="he_normal", seed=seed),
    }  # fmt: skip


def _demo(args: argparse.Namespace) -> int:
    chains = demo_chains(args.depth, args.width, args.seed)
    x = _inputs(args.seed, args.batch, args.width)
    reports = {name: net.backward(x) for name, net in chains.items()}
    names = list(chains)
    if args.json:
        _print_json({"depth": args.depth, "width": args.width, "batch": args.batch,
                     "seed": args.seed, "reports": {n: r.to_dict() for n, r in reports.items()}})  # fmt: skip
    else:
        print(f"gradchain demo: depth {args.depth}, width {args.width}, batch {args.batch}, "
              "probe loss 0.5*||h_L||^2")  # fmt: skip
        print("log10 of the Frobenius norm of dL/dW_l, layer 1 = nearest the input\n")
        print(f"{'layer':>6}  {names[0]:>24}  {names[1]:>24}")
        step = max(1, args.depth // args.rows)
        for l in sorted(set(range(1, args.depth + 1, step)) | {args.depth}):
            a, b = (reports[n].log10_weight_grad_norms[l - 1] for n in names)
            print(f"{l:>6}  {a:>24.3f}  {b:>24.3f}")
        print()
        for n in names:
            lw = reports[n].log10_weight_grad_norms
            print(f"{n}: |dL/dW_1| / |dL/dW_{args.depth}| = {_ratio(float(lw[0]), float(lw[-1]))}")
    _save_plot(
        args, lambda gp: gp.layer_norms(list(reports.values()), labels=names, quantity="weight")
    )
    return 0


def _run(args: argparse.Namespace) -> int:
    net = _mlp(args)
    x = _inputs(args.seed, args.batch, args.width)
    rep = net.backward(x, max_norm=args.max_norm, norm_type=args.norm_type)
    if args.json:
        _print_json(rep.to_dict())
    else:
        print(repr(net))
        print(repr(rep))
        print(rep.table(args.every))
    _save_plot(args, lambda gp: gp.layer_norms(rep))
    return 0


def rnn_task(name: str, T: int, batch: int, seed: int) -> tasks.Task:
    """The sequence task ``adding`` or ``copy`` of ``gradchain rnn``, ``train`` and
    ``sweep``."""
    if name == "adding":
        return tasks.adding_problem(T, batch, seed=seed)
    return tasks.copy_task(T, batch, seed=seed)


def _rnn_cmd(args: argparse.Namespace) -> int:
    task = None if args.task == "none" else rnn_task(args.task, args.T, args.batch, args.seed)
    if task is None:
        net = _rnn(args, args.input_size)
        x, target, loss = _inputs(args.seed, args.T, args.batch, args.input_size), None, None
    else:
        _only(args, ("input_size",), "--task none")
        net = _rnn(args, task.input_size, task.output_size)
        x, target, loss = task.x, task.target, task.loss
    rep = net.backward(x, target, loss=loss, truncate=args.truncate,
                       truncate_mode=args.truncate_mode, max_norm=args.max_norm,
                       norm_type=args.norm_type)  # fmt: skip
    if args.json:
        _print_json(rep.to_dict())
    else:
        print(repr(net) if task is None else f"{net!r}\n{task!r}")
        print(repr(rep))
        print(rep.table(args.every))
    _save_plot(args, lambda gp: gp.layer_norms(rep))
    return 0


def _jacobian(args: argparse.Namespace) -> int:
    if args.plot and not args.spectrum:
        raise UsageError("--plot draws the QR spectrum: add --spectrum")
    if args.target == "mlp":
        _only(args, (*_RNN_ONLY, "input_size"), "--target rnn")
        net: Any = _mlp(args)
        x = _inputs(args.seed, args.batch, args.width)
    else:
        _only(args, _MLP_ONLY, "--target mlp")
        net = _rnn(args, args.input_size)
        x = _inputs(args.seed, args.T, args.batch, args.input_size)
    norms = jacobian_norms(net, x, spectral=not args.no_spectral)
    spec = (
        jacobian_spectrum(net, x, k=args.k, interval=args.interval, seed=args.seed)
        if args.spectrum
        else None
    )
    if args.json:
        out = {"norms": norms.to_dict()}
        if spec is not None:
            out["spectrum"] = spec.to_dict()
        _print_json(out)
    else:
        print(repr(net))
        print(f"JacobianNorms(batch={norms.batch}, depth={norms.depth})")
        print(norms.table(args.every))
        if spec is not None:
            print()
            print(str(spec).splitlines()[0])
            print(spec.table(args.every))
            lam = spec.lyapunov_exponents_mean
            print(f"Lyapunov exponents (ln per {'step' if args.target == 'rnn' else 'layer'}): "
                  f"max {lam[0]:.5g}, min {lam[-1]:.5g}")  # fmt: skip
    _save_plot(args, lambda gp: gp.spectrum(spec))
    return 0


def _theory(args: argparse.Namespace) -> int:
    if args.target == "mlp":
        _only(args, (*_RNN_ONLY, "input_size"), "--target rnn")
        net: Any = _mlp(args, init=args.init or "normal")
        steps = {}
    else:
        _only(args, _MLP_ONLY, "--target mlp")
        net = _rnn(args, args.input_size, init=args.init or "normal")
        steps = {"steps": args.T}
    cmp = compare_theory(net, batch=args.batch, seed=args.seed, spectrum=not args.no_spectrum,
                         **steps)  # fmt: skip
    if args.json:
        _print_json(cmp.to_dict())
    else:
        print(cmp._summary())
        print(cmp.table(args.every))
    _save_plot(args, lambda gp: gp.theory(cmp))
    return 0


def _executor(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """gc.sweep's executor and workers for --executor and --workers."""
    if args.executor == "serial":
        if args.workers is not None:
            raise UsageError("--workers applies to --executor threads or processes only")
        return None, {"workers": 1}
    if args.executor == "threads":
        return None, {} if args.workers is None else {"workers": args.workers}
    import concurrent.futures as cf
    import multiprocessing as mp

    workers = args.workers or os.cpu_count() or 1

    # forkserver workers start afresh with all of the core's threads (a forked one runs
    # on one; see the README's Threads section).
    ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
    return cf.ProcessPoolExecutor(workers, mp_context=ctx), {}


def _sweep(args: argparse.Namespace) -> int:
    if not args.dim:
        raise UsageError("sweep needs at least one --dim NAME=VALUES")
    dims: dict[str, Any] = {}
    for name, values in args.dim:
        if name in dims:
            raise UsageError(f"--dim {name} is given twice")
        dims[name] = values
    fixed = dict(args.fixed or [])
    both = sorted(set(dims) & set(fixed))
    if both:
        raise UsageError(f"--dim and --fixed both set {', '.join(both)}")
    if args.plot and sum(1 for n in dims if n != "seed") != 2:
        raise UsageError("--plot draws a phase diagram: it needs exactly two --dim")
    if args.out:
        parent = Path(args.out).parent
        if not parent.is_dir():
            raise UsageError(f"--out: the folder does not exist: {str(parent)!r}")
    init = dims.get("init", [fixed.get("init", "xavier_normal")])
    mlp_sigma_w = args.target == "mlp" and ("sigma_w" in dims or "sigma_w" in fixed)
    if mlp_sigma_w and "normal" not in init:
        raise UsageError(
            "sigma_w sets the scale of init normal; add --fixed init=normal (or sweep gain "
            "for another initializer)"
        )
    mkw: dict[str, Any] = {}
    if args.measure == "train":
        if any(_given(args, d) for d in ("optimizer", "lr", "momentum", "weight_decay")):
            mkw["optimizer"] = train_optimizer(args)
        if args.task is not None:
            if args.target != "rnn":
                raise UsageError("--task applies to --target rnn only")
            data = rnn_task(args.task, args.T, args.examples, args.seed + 1)
            mkw["data"] = data
            fixed.setdefault("input_size", data.input_size)
            fixed.setdefault("output_size", data.output_size)
        elif args.target == "rnn":
            raise UsageError("--measure train of --target rnn needs --task adding or copy")
        else:
            _only(args, ("T", "examples"), "--task")
    else:
        _only(args, ("optimizer", "lr", "momentum", "weight_decay", "task", "T", "examples"),
              "--measure train")  # fmt: skip
    names = SWEEP_VALUES[args.measure]
    if args.var is not None and args.var not in names:
        raise UsageError(
            f"--var must be one of {', '.join(names)} for --measure {args.measure}; got {args.var!r}"
        )
    target = MLP if args.target == "mlp" else RNN
    executor, workers = _executor(args)
    try:
        grid = sweep(target, dims=dims, fixed=fixed, measure=args.measure, seeds=args.seeds,
                        draws=args.draws, executor=executor, batch=args.batch, seed=args.seed,
                        progress=args.progress, on_error=args.on_error, measure_kwargs=mkw,
                        **workers)  # fmt: skip
    except RuntimeError as exc:
        if args.on_error != "raise":
            raise
        # The failure the user asked to stop at: the point and its error, no traceback.
        print(f"gradchain: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    finally:
        if executor is not None:
            executor.shutdown()
    var = args.var or names[0]
    if args.out:
        try:
            grid.save(args.out)
        except OSError as exc:
            raise UsageError(f"--out could not write {args.out!r}: {exc.strerror or exc}") from None
        print(f"gradchain: saved the grid to {args.out}", file=sys.stderr)
    if args.json:
        _print_json(grid.to_dict())
    else:
        print(repr(grid))
        print(sweep_table(grid))
    if grid.errors:
        first = next(iter(grid.errors.values()))
        print(f"gradchain: {len(grid.errors)} point(s) failed (NaN in the table), e.g. {first}",
              file=sys.stderr)  # fmt: skip
    _save_plot(args, lambda gp: gp.phase_diagram(grid, var=var))
    return 0


def sweep_table(grid: Any) -> str:
    """One row per point of the grid: its coordinates, then every value averaged over the
    seeds (a training diagnosis by its name, or the names of the seeds' diagnoses where
    they differ)."""
    names = [n for n in grid.dims if n != "seed"]
    shape = [len(grid.dims[n]) for n in names]
    kinds = grid.attrs.get("diagnosis_kinds")
    cols: dict[str, list[str]] = {n: [] for n in [*names, *grid.values]}
    means = {k: np.asarray(grid.mean(k), dtype=np.float64) for k in grid.values}
    codes = None
    if kinds is not None and "diagnosis_code" in grid.values:
        codes = np.moveaxis(grid.values["diagnosis_code"], list(grid.dims).index("seed"), -1)
        cols["diagnosis"] = cols.pop("diagnosis_code")
    for idx in np.ndindex(*shape):
        for n, i in zip(names, idx):
            cols[n].append(_cell(grid.dims[n][i]))
        for k, m in means.items():
            if k == "diagnosis_code" and codes is not None:
                seen = [kinds[int(c)] if np.isfinite(c) else "failed" for c in codes[idx]]
                cols["diagnosis"].append("/".join(dict.fromkeys(seen)))
            else:
                cols[k].append(f"{float(m[idx]):.6g}")
    widths = {c: max(len(c), *(len(x) for x in v)) for c, v in cols.items()}
    lines = ["  ".join(f"{c:>{widths[c]}}" for c in cols)]
    for r in range(len(next(iter(cols.values())))):
        lines.append("  ".join(f"{v[r]:>{widths[c]}}" for c, v in cols.items()))
    return "\n".join(lines)


def _cell(x: Any) -> str:
    if isinstance(x, (float, np.floating)):
        return f"{float(x):.6g}"
    return str(x.item() if isinstance(x, np.generic) else x)


def train_data(args: argparse.Namespace) -> Any:
    """The data of ``gradchain train --task``, drawn from seed + 1: with the chain's seed a
    teacher_student student of the teacher's shape would start as the teacher."""
    seed = args.seed + 1
    if args.task == "teacher_student":
        return tasks.teacher_student(args.examples, args.width, noise=args.noise, seed=seed)
    if args.task == "classification":
        return tasks.classification(args.examples, args.width, args.classes, seed=seed)
    return rnn_task(args.task, args.T, args.examples, seed)


def train_optimizer(args: argparse.Namespace) -> Any:
    """The optimizer of ``gradchain train``."""
    kw: dict[str, Any] = {}
    if args.lr is not None:
        kw["lr"] = args.lr
    name = args.optimizer or "sgd"
    if args.momentum is not None:
        if name not in ("sgd", "rmsprop"):
            raise UsageError(f"--momentum applies to --optimizer sgd or rmsprop; got {name}")
        kw["momentum"] = args.momentum
    if args.weight_decay is not None:
        kw["weight_decay"] = args.weight_decay
    return OPTIMIZERS[name](**kw)


def _train(args: argparse.Namespace) -> int:
    kind = TASKS[args.task]
    if kind == "mlp":
        _only(args, (*_RNN_ONLY, "truncate", "truncate_mode"), "the sequence tasks (adding, copy)")
        if args.task != "classification":
            _only(args, ("classes",), "--task classification")
        else:
            _only(args, ("noise",), "--task teacher_student")
    else:
        _only(args, (*_MLP_ONLY, "classes", "noise"),
              "the MLP tasks (teacher_student, classification)")  # fmt: skip
    data = train_data(args)
    if kind == "mlp":
        out = args.classes if args.task == "classification" else args.width
        net: Any = _mlp(args, widths=[args.width] * args.depth + [out])
    else:
        net = _rnn(args, data.input_size, data.output_size)
    opt = train_optimizer(args)
    hist = train(net, data, optimizer=opt, steps=args.steps, batch_size=args.batch_size,
                 max_norm=args.max_norm, norm_type=args.norm_type, clip_value=args.clip_value,
                 record_every=args.record_every, seed=args.seed, truncate=args.truncate,
                 truncate_mode=args.truncate_mode, progress=args.progress)  # fmt: skip
    diagnosis = hist.diagnose()
    if args.json:
        _print_json({"history": hist.to_dict(), "diagnosis": diagnosis.to_dict()})
    else:
        print(repr(net))
        print(repr(hist))
        print(history_table(hist, args.rows))
        print()
        print(f"diagnosis: {diagnosis}")
    _save_plot(args, lambda gp: gp.history(hist))
    return 0


def history_table(hist: Any, rows: int) -> str:
    """About `rows` recorded steps: the loss and the total gradient norm (log10)."""
    n = len(hist)
    every = max(1, n // rows)
    out = [f"{'step':>7}  {'loss':>12}  {'log10|g|':>9}  {'clip_coef':>9}"]
    for i in sorted(set(range(0, n, every)) | {n - 1}):
        out.append(f"{int(hist.steps[i]):>7}  {float(hist.loss[i]):>12.6g}  "
                   f"{float(hist.log10_total_norm[i]):>9.3f}  {float(hist.clip_coef[i]):>9.3g}")  # fmt: skip
    return "\n".join(out)


def _option_of(args: argparse.Namespace, message: str) -> str:
    """``"argument --sigma-w: "`` for a library message about ``sigma_w``, as argparse
    names the option of a value it refuses itself ("" when the message names none)."""
    first = message.split(" ", 1)[0].split("=", 1)[0]
    for action in args._parser._actions:
        if action.dest == first and action.option_strings:
            return f"argument {action.option_strings[-1]}: "
    return ""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gradchain`` command (``demo`` when no command is given).

    Parameters
    ----------
    argv : sequence of str, optional
        The arguments after the program name (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        The exit status: 0, 2 for bad options and what the library refuses for them, 130
        after Ctrl-C.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["demo"])
    threads = getattr(args, "threads", None)
    previous = None if threads is None else _core.set_thread_limit(threads)
    try:
        _check_extras(args)
        return int(args.func(args))
    except UsageError as exc:
        print(f"gradchain: error: {exc} (see {args._parser.prog} --help)", file=sys.stderr)
        return 2
    except (ValueError, TypeError, MemoryError, NonFiniteError, ConvergenceError) as exc:
        # What the library refuses or cannot compute for these options: one line, no
        # traceback (a bug in gradchain still shows one).
        msg = " ".join(str(exc).split())
        print(f"gradchain: error: {_option_of(args, msg)}{msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gradchain: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (``gradchain sweep ... | head``): nothing more to say, and
        # nothing for Python to flush into the closed pipe at exit either.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    finally:
        if previous is not None:  # main() may be called again in this thread
            _core.set_thread_limit(previous)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
