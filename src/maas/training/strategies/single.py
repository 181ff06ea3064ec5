"""``single``: one process, no communication. The reference the other strategies are checked against."""

from __future__ import annotations

from maas.training.strategies.base import Strategy


class SingleStrategy(Strategy):
    def data_parallel(self) -> tuple[int, int]:
        return 0, 1
