"""How many CPU threads torch may use in this process, so services sharing a machine leave CPU to each other.

Example:
    >>> cap_torch_threads(0)      # 0 keeps torch's default
"""

from __future__ import annotations


def cap_torch_threads(threads: int) -> None:
    """Cap torch's intra-op threads (0 keeps torch's default)."""
    if threads:
        import torch

        torch.set_num_threads(threads)
