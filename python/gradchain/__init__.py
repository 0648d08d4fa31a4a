"""gradchain: fast, exact simulation and diagnosis of vanishing and exploding gradients.

A C++ core runs forward and backward passes through very deep chains and returns
per-layer gradient norms that stay exact in log space where floats give 0 or inf.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    from . import _core
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "gradchain's compiled core (gradchain._core) could not be imported; "
        "was the package built? Install it with `pip install .` from the source tree."
    ) from exc

from . import optim, plot, tasks, theory
from .blocks import Activation, BatchNorm, Block, LayerNorm, Linear, Residual, RMSNorm, Scale
from .chain import Chain
from .clip import clip_coefficient, clip_grad_norm_, clip_grad_value_, get_total_norm
from .compare import TheoryComparison, compare_theory
from .diagnose import Diagnosis
from .errors import NonFiniteError
from .history import History
from .jacobian import JacobianNorms, JacobianSpectrum, jacobian_norms, jacobian_spectrum
from .mlp import ACTIVATIONS, INITS, LOSSES, MLP, NORM_POSITIONS, NORMS
from .report import BackwardReport, ChainReport, RecurrentReport
from .rnn import CELLS, RNN, RNN_INITS, RNN_LOSSES, TRUNCATE_MODES
from .sweep import SweepResult, sweep
from .train import train

try:
    __version__ = version("gradchain")
except PackageNotFoundError:  # pragma: no cover
    __version__ = _core.__version__

__all__ = [
    "ACTIVATIONS",
    "CELLS",
    "INITS",
    "LOSSES",
    "MLP",
    "NORMS",
    "NORM_POSITIONS",
    "RNN",
    "RNN_INITS",
    "RNN_LOSSES",
    "TRUNCATE_MODES",
    "Activation",
    "BackwardReport",
    "BatchNorm",
    "Block",
    "Chain",
    "ChainReport",
    "Diagnosis",
    "History",
    "JacobianNorms",
    "JacobianSpectrum",
    "LayerNorm",
    "Linear",
    "NonFiniteError",
    "RMSNorm",
    "RecurrentReport",
    "Residual",
    "Scale",
    "SweepResult",
    "TheoryComparison",
    "__version__",
    "clip_coefficient",
    "clip_grad_norm_",
    "clip_grad_value_",
    "compare_theory",
    "get_total_norm",
    "jacobian_norms",
    "jacobian_spectrum",
    "optim",
    "plot",
    "sweep",
    "tasks",
    "theory",
    "train",
]
