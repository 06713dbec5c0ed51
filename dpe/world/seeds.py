"""Namespaced seeds: diagnostic, training and unlabeled draws can never share a seed.

A seed is a 64-bit integer whose top byte is the namespace code and whose low 56 bits are a hash
of the stream key (for example ``"counting/17"``). Two namespaces therefore live in disjoint seed
ranges by construction, and the namespace of any seed can be read back.

Example:
    >>> seed = derive_seed("diagnostic", "counting/17")
    >>> seed_namespace(seed)
    'diagnostic'
    >>> derive_seed("training", "counting/17") == seed
    False
"""

from __future__ import annotations

import hashlib
from typing import Literal, get_args

Namespace = Literal["diagnostic", "training", "unlabeled"]
"""Where a draw is used: the held-out diagnostic pool, the training stream, or unlabeled scenes."""

NAMESPACES: tuple[str, ...] = get_args(Namespace)
_NAMESPACE_CODES = {name: code for code, name in enumerate(NAMESPACES, start=1)}
_LOW_BITS = 56


def derive_seed(namespace: Namespace, key: str) -> int:
    """The seed of `key` inside `namespace`: namespace code in the top byte, key hash below.

    Example:
        >>> derive_seed("training", "color/0") >> 56
        2
    """
    if namespace not in _NAMESPACE_CODES:
        raise ValueError(f"unknown namespace {namespace!r}; expected one of {NAMESPACES}")
    digest = hashlib.sha256(f"{namespace}\x00{key}".encode()).digest()
    low = int.from_bytes(digest[:8], "big") & ((1 << _LOW_BITS) - 1)
    return (_NAMESPACE_CODES[namespace] << _LOW_BITS) | low


def seed_namespace(seed: int) -> str:
    """The namespace a seed was derived in.

    Example:
        >>> seed_namespace(derive_seed("unlabeled", "shapes/3"))
        'unlabeled'
    """
    code = seed >> _LOW_BITS
    for name, name_code in _NAMESPACE_CODES.items():
        if name_code == code:
            return name
    raise ValueError(f"seed {seed} was not derived with derive_seed")
