"""Capability names the project knows: the synthetic world's and the reference DPE pipeline's image types.

Example:
    >>> "chart_graph" in KNOWN_CAPABILITIES and "counting" in KNOWN_CAPABILITIES
    True
"""

from __future__ import annotations

from dpe.world.questions import CAPABILITIES

DPE_IMAGE_TYPES: tuple[str, ...] = (
    "geometric", "medical", "chart_graph", "text_dense", "diagram", "math_formula",
    "map", "natural_scene", "artistic", "everyday_object", "architectural", "mixed",
)
"""The reference DPE pipeline's 12 image-type categories, usable as capabilities for real benchmarks."""

KNOWN_CAPABILITIES: tuple[str, ...] = CAPABILITIES + DPE_IMAGE_TYPES


class UnknownCapability(ValueError):
    """An event or item names capabilities this deployment does not know (dead-lettered with the names)."""
