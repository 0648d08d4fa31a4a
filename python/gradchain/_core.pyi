"""Type stubs for gradchain's private compiled core."""

from typing import Any, overload

import numpy.typing as npt
from typing_extensions import Self

__version__: str
openmp: bool

def physical_memory_bytes() -> int: ...
def memory_limit(root: str = "") -> tuple[float, float, str]: ...
def check_memory(bytes: float, what: str, reusable: float = 0.0) -> None: ...
def forked_single_threaded() -> bool: ...
def max_threads() -> int: ...
def set_thread_limit(threads: int) -> int: ...
def blas_threads() -> int: ...
def vectorized_math() -> bool: ...
def activation_names() -> list[str]: ...
def init_names() -> list[str]: ...
def loss_names() -> list[str]: ...

class _Chain:
    def __init__(self, specs: list[dict[str, Any]], store_weights: bool = True) -> None: ...
    def init(self, init: str, gain: float, sigma_w: float, bias_std: float, seed: int) -> None: ...
    @property
    def in_width(self) -> int: ...
    @property
    def out_width(self) -> int: ...
    @property
    def num_params(self) -> int: ...
    @property
    def parameters(self) -> list[tuple[str, tuple[int, ...], bool]]: ...
    def param(self, index: int) -> npt.NDArray[Any]: ...
    def set_param(self, index: int, values: npt.NDArray[Any]) -> None: ...
    def set_params(self, items: list[tuple[int, npt.NDArray[Any]]]) -> None: ...
    def couples_batch(self, train: bool) -> bool: ...
    @property
    def draws_params(self) -> bool: ...
    def backward_bytes(self, batch: int, keep_grads: bool, checkpoint: int = 0) -> float: ...
    def forward(self, x: npt.NDArray[Any], train: bool) -> tuple[npt.NDArray[Any], int]: ...
    def backward(
        self,
        x: npt.NDArray[Any],
        loss: str,
        target: npt.NDArray[Any] | None,
        keep_grads: bool,
        max_norm: float,
        norm_type: float,
        train: bool,
        param_grads: bool = True,
        checkpoint: int = 0,
    ) -> dict[str, Any]: ...

class Chain64(_Chain): ...
class Chain32(_Chain): ...

def clip_total_norm(arrays: list[npt.NDArray[Any]], norm_type: float, error_if_nonfinite: bool) -> float: ...
def clip_grad_norm(
    arrays: list[npt.NDArray[Any]], max_norm: float, norm_type: float, error_if_nonfinite: bool
) -> float: ...
def clip_grad_value(arrays: list[npt.NDArray[Any]], clip_value: float) -> None: ...
def clip_coefficient(total_norm: float, max_norm: float) -> float: ...

def cell_names() -> list[str]: ...
def recurrent_init_names() -> list[str]: ...

class _RecurrentChain:
    def __init__(
        self,
        cell: str,
        input_size: int,
        hidden_size: int,
        num_layers: int,
        output_size: int,
        bias: bool,
        init: str,
        gain: float,
        recurrent_gain: float,
        spectral_radius: float,
        forget_bias: float | None,
        seed: int,
    ) -> None: ...
    @classmethod
    def from_params(
        cls,
        cell: str,
        input_size: int,
        hidden_size: int,
        num_layers: int,
        output_size: int,
        bias: bool,
        params: list[npt.NDArray[Any]],
    ) -> Self: ...
    @property
    def param_names(self) -> list[str]: ...
    def param(self, index: int) -> npt.NDArray[Any]: ...
    def run_bytes(
        self, steps: int, batch: int, keep_grads: bool, truncation: str, window: int, every_step: bool, forward_only: bool
    ) -> float: ...
    def forward(
        self, x: npt.NDArray[Any], h0: npt.NDArray[Any] | None, c0: npt.NDArray[Any] | None
    ) -> tuple[npt.NDArray[Any], npt.NDArray[Any], npt.NDArray[Any] | None]: ...
    def run(
        self,
        x: npt.NDArray[Any],
        h0: npt.NDArray[Any] | None,
        c0: npt.NDArray[Any] | None,
        loss: str,
        target: npt.NDArray[Any] | None,
        every_step: bool,
        truncation: str,
        window: int,
        max_norm: float,
        norm_type: float,
        keep_grads: bool,
    ) -> dict[str, Any]: ...

