"""Exceptions raised by gradchain."""

from __future__ import annotations

__all__ = ["NonFiniteError"]


class NonFiniteError(FloatingPointError):
    """A value became NaN or infinite inside a run.

    Parameters
    ----------
    message : str
        What happened, naming the place and index.
    where : str
        The stage: ``"forward"``, ``"loss"``, ``"clip"``...
    index : int
        The first layer (1-based) or timestep where the value appeared; -1 when the
        stage has no index.
    """

    def __init__(self, message: str, where: str = "", index: int = -1) -> None:
        super().__init__(message)
        self.where = where
        self.index = index

    def __reduce__(self):  # keep where/index through pickling (process pools)
        return (type(self), (str(self), self.where, self.index))
