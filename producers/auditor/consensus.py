"""Do the references agree, and does the target differ? The AuditDM decision for one probe.

Answers are compared in canonical form for the probe's answer type (an option letter, a number, yes
or no, normalised text), after extracting them from ``\\boxed{}`` as the evaluator does. A
reference that gives no usable answer abstains. The consensus is the most common canonical answer
among the references that answered (a tie is no consensus); its strength is the share of those
references that gave it. The target differs when its answer does not grade as correct against the
consensus (`dpe.grading.grade`, so a number within the probe's tolerance agrees).

Example:
    >>> from producers.auditor.probes import Probe
    >>> probe = Probe("p", "counting", "How many shapes?", "number")
    >>> agreed = consensus({"oracle": "3", "big-model": "There are \\\\boxed{3.0}", "small": None}, probe)
    >>> agreed
    Consensus(answer='3', strength=1.0, agreeing=2)
    >>> target_differs("\\\\boxed{4}", agreed, probe), target_differs("\\\\boxed{3}", agreed, probe)
    (True, False)
"""

from __future__ import annotations

import string
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

from dpe.grading import extract_answer, grade, normalize_text, parse_choice, parse_number, parse_yes_no
from producers.auditor.probes import Probe
from producers.auditor.settings import AuditorSettings


@dataclass(frozen=True)
class Consensus:
    """What the references agree on, how strongly (share of answering references), and how many agree."""

    answer: str
    strength: float
    agreeing: int

    def holds(self, settings: AuditorSettings) -> bool:
        """Whether it is strong enough to count (`AuditorSettings.min_consensus` and `min_agreeing`).

        >>> Consensus("B", 1.0, 1).holds(AuditorSettings(min_agreeing=2))
        False
        """
        return self.strength >= settings.min_consensus and self.agreeing >= settings.min_agreeing


def canonical(text: str | None, probe: Probe) -> str | None:
    """The answer in `text` in canonical form for the probe's answer type; None when there is none.

    Example:
        >>> canonical("\\\\boxed{(b)}", Probe("p", "color", "q", "choice", ("red", "blue")))
        'B'
        >>> canonical("7.0", Probe("p", "counting", "q", "number"))
        '7'
    """
    extracted = extract_answer(text) if text else None
    if extracted is None:
        return None
    if probe.answer_type == "choice":
        letter = parse_choice(extracted, probe.options)
        in_range = letter is not None and string.ascii_uppercase.index(letter) < len(probe.options or ())
        return letter if in_range else None
    if probe.answer_type == "number":
        value = parse_number(extracted)
        return None if value is None else f"{value:g}"
    if probe.answer_type == "yes_no":
        return parse_yes_no(extracted)
    return normalize_text(extracted) or None


def consensus(answers: Mapping[str, str | None], probe: Probe) -> Consensus | None:
    """The references' consensus on a probe, or None when none answered or the top answers tie."""
    counts = Counter(answer for text in answers.values() if (answer := canonical(text, probe)) is not None)
    if not counts:
        return None
    ranked = counts.most_common(2)
    if len(ranked) == 2 and ranked[0][1] == ranked[1][1]:
        return None
    answer, agreeing = ranked[0]
    return Consensus(answer, agreeing / sum(counts.values()), agreeing)


def target_differs(target_text: str, agreed: Consensus, probe: Probe) -> bool:
    """Whether the target's answer disagrees with the consensus (no usable answer disagrees too)."""
    return not grade(target_text, probe.key_for(agreed.answer)).correct