class RecurrentChain64(_RecurrentChain): ...
class RecurrentChain32(_RecurrentChain): ...

@overload
def jacobian_norms(
    chain: _Chain,
    x: npt.NDArray[Any],
    train: bool,
    layers: bool,
    spectral: bool,
    tol: float,
    max_iter: int,
    exact_max_dim: int,
) -> dict[str, npt.NDArray[Any]]: ...
@overload
def jacobian_norms(
    chain: _RecurrentChain,
    x: npt.NDArray[Any],
    h0: npt.NDArray[Any] | None,
    c0: npt.NDArray[Any] | None,
    spectral: bool,
    tol: float,
    max_iter: int,
    exact_max_dim: int,
) -> dict[str, npt.NDArray[Any]]: ...
@overload
def jacobian_spectrum(
    chain: _Chain,
    x: npt.NDArray[Any],
    train: bool,
    layers: bool,
    k: int,
    interval: int,
    start: str,
    seed: int,
) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]: ...
@overload
def jacobian_spectrum(
    chain: _RecurrentChain,
    x: npt.NDArray[Any],
    h0: npt.NDArray[Any] | None,
    c0: npt.NDArray[Any] | None,
    k: int,
    interval: int,
    start: str,
    seed: int,
) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]: ...

def jacobian_dims(chain: _Chain, batch: int, train: bool, layers: bool) -> list[int]: ...

class _Optimizer:
    def __init__(self, spec: dict[str, Any]) -> None: ...
    @property
    def spec(self) -> dict[str, Any]: ...
    def step(self, params: list[npt.NDArray[Any]], grads: list[npt.NDArray[Any]], lr: float) -> None: ...
    def state(self) -> list[tuple[float, dict[str, npt.NDArray[Any]]]]: ...
    def set_state(self, state: list[tuple[float, dict[str, npt.NDArray[Any]]]]) -> None: ...

class Optimizer64(_Optimizer): ...
class Optimizer32(_Optimizer): ...

def optimizer_names() -> list[str]: ...
def schedule_names() -> list[str]: ...

class LRSchedule:
    def __init__(self, spec: dict[str, Any], base_lr: float) -> None: ...
    @property
    def spec(self) -> dict[str, Any]: ...
    @property
    def base_lr(self) -> float: ...
    def lr(self) -> float: ...
    def step(self, loss: float = ...) -> None: ...
    def state(self) -> dict[str, Any]: ...
    def set_state(self, state: dict[str, Any]) -> None: ...
    def lrs(self, steps: int, losses: npt.NDArray[Any] | None = None) -> npt.NDArray[Any]: ...

def train(
    net: _Chain | _RecurrentChain,
    order: list[int],
    x: npt.NDArray[Any],
    y: npt.NDArray[Any],
    x_val: npt.NDArray[Any] | None,
    y_val: npt.NDArray[Any] | None,
    loss: str,
    sequences: bool,
    every_step: bool,
    optimizer: _Optimizer,
    schedule: LRSchedule | None,
    steps: int,
    batch_size: int,
    seed: int,
    shuffle: bool,
    max_norm: float,
    norm_type: float,
    clip_value: float,
    max_weight_norm: float,
    record_every: int,
    record_activation_grads: bool,
    train: bool,
    truncation: str,
    window: int,
    callback: Any,
) -> dict[str, Any]: ...
def batch_order(n: int, batch_size: int, steps: int, seed: int, shuffle: bool) -> npt.NDArray[Any]: ...
