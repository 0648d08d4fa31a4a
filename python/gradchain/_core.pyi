"""Type stubs for gradchain's private compiled core."""

from typing import Any

import numpy as np
import numpy.typing as npt

__version__: str
openmp: bool

def physical_memory_bytes() -> int: ...
def max_threads() -> int: ...
def blas_threads() -> int: ...
def vectorized_math() -> bool: ...
def activation_names() -> list[str]: ...
def init_names() -> list[str]: ...
def loss_names() -> list[str]: ...

class _MLPChain:
    def __init__(
        self,
        widths: list[int],
        activation: str,
        negative_slope: float,
        alpha: float,
        init: str,
        gain: float,
        sigma_w: float,
        bias_std: float,
        seed: int,
    ) -> None: ...
    @property
    def widths(self) -> list[int]: ...
    @property
    def depth(self) -> int: ...
    @property
    def activation(self) -> str: ...
    @property
    def log_scale_forward(self) -> bool: ...
    def weight(self, layer: int) -> npt.NDArray[Any]: ...
    def bias(self, layer: int) -> npt.NDArray[Any]: ...
    def backward_bytes(self, batch: int, keep_grads: bool) -> float: ...
    def backward(
        self,
        x: npt.NDArray[Any],
        loss: str,
        target: npt.NDArray[Any] | None,
        keep_grads: bool,
        max_norm: float,
        norm_type: float,
    ) -> dict[str, Any]: ...

class MLPChain64(_MLPChain):
    @staticmethod
    def from_arrays(
        widths: list[int],
        activation: str,
        negative_slope: float,
        alpha: float,
        weights: npt.NDArray[np.float64],
        biases: npt.NDArray[np.float64],
    ) -> MLPChain64: ...

class MLPChain32(_MLPChain):
    @staticmethod
    def from_arrays(
        widths: list[int],
        activation: str,
        negative_slope: float,
        alpha: float,
        weights: npt.NDArray[np.float32],
        biases: npt.NDArray[np.float32],
    ) -> MLPChain32: ...

def clip_total_norm(arrays: list[npt.NDArray[Any]], norm_type: float, error_if_nonfinite: bool) -> float: ...
def clip_grad_norm(
    arrays: list[npt.NDArray[Any]], max_norm: float, norm_type: float, error_if_nonfinite: bool
) -> float: ...
def clip_grad_value(arrays: list[npt.NDArray[Any]], clip_value: float) -> None: ...
def clip_coefficient(total_norm: float, max_norm: float) -> float: ...
