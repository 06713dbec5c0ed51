"""The base class of every settings section, wherever it lives (the core, the domain or a service).

Example:
    >>> class Demo(Section):
    ...     size: int = 1
    >>> Demo(size=2).size
    2
    >>> Demo(sise=2)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    pydantic_core._pydantic_core.ValidationError: 1 validation error for Demo
    sise
      Extra inputs are not permitted [type=extra_forbidden, input_value=2, input_type=int]...
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """Base of every settings section: frozen, and a key it does not know is an error, not ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)
