"""torch's CPU thread count for the span of one job."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def cpu_threads(count: int | None) -> Iterator[None]:
    """torch's CPU thread count set to `count` inside the block (untouched when None), restored after.

    Small models lose to threading overhead on a busy CPU, so model configs may ask for fewer threads.
    """
    previous = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
