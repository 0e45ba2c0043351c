"""Small helpers shared across the rooms."""

from __future__ import annotations

import os
from typing import Callable, Generic, Sequence, TypeVar

import torch

_OFF = ("0", "false", "off", "no")


def cdiv(a: int, b: int) -> int:
    """Ceiling division: how many blocks of `b` hold `a` items."""
    return -(-a // b)


def env_flag(name: str, default: bool) -> bool:
    """An on/off environment variable: unset or empty gives `default`; 0, false, off or no (any
    case) turn it off; any other value turns it on."""
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    return raw not in _OFF


def async_tensor_h2d(data: Sequence | torch.Tensor, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A host list or CPU tensor on `device`, without a host sync (vLLM's `async_tensor_h2d`).

    A plain `.to('cuda')` of pageable memory waits for the stream to drain before copying, so
    one issued after the forward pass is queued stalls the host until the GPU is done. Staged
    through pinned memory, the copy is queued behind the work already on the stream instead;
    PyTorch's pinned-memory cache keeps the staging buffer alive until the copy has run.
    On CPU this is a plain tensor.
    """
    cpu = data if isinstance(data, torch.Tensor) else torch.tensor(data, dtype=dtype)
    if cpu.dtype != dtype:
        cpu = cpu.to(dtype)
    device = torch.device(device)
    if device.type == "cpu":
        return cpu
    return cpu.pin_memory().to(device, non_blocking=True)


_C = TypeVar("_C", bound=type)


class Registry(Generic[_C]):
    """Name -> class, filled by the `register` decorator when the class's module is imported: how a
    command-line flag (`--tool-call-parser hermes`) names an implementation, as vLLM's parser managers do."""

    def __init__(self, kind: str, base: type) -> None:
        self.kind = kind
        self.base = base
        self._classes: dict[str, _C] = {}

    def register(self, name: str) -> Callable[[_C], _C]:
        def decorator(cls: _C) -> _C:
            if not (isinstance(cls, type) and issubclass(cls, self.base)):
                raise TypeError(f"{cls!r} is not a {self.base.__name__} subclass")
            self._classes[name] = cls
            return cls
        return decorator

    def get(self, name: str) -> _C:
        try:
            return self._classes[name]
        except KeyError:
            raise ValueError(f"unknown {self.kind} {name!r}; valid choices: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        return sorted(self._classes)
