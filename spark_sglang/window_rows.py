"""Which window-statistics rows are in use.

Every compression event (one request's extend) gets a row in the per-layer tables of window
statistics; every slot records its row (``slot_rows``), every running request its latest row (for
its decode tokens). Rows are handed out from a free list. When it runs dry, rows that no allocated
slot and no running request points at are reclaimed. If every row is live, a request borrows the
most recent row: its tokens are then chosen and recovered with that row's statistics, which stays
consistent (selection and recovery read the same row), only less tuned to its own queries.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Callable

import torch

logger = logging.getLogger(__name__)


class WindowRows:
    def __init__(self, num_rows: int):
        if num_rows < 1:
            raise ValueError("WindowRows needs at least one row")
        self.num_rows = num_rows
        self._free = deque(range(num_rows))
        self._last: int | None = None
        self.borrowed = 0  # requests that had to borrow a row (logged once)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, count: int, live_rows: Callable[[], torch.Tensor]) -> tuple[list[int], list[bool]]:
        """``count`` rows and, per row, whether it is fresh (its statistics are to be written).

        ``live_rows()`` returns a bool ``[num_rows]`` mask of rows still referenced; it is only
        called when the free list cannot cover ``count``.
        """
        if len(self._free) < count:
            self.collect(live_rows())
        rows, fresh = [], []
        for _ in range(count):
            if self._free:
                self._last = self._free.popleft()
                rows.append(self._last)
                fresh.append(True)
            else:
                if self.borrowed == 0:
                    logger.warning(
                        "SparK: all %d window-statistics rows are in use; new requests borrow the most "
                        "recent window until rows are reclaimed", self.num_rows,
                    )
                self.borrowed += 1
                rows.append(self._last)
                fresh.append(False)
        return rows, fresh

    def collect(self, live: torch.Tensor) -> None:
        """Rebuild the free list from a mask of live rows."""
        self._free = deque(torch.nonzero(~live.cpu()).flatten().tolist())


def live_rows(num_rows: int, slot_rows: torch.Tensor, allocated: torch.Tensor, req_rows: torch.Tensor,
              running: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Bool ``[num_rows]``: rows referenced by an allocated slot or by a running request."""
    live = torch.zeros(num_rows, dtype=torch.bool, device=slot_rows.device)
    live[slot_rows[allocated].long()] = True
    live[req_rows[running].long()] = True
    return live
