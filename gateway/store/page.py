"""One page of results: what every list or search function of the store returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")

MAX_LIMIT = 1000


class QueryError(ValueError):
    """A filter or paging argument is invalid; the message says which and why."""


@dataclass
class Page(Generic[T]):
    items: list[T]
    total: int  # rows matching, over all pages
    limit: int
    offset: int

    @property
    def has_more(self) -> bool:
        return self.offset + len(self.items) < self.total


def check_paging(limit: int, offset: int) -> None:
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_LIMIT:
        raise QueryError(f"limit must be an integer from 1 to {MAX_LIMIT}, got {limit!r}")
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise QueryError(f"offset must be a non-negative integer, got {offset!r}")
