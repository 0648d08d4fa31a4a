"""Command line: ``gradchain demo``, ``gradchain run`` and ``gradchain theory``."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

import numpy as np

from . import _validate as v
from .compare import compare_theory
from .errors import NonFiniteError
from .mlp import ACTIVATIONS, INITS, MLP, NORM_POSITIONS, NORMS
from .theory import ConvergenceError

__all__ = ["main"]


def _inputs(seed: int, batch: int, width: int) -> np.ndarray:
    """Standard normal inputs, after checking that they fit in memory."""
    v.check_memory(8.0 * batch * width, f"the inputs (--batch {batch}, --width {width})")
    return np.random.default_rng(seed).standard_normal((batch, width))


def _ratio(a: float, b: float) -> str:
    """``10^(a - b)`` for the log10 norms a and b, in words where one is exactly zero."""
    if math.isfinite(a) and math.isfinite(b):
        return f"10^{a - b:+.1f}"
    if a == b:
        return "undefined: both are exactly 0"
    return "0 (the first is exactly 0)" if a < b else "inf (the last is exactly 0)"


def _demo(args: argparse.Namespace) -> int:
    chains = {
        "sigmoid / xavier_normal": MLP(args.depth, args.width, activation="sigmoid", init="xavier_normal", seed=args.seed),
        "relu / he_normal": MLP(args.depth, args.width, activation="relu", init="he_normal", seed=args.seed),
    }  # fmt: skip
    x = _inputs(args.seed, args.batch, args.width)
    reports = {name: net.backward(x) for name, net in chains.items()}
    names = list(chains)
    print(
        f"gradchain demo: depth {args.depth}, width {args.width}, batch {args.batch}, probe loss 0.5*||h_L||^2"
    )
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
    return 0


def _run(args: argparse.Namespace) -> int:
    net = MLP(
        args.depth,
        args.width,
        activation=args.activation,
        init=args.init,
        gain=args.gain,
        bias_std=args.bias_std,
        dtype=args.dtype,
        seed=args.seed,
    )
    x = _inputs(args.seed, args.batch, args.width)
    rep = net.backward(x, max_norm=args.max_norm)
    if args.json:
        json.dump(rep.to_dict(), sys.stdout)
        print()
    else:
        print(repr(net))
        print(rep)
    return 0


def _theory(args: argparse.Namespace) -> int:
    net = MLP(
        args.depth,
        args.width,
        activation=args.activation,
        init="normal",
        sigma_w=args.sigma_w,
        bias_std=args.bias_std,
        norm=args.norm,
        norm_position=args.norm_position,
        residual=args.residual,
        residual_scale=args.residual_scale,
        seed=args.seed,
    )
    cmp = compare_theory(net, batch=args.batch, seed=args.seed, spectrum=not args.no_spectrum)
    if args.json:
        json.dump(cmp.to_dict(), sys.stdout)
        print()
    else:
        print(cmp)
    return 0


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


def _seed(text: str) -> int:
    try:
        return v.seed(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"seed must be a non-negative integer below 2**64; got {text!r}"
        ) from None


class _Parser(argparse.ArgumentParser):
    """Bad options get the same one-line error as bad values (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"gradchain: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="gradchain", description="Vanishing and exploding gradients, measured exactly."
    )
    sub = p.add_subparsers(dest="command")
    d = sub.add_parser(
        "demo", help="per-layer gradient norms of a sigmoid chain beside a ReLU/He chain"
    )
    d.add_argument("--depth", type=_count("depth"), default=60)
    d.add_argument("--width", type=_count("width"), default=64)
    d.add_argument("--batch", type=_count("batch"), default=32)
    d.add_argument("--rows", type=_count("rows"), default=12, help="about how many layers to print")
    d.add_argument("--seed", type=_seed, default=0)
    d.set_defaults(func=_demo)
    r = sub.add_parser("run", help="one chain, its per-layer norms as a table or JSON")
    r.add_argument("--depth", type=_count("depth"), default=100)
    r.add_argument("--width", type=_count("width"), default=64)
    r.add_argument("--batch", type=_count("batch"), default=32)
    r.add_argument("--activation", choices=ACTIVATIONS, default="tanh")
    r.add_argument("--init", choices=INITS, default="xavier_normal")
    r.add_argument("--gain", type=float, default=1.0)
    r.add_argument("--bias-std", type=float, default=0.0)
    r.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    r.add_argument("--max-norm", type=float, default=None)
    r.add_argument("--seed", type=_seed, default=0)
    r.add_argument("--json", action="store_true", help="print the report as JSON")
    r.set_defaults(func=_run)
    t = sub.add_parser(
        "theory", help="measured per-layer gradient norms beside the mean-field prediction"
    )
    t.add_argument("--depth", type=_count("depth"), default=50)
    t.add_argument("--width", type=_count("width"), default=256)
    t.add_argument("--batch", type=_count("batch"), default=32)
    t.add_argument("--activation", choices=ACTIVATIONS, default="tanh")
    t.add_argument("--sigma-w", type=float, default=1.0, help="weights N(0, sigma_w^2 / fan_in)")
    t.add_argument("--bias-std", type=float, default=0.0, help="biases N(0, bias_std^2)")
    t.add_argument(
        "--norm", choices=NORMS, default=None, help="a norm layer in every layer, as gc.MLP's norm="
    )
    t.add_argument(
        "--norm-position", choices=NORM_POSITIONS, default="pre", help="where the norm goes"
    )
    t.add_argument("--residual", action="store_true", help="residual layers h + s (W phi(h) + b)")
    t.add_argument(
        "--residual-scale", type=float, default=1.0, help="s, the residual branches' factor"
    )
    t.add_argument("--no-spectrum", action="store_true", help="skip the QR spectrum")
    t.add_argument("--seed", type=_seed, default=0)
    t.add_argument("--json", action="store_true", help="print the comparison as JSON")
    t.set_defaults(func=_theory)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gradchain`` command (``demo`` when no command is given)."""
    args = _parser().parse_args(argv)
    if args.command is None:
        args = _parser().parse_args(["demo"])
    try:
        return int(args.func(args))
    except (ValueError, TypeError, MemoryError, NonFiniteError, ConvergenceError) as exc:
        # What the library refuses or cannot compute for these options: one line, no
        # traceback (a bug in gradchain still shows one).
        print(f"gradchain: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gradchain: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
