"""How many CPU threads torch may use in this process, so services sharing a machine leave CPU to each other.

Example:
    >>> cap_torch_threads(0)      # 0 keeps torch's default
    >>> import torch
    >>> before = torch.get_num_threads()
    >>> with torch_threads(1):
    ...     torch.get_num_threads()
    1
    >>> torch.get_num_threads() == before
    True
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


def cap_torch_threads(threads: int) -> None:
    """Cap torch's intra-op threads (0 keeps torch's default)."""
    if threads:
        import torch

        torch.set_num_threads(threads)


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the block on `threads` torch intra-op threads (0: as it is), then restore the number before it."""
    import torch

    before = torch.get_num_threads()
    cap_torch_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
