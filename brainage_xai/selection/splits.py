"""One value per data split (train, validation, test), kept together."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")
U = TypeVar("U")

#: The data splits, in order.
SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True)
class Splits(Generic[T]):
    """A value per split: activation tensors, targets, loadings, row indices.

    ``splits["val"]`` and ``splits.val`` are the same; :meth:`map` applies one function
    to each, :meth:`items` iterates in the order train, val, test.
    """

    train: T
    val: T
    test: T

    def __getitem__(self, name: str) -> T:
        if name not in SPLIT_NAMES:
            raise KeyError(f"split must be one of {list(SPLIT_NAMES)}; {name!r} was provided")
        return getattr(self, name)

    def items(self) -> Iterator[tuple[str, T]]:
        return ((name, getattr(self, name)) for name in SPLIT_NAMES)

    def map(self, func: Callable[[T], U]) -> Splits[U]:
        return Splits(*(func(getattr(self, name)) for name in SPLIT_NAMES))

    def to_dict(self) -> dict[str, T]:
        return dict(self.items())

    @classmethod
    def from_dict(cls, values: dict) -> Splits:
        missing = [s for s in SPLIT_NAMES if s not in values]
        if missing:
            raise KeyError(f"missing split(s) {missing}")
        return cls(*(values[s] for s in SPLIT_NAMES))
