"""The front ends' view of a database: what both ``HashDB`` and the socket ``Client`` offer.

The CLI (and any caller that should not care whether it holds an embedded database or a connection to
``hashdb serve``) is written against ``Database``; a type checker verifies that both classes satisfy it.
Importing this module imports nothing heavy (no lmdb, numba or torch).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .codes import Code
    from .matching import ModelMatch

Match = tuple[str, int]  # (key, Hamming distance), as radius() and knn() return them
LayerMatch = tuple[str, str, int]  # (model key, layer name, Hamming distance), as layer_radius() returns them
Meta = dict[str, Any]


class Database(Protocol):
    """The methods HashDB and Client share: same arguments, same results, same error classes."""

    @property
    def bits(self) -> int: ...

    @property
    def codec(self) -> Meta | None:
        """The codec configuration stored with the database (None when no model was ever added)."""
        ...

    def set_codec(self, config: Meta | None) -> None: ...

    def insert(
        self, key: str, code: Code, meta: Meta | None = None, *, layers: Sequence[tuple[str, Code]] | None = None
    ) -> None: ...

    def insert_many(
        self, keys: Sequence[str], codes: Any, metas: Sequence[Meta | None] | None = None, *,
        layers: Sequence[Sequence[tuple[str, Code]] | None] | None = None,
    ) -> int: ...  # fmt: skip

    def delete(self, key: str) -> bool: ...

    def get(self, key: str) -> tuple[bytes, Meta | None]: ...

    def radius(self, code: Code, r: int, force: str | None = None) -> list[Match]: ...

    def radius_many(self, codes: Any, r: int, force: str | None = None) -> list[list[Match]]: ...

    def knn(self, code: Code, k: int, force: str | None = None) -> list[Match]: ...

    def layers(self, key: str) -> list[tuple[str, bytes]]: ...

    def layer_radius(self, code: Code, r: int, force: str | None = None) -> list[LayerMatch]: ...

    def layer_radius_many(self, codes: Any, r: int, force: str | None = None) -> list[list[LayerMatch]]: ...

    def layer_count(self) -> int: ...

    def find_matches(
        self, code: Code, layers: Sequence[tuple[str, Code]] | None = None, *, radius: int | None = None,
        knn: int | None = None, layer_radius: int | None = None, family: str | None = None,
    ) -> list[ModelMatch]: ...  # fmt: skip

    def stats(self) -> dict[str, Any]: ...

    def close(self) -> None: ...

    def __len__(self) -> int: ...

    def __contains__(self, key: object) -> bool: ...

    def __iter__(self) -> Iterator[str]: ...

    def __enter__(self) -> Database: ...

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...


__all__ = ["Database", "LayerMatch", "Match", "Meta"]
