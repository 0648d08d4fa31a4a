"""Reading a PyTorch model as a chain of blocks (:meth:`gradchain.Chain.from_torch`).

torch is imported here only, when a model is read: gradchain itself never needs it.
Modules of torch.nn become blocks through one table; modules of the user's own are read
with ``torch.fx``: every submodule call is kept as one call (and read recursively), and the
operations between them must form a chain with residual additions.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Callable
from typing import Any

import numpy as np

from . import _validate as v
from .blocks import Activation, BatchNorm, Block, LayerNorm, Linear, Residual, RMSNorm, Scale

__all__ = ["blocks_of"]

_ACCEPTED_DTYPES = "float32 and float64"


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _one_dim(m: Any, prefix: str) -> int:
    shape = tuple(m.normalized_shape)
    if len(shape) != 1:
        raise ValueError(
            f"{type(m).__name__} at {prefix or 'the model'!r} normalises over {shape}; gradchain "
            "normalises over the last dimension only (normalized_shape of one entry)"
        )
    return int(shape[0])


def _softplus(m: Any, prefix: str) -> Block:
    if m.beta != 1 or m.threshold != 20:
        raise ValueError(
            f"Softplus at {prefix or 'the model'!r} has beta={m.beta}, threshold={m.threshold}; "
            "gradchain's softplus is torch's default, beta=1 and threshold=20"
        )
    return Activation("softplus", prefix=prefix)


def _gelu(m: Any, prefix: str) -> Block:
    names = {"none": "gelu", "tanh": "gelu_tanh"}
    if m.approximate not in names:
        raise ValueError(
            f"GELU at {prefix!r} has approximate={m.approximate!r}; accepted: 'none', 'tanh'"
        )
    return Activation(names[m.approximate], prefix=prefix)


def _dropout(m: Any, prefix: str) -> Block:
    if m.training and m.p > 0:
        raise ValueError(
            f"Dropout at {prefix or 'the model'!r} is in train mode with p={m.p}: its output is "
            "random. Call model.eval() (Dropout is then the identity) or use p=0"
        )
    return Activation("linear", prefix=prefix)


def _leaf_table(nn: Any) -> dict[type, Callable[[Any, str], Block]]:
    """torch.nn module types and the block each becomes: the one place that knows them."""
    return {
        nn.Linear: lambda m, p: Linear(
            m.in_features, m.out_features, bias=m.bias is not None, prefix=p
        ),
        nn.Identity: lambda m, p: Activation("linear", prefix=p),
        nn.Tanh: lambda m, p: Activation("tanh", prefix=p),
        nn.ReLU: lambda m, p: Activation("relu", prefix=p),
        nn.Sigmoid: lambda m, p: Activation("sigmoid", prefix=p),
        nn.SiLU: lambda m, p: Activation("silu", prefix=p),
        nn.LeakyReLU: lambda m, p: Activation(
            "leaky_relu", negative_slope=m.negative_slope, prefix=p
        ),
        nn.ELU: lambda m, p: Activation("elu", alpha=m.alpha, prefix=p),
        nn.GELU: _gelu,
        nn.Softplus: _softplus,
        nn.Dropout: _dropout,
        nn.BatchNorm1d: lambda m, p: BatchNorm(
            m.num_features,
            eps=m.eps,
            momentum=m.momentum,
            affine=m.affine,
            track_running_stats=m.track_running_stats,
            prefix=p,
        ),
        nn.LayerNorm: lambda m, p: LayerNorm(
            _one_dim(m, p),
            eps=m.eps,
            elementwise_affine=m.elementwise_affine,
            bias=m.bias is not None,
            prefix=p,
        ),
        nn.RMSNorm: lambda m, p: RMSNorm(
            _one_dim(m, p), eps=m.eps, elementwise_affine=m.elementwise_affine, prefix=p
        ),
    }


def _functions(torch: Any) -> dict[Any, Callable[[Any, str], Block]]:
    """Activation functions a forward may call (the node gives their arguments)."""
    F = torch.nn.functional

    def arg(node: Any, i: int, name: str, default: Any) -> Any:
        return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)

    def softplus(n: Any, p: str) -> Block:
        if arg(n, 1, "beta", 1) != 1 or arg(n, 2, "threshold", 20) != 20:
            raise ValueError(
                f"softplus at {p!r} must have beta=1 and threshold=20 (torch's default)"
            )
        return Activation("softplus", prefix=p)

    def gelu(n: Any, p: str) -> Block:
        approx = n.kwargs.get("approximate", "none")
        if approx not in ("none", "tanh"):
            raise ValueError(f"gelu at {p!r} has approximate={approx!r}; accepted: 'none', 'tanh'")
        return Activation("gelu" if approx == "none" else "gelu_tanh", prefix=p)

    return {
        torch.tanh: lambda n, p: Activation("tanh", prefix=p),
        F.tanh: lambda n, p: Activation("tanh", prefix=p),
        torch.sigmoid: lambda n, p: Activation("sigmoid", prefix=p),
        F.sigmoid: lambda n, p: Activation("sigmoid", prefix=p),
        torch.relu: lambda n, p: Activation("relu", prefix=p),
        F.relu: lambda n, p: Activation("relu", prefix=p),
        F.silu: lambda n, p: Activation("silu", prefix=p),
        F.gelu: gelu,
        F.leaky_relu: lambda n, p: Activation(
            "leaky_relu", negative_slope=arg(n, 1, "negative_slope", 0.01), prefix=p
        ),
        F.elu: lambda n, p: Activation("elu", alpha=arg(n, 1, "alpha", 1.0), prefix=p),
        F.softplus: softplus,
        "tanh": lambda n, p: Activation("tanh", prefix=p),  # tensor methods: x.tanh()
        "sigmoid": lambda n, p: Activation("sigmoid", prefix=p),
        "relu": lambda n, p: Activation("relu", prefix=p),
    }


_SUPPORTED = (
    "nn.Sequential, nn.Linear, nn.Tanh, nn.ReLU, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, "
    "nn.Softplus, nn.Identity, nn.Dropout, nn.BatchNorm1d, nn.LayerNorm, nn.RMSNorm, and modules of "
    "your own whose forward chains these (read with torch.fx) with residual additions"
)
_SUPPORTED_NODES = (
    "calls of submodules, x + f(x) and f(x) + x, proj(x) + f(x) with a Linear proj, "
    "multiplication or division by a number, and the activation functions torch.tanh, "
    "torch.sigmoid, torch.relu, F.relu, F.silu, F.gelu, F.leaky_relu, F.elu, F.softplus"
)


class _Reader:
    """Turns a module into blocks, and remembers what the chain needs to know about it."""

    def __init__(self, torch: Any) -> None:
        self.torch = torch
        self.nn = torch.nn
        self.leaves = _leaf_table(torch.nn)
        self.functions = _functions(torch)
        self.modes: dict[str, bool] = {}  # BatchNorm prefix -> training
        self.called: dict[int, str] = {}  # id(module) -> prefix of its first call

    # -- modules ----------------------------------------------------------------------------
    def module(self, m: Any, prefix: str) -> list[Block]:
        nn = self.nn
        if id(m) in self.called:
            first = self.called[id(m)]
            same = "" if first == prefix else f" (the one at {first!r})"
            raise ValueError(
                f"the module at {prefix!r}{same} is called twice: shared parameters are not "
                "supported (each layer needs its own)"
            )
        self.called[id(m)] = prefix
        kind = type(m)
        if kind in self.leaves:
            if kind is nn.BatchNorm1d:
                self.modes[prefix] = bool(m.training)
            return [self.leaves[kind](m, prefix)]
        if isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward:
            out: list[Block] = []
            for name, child in m.named_children():
                out += self.module(child, _join(prefix, name))
            return out
        if kind.__module__.startswith("torch."):
            raise ValueError(
                f"{kind.__module__}.{kind.__name__} at {prefix or 'the model'!r} is not supported; "
                f"gradchain reads {_SUPPORTED}"
            )
        return self.traced(m, prefix)

    # -- user modules through torch.fx ------------------------------------------------------
    def traced(self, m: Any, prefix: str) -> list[Block]:
        fx = self.torch.fx

        class Calls(fx.Tracer):  # type: ignore[name-defined]
            # Every submodule stays one call_module node; it is read on its own.
            def is_leaf_module(self, module: Any, qualname: str) -> bool:
                return True

        where = f"{type(m).__name__} at {prefix or 'the model'!r}"
        try:
            graph = Calls().trace(m)
        except Exception as exc:  # any tracing failure gets the same answer
            raise ValueError(
                f"{where}: torch.fx could not trace its forward ({type(exc).__name__}: {exc}); "
                f"gradchain reads {_SUPPORTED}"
            ) from exc
        nodes = list(graph.nodes)
        inputs = [n for n in nodes if n.op == "placeholder"]
        if len(inputs) != 1:
            raise ValueError(
                f"{where}: forward must take one tensor; it takes {[n.name for n in inputs]}"
            )
        out = next(n for n in nodes if n.op == "output")
        result = out.args[0]
        if not isinstance(result, fx.Node):
            # An unsupported model, as every other structure gradchain cannot read.
            raise ValueError(f"{where}: forward must return one tensor; it returns {result!r}")  # noqa: TRY004
        ops = {
            n: self.node(n, m, prefix, where)
            for n in nodes
            if n.op not in ("placeholder", "output")
        }
        blocks = _Graph(ops, inputs[0], prefix, where).between(result, inputs[0])
        if len(blocks) == 1 and isinstance(blocks[0], Residual) and blocks[0].prefix != prefix:
            r = blocks[0]
            blocks = [Residual(r.blocks, scale=r.scale, shortcut=r.shortcut, prefix=prefix)]
        return blocks

    def node(self, n: Any, m: Any, prefix: str, where: str) -> tuple[str, Any, list[Any]]:
        """(kind, payload, tensor inputs) of one graph node: ("blocks", [...], [x]),
        ("scale", c, [x]) or ("add", None, [a, b])."""
        fx = self.torch.fx
        torch = self.torch
        tensors = [a for a in n.args if isinstance(a, fx.Node)]
        numbers_ = [a for a in n.args if _is_number(a)]
        target = n.target
        label = getattr(target, "__name__", str(target))

        def unsupported(why: str = "") -> ValueError:
            return ValueError(
                f"{where}: node {n.name!r} ({n.op} {label}) is not supported{why}; "
                f"gradchain reads {_SUPPORTED_NODES}"
            )

        if n.op == "call_module":
            if len(n.args) != 1 or n.kwargs or len(tensors) != 1:
                raise unsupported(": a submodule must be called on one tensor")
            return ("blocks", self.module(m.get_submodule(target), _join(prefix, target)), tensors)
        if n.op in ("call_function", "call_method"):
            if target in (operator.add, torch.add, "add") and not n.kwargs:
                if len(tensors) == 2 and len(n.args) == 2:
                    return ("add", None, tensors)
                raise unsupported(": only the sum of two tensors (a residual join)")
            if target in (operator.mul, torch.mul, "mul") and not n.kwargs:
                if len(tensors) == 1 and len(numbers_) == 1 and len(n.args) == 2:
                    return ("scale", float(numbers_[0]), tensors)
                raise unsupported(": only a tensor times a number")
            if target in (operator.truediv, torch.div, "div") and not n.kwargs:
                if (
                    len(n.args) == 2
                    and isinstance(n.args[0], fx.Node)
                    and _is_number(n.args[1])
                    and n.args[1] != 0
                ):
                    return ("scale", 1.0 / float(n.args[1]), [n.args[0]])
                raise unsupported(": only a tensor divided by a nonzero number")
            fn = self.functions.get(target) if _hashable(target) else None
            if fn is not None:
                if not tensors or n.args[0] is not tensors[0] or len(tensors) != 1:
                    raise unsupported(": an activation of one tensor")
                extra = dict(n.kwargs)
                extra.pop("inplace", None)
                if n.op == "call_method" and (len(n.args) > 1 or extra):
                    raise unsupported()
                return ("blocks", [fn(n, _join(prefix, n.name))], tensors)
        if n.op == "get_attr":
            raise unsupported(": parameters and buffers must belong to the modules gradchain reads")
        raise unsupported()


class _Graph:
    """The chain of blocks a traced forward computes: unary steps, and additions whose two
    sides start from a common value (the residual's input)."""

    def __init__(
        self, ops: dict[Any, tuple[str, Any, list[Any]]], start: Any, prefix: str, where: str
    ) -> None:
        self.ops = ops
        self.start = start
        self.prefix = prefix  # of the module whose forward this is
        self.where = where
        self.spines: dict[Any, list[Any]] = {}

    def spine(self, n: Any) -> list[Any]:
        """The values `n` is computed from, nearest first, down to the input (through an
        addition: through its fork)."""
        if n is self.start:
            return [n]
        if n not in self.spines:
            kind, _, ins = self.ops[n]
            below = self.fork(n) if kind == "add" else ins[0]
            self.spines[n] = [n, *self.spine(below)]
        return self.spines[n]

    def fork(self, n: Any) -> Any:
        a, b = self.ops[n][2]
        on_b = set(self.spine(b))
        return next(x for x in self.spine(a) if x in on_b)

    def between(self, n: Any, start: Any) -> list[Block]:
        """The blocks that compute `n` from `start`."""
        if n is start:
            return []
        if n is self.start:
            raise ValueError(
                f"{self.where}: node {n.name!r} does not start from the residual's input"
            )
        kind, payload, ins = self.ops[n]
        if kind == "blocks":
            return [*self.between(ins[0], start), *payload]
        if kind == "scale":
            return [*self.between(ins[0], start), Scale(payload, prefix=_join(self.prefix, n.name))]
        f = self.fork(n)
        a, b = (self.between(x, f) for x in ins)
        # The side that is x itself, or a single Linear of x, is the shortcut.
        if not a or not b:
            skip, body = (a, b) if not a else (b, a)
        elif len(b) == 1 and isinstance(b[0], Linear):
            skip, body = b, a
        elif len(a) == 1 and isinstance(a[0], Linear):
            skip, body = a, b
        else:
            raise ValueError(
                f"{self.where}: both sides of the addition {n.name!r} compute something; a residual "
                f"adds x, or a Linear of x, to f(x): got {a!r} and {b!r}"
            )
        if not body:
            raise ValueError(
                f"{self.where}: the addition {n.name!r} adds a value to itself (x + x)"
            )
        scale = 1.0
        last = body[-1]
        if isinstance(last, Scale):
            scale = last.value
            body.pop()
            if not body:
                raise ValueError(
                    f"{self.where}: the addition {n.name!r} is x + a * x, not a residual x + a * f(x)"
                )
        shortcut: bool | Linear = False
        if skip:
            assert isinstance(skip[0], Linear)
            shortcut = skip[0]
        res = Residual(body, scale=scale, shortcut=shortcut, prefix=_join(self.prefix, n.name))
        return [*self.between(f, start), res]


def _is_number(a: Any) -> bool:
    return isinstance(a, numbers.Real) and not isinstance(a, bool) and math.isfinite(float(a))


def _hashable(a: Any) -> bool:
    try:
        hash(a)
    except TypeError:
        return False
    return True


def blocks_of(model: Any, dtype: Any) -> tuple[list[Block], dict[str, np.ndarray], bool, np.dtype]:
    """(blocks, state_dict as NumPy arrays, train mode, dtype) of a torch model."""
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - only without torch
        raise ImportError("Chain.from_torch needs PyTorch: pip install torch") from exc
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    seen: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            raise ValueError(
                f"parameters {seen[id(p)]!r} and {name!r} are one tensor: shared parameters are not supported"
            )
        seen[id(p)] = name
    state = model.state_dict()
    kinds = {
        str(t.dtype).replace("torch.", "")
        for k, t in state.items()
        if t.is_floating_point() or t.is_complex()
    }
    bad = sorted(kinds - {"float32", "float64"})
    if bad:
        raise TypeError(
            f"the model holds {', '.join(bad)} parameters; gradchain accepts {_ACCEPTED_DTYPES} "
            "(convert with model.double() or model.float())"
        )
    if dtype is None:
        if len(kinds) > 1:
            raise TypeError(
                "the model mixes float32 and float64 parameters: pass dtype='float32' or 'float64'"
            )
        dtype = kinds.pop() if kinds else "float64"
    dt = v.dtype(dtype)
    reader = _Reader(torch)
    blocks = reader.module(model, "")
    if not blocks:
        raise ValueError("the model computes nothing gradchain can run (no blocks)")
    modes = set(reader.modes.values())
    if len(modes) > 1:
        train = sorted(k for k, t in reader.modes.items() if t)
        raise ValueError(
            f"the model's BatchNorm layers are in different modes (train: {train}); call model.train() or model.eval()"
        )
    training = modes.pop() if modes else bool(model.training)
    arrays = {k: t.detach().cpu().numpy() for k, t in state.items()}
    return blocks, arrays, training, dt
