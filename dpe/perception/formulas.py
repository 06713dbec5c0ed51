"""Formulas from readings: the text a reader saw, such as '15x3-15=?', turned into a `Formula`.

Readers differ in small ways a formula does not care about: full-width characters, '×' or '*' for
'x', spaces around operators, a trailing '=?' read or missed. `parse_formula` folds those away and
accepts only what the world draws: 2 to 4 whole numbers below 1000 joined by '+', '-' or 'x'. Anything
else (a '?' read as '7', a stray letter, a leading zero, a dangling operator) is refused with
`NotPerceived("unreadable")` rather than guessed at.

Example:
    >>> parse_formula("15x3-15=?").value()
    30
    >>> parse_formula("4 × 2 + 1").expression
    '4x2+1'
    >>> parse_formula("4+1=7")
    Traceback (most recent call last):
    ...
    dpe.perception.NotPerceived: unreadable: not a formula: '4+1=7'
"""

from __future__ import annotations

import re
import unicodedata

from dpe.perception import NotPerceived
from dpe.world.scene import Formula

_MAX_LENGTH = 64
_SIGNS = str.maketrans({"×": "x", "*": "x", "X": "x", "−": "-", "–": "-"})
_NUMBER = r"(?:0|[1-9][0-9]{0,2})"
_FORMULA = re.compile(rf"{_NUMBER}(?:[+\-x]{_NUMBER}){{1,3}}")
_QUESTION = re.compile(r"=\??$")


def parse_formula(text: str) -> Formula:
    """The formula in a reading; `NotPerceived('unreadable')` when the reading is not one."""
    if not isinstance(text, str) or len(text) > _MAX_LENGTH:
        raise NotPerceived("unreadable", "not a short string")
    folded = "".join(unicodedata.normalize("NFKC", text).translate(_SIGNS).split())
    expression = _QUESTION.sub("", folded)
    if not _FORMULA.fullmatch(expression):
        raise NotPerceived("unreadable", f"not a formula: {text!r}")
    operands = [int(number) for number in re.split(r"[+\-x]", expression)]
    return Formula(operands=operands, operators=re.findall(r"[+\-x]", expression))
